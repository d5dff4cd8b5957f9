/// A compact binary form for `Codable` values (the standard library's, not Foundation's): how a
/// component's value `State` and a `MachineSpec` are written into saved states, migration
/// streams and the engine's hand-over. A type declares its fields once and the compiler writes
/// both directions, so no encoder and decoder are kept in step by hand.
///
/// The form is self-describing enough to refuse what does not fit: a keyed value is its field
/// count, then each field's name and value in declaration order; a list is its count, then its
/// elements; integers are little-endian at their own width (`Int`/`UInt` as 64 bits), a `Bool` one
/// byte that must be 0 or 1, a string its UTF-8 length then bytes. An absent optional field is
/// left out. Reading is bounded everywhere (a count never exceeds the bytes left, a string its
/// limit) and every refusal names the field's path, since the bytes come from saved states and
/// migration peers.
public enum BinaryRecord {
    /// The longest string a record may hold.
    public static let stringLimit = 64 << 10

    public static func encode<T: Encodable>(_ value: T) throws(StateError) -> [UInt8] {
        let root = EncodingNode()
        do {
            try value.encode(to: RecordEncoder(node: root, codingPath: []))
        } catch let error as StateError {
            throw error
        } catch {
            throw StateError.invalid(field: "record", reason: "\(error)")
        }
        var bytes: [UInt8] = []
        root.write(into: &bytes)
        return bytes
    }

    /// Decodes a whole record: bytes left over are refused.
    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws(StateError) -> T {
        let cursor = Cursor(bytes)
        let value: T
        do {
            value = try T(from: RecordDecoder(cursor: cursor, codingPath: []))
        } catch let error as StateError {
            throw error
        } catch let error as DecodingError {
            switch error {
            case let .typeMismatch(_, context), let .valueNotFound(_, context), let .keyNotFound(_, context), let .dataCorrupted(context):
                throw StateError.invalid(field: BinaryRecord.path(context.codingPath), reason: context.debugDescription)
            @unknown default:
                throw StateError.invalid(field: "record", reason: "\(error)")
            }
        } catch {
            throw StateError.invalid(field: "record", reason: "\(error)")
        }
        guard cursor.offset == bytes.count else {
            throw StateError.invalid(field: "record", reason: "\(bytes.count - cursor.offset) bytes follow its last field")
        }
        return value
    }

    /// `vcpus[1].localAPIC`: names joined by dots, list indices in brackets. (Built by hand: the
    /// standard library's String.replacing lives in _StringProcessing, whose Regex machinery
    /// would add 800 KB of code and 100 KB of memory to vireo-vmm.)
    public static func path(_ codingPath: [any CodingKey]) -> String {
        guard !codingPath.isEmpty else { return "record" }
        var text = ""
        for key in codingPath {
            if let index = key.intValue {
                text += "[\(index)]"
            } else {
                text += (text.isEmpty ? "" : ".") + key.stringValue
            }
        }
        return text
    }
}

// MARK: encoding

/// What has been encoded, kept as a tree until the end so each list and keyed value can be
/// written with its count in front.
final class EncodingNode {
    enum Content {
        case empty
        case scalar([UInt8])
        case keyed([(String, EncodingNode)])
        case unkeyed([EncodingNode])
    }
    var content = Content.empty

    func write(into bytes: inout [UInt8]) {
        switch content {
        case .empty: break
        case let .scalar(value): bytes += value
        case let .keyed(fields):
            appendLittleEndian(UInt32(fields.count), to: &bytes)
            for (name, node) in fields {
                appendString(name, to: &bytes)
                node.write(into: &bytes)
            }
        case let .unkeyed(elements):
            appendLittleEndian(UInt32(elements.count), to: &bytes)
            for element in elements { element.write(into: &bytes) }
        }
    }
}

func appendLittleEndian<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
    withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
}

func appendString(_ text: String, to bytes: inout [UInt8]) {
    appendLittleEndian(UInt32(text.utf8.count), to: &bytes)
    bytes += text.utf8
}

struct RecordEncoder: Encoder {
    let node: EncodingNode
    var codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        if case .empty = node.content { node.content = .keyed([]) }
        return KeyedEncodingContainer(KeyedRecordEncoder<Key>(node: node, codingPath: codingPath))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        if case .empty = node.content { node.content = .unkeyed([]) }
        return UnkeyedRecordEncoder(node: node, codingPath: codingPath)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer { SingleRecordEncoder(node: node, codingPath: codingPath) }
}

/// Scalars as the record writes them; shared by the three container kinds.
func scalarBytes<T: Encodable>(_ value: T) -> [UInt8]? {
    var bytes: [UInt8] = []
    switch value {
    case let value as Bool: bytes.append(value ? 1 : 0)
    case let value as String: appendString(value, to: &bytes)
    case let value as Int: appendLittleEndian(Int64(value), to: &bytes)
    case let value as UInt: appendLittleEndian(UInt64(value), to: &bytes)
    case let value as Int8: appendLittleEndian(value, to: &bytes)
    case let value as Int16: appendLittleEndian(value, to: &bytes)
    case let value as Int32: appendLittleEndian(value, to: &bytes)
    case let value as Int64: appendLittleEndian(value, to: &bytes)
    case let value as UInt8: bytes.append(value)
    case let value as UInt16: appendLittleEndian(value, to: &bytes)
    case let value as UInt32: appendLittleEndian(value, to: &bytes)
    case let value as UInt64: appendLittleEndian(value, to: &bytes)
    case let value as Double: appendLittleEndian(value.bitPattern, to: &bytes)
    case let value as Float: appendLittleEndian(value.bitPattern, to: &bytes)
    // Byte strings (KVM structures, nested records) at once: the same bytes a list of UInt8 writes.
    case let value as [UInt8]:
        appendLittleEndian(UInt32(value.count), to: &bytes)
        bytes += value
    default: return nil
    }
    return bytes
}

func encodeValue<T: Encodable>(_ value: T, into node: EncodingNode, path: [any CodingKey]) throws {
    if let bytes = scalarBytes(value) {
        node.content = .scalar(bytes)
    } else {
        try value.encode(to: RecordEncoder(node: node, codingPath: path))
    }
}

struct KeyedRecordEncoder<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let node: EncodingNode
    var codingPath: [any CodingKey]

    private func child(_ key: Key) -> EncodingNode { child(named: key.stringValue) }

    private func child(named name: String) -> EncodingNode {
        let child = EncodingNode()
        guard case var .keyed(fields) = node.content else { return child }
        fields.append((name, child))
        node.content = .keyed(fields)
        return child
    }

    mutating func encodeNil(forKey key: Key) throws {
        throw StateError.invalid(field: BinaryRecord.path(codingPath + [key]), reason: "an explicit nil has no binary form; leave the field out")
    }

    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        try encodeValue(value, into: child(key), path: codingPath + [key])
    }

    // An absent optional is left out; the reader finds its name missing.
    mutating func encodeIfPresent<T: Encodable>(_ value: T?, forKey key: Key) throws {
        if let value { try encode(value, forKey: key) }
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        let node = child(key)
        node.content = .keyed([])
        return KeyedEncodingContainer(KeyedRecordEncoder<NestedKey>(node: node, codingPath: codingPath + [key]))
    }

    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        let node = child(key)
        node.content = .unkeyed([])
        return UnkeyedRecordEncoder(node: node, codingPath: codingPath + [key])
    }

    mutating func superEncoder() -> any Encoder { RecordEncoder(node: child(named: "super"), codingPath: codingPath) }
    mutating func superEncoder(forKey key: Key) -> any Encoder { RecordEncoder(node: child(key), codingPath: codingPath + [key]) }
}

struct IndexKey: CodingKey {
    var intValue: Int?
    var stringValue: String { "[\(intValue ?? 0)]" }
    init(intValue: Int) { self.intValue = intValue }
    init?(stringValue: String) { nil }
}

struct UnkeyedRecordEncoder: UnkeyedEncodingContainer {
    let node: EncodingNode
    var codingPath: [any CodingKey]
    var count: Int {
        guard case let .unkeyed(elements) = node.content else { return 0 }
        return elements.count
    }

    private func next() -> EncodingNode {
        let child = EncodingNode()
        guard case var .unkeyed(elements) = node.content else { return child }
        elements.append(child)
        node.content = .unkeyed(elements)
        return child
    }

    mutating func encodeNil() throws {
        throw StateError.invalid(field: BinaryRecord.path(codingPath + [IndexKey(intValue: count)]), reason: "a list of optionals has no binary form")
    }

    mutating func encode<T: Encodable>(_ value: T) throws {
        let path = codingPath + [IndexKey(intValue: count)]
        try encodeValue(value, into: next(), path: path)
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        let path = codingPath + [IndexKey(intValue: count)]
        let node = next()
        node.content = .keyed([])
        return KeyedEncodingContainer(KeyedRecordEncoder<NestedKey>(node: node, codingPath: path))
    }

    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        let path = codingPath + [IndexKey(intValue: count)]
        let node = next()
        node.content = .unkeyed([])
        return UnkeyedRecordEncoder(node: node, codingPath: path)
    }

    mutating func superEncoder() -> any Encoder { RecordEncoder(node: next(), codingPath: codingPath) }
}

struct SingleRecordEncoder: SingleValueEncodingContainer {
    let node: EncodingNode
    var codingPath: [any CodingKey]

    mutating func encodeNil() throws {
        throw StateError.invalid(field: BinaryRecord.path(codingPath), reason: "an optional value on its own has no binary form")
    }

    mutating func encode<T: Encodable>(_ value: T) throws { try encodeValue(value, into: node, path: codingPath) }
}

// MARK: decoding

final class Cursor {
    let bytes: [UInt8]
    var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - offset }

    func integer<T: FixedWidthInteger>(_ type: T.Type, _ path: [any CodingKey]) throws(StateError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw .truncated(field: BinaryRecord.path(path)) }
        var value: T = 0
        for index in 0..<size { value |= T(truncatingIfNeeded: bytes[offset + index]) << (8 * index) }
        offset += size
        return value
    }

    func string(_ path: [any CodingKey], peek: Bool = false) throws(StateError) -> String {
        let start = offset
        // A peek leaves the cursor where it was, whatever it finds.
        defer { if peek { offset = start } }
        let count = Int(try integer(UInt32.self, path))
        guard count <= BinaryRecord.stringLimit else {
            throw .invalid(field: BinaryRecord.path(path), reason: "a string of \(count) bytes, more than the \(BinaryRecord.stringLimit) allowed")
        }
        guard remaining >= count else { throw .truncated(field: BinaryRecord.path(path)) }
        guard let text = String(validating: bytes[offset..<offset + count], as: UTF8.self) else {
            throw .invalid(field: BinaryRecord.path(path), reason: "not UTF-8")
        }
        offset += count
        return text
    }

    /// A count of things that follow, each at least `minimumSize` bytes: never more than the
    /// bytes left can hold.
    func count(_ path: [any CodingKey], minimumSize: Int) throws(StateError) -> Int {
        let count = Int(try integer(UInt32.self, path))
        guard count <= remaining / max(minimumSize, 1) else {
            throw .invalid(field: BinaryRecord.path(path), reason: "says \(count) items, more than the \(remaining) bytes left can hold")
        }
        return count
    }
}

struct RecordDecoder: Decoder {
    let cursor: Cursor
    var codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        // Each field is at least its name's length (4 bytes) and one byte of value.
        KeyedDecodingContainer(KeyedRecordDecoder<Key>(cursor: cursor, codingPath: codingPath,
                                                       remainingFields: try cursor.count(codingPath, minimumSize: 5)))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        UnkeyedRecordDecoder(cursor: cursor, codingPath: codingPath, count: try cursor.count(codingPath, minimumSize: 1))
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer { SingleRecordDecoder(cursor: cursor, codingPath: codingPath) }
}

func decodeValue<T: Decodable>(_ type: T.Type, cursor: Cursor, path: [any CodingKey]) throws -> T {
    let scalar: Any
    switch type {
    case is Bool.Type:
        switch try cursor.integer(UInt8.self, path) {
        case 0: scalar = false
        case 1: scalar = true
        case let other: throw StateError.invalid(field: BinaryRecord.path(path), reason: "\(other) is not a boolean (0 or 1)")
        }
    case is String.Type: scalar = try cursor.string(path)
    case is Int.Type:
        let value = try cursor.integer(Int64.self, path)
        guard let fitted = Int(exactly: value) else { throw StateError.invalid(field: BinaryRecord.path(path), reason: "\(value) does not fit") }
        scalar = fitted
    case is UInt.Type:
        let value = try cursor.integer(UInt64.self, path)
        guard let fitted = UInt(exactly: value) else { throw StateError.invalid(field: BinaryRecord.path(path), reason: "\(value) does not fit") }
        scalar = fitted
    case is Int8.Type: scalar = try cursor.integer(Int8.self, path)
    case is Int16.Type: scalar = try cursor.integer(Int16.self, path)
    case is Int32.Type: scalar = try cursor.integer(Int32.self, path)
    case is Int64.Type: scalar = try cursor.integer(Int64.self, path)
    case is UInt8.Type: scalar = try cursor.integer(UInt8.self, path)
    case is UInt16.Type: scalar = try cursor.integer(UInt16.self, path)
    case is UInt32.Type: scalar = try cursor.integer(UInt32.self, path)
    case is UInt64.Type: scalar = try cursor.integer(UInt64.self, path)
    case is Double.Type: scalar = Double(bitPattern: try cursor.integer(UInt64.self, path))
    case is Float.Type: scalar = Float(bitPattern: try cursor.integer(UInt32.self, path))
    case is [UInt8].Type:
        let count = try cursor.count(path, minimumSize: 1)
        scalar = Array(cursor.bytes[cursor.offset..<cursor.offset + count])
        cursor.offset += count
    default: return try T(from: RecordDecoder(cursor: cursor, codingPath: path))
    }
    guard let value = scalar as? T else { throw StateError.invalid(field: BinaryRecord.path(path), reason: "not a \(T.self)") }
    return value
}

struct KeyedRecordDecoder<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let cursor: Cursor
    var codingPath: [any CodingKey]
    /// Fields of this value not read yet: a field name past them belongs to the enclosing value.
    let remainingFields: Counter

    final class Counter {
        var value: Int
        init(_ value: Int) { self.value = value }
    }

    init(cursor: Cursor, codingPath: [any CodingKey], remainingFields: Int) {
        self.cursor = cursor
        self.codingPath = codingPath
        self.remainingFields = Counter(remainingFields)
    }

    private func nextName() -> String? {
        guard remainingFields.value > 0 else { return nil }
        return try? cursor.string(codingPath, peek: true)
    }

    /// The key of the value that follows (an enum's case has exactly one).
    var allKeys: [Key] { nextName().flatMap { Key(stringValue: $0) }.map { [$0] } ?? [] }

    func contains(_ key: Key) -> Bool { nextName() == key.stringValue }

    /// Consumes the next field's name, which must be `key`'s.
    private func enter(_ key: Key) throws(StateError) {
        let path = codingPath + [key]
        guard remainingFields.value > 0 else { throw .invalid(field: BinaryRecord.path(path), reason: "missing") }
        let name = try cursor.string(path)
        guard name == key.stringValue else {
            throw .invalid(field: BinaryRecord.path(path), reason: "found field '\(name.prefix(64))' where '\(key.stringValue)' belongs")
        }
        remainingFields.value -= 1
    }

    func decodeNil(forKey key: Key) throws -> Bool { !contains(key) }

    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        try enter(key)
        return try decodeValue(type, cursor: cursor, path: codingPath + [key])
    }

    func decodeIfPresent<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T? {
        contains(key) ? try decode(type, forKey: key) : nil
    }

    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        try enter(key)
        return try RecordDecoder(cursor: cursor, codingPath: codingPath + [key]).container(keyedBy: type)
    }

    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
        try enter(key)
        return try RecordDecoder(cursor: cursor, codingPath: codingPath + [key]).unkeyedContainer()
    }

    func superDecoder() throws -> any Decoder { RecordDecoder(cursor: cursor, codingPath: codingPath) }

    func superDecoder(forKey key: Key) throws -> any Decoder {
        try enter(key)
        return RecordDecoder(cursor: cursor, codingPath: codingPath + [key])
    }
}

struct UnkeyedRecordDecoder: UnkeyedDecodingContainer {
    let cursor: Cursor
    var codingPath: [any CodingKey]
    let total: Int
    var currentIndex = 0

    init(cursor: Cursor, codingPath: [any CodingKey], count: Int) {
        self.cursor = cursor
        self.codingPath = codingPath
        total = count
    }

    var count: Int? { total }
    var isAtEnd: Bool { currentIndex >= total }
    private var path: [any CodingKey] { codingPath + [IndexKey(intValue: currentIndex)] }

    mutating func decodeNil() throws -> Bool { false }

    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        guard !isAtEnd else { throw StateError.invalid(field: BinaryRecord.path(path), reason: "past the list's end") }
        let value = try decodeValue(type, cursor: cursor, path: path)
        currentIndex += 1
        return value
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        let container = try RecordDecoder(cursor: cursor, codingPath: path).container(keyedBy: type)
        currentIndex += 1
        return container
    }

    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
        let container = try RecordDecoder(cursor: cursor, codingPath: path).unkeyedContainer()
        currentIndex += 1
        return container
    }

    mutating func superDecoder() throws -> any Decoder {
        defer { currentIndex += 1 }
        return RecordDecoder(cursor: cursor, codingPath: path)
    }
}

struct SingleRecordDecoder: SingleValueDecodingContainer {
    let cursor: Cursor
    var codingPath: [any CodingKey]

    func decodeNil() -> Bool { false }

    func decode<T: Decodable>(_ type: T.Type) throws -> T { try decodeValue(type, cursor: cursor, path: codingPath) }
}
