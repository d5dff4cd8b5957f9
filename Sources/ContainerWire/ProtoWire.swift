// Protocol Buffers' wire format, the part containerd's shim API and Vireo's container agent use:
// varints, length-delimited fields, and skipping what a reader does not know. No Foundation: the
// agent that shares it is PID 1 in a small initramfs. Generated code (swift-protobuf's plugin)
// would cost a 9.5-minute first build here for some thirty small messages; these are written from
// containerd's .proto files instead, each field by its number (ContainerdMessages.swift).

public struct ProtoError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Builds a message. proto3 leaves default values (0, false, "") off the wire.
public struct ProtoWriter: Sendable {
    public private(set) var bytes: [UInt8] = []
    public init() {}

    public mutating func key(_ field: Int, _ wireType: UInt64) { rawVarint(UInt64(field) << 3 | wireType) }

    public mutating func rawVarint(_ value: UInt64) {
        var value = value
        while value >= 0x80 {
            bytes.append(UInt8(value & 0x7f) | 0x80)
            value >>= 7
        }
        bytes.append(UInt8(value))
    }

    public mutating func varint(_ field: Int, _ value: UInt64) {
        guard value != 0 else { return }
        key(field, 0)
        rawVarint(value)
    }

    public mutating func int64(_ field: Int, _ value: Int64) { varint(field, UInt64(bitPattern: value)) }
    public mutating func int32(_ field: Int, _ value: Int32) { varint(field, UInt64(bitPattern: Int64(value))) }
    public mutating func uint32(_ field: Int, _ value: UInt32) { varint(field, UInt64(value)) }
    public mutating func bool(_ field: Int, _ value: Bool) { varint(field, value ? 1 : 0) }

    public mutating func string(_ field: Int, _ value: String) {
        guard !value.isEmpty else { return }
        bytes(field, Array(value.utf8))
    }

    public mutating func strings(_ field: Int, _ values: [String]) {
        for value in values { bytes(field, Array(value.utf8), always: true) }
    }

    public mutating func bytes(_ field: Int, _ value: [UInt8], always: Bool = false) {
        guard always || !value.isEmpty else { return }
        key(field, 2)
        rawVarint(UInt64(value.count))
        bytes.append(contentsOf: value)
    }

    /// A nested message, written even when empty (its presence can matter).
    public mutating func message(_ field: Int, _ value: ProtoWriter) { bytes(field, value.bytes, always: true) }
}

/// One field as read.
public enum ProtoValue: Sendable {
    case varint(UInt64)
    case fixed64(UInt64)
    case fixed32(UInt32)
    case bytes([UInt8])
}

/// A decoded message: every field by number, repeated fields in order. Unknown fields are kept
/// and ignored, as protobuf readers do.
public struct ProtoMessage: Sendable {
    public private(set) var fields: [Int: [ProtoValue]] = [:]

    /// Messages larger than this are refused before any allocation follows a length.
    public static let maximumLength = 16 << 20

    public init(_ bytes: [UInt8]) throws(ProtoError) { try self.init(bytes[...]) }

    public init(_ bytes: ArraySlice<UInt8>) throws(ProtoError) {
        guard bytes.count <= Self.maximumLength else { throw ProtoError("a message of \(bytes.count) bytes is over the limit of \(Self.maximumLength)") }
        var index = bytes.startIndex
        func varint() throws(ProtoError) -> UInt64 {
            var result: UInt64 = 0
            var shift: UInt64 = 0
            while true {
                guard index < bytes.endIndex else { throw ProtoError("a varint runs past the end of the message") }
                let byte = bytes[index]
                index += 1
                guard shift < 64 else { throw ProtoError("a varint is longer than 10 bytes") }
                result |= UInt64(byte & 0x7f) << shift
                if byte & 0x80 == 0 { return result }
                shift += 7
            }
        }
        func littleEndian(_ count: Int, field: Int) throws(ProtoError) -> UInt64 {
            guard bytes.endIndex - index >= count else { throw ProtoError("field \(field) (fixed, \(count) bytes) runs past the end") }
            var result: UInt64 = 0
            for offset in 0..<count { result |= UInt64(bytes[index + offset]) << (8 * UInt64(offset)) }
            index += count
            return result
        }
        while index < bytes.endIndex {
            let key = try varint()
            let field = Int(truncatingIfNeeded: key >> 3)
            guard field > 0, field < 1 << 29 else { throw ProtoError("field number \(key >> 3) is out of range") }
            let value: ProtoValue
            switch key & 7 {
            case 0: value = .varint(try varint())
            case 1: value = .fixed64(try littleEndian(8, field: field))
            case 2:
                let length = try varint()
                guard length <= UInt64(bytes.endIndex - index) else { throw ProtoError("field \(field)'s length \(length) runs past the end") }
                value = .bytes(Array(bytes[index..<index + Int(length)]))
                index += Int(length)
            case 5: value = .fixed32(UInt32(try littleEndian(4, field: field)))
            default: throw ProtoError("field \(field) has wire type \(key & 7), which proto3 does not use")
            }
            fields[field, default: []].append(value)
        }
    }

    public func varint(_ field: Int) -> UInt64 {
        guard case let .varint(value)? = fields[field]?.last else { return 0 }
        return value
    }

    public func uint32(_ field: Int) -> UInt32 { UInt32(truncatingIfNeeded: varint(field)) }
    public func int32(_ field: Int) -> Int32 { Int32(truncatingIfNeeded: Int64(bitPattern: varint(field))) }
    public func int64(_ field: Int) -> Int64 { Int64(bitPattern: varint(field)) }
    public func bool(_ field: Int) -> Bool { varint(field) != 0 }

    public func bytes(_ field: Int) -> [UInt8] {
        guard case let .bytes(value)? = fields[field]?.last else { return [] }
        return value
    }

    public func string(_ field: Int) -> String { String(decoding: bytes(field), as: UTF8.self) }

    public func repeatedBytes(_ field: Int) -> [[UInt8]] {
        (fields[field] ?? []).compactMap { if case let .bytes(value) = $0 { value } else { nil } }
    }

    public func strings(_ field: Int) -> [String] { repeatedBytes(field).map { String(decoding: $0, as: UTF8.self) } }

    /// Packed or unpacked repeated varints.
    public func repeatedVarints(_ field: Int) throws(ProtoError) -> [UInt64] {
        var result: [UInt64] = []
        for value in fields[field] ?? [] {
            switch value {
            case let .varint(number): result.append(number)
            case let .bytes(packed):
                var index = 0
                while index < packed.count {
                    var number: UInt64 = 0, shift: UInt64 = 0
                    while true {
                        guard index < packed.count, shift < 64 else { throw ProtoError("field \(field)'s packed varints are cut short") }
                        let byte = packed[index]
                        index += 1
                        number |= UInt64(byte & 0x7f) << shift
                        if byte & 0x80 == 0 { break }
                        shift += 7
                    }
                    result.append(number)
                }
            default: throw ProtoError("field \(field) is not a varint")
            }
        }
        return result
    }

    public func message(_ field: Int) throws(ProtoError) -> ProtoMessage? {
        guard fields[field] != nil else { return nil }
        return try ProtoMessage(bytes(field))
    }

    public func messages(_ field: Int) throws(ProtoError) -> [ProtoMessage] {
        var result: [ProtoMessage] = []
        for value in repeatedBytes(field) { result.append(try ProtoMessage(value)) }
        return result
    }
}
