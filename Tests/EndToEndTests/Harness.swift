import CHostSupport
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

    /// A fresh temporary directory for one test, in the run's own directory (scripts/test.sh).
    /// Its name is short: a library's sockets lie beneath it, and a Unix socket's path must fit in
    /// 107 bytes, which caps the names of the VMs a test may make.
    static func temporaryDirectory() throws -> URL {
        var template = Array((FileManager.default.temporaryDirectory.path + "/vt-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw HarnessError("mkdtemp: \(String(cString: strerror(errno)))") }
        let path = String(cString: made)
        // As the tests' directories always were: jailed VMMs (their own uids) pass through it.
        guard chmod(path, 0o755) == 0 else { throw HarnessError("chmod \(path): \(String(cString: strerror(errno)))") }
        return URL(fileURLWithPath: path)
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
/// then react (type into the console, connect to a socket). Spawned with posix_spawn, not
/// Foundation's Process, whose Swift 6.3 version crashes now and then while listing
/// /proc/self/fd (swift-corelibs-foundation #5472; it took a whole suite down here).
final class RunningProcess: @unchecked Sendable {
    let processIdentifier: Int32
    private let input: Int32
    private let inputOpen = Mutex(true)
    private final class Collected: Sendable {
        let state = Mutex<(out: Data, err: Data)>((Data(), Data()))
        func withLock<T>(_ body: (inout (out: Data, err: Data)) -> T) -> T { state.withLock { body(&$0) } }
    }
    private let collected = Collected()
    /// Signalled when the reader has seen both pipes end.
    private let readersDone = DispatchSemaphore(value: 0)
    private let reaped = Mutex<Int32?>(nil)

    /// A child that exits before reading its input must not take the test process with it.
    private static let ignoreBrokenPipes: Void = { _ = Glibc.signal(SIGPIPE, SIG_IGN) }()

    init(_ arguments: [String], environment: [String: String] = [:]) {
        _ = Self.ignoreBrokenPipes
        func pipePair() -> (read: Int32, write: Int32) {
            // Close-on-exec is belt and braces: vireo_spawn_piped closes everything above 2.
            var ends: [Int32] = [-1, -1]
            _ = pipe(&ends)
            for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
            return (ends[0], ends[1])
        }
        let stdinPipe = pipePair(), stdoutPipe = pipePair(), stderrPipe = pipePair()
        var environmentLines: [String]?
        if !environment.isEmpty {
            environmentLines = ProcessInfo.processInfo.environment.merging(environment) { $1 }.map { "\($0.key)=\($0.value)" }
        }
        var pid: pid_t = 0
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environmentLines.map { $0.map { strdup($0) } + [nil] }
        let result = argv.withUnsafeBufferPointer { argvBuffer in
            if let envp {
                return envp.withUnsafeBufferPointer { envBuffer in
                    vireo_spawn_piped(arguments[0], argvBuffer.baseAddress, envBuffer.baseAddress, stdinPipe.read, stdoutPipe.write, stderrPipe.write, &pid)
                }
            }
            return vireo_spawn_piped(arguments[0], argvBuffer.baseAddress, nil, stdinPipe.read, stdoutPipe.write, stderrPipe.write, &pid)
        }
        for pointer in argv { free(pointer) }
        for pointer in envp ?? [] { free(pointer) }
        close(stdinPipe.read); close(stdoutPipe.write); close(stderrPipe.write)
        processIdentifier = result == 0 ? pid : -1
        input = stdinPipe.write
        if result != 0 {
            collected.withLock { $0.err.append(Data("spawn failed: \(String(cString: strerror(result)))".utf8)) }
            reaped.withLock { $0 = 127 }
        }
        // One thread reads both pipes until both end.
        let (out, err, collected, done) = (stdoutPipe.read, stderrPipe.read, collected, readersDone)
        let reader = Thread {
            var descriptors = [pollfd(fd: out, events: Int16(POLLIN), revents: 0), pollfd(fd: err, events: Int16(POLLIN), revents: 0)]
            var buffer = [UInt8](repeating: 0, count: 65536)
            while descriptors.contains(where: { $0.fd >= 0 }) {
                if poll(&descriptors, 2, -1) < 0 { if errno == EINTR { continue }; break }
                for index in 0..<2 where descriptors[index].fd >= 0 && descriptors[index].revents != 0 {
                    let count = buffer.withUnsafeMutableBytes { read(descriptors[index].fd, $0.baseAddress, $0.count) }
                    if count > 0 {
                        let data = Data(buffer[0..<count])
                        collected.withLock { if index == 0 { $0.out.append(data) } else { $0.err.append(data) } }
                    } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                        close(descriptors[index].fd)
                        descriptors[index].fd = -1
                    }
                }
            }
            done.signal()
        }
        reader.start()
    }

    deinit {
        inputOpen.withLock { if $0 { close(input); $0 = false } }
    }

    var stdout: String { collected.withLock { String(decoding: $0.out, as: UTF8.self) } }
    var stderr: String { collected.withLock { String(decoding: $0.err, as: UTF8.self) } }

    func send(_ data: Data) {
        inputOpen.withLock { open in
            guard open else { return }
            var remaining = data[...]
            while !remaining.isEmpty {
                let written = remaining.withUnsafeBytes { write(input, $0.baseAddress, $0.count) }
                if written < 0 && errno == EINTR { continue }
                guard written > 0 else { return }
                remaining = remaining.dropFirst(written)
            }
        }
    }

    func closeInput() { inputOpen.withLock { if $0 { close(input); $0 = false } } }

    /// Waits until stdout contains `text`; false on time-out or if the process exits first.
    func waitForOutput(_ text: String, timeout: TimeInterval) -> Bool { waitFor(text, in: \.stdout, timeout: timeout) }

    /// Waits until stderr contains `text`; false on time-out or if the process exits first.
    func waitForError(_ text: String, timeout: TimeInterval) -> Bool { waitFor(text, in: \.stderr, timeout: timeout) }

    private func waitFor(_ text: String, in stream: KeyPath<RunningProcess, String>, timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if self[keyPath: stream].contains(text) { return true }
            if hasExited { drain(); return self[keyPath: stream].contains(text) }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return false
    }

    func signal(_ number: Int32) { if !hasExited { kill(processIdentifier, number) } }

    /// The child's exit status (or 128+signal), reaping it once it has exited.
    private func exitStatus() -> Int32? {
        reaped.withLock { known in
            if let known { return known }
            var status: Int32 = 0
            guard waitpid(processIdentifier, &status, WNOHANG) == processIdentifier else { return nil }
            let code = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
            known = code
            return code
        }
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
            kill(processIdentifier, SIGKILL)
            while exitStatus() == nil { Thread.sleep(forTimeInterval: 0.02) }
            drain()
            return -1
        }
        drain()
        return status
    }

    /// Waits (briefly) for the reader to collect what the child wrote last: its pipes end when
    /// it has exited, unless something it started still holds them.
    private func drain() {
        if readersDone.wait(timeout: .now() + 2) == .success { readersDone.signal() }
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
