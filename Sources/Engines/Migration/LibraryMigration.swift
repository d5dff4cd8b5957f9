import API
import CHostSupport
import DiskImage
import FoundationEssentials
import Library
import MachineSpec
import MigrationWire
#if canImport(Glibc)
import Glibc
#endif

/// What `vireo migrate` asks for (docs/migration.md).
public struct MigrationRequest: Sendable {
    public var destination: TCPEndpoint
    public var token: String
    public var maximumDowntimeNanoseconds: UInt64 = 300_000_000
    public var bandwidthBytesPerSecond: UInt64?
    public var copyDisks = false
    public var autoConverge = true

    public init(destination: TCPEndpoint, token: String) { self.destination = destination; self.token = token }
}

/// One progress line of a running migration, as the source VMM reports it.
public struct MigrationReport: Decodable, Sendable {
    public var iteration: Int
    public var remainingBytes: UInt64
    public var transferredBytes: UInt64
    public var rateBytesPerSecond: UInt64
    /// -1 while the rate is unknown.
    public var expectedDowntimeUs: Int64
    public var throttlePercent: Int

    enum CodingKeys: String, CodingKey {
        case iteration, remainingBytes = "remaining_bytes", transferredBytes = "transferred_bytes"
        case rateBytesPerSecond = "rate_bytes_per_second", expectedDowntimeUs = "expected_downtime_us", throttlePercent = "throttle_percent"
    }
}

/// How a finished migration went.
public struct MigrationResult: Decodable, Sendable {
    public var downtimeUs: UInt64
    public var totalMs: UInt64
    public var transferredBytes: UInt64
    public var iterations: Int
    public var finalPages: UInt64
    public var maxThrottlePercent: Int

    enum CodingKeys: String, CodingKey {
        case downtimeUs = "downtime_us", totalMs = "total_ms", transferredBytes = "transferred_bytes", iterations
        case finalPages = "final_pages", maxThrottlePercent = "max_throttle_percent"
    }
}

/// `HOST:PORT` (or `[V6]:PORT`), optionally written `tcp:HOST:PORT`.
extension TCPEndpoint {
    /// A network disk's server as `--allow-disk-server` gives it, HOST[:PORT]; without a port,
    /// NBD's 10809 and iSCSI's 3260. Refused naming `field`.
    public static func diskServers(parsing text: String, field: String) throws(LibraryError) -> [TCPEndpoint] {
        let endpoint = try TCPEndpoint(parsing: text, field: field, defaultPort: 0)
        guard endpoint.port == 0 else { return [endpoint] }
        guard !text.hasSuffix(":0") else { throw .invalidValue(field: field, reason: "'\(text)': port 0 is no server's") }
        return [NBDAddress.defaultPort, ISCSIAddress.defaultPort].map { TCPEndpoint(host: endpoint.host, port: $0) }
    }

    /// Whether `servers` name this one (the host as written, case aside: no resolver is asked).
    public static func allows(_ servers: [TCPEndpoint], host: String, port: UInt16) -> Bool {
        servers.contains { $0.host.lowercased() == host.lowercased() && $0.port == port }
    }
}

public struct TCPEndpoint: Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) { self.host = host; self.port = port }

    public init(parsing text: String, field: String, defaultPort: UInt16? = nil) throws(LibraryError) {
        var rest = Substring(text)
        if rest.hasPrefix("tcp:") { rest = rest.dropFirst(4) }
        var host: Substring
        var portText: Substring?
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw .invalidValue(field: field, reason: "'\(text)': an IPv6 address needs its closing ']'") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if after.hasPrefix(":") { portText = after.dropFirst() } else if !after.isEmpty {
                throw .invalidValue(field: field, reason: "'\(text)' is not [ADDRESS]:PORT")
            }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
        } else {
            host = rest
        }
        guard !host.isEmpty else { throw .invalidValue(field: field, reason: "'\(text)' has no host; expected tcp:HOST:PORT") }
        if let portText {
            guard let port = UInt16(portText) else { throw .invalidValue(field: field, reason: "'\(portText)' is not a port number (0 to 65535)") }
            self.port = port
        } else if let defaultPort {
            port = defaultPort
        } else {
            throw .invalidValue(field: field, reason: "'\(text)' has no port; expected tcp:HOST:PORT")
        }
        self.host = String(host)
    }

    public var description: String { host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)" }

    func addresses(passive: Bool) throws(LibraryError) -> UnsafeMutablePointer<addrinfo> {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var result: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &result)
        guard status == 0, let result else {
            throw .invalidValue(field: "address", reason: "'\(host)' cannot be resolved: \(String(cString: gai_strerror(status)))")
        }
        return result
    }

    /// A connected, close-on-exec TCP socket to this endpoint.
    func connect(timeoutSeconds: Int) throws(LibraryError) -> Int32 {
        let list = try addresses(passive: false)
        defer { freeaddrinfo(list) }
        var lastError: Int32 = ECONNREFUSED
        var entry: UnsafeMutablePointer<addrinfo>? = list
        while let current = entry {
            entry = current.pointee.ai_next
            let fd = socket(current.pointee.ai_family, current.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), current.pointee.ai_protocol)
            guard fd >= 0 else { lastError = errno; continue }
            var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            if Glibc.connect(fd, current.pointee.ai_addr, current.pointee.ai_addrlen) == 0 {
                var none = timeval()
                setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &none, socklen_t(MemoryLayout<timeval>.size))
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return fd
            }
            lastError = errno
            close(fd)
        }
        throw .io(operation: "connect to", path: description, errno: lastError)
    }

    /// A listening, close-on-exec TCP socket on this endpoint, and the port it got (port 0 picks one).
    func listen() throws(LibraryError) -> (fd: Int32, port: UInt16) {
        let list = try addresses(passive: true)
        defer { freeaddrinfo(list) }
        let current = list.pointee
        let fd = socket(current.ai_family, current.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), current.ai_protocol)
        guard fd >= 0 else { throw .io(operation: "socket for", path: description, errno: errno) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, current.ai_addr, current.ai_addrlen) == 0, Glibc.listen(fd, 4) == 0 else {
            let code = errno
            close(fd)
            throw .io(operation: "listen on", path: description, errno: code)
        }
        var bound = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &bound) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        let family = Int32(bound.ss_family)
        let port: UInt16 = withUnsafePointer(to: &bound) { pointer in
            if family == AF_INET6 {
                return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
        return (fd, port)
    }
}

/// What the source offers the receiver before any of the VM moves (JSON in an `offer` message).
struct MigrationOffer: Codable {
    struct Disk: Codable {
        /// Absolute on the source: with shared disks, the same path on the destination.
        var path: String
        var format: DiskFormat
        var virtualSize: UInt64
        var readOnly: Bool
        /// With shared disks, the chain the disk rests on, absolute (nil from an older source).
        var backing: [BackingLayer]?
    }
    struct File: Codable {
        /// `kernel` or `initrd`.
        var role: String
        var name: String
        var size: UInt64
    }
    var definition: VMDefinition
    var copyDisks: Bool
    var disks: [Disk]
    var files: [File]
    var sourceHost: String

    static let sizeLimit = 1 << 20
    static let fileLimit: UInt64 = 1 << 30
}

extension KVMEngine {
    /// Hands the connected stream to the VM's VMM with a `migrate` request and follows its
    /// progress lines to the final reply (docs/control-socket.md). `cancelled` is polled; once it
    /// says so, `migrate-cancel` goes on a second connection.
    public func migrate(_ vm: EngineVM, over connection: Int32, request: MigrationRequest, progress: (MigrationReport) -> Void,
                        cancelled: () -> Bool) throws(LibraryError) -> MigrationResult {
        let control: Int32
        do {
            control = try ControlConnection.connectUnix(path: vm.bundle.controlPath, timeoutSeconds: 0)
        } catch {
            throw Self.translate(error, vm: vm, action: "migrate")
        }
        defer { close(control) }
        var line = "migrate \(request.destination) downtime_us=\(request.maximumDowntimeNanoseconds / 1000)"
        line += " bandwidth=\(request.bandwidthBytesPerSecond ?? 0) copy_disks=\(request.copyDisks ? 1 : 0) auto_converge=\(request.autoConverge ? 1 : 0)\n"
        let bytes = Array(line.utf8)
        let sent = bytes.withUnsafeBytes { vireo_send_with_descriptor(control, $0.baseAddress, $0.count, connection) }
        guard sent == bytes.count else {
            throw .engine(name: vm.name, reason: "could not hand the migration connection to its VMM: \(String(cString: strerror(Int32(-sent))))", exitStatus: 1)
        }
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        var cancelSent = false
        let decoder = JSONDecoder()
        while true {
            while let newline = pending.firstIndex(of: 0x0a) {
                let reply = Array(pending[..<newline])
                pending.removeSubrange(...newline)
                struct ProgressLine: Decodable { var progress: MigrationReport }
                if let report = try? decoder.decode(ProgressLine.self, from: Data(reply)) {
                    progress(report.progress)
                    continue
                }
                let status = try? decoder.decode(ControlStatus.self, from: Data(reply))
                guard let status else {
                    throw .engine(name: vm.name, reason: "unreadable reply to migrate: \(String(decoding: reply.prefix(200), as: UTF8.self))", exitStatus: 1)
                }
                guard status.ok else {
                    throw .migration(name: vm.name, reason: status.message ?? "the migration failed", outcomeUnknown: status.error == "migration-unknown")
                }
                guard let result = try? decoder.decode(MigrationResult.self, from: Data(reply)) else {
                    throw .engine(name: vm.name, reason: "unreadable result of migrate: \(String(decoding: reply.prefix(200), as: UTF8.self))", exitStatus: 1)
                }
                return result
            }
            if !cancelSent && cancelled() {
                cancelSent = true
                _ = try? call(vm, "migrate-cancel", action: "cancel the migration of")
            }
            var descriptor = pollfd(fd: control, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, 200)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { continue }
            let count = buffer.withUnsafeMutableBytes { recv(control, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else {
                throw .engine(name: vm.name, reason: "its VMM closed the control connection during the migration; see \(vm.bundle.vmmLogPath)", exitStatus: 1)
            }
            pending += buffer[0..<count]
            guard pending.count < 1 << 20 else { throw .engine(name: vm.name, reason: "migrate reply too long", exitStatus: 1) }
        }
    }
}

// MARK: the source side of the handshake

extension VMManager {
    /// `vireo migrate`: connects to a `vireo receive`, proves the token, offers the VM (its
    /// definition, disks and kernel files), and once the receiver is ready hands the connection to
    /// the VM's VMM, which moves the VM. Returns when the destination runs it and this copy has
    /// stopped; on failure the VM runs on here (docs/migration.md).
    public func migrate(_ name: String, request: MigrationRequest, progress: (MigrationReport) -> Void,
                        cancelled: () -> Bool) throws(LibraryError) -> (MigrationResult, warnings: [String]) {
        let (vm, running) = try running(name, action: "migrate")
        // Refused before anything is sent to the receiver.
        guard let engine = running as? any MigratingEngine else { throw EngineRefusal.noMigration(vm) }
        if vm.bundle.hasSavedState { throw .wrongState(name: name, state: "saved", action: "migrate", hint: "start it first") }
        if let share = vm.definition.shares.first {
            throw .wrongState(name: name, state: "sharing \(share.path) as '\(share.tag)' (virtio-fs)", action: "migrate",
                              hint: "virtiofsd holds the guest's open files there, which cannot move; shut it down and remove its shared folders (`vireo share remove \(name) \(share.tag)`) first")
        }
        if let file = vm.definition.memoryBacking.file, file != "memfd" {
            // The destination would zero and fill the same path: on this host, the running
            // source's own RAM.
            throw .wrongState(name: name, state: "backed by the RAM file \(file)", action: "migrate",
                              hint: "stop it and change its backing (`vireo set \(name) --memory-backing memfd,shared`), or move it stopped")
        }
        let fd = try request.destination.connect(timeoutSeconds: 10)
        defer { close(fd) }
        // The handshake must not hang on a silent peer.
        var timeout = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let channel = MigrationChannel(fd: fd)
        func fail(_ error: MigrationError) -> LibraryError {
            if case let .refused(reason) = error { return .migration(name: name, reason: "\(request.destination) refused: \(reason)", outcomeUnknown: false) }
            return .migration(name: name, reason: "\(request.destination): \(error)", outcomeUnknown: false)
        }
        var offer = MigrationOffer(definition: vm.definition, copyDisks: request.copyDisks, disks: [], files: [], sourceHost: Self.hostName())
        for disk in vm.definition.disks {
            let path = vm.bundle.resolve(disk.path)
            let size: UInt64
            do { size = try DiskImages.peek(path: path, format: disk.format) } catch { throw .disk(error) }
            offer.disks.append(.init(path: path, format: disk.format, virtualSize: size, readOnly: disk.readOnly, backing: vm.bundle.chain(of: disk)))
        }
        var files: [(role: String, path: String)] = []
        if let kernel = vm.definition.kernel { files.append(("kernel", vm.bundle.resolve(kernel))) }
        if let initrd = vm.definition.initrd { files.append(("initrd", vm.bundle.resolve(initrd))) }
        for file in files {
            offer.files.append(.init(role: file.role, name: HostFiles.lastComponent(of: file.path), size: HostFiles.size(file.path)))
        }
        let offerBytes: [UInt8]
        do { offerBytes = Array(try JSONEncoder().encode(offer)) } catch {
            throw .corrupt(path: vm.bundle.configPath, reason: "the definition cannot be encoded: \(error)")
        }
        do throws(MigrationError) {
            try channel.send(.hello, MigrationWire.hello(token: request.token))
            let answer = try channel.receive(limit: 64 << 10)
            if answer.kind == .refuse { throw .refused(answer.text) }
            guard answer.kind == .accept else { throw .protocolViolation("expected accept, got \(answer.kind)") }
            try channel.send(.offer, offerBytes)
            for (index, file) in files.enumerated() {
                let source = Glibc.open(file.path, O_RDONLY | O_CLOEXEC)
                guard source >= 0 else { throw .io(operation: "open \(file.path)", errno: errno) }
                defer { close(source) }
                var chunk = [UInt8](repeating: 0, count: 4 << 20)
                while true {
                    let count = chunk.withUnsafeMutableBytes { read(source, $0.baseAddress, $0.count) }
                    if count < 0 && errno == EINTR { continue }
                    guard count >= 0 else { throw .io(operation: "read \(file.path)", errno: errno) }
                    var message = [UInt8(index)]
                    message += chunk[0..<count]
                    try channel.send(.file, message)
                    if count == 0 { break }
                }
            }
            let ready = try channel.receive(limit: 64 << 10)
            if ready.kind == .refuse { throw .refused(ready.text) }
            guard ready.kind == .prepared else { throw .protocolViolation("expected prepared, got \(ready.kind)") }
        } catch {
            throw fail(error)
        }
        // The VMM gets its own copy; closing ours (deferred) leaves the stream to it.
        let result = try engine.migrate(vm, over: fd, request: request, progress: progress, cancelled: cancelled)
        guard Self.waitUntilStopped(vm.bundle, seconds: 60) else {
            throw .engine(name: name, reason: "migrated, but this copy did not stop within 60 s", exitStatus: 1)
        }
        var warnings = HostNetworks(library: library).releaseIdle()
        if request.copyDisks {
            warnings.append("VM '\(name)' stays defined here, stopped, with its disks as they were at the switch-over; `vireo delete \(name)` removes it (starting it would run a second copy with the same MAC address)")
        } else {
            // Its disk files are the destination's now: the entry goes, the files stay.
            do throws(LibraryError) {
                let directory = try library.forgetMigrated(name, destination: request.destination.description)
                warnings.append("VM '\(name)' is no longer defined here; its directory \(directory) stays, since the destination uses the disk files in it")
            } catch {
                warnings.append("VM '\(name)' runs at the destination, but its entry here could not be retired: \(error); do not start it here")
            }
        }
        return (result, warnings)
    }

    static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "unknown" }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

// MARK: the receiving side

/// A new one-time token: 128 random bits as hex.
public func newMigrationToken() -> String {
    var generator = SystemRandomNumberGenerator()
    return (0..<2).map { _ in
        let value = generator.next() as UInt64
        let text = String(value, radix: 16)
        return String(repeating: "0", count: 16 - text.count) + text
    }.joined()
}

/// What `vireo receive` accepts from a migration source (docs/security.md): the peer holds the
/// token, not the host. By default the VM's memory is anonymous or a memfd, its shared disks lie
/// in the library, its cards go on this library's networks, and it has no real-time priority;
/// the person running the receiver widens that with `--allow-disks DIR` and `--allow-rt`.
public struct ReceivePolicy: Sendable {
    /// Directories besides the library where a shared disk (and what it rests on) may lie.
    public var allowedDiskDirectories: [String] = []
    /// Whether an offered real-time vCPU priority is taken.
    public var allowRealTime = false
    /// Servers a shared network disk may be on (`--allow-disk-server HOST[:PORT]`). A Unix
    /// socket's path, and a path's credentials (an iSCSI CHAP file, an `nbds` certificates
    /// directory), must lie in `allowedDiskDirectories` instead.
    public private(set) var allowedDiskServers: [TCPEndpoint] = []
    /// The receiving library's shared pools: a disk one of them holds is allowed as if its place
    /// were named with --allow-disks or --allow-disk-server (docs/storage-pools.md).
    public var sharedPools: [PoolDefinition] = []

    public init(allowedDiskDirectories: [String] = [], allowRealTime: Bool = false) {
        self.allowedDiskDirectories = allowedDiskDirectories
        self.allowRealTime = allowRealTime
    }

    /// Adds a server from `HOST[:PORT]` (without a port: NBD's 10809 and iSCSI's 3260), refused
    /// naming `field`.
    public mutating func allowDiskServer(_ text: String, field: String) throws(LibraryError) {
        allowedDiskServers += try TCPEndpoint.diskServers(parsing: text, field: field)
    }

    /// Refuses a shared network disk whose path the receiver did not allow: the peer names the
    /// address, and root connects to it and speaks NBD or iSCSI there (a Unix socket of some
    /// other service, or a host inside this network, would otherwise be the peer's to pick), and
    /// reads a path's credentials (an iSCSI CHAP file, TLS client certificates) and presents them
    /// there.
    private func checkNetworkDisk(_ path: String, disk index: Int) throws(LibraryError) {
        let endpoints: [NetworkDisk.Endpoint]
        do { endpoints = try NetworkDisk.endpoints(path) } catch { throw .invalidValue(field: "disk \(index)", reason: error.description) }
        for endpoint in endpoints {
            switch endpoint {
            case let .unix(socket, credentials):
                guard HostPath.isInside(socket, anyOf: allowedDiskDirectories) else {
                    throw .invalidValue(field: "disk \(index)", reason: "the shared NBD disk's socket \(socket.prefix(200)) is outside \(allowedDiskDirectories.isEmpty ? "any allowed directory" : allowedDiskDirectories.joined(separator: ", ")); start `vireo receive` with --allow-disks DIR for the socket's directory, or migrate with --copy-disks")
                }
                try checkCredentials(credentials, disk: index)
            case let .tcp(host, port, credentials):
                guard TCPEndpoint.allows(allowedDiskServers, host: host, port: port) else {
                    throw .invalidValue(field: "disk \(index)", reason: "the shared network disk is on \(host.prefix(200)):\(port), a server this host was not told to use; start `vireo receive` with --allow-disk-server \(host.prefix(200)):\(port), or migrate with --copy-disks")
                }
                try checkCredentials(credentials, disk: index)
            }
        }
    }

    /// A network disk's credentials (an iSCSI CHAP file, an `nbds` path's TLS certificates
    /// directory): root reads them and presents them to the server, so they too must lie where
    /// this host allows disks.
    private func checkCredentials(_ credentials: String?, disk index: Int) throws(LibraryError) {
        guard let credentials, !HostPath.isInside(credentials, anyOf: allowedDiskDirectories) else { return }
        throw .invalidValue(field: "disk \(index)", reason: "the shared network disk's credentials \(credentials.prefix(200)) are outside \(allowedDiskDirectories.isEmpty ? "any allowed directory" : allowedDiskDirectories.joined(separator: ", ")); start `vireo receive` with --allow-disks DIR for their directory")
    }

    /// How long a connection has to send its hello, and the source its offer.
    static let helloSeconds: UInt64 = 10
    static let offerSeconds: UInt64 = 60

    /// Refuses, naming the field, what the offered definition asks of this host beyond the policy.
    func check(_ definition: VMDefinition, shared disks: [MigrationOffer.Disk]?, libraryRoot: String) throws(LibraryError) {
        if let share = definition.shares.first {
            // A source that shared folders never migrates (virtio-fs state cannot move), and a
            // peer never names a host directory for this host's root to serve to its guest.
            throw .invalidValue(field: "shares", reason: "the source asks to share the host directory \(share.path.prefix(200)) as '\(share.tag.prefix(40))'; a migrated VM brings no shared folders (a peer never names a host directory)")
        }
        if let file = definition.memoryBacking.file, file != "memfd" {
            throw .invalidValue(field: "memory_backing", reason: "the source asks for its memory in the host file \(file.prefix(200)); a migrated VM's memory is anonymous or a memfd here (a peer never names a host file)")
        }
        if let priority = definition.resources.rtPriority, !allowRealTime {
            throw .invalidValue(field: "rt_priority", reason: "the source asks for real-time vCPUs at priority \(priority); start `vireo receive` with --allow-rt to take real-time VMs")
        }
        for (index, card) in definition.networks.enumerated() {
            switch card.attachment {
            case .nat, .network, .user: continue
            case .bridge, .tap, .netns:
                throw .invalidValue(field: "nic", reason: "card \(index) is on \(String(card.attachment.description.prefix(64))), a host interface or namespace the source named; a migrated VM's cards go on this library's networks (nat, network:NAME) or user")
            }
        }
        for (index, disk) in (disks ?? []).enumerated() {
            // A shared pool here holds it (and, for a file, what it rests on): the same storage.
            let layers = [disk.path] + (disk.backing ?? []).map(\.path)
            if layers.allSatisfy({ path in sharedPools.contains { $0.holds(path) } }) { continue }
            if DiskFormat.isNetworkAddress(disk.path) {
                // A network disk rests on nothing (MachineRules.networkDisk, with the definition).
                try checkNetworkDisk(disk.path, disk: index)
                continue
            }
            for path in [disk.path] + (disk.backing ?? []).map(\.path) {
                guard path.hasPrefix("/") else {
                    throw .invalidValue(field: "disk \(index)", reason: "the shared disk \(path.prefix(300)) is not an absolute path")
                }
                if HostPath.inside(path, libraryRoot) != nil {
                    if let owner = Self.libraryOwner(of: path, libraryRoot: libraryRoot) {
                        throw .invalidValue(field: "disk \(index)", reason: "the shared disk \(path.prefix(300)) belongs to \(owner) in this library; a peer's shared disks lie in a directory of their own, or migrate with --copy-disks")
                    }
                } else if !HostPath.isInside(path, anyOf: allowedDiskDirectories) {
                    throw .invalidValue(field: "disk \(index)", reason: "the shared disk \(path.prefix(300)) is outside the library \(libraryRoot)\(allowedDiskDirectories.isEmpty ? "" : " and " + allowedDiskDirectories.joined(separator: ", ")); define a shared pool there (`vireo pool create NAME --type dir DIR --shared`), start `vireo receive` with --allow-disks DIR, or migrate with --copy-disks")
                }
            }
        }
    }

    /// What already owns `path` in the receiving library, if anything: a VM's directory, the
    /// library's own directories (images, networks, its SSH key, kept disks) or its top-level
    /// files (the API token). A peer must not hand its VM another VM's disk or an image's base.
    static func libraryOwner(of path: String, libraryRoot: String) -> String? {
        guard let root = HostPath.real(libraryRoot), let resolved = HostPath.inside(path, libraryRoot) else { return nil }
        let components = resolved.dropFirst(root == "/" ? 1 : root.count + 1).split(separator: "/")
        guard components.count > 1, let first = components.first.map(String.init) else { return "the library itself" }
        if VMName.reserved.contains(first) { return "the library's \(first) directory" }
        if HostFiles.exists(root + "/" + first + "/config.json") { return "VM '\(first)'" }
        return nil
    }
}

public struct ReceivedVM: Sendable {
    public var name: String
    public var source: String
    public var pid: Int32
    public var warnings: [String]
}

extension VMManager {
    /// Listens on `endpoint` for a prepared `vireo receive`; the caller gets the address really
    /// bound before anything blocks.
    public func listenForMigration(on endpoint: TCPEndpoint) throws(LibraryError) -> (fd: Int32, endpoint: TCPEndpoint) {
        let (fd, port) = try endpoint.listen()
        return (fd, TCPEndpoint(host: endpoint.host, port: port))
    }

    /// `vireo receive`: waits on `listener` for a source that shows `token` (wrong ones are
    /// refused, and after `maximumFailures` the receiver gives up), defines the VM it offers in
    /// this library, and starts it from the stream. Returns once it runs here. On any failure
    /// the half-received VM is deleted (never a shared disk) and the source runs on.
    public func receive(on listener: Int32, token: String, rename: String?, policy: ReceivePolicy = ReceivePolicy(), maximumFailures: Int = 5,
                        log: (String) -> Void) throws(LibraryError) -> ReceivedVM {
        var failures = 0
        while true {
            var peerAddress = sockaddr_storage()
            var peerLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let fd = withUnsafeMutablePointer(to: &peerAddress) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { accept(listener, $0, &peerLength) }
            }
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                throw .io(operation: "accept on", path: "the migration listener", errno: errno)
            }
            // Single-threaded: nothing can fork between accept and this.
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            var timeout = timeval(tv_sec: 60, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            let channel = MigrationChannel(fd: fd)
            // One connection at a time: each has a few seconds to show its hello.
            channel.deadline = MigrationChannel.monotonicNanoseconds() + ReceivePolicy.helloSeconds * 1_000_000_000
            let hello: MigrationWire.Message
            do throws(MigrationError) {
                hello = try channel.receive(limit: 4096)
            } catch {
                close(fd)
                log("a connection sent no migration hello (\(error)); still waiting")
                continue
            }
            let offered: Result<String, MigrationError> = hello.kind == .hello ? MigrationWire.token(inHello: hello.payload) : .failure(.protocolViolation("not a hello"))
            switch offered {
            case let .success(given) where MigrationWire.tokensMatch(given, token):
                do throws(LibraryError) {
                    return try receiveAccepted(channel, rename: rename, policy: policy, log: log)
                } catch {
                    close(fd)
                    throw error
                }
            case let .success(given):
                _ = given
                failures += 1
                try? channel.send(MigrationWire.Kind.refuse, text: "wrong token")
                close(fd)
                log("refused a connection with a wrong token (\(failures) of \(maximumFailures))")
            case let .failure(error):
                failures += 1
                try? channel.send(MigrationWire.Kind.refuse, text: "\(error)")
                close(fd)
                log("refused a connection: \(error)")
            }
            if failures >= maximumFailures {
                throw .migration(name: rename ?? "?", reason: "\(failures) connections came with a wrong token or no hello; the token is void, start `vireo receive` again", outcomeUnknown: false)
            }
        }
    }

    private func receiveAccepted(_ channel: MigrationChannel, rename: String?, policy: ReceivePolicy, log: (String) -> Void) throws(LibraryError) -> ReceivedVM {
        func refuse(_ error: LibraryError) -> LibraryError {
            try? channel.send(.refuse, text: error.description)
            // The source may still be sending its kernel and initrd: let it finish and read why.
            channel.drainUntilClosed(seconds: 10)
            return error
        }
        var policy = policy
        policy.sharedPools = ((try? PoolStore(libraryRoot: library.root).all()) ?? []).filter(\.shared)
        let offer: MigrationOffer
        do throws(MigrationError) {
            try channel.send(.accept)
            channel.deadline = MigrationChannel.monotonicNanoseconds() + ReceivePolicy.offerSeconds * 1_000_000_000
            let message = try channel.receive(limit: MigrationOffer.sizeLimit)
            channel.deadline = nil
            guard message.kind == .offer else { throw .protocolViolation("expected the offer, got \(message.kind)") }
            do { offer = try JSONDecoder().decode(MigrationOffer.self, from: Data(message.payload)) } catch {
                throw .protocolViolation("the offer is not valid: \(error)")
            }
        } catch {
            throw refuse(.migration(name: rename ?? "?", reason: "the source: \(error)", outcomeUnknown: false))
        }
        var definition = offer.definition
        let name = rename ?? definition.name
        log("the source \(offer.sourceHost) offers VM '\(definition.name)' (\(definition.cpus) vCPUs, \(definition.memoryBytes >> 20) MiB, \(offer.disks.count) disks, \(offer.copyDisks ? "copied" : "shared"))")
        definition.name = name
        let staging = library.root + "/.creating-" + definition.uuid
        do throws(LibraryError) {
            try VMName.validate(name, in: library.root)
            guard !HostFiles.exists(library.root + "/" + name) else { throw .alreadyExists(name: name) }
            guard definition.engine == .kvm else { throw .invalidValue(field: "engine", reason: "only kvm-engine VMs migrate") }
            guard offer.disks.count == definition.disks.count, offer.files.count <= 2 else {
                throw .invalidValue(field: "offer", reason: "\(offer.disks.count) disks offered for \(definition.disks.count) in the definition")
            }
            try policy.check(definition, shared: offer.copyDisks ? nil : offer.disks, libraryRoot: library.root)
            // Fields only another engine reads, and the chains below, are this host's to decide.
            definition.nvram = nil
            definition.iso = nil
            for other in (try? library.names()) ?? [] where (try? library.bundle(named: other).load())?.uuid == definition.uuid {
                throw .invalidValue(field: "uuid", reason: "VM '\(other)' here already has the offered VM's UUID \(definition.uuid); is it already here?")
            }
            try library.checkNetworks(definition, previous: nil)
            try HostFiles.makeDirectories(library.root)
            try HostFiles.makeDirectory(staging)
        } catch {
            throw refuse(error)
        }
        var moved = false
        defer { if !moved { try? HostFiles.removeTree(staging) } }
        // Held while the VM is put together: `vireo list` sweeps staging directories nobody holds.
        let stagingLock: VMLock
        do throws(LibraryError) {
            stagingLock = try VMLock(path: staging + "/vm.lock", create: true)
            _ = stagingLock.tryExclusive(attempts: 1)
        } catch {
            throw refuse(error)
        }
        var locked = true
        defer { if locked { stagingLock.unlock() } }
        let target = VMBundle(directory: staging)
        do throws(LibraryError) {
            // Disks: the same files (checked to be there and the same size), or new empty images
            // the stream fills.
            var taken: Set<String> = []
            for (index, disk) in offer.disks.enumerated() {
                if offer.copyDisks {
                    var file = HostFiles.lastComponent(of: disk.path)
                    if file.hasSuffix(".raw") || file.hasSuffix(".img") { file = String(file.split(separator: ".").first ?? "disk") + ".qcow2" }
                    if !file.hasSuffix(".qcow2") || taken.contains(file) || file.hasPrefix(".") { file = "disk\(index).qcow2" }
                    taken.insert(file)
                    do { try DiskImages.create(path: target.resolve(file), format: .qcow2, size: disk.virtualSize) } catch { throw .disk(error) }
                    definition.disks[index].path = file
                    definition.disks[index].format = .qcow2
                    definition.disks[index].backing = []
                } else {
                    guard disk.path.hasPrefix("/") || DiskFormat.isNetworkAddress(disk.path) else {
                        throw .invalidValue(field: "disk \(index)", reason: "'\(disk.path.prefix(300))' is not absolute")
                    }
                    let size: UInt64
                    do { size = try DiskImages.peek(path: disk.path, format: disk.format) } catch {
                        throw .invalidValue(field: "disk \(index)", reason: "the shared disk is not reachable here (\(error)); share the storage at the same path, or migrate with --copy-disks")
                    }
                    guard size == disk.virtualSize else {
                        throw .invalidValue(field: "disk \(index)", reason: "\(disk.path) here is a \(disk.format.rawValue) disk of \(size) bytes, on the source one of \(disk.virtualSize): not the same disk")
                    }
                    definition.disks[index].path = disk.path
                    definition.disks[index].format = disk.format
                    definition.disks[index].backing = disk.backing ?? []
                }
            }
            // Kernel and initrd: copies of the source's, kept in the VM's directory under fixed
            // names (a name from the wire never picks a file in the directory).
            var remaining = offer.files
            var stored: [String] = []
            for file in offer.files {
                guard file.size <= MigrationOffer.fileLimit, ["kernel", "initrd"].contains(file.role), !stored.contains(file.role) else {
                    throw .invalidValue(field: "offer", reason: "file '\(file.name.prefix(64))' (\(file.role.prefix(16)), \(file.size) bytes) is not acceptable")
                }
                stored.append(file.role)
                if file.role == "kernel" { definition.kernel = "kernel" } else { definition.initrd = "initrd" }
            }
            if !stored.contains("kernel") { definition.kernel = nil }
            if !stored.contains("initrd") { definition.initrd = nil }
            for (index, name) in stored.enumerated() {
                let path = target.resolve(name)
                let out = Glibc.open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
                guard out >= 0 else { throw .io(operation: "create", path: path, errno: errno) }
                defer { close(out) }
                var received: UInt64 = 0
                while true {
                    let message: MigrationWire.Message
                    do throws(MigrationError) { message = try channel.receive(limit: 8 << 20) } catch {
                        throw .migration(name: name, reason: "receiving \(name): \(error)", outcomeUnknown: false)
                    }
                    guard message.kind == .file, message.payload.first == UInt8(index) else {
                        throw .migration(name: name, reason: "expected file \(index), got \(message.kind)", outcomeUnknown: false)
                    }
                    if message.payload.count == 1 { break }
                    received += UInt64(message.payload.count - 1)
                    guard received <= remaining[index].size else { throw .invalidValue(field: "offer", reason: "\(name) is longer than offered") }
                    let written = message.payload.withUnsafeBytes { write(out, $0.baseAddress.map { $0 + 1 }, $0.count - 1) }
                    guard written == message.payload.count - 1 else { throw .io(operation: "write", path: path, errno: errno) }
                }
                guard received == remaining[index].size else { throw .invalidValue(field: "offer", reason: "\(name): \(received) bytes arrived, \(remaining[index].size) offered") }
            }
            remaining = []
            try VMLibrary.validate(definition)
            try target.save(definition)
            try HostFiles.renameNoReplace(staging, library.root + "/" + name)
            moved = true
            // The start below takes the VM's lock itself.
            stagingLock.unlock()
            locked = false
        } catch {
            throw refuse(error)
        }
        do throws(MigrationError) { try channel.send(.prepared) } catch {
            _ = try? library.delete(name, keepDisks: false)
            throw .migration(name: name, reason: "the source went away: \(error)", outcomeUnknown: false)
        }
        log("VM '\(name)' is defined here; its memory and state are arriving")
        do {
            let started = try start(name, incoming: IncomingMigration(fd: channel.fd, copiesDisks: offer.copyDisks))
            return ReceivedVM(name: name, source: offer.sourceHost, pid: started.pid, warnings: started.warnings)
        } catch {
            // The source hears why (its VMM reads a `failed` message), unless the VMM here told it
            // already; the write side is closed and what the source sent is drained, so the
            // reason arrives rather than a reset.
            try? channel.send(.failed, text: "\(error)")
            shutdown(channel.fd, Int32(SHUT_WR))
            var sink = [UInt8](repeating: 0, count: 65536)
            let drainUntil = MigrationChannel.monotonicNanoseconds() + 2_000_000_000
            while MigrationChannel.monotonicNanoseconds() < drainUntil, channel.waitReadable(milliseconds: 200) {
                if sink.withUnsafeMutableBytes({ recv(channel.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }) <= 0 { break }
            }
            // Never ran here: the source runs on; nothing of it stays (shared disks are not ours).
            _ = VMManager.waitUntilStopped(try library.bundle(named: name), seconds: 10)
            _ = try? library.delete(name, keepDisks: false)
            throw error
        }
    }
}

/// A migration offer as hostile input, for the fuzzer (docs/fuzzing.md): decoded as the receiver
/// decodes it and held to the default receive policy. Only ever returns.
public enum MigrationOfferInspection {
    /// Whether the bytes decoded as an offer, and whether the policy then accepted it.
    public static func check(_ bytes: [UInt8]) -> (decoded: Bool, accepted: Bool) {
        guard bytes.count <= MigrationOffer.sizeLimit, let offer = try? JSONDecoder().decode(MigrationOffer.self, from: Data(bytes)) else { return (false, false) }
        let accepted = (try? ReceivePolicy().check(offer.definition, shared: offer.copyDisks ? nil : offer.disks, libraryRoot: "/nonexistent-vireo-library")) != nil
            && (try? VMLibrary.validate(offer.definition)) != nil
        return (true, accepted)
    }

    /// A well-formed offer, the fuzzer's seed.
    public static var sample: [UInt8] {
        var definition = VMDefinition(uuid: "6c1d2f4e-0000-4000-8000-000000000001", name: "moved", osType: OSType.all[0], createdAt: 0)
        definition.kernel = "kernel"
        definition.disks = [DiskAttachment(path: "disk0.qcow2", format: .qcow2)]
        let offer = MigrationOffer(definition: definition, copyDisks: true,
                                   disks: [.init(path: "/var/lib/vireo/moved/disk0.qcow2", format: .qcow2, virtualSize: 1 << 30, readOnly: false, backing: [])],
                                   files: [.init(role: "kernel", name: "kernel", size: 4096)], sourceHost: "source")
        return (try? JSONEncoder().encode(offer)).map { Array($0) } ?? []
    }
}
