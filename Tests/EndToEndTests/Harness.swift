import Foundation
import Synchronization
import Testing

/// Paths and helpers shared by the end-to-end tests, which drive the real `vireo` binary.
enum Harness {
    static let packageRoot: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The `vireo` executable `swift build` produced. Tests fail, never skip, without it.
    static var vireo: String {
        if let path = ProcessInfo.processInfo.environment["VIREO_BIN"] { return path }
        return packageRoot.appendingPathComponent(".build/debug/vireo").path
    }

    /// The lean per-VM executable, next to `vireo`.
    static var vireoVMM: String {
        URL(fileURLWithPath: vireo).deletingLastPathComponent().appendingPathComponent("vireo-vmm").path
    }

    /// A fresh temporary directory for one test.
    static func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Requires /dev/kvm: on a machine without it these tests must fail loudly.
    static func requireKVM() throws {
        guard FileManager.default.isReadableFile(atPath: "/dev/kvm"), FileManager.default.isWritableFile(atPath: "/dev/kvm") else {
            throw HarnessError("/dev/kvm is missing or not read/writable: the VMM tests need KVM and do not skip")
        }
        guard FileManager.default.isExecutableFile(atPath: vireo) else {
            throw HarnessError("\(vireo) is missing: run `swift build` first (scripts/test.sh does)")
        }
    }

    /// Builds the probe guests once per test process with the system gcc.
    static let probes: Result<URL, HarnessError> = {
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-probes-\(getpid())")
        let result = run(["make", "-s", "-C", packageRoot.appendingPathComponent("probes").path, "OUT=\(out.path)"], timeout: 120)
        guard result.status == 0 else { return .failure(HarnessError("building probes failed: \(result.stderr)")) }
        return .success(out)
    }()

    static func probe(_ variant: String) throws -> String {
        try probes.get().appendingPathComponent("probe-\(variant).elf").path
    }

    struct Completed {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    /// Runs a command to completion (or kills it at `timeout`).
    @discardableResult
    static func run(_ arguments: [String], stdin: Data? = nil, timeout: TimeInterval = 60,
                    environment: [String: String] = [:]) -> Completed {
        let running = RunningProcess(arguments, environment: environment)
        if let stdin { running.send(stdin) }
        running.closeInput()
        let status = running.wait(timeout: timeout)
        return Completed(status: status, stdout: running.stdout, stderr: running.stderr)
    }

    static func vireoRun(_ arguments: [String], stdin: Data? = nil, timeout: TimeInterval = 60) -> Completed {
        run([vireo, "run"] + arguments, stdin: stdin, timeout: timeout)
    }
}

struct HarnessError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A child process whose output is collected as it arrives, so a test can wait for a line and
/// then react (type into the console, connect to a socket).
final class RunningProcess: @unchecked Sendable {
    private let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private let errors = Pipe()
    private final class Collected: Sendable {
        let state = Mutex<(out: Data, err: Data)>((Data(), Data()))
        func withLock<T>(_ body: (inout (out: Data, err: Data)) -> T) -> T { state.withLock { body(&$0) } }
    }
    private let collected = Collected()

    init(_ arguments: [String], environment: [String: String] = [:]) {
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        process.executableURL = URL(fileURLWithPath: arguments[0].hasPrefix("/") ? arguments[0] : "/usr/bin/env")
        process.arguments = arguments[0].hasPrefix("/") ? Array(arguments.dropFirst()) : arguments
        process.standardInput = input
        process.standardOutput = output
        process.standardError = errors
        output.fileHandleForReading.readabilityHandler = { [collected] handle in
            let data = handle.availableData
            collected.withLock { $0.out.append(data) }
        }
        errors.fileHandleForReading.readabilityHandler = { [collected] handle in
            let data = handle.availableData
            collected.withLock { $0.err.append(data) }
        }
        do { try process.run() } catch { collected.withLock { $0.err.append(Data("spawn failed: \(error)".utf8)) } }
    }

    var stdout: String { collected.withLock { String(decoding: $0.out, as: UTF8.self) } }
    var stderr: String { collected.withLock { String(decoding: $0.err, as: UTF8.self) } }
    var processIdentifier: Int32 { process.processIdentifier }

    func send(_ data: Data) { try? input.fileHandleForWriting.write(contentsOf: data) }
    func closeInput() { try? input.fileHandleForWriting.close() }

    /// Waits until stdout contains `text`; false on time-out or if the process exits first.
    func waitForOutput(_ text: String, timeout: TimeInterval) -> Bool { waitFor(text, in: \.stdout, timeout: timeout) }

    /// Waits until stderr contains `text`; false on time-out or if the process exits first.
    func waitForError(_ text: String, timeout: TimeInterval) -> Bool { waitFor(text, in: \.stderr, timeout: timeout) }

    private func waitFor(_ text: String, in stream: KeyPath<RunningProcess, String>, timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if self[keyPath: stream].contains(text) { return true }
            if hasExited { return self[keyPath: stream].contains(text) }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return false
    }

    func signal(_ number: Int32) { if !hasExited { kill(process.processIdentifier, number) } }

    /// The child's exit, seen without reaping it (waitid with WNOWAIT): Foundation's own
    /// bookkeeping has been seen to miss a child's exit while others run, so tests ask the kernel.
    private func exitStatus() -> Int32? {
        let pid = process.processIdentifier
        guard pid > 0 else { return process.isRunning ? nil : process.terminationStatus }
        var info = siginfo_t()
        guard waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 else {
            // Already reaped by Foundation.
            return process.isRunning ? nil : (process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus)
        }
        guard info._sifields._sigchld.si_pid == pid else { return nil }
        let status = info._sifields._sigchld.si_status
        return info.si_code == Int32(CLD_EXITED) ? status : 128 + status
    }

    var hasExited: Bool { exitStatus() != nil }

    /// Exit status (or 128+signal); kills the process with SIGKILL at `timeout` and returns -1.
    func wait(timeout: TimeInterval) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        var status = exitStatus()
        while status == nil && Date() < deadline {
            Thread.sleep(forTimeInterval: 0.02)
            status = exitStatus()
        }
        guard let status else {
            kill(process.processIdentifier, SIGKILL)
            while exitStatus() == nil { Thread.sleep(forTimeInterval: 0.02) }
            drain()
            return -1
        }
        drain()
        return status
    }

    /// Collects what the child wrote last. Its pipes end when it has exited (nothing else holds them).
    private func drain() {
        Thread.sleep(forTimeInterval: 0.1)
        output.fileHandleForReading.readabilityHandler = nil
        errors.fileHandleForReading.readabilityHandler = nil
        collected.withLock { state in
            state.out.append(output.fileHandleForReading.readDataToEndOfFile())
            state.err.append(errors.fileHandleForReading.readDataToEndOfFile())
        }
    }
}

/// One request on a VMM's control socket (docs/control-socket.md), one reply line back.
enum ControlClient {
    static func request(_ line: String, socket path: String, timeout: TimeInterval = 10) throws -> String {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket: errno \(errno)") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw HarnessError("socket path too long: \(path)") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw HarnessError("connect \(path): errno \(errno)") }
        var seconds = timeval(tv_sec: Int(timeout), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &seconds, socklen_t(MemoryLayout<timeval>.size))
        let request = Array((line + "\n").utf8)
        guard request.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == request.count else { throw HarnessError("write: errno \(errno)") }
        var reply: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !reply.contains(0x0a) {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard count > 0 else { break }
            reply += buffer[0..<count]
        }
        return String(decoding: reply, as: UTF8.self)
    }
}

/// FNV-1a, 32-bit, as the probe computes it over the initrd.
func fnv1a(_ bytes: [UInt8]) -> UInt32 {
    var hash: UInt32 = 2_166_136_261
    for byte in bytes { hash = (hash ^ UInt32(byte)) &* 16_777_619 }
    return hash
}

func randomBytes(_ count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
}
