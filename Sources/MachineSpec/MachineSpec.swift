/// Everything a VMM needs to build one machine, as one value (Codable for its binary form,
/// MachineSpecEncoding.swift; its JSON form is the library's VMDefinition, not this): the library makes it from a VM's
/// definition, `vireo run` and `vireo-vmm` from their flags, and the VMM builds from nothing else.
/// Its flag form (`arguments`, `parse`) is written once, here, beside the value, so a setting
/// cannot be rendered one way and read another (docs/architecture.md).
public struct MachineSpec: Sendable, Equatable, Codable {
    public var kernel: String
    public var initrd: String?
    public var commandLine = "console=ttyS0"
    public var cpus = 1
    /// As `--cpu` takes it: `host` or `baseline`, then `,+FEATURE`/`,-FEATURE` (X86Boot's CPUModel).
    public var cpuModel = "host"
    public var memoryBytes: UInt64 = 512 << 20
    public var memory = MemoryBacking()
    public var disks: [Disk] = []
    public var nics: [NIC] = []
    public var vsock: Vsock?
    public var balloon: Balloon?
    /// Shared folders: virtio-fs devices whose vhost-user back ends (virtiofsd) listen on these
    /// sockets. Optional so that specs in saved states from before them still read.
    public var fileSystems: [FileSystem]?
    /// A virtio-rng device fed from the host's /dev/urandom.
    public var entropyDevice = false
    /// Describe the machine with ACPI tables (and the MP table), or with the MP table and
    /// command-line devices only.
    public var acpi = true
    public var onReboot = RebootPolicy.exit
    /// The VM generation ID as 32 hex digits; nil: a random one for this run.
    public var generationID: String?
    /// vCPU threads run SCHED_FIFO at this priority, all memory locked.
    public var realTimePriority: Int32?
    /// Where the serial console goes: `stdio`, `none`, `file:PATH` or `socket:PATH`.
    public var console = "stdio"

    public init(kernel: String) { self.kernel = kernel }

    /// What a guest's reboot does (libvirt's `on_reboot`): start it again in the same process, or
    /// end the run as a power-off would.
    public enum RebootPolicy: String, Sendable, CaseIterable, Codable {
        case restart, exit
    }

    /// One virtio-blk disk.
    public struct Disk: Sendable, Equatable, Codable {
        public var path: String
        /// What the disk is; never read from its content.
        public var format: DiskFormat
        public var readOnly = false
        public var serial: String?
        public var rateLimit = RateLimit()
        /// The chain the disk rests on, nearest first: the only files opened beneath it, each
        /// header checked against it.
        public var backing: [BackingLayer] = []
        /// Follow what the qcow2 header names instead (a person's own image, for `vireo run`);
        /// library VMs always give their recorded chain.
        public var followsHeader = false
        /// nil: `writeback`. Optional so that specs in saved states from before it still read.
        public var cache: DiskCache?
        /// Request queues (virtio-blk multiqueue); nil: one per vCPU, up to
        /// `MachineLimits.diskQueues`, as QEMU's `num-queues=auto`. Optional so that specs in
        /// saved states from before it still read.
        public var queues: Int?

        /// The queues the disk's device has on a machine of `cpus` vCPUs.
        public func queueCount(cpus: Int) -> Int {
            queues ?? min(max(cpus, MachineLimits.diskQueues.lowerBound), MachineLimits.diskQueues.upperBound)
        }

        /// Opened with O_DIRECT, the whole chain.
        public var bypassesHostCache: Bool { cache == DiskCache.none }

        /// Whether the disk is an NBD export rather than a file or device.
        public var isNetwork: Bool { DiskFormat.isNetworkAddress(path) }

        public init(path: String, format: DiskFormat, readOnly: Bool = false, serial: String? = nil, backing: [BackingLayer] = []) {
            self.path = path; self.format = format; self.readOnly = readOnly; self.serial = serial; self.backing = backing
        }
    }

    /// One virtio-net card and its host side.
    public struct NIC: Sendable, Equatable, Codable {
        public enum Backend: Sendable, Equatable, Codable, CustomStringConvertible {
            /// A host tap device by name.
            case tap(String)
            /// A tap the parent opened, inherited as this descriptor.
            case tapDescriptor(Int32)
            /// A frame stream (passt's socket), inherited as this descriptor.
            case streamDescriptor(Int32)

            public var description: String {
                switch self {
                case let .tap(name): return "tap:" + name
                case let .tapDescriptor(fd): return "tap-fd:\(fd)"
                case let .streamDescriptor(fd): return "stream-fd:\(fd)"
                }
            }
        }

        public var backend: Backend
        /// Nil: a random locally administered address for this run.
        public var mac: String?
        public var rateLimit = RateLimit()
        /// Checksum and segmentation offloads offered to the guest (where the backend carries them).
        public var offloads = true
        /// Queue pairs (virtio-net multiqueue, a multiqueue tap's queues); nil: one. Only a tap
        /// the VMM opens by name can have more (an inherited tap or a stream is one queue).
        public var queues: Int?
        /// With `tapDescriptor`: the multiqueue tap's other queues, inherited as these
        /// descriptors (one more pair each), the way Vireo's manager hands over a card's tap.
        public var queueDescriptors: [Int32]?

        public var queuePairs: Int { queues ?? 1 + (queueDescriptors?.count ?? 0) }

        public init(backend: Backend, mac: String? = nil) { self.backend = backend; self.mac = mac }
    }

    /// A virtio-vsock device whose host side is the Unix socket `socketPath` (Firecracker's model).
    public struct Vsock: Sendable, Equatable, Codable {
        public var socketPath: String
        public var guestCID: UInt64 = 3

        public init(socketPath: String, guestCID: UInt64 = 3) { self.socketPath = socketPath; self.guestCID = guestCID }
    }

    /// A virtio-balloon device.
    public struct Balloon: Sendable, Equatable, Codable {
        public var deflateOnOOM = false
        /// Seconds between statistics refreshes; nil: no statistics queue.
        public var statisticsInterval: UInt64?

        public init(deflateOnOOM: Bool = false, statisticsInterval: UInt64? = nil) {
            self.deflateOnOOM = deflateOnOOM; self.statisticsInterval = statisticsInterval
        }
    }

    /// A virtio-fs device: the tag the guest mounts by and the Unix socket its vhost-user back end
    /// (virtiofsd) listens on, as Cloud Hypervisor's `--fs tag=,socket=`.
    public struct FileSystem: Sendable, Equatable, Codable {
        public var tag: String
        public var socketPath: String

        public init(tag: String, socketPath: String) { self.tag = tag; self.socketPath = socketPath }
    }

    /// The shared folders, none when absent.
    public var sharedFolders: [FileSystem] { fileSystems ?? [] }

    /// The virtio devices in slot order: disks, cards, vsock, balloon, the entropy device, then
    /// the shared folders (last, so a machine without them keeps the slots it always had).
    public var virtioDeviceCount: Int {
        disks.count + nics.count + (vsock == nil ? 0 : 1) + (balloon == nil ? 0 : 1) + (entropyDevice ? 1 : 0) + sharedFolders.count
    }
}

/// How guest RAM is backed (`--memory-backing`, `--prealloc`, `--ksm`, `--lock-memory`, `--thp`,
/// `--numa-node`); GuestMemory maps exactly this.
public struct MemoryBacking: Sendable, Equatable, Codable {
    /// nil: ordinary pages; else huge pages of this size (2 MiB or 1 GiB) from the kernel's pool.
    public var hugePageSize: UInt64?
    /// Fault every page in at start (no surprise allocation failure later).
    public var preallocate = false
    /// Offer the pages to KSM (MADV_MERGEABLE), which shares identical pages between VMs.
    public var mergeable = false
    /// Lock every page in RAM (mlock): never swapped, faulted in at start.
    public var locked = false
    /// RAM in a file instead of anonymous memory: a memfd, or a file at a path (zeroed at start
    /// and locked against a second VM); `shared` maps it MAP_SHARED, so the guest's writes land
    /// in the file (what passing RAM to another process needs).
    public var file: FileBacking?
    public var shared = false
    /// Ordinary anonymous RAM is offered to transparent huge pages (MADV_HUGEPAGE): a guest
    /// touching memory takes one EPT fault per 2 MiB instead of 512 (bench/README.md).
    /// Not with KSM (it merges 4 KiB pages) nor with huge pages or files.
    public var transparentHugePages = true
    /// Bind guest RAM to this host NUMA node (mbind MPOL_BIND).
    public var numaNode: Int32?

    public enum FileBacking: Sendable, Equatable, Codable {
        case memfd
        case path(String)
    }

    public init(hugePageSize: UInt64? = nil, preallocate: Bool = false, mergeable: Bool = false, locked: Bool = false) {
        self.hugePageSize = hugePageSize
        self.preallocate = preallocate
        self.mergeable = mergeable
        self.locked = locked
    }

    /// The `--memory-backing` value: `anon`, `hugepages[=2M|1G]`, `memfd[,shared]` or `file:PATH[,shared]`.
    public var backingArgument: String {
        if let size = hugePageSize { return size == 1 << 30 ? "hugepages=1G" : "hugepages=2M" }
        switch file {
        case nil: return "anon"
        case .memfd: return "memfd" + (shared ? ",shared" : "")
        case let .path(path): return "file:" + path + (shared ? ",shared" : "")
        }
    }

    public static let backingForms = "anon, hugepages[=2M|1G], memfd[,shared] or file:PATH[,shared] (PATH absolute)"

    /// Sets the backing from a `--memory-backing` value.
    public mutating func parseBacking(_ text: String) throws(MachineSpecError) {
        hugePageSize = nil; file = nil; shared = false
        switch text {
        case "anon": return
        case "hugepages", "hugepages=2M": hugePageSize = 2 << 20; return
        case "hugepages=1G": hugePageSize = 1 << 30; return
        default: break
        }
        var words = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let isShared = words.count == 2 && words[1] == "shared"
        if isShared { words.removeLast() }
        guard words.count == 1 else {
            throw MachineSpecError(.memoryBacking, "'\(text)' is not \(Self.backingForms); the only option after a comma is 'shared'")
        }
        if words[0] == "memfd" {
            file = .memfd
        } else if words[0].hasPrefix("file:") {
            let path = String(words[0].dropFirst(5))
            guard path.hasPrefix("/"), path.count > 1 else {
                throw MachineSpecError(.memoryBacking, "'\(path)' is not an absolute file path")
            }
            file = .path(path)
        } else {
            throw MachineSpecError(.memoryBacking, "'\(text)' is not \(Self.backingForms)")
        }
        shared = isShared
    }
}

/// Limits for one device, Firecracker's and Cloud Hypervisor's model: a token bucket for bytes
/// and one for operations (requests or frames), each with a sustained rate and a burst size.
public struct RateLimit: Equatable, Sendable, Codable {
    public var bytesPerSecond: UInt64?
    public var bytesBurst: UInt64?
    public var operationsPerSecond: UInt64?
    public var operationsBurst: UInt64?

    public init(bytesPerSecond: UInt64? = nil, bytesBurst: UInt64? = nil, operationsPerSecond: UInt64? = nil, operationsBurst: UInt64? = nil) {
        self.bytesPerSecond = bytesPerSecond
        self.bytesBurst = bytesBurst
        self.operationsPerSecond = operationsPerSecond
        self.operationsBurst = operationsBurst
    }

    public var isUnlimited: Bool { bytesPerSecond == nil && operationsPerSecond == nil }
}
