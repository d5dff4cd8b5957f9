import GuestMemory
import MachineSpec
import Testing
@testable import X86Boot

@Suite struct BootTablesTests {
    @Test func e820SplitsAroundTheMMIOHole() {
        let map = E820Entry.map(memoryBytes: 4 << 30)
        #expect(map.first == E820Entry(address: 0, size: 0x9fc00, kind: .ram))
        #expect(map.contains(E820Entry(address: 0x10_0000, size: 0xc000_0000 - 0x10_0000, kind: .ram)))
        #expect(map.last == E820Entry(address: 0x1_0000_0000, size: 1 << 30, kind: .ram))
        let ram = map.filter { $0.kind == .ram }.reduce(UInt64(0)) { $0 + $1.size }
        #expect(ram == (4 << 30) - 0x10_0000 + 0x9fc00)
    }

    @Test func smallVMHasNoHighRegion() {
        let map = E820Entry.map(memoryBytes: 256 << 20)
        #expect(map.last == E820Entry(address: 0x10_0000, size: (256 << 20) - 0x10_0000, kind: .ram))
        #expect(MachineLayout.ramRegions(memoryBytes: 256 << 20).count == 1)
    }

    @Test func mpTableChecksumsAndEntries() {
        let table = MPTable(cpus: 3).bytes
        #expect(Array(table[0..<4]) == Array("_MP_".utf8))
        #expect(table[0..<16].reduce(UInt8(0), &+) == 0)
        #expect(table.le(UInt32.self, at: 4) == UInt32(MachineLayout.mpTableAddress.rawValue + 16))
        let configuration = Array(table[16...])
        #expect(Array(configuration[0..<4]) == Array("PCMP".utf8))
        let length = Int(configuration.le(UInt16.self, at: 4) ?? 0)
        #expect(length == configuration.count)
        #expect(configuration.reduce(UInt8(0), &+) == 0)
        // 3 processors, 1 bus, 1 IOAPIC, 24 I/O interrupts, 2 local interrupts.
        #expect(configuration.le(UInt16.self, at: 34) == 31)
        let processors = (0..<3).map { Array(configuration[(44 + $0 * 20)..<(44 + $0 * 20 + 4)]) }
        #expect(processors == [[0, 0, 0x14, 3], [0, 1, 0x14, 1], [0, 2, 0x14, 1]])
        let ioapic = 44 + 3 * 20 + 8
        #expect(Array(configuration[ioapic..<ioapic + 4]) == [2, 3, 0x11, 1])
        #expect(configuration.le(UInt32.self, at: ioapic + 4) == 0xfec0_0000)
    }

    @Test func mpTableFitsTheLargestMachine() {
        #expect(UInt64(MPTable(cpus: BootConfiguration.maximumCPUs).bytes.count) <= MachineLayout.mpTableLimit)
    }

    @Test func gdtDescriptorsMatchTheClassicEncodings() {
        let linux = GlobalDescriptorTable.boot(for: .linux64)
        #expect(linux.code.descriptor == 0x00af_9b00_0000_ffff)
        #expect(linux.data.descriptor == 0x00cf_9300_0000_ffff)
        let pvh = GlobalDescriptorTable.boot(for: .pvh)
        #expect(pvh.code.descriptor == 0x00cf_9b00_0000_ffff)
        #expect(pvh.taskState.descriptor == 0x0000_8b00_0000_0067)
    }

    @Test func zeroPageForBzImageCarriesHeaderAndBootData() throws {
        let kernel = try KernelImage.parse(bytes: makeBzImage(), path: "bz")
        let e820 = E820Entry.map(memoryBytes: 128 << 20)
        let page = ZeroPage(kernel: kernel, commandLineAddress: GuestPhysicalAddress(0x20000), commandLineSize: 12,
                            initrdAddress: GuestPhysicalAddress(0x7f0_0000), initrdSize: 4096, e820: e820).bytes
        #expect(page.le(UInt32.self, at: 0x202) == 0x5372_6448)
        #expect(page.le(UInt16.self, at: 0x206) == 0x020f)
        #expect(page[0x210] == 0xff)
        #expect(page.le(UInt32.self, at: 0x228) == 0x20000)
        #expect(page.le(UInt32.self, at: 0x218) == 0x7f0_0000)
        #expect(page.le(UInt32.self, at: 0x21c) == 4096)
        #expect(Int(page[0x1e8]) == e820.count)
        #expect(page.le(UInt64.self, at: 0x2d0 + 20 * 3) == 0x10_0000)
        #expect(page.le(UInt32.self, at: 0x2d0 + 20 * 3 + 16) == 1)
    }

    @Test func bootConfigurationPlacesInitrdHighAndAligned() throws {
        let kernel = try KernelImage.parse(bytes: makeELF(segments: [(0x100_0000, [1], 0x10_0000)]), path: "k")
        let configuration = try BootConfiguration(kernel: kernel, initrd: [UInt8](repeating: 7, count: 5000), initrdPath: "i",
                                                  commandLine: "console=ttyS0", memoryBytes: 64 << 20, cpus: 1)
        let address = try #require(try configuration.initrdAddress())
        #expect(address.rawValue % 4096 == 0)
        #expect(address.rawValue + 5000 <= 64 << 20)
        #expect(address.rawValue >= (64 << 20) - 8192)
    }

    @Test func commandLineLimitIsEnforced() throws {
        let kernel = try KernelImage.parse(bytes: makeELF(segments: [(0x100_0000, [1], 1)]), path: "k")
        #expect(throws: BootError.commandLineTooLong(length: 2048, limit: 2047)) {
            try BootConfiguration(kernel: kernel, initrd: nil, initrdPath: nil, commandLine: String(repeating: "x", count: 2048),
                                  memoryBytes: 64 << 20, cpus: 1)
        }
    }

    @Test func loadWritesPageTablesAndCommandLine() throws {
        let kernel = try KernelImage.parse(bytes: makeELF(segments: [(0x100_0000, [0xf4], 1)]), path: "k")
        let configuration = try BootConfiguration(kernel: kernel, initrd: nil, initrdPath: nil, commandLine: "hello",
                                                  memoryBytes: 64 << 20, cpus: 2)
        let memory = try GuestMemory(anonymousRegions: MachineLayout.ramRegions(memoryBytes: 64 << 20))
        let boot = try configuration.load(into: memory)
        #expect(boot.entryProtocol == .linux64)
        #expect(boot.cpuState.rip == 0x100_0000)
        #expect(boot.cpuState.rsi == MachineLayout.zeroPageAddress.rawValue)
        #expect(try memory.readBytes(count: 6, at: MachineLayout.commandLineAddress) == Array("hello\0".utf8))
        #expect(try memory.read(UInt64.self, at: MachineLayout.pml4Address) == 0xa003)
        #expect(try memory.read(UInt64.self, at: MachineLayout.pageDirectoryAddress + 8 * 511) == (511 << 21) | 0x83)
        #expect(try memory.readBytes(count: 4, at: MachineLayout.mpTableAddress) == Array("_MP_".utf8))
    }

    /// A kernel built without ACPI must still find every CPU when ACPI is on (the default), as on
    /// Firecracker and QEMU: the MP table is written beside the ACPI tables.
    @Test func acpiMachinesCarryTheMPTableToo() throws {
        let kernel = try KernelImage.parse(bytes: makeELF(segments: [(0x100_0000, [0xf4], 1)]), path: "k")
        let tables = ACPITables(cpus: 3, virtioDevices: [], generationIDAddress: MachineLayout.generationIDAddress.rawValue)
        let configuration = try BootConfiguration(kernel: kernel, initrd: nil, initrdPath: nil, commandLine: "hello", memoryBytes: 64 << 20,
                                                  cpus: 3, platform: .acpi(tables, generationID: Array(repeating: 7, count: 16)))
        let memory = try GuestMemory(anonymousRegions: MachineLayout.ramRegions(memoryBytes: 64 << 20))
        _ = try configuration.load(into: memory)
        #expect(try memory.readBytes(count: 8, at: MachineLayout.acpiTablesAddress) == Array("RSD PTR ".utf8))
        let expected = MPTable(cpus: 3).bytes
        #expect(try memory.readBytes(count: expected.count, at: MachineLayout.mpTableAddress) == expected)
    }

    /// The rules' slot count is the layout's: one interrupt line per virtio-mmio slot.
    @Test func virtioSlotsMatchTheLayout() {
        #expect(MachineLimits.virtioSlots == MachineLayout.virtioInterrupts.count)
        #expect(MachineLayout.virtioSlot(MachineLimits.virtioSlots - 1) != nil && MachineLayout.virtioSlot(MachineLimits.virtioSlots) == nil)
    }
}
