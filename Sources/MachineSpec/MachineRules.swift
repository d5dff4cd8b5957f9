/// The rules a machine's settings obey, written once. The library applies them when a VM is
/// created, changed or arrives by migration; the VMM applies them to its flags (`vireo-vmm`,
/// `vireo run`) before it opens anything. Rules that need the host (its RAM, its KVM's vCPU limit,
/// its NUMA nodes) take the host's figure as an argument, so each caller says what it knows.
public enum MachineRules {
    /// Every rule over a whole spec, as the VMM applies it before it opens anything and the kvm
    /// engine before it starts one; `hostVCPUs` and `hostMemory` are the host's limits when the
    /// caller knows them.
    public static func check(_ spec: MachineSpec, hostVCPUs: Int? = nil, hostMemory: UInt64? = nil) throws(MachineSpecError) {
        try cpus(spec.cpus, hostLimit: hostVCPUs)
        try memory(spec.memoryBytes, hostBytes: hostMemory)
        try commandLine(spec.commandLine)
        try path(spec.kernel, .kernel)
        if let initrd = spec.initrd { try path(initrd, .initrd) }
        if let socket = spec.vsock?.socketPath { try path(socket, .vsockCID) }
        try path(spec.console, .console)
        try memoryBacking(spec.memory, memoryBytes: spec.memoryBytes)
        try virtioDevices(disks: spec.disks.count, nics: spec.nics.count, vsock: spec.vsock != nil, balloon: spec.balloon != nil, entropy: spec.entropyDevice,
                          shares: spec.sharedFolders.count)
        if !spec.sharedFolders.isEmpty {
            try shares(tags: spec.sharedFolders.map(\.tag))
            for folder in spec.sharedFolders { try path(folder.socketPath, .shares) }
            try sharedFolderMemory(spec.memory)
        }
        for (index, disk) in spec.disks.enumerated() {
            try path(disk.path, .disks)
            // A spec's paths are resolved (a definition's may be relative to the VM's directory).
            if let relative = disk.backing.first(where: { !$0.path.hasPrefix("/") || $0.path.utf8.contains(0) }) {
                throw MachineSpecError(.disks, "disk \(index): backing image '\(relative.path.prefix(200))' is not an absolute path")
            }
            try disk.rateLimit.validate(field: .disks, operations: "iops")
            if let serial = disk.serial { try diskSerial(serial, disk: index) }
            if let queues = disk.queues { try diskQueues(queues, disk: index) }
            try diskChain(path: disk.path, format: disk.format, backing: disk.backing, disk: index)
            try networkDisk(path: disk.path, format: disk.format, backing: disk.backing, cache: disk.cache, followsHeader: disk.followsHeader, disk: index)
        }
        for (index, nic) in spec.nics.enumerated() {
            try nicBackend(nic.backend)
            try nic.rateLimit.validate(field: .nics, operations: "pps")
            if let text = nic.mac { _ = try Self.mac(text, card: index) }
            if let queues = nic.queues { try nicQueues(queues, backend: nic.backend, card: index) }
            if let descriptors = nic.queueDescriptors { try nicQueueDescriptors(descriptors, backend: nic.backend, card: index) }
        }
        if let vsock = spec.vsock { try vsockCID(vsock.guestCID) }
        if let interval = spec.balloon?.statisticsInterval { try balloonStatisticsInterval(interval) }
        if let priority = spec.realTimePriority { try realTimePriority(Int(priority)) }
        if let identifier = spec.generationID { _ = try generationID(identifier) }
    }

    public static func cpus(_ count: Int, hostLimit: Int? = nil) throws(MachineSpecError) {
        guard count >= 1, count <= MachineLimits.maximumCPUs else {
            throw MachineSpecError(.cpus, "\(count) is not allowed; use 1 to \(MachineLimits.maximumCPUs)")
        }
        if let hostLimit, count > hostLimit {
            throw MachineSpecError(.cpus, "\(count) is more than this host's KVM allows for one VM (at most \(hostLimit))")
        }
    }

    public static func memory(_ bytes: UInt64, hostBytes: UInt64? = nil) throws(MachineSpecError) {
        guard bytes >= MachineLimits.minimumMemory else {
            throw MachineSpecError(.memoryBytes, "\(Size.describe(bytes)) is below the minimum of \(Size.describe(MachineLimits.minimumMemory))")
        }
        guard bytes % 4096 == 0 else {
            throw MachineSpecError(.memoryBytes, "\(bytes) bytes is not a whole number of 4 KiB pages")
        }
        if let hostBytes, bytes > hostBytes {
            throw MachineSpecError(.memoryBytes, "\(Size.describe(bytes)) is more than this host's \(Size.describe(hostBytes)) of RAM")
        }
    }

    /// How RAM is backed: huge pages of a size the kernel has and that divide the RAM, or a file
    /// at an absolute path, not both; KSM only on private pages; a NUMA node number Linux could have.
    public static func memoryBacking(_ backing: MemoryBacking, memoryBytes: UInt64) throws(MachineSpecError) {
        if let page = backing.hugePageSize {
            guard page == 2 << 20 || page == 1 << 30 else {
                throw MachineSpecError(.memoryBacking, "huge pages of \(page) bytes are not 2M or 1G")
            }
            guard memoryBytes % page == 0 else {
                throw MachineSpecError(.memoryBacking, "\(memoryBytes >> 20) MiB of RAM is not a whole number of \(page >> 20) MiB huge pages")
            }
            guard backing.file == nil else {
                throw MachineSpecError(.memoryBacking, "huge pages and a backing file are one choice, not both")
            }
        }
        if case let .path(path) = backing.file, !path.hasPrefix("/") || path.count < 2 || path.utf8.contains(0) {
            throw MachineSpecError(.memoryBacking, "'\(path.prefix(200))' is not an absolute file path")
        }
        if backing.shared, backing.file == nil {
            throw MachineSpecError(.memoryBacking, "only a memfd or a file can be shared")
        }
        if backing.mergeable, backing.shared {
            throw MachineSpecError(.ksm, "KSM merges private pages only; a shared backing file's pages are never merged")
        }
        if let node = backing.numaNode, !MachineLimits.numaNodes.contains(Int(node)) {
            throw MachineSpecError(.numaNode, "\(node) is not a NUMA node number (0 to \(MachineLimits.numaNodes.upperBound))")
        }
    }

    /// A card's host side: a tap's name as the kernel takes it, or a descriptor above stdio.
    public static func nicBackend(_ backend: MachineSpec.NIC.Backend) throws(MachineSpecError) {
        switch backend {
        case let .tap(name):
            guard (1...15).contains(name.utf8.count), name.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "/") }) else {
                throw MachineSpecError(.nics, "tap name '\(name.prefix(40))' must be 1 to 15 printable characters without '/' or spaces")
            }
        case let .tapDescriptor(fd), let .streamDescriptor(fd):
            guard MachineLimits.inheritedDescriptors.contains(fd) else {
                throw MachineSpecError(.nics, "'\(backend)' needs an inherited descriptor number from \(MachineLimits.inheritedDescriptors.lowerBound) up")
            }
        }
    }

    /// A path the VMM will hand to the kernel: not empty, no NUL (which would cut it short), and
    /// no longer than PATH_MAX.
    public static func path(_ text: String, _ field: MachineField) throws(MachineSpecError) {
        guard !text.isEmpty, text.utf8.count < 4096, !text.utf8.contains(0) else {
            throw MachineSpecError(field, "'\(text.prefix(200))' is not a usable path (empty, longer than 4095 bytes, or with a NUL byte)")
        }
    }

    public static func commandLine(_ text: String) throws(MachineSpecError) {
        guard !text.utf8.contains(0) else { throw MachineSpecError(.commandLine, "contains a NUL byte") }
    }

    public static func vsockCID(_ cid: UInt64) throws(MachineSpecError) {
        guard MachineLimits.vsockCIDs.contains(cid) else {
            throw MachineSpecError(.vsockCID, "cid \(cid) must be a whole number from \(MachineLimits.vsockCIDs.lowerBound) to \(MachineLimits.vsockCIDs.upperBound)")
        }
    }

    public static func onReboot(_ policy: String) throws(MachineSpecError) {
        guard MachineLimits.rebootPolicies.contains(policy) else {
            throw MachineSpecError(.onReboot, "'\(policy)' is not one of \(MachineLimits.rebootPolicies.joined(separator: ", "))")
        }
    }

    /// `--acpi on|off`.
    public static func acpiSwitch(_ text: String) throws(MachineSpecError) -> Bool {
        guard text == "on" || text == "off" else { throw MachineSpecError(.acpi, "'\(text)' is not one of on, off") }
        return text == "on"
    }

    public static func realTimePriority(_ priority: Int) throws(MachineSpecError) {
        guard MachineLimits.realTimePriorities.contains(priority) else {
            throw MachineSpecError(.rtPriority, "\(priority) is not from 1 to 99 (SCHED_FIFO priorities; higher runs first)")
        }
    }

    public static func balloonStatisticsInterval(_ seconds: UInt64) throws(MachineSpecError) {
        guard MachineLimits.balloonStatisticsIntervals.contains(seconds) else {
            throw MachineSpecError(.balloon, "stats interval \(seconds) must be 1 to 3600 seconds")
        }
    }

    /// All virtio devices share the machine's slots, one interrupt line each.
    public static func virtioDevices(disks: Int, nics: Int, vsock: Bool, balloon: Bool, entropy: Bool, shares: Int = 0) throws(MachineSpecError) {
        let count = disks + nics + (vsock ? 1 : 0) + (balloon ? 1 : 0) + (entropy ? 1 : 0) + shares
        guard count <= MachineLimits.virtioSlots else {
            throw MachineSpecError(.disks, "\(disks) disk(s), \(nics) network card(s), \(shares) shared folder(s) and the vsock, balloon and rng devices need \(count) virtio slots; the kvm engine has \(MachineLimits.virtioSlots). Detach a disk or remove a device (--no-balloon, --no-rng)")
        }
    }

    /// A shared folder's back end (virtiofsd) maps guest RAM to reach the guest's buffers, so RAM
    /// must be a file both processes map MAP_SHARED: a memfd or a file with `,shared`.
    public static func sharedFolderMemory(_ backing: MemoryBacking) throws(MachineSpecError) {
        guard backing.file != nil, backing.shared else {
            throw MachineSpecError(.memoryBacking, "shared folders need guest RAM their back end (virtiofsd) can map: memfd,shared or file:PATH,shared (not \(backing.backingArgument))")
        }
    }

    /// A shared folder's tag, which the guest mounts by (`mount -t virtiofs TAG DIR`): 1 to 36
    /// letters, digits, '.', '_' and '-', so it is also a safe directory name under /mnt and a
    /// safe word in QEMU's option lists and the guest's mount script.
    public static func shareTag(_ tag: String) throws(MachineSpecError) {
        guard !tag.isEmpty, tag.utf8.count <= MachineLimits.shareTagLength, tag != ".", tag != "..",
              tag.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5a) || ($0 >= 0x61 && $0 <= 0x7a) || $0 == 0x2e || $0 == 0x5f || $0 == 0x2d }) else {
            throw MachineSpecError(.shares, "tag '\(tag.prefix(60))' must be 1 to \(MachineLimits.shareTagLength) letters, digits, '.', '_' or '-'")
        }
    }

    /// Where a cloud-init guest mounts a share (`--mount-point`): an absolute guest path of at
    /// most 200 bytes of letters, digits, '.', '_', '-' and '/', no empty, '.' or '..' part, not
    /// `/` itself — a safe word on the kernel command line, in SMBIOS and in the mount script.
    public static func shareMountPoint(_ path: String) throws(MachineSpecError) {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        guard path.hasPrefix("/"), path.utf8.count >= 2, path.utf8.count <= 200,
              path.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5a) || ($0 >= 0x61 && $0 <= 0x7a) || $0 == 0x2e || $0 == 0x5f || $0 == 0x2d || $0 == 0x2f }),
              !parts.contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }) else {
            throw MachineSpecError(.shares, "mount point '\(path.prefix(80))' must be an absolute guest path (not /) of at most 200 letters, digits, '.', '_', '-' and '/', without '.' or '..' parts")
        }
    }

    /// Tags are unique in a VM (the guest mounts by tag) and a VM has at most 8 shares.
    public static func shares(tags: [String]) throws(MachineSpecError) {
        guard tags.count <= MachineLimits.maximumShares else {
            throw MachineSpecError(.shares, "\(tags.count) shared folders is more than the \(MachineLimits.maximumShares) a VM may have")
        }
        var seen = Set<String>()
        for tag in tags {
            try shareTag(tag)
            guard seen.insert(tag).inserted else { throw MachineSpecError(.shares, "tag '\(tag)' is used twice; each shared folder needs its own tag") }
        }
    }

    /// A card's queue pairs: 1 to `MachineLimits.nicQueuePairs`, more than one only on a tap
    /// the VMM opens by name (it opens one queue of the multiqueue tap per pair).
    public static func nicQueues(_ count: Int, backend: MachineSpec.NIC.Backend, card index: Int) throws(MachineSpecError) {
        try nicQueuePairs(count, card: index)
        var opensByName = false
        if case .tap = backend { opensByName = true }
        guard count == 1 || opensByName else {
            throw MachineSpecError(.nics, "card \(index): \(count) queue pairs need a tap opened by name (tap:NAME); \(backend) is one queue")
        }
    }

    /// How many queue pairs a card may have, whoever opens its tap.
    public static func nicQueuePairs(_ count: Int, card index: Int) throws(MachineSpecError) {
        guard MachineLimits.nicQueuePairs.contains(count) else {
            throw MachineSpecError(.nics, "card \(index): \(count) queue pairs is not allowed; use \(MachineLimits.nicQueuePairs.lowerBound) to \(MachineLimits.nicQueuePairs.upperBound)")
        }
    }

    /// A handed-over multiqueue tap's other queues: only beside `tap-fd:`, inherited numbers,
    /// each once, and no more pairs than a card may have.
    public static func nicQueueDescriptors(_ descriptors: [Int32], backend: MachineSpec.NIC.Backend, card index: Int) throws(MachineSpecError) {
        guard case let .tapDescriptor(first) = backend else {
            throw MachineSpecError(.nics, "card \(index): queue-fds are the other queues of an inherited tap (tap-fd:N); \(backend) has none")
        }
        try nicQueuePairs(1 + descriptors.count, card: index)
        for fd in descriptors where !MachineLimits.inheritedDescriptors.contains(fd) {
            throw MachineSpecError(.nics, "card \(index): queue descriptor \(fd) is not an inherited descriptor (\(MachineLimits.inheritedDescriptors.lowerBound) to \(MachineLimits.inheritedDescriptors.upperBound))")
        }
        guard Set(descriptors + [first]).count == descriptors.count + 1 else {
            throw MachineSpecError(.nics, "card \(index): a tap queue descriptor is named twice")
        }
    }

    /// A disk's request queues: at least one, at most `MachineLimits.diskQueues`.
    public static func diskQueues(_ count: Int, disk index: Int) throws(MachineSpecError) {
        guard MachineLimits.diskQueues.contains(count) else {
            throw MachineSpecError(.disks, "disk \(index): \(count) queues is not allowed; use \(MachineLimits.diskQueues.lowerBound) to \(MachineLimits.diskQueues.upperBound)")
        }
    }

    /// What a guest reads as the disk's serial: at most 20 printable ASCII characters, and no
    /// comma (the VMM's `--disk` and QEMU's `-drive` are comma-separated).
    public static func diskSerial(_ serial: String, disk index: Int) throws(MachineSpecError) {
        guard serial.utf8.count <= MachineLimits.diskSerialLength,
              serial.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7f && $0 != UInt8(ascii: ",") }) else {
            throw MachineSpecError(.disks, "disk \(index): serial '\(serial.prefix(40))' must be at most \(MachineLimits.diskSerialLength) printable ASCII characters without commas")
        }
    }

    /// A network disk (an NBD export, an iSCSI LUN) is a raw disk resting on nothing, with the
    /// default cache: the export is the disk (it cannot grow, so it holds no qcow2), and O_DIRECT
    /// is a host-file matter. Files and devices pass untouched.
    public static func networkDisk(path: String, format: DiskFormat, backing: [BackingLayer], cache: DiskCache?, followsHeader: Bool,
                                   disk index: Int) throws(MachineSpecError) {
        guard DiskFormat.isNetworkAddress(path) else { return }
        guard format == .raw, backing.isEmpty, !followsHeader else {
            throw MachineSpecError(.disks, "disk \(index): \(path.prefix(300)) is a network disk (an NBD export or iSCSI LUN), which is a raw disk resting on nothing")
        }
        guard cache == nil || cache == .writeback else {
            throw MachineSpecError(.disks, "disk \(index): cache=none is for files and block devices; a network disk has no host page cache here")
        }
    }

    /// A disk's chain: a raw image rests on nothing, a raw layer only at the bottom, at most 16.
    public static func diskChain(path: String, format: DiskFormat, backing: [BackingLayer], disk index: Int) throws(MachineSpecError) {
        if format == .raw, !backing.isEmpty {
            throw MachineSpecError(.disks, "disk \(index): \(path) is raw, and a raw disk rests on nothing (\(backing.count) backing image(s) given)")
        }
        guard backing.count <= MachineLimits.backingLayers else {
            throw MachineSpecError(.disks, "disk \(index): \(path) rests on \(backing.count) images; at most \(MachineLimits.backingLayers)")
        }
        if let raw = backing.dropLast().firstIndex(where: { $0.format == .raw }) {
            throw MachineSpecError(.disks, "disk \(index): \(backing[raw].path) is raw and cannot rest on \(backing[raw + 1].path)")
        }
    }

    /// The 128-bit VM generation ID from 32 hex digits (dashes allowed: a UUID's form).
    public static func generationID(_ text: String) throws(MachineSpecError) -> [UInt8] {
        let digits = Array(text.utf8).filter { $0 != UInt8(ascii: "-") }
        func nibble(_ byte: UInt8) -> UInt8? {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
            default: return nil
            }
        }
        var bytes: [UInt8] = []
        if digits.count == 32 {
            for index in stride(from: 0, to: 32, by: 2) {
                guard let high = nibble(digits[index]), let low = nibble(digits[index + 1]) else { break }
                bytes.append(high << 4 | low)
            }
        }
        guard bytes.count == 16 else {
            throw MachineSpecError(.generationID, "'\(text.prefix(80))' is not 32 hex digits (a UUID's 128 bits)")
        }
        return bytes
    }

    /// The six bytes of a card's MAC `XX:XX:XX:XX:XX:XX`: unicast (a card cannot own a multicast
    /// address) and not all zeros.
    public static func mac(_ text: String, card index: Int) throws(MachineSpecError) -> [UInt8] {
        guard let bytes = macBytes(text), bytes[0] & 1 == 0, bytes != [0, 0, 0, 0, 0, 0] else {
            throw MachineSpecError(.nics, "card \(index): '\(text.prefix(40))' is not a unicast MAC address like 52:54:00:12:34:56")
        }
        return bytes
    }

    /// Parses six colon-separated hex pairs; no rule applied.
    public static func macBytes(_ text: String) -> [UInt8]? {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for part in parts {
            guard part.count == 2, let byte = UInt8(part, radix: 16) else { return nil }
            bytes.append(byte)
        }
        return bytes
    }

    /// A random unicast, locally administered MAC (`x2:...`).
    public static func randomMAC() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        var bytes = (0..<6).map { _ in UInt8.random(in: 0...255, using: &generator) }
        bytes[0] = bytes[0] & 0xfc | 0x02
        return bytes
    }

    public static func macText(_ bytes: [UInt8]) -> String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }
}
