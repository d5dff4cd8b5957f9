/// A list of fixed-size entries written as one byte string of whole entries instead of a list of
/// keyed values: a vCPU's MSRs and KVM's CPUID table are hundreds of small fields together, most
/// of a machine's state record and most of the time spent writing it, which a live migration
/// spends with the VM paused. `@PackedList var cpuid: [CPUIDEntry]` keeps the field an array.
@propertyWrapper
public struct PackedList<Entry: PackedEntry>: Codable {
    public var wrappedValue: [Entry]

    public init(wrappedValue: [Entry]) { self.wrappedValue = wrappedValue }

    public func encode(to encoder: any Encoder) throws {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(wrappedValue.count * Entry.packedSize)
        for entry in wrappedValue { entry.pack(into: &bytes) }
        var container = encoder.singleValueContainer()
        try container.encode(bytes)
    }

    public init(from decoder: any Decoder) throws {
        let bytes = try decoder.singleValueContainer().decode([UInt8].self)
        let size = Entry.packedSize
        guard size > 0, bytes.count % size == 0 else {
            throw StateError.invalid(field: BinaryRecord.path(decoder.codingPath), reason: "\(bytes.count) bytes, not a whole number of \(size)-byte entries")
        }
        wrappedValue = bytes.withUnsafeBytes { raw in
            stride(from: 0, to: raw.count, by: size).map { Entry(unpacking: UnsafeRawBufferPointer(rebasing: raw[$0..<$0 + size])) }
        }
    }
}

/// An entry of a `PackedList`: always `packedSize` bytes of little-endian integers.
public protocol PackedEntry {
    static var packedSize: Int { get }
    func pack(into bytes: inout [UInt8])
    /// From exactly `packedSize` bytes (the list has checked there are that many).
    init(unpacking bytes: UnsafeRawBufferPointer)
}

extension PackedEntry {
    /// Appends `value` little-endian, for `pack(into:)`.
    public static func put<T: FixedWidthInteger>(_ value: T, into bytes: inout [UInt8]) { appendLittleEndian(value, to: &bytes) }

    /// The little-endian integer at `offset`, for `init(unpacking:)`.
    public static func integer<T: FixedWidthInteger>(_ type: T.Type, at offset: Int, in bytes: UnsafeRawBufferPointer) -> T {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= packedSize, "a packed entry's field lies outside its \(packedSize) bytes")
        return T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}
