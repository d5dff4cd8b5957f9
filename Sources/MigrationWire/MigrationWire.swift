import CZlib
#if canImport(Glibc)
import Glibc
#endif

/// The live-migration stream (docs/migration.md): framed messages over one TCP connection,
///
///     u32 kind   u32 CRC-32 of the payload   u64 payload length   payload
///
/// little-endian. The sender never trusts the receiver and the receiver never trusts the sender:
/// every length is checked against a limit before anything is allocated, every checksum before a
/// payload is used, and the payload's own fields where it is decoded.
public enum MigrationWire {
    public static let magic = Array("VIREOMIG".utf8)
    /// Bumped whenever a message changes; a peer speaking another version is refused, both named.
    public static let version: UInt32 = 3
    public static let headerSize = 16
    /// The largest payload either side accepts (a run of pages is at most 1 MiB and 8 bytes).
    public static let payloadLimit = 16 << 20
    /// The port `vireo receive` listens on when given none (libvirt's first migration port).
    public static let defaultPort: UInt16 = 49152

    public enum Kind: UInt32, Sendable, CustomStringConvertible {
        /// source CLI → receiver: magic, version, token
        case hello = 1
        /// receiver → source CLI: the token was right
        case accept = 2
        /// either way: UTF-8 reason; the connection ends
        case refuse = 3
        /// source CLI → receiver: JSON describing the VM (definition, disks)
        case offer = 4
        /// source CLI → receiver: u8 file index, then a chunk; an empty chunk ends the file
        case file = 5
        /// receiver → source CLI: the VM is defined here and its VMM is starting
        case prepared = 6
        /// source VMM → destination VMM: the machine's shape and the migration's options
        case machine = 16
        /// u64 guest-physical address, then whole 4 KiB pages
        case pages = 17
        /// u64 guest-physical address, u64 page count: pages that now read as zeros
        case zeroPages = 18
        /// u32 disk index, u64 byte offset, then the data
        case diskData = 19
        /// u32 disk index, u64 byte offset, u64 length: a range that now reads as zeros
        case diskZeroes = 20
        /// the machine's state (the saved-state metadata), then u8 flags
        case state = 21
        /// u64 pages sent, u64 disk bytes sent: the receiver checks its own counts
        case end = 22
        /// destination → source: its vCPUs run; the source may stop
        case running = 23
        /// destination → source: UTF-8 reason it could not take the VM; the source runs on
        case failed = 24
        /// source VMM → destination VMM, before the switch-over: say `synced` once everything
        /// sent before this is in place
        case sync = 25
        /// destination VMM → source VMM: everything before the `sync` is in place
        case synced = 26

        public var description: String {
            switch self {
            case .hello: "hello"
            case .accept: "accept"
            case .refuse: "refuse"
            case .offer: "offer"
            case .file: "file"
            case .prepared: "prepared"
            case .machine: "machine"
            case .pages: "pages"
            case .zeroPages: "zero-pages"
            case .diskData: "disk-data"
            case .diskZeroes: "disk-zeroes"
            case .state: "state"
            case .end: "end"
            case .running: "running"
            case .failed: "failed"
            case .sync: "sync"
            case .synced: "synced"
            }
        }
    }

    public struct Message: Sendable {
        public var kind: Kind
        public var payload: [UInt8]
        public init(kind: Kind, payload: [UInt8]) { self.kind = kind; self.payload = payload }
        public var text: String { String(decoding: payload, as: UTF8.self) }
    }

    /// The first message of a migration: magic, version, the receiver's one-time token.
    public static func hello(token: String) -> [UInt8] {
        var bytes = magic
        appendLittleEndian(version, to: &bytes)
        bytes += Array(token.utf8)
        return bytes
    }

    /// The token in a hello, or why it is not a hello this receiver speaks.
    public static func token(inHello payload: [UInt8]) -> Result<String, MigrationError> {
        guard payload.count >= 12, Array(payload[0..<8]) == magic else {
            return .failure(.protocolViolation("the peer is not a Vireo migration source (bad magic)"))
        }
        let peerVersion = UInt32(payload[8]) | UInt32(payload[9]) << 8 | UInt32(payload[10]) << 16 | UInt32(payload[11]) << 24
        guard peerVersion == version else {
            return .failure(.protocolViolation("the source speaks migration stream version \(peerVersion), this receiver version \(version); use the same Vireo release on both hosts"))
        }
        guard payload.count - 12 <= 128 else { return .failure(.protocolViolation("token longer than 128 bytes")) }
        return .success(String(decoding: payload[12...], as: UTF8.self))
    }

    /// A whole frame (header and payload), for tests and seeds.
    public static func encodeFrame(_ kind: Kind, _ payload: [UInt8]) -> [UInt8] {
        var bytes: [UInt8] = []
        appendLittleEndian(kind.rawValue, to: &bytes)
        appendLittleEndian(checksum(payload), to: &bytes)
        appendLittleEndian(UInt64(payload.count), to: &bytes)
        return bytes + payload
    }

    /// The frame at `offset` in `bytes`, checked as `MigrationChannel.receive` checks one, and
    /// `offset` moved past it; nil when the rest is not a whole, valid frame.
    public static func frame(in bytes: [UInt8], at offset: inout Int, limit: Int = payloadLimit) -> Message? {
        guard bytes.count - offset >= headerSize else { return nil }
        let header = Array(bytes[offset..<offset + headerSize])
        guard case let .success((kind, crc, length)) = decodeHeader(header, limit: limit), UInt64(bytes.count - offset - headerSize) >= length else { return nil }
        let payload = Array(bytes[(offset + headerSize)..<(offset + headerSize + Int(length))])
        guard checksum(payload) == crc else { return nil }
        offset += headerSize + Int(length)
        return Message(kind: kind, payload: payload)
    }

    static func checksum(_ payload: [UInt8]) -> UInt32 {
        UInt32(truncatingIfNeeded: payload.withUnsafeBytes { vireo_crc32(0, $0.baseAddress, $0.count) })
    }

    /// A header's kind, checksum and length, or why it is refused.
    static func decodeHeader(_ header: [UInt8], limit: Int) -> Result<(Kind, UInt32, UInt64), MigrationError> {
        let raw = header.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 0, as: UInt32.self) }.littleEndian
        let crc = header.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self) }.littleEndian
        let length = header.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self) }.littleEndian
        guard let kind = Kind(rawValue: raw) else { return .failure(.protocolViolation("unknown message kind \(raw)")) }
        guard length <= UInt64(limit) else { return .failure(.protocolViolation("a \(kind) message of \(length) bytes, more than the \(limit) allowed")) }
        return .success((kind, crc, length))
    }

    public static func appendLittleEndian<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { bytes += $0 }
    }

    /// Compares without an early exit, so the time taken says nothing about a guessed token.
    public static func tokensMatch(_ a: String, _ b: String) -> Bool {
        let left = Array(a.utf8), right = Array(b.utf8)
        var difference = UInt8(left.count == right.count ? 0 : 1)
        for index in 0..<max(left.count, right.count) {
            difference |= (index < left.count ? left[index] : 0) ^ (index < right.count ? right[index] : 0)
        }
        return difference == 0
    }
}

public enum MigrationError: Error, Sendable, CustomStringConvertible, Equatable {
    /// A system call on the connection failed.
    case io(operation: String, errno: Int32)
    /// The peer closed the connection.
    case closed
    /// The peer sent something this side does not accept.
    case protocolViolation(String)
    /// The peer refused, saying why.
    case refused(String)
    /// The user cancelled.
    case cancelled

    public var description: String {
        switch self {
        case let .io(operation, code): "\(operation): \(String(cString: strerror(code)))"
        case .closed: "the peer closed the connection"
        case let .protocolViolation(reason): "malformed migration stream: \(reason)"
        case let .refused(reason): reason
        case .cancelled: "cancelled"
        }
    }
}

/// One end of a migration connection. Sends and receives are blocking and meant for one thread
/// each way; the byte counts are for progress reports.
public final class MigrationChannel: @unchecked Sendable {
    public let fd: Int32
    public private(set) var bytesSent: UInt64 = 0
    public private(set) var bytesReceived: UInt64 = 0

    /// When set (CLOCK_MONOTONIC nanoseconds), a message that has not fully arrived by then is
    /// an error, however the peer paces its bytes: a peer trickling a byte at a time cannot hold
    /// a receiver that serves one connection at a time.
    public var deadline: UInt64?

    /// On TCP, each message leaves when it is written (TCP_NODELAY): the switch-over's last small
    /// messages must not wait behind Nagle's algorithm for the peer's delayed acknowledgement
    /// (40 ms on Linux, inside the guest's pause). Pages go in large writes either way.
    public init(fd: Int32) {
        self.fd = fd
        var on: Int32 = 1
        // Not TCP (a socketpair, a Unix socket): nothing to change, and nothing wrong.
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size))
    }

    public static func monotonicNanoseconds() -> UInt64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
    }

    /// Sends one message whose payload is the concatenation of `parts` (no copy is made of them).
    public func send(_ kind: MigrationWire.Kind, parts: [UnsafeRawBufferPointer]) throws(MigrationError) {
        var crc: UInt = 0
        var length = 0
        for part in parts where !part.isEmpty {
            crc = vireo_crc32(crc, part.baseAddress, part.count)
            length += part.count
        }
        var header: [UInt8] = []
        header.reserveCapacity(MigrationWire.headerSize)
        MigrationWire.appendLittleEndian(kind.rawValue, to: &header)
        MigrationWire.appendLittleEndian(UInt32(truncatingIfNeeded: crc), to: &header)
        MigrationWire.appendLittleEndian(UInt64(length), to: &header)
        try header.withUnsafeBytes { head in Result { () throws(MigrationError) in
            try writeAll([head] + parts)
        } }.get()
        bytesSent += UInt64(MigrationWire.headerSize + length)
    }

    public func send(_ kind: MigrationWire.Kind, _ payload: [UInt8] = []) throws(MigrationError) {
        try payload.withUnsafeBytes { bytes in Result { () throws(MigrationError) in try send(kind, parts: [bytes]) } }.get()
    }

    public func send(_ kind: MigrationWire.Kind, text: String) throws(MigrationError) {
        try send(kind, Array(text.utf8))
    }

    private func writeAll(_ parts: [UnsafeRawBufferPointer]) throws(MigrationError) {
        var vectors = parts.filter { !$0.isEmpty }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var first = 0
        while first < vectors.count {
            // sendmsg, not writev: a peer that went away must be an error here, never SIGPIPE.
            let count = vectors[first...].withUnsafeMutableBufferPointer { parts -> Int in
                var message = msghdr()
                message.msg_iov = parts.baseAddress
                message.msg_iovlen = parts.count
                return sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
            }
            if count < 0 {
                if errno == EINTR { continue }
                throw errno == EPIPE || errno == ECONNRESET ? .closed : .io(operation: "send", errno: errno)
            }
            var left = count
            while first < vectors.count && left >= vectors[first].iov_len {
                left -= vectors[first].iov_len
                first += 1
            }
            if left > 0 {
                vectors[first].iov_base = vectors[first].iov_base.map { $0 + left }
                vectors[first].iov_len -= left
            }
        }
    }

    /// Receives the next message, refusing one longer than `limit` or with a bad checksum.
    public func receive(limit: Int = MigrationWire.payloadLimit) throws(MigrationError) -> MigrationWire.Message {
        var header = [UInt8](repeating: 0, count: MigrationWire.headerSize)
        try header.withUnsafeMutableBytes { buffer in Result { () throws(MigrationError) in try readExactly(buffer) } }.get()
        let (kind, crc, length) = try MigrationWire.decodeHeader(header, limit: limit).get()
        var payload = [UInt8](repeating: 0, count: Int(length))
        try payload.withUnsafeMutableBytes { buffer in Result { () throws(MigrationError) in try readExactly(buffer) } }.get()
        guard MigrationWire.checksum(payload) == crc else { throw .protocolViolation("a \(kind) message failed its checksum") }
        bytesReceived += UInt64(MigrationWire.headerSize) + length
        return MigrationWire.Message(kind: kind, payload: payload)
    }

    /// After a refusal: stops sending and reads (discarding) what the peer still sends until it
    /// closes, for at most `seconds`. Closing at once, with the peer's bytes unread, would reset
    /// the connection, and a peer still sending its files would see the reset, not the reason.
    public func drainUntilClosed(seconds: Int) {
        shutdown(fd, Int32(SHUT_WR))
        let end = Self.monotonicNanoseconds() + UInt64(seconds) * 1_000_000_000
        var scratch = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let now = Self.monotonicNanoseconds()
            guard now < end, waitReadable(milliseconds: Int32(min((end - now) / 1_000_000 + 1, 1000))) else {
                if Self.monotonicNanoseconds() < end { continue }
                return
            }
            let count = scratch.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { return }
        }
    }

    /// Waits up to `milliseconds` for something to read; false on time-out.
    public func waitReadable(milliseconds: Int32) -> Bool {
        var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let ready = poll(&descriptor, 1, milliseconds)
            if ready < 0 && errno == EINTR { continue }
            return ready > 0
        }
    }

    private func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws(MigrationError) {
        var done = 0
        while done < buffer.count {
            if let deadline {
                var readable = false
                while !readable {
                    let now = Self.monotonicNanoseconds()
                    guard now < deadline else { throw .io(operation: "receive (no whole message in the time allowed)", errno: ETIMEDOUT) }
                    readable = waitReadable(milliseconds: Int32(min((deadline - now) / 1_000_000 + 1, 10_000)))
                }
            }
            let count = recv(fd, buffer.baseAddress.map { $0 + done }, buffer.count - done, 0)
            if count < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { throw .io(operation: "receive (timed out)", errno: errno) }
                throw errno == ECONNRESET ? .closed : .io(operation: "receive", errno: errno)
            }
            if count == 0 { throw .closed }
            done += count
        }
    }
}

/// Little-endian fields out of a received payload, every read bounds-checked.
public struct PayloadReader {
    let bytes: [UInt8]
    public private(set) var offset = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - offset }

    public mutating func get<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws(MigrationError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw .protocolViolation("\(field) is cut short") }
        let value = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: T.self) }
        offset += size
        return T(littleEndian: value)
    }

    public mutating func rest() -> ArraySlice<UInt8> {
        defer { offset = bytes.count }
        return bytes[offset...]
    }
}
