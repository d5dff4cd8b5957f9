/// A setting of a machine, named once: its JSON key (what definitions and the REST API use) and
/// the flags the command lines take for it. This is the one table between the two; the library's
/// errors name the `vireo create`/`set` flag, the API turns that flag back into the key here, and
/// `vireo run`/`vireo-vmm` name their own flag.
public enum MachineField: String, Sendable, CaseIterable {
    case cpus
    case cpuModel = "cpu_model"
    case memoryBytes = "memory_bytes"
    case memoryBacking = "memory_backing"
    case preallocate
    case ksm
    case lockMemory = "lock_memory"
    case transparentHugePages = "transparent_huge_pages"
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
    case console
    case shares

    /// The JSON key.
    public var key: String { rawValue }

    /// The `vireo create`/`vireo set` flag.
    public var flag: String {
        switch self {
        case .cpus: return "--cpus"
        case .cpuModel: return "--cpu"
        case .memoryBytes: return "--memory"
        case .memoryBacking: return "--memory-backing"
        case .preallocate: return "--prealloc"
        case .ksm: return "--ksm"
        case .lockMemory: return "--lock-memory"
        case .transparentHugePages: return "--thp"
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
        case .console: return "--console"
        case .shares: return "--share"
        }
    }

    /// The `vireo run`/`vireo-vmm` flag, where it differs from `flag`: the VMM takes a card's
    /// host backend (`--net tap:NAME`), the vsock's socket with its CID (`--vsock PATH,cid=N`) and
    /// a shared folder's tag with its back end's socket (`--fs tag=T,socket=PATH`).
    public var runFlag: String {
        switch self {
        case .nics: return "--net"
        case .vsockCID: return "--vsock"
        case .shares: return "--fs"
        default: return flag
        }
    }

    /// The field a `vireo create`/`set` flag sets, if it is a machine setting.
    public init?(flag: String) {
        guard let field = Self.allCases.first(where: { $0.flag == flag }) else { return nil }
        self = field
    }
}

/// A machine setting that breaks a rule, or a command line the spec cannot be read from: which
/// setting (or, for a flag that is none, the flag), and why, in words meant for the person who
/// gave it.
public struct MachineSpecError: Error, Sendable, Equatable, CustomStringConvertible {
    /// nil when the trouble is a flag that names no setting (unknown, or missing its value).
    public var field: MachineField?
    public var argument: String?
    public var reason: String

    public init(_ field: MachineField, _ reason: String) { self.field = field; self.reason = reason }
    public init(argument: String, _ reason: String) { self.argument = argument; self.reason = reason }

    /// The `vireo create`/`set` flag.
    public var flag: String { field?.flag ?? argument ?? "" }
    /// The `vireo run`/`vireo-vmm` flag.
    public var runFlag: String { field?.runFlag ?? argument ?? "" }

    public var description: String { "\(flag): \(reason)" }
}
