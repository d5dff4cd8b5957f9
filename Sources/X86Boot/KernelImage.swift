import GuestMemory

/// How the vCPU enters the kernel.
public enum EntryProtocol: Equatable, Sendable {
    /// Linux's 64-bit boot protocol: long mode, identity-mapped, zero page address in RSI.
    case linux64
    /// Xen's PVH: 32-bit protected mode, paging off, `hvm_start_info` address in EBX.
    case pvh
}

/// A parsed kernel file, validated before any guest exists, so bad input is refused with nothing
/// started.
public struct KernelImage: Sendable {
    public enum Format: String, Sendable { case elf = "ELF vmlinux", bzImage = "bzImage" }

    struct Segment: Sendable {
        let fileOffset: Int
        let fileSize: Int
        let memoryBytes: UInt64
        let physicalAddress: UInt64
    }

    public let path: String
    public let format: Format
    let bytes: [UInt8]
    let segments: [Segment]
    /// ELF: `e_entry` (Linux puts the physical address of `startup_64` there).
    let elfEntry: UInt64
    /// ELF: the `XEN_ELFNOTE_PHYS32_ENTRY` note, when present.
    public let pvhEntry: UInt64?
    /// bzImage: the setup header bytes from 0x1f1, copied into the zero page.
    let setupHeader: [UInt8]
    public let bootProtocolVersion: UInt16
    /// bzImage: where the protected-mode kernel is placed and how much room it needs there.
    let bzImageLoadAddress: UInt64
    let bzImageInitSize: UInt64
    let payloadOffset: Int

    /// Longest command line, in bytes without the terminating NUL.
    public let commandLineLimit: Int
    /// Highest address an initrd byte may occupy.
    public let initrdAddressMax: UInt64

    public static func load(path: String) throws(BootError) -> KernelImage {
        try parse(bytes: readWholeFile(path, field: "--kernel"), path: path)
    }

    public static func parse(bytes: [UInt8], path: String) throws(BootError) -> KernelImage {
        if bytes.count >= 4, bytes[0] == 0x7f, bytes[1] == 0x45, bytes[2] == 0x4c, bytes[3] == 0x46 {
            return try parseELF(bytes: bytes, path: path)
        }
        if bytes.le(UInt16.self, at: 0x1fe) == 0xaa55, bytes.le(UInt32.self, at: 0x202) == 0x5372_6448 {
            return try parseBzImage(bytes: bytes, path: path)
        }
        throw .unrecognizedKernel(path: path, firstBytes: Array(bytes.prefix(4)))
    }

    // MARK: ELF

    /// ELF64 (Linux's vmlinux, entered in 64-bit mode or through PVH) and ELF32 (PVH kernels
    /// packaged as 32-bit files, which QEMU also loads; only their PVH entry can be used).
    static func parseELF(bytes: [UInt8], path: String) throws(BootError) -> KernelImage {
        func fail(_ reason: String) -> BootError { .malformedELF(path: path, reason: reason) }
        guard bytes.count >= 52 else { throw fail("file is \(bytes.count) bytes, shorter than an ELF header") }
        let is64 = bytes[4] == 2
        guard is64 || bytes[4] == 1 else { throw fail("ELF class \(bytes[4]) is neither ELFCLASS32 nor ELFCLASS64") }
        guard !is64 || bytes.count >= 64 else { throw fail("file is \(bytes.count) bytes, shorter than an ELF64 header") }
        guard bytes[5] == 1 else { throw fail("not little-endian") }
        let machine = bytes.le(UInt16.self, at: 18) ?? 0
        guard machine == 62 || (!is64 && machine == 3) else {
            throw fail("machine \(machine) is not x86-64 (62)\(is64 ? "" : " or i386 (3)")")
        }
        let header: (entry: UInt64?, programHeaders: UInt64?, entrySize: UInt16?, count: UInt16?) = is64
            ? (bytes.le(UInt64.self, at: 24), bytes.le(UInt64.self, at: 32), bytes.le(UInt16.self, at: 54), bytes.le(UInt16.self, at: 56))
            : (bytes.le(UInt32.self, at: 24).map(UInt64.init), bytes.le(UInt32.self, at: 28).map(UInt64.init),
               bytes.le(UInt16.self, at: 42), bytes.le(UInt16.self, at: 44))
        guard let entry = header.entry, let programHeaderOffset = header.programHeaders,
              let entrySize = header.entrySize, let programHeaderCount = header.count else { throw fail("truncated header") }
        let minimumEntrySize: UInt16 = is64 ? 56 : 32
        guard entrySize >= minimumEntrySize else { throw fail("program header size \(entrySize) is below \(minimumEntrySize)") }
        guard programHeaderOffset < UInt64(bytes.count),
              UInt64(programHeaderCount) * UInt64(entrySize) <= UInt64(bytes.count) - programHeaderOffset else {
            throw fail("program headers lie outside the file")
        }
        var segments: [Segment] = []
        var pvhEntry: UInt64?
        for index in 0..<Int(programHeaderCount) {
            let base = Int(programHeaderOffset) + index * Int(entrySize)
            let fields: (type: UInt32?, offset: UInt64?, physical: UInt64?, fileSize: UInt64?, memoryBytes: UInt64?) = is64
                ? (bytes.le(UInt32.self, at: base), bytes.le(UInt64.self, at: base + 8), bytes.le(UInt64.self, at: base + 24),
                   bytes.le(UInt64.self, at: base + 32), bytes.le(UInt64.self, at: base + 40))
                : (bytes.le(UInt32.self, at: base), bytes.le(UInt32.self, at: base + 4).map(UInt64.init),
                   bytes.le(UInt32.self, at: base + 12).map(UInt64.init), bytes.le(UInt32.self, at: base + 16).map(UInt64.init),
                   bytes.le(UInt32.self, at: base + 20).map(UInt64.init))
            guard let type = fields.type, let offset = fields.offset, let physical = fields.physical,
                  let fileSize = fields.fileSize, let memoryBytes = fields.memoryBytes else { throw fail("truncated program header \(index)") }
            guard offset <= UInt64(bytes.count), fileSize <= UInt64(bytes.count) - offset else {
                throw fail("segment \(index) lies outside the file")
            }
            switch type {
            case 1: // PT_LOAD
                guard fileSize <= memoryBytes else { throw fail("segment \(index) has p_filesz > p_memsz") }
                guard physical <= UInt64.max - memoryBytes else { throw fail("segment \(index) wraps the address space") }
                segments.append(Segment(fileOffset: Int(offset), fileSize: Int(fileSize),
                                        memoryBytes: memoryBytes, physicalAddress: physical))
            case 4: // PT_NOTE
                if let found = pvhEntryNote(bytes: bytes, offset: Int(offset), size: Int(fileSize)) { pvhEntry = found }
            default:
                break
            }
        }
        guard !segments.isEmpty else { throw fail("no PT_LOAD segment") }
        guard is64 || pvhEntry != nil else {
            throw fail("a 32-bit (ELFCLASS32) kernel boots only through PVH, and this one has no XEN_ELFNOTE_PHYS32_ENTRY note")
        }
        let kernel = KernelImage(path: path, format: .elf, bytes: bytes, segments: segments, elfEntry: entry,
                                 pvhEntry: pvhEntry, setupHeader: [], bootProtocolVersion: 0,
                                 bzImageLoadAddress: 0, bzImageInitSize: 0, payloadOffset: 0,
                                 commandLineLimit: MachineLayout.elfCommandLineLimit - 1,
                                 initrdAddressMax: MachineLayout.mmioHoleStart - 1)
        return kernel
    }

    /// Walks the notes of one PT_NOTE segment for Xen's PHYS32_ENTRY (type 18, name "Xen").
    static func pvhEntryNote(bytes: [UInt8], offset: Int, size: Int) -> UInt64? {
        func align4(_ value: Int) -> Int { (value + 3) & ~3 }
        var cursor = offset
        let end = offset + size
        while cursor + 12 <= end {
            guard let nameSize = bytes.le(UInt32.self, at: cursor),
                  let descriptorSize = bytes.le(UInt32.self, at: cursor + 4),
                  let type = bytes.le(UInt32.self, at: cursor + 8),
                  nameSize < 256, descriptorSize < 4096 else { return nil }
            let nameStart = cursor + 12
            let descriptorStart = nameStart + align4(Int(nameSize))
            let next = descriptorStart + align4(Int(descriptorSize))
            guard next <= end else { return nil }
            let name = bytes[nameStart..<nameStart + Int(nameSize)].prefix { $0 != 0 }
            if type == 18, Array(name) == Array("Xen".utf8) {
                if descriptorSize >= 8 { return bytes.le(UInt64.self, at: descriptorStart) }
                if descriptorSize >= 4 { return bytes.le(UInt32.self, at: descriptorStart).map(UInt64.init) }
                return nil
            }
            cursor = next
        }
        return nil
    }

    // MARK: bzImage

    static func parseBzImage(bytes: [UInt8], path: String) throws(BootError) -> KernelImage {
        func fail(_ reason: String) -> BootError { .malformedBzImage(path: path, reason: reason) }
        guard let version = bytes.le(UInt16.self, at: 0x206) else { throw fail("truncated setup header") }
        guard version >= 0x0206 else {
            throw BootError.unsupportedBootProtocol(path: path, version: version, reason: "Vireo needs boot protocol 2.06 or later")
        }
        guard version >= 0x020c else {
            throw BootError.unsupportedBootProtocol(path: path, version: version,
                                                    reason: "the 64-bit entry point is only advertised from protocol 2.12 on")
        }
        guard let setupSectorsByte = bytes.le(UInt8.self, at: 0x1f1),
              let loadFlags = bytes.le(UInt8.self, at: 0x211),
              let initrdMax = bytes.le(UInt32.self, at: 0x22c),
              let extendedLoadFlags = bytes.le(UInt16.self, at: 0x236),
              let commandLineSize = bytes.le(UInt32.self, at: 0x238),
              let preferredAddress = bytes.le(UInt64.self, at: 0x258),
              let initSize = bytes.le(UInt32.self, at: 0x260),
              let jumpLength = bytes.le(UInt8.self, at: 0x201) else { throw fail("truncated setup header") }
        guard loadFlags & 0x01 != 0 else { throw fail("LOADED_HIGH is clear; only kernels loaded at 1 MiB or above boot") }
        guard extendedLoadFlags & 0x01 != 0 else { throw fail("XLF_KERNEL_64 is clear: the kernel has no 64-bit entry point") }
        let setupSectors = setupSectorsByte == 0 ? 4 : Int(setupSectorsByte)
        let payloadOffset = (setupSectors + 1) * 512
        guard payloadOffset < bytes.count else { throw fail("setup_sects=\(setupSectors) points past the end of the file") }
        let headerEnd = 0x202 + Int(jumpLength)
        guard headerEnd > 0x1f1, headerEnd <= min(bytes.count, 0x1f1 + 0x7f + 0x100) else { throw fail("setup header length \(jumpLength) is implausible") }
        let loadAddress = preferredAddress >= MachineLayout.highMemoryStart ? preferredAddress : MachineLayout.defaultKernelAddress
        return KernelImage(path: path, format: .bzImage, bytes: bytes, segments: [], elfEntry: 0, pvhEntry: nil,
                           setupHeader: Array(bytes[0x1f1..<headerEnd]), bootProtocolVersion: version,
                           bzImageLoadAddress: loadAddress,
                           bzImageInitSize: max(UInt64(initSize), UInt64(bytes.count - payloadOffset)),
                           payloadOffset: payloadOffset,
                           commandLineLimit: max(0, Int(commandLineSize)),
                           initrdAddressMax: UInt64(initrdMax))
    }

    // MARK: Loading

    /// The entry protocol this kernel will be started with. PVH wins when the kernel offers it, as
    /// in Firecracker: it needs no zero page and no real-mode header.
    public var entryProtocol: EntryProtocol { pvhEntry != nil ? .pvh : .linux64 }

    /// The first byte above everything the kernel occupies once loaded (and, for a bzImage, while
    /// it decompresses itself).
    public var loadedEnd: UInt64 {
        switch format {
        case .elf: return segments.map { $0.physicalAddress + $0.memoryBytes }.max() ?? 0
        case .bzImage: return bzImageLoadAddress + bzImageInitSize
        }
    }

    /// Copies the kernel into guest memory and returns its entry point.
    public func load(into memory: GuestMemory) throws(BootError) -> GuestPhysicalAddress {
        let ramEnd = MachineLayout.lowMemoryEnd(memoryBytes: memory.totalSize)
        guard loadedEnd <= ramEnd else { throw .kernelDoesNotFit(path: path, needed: loadedEnd, available: ramEnd) }
        switch format {
        case .elf:
            for segment in segments {
                let start = GuestPhysicalAddress(segment.physicalAddress)
                do {
                    try memory.write(bytes[segment.fileOffset..<segment.fileOffset + segment.fileSize], at: start)
                    let bssSize = segment.memoryBytes - UInt64(segment.fileSize)
                    if bssSize > 0 { try memory.fill(0, count: Int(bssSize), at: start + UInt64(segment.fileSize)) }
                } catch {
                    throw .kernelDoesNotFit(path: path, needed: segment.physicalAddress + segment.memoryBytes, available: ramEnd)
                }
            }
            if let pvhEntry, entryProtocol == .pvh { return GuestPhysicalAddress(pvhEntry) }
            return GuestPhysicalAddress(elfEntry)
        case .bzImage:
            do {
                try memory.write(bytes[payloadOffset...], at: GuestPhysicalAddress(bzImageLoadAddress))
            } catch {
                throw .kernelDoesNotFit(path: path, needed: loadedEnd, available: ramEnd)
            }
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            return GuestPhysicalAddress(bzImageLoadAddress + 0x200)
        }
    }
}
