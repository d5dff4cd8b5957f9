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
        let writer = RecordWriter()
        do {
            try writer.encodeValue(value, depth: 0, place: Place(nil))
        } catch let error as StateError {
            throw error
        } catch {
            throw StateError.invalid(field: "record", reason: "\(error)")
        }
        if let failure = writer.failure { throw failure }
        return writer.bytes
    }

    /// Decodes a whole record: bytes left over are refused.
    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws(StateError) -> T {
        let cursor = Cursor(bytes)
        let value: T
        do {
            value = try T(from: RecordDecoder(cursor: cursor, path: nil))
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

// MARK: places

/// Where a value sits in the record, as a chain of keys to its root. Links are made only for
/// values that contain others; a scalar's place is its container's link and its own key, kept
/// apart until an error (mostly) asks for the path, so writing and reading a field allocates
/// nothing for its name.
final class PathLink {
    let key: any CodingKey
    let parent: PathLink?

    init(_ key: any CodingKey, parent: PathLink?) {
        self.key = key
        self.parent = parent
    }

    static func codingPath(_ link: PathLink?) -> [any CodingKey] {
        var keys: [any CodingKey] = []
        var link = link
        while let current = link {
            keys.append(current.key)
            link = current.parent
        }
        return keys.reversed()
    }
}

/// A value's place: its container's link and its own key (none for a container's own place).
struct Place: CustomStringConvertible {
    let parent: PathLink?
    let key: (any CodingKey)?

    init(_ parent: PathLink?, _ key: (any CodingKey)? = nil) {
        self.parent = parent
        self.key = key
    }

    var codingPath: [any CodingKey] { PathLink.codingPath(parent) + (key.map { [$0] } ?? []) }
    var description: String { BinaryRecord.path(codingPath) }
    /// The link for values inside this one.
    var link: PathLink? { key.map { PathLink($0, parent: parent) } ?? parent }
}

struct IndexKey: CodingKey {
    var intValue: Int?
    var stringValue: String { "[\(intValue ?? 0)]" }
    init(intValue: Int) { self.intValue = intValue }
    init?(stringValue: String) { nil }
}

// MARK: scalars

/// A value the record writes as bytes of its own rather than as a container: integers
/// (little-endian at their width, `Int`/`UInt` as 64 bits), `Bool` (one byte, 0 or 1), floating
/// point (its bit pattern), `String` (UTF-8 length, then bytes) and byte strings (count, then
/// bytes: what a list of UInt8 writes, at once).
protocol RecordScalar {
    func write(into bytes: inout [UInt8])
    static func read(_ cursor: Cursor, _ place: Place) throws(StateError) -> Self
}

extension RecordScalar {
    /// Writes `value` when it is of this type.
    static func write<T>(_ value: T, into bytes: inout [UInt8]) -> Bool {
        guard let value = value as? Self else { return false }
        value.write(into: &bytes)
        return true
    }
}

/// The scalar type `type` is, found by identity: comparing metatypes is a pointer comparison,
/// where asking whether a type conforms to `RecordScalar` (`as? any RecordScalar`) searches the
/// process's conformance records the first time each type is asked about. A record written once
/// (the state a migration writes inside its pause) would pay that for every type in it.
func recordScalarType<T>(_ type: T.Type) -> (any RecordScalar.Type)? {
    if type == [UInt8].self { return [UInt8].self }
    if type == UInt32.self { return UInt32.self }
    if type == UInt64.self { return UInt64.self }
    if type == Bool.self { return Bool.self }
    if type == String.self { return String.self }
    if type == Int.self { return Int.self }
    if type == UInt8.self { return UInt8.self }
    if type == UInt16.self { return UInt16.self }
    if type == Int32.self { return Int32.self }
    if type == Int64.self { return Int64.self }
    if type == UInt.self { return UInt.self }
    if type == Int8.self { return Int8.self }
    if type == Int16.self { return Int16.self }
    if type == Double.self { return Double.self }
    if type == Float.self { return Float.self }
    return nil
}

extension RecordScalar where Self: FixedWidthInteger {
    func write(into bytes: inout [UInt8]) { appendLittleEndian(self, to: &bytes) }
    static func read(_ cursor: Cursor, _ place: Place) throws(StateError) -> Self { try cursor.integer(Self.self, place) }
}

extension Int8: RecordScalar {}
extension Int16: RecordScalar {}
extension Int32: RecordScalar {}
extension Int64: RecordScalar {}
extension UInt8: RecordScalar {}
extension UInt16: RecordScalar {}
extension UInt32: RecordScalar {}
extension UInt64: RecordScalar {}

/// `Int` and `UInt` are written at 64 bits whatever the host's word, and read back only if they fit.
func readWord<Wide: FixedWidthInteger, Word: FixedWidthInteger>(_ wide: Wide.Type, as word: Word.Type, _ cursor: Cursor, _ place: Place) throws(StateError) -> Word {
    let value = try cursor.integer(Wide.self, place)
    guard let fitted = Word(exactly: value) else { throw .invalid(field: place.description, reason: "\(value) does not fit") }
    return fitted
}

extension Int: RecordScalar {
    func write(into bytes: inout [UInt8]) { appendLittleEndian(Int64(self), to: &bytes) }
    static func read(_ cursor: Cursor, _ place: Place) throws(StateError) -> Int { try readWord(Int64.self, as: Int.self, cursor, place) }
}

extension UInt: RecordScalar {
    func write(into bytes: inout [UInt8]) { appendLittleEndian(UInt64(self), to: &bytes) }
    static func read(_ cursor: Cursor, _ place: Place) throws(StateError) -> UInt { try readWord(UInt64.self, as: UInt.self, cursor, place) }
}

extension Bool: RecordScalar {
    func write(into bytes: inout [UInt8]) { bytes.append(self ? 1 : 0) }
    static func read(_ cursor: Cursor, _ place: Place) throws(StateError) -> Bool {
        switch try cursor.integer(UInt8.self, place) {
        case 0: return false
        case 1: return true
        case let other: throw .invalid(field: place.description, reason: "\(other) is not a boolean (0 or 1)")
        }
    }
}

extension Double: RecordScalar {
    func write(into bytes: inout [UInt8]) { appendLittleEndian(bitPattern, to: &bytes) }
    static func read(_ cursor: Cursor, _ place: Place) throws(StateError) -> Double { Double(bitPattern: try cursor.integer(UInt64.self, place)) }
}

extension Float: RecordScalar {
    func write(into bytes: inout [UInt8]) { appendLittleEndian(bitPattern, to: &bytes) }
    static func read(_ cursor: Cursor, _ place: Place) throws(StateError) -> Float { Float(bitPattern: try cursor.integer(UInt32.self, place)) }
}

extension String: RecordScalar {
    func write(into bytes: inout [UInt8]) { appendString(self, to: &bytes) }
    static func read(_ cursor: Cursor, _ place: Place) throws(StateError) -> String { try cursor.string(place) }
}

// KVM structures and nested records are byte strings: written and read whole, not byte by byte.
extension Array: RecordScalar where Element == UInt8 {
    func write(into bytes: inout [UInt8]) {
        appendLittleEndian(UInt32(count), to: &bytes)
        bytes += self
    }

    static func read(_ cursor: Cursor, _ place: Place) throws(StateError) -> [UInt8] {
        let count = try cursor.count(place, minimumSize: 1)
        defer { cursor.offset += count }
        return Array(cursor.bytes[cursor.offset..<cursor.offset + count])
    }
}

func appendLittleEndian<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
    withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
}

func appendString(_ text: String, to bytes: inout [UInt8]) {
    appendLittleEndian(UInt32(text.utf8.count), to: &bytes)
    bytes += text.utf8
}

// MARK: encoding

/// The record being written, in one pass: a container writes its count (zero) where it begins
/// and counts up in place as items follow. Codable writes depth first, so writing an item to a
/// container closes every container opened inside it before; writing to a container already
/// closed (containers used out of order) is refused rather than misplaced.
final class RecordWriter {
    var bytes: [UInt8] = []
    /// Where each open container's count is, outermost first.
    var open: [Int] = []
    /// Misuse found where Codable gives no way to throw (opening a container).
    var failure: StateError?

    init() { bytes.reserveCapacity(4096) }

    func encodeValue<T: Encodable>(_ value: T, depth: Int, place: Place) throws {
        if let scalar = recordScalarType(T.self), scalar.write(value, into: &bytes) {
            return
        } else {
            try value.encode(to: RecordEncoder(writer: self, depth: depth, path: place.link))
        }
    }

    /// A container for the value that began at `start`, opened at `depth`, or the one that value
    /// opened already (a type may ask its encoder twice).
    func container(at start: Int, depth: Int, place: @autoclosure () -> Place) -> Int {
        if depth < open.count, open[depth] == start { return start }
        if bytes.count != start || open.count < depth {
            failure = failure ?? .invalid(field: place().description, reason: "a value began a container after writing, or out of order")
        }
        if open.count > depth { open.removeSubrange(depth...) }
        open.append(bytes.count)
        appendLittleEndian(UInt32(0), to: &bytes)
        return bytes.count - 4
    }

    /// One more item in the container whose count is at `countAt`, opened at `depth`.
    func addItem(to countAt: Int, depth: Int, place: @autoclosure () -> Place) throws(StateError) {
        guard depth < open.count, open[depth] == countAt else {
            throw .invalid(field: place().description, reason: "written to a container that a later value closed; a record is written in one pass")
        }
        if open.count > depth + 1 { open.removeSubrange((depth + 1)...) }
        bytes.withUnsafeMutableBytes { raw in
            let count = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: countAt, as: UInt32.self))
            raw.storeBytes(of: (count + 1).littleEndian, toByteOffset: countAt, as: UInt32.self)
        }
    }

    func itemCount(at countAt: Int) -> Int {
        Int(bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: countAt, as: UInt32.self)) })
    }
}

struct RecordEncoder: Encoder {
    let writer: RecordWriter
    /// How many containers enclose this value.
    let depth: Int
    let path: PathLink?
    /// Where this value's bytes begin.
    let start: Int

    init(writer: RecordWriter, depth: Int, path: PathLink?) {
        self.writer = writer
        self.depth = depth
        self.path = path
        start = writer.bytes.count
    }

    var codingPath: [any CodingKey] { PathLink.codingPath(path) }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        let countAt = writer.container(at: start, depth: depth, place: Place(path))
        return KeyedEncodingContainer(KeyedRecordEncoder<Key>(writer: writer, countAt: countAt, depth: depth, path: path))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        UnkeyedRecordEncoder(writer: writer, countAt: writer.container(at: start, depth: depth, place: Place(path)), depth: depth, path: path)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer { SingleRecordEncoder(writer: writer, depth: depth, path: path, start: start) }
}

struct KeyedRecordEncoder<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let writer: RecordWriter
    let countAt: Int
    let depth: Int
    let path: PathLink?

    var codingPath: [any CodingKey] { PathLink.codingPath(path) }

    /// Counts the field and writes its name; its value follows.
    private func begin(_ key: Key) throws(StateError) {
        try writer.addItem(to: countAt, depth: depth, place: Place(path, key))
        appendString(key.stringValue, to: &writer.bytes)
    }

    mutating func encodeNil(forKey key: Key) throws {
        throw StateError.invalid(field: Place(path, key).description, reason: "an explicit nil has no binary form; leave the field out")
    }

    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        try begin(key)
        try writer.encodeValue(value, depth: depth + 1, place: Place(path, key))
    }

    // The standard library's scalars, each written at once: the generic path would look up a
    // conformance for every field.
    private func put<S: RecordScalar>(_ value: S, _ key: Key) throws(StateError) {
        try begin(key)
        value.write(into: &writer.bytes)
    }
    mutating func encode(_ value: Bool, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: String, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: Double, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: Float, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: Int, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: Int8, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: Int16, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: Int32, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: Int64, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: UInt, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: UInt8, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: UInt16, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: UInt32, forKey key: Key) throws { try put(value, key) }
    mutating func encode(_ value: UInt64, forKey key: Key) throws { try put(value, key) }

    // An absent optional is left out; the reader finds its name missing.
    mutating func encodeIfPresent<T: Encodable>(_ value: T?, forKey key: Key) throws {
        if let value { try encode(value, forKey: key) }
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        let place = Place(path, key)
        do throws(StateError) { try begin(key) } catch { writer.failure = writer.failure ?? error }
        let countAt = writer.container(at: writer.bytes.count, depth: depth + 1, place: place)
        return KeyedEncodingContainer(KeyedRecordEncoder<NestedKey>(writer: writer, countAt: countAt, depth: depth + 1, path: place.link))
    }

    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        let place = Place(path, key)
        do throws(StateError) { try begin(key) } catch { writer.failure = writer.failure ?? error }
        let countAt = writer.container(at: writer.bytes.count, depth: depth + 1, place: place)
        return UnkeyedRecordEncoder(writer: writer, countAt: countAt, depth: depth + 1, path: place.link)
    }

    mutating func superEncoder() -> any Encoder { superEncoder(named: "super", key: nil) }
    mutating func superEncoder(forKey key: Key) -> any Encoder { superEncoder(named: key.stringValue, key: key) }

    private func superEncoder(named name: String, key: Key?) -> any Encoder {
        let place = Place(path, key)
        do throws(StateError) {
            try writer.addItem(to: countAt, depth: depth, place: place)
        } catch {
            writer.failure = writer.failure ?? error
        }
        appendString(name, to: &writer.bytes)
        return RecordEncoder(writer: writer, depth: depth + 1, path: place.link)
    }
}

struct UnkeyedRecordEncoder: UnkeyedEncodingContainer {
    let writer: RecordWriter
    let countAt: Int
    let depth: Int
    let path: PathLink?

    var codingPath: [any CodingKey] { PathLink.codingPath(path) }
    var count: Int { writer.itemCount(at: countAt) }

    /// Counts the next item, whose place it returns.
    private func next() throws(StateError) -> Place {
        let place = Place(path, IndexKey(intValue: count))
        try writer.addItem(to: countAt, depth: depth, place: place)
        return place
    }

    mutating func encodeNil() throws {
        throw StateError.invalid(field: Place(path, IndexKey(intValue: count)).description, reason: "a list of optionals has no binary form")
    }

    mutating func encode<T: Encodable>(_ value: T) throws {
        try writer.encodeValue(value, depth: depth + 1, place: try next())
    }

    private func put<S: RecordScalar>(_ value: S) throws(StateError) {
        _ = try next()
        value.write(into: &writer.bytes)
    }
    mutating func encode(_ value: Bool) throws { try put(value) }
    mutating func encode(_ value: String) throws { try put(value) }
    mutating func encode(_ value: Double) throws { try put(value) }
    mutating func encode(_ value: Float) throws { try put(value) }
    mutating func encode(_ value: Int) throws { try put(value) }
    mutating func encode(_ value: Int8) throws { try put(value) }
    mutating func encode(_ value: Int16) throws { try put(value) }
    mutating func encode(_ value: Int32) throws { try put(value) }
    mutating func encode(_ value: Int64) throws { try put(value) }
    mutating func encode(_ value: UInt) throws { try put(value) }
    mutating func encode(_ value: UInt8) throws { try put(value) }
    mutating func encode(_ value: UInt16) throws { try put(value) }
    mutating func encode(_ value: UInt32) throws { try put(value) }
    mutating func encode(_ value: UInt64) throws { try put(value) }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        let place = nextOrFailure()
        let countAt = writer.container(at: writer.bytes.count, depth: depth + 1, place: place)
        return KeyedEncodingContainer(KeyedRecordEncoder<NestedKey>(writer: writer, countAt: countAt, depth: depth + 1, path: place.link))
    }

    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        let place = nextOrFailure()
        let countAt = writer.container(at: writer.bytes.count, depth: depth + 1, place: place)
        return UnkeyedRecordEncoder(writer: writer, countAt: countAt, depth: depth + 1, path: place.link)
    }

    mutating func superEncoder() -> any Encoder { RecordEncoder(writer: writer, depth: depth + 1, path: nextOrFailure().link) }

    private func nextOrFailure() -> Place {
        do throws(StateError) { return try next() } catch {
            writer.failure = writer.failure ?? error
            return Place(path, IndexKey(intValue: count))
        }
    }
}

struct SingleRecordEncoder: SingleValueEncodingContainer {
    let writer: RecordWriter
    let depth: Int
    let path: PathLink?
    let start: Int

    var codingPath: [any CodingKey] { PathLink.codingPath(path) }

    mutating func encodeNil() throws {
        throw StateError.invalid(field: Place(path).description, reason: "an optional value on its own has no binary form")
    }

    mutating func encode<T: Encodable>(_ value: T) throws {
        guard writer.bytes.count == start else {
            throw StateError.invalid(field: Place(path).description, reason: "a single value written after others")
        }
        try writer.encodeValue(value, depth: depth, place: Place(path))
    }
}

// MARK: decoding

final class Cursor {
    let bytes: [UInt8]
    var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - offset }

    func integer<T: FixedWidthInteger>(_ type: T.Type, _ place: Place) throws(StateError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw .truncated(field: place.description) }
        let value = bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
        offset += size
        return value
    }

    /// The length of the string at the cursor, checked against the limit and the bytes left.
    private func stringLength(_ place: Place) throws(StateError) -> Int {
        let count = Int(try integer(UInt32.self, place))
        guard count <= BinaryRecord.stringLimit else {
            throw .invalid(field: place.description, reason: "a string of \(count) bytes, more than the \(BinaryRecord.stringLimit) allowed")
        }
        guard remaining >= count else { throw .truncated(field: place.description) }
        return count
    }

    func string(_ place: Place) throws(StateError) -> String {
        let count = try stringLength(place)
        guard let text = String(validating: bytes[offset..<offset + count], as: UTF8.self) else {
            throw .invalid(field: place.description, reason: "not UTF-8")
        }
        offset += count
        return text
    }

    /// Reads the string at the cursor when it is `expected`, without making a String of it; a
    /// different one is left unread. Nil: the string's bytes are not even there.
    func consume(_ expected: String, _ place: Place) throws(StateError) -> Bool {
        let start = offset
        let count = try stringLength(place)
        var expected = expected
        let matches = expected.withUTF8 { wanted in
            wanted.count == count && bytes[offset..<offset + count].elementsEqual(wanted)
        }
        offset = matches ? offset + count : start
        return matches
    }

    /// Whether the string at the cursor is `expected`; the cursor stays.
    func peek(_ expected: String, _ place: Place) -> Bool {
        let start = offset
        defer { offset = start }
        return (try? consume(expected, place)) ?? false
    }

    /// A count of things that follow, each at least `minimumSize` bytes: never more than the
    /// bytes left can hold.
    func count(_ place: Place, minimumSize: Int) throws(StateError) -> Int {
        let count = Int(try integer(UInt32.self, place))
        guard count <= remaining / max(minimumSize, 1) else {
            throw .invalid(field: place.description, reason: "says \(count) items, more than the \(remaining) bytes left can hold")
        }
        return count
    }
}

struct RecordDecoder: Decoder {
    let cursor: Cursor
    let path: PathLink?

    var codingPath: [any CodingKey] { PathLink.codingPath(path) }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        // Each field is at least its name's length (4 bytes) and one byte of value.
        KeyedDecodingContainer(KeyedRecordDecoder<Key>(cursor: cursor, path: path,
                                                       remainingFields: try cursor.count(Place(path), minimumSize: 5)))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        UnkeyedRecordDecoder(cursor: cursor, path: path, count: try cursor.count(Place(path), minimumSize: 1))
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer { SingleRecordDecoder(cursor: cursor, path: path) }
}

func decodeValue<T: Decodable>(_ type: T.Type, cursor: Cursor, place: Place) throws -> T {
    guard let scalarType = recordScalarType(T.self) else {
        return try T(from: RecordDecoder(cursor: cursor, path: place.link))
    }
    guard let value = try scalarType.read(cursor, place) as? T else {
        throw StateError.invalid(field: place.description, reason: "not a \(T.self)")
    }
    return value
}

struct KeyedRecordDecoder<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let cursor: Cursor
    let path: PathLink?
    /// Fields of this value not read yet: a field name past them belongs to the enclosing value.
    let remainingFields: Counter

    final class Counter {
        var value: Int
        init(_ value: Int) { self.value = value }
    }

    init(cursor: Cursor, path: PathLink?, remainingFields: Int) {
        self.cursor = cursor
        self.path = path
        self.remainingFields = Counter(remainingFields)
    }

    var codingPath: [any CodingKey] { PathLink.codingPath(path) }

    /// The key of the value that follows (an enum's case has exactly one).
    var allKeys: [Key] {
        guard remainingFields.value > 0 else { return [] }
        let start = cursor.offset
        defer { cursor.offset = start }
        return (try? cursor.string(Place(path))).flatMap { Key(stringValue: $0) }.map { [$0] } ?? []
    }

    func contains(_ key: Key) -> Bool { remainingFields.value > 0 && cursor.peek(key.stringValue, Place(path, key)) }

    /// Consumes the next field's name, which must be `key`'s.
    private func enter(_ key: Key) throws(StateError) {
        let place = Place(path, key)
        guard remainingFields.value > 0 else { throw .invalid(field: place.description, reason: "missing") }
        guard try cursor.consume(key.stringValue, place) else {
            let name = try cursor.string(place)
            throw .invalid(field: place.description, reason: "found field '\(name.prefix(64))' where '\(key.stringValue)' belongs")
        }
        remainingFields.value -= 1
    }

    func decodeNil(forKey key: Key) throws -> Bool { !contains(key) }

    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        try enter(key)
        return try decodeValue(type, cursor: cursor, place: Place(path, key))
    }

    private func take<S: RecordScalar>(_ type: S.Type, _ key: Key) throws(StateError) -> S {
        try enter(key)
        return try S.read(cursor, Place(path, key))
    }
    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool { try take(type, key) }
    func decode(_ type: String.Type, forKey key: Key) throws -> String { try take(type, key) }
    func decode(_ type: Double.Type, forKey key: Key) throws -> Double { try take(type, key) }
    func decode(_ type: Float.Type, forKey key: Key) throws -> Float { try take(type, key) }
    func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try take(type, key) }
    func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try take(type, key) }
    func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try take(type, key) }
    func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try take(type, key) }
    func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try take(type, key) }
    func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try take(type, key) }
    func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try take(type, key) }
    func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try take(type, key) }
    func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try take(type, key) }
    func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try take(type, key) }

    func decodeIfPresent<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T? {
        contains(key) ? try decode(type, forKey: key) : nil
    }

    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        try enter(key)
        return try RecordDecoder(cursor: cursor, path: Place(path, key).link).container(keyedBy: type)
    }

    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
        try enter(key)
        return try RecordDecoder(cursor: cursor, path: Place(path, key).link).unkeyedContainer()
    }

    func superDecoder() throws -> any Decoder { RecordDecoder(cursor: cursor, path: path) }

    func superDecoder(forKey key: Key) throws -> any Decoder {
        try enter(key)
        return RecordDecoder(cursor: cursor, path: Place(path, key).link)
    }
}

struct UnkeyedRecordDecoder: UnkeyedDecodingContainer {
    let cursor: Cursor
    let path: PathLink?
    let total: Int
    var currentIndex = 0

    init(cursor: Cursor, path: PathLink?, count: Int) {
        self.cursor = cursor
        self.path = path
        total = count
    }

    var codingPath: [any CodingKey] { PathLink.codingPath(path) }
    var count: Int? { total }
    var isAtEnd: Bool { currentIndex >= total }
    private var place: Place { Place(path, IndexKey(intValue: currentIndex)) }

    mutating func decodeNil() throws -> Bool { false }

    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        guard !isAtEnd else { throw StateError.invalid(field: place.description, reason: "past the list's end") }
        let value = try decodeValue(type, cursor: cursor, place: place)
        currentIndex += 1
        return value
    }

    private mutating func take<S: RecordScalar>(_ type: S.Type) throws(StateError) -> S {
        guard !isAtEnd else { throw .invalid(field: place.description, reason: "past the list's end") }
        let value = try S.read(cursor, place)
        currentIndex += 1
        return value
    }
    mutating func decode(_ type: Bool.Type) throws -> Bool { try take(type) }
    mutating func decode(_ type: String.Type) throws -> String { try take(type) }
    mutating func decode(_ type: Double.Type) throws -> Double { try take(type) }
    mutating func decode(_ type: Float.Type) throws -> Float { try take(type) }
    mutating func decode(_ type: Int.Type) throws -> Int { try take(type) }
    mutating func decode(_ type: Int8.Type) throws -> Int8 { try take(type) }
    mutating func decode(_ type: Int16.Type) throws -> Int16 { try take(type) }
    mutating func decode(_ type: Int32.Type) throws -> Int32 { try take(type) }
    mutating func decode(_ type: Int64.Type) throws -> Int64 { try take(type) }
    mutating func decode(_ type: UInt.Type) throws -> UInt { try take(type) }
    mutating func decode(_ type: UInt8.Type) throws -> UInt8 { try take(type) }
    mutating func decode(_ type: UInt16.Type) throws -> UInt16 { try take(type) }
    mutating func decode(_ type: UInt32.Type) throws -> UInt32 { try take(type) }
    mutating func decode(_ type: UInt64.Type) throws -> UInt64 { try take(type) }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        let container = try RecordDecoder(cursor: cursor, path: place.link).container(keyedBy: type)
        currentIndex += 1
        return container
    }

    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
        let container = try RecordDecoder(cursor: cursor, path: place.link).unkeyedContainer()
        currentIndex += 1
        return container
    }

    mutating func superDecoder() throws -> any Decoder {
        defer { currentIndex += 1 }
        return RecordDecoder(cursor: cursor, path: place.link)
    }
}

struct SingleRecordDecoder: SingleValueDecodingContainer {
    let cursor: Cursor
    let path: PathLink?

    var codingPath: [any CodingKey] { PathLink.codingPath(path) }

    func decodeNil() -> Bool { false }

    func decode<T: Decodable>(_ type: T.Type) throws -> T { try decodeValue(type, cursor: cursor, place: Place(path)) }
}
