import GuestMemory
import MachineSpec
import Synchronization

/// virtio-balloon (virtio 1.x §5.5): the host asks for memory back by setting a target; the
/// guest inflates by handing over page frame numbers, which the VMM discards (madvise
/// MADV_DONTNEED) so the host gets the RAM; deflating returns them (they refault as zeros).
/// With the statistics queue the guest reports its memory figures, refreshed every
/// `statisticsInterval` seconds.
public final class VirtioBalloon: VirtioDevice, BackgroundDevice, Snapshottable, @unchecked Sendable {
    public static let queueSize: UInt16 = 256
    static let pageSize: UInt64 = 4096

    enum Feature {
        static let mustTellHost: UInt64 = 1 << 0
        static let statisticsQueue: UInt64 = 1 << 1
        static let deflateOnOOM: UInt64 = 1 << 2
    }

    /// The statistics tags of §5.5.6.3, named as `vireo info` shows them.
    public static let statisticNames: [UInt16: String] = [
        0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory", 5: "total_memory",
        6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations", 9: "hugetlb_failures",
    ]

    public let deflateOnOOM: Bool
    public let statisticsInterval: UInt64?

    struct State {
        var targetPages: UInt32 = 0
        var actualPages: UInt32 = 0
        var inflatedPages: UInt64 = 0
        var deflatedPages: UInt64 = 0
        var statistics: [UInt16: UInt64] = [:]
        /// The guest's statistics buffer, held until the next refresh.
        var statisticsHead: UInt16?
    }
    private let state = Mutex(State())
    private let access = VirtioQueueAccessLink()
    private let deferred = DeferredWork()

    public init(deflateOnOOM: Bool, statisticsInterval: UInt64?) {
        self.deflateOnOOM = deflateOnOOM
        self.statisticsInterval = statisticsInterval
    }

    public var deviceType: UInt32 { 5 }
    public var deviceFeatures: UInt64 {
        VirtioFeature.version1 | (statisticsInterval == nil ? 0 : Feature.statisticsQueue) | (deflateOnOOM ? Feature.deflateOnOOM : 0)
    }
    public var queueMaximumSizes: [UInt16] {
        statisticsInterval == nil ? [Self.queueSize, Self.queueSize] : [Self.queueSize, Self.queueSize, 1]
    }

    public func attach(_ access: any VirtioQueueAccess) { self.access.attach(access) }

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        // num_pages, actual (both little-endian u32), then fields this device does not offer.
        let (target, actual) = state.withLock { ($0.targetPages, $0.actualPages) }
        var space = [UInt8](repeating: 0, count: 16)
        for index in 0..<4 {
            space[index] = UInt8(truncatingIfNeeded: target >> (8 * UInt32(index)))
            space[4 + index] = UInt8(truncatingIfNeeded: actual >> (8 * UInt32(index)))
        }
        for index in data.indices {
            let position = offset + index
            data[index] = position >= 0 && position < space.count ? space[position] : 0
        }
    }

    public func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer) {
        // Only `actual` is the driver's to write, and only whole.
        guard offset == 4, data.count == 4 else { return }
        let value = data.loadUnaligned(as: UInt32.self).littleEndian
        state.withLock { $0.actualPages = value }
    }

    /// Asks the guest to hold `pages` 4 KiB pages in its balloon.
    public func setTarget(pages: UInt32) {
        state.withLock { $0.targetPages = pages }
        access.current?.notifyConfigurationChange()
    }

    public struct Report: Sendable {
        public var targetPages: UInt32
        public var actualPages: UInt32
        public var inflatedPages: UInt64
        public var deflatedPages: UInt64
        public var statistics: [UInt16: UInt64]
    }

    public var report: Report {
        state.withLock { Report(targetPages: $0.targetPages, actualPages: $0.actualPages, inflatedPages: $0.inflatedPages,
                                deflatedPages: $0.deflatedPages, statistics: $0.statistics) }
    }

    public func process(queue index: Int, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        switch index {
        case 0, 1:
            var used = false
            while let chain = try queue.popChain() {
                let bytes = try memory.gather(chain.readable, limit: 1 << 20)
                let frames = stride(from: 0, to: bytes.count - bytes.count % 4, by: 4).map { offset in
                    UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16 | UInt32(bytes[offset + 3]) << 24
                }
                if index == 0 {
                    // Frames outside guest RAM are ignored: a hostile guest cannot make us discard anything else.
                    var discarded: UInt64 = 0
                    for frame in frames {
                        let address = GuestPhysicalAddress(UInt64(frame) * Self.pageSize)
                        if (try? memory.discard(address, length: Self.pageSize)) != nil { discarded += 1 }
                    }
                    state.withLock { $0.inflatedPages += discarded }
                } else {
                    state.withLock { $0.deflatedPages += UInt64(frames.count) }
                }
                try queue.pushUsed(head: chain.head, written: 0)
                used = true
            }
            return used
        case 2:
            // The guest's statistics: (tag u16, value u64) entries, packed. The buffer stays with
            // the device until the next refresh asks for new figures.
            guard let chain = try queue.popChain() else { return false }
            let bytes = try memory.gather(chain.readable, limit: 10 * 64)
            var statistics: [UInt16: UInt64] = [:]
            for offset in stride(from: 0, to: bytes.count - bytes.count % 10, by: 10) {
                let tag = UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8
                let value = bytes[offset + 2..<offset + 10].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                statistics[tag] = value
            }
            let previous = state.withLock { state -> UInt16? in
                state.statistics.merge(statistics) { $1 }
                defer { state.statisticsHead = chain.head }
                return state.statisticsHead
            }
            // A driver that re-sent a buffer we held gets the old one back now.
            if let previous, previous != chain.head { try queue.pushUsed(head: previous, written: 0); return true }
            if let statisticsInterval { deferred.schedule(after: statisticsInterval * 1_000_000_000) }
            return false
        default:
            return false
        }
    }

    /// The balloon's size, its counters, and the statistics buffer it holds between refreshes.
    public struct Saved: Codable, Sendable, Equatable {
        public var targetPages, actualPages: UInt32
        public var inflatedPages, deflatedPages: UInt64
        public var statisticsHead: UInt16?
    }

    public func captureState() -> Saved {
        state.withLock { Saved(targetPages: $0.targetPages, actualPages: $0.actualPages, inflatedPages: $0.inflatedPages,
                               deflatedPages: $0.deflatedPages, statisticsHead: $0.statisticsHead) }
    }

    public func applyState(_ saved: Saved) throws(StateError) {
        var restored = State()
        restored.targetPages = saved.targetPages
        restored.actualPages = saved.actualPages
        restored.inflatedPages = saved.inflatedPages
        restored.deflatedPages = saved.deflatedPages
        if let head = saved.statisticsHead {
            guard statisticsInterval != nil, head < queueMaximumSizes[2] else {
                throw .invalid(field: "statisticsHead", reason: "descriptor \(head) held, but this balloon has no such statistics queue entry")
            }
            restored.statisticsHead = head
        }
        state.withLock { $0 = restored }
        // The held buffer goes back at the next refresh, as it would have without the save.
        if saved.statisticsHead != nil, let statisticsInterval { deferred.schedule(after: statisticsInterval * 1_000_000_000) }
    }

    public var needsBackgroundThread: Bool { statisticsInterval != nil }
    public func stopBackground() { deferred.stop() }

    /// Returns the held statistics buffer every interval, which asks the guest for new figures.
    public func runBackground() {
        deferred.run {
            _ = access.current?.withQueue(2) { (queue, _) throws(VirtioError) -> Bool in
                guard let head = state.withLock({ state -> UInt16? in defer { state.statisticsHead = nil }; return state.statisticsHead }) else {
                    return false
                }
                try queue.pushUsed(head: head, written: 0)
                return true
            }
        }
    }
}
