import API
import FoundationEssentials
import Hummingbird
import JSONQuoting
import Library
import NIOCore

/// JSON in and out, in snake_case as `vireo ... --json` prints it.
enum APIJSON {
    static func encode<T: Encodable>(_ value: T) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = JSONStyle.keyEncoding()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Every value the API sends is plain data; failing to encode one is a programming error
        // reported as such rather than a crash.
        guard let data = try? encoder.encode(value) else { return Array(#"{"error":"unencodable response"}"#.utf8) }
        return Array(data)
    }

    static func response<T: Encodable>(_ value: T, status: HTTPResponse.Status = .ok, headers: HTTPFields = [:]) -> Response {
        var fields = headers
        fields[.contentType] = "application/json"
        return Response(status: status, headers: fields, body: .init(byteBuffer: ByteBuffer(bytes: encode(value))))
    }

    /// A JSON string literal.
    static func quote(_ text: String) -> String { JSONString.quote(text) }

    /// The largest request body taken: every request is a small JSON object.
    static let maximumBody = 64 * 1024

    /// Reads a JSON object body of at most `maximumBody` bytes, refusing keys outside `allowed`
    /// (a misspelt field is an error, not silently ignored), then decodes it as `T`.
    static func decode<T: Decodable>(_ type: T.Type, from request: Request, allowed: Set<String>,
                                     nested: [String: Set<String>] = [:]) async throws -> T {
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: maximumBody)
        } catch {
            throw APIProblem(.contentTooLarge, kind: "body-too-large", detail: "the request body is over \(maximumBody) bytes")
        }
        if let type = request.headers[.contentType], !type.lowercased().hasPrefix("application/json") {
            throw APIProblem(.unsupportedMediaType, kind: "unsupported-media-type", detail: "send the body as application/json, not \(type)")
        }
        return try decode(type, bytes: buffer.readableBytesView.isEmpty ? Array("{}".utf8) : Array(buffer.readableBytesView),
                          allowed: allowed, nested: nested)
    }

    /// The body's bytes, checked and decoded as `decode(_:from:allowed:nested:)` says.
    static func decode<T: Decodable>(_ type: T.Type, bytes: [UInt8], allowed: Set<String>,
                                     nested: [String: Set<String>] = [:]) throws -> T {
        guard bytes.count <= maximumBody else {
            throw APIProblem(.contentTooLarge, kind: "body-too-large", detail: "the request body is over \(maximumBody) bytes")
        }
        let value: JSONValue
        do { value = try JSONDecoder().decode(JSONValue.self, from: Data(bytes)) } catch {
            throw APIProblem.malformed("the body is not valid JSON")
        }
        guard case let .object(members) = value else { throw APIProblem.malformed("the body must be a JSON object") }
        for key in members.keys.sorted() where !allowed.contains(key) {
            throw APIProblem(.unprocessableContent, kind: "unknown-field", detail: "unknown field '\(key)'; allowed: \(allowed.sorted().joined(separator: ", "))", field: key)
        }
        // Every number the API takes is a non-negative integer but for timeouts; saying which
        // field is out of range here beats the decoder's "not valid JSON".
        for (key, member) in members.sorted(by: { $0.key < $1.key }) {
            guard case let .number(number) = member else { continue }
            if number < 0 { throw APIProblem.invalid(key, "must not be negative") }
            if number > 9.0e18 { throw APIProblem.invalid(key, "is too large") }
            if !key.hasSuffix("_seconds"), number.rounded() != number { throw APIProblem.invalid(key, "must be a whole number") }
        }
        for (key, keys) in nested {
            guard let inner = members[key] else { continue }
            if case .null = inner { continue }
            guard case let .object(innerMembers) = inner else { throw APIProblem.invalid(key, "must be an object") }
            for innerKey in innerMembers.keys.sorted() where !keys.contains(innerKey) {
                throw APIProblem(.unprocessableContent, kind: "unknown-field", detail: "unknown field '\(key).\(innerKey)'; allowed: \(keys.sorted().joined(separator: ", "))", field: "\(key).\(innerKey)")
            }
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        do {
            return try decoder.decode(T.self, from: Data(bytes))
        } catch let error as DecodingError {
            throw problem(error)
        } catch let error as APIProblem {
            throw error
        }
    }

    /// A decoding failure named by its JSON path, as the client wrote it.
    static func problem(_ error: DecodingError) -> APIProblem {
        func path(_ keys: [any CodingKey], _ last: (any CodingKey)? = nil) -> String {
            let all = keys + (last.map { [$0] } ?? [])
            let text = all.map { key in key.intValue.map { "[\($0)]" } ?? JSONStyle.snakeCase(key.stringValue) }
                .reduce("") { $0.isEmpty || $1.hasPrefix("[") ? $0 + $1 : $0 + "." + $1 }
            return text.isEmpty ? "body" : text
        }
        switch error {
        case let .typeMismatch(type, context):
            return .invalid(path(context.codingPath), "must be \(describe(type))")
        case let .valueNotFound(type, context):
            return .invalid(path(context.codingPath), "must be \(describe(type)), not null")
        case let .keyNotFound(key, context):
            let field = path(context.codingPath, key)
            return APIProblem(.unprocessableContent, kind: "missing-field", detail: "\(field): required", field: field)
        case let .dataCorrupted(context):
            return .invalid(path(context.codingPath), context.debugDescription)
        @unknown default:
            return .malformed("the body could not be read")
        }
    }

    static func describe(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: return "a string"
        case is Bool.Type: return "true or false"
        case is Int.Type, is UInt64.Type, is Int64.Type, is UInt32.Type: return "an integer in range"
        case is [String].Type: return "an array of strings"
        default: return "of type \(type)"
        }
    }
}

/// Any JSON value: the body is first read as one of these to check its keys.
enum JSONValue: Decodable, Sendable {
    case null, bool(Bool), number(Double), string(String), array([JSONValue]), object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() { self = .null }
        else if let value = try? container.decode(Bool.self) { self = .bool(value) }
        else if let value = try? container.decode(Double.self) { self = .number(value) }
        else if let value = try? container.decode(String.self) { self = .string(value) }
        else if let value = try? container.decode([JSONValue].self) { self = .array(value) }
        else { self = .object(try container.decode([String: JSONValue].self)) }
    }
}

/// The API's request bodies as hostile input, for the fuzzer (docs/fuzzing.md): the bytes are
/// decoded as the largest bodies the API takes (a new VM, a change), and what decodes is turned
/// into the library's requests as the routes do. Only ever returns.
public enum APIBodyInspection {
    /// How many of the bodies decoded and converted.
    public static func decodeEveryBody(_ bytes: [UInt8]) -> Int {
        var decoded = 0
        if let body = try? APIJSON.decode(APIServer.CreateBody.self, bytes: bytes, allowed: APIServer.CreateBody.keys, nested: APIServer.CreateBody.nested) {
            decoded += 1
            if (try? body.request()) != nil { decoded += 1 }
        }
        if let body = try? APIJSON.decode(APIServer.ChangeBody.self, bytes: bytes, allowed: APIServer.ChangeBody.keys, nested: APIServer.ChangeBody.nested) {
            decoded += 1
            if (try? APIServer.cardsWithMACs(nics: body.nics, forwards: body.forwards, kept: nil)) != nil { decoded += 1 }
        }
        return decoded
    }

    /// A body every check accepts, the fuzzer's seed.
    public static let sample = Array(#"{"name":"web","cpus":2,"memory_bytes":268435456,"nics":["nat","user,mac=52:54:00:12:34:56"],"forwards":["tcp:8022:22"],"cpu_cap_percent":50,"attach_disk_format":"raw"}"#.utf8)
}
