import CHostSupport
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The front end of a vhost-user connection (QEMU's docs/interop/vhost-user.rst): the VMM tells a
/// back end process (virtiofsd) where guest RAM is and where a device's rings lie, hands it an
/// eventfd per queue for each direction, and from then on the back end serves the queues itself,
/// reading and writing guest RAM through its own mapping of the same memfd. Only what a virtio-fs
/// device needs is spoken: features, protocol features with REPLY_ACK, the owner, one memory table,
/// and each vring's size, addresses, base, kick, call and enable.
///
/// The back end is a process Vireo started for this VM, but its replies are still read as
/// untrusted bytes: each must answer the request it follows, with the size that request's reply
/// has, within a time limit (a vCPU thread waits for it).
public final class VhostUserFrontend: @unchecked Sendable {
    enum Request: UInt32 {
        case getFeatures = 1, setFeatures = 2, setOwner = 3, setMemoryTable = 5
        case setVringNum = 8, setVringAddress = 9, setVringBase = 10, getVringBase = 11
        case setVringKick = 12, setVringCall = 13, getProtocolFeatures = 15, setProtocolFeatures = 16
        case setVringEnable = 18
    }

    enum Flag {
        static let version: UInt32 = 0x1
        static let reply: UInt32 = 0x4
        static let needReply: UInt32 = 0x8
    }

    /// VHOST_USER_F_PROTOCOL_FEATURES, in the virtio feature word.
    public static let protocolFeaturesBit: UInt64 = 1 << 30
    /// VHOST_USER_PROTOCOL_F_REPLY_ACK: the back end acknowledges any request asked to.
    static let replyAcknowledgement: UInt64 = 1 << 3
    /// A vring kick or call message without a descriptor (bit 8 of the index word).
    static let noDescriptor: UInt64 = 1 << 8
    /// At most this many memory regions in one table (the protocol's limit).
    public static let maximumRegions = 8

    /// One guest RAM region as the back end maps it.
    public struct MemoryRegion: Sendable, Equatable {
        public var guestAddress: UInt64
        public var size: UInt64
        /// Where the region lies in this process (vring addresses are given in these terms).
        public var userAddress: UInt64
        public var descriptor: Int32
        public var offset: UInt64

        public init(guestAddress: UInt64, size: UInt64, userAddress: UInt64, descriptor: Int32, offset: UInt64) {
            self.guestAddress = guestAddress; self.size = size; self.userAddress = userAddress
            self.descriptor = descriptor; self.offset = offset
        }
    }

    private let socket: Int32
    private let name: String
    private let timeoutMilliseconds: Int32
    /// One request and its reply at a time; set once a reply went missing or the stream broke, after
    /// which every request fails at once (the stream's position is unknown).
    private let broken = Mutex<String?>(nil)
    private let exchange = Mutex<Void>(())
    /// The back end's virtio and vhost-user features (GET_FEATURES).
    public let backendFeatures: UInt64
    /// The protocol features both sides use (REPLY_ACK, when the back end has it).
    public let protocolFeatures: UInt64

    /// Takes `socket`, a connected Unix stream socket (closed with this front end, or at once if
    /// the greeting fails), and greets the back end: its features, the protocol features both
    /// speak, and this process as its owner.
    public init(socket: Int32, name: String, timeoutMilliseconds: Int32 = 10_000) throws(VirtioError) {
        self.socket = socket
        self.name = name
        self.timeoutMilliseconds = timeoutMilliseconds
        var features: UInt64 = 0
        var agreed: UInt64 = 0
        do throws(VirtioError) {
            features = try Self.exchangeU64(socket, .getFeatures, name: name, timeout: timeoutMilliseconds)
            if features & Self.protocolFeaturesBit != 0 {
                let offered = try Self.exchangeU64(socket, .getProtocolFeatures, name: name, timeout: timeoutMilliseconds)
                agreed = offered & Self.replyAcknowledgement
                try Self.send(socket, .setProtocolFeatures, payload: Self.u64(agreed), name: name)
            }
            try Self.send(socket, .setOwner, payload: [], flags: agreed & Self.replyAcknowledgement != 0 ? Flag.needReply : 0, name: name)
            if agreed & Self.replyAcknowledgement != 0 { try Self.acknowledgement(socket, .setOwner, name: name, timeout: timeoutMilliseconds) }
        } catch {
            close(socket)
            throw error
        }
        backendFeatures = features
        protocolFeatures = agreed
    }

    deinit { close(socket) }

    /// SET_FEATURES: what the driver accepted, with the protocol-features bit when it was offered
    /// (without it the back end would start every ring enabled and ignore SET_VRING_ENABLE).
    public func setFeatures(_ features: UInt64) throws(VirtioError) {
        try request(.setFeatures, payload: Self.u64(features | (backendFeatures & Self.protocolFeaturesBit)))
    }

    /// SET_MEM_TABLE: every region, each with its descriptor.
    public func setMemoryTable(_ regions: [MemoryRegion]) throws(VirtioError) {
        guard !regions.isEmpty, regions.count <= Self.maximumRegions else {
            throw .backend("\(name): \(regions.count) memory regions; vhost-user carries 1 to \(Self.maximumRegions)")
        }
        var payload = Self.u32(UInt32(regions.count)) + Self.u32(0)
        for region in regions {
            payload += Self.u64(region.guestAddress) + Self.u64(region.size) + Self.u64(region.userAddress) + Self.u64(region.offset)
        }
        try request(.setMemoryTable, payload: payload, descriptors: regions.map(\.descriptor))
    }

    /// Where a ring lies, in this process's addresses, and its size.
    public struct Vring: Sendable, Equatable {
        public var index: UInt32
        public var size: UInt32
        public var descriptorTable: UInt64
        public var availableRing: UInt64
        public var usedRing: UInt64

        public init(index: UInt32, size: UInt32, descriptorTable: UInt64, availableRing: UInt64, usedRing: UInt64) {
            self.index = index; self.size = size; self.descriptorTable = descriptorTable
            self.availableRing = availableRing; self.usedRing = usedRing
        }
    }

    /// Gives the back end a ring to serve from its start (index 0, as after a driver's setup):
    /// size, base, addresses, then the call and kick eventfds (the kick starts it), then enables
    /// it when rings start disabled (protocol features negotiated).
    public func startVring(_ ring: Vring, kick: Int32, call: Int32) throws(VirtioError) {
        try request(.setVringNum, payload: Self.u32(ring.index) + Self.u32(ring.size))
        try request(.setVringBase, payload: Self.u32(ring.index) + Self.u32(0))
        try request(.setVringAddress, payload: Self.u32(ring.index) + Self.u32(0) + Self.u64(ring.descriptorTable)
                    + Self.u64(ring.usedRing) + Self.u64(ring.availableRing) + Self.u64(0))
        try request(.setVringCall, payload: Self.u64(UInt64(ring.index)), descriptors: [call])
        try request(.setVringKick, payload: Self.u64(UInt64(ring.index)), descriptors: [kick])
        if backendFeatures & Self.protocolFeaturesBit != 0 {
            try request(.setVringEnable, payload: Self.u32(ring.index) + Self.u32(1))
        }
    }

    /// GET_VRING_BASE: stops the back end's work on ring `index` and returns its next available
    /// index (a driver reset: the back end must let go of the old rings before new ones come).
    @discardableResult
    public func stopVring(_ index: UInt32) throws(VirtioError) -> UInt32 {
        try withExchange { () throws(VirtioError) -> UInt32 in
            try Self.send(socket, .getVringBase, payload: Self.u32(index) + Self.u32(0), name: name)
            let reply = try Self.reply(socket, .getVringBase, size: 8, name: name, timeout: timeoutMilliseconds)
            let answered = Self.readU32(reply, at: 0)
            guard answered == index else { throw .backend("\(name): GET_VRING_BASE for ring \(index) was answered for ring \(answered)") }
            return Self.readU32(reply, at: 4)
        }
    }

    /// The connection's failure, once it has one (for logs and `vireo info`).
    public var failure: String? { broken.withLock { $0 } }

    // MARK: the exchange

    private func request(_ kind: Request, payload: [UInt8], descriptors: [Int32] = []) throws(VirtioError) {
        let acknowledged = protocolFeatures & Self.replyAcknowledgement != 0
        try withExchange { () throws(VirtioError) in
            try Self.send(socket, kind, payload: payload, flags: acknowledged ? Flag.needReply : 0, descriptors: descriptors, name: name)
            if acknowledged { try Self.acknowledgement(socket, kind, name: name, timeout: timeoutMilliseconds) }
        }
    }

    private func withExchange<T>(_ body: () throws(VirtioError) -> T) throws(VirtioError) -> T {
        if let reason = broken.withLock({ $0 }) { throw .backend(reason) }
        return try exchange.withLock { (_) throws(VirtioError) -> T in
            do throws(VirtioError) {
                return try body()
            } catch {
                broken.withLock { $0 = $0 ?? error.description }
                throw error
            }
        }
    }

    private static func exchangeU64(_ socket: Int32, _ kind: Request, name: String, timeout: Int32) throws(VirtioError) -> UInt64 {
        try send(socket, kind, payload: [], name: name)
        return readU64(try reply(socket, kind, size: 8, name: name, timeout: timeout), at: 0)
    }

    private static func acknowledgement(_ socket: Int32, _ kind: Request, name: String, timeout: Int32) throws(VirtioError) {
        let status = readU64(try reply(socket, kind, size: 8, name: name, timeout: timeout), at: 0)
        guard status == 0 else { throw .backend("\(name): the back end refused \(kind) (status \(status))") }
    }

    private static func send(_ socket: Int32, _ kind: Request, payload: [UInt8], flags: UInt32 = 0, descriptors: [Int32] = [],
                             name: String) throws(VirtioError) {
        let message = u32(kind.rawValue) + u32(Flag.version | flags) + u32(UInt32(payload.count)) + payload
        let sent = message.withUnsafeBytes { bytes in
            descriptors.withUnsafeBufferPointer { fds in
                vireo_send_with_descriptors(socket, bytes.baseAddress, bytes.count, fds.baseAddress, Int32(fds.count))
            }
        }
        guard sent == message.count else {
            let reason = sent < 0 ? String(cString: strerror(Int32(-sent))) : "\(sent) of \(message.count) bytes went"
            throw .backend("\(name): cannot send \(kind) to the back end: \(reason)")
        }
    }

    /// The reply to `kind`: its header checked (this request, the reply flag, the size it has).
    private static func reply(_ socket: Int32, _ kind: Request, size: Int, name: String, timeout: Int32) throws(VirtioError) -> [UInt8] {
        let header = try receive(socket, count: 12, kind: kind, name: name, timeout: timeout)
        let answered = readU32(header, at: 0), flags = readU32(header, at: 4), length = readU32(header, at: 8)
        guard answered == kind.rawValue, flags & 0x3 == Flag.version, flags & Flag.reply != 0 else {
            throw .backend("\(name): the back end answered \(kind) with request \(answered), flags 0x\(String(flags, radix: 16))")
        }
        guard Int(length) == size else {
            throw .backend("\(name): the back end's reply to \(kind) has \(length) bytes where it has \(size)")
        }
        return try receive(socket, count: size, kind: kind, name: name, timeout: timeout)
    }

    private static func receive(_ socket: Int32, count: Int, kind: Request, name: String, timeout: Int32) throws(VirtioError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var filled = 0
        var waited: Int32 = 0
        while filled < count {
            var descriptor = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, 100)
            if ready < 0 && errno != EINTR { throw .backend("\(name): waiting for the reply to \(kind): \(String(cString: strerror(errno)))") }
            if ready <= 0 {
                waited += 100
                guard waited < timeout else { throw .backend("\(name): the back end did not answer \(kind) within \(timeout / 1000) s") }
                continue
            }
            let got = bytes.withUnsafeMutableBytes { buffer in
                recv(socket, buffer.baseAddress?.advanced(by: filled), count - filled, Int32(MSG_DONTWAIT))
            }
            if got < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                throw .backend("\(name): reading the reply to \(kind): \(String(cString: strerror(errno)))")
            }
            guard got > 0 else { throw .backend("\(name): the back end closed the connection before answering \(kind)") }
            filled += got
        }
        return bytes
    }

    static func u32(_ value: UInt32) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }
    static func u64(_ value: UInt64) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }
    static func readU32(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << (8 * UInt32($1)) }
    }
    static func readU64(_ bytes: [UInt8], at offset: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
    }

    /// Connects to the back end's Unix socket at `path`; the descriptor is the caller's.
    public static func connect(path: String) throws(VirtioError) -> Int32 {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard path.utf8.count < capacity else { throw .backend("\(path) is longer than a Unix socket path may be (\(capacity - 1) bytes)") }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in path.utf8.enumerated() { buffer[index] = byte }
        }
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .backend("socket: \(String(cString: strerror(errno)))") }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            let code = errno
            close(fd)
            throw .backend("cannot connect to the vhost-user back end at \(path): \(String(cString: strerror(code)))")
        }
        return fd
    }
}
