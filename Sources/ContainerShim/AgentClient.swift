import ContainerWire
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What the agent tells the shim about a process, delivered in the stream's order.
public protocol AgentEvents: AnyObject, Sendable {
    func output(handle: UInt32, kind: AgentFrameKind, bytes: [UInt8])
    func outputClosed(handle: UInt32, kind: AgentFrameKind)
    func exited(handle: UInt32, status: UInt32, oomKilled: Bool)
    func channelLost(reason: String)
}

/// The shim's end of the agent's channel: requests with replies, stdin, and one reader thread
/// that hands output and exits to `events` in the order the agent sent them.
public final class AgentClient: @unchecked Sendable {
    let fd: Int32
    private let lock = NSCondition()
    private let writeLock = NSLock()
    private var replies: [UInt32: AgentReply] = [:]
    private var nextRequest: UInt32 = 1
    private var lost: String?
    private var greeted = false
    weak var events: (any AgentEvents)?

    /// Connects to the agent's channel: the qemu engine's virtio-serial socket (`path`), or the
    /// kvm engine's vsock socket with Firecracker's `CONNECT <port>` handshake first.
    public init(path: String, vsockPort: UInt32?, events: any AgentEvents) throws(RPCError) {
        fd = try UnixSocket.connect(path)
        self.events = events
        if let vsockPort {
            let line = Array("CONNECT \(vsockPort)\n".utf8)
            _ = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            var answer: [UInt8] = []
            var byte: UInt8 = 0
            while answer.count < 64, read(fd, &byte, 1) == 1, byte != 10 { answer.append(byte) }
            guard String(decoding: answer, as: UTF8.self).hasPrefix("OK") else {
                close(fd)
                throw RPCError(.unavailable, "the VM's vsock refused port \(vsockPort): \(String(decoding: answer, as: UTF8.self))")
            }
        }
        Thread.detachNewThread { [self] in self.readLoop() }
    }

    deinit { close(fd) }

    func send(_ frame: AgentFrame) throws(RPCError) {
        writeLock.lock()
        defer { writeLock.unlock() }
        let bytes = frame.encoded
        var offset = 0
        while offset < bytes.count {
            let wrote = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if wrote < 0 && errno == EINTR { continue }
            guard wrote > 0 else { throw RPCError(.unavailable, "the sandbox VM's agent channel is closed: \(String(cString: strerror(errno)))") }
            offset += wrote
        }
    }

    /// Greets the agent until it answers: the VM is still booting while it does not.
    public func waitForAgent(timeoutSeconds: Double) throws(RPCError) {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        try send(AgentFrame(.hello, payload: [AgentFrame.protocolVersion]))
        lock.lock()
        defer { lock.unlock() }
        while !greeted {
            if let lost { throw RPCError(.unavailable, "the sandbox VM's agent channel closed while it booted: \(lost)") }
            guard lock.wait(until: deadline) || greeted else {
                throw RPCError(.deadlineExceeded, "the sandbox VM's agent did not answer within \(Int(timeoutSeconds)) s")
            }
        }
    }

    public func request(_ request: AgentRequest, timeoutSeconds: Double = 60) throws(RPCError) -> AgentReply {
        lock.lock()
        let id = nextRequest
        nextRequest += 1
        lock.unlock()
        try send(AgentFrame(.request, stream: id, payload: request.encoded))
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        lock.lock()
        defer { lock.unlock() }
        while replies[id] == nil {
            if let lost { throw RPCError(.unavailable, "the sandbox VM's agent is gone: \(lost)") }
            guard lock.wait(until: deadline) || replies[id] != nil else { throw RPCError(.deadlineExceeded, "the agent did not answer \(request.operation) within \(Int(timeoutSeconds)) s") }
        }
        let reply = replies.removeValue(forKey: id) ?? AgentReply()
        guard reply.error.isEmpty else { throw RPCError(.failedPrecondition, GuestText.printable(reply.error)) }
        return reply
    }

    public func stdin(handle: UInt32, bytes: [UInt8]) throws(RPCError) {
        var offset = 0
        while offset < bytes.count {
            let end = min(bytes.count, offset + 65536)
            try send(AgentFrame(.stdin, stream: handle, payload: Array(bytes[offset..<end])))
            offset = end
        }
    }

    private func readLoop() {
        var decoder = AgentFrameDecoder()
        var buffer = [UInt8](repeating: 0, count: 65536)
        var reason = "the agent closed its channel"
        reading: while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            decoder.append(buffer[0..<count])
            do {
                while let frame = try decoder.next() { deliver(frame) }
            } catch {
                reason = "the agent's stream is malformed: \(error)"
                break reading
            }
        }
        lock.lock()
        lost = reason
        lock.broadcast()
        lock.unlock()
        events?.channelLost(reason: reason)
    }

    private func deliver(_ frame: AgentFrame) {
        switch frame.kind {
        case .hello:
            lock.lock()
            greeted = true
            lock.broadcast()
            lock.unlock()
        case .reply:
            let reply = (try? AgentReply(decoding: frame.payload)) ?? AgentReply(error: "the agent's reply is malformed")
            lock.lock()
            replies[frame.stream] = reply
            lock.broadcast()
            lock.unlock()
        case .stdout, .stderr:
            events?.output(handle: frame.stream, kind: frame.kind, bytes: frame.payload)
        case .outputClosed:
            if let raw = frame.payload.first, let kind = AgentFrameKind(rawValue: raw) { events?.outputClosed(handle: frame.stream, kind: kind) }
        case .exit:
            if let exit = try? AgentExit(decoding: frame.payload) { events?.exited(handle: frame.stream, status: exit.status, oomKilled: exit.oomKilled) }
        case .log:
            ShimLog.write("agent: \(GuestText.printable(String(decoding: frame.payload, as: UTF8.self)))")
        case .request, .stdin:
            ShimLog.write("the agent sent a frame only the shim sends (\(frame.kind)); ignored")
        }
    }
}

/// Text the guest wrote (the agent's errors, the VM's console) on its way into an error
/// containerd shows on someone's terminal: control characters (escape sequences) become `?`,
/// and it is cut to `limit` characters.
enum GuestText {
    static func printable(_ text: String, limit: Int = 2000) -> String {
        String(String.UnicodeScalarView(text.unicodeScalars.prefix(limit).map { scalar in
            scalar == "\n" || (scalar.value >= 0x20 && scalar.value != 0x7f && !(0x80..<0xa0).contains(scalar.value)) ? scalar : "?"
        }))
    }
}

