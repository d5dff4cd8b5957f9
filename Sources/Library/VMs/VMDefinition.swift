import DiskImage
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// One VM as stored in its directory's `config.json`. Paths without a leading `/` are inside the
/// VM's directory (the VM owns those files); absolute paths are files it only refers to.
public struct VMDefinition: Codable, Sendable, Equatable {
    /// Bumped when the layout changes incompatibly; older Vireos refuse newer files. Version 2
    /// records every disk's backing chain (`DiskAttachment.backing`); a version-1 definition
    /// adopts the chains its images' headers name, written down by the first operation that
    /// locks the VM (VMBundle.loadRecordingChains).
    public static let currentVersion = 2

    public var version: Int
    public var uuid: String
    public var name: String
    public var osType: String
    /// Which engine runs the VM: Vireo's own VMM (direct-kernel Linux) or QEMU (firmware,
    /// installers, displays).
    public var engine: EngineKind
    public var cpus: Int
    public var memoryBytes: UInt64
    public var kernel: String?
    public var initrd: String?
    public var commandLine: String
    public var disks: [DiskAttachment]
    /// virtio-net cards; each keeps the MAC it was given at creation, as a real NIC would.
    public var networks: [NetworkAttachment]
    /// The guest CID of a virtio-vsock device whose host side is `vsock.sock` in the VM's
    /// directory; nil for none.
    public var vsockCID: UInt64?
    /// A virtio-balloon device (deflate on OOM, statistics every 5 s), so `vireo balloon` can
    /// take memory back from a running guest.
    public var balloon: Bool
    public var entropyDevice: Bool
    /// Seconds since the epoch.
    public var createdAt: Int64
    /// The machine is described to the guest with ACPI (devices, CPUs, power button, reset).
    /// VMs defined before ACPI existed read as `false` and keep the MP-table platform they had.
    public var acpi: Bool
    /// What a guest's reboot does: "restart" (boot again in the same process, the default) or
    /// "exit" (the VM stops).
    public var onReboot: String
    /// The CPU the guest sees (`--cpu`: host, baseline, with ±features; X86Boot.CPUModel); nil
    /// is `host`.
    public var cpuModel: String?
    /// The VM generation ID (32 hex digits) the guest's vmgenid device shows; a new one on every
    /// clone, so guests reseed their random number generators. Nil (older VMs): random per start.
    public var generationID: String?
    /// qemu engine: the firmware that boots the machine (nil for a direct kernel boot).
    public var firmware: Firmware?
    /// qemu engine: the UEFI variable store (a copy of OVMF_VARS, owned by the VM) for `uefi`.
    public var nvram: String?
    /// qemu engine: an installer ISO in the CD-ROM drive, referred to by absolute path (ISOs are
    /// large and shared; it is never copied or deleted). The machine boots from it while present.
    public var iso: String?
    /// qemu engine: hardware acceleration (KVM) or software emulation (TCG).
    public var accelerator: Accelerator
    /// qemu engine: how disks (and the network card's model) reach the guest: virtio, or SATA and
    /// an e1000 for guests without virtio drivers.
    public var diskBus: DiskBus
    /// The image the VM was made from (`vireo create --image`), for people and `vireo info`;
    /// what protects the image is its disk in the VM's backing chain.
    public var image: String?
    /// cloud-init's NoCloud settings, for VMs made from a cloud-init image; their seed is the
    /// read-only disk `seed.iso`. `vireo ssh` logs in as `cloudInit.user`.
    public var cloudInit: CloudInitSettings?
    /// CPU, memory and process limits of the VM's engine process (docs/resources.md).
    public var resources = ResourceLimits()
    /// How guest RAM is backed: huge pages, preallocation, KSM (docs/resources.md).
    public var memoryBacking = MemoryBackingOptions()
    /// Host directories the guest mounts over virtio-fs (docs/shared-folders.md).
    public var shares: [SharedFolder] = []
    /// qemu engine: a TPM 2.0 (swtpm), its state in `tpm/` in the VM's directory (docs/tpm.md).
    public var tpm = false
    /// qemu engine, UEFI: OVMF's Secure Boot build with Microsoft's keys enrolled (docs/tpm.md).
    public var secureBoot = false
    /// The program that made the VM and manages its life (the containerd shim: `containerd`),
    /// shown by `vireo list` and `info`; nil for VMs people made.
    public var managedBy: String?
    /// qemu engine: Hyper-V enlightenments for Windows guests (relaxed timing, virtual APIC,
    /// spinlocks, reference time, synthetic timers…); dropped with a warning where the host's
    /// KVM cannot provide them.
    public var hyperV = false
    /// An unattended install in progress (docs/unattended.md): until it finishes, the VM boots
    /// the installer's kernel with its answers instead of its disk.
    public var unattended: UnattendedInstall?

    /// The kernel a start boots directly, if any: an unfinished unattended install's installer,
    /// else the VM's own (`--kernel`). Both engines and the jail ask here.
    public var directBoot: (kernel: String, initrd: String?, commandLine: String)? {
        if let unattended { return (unattended.kernel, unattended.initrd, unattended.commandLine) }
        if let kernel { return (kernel, initrd, commandLine) }
        return nil
    }

    /// A fresh 128-bit generation ID.
    public static func newGenerationID() -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<16).map { _ in
            let byte = UInt8.random(in: 0...255, using: &generator)
            return String(byte >> 4, radix: 16) + String(byte & 0xf, radix: 16)
        }.joined()
    }

    public init(uuid: String, name: String, osType: OSType, createdAt: Int64) {
        version = Self.currentVersion
        self.uuid = uuid
        self.name = name
        self.osType = osType.identifier
        engine = .kvm
        cpus = osType.cpus
        memoryBytes = osType.memoryBytes
        commandLine = osType.commandLine
        disks = []
        networks = []
        balloon = true
        entropyDevice = true
        self.createdAt = createdAt
        acpi = true
        onReboot = "restart"
        generationID = Self.newGenerationID()
        accelerator = .auto
        diskBus = osType.diskBus
    }

    enum CodingKeys: String, CodingKey {
        case version, uuid, name, osType, engine, cpus, memoryBytes, kernel, initrd, commandLine, disks, networks
        case vsockCID, balloon, entropyDevice, createdAt, acpi, onReboot, generationID, cpuModel
        case firmware, nvram, iso, accelerator, diskBus, image, cloudInit, resources, memoryBacking, shares, tpm, secureBoot, managedBy, unattended, hyperV
    }

    /// Fields added after version 1 was first written are optional in the file, with the values
    /// that keep an older VM behaving as it did.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        version = try container.decode(Int.self, forKey: .version)
        uuid = try container.decode(String.self, forKey: .uuid)
        name = try container.decode(String.self, forKey: .name)
        osType = try container.decode(String.self, forKey: .osType)
        engine = try container.decode(EngineKind.self, forKey: .engine)
        cpus = try container.decode(Int.self, forKey: .cpus)
        memoryBytes = try container.decode(UInt64.self, forKey: .memoryBytes)
        kernel = try container.decodeIfPresent(String.self, forKey: .kernel)
        initrd = try container.decodeIfPresent(String.self, forKey: .initrd)
        commandLine = try container.decode(String.self, forKey: .commandLine)
        disks = try container.decode([DiskAttachment].self, forKey: .disks)
        networks = try container.decode([NetworkAttachment].self, forKey: .networks)
        vsockCID = try container.decodeIfPresent(UInt64.self, forKey: .vsockCID)
        balloon = try container.decode(Bool.self, forKey: .balloon)
        entropyDevice = try container.decode(Bool.self, forKey: .entropyDevice)
        createdAt = try container.decode(Int64.self, forKey: .createdAt)
        acpi = try container.decodeIfPresent(Bool.self, forKey: .acpi) ?? false
        onReboot = try container.decodeIfPresent(String.self, forKey: .onReboot) ?? "restart"
        generationID = try container.decodeIfPresent(String.self, forKey: .generationID)
        cpuModel = try container.decodeIfPresent(String.self, forKey: .cpuModel)
        firmware = try container.decodeIfPresent(Firmware.self, forKey: .firmware)
        nvram = try container.decodeIfPresent(String.self, forKey: .nvram)
        iso = try container.decodeIfPresent(String.self, forKey: .iso)
        accelerator = try container.decodeIfPresent(Accelerator.self, forKey: .accelerator) ?? .auto
        diskBus = try container.decodeIfPresent(DiskBus.self, forKey: .diskBus) ?? .virtio
        image = try container.decodeIfPresent(String.self, forKey: .image)
        cloudInit = try container.decodeIfPresent(CloudInitSettings.self, forKey: .cloudInit)
        resources = try container.decodeIfPresent(ResourceLimits.self, forKey: .resources) ?? ResourceLimits()
        memoryBacking = try container.decodeIfPresent(MemoryBackingOptions.self, forKey: .memoryBacking) ?? MemoryBackingOptions()
        shares = try container.decodeIfPresent([SharedFolder].self, forKey: .shares) ?? []
        tpm = try container.decodeIfPresent(Bool.self, forKey: .tpm) ?? false
        secureBoot = try container.decodeIfPresent(Bool.self, forKey: .secureBoot) ?? false
        managedBy = try container.decodeIfPresent(String.self, forKey: .managedBy)
        unattended = try container.decodeIfPresent(UnattendedInstall.self, forKey: .unattended)
        hyperV = try container.decodeIfPresent(Bool.self, forKey: .hyperV) ?? false
    }

    /// The qemu engine's network card model: virtio, or for SATA machines (guests without
    /// virtio drivers) an Intel card their installers have a driver for — e1000e for Windows
    /// (Windows 8 and later ship its driver), e1000 for the rest.
    public var qemuNICModel: String {
        diskBus == .virtio ? "virtio-net-pci" : OSType.isWindows(osType) ? "e1000e" : "e1000"
    }
}

/// Limits on a VM's engine process, enforced with control groups (docs/resources.md); nil is
/// unlimited. Changed on a running VM with `vireo set`, live.
public struct ResourceLimits: Codable, Sendable, Equatable {
    /// CPU time per wall time, in percent of one CPU (`--cpu-cap 150%`).
    public var cpuCapPercent: Int?
    /// Relative share under contention, 1 to 10000 (cgroup v2's weight; 100 is the default).
    public var cpuWeight: Int?
    /// The whole engine process's memory, guest RAM included.
    public var memoryLimitBytes: UInt64?
    /// Processes and threads the engine may have.
    public var pidsLimit: Int?
    /// Host CPUs each pinned vCPU's thread may run on (`--pin vcpu0=2,vcpu1=3`).
    public var vcpuPins: [VCPUPin]?
    /// Host CPUs every other thread of the engine may run on (`--pin-emulator 0-1`).
    public var emulatorCPUs: [Int]?
    /// vCPU threads run SCHED_FIFO at this priority (1–99), with the engine's memory locked.
    public var rtPriority: Int?
    /// Block I/O limits on the host devices holding the VM's disks (`--io-limit`).
    public var ioLimits: IOLimits?

    public init(cpuCapPercent: Int? = nil, cpuWeight: Int? = nil, memoryLimitBytes: UInt64? = nil, pidsLimit: Int? = nil,
                vcpuPins: [VCPUPin]? = nil, emulatorCPUs: [Int]? = nil) {
        self.cpuCapPercent = cpuCapPercent
        self.cpuWeight = cpuWeight
        self.memoryLimitBytes = memoryLimitBytes
        self.pidsLimit = pidsLimit
        self.vcpuPins = vcpuPins
        self.emulatorCPUs = emulatorCPUs
    }

    static func mebibytes(_ bytes: UInt64) -> String {
        bytes % (1 << 20) == 0 ? "\(bytes >> 20) MiB" : "\(bytes) bytes"
    }

    /// The CPUs of this host, for checking pins.
    public static var hostCPUCount: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_CONF)))) }

    public var isUnlimited: Bool { self == ResourceLimits() }

    /// Refuses values the kernel would refuse or that cannot run a VM, naming the flag.
    public func validate(cpus: Int, memoryBytes: UInt64) throws(LibraryError) {
        if let cap = cpuCapPercent, cap < 1 || cap > 100 * 1024 {
            throw .invalidValue(field: "cpu_cap_percent", reason: "\(cap)% is not from 1% to \(100 * 1024)% (100% is one whole CPU; this VM has \(cpus) vCPUs)")
        }
        if let weight = cpuWeight, weight < 1 || weight > 10000 {
            throw .invalidValue(field: "cpu_weight", reason: "\(weight) is not from 1 to 10000 (100 is the default)")
        }
        if let limit = memoryLimitBytes, limit < memoryBytes {
            throw .invalidValue(field: "memory_limit_bytes", reason: "\(Self.mebibytes(limit)) is below the VM's \(memoryBytes >> 20) MiB of RAM: the guest would be killed once it used its memory; give at least \(memoryBytes >> 20)M (the limit counts the whole engine: RAM the guest touched and the VMM's own few MiB)")
        }
        if let priority = rtPriority {
            do { try MachineRules.realTimePriority(priority) } catch { throw LibraryError(error) }
        }
        if let pids = pidsLimit, pids < 16 || pids > 1 << 22 {
            throw .invalidValue(field: "pids_limit", reason: "\(pids) is not from 16 to \(1 << 22) (a VMM has a thread per vCPU and per device)")
        }
        let host = Self.hostCPUCount
        for pin in vcpuPins ?? [] {
            guard pin.vcpu >= 0, pin.vcpu < cpus else {
                throw .invalidValue(field: "vcpu_pins", reason: "vcpu\(pin.vcpu) does not exist; this VM has vcpu0 to vcpu\(cpus - 1)")
            }
            if let bad = pin.cpus.first(where: { $0 < 0 || $0 >= host }) ?? (pin.cpus.isEmpty ? -1 : nil) {
                throw .invalidValue(field: "vcpu_pins", reason: "vcpu\(pin.vcpu): host CPU \(bad) does not exist; this host has CPUs 0 to \(host - 1)")
            }
        }
        if Set((vcpuPins ?? []).map(\.vcpu)).count != (vcpuPins ?? []).count {
            throw .invalidValue(field: "vcpu_pins", reason: "a vCPU is pinned twice")
        }
        if let emulator = emulatorCPUs, let bad = emulator.first(where: { $0 < 0 || $0 >= host }) ?? (emulator.isEmpty ? -1 : nil) {
            throw .invalidValue(field: "emulator_cpus", reason: "host CPU \(bad) does not exist; this host has CPUs 0 to \(host - 1)")
        }
    }
}

/// How a VM's RAM is backed (`--memory-backing`, `--prealloc`, `--ksm`).
public struct MemoryBackingOptions: Codable, Sendable, Equatable {
    /// nil: ordinary pages; "2M" or "1G": huge pages of that size from the kernel's pool.
    public var hugePages: String?
    /// Fault all RAM in at start.
    public var preallocate = false
    /// Offer RAM to KSM, which merges identical pages across VMs (off by default: merging lets a
    /// guest time another's memory).
    public var mergeable = false
    /// Lock guest RAM in host memory (never swapped): libvirt's `<locked/>`.
    public var locked = false
    /// RAM in a file: "memfd", or an absolute path (zeroed at each start). nil: anonymous memory.
    public var file: String?
    /// Map the file shared: the guest's writes land in it.
    public var shared = false
    /// Offer ordinary RAM to transparent huge pages (the default; `--no-thp` turns it off).
    public var transparentHugePages = true
    /// Host NUMA node guest RAM is bound to (libvirt's `<numatune><memory mode="strict">`).
    public var numaNode: Int?

    public init(hugePages: String? = nil, preallocate: Bool = false, mergeable: Bool = false, locked: Bool = false) {
        self.hugePages = hugePages
        self.preallocate = preallocate
        self.mergeable = mergeable
        self.locked = locked
    }

    /// What `--memory-backing` chooses: the page kind or the file, together.
    public struct Choice: Sendable, Equatable {
        public var hugePages: String?
        public var file: String?
        public var shared = false
        public init(hugePages: String? = nil, file: String? = nil, shared: Bool = false) {
            self.hugePages = hugePages
            self.file = file
            self.shared = shared
        }
    }

    public mutating func apply(_ choice: Choice) {
        hugePages = choice.hugePages
        file = choice.file
        shared = choice.shared
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        hugePages = try container.decodeIfPresent(String.self, forKey: .hugePages)
        preallocate = try container.decodeIfPresent(Bool.self, forKey: .preallocate) ?? false
        mergeable = try container.decodeIfPresent(Bool.self, forKey: .mergeable) ?? false
        locked = try container.decodeIfPresent(Bool.self, forKey: .locked) ?? false
        file = try container.decodeIfPresent(String.self, forKey: .file)
        shared = try container.decodeIfPresent(Bool.self, forKey: .shared) ?? false
        transparentHugePages = try container.decodeIfPresent(Bool.self, forKey: .transparentHugePages) ?? true
        numaNode = try container.decodeIfPresent(Int.self, forKey: .numaNode)
    }

    public var hugePageBytes: UInt64? {
        switch hugePages {
        case "2M": 2 << 20
        case "1G": 1 << 30
        default: nil
        }
    }

    /// `--memory-backing` read by the machine's own reader (MemoryBacking), kept in the
    /// definition's words.
    public static func parseBacking(_ text: String) throws(LibraryError) -> Choice {
        var backing = MemoryBacking()
        do { try backing.parseBacking(text) } catch { throw LibraryError(error) }
        switch (backing.hugePageSize, backing.file) {
        case let (size?, _): return Choice(hugePages: size == 1 << 30 ? "1G" : "2M")
        case (nil, .memfd?): return Choice(file: "memfd", shared: backing.shared)
        case let (nil, .path(path)?): return Choice(file: path, shared: backing.shared)
        case (nil, nil): return Choice()
        }
    }

    public static func hostNUMANodes() -> [Int] {
        let text = (try? HostFiles.readAll("/sys/devices/system/node/has_memory")).map { String(decoding: $0, as: UTF8.self) } ?? "0"
        return VCPUPin.parseCPUs(text.filter { !$0.isWhitespace }) ?? [0]
    }

    /// The backing as the machine spec holds it (an unknown huge page size stays unknown, for
    /// the rule to refuse).
    public var machineBacking: MemoryBacking {
        var backing = MemoryBacking(hugePageSize: hugePages == nil ? nil : hugePageBytes ?? 0, preallocate: preallocate, mergeable: mergeable, locked: locked)
        backing.file = file.map { name -> MemoryBacking.FileBacking in name == "memfd" ? .memfd : .path(name) }
        backing.shared = shared
        backing.transparentHugePages = transparentHugePages
        backing.numaNode = numaNode.map { Int32(truncatingIfNeeded: $0) }
        return backing
    }

    /// The machine's backing rule, then what only this host can say: whether the NUMA node
    /// exists, and what is at the file's path now.
    public func validate(memoryBytes: UInt64) throws(LibraryError) {
        // The definition's words first: its page size is text.
        if let hugePages, hugePageBytes == nil {
            throw .invalidValue(field: "memory_backing", reason: "huge pages of '\(hugePages)' are not 2M or 1G")
        }
        do { try MachineRules.memoryBacking(machineBacking, memoryBytes: memoryBytes) } catch { throw LibraryError(error) }
        if let node = numaNode {
            let nodes = Self.hostNUMANodes()
            guard nodes.contains(node) else {
                throw .invalidValue(field: "numa_node", reason: "host node \(node) does not exist; this host has node\(nodes.count == 1 ? "" : "s") \(nodes.map(String.init).joined(separator: ", "))")
            }
        }
        if let file, file != "memfd" {
            // The file is zeroed at every start: never take one that holds something else.
            var status = stat()
            if lstat(file, &status) == 0 {
                guard (status.st_mode & S_IFMT) == S_IFREG else {
                    throw .invalidValue(field: "memory_backing", reason: "\(file) exists and is not a regular file")
                }
                guard status.st_size == 0 || UInt64(status.st_size) == memoryBytes else {
                    throw .invalidValue(field: "memory_backing", reason: "\(file) exists and holds \(status.st_size) bytes, not this VM's \(memoryBytes) bytes of RAM; it is zeroed at every start, so give a new path or an empty file")
                }
            } else {
                let parent = String(file[..<(file.lastIndex(of: "/") ?? file.startIndex)])
                guard parent.isEmpty || HostFiles.isDirectory(parent) else {
                    throw .invalidValue(field: "memory_backing", reason: "the directory \(parent) does not exist")
                }
            }
        }
    }
}

/// `--io-limit read=10M,write=5M,read-iops=200,write-iops=100`: the block controller's throttle
/// for the engine's I/O to each host block device its disks live on (libvirt's `<blkiotune>`).
public struct IOLimits: Codable, Sendable, Equatable {
    public var readBytesPerSecond: UInt64?
    public var writeBytesPerSecond: UInt64?
    public var readOperationsPerSecond: UInt64?
    public var writeOperationsPerSecond: UInt64?

    public init() {}

    /// `bytes` is the CLI's size parser (`--memory`'s units), nil for a value it refuses.
    public static func parse(_ text: String, bytes: (String) -> UInt64?) throws(LibraryError) -> IOLimits {
        var limits = IOLimits()
        for item in text.split(separator: ",") {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2 else {
                throw .invalidValue(field: "io_limits", reason: "'\(item)' is not KEY=VALUE; keys: read, write (bytes per second, K/M/G), read-iops, write-iops")
            }
            let value: UInt64?
            switch parts[0] {
            case "read", "write": value = bytes(parts[1])
            case "read-iops", "write-iops": value = UInt64(parts[1])
            default:
                throw .invalidValue(field: "io_limits", reason: "unknown key '\(parts[0])'; keys: read, write (bytes per second, K/M/G), read-iops, write-iops")
            }
            guard let value, value > 0 else {
                throw .invalidValue(field: "io_limits", reason: "\(parts[0])=\(parts[1]) is not a positive \(parts[0].hasSuffix("iops") ? "number of operations" : "size like 512K or 10M") per second")
            }
            switch parts[0] {
            case "read": limits.readBytesPerSecond = value
            case "write": limits.writeBytesPerSecond = value
            case "read-iops": limits.readOperationsPerSecond = value
            default: limits.writeOperationsPerSecond = value
            }
        }
        guard limits != IOLimits() else { throw .invalidValue(field: "io_limits", reason: "no limit given; like read=10M,write=5M or none") }
        return limits
    }

    public var description: String {
        [readBytesPerSecond.map { "read \(Size.describe($0))/s" }, writeBytesPerSecond.map { "write \(Size.describe($0))/s" },
         readOperationsPerSecond.map { "read \($0) IOPS" }, writeOperationsPerSecond.map { "write \($0) IOPS" }].compactMap { $0 }.joined(separator: ", ")
    }
}

/// One vCPU's host CPUs.
public struct VCPUPin: Codable, Sendable, Equatable {
    public var vcpu: Int
    public var cpus: [Int]
    public init(vcpu: Int, cpus: [Int]) { self.vcpu = vcpu; self.cpus = cpus }

    /// `vcpu0=2,vcpu1=3-4` (a CPU, or a range, per vCPU).
    public static func parse(_ text: String) throws(LibraryError) -> [VCPUPin] {
        var pins: [VCPUPin] = []
        for entry in text.split(separator: ",") {
            let parts = entry.split(separator: "=", maxSplits: 1)
            guard parts.count == 2, parts[0].hasPrefix("vcpu"), let vcpu = Int(parts[0].dropFirst(4)), let cpus = parseCPUs(String(parts[1]), separator: "+") else {
                throw .invalidValue(field: "vcpu_pins", reason: "'\(entry)' is not vcpuN=CPU (like vcpu0=2,vcpu1=3, or vcpu0=2-3 for a range)")
            }
            pins.append(VCPUPin(vcpu: vcpu, cpus: cpus))
        }
        guard !pins.isEmpty else { throw .invalidValue(field: "vcpu_pins", reason: "no vCPU given; like vcpu0=2,vcpu1=3") }
        return pins
    }

    /// `0-1,4` (with `separator` between items).
    public static func parseCPUs(_ text: String, separator: Character = ",") -> [Int]? {
        var cpus: [Int] = []
        for item in text.split(separator: separator) {
            let bounds = item.split(separator: "-", maxSplits: 1)
            guard let low = Int(bounds[0]), low >= 0 else { return nil }
            let high = bounds.count == 2 ? Int(bounds[1]) : low
            guard let high, high >= low, high - low < 4096 else { return nil }
            cpus += Array(low...high)
        }
        return cpus.isEmpty ? nil : Array(Set(cpus)).sorted()
    }

    public var description: String { "vcpu\(vcpu)=" + cpus.map(String.init).joined(separator: "+") }
}

/// The engines that can run a VM.
public enum EngineKind: String, Codable, Sendable, CaseIterable {
    /// `vireo-vmm`: Vireo's own VMM on KVM, direct-kernel Linux guests.
    case kvm
    /// QEMU: firmware (BIOS, UEFI), CD-ROM installers, a display, keyboard and pointer.
    case qemu
}

public enum Firmware: String, Codable, Sendable, CaseIterable {
    /// SeaBIOS (Debian's `seabios`).
    case bios
    /// OVMF (Debian's `ovmf`), with a variable store per VM.
    case uefi
}

public enum Accelerator: String, Codable, Sendable, CaseIterable {
    /// KVM when /dev/kvm can be opened, TCG otherwise.
    case auto
    case kvm
    /// QEMU's software emulation: works everywhere, many times slower.
    case tcg
}

public enum DiskBus: String, Codable, Sendable, CaseIterable {
    case virtio
    /// AHCI disks and an e1000 NIC: what any OS has drivers for.
    case sata
}

extension CaseIterable where Self: RawRepresentable, RawValue == String {
    /// Parses a command-line value, or names the field and the values allowed.
    public static func parse(_ text: String, field: String) throws(LibraryError) -> Self {
        guard let value = Self(rawValue: text) else {
            throw .invalidValue(field: field, reason: "'\(text)' is not one of \(allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return value
    }
}

public struct DiskAttachment: Codable, Sendable, Equatable {
    public var path: String
    /// What the disk is: the only format anything opens it as. Never read from its content.
    public var format: DiskFormat
    public var readOnly: Bool
    public var serial: String?
    /// The images the disk rests on, nearest first, each with its format (a relative path is in
    /// the VM's directory): recorded when the library makes or accepts the chain (an image's
    /// disk, a linked clone's base, a snapshot's layers, an attached image's own chain) and the
    /// only chain anything opens. A raw disk rests on nothing.
    public var backing: [BackingLayer]
    /// nil: `writeback` (through the host's page cache); `none`: O_DIRECT.
    public var cache: DiskCache?

    public init(path: String, format: DiskFormat, readOnly: Bool = false, serial: String? = nil, backing: [BackingLayer] = [],
                cache: DiskCache? = nil) {
        self.path = path; self.format = format; self.readOnly = readOnly; self.serial = serial; self.backing = backing
        self.cache = cache == .writeback ? nil : cache
    }

    /// Inside the VM's directory: created, copied and deleted with the VM.
    public var isOwned: Bool { !path.hasPrefix("/") && !isNetwork }

    /// A network disk — an NBD export (`nbd://`, `nbd+unix://`) or an iSCSI LUN (`iscsi://`), paths
    /// joined by `|`: the VMM connects to it; no file of the host's is the disk.
    public var isNetwork: Bool { DiskFormat.isNetworkAddress(path) }

    enum CodingKeys: String, CodingKey { case path, format, readOnly, serial, backing, cache }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        path = try container.decode(String.self, forKey: .path)
        format = try container.decode(DiskFormat.self, forKey: .format)
        readOnly = try container.decode(Bool.self, forKey: .readOnly)
        serial = try container.decodeIfPresent(String.self, forKey: .serial)
        // Definitions of version 1 did not record chains: VMBundle adopts them, once.
        backing = try container.decodeIfPresent([BackingLayer].self, forKey: .backing) ?? []
        cache = try container.decodeIfPresent(DiskCache.self, forKey: .cache)
        if cache == .writeback { cache = nil }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(path, forKey: .path)
        try container.encode(format, forKey: .format)
        try container.encode(readOnly, forKey: .readOnly)
        try container.encodeIfPresent(serial, forKey: .serial)
        if !backing.isEmpty { try container.encode(backing, forKey: .backing) }
        try container.encodeIfPresent(cache, forKey: .cache)
    }
}

/// One network card: what it is plugged into, its MAC (kept for the card's life, as a real NIC's)
/// and the host ports forwarded to it.
public struct NetworkAttachment: Codable, Sendable, Equatable {
    public var attachment: NICAttachment
    public var mac: String
    public var forwards: [PortForward]
    /// Queue pairs (virtio-net multiqueue, kvm engine); nil: one.
    public var queues: Int?

    public init(_ attachment: NICAttachment, mac: String, forwards: [PortForward] = [], queues: Int? = nil) {
        self.attachment = attachment; self.mac = mac; self.forwards = forwards; self.queues = queues
    }

    enum CodingKeys: String, CodingKey { case attachment, mac, forwards, tap, queues }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        mac = try container.decode(String.self, forKey: .mac)
        forwards = try container.decodeIfPresent([PortForward].self, forKey: .forwards) ?? []
        queues = try container.decodeIfPresent(Int.self, forKey: .queues)
        if let text = try container.decodeIfPresent(String.self, forKey: .attachment) {
            do { attachment = try NICAttachment.parse(text, field: "attachment") } catch {
                throw DecodingError.dataCorruptedError(forKey: .attachment, in: container, debugDescription: error.description)
            }
        } else {
            // VMs defined before networks existed had only a tap.
            attachment = .tap(try container.decode(String.self, forKey: .tap))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(attachment.description, forKey: .attachment)
        try container.encode(mac, forKey: .mac)
        if !forwards.isEmpty { try container.encode(forwards, forKey: .forwards) }
        if let queues { try container.encode(queues, forKey: .queues) }
    }
}

/// VirtualBox-style presets for the New VM wizard: what a guest of this kind usually needs.
/// Every value can be overridden at `vireo create` and changed later with `vireo set`.
public struct OSType: Sendable, Equatable {
    public var identifier: String
    public var description: String
    public var cpus: Int
    public var memoryBytes: UInt64
    public var diskBytes: UInt64
    public var commandLine: String
    /// What an installer ISO of this kind boots with (the qemu engine), VirtualBox's wizard's choice.
    public var firmware: Firmware
    /// Installers and desktops want more memory than a direct-boot guest.
    public var installMemoryBytes: UInt64
    /// Whether the OS has virtio drivers; `.sata` gives it AHCI disks and an e1000 instead.
    public var diskBus: DiskBus
    /// Words of an ISO's volume label that mark an installer of this kind, lower case.
    public var labelWords: [String]
    /// What a new VM of this kind gets on the qemu engine without being asked: a TPM 2.0,
    /// Secure Boot, Hyper-V enlightenments (Windows 11 refuses to install without the first two).
    public var tpm = false
    public var secureBoot = false
    public var hyperV = false

    /// Windows: firmware only (the qemu engine), e1000e cards on SATA machines.
    public var isWindows: Bool { identifier.hasPrefix("windows") }
    public static func isWindows(_ identifier: String) -> Bool { identifier.hasPrefix("windows") }

    public static let all: [OSType] = [
        OSType(identifier: "ubuntu-64", description: "Ubuntu (64-bit), root file system on the first disk",
               cpus: 2, memoryBytes: 2 << 30, diskBytes: 25 << 30, commandLine: "console=ttyS0 root=/dev/vda rw",
               firmware: .uefi, installMemoryBytes: 4 << 30, diskBus: .virtio, labelWords: ["ubuntu", "kubuntu", "xubuntu", "lubuntu"]),
        OSType(identifier: "debian-64", description: "Debian (64-bit), root file system on the first disk",
               cpus: 1, memoryBytes: 1 << 30, diskBytes: 20 << 30, commandLine: "console=ttyS0 root=/dev/vda rw",
               firmware: .uefi, installMemoryBytes: 2 << 30, diskBus: .virtio, labelWords: ["debian"]),
        OSType(identifier: "fedora-64", description: "Fedora (64-bit), root file system on the first disk",
               cpus: 2, memoryBytes: 2 << 30, diskBytes: 20 << 30, commandLine: "console=ttyS0 root=/dev/vda rw",
               firmware: .uefi, installMemoryBytes: 4 << 30, diskBus: .virtio, labelWords: ["fedora"]),
        OSType(identifier: "alpine-64", description: "Alpine Linux (64-bit), small footprint",
               cpus: 1, memoryBytes: 256 << 20, diskBytes: 2 << 30, commandLine: "console=ttyS0 root=/dev/vda rw",
               firmware: .bios, installMemoryBytes: 512 << 20, diskBus: .virtio, labelWords: ["alpine"]),
        // What Windows installers need without extra drivers: AHCI disks, an e1000e, the USB
        // tablet every qemu VM has; Hyper-V enlightenments as libvirt gives Windows guests.
        // Labels: Microsoft's ISOs are named by build, not product (CCCOMA_X64FRE_EN-US_DV9 is
        // Windows 10 and 11 alike; SSS_X64FREE_… is Server 2022): the newest matching type wins.
        OSType(identifier: "windows11-64", description: "Windows 11 (64-bit): UEFI with Secure Boot, TPM 2.0, SATA disk, e1000e, Hyper-V enlightenments",
               cpus: 2, memoryBytes: 4 << 30, diskBytes: 64 << 30, commandLine: "",
               firmware: .uefi, installMemoryBytes: 4 << 30, diskBus: .sata, labelWords: ["cccoma", "win"],
               tpm: true, secureBoot: true, hyperV: true),
        OSType(identifier: "windows10-64", description: "Windows 10 (64-bit): UEFI, SATA disk, e1000e, Hyper-V enlightenments",
               cpus: 2, memoryBytes: 4 << 30, diskBytes: 64 << 30, commandLine: "",
               firmware: .uefi, installMemoryBytes: 4 << 30, diskBus: .sata, labelWords: [], hyperV: true),
        OSType(identifier: "windows-server-2022", description: "Windows Server 2022: UEFI with Secure Boot, TPM 2.0, SATA disk, e1000e, Hyper-V enlightenments",
               cpus: 2, memoryBytes: 4 << 30, diskBytes: 64 << 30, commandLine: "",
               firmware: .uefi, installMemoryBytes: 4 << 30, diskBus: .sata, labelWords: ["sss"],
               tpm: true, secureBoot: true, hyperV: true),
        OSType(identifier: "linux-64", description: "Other Linux (64-bit)",
               cpus: 1, memoryBytes: 512 << 20, diskBytes: 8 << 30, commandLine: "console=ttyS0",
               firmware: .bios, installMemoryBytes: 2 << 30, diskBus: .virtio, labelWords: ["linux", "arch", "opensuse", "centos", "rocky", "alma", "mint"]),
        OSType(identifier: "other", description: "Other or unknown: nothing assumed (SATA disks, an e1000 network card, BIOS)",
               cpus: 1, memoryBytes: 256 << 20, diskBytes: 2 << 30, commandLine: "console=ttyS0",
               firmware: .bios, installMemoryBytes: 1 << 30, diskBus: .sata, labelWords: []),
    ]

    /// VirtualBox's guess from an installer's volume label ("Ubuntu 24.04 LTS amd64" is
    /// ubuntu-64); nil when no word matches.
    public static func guess(fromVolumeLabel label: String) -> OSType? {
        let words = label.lowercased().split(whereSeparator: { !$0.isLetter }).map(String.init)
        return all.first { type in type.labelWords.contains { words.contains($0) } }
    }

    public static let defaultIdentifier = "linux-64"

    public static func named(_ identifier: String) throws(LibraryError) -> OSType {
        guard let type = all.first(where: { $0.identifier == identifier }) else {
            throw .invalidValue(field: "os_type", reason: "'\(identifier)' is not an OS type; choose one of \(all.map(\.identifier).joined(separator: ", ")) (see `vireo ostypes`)")
        }
        return type
    }
}

/// VM names: what can safely be a directory name and a command-line word.
public enum VMName {
    public static let maximumLength = 64
    public static let rule = "1 to 64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
    /// Directories of the library that are not VMs: its networks, images, the key `vireo ssh`
    /// logs in with, the disks `delete --keep-disks` kept, and its storage pools' definitions.
    public static let reserved: Set<String> = ["networks", "images", "ssh", "kept-disks", "pools"]

    public static func validate(_ name: String) throws(LibraryError) {
        guard !name.isEmpty, name.utf8.count <= maximumLength else {
            throw .invalidName(name, reason: "must be \(rule)")
        }
        let allowed = name.unicodeScalars.allSatisfy { scalar in
            (scalar >= "a" && scalar <= "z") || (scalar >= "A" && scalar <= "Z") || (scalar >= "0" && scalar <= "9")
                || scalar == "." || scalar == "_" || scalar == "-"
        }
        guard allowed, let first = name.unicodeScalars.first, first != ".", first != "_", first != "-" else {
            throw .invalidName(name, reason: "must be \(rule)")
        }
        guard !reserved.contains(name) else {
            throw .invalidName(name, reason: "'\(name)' is the name of the library's own \(name) directory; choose another")
        }
    }

    /// The longest name of a Unix socket below a VM's directory (`control.sock`; QEMU's `vmm/console.sock`).
    static let longestSocketName = "/vmm/console.sock".utf8.count
    /// What `sun_path` holds, less its terminating zero.
    static let maximumSocketPath = 107

    /// A new VM's name in `root`: valid, and short enough that its sockets' paths fit a Unix
    /// socket address (found by schemathesis: a 64-character name under a long library path made a
    /// VM no engine could ever reach).
    public static func validate(_ name: String, in root: String) throws(LibraryError) {
        try validate(name)
        let room = maximumSocketPath - root.utf8.count - 1 - longestSocketName
        guard name.utf8.count <= room else {
            throw .invalidName(name, reason: room > 0
                ? "must be at most \(room) characters in the library \(root): its sockets' paths must fit in \(maximumSocketPath) bytes"
                : "the library \(root) is too deep for any VM's sockets (\(maximumSocketPath) bytes at most); move $VIREO_HOME higher")
        }
    }
}
