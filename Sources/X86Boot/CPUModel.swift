/// The CPU a VM's guest sees (`--cpu`, as QEMU's `-cpu` and Firecracker's CPU templates):
/// `host` (everything this host's KVM offers, the default), `baseline` (x86-64-v2: what any
/// x86-64 host of the last decade offers, so a saved or snapshotted guest can resume on another
/// host), either with `+feature` / `-feature` changes: `host,-avx512f,-kvm-pv-send-ipi`.
/// The VMM applies it to KVM's CPUID (docs/snapshots.md).
public struct CPUModel: Sendable, Equatable, CustomStringConvertible {
    public enum Base: String, Sendable {
        case host, baseline
    }

    public var base: Base
    public var enabled: [CPUFeature]
    public var disabled: [CPUFeature]

    public static let host = CPUModel(base: .host, enabled: [], disabled: [])

    public init(base: Base, enabled: [CPUFeature], disabled: [CPUFeature]) {
        self.base = base
        self.enabled = enabled
        self.disabled = disabled
    }

    public struct ParseError: Error, Sendable, CustomStringConvertible {
        public let description: String
    }

    public static let syntax = "host or baseline, then optional ,+FEATURE or ,-FEATURE (e.g. host,-avx512f,-kvm-pv-send-ipi)"

    public init(parsing text: String) throws(ParseError) {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let first = parts.first, let base = Base(rawValue: first) else {
            throw ParseError(description: "'\(text)' must start with host or baseline; \(Self.syntax)")
        }
        self.base = base
        enabled = []
        disabled = []
        for part in parts.dropFirst() {
            guard let sign = part.first, sign == "+" || sign == "-" else {
                throw ParseError(description: "'\(part)' must be +FEATURE or -FEATURE; \(Self.syntax)")
            }
            let name = String(part.dropFirst())
            guard let feature = CPUFeature.named(name) else {
                throw ParseError(description: "'\(name)' is not a CPU feature Vireo knows; known: \(CPUFeature.all.map(\.name).joined(separator: ", "))")
            }
            if sign == "+" { enabled.append(feature) } else { disabled.append(feature) }
        }
        if let both = enabled.first(where: { feature in disabled.contains(feature) }) {
            throw ParseError(description: "'\(both.name)' is both added and removed")
        }
    }

    public var description: String {
        ([base.rawValue] + enabled.map { "+" + $0.name } + disabled.map { "-" + $0.name }).joined(separator: ",")
    }
}

/// One CPUID feature bit, named as Linux's /proc/cpuinfo and QEMU's `-cpu` name it.
public struct CPUFeature: Sendable, Equatable {
    public enum Register: String, Sendable {
        case eax, ebx, ecx, edx
    }

    public let name: String
    public let function: UInt32
    public let index: UInt32
    public let register: Register
    public let bit: UInt32

    public static func named(_ name: String) -> CPUFeature? { all.first { $0.name == name } }

    private static func leaf(_ function: UInt32, _ index: UInt32, _ register: Register, _ bits: [(String, UInt32)]) -> [CPUFeature] {
        bits.map { CPUFeature(name: $0.0, function: function, index: index, register: register, bit: $0.1) }
    }

    public static let all: [CPUFeature] =
        leaf(1, 0, .ecx, [("sse3", 0), ("pclmulqdq", 1), ("ssse3", 9), ("fma", 12), ("cx16", 13), ("pcid", 17), ("sse4_1", 19), ("sse4_2", 20),
                          ("x2apic", 21), ("movbe", 22), ("popcnt", 23), ("tsc-deadline", 24), ("aes", 25), ("xsave", 26), ("avx", 28),
                          ("f16c", 29), ("rdrand", 30)])
        + leaf(7, 0, .ebx, [("fsgsbase", 0), ("bmi1", 3), ("avx2", 5), ("smep", 7), ("bmi2", 8), ("erms", 9), ("invpcid", 10),
                            ("avx512f", 16), ("avx512dq", 17), ("rdseed", 18), ("adx", 19), ("smap", 20), ("clflushopt", 23), ("clwb", 24),
                            ("avx512cd", 28), ("sha-ni", 29), ("avx512bw", 30), ("avx512vl", 31)])
        + leaf(7, 0, .ecx, [("umip", 2), ("pku", 3), ("vaes", 9), ("vpclmulqdq", 10), ("rdpid", 22)])
        + leaf(0x8000_0001, 0, .ecx, [("lahf_lm", 0), ("abm", 5), ("sse4a", 6), ("3dnowprefetch", 8)])
        + leaf(0x8000_0001, 0, .edx, [("pdpe1gb", 26), ("rdtscp", 27)])
        + leaf(0x4000_0001, 0, .eax, [("kvmclock", 0), ("kvm-nopiodelay", 1), ("kvmclock2", 3), ("kvm-asyncpf", 4), ("kvm-steal-time", 5),
                                      ("kvm-pv-eoi", 6), ("kvm-pv-unhalt", 7), ("kvm-pv-tlb-flush", 9), ("kvm-asyncpf-vmexit", 10),
                                      ("kvm-pv-send-ipi", 11), ("kvm-poll-control", 12), ("kvm-pv-sched-yield", 13), ("kvm-asyncpf-int", 14),
                                      ("kvm-msi-ext-dest-id", 15)])

    /// What `baseline` keeps of the words above: x86-64-v2 (cx16, lahf_lm, popcnt, sse3, sse4_1,
    /// sse4_2, ssse3) plus what every KVM guest of that age had (x2apic, tsc-deadline, kvmclock and
    /// the paravirtual basics). Every other feature in those words is hidden.
    public static let baseline: [String] = ["sse3", "ssse3", "cx16", "sse4_1", "sse4_2", "x2apic", "popcnt", "tsc-deadline", "lahf_lm",
                                            "kvmclock", "kvm-nopiodelay", "kvmclock2", "kvm-steal-time", "kvm-pv-eoi", "kvm-pv-unhalt"]
}
