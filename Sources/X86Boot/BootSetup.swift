import GuestMemory
import MachineSpec

/// A flat segment as the vCPU's hidden descriptor cache holds it after a load from the GDT.
public struct SegmentRegister: Equatable, Sendable {
    public var base: UInt64 = 0
    public var limit: UInt32 = 0xfffff
    public var selector: UInt16
    public var type: UInt8
    public var present: Bool = true
    public var privilegeLevel: UInt8 = 0
    public var defaultSize32: Bool
    public var isCodeOrData: Bool = true
    public var longMode: Bool
    public var pageGranular: Bool = true

    /// The 8-byte GDT encoding of this segment.
    public var descriptor: UInt64 {
        let flags = UInt64((pageGranular ? 0x8 : 0) | (defaultSize32 ? 0x4 : 0) | (longMode ? 0x2 : 0))
        let access = UInt64((present ? 0x80 : 0) | (UInt8(privilegeLevel & 3) << 5) | (isCodeOrData ? 0x10 : 0) | (type & 0xf))
        return (UInt64(limit) & 0xffff) | ((base & 0xff_ffff) << 16) | (access << 40)
            | ((UInt64(limit) >> 16 & 0xf) << 48) | (flags << 52) | ((base >> 24 & 0xff) << 56)
    }
}

/// The register state a vCPU starts the kernel with.
public struct EntryCPUState: Sendable {
    public var rip: UInt64
    public var rsp: UInt64 = 0
    public var rsi: UInt64 = 0
    public var rbx: UInt64 = 0
    public var rflags: UInt64 = 0x2
    public var cr0: UInt64
    public var cr3: UInt64 = 0
    public var cr4: UInt64
    public var efer: UInt64
    public var code: SegmentRegister
    public var data: SegmentRegister
    public var taskRegister: SegmentRegister
    public var gdtBase: UInt64 = MachineLayout.gdtAddress.rawValue
    public var gdtLimit: UInt16
    public var idtBase: UInt64 = MachineLayout.idtAddress.rawValue
    public var idtLimit: UInt16 = 7
}

/// What the loader produced: where the BSP starts and what it expects in its registers.
public struct PreparedBoot: Sendable {
    public let entryProtocol: EntryProtocol
    public let cpuState: EntryCPUState
    public let initrdAddress: GuestPhysicalAddress?
    public let commandLineAddress: GuestPhysicalAddress
}

/// How the guest learns about its CPUs, interrupt controllers and devices.
public enum PlatformDescription: Sendable {
    /// An MP table only, for kernels built without ACPI; the caller announces virtio devices on
    /// the command line.
    case mpTable
    /// ACPI tables, and the VM generation ID (16 bytes) the VGEN device points at; the MP table
    /// is written beside them (its own region of the BIOS area).
    case acpi(ACPITables, generationID: [UInt8])

    public var usesACPI: Bool { if case .acpi = self { return true } else { return false } }
}

/// Everything needed to put a kernel into guest memory, validated as a unit before any guest
/// resource exists.
public struct BootConfiguration: Sendable {
    public let kernel: KernelImage
    public let initrd: [UInt8]?
    public let initrdPath: String?
    public let commandLine: String
    public let memoryBytes: UInt64
    public let cpus: Int
    public let platform: PlatformDescription
    /// The ACPI tables, built and checked once; empty without ACPI.
    let acpiTables: [PlacedTable]

    /// The most vCPUs this machine model describes: APIC IDs are 8 bits and the IOAPIC takes the
    /// ID after the last CPU. The rule lives with the machine's other rules.
    public static let maximumCPUs = MachineLimits.maximumCPUs

    public init(kernel: KernelImage, initrd: [UInt8]?, initrdPath: String?, commandLine: String,
                memoryBytes: UInt64, cpus: Int, platform: PlatformDescription = .mpTable) throws(BootError) {
        self.kernel = kernel
        self.platform = platform
        self.initrd = initrd
        self.initrdPath = initrdPath
        self.commandLine = commandLine
        self.memoryBytes = memoryBytes
        self.cpus = cpus
        let length = commandLine.utf8.count
        if length > kernel.commandLineLimit { throw .commandLineTooLong(length: length, limit: kernel.commandLineLimit) }
        if cpus > Self.maximumCPUs { throw .tooManyCPUs(requested: cpus, limit: Self.maximumCPUs) }
        let lowEnd = MachineLayout.lowMemoryEnd(memoryBytes: memoryBytes)
        if kernel.loadedEnd > lowEnd { throw .kernelDoesNotFit(path: kernel.path, needed: kernel.loadedEnd, available: lowEnd) }
        if case let .acpi(tables, generationID) = platform {
            // Callers build it from 32 hex digits or 16 random bytes; anything else is a bug here.
            precondition(generationID.count == 16, "a VM generation ID is 16 bytes")
            acpiTables = try tables.validatedPlacement()
        } else {
            acpiTables = []
        }
        _ = try initrdAddress()
    }

    /// The RSDP's address for the entry protocols that carry it; nil without ACPI.
    var rsdpAddress: GuestPhysicalAddress? {
        if case let .acpi(tables, _) = platform { return tables.rsdpAddress }
        return nil
    }

    /// The initrd goes as high as the kernel allows, page-aligned, above the kernel's image: the
    /// same choice as Firecracker and QEMU, which keeps it clear of where the kernel decompresses.
    public func initrdAddress() throws(BootError) -> GuestPhysicalAddress? {
        guard let initrd else { return nil }
        let size = UInt64(initrd.count)
        let top = min(MachineLayout.lowMemoryEnd(memoryBytes: memoryBytes), kernel.initrdAddressMax &+ 1)
        let floor = (kernel.loadedEnd + 0xfff) & ~0xfff
        let available = top > floor ? top - floor : 0
        guard size <= available else {
            throw .initrdDoesNotFit(path: initrdPath ?? "initrd", size: size, available: available)
        }
        return GuestPhysicalAddress((top - size) & ~0xfff)
    }

    /// Loads kernel, initrd, command line, boot tables and page tables into `memory`.
    public func load(into memory: GuestMemory) throws(BootError) -> PreparedBoot {
        let entry = try kernel.load(into: memory)
        let initrdAddress = try initrdAddress()
        do {
            if let initrd, let initrdAddress { try memory.write(initrd, at: initrdAddress) }
            var line = Array(commandLine.utf8)
            line.append(0)
            try memory.write(line, at: MachineLayout.commandLineAddress)
            let e820 = E820Entry.map(memoryBytes: memoryBytes)
            switch platform {
            case .mpTable:
                try MPTable(cpus: cpus).write(into: memory)
            case let .acpi(_, generationID):
                try PlacedTable.write(acpiTables, into: memory)
                try memory.write(generationID, at: MachineLayout.generationIDAddress)
                // The MP table too, as Firecracker and QEMU write it: a kernel built without ACPI
                // still finds every CPU (one with ACPI takes the MADT and ignores this).
                try MPTable(cpus: cpus).write(into: memory)
            }
            let gdt = GlobalDescriptorTable.boot(for: kernel.entryProtocol)
            try gdt.write(into: memory)
            try memory.write(UInt64(0), at: MachineLayout.idtAddress)

            var state: EntryCPUState
            switch kernel.entryProtocol {
            case .linux64:
                try IdentityPageTables.write(into: memory)
                let zeroPage = ZeroPage(kernel: kernel, commandLineAddress: MachineLayout.commandLineAddress,
                                        commandLineSize: UInt32(line.count), initrdAddress: initrdAddress,
                                        initrdSize: UInt32(initrd?.count ?? 0), e820: e820, rsdpAddress: rsdpAddress)
                try memory.write(zeroPage.bytes, at: MachineLayout.zeroPageAddress)
                state = EntryCPUState(rip: entry.rawValue, cr0: 0x8000_0011, cr4: 0x20, efer: 0x500,
                                      code: gdt.code, data: gdt.data, taskRegister: gdt.taskState,
                                      gdtLimit: gdt.limit)
                state.cr3 = MachineLayout.pml4Address.rawValue
                state.rsp = MachineLayout.bootStackPointer
                state.rsi = MachineLayout.zeroPageAddress.rawValue
            case .pvh:
                let startInfo = PVHStartInfo(commandLineAddress: MachineLayout.commandLineAddress,
                                             initrdAddress: initrdAddress, initrdSize: UInt64(initrd?.count ?? 0),
                                             e820: e820, rsdpAddress: rsdpAddress)
                try startInfo.write(into: memory)
                state = EntryCPUState(rip: entry.rawValue, cr0: 0x11, cr4: 0, efer: 0,
                                      code: gdt.code, data: gdt.data, taskRegister: gdt.taskState,
                                      gdtLimit: gdt.limit)
                state.rbx = MachineLayout.pvhStartInfoAddress.rawValue
            }
            return PreparedBoot(entryProtocol: kernel.entryProtocol, cpuState: state,
                                initrdAddress: initrdAddress, commandLineAddress: MachineLayout.commandLineAddress)
        } catch {
            throw .memory(error)
        }
    }
}

/// The boot GDT: null, code, data, TSS — the selectors Linux's and PVH's entry code expect (0x08,
/// 0x10, 0x18).
public struct GlobalDescriptorTable: Sendable {
    public let code: SegmentRegister
    public let data: SegmentRegister
    public let taskState: SegmentRegister

    public static func boot(for entry: EntryProtocol) -> GlobalDescriptorTable {
        let longMode = entry == .linux64
        return GlobalDescriptorTable(
            code: SegmentRegister(selector: 0x08, type: 0xb, defaultSize32: !longMode, longMode: longMode),
            data: SegmentRegister(selector: 0x10, type: 0x3, defaultSize32: true, longMode: false),
            taskState: SegmentRegister(selector: 0x18, type: 0xb, defaultSize32: false, isCodeOrData: false, longMode: false,
                                       pageGranular: false))
    }

    public var limit: UInt16 { UInt16(4 * 8 - 1) }

    public func write(into memory: GuestMemory) throws(GuestMemoryError) {
        let entries: [UInt64] = [0, code.descriptor, data.descriptor, taskState.descriptor]
        for (index, entry) in entries.enumerated() {
            try memory.write(entry, at: MachineLayout.gdtAddress + UInt64(index * 8))
        }
    }
}

extension SegmentRegister {
    init(selector: UInt16, type: UInt8, defaultSize32: Bool, isCodeOrData: Bool, longMode: Bool, pageGranular: Bool) {
        self.init(selector: selector, type: type, defaultSize32: defaultSize32, longMode: longMode)
        self.isCodeOrData = isCodeOrData
        self.pageGranular = pageGranular
        self.limit = pageGranular ? 0xfffff : 0x67
    }
}

/// The first GiB identity-mapped with 2 MiB pages: enough for the kernel's own entry code to run
/// until it builds its page tables.
public enum IdentityPageTables {
    public static func write(into memory: GuestMemory) throws(GuestMemoryError) {
        try memory.write(MachineLayout.pdptAddress.rawValue | 0x3, at: MachineLayout.pml4Address)
        try memory.write(MachineLayout.pageDirectoryAddress.rawValue | 0x3, at: MachineLayout.pdptAddress)
        for index in 0..<512 {
            try memory.write(UInt64(index) << 21 | 0x83, at: MachineLayout.pageDirectoryAddress + UInt64(index * 8))
        }
    }
}

/// Linux's `struct boot_params` ("zero page"), 4 KiB.
public struct ZeroPage: Sendable {
    public private(set) var bytes = [UInt8](repeating: 0, count: 4096)

    public init(kernel: KernelImage, commandLineAddress: GuestPhysicalAddress, commandLineSize: UInt32,
                initrdAddress: GuestPhysicalAddress?, initrdSize: UInt32, e820: [E820Entry],
                rsdpAddress: GuestPhysicalAddress? = nil) {
        if kernel.format == .bzImage {
            for (index, byte) in kernel.setupHeader.enumerated() { bytes[0x1f1 + index] = byte }
        } else {
            bytes.setLE(UInt16(0xaa55), at: 0x1fe)         // boot_flag
            bytes.setLE(UInt32(0x5372_6448), at: 0x202)    // header "HdrS"
            bytes.setLE(UInt32(0x0100_0000), at: 0x230)    // kernel_alignment
        }
        bytes[0x210] = 0xff                                // type_of_loader: undefined boot loader
        bytes[0x211] |= 0x80                               // loadflags: CAN_USE_HEAP
        bytes.setLE(UInt16(0xfe00), at: 0x224)             // heap_end_ptr
        bytes.setLE(UInt16(0xffff), at: 0x1fa)             // vid_mode: "normal"
        let commandLine = commandLineAddress.rawValue
        bytes.setLE(UInt32(truncatingIfNeeded: commandLine), at: 0x228)
        bytes.setLE(UInt32(truncatingIfNeeded: commandLine >> 32), at: 0x0c8)
        bytes.setLE(commandLineSize, at: 0x238)
        if let initrdAddress {
            bytes.setLE(UInt32(truncatingIfNeeded: initrdAddress.rawValue), at: 0x218)
            bytes.setLE(UInt32(truncatingIfNeeded: initrdAddress.rawValue >> 32), at: 0x0c0)
            bytes.setLE(initrdSize, at: 0x21c)
        }
        // acpi_rsdp_addr (boot protocol 2.14+); older kernels find the RSDP by scanning the BIOS area.
        if let rsdpAddress { bytes.setLE(rsdpAddress.rawValue, at: 0x070) }
        let entries = e820.prefix(128)
        bytes[0x1e8] = UInt8(entries.count)
        for (index, entry) in entries.enumerated() {
            let base = 0x2d0 + index * 20
            bytes.setLE(entry.address, at: base)
            bytes.setLE(entry.size, at: base + 8)
            bytes.setLE(entry.kind.rawValue, at: base + 16)
        }
    }
}

/// Xen's `hvm_start_info` (version 1) with its module list and memory map.
public struct PVHStartInfo: Sendable {
    public static let magic: UInt32 = 0x336e_c578
    let commandLineAddress: GuestPhysicalAddress
    let initrdAddress: GuestPhysicalAddress?
    let initrdSize: UInt64
    let e820: [E820Entry]
    var rsdpAddress: GuestPhysicalAddress? = nil

    public func write(into memory: GuestMemory) throws(GuestMemoryError) {
        var info: [UInt8] = []
        info.append(le: Self.magic)
        info.append(le: UInt32(1))                                     // version
        info.append(le: UInt32(0))                                     // flags
        info.append(le: UInt32(initrdAddress == nil ? 0 : 1))          // nr_modules
        info.append(le: MachineLayout.pvhModuleListAddress.rawValue)   // modlist_paddr
        info.append(le: commandLineAddress.rawValue)                   // cmdline_paddr
        info.append(le: rsdpAddress?.rawValue ?? 0)                     // rsdp_paddr
        info.append(le: MachineLayout.pvhMemoryMapAddress.rawValue)    // memmap_paddr
        info.append(le: UInt32(e820.count))                            // memmap_entries
        info.append(le: UInt32(0))
        try memory.write(info, at: MachineLayout.pvhStartInfoAddress)
        if let initrdAddress {
            var module: [UInt8] = []
            module.append(le: initrdAddress.rawValue)
            module.append(le: initrdSize)
            module.append(le: UInt64(0))
            module.append(le: UInt64(0))
            try memory.write(module, at: MachineLayout.pvhModuleListAddress)
        }
        var map: [UInt8] = []
        for entry in e820 {
            map.append(le: entry.address)
            map.append(le: entry.size)
            map.append(le: entry.kind.rawValue)
            map.append(le: UInt32(0))
        }
        try memory.write(map, at: MachineLayout.pvhMemoryMapAddress)
    }
}
