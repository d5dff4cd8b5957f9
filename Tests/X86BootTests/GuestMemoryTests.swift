import GuestMemory
import Testing
import X86Boot

@Suite struct GuestMemoryTests {
    @Test func accessesAreBoundsChecked() throws {
        let memory = try GuestMemory(anonymousRegions: MachineLayout.ramRegions(memoryBytes: 3584 << 20))
        #expect(memory.regions.count == 2)
        let end = GuestPhysicalAddress(MachineLayout.mmioHoleStart)
        #expect(throws: GuestMemoryError.outOfBounds(address: GuestPhysicalAddress(end.rawValue - 4), length: 8)) {
            try memory.read(UInt64.self, at: GuestPhysicalAddress(MachineLayout.mmioHoleStart - 4))
        }
        #expect(throws: GuestMemoryError.self) { try memory.write(UInt8(1), at: end) }
        #expect(throws: GuestMemoryError.self) { try memory.readBytes(count: 16, at: GuestPhysicalAddress(UInt64.max - 4)) }
        try memory.write(UInt32(0xdead_beef), at: GuestPhysicalAddress(MachineLayout.fourGiB))
        #expect(try memory.read(UInt32.self, at: GuestPhysicalAddress(MachineLayout.fourGiB)) == 0xdead_beef)
        #expect(try memory.read(UInt8.self, at: GuestPhysicalAddress(MachineLayout.fourGiB)) == 0xef)
    }

    @Test func overlappingRegionsAreRefused() {
        #expect(throws: GuestMemoryError.overlappingRegions(GuestPhysicalAddress(0x1000))) {
            try GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), 0x2000), (GuestPhysicalAddress(0x1000), 0x1000)])
        }
    }
}
