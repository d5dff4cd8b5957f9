/// The binary encoding of a machine spec (as the kvm engine hands it to the VMM) and of saved
/// machine state (docs/snapshots.md): little-endian integers, length-prefixed byte strings,
/// nothing else. Both are hostile input once they have been on disk or on a wire, so every read
/// is bounds-checked and every error names the field it was reading; there is no Foundation in
/// the VMM, hence no Codable here.
public enum StateError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The data ended inside `field`.
    case truncated(field: String)
    /// `field` holds a value the reader cannot accept (out of range, the wrong size, unknown).
    case invalid(field: String, reason: String)

    public var description: String {
        switch self {
        case let .truncated(field): return "the data ends inside \(field)"
        case let .invalid(field, reason): return "\(field): \(reason)"
        }
    }
}

public struct StateWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public mutating func put<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func put(_ value: Bool) { put(UInt8(value ? 1 : 0)) }

    /// A byte string with its length in front.
    public mutating func put(bytes value: some Collection<UInt8>) {
        put(UInt32(value.count))
        bytes.append(contentsOf: value)
    }

    /// A fixed-layout C structure (a KVM state struct) with its size in front, so a reader on a
    /// host whose headers disagree refuses it instead of misreading it. Only for plain C structs
    /// (some, with unions, are not inferred BitwiseCopyable; the reader checks they are POD).
    public mutating func put<T>(raw value: T) {
        withUnsafeBytes(of: value) { put(bytes: $0) }
    }

    public mutating func put(_ value: String) { put(bytes: Array(value.utf8)) }
}

public struct StateReader: Sendable {
    private let bytes: [UInt8]
    public private(set) var offset: Int

    public init(_ bytes: [UInt8]) {
        self.bytes = bytes
        offset = 0
    }

    public var isAtEnd: Bool { offset == bytes.count }

    public mutating func get<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws(StateError) -> T {
        let size = MemoryLayout<T>.size
        guard bytes.count - offset >= size else { throw .truncated(field: field) }
        var value: T = 0
        for index in 0..<size { value |= T(bytes[offset + index]) << (8 * index) }
        offset += size
        return value
    }

    public mutating func getBool(_ field: String) throws(StateError) -> Bool {
        switch try get(UInt8.self, field) {
        case 0: return false
        case 1: return true
        case let other: throw .invalid(field: field, reason: "\(other) is not a boolean (0 or 1)")
        }
    }

    /// A length-prefixed byte string of at most `limit` bytes.
    public mutating func getBytes(_ field: String, limit: Int) throws(StateError) -> [UInt8] {
        let count = Int(try get(UInt32.self, field + " length"))
        guard count <= limit else { throw .invalid(field: field, reason: "\(count) bytes, more than the \(limit) allowed") }
        guard bytes.count - offset >= count else { throw .truncated(field: field) }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }

    /// A structure written by `put(raw:)`: its recorded size must be this host's.
    public mutating func get<T>(raw type: T.Type, _ field: String) throws(StateError) -> T {
        guard _isPOD(T.self) else { throw .invalid(field: field, reason: "\(T.self) is not a plain structure") }
        let size = MemoryLayout<T>.size
        let data = try getBytes(field, limit: size)
        guard data.count == size else {
            throw .invalid(field: field, reason: "\(data.count) bytes where this host's structure has \(size)")
        }
        let value = UnsafeMutablePointer<T>.allocate(capacity: 1)
        defer { value.deallocate() }
        data.withUnsafeBytes { bytes in
            if let base = bytes.baseAddress { UnsafeMutableRawPointer(value).copyMemory(from: base, byteCount: size) }
        }
        return value.move()
    }

    public mutating func getString(_ field: String, limit: Int = 4096) throws(StateError) -> String {
        let data = try getBytes(field, limit: limit)
        guard let text = String(validating: data, as: UTF8.self) else { throw .invalid(field: field, reason: "not UTF-8") }
        return text
    }

    /// The writer's record of `field`, checked to be `expected` (a device kind, a section tag).
    public mutating func expect(_ expected: String, _ field: String) throws(StateError) {
        let found = try getString(field, limit: 256)
        guard found == expected else { throw .invalid(field: field, reason: "found '\(found)', expected '\(expected)'") }
    }
}
