import MachineSpec
import Testing

/// BinaryRecord writes and reads `Codable` values from their declarations alone; what it reads
/// comes from saved states and migration peers, so every damaged record must be refused, naming
/// the field, without trapping.
@Suite struct BinaryRecordTests {
    enum Kind: Codable, Equatable {
        case plain
        case sized(bytes: UInt64)
        case named(String, Int32)
    }
    enum Color: String, Codable { case red, green }
    struct Inner: Codable, Equatable {
        var id: Int16
        /// An optional that, left out, must not take the enclosing value's field of the same name.
        var note: String?
    }
    struct Outer: Codable, Equatable {
        var flag: Bool
        var count: Int
        var big: UInt64
        var ratio: Double
        var inner: Inner
        var note: String?
        var bytes: [UInt8]
        var kinds: [Kind]
        var color: Color
        var nested: [[UInt16]]
    }

    static let sample = Outer(flag: true, count: -5, big: .max, ratio: 0.25, inner: Inner(id: 7, note: nil), note: "outer",
                              bytes: [0, 1, 255], kinds: [.plain, .sized(bytes: 1 << 40), .named("x", -1)], color: .green,
                              nested: [[1, 2], [], [3]])

    @Test func everyKindOfFieldSurvives() throws {
        let bytes = try BinaryRecord.encode(Self.sample)
        #expect(try BinaryRecord.decode(Outer.self, from: bytes) == Self.sample)
        var other = Self.sample
        other.inner.note = "inner"
        other.note = nil
        #expect(try BinaryRecord.decode(Outer.self, from: try BinaryRecord.encode(other)) == other)
    }

    @Test func everyTruncationAndTrailingByteIsRefused() throws {
        let bytes = try BinaryRecord.encode(Self.sample)
        for length in 0..<bytes.count {
            #expect(throws: StateError.self, "\(length) of \(bytes.count)") { _ = try BinaryRecord.decode(Outer.self, from: Array(bytes[0..<length])) }
        }
        #expect(throws: StateError.invalid(field: "record", reason: "1 bytes follow its last field")) {
            _ = try BinaryRecord.decode(Outer.self, from: bytes + [0])
        }
    }

    /// A flipped byte anywhere is refused or read as some other valid value; never a trap.
    @Test func everyFlippedByteIsHandled() throws {
        let bytes = try BinaryRecord.encode(Self.sample)
        for index in bytes.indices {
            var damaged = bytes
            damaged[index] ^= 0xff
            _ = try? BinaryRecord.decode(Outer.self, from: damaged)
        }
    }

    @Test func refusalsNameTheField() throws {
        struct Renamed: Codable { var flag: Bool; var total: Int }
        struct Bad: Codable { var flag: UInt8 }
        let bytes = try BinaryRecord.encode(Renamed(flag: true, total: 1))
        #expect(throws: StateError.invalid(field: "count", reason: "found field 'total' where 'count' belongs")) {
            _ = try BinaryRecord.decode(Outer.self, from: bytes)
        }
        #expect(throws: StateError.invalid(field: "flag", reason: "2 is not a boolean (0 or 1)")) {
            _ = try BinaryRecord.decode(Renamed.self, from: try BinaryRecord.encode(Bad(flag: 2)))
        }
        // A list that claims more items than bytes left is refused before anything is allocated.
        struct List: Codable { var items: [UInt32] }
        var huge = try BinaryRecord.encode(List(items: []))
        huge.replaceSubrange(huge.count - 4..<huge.count, with: [0xff, 0xff, 0xff, 0x7f])
        #expect(throws: StateError.invalid(field: "items", reason: "says 2147483647 items, more than the 0 bytes left can hold")) {
            _ = try BinaryRecord.decode(List.self, from: huge)
        }
        #expect(throws: StateError.self) { _ = try BinaryRecord.encode([Optional<Int>.none]) }
    }
}
