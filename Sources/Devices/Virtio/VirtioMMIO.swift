import GuestMemory
import MachineSpec
import Synchronization

/// What a virtio device does; the transport handles discovery, feature negotiation and queues.
public protocol VirtioDevice: AnyObject, Sendable {
    /// Virtio device ID (2 = block, 1 = network, 4 = entropy, ...).
    var deviceType: UInt32 { get }
    /// Offered feature bits, VIRTIO_F_VERSION_1 (bit 32) included.
    var deviceFeatures: UInt64 { get }
    var queueMaximumSizes: [UInt16] { get }
    func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer)
    /// Handles the driver's notification for queue `index`. Returns true when it used buffers
    /// (the transport then interrupts the driver).
    func process(queue index: Int, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool
    /// The driver accepted these features (FEATURES_OK): the device may now use what they allow.
    func acceptFeatures(_ features: UInt64)
    /// Called once by the transport, for devices that fill queues on their own (network receive).
    func attach(_ access: any VirtioQueueAccess)
    /// The driver wrote to the device's configuration space (most devices' is read-only).
    func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer)
    /// The device was reset (the driver wrote status 0, or the machine rebooted): drop whatever
    /// belongs to the driver's old session. Called with the transport's lock held.
    func reset()
    /// The device's own state beyond what the transport keeps (queues, features, status), as a
    /// record, captured with its transport quiesced. Most devices have none (an empty record); a
    /// device with some is `Snapshottable` and gets both from that.
    func savedDeviceRecord() throws(StateError) -> [UInt8]
    /// Puts back what `savedDeviceRecord` gave; called after the transport's own state, features
    /// accepted and queues set up.
    func restoreDevice(record: [UInt8]) throws(StateError)
    /// Whether the transport may offer VIRTIO_F_EVENT_IDX: the VMM's own queue work handles it,
    /// a back end in another process (vhost-user) only if it says so.
    var offersEventIndex: Bool { get }
    /// The driver set DRIVER_OK with these queues ready (after FEATURES_OK): a device whose queues
    /// another process serves hands them over now. An error fails the device (NEEDS_RESET).
    func driverReady(_ queues: [VirtioQueueLayout]) throws(VirtioError)
    /// Whether `process` may run for different queues at the same time (a multiqueue disk, whose
    /// queues share nothing but the image). False for devices whose queues share state (a card's
    /// receive and transmit, vsock's connections): their queue work runs one queue at a time.
    var processesQueuesConcurrently: Bool { get }
}

/// A ready queue as the driver laid it out, in guest-physical addresses.
public struct VirtioQueueLayout: Sendable, Equatable {
    public var index: Int
    public var size: UInt16
    public var descriptorTable: UInt64
    public var availableRing: UInt64
    public var usedRing: UInt64
}

extension VirtioDevice {
    public func acceptFeatures(_ features: UInt64) {}
    public func attach(_ access: any VirtioQueueAccess) {}
    public func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer) {}
    public func reset() {}
    public func savedDeviceRecord() throws(StateError) -> [UInt8] { [] }
    public var offersEventIndex: Bool { true }
    public var processesQueuesConcurrently: Bool { false }
    public func driverReady(_ queues: [VirtioQueueLayout]) throws(VirtioError) {}
    public func restoreDevice(record: [UInt8]) throws(StateError) {
        guard record.isEmpty else { throw .invalid(field: "device", reason: "\(record.count) bytes of state for a device that keeps none") }
    }
}

extension VirtioDevice where Self: Snapshottable {
    public func savedDeviceRecord() throws(StateError) -> [UInt8] { try savedRecord() }
    public func restoreDevice(record: [UInt8]) throws(StateError) { try restore(record: record) }
}

/// A device's way to its queues from a thread of its own, under the same lock as notifications.
public protocol VirtioQueueAccess: AnyObject, Sendable {
    /// Runs `body` with queue `index` if the driver has it ready and the device is live; raises the
    /// used-buffer interrupt when `body` returns true. Returns what `body` returned, or false if the
    /// queue could not be used. An error from `body` fails the device (NEEDS_RESET).
    func withQueue(_ index: Int, _ body: (VirtQueue, GuestMemory) throws(VirtioError) -> Bool) -> Bool
    /// Tells the driver the configuration space changed (a new balloon target).
    func notifyConfigurationChange()
}

/// A device's link back to its transport. Weak because the transport owns the device: a strong
/// link both ways is a cycle that would keep a dropped transport, its device, the guest memory and
/// the device's host descriptors alive for the life of the process.
public final class VirtioQueueAccessLink: Sendable {
    private struct WeakAccess { weak var access: (any VirtioQueueAccess)? }
    private let slot = Mutex(WeakAccess())

    public init() {}

    public func attach(_ access: any VirtioQueueAccess) { slot.withLock { $0.access = access } }

    /// The transport, while it is alive.
    public var current: (any VirtioQueueAccess)? { slot.withLock { $0.access } }
}

public enum VirtioFeature {
    public static let version1: UInt64 = 1 << 32
    /// VIRTIO_F_EVENT_IDX: notification and interrupt suppression by ring index (§2.7.7). The
    /// transport offers it for every device: the queue does the work.
    public static let eventIndex: UInt64 = 1 << 29
}

/// The virtio-mmio transport (virtio 1.x §4.2, "version 2", no legacy interface), as Firecracker
/// uses it. Linux finds it through `virtio_mmio.device=4K@ADDRESS:IRQ` on the command line.
public final class VirtioMMIOTransport: MMIODevice, VirtioQueueAccess, Snapshottable, Pausable {
    public static let magic: UInt32 = 0x7472_6976         // "virt"
    public static let vendor: UInt32 = 0x4f52_4956        // "VIRO"
    public static let windowSize: UInt64 = 0x1000
    public static let queueNotifyOffset: UInt64 = 0x050

    enum Status {
        static let acknowledge: UInt32 = 1
        static let driver: UInt32 = 2
        static let driverOK: UInt32 = 4
        static let featuresOK: UInt32 = 8
        static let needsReset: UInt32 = 0x40
        static let failed: UInt32 = 0x80
    }

    struct QueueRegisters {
        var size: UInt16
        var ready = false
        var descriptor: UInt64 = 0
        var driver: UInt64 = 0
        var device: UInt64 = 0
        var queue: VirtQueue?
    }

    struct State {
        var status: UInt32 = 0
        var deviceFeaturesSelect: UInt32 = 0
        var driverFeaturesSelect: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSelect: UInt32 = 0
        var queues: [QueueRegisters]
        var interruptStatus: UInt32 = 0
        var configurationGeneration: UInt32 = 0
        /// The last thing that went wrong, for logs and tests.
        var lastError: VirtioError?
        /// While set (a snapshot is being taken) no queue work runs, so nothing touches guest
        /// memory; notifications that arrive meanwhile are replayed by `resumeWork()`.
        var quiesced = false
    }

    /// Held while a queue's work runs (the device's `process`, a device thread's `withQueue`):
    /// one per queue for a device whose queues work independently, one shared otherwise. Taken
    /// before `state`, which queue work holds only to look up its queue and to interrupt; whatever
    /// replaces or resets queues (QueueReady, Status, quiesce, reset) takes all of them first, in
    /// order, so it never runs beside queue work.
    private final class QueueWorkLock: Sendable {
        let mutex = Mutex(())
    }
    private let workLocks: [QueueWorkLock]

    public let device: any VirtioDevice
    let memory: GuestMemory
    let interrupt: any InterruptLine
    private let state: Mutex<State>
    private let probed = Atomic<Bool>(false)
    /// Used-buffer interrupts raised, and those EVENT_IDX let the device leave out (the driver
    /// had not asked for one yet), for the VMM log.
    public let interruptsRaised = Atomic<UInt64>(0)
    public let interruptsSuppressed = Atomic<UInt64>(0)
    /// Driver sessions (FEATURES_OK) that took VIRTIO_F_EVENT_IDX, for the VMM log.
    public let eventIndexSessions = Atomic<UInt64>(0)

    /// Whether the guest has read the transport's magic value: a driver looked for the device.
    public var wasProbed: Bool { probed.load(ordering: .relaxed) }

    public init(device: any VirtioDevice, memory: GuestMemory, interrupt: any InterruptLine) {
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        state = Mutex(State(queues: device.queueMaximumSizes.map { QueueRegisters(size: $0) }))
        let lockCount = device.processesQueuesConcurrently ? max(1, device.queueMaximumSizes.count) : 1
        workLocks = (0..<lockCount).map { _ in QueueWorkLock() }
        device.attach(self)
    }

    /// Runs `body` holding queue `index`'s work lock.
    private func withWork<Result>(of index: Int, _ body: () -> Result) -> Result {
        let lock = workLocks[workLocks.count == 1 ? 0 : index]
        return lock.mutex.withLock { _ in body() }
    }

    /// Runs `body` holding every queue's work lock: no queue work runs meanwhile.
    private func withAllWork(_ body: () -> Void) {
        func hold(from index: Int) {
            guard index < workLocks.count else { return body() }
            workLocks[index].mutex.withLock { _ in hold(from: index + 1) }
        }
        hold(from: 0)
    }

    public var lastError: VirtioError? { state.withLock { $0.lastError } }
    public var status: UInt32 { state.withLock { $0.status } }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        if offset >= 0x100 {
            device.readConfiguration(offset: Int(offset - 0x100), into: data)
            return
        }
        if offset == 0 { probed.store(true, ordering: .relaxed) }
        let value: UInt32 = state.withLock { state in
            let selected = Int(state.queueSelect)
            let queue = selected < state.queues.count ? state.queues[selected] : nil
            switch offset {
            case 0x000: return Self.magic
            case 0x004: return 2
            case 0x008: return device.deviceType
            case 0x00c: return Self.vendor
            case 0x010:
                return state.deviceFeaturesSelect < 2 ? UInt32(truncatingIfNeeded: offeredFeatures >> (32 * UInt64(state.deviceFeaturesSelect))) : 0
            case 0x034: return UInt32(selected < device.queueMaximumSizes.count ? device.queueMaximumSizes[selected] : 0)
            case 0x044: return queue?.ready == true ? 1 : 0
            case 0x060: return state.interruptStatus
            case 0x070: return state.status
            case 0x0fc: return state.configurationGeneration
            default: return 0
            }
        }
        withUnsafeBytes(of: value.littleEndian) { source in
            for index in data.indices { data[index] = index < source.count ? source[index] : 0 }
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        if offset >= 0x100 {
            device.writeConfiguration(offset: Int(offset - 0x100), data: data)
            return
        }
        guard data.count == 4 else { return }
        let value = data.loadUnaligned(as: UInt32.self).littleEndian
        // A notification runs the queue's work under its own lock, not the registers'.
        if offset == Self.queueNotifyOffset { return notify(queue: Int(value)) }
        // QueueReady and Status make or drop queues and call the device: never beside queue work.
        if offset == 0x044 || offset == 0x070 {
            withAllWork { writeRegister(offset: offset, value: value) }
        } else {
            writeRegister(offset: offset, value: value)
        }
    }

    private func writeRegister(offset: UInt64, value: UInt32) {
        state.withLock { state in
            let selected = Int(state.queueSelect)
            let valid = selected < state.queues.count
            switch offset {
            case 0x014: state.deviceFeaturesSelect = value
            case 0x020:
                if state.driverFeaturesSelect < 2 {
                    let shift = 32 * UInt64(state.driverFeaturesSelect)
                    state.driverFeatures = (state.driverFeatures & ~(0xffff_ffff << shift)) | (UInt64(value) << shift)
                }
            case 0x024: state.driverFeaturesSelect = value
            case 0x030: state.queueSelect = value
            case 0x038: if valid, !state.queues[selected].ready { state.queues[selected].size = UInt16(truncatingIfNeeded: value) }
            case 0x044: if valid { setQueueReady(value == 1, index: selected, state: &state) }
            case 0x064: state.interruptStatus &= ~value
            case 0x070: setStatus(value, state: &state)
            case 0x080: if valid { state.queues[selected].descriptor.setLow(value) }
            case 0x084: if valid { state.queues[selected].descriptor.setHigh(value) }
            case 0x090: if valid { state.queues[selected].driver.setLow(value) }
            case 0x094: if valid { state.queues[selected].driver.setHigh(value) }
            case 0x0a0: if valid { state.queues[selected].device.setLow(value) }
            case 0x0a4: if valid { state.queues[selected].device.setHigh(value) }
            default: break
            }
        }
    }

    private func setStatus(_ value: UInt32, state: inout State) {
        if value == 0 {
            resetLocked(&state)
            return
        }
        var accepted = value
        if value & Status.featuresOK != 0 && state.status & Status.featuresOK == 0 {
            // The driver may only accept what was offered, and a modern device needs VERSION_1.
            let offered = offeredFeatures
            if state.driverFeatures & ~offered != 0 || state.driverFeatures & VirtioFeature.version1 == 0 {
                accepted &= ~Status.featuresOK
            } else {
                device.acceptFeatures(state.driverFeatures)
                if state.driverFeatures & VirtioFeature.eventIndex != 0 { eventIndexSessions.add(1, ordering: .relaxed) }
            }
        }
        let startsDriver = accepted & Status.driverOK != 0 && state.status & Status.driverOK == 0
            && accepted & Status.featuresOK != 0 && state.status & Status.needsReset == 0
        state.status = accepted | (state.status & Status.needsReset)
        if startsDriver {
            let ready = state.queues.enumerated().compactMap { index, queue in
                queue.ready ? VirtioQueueLayout(index: index, size: queue.size, descriptorTable: queue.descriptor,
                                                availableRing: queue.driver, usedRing: queue.device) : nil
            }
            do throws(VirtioError) { try device.driverReady(ready) } catch { fail(error, state: &state) }
        }
    }

    /// The device's features and the transport's own.
    var offeredFeatures: UInt64 { device.deviceFeatures | (device.offersEventIndex ? VirtioFeature.eventIndex : 0) }

    private func setQueueReady(_ ready: Bool, index: Int, state: inout State) {
        guard ready else {
            state.queues[index].ready = false
            state.queues[index].queue = nil
            return
        }
        let registers = state.queues[index]
        do {
            state.queues[index].queue = try VirtQueue(
                memory: memory, size: registers.size, maximumSize: device.queueMaximumSizes[index],
                descriptorTable: GuestPhysicalAddress(registers.descriptor), availableRing: GuestPhysicalAddress(registers.driver),
                usedRing: GuestPhysicalAddress(registers.device), usesEventIndex: state.driverFeatures & VirtioFeature.eventIndex != 0)
            state.queues[index].ready = true
        } catch {
            fail(error, state: &state)
        }
    }

    /// Device reset: forget everything the driver set up, and lower the interrupt it may have left
    /// raised.
    /// A device that never left status 0 had no driver session, so the device keeps what it has
    /// (a host's vsock connection waiting for the guest's driver, say).
    private func resetLocked(_ state: inout State, always: Bool = false) {
        let hadSession = state.status != 0
        state = State(queues: device.queueMaximumSizes.map { QueueRegisters(size: $0) },
                      configurationGeneration: state.configurationGeneration)
        if hadSession || always { device.reset() }
        interrupt.setLevel(false)
    }

    /// Resets the device as a machine reset does: the guest's next boot finds it fresh.
    public func resetDevice() { withAllWork { state.withLock { resetLocked(&$0, always: true) } } }

    /// Queue `index` if queue work may use it now: the driver is running, nothing failed, no
    /// snapshot is being taken. Called with the queue's work lock held.
    private func workingQueue(_ index: Int) -> VirtQueue? {
        state.withLock { state in
            guard !state.quiesced, state.status & Status.driverOK != 0, state.status & Status.needsReset == 0,
                  index >= 0, index < state.queues.count else { return nil }
            return state.queues[index].queue
        }
    }

    public func withQueue(_ index: Int, _ body: (VirtQueue, GuestMemory) throws(VirtioError) -> Bool) -> Bool {
        guard index >= 0, index < queueCount else { return false }
        return withWork(of: index) {
            guard let queue = workingQueue(index) else { return false }
            do throws(VirtioError) {
                guard try body(queue, memory) else { return false }
                state.withLock { interruptIfAsked(queue, state: &$0) }
                return true
            } catch {
                state.withLock { fail(error, state: &$0) }
                return false
            }
        }
    }

    /// New used entries: the used-buffer interrupt, unless EVENT_IDX says the driver has not asked.
    private func interruptIfAsked(_ queue: VirtQueue, state: inout State) {
        if queue.needsInterrupt() {
            interruptsRaised.add(1, ordering: .relaxed)
            raise(0x1, state: &state)
        } else {
            interruptsSuppressed.add(1, ordering: .relaxed)
        }
    }

    /// A back end in another process used buffers (it signalled the queue's call eventfd, having
    /// decided itself whether the driver asked to hear of it): the used-buffer interrupt.
    public func signalUsedBuffers() {
        state.withLock { state in
            guard state.status & Status.driverOK != 0, state.status & Status.needsReset == 0 else { return }
            interruptsRaised.add(1, ordering: .relaxed)
            raise(0x1, state: &state)
        }
    }

    /// The driver's QueueNotify for `index`, through an ioeventfd or an MMIO write. Notifications
    /// before DRIVER_OK, for unknown queues or after a failure are ignored.
    public func notify(queue index: Int) {
        guard index >= 0, index < queueCount else { return }
        _ = withQueue(index) { (queue, memory) throws(VirtioError) -> Bool in
            try device.process(queue: index, queue, memory: memory)
        }
    }

    public var queueCount: Int { device.queueMaximumSizes.count }

    public func notifyConfigurationChange() {
        state.withLock { state in
            state.configurationGeneration &+= 1
            guard state.status & Status.driverOK != 0, !state.quiesced else { return }
            raise(0x2, state: &state)
        }
    }

    /// The device stops using its queues until the driver resets it, and tells the driver so.
    private func fail(_ error: VirtioError, state: inout State) {
        state.lastError = error
        state.status |= Status.needsReset
        raise(0x2, state: &state)
    }

    // MARK: saved state

    /// Stops queue work: once this returns no thread is inside the device's queue work (it runs
    /// under the work locks this takes) and none starts until `resumeWork()`.
    public func quiesce() { withAllWork { state.withLock { $0.quiesced = true } } }

    /// Ends `quiesce()`: every ready queue is processed once, as if notified, so work that arrived
    /// meanwhile (a notification, a received frame) is not left waiting. Spurious notifications
    /// are harmless to virtio devices.
    public func resumeWork() {
        let ready = state.withLock { state in
            state.quiesced = false
            return state.queues.indices.filter { state.queues[$0].ready }
        }
        for index in ready { notify(queue: index) }
    }

    /// The transport's registers, each queue's addresses and indices, then the device's own state.
    public struct Saved: Codable, Sendable, Equatable {
        public struct Queue: Codable, Sendable, Equatable {
            public var size: UInt16
            public var ready: Bool
            public var descriptor, driver, device: UInt64
            public var nextAvailable, nextUsed: UInt16
        }
        public var deviceType: UInt32
        public var status, deviceFeaturesSelect, driverFeaturesSelect: UInt32
        public var driverFeatures: UInt64
        public var queueSelect, interruptStatus, configurationGeneration: UInt32
        public var queues: [Queue]
        /// The device's own record (`VirtioDevice.savedDeviceRecord`).
        public var device: [UInt8]
    }

    /// The transport's state with the device's own record. Throws only if the device's record
    /// cannot be written.
    public func savedRecord() throws(StateError) -> [UInt8] {
        let own = try state.withLock { (_) throws(StateError) -> [UInt8] in try device.savedDeviceRecord() }
        var saved = captureState()
        saved.device = own
        return try BinaryRecord.encode(saved)
    }

    public func captureState() -> Saved {
        state.withLock { state in
            Saved(deviceType: device.deviceType, status: state.status, deviceFeaturesSelect: state.deviceFeaturesSelect,
                  driverFeaturesSelect: state.driverFeaturesSelect, driverFeatures: state.driverFeatures, queueSelect: state.queueSelect,
                  interruptStatus: state.interruptStatus, configurationGeneration: state.configurationGeneration,
                  queues: state.queues.map { queue in
                      let indices = queue.queue?.indices ?? (nextAvailable: 0, nextUsed: 0)
                      return Saved.Queue(size: queue.size, ready: queue.ready, descriptor: queue.descriptor, driver: queue.driver,
                                         device: queue.device, nextAvailable: indices.nextAvailable, nextUsed: indices.nextUsed)
                  }, device: [])
        }
    }

    /// Puts back a captured state, checking it against this device: its type, its queues,
    /// features it offers, rings inside guest RAM. Called before the guest runs.
    public func applyState(_ saved: Saved) throws(StateError) {
        guard saved.deviceType == device.deviceType else {
            throw .invalid(field: "deviceType", reason: "the state is of device type \(saved.deviceType), this slot holds type \(device.deviceType)")
        }
        guard saved.status & ~UInt32(0xff) == 0 else {
            throw .invalid(field: "status", reason: "0x\(String(saved.status, radix: 16)) has bits outside the status byte")
        }
        guard saved.interruptStatus & ~UInt32(0x3) == 0 else {
            throw .invalid(field: "interruptStatus", reason: "0x\(String(saved.interruptStatus, radix: 16)) has bits other than used-buffer and configuration")
        }
        let featuresAccepted = saved.status & Status.featuresOK != 0
        if featuresAccepted, saved.driverFeatures & ~offeredFeatures != 0 {
            throw .invalid(field: "driverFeatures", reason: "0x\(String(saved.driverFeatures, radix: 16)) includes features this device does not offer (0x\(String(offeredFeatures, radix: 16)))")
        }
        let maximums = device.queueMaximumSizes
        // A state saved before the device had its present queues (a disk saved before multiqueue)
        // has fewer: the others stay as a driver leaves queues it never set up. More is refused.
        guard saved.queues.count <= maximums.count else {
            throw .invalid(field: "queues", reason: "\(saved.queues.count) queues where this device has \(maximums.count)")
        }
        var restored = State(queues: [])
        restored.status = saved.status
        restored.deviceFeaturesSelect = saved.deviceFeaturesSelect
        restored.driverFeaturesSelect = saved.driverFeaturesSelect
        restored.driverFeatures = saved.driverFeatures
        restored.queueSelect = saved.queueSelect
        restored.interruptStatus = saved.interruptStatus
        restored.configurationGeneration = saved.configurationGeneration
        for (index, entry) in saved.queues.enumerated() {
            var queue = QueueRegisters(size: entry.size)
            queue.ready = entry.ready
            queue.descriptor = entry.descriptor
            queue.driver = entry.driver
            queue.device = entry.device
            if queue.ready {
                do throws(VirtioError) {
                    let ring = try VirtQueue(memory: memory, size: queue.size, maximumSize: maximums[index],
                                             descriptorTable: GuestPhysicalAddress(queue.descriptor),
                                             availableRing: GuestPhysicalAddress(queue.driver), usedRing: GuestPhysicalAddress(queue.device),
                                             usesEventIndex: saved.driverFeatures & VirtioFeature.eventIndex != 0)
                    ring.restoreIndices(nextAvailable: entry.nextAvailable, nextUsed: entry.nextUsed)
                    queue.queue = ring
                } catch {
                    throw .invalid(field: "queues[\(index)]", reason: error.description)
                }
            }
            restored.queues.append(queue)
        }
        for index in restored.queues.count..<maximums.count { restored.queues.append(QueueRegisters(size: maximums[index])) }
        let pendingInterrupt = restored.interruptStatus != 0 && restored.status & Status.driverOK != 0
        try state.withLock { (state) throws(StateError) in
            if featuresAccepted { device.acceptFeatures(restored.driverFeatures) }
            do throws(StateError) {
                try device.restoreDevice(record: saved.device)
            } catch {
                throw .invalid(field: "device", reason: error.description)
            }
            state = restored
            // The interrupt may have been raised after the interrupt controllers were captured;
            // once more is harmless (the driver finds nothing new), never raising could hang it.
            if pendingInterrupt {
                interrupt.setLevel(true)
                interrupt.setLevel(false)
            }
        }
    }

    private func raise(_ reason: UInt32, state: inout State) {
        state.interruptStatus |= reason
        interrupt.setLevel(true)
        interrupt.setLevel(false)   // ISA lines are edge-triggered: a pulse is one interrupt
    }
}

extension UInt64 {
    mutating func setLow(_ value: UInt32) { self = (self & 0xffff_ffff_0000_0000) | UInt64(value) }
    mutating func setHigh(_ value: UInt32) { self = (self & 0xffff_ffff) | (UInt64(value) << 32) }
}
