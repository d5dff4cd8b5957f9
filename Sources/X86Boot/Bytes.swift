/// Little-endian field access on a byte array with explicit bounds: image headers come from
/// untrusted files, so a short or lying file must yield nil, never a trap.
extension Array where Element == UInt8 {
    func le<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T? {
        let size = MemoryLayout<T>.size
        guard offset >= 0, offset <= count - size else { return nil }
        var value: T = 0
        for index in 0..<size { value |= T(self[offset + index]) << (8 * index) }
        return value
    }

    mutating func setLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        let size = MemoryLayout<T>.size
        precondition(offset >= 0 && offset + size <= count, "fixed-layout write outside its own buffer")
        for index in 0..<size { self[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }

    mutating func append<T: FixedWidthInteger>(le value: T) {
        for index in 0..<MemoryLayout<T>.size { append(UInt8(truncatingIfNeeded: value >> (8 * index))) }
    }
}

/// The byte that makes a table's bytes sum to zero (MP and ACPI tables).
func checksumByte<S: Sequence>(_ bytes: S) -> UInt8 where S.Element == UInt8 {
    let sum = bytes.reduce(UInt8(0)) { $0 &+ $1 }
    return 0 &- sum
}
