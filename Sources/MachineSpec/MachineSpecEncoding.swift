/// The spec's binary form: how the kvm engine hands a VMM its whole machine (an inherited,
/// sealed memfd: `vireo-vmm --spec-fd N`), and the machine a saved state or a migration stream
/// was taken from. A BinaryRecord, read back under every rule in `MachineRules`, since a saved
/// state or a peer's stream is hostile input. The flag form (MachineSpecArguments.swift) is what
/// people type; this one is what programs pass.
extension MachineSpec {
    /// Bumped whenever the layout changes; a reader refuses any other.
    static let encodingVersion: UInt16 = 1
    /// More than any machine's spec needs (17 devices, 16 layers each, 4 KiB paths).
    public static let encodedLimit = 1 << 20

    /// The spec, versioned, as a BinaryRecord: the compiler writes both directions from the
    /// fields' declarations, so a new field cannot be written and forgotten on reading.
    public func encoded() throws(MachineSpecError) -> [UInt8] {
        do {
            return try BinaryRecord.encode(Envelope(spec: self))
        } catch {
            throw MachineSpecError(argument: "machine spec", error.description)
        }
    }

    /// A spec from its binary form, refused (naming the field) unless it is whole, alone, of
    /// this version and obeys every machine rule.
    public init(decoding bytes: [UInt8]) throws(MachineSpecError) {
        guard bytes.count <= Self.encodedLimit else {
            throw MachineSpecError(argument: "machine spec", "\(bytes.count) bytes, more than the \(Self.encodedLimit) a spec can take")
        }
        do throws(StateError) {
            self = try BinaryRecord.decode(Envelope.self, from: bytes).spec
        } catch {
            throw MachineSpecError(argument: "machine spec", error.description)
        }
        try MachineRules.check(self)
    }

    /// The version in front of the spec: read first, so another layout is refused by its version
    /// rather than by whichever field first differs.
    struct Envelope: Codable {
        var machineSpecVersion = MachineSpec.encodingVersion
        var spec: MachineSpec

        init(spec: MachineSpec) { self.spec = spec }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            machineSpecVersion = try container.decode(UInt16.self, forKey: .machineSpecVersion)
            guard machineSpecVersion == MachineSpec.encodingVersion else {
                throw StateError.invalid(field: "machineSpecVersion", reason: "\(machineSpecVersion) is not the \(MachineSpec.encodingVersion) this Vireo reads")
            }
            spec = try container.decode(MachineSpec.self, forKey: .spec)
        }
    }
}
