import GuestMemory
import Testing
@testable import X86Boot

/// Builds a minimal valid bzImage header around a payload, for the parser's edge cases.
func makeBzImage(version: UInt16 = 0x020f, extendedLoadFlags: UInt16 = 0x1, loadFlags: UInt8 = 0x1,
                 setupSectors: UInt8 = 4, payload: Int = 4096) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: (Int(setupSectors) + 1) * 512 + payload)
    bytes[0x1f1] = setupSectors
    bytes.setLE(UInt16(0xaa55), at: 0x1fe)
    bytes[0x200] = 0xeb
    bytes[0x201] = 0x6a   // header runs to 0x26c
    bytes.setLE(UInt32(0x5372_6448), at: 0x202)
    bytes.setLE(version, at: 0x206)
    bytes[0x211] = loadFlags
    bytes.setLE(UInt32(0x7fff_ffff), at: 0x22c)
    bytes.setLE(extendedLoadFlags, at: 0x236)
    bytes.setLE(UInt32(2047), at: 0x238)
    bytes.setLE(UInt64(0x100_0000), at: 0x258)
    bytes.setLE(UInt32(0x20_0000), at: 0x260)
    return bytes
}

/// A minimal ELF64 x86-64 executable with the given PT_LOAD segments and optional PVH note.
func makeELF(entry: UInt64 = 0x100_0000, segments: [(paddr: UInt64, data: [UInt8], memsz: UInt64)],
             pvhEntry: UInt32? = nil, elfClass: UInt8 = 2, machine: UInt16 = 62) -> [UInt8] {
    let headerCount = segments.count + (pvhEntry == nil ? 0 : 1)
    var bytes = [UInt8](repeating: 0, count: 64 + 56 * headerCount)
    bytes[0...3] = [0x7f, 0x45, 0x4c, 0x46]
    bytes[4] = elfClass
    bytes[5] = 1
    bytes[6] = 1
    bytes.setLE(UInt16(2), at: 16)
    bytes.setLE(machine, at: 18)
    bytes.setLE(entry, at: 24)
    bytes.setLE(UInt64(64), at: 32)
    bytes.setLE(UInt16(56), at: 54)
    bytes.setLE(UInt16(headerCount), at: 56)
    for (index, segment) in segments.enumerated() {
        let header = 64 + index * 56
        bytes.setLE(UInt32(1), at: header)
        bytes.setLE(UInt64(bytes.count), at: header + 8)
        bytes.setLE(segment.paddr, at: header + 16)
        bytes.setLE(segment.paddr, at: header + 24)
        bytes.setLE(UInt64(segment.data.count), at: header + 32)
        bytes.setLE(segment.memsz, at: header + 40)
        bytes += segment.data
    }
    if let pvhEntry {
        let header = 64 + segments.count * 56
        var note: [UInt8] = []
        note.append(le: UInt32(4)); note.append(le: UInt32(4)); note.append(le: UInt32(18))
        note += Array("Xen\0".utf8)
        note.append(le: pvhEntry)
        bytes.setLE(UInt32(4), at: header)
        bytes.setLE(UInt64(bytes.count), at: header + 8)
        bytes.setLE(UInt64(note.count), at: header + 32)
        bytes += note
    }
    return bytes
}

@Suite struct KernelImageTests {
    @Test func parsesBzImageHeader() throws {
        let kernel = try KernelImage.parse(bytes: makeBzImage(), path: "bz")
        #expect(kernel.format == .bzImage)
        #expect(kernel.bootProtocolVersion == 0x020f)
        #expect(kernel.commandLineLimit == 2047)
        #expect(kernel.initrdAddressMax == 0x7fff_ffff)
        #expect(kernel.entryProtocol == .linux64)
        #expect(kernel.loadedEnd == 0x100_0000 + 0x20_0000)
    }

    @Test func refusesOldBootProtocol() {
        #expect(throws: BootError.unsupportedBootProtocol(path: "bz", version: 0x0205, reason: "Vireo needs boot protocol 2.06 or later")) {
            try KernelImage.parse(bytes: makeBzImage(version: 0x0205), path: "bz")
        }
    }

    @Test func refusesBzImageWithout64BitEntry() {
        #expect(throws: BootError.malformedBzImage(path: "bz", reason: "XLF_KERNEL_64 is clear: the kernel has no 64-bit entry point")) {
            try KernelImage.parse(bytes: makeBzImage(extendedLoadFlags: 0), path: "bz")
        }
    }

    @Test func refusesTruncatedBzImage() {
        let bytes = Array(makeBzImage(setupSectors: 60).prefix(0x300))
        #expect(throws: BootError.malformedBzImage(path: "bz", reason: "setup_sects=60 points past the end of the file")) {
            try KernelImage.parse(bytes: bytes, path: "bz")
        }
    }

    @Test func unrecognizedFileNamesBothMagics() {
        let error = #expect(throws: BootError.self) { try KernelImage.parse(bytes: Array("MZ not a kernel".utf8), path: "x") }
        #expect(error?.description.contains("found 4d 5a 20 6e") == true)
        #expect(error?.description.contains("\"HdrS\" at offset 0x202") == true)
    }

    @Test func elfSegmentsLoadAndBSSIsZeroed() throws {
        let code: [UInt8] = [0x90, 0x90, 0xf4]
        let kernel = try KernelImage.parse(bytes: makeELF(entry: 0x20_0000, segments: [(0x20_0000, code, 0x2000)]), path: "elf")
        #expect(kernel.format == .elf)
        #expect(kernel.entryProtocol == .linux64)
        #expect(kernel.commandLineLimit == 2047)
        let memory = try GuestMemory(anonymousRegions: MachineLayout.ramRegions(memoryBytes: 64 << 20))
        try memory.fill(0xcc, count: 0x2000, at: GuestPhysicalAddress(0x20_0000))
        let entry = try kernel.load(into: memory)
        #expect(entry == GuestPhysicalAddress(0x20_0000))
        #expect(try memory.readBytes(count: 3, at: GuestPhysicalAddress(0x20_0000)) == code)
        #expect(try memory.readBytes(count: 0x2000 - 3, at: GuestPhysicalAddress(0x20_0003)).allSatisfy { $0 == 0 })
    }

    @Test func pvhNoteSelectsPVHEntry() throws {
        let kernel = try KernelImage.parse(bytes: makeELF(segments: [(0x100_0000, [1, 2, 3], 3)], pvhEntry: 0x100_0040), path: "pvh")
        #expect(kernel.pvhEntry == 0x100_0040)
        #expect(kernel.entryProtocol == .pvh)
    }

    @Test func elfSegmentOutsideFileIsRefused() {
        var bytes = makeELF(segments: [(0x100_0000, [1, 2, 3, 4], 4)])
        bytes.setLE(UInt64(1 << 40), at: 64 + 32)   // p_filesz far beyond the file
        #expect(throws: BootError.malformedELF(path: "e", reason: "segment 0 lies outside the file")) {
            try KernelImage.parse(bytes: bytes, path: "e")
        }
    }

    @Test func elfProgramHeadersOutsideFileAreRefused() {
        var bytes = makeELF(segments: [(0x100_0000, [1], 1)])
        bytes.setLE(UInt16(60000), at: 56)
        #expect(throws: BootError.malformedELF(path: "e", reason: "program headers lie outside the file")) {
            try KernelImage.parse(bytes: bytes, path: "e")
        }
    }

    @Test func elfForAnotherMachineIsRefused() {
        #expect(throws: BootError.malformedELF(path: "e", reason: "machine 183 is not x86-64 (62)")) {
            try KernelImage.parse(bytes: makeELF(segments: [(0x100_0000, [1], 1)], machine: 183), path: "e")
        }
    }

    @Test func elfLoadedAboveRAMIsRefused() throws {
        let kernel = try KernelImage.parse(bytes: makeELF(segments: [(0x800_0000, [1], 0x1000)]), path: "big")
        let memory = try GuestMemory(anonymousRegions: MachineLayout.ramRegions(memoryBytes: 64 << 20))
        #expect(throws: BootError.kernelDoesNotFit(path: "big", needed: 0x800_1000, available: 64 << 20)) {
            try kernel.load(into: memory)
        }
    }

    @Test func truncatedInputsNeverTrap() {
        let samples: [[UInt8]] = [[], [0x7f], [0x7f, 0x45, 0x4c, 0x46], Array(makeELF(segments: [(0, [1], 1)]).prefix(70)),
                                  Array(makeBzImage().prefix(0x203)), Array(makeBzImage().prefix(0x250))]
        for sample in samples {
            #expect(throws: BootError.self) { try KernelImage.parse(bytes: sample, path: "t") }
        }
    }
}
