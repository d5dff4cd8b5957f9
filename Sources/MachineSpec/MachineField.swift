/// A setting of a machine, named once: its JSON key (what definitions and the REST API use) and
/// the flags the command lines take for it. This is the one table between the two; the library's
/// errors name the `vireo create`/`set` flag, the API turns that flag back into the key here, and
/// `vireo run`/`vireo-vmm` name their own flag.
public enum MachineField: String, Sendable, CaseIterable {
    case cpus
    case cpuModel = "cpu_model"
    case memoryBytes = "memory_bytes"
    case memoryBacking = "memory_backing"
    case numaNode = "numa_node"
    case rtPriority = "rt_priority"
    case kernel
    case initrd
    case commandLine = "command_line"
    case disks
    case nics
    case vsockCID = "vsock_cid"
    case balloon
    case entropyDevice = "entropy_device"
    case acpi
    case onReboot = "on_reboot"
    case generationID = "generation_id"

    /// The JSON key.
    public var key: String { rawValue }

    /// The `vireo create`/`vireo set` flag.
    public var flag: String {
        switch self {
        case .cpus: return "--cpus"
        case .cpuModel: return "--cpu"
        case .memoryBytes: return "--memory"
        case .memoryBacking: return "--memory-backing"
        case .numaNode: return "--numa-node"
        case .rtPriority: return "--rt-priority"
        case .kernel: return "--kernel"
        case .initrd: return "--initrd"
        case .commandLine: return "--cmdline"
        case .disks: return "--disk"
        case .nics: return "--nic"
        case .vsockCID: return "--vsock-cid"
        case .balloon: return "--balloon"
        case .entropyDevice: return "--rng"
        case .acpi: return "--acpi"
        case .onReboot: return "--on-reboot"
        case .generationID: return "--generation-id"
        }
    }

    /// The `vireo run`/`vireo-vmm` flag, where it differs from `flag`: the VMM takes a card's
    /// host backend (`--net tap:NAME`) and the vsock's socket with its CID (`--vsock PATH,cid=N`).
    public var runFlag: String {
        switch self {
        case .nics: return "--net"
        case .vsockCID: return "--vsock"
        default: return flag
        }
    }

    /// The field a `vireo create`/`set` flag sets, if it is a machine setting.
    public init?(flag: String) {
        guard let field = Self.allCases.first(where: { $0.flag == flag }) else { return nil }
        self = field
    }
}

/// A machine setting that breaks a rule: which one, and why, in words meant for the person who
/// gave it.
public struct MachineSpecError: Error, Sendable, Equatable, CustomStringConvertible {
    public var field: MachineField
    public var reason: String

    public init(_ field: MachineField, _ reason: String) { self.field = field; self.reason = reason }

    public var description: String { "\(field.flag): \(reason)" }
}
