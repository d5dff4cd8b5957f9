/// The fixed shape of a Vireo machine that its rules are written against. The boot code's layout
/// (X86Boot's `MachineLayout`, `BootConfiguration`) takes its limits from here, so a rule and the
/// machine it protects cannot disagree.
public enum MachineLimits {
    /// vCPUs one machine can describe (the MADT's and MP table's 8-bit APIC IDs, 255 broadcast).
    public static let maximumCPUs = 254
    /// Below this the kernel, its page tables and the boot data do not fit.
    public static let minimumMemory: UInt64 = 32 << 20
    /// virtio-mmio slots: one interrupt line each (MachineLayout.virtioInterrupts).
    public static let virtioSlots = 17
    /// A virtio-blk serial is 20 bytes (VIRTIO_BLK_ID_BYTES); QEMU's IDE and SCSI take the same.
    public static let diskSerialLength = 20
    /// Request queues one virtio-blk disk may have (VIRTIO_BLK_F_MQ). virtio-mmio gives a device
    /// one interrupt line whatever its queues, and each queue of a multiqueue disk has an I/O
    /// thread in the VMM, so more queues than this only add threads.
    public static let diskQueues: ClosedRange<Int> = 1...16
    /// Queue pairs one virtio-net card may have (VIRTIO_NET_F_MQ): one tap queue each.
    public static let nicQueuePairs: ClosedRange<Int> = 1...8
    /// Backing layers under one disk: deeper chains are refused, not followed.
    public static let backingLayers = 16
    /// Guest vsock CIDs: 0-2 are reserved (hypervisor, local, host), 0xffffffff is VMADDR_CID_ANY.
    public static let vsockCIDs: ClosedRange<UInt64> = 3...0xffff_fffe
    /// SCHED_FIFO priorities.
    public static let realTimePriorities: ClosedRange<Int> = 1...99
    /// Seconds between balloon statistics refreshes.
    public static let balloonStatisticsIntervals: ClosedRange<UInt64> = 1...3600
    /// NUMA node numbers (Linux's MAX_NUMNODES is at most 1024).
    public static let numaNodes: ClosedRange<Int> = 0...1023
    /// Descriptors a VMM inherits (above stdin, stdout and stderr).
    public static let inheritedDescriptors: ClosedRange<Int32> = 3...65535
    public static let rebootPolicies = ["restart", "exit"]
    /// A virtio-fs tag fills at most 36 bytes of the device's configuration (VIRTIO spec 5.11.4).
    public static let shareTagLength = 36
    /// Shared folders one VM may have: each is a PCI device and a virtiofsd process.
    public static let maximumShares = 8
}
