import CHostSupport
import CZlib
import Devices
import DiskImage
import GuestMemory
import KVM
import MachineSpec
import MigrationWire
import Synchronization
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// How `vireo migrate` wants the VM moved (docs/migration.md).
public struct MigrationOptions: Sendable {
    /// For messages and the VMM log (`tcp:HOST:PORT`).
    public var destination: String
    /// The pause the guest may see at the switch-over; pre-copy goes on until the estimate fits.
    public var maximumDowntimeNanoseconds: UInt64 = 300_000_000
    /// The pre-copy's bandwidth cap; nil for none. The switch-over itself is never capped.
    public var bandwidthBytesPerSecond: UInt64?
    /// Copy the disks through the stream instead of handing the same files over.
    public var copyDisks = false
    /// Throttle the vCPUs step by step when the guest dirties memory faster than the link.
    public var autoConverge = true

    public init(destination: String) { self.destination = destination }
}

/// One pre-copy iteration's report, for the progress bar.
public struct MigrationProgress: Sendable {
    public var iteration: Int
    /// Dirty memory and disk data still to send, as last counted.
    public var remainingBytes: UInt64
    public var transferredBytes: UInt64
    public var rateBytesPerSecond: UInt64
    public var expectedDowntimeNanoseconds: UInt64
    public var throttlePercent: Int
}

public struct MigrationOutcome: Sendable {
    /// From the moment every vCPU had stopped here to the destination's confirmation that its
    /// vCPUs run: what the guest saw.
    public var downtimeNanoseconds: UInt64
    public var totalNanoseconds: UInt64
    public var transferredBytes: UInt64
    public var iterations: Int
    /// Pages sent while the guest was stopped.
    public var finalPages: UInt64
    public var maximumThrottlePercent: Int
}

/// What a migration source announces first (`machine`): enough for the destination to build the
/// same machine and to refuse early, before any memory crosses.
struct ArrivingMachine: Codable {
    /// The spec of the machine the source runs.
    var machine: CarriedSpec
    @PackedList var cpuid: [CPUIDEntry]
    var copiesDisks: Bool
    var diskSizes: [UInt64]

    static let diskLimit = 64

}

// Outside the declaration, so the memberwise initializer stays.
extension ArrivingMachine {
    func encoded() throws(StateError) -> [UInt8] { try BinaryRecord.encode(self) }

    init(receivingFrom channel: MigrationChannel) throws(MigrationError) {
        let message = try channel.receive()
        guard message.kind == .machine else { throw .protocolViolation("expected the machine's description first, got \(message.kind)") }
        do throws(StateError) {
            try self.init(decoding: message.payload)
        } catch {
            throw .protocolViolation(error.description)
        }
    }

    init(decoding bytes: [UInt8]) throws(StateError) {
        self = try BinaryRecord.decode(ArrivingMachine.self, from: bytes)
        try SavedMachineState.check(cpuid: cpuid)
        guard diskSizes.count <= Self.diskLimit else { throw .invalid(field: "diskSizes", reason: "\(diskSizes.count), more than \(Self.diskLimit)") }
    }
}

/// What an arriving stream may address: RAM regions (start, size) and, with copied disks, each
/// disk's size.
struct ArrivalLayout {
    var memory: [(start: UInt64, size: UInt64)]
    var diskSizes: [UInt64]?

    func containsPages(_ address: UInt64, bytes: UInt64) -> Bool {
        memory.contains { address >= $0.start && bytes <= $0.size && address - $0.start <= $0.size - bytes }
    }
}

/// One message of the destination's stream, checked against the machine it arrives in before
/// anything of it is used: whole pages inside RAM, whole sectors inside a copied disk, a state the
/// saved-state decoder takes.
enum ArrivingMessage {
    case pages(address: UInt64, data: ArraySlice<UInt8>)
    case zeroPages(address: UInt64, count: UInt64)
    case diskData(disk: Int, offset: UInt64, data: ArraySlice<UInt8>)
    case diskZeroes(disk: Int, offset: UInt64, length: UInt64)
    case state(flags: UInt8, SavedMachineState)
    case end(pages: UInt64, diskBytes: UInt64)
    /// Answer `synced` once everything before is in place.
    case sync

    init(_ message: MigrationWire.Message, layout: ArrivalLayout) throws(MigrationError) {
        var reader = PayloadReader(message.payload)
        switch message.kind {
        case .pages:
            let address = try reader.get(UInt64.self, "page address")
            let data = reader.rest()
            guard address % 4096 == 0, !data.isEmpty, data.count % 4096 == 0, layout.containsPages(address, bytes: UInt64(data.count)) else {
                throw .protocolViolation("pages at 0x\(String(address, radix: 16)) (\(data.count) bytes) are not whole pages inside guest RAM")
            }
            self = .pages(address: address, data: data)
        case .zeroPages:
            let address = try reader.get(UInt64.self, "page address")
            let count = try reader.get(UInt64.self, "page count")
            guard reader.remaining == 0, address % 4096 == 0, count > 0, count <= 1 << 40, layout.containsPages(address, bytes: count * 4096) else {
                throw .protocolViolation("zero pages at 0x\(String(address, radix: 16)) (\(count)) are not inside guest RAM")
            }
            self = .zeroPages(address: address, count: count)
        case .diskData, .diskZeroes:
            guard let sizes = layout.diskSizes else { throw .protocolViolation("disk data, but the disks are shared") }
            let index = Int(try reader.get(UInt32.self, "disk index"))
            let offset = try reader.get(UInt64.self, "disk offset")
            guard index < sizes.count else { throw .protocolViolation("disk \(index) of \(sizes.count)") }
            let data = message.kind == .diskData ? reader.rest() : []
            let length = message.kind == .diskData ? UInt64(data.count) : try reader.get(UInt64.self, "zero length")
            guard reader.remaining == 0, offset % 512 == 0, length % 512 == 0, length > 0,
                  offset <= sizes[index], length <= sizes[index] - offset else {
                throw .protocolViolation("disk \(index) range at \(offset) (\(length) bytes) is not whole sectors inside the disk")
            }
            self = message.kind == .diskData ? .diskData(disk: index, offset: offset, data: data) : .diskZeroes(disk: index, offset: offset, length: length)
        case .state:
            let flags = try reader.get(UInt8.self, "state flags")
            do throws(StateError) {
                self = .state(flags: flags, try SavedMachineState(decoding: Array(reader.rest())))
            } catch {
                throw .protocolViolation("the machine's state: \(error)")
            }
        case .sync:
            guard reader.remaining == 0 else { throw .protocolViolation("a sync carries \(reader.remaining) bytes") }
            self = .sync
        case .end:
            let pages = try reader.get(UInt64.self, "page count")
            let diskBytes = try reader.get(UInt64.self, "disk byte count")
            guard reader.remaining == 0 else { throw .protocolViolation("bytes follow the end's counts") }
            self = .end(pages: pages, diskBytes: diskBytes)
        default:
            throw .protocolViolation("unexpected \(message.kind) message")
        }
    }
}

/// The destination's decoders from outside the VMM, for the fuzz target and its seeds.
public enum MigrationInspection {
    /// Feeds `bytes` as a stream of frames to the destination's decoders (a machine message
    /// first, then pages, disk data, state, end) for a 64 MiB machine with one 1 MiB copied disk;
    /// returns how many messages were taken before the first refusal. Never traps.
    public static func acceptedMessages(_ bytes: [UInt8]) -> Int {
        var offset = 0
        var accepted = 0
        let layout = ArrivalLayout(memory: [(0, 64 << 20)], diskSizes: [1 << 20])
        while let message = MigrationWire.frame(in: bytes, at: &offset) {
            if accepted == 0 {
                guard message.kind == .machine, (try? ArrivingMachine(decoding: message.payload)) != nil else { return accepted }
            } else {
                guard (try? ArrivingMessage(message, layout: layout)) != nil else { return accepted }
            }
            accepted += 1
        }
        return accepted
    }

    /// A well-formed stream: machine, a run of pages, zero pages, disk data and zeroes, state, end.
    public static func sampleStream() -> [UInt8] {
        let sample = SavedStateInspection.sampleMachine()
        let machine = ArrivingMachine(machine: CarriedSpec(spec: sample, record: (try? sample.encoded()) ?? []), cpuid: [CPUIDEntry(function: 1, index: 0, flags: 0, eax: 0x800f11, ebx: 0, ecx: 0, edx: 0)],
                                      copiesDisks: true, diskSizes: [1 << 20])
        var stream = MigrationWire.encodeFrame(.machine, (try? machine.encoded()) ?? [])
        var pages: [UInt8] = []
        MigrationWire.appendLittleEndian(UInt64(0x10000), to: &pages)
        pages += [UInt8](repeating: 0xab, count: 2 * 4096)
        stream += MigrationWire.encodeFrame(.pages, pages)
        var zero: [UInt8] = []
        MigrationWire.appendLittleEndian(UInt64(0x20000), to: &zero)
        MigrationWire.appendLittleEndian(UInt64(3), to: &zero)
        stream += MigrationWire.encodeFrame(.zeroPages, zero)
        var disk: [UInt8] = []
        MigrationWire.appendLittleEndian(UInt32(0), to: &disk)
        MigrationWire.appendLittleEndian(UInt64(512), to: &disk)
        stream += MigrationWire.encodeFrame(.diskData, disk + [UInt8](repeating: 7, count: 1024))
        MigrationWire.appendLittleEndian(UInt64(512), to: &disk)
        stream += MigrationWire.encodeFrame(.diskZeroes, disk)
        stream += MigrationWire.encodeFrame(.state, [ArrivalFlags.paused] + SavedStateInspection.sampleMetadata())
        var end: [UInt8] = []
        MigrationWire.appendLittleEndian(UInt64(2), to: &end)
        MigrationWire.appendLittleEndian(UInt64(1024), to: &end)
        stream += MigrationWire.encodeFrame(.end, end)
        return stream
    }
}

/// Flags of the `state` message.
enum ArrivalFlags {
    /// The user had paused the VM; it arrives paused.
    static let paused: UInt8 = 1
    /// The source has closed the shared disks; the destination may open them.
    static let disksReleased: UInt8 = 2
}

/// A bitmap of pages (or disk chunks) owned by one migration.
final class PageBitmap {
    let words: UnsafeMutablePointer<UInt64>
    let count: Int

    init(words count: Int) {
        self.count = max(1, count)
        words = .allocate(capacity: self.count)
        words.initialize(repeating: 0, count: self.count)
    }

    deinit { words.deallocate() }

    func clear() { words.update(repeating: 0, count: count) }
    func fill() { words.update(repeating: ~0, count: count) }
    func merge(_ other: PageBitmap) { for index in 0..<count { words[index] |= other.words[index] } }
    var population: Int { (0..<count).reduce(0) { $0 + words[$1].nonzeroBitCount } }

    /// Calls `body` with every set bit's index below `limit`, in order, clearing the bits as it goes.
    func drain<Failure: Error>(below limit: Int, _ body: (Int) throws(Failure) -> Void) throws(Failure) {
        for word in 0..<count where words[word] != 0 {
            var bits = words[word]
            words[word] = 0
            while bits != 0 {
                let index = word * 64 + bits.trailingZeroBitCount
                bits &= bits - 1
                if index < limit { try body(index) }
            }
        }
    }
}

/// The pages of guest RAM written since the last look, from KVM's dirty log (the guest's writes)
/// and guest memory's write log (the VMM's). Shared by live migration and live snapshots.
final class DirtyPages {
    let machine: Machine
    /// Per RAM region: dirty since the last `collect`, not yet handled.
    let dirty: [PageBitmap]
    /// Every page the VMM wrote since logging began: a VMM write is logged before it lands, so a
    /// final pass must take these again rather than trust the log's timing.
    let writtenByVMM: [PageBitmap]
    private let scratch: [PageBitmap]

    init(machine: Machine) {
        self.machine = machine
        dirty = machine.memory.regions.map { PageBitmap(words: GuestMemory.bitmapWords($0)) }
        writtenByVMM = machine.memory.regions.map { PageBitmap(words: GuestMemory.bitmapWords($0)) }
        scratch = machine.memory.regions.map { PageBitmap(words: GuestMemory.bitmapWords($0)) }
    }

    /// Adds the pages written since the last call to `dirty`; returns how many pages `dirty` holds.
    func collect() -> Int {
        var pages = 0
        for index in machine.memory.regions.indices {
            let slotLog = scratch[index]
            slotLog.clear()
            do throws(KVMError) {
                try machine.vm.dirtyLog(slot: UInt32(index), into: slotLog.words)
            } catch {
                // No log: every page must be assumed dirty.
                slotLog.fill()
            }
            dirty[index].merge(slotLog)
            slotLog.clear()
            machine.memory.takeWrittenPages(region: index, into: slotLog.words)
            dirty[index].merge(slotLog)
            writtenByVMM[index].merge(slotLog)
            pages += dirty[index].population
        }
        return pages
    }

    /// For the final pass, with every writer stopped: the VMM's writes count as dirty again.
    func includeEveryVMMWrite() {
        for (index, bitmap) in dirty.enumerated() { bitmap.merge(writtenByVMM[index]) }
    }

    var vmmWrittenPages: Int { writtenByVMM.reduce(0) { $0 + $1.population } }

    /// Marks every page the guest ever touched (round 0); never-touched RAM is zero anyway (in
    /// RAM mapped from a saved state, only where the file has a hole: `untouchedPages()`).
    func markTouched() {
        let pageMap = machine.memory.untouchedPages()
        for (index, region) in machine.memory.regions.enumerated() {
            let bitmap = dirty[index]
            for word in 0..<bitmap.count {
                let offset = word * 64 * 4096
                let length = min(64 * 4096, Int(region.size) - offset)
                guard length > 0 else { break }
                if let pageMap, pageMap.neverTouched(region.host + offset, length: length) { continue }
                bitmap.words[word] = length == 64 * 4096 ? ~0 : (1 << UInt64(length / 4096)) - 1
            }
        }
    }
}

// MARK: the source

extension Machine {
    /// `vireo migrate`: sends this running VM over `channel` (docs/migration.md). Pre-copy with
    /// KVM's dirty log until the remaining memory fits the downtime at the measured rate, then the
    /// vCPUs stop, the rest and the machine's state go, and the destination confirms it runs.
    /// On success the machine stays parked for `stopAfterMigration`; on any failure before the
    /// destination confirmed, the VM runs on here as before. Only when the destination's answer
    /// is lost after everything was sent does the VM stay paused here (it may run there).
    public func migrate(over channel: MigrationChannel, options: MigrationOptions,
                        progress: (MigrationProgress) -> Void) throws(VMMError) -> MigrationOutcome {
        try refuseStateCapture("migrated")
        guard !migrating.exchange(true, ordering: .acquiringAndReleasing) else {
            throw .migration("a migration of this VM is already running")
        }
        defer { migrating.store(false, ordering: .releasing) }
        guard claimDirtyLog() else { throw .migration("a live snapshot of this VM is being taken; try again when it is done") }
        defer { releaseDirtyLog() }
        migrationCancelled.store(false, ordering: .releasing)
        guard !stop.isStopping, !stateWritten.load(ordering: .acquiring) else { throw .migration("the VM is stopping") }
        let session = OutgoingMigration(machine: self, channel: channel, options: options)
        do throws(MigrationError) {
            return try session.run(progress: progress)
        } catch {
            throw session.failure(error)
        }
    }

    public var isMigrating: Bool { migrating.load(ordering: .acquiring) }

    /// Dirty logging has one user at a time: a migration or a live snapshot.
    func claimDirtyLog() -> Bool { !dirtyLogClaimed.exchange(true, ordering: .acquiringAndReleasing) }
    func releaseDirtyLog() { dirtyLogClaimed.store(false, ordering: .releasing) }

    /// Asks a running migration to stop; it does unless the switch-over has begun.
    public func cancelMigration() -> Bool {
        guard migrating.load(ordering: .acquiring) else { return false }
        migrationCancelled.store(true, ordering: .releasing)
        return true
    }

    /// Ends the run of a machine that now runs elsewhere.
    func stopAfterMigration(destination: String) { stop.request(.migrated(destination: destination)) }

    /// Turns KVM's dirty-page log (and the VMM's own write log) on or off for every RAM slot.
    func logDirtyPages(_ enabled: Bool) throws(KVMError) {
        for (slot, region) in memory.regions.enumerated() {
            try vm.setUserMemoryRegion(slot: UInt32(slot), guestPhysicalAddress: region.start.rawValue, size: region.size,
                                       hostAddress: region.host, logDirtyPages: enabled)
        }
        memory.logWrites(enabled)
    }

    /// A throttled vCPU's sleep: to the end of its share, or until a pause or stop needs it.
    func throttleSleep(nanoseconds: UInt64) {
        let deadline = VMMClock.now() + nanoseconds
        while !stop.isStopping && !pauseGate.isPauseRequested {
            let now = VMMClock.now()
            guard now < deadline else { return }
            let left = min(deadline - now, 1_000_000)
            var request = timespec(tv_sec: 0, tv_nsec: Int(left))
            nanosleep(&request, nil)
        }
    }
}

/// One outgoing migration, on the control connection's thread.
final class OutgoingMigration {
    let machine: Machine
    let channel: MigrationChannel
    let options: MigrationOptions
    let started = VMMClock.now()
    /// Guest RAM written since the last round.
    let pages: DirtyPages
    var dirty: [PageBitmap] { pages.dirty }
    /// `--copy-disks`: each writable disk's write tracker and its dirty chunks.
    var trackers: [(device: VirtioBlock, tracker: DirtyTrackingImage, dirty: PageBitmap)] = []
    /// Shared disks handed over at the switch-over, to take back if the destination fails. No
    /// reference to the image stays: closing it is what frees its lock for the destination.
    var released: [(device: VirtioBlock, path: String, format: DiskFormat, readOnly: Bool, below: (any DiskImage)?)] = []
    var logging = false
    var pagesSent: UInt64 = 0
    var diskBytesSent: UInt64 = 0
    /// Disk bytes not read because the disk's server said they read as zeros.
    var diskBytesKnownZero: UInt64 = 0
    var throttleThread: HostThread?
    let throttleRunning = Atomic<Bool>(false)
    var maximumThrottle = 0
    /// A run of pages on its way: address, then up to 256 pages.
    let staging = UnsafeMutableRawPointer.allocate(byteCount: 8 + 256 * 4096, alignment: 4096)
    /// Set once the switch-over has parked the vCPUs here.
    var pausedHere = false
    var quiesced = false
    /// Everything is sent and the answer is lost: the VM may run there, so it stays paused here.
    var outcomeUnknown = false
    /// The spec's record as the announcement carried it: the switch-over's state carries the same
    /// bytes, made before the pause rather than inside it.
    var specRecord: [UInt8] = []

    init(machine: Machine, channel: MigrationChannel, options: MigrationOptions) {
        self.machine = machine
        self.channel = channel
        self.options = options
        pages = DirtyPages(machine: machine)
    }

    deinit { staging.deallocate() }

    func run(progress: (MigrationProgress) -> Void) throws(MigrationError) -> MigrationOutcome {
        let disks = machine.blockDevices.map(\.device)
        let description: [UInt8]
        do throws(StateError) {
            specRecord = try machine.specRecord()
            let announce = ArrivingMachine(machine: CarriedSpec(spec: machine.spec, record: specRecord), cpuid: machine.cpuidBasis,
                                           copiesDisks: options.copyDisks, diskSizes: disks.map { $0.disk.virtualSize })
            description = try announce.encoded()
        } catch {
            throw .refused("describing the machine: \(error)")
        }
        try channel.send(.machine, description)
        try startTracking()
        defer { stopThrottle() }

        // Round 0: every page the guest ever touched (a never-touched page is zero there too).
        pages.markTouched()
        for tracked in trackers { tracked.dirty.fill() }
        var iteration = 0
        var roundStart = VMMClock.now()
        var roundBytes = try sendDirty(skipZeroPages: true)
        var rate = rateOf(bytes: roundBytes, since: roundStart)
        var highDirtyRounds = 0
        while true {
            iteration += 1
            try checkCancelled()
            try checkDestination()
            var dirtyBytes = collectDirty()
            // What the switch-over must send: this round's dirty data and the VMM's writes again.
            var expected = expectedDowntime(dirtyBytes, rate: rate)
            progress(MigrationProgress(iteration: iteration, remainingBytes: dirtyBytes, transferredBytes: channel.bytesSent,
                                       rateBytesPerSecond: rate, expectedDowntimeNanoseconds: expected,
                                       throttlePercent: machine.throttlePercent.load(ordering: .relaxed)))
            if expected <= options.maximumDowntimeNanoseconds {
                // The socket takes a round faster than the destination applies it, and whatever it
                // still holds would be applied inside the pause. Wait until the destination has
                // caught up, then judge again by the rate it kept and what the guest dirtied meanwhile.
                try waitForDestination()
                rate = max(rate / 4, rateOf(bytes: roundBytes, since: roundStart))
                dirtyBytes = collectDirty()
                expected = expectedDowntime(dirtyBytes, rate: rate)
                if expected <= options.maximumDowntimeNanoseconds { break }
            }
            // Auto-converge: the guest dirtied more than half of what went out in the last round,
            // twice running: its vCPUs give up a growing share of each 10 ms (QEMU's 20 % + 10 %).
            if options.autoConverge && iteration > 1 {
                highDirtyRounds = dirtyBytes * 2 > roundBytes ? highDirtyRounds + 1 : 0
                if highDirtyRounds >= 2 {
                    highDirtyRounds = 0
                    let current = machine.throttlePercent.load(ordering: .relaxed)
                    let next = current == 0 ? 20 : min(99, current + 10)
                    machine.throttlePercent.store(next, ordering: .relaxed)
                    maximumThrottle = max(maximumThrottle, next)
                    try startThrottle()
                    vmmLog("migration: the guest dirties memory faster than it can be sent; its vCPUs are throttled to \(100 - next) %")
                }
            }
            roundStart = VMMClock.now()
            roundBytes = try sendDirty(skipZeroPages: false)
            rate = max(rate / 4, rateOf(bytes: roundBytes, since: roundStart))
        }
        return try switchOver(iterations: iteration)
    }

    private func expectedDowntime(_ dirtyBytes: UInt64, rate: UInt64) -> UInt64 {
        rate == 0 ? UInt64.max : (dirtyBytes + vmmWrittenBytes()) * 1_000_000_000 / rate
    }

    /// Sends `sync` and waits for the destination's `synced`, which it says once everything sent
    /// before is in place. The VM runs on meanwhile; a cancel is taken while waiting.
    private func waitForDestination() throws(MigrationError) {
        try channel.send(.sync)
        let deadline = VMMClock.now() + 120_000_000_000
        while !channel.waitReadable(milliseconds: 100) {
            try checkCancelled()
            guard VMMClock.now() < deadline else { throw .refused("the destination did not catch up with the stream within 120 s") }
        }
        let answer = try channel.receive(limit: 64 << 10)
        switch answer.kind {
        case .synced where answer.payload.isEmpty: return
        case .failed: throw .refused("the destination gave up: \(String(answer.text.prefix(2000)))")
        default: throw .protocolViolation("the destination answered a sync with \(answer.kind) (\(answer.payload.count) bytes)")
        }
    }

    private func rateOf(bytes: UInt64, since start: UInt64) -> UInt64 {
        let elapsed = max(VMMClock.now() - start, 1)
        let measured = bytes * 1_000_000_000 / elapsed
        // A round too small to time says little; trust the cap (or a slow link) rather than infinity.
        if bytes < 1 << 20, let cap = options.bandwidthBytesPerSecond { return min(measured, cap) }
        return max(measured, 1)
    }

    private func checkCancelled() throws(MigrationError) {
        if machine.migrationCancelled.load(ordering: .acquiring) { throw .cancelled }
        if machine.stop.isStopping { throw .refused("the VM stopped during the migration") }
    }

    /// Dirty logging on, and with `--copy-disks` every writable disk behind a write tracker,
    /// switched with the machine briefly parked so no write in flight escapes the tracker.
    private func startTracking() throws(MigrationError) {
        try machine.lifecycle.withLock { (_) throws(MigrationError) in
            let pausedNow = machine.pauseGate.pause { machine.kickAll(machine.threadsLock.withLock { $0 }) }
            machine.quiesceComponents()
            defer {
                machine.resumeComponents()
                if pausedNow { _ = machine.pauseGate.resume() }
            }
            do throws(KVMError) {
                try machine.logDirtyPages(true)
                logging = true
            } catch {
                throw .refused("KVM would not log dirty pages: \(error)")
            }
            if options.copyDisks {
                for disk in machine.blockDevices {
                    let tracker = DirtyTrackingImage(wrapping: disk.device.disk)
                    do throws(DiskImageError) {
                        try disk.device.switchImage(to: tracker)
                    } catch {
                        throw .refused("could not track the writes to \(disk.path): \(error)")
                    }
                    trackers.append((disk.device, tracker, PageBitmap(words: tracker.wordCount)))
                }
            }
        }
    }

    /// Gathers the pages dirtied since the last call into `dirty` (and the disks' chunks);
    /// returns how many bytes that is.
    private func collectDirty() -> UInt64 {
        let dirtyPages = pages.collect()
        var chunks = 0
        for tracked in trackers {
            tracked.tracker.takeWrittenChunks(into: tracked.dirty.words)
            chunks += tracked.dirty.population
        }
        return UInt64(dirtyPages) * 4096 + UInt64(chunks) * DirtyTrackingImage.chunkSize
    }

    private func vmmWrittenBytes() -> UInt64 { UInt64(pages.vmmWrittenPages) * 4096 }

    /// Sends every page marked in `dirty` and every disk chunk marked dirty, clearing the marks.
    /// Zero pages go as a count (or, in round 0, not at all: the destination's RAM starts zeroed).
    private func sendDirty(skipZeroPages: Bool, paced: Bool = true) throws(MigrationError) -> UInt64 {
        let before = channel.bytesSent
        for (index, region) in machine.memory.regions.enumerated() {
            try sendPages(region: region, bitmap: dirty[index], skipZeroPages: skipZeroPages, paced: paced)
        }
        for (diskIndex, tracked) in trackers.enumerated() {
            try sendChunks(disk: diskIndex, tracked.tracker.underlying, bitmap: tracked.dirty, skipZeroes: skipZeroPages, paced: paced)
        }
        return channel.bytesSent - before
    }

    private func sendPages(region: GuestMemoryRegion, bitmap: PageBitmap, skipZeroPages: Bool, paced: Bool) throws(MigrationError) {
        let pageCount = Int(region.size / 4096)
        var runStart = -1
        var runZero = false
        var runLength = 0
        func flush() throws(MigrationError) {
            guard runStart >= 0, runLength > 0 else { return }
            defer { runStart = -1; runLength = 0 }
            let address = region.start.rawValue + UInt64(runStart) * 4096
            if runZero {
                guard !skipZeroPages else { return }
                var payload: [UInt8] = []
                MigrationWire.appendLittleEndian(address, to: &payload)
                MigrationWire.appendLittleEndian(UInt64(runLength), to: &payload)
                try channel.send(.zeroPages, payload)
            } else {
                // A copy first: the guest may write the pages meanwhile, and the checksum must be
                // of the bytes that go (a page written after the copy is dirty again, resent later).
                staging.storeBytes(of: address.littleEndian, as: UInt64.self)
                (staging + 8).copyMemory(from: region.host + runStart * 4096, byteCount: runLength * 4096)
                try channel.send(.pages, parts: [UnsafeRawBufferPointer(start: staging, count: 8 + runLength * 4096)])
                pagesSent += UInt64(runLength)
            }
            if paced { try pace() }
        }
        try bitmap.drain(below: pageCount) { (page) throws(MigrationError) in
            let zero = vireo_is_zero(region.host + page * 4096, 4096) != 0
            if runStart >= 0 && (page != runStart + runLength || zero != runZero || runLength == 256) { try flush() }
            if runStart < 0 {
                runStart = page
                runZero = zero
            }
            runLength += 1
            // Every 16 MiB, so a cancel or a stop is seen soon.
            if page % 4096 == 4095 { try checkCancelledUnlessFinal(paced) }
        }
        try flush()
    }

    private func checkCancelledUnlessFinal(_ paced: Bool) throws(MigrationError) {
        if paced { try checkCancelled() }
    }

    private func sendChunks(disk: Int, _ image: any DiskImage, bitmap: PageBitmap, skipZeroes: Bool, paced: Bool) throws(MigrationError) {
        let chunk = Int(DirtyTrackingImage.chunkSize)
        var buffer = [UInt8](repeating: 0, count: chunk)
        let chunkCount = Int((image.virtualSize + UInt64(chunk) - 1) / UInt64(chunk))
        try bitmap.drain(below: chunkCount) { (index) throws(MigrationError) in
            let offset = UInt64(index) * UInt64(chunk)
            let length = Int(min(UInt64(chunk), image.virtualSize - offset))
            // A range the disk's server says reads as zeros (NBD's BLOCK_STATUS) is not read.
            let knownZero = image.readsAsZeroes(at: offset, length: UInt64(length))
            if knownZero {
                diskBytesKnownZero += UInt64(length)
            } else {
                do throws(DiskImageError) {
                    try buffer.withUnsafeMutableBytes { raw in Result { () throws(DiskImageError) in
                        try image.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<length]), at: offset)
                    } }.get()
                } catch {
                    throw .refused("reading disk \(image.path) to copy it: \(error)")
                }
            }
            var head: [UInt8] = []
            MigrationWire.appendLittleEndian(UInt32(disk), to: &head)
            MigrationWire.appendLittleEndian(offset, to: &head)
            if knownZero || buffer.withUnsafeBytes({ vireo_is_zero($0.baseAddress, length) != 0 }) {
                if skipZeroes { return }
                MigrationWire.appendLittleEndian(UInt64(length), to: &head)
                try channel.send(.diskZeroes, head)
            } else {
                try head.withUnsafeBytes { headBytes in Result { () throws(MigrationError) in
                    try buffer.withUnsafeBytes { data in Result { () throws(MigrationError) in
                        try channel.send(.diskData, parts: [headBytes, UnsafeRawBufferPointer(rebasing: data[0..<length])])
                    } }.get()
                } }.get()
                diskBytesSent += UInt64(length)
            }
            if paced {
                try pace()
                try checkCancelled()
            }
        }
    }

    /// Holds the pre-copy to the bandwidth cap: sleeps until the bytes sent so far are due.
    private func pace() throws(MigrationError) {
        guard let cap = options.bandwidthBytesPerSecond, cap > 0 else { return }
        let due = started + UInt64(Double(channel.bytesSent) / Double(cap) * 1e9)
        let now = VMMClock.now()
        guard due > now else { return }
        var request = timespec(tv_sec: Int((due - now) / 1_000_000_000), tv_nsec: Int((due - now) % 1_000_000_000))
        var left = timespec()
        while nanosleep(&request, &left) != 0 && errno == EINTR { request = left }
    }

    /// A destination that gave up says why before it closes; its word is read between rounds.
    private func checkDestination() throws(MigrationError) {
        guard channel.waitReadable(milliseconds: 0) else { return }
        let message = try channel.receive(limit: 64 << 10)
        if message.kind == .failed { throw .refused("the destination gave up: \(String(message.text.prefix(2000)))") }
        throw .protocolViolation("the destination sent \(message.kind) before the switch-over")
    }

    // MARK: throttling

    private func startThrottle() throws(MigrationError) {
        guard throttleThread == nil else { return }
        throttleRunning.store(true, ordering: .releasing)
        let machine = self.machine
        let running = UnsafeSendable(self)
        do throws(VMMError) {
            throttleThread = try HostThread.spawn(name: "throttle") {
                // Every 10 ms each vCPU is told to sleep its share and kicked out of the guest (a
                // signal alone: a kick lost just before KVM_RUN costs one slice, never a hang).
                while running.value.throttleRunning.load(ordering: .acquiring) {
                    var request = timespec(tv_sec: 0, tv_nsec: 10_000_000)
                    nanosleep(&request, nil)
                    guard machine.throttlePercent.load(ordering: .relaxed) > 0 else { continue }
                    let threads = machine.threadsLock.withLock { $0 }
                    for (index, thread) in threads.enumerated() {
                        machine.throttleTicks[index].value.store(1, ordering: .releasing)
                        thread.kick()
                    }
                }
            }
        } catch {
            throw .refused("could not start the throttle: \(error)")
        }
    }

    private func stopThrottle() {
        machine.throttlePercent.store(0, ordering: .relaxed)
        throttleRunning.store(false, ordering: .releasing)
        throttleThread?.join()
        throttleThread = nil
    }

    // MARK: the switch-over

    private func switchOver(iterations: Int) throws(MigrationError) -> MigrationOutcome {
        stopThrottle()
        return try machine.lifecycle.withLock { (_) throws(MigrationError) -> MigrationOutcome in
            guard !machine.stop.isStopping, !machine.stateWritten.load(ordering: .acquiring) else {
                throw .refused("the VM stopped during the migration")
            }
            let userPaused = machine.pauseGate.isPaused
            pausedHere = machine.pauseGate.pause { machine.kickAll(machine.threadsLock.withLock { $0 }) }
            let stoppedAt = VMMClock.now()
            machine.quiesceComponents()
            quiesced = true
            for disk in machine.blockDevices {
                do throws(DiskImageError) {
                    try disk.device.disk.flush()
                } catch {
                    throw .refused("flushing \(disk.path): \(error)")
                }
            }
            _ = collectDirty()
            pages.includeEveryVMMWrite()
            let pagesBefore = pagesSent
            _ = try sendDirty(skipZeroPages: false, paced: false)
            let pagesSentAt = VMMClock.now()
            let state: SavedMachineState
            do throws(Machine.CaptureError) {
                state = try machine.captureState(specRecord: specRecord)
            } catch {
                throw .refused("capturing the machine's state: \(error)")
            }
            let capturedAt = VMMClock.now()
            var flags: UInt8 = userPaused ? ArrivalFlags.paused : 0
            if !options.copyDisks {
                // Hand the disks over: closing them drops their locks for the destination to take.
                // A network disk stays connected: flushed above, it has no lock, the destination
                // holds its own connection already, and this side needs it if the VM stays here.
                for disk in machine.blockDevices where !DiskFormat.isNetworkAddress(disk.path) {
                    let image = disk.device.disk
                    let (path, format, size, readOnly) = (image.path, image.format, image.virtualSize, image.isReadOnly)
                    // What the image rests on stays open here (shared locks, read-only): taking the
                    // VM back after a failure reopens only the image itself.
                    let below = (image as? QCOW2Image)?.backingImage
                    do throws(DiskImageError) {
                        try disk.device.switchImage(to: DetachedImage(path: path, format: format, virtualSize: size, readOnly: readOnly))
                    } catch {
                        throw .refused("handing over \(path): \(error)")
                    }
                    released.append((disk.device, path, format, readOnly, below))
                }
                flags |= ArrivalFlags.disksReleased
            }
            var statePayload = [flags]
            do throws(StateError) { statePayload += try state.encoded() } catch { throw .refused("writing the machine's state: \(error)") }
            let encodedAt = VMMClock.now()
            try channel.send(.state, statePayload)
            var end: [UInt8] = []
            MigrationWire.appendLittleEndian(pagesSent, to: &end)
            MigrationWire.appendLittleEndian(diskBytesSent, to: &end)
            try channel.send(.end, end)
            let sentAt = VMMClock.now()
            // From here the destination may run the VM: only its word decides.
            guard channel.waitReadable(milliseconds: 120_000) else {
                outcomeUnknown = true
                throw .refused("the destination did not answer within 120 s after the VM's last state was sent")
            }
            let answer: MigrationWire.Message
            do throws(MigrationError) {
                answer = try channel.receive(limit: 64 << 10)
            } catch {
                // Closed without a word: it never started the VM (it says `running` first).
                throw .refused("the destination ended the connection without taking the VM (\(error))")
            }
            switch answer.kind {
            case .running:
                let downtime = VMMClock.now() - stoppedAt
                machine.stateWritten.store(true, ordering: .releasing)
                do throws(KVMError) { try machine.logDirtyPages(false) } catch {}
                logging = false
                let outcome = MigrationOutcome(downtimeNanoseconds: downtime, totalNanoseconds: VMMClock.now() - started,
                                               transferredBytes: channel.bytesSent, iterations: iterations,
                                               finalPages: pagesSent - pagesBefore, maximumThrottlePercent: maximumThrottle)
                if diskBytesKnownZero > 0 {
                    vmmLog("migration: \(diskBytesKnownZero >> 20) MiB of disk the server reported as zeros were not read")
                }
                vmmLog("migrated to \(options.destination): \(iterations) rounds, \(channel.bytesSent >> 20) MiB sent, "
                       + "\(pagesSent - pagesBefore) pages at the switch-over, downtime \(downtime / 1000) us "
                       + "(\((sentAt - stoppedAt) / 1000) us here: last pages sent after \((pagesSentAt - stoppedAt) / 1000) us, state captured in "
                       + "\((capturedAt - pagesSentAt) / 1000) us and written in \((encodedAt - capturedAt) / 1000) us; "
                       + "\((VMMClock.now() - sentAt) / 1000) us until the destination ran it)")
                return outcome
            case .failed:
                throw .refused("the destination could not take the VM: \(String(answer.text.prefix(2000)))")
            default:
                throw .protocolViolation("the destination answered \(answer.kind)")
            }
        }
    }

    /// After a failure: the VM runs on here as before (unless the outcome is unknown), and the
    /// error says so.
    func failure(_ reported: MigrationError) -> VMMError {
        stopThrottle()
        var error = reported
        if !outcomeUnknown, error != .cancelled, channel.waitReadable(milliseconds: 500),
           let message = try? channel.receive(limit: 64 << 10), message.kind == .failed {
            error = .refused("the destination gave up: \(String(message.text.prefix(2000)))")
        }
        if outcomeUnknown {
            // Only devices come back: the disks may be open there, and the vCPUs stay parked.
            if quiesced { machine.resumeComponents() }
            vmmLog("migration to \(options.destination): \(error); the VM may run there, so it stays paused here")
            return .migrationOutcomeUnknown("\(error); the VM may be running on the destination, so it stays paused here with its disks handed over. Check the destination: if the VM runs there, power this copy off (`vireo stop NAME --force`); if not, `vireo resume NAME` here is safe only once nothing else has the disks open")
        }
        var problems: [String] = []
        if logging {
            do throws(KVMError) { try machine.logDirtyPages(false) } catch { problems.append("dirty logging stays on: \(error)") }
        }
        for tracked in trackers {
            do throws(DiskImageError) {
                try tracked.device.switchImage(to: tracked.tracker.underlying)
            } catch {
                problems.append("\(tracked.tracker.path): \(error)")
            }
        }
        for entry in released {
            // The destination's VMM may still be closing the images: it exits on failure.
            var reopened: (any DiskImage)?
            var lastError = ""
            for _ in 0..<100 {
                do throws(DiskImageError) {
                    reopened = try DiskImages.reopen(path: entry.path, format: entry.format, readOnly: entry.readOnly, on: entry.below,
                                                     direct: entry.device.bypassesHostCache)
                    break
                } catch {
                    lastError = error.description
                    usleep(50_000)
                }
            }
            if let reopened {
                do throws(DiskImageError) { try entry.device.switchImage(to: reopened) } catch { problems.append(error.description) }
            } else {
                problems.append("\(entry.path) could not be opened again: \(lastError)")
            }
        }
        if quiesced { machine.resumeComponents() }
        if pausedHere { _ = machine.pauseGate.resume() }
        let what = error == .cancelled ? "migration to \(options.destination) cancelled" : "migration to \(options.destination) failed: \(error)"
        vmmLog(what + (problems.isEmpty ? "; the VM runs on here" : "; problems putting the VM back: " + problems.joined(separator: "; ")))
        guard problems.isEmpty else { return .migration("\(error); the VM runs on here, but: \(problems.joined(separator: "; "))") }
        return .migration(error == .cancelled ? "cancelled; the VM runs on here as before" : "\(error); the VM runs on here as before")
    }
}

/// Hands a non-Sendable owner to a thread that only reads its atomics.
struct UnsafeSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

// MARK: the destination

extension Machine {
    /// Takes the VM the source sends: RAM and disk data as they come, then the machine's state,
    /// then (shared disks) the images the source has let go of. Every message is checked; any
    /// failure is told to the source, which then runs on.
    func receiveMigration(_ arriving: ArrivingMachine, from channel: MigrationChannel) throws(VMMError) {
        if let mismatch = shape.mismatch(saved: MachineShape(arriving.machine.spec)) { throw .migration(mismatch) }
        // A source that goes silent for a minute is gone; its VM runs on there.
        var timeout = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(channel.fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let started = VMMClock.now()
        var pages: UInt64 = 0
        var diskBytes: UInt64 = 0
        var arrivedState: (flags: UInt8, state: SavedMachineState)?
        do throws(MigrationError) {
            let layout = ArrivalLayout(memory: memory.regions.map { ($0.start.rawValue, $0.size) },
                                       diskSizes: arriving.copiesDisks ? blockDevices.map { $0.device.disk.virtualSize } : nil)
            receiving: while true {
                switch try ArrivingMessage(try channel.receive(), layout: layout) {
                case let .pages(address, data):
                    do throws(GuestMemoryError) { try memory.write(data, at: GuestPhysicalAddress(address)) } catch {
                        throw .protocolViolation(error.description)
                    }
                    pages += UInt64(data.count / 4096)
                case let .zeroPages(address, count):
                    do throws(GuestMemoryError) { try memory.fill(0, count: Int(count * 4096), at: GuestPhysicalAddress(address)) } catch {
                        throw .protocolViolation(error.description)
                    }
                case let .diskData(index, offset, data):
                    let disk = blockDevices[index].device.disk
                    do throws(DiskImageError) {
                        try data.withUnsafeBytes { bytes in Result { () throws(DiskImageError) in try disk.write(bytes, at: offset) } }.get()
                    } catch {
                        throw .refused("writing the copied disk \(disk.path): \(error)")
                    }
                    diskBytes += UInt64(data.count)
                case let .diskZeroes(index, offset, length):
                    let disk = blockDevices[index].device.disk
                    do throws(DiskImageError) { try disk.writeZeroes(at: offset, length: length) } catch {
                        throw .refused("writing the copied disk \(disk.path): \(error)")
                    }
                case .sync:
                    // Everything before it was applied as it came: the source may judge its switch-over.
                    try channel.send(.synced)
                case let .state(flags, state):
                    guard arrivedState == nil else { throw .protocolViolation("a second state") }
                    arrivedState = (flags, state)
                case let .end(sentPages, sentDiskBytes):
                    guard arrivedState != nil else { throw .protocolViolation("the stream ended without the machine's state") }
                    guard sentPages == pages, sentDiskBytes == diskBytes else {
                        throw .protocolViolation("the source sent \(sentPages) pages and \(sentDiskBytes) disk bytes; \(pages) and \(diskBytes) arrived")
                    }
                    break receiving
                }
            }
        } catch {
            throw .migration(error == .cancelled ? "the source cancelled" : "receiving: \(error)")
        }
        guard let arrivedState else { throw .migration("no state arrived") }
        let switchStarted = VMMClock.now()
        if MachineShape(arrivedState.state.machine.spec) != MachineShape(arriving.machine.spec) { throw .migration("the state's machine differs from the one announced") }
        if !arriving.copiesDisks {
            guard arrivedState.flags & ArrivalFlags.disksReleased != 0 else { throw .migration("the source did not hand its disks over") }
            for (index, disk) in blockDevices.enumerated() where !DiskFormat.isNetworkAddress(disk.path) {
                let stand = disk.device.disk
                do throws(DiskImageError) {
                    // On the layers opened before the jail; the image itself is this VM's uid's.
                    let image = try DiskImages.reopen(path: stand.path, format: stand.format, readOnly: stand.isReadOnly,
                                                      on: index < arrivingLayers.count ? arrivingLayers[index] : nil,
                                                      direct: disk.device.bypassesHostCache)
                    guard image.virtualSize == arriving.diskSizes[index] else {
                        throw DiskImageError.invalidArgument(field: "size", reason: "\(image.virtualSize) bytes here, \(arriving.diskSizes[index]) on the source: not the same disk")
                    }
                    try disk.device.bind(image)
                } catch {
                    throw .migration("opening the shared disk \(stand.path): \(error)")
                }
            }
        }
        let disksOpened = VMMClock.now()
        do throws(StateApplicationError) {
            try applyState(arrivedState.state)
        } catch {
            switch error {
            case let .state(reason): throw .migration("the machine's state: \(reason)")
            case let .other(error): throw error
            }
        }
        if arrivedState.flags & ArrivalFlags.paused != 0 { pauseGate.startPaused() }
        vmmLog("migration received: \(pages) pages, \(diskBytes) disk bytes in \((VMMClock.now() - started) / 1_000_000) ms; "
               + "disks taken in \((disksOpened - switchStarted) / 1000) us, state in \((VMMClock.now() - disksOpened) / 1000) us")
        arrivalFinished = VMMClock.now()
    }
}
