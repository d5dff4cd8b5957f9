import Foundation
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A small HTTP/1.1 client over a TCP or Unix socket, enough to test `vireo serve` end to end:
/// plain requests, a Server-Sent Events stream and a WebSocket, each on its own connection.
struct APIClient: Sendable {
    enum Address: Sendable { case tcp(port: UInt16), unix(path: String) }
    let address: Address
    let token: String?

    struct Reply {
        let status: Int
        let headers: [String: String]
        let body: Data
        var text: String { String(decoding: body, as: UTF8.self) }
        var json: Any? { try? JSONSerialization.jsonObject(with: body) }
        var object: [String: Any] { (json as? [String: Any]) ?? [:] }
        var array: [[String: Any]] { (json as? [[String: Any]]) ?? [] }
    }

    func connect() throws -> Int32 {
        switch address {
        case let .tcp(port):
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let result = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            guard result == 0 else { close(fd); throw HarnessError("connect 127.0.0.1:\(port): errno \(errno)") }
            return fd
        case let .unix(path):
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
            let result = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            guard result == 0 else { close(fd); throw HarnessError("connect \(path): errno \(errno)") }
            return fd
        }
    }

    static func send(_ fd: Int32, _ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, bytes.count - offset) }
            if written <= 0 { return }
            offset += written
        }
    }

    func head(_ method: String, _ path: String, extra: [String: String] = [:], bodyLength: Int?) -> String {
        var lines = ["\(method) \(path) HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        if let token { lines.append("Authorization: Bearer \(token)") }
        for (key, value) in extra.sorted(by: { $0.key < $1.key }) { lines.append("\(key): \(value)") }
        if let bodyLength { lines.append("Content-Length: \(bodyLength)") }
        return lines.joined(separator: "\r\n") + "\r\n\r\n"
    }

    /// One request; the body, if any, is sent as JSON unless `contentType` says otherwise.
    func request(_ method: String, _ path: String, json: Any? = nil, raw: [UInt8]? = nil,
                 contentType: String = "application/json", headers: [String: String] = [:], timeout: TimeInterval = 120) throws -> Reply {
        var body: [UInt8]? = raw
        if let json { body = Array(try JSONSerialization.data(withJSONObject: json)) }
        var extra = headers
        if body != nil { extra["Content-Type"] = contentType }
        let fd = try connect()
        defer { close(fd) }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        Self.send(fd, Array(head(method, path, extra: extra, bodyLength: body?.count ?? (["POST", "PATCH", "PUT"].contains(method) ? 0 : nil)).utf8) + (body ?? []))
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            received += buffer[0..<count]
        }
        return try Self.parse(received)
    }

    static func parse(_ received: [UInt8]) throws -> Reply {
        guard let split = find([13, 10, 13, 10], in: received) else { throw HarnessError("no HTTP reply: \(String(decoding: received, as: UTF8.self))") }
        let headText = String(decoding: received[0..<split], as: UTF8.self)
        var lines = headText.components(separatedBy: "\r\n")
        let statusLine = lines.removeFirst().split(separator: " ")
        guard statusLine.count >= 2, let status = Int(statusLine[1]) else { throw HarnessError("bad status line in \(headText)") }
        var headers: [String: String] = [:]
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var body = Array(received[(split + 4)...])
        if headers["transfer-encoding"]?.lowercased() == "chunked" { body = dechunk(body) }
        return Reply(status: status, headers: headers, body: Data(body))
    }

    static func dechunk(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = [], index = 0
        while index < bytes.count, let lineEnd = find([13, 10], in: bytes, from: index) {
            guard let size = Int(String(decoding: bytes[index..<lineEnd], as: UTF8.self).split(separator: ";")[0], radix: 16), size > 0 else { break }
            let start = lineEnd + 2
            out += bytes[start..<min(start + size, bytes.count)]
            index = start + size + 2
        }
        return out
    }

    static func find(_ needle: [UInt8], in haystack: [UInt8], from start: Int = 0) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        var index = start
        while index + needle.count <= haystack.count {
            if Array(haystack[index..<index + needle.count]) == needle { return index }
            index += 1
        }
        return nil
    }
}

/// A connection that stays open: the event stream or a WebSocket, read on a thread.
final class OpenStream: @unchecked Sendable {
    let fd: Int32
    private final class Buffer: Sendable { let bytes = Mutex<[UInt8]>([]) }
    private let buffer = Buffer()
    private let reader: Thread

    init(fd: Int32) {
        self.fd = fd
        let box = buffer
        reader = Thread {
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if count <= 0 { break }
                box.bytes.withLock { $0 += chunk[0..<count] }
            }
        }
        reader.start()
    }

    deinit { shutdown(fd, Int32(SHUT_RDWR)); close(fd) }

    var bytes: [UInt8] { buffer.bytes.withLock { $0 } }
    var text: String { String(decoding: bytes, as: UTF8.self) }

    func waitFor(_ timeout: TimeInterval, _ condition: (String) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if condition(text) { return true }
            Thread.sleep(forTimeInterval: 0.1)
        }
        return condition(text)
    }

    /// `GET /api/events` as an open stream.
    static func events(_ client: APIClient) throws -> OpenStream {
        let fd = try client.connect()
        APIClient.send(fd, Array(client.head("GET", "/api/events", bodyLength: nil).utf8))
        return OpenStream(fd: fd)
    }

    /// A WebSocket handshake offering `protocols`; the reply's status line tells whether it
    /// upgraded. Frames from the server are unmasked; `payloads` joins their data.
    static func webSocket(_ client: APIClient, path: String, protocols: [String]) throws -> OpenStream {
        let fd = try client.connect()
        var head = "GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        head += "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        if !protocols.isEmpty { head += "Sec-WebSocket-Protocol: \(protocols.joined(separator: ", "))\r\n" }
        head += "\r\n"
        APIClient.send(fd, Array(head.utf8))
        return OpenStream(fd: fd)
    }

    var upgraded: Bool { text.hasPrefix("HTTP/1.1 101") }

    /// The payloads of the WebSocket frames received so far, joined.
    var payloads: String {
        let all = bytes
        guard let start = APIClient.find([13, 10, 13, 10], in: all) else { return "" }
        var index = start + 4, out: [UInt8] = []
        while index + 2 <= all.count {
            var length = Int(all[index + 1] & 0x7f), offset = index + 2
            if length == 126 { guard offset + 2 <= all.count else { break }; length = Int(all[offset]) << 8 | Int(all[offset + 1]); offset += 2 }
            else if length == 127 { guard offset + 8 <= all.count else { break }; length = all[offset..<offset + 8].reduce(0) { $0 << 8 | Int($1) }; offset += 8 }
            guard offset + length <= all.count else { break }
            if all[index] & 0x0f == 1 || all[index] & 0x0f == 2 || all[index] & 0x0f == 0 { out += all[offset..<offset + length] }
            index = offset + length
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Sends one masked text frame (clients must mask).
    func sendText(_ text: String) {
        let payload = Array(text.utf8)
        precondition(payload.count < 126)
        let mask: [UInt8] = [1, 2, 3, 4]
        var frame: [UInt8] = [0x81, 0x80 | UInt8(payload.count)] + mask
        frame += payload.enumerated().map { $0.element ^ mask[$0.offset % 4] }
        APIClient.send(fd, frame)
    }
}
