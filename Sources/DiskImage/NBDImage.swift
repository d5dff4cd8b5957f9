import CDiskHost
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where one NBD export is: `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///EXPORT?socket=PATH`
/// (the URI forms QEMU and libnbd take), and over TLS `nbds://…` or `nbds+unix://…` with
/// `tls-certificates=DIR` and `tls-hostname=NAME` in the query (the NBD URI specification's
/// names). A disk names one or more of them joined by `|`: paths to the same export, used one at
/// a time (docs/disk-images.md, "Network disks").
public struct NBDAddress: Sendable, Equatable, CustomStringConvertible {
    public enum Endpoint: Sendable, Equatable {
        case unix(path: String)
        case tcp(host: String, port: UInt16)
    }

    /// TLS settings of an `nbds` address.
    public struct TLS: Sendable, Equatable {
        /// A directory with `ca-cert.pem` and, optionally, `client-cert.pem` and
        /// `client-key.pem` (the names QEMU and libnbd use); nil: the system's trust store.
        public var certificates: String?
        /// The name the server's certificate must carry; nil: a TCP path's host, and for a Unix
        /// socket none (the chain alone is checked).
        public var hostname: String?
    }

    public var endpoint: Endpoint
    public var export: String
    /// nil: plain NBD.
    public var tls: TLS?
    public static let defaultPort: UInt16 = 10809

    public var description: String {
        var query: [String] = []
        if case let .unix(path) = endpoint { query.append("socket=\(path)") }
        if let certificates = tls?.certificates { query.append("tls-certificates=\(certificates)") }
        if let hostname = tls?.hostname { query.append("tls-hostname=\(hostname)") }
        let suffix = query.isEmpty ? "" : "?" + query.joined(separator: "&")
        let scheme = tls == nil ? "nbd" : "nbds"
        switch endpoint {
        case .unix: return "\(scheme)+unix:///\(export)\(suffix)"
        case let .tcp(host, port): return "\(scheme)://\(host.contains(":") ? "[\(host)]" : host):\(port)/\(export)\(suffix)"
        }
    }

    /// The name the server's certificate is checked against, if any.
    var certificateName: String? {
        if let hostname = tls?.hostname { return hostname }
        if case let .tcp(host, _) = endpoint { return host }
        return nil
    }

    /// The same server's export `name` (a storage pool's volume).
    public func naming(export name: String) -> NBDAddress { NBDAddress(endpoint: endpoint, export: name, tls: tls) }

    /// Every path of a disk's `A|B|...` text, each parsed; refused naming what is wrong.
    public static func paths(_ text: String) throws(DiskImageError) -> [NBDAddress] {
        try NetworkDisk.paths(text, parse, leadingTo: \.export, naming: "export")
    }

    public static func parse(_ text: String) throws(DiskImageError) -> NBDAddress {
        func refuse(_ why: String) -> DiskImageError {
            .invalidArgument(field: "disk", reason: "'\(text.prefix(300))' \(why); expected nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=/PATH (nbds:// and nbds+unix:// for TLS, with tls-certificates=/DIR)")
        }
        guard text.utf8.count <= 4096, !text.utf8.contains(0), !text.contains(",") else { throw refuse("is not a usable address") }
        let schemes: [(prefix: String, unix: Bool, tls: Bool)] = [("nbd+unix://", true, false), ("nbds+unix://", true, true), ("nbd://", false, false), ("nbds://", false, true)]
        guard let scheme = schemes.first(where: { text.hasPrefix($0.prefix) }) else { throw refuse("is not an NBD address") }
        var rest = Substring(text.dropFirst(scheme.prefix.count))
        var settings: [String: String] = [:]
        if let question = rest.firstIndex(of: "?") {
            for item in rest[rest.index(after: question)...].split(separator: "&", omittingEmptySubsequences: false) {
                guard let equals = item.firstIndex(of: "=") else { throw refuse("has a query item '\(item.prefix(100))' without a value") }
                let key = String(item[..<equals])
                let allowed = (scheme.unix ? ["socket"] : []) + (scheme.tls ? ["tls-certificates", "tls-hostname"] : [])
                guard allowed.contains(key) else {
                    throw refuse(key.hasPrefix("tls-") && !scheme.tls ? "sets \(key) on a plain NBD address; TLS needs nbds:// or nbds+unix://"
                                 : "has a query item '\(key.prefix(100))' (allowed here: \(allowed.isEmpty ? "none" : allowed.joined(separator: ", ")))")
                }
                guard settings[key] == nil else { throw refuse("sets \(key) twice") }
                settings[key] = String(item[item.index(after: equals)...])
            }
            rest = rest[..<question]
        }
        var tls: TLS?
        if scheme.tls {
            var made = TLS()
            if let certificates = settings["tls-certificates"] {
                guard certificates.hasPrefix("/"), !certificates.contains("|") else { throw refuse("needs an absolute tls-certificates directory") }
                made.certificates = certificates
            }
            if let hostname = settings["tls-hostname"] {
                guard !hostname.isEmpty, hostname.utf8.count <= 253,
                      hostname.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x7a) || $0 == 0x2e || $0 == 0x2d || $0 == 0x3a }) else {
                    throw refuse("has a tls-hostname that is not a host name")
                }
                made.hostname = hostname
            }
            tls = made
        }
        if scheme.unix {
            guard rest.isEmpty || rest.hasPrefix("/") else { throw refuse("names a host; a Unix socket has none") }
            guard let socket = settings["socket"] else { throw refuse("has no ?socket=") }
            guard socket.hasPrefix("/"), socket.utf8.count < 108 else { throw refuse("needs an absolute socket path shorter than 108 bytes") }
            return NBDAddress(endpoint: .unix(path: socket), export: try exportName(rest.dropFirst(), refuse), tls: tls)
        }
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        let authority = rest[..<slash]
        let export = slash == rest.endIndex ? "" : try exportName(rest[rest.index(after: slash)...], refuse)
        let (host, port) = try NetworkDisk.hostAndPort(authority, defaultPort: defaultPort, refuse)
        guard !host.contains("?"), !host.contains("@") else { throw refuse("has no usable host") }
        return NBDAddress(endpoint: .tcp(host: host, port: port), export: export, tls: tls)
    }

    private static func exportName(_ text: Substring, _ refuse: (String) -> DiskImageError) throws(DiskImageError) -> String {
        // NBD limits names to 4096 bytes; a query after the export is not ours to guess.
        guard text.utf8.count <= 4096, !text.contains("?") else { throw refuse("has an unusable export name") }
        return String(text)
    }
}

/// An `nbds` path's TLS credentials, read from their files before the VMM is confined and kept
/// for every handshake of that path, reconnections from inside the jail included.
final class NBDTLSCredentials: @unchecked Sendable {
    let handle: UnsafeMutableRawPointer
    /// The name the server's certificate must carry (nil: the chain alone is checked).
    let hostname: String?
    /// Whether a client certificate is presented.
    let hasClientCertificate: Bool

    static let caFile = "ca-cert.pem", clientCertificate = "client-cert.pem", clientKey = "client-key.pem"

    init(_ address: NBDAddress) throws(DiskImageError) {
        let directory = address.tls?.certificates
        var caFile: String?, certificate: String?, key: String?
        if let directory {
            let ca = directory + "/" + Self.caFile
            caFile = ca
            guard access(directory, F_OK) == 0 else {
                throw .network(path: address.description, reason: "the TLS certificates directory \(directory) does not exist")
            }
            guard access(ca, R_OK) == 0 else {
                throw .network(path: address.description, reason: "the TLS certificates directory \(directory) has no readable \(Self.caFile)")
            }
            let hasCertificate = access(directory + "/" + Self.clientCertificate, F_OK) == 0
            let hasKey = access(directory + "/" + Self.clientKey, F_OK) == 0
            guard hasCertificate == hasKey else {
                throw .network(path: address.description, reason: "the TLS certificates directory \(directory) has \(hasCertificate ? Self.clientCertificate : Self.clientKey) without \(hasCertificate ? Self.clientKey : Self.clientCertificate); a client certificate needs both")
            }
            if hasCertificate { certificate = directory + "/" + Self.clientCertificate; key = directory + "/" + Self.clientKey }
        }
        var error = [CChar](repeating: 0, count: 512)
        guard let made = vireo_tls_credentials(caFile, certificate, key, &error, error.count) else {
            throw .network(path: address.description, reason: NetworkDisk.text(error))
        }
        handle = made
        hostname = address.certificateName
        hasClientCertificate = certificate != nil
    }

    deinit { vireo_tls_credentials_free(handle) }

    /// Whether the name is sent as SNI: host names only, never an IP address (RFC 6066).
    var sendsServerName: Bool {
        guard let hostname else { return false }
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, hostname, &v4) != 1 && inet_pton(AF_INET6, hostname, &v6) != 1
    }
}

/// One connection's socket, connected but not yet talked to (the handshake, the server's first
/// bytes, is read only once the VMM is confined: a server is a peer like any other).
struct NBDSocket: @unchecked Sendable {
    let fd: Int32
    let address: NBDAddress
    /// Whether the connection closes the descriptor when it ends: not a TCP path's, which
    /// `NBDTCPSocket` keeps to connect again.
    var ownsDescriptor = true
    /// An `nbds` path's credentials: the connection starts TLS before anything else.
    var tls: NBDTLSCredentials?

    /// Connects a Unix-socket path, with `timeout` seconds for the connection and for each later
    /// read or write. (A TCP path connects through its `NBDTCPSocket`.)
    static func connect(unix path: String, _ address: NBDAddress, timeout: Int) throws(DiskImageError) -> NBDSocket {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .io(operation: "socket", path: address.description, errno: errno) }
        setTimeouts(fd, timeout)
        var name = sockaddr_un()
        name.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &name.sun_path) { raw in
            for (index, byte) in path.utf8.enumerated() where index < raw.count - 1 { raw[index] = byte }
        }
        let result = withUnsafePointer(to: &name) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else { let code = errno; close(fd); throw .io(operation: "connect", path: address.description, errno: code) }
        return NBDSocket(fd: fd, address: address)
    }

    static func setTimeouts(_ fd: Int32, _ seconds: Int) {
        var limit = timeval(tv_sec: seconds, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
    }
}

/// A TCP path's one socket: made, resolved and first connected before the VMM is confined, and
/// connected again in place after a failure (`connect` to AF_UNSPEC dissolves the old connection,
/// then the same peer is dialled). A socket belongs to the network namespace it was made in, so
/// a jailed VMM, which has no network of its own, still reaches the server through it; `socket`
/// is never called for TCP after the jail (its seccomp filters allow AF_UNIX alone).
final class NBDTCPSocket: @unchecked Sendable {
    let fd: Int32
    let address: NBDAddress
    private let peer: [UInt8]
    private let timeout: Int
    /// Whether the socket is connected now: a first `connect` may have failed.
    private var connected: Bool
    private let firstError: Int32

    /// Resolves the host (the first address of each family the resolver gives is tried in
    /// turn) and connects. A path that does not answer now keeps its socket for later tries;
    /// one whose name does not resolve has none.
    init(_ address: NBDAddress, host: String, port: UInt16, timeout: Int) throws(DiskImageError) {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var found: UnsafeMutablePointer<addrinfo>?
        let looked = getaddrinfo(host, String(port), &hints, &found)
        guard looked == 0, let first = found else {
            throw .network(path: address.description, reason: "cannot resolve \(host): \(String(cString: gai_strerror(looked)))")
        }
        defer { freeaddrinfo(first) }
        var candidates: [(family: Int32, peer: [UInt8])] = []
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let current = entry {
            entry = current.pointee.ai_next
            guard let raw = current.pointee.ai_addr else { continue }
            candidates.append((current.pointee.ai_family, Array(UnsafeRawBufferPointer(start: raw, count: Int(current.pointee.ai_addrlen)))))
        }
        var chosen: (fd: Int32, peer: [UInt8])?
        var fallback: (fd: Int32, peer: [UInt8])?
        var lastError = ECONNREFUSED
        for candidate in candidates {
            let fd = socket(candidate.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { lastError = errno; continue }
            NBDSocket.setTimeouts(fd, timeout)
            if Self.dial(fd, candidate.peer) == 0 {
                chosen = (fd, candidate.peer)
                break
            }
            lastError = errno
            if fallback == nil { fallback = (fd, candidate.peer) } else { close(fd) }
        }
        if chosen != nil, let fallback { close(fallback.fd) }
        guard let kept = chosen ?? fallback else { throw .io(operation: "socket", path: address.description, errno: lastError) }
        self.fd = kept.fd
        self.address = address
        self.peer = kept.peer
        self.timeout = timeout
        self.connected = chosen != nil
        self.firstError = lastError
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { close(fd) }

    /// The socket, connected: as it is, or (`reconnect`, or never connected) dialled again.
    func connection(reconnect: Bool) throws(DiskImageError) -> NBDSocket {
        if reconnect || !connected {
            connected = false
            var unspecified = sockaddr()
            unspecified.sa_family = sa_family_t(AF_UNSPEC)
            _ = Glibc.connect(fd, &unspecified, socklen_t(MemoryLayout<sockaddr>.size))
            guard Self.dial(fd, peer) == 0 else { throw .io(operation: "connect", path: address.description, errno: errno) }
            connected = true
        }
        return NBDSocket(fd: fd, address: address, ownsDescriptor: false)
    }

    /// Why the first connection failed, for the start's error.
    func startError() -> DiskImageError? {
        connected ? nil : .io(operation: "connect", path: address.description, errno: firstError)
    }

    private static func dial(_ fd: Int32, _ peer: [UInt8]) -> Int32 {
        peer.withUnsafeBytes { raw in
            Glibc.connect(fd, raw.baseAddress?.assumingMemoryBound(to: sockaddr.self), socklen_t(raw.count))
        }
    }
}

/// Why an NBD exchange failed: the connection (retried, on this path or another) or the server's
/// answer to this request (the guest gets an I/O error).
enum NBDFailure: Error {
    case connection(String)
    case server(String)
}

/// An NBD connection after the fixed-newstyle handshake (NBD protocol, "Fixed newstyle
/// negotiation"): the export's size and transmission flags, and whether replies are structured.
/// One request at a time; every length and offset the server sends is checked.
final class NBDConnection: @unchecked Sendable {
    let wire: NBDWire
    let address: NBDAddress
    let size: UInt64
    let flags: UInt16
    let structured: Bool
    /// The server's id for the `base:allocation` metadata context: NBD_CMD_BLOCK_STATUS works
    /// (nil: the server does not offer it).
    let allocationContext: UInt32?
    private var cookie: UInt64 = 0

    enum Magic {
        static let negotiation: UInt64 = 0x4e42_444d_4147_4943   // "NBDMAGIC"
        static let options: UInt64 = 0x4948_4156_454f_5054       // "IHAVEOPT"
        static let optionReply: UInt64 = 0x0003_e889_0455_65a9
        static let request: UInt32 = 0x2560_9513
        static let simpleReply: UInt32 = 0x6744_6698
        static let structuredReply: UInt32 = 0x668e_33ef
    }
    enum Flag {
        static let readOnly: UInt16 = 1 << 1
        static let sendFlush: UInt16 = 1 << 2
        static let sendTrim: UInt16 = 1 << 5
        static let sendWriteZeroes: UInt16 = 1 << 6
    }
    enum Command {
        static let read: UInt16 = 0, write: UInt16 = 1, disconnect: UInt16 = 2, flush: UInt16 = 3, trim: UInt16 = 4, writeZeroes: UInt16 = 6
        static let blockStatus: UInt16 = 7
    }
    /// `base:allocation`'s flags for an extent.
    enum Allocation {
        static let hole: UInt32 = 1, zero: UInt32 = 2
    }
    /// The most extents one BLOCK_STATUS reply may carry.
    static let maximumExtents = 1 << 16
    /// The most a request carries: servers commonly refuse more than 32 MiB.
    static let maximumRequest = 1 << 20

    /// Negotiates `export` on a connected socket. Takes the socket's descriptor (closed on failure).
    init(_ socket: NBDSocket) throws(NBDFailure) {
        let fd = NBDWire(socket)
        wire = fd
        address = socket.address
        do throws(NBDFailure) {
            try Self.greet(fd)
            if let credentials = socket.tls { try Self.startTLS(fd, credentials) }
            // Structured replies: reads may come back in pieces and holes (NBD_OPT_STRUCTURED_REPLY).
            try Self.sendOption(fd, 8, [])
            var structured = false
            let (kind, _) = try Self.readOptionReply(fd, option: 8)
            if kind == 1 { structured = true } else if kind == Self.tlsRequired {
                throw Self.needsTLS
            } else if kind & 0x8000_0000 == 0 {
                throw NBDFailure.connection("unexpected reply \(kind) to NBD_OPT_STRUCTURED_REPLY")
            }
            self.structured = structured
            let name = Array(address.export.utf8)
            // NBD_OPT_SET_META_CONTEXT for `base:allocation` (NBD protocol, "Metadata querying"):
            // which ranges are holes or read as zeros, so a copy need not read them. Only with
            // structured replies, which carry the answers; a server that declines is still used.
            var allocationContext: UInt32?
            if structured {
                let query = Array("base:allocation".utf8)
                try Self.sendOption(fd, 10, Self.be(UInt32(name.count)) + name + Self.be(UInt32(1)) + Self.be(UInt32(query.count)) + query)
                while true {
                    let (kind, data) = try Self.readOptionReply(fd, option: 10)
                    if kind == 1 || kind & 0x8000_0000 != 0 { break }
                    // NBD_REP_META_CONTEXT: the id, then the name it answers for.
                    if kind == 4, data.count >= 4, Array(data[4...]) == query { allocationContext = Self.u32(data, 0) }
                }
            }
            self.allocationContext = allocationContext
            // NBD_OPT_GO: the export, no extra information asked for (its size and flags always come).
            try Self.sendOption(fd, 7, Self.be(UInt32(name.count)) + name + Self.be(UInt16(0)))
            var exportSize: UInt64?
            var exportFlags: UInt16 = 0
            while true {
                let (kind, data) = try Self.readOptionReply(fd, option: 7)
                if kind == 1 { break }
                if kind & 0x8000_0000 != 0 {
                    let message = String(decoding: data.prefix(512), as: UTF8.self)
                    if kind == Self.tlsRequired { throw Self.needsTLS }
                    let why = kind == 0x8000_0006 ? "has no export named '\(address.export)'" : "refused the export (error \(kind & 0x7fff_ffff))"
                    throw NBDFailure.server("the server \(why)" + (message.isEmpty ? "" : ": \(message)"))
                }
                // NBD_REP_INFO: NBD_INFO_EXPORT carries size and transmission flags.
                if kind == 3, data.count >= 12, Self.u16(data, 0) == 0 {
                    exportSize = Self.u64(data, 2)
                    exportFlags = Self.u16(data, 10)
                }
            }
            guard let exportSize else { throw NBDFailure.connection("the server never said the export's size") }
            guard exportSize <= UInt64(Int64.max) else { throw NBDFailure.connection("the export's size \(exportSize) is out of range") }
            size = exportSize
            flags = exportFlags
        } catch {
            let afterHandshake = fd.session != nil
            fd.end(disconnecting: false)
            // A server that checks clients' certificates (qemu-nbd's verify-peer) ends the
            // connection without a word when none came.
            if afterHandshake, let credentials = socket.tls, !credentials.hasClientCertificate, case .connection = error {
                throw NBDFailure.connection("the server closed the connection after the TLS handshake; if it checks clients' certificates, put \(NBDTLSCredentials.clientCertificate) and \(NBDTLSCredentials.clientKey) (from a CA it trusts) in the tls-certificates directory")
            }
            throw error
        }
    }

    deinit { wire.end(disconnecting: true) }

    /// NBD_REP_ERR_TLS_REQD: the server talks only to clients that started TLS.
    static let tlsRequired: UInt32 = 0x8000_0005
    static let needsTLS = NBDFailure.server("the server requires TLS; name it with nbds:// (or nbds+unix://) and tls-certificates=DIR")

    /// NBD_OPT_STARTTLS, then the TLS handshake on the same socket: everything after goes through
    /// the session (NBD protocol, "TLS support").
    private static func startTLS(_ wire: NBDWire, _ credentials: NBDTLSCredentials) throws(NBDFailure) {
        try sendOption(wire, 5, [])
        let (kind, data) = try readOptionReply(wire, option: 5)
        guard kind == 1 else {
            let message = String(decoding: data.prefix(512), as: UTF8.self)
            throw NBDFailure.server("the server does not offer TLS (it answered NBD_OPT_STARTTLS with error \(kind & 0x7fff_ffff))"
                                    + (message.isEmpty ? "" : ": \(message)"))
        }
        var error = [CChar](repeating: 0, count: 512)
        guard let session = vireo_tls_session(credentials.handle, wire.fd, credentials.hostname, credentials.sendsServerName ? 1 : 0, &error, error.count) else {
            // A certificate the client refuses is the server's answer, not a broken connection:
            // retrying the path would only meet it again.
            throw NBDFailure.server(NetworkDisk.text(error))
        }
        wire.session = session
    }

    /// One request: `payload` goes with writes, `into` receives reads (zeroed first: holes).
    func request(_ command: UInt16, offset: UInt64, length: UInt32, payload: UnsafeRawBufferPointer? = nil,
                 into buffer: UnsafeMutableRawBufferPointer? = nil, extents: UnsafeMutablePointer<[(length: UInt32, flags: UInt32)]>? = nil) throws(NBDFailure) {
        cookie &+= 1
        let fd = wire
        let header = Self.be(Magic.request) + Self.be(UInt16(0)) + Self.be(command) + Self.be(cookie) + Self.be(offset) + Self.be(length)
        try Self.write(fd, header)
        if let payload, let base = payload.baseAddress { try Self.write(fd, base, payload.count) }
        let magic = try Self.readU32(fd)
        if magic == Magic.simpleReply {
            let error = try Self.readU32(fd)
            guard try Self.readU64(fd) == cookie else { throw NBDFailure.connection("a reply to a request never sent") }
            // NBD's error numbers are errno values; a server may send any 32 bits.
            if error != 0 { throw NBDFailure.server("the server answered error \(error)" + (error < 256 ? " (\(String(cString: strerror(Int32(error)))))" : "")) }
            guard command != Command.blockStatus else { throw NBDFailure.connection("block status answered without extents") }
            if command == Command.read, let buffer, let base = buffer.baseAddress { try Self.read(fd, base, Int(length)) }
            return
        }
        guard magic == Magic.structuredReply, structured else { throw NBDFailure.connection("a reply with magic 0x" + String(magic, radix: 16)) }
        if let buffer, let base = buffer.baseAddress { base.initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count) }
        var serverError: String?
        var chunks = 0
        while true {
            chunks += 1
            guard chunks <= 1 << 16 else { throw NBDFailure.connection("more than 65536 chunks in one reply") }
            if chunks > 1 { guard try Self.readU32(fd) == Magic.structuredReply else { throw NBDFailure.connection("a broken structured reply") } }
            let chunkFlags = try Self.readU16(fd)
            let type = try Self.readU16(fd)
            guard try Self.readU64(fd) == cookie else { throw NBDFailure.connection("a reply to a request never sent") }
            let chunkLength = Int(try Self.readU32(fd))
            switch type {
            case 0:   // NBD_REPLY_TYPE_NONE
                guard chunkLength == 0 else { throw NBDFailure.connection("a NONE chunk with \(chunkLength) bytes") }
            case 1, 2:   // OFFSET_DATA, OFFSET_HOLE: where in the request they fall is checked
                guard command == Command.read, let base = buffer?.baseAddress, chunkLength >= 8 else {
                    throw NBDFailure.connection("data in the reply to a request that reads nothing")
                }
                let at = try Self.readU64(fd)
                let count = type == 1 ? chunkLength - 8 : Int(try Self.readU32(fd))
                guard type == 1 || chunkLength == 12 else { throw NBDFailure.connection("a hole chunk of \(chunkLength) bytes") }
                guard at >= offset, count <= Int(length), at - offset <= UInt64(Int(length) - count) else {
                    throw NBDFailure.connection("a chunk for bytes \(at)+\(count), outside the request \(offset)+\(length)")
                }
                if type == 1 { try Self.read(fd, base + Int(at - offset), count) }
            case 5:   // NBD_REPLY_TYPE_BLOCK_STATUS: the context's id, then (length, flags) pairs
                guard command == Command.blockStatus, let extents, let context = allocationContext else {
                    throw NBDFailure.connection("block status in the reply to a request that asked none")
                }
                guard chunkLength >= 12, (chunkLength - 4) % 8 == 0, (chunkLength - 4) / 8 <= Self.maximumExtents else {
                    throw NBDFailure.connection("a block status chunk of \(chunkLength) bytes")
                }
                let data = try Self.readBytes(fd, chunkLength)
                guard Self.u32(data, 0) == context, extents.pointee.isEmpty else {
                    throw NBDFailure.connection("block status for a context never asked, or twice")
                }
                var covered: UInt64 = 0
                for at in stride(from: 4, to: chunkLength, by: 8) {
                    let extentLength = Self.u32(data, at)
                    // Each extent has a length; only the last may reach past the request.
                    guard extentLength > 0, covered < UInt64(length) else { throw NBDFailure.connection("a block status extent that is empty or past the request") }
                    let kept = UInt32(min(UInt64(extentLength), UInt64(length) - covered))
                    extents.pointee.append((kept, Self.u32(data, at + 4)))
                    covered += UInt64(kept)
                }
            default:
                guard type & 0x8000 != 0, chunkLength >= 6, chunkLength <= 4096 + 14 else {
                    throw NBDFailure.connection("an unknown reply chunk type \(type)")
                }
                let data = try Self.readBytes(fd, chunkLength)
                let code = Self.u32(data, 0)
                let messageLength = min(Int(Self.u16(data, 4)), chunkLength - 6)
                serverError = "the server answered error \(code): " + String(decoding: data[6..<6 + messageLength], as: UTF8.self)
            }
            if chunkFlags & 1 != 0 { break }
        }
        if let serverError { throw NBDFailure.server(serverError) }
        if command == Command.blockStatus, extents?.pointee.isEmpty ?? true { throw NBDFailure.connection("block status answered without extents") }
    }

    /// The fixed-newstyle greeting: the server's magic and flags, the client's flags.
    private static func greet(_ fd: NBDWire) throws(NBDFailure) {
        guard try readU64(fd) == Magic.negotiation, try readU64(fd) == Magic.options else {
            throw NBDFailure.connection("not an NBD server speaking the newstyle protocol")
        }
        let serverFlags = try readU16(fd)
        guard serverFlags & 1 != 0 else { throw NBDFailure.connection("the server does not offer fixed newstyle negotiation") }
        let noZeroes = serverFlags & 2 != 0
        try write(fd, be(UInt32(1 | (noZeroes ? 2 : 0))))
    }

    /// The most exports a listing takes from a server.
    static let maximumListedExports = 256

    /// The server's exports (NBD_OPT_LIST) with each one's size where the server says it
    /// (NBD_OPT_INFO), then NBD_OPT_ABORT. The server's answers are read as a peer's: names of
    /// at most 4096 bytes of UTF-8 without control characters, at most 256 of them.
    static func listExports(_ socket: NBDSocket) throws(NBDFailure) -> [(name: String, size: UInt64?)] {
        let fd = NBDWire(socket)
        defer { fd.end(disconnecting: false) }
        try greet(fd)
        if let credentials = socket.tls { try startTLS(fd, credentials) }
        try sendOption(fd, 3, [])
        var names: [String] = []
        while true {
            let (kind, data) = try readOptionReply(fd, option: 3)
            if kind == 1 { break }
            if kind == tlsRequired { throw needsTLS }
            if kind & 0x8000_0000 != 0 {
                throw NBDFailure.server("the server does not list its exports (error \(kind & 0x7fff_ffff))")
            }
            guard kind == 2, data.count >= 4 else { throw NBDFailure.connection("an unexpected reply \(kind) to NBD_OPT_LIST") }
            let length = Int(u32(data, 0))
            guard length <= 4096, 4 + length <= data.count, let name = String(validating: data[4..<4 + length], as: UTF8.self),
                  !name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) else {
                throw NBDFailure.connection("an export name that is not printable UTF-8")
            }
            guard names.count < maximumListedExports else { throw NBDFailure.connection("more than \(maximumListedExports) exports") }
            names.append(name)
        }
        var exports: [(name: String, size: UInt64?)] = []
        for name in names {
            let bytes = Array(name.utf8)
            try sendOption(fd, 6, be(UInt32(bytes.count)) + bytes + be(UInt16(0)))
            var size: UInt64?
            while true {
                let (kind, data) = try readOptionReply(fd, option: 6)
                if kind == 1 || kind & 0x8000_0000 != 0 { break }
                if kind == 3, data.count >= 12, u16(data, 0) == 0, u64(data, 2) <= UInt64(Int64.max) { size = u64(data, 2) }
            }
            exports.append((name, size))
        }
        // NBD_OPT_ABORT: the server answers (or just closes); either ends it.
        try? sendOption(fd, 2, [])
        return exports
    }

    // MARK: the wire

    private static func sendOption(_ fd: NBDWire, _ option: UInt32, _ data: [UInt8]) throws(NBDFailure) {
        try write(fd, be(Magic.options) + be(option) + be(UInt32(data.count)) + data)
    }

    /// One option reply: its type and data (at most 64 KiB).
    private static func readOptionReply(_ fd: NBDWire, option: UInt32) throws(NBDFailure) -> (UInt32, [UInt8]) {
        guard try readU64(fd) == Magic.optionReply, try readU32(fd) == option else {
            throw NBDFailure.connection("a malformed reply to option \(option)")
        }
        let kind = try readU32(fd)
        let length = Int(try readU32(fd))
        guard length <= 65536 else { throw NBDFailure.connection("an option reply of \(length) bytes") }
        return (kind, try readBytes(fd, length))
    }

    static func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.bigEndian) { Array($0) }
    }
    static func u16(_ data: [UInt8], _ at: Int) -> UInt16 { data[at..<at + 2].reduce(0) { $0 << 8 | UInt16($1) } }
    static func u32(_ data: [UInt8], _ at: Int) -> UInt32 { data[at..<at + 4].reduce(0) { $0 << 8 | UInt32($1) } }
    static func u64(_ data: [UInt8], _ at: Int) -> UInt64 { data[at..<at + 8].reduce(0) { $0 << 8 | UInt64($1) } }

    private static func readU16(_ fd: NBDWire) throws(NBDFailure) -> UInt16 { u16(try readBytes(fd, 2), 0) }
    private static func readU32(_ fd: NBDWire) throws(NBDFailure) -> UInt32 { u32(try readBytes(fd, 4), 0) }
    private static func readU64(_ fd: NBDWire) throws(NBDFailure) -> UInt64 { u64(try readBytes(fd, 8), 0) }

    private static func readBytes(_ fd: NBDWire, _ count: Int) throws(NBDFailure) -> [UInt8] {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 8)
        defer { raw.deallocate() }
        try read(fd, raw, count)
        return Array(UnsafeRawBufferPointer(start: raw, count: count))
    }

    private static func read(_ fd: NBDWire, _ base: UnsafeMutableRawPointer, _ count: Int) throws(NBDFailure) {
        var done = 0
        while done < count {
            let got = try fd.receive(base + done, count - done)
            if got == 0 { throw NBDFailure.connection("the server closed the connection") }
            done += got
        }
    }

    private static func write(_ fd: NBDWire, _ bytes: [UInt8]) throws(NBDFailure) {
        // Result rather than a typed-throws closure: the generic wrapper rethrows `any Error`.
        let outcome: Result<Void, NBDFailure> = bytes.withUnsafeBytes { raw in
            do throws(NBDFailure) { try write(fd, raw.baseAddress!, raw.count); return .success(()) } catch { return .failure(error) }
        }
        try outcome.get()
    }

    private static func write(_ fd: NBDWire, _ base: UnsafeRawPointer, _ count: Int) throws(NBDFailure) {
        var done = 0
        while done < count { done += try fd.send(base + done, count - done) }
    }
}

/// One connection's byte stream: the socket itself, or a TLS session over it once STARTTLS is done.
final class NBDWire: @unchecked Sendable {
    let fd: Int32
    private let ownsDescriptor: Bool
    var session: UnsafeMutableRawPointer?

    init(_ socket: NBDSocket) {
        fd = socket.fd
        ownsDescriptor = socket.ownsDescriptor
    }

    /// Some bytes (> 0), or 0 when the server closed the connection.
    func receive(_ base: UnsafeMutableRawPointer, _ count: Int) throws(NBDFailure) -> Int {
        if let session {
            // A TLS server sends a reply's header and data as separate records, and with Nagle's
            // algorithm on its side the second waits for our ACK, which Linux delays up to 40 ms:
            // qemu-nbd's 4 KiB reads over TLS ran at 23 a second. Quick ACKs end the wait (Linux
            // clears the flag by itself, so it is set before every read that will reach the
            // socket; one the session's buffered record serves needs no system call at all; on a
            // Unix socket it fails harmlessly).
            if vireo_tls_pending(session) < count {
                var one: Int32 = 1
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_QUICKACK, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            var error = [CChar](repeating: 0, count: 256)
            let got = vireo_tls_recv(session, base, count, &error, error.count)
            guard got >= 0 else { throw NBDFailure.connection(NetworkDisk.text(error)) }
            return got
        }
        while true {
            let got = recv(fd, base, count, 0)
            if got < 0 && errno == EINTR { continue }
            if got < 0 { throw NBDFailure.connection("receive: \(String(cString: strerror(errno)))") }
            return got
        }
    }

    /// Some bytes (> 0) sent.
    func send(_ base: UnsafeRawPointer, _ count: Int) throws(NBDFailure) -> Int {
        if let session {
            var error = [CChar](repeating: 0, count: 256)
            let put = vireo_tls_send(session, base, count, &error, error.count)
            guard put > 0 else { throw NBDFailure.connection(put < 0 ? NetworkDisk.text(error) : "TLS send: nothing sent") }
            return put
        }
        while true {
            let put = Glibc.send(fd, base, count, Int32(MSG_NOSIGNAL))
            if put < 0 && errno == EINTR { continue }
            if put < 0 { throw NBDFailure.connection("send: \(String(cString: strerror(errno)))") }
            return put
        }
    }

    /// The connection's end: NBD_CMD_DISC first (`disconnecting`, best effort: the server then
    /// closes its side cleanly), the TLS session, then the descriptor if it is the connection's.
    func end(disconnecting: Bool) {
        if disconnecting {
            let header = NBDConnection.be(NBDConnection.Magic.request) + NBDConnection.be(UInt16(0)) + NBDConnection.be(NBDConnection.Command.disconnect)
                + NBDConnection.be(UInt64(0)) + NBDConnection.be(UInt64(0)) + NBDConnection.be(UInt32(0))
            // One try, without waiting: a server that is gone must not hold a failover up.
            header.withUnsafeBytes { raw in
                if let session {
                    var error = [CChar](repeating: 0, count: 64)
                    _ = vireo_tls_send(session, raw.baseAddress, raw.count, &error, error.count)
                } else {
                    _ = Glibc.send(fd, raw.baseAddress, raw.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
                }
            }
        }
        if let session { vireo_tls_close(session, disconnecting ? 1 : 0) }
        session = nil
        if ownsDescriptor { close(fd) }
    }
}

/// A disk that is an NBD export, reached over one or more paths. Requests go to the active path;
/// when its connection fails they wait while the next path (or the same one, reconnected) takes
/// over, for up to `reconnectSeconds`, and are then sent again: reads and writes of whole ranges
/// are idempotent, so a request that may or may not have reached the server before the failure is
/// safe to repeat. Only then does the guest see an I/O error (QEMU's `reconnect-delay`).
public final class NBDImage: DiskImage, MultipathDisk, @unchecked Sendable {
    public let path: String
    public var format: DiskFormat { .raw }
    public let virtualSize: UInt64
    public let isReadOnly: Bool
    public let addresses: [NBDAddress]
    let reconnectSeconds: Int
    private let paths: Mutex<PathTable<NBDConnection>>
    private let flags: UInt16
    private let tcpSockets: [NBDTCPSocket?]
    private let credentials: [NBDTLSCredentials?]
    /// What the server last said of a stretch of the export (BLOCK_STATUS, `base:allocation`):
    /// from `start`, extents in order. Forgotten before every write, so it never outlives the
    /// contents it describes.
    private let knownExtents = Mutex<(start: UInt64, extents: [(length: UInt32, flags: UInt32)])>((0, []))

    static func say(_ line: String) { NetworkDisk.say(line) }

    /// The sockets of a disk's paths, connected before the VMM is confined (a jailed VMM has no
    /// network); talked to only afterwards (`decode`).
    public struct Connecting: NetworkDiskConnecting, @unchecked Sendable {
        let path: String
        let addresses: [NBDAddress]
        let sockets: [NBDSocket?]
        /// Each TCP path's own socket, kept to connect again from inside the jail.
        let tcpSockets: [NBDTCPSocket?]
        /// Each `nbds` path's TLS credentials, read before the jail and kept for reconnections.
        let credentials: [NBDTLSCredentials?]
        let readOnly: Bool
        let reconnectSeconds: Int

        public func decode() throws(DiskImageError) -> any DiskImage {
            try NBDImage(self)
        }
    }

    /// The exports of the server `text` names (`nbd://HOST[:PORT]` or `nbd+unix:///?socket=PATH`,
    /// no export): a storage pool's volumes (`vireo pool info`), each with its size.
    public static func listExports(server text: String) throws(DiskImageError) -> [(name: String, size: UInt64?)] {
        let address = try NBDAddress.parse(text)
        let credentials = try address.tls.map { (_) throws(DiskImageError) in try NBDTLSCredentials(address) }
        var socket: NBDSocket
        var tcp: NBDTCPSocket?
        switch address.endpoint {
        case let .unix(path): socket = try NBDSocket.connect(unix: path, address, timeout: 10)
        case let .tcp(host, port):
            let made = try NBDTCPSocket(address, host: host, port: port, timeout: 10)
            if let error = made.startError() { throw error }
            tcp = made
            socket = try made.connection(reconnect: false)
        }
        defer { withExtendedLifetime(tcp) {} }
        socket.tls = credentials
        do throws(NBDFailure) {
            return try NBDConnection.listExports(socket)
        } catch {
            switch error {
            case let .connection(reason), let .server(reason): throw .network(path: address.description, reason: reason)
            }
        }
    }

    /// Connects every path it can now; at least one must answer.
    public static func connect(path: String, readOnly: Bool, reconnectSeconds: Int = 30) throws(DiskImageError) -> Connecting {
        let addresses = try NBDAddress.paths(path)
        // Credentials first: a certificates directory that cannot be used is the disk's error,
        // not a path that happens to be down.
        var credentials: [NBDTLSCredentials?] = []
        for address in addresses {
            credentials.append(try address.tls.map { (_) throws(DiskImageError) in try NBDTLSCredentials(address) })
        }
        var sockets: [NBDSocket?] = []
        var tcpSockets: [NBDTCPSocket?] = []
        var firstError: DiskImageError?
        for (index, address) in addresses.enumerated() {
            do throws(DiskImageError) {
                var socket: NBDSocket
                switch address.endpoint {
                case let .unix(socketPath):
                    tcpSockets.append(nil)
                    socket = try NBDSocket.connect(unix: socketPath, address, timeout: 10)
                case let .tcp(host, port):
                    let tcp = try NBDTCPSocket(address, host: host, port: port, timeout: 10)
                    tcpSockets.append(tcp)
                    if let error = tcp.startError() { throw error }
                    socket = try tcp.connection(reconnect: false)
                }
                socket.tls = credentials[index]
                sockets.append(socket)
            } catch {
                if tcpSockets.count == sockets.count { tcpSockets.append(nil) }
                sockets.append(nil)
                firstError = firstError ?? error
            }
        }
        if sockets.allSatisfy({ $0 == nil }), let firstError { throw firstError }
        return Connecting(path: path, addresses: addresses, sockets: sockets, tcpSockets: tcpSockets, credentials: credentials,
                          readOnly: readOnly, reconnectSeconds: reconnectSeconds)
    }

    init(_ connecting: Connecting) throws(DiskImageError) {
        path = connecting.path
        addresses = connecting.addresses
        reconnectSeconds = connecting.reconnectSeconds
        var connections: [NBDConnection?] = []
        var problems: [String] = []
        for (index, socket) in connecting.sockets.enumerated() {
            guard let socket else { connections.append(nil); continue }
            do throws(NBDFailure) { connections.append(try NBDConnection(socket)) } catch {
                connections.append(nil)
                switch error {
                case let .connection(why), let .server(why):
                    // The address only where there are several: the disk's own name says the one.
                    problems.append(connecting.addresses.count > 1 ? "\(connecting.addresses[index]): \(why)" : why)
                }
            }
        }
        guard let first = connections.firstIndex(where: { $0 != nil }), let connection = connections[first] else {
            throw .network(path: connecting.path, reason: problems.joined(separator: "; "))
        }
        // Every path must show the same export: same size, and writable if the disk is.
        for case let other? in connections where other.size != connection.size {
            throw .network(path: connecting.path, reason: "\(other.address) is \(other.size) bytes and \(connection.address) \(connection.size): not the same export")
        }
        if !connecting.readOnly, connection.flags & NBDConnection.Flag.readOnly != 0 {
            throw .network(path: connecting.path, reason: "\(connection.address) is a read-only export; use the disk read-only")
        }
        virtualSize = connection.size
        isReadOnly = connecting.readOnly || connection.flags & NBDConnection.Flag.readOnly != 0
        flags = connection.flags
        paths = Mutex(PathTable(sessions: connections, active: first))
        tcpSockets = connecting.tcpSockets
        credentials = connecting.credentials
        for problem in problems { Self.say("nbd: \(path): path down at start: \(problem)") }
    }

    /// Runs `body` on the active connection, moving to another path or reconnecting on a
    /// connection failure until the deadline.
    private func perform(_ what: String, _ body: (NBDConnection) throws(NBDFailure) -> Void) throws(DiskImageError) {
        try paths.withLock { (state) throws(DiskImageError) in
            let deadline = monotonicSeconds() + Double(reconnectSeconds)
            var lastProblem = ""
            var attempt = 0
            while true {
                if state.sessions[state.active] == nil {
                    // Connect this path again: a Unix socket the VMM may still reach, or a TCP
                    // path's own socket, dialled again in place (docs/disk-images.md).
                    do throws(DiskImageError) {
                        if let socket = try dial(state.active) {
                            do throws(NBDFailure) {
                                let connection = try NBDConnection(socket)
                                guard connection.size == virtualSize else {
                                    throw NBDFailure.connection("the export is now \(connection.size) bytes, was \(virtualSize)")
                                }
                                state.sessions[state.active] = connection
                                Self.say("nbd: \(path): connected again through \(addresses[state.active])")
                            } catch {
                                switch error { case let .connection(why), let .server(why): lastProblem = why }
                            }
                        }
                    } catch {
                        lastProblem = error.description
                    }
                }
                if let connection = state.sessions[state.active] {
                    do throws(NBDFailure) {
                        try body(connection)
                        return
                    } catch {
                        switch error {
                        case let .server(why): throw .io(operation: "\(what): \(why)", path: path, errno: EIO)
                        case let .connection(why):
                            lastProblem = why
                            state.sessions[state.active] = nil
                            Self.say("nbd: \(path): " + (addresses.count > 1 ? "\(addresses[state.active]) " : "") + "failed during \(what): \(why)")
                        }
                    }
                }
                guard monotonicSeconds() < deadline else {
                    throw .io(operation: "\(what): no path answered for \(reconnectSeconds) s (last: \(lastProblem))", path: path, errno: EIO)
                }
                // The next path; a path that is down is tried again in its turn.
                let previous = state.active
                state.active = (state.active + 1) % addresses.count
                if state.active != previous {
                    state.failovers += 1
                    Self.say("nbd: \(path): now on \(addresses[state.active])")
                }
                attempt += 1
                if attempt >= addresses.count { usleep(useconds_t(min(100_000 * attempt / addresses.count, 500_000))) }
            }
        }
    }

    /// A new connection's socket for path `index` (nil: a TCP path that never had a socket, its
    /// name unresolvable at start). Called with the paths' lock held.
    private func dial(_ index: Int) throws(DiskImageError) -> NBDSocket? {
        var socket: NBDSocket?
        switch addresses[index].endpoint {
        case let .unix(socketPath): socket = try NBDSocket.connect(unix: socketPath, addresses[index], timeout: 10)
        case .tcp: socket = try tcpSockets[index]?.connection(reconnect: true)
        }
        socket?.tls = credentials[index]
        return socket
    }

    /// Each path, whether it is connected and which one requests go to (`vireo info`).
    public var pathStates: [(address: String, connected: Bool, active: Bool)] {
        paths.withLock { $0.states(addresses.map(\.description)) }
    }

    /// How many times requests moved to another path.
    public var failovers: Int { paths.withLock { $0.failovers } }

    private func monotonicSeconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }

    /// Splits a transfer of `total` bytes into requests a server takes; `body` gets each piece's
    /// start (relative to the transfer) and length.
    private func inPieces(_ total: UInt64, _ body: (_ done: UInt64, _ count: Int) throws(DiskImageError) -> Void) throws(DiskImageError) {
        var done: UInt64 = 0
        while done < total {
            let count = Int(min(UInt64(NBDConnection.maximumRequest), total - done))
            try body(done, count)
            done += UInt64(count)
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        try checkRange(offset, buffer.count)
        guard let base = buffer.baseAddress else { return }
        try inPieces(UInt64(buffer.count)) { (done, count) throws(DiskImageError) in
            let piece = UnsafeMutableRawBufferPointer(start: base + Int(done), count: count)
            try perform("read") { (connection) throws(NBDFailure) in
                try connection.request(NBDConnection.Command.read, offset: offset + done, length: UInt32(count), into: piece)
            }
        }
    }

    /// Whether the server says every byte of the range reads as zero (BLOCK_STATUS's
    /// NBD_STATE_ZERO), asked once per stretch of up to 1 GiB and remembered until the next
    /// write. False when it does not say (no `base:allocation`, an error): the range is read.
    public func readsAsZeroes(at offset: UInt64, length: UInt64) -> Bool {
        guard length > 0, offset < virtualSize, length <= virtualSize - offset else { return false }
        if let known = knownExtents.withLock({ Self.zeroes(in: $0, offset, length) }) { return known }
        let span = UInt32(min(virtualSize - offset, 1 << 30))
        var extents: [(length: UInt32, flags: UInt32)] = []
        do throws(DiskImageError) {
            try perform("block status") { (connection) throws(NBDFailure) in
                extents = []
                guard connection.allocationContext != nil else { return }
                try connection.request(NBDConnection.Command.blockStatus, offset: offset, length: span, extents: &extents)
                // Stored under the paths' lock: no write can come between the answer and this.
                knownExtents.withLock { $0 = (offset, extents) }
            }
        } catch {
            return false
        }
        return knownExtents.withLock { Self.zeroes(in: $0, offset, length) } ?? false
    }

    /// What `known` says of [offset, offset+length): all zeros, not all zeros, or nil when it
    /// does not cover the range.
    static func zeroes(in known: (start: UInt64, extents: [(length: UInt32, flags: UInt32)]), _ offset: UInt64, _ length: UInt64) -> Bool? {
        guard offset >= known.start else { return nil }
        var position = known.start
        for extent in known.extents {
            let end = position + UInt64(extent.length)
            if end > offset {
                if extent.flags & NBDConnection.Allocation.zero == 0 { return false }
                if end >= offset + length { return true }
            }
            position = end
        }
        return nil
    }

    private func forgetExtents() { knownExtents.withLock { $0 = (0, []) } }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        try checkRange(offset, buffer.count)
        guard let base = buffer.baseAddress else { return }
        try inPieces(UInt64(buffer.count)) { (done, count) throws(DiskImageError) in
            let piece = UnsafeRawBufferPointer(start: base + Int(done), count: count)
            try perform("write") { (connection) throws(NBDFailure) in
                forgetExtents()
                try connection.request(NBDConnection.Command.write, offset: offset + done, length: UInt32(count), payload: piece)
            }
        }
    }

    public func flush() throws(DiskImageError) {
        guard flags & NBDConnection.Flag.sendFlush != 0, !isReadOnly else { return }
        try perform("flush") { (connection) throws(NBDFailure) in
            try connection.request(NBDConnection.Command.flush, offset: 0, length: 0)
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        try checkWritableRange(offset, length)
        let command = flags & NBDConnection.Flag.sendWriteZeroes != 0
        try inPieces(length) { (done, count) throws(DiskImageError) in
            guard command else { return try write([UInt8](repeating: 0, count: count), at: offset + done) }
            try perform("write zeroes") { (connection) throws(NBDFailure) in
                forgetExtents()
                try connection.request(NBDConnection.Command.writeZeroes, offset: offset + done, length: UInt32(count))
            }
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        try checkWritableRange(offset, length)
        // A server without trim keeps the data: a discard is advice.
        guard flags & NBDConnection.Flag.sendTrim != 0 else { return }
        try inPieces(length) { (done, count) throws(DiskImageError) in
            try perform("trim") { (connection) throws(NBDFailure) in
                forgetExtents()
                try connection.request(NBDConnection.Command.trim, offset: offset + done, length: UInt32(count))
            }
        }
    }

    /// The export's allocated bytes are what the server's BLOCK_STATUS does not call holes; a
    /// server that does not say counts as fully allocated.
    public func info() throws(DiskImageError) -> DiskInfo {
        DiskInfo(path: path, format: .raw, virtualSize: virtualSize, allocatedBytes: allocatedBytes() ?? virtualSize, clusterSize: nil, backingChain: [])
    }

    /// The bytes outside holes, asked in stretches of up to 1 GiB (at most 4096 questions); nil
    /// when the server does not say.
    private func allocatedBytes() -> UInt64? {
        var offset: UInt64 = 0
        var allocated: UInt64 = 0
        for _ in 0..<4096 {
            guard offset < virtualSize else { return allocated }
            var extents: [(length: UInt32, flags: UInt32)] = []
            let span = UInt32(min(virtualSize - offset, 1 << 30))
            do throws(DiskImageError) {
                try perform("block status") { (connection) throws(NBDFailure) in
                    extents = []
                    guard connection.allocationContext != nil else { return }
                    try connection.request(NBDConnection.Command.blockStatus, offset: offset, length: span, extents: &extents)
                }
            } catch {
                return nil
            }
            guard !extents.isEmpty else { return nil }
            for extent in extents {
                if extent.flags & NBDConnection.Allocation.hole == 0 { allocated += UInt64(extent.length) }
                offset += UInt64(extent.length)
            }
        }
        return nil
    }
}

/// A server's bytes, fed to the client as one connection's whole answer: what the fuzzer drives
/// (a server is a peer, so everything it sends is hostile input) and its seed.
public enum NBDInspection {
    /// Negotiates and makes one request of each kind over a socket pair whose far end holds
    /// `serverBytes` and then closes. Returns whether the handshake succeeded and how many
    /// requests were answered without a connection failure.
    public static func converse(serverBytes: UnsafeRawBufferPointer) -> (accepted: Bool, operations: Int) {
        var ends: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &ends) == 0 else { return (false, 0) }
        defer { close(ends[1]) }
        // Bounded input (the fuzzer's max_len) fits the socket buffer; the client's few small
        // requests fit the other direction's.
        var limit = timeval(tv_sec: 2, tv_usec: 0)
        _ = setsockopt(ends[0], SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(ends[0], SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        var size = Int32(1 << 20)
        _ = setsockopt(ends[1], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        if let base = serverBytes.baseAddress, serverBytes.count > 0 { _ = send(ends[1], base, serverBytes.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
        shutdown(ends[1], Int32(SHUT_WR))
        let socket = NBDSocket(fd: ends[0], address: NBDAddress(endpoint: .unix(path: "/fuzz.sock"), export: "exp"))
        guard let connection = try? NBDConnection(socket) else { return (false, 0) }
        var operations = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buffer.deallocate() }
        let requests: [(UInt16, UInt32)] = [(NBDConnection.Command.read, 4096), (NBDConnection.Command.write, 512), (NBDConnection.Command.flush, 0),
                                            (NBDConnection.Command.writeZeroes, 4096), (NBDConnection.Command.trim, 4096),
                                            (NBDConnection.Command.blockStatus, 1 << 20)]
        for (command, length) in requests {
            let extents = UnsafeMutablePointer<[(length: UInt32, flags: UInt32)]>.allocate(capacity: 1)
            extents.initialize(to: [])
            defer { extents.deinitialize(count: 1); extents.deallocate() }
            do throws(NBDFailure) {
                try connection.request(command, offset: 0, length: length,
                                       payload: command == NBDConnection.Command.write ? UnsafeRawBufferPointer(start: buffer.baseAddress, count: 512) : nil,
                                       into: command == NBDConnection.Command.read ? buffer : nil,
                                       extents: command == NBDConnection.Command.blockStatus ? extents : nil)
                operations += 1
            } catch {
                if case .connection = error { break }
                operations += 1
            }
        }
        return (true, operations)
    }

    /// A well-behaved server's whole side of such a conversation (qemu-nbd's shape): the
    /// fuzzer's seed, and a check that the conversation works at all.
    public static var sample: [UInt8] {
        typealias C = NBDConnection
        var bytes = C.be(C.Magic.negotiation) + C.be(C.Magic.options) + C.be(UInt16(3))
        func optionReply(_ option: UInt32, _ kind: UInt32, _ data: [UInt8]) -> [UInt8] {
            C.be(C.Magic.optionReply) + C.be(option) + C.be(kind) + C.be(UInt32(data.count)) + data
        }
        bytes += optionReply(8, 1, [])
        bytes += optionReply(10, 4, C.be(UInt32(1)) + Array("base:allocation".utf8))
        bytes += optionReply(10, 1, [])
        bytes += optionReply(7, 3, C.be(UInt16(0)) + C.be(UInt64(1 << 20)) + C.be(UInt16(1 | 4 | 32 | 64)))
        bytes += optionReply(7, 1, [])
        // The read: one data chunk, then a hole, the last chunk done.
        bytes += C.be(C.Magic.structuredReply) + C.be(UInt16(0)) + C.be(UInt16(1)) + C.be(UInt64(1)) + C.be(UInt32(8 + 2048)) + C.be(UInt64(0))
            + [UInt8](repeating: 0x5a, count: 2048)
        bytes += C.be(C.Magic.structuredReply) + C.be(UInt16(1)) + C.be(UInt16(2)) + C.be(UInt64(1)) + C.be(UInt32(12)) + C.be(UInt64(2048)) + C.be(UInt32(2048))
        for cookie in 2...5 { bytes += C.be(C.Magic.simpleReply) + C.be(UInt32(0)) + C.be(UInt64(cookie)) }
        // The block status: data for 64 KiB, then a hole reading as zeros to the end.
        bytes += C.be(C.Magic.structuredReply) + C.be(UInt16(1)) + C.be(UInt16(5)) + C.be(UInt64(6)) + C.be(UInt32(4 + 16)) + C.be(UInt32(1))
            + C.be(UInt32(65536)) + C.be(UInt32(0)) + C.be(UInt32((1 << 20) - 65536)) + C.be(UInt32(3))
        return bytes
    }
}
