import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A network disk's paths, connected before the VMM is confined and spoken to only afterwards
/// (`decode`, in the jail): NBD's sockets, iSCSI's TCP connections.
public protocol NetworkDiskConnecting: Sendable {
    func decode() throws(DiskImageError) -> any DiskImage
}

/// A disk reached over several paths, one active at a time (`vireo info`'s path lines).
public protocol MultipathDisk: DiskImage {
    var pathStates: [(address: String, connected: Bool, active: Bool)] { get }
    /// How many times requests moved to another path.
    var failovers: Int { get }
}

/// A multipath disk's connections, one per path (nil: down), which one carries the requests, and
/// how many times that moved. Held under the disk's lock.
struct PathTable<Session: Sendable>: Sendable {
    var sessions: [Session?]
    var active: Int
    var failovers = 0

    /// `vireo info`'s view: each path's name, whether it is connected, whether it is active.
    func states(_ names: [String]) -> [(address: String, connected: Bool, active: Bool)] {
        names.indices.map { (names[$0], sessions[$0] != nil, $0 == active) }
    }
}

/// The network disks a path may name: NBD exports and iSCSI LUNs, each with up to 8 paths joined
/// by `|`. Every caller (the VMM, `vireo disk`, the library's checks, a migration receiver)
/// parses and connects through here.
public enum NetworkDisk {
    public enum Kind: String, Sendable {
        case nbd = "NBD export"
        case iscsi = "iSCSI LUN"
    }

    /// One path's server, as a receiver's policy and the jail see it.
    public enum Endpoint: Sendable, Equatable {
        case unix(socket: String)
        /// `credentials`: a file or directory root reads before the jail and whose secrets go
        /// to the server (iSCSI's CHAP file, an `nbds` path's TLS certificates directory).
        case unix(socket: String, credentials: String?)
        case tcp(host: String, port: UInt16, credentials: String?)
    }

    public static func kind(of path: String) -> Kind? {
        if DiskFormat.nbdSchemes.contains(where: { path.hasPrefix($0) }) { return .nbd }
        if path.hasPrefix("iscsi://") { return .iscsi }
        return nil
    }

    /// Each path's server, parsed; refused naming what is wrong.
    public static func endpoints(_ path: String) throws(DiskImageError) -> [Endpoint] {
        switch kind(of: path) {
        case .nbd:
            return try NBDAddress.paths(path).map { address in
                switch address.endpoint {
                case let .unix(socket): return .unix(socket: socket, credentials: address.tls?.certificates)
                case let .tcp(host, port): return .tcp(host: host, port: port, credentials: address.tls?.certificates)
                }
            }
        case .iscsi:
            return try ISCSIAddress.paths(path).map { .tcp(host: $0.host, port: $0.port, credentials: $0.chapFile) }
        case nil:
            throw .invalidArgument(field: "disk", reason: "'\(path.prefix(300))' is not a network disk's address")
        }
    }

    /// Connects the paths (before the VMM is confined); `reconnectSeconds` bounds how long an
    /// NBD request waits for a path to come back.
    public static func connect(path: String, readOnly: Bool, reconnectSeconds: Int = 30) throws(DiskImageError) -> any NetworkDiskConnecting {
        switch kind(of: path) {
        case .nbd: return try NBDImage.connect(path: path, readOnly: readOnly, reconnectSeconds: reconnectSeconds)
        case .iscsi: return try ISCSIImage.connect(path: path, readOnly: readOnly)
        case nil: throw .invalidArgument(field: "disk", reason: "'\(path.prefix(300))' is not a network disk's address")
        }
    }

    /// A disk's `A|B|...` text, each path parsed; at most 8, all leading to the same export or
    /// LUN (`key`).
    static func paths<Address>(_ text: String, _ parse: (String) throws(DiskImageError) -> Address, leadingTo key: (Address) -> String,
                               naming what: String) throws(DiskImageError) -> [Address] {
        let parts = text.split(separator: "|", omittingEmptySubsequences: false).map(String.init)
        guard parts.count <= 8 else { throw .invalidArgument(field: "disk", reason: "\(parts.count) paths to one \(what); at most 8") }
        var addresses: [Address] = []
        for part in parts { addresses.append(try parse(part)) }
        if Swift.Set(addresses.map(key)).count > 1 {
            throw .invalidArgument(field: "disk", reason: "the paths of \(text.prefix(300)) lead to different \(what)s; every path must lead to the same one")
        }
        return addresses
    }

    /// A URI's `HOST[:PORT]` or `[IPV6][:PORT]`; `refuse` makes the error for what is wrong.
    static func hostAndPort(_ authority: Substring, defaultPort: UInt16,
                            _ refuse: (String) -> DiskImageError) throws(DiskImageError) -> (host: String, port: UInt16) {
        var host = authority
        var port = defaultPort
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { throw refuse("has an unclosed [") }
            let after = host[host.index(after: close)...]
            host = host[host.index(after: host.startIndex)..<close]
            if !after.isEmpty {
                guard after.hasPrefix(":"), let given = UInt16(after.dropFirst()), given > 0 else { throw refuse("has a bad port") }
                port = given
            }
        } else if let colon = host.lastIndex(of: ":") {
            guard let given = UInt16(host[host.index(after: colon)...]), given > 0 else { throw refuse("has a bad port") }
            port = given
            host = host[..<colon]
        }
        guard !host.isEmpty, host.utf8.count <= 253 else { throw refuse("has no usable host") }
        return (String(host), port)
    }

    /// Whether a server answers at all: one TCP or Unix connection, closed at once (a storage
    /// pool's check when it is defined).
    public static func reach(_ endpoint: Endpoint) throws(DiskImageError) {
        switch endpoint {
        case let .unix(socket, _):
            let connected = try NBDSocket.connect(unix: socket, NBDAddress(endpoint: .unix(path: socket), export: ""), timeout: 10)
            close(connected.fd)
        case let .tcp(host, port, _):
            let address = NBDAddress(endpoint: .tcp(host: host, port: port), export: "")
            do throws(DiskImageError) {
                if let error = try NBDTCPSocket(address, host: host, port: port, timeout: 10).startError() { throw error }
            } catch {
                // Named as the server, not as an NBD address: an iSCSI portal is checked here too.
                guard case let .io(operation, _, code) = error else { throw error }
                throw .io(operation: operation, path: "\(host.contains(":") ? "[\(host)]" : host):\(port)", errno: code)
            }
        }
    }

    /// A C library's message from its NUL-terminated buffer (libiscsi's, GnuTLS's).
    static func text(_ buffer: [CChar]) -> String {
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Where network disks tell their failures, reconnections and failovers (the VMM's log).
    public static let log = Mutex<(@Sendable (String) -> Void)?>(nil)
    static func say(_ line: String) { log.withLock { $0 }?(line) }
}
