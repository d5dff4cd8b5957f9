import Foundation
import GuestMemory
import MachineSpec
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

    /// Lazy restore's mapping (docs/snapshots.md): RAM reads the file where it was put, writes
    /// never reach the file, an untouched page counts as zeros only over a hole in the file, and
    /// RAM that must become zeros (a kernel's .bss, a reboot) does, not the file's old data.
    @Test func savedStateIsMappedPrivately() throws {
        let layout: [(start: GuestPhysicalAddress, size: UInt64)] = [(GuestPhysicalAddress(0), 128 << 10), (GuestPhysicalAddress(1 << 20), 64 << 10)]
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-lazy-\(getpid())").path
        defer { unlink(path) }
        // One page of something else, then each page of RAM filled with its number plus one,
        // but for the last 8 pages of the second region: a hole (RAM the guest never wrote).
        var bytes = [UInt8](repeating: 0xee, count: 4096)
        for page in 0..<40 { bytes += [UInt8](repeating: UInt8(page + 1), count: 4096) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        #expect(truncate(path, off_t(4096 + 48 * 4096)) == 0)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        #expect(fd >= 0)
        defer { close(fd) }

        let memory = try GuestMemory(anonymousRegions: layout)
        try memory.write(UInt64(0x1234), at: GuestPhysicalAddress(0))   // what a build writes first
        #expect(memory.mayMapFile && !memory.mapsSavedState)
        let secondRegion = try #require(memory.regions.last).host
        #expect(memory.untouchedPages()?.neverTouched(secondRegion, length: 4096) == true)
        try memory.mapPrivately(file: fd, at: 4096)
        #expect(memory.mapsSavedState)
        // Untouched since, but the file holds data there: not zeros. Over the hole: zeros.
        let pages = try #require(memory.untouchedPages())
        #expect(!pages.neverTouched(secondRegion, length: 4096))
        #expect(pages.neverTouched(secondRegion + 8 * 4096, length: 8 * 4096))
        #expect(!pages.neverTouched(secondRegion + 4 * 4096, length: 8 * 4096))
        #expect(try memory.read(UInt8.self, at: GuestPhysicalAddress(0)) == 1)
        #expect(try memory.read(UInt8.self, at: GuestPhysicalAddress(31 * 4096 + 7)) == 32)
        #expect(try memory.read(UInt8.self, at: GuestPhysicalAddress(1 << 20)) == 33)
        #expect(try memory.read(UInt8.self, at: GuestPhysicalAddress((1 << 20) + 7 * 4096)) == 40)
        #expect(try memory.read(UInt8.self, at: GuestPhysicalAddress((1 << 20) + 15 * 4096)) == 0)

        // The guest's writes are its own copy: the state file is untouched.
        try memory.write(UInt32(0xdead_beef), at: GuestPhysicalAddress(1 << 20))
        #expect(try memory.read(UInt32.self, at: GuestPhysicalAddress(1 << 20)) == 0xdead_beef)
        var first: UInt8 = 0
        #expect(pread(fd, &first, 1, off_t(4096 + 32 * 4096)) == 1 && first == 33)

        // Zeros asked for are zeros, not the file showing through a dropped page.
        try memory.fill(0, count: 32 * 4096, at: GuestPhysicalAddress(0))
        #expect(try memory.readBytes(count: 32 * 4096, at: GuestPhysicalAddress(0)).allSatisfy { $0 == 0 })
        try memory.zeroAll()
        #expect(!memory.mapsSavedState && memory.untouchedPages()?.neverTouched(secondRegion + 12 * 4096, length: 4096) == true)
        #expect(try memory.readBytes(count: 16 * 4096, at: GuestPhysicalAddress(1 << 20)).allSatisfy { $0 == 0 })
        try memory.write(UInt8(9), at: GuestPhysicalAddress(5))
        #expect(try memory.read(UInt8.self, at: GuestPhysicalAddress(5)) == 9)

        // RAM the spec wants resident or placed is read, never mapped.
        let resident = try GuestMemory(anonymousRegions: layout, backing: MemoryBacking(preallocate: true))
        #expect(!resident.mayMapFile)
        #expect(throws: GuestMemoryError.fileMappingFailed(offset: 4096, errno: EINVAL)) { try resident.mapPrivately(file: fd, at: 4096) }
    }
}
