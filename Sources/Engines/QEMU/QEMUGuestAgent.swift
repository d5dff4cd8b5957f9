import FoundationEssentials
import Library
#if canImport(Glibc)
import Glibc
#endif

/// `vireo exec` on the qemu engine: qemu-guest-agent's `guest-exec` and `guest-exec-status`
/// over the VM's virtio-serial port (docs/guest-agent.md).
extension QEMUEngine: GuestAgentEngine {
    public func exec(_ vm: EngineVM, command: [String], timeoutSeconds: Int) throws(LibraryError) -> GuestExecResult {
        try Self.guestExec(agentPath: vm.bundle.guestAgentPath, vmName: vm.name, command: command, timeoutSeconds: timeoutSeconds)
    }

    /// `guest-set-time` with the host's time, when the guest has the agent's port open (QMP's
    /// `frontend-open` for its chardev, which the saved state carries: a guest without an agent
    /// costs no wait). qemu-ga sets the system clock, then the guest's RTC from it (hwclock -w).
    public func synchroniseClock(_ vm: EngineVM) -> String? {
        guard Self.agentPortOpen(vm) else { return nil }
        struct SetTime: Encodable { var time: Int64 }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        do {
            let agent = try QMPConnection(path: vm.bundle.guestAgentPath, timeoutSeconds: 10, peer: .guestAgent)
            _ = try agent.execute("guest-set-time", arguments: SetTime(time: Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec)))
            return nil
        } catch {
            return "the guest's clock was not set from the host's (\(error)); it stands where it was saved until NTP corrects it"
        }
    }

    /// Whether the guest has its agent's port open (QMP's `frontend-open` for its chardev), asked
    /// on `qmp` when the caller holds QEMU's one monitor connection already.
    static func agentPortOpen(_ vm: EngineVM, qmp given: QMPConnection? = nil, timeoutSeconds: Int = 5) -> Bool {
        struct Chardev: Decodable {
            var label: String
            var frontendOpen: Bool?
            enum CodingKeys: String, CodingKey { case label, frontendOpen = "frontend-open" }
        }
        guard let qmp = given ?? (try? QMPConnection(path: vm.bundle.qmpPath, timeoutSeconds: timeoutSeconds)),
              let chardevs = try? qmp.execute("query-chardev", as: [Chardev].self) else { return false }
        return chardevs.first(where: { $0.label == "qga0" })?.frontendOpen == true
    }

    /// Runs `body` with the guest's file systems frozen (`guest-fsfreeze-freeze`, thawed after
    /// whatever happens; qemu-ga also thaws by itself if its client goes). Says what the disks
    /// hold: application-consistent, or crash-consistent and why.
    static func withFrozenFileSystems(_ vm: EngineVM, qmp: QMPConnection, _ body: () -> Void) -> String {
        guard agentPortOpen(vm, qmp: qmp) else {
            body()
            return "no guest agent runs to freeze its file systems, so the disks are as a power cut would leave them"
        }
        struct Count: Decodable {
            var value: Int
            init(from decoder: any Decoder) throws { value = try decoder.singleValueContainer().decode(Int.self) }
        }
        let agent: QMPConnection
        let frozen: Int
        do {
            agent = try QMPConnection(path: vm.bundle.guestAgentPath, timeoutSeconds: 30, peer: .guestAgent)
            frozen = try agent.execute("guest-fsfreeze-freeze", as: Count.self).value
        } catch {
            body()
            return "the guest agent did not freeze its file systems (\(error)), so the disks are as a power cut would leave them"
        }
        body()
        do { _ = try agent.execute("guest-fsfreeze-thaw", as: Count.self) } catch {
            return "the guest's \(frozen) file system(s) were frozen for the switch, but thawing failed (\(error)): check the guest (`vireo exec \(vm.name) -- /sbin/fsfreeze -u /`)"
        }
        return "the guest's \(frozen) file system(s) were frozen for the switch, so the disks are consistent"
    }

    /// qemu-ga answers nothing to `guest-shutdown` when it works (the guest is going down), so
    /// the request is sent and any reply or silence taken as accepted; a refusal is not.
    public func agentShutdown(_ vm: EngineVM) -> Bool {
        guard Self.agentPortOpen(vm), let agent = try? QMPConnection(path: vm.bundle.guestAgentPath, timeoutSeconds: 5, peer: .guestAgent) else { return false }
        struct Mode: Encodable { var mode = "powerdown" }
        do { _ = try agent.execute("guest-shutdown", arguments: Mode()) } catch {
            if case .refused = error { return false }
        }
        return true
    }

    /// One interface as `guest-network-get-interfaces` reports it.
    struct GuestInterface: Decodable {
        struct Address: Decodable {
            var type: String
            var address: String
            enum CodingKeys: String, CodingKey { case type = "ip-address-type", address = "ip-address" }
        }
        var name: String
        var hardwareAddress: String?
        var addresses: [Address]?
        enum CodingKeys: String, CodingKey { case name, hardwareAddress = "hardware-address", addresses = "ip-addresses" }
    }

    public var agentChannel: String { "virtio-serial port org.qemu.guest_agent.0" }

    struct GuestInfo: Decodable { var version: String }

    public func agentVersion(_ vm: EngineVM, timeoutSeconds: Int) -> String? {
        guard Self.agentPortOpen(vm, timeoutSeconds: timeoutSeconds),
              let agent = try? QMPConnection(path: vm.bundle.guestAgentPath, timeoutSeconds: timeoutSeconds, peer: .guestAgent),
              let info = try? agent.execute("guest-info", as: GuestInfo.self) else { return nil }
        return Self.versionText(info.version)
    }

    /// The guest writes its agent's version: shown only if it is digits and dots (and short), and
    /// as "unknown" otherwise, never printed as the guest wrote it.
    static func versionText(_ text: String) -> String {
        guard !text.isEmpty, text.utf8.count <= 32, text.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2e }) else { return "unknown" }
        return text
    }

    public func interfaceAddresses(_ vm: EngineVM, timeoutSeconds: Int) -> [String: [String]] {
        // QEMU serves one monitor client at a time: a list must not wait long behind another.
        guard Self.agentPortOpen(vm, timeoutSeconds: timeoutSeconds),
              let agent = try? QMPConnection(path: vm.bundle.guestAgentPath, timeoutSeconds: timeoutSeconds, peer: .guestAgent),
              let interfaces = try? agent.execute("guest-network-get-interfaces", as: [GuestInterface].self) else { return [:] }
        return Self.usableAddresses(interfaces)
    }

    /// At most this many addresses per card reach `vireo info`/`list`: the guest decides how many
    /// it reports.
    static let maximumAddressesPerCard = 16

    /// The guest's report, keyed by MAC, kept to what can be shown: the guest writes these
    /// strings, so each address is parsed as an IP address and shown in its canonical form (a
    /// report carrying terminal escapes or text is dropped, never printed); loopback and
    /// link-local addresses are left out; IPv4 first, as `vireo list` shows the first.
    static func usableAddresses(_ interfaces: [GuestInterface]) -> [String: [String]] {
        var byMAC: [String: [String]] = [:]
        for interface in interfaces {
            guard let mac = interface.hardwareAddress.flatMap(MACAddressText.canonical), mac != "00:00:00:00:00:00" else { continue }
            var ipv4: [String] = [], ipv6: [String] = []
            for reported in interface.addresses ?? [] {
                if let address = IPAddressText.canonicalIPv4(reported.address) {
                    if !address.hasPrefix("127.") { ipv4.append(address) }
                } else if let address = IPAddressText.canonicalIPv6(reported.address) {
                    if address != "::1" && !address.hasPrefix("fe80:") { ipv6.append(address) }
                }
            }
            let merged = byMAC[mac, default: []] + ipv4 + ipv6
            byMAC[mac] = Array(merged.prefix(maximumAddressesPerCard))
        }
        return byMAC.filter { !$0.value.isEmpty }
    }

    /// The exchange itself, on the agent's socket at `agentPath`.
    static func guestExec(agentPath: String, vmName: String, command: [String], timeoutSeconds: Int) throws(LibraryError) -> GuestExecResult {
        guard command.first?.isEmpty == false else { throw .invalidValue(field: "COMMAND", reason: "missing; give the program to run and its arguments") }
        let agent: QMPConnection
        do { agent = try QMPConnection(path: agentPath, timeoutSeconds: 10, peer: .guestAgent) } catch {
            throw .engine(name: vmName, reason: "no guest agent answers (\(error)); install and start qemu-guest-agent in the guest (`vireo image build` images have it)", exitStatus: 1)
        }
        return try guestExec(agent: agent, vmName: vmName, command: command, timeoutSeconds: timeoutSeconds)
    }

    /// The exchange on a connection already open (the agent serves one client at a time: a copy
    /// that ends with a command runs it on its own connection).
    static func guestExec(agent: QMPConnection, vmName: String, command: [String], timeoutSeconds: Int) throws(LibraryError) -> GuestExecResult {
        guard let path = command.first, !path.isEmpty else { throw .invalidValue(field: "COMMAND", reason: "missing; give the program to run and its arguments") }
        struct Exec: Encodable {
            var path: String
            var arg: [String]
            var captureOutput = true
            enum CodingKeys: String, CodingKey { case path, arg, captureOutput = "capture-output" }
        }
        struct Started: Decodable { var pid: Int }
        struct Status: Encodable { var pid: Int }
        struct Finished: Decodable {
            var exited: Bool
            var exitcode: Int32?
            var signal: Int32?
            var outData: String?
            var errData: String?
            var outTruncated: Bool?
            var errTruncated: Bool?
            enum CodingKeys: String, CodingKey {
                case exited, exitcode, signal, outData = "out-data", errData = "err-data", outTruncated = "out-truncated", errTruncated = "err-truncated"
            }
        }
        func failure(_ error: QMPConnection.Failure) -> LibraryError {
            .engine(name: vmName, reason: "the guest agent: \(error)", exitStatus: 1)
        }
        let started: Started
        do { started = try agent.execute("guest-exec", arguments: Exec(path: path, arg: Array(command.dropFirst())), as: Started.self) } catch {
            throw failure(error)
        }
        let deadline = HostCommand.monotonicSeconds() + Double(timeoutSeconds)
        while true {
            let status: Finished
            do { status = try agent.execute("guest-exec-status", arguments: Status(pid: started.pid), as: Finished.self) } catch { throw failure(error) }
            if status.exited {
                func decode(_ text: String?) -> [UInt8] { text.flatMap { Data(base64Encoded: $0) }.map(Array.init) ?? [] }
                return GuestExecResult(exitCode: status.exitcode ?? (status.signal.map { 128 + $0 } ?? 1), signal: status.signal,
                                       stdout: decode(status.outData), stderr: decode(status.errData),
                                       truncated: status.outTruncated == true || status.errTruncated == true)
            }
            guard HostCommand.monotonicSeconds() < deadline else {
                throw .engine(name: vmName, reason: "\(path) (pid \(started.pid) in the guest) still runs after \(timeoutSeconds) s; it was left running", exitStatus: 1)
            }
            usleep(100_000)
        }
    }
}

/// `vireo cp` on the qemu engine: QGA's file calls (guest-file-open/read/write/close), a MiB at
/// a time, base64 on the wire. What arrives in the guest is written beside its target and moved
/// into place only once whole (`mv -f` through guest-exec), and what arrives on the host is
/// written beside its target and renamed: a copy that fails leaves the target as it was.
extension QEMUEngine: GuestFileEngine {
    static let chunkBytes = 1 << 20

    public func copyToGuest(_ vm: EngineVM, from hostPath: String, to guestPath: String, progress: (UInt64, UInt64) -> Void) throws(LibraryError) -> UInt64 {
        try Self.copyToGuest(agentPath: vm.bundle.guestAgentPath, vmName: vm.name, from: hostPath, to: guestPath, progress: progress)
    }

    public func copyFromGuest(_ vm: EngineVM, from guestPath: String, to hostPath: String, limit: UInt64?, progress: (UInt64) -> Void) throws(LibraryError) -> UInt64 {
        try Self.copyFromGuest(agentPath: vm.bundle.guestAgentPath, vmName: vm.name, from: guestPath, to: hostPath, limit: limit, progress: progress)
    }

    struct FileOpen: Encodable { var path: String; var mode: String }
    struct FileHandle: Encodable { var handle: Int }
    struct FileWrite: Encodable {
        var handle: Int
        var buffer: String
        enum CodingKeys: String, CodingKey { case handle, buffer = "buf-b64" }
    }
    struct FileRead: Encodable { var handle: Int; var count: Int }
    struct FileWritten: Decodable { var count: Int }
    struct FileData: Decodable {
        var count: Int
        var buffer: String
        var eof: Bool
        enum CodingKeys: String, CodingKey { case count, buffer = "buf-b64", eof }
    }

    static func agent(_ agentPath: String, vmName: String) throws(LibraryError) -> QMPConnection {
        do { return try QMPConnection(path: agentPath, timeoutSeconds: 30, peer: .guestAgent) } catch {
            throw .engine(name: vmName, reason: "no guest agent answers (\(error)); install and start qemu-guest-agent in the guest (`vireo image build` images have it)", exitStatus: 1)
        }
    }

    static func guestPathChecked(_ path: String) throws(LibraryError) {
        guard path.hasPrefix("/"), !path.utf8.contains(0), path.utf8.count <= 4000 else {
            throw .invalidValue(field: "GUEST_PATH", reason: "'\(path.prefix(200))' is not an absolute path in the guest (give VM:/path/to/file)")
        }
    }

    static func copyToGuest(agentPath: String, vmName: String, from hostPath: String, to guestPath: String,
                            progress: (UInt64, UInt64) -> Void) throws(LibraryError) -> UInt64 {
        try guestPathChecked(guestPath)
        guard guestPath.hasSuffix("/") == false else { throw .invalidValue(field: "GUEST_PATH", reason: "\(guestPath) names a directory; give the file's full path in the guest") }
        let source = open(hostPath, O_RDONLY | O_CLOEXEC)
        guard source >= 0 else { throw .invalidValue(field: "HOST_PATH", reason: "cannot read \(hostPath): \(String(cString: strerror(errno)))") }
        defer { close(source) }
        var status = stat()
        guard fstat(source, &status) == 0, status.st_mode & S_IFMT == S_IFREG else {
            throw .invalidValue(field: "HOST_PATH", reason: "\(hostPath) is not a regular file")
        }
        let total = UInt64(status.st_size)
        let agent = try agent(agentPath, vmName: vmName)
        let partial = guestPath + ".vireo-partial"
        func failure(_ what: String, _ error: QMPConnection.Failure) -> LibraryError {
            .engine(name: vmName, reason: "cannot \(what): \(error)", exitStatus: 1)
        }
        struct Handle: Decodable { var value: Int; init(from decoder: any Decoder) throws { value = try decoder.singleValueContainer().decode(Int.self) } }
        let handle: Int
        do { handle = try agent.execute("guest-file-open", arguments: FileOpen(path: partial, mode: "w"), as: Handle.self).value } catch {
            throw failure("write \(guestPath) in the guest", error)
        }
        var written: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: chunkBytes)
        var copyError: LibraryError?
        while copyError == nil {
            let count = buffer.withUnsafeMutableBytes { read(source, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count < 0 { copyError = .io(operation: "read", path: hostPath, errno: errno); break }
            if count == 0 { break }
            let text = Data(buffer[0..<count]).base64EncodedString()
            do {
                let reply = try agent.execute("guest-file-write", arguments: FileWrite(handle: handle, buffer: text), as: FileWritten.self)
                guard reply.count == count else { copyError = .engine(name: vmName, reason: "the guest wrote \(reply.count) of \(count) bytes to \(partial) (is its disk full?)", exitStatus: 1); break }
            } catch { copyError = failure("write \(partial) in the guest", error); break }
            written += UInt64(count)
            progress(written, total)
        }
        do { _ = try agent.execute("guest-file-close", arguments: FileHandle(handle: handle)) } catch {
            copyError = copyError ?? failure("close \(partial) in the guest", error)
        }
        if copyError == nil {
            let moved = try guestExec(agent: agent, vmName: vmName, command: ["/bin/mv", "-f", partial, guestPath], timeoutSeconds: 60)
            if moved.exitCode != 0 {
                copyError = .engine(name: vmName, reason: "cannot put the file at \(guestPath) in the guest: \(String(decoding: moved.stderr, as: UTF8.self).trimmingWhitespace())", exitStatus: 1)
            }
        }
        if let copyError {
            _ = try? guestExec(agent: agent, vmName: vmName, command: ["/bin/rm", "-f", partial], timeoutSeconds: 30)
            throw copyError
        }
        return written
    }

    static func copyFromGuest(agentPath: String, vmName: String, from guestPath: String, to hostPath: String, limit: UInt64? = nil,
                              progress: (UInt64) -> Void) throws(LibraryError) -> UInt64 {
        try guestPathChecked(guestPath)
        let directory = HostFiles.parent(of: HostFiles.absolute(hostPath))
        guard HostFiles.isDirectory(directory), !HostFiles.isDirectory(hostPath) else {
            throw .invalidValue(field: "HOST_PATH", reason: HostFiles.isDirectory(hostPath) ? "\(hostPath) is a directory; give the file's full path" : "\(directory) is not a directory")
        }
        let agent = try agent(agentPath, vmName: vmName)
        struct Handle: Decodable { var value: Int; init(from decoder: any Decoder) throws { value = try decoder.singleValueContainer().decode(Int.self) } }
        let handle: Int
        do { handle = try agent.execute("guest-file-open", arguments: FileOpen(path: guestPath, mode: "r"), as: Handle.self).value } catch {
            // The agent's refusal (no such file, no permission) is the caller's to fix: status 2.
            if case .refused = error { throw .engine(name: vmName, reason: "cannot read \(guestPath) in the guest: \(error)", exitStatus: 2) }
            throw .engine(name: vmName, reason: "cannot read \(guestPath) in the guest: \(error)", exitStatus: 1)
        }
        let partial = HostFiles.absolute(hostPath) + ".vireo-partial"
        let target = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard target >= 0 else {
            let code = errno
            _ = try? agent.execute("guest-file-close", arguments: FileHandle(handle: handle))
            throw .io(operation: "create", path: partial, errno: code)
        }
        var copied: UInt64 = 0
        var copyError: LibraryError?
        while copyError == nil {
            let chunk: FileData
            do { chunk = try agent.execute("guest-file-read", arguments: FileRead(handle: handle, count: chunkBytes), as: FileData.self) } catch {
                copyError = .engine(name: vmName, reason: "cannot read \(guestPath) in the guest: \(error)", exitStatus: 1)
                break
            }
            guard let bytes = Data(base64Encoded: chunk.buffer), bytes.count == chunk.count, chunk.count <= chunkBytes else {
                copyError = .engine(name: vmName, reason: "the guest agent sent a malformed block of \(guestPath)", exitStatus: 1)
                break
            }
            if let limit, copied + UInt64(bytes.count) > limit {
                copyError = .invalidValue(field: "GUEST_PATH", reason: "\(guestPath) in the guest is larger than the \(limit) bytes this copy takes; nothing was kept")
                break
            }
            let wrote = bytes.withUnsafeBytes { write(target, $0.baseAddress, $0.count) }
            guard wrote == bytes.count else { copyError = .io(operation: "write", path: partial, errno: wrote < 0 ? errno : ENOSPC); break }
            copied += UInt64(bytes.count)
            progress(copied)
            if chunk.eof || chunk.count == 0 { break }
        }
        _ = try? agent.execute("guest-file-close", arguments: FileHandle(handle: handle))
        if copyError == nil, fsync(target) != 0 { copyError = .io(operation: "fsync", path: partial, errno: errno) }
        close(target)
        if copyError == nil, rename(partial, HostFiles.absolute(hostPath)) != 0 { copyError = .io(operation: "rename to \(hostPath)", path: partial, errno: errno) }
        if let copyError {
            unlink(partial)
            throw copyError
        }
        return copied
    }
}

enum MACAddressText {
    /// `52:54:00:AB:cd:ef` → `52:54:00:ab:cd:ef`; anything else is nil.
    static func canonical(_ text: String) -> String? {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6, parts.allSatisfy({ $0.count == 2 && $0.allSatisfy(\.isHexDigit) }) else { return nil }
        return parts.map { $0.lowercased() }.joined(separator: ":")
    }
}
