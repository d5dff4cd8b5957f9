/// A small builder for ACPI Machine Language (ACPI 6.5 §20): the named objects, packages,
/// buffers, resource templates and methods Vireo's DSDT needs, each encoded from the grammar,
/// never pasted in as opaque bytes. Every value is a term that knows its own encoding; `iasl -d`
/// is the oracle the tests hold the result to.
public protocol AMLTerm: Sendable {
    var aml: [UInt8] { get }
}

/// A name path: `\_SB.PWRB`, `_HID`, `^VR00`. Segments shorter than four characters are padded
/// with '_', as ASL does.
public struct AMLName: AMLTerm, ExpressibleByStringLiteral, Equatable {
    public let text: String

    public init(_ text: String) { self.text = text }
    public init(stringLiteral value: String) { self.text = value }

    public var aml: [UInt8] {
        var bytes: [UInt8] = []
        var rest = Substring(text)
        while let first = rest.first, first == "\\" || first == "^" {
            bytes.append(UInt8(ascii: first == "\\" ? "\\" : "^"))
            rest = rest.dropFirst()
        }
        let segments = rest.split(separator: ".").map { segment -> [UInt8] in
            precondition(segment.utf8.count <= 4 && !segment.isEmpty, "AML name segment '\(segment)' must be 1 to 4 characters")
            return Array(segment.utf8) + [UInt8](repeating: UInt8(ascii: "_"), count: 4 - segment.utf8.count)
        }
        switch segments.count {
        case 0: bytes.append(0x00)                                   // NullName
        case 1: bytes += segments[0]
        case 2: bytes.append(0x2e); bytes += segments[0] + segments[1]   // DualNamePrefix
        default:
            bytes += [0x2f, UInt8(segments.count)]                   // MultiNamePrefix
            for segment in segments { bytes += segment }
        }
        return bytes
    }
}

/// An integer constant in its shortest encoding (Zero, One, Ones, Byte/Word/DWord/QWordConst).
public struct AMLInteger: AMLTerm, ExpressibleByIntegerLiteral, Equatable {
    public let value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public init(integerLiteral value: UInt64) { self.value = value }

    public var aml: [UInt8] {
        switch value {
        case 0: return [0x00]
        case 1: return [0x01]
        case 0x2...0xff: return [0x0a, UInt8(value)]
        case 0x100...0xffff: return [0x0b] + littleEndian(value, count: 2)
        case 0x1_0000...0xffff_ffff: return [0x0c] + littleEndian(value, count: 4)
        default: return [0x0e] + littleEndian(value, count: 8)
        }
    }
}

/// A DWordConst even for small values, so the value's bytes sit at a fixed place (the VM
/// generation ID's address is read this way by guests that scan rather than interpret AML).
public struct AMLDWord: AMLTerm {
    public let value: UInt32
    public init(_ value: UInt32) { self.value = value }
    public var aml: [UInt8] { [0x0c] + littleEndian(UInt64(value), count: 4) }
}

public struct AMLString: AMLTerm, ExpressibleByStringLiteral {
    public let text: String
    public init(_ text: String) { self.text = text }
    public init(stringLiteral value: String) { self.text = value }
    public var aml: [UInt8] {
        precondition(text.utf8.allSatisfy { $0 > 0 && $0 < 0x80 }, "AML strings are 7-bit ASCII without NUL")
        return [0x0d] + Array(text.utf8) + [0x00]
    }
}

/// `EISAID("PNP0501")`: the compressed 32-bit form of a PNP ID.
public struct AMLEISAID: AMLTerm {
    public let id: String
    public init(_ id: String) { self.id = id }

    public var value: UInt32 {
        let bytes = Array(id.utf8)
        precondition(bytes.count == 7, "an EISA ID is three letters and four hex digits")
        func letter(_ byte: UInt8) -> UInt32 { UInt32(byte - 0x40) & 0x1f }
        func hex(_ byte: UInt8) -> UInt32 {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return UInt32(byte - UInt8(ascii: "0"))
            default: return UInt32((byte | 0x20) - UInt8(ascii: "a") + 10)
            }
        }
        let high = (letter(bytes[0]) << 10) | (letter(bytes[1]) << 5) | letter(bytes[2])
        let product = (hex(bytes[3]) << 12) | (hex(bytes[4]) << 8) | (hex(bytes[5]) << 4) | hex(bytes[6])
        // Stored big-endian within the little-endian DWORD, as the spec's compression defines.
        let raw = (high << 16) | product
        return ((raw >> 24) & 0xff) | ((raw >> 8) & 0xff00) | ((raw << 8) & 0xff_0000) | ((raw << 24) & 0xff00_0000)
    }

    public var aml: [UInt8] { AMLDWord(value).aml }
}

/// `Name(NAME, object)`.
public struct AMLNamed: AMLTerm {
    public let name: AMLName
    public let object: any AMLTerm
    public init(_ name: AMLName, _ object: any AMLTerm) { self.name = name; self.object = object }
    public var aml: [UInt8] { [0x08] + name.aml + object.aml }
}

/// `Package(){...}` of data objects.
public struct AMLPackage: AMLTerm {
    public let elements: [any AMLTerm]
    public init(_ elements: [any AMLTerm]) { self.elements = elements }
    public var aml: [UInt8] {
        precondition(elements.count <= 255, "a Package holds at most 255 elements")
        return [0x12] + withPackageLength([UInt8(elements.count)] + elements.flatMap(\.aml))
    }
}

/// `Buffer(){...}` of raw bytes.
public struct AMLBuffer: AMLTerm {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var aml: [UInt8] { [0x11] + withPackageLength(AMLInteger(UInt64(bytes.count)).aml + bytes) }
}

/// `Scope(name){...}`.
public struct AMLScope: AMLTerm {
    public let name: AMLName
    public let body: [any AMLTerm]
    public init(_ name: AMLName, _ body: [any AMLTerm]) { self.name = name; self.body = body }
    public var aml: [UInt8] { [0x10] + withPackageLength(name.aml + body.flatMap(\.aml)) }
}

/// `Device(name){...}`.
public struct AMLDevice: AMLTerm {
    public let name: AMLName
    public let body: [any AMLTerm]
    public init(_ name: AMLName, _ body: [any AMLTerm]) { self.name = name; self.body = body }
    public var aml: [UInt8] { [0x5b, 0x82] + withPackageLength(name.aml + body.flatMap(\.aml)) }
}

/// `Method(name, arguments, NotSerialized){...}`.
public struct AMLMethod: AMLTerm {
    public let name: AMLName
    public let argumentCount: UInt8
    public let body: [any AMLTerm]
    public init(_ name: AMLName, arguments: UInt8, _ body: [any AMLTerm]) {
        precondition(arguments <= 7, "an AML method takes at most 7 arguments")
        self.name = name; self.argumentCount = arguments; self.body = body
    }
    public var aml: [UInt8] { [0x14] + withPackageLength(name.aml + [argumentCount & 0x7] + body.flatMap(\.aml)) }
}

/// Address spaces of an `OperationRegion`.
public enum AMLRegionSpace: UInt8, Sendable { case systemMemory = 0, systemIO = 1 }

/// `OperationRegion(name, space, offset, length)`.
public struct AMLOperationRegion: AMLTerm {
    public let name: AMLName
    public let space: AMLRegionSpace
    public let offset: UInt64
    public let length: UInt64
    public init(_ name: AMLName, space: AMLRegionSpace, offset: UInt64, length: UInt64) {
        self.name = name; self.space = space; self.offset = offset; self.length = length
    }
    public var aml: [UInt8] {
        [0x5b, 0x80] + name.aml + [space.rawValue] + AMLInteger(offset).aml + AMLInteger(length).aml
    }
}

/// `Field(region, ByteAcc, NoLock, Preserve){ name, bits, ... }`.
public struct AMLField: AMLTerm {
    public let region: AMLName
    public let units: [(name: String, bits: UInt32)]
    public init(_ region: AMLName, _ units: [(name: String, bits: UInt32)]) { self.region = region; self.units = units }
    public var aml: [UInt8] {
        var list: [UInt8] = []
        for unit in units {
            precondition(unit.name.utf8.count == 4, "field unit names are one 4-character segment")
            list += Array(unit.name.utf8) + encodePackageLength(Int(unit.bits), includingItself: false)
        }
        // Flags: AccessType ByteAcc (1), NoLock, UpdateRule Preserve.
        return [0x5b, 0x81] + withPackageLength(region.aml + [0x01] + list)
    }
}

/// The operations the DSDT's methods use.
public indirect enum AMLExpression: AMLTerm {
    case local(UInt8)
    case argument(UInt8)
    case name(AMLName)
    case integer(UInt64)
    case and(AMLExpression, AMLExpression)
    case equal(AMLExpression, AMLExpression)

    public var aml: [UInt8] {
        switch self {
        case let .local(index): return [0x60 + (index & 7)]
        case let .argument(index): return [0x68 + min(index, 6)]
        case let .name(name): return name.aml
        case let .integer(value): return AMLInteger(value).aml
        case let .and(left, right): return [0x7b] + left.aml + right.aml + [0x00]   // no target
        case let .equal(left, right): return [0x93] + left.aml + right.aml
        }
    }
}

public struct AMLStore: AMLTerm {
    public let value: AMLExpression
    public let target: AMLExpression
    public init(_ value: AMLExpression, into target: AMLExpression) { self.value = value; self.target = target }
    public var aml: [UInt8] { [0x70] + value.aml + target.aml }
}

public struct AMLIf: AMLTerm {
    public let predicate: AMLExpression
    public let body: [any AMLTerm]
    public init(_ predicate: AMLExpression, _ body: [any AMLTerm]) { self.predicate = predicate; self.body = body }
    public var aml: [UInt8] { [0xa0] + withPackageLength(predicate.aml + body.flatMap(\.aml)) }
}

public struct AMLNotify: AMLTerm {
    public let object: AMLName
    public let value: UInt64
    public init(_ object: AMLName, _ value: UInt64) { self.object = object; self.value = value }
    public var aml: [UInt8] { [0x86] + object.aml + AMLInteger(value).aml }
}

public struct AMLReturn: AMLTerm {
    public let value: AMLExpression
    public init(_ value: AMLExpression) { self.value = value }
    public var aml: [UInt8] { [0xa4] + value.aml }
}

/// Resource descriptors for `_CRS` (ACPI 6.5 §6.4).
public enum AMLResource: Sendable, Equatable {
    /// `IO(Decode16, base, base, 1, length)`.
    case ioPort(base: UInt16, length: UInt8)
    /// `IRQNoFlags(){irq}`: an ISA interrupt, edge-triggered, active high.
    case isaInterrupt(UInt8)
    /// `Memory32Fixed(ReadWrite, base, length)`.
    case memory32Fixed(base: UInt32, length: UInt32)
    /// `Interrupt(ResourceConsumer, Edge|Level, ActiveHigh, Exclusive){gsi}`.
    case interrupt(gsi: UInt32, edgeTriggered: Bool)

    var bytes: [UInt8] {
        switch self {
        case let .ioPort(base, length):
            return [0x47, 0x01] + littleEndian(UInt64(base), count: 2) + littleEndian(UInt64(base), count: 2) + [0x01, length]
        case let .isaInterrupt(irq):
            precondition(irq < 16, "an ISA IRQ is 0-15")
            return [0x22] + littleEndian(UInt64(1) << irq, count: 2)
        case let .memory32Fixed(base, length):
            return [0x86, 0x09, 0x00, 0x01] + littleEndian(UInt64(base), count: 4) + littleEndian(UInt64(length), count: 4)
        case let .interrupt(gsi, edge):
            // Flags: consumer (bit 0), edge (bit 1); active high and exclusive are zero bits.
            return [0x89, 0x06, 0x00, 0x01 | (edge ? 0x02 : 0x00), 0x01] + littleEndian(UInt64(gsi), count: 4)
        }
    }
}

/// `ResourceTemplate(){...}`: a Buffer of descriptors closed by an End Tag whose checksum is zero
/// ("treated as correct", as iasl emits it).
public struct AMLResourceTemplate: AMLTerm {
    public let resources: [AMLResource]
    public init(_ resources: [AMLResource]) { self.resources = resources }
    public var aml: [UInt8] { AMLBuffer(resources.flatMap(\.bytes) + [0x79, 0x00]).aml }
}

/// PkgLength (§20.2.4): one byte below 64, else a lead byte carrying the count of following bytes
/// and the low nibble, then the rest eight bits at a time. The length covers itself.
func encodePackageLength(_ length: Int, includingItself: Bool) -> [UInt8] {
    precondition(length >= 0 && length < 1 << 28, "AML package too large")
    if !includingItself {
        if length < 64 { return [UInt8(length)] }
        for extra in 1...3 where length < 1 << (4 + 8 * extra) {
            return [UInt8(extra << 6) | UInt8(length & 0xf)] + (0..<extra).map { UInt8(truncatingIfNeeded: length >> (4 + 8 * $0)) }
        }
        preconditionFailure("unreachable")
    }
    if length + 1 < 64 { return [UInt8(length + 1)] }
    for extra in 1...3 {
        let total = length + 1 + extra
        if total < 1 << (4 + 8 * extra) {
            return [UInt8(extra << 6) | UInt8(total & 0xf)] + (0..<extra).map { UInt8(truncatingIfNeeded: total >> (4 + 8 * $0)) }
        }
    }
    preconditionFailure("AML package too large")
}

func withPackageLength(_ body: [UInt8]) -> [UInt8] {
    encodePackageLength(body.count, includingItself: true) + body
}

func littleEndian(_ value: UInt64, count: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
}
