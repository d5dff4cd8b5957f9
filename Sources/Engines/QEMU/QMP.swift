import API
import CHostSupport
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A QMP client (QEMU's JSON control protocol, docs/interop/qmp-spec): one connection to the
/// socket in the VM's directory, capabilities negotiated, then one command at a time. Events
/// QEMU sends in between are skipped. The guest agent (qemu-guest-agent, QGA) speaks the same
/// JSON lines on its virtio-serial port, without a greeting; its connection is synchronised with
/// `guest-sync-delimited` instead, since an earlier client may have left a reply unread.
final class QMPConnection {
    enum Peer { case qemu, guestAgent }

    enum Failure: Error, CustomStringConvertible {
        case unreachable(ControlError)
        /// The peer answered with an error: its class ("GenericError", "DeviceNotFound"), text,
        /// and who it was (QEMU or the guest agent).
        case refused(errorClass: String, description: String, by: String = "QEMU")
        case protocolError(String)

        var description: String {
            switch self {
            case let .unreachable(error): return error.description
            case let .refused(errorClass, description, peer): return "\(peer) refused: \(description) (\(errorClass))"
            case let .protocolError(reason): return "unexpected QMP traffic: \(reason)"
            }
        }
    }

    struct Empty: Codable {}
    private struct Request<Arguments: Encodable>: Encodable {
        var execute: String
        var arguments: Arguments?
    }
    private struct ErrorBody: Decodable { var `class`: String; var desc: String }
    private struct Envelope<Reply: Decodable>: Decodable {
        var `return`: Reply?
        var error: ErrorBody?
        var event: String?
        var QMP: Empty?
    }

    let fd: Int32
    let peer: Peer
    private var pending: [UInt8] = []

    init(path: String, timeoutSeconds: Int = 10, peer: Peer = .qemu) throws(Failure) {
        self.peer = peer
        do { fd = try ControlConnection.connectUnix(path: path, timeoutSeconds: timeoutSeconds) } catch { throw .unreachable(error) }
        do throws(Failure) {
            if peer == .guestAgent {
                try synchronise()
            } else {
                let greeting = try readLine()
                guard String(decoding: greeting, as: UTF8.self).contains("\"QMP\"") else {
                    throw Failure.protocolError("no QMP greeting: \(String(decoding: greeting.prefix(120), as: UTF8.self))")
                }
                _ = try execute("qmp_capabilities", as: Empty.self)
            }
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    /// QGA's resynchronisation: the reply to `guest-sync-delimited` follows a 0xFF byte, and
    /// carries back the random id sent; everything before it is stale.
    private func synchronise() throws(Failure) {
        struct Sync: Encodable { var id: Int }
        let id = Int.random(in: 1...Int(Int32.max))
        guard let line = try? JSONEncoder().encode(Request(execute: "guest-sync-delimited", arguments: Sync(id: id))) else {
            throw .protocolError("cannot encode guest-sync-delimited")
        }
        let bytes = [0xff] + Array(line) + [0x0a]
        guard bytes.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == bytes.count else {
            throw .protocolError("the guest agent's channel closed")
        }
        while true {
            let reply = try readLine()
            guard let marker = reply.lastIndex(of: 0xff) else { continue }
            let envelope = try? JSONDecoder().decode(Envelope<Int>.self, from: Data(reply[(marker + 1)...]))
            if envelope?.return == id { return }
        }
    }

    func execute<Reply: Decodable>(_ command: String, as type: Reply.Type = Empty.self) throws(Failure) -> Reply {
        try execute(command, arguments: Optional<Empty>.none, as: type)
    }

    /// With `passing`, the descriptor goes along with the command (SCM_RIGHTS), as `getfd` wants.
    func execute<Arguments: Encodable, Reply: Decodable>(_ command: String, arguments: Arguments?,
                                                         as type: Reply.Type = Empty.self, passing descriptor: Int32? = nil) throws(Failure) -> Reply {
        let line: Data
        do { line = try JSONEncoder().encode(Request(execute: command, arguments: arguments)) } catch {
            throw .protocolError("cannot encode \(command): \(error)")
        }
        var bytes = Array(line) + [0x0a]
        let sent = bytes.withUnsafeMutableBytes { raw -> Int in
            if let descriptor { return vireo_send_with_descriptor(fd, raw.baseAddress, raw.count, descriptor) }
            return send(fd, raw.baseAddress, raw.count, Int32(MSG_NOSIGNAL))
        }
        guard sent == bytes.count else { throw .protocolError("QEMU closed the connection") }
        while true {
            let reply = try readLine()
            let envelope: Envelope<Reply>
            do { envelope = try JSONDecoder().decode(Envelope<Reply>.self, from: Data(reply)) } catch {
                throw .protocolError("\(command): \(String(decoding: reply.prefix(200), as: UTF8.self)) (\(error))")
            }
            if envelope.event != nil { continue }
            if let error = envelope.error { throw .refused(errorClass: error.class, description: error.desc, by: peer == .guestAgent ? "the guest agent" : "QEMU") }
            if let value = envelope.return { return value }
            throw .protocolError("\(command): a reply without a result")
        }
    }

    private func readLine() throws(Failure) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: 65536)
        // Only bytes not yet searched are searched: a guest agent's file block is a 1.4 MB line.
        var searched = 0
        while true {
            if let newline = pending[searched...].firstIndex(of: 0x0a) {
                let line = Array(pending[..<newline])
                pending.removeSubrange(...newline)
                return line
            }
            searched = pending.count
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { throw .protocolError(count == 0 ? "the peer closed the connection" : "no reply in time") }
            pending += buffer[0..<count]
            guard pending.count < 4 << 20 else { throw .protocolError("reply too long") }
        }
    }
}

/// The QMP replies the engine reads.
enum QMPReplies {
    struct Status: Decodable { var status: String; var running: Bool }
    struct KVM: Decodable { var enabled: Bool; var present: Bool }
    struct Balloon: Decodable { var actual: UInt64 }
    struct Transaction: Encodable { var actions: [TransactionAction] }
    struct TransactionAction: Encodable {
        struct Snapshot: Encodable {
            var device: String
            var snapshotFile: String
            var format: String
            var mode: String
            enum CodingKeys: String, CodingKey { case device, snapshotFile = "snapshot-file", format, mode }
        }
        var type: String
        var data: Snapshot
    }
    struct Migration: Decodable {
        var status: String?
        var errorDescription: String?
        enum CodingKeys: String, CodingKey { case status, errorDescription = "error-desc" }
    }
    struct BlockStats: Decodable {
        struct Stats: Decodable {
            var rd_bytes: UInt64
            var wr_bytes: UInt64
            var rd_operations: UInt64
            var wr_operations: UInt64
        }
        var device: String?
        var stats: Stats
    }
}
