import API
import ContainerWire
import Foundation
#if canImport(Glibc)
import Glibc
#endif

// ttrpc, containerd's RPC for shims: gRPC's messages without HTTP/2. Each frame is a 10-byte
// header (length u32be, stream id u32be, type u8, flags u8) and a protobuf payload; a Request
// names the service and method and carries the call's message, the Response carries a
// google.rpc.Status and the reply. A client numbers its streams with odd ids.
//
// Plain sockets and threads rather than SwiftNIO: containerd multiplexes calls on one
// connection and some (Wait) last as long as a container, so every call runs on its own thread
// and replies are written under the connection's lock; that is all the concurrency a shim has.

enum TTRPCFrameType: UInt8 { case request = 1, response = 2 }

/// gRPC status codes containerd maps to its errors (errdefs.FromGRPC).
public enum RPCCode: Int32, Sendable {
    case ok = 0, unknown = 2, invalidArgument = 3, deadlineExceeded = 4, notFound = 5, alreadyExists = 6,
         failedPrecondition = 9, unimplemented = 12, `internal` = 13, unavailable = 14
}

public struct RPCError: Error, CustomStringConvertible, Sendable {
    public var code: RPCCode
    public var message: String
    public init(_ code: RPCCode, _ message: String) { self.code = code; self.message = message }
    public var description: String { message }
}

struct TTRPCFrame {
    var stream: UInt32
    var type: UInt8
    var payload: [UInt8]
}

/// The frame layer on one connected socket.
final class TTRPCConnection: @unchecked Sendable {
    let fd: Int32
    private let writeLock = NSLock()
    static let maximumMessage = 4 << 20 // ttrpc's own limit

    init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    func readExactly(_ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var offset = 0
        while offset < count {
            let got = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + offset, count - offset) }
            if got < 0 && errno == EINTR { continue }
            guard got > 0 else { return nil }
            offset += got
        }
        return bytes
    }

    /// The next frame; nil when the peer closed the connection or broke the framing.
    func readFrame() -> TTRPCFrame? {
        guard let header = readExactly(10) else { return nil }
        let length = Int(header[0]) << 24 | Int(header[1]) << 16 | Int(header[2]) << 8 | Int(header[3])
        guard length <= Self.maximumMessage else { return nil }
        let stream = UInt32(header[4]) << 24 | UInt32(header[5]) << 16 | UInt32(header[6]) << 8 | UInt32(header[7])
        guard let payload = length == 0 ? [] : readExactly(length) else { return nil }
        return TTRPCFrame(stream: stream, type: header[8], payload: payload)
    }

    @discardableResult
    func writeFrame(stream: UInt32, type: TTRPCFrameType, payload: [UInt8]) -> Bool {
        let length = UInt32(payload.count)
        var bytes: [UInt8] = [UInt8(length >> 24), UInt8(length >> 16 & 0xff), UInt8(length >> 8 & 0xff), UInt8(length & 0xff),
                              UInt8(stream >> 24), UInt8(stream >> 16 & 0xff), UInt8(stream >> 8 & 0xff), UInt8(stream & 0xff), type.rawValue, 0]
        bytes += payload
        writeLock.lock()
        defer { writeLock.unlock() }
        var offset = 0
        while offset < bytes.count {
            let wrote = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if wrote < 0 && errno == EINTR { continue }
            guard wrote > 0 else { return false }
            offset += wrote
        }
        return true
    }
}

public typealias TTRPCHandler = @Sendable (_ method: String, _ payload: [UInt8]) throws(RPCError) -> [UInt8]

/// Serves one service on a listening Unix socket.
public final class TTRPCServer: @unchecked Sendable {
    let listener: Int32
    let service: String
    let handler: TTRPCHandler

    public init(listener: Int32, service: String, handler: @escaping TTRPCHandler) {
        self.listener = listener
        self.service = service
        self.handler = handler
    }

    /// Accepts connections until the process ends.
    public func serve() -> Never {
        while true {
            let fd = accept(listener, nil, nil)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                ShimLog.write("accept: \(String(cString: strerror(errno)))")
                sleep(1)
                continue
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            let connection = TTRPCConnection(fd: fd)
            Thread.detachNewThread { [self] in self.read(connection) }
        }
    }

    func read(_ connection: TTRPCConnection) {
        while let frame = connection.readFrame() {
            guard frame.type == TTRPCFrameType.request.rawValue else { continue }
            Thread.detachNewThread { [self] in
                let response = self.answer(frame.payload)
                connection.writeFrame(stream: frame.stream, type: .response, payload: response)
            }
        }
    }

    func answer(_ payload: [UInt8]) -> [UInt8] {
        var status = ProtoWriter()
        var response = ProtoWriter()
        do {
            let request = try ProtoMessage(payload)
            let requestedService = request.string(1), method = request.string(2)
            guard requestedService == service else { throw RPCError(.unimplemented, "service \(requestedService) is not served here") }
            let reply = try handler(method, request.bytes(3))
            response.message(1, status)
            response.bytes(2, reply, always: true)
        } catch let error as RPCError {
            status.int32(1, error.code.rawValue)
            status.string(2, error.message)
            response.message(1, status)
        } catch {
            status.int32(1, RPCCode.invalidArgument.rawValue)
            status.string(2, "malformed request: \(error)")
            response.message(1, status)
        }
        return response.bytes
    }
}

/// Calls one method on a ttrpc server (containerd's events service).
public final class TTRPCClient: @unchecked Sendable {
    let connection: TTRPCConnection
    private let lock = NSLock()
    private var nextStream: UInt32 = 1

    public init(path: String) throws(RPCError) {
        let fd = try UnixSocket.connect(path)
        connection = TTRPCConnection(fd: fd)
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    public func call(service: String, method: String, payload: [UInt8]) throws(RPCError) -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        let stream = nextStream
        nextStream += 2
        var request = ProtoWriter()
        request.string(1, service)
        request.string(2, method)
        request.bytes(3, payload, always: true)
        guard connection.writeFrame(stream: stream, type: .request, payload: request.bytes) else { throw RPCError(.unavailable, "\(service) closed the connection") }
        while true {
            guard let frame = connection.readFrame() else { throw RPCError(.unavailable, "\(service) did not answer") }
            guard frame.stream == stream, frame.type == TTRPCFrameType.response.rawValue else { continue }
            let response: ProtoMessage
            do { response = try ProtoMessage(frame.payload) } catch { throw RPCError(.internal, "\(service)'s answer is malformed: \(error)") }
            if let status = try? response.message(1), status.int32(1) != 0 {
                throw RPCError(RPCCode(rawValue: status.int32(1)) ?? .unknown, status.string(2))
            }
            return response.bytes(2)
        }
    }
}

enum UnixSocket {
    static func address(_ path: String) throws(RPCError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw RPCError(.invalidArgument, "socket path \(path) is too long") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index] = byte }
        }
        return address
    }

    /// The control client's connect (API), its reads without a time limit.
    static func connect(_ path: String) throws(RPCError) -> Int32 {
        do { return try ControlConnection.connectUnix(path: path, timeoutSeconds: 0) } catch {
            guard case let .unreachable(_, code) = error else { throw RPCError(.unavailable, "connect to \(path): \(error)") }
            throw RPCError(.unavailable, "connect to \(path): \(String(cString: strerror(code)))")
        }
    }

    static func listen(_ path: String) throws(RPCError) -> Int32 {
        var address = try address(path)
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw RPCError(.internal, "socket: \(String(cString: strerror(errno)))") }
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard bound == 0, Glibc.listen(fd, 16) == 0 else {
            let code = errno
            close(fd)
            throw RPCError(.internal, "listen on \(path): \(String(cString: strerror(code)))")
        }
        chmod(path, 0o600)
        return fd
    }
}

/// The shim's log: a file in the bundle (containerd shows the shim's stderr only while it starts).
public enum ShimLog {
    nonisolated(unsafe) static var fd: Int32 = 2
    static let lock = NSLock()

    public static func open(_ path: String) {
        let opened = Glibc.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        if opened >= 0 { fd = opened }
    }

    public static func write(_ text: String) {
        lock.lock()
        defer { lock.unlock() }
        let line = Array("\(Date()) \(text)\n".utf8)
        _ = line.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    }
}
