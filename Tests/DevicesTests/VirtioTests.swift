import DiskImage
import Foundation
import GuestMemory
import Synchronization
import Testing
@testable import Devices

final class PulseCounter: InterruptLine, Sendable {
    let rises = Mutex(0)
    func setLevel(_ high: Bool) { if high { rises.withLock { $0 += 1 } } }
    var count: Int { rises.withLock { $0 } }
}

/// A minimal virtio driver, as a guest would be, poking the transport's registers and laying out
/// a split queue in guest memory: descriptors at 0x1000, available ring at 0x2000, used at 0x3000,
/// each `base` further on (a second driver of another queue of the same device uses another base).
struct TestDriver: Sendable {
    let memory: GuestMemory
    let transport: VirtioMMIOTransport
    let queueSize: UInt16
    /// The queue this driver sets up and notifies.
    var queueIndex: UInt32 = 0
    /// Added to every address the driver lays out (rings and request buffers).
    var base: UInt64 = 0
    var nextDescriptor: UInt16 = 0
    var availableIndex: UInt16 = 0
    static let descriptors: UInt64 = 0x1000, available: UInt64 = 0x2000, used: UInt64 = 0x3000

    func register(_ offset: UInt64) -> UInt32 {
        var value: UInt32 = 0
        withUnsafeMutableBytes(of: &value) { transport.read(offset: offset, into: $0) }
        return value
    }
    func set(_ offset: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { transport.write(offset: offset, data: $0) }
    }

    /// The driver initialisation sequence of virtio 1.x §3.1.1.
    func initialise(features: UInt64 = VirtioFeature.version1, size: UInt16? = nil) {
        set(0x70, 0)
        set(0x70, 1)
        set(0x70, 3)
        set(0x24, 0); set(0x20, UInt32(truncatingIfNeeded: features))
        set(0x24, 1); set(0x20, UInt32(truncatingIfNeeded: features >> 32))
        set(0x70, 0xb)
        setUpQueue(size: size)
        set(0x70, 0xf)
    }

    /// QueueSel, size, ring addresses and QueueReady for this driver's queue.
    func setUpQueue(size: UInt16? = nil) {
        set(0x30, queueIndex)
        set(0x38, UInt32(size ?? queueSize))
        set(0x80, UInt32(base + Self.descriptors)); set(0x84, 0)
        set(0x90, UInt32(base + Self.available)); set(0x94, 0)
        set(0xa0, UInt32(base + Self.used)); set(0xa4, 0)
        set(0x44, 1)
    }

    mutating func descriptor(_ address: UInt64, _ length: UInt32, writable: Bool, next: UInt16?) throws -> UInt16 {
        let index = nextDescriptor
        nextDescriptor += 1
        let entry = GuestPhysicalAddress(base + Self.descriptors + 16 * UInt64(index))
        try memory.write(address, at: entry)
        try memory.write(length, at: entry + 8)
        try memory.write(UInt16((writable ? 2 : 0) | (next != nil ? 1 : 0)), at: entry + 12)
        try memory.write(next ?? 0, at: entry + 14)
        return index
    }

    mutating func submit(_ head: UInt16) throws {
        try memory.write(head, at: GuestPhysicalAddress(base + Self.available + 4 + 2 * UInt64(availableIndex % queueSize)))
        availableIndex &+= 1
        try memory.write(availableIndex, at: GuestPhysicalAddress(base + Self.available + 2))
        set(0x50, queueIndex)
    }

    /// A block request: header at 0x10000, data at 0x20000, status at 0x30000 (plus `base`).
    mutating func blockRequest(type: UInt32, sector: UInt64, dataLength: UInt32, dataWritable: Bool) throws -> UInt16 {
        try memory.write(type, at: GuestPhysicalAddress(base + 0x10000))
        try memory.write(UInt32(0), at: GuestPhysicalAddress(base + 0x10004))
        try memory.write(sector, at: GuestPhysicalAddress(base + 0x10008))
        try memory.write(UInt8(0xff), at: GuestPhysicalAddress(base + 0x30000))
        let status = try descriptor(base + 0x30000, 1, writable: true, next: nil)
        let data = dataLength > 0 ? try descriptor(base + 0x20000, dataLength, writable: dataWritable, next: status) : status
        return try descriptor(base + 0x10000, 16, writable: false, next: data)
    }

    /// Where a block request's data goes (`blockRequest`).
    var dataAddress: GuestPhysicalAddress { GuestPhysicalAddress(base + 0x20000) }
    var usedIndex: UInt16 { (try? memory.read(UInt16.self, at: GuestPhysicalAddress(base + Self.used + 2))) ?? 0 }
    var status: UInt8 { (try? memory.read(UInt8.self, at: GuestPhysicalAddress(base + 0x30000))) ?? 0xee }
}

func makeBlockDevice(size: UInt64 = 1 << 20, readOnly: Bool = false, queues: Int = 1) throws -> (TestDriver, PulseCounter, any DiskImage) {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-blk-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    let path = directory.appendingPathComponent("disk.qcow2").path
    try DiskImages.create(path: path, format: .qcow2, size: size)
    let disk = try DiskImages.open(path: path, format: .qcow2)
    let memory = try GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), 1 << 20)])
    let line = PulseCounter()
    let transport = VirtioMMIOTransport(device: VirtioBlock(disk: disk, readOnly: readOnly, serial: "vireo-serial-1", queues: queues),
                                        memory: memory, interrupt: line)
    return (TestDriver(memory: memory, transport: transport, queueSize: 16), line, disk)
}

@Suite struct VirtioBlockTests {
    @Test func discoveryRegisters() throws {
        let (driver, _, _) = try makeBlockDevice(size: 8 << 20)
        #expect(driver.register(0x000) == 0x7472_6976)
        #expect(driver.register(0x004) == 2)
        #expect(driver.register(0x008) == 2)
        #expect(driver.register(0x034) == UInt32(VirtioBlock.queueSize))
        driver.set(0x14, 1)
        #expect(driver.register(0x010) & 1 == 1)           // VERSION_1 is bit 32
        #expect(driver.register(0x100) == UInt32((8 << 20) / 512))
    }

    @Test func writeReadFlushAndGetID() throws {
        var (driver, line, disk) = try makeBlockDevice()
        driver.initialise()
        #expect(driver.register(0x70) == 0xf)
        let pattern = (0..<1024).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try driver.memory.write(pattern, at: GuestPhysicalAddress(0x20000))
        try driver.submit(try driver.blockRequest(type: 1, sector: 3, dataLength: 1024, dataWritable: false))
        #expect(driver.usedIndex == 1)
        #expect(driver.status == 0)
        #expect(try disk.readBytes(count: 1024, at: 3 * 512) == pattern)
        #expect(line.count == 1)
        #expect(driver.register(0x60) & 1 == 1)
        driver.set(0x64, 1)
        #expect(driver.register(0x60) == 0)

        try driver.memory.fill(0, count: 1024, at: GuestPhysicalAddress(0x20000))
        try driver.submit(try driver.blockRequest(type: 0, sector: 3, dataLength: 1024, dataWritable: true))
        #expect(driver.status == 0)
        #expect(try driver.memory.readBytes(count: 1024, at: GuestPhysicalAddress(0x20000)) == pattern)
        let usedLength = try driver.memory.read(UInt32.self, at: GuestPhysicalAddress(TestDriver.used + 4 + 8 + 4))
        #expect(usedLength == 1025)

        try driver.submit(try driver.blockRequest(type: 4, sector: 0, dataLength: 0, dataWritable: false))
        #expect(driver.status == 0)
        try driver.submit(try driver.blockRequest(type: 8, sector: 0, dataLength: 20, dataWritable: true))
        #expect(driver.status == 0)
        #expect(try driver.memory.readBytes(count: 14, at: GuestPhysicalAddress(0x20000)) == Array("vireo-serial-1".utf8))
        try driver.submit(try driver.blockRequest(type: 99, sector: 0, dataLength: 0, dataWritable: false))
        #expect(driver.status == 2)
        #expect(driver.usedIndex == 5)
    }

    /// VIRTIO_F_EVENT_IDX (§2.7.7, §2.7.10): offered by the transport; once negotiated the
    /// device writes `avail_event` when it has drained the queue and interrupts only when the
    /// driver's `used_event` lies among the entries published since the last interrupt.
    @Test func eventIndexSuppressesInterrupts() throws {
        var (driver, line, _) = try makeBlockDevice()
        driver.set(0x14, 0)
        #expect(driver.register(0x010) & (1 << 29) != 0)
        driver.initialise(features: VirtioFeature.version1 | VirtioFeature.eventIndex)
        #expect(driver.register(0x70) == 0xf)
        let availableEvent = GuestPhysicalAddress(TestDriver.used + 4 + 8 * 16)
        let usedEvent = GuestPhysicalAddress(TestDriver.available + 4 + 2 * 16)
        // The driver wants an interrupt once used entry 4 is published (the used index passes 4).
        try driver.memory.write(UInt16(4), at: usedEvent)

        try driver.submit(try driver.blockRequest(type: 4, sector: 0, dataLength: 0, dataWritable: false))
        #expect(driver.usedIndex == 1 && driver.status == 0)
        // The first completion of a new queue always interrupts; the drained queue asks to hear
        // of the very next entry.
        #expect(line.count == 1)
        #expect(try driver.memory.read(UInt16.self, at: availableEvent) == 1)
        var counts: [Int] = []
        for _ in 0..<5 {
            driver.nextDescriptor = 0
            try driver.submit(try driver.blockRequest(type: 4, sector: 0, dataLength: 0, dataWritable: false))
            counts.append(line.count)
        }
        // Used index 2, 3, 4: suppressed; 5 passes used_event 4: one interrupt; 6: suppressed.
        #expect(counts == [1, 1, 1, 2, 2], "\(counts)")
        #expect(driver.usedIndex == 6)
        #expect(try driver.memory.read(UInt16.self, at: availableEvent) == 6)
    }

    @Test func discardAndWriteZeroes() throws {
        var (driver, _, disk) = try makeBlockDevice()
        driver.set(0x14, 0)
        #expect(driver.register(0x010) & (1 << 13 | 1 << 14) == (1 << 13 | 1 << 14))
        #expect(driver.register(0x100 + 40) == 32)            // max_discard_seg
        driver.initialise(features: VirtioFeature.version1 | (1 << 13) | (1 << 14))
        try disk.write([UInt8](repeating: 0xab, count: 8192), at: 0)
        // Two segments: sectors 0-1 and 8-9 (write-zeroes with unmap), then one discard of sector 4.
        for (index, segment) in [(UInt64(0), UInt32(2), UInt32(1)), (8, 2, 1)].enumerated() {
            try driver.memory.write(segment.0, at: GuestPhysicalAddress(0x20000 + UInt64(index * 16)))
            try driver.memory.write(segment.1, at: GuestPhysicalAddress(0x20008 + UInt64(index * 16)))
            try driver.memory.write(segment.2, at: GuestPhysicalAddress(0x2000c + UInt64(index * 16)))
        }
        try driver.submit(try driver.blockRequest(type: 13, sector: 0, dataLength: 32, dataWritable: false))
        #expect(driver.status == 0)
        var expected = [UInt8](repeating: 0xab, count: 8192)
        expected.replaceSubrange(0..<1024, with: [UInt8](repeating: 0, count: 1024))
        expected.replaceSubrange(4096..<5120, with: [UInt8](repeating: 0, count: 1024))
        #expect(try disk.readBytes(count: 8192, at: 0) == expected)
        try driver.memory.write(UInt64(4), at: GuestPhysicalAddress(0x20000))
        try driver.memory.write(UInt32(1), at: GuestPhysicalAddress(0x20008))
        try driver.memory.write(UInt32(0), at: GuestPhysicalAddress(0x2000c))
        try driver.submit(try driver.blockRequest(type: 11, sector: 0, dataLength: 16, dataWritable: false))
        #expect(driver.status == 0)
        expected.replaceSubrange(2048..<2560, with: [UInt8](repeating: 0, count: 512))
        #expect(try disk.readBytes(count: 8192, at: 0) == expected)
        // Beyond the end: I/O error; an unknown flag: unsupported; a ragged payload: unsupported.
        try driver.memory.write(UInt64(1 << 40), at: GuestPhysicalAddress(0x20000))
        try driver.submit(try driver.blockRequest(type: 11, sector: 0, dataLength: 16, dataWritable: false))
        #expect(driver.status == 1)
        try driver.memory.write(UInt64(0), at: GuestPhysicalAddress(0x20000))
        try driver.memory.write(UInt32(2), at: GuestPhysicalAddress(0x2000c))
        try driver.submit(try driver.blockRequest(type: 13, sector: 0, dataLength: 16, dataWritable: false))
        #expect(driver.status == 2)
        try driver.submit(try driver.blockRequest(type: 11, sector: 0, dataLength: 10, dataWritable: false))
        #expect(driver.status == 2)
    }

    @Test func outOfRangeAndReadOnlyRequestsFailWithIOError() throws {
        var (driver, _, _) = try makeBlockDevice(size: 64 << 10)
        driver.initialise()
        try driver.submit(try driver.blockRequest(type: 0, sector: 127, dataLength: 1024, dataWritable: true))
        #expect(driver.status == 1)
        try driver.submit(try driver.blockRequest(type: 0, sector: UInt64.max / 2, dataLength: 512, dataWritable: true))
        #expect(driver.status == 1)
        try driver.submit(try driver.blockRequest(type: 1, sector: 0, dataLength: 100, dataWritable: false))
        #expect(driver.status == 1)                           // not a whole sector
        var (readOnly, _, _) = try makeBlockDevice(readOnly: true)
        readOnly.set(0x14, 0)
        #expect(readOnly.register(0x010) & (1 << 5) != 0)
        readOnly.initialise(features: VirtioFeature.version1 | (1 << 5))
        try readOnly.submit(try readOnly.blockRequest(type: 1, sector: 0, dataLength: 512, dataWritable: false))
        #expect(readOnly.status == 1)
    }

    @Test func featureNegotiationRefusesUnofferedOrLegacy() throws {
        let (driver, _, _) = try makeBlockDevice()
        driver.initialise(features: 0)                         // no VERSION_1
        #expect(driver.register(0x70) & 0x8 == 0)
        driver.initialise(features: VirtioFeature.version1 | (1 << 40))
        #expect(driver.register(0x70) & 0x8 == 0)
    }

    @Test func descriptorLoopMarksNeedsReset() throws {
        var (driver, line, _) = try makeBlockDevice()
        driver.initialise()
        let first = try driver.descriptor(0x10000, 16, writable: false, next: 1)
        _ = try driver.descriptor(0x20000, 16, writable: false, next: 0)       // 1 → 0 → 1 → …
        try driver.submit(first)
        #expect(driver.register(0x70) & 0x40 != 0)
        #expect(driver.transport.lastError == .descriptorChainTooLong(head: 0))
        #expect(driver.register(0x60) & 2 != 0)
        #expect(line.count == 1)
        // Further notifications are ignored until the driver resets the device.
        try driver.submit(first)
        #expect(driver.usedIndex == 0)
        driver.initialise()
        #expect(driver.register(0x70) == 0xf)
    }

    @Test func hostileAddressesAndSizesNeverCrash() throws {
        var (driver, _, _) = try makeBlockDevice()
        driver.initialise()
        try driver.submit(try driver.descriptor(0xffff_ffff_ffff_0000, 4096, writable: true, next: nil))
        #expect(driver.transport.lastError == .bufferOutsideMemory(GuestPhysicalAddress(0xffff_ffff_ffff_0000), length: 4096))

        let (badSize, _, _) = try makeBlockDevice()
        badSize.initialise(size: 12)
        #expect(badSize.register(0x70) & 0x40 != 0)
        #expect(badSize.transport.lastError == .invalidQueueSize(12, maximum: VirtioBlock.queueSize))

        let (jump, _, _) = try makeBlockDevice()
        jump.initialise()
        try jump.memory.write(UInt16(500), at: GuestPhysicalAddress(TestDriver.available + 2))
        jump.set(0x50, 0)
        #expect(jump.transport.lastError == .availableIndexJump(from: 0, to: 500, size: 16))
    }

    @Test func notificationsBeforeDriverOKAreIgnored() throws {
        let (driver, line, _) = try makeBlockDevice()
        driver.set(0x50, 0)
        driver.set(0x50, 7)
        #expect(line.count == 0)
        #expect(driver.register(0x70) == 0)
        driver.initialise()
        driver.set(0x50, 9)                                    // a queue that does not exist
        #expect(driver.register(0x70) == 0xf)
    }

    @Test("Random descriptor tables: every outcome is a used buffer or NEEDS_RESET, never a crash")
    func fuzzDescriptorTables() throws {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<300 {
            var (driver, _, _) = try makeBlockDevice(size: 64 << 10)
            driver.initialise()
            for index in 0..<16 {
                let entry = GuestPhysicalAddress(TestDriver.descriptors + 16 * UInt64(index))
                let address: UInt64 = Bool.random(using: &generator) ? UInt64.random(in: 0..<(1 << 20), using: &generator) : UInt64.random(in: 0...UInt64.max, using: &generator)
                try driver.memory.write(address, at: entry)
                try driver.memory.write(UInt32.random(in: 0...UInt32.max, using: &generator) >> UInt32.random(in: 0...31, using: &generator), at: entry + 8)
                try driver.memory.write(UInt16.random(in: 0...7, using: &generator), at: entry + 12)
                try driver.memory.write(UInt16.random(in: 0...20, using: &generator), at: entry + 14)
            }
            for _ in 0..<4 { try driver.submit(UInt16.random(in: 0...20, using: &generator)) }
            #expect(driver.usedIndex <= 4)
        }
    }
}

/// Multiqueue virtio-blk (VIRTIO_BLK_F_MQ, virtio 1.x §5.2.3, §5.2.4): what the device offers,
/// queues the driver picks, and queues worked from several threads at once.
@Suite struct VirtioBlockMultiqueueTests {
    static let multiqueue: UInt64 = 1 << 12

    func counts(_ transport: VirtioMMIOTransport) throws -> [UInt64] {
        try #require(transport.device as? VirtioBlock).completedByQueue.map { $0.count.load(ordering: .relaxed) }
    }

    @Test("a disk with 4 queues offers MQ and says num_queues = 4; a driver that takes it works on queue 2, counted there; a driver that does not take it works on queue 0; a one-queue disk offers no MQ")
    func offersAndServesQueues() throws {
        var (driver, _, disk) = try makeBlockDevice(queues: 4)
        driver.set(0x14, 0)
        #expect(driver.register(0x010) & UInt32(Self.multiqueue) != 0)
        #expect(driver.register(0x100 + 32) >> 16 == 4, "num_queues")
        driver.set(0x30, 3)
        #expect(driver.register(0x034) == UInt32(VirtioBlock.queueSize))
        driver.set(0x30, 4)
        #expect(driver.register(0x034) == 0, "a fifth queue")

        driver.queueIndex = 2
        driver.initialise(features: VirtioFeature.version1 | Self.multiqueue)
        #expect(driver.register(0x70) == 0xf)
        let pattern = (0..<1024).map { UInt8(truncatingIfNeeded: $0 * 11) }
        try driver.memory.write(pattern, at: driver.dataAddress)
        try driver.submit(try driver.blockRequest(type: 1, sector: 5, dataLength: 1024, dataWritable: false))
        #expect(driver.usedIndex == 1 && driver.status == 0)
        #expect(try disk.readBytes(count: 1024, at: 5 * 512) == pattern)
        driver.nextDescriptor = 0
        try driver.memory.fill(0, count: 1024, at: driver.dataAddress)
        try driver.submit(try driver.blockRequest(type: 0, sector: 5, dataLength: 1024, dataWritable: true))
        #expect(driver.status == 0)
        #expect(try driver.memory.readBytes(count: 1024, at: driver.dataAddress) == pattern)
        #expect(try counts(driver.transport) == [0, 0, 2, 0])
        #expect(try #require(driver.transport.device as? VirtioBlock).multiqueueSessions.load(ordering: .relaxed) == 1)
        // A notification for a queue the driver never readied does nothing.
        driver.set(0x50, 1)
        #expect(try counts(driver.transport) == [0, 0, 2, 0])
        #expect(driver.transport.lastError == nil)

        // A driver without MQ (the probe, old kernels) uses queue 0 of the same kind of disk.
        var plain = try makeBlockDevice(queues: 4).0
        plain.initialise()
        try plain.submit(try plain.blockRequest(type: 1, sector: 0, dataLength: 512, dataWritable: false))
        #expect(plain.usedIndex == 1 && plain.status == 0)
        #expect(try counts(plain.transport) == [1, 0, 0, 0])

        let single = try makeBlockDevice().0
        single.set(0x14, 0)
        #expect(single.register(0x010) & UInt32(Self.multiqueue) == 0)
        #expect(single.register(0x100 + 32) >> 16 == 1)
    }

    @Test("two queues of one disk driven from two threads at once, 300 writes each on its own ring: every request completes with the right bytes on the disk and the device never fails")
    func queuesWorkConcurrently() throws {
        let (first, _, disk) = try makeBlockDevice(size: 1 << 20, queues: 2)
        first.initialise(features: VirtioFeature.version1 | Self.multiqueue)
        let second = TestDriver(memory: first.memory, transport: first.transport, queueSize: 16, queueIndex: 1, base: 0x80000)
        second.setUpQueue()
        let drivers = [first, second]
        let requests = 300
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 2) { which in
            var driver = drivers[which]
            for request in 0..<requests {
                let sector = UInt64(which * 1000 + request)
                do {
                    try driver.memory.write([UInt8](repeating: UInt8(truncatingIfNeeded: request * 3 + which), count: 512), at: driver.dataAddress)
                    driver.nextDescriptor = 0
                    try driver.submit(try driver.blockRequest(type: 1, sector: sector, dataLength: 512, dataWritable: false))
                } catch {
                    failures.withLock { $0.append("queue \(which) request \(request): \(error)") }
                    return
                }
                // The queue's work ran in `submit`, on this thread.
                guard driver.usedIndex == UInt16(request + 1), driver.status == 0 else {
                    failures.withLock { $0.append("queue \(which) request \(request): used \(driver.usedIndex), status \(driver.status)") }
                    return
                }
            }
        }
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        #expect(first.transport.lastError == nil)
        #expect(first.register(0x70) & 0x40 == 0, "NEEDS_RESET")
        #expect(try counts(first.transport) == [UInt64(requests), UInt64(requests)])
        for which in 0..<2 {
            for request in [0, 149, requests - 1] {
                let expected = [UInt8](repeating: UInt8(truncatingIfNeeded: request * 3 + which), count: 512)
                #expect(try disk.readBytes(count: 512, at: UInt64(which * 1000 + request) * 512) == expected, "queue \(which) request \(request)")
            }
        }
    }
}

@Suite struct VirtioEntropyTests {
    @Test func fillsWritableBuffersAndRefusesWildOnes() throws {
        let memory = try GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), 1 << 20)])
        let line = PulseCounter()
        let transport = VirtioMMIOTransport(device: try VirtioEntropy(), memory: memory, interrupt: line)
        var driver = TestDriver(memory: memory, transport: transport, queueSize: 16)
        #expect(driver.register(0x008) == 4)
        driver.initialise()
        try driver.submit(try driver.descriptor(0x20000, 4096, writable: true, next: nil))
        #expect(driver.usedIndex == 1)
        #expect(try memory.read(UInt32.self, at: GuestPhysicalAddress(TestDriver.used + 8)) == 4096)
        #expect(try memory.readBytes(count: 4096, at: GuestPhysicalAddress(0x20000)).contains { $0 != 0 })
        #expect(line.count == 1)
        try driver.submit(try driver.descriptor(0xffff_0000_0000, 64, writable: true, next: nil))
        #expect(driver.register(0x70) & 0x40 != 0)
    }
}

@Suite struct VirtioOwnershipTests {
    /// The savedstate fuzzer's LeakSanitizer report: a device held its transport strongly while
    /// the transport held the device, so a dropped pair (with its guest memory and the device's
    /// host descriptors) was never freed.
    @Test func droppedTransportFreesItsDeviceAndMemory() throws {
        weak var droppedTransport: VirtioMMIOTransport?
        weak var droppedBalloon: VirtioBalloon?
        weak var droppedBlock: VirtioBlock?
        weak var droppedMemory: GuestMemory?
        do {
            let memory = try GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), 1 << 20)])
            let balloon = VirtioBalloon(deflateOnOOM: true, statisticsInterval: 1)
            let transport = VirtioMMIOTransport(device: balloon, memory: memory, interrupt: PulseCounter())
            let driver = TestDriver(memory: memory, transport: transport, queueSize: 16)
            driver.initialise(features: VirtioFeature.version1 | 1 << 1)
            let (blockDriver, _, _) = try makeBlockDevice()
            blockDriver.initialise()
            droppedTransport = transport
            droppedBalloon = balloon
            droppedBlock = blockDriver.transport.device as? VirtioBlock
            droppedMemory = memory
            #expect(droppedBlock != nil)
        }
        #expect(droppedTransport == nil)
        #expect(droppedBalloon == nil)
        #expect(droppedBlock == nil)
        #expect(droppedMemory == nil)
    }
}
