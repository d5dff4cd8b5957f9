import KVM
import X86Boot

extension CPUModel {
    /// KVM's supported CPUID as this model shows it: `baseline` hides what x86-64-v2 does not
    /// have; `-feature` clears a bit; `+feature` keeps one `baseline` hid, and is refused when this
    /// host's KVM cannot offer it.
    public func apply(to supported: [CPUIDEntry]) throws(VMMError) -> [CPUIDEntry] {
        var entries = supported
        func update(_ function: UInt32, _ index: UInt32, _ body: (inout CPUIDEntry) -> Void) {
            for position in entries.indices where entries[position].function == function && entries[position].index == index {
                body(&entries[position])
            }
        }
        if base == .baseline {
            func mask(_ function: UInt32, _ register: CPUFeature.Register) -> UInt32 {
                CPUFeature.all.filter { $0.function == function && $0.register == register && CPUFeature.baseline.contains($0.name) }
                    .reduce(UInt32(0)) { $0 | (1 << $1.bit) }
            }
            update(1, 0) { $0.ecx &= mask(1, .ecx) }
            update(7, 0) { $0.ebx = 0; $0.ecx = 0; $0.edx = 0 }
            update(0x8000_0001, 0) { entry in
                entry.ecx &= mask(0x8000_0001, .ecx)
                entry.edx &= ~(UInt32(1) << 26 | UInt32(1) << 27)     // pdpe1gb, rdtscp
            }
            update(0x4000_0001, 0) { $0.eax &= mask(0x4000_0001, .eax) }
        }
        for feature in enabled {
            guard Self.bit(feature, in: supported) else {
                throw .invalidConfiguration(field: "--cpu", reason: "+\(feature.name): this host's KVM does not offer it (CPUID.(0x\(String(feature.function, radix: 16)),\(feature.index)).\(feature.register.rawValue)[\(feature.bit)])")
            }
            update(feature.function, feature.index) { Self.set(feature, in: &$0, to: true) }
        }
        for feature in disabled {
            update(feature.function, feature.index) { Self.set(feature, in: &$0, to: false) }
        }
        return entries
    }

    static func bit(_ feature: CPUFeature, in entries: [CPUIDEntry]) -> Bool {
        guard let entry = entries.first(where: { $0.function == feature.function && $0.index == feature.index }) else { return false }
        let word: UInt32
        switch feature.register {
        case .eax: word = entry.eax
        case .ebx: word = entry.ebx
        case .ecx: word = entry.ecx
        case .edx: word = entry.edx
        }
        return word & (1 << feature.bit) != 0
    }

    static func set(_ feature: CPUFeature, in entry: inout CPUIDEntry, to value: Bool) {
        let bit = UInt32(1) << feature.bit
        switch feature.register {
        case .eax: entry.eax = value ? entry.eax | bit : entry.eax & ~bit
        case .ebx: entry.ebx = value ? entry.ebx | bit : entry.ebx & ~bit
        case .ecx: entry.ecx = value ? entry.ecx | bit : entry.ecx & ~bit
        case .edx: entry.edx = value ? entry.edx | bit : entry.edx & ~bit
        }
    }
}
