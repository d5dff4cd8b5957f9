import GuestMemory
import MachineSpec

/// Where things live in the guest-physical address space of a Vireo x86_64 machine. The low
/// addresses follow Firecracker's layout (which Linux and PVH guests are known to accept); the
/// 32-bit MMIO hole is the last GiB below 4 GiB, as on a PC.
public enum MachineLayout {
    public static let gdtAddress = GuestPhysicalAddress(0x500)
    public static let idtAddress = GuestPhysicalAddress(0x520)
    public static let pvhStartInfoAddress = GuestPhysicalAddress(0x6000)
    public static let pvhModuleListAddress = GuestPhysicalAddress(0x6040)
    public static let pvhMemoryMapAddress = GuestPhysicalAddress(0x7000)
    public static let zeroPageAddress = GuestPhysicalAddress(0x7000)
    public static let bootStackPointer: UInt64 = 0x8ff0
    public static let pml4Address = GuestPhysicalAddress(0x9000)
    public static let pdptAddress = GuestPhysicalAddress(0xa000)
    public static let pageDirectoryAddress = GuestPhysicalAddress(0xb000)
    public static let commandLineAddress = GuestPhysicalAddress(0x20000)
    /// Start of the extended BIOS data area: RAM below it is usable, above it is reserved.
    public static let ebdaStart: UInt64 = 0x9fc00
    /// The BIOS area (0xE0000–0xFFFFF), reserved in the e820 map: Linux and other guests scan
    /// it for the ACPI RSDP and the MP floating pointer.
    public static let biosAreaStart: UInt64 = 0xe0000
    public static let biosAreaSize: UInt64 = 0x20000
    /// ACPI tables (RSDP first, where scans find it) in the lower half of the BIOS area...
    public static let acpiTablesAddress = GuestPhysicalAddress(0xe0000)
    public static let acpiTablesLimit: UInt64 = 0xf000
    /// ...then the 16-byte VM generation ID on a page of its own, which the guest maps...
    public static let generationIDAddress = GuestPhysicalAddress(0xef000)
    /// ...and the MP table in the upper half, where Linux scans for `_MP_` (0xF0000–0xFFFFF).
    public static let mpTableAddress = GuestPhysicalAddress(0xf0000)
    public static let mpTableLimit: UInt64 = 0x10000
    public static let highMemoryStart: UInt64 = 0x100000
    /// Linux's default load address for a 64-bit kernel; also where ELF kernels usually ask to go.
    public static let defaultKernelAddress: UInt64 = 0x100_0000

    public static let mmioHoleStart: UInt64 = 0xc000_0000
    public static let fourGiB: UInt64 = 0x1_0000_0000
    public static let ioapicAddress: UInt64 = 0xfec0_0000
    public static let lapicAddress: UInt64 = 0xfee0_0000
    /// Three pages KVM on Intel needs for the real-mode TSS, and below them the page of its
    /// identity map, which KVM places there by default (so it is never set).
    public static let kvmTSSAddress: UInt64 = 0xfffb_d000
    public static let kvmIdentityMapAddress: UInt64 = 0xfffb_c000
    /// Firecracker's boot-timer device: the guest writes `bootMarkerMagic` here when it is up.
    public static let bootMarkerAddress: UInt64 = 0xd000_0000
    public static let bootMarkerMagic: UInt8 = 123

    /// virtio-mmio devices: one 4 KiB window each, right above the boot marker, each on its own
    /// ISA interrupt line (avoiding the timer, keyboard, cascade, COM1 and RTC lines), then the
    /// IOAPIC's upper pins.
    public static let virtioMMIOBase: UInt64 = 0xd000_1000
    public static let virtioMMIOWindow: UInt64 = 0x1000
    public static let virtioInterrupts: [UInt32] = [5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]

    public static func virtioSlot(_ index: Int) -> (address: UInt64, interrupt: UInt32)? {
        guard index >= 0, index < virtioInterrupts.count else { return nil }
        return (virtioMMIOBase + UInt64(index) * virtioMMIOWindow, virtioInterrupts[index])
    }

    /// Linux's x86 `COMMAND_LINE_SIZE`, including the terminating NUL: the limit for ELF kernels,
    /// which carry no header that says otherwise.
    public static let elfCommandLineLimit = 2048

    public static let minimumMemory = MachineLimits.minimumMemory

    /// The RAM regions for a VM of `size` bytes: below the MMIO hole, then from 4 GiB upward.
    public static func ramRegions(memoryBytes size: UInt64) -> [(start: GuestPhysicalAddress, size: UInt64)] {
        let low = min(size, mmioHoleStart)
        var regions: [(start: GuestPhysicalAddress, size: UInt64)] = [(GuestPhysicalAddress(0), low)]
        if size > low { regions.append((GuestPhysicalAddress(fourGiB), size - low)) }
        return regions
    }

    /// The end of RAM below the MMIO hole.
    public static func lowMemoryEnd(memoryBytes size: UInt64) -> UInt64 { min(size, mmioHoleStart) }
}

/// One entry of the BIOS e820 map, the memory map Linux and PVH guests trust.
public struct E820Entry: Equatable, Sendable {
    public enum Kind: UInt32, Sendable { case ram = 1, reserved = 2 }
    public let address: UInt64
    public let size: UInt64
    public let kind: Kind

    public init(address: UInt64, size: UInt64, kind: Kind) {
        self.address = address; self.size = size; self.kind = kind
    }

    public static func map(memoryBytes size: UInt64) -> [E820Entry] {
        let lowEnd = MachineLayout.lowMemoryEnd(memoryBytes: size)
        var entries = [
            E820Entry(address: 0, size: MachineLayout.ebdaStart, kind: .ram),
            E820Entry(address: MachineLayout.ebdaStart, size: 0xa0000 - MachineLayout.ebdaStart, kind: .reserved),
            E820Entry(address: MachineLayout.biosAreaStart, size: MachineLayout.biosAreaSize, kind: .reserved),
            E820Entry(address: MachineLayout.highMemoryStart, size: lowEnd - MachineLayout.highMemoryStart, kind: .ram),
        ]
        if size > lowEnd {
            entries.append(E820Entry(address: MachineLayout.fourGiB, size: size - lowEnd, kind: .ram))
        }
        return entries
    }
}
