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

    /// The form is what saved states and migration streams hold: the writer may change, the bytes
    /// may not (these are the first writer's, a tree built then written out).
    @Test func theFormIsStable() throws {
        let hex = try BinaryRecord.encode(Self.sample).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        #expect(hex == "0a00000004000000666c61670105000000636f756e74fbffffffffffffff03000000626967ffffffffffffffff05000000726174696f000000000000d03f05000000696e6e6572010000000200000069640700040000006e6f7465050000006f75746572050000006279746573030000000001ff050000006b696e6473030000000100000005000000706c61696e00000000010000000500000073697a656401000000050000006279746573000000000001000001000000050000006e616d656402000000020000005f300100000078020000005f31ffffffff05000000636f6c6f7205000000677265656e060000006e657374656403000000020000000100020000000000010000000300")
    }

    /// Containers used out of order (a later value's, then an earlier one's again) are refused:
    /// the one-pass writer cannot place the earlier one's item, and must not misplace it.
    @Test func containersWrittenOutOfOrderAreRefused() throws {
        struct Interleaved: Encodable {
            func encode(to encoder: any Encoder) throws {
                var outer = encoder.container(keyedBy: IndexKeyForTest.self)
                var first = outer.nestedUnkeyedContainer(forKey: IndexKeyForTest(stringValue: "a"))
                var second = outer.nestedUnkeyedContainer(forKey: IndexKeyForTest(stringValue: "b"))
                try second.encode(UInt8(1))
                try first.encode(UInt8(2))
            }
        }
        #expect(throws: StateError.invalid(field: "a[0]", reason: "written to a container that a later value closed; a record is written in one pass")) {
            _ = try BinaryRecord.encode(Interleaved())
        }
    }

    struct IndexKeyForTest: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    struct Pair: PackedEntry, Equatable {
        var low: UInt16
        var high: UInt32
        static let packedSize = 6
        func pack(into bytes: inout [UInt8]) { Self.put(low, into: &bytes); Self.put(high, into: &bytes) }
        init(low: UInt16, high: UInt32) { self.low = low; self.high = high }
        init(unpacking bytes: UnsafeRawBufferPointer) {
            self.init(low: Self.integer(UInt16.self, at: 0, in: bytes), high: Self.integer(UInt32.self, at: 2, in: bytes))
        }
    }
    struct Table: Codable { @PackedList var pairs: [Pair] }

    /// A packed list is one byte string of whole entries; a partial entry is refused by name.
    @Test func packedListsKeepTheirEntriesAndRefuseAPartialOne() throws {
        let table = Table(pairs: [Pair(low: 1, high: 0x0203_0405), Pair(low: 0xffff, high: 0)])
        let bytes = try BinaryRecord.encode(table)
        #expect(try BinaryRecord.decode(Table.self, from: bytes).pairs == table.pairs)
        // One field, "pairs", then 12 bytes: 4 + 4 + 5 + 4 + 12.
        #expect(bytes.count == 29 && Array(bytes[13..<17]) == [12, 0, 0, 0])
        var partial = bytes.dropLast()
        partial[13] = 11
        #expect(throws: StateError.invalid(field: "pairs", reason: "11 bytes, not a whole number of 6-byte entries")) {
            _ = try BinaryRecord.decode(Table.self, from: Array(partial))
        }
    }
}
