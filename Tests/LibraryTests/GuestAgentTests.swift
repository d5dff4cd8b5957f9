import Foundation
import API
import Library
@testable import Engines
import Testing

/// `vireo exec`'s client against Debian's qemu-guest-agent itself, run on the host on a Unix
/// socket (`qemu-ga -m unix-listen`): the same JSON the agent speaks inside a guest on its
/// virtio-serial port. The guest side is covered by the Debian image's boot (ImageTests).
@Suite(.serialized) struct GuestAgentTests {
    @Test("the guest agent client: a command's stdout, stderr and exit status come back; a missing program and a command that outlasts its time are errors naming why; a copy out of the guest past its limit is refused and keeps nothing; an agent that does not answer is said to be missing")
    func execThroughQemuGuestAgent() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-qga-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let socket = directory.appendingPathComponent("qga.sock").path
        // Through python3, which puts SIGCHLD back to its default and unblocks every signal: a
        // test process may ignore or block it, and qemu-ga learns that its commands ended from it.
        let agent = Process()
        agent.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        agent.arguments = ["-c", "import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_DFL); signal.pthread_sigmask(signal.SIG_SETMASK, []); "
                           + "os.execv('/usr/sbin/qemu-ga', ['qemu-ga'] + sys.argv[1:])", "-m", "unix-listen", "-p", socket, "-t", directory.path]
        try agent.run()
        defer { agent.terminate(); agent.waitUntilExit() }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket), Date() < deadline { usleep(20_000) }
        #expect(FileManager.default.fileExists(atPath: socket), "qemu-ga did not start (Debian's qemu-guest-agent is a test dependency)")

        // Twice: the second connection resynchronises past whatever the first left.
        for _ in 0..<2 {
            let result = try QEMUEngine.guestExec(agentPath: socket, vmName: "vm", command: ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], timeoutSeconds: 30)
            #expect(result.exitCode == 3 && result.signal == nil)
            #expect(String(decoding: result.stdout, as: UTF8.self) == "out\n" && String(decoding: result.stderr, as: UTF8.self) == "err\n")
        }
        let plain = try QEMUEngine.guestExec(agentPath: socket, vmName: "vm", command: ["/bin/echo", "a b", "c"], timeoutSeconds: 30)
        #expect(plain.exitCode == 0 && String(decoding: plain.stdout, as: UTF8.self) == "a b c\n")
        #expect(throws: LibraryError.self) { try QEMUEngine.guestExec(agentPath: socket, vmName: "vm", command: ["/nonexistent"], timeoutSeconds: 30) }
        do {
            _ = try QEMUEngine.guestExec(agentPath: socket, vmName: "vm", command: ["/bin/sleep", "5"], timeoutSeconds: 1)
            Issue.record("a command that outlasts its time must be an error")
        } catch {
            #expect("\(error)".contains("still runs after 1 s"), "\(error)")
        }
        // A copy out of the guest stops at its limit (the API's downloads are staged on the host's
        // disk, and the guest says how long its file is): refused, nothing kept; whole without one.
        let source = directory.appendingPathComponent("big.bin")
        let bytes = Data((0..<(3 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        try bytes.write(to: source)
        let target = directory.appendingPathComponent("copied.bin").path
        do {
            _ = try QEMUEngine.copyFromGuest(agentPath: socket, vmName: "vm", from: source.path, to: target, limit: 1 << 20) { _ in }
            Issue.record("a file past the limit was copied")
        } catch {
            #expect("\(error)".contains("is larger than the 1048576 bytes this copy takes"), "\(error)")
        }
        #expect(!FileManager.default.fileExists(atPath: target) && !FileManager.default.fileExists(atPath: target + ".vireo-partial"))
        #expect(try QEMUEngine.copyFromGuest(agentPath: socket, vmName: "vm", from: source.path, to: target) { _ in } == UInt64(bytes.count))
        #expect(FileManager.default.contents(atPath: target) == bytes)
        do {
            _ = try QEMUEngine.guestExec(agentPath: directory.appendingPathComponent("absent.sock").path, vmName: "vm", command: ["/bin/true"], timeoutSeconds: 5)
            Issue.record("no agent must be an error")
        } catch {
            #expect("\(error)".contains("no guest agent answers") && "\(error)".contains("qemu-guest-agent"), "\(error)")
        }
    }
}

@Suite struct GuestReportedAddressTests {
    @Test("the agent's version the guest reports is shown only as digits and dots")
    func agentVersionIsParsed() {
        #expect(QEMUEngine.versionText("7.2.19") == "7.2.19")
        for hostile in ["", "7.2\u{1b}[31m", "8.0.0-rc1", String(repeating: "9", count: 40), "7.2\n"] {
            #expect(QEMUEngine.versionText(hostile) == "unknown", "\(hostile.debugDescription)")
        }
    }

    @Test("addresses the guest agent reports are parsed, not believed: text, terminal escapes and oversized lists never reach `vireo info`/`list`; loopback and link-local are left out; IPv4 comes first")
    func hostileInterfaceReport() throws {
        let report = Data("""
        [{"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
         {"name": "eth0", "hardware-address": "52:54:00:AB:CD:EF", "ip-addresses": [
            {"ip-address-type": "ipv6", "ip-address": "2001:DB8:0:0::1", "prefix": 64},
            {"ip-address-type": "ipv6", "ip-address": "fe80::1", "prefix": 64},
            {"ip-address-type": "ipv4", "ip-address": "10.0.0.5\\u001b[2J\\u001b]0;owned\\u0007", "prefix": 24},
            {"ip-address-type": "ipv4", "ip-address": "not an address", "prefix": 24},
            {"ip-address-type": "ipv6", "ip-address": "192.168.1.9", "prefix": 24},
            {"ip-address-type": "ipv4", "ip-address": "10.0.0.7", "prefix": 24}]},
         {"name": "eth1", "hardware-address": "52:54:00:00:00:02\\u001b[31m", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.9.9.9", "prefix": 24}]},
         {"name": "eth2", "hardware-address": "52:54:00:00:00:03", "ip-addresses": [\(Array(repeating: #"{"ip-address-type": "ipv4", "ip-address": "10.1.1.1", "prefix": 24}"#, count: 100).joined(separator: ","))]}]
        """.utf8)
        let interfaces = try JSONDecoder().decode([QEMUEngine.GuestInterface].self, from: report)
        let usable = QEMUEngine.usableAddresses(interfaces)
        #expect(usable["52:54:00:ab:cd:ef"] == ["192.168.1.9", "10.0.0.7", "2001:db8::1"])
        #expect(usable.keys.sorted() == ["52:54:00:00:00:03", "52:54:00:ab:cd:ef"], "a MAC with an escape in it and a card with only loopback are dropped")
        #expect(usable["52:54:00:00:00:03"]?.count == QEMUEngine.maximumAddressesPerCard)
        #expect(usable.values.joined().allSatisfy { $0.allSatisfy { $0.isHexDigit || $0 == "." || $0 == ":" } })
    }
}

/// A socket that serves one client at a time (QEMU's QMP and agent sockets) and a client already
/// served: later connections wait in the listener's backlog, and once it is full a connect waits.
@Suite struct BusySocketTests {
    @Test("a connect to a socket whose backlog is full gives up after its time-out instead of waiting for the first client to go (`vireo info` of a VM whose QMP the containerd shim held waited forever)")
    func connectGivesUp() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-busy-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("one.sock").path
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        // Closing the listener also wakes a connect still waiting on it (the old code's hang).
        defer { close(listener) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        try #require(path.utf8.count < MemoryLayout.size(ofValue: address.sun_path), "\(path) is too long for a socket")
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in for (index, byte) in path.utf8.enumerated() { buffer[index] = byte } }
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        #expect(bound == 0 && listen(listener, 0) == 0)
        // Never accepted: the first connections fill the backlog. On a thread of its own, so a
        // connect that never returns is seen (after 20 s) rather than hanging the run, and a
        // loaded test run's busy task pool does not count against the connects.
        final class Outcome: @unchecked Sendable {
            var refused: (any Error)?
            var seconds = 0.0
            var waiting: [Int32] = []
        }
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        Thread {
            let started = Date()
            for _ in 0..<4 {
                do { outcome.waiting.append(try ControlConnection.connectUnix(path: path, timeoutSeconds: 1)) } catch {
                    outcome.refused = error
                    break
                }
            }
            outcome.seconds = Date().timeIntervalSince(started)
            done.signal()
        }.start()
        let finished = done.wait(timeout: .now() + 20) == .success
        #expect(finished, "a connect to a full backlog was still waiting after 20 s")
        guard finished else { return }
        for fd in outcome.waiting { close(fd) }
        #expect(outcome.refused != nil, "every connect went through a backlog of one")
        #expect(outcome.seconds < 10, "the connects waited \(outcome.seconds) s")
    }
}
