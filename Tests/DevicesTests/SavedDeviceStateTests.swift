import DiskImage
import Foundation
import FuzzTargets
import GuestMemory
import MachineSpec
import Testing
@testable import Devices

/// Device states saved and restored (docs/snapshots.md): what comes back must behave as the
/// device did, and a damaged state must be refused with an error, never a trap.
@Suite struct SavedDeviceStateTests {
    static func saved(_ device: any Snapshottable) throws -> [UInt8] { try device.savedRecord() }

    @Test("a virtio-blk request the guest queued while the device was quiesced completes after a restore into a new device, and the queue goes on from its saved indices")
    func blockRequestInFlightCompletesAfterRestore() throws {
        var (driver, _, disk) = try makeBlockDevice()
        driver.initialise()
        let first = (0..<512).map { UInt8(truncatingIfNeeded: $0) }
        try driver.memory.write(first, at: GuestPhysicalAddress(0x20000))
        try driver.submit(try driver.blockRequest(type: 1, sector: 1, dataLength: 512, dataWritable: false))
        #expect(driver.usedIndex == 1)

        // Quiesced (a save in progress): the guest's next request waits on the ring.
        driver.transport.quiesce()
        let second = [UInt8](repeating: 0x5a, count: 512)
        try driver.memory.write(second, at: GuestPhysicalAddress(0x20000))
        try driver.submit(try driver.blockRequest(type: 1, sector: 2, dataLength: 512, dataWritable: false))
        #expect(driver.usedIndex == 1, "a quiesced device worked on its queue")
        let state = try Self.saved(driver.transport)

        // The restoring VMM: a new device on the same disk, the same RAM (as read back from the file).
        let restored = VirtioMMIOTransport(device: VirtioBlock(disk: disk, readOnly: false, serial: "vireo-serial-1"),
                                           memory: driver.memory, interrupt: PulseCounter())
        try restored.restore(record: state)
        #expect(try Self.saved(restored) == state, "saving the restored device gives other bytes")
        restored.resumeWork()
        #expect(driver.usedIndex == 2, "the queued request did not complete after the restore")
        #expect(try disk.readBytes(count: 512, at: 2 * 512) == second)

        // The restored queue keeps counting: the next request lands in the next used slot.
        var next = TestDriver(memory: driver.memory, transport: restored, queueSize: 16)
        next.availableIndex = 2
        try driver.memory.write(first, at: GuestPhysicalAddress(0x20000))
        next.nextDescriptor = 3
        try next.submit(try next.blockRequest(type: 1, sector: 3, dataLength: 512, dataWritable: false))
        #expect(driver.usedIndex == 3)
        #expect(try disk.readBytes(count: 512, at: 3 * 512) == first)
    }

    @Test("a multiqueue disk's queue 1 comes back from a saved state and goes on from its indices in a new device; a state saved with one queue (before multiqueue) restores into a two-queue device, the second queue unused; a state with more queues than the device has is refused")
    func multiqueueState() throws {
        var (driver, _, disk) = try makeBlockDevice(queues: 2)
        driver.queueIndex = 1
        driver.initialise(features: VirtioFeature.version1 | VirtioBlockMultiqueueTests.multiqueue)
        let first = [UInt8](repeating: 0x31, count: 512)
        try driver.memory.write(first, at: driver.dataAddress)
        try driver.submit(try driver.blockRequest(type: 1, sector: 1, dataLength: 512, dataWritable: false))
        #expect(driver.usedIndex == 1)
        let state = try Self.saved(driver.transport)

        let restored = VirtioMMIOTransport(device: VirtioBlock(disk: disk, readOnly: false, serial: "vireo-serial-1", queues: 2),
                                           memory: driver.memory, interrupt: PulseCounter())
        try restored.restore(record: state)
        var next = TestDriver(memory: driver.memory, transport: restored, queueSize: 16, queueIndex: 1)
        next.availableIndex = 1
        let second = [UInt8](repeating: 0x32, count: 512)
        try driver.memory.write(second, at: driver.dataAddress)
        try next.submit(try next.blockRequest(type: 1, sector: 2, dataLength: 512, dataWritable: false))
        #expect(driver.usedIndex == 2, "queue 1 did not go on after the restore")
        #expect(try disk.readBytes(count: 512, at: 2 * 512) == second)

        // A one-queue state (a VM saved before its disk had more queues).
        var (old, _, oldDisk) = try makeBlockDevice()
        old.initialise()
        try old.submit(try old.blockRequest(type: 1, sector: 1, dataLength: 512, dataWritable: false))
        let oldState = try Self.saved(old.transport)
        let upgraded = VirtioMMIOTransport(device: VirtioBlock(disk: oldDisk, readOnly: false, serial: "vireo-serial-1", queues: 2),
                                           memory: old.memory, interrupt: PulseCounter())
        try upgraded.restore(record: oldState)
        #expect(upgraded.captureState().queues.map(\.ready) == [true, false])
        var resumed = TestDriver(memory: old.memory, transport: upgraded, queueSize: 16)
        resumed.availableIndex = 1
        try resumed.submit(try resumed.blockRequest(type: 1, sector: 2, dataLength: 512, dataWritable: false))
        #expect(old.usedIndex == 2)

        // Two queues into a device with one: refused (the MQ feature, then the queue count).
        var twoQueues = try BinaryRecord.decode(VirtioMMIOTransport.Saved.self, from: state)
        let smaller = VirtioMMIOTransport(device: VirtioBlock(disk: disk, readOnly: false, serial: nil), memory: driver.memory, interrupt: PulseCounter())
        #expect(throws: StateError.self) { try smaller.restore(record: state) }
        twoQueues.driverFeatures &= ~VirtioBlockMultiqueueTests.multiqueue
        do {
            try smaller.restore(record: try BinaryRecord.encode(twoQueues))
            Issue.record("a two-queue state was restored into a one-queue device")
        } catch {
            #expect(error.description.contains("2 queues where this device has 1"), "\(error)")
        }
    }

    @Test("every truncation of a transport's state, another device type's state, and features the device never offered are refused with the field named")
    func damagedTransportStateIsRefused() throws {
        let (driver, _, disk) = try makeBlockDevice()
        driver.initialise()
        let state = try Self.saved(driver.transport)
        for length in 0..<state.count {
            let fresh = VirtioMMIOTransport(device: VirtioBlock(disk: disk, readOnly: false, serial: nil), memory: driver.memory, interrupt: PulseCounter())
            #expect(throws: StateError.self, "a state cut at \(length) bytes was accepted") { try fresh.restore(record: Array(state.prefix(length))) }
        }
        let entropy = VirtioMMIOTransport(device: try VirtioEntropy(), memory: driver.memory, interrupt: PulseCounter())
        do {
            try entropy.restore(record: state)
            Issue.record("a block device's state was restored into an entropy device")
        } catch {
            #expect(error.description.contains("device type"), "\(error)")
        }
        // A driver feature the device never offered, with the driver's FEATURES_OK.
        var features = try BinaryRecord.decode(VirtioMMIOTransport.Saved.self, from: state)
        features.status |= 0x08
        features.driverFeatures |= 1 << 63
        let fresh = VirtioMMIOTransport(device: VirtioBlock(disk: disk, readOnly: false, serial: nil), memory: driver.memory, interrupt: PulseCounter())
        do {
            try fresh.restore(record: try BinaryRecord.encode(features))
            Issue.record("features the device does not offer were accepted")
        } catch {
            #expect(error.description.hasPrefix("driverFeatures: "), "\(error)")
        }
    }

    @Test("the UART's registers and the bytes the guest has not read yet survive a restore")
    func serialStateRoundTrip() throws {
        let serial = Serial8250(output: DiscardingOutput(), interrupt: PulseCounter())
        withUnsafeBytes(of: UInt8(0x03)) { serial.write(offset: 3, data: $0) }      // 8N1
        withUnsafeBytes(of: UInt8(0x01)) { serial.write(offset: 1, data: $0) }      // receive interrupt on
        withUnsafeBytes(of: UInt8(0x42)) { serial.write(offset: 7, data: $0) }      // scratch
        serial.receive(Array("typed".utf8))
        let state = try Self.saved(serial)
        let line = PulseCounter()
        let restored = Serial8250(output: DiscardingOutput(), interrupt: line)
        try restored.restore(record: state)
        #expect(line.count == 1, "the pending receive interrupt was not raised again")
        var read: [UInt8] = []
        for _ in 0..<5 {
            var byte: UInt8 = 0
            withUnsafeMutableBytes(of: &byte) { restored.read(offset: 0, into: $0) }
            read.append(byte)
        }
        #expect(read == Array("typed".utf8))
        var scratch: UInt8 = 0
        withUnsafeMutableBytes(of: &scratch) { restored.read(offset: 7, into: $0) }
        #expect(scratch == 0x42)
    }

    @Test func savedStateTargetSurvivesMutatedStates() throws {
        let (driver, _, _) = try makeBlockDevice()
        driver.initialise()
        let serial = Serial8250(output: DiscardingOutput(), interrupt: PulseCounter())
        serial.receive(Array("abc".utf8))
        let keyboard = I8042 {}
        keyboard.pressCtrlAltDel()
        let acpi = ACPIRegisters(eventInterrupt: PulseCounter(), softOffSleepType: 5, resetValue: 0xf, powerOff: {}, reset: {})
        acpi.raiseEvents(1)
        // (selector, a valid state for it): the target's decoders and the device states above.
        let seeds: [(UInt8, [UInt8])] = [
            (0, Fuzz.sampleMachineMetadata), (1, try Self.saved(serial)), (2, try Self.saved(keyboard)), (3, try Self.saved(RTC())),
            (4, try Self.saved(acpi)), (5, try Self.saved(driver.transport)),
        ]
        var random = FuzzSmokeTests.SeededGenerator(state: 0x5a7e)
        for (selector, seed) in seeds {
            let clean = ([selector] + seed).withUnsafeBytes { Fuzz.savedStateOutcome($0) }
            #expect(clean.accepted, "the valid state for selector \(selector) was refused")
            var accepted = 0, refused = 0
            for _ in 0..<300 {
                var input = seed
                if !input.isEmpty {
                    for _ in 0..<Int.random(in: 1...4, using: &random) {
                        input[Int.random(in: 0..<input.count, using: &random)] = UInt8.random(in: 0...255, using: &random)
                    }
                }
                if Int.random(in: 0...4, using: &random) == 0 { input = Array(input.prefix(Int.random(in: 0...input.count, using: &random))) }
                let outcome = ([selector] + input).withUnsafeBytes { Fuzz.savedStateOutcome($0) }
                if outcome.accepted { accepted += 1 } else { refused += 1 }
            }
            // Mutations are both taken (values inside the fields' ranges) and refused (seed 0x5a7e).
            #expect(refused >= 10, "selector \(selector): only \(refused) of 300 mutations refused")
            #expect(accepted + refused == 300)
        }
    }
}

final class DiscardingOutput: SerialOutput, Sendable {
    func write(_ bytes: UnsafeRawBufferPointer) {}
}

/// The migration stream's destination decoders under mutation (docs/migration.md).
struct MigrationStreamFuzzTests {
    @Test func migrationTargetSurvivesMutatedStreams() {
        let seed = Fuzz.sampleMigrationStream
        let whole = seed.withUnsafeBytes { Fuzz.migrationAcceptedMessages($0) }
        #expect(whole == 7, "the sample stream's 7 messages were not all taken: \(whole)")
        var random = FuzzSmokeTests.SeededGenerator(state: 0x316)
        var cutShort = 0
        for _ in 0..<500 {
            var input = seed
            for _ in 0..<Int.random(in: 1...4, using: &random) {
                input[Int.random(in: 0..<input.count, using: &random)] = UInt8.random(in: 0...255, using: &random)
            }
            if Int.random(in: 0...4, using: &random) == 0 { input = Array(input.prefix(Int.random(in: 0...input.count, using: &random))) }
            let taken = input.withUnsafeBytes { Fuzz.migrationAcceptedMessages($0) }
            #expect(taken <= 7)
            if taken < 7 { cutShort += 1 }
        }
        // A flipped byte almost always breaks a frame's checksum or a field's bounds.
        #expect(cutShort >= 400, "only \(cutShort) of 500 mutated streams were refused somewhere")
    }
}
