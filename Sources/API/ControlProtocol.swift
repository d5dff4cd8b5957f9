import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// The replies of a VM's control socket (docs/control-socket.md), as the CLI and, later, the REST
/// server read them. `vireo-vmm` writes them by hand; these types are the contract.
public struct ControlStatus: Codable, Sendable {
    public var ok: Bool
    public var error: String?
    public var message: String?
    public var state: String?
}

public struct VMDescription: Codable, Sendable {
    public var name: String?
    public var uuid: String?
    public var pid: Int32
    public var state: String
    public var cpus: Int
    public var memoryBytes: UInt64
    public var startedAt: UInt64
    public var uptimeMs: UInt64
    /// Boots in this process: 1, plus one per reboot in place. Absent from older VMMs.
    public var boots: Int?
    /// Whether the machine has ACPI (and so a power button).
    public var acpi: Bool?
    /// Which engine runs it ("kvm" when absent: `vireo-vmm` does not say).
    public var engine: String?
    /// qemu engine: "kvm" or "tcg" (software emulation).
    public var accelerator: String?

    public init(name: String?, uuid: String?, pid: Int32, state: String, cpus: Int, memoryBytes: UInt64,
                startedAt: UInt64, uptimeMs: UInt64, boots: Int? = nil, acpi: Bool? = nil,
                engine: String? = nil, accelerator: String? = nil) {
        self.name = name; self.uuid = uuid; self.pid = pid; self.state = state; self.cpus = cpus
        self.memoryBytes = memoryBytes; self.startedAt = startedAt; self.uptimeMs = uptimeMs; self.boots = boots
        self.acpi = acpi; self.engine = engine; self.accelerator = accelerator
    }
}

public struct VMCounters: Codable, Sendable {
    public struct Disk: Codable, Sendable {
        public var path: String
        public var requests: UInt64
        public var readBytes: UInt64
        public var writtenBytes: UInt64
        /// A network disk's paths (NBD, iSCSI): which is connected and which carries the requests.
        public var networkPaths: [NetworkPath]?
        public var networkFailovers: Int?

        public struct NetworkPath: Codable, Sendable {
            public var address: String
            public var connected: Bool
            public var active: Bool
        }

        public init(path: String, requests: UInt64, readBytes: UInt64, writtenBytes: UInt64) {
            self.path = path; self.requests = requests; self.readBytes = readBytes; self.writtenBytes = writtenBytes
        }
    }
    public struct Network: Codable, Sendable {
        public var tap: String
        public var mac: String
        public var rxFrames: UInt64
        public var rxBytes: UInt64
        public var txFrames: UInt64
        public var txBytes: UInt64
        public var droppedFrames: UInt64

        public init(tap: String, mac: String, rxFrames: UInt64, rxBytes: UInt64, txFrames: UInt64, txBytes: UInt64, droppedFrames: UInt64) {
            self.tap = tap; self.mac = mac; self.rxFrames = rxFrames; self.rxBytes = rxBytes
            self.txFrames = txFrames; self.txBytes = txBytes; self.droppedFrames = droppedFrames
        }
    }
    public struct Balloon: Codable, Sendable {
        public var targetBytes: UInt64
        public var actualBytes: UInt64
        public var inflatedPages: UInt64
        public var deflatedPages: UInt64
        public var statistics: [String: UInt64]

        public init(targetBytes: UInt64, actualBytes: UInt64, inflatedPages: UInt64, deflatedPages: UInt64, statistics: [String: UInt64]) {
            self.targetBytes = targetBytes; self.actualBytes = actualBytes; self.inflatedPages = inflatedPages
            self.deflatedPages = deflatedPages; self.statistics = statistics
        }
    }
    public var uptimeMs: UInt64
    public var vcpuExits: [UInt64]
    public var rssBytes: UInt64
    public var disks: [Disk]
    public var networks: [Network]
    public var balloon: Balloon?
    /// Bytes the virtio-rng device has handed the guest.
    public var entropyBytes: UInt64?

    public init(uptimeMs: UInt64, vcpuExits: [UInt64], rssBytes: UInt64, disks: [Disk], networks: [Network],
                balloon: Balloon?, entropyBytes: UInt64?) {
        self.uptimeMs = uptimeMs; self.vcpuExits = vcpuExits; self.rssBytes = rssBytes; self.disks = disks
        self.networks = networks; self.balloon = balloon; self.entropyBytes = entropyBytes
    }
}

public enum ControlError: Error, CustomStringConvertible, Sendable {
    /// Nobody answers at the socket (the VM is not running, or is still starting).
    case unreachable(path: String, errno: Int32)
    /// The VM refused the request; `code` is the protocol's error code.
    case refused(code: String, message: String)
    case malformed(String)

    public var description: String {
        switch self {
        case let .unreachable(path, code): return "no VM answers at \(path): \(String(cString: strerror(code)))"
        case let .refused(_, message): return message
        case let .malformed(reason): return "unexpected reply from the VM: \(reason)"
        }
    }
}

/// One connection to a VM's control socket.
public final class ControlConnection {
    public let fd: Int32
    private var pending: [UInt8] = []

    public init(path: String, timeoutSeconds: Int = 10) throws(ControlError) {
        fd = try Self.connectUnix(path: path, timeoutSeconds: timeoutSeconds)
    }

    /// A connected, close-on-exec stream socket to `path` whose reads time out after
    /// `timeoutSeconds` (0: never), so a VM that stops answering cannot hang its caller.
    public static func connectUnix(path: String, timeoutSeconds: Int) throws(ControlError) -> Int32 {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        guard path.utf8.count < MemoryLayout.size(ofValue: address.sun_path) else { throw .unreachable(path: path, errno: ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in path.utf8.enumerated() { buffer[index] = byte }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .unreachable(path: path, errno: errno) }
        // Before the connect: a listener that serves one client at a time (QEMU's QMP and agent
        // sockets) leaves later connections in its backlog, and once that is full a connect
        // waits (for the send time-out) until the first client goes. Without one, `vireo info`
        // of a VM whose QMP the containerd shim held waited forever.
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            let code = errno
            close(fd)
            throw .unreachable(path: path, errno: code)
        }
        return fd
    }

    deinit { close(fd) }

    /// Sends one request line and returns the reply line.
    public func request(_ line: String) throws(ControlError) -> [UInt8] {
        var bytes = Array((line + "\n").utf8)
        let sent = bytes.withUnsafeMutableBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard sent == bytes.count else { throw .malformed("the VM closed the connection") }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            if let newline = pending.firstIndex(of: 0x0a) {
                let reply = Array(pending[..<newline])
                pending.removeSubrange(...newline)
                return reply
            }
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { throw .malformed(count == 0 ? "the VM closed the connection" : "no reply in time") }
            pending += buffer[0..<count]
            guard pending.count < 1 << 20 else { throw .malformed("reply too long") }
        }
    }

    /// Bytes received after the last reply (the start of a console stream).
    public func takePending() -> [UInt8] { defer { pending = [] }; return pending }

    /// Sends a request and decodes its reply as `Reply`, turning `ok: false` into `.refused`.
    public func call<Reply: Decodable>(_ line: String, as type: Reply.Type) throws(ControlError) -> Reply {
        let reply = try request(line)
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let status: ControlStatus
        do { status = try decoder.decode(ControlStatus.self, from: Data(reply)) } catch {
            throw .malformed(String(decoding: reply.prefix(200), as: UTF8.self))
        }
        guard status.ok else { throw .refused(code: status.error ?? "unknown", message: status.message ?? "request refused") }
        do { return try decoder.decode(Reply.self, from: Data(reply)) } catch {
            throw .malformed("\(error)")
        }
    }
}
