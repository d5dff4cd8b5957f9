import API
import DiskImage
import FoundationEssentials
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// What `vireo create` asks for; nil means "the OS type's default".
public struct CreateRequest: Sendable {
    public var name: String
    public var osType: String?
    public var cpus: Int?
    public var memoryBytes: UInt64?
    public var diskBytes: UInt64?
    public var attachDisk: String?
    /// The attached disk's format (`--disk-format`); nil: what its file name declares.
    public var attachDiskFormat: DiskFormat?
    public var withoutDisk = false
    /// The dir pool the new disk (`diskBytes`) is made in, as a volume named after the VM.
    public var pool: String?
    public var kernel: String?
    public var initrd: String?
    public var commandLine: String?
    public var entropyDevice: Bool?
    /// nil: one card on the `default` NAT network, as VirtualBox and libvirt give new VMs.
    public var networks: [NetworkAttachment]?
    public var vsockCID: UInt64?
    public var balloon: Bool?
    public var acpi: Bool?
    public var onReboot: String?
    /// `--cpu`: host, baseline, with ±features.
    public var cpuModel: String?
    /// nil: chosen from the rest (an ISO or firmware means qemu, otherwise kvm).
    public var engine: EngineKind?
    public var iso: String?
    public var firmware: Firmware?
    public var accelerator: Accelerator?
    /// An image from the store (`vireo image list`): the disk becomes a thin overlay on it (or a
    /// full copy), and the VM boots the image's kernel (or its firmware).
    public var image: String?
    /// With `image`: copy the image's disk and kernel into the VM instead of resting on them.
    public var fullCopy = false
    /// CPU, memory and process limits (docs/resources.md).
    public var resources = ResourceLimits()
    public var memoryBacking = MemoryBackingOptions()
    /// Host directories the guest mounts over virtio-fs (`--share`), checked on the host.
    public var shares: [SharedFolder] = []
    /// A TPM 2.0 (`--tpm`, qemu engine); nil: the OS type's.
    public var tpm: Bool?
    /// `--secure-boot` (UEFI); nil: the OS type's.
    public var secureBoot: Bool?
    /// Hyper-V enlightenments (`--hyperv`, qemu engine); nil: the OS type's.
    public var hyperV: Bool?
    /// `--managed-by`: the program that manages the VM (VMDefinition.managedBy).
    public var managedBy: String?
    /// With a cloud-init image: the user, keys, password and host name of its NoCloud seed.
    public var cloudInit = CloudInitRequest()
    /// `--unattended` (with `iso`): install the OS without questions (docs/unattended.md).
    public var unattended: UnattendedRequest?

    public init(name: String) { self.name = name }
}

/// `vireo create --iso FILE --unattended` options; nil: the defaults.
public struct UnattendedRequest: Sendable {
    /// nil: the family's usual first user (debian, ubuntu).
    public var user: String?
    /// In clear only until it is hashed at create.
    public var password: String
    public var fullName: String?
    public var hostname: String?
    public var locale: String?
    public var timezone: String?
    public var packages: [String] = []
    public var postInstallCommand: String?
    public var keyFiles: [String] = []
    /// nil: the default mirror where the ISO has no packages; "none": the disc alone.
    public var mirror: String?

    public init(password: String) { self.password = password }
}

/// `vireo create --image` options for cloud-init; nil or empty: the defaults.
public struct CloudInitRequest: Sendable {
    public var user: String?
    /// Public key files (`--ssh-key`); the library's own key is always added.
    public var keyFiles: [String] = []
    /// In clear, hashed before anything is stored.
    public var password: String?
    public var hostname: String?

    public init() {}

    public var isEmpty: Bool { user == nil && keyFiles.isEmpty && password == nil && hostname == nil }
}

/// What `vireo set` asks to change on a stopped VM; nil leaves a setting as it is.
public struct ChangeRequest: Sendable {
    public var cpus: Int?
    public var memoryBytes: UInt64?
    public var commandLine: String?
    public var kernel: String?
    public var initrd: String?
    public var removeInitrd = false
    public var osType: String?
    public var entropyDevice: Bool?
    /// Replaces every card; a card without an explicit MAC on an attachment the VM already used
    /// keeps that card's MAC (and its forwards unless new ones are given), as a reconfigured NIC would.
    public var networks: [NetworkAttachment]?
    public var explicitMACs: [Bool] = []
    public var vsockCID: UInt64??
    public var balloon: Bool?
    public var acpi: Bool?
    public var onReboot: String?
    /// `--cpu`: host, baseline, with ±features.
    public var cpuModel: String?
    public var engine: EngineKind?
    /// `.some(nil)` ejects the ISO.
    public var iso: String??
    public var firmware: Firmware?
    public var accelerator: Accelerator?
    /// Resource limits to set (`.some(nil)` removes one): the only changes a running VM takes.
    public var cpuCapPercent: Int??
    public var cpuWeight: Int??
    public var memoryLimitBytes: UInt64??
    public var pidsLimit: Int??
    public var vcpuPins: [VCPUPin]??
    public var emulatorCPUs: [Int]??
    /// `--rt-priority` (`.some(nil)` removes it); taken at the next start.
    public var rtPriority: Int??
    /// `--io-limit` (`.some(nil)` removes the limits).
    public var ioLimits: IOLimits??
    /// `--memory-backing` (`.some(nil)`: ordinary pages), `--prealloc`, `--ksm`.
    public var memoryBackingChoice: MemoryBackingOptions.Choice?
    public var lockMemory: Bool?
    public var transparentHugePages: Bool?
    /// `--numa-node` (`.some(nil)`: no binding).
    public var numaNode: Int??
    public var preallocate: Bool?
    public var mergeable: Bool?
    /// `--tpm`/`--no-tpm` (the state in `tpm/` stays when the device goes).
    public var tpm: Bool?
    /// `--secure-boot`/`--no-secure-boot`: the UEFI variable store starts again from the template
    /// that matches (Microsoft's keys, or none).
    public var secureBoot: Bool?
    /// `--hyperv`/`--no-hyperv`.
    public var hyperV: Bool?

    public init() {}

    /// Whether only resource limits change (which a running VM takes live).
    public var changesOnlyResources: Bool {
        fields.allSatisfy { ["--cpu-cap", "--cpu-weight", "--memory-limit", "--pids-limit", "--pin", "--pin-emulator", "--io-limit"].contains($0) } && !fields.isEmpty
    }

    public func applyingResources(to limits: ResourceLimits) -> ResourceLimits {
        var changed = limits
        if let cap = cpuCapPercent { changed.cpuCapPercent = cap }
        if let weight = cpuWeight { changed.cpuWeight = weight }
        if let memory = memoryLimitBytes { changed.memoryLimitBytes = memory }
        if let pids = pidsLimit { changed.pidsLimit = pids }
        if let pins = vcpuPins { changed.vcpuPins = pins }
        if let emulator = emulatorCPUs { changed.emulatorCPUs = emulator }
        if let priority = rtPriority { changed.rtPriority = priority }
        if let io = ioLimits { changed.ioLimits = io }
        return changed
    }

    /// The options this request changes, as the user typed them, for messages.
    public var fields: [String] {
        [cpus != nil ? "--cpus" : nil, memoryBytes != nil ? "--memory" : nil, commandLine != nil ? "--cmdline" : nil,
         kernel != nil ? "--kernel" : nil, initrd != nil || removeInitrd ? "--initrd" : nil,
         osType != nil ? "--ostype" : nil, entropyDevice != nil ? "--rng" : nil, networks != nil ? "--nic" : nil,
         vsockCID != nil ? "--vsock-cid" : nil, balloon != nil ? "--balloon" : nil, acpi != nil ? "--acpi" : nil,
         onReboot != nil ? "--on-reboot" : nil, cpuModel != nil ? "--cpu" : nil, engine != nil ? "--engine" : nil, iso != nil ? "--iso" : nil,
         firmware != nil ? "--firmware" : nil, accelerator != nil ? "--accel" : nil,
         cpuCapPercent != nil ? "--cpu-cap" : nil, cpuWeight != nil ? "--cpu-weight" : nil,
         memoryLimitBytes != nil ? "--memory-limit" : nil, pidsLimit != nil ? "--pids-limit" : nil,
         vcpuPins != nil ? "--pin" : nil, emulatorCPUs != nil ? "--pin-emulator" : nil, rtPriority != nil ? "--rt-priority" : nil, ioLimits != nil ? "--io-limit" : nil,
         memoryBackingChoice != nil ? "--memory-backing" : nil, preallocate != nil ? "--prealloc" : nil, mergeable != nil ? "--ksm" : nil, lockMemory != nil ? "--lock-memory" : nil, transparentHugePages != nil ? "--thp" : nil, numaNode != nil ? "--numa-node" : nil, tpm != nil ? "--tpm" : nil, secureBoot != nil ? "--secure-boot" : nil, hyperV != nil ? "--hyperv" : nil].compactMap { $0 }
    }
}

/// What `vireo delete` did, so the CLI can say it.
public struct DeleteReport: Sendable {
    public var keptDisks: [String] = []
    public var untouchedDisks: [String] = []
}
