import Hummingbird
import Library
import HummingbirdWebSocket
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// A detached OS thread for a blocking read loop (a console's socket): such loops last as long
/// as a browser watches, so they must not hold a thread of NIO's small blocking pool.
func spawnReaderThread(_ work: @escaping @Sendable () -> Void) -> Bool {
    final class Body { let work: @Sendable () -> Void; init(_ work: @escaping @Sendable () -> Void) { self.work = work } }
    let body = Unmanaged.passRetained(Body(work)).toOpaque()
    var handle = pthread_t()
    let result = pthread_create(&handle, nil, { argument in
        guard let argument else { return nil }
        Unmanaged<Body>.fromOpaque(argument).takeRetainedValue().work()
        return nil
    }, body)
    guard result == 0 else { Unmanaged<Body>.fromOpaque(body).release(); return false }
    pthread_detach(handle)
    return true
}

/// Keeps a non-Sendable owner of a descriptor (a console stream) alive across tasks; only its
/// descriptor is used, from one reader thread and one writer at a time.
final class DescriptorOwner: @unchecked Sendable {
    let fd: Int32
    private let owner: AnyObject?
    init(fd: Int32, owner: AnyObject?) { self.fd = fd; self.owner = owner }
}

/// Joins a WebSocket to a stream socket (a serial console, a VNC server): bytes from the socket
/// go out as binary frames, frames in (text or binary) are written to the socket. Ends when
/// either side closes; the socket is shut down so the reader thread wakes and ends too.
func bridge(_ descriptor: DescriptorOwner, first: [UInt8], inbound: WebSocketInboundStream, outbound: WebSocketOutboundWriter) async throws {
    let (chunks, continuation) = AsyncStream<[UInt8]>.makeStream(bufferingPolicy: .bufferingNewest(256))
    let fd = descriptor.fd
    guard spawnReaderThread({
        var buffer = [UInt8](repeating: 0, count: 16384)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            if count <= 0 { break }
            continuation.yield(Array(buffer[0..<count]))
        }
        continuation.finish()
    }) else { throw APIProblem(.internalServerError, kind: "host", detail: "could not start a console reader thread") }
    defer { shutdown(fd, Int32(SHUT_RDWR)) }
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask {
            if !first.isEmpty { try await outbound.write(.binary(ByteBuffer(bytes: first))) }
            for await chunk in chunks { try await outbound.write(.binary(ByteBuffer(bytes: chunk))) }
            // The socket ended (the VM stopped): close the WebSocket so the page says so.
            try await outbound.close(.normalClosure, reason: "the console ended")
        }
        group.addTask {
            for try await message in inbound.messages(maxSize: 1 << 20) {
                let bytes: [UInt8]
                switch message {
                case let .text(text): bytes = Array(text.utf8)
                case let .binary(buffer): bytes = Array(buffer.readableBytesView)
                }
                try await blockingWrite(descriptor, bytes)
            }
        }
        // Whichever side ends first ends the session.
        _ = try await group.next()
        shutdown(fd, Int32(SHUT_RDWR))
        group.cancelAll()
    }
}

private func blockingWrite(_ descriptor: DescriptorOwner, _ bytes: [UInt8]) async throws {
    _ = try await blocking { () throws(Library.LibraryError) -> Bool in
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { write(descriptor.fd, $0.baseAddress.map { $0 + offset }, bytes.count - offset) }
            if written < 0 { if errno == EINTR { continue }; return false }
            offset += written
        }
        return true
    }
}
