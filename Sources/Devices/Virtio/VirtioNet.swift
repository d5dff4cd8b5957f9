import CHostSupport
import GuestMemory
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A MAC address, six bytes.
public struct MACAddress: Equatable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]

    /// Parses `52:54:00:12:34:56`; refuses what a card cannot own (MachineRules.mac).
    public init?(_ text: String) {
        guard let bytes = try? MachineRules.mac(text, card: 0) else { return nil }
        self.bytes = bytes
    }

    public init(bytes: [UInt8]) { self.bytes = bytes }

    /// A random unicast, locally administered address (02:xx:xx:xx:xx:xx style).
    public static func random() -> MACAddress { MACAddress(bytes: MachineRules.randomMAC()) }

    public var description: String { MachineRules.macText(bytes) }
}

public enum NetworkBackendError: Error, CustomStringConvertible, Sendable {
    case tap(name: String, errno: Int32)
    /// A queue of a multiqueue tap (a card with `queues=N`) could not be opened.
    case tapQueue(name: String, errno: Int32)
    case descriptor(Int32, reason: String)

    public var description: String {
        switch self {
        case let .tap(name, code):
            var text = "cannot open tap device '\(name)': \(String(cString: strerror(code)))"
            if code == EPERM || code == EACCES {
                text += " (creating a tap needs CAP_NET_ADMIN; or create it first with `ip tuntap add \(name) mode tap user $USER`)"
            } else if code == EBUSY {
                text += " (another process has it open)"
            } else if code == ENAMETOOLONG || code == EINVAL {
                text += " (interface names are at most 15 characters)"
            }
            return text
        case let .tapQueue(name, code):
            var text = "cannot open a queue of tap device '\(name)': \(String(cString: strerror(code)))"
            if code == EINVAL {
                text += " (queues=N needs a multiqueue tap: one that does not exist yet, or one made with `ip tuntap add \(name) mode tap multi_queue`)"
            } else if code == EPERM || code == EACCES {
                text += " (creating a tap needs CAP_NET_ADMIN)"
            }
            return text
        case let .descriptor(fd, reason):
            return "descriptor \(fd): \(reason)"
        }
    }
}

/// Where a card's Ethernet frames go and come from. `receive` never blocks: it returns 0 when no
/// whole frame is there yet; the receive thread polls `fd` (and asks `hasBufferedFrame` first,
/// since a stream may hold more frames than poll can tell).
public protocol FrameBackend: AnyObject, Sendable {
    /// For messages and counters: a tap's name, or what the stream is.
    var name: String { get }
    var fd: Int32 { get }
    /// False once the other end is gone for good (a stream's peer closed it).
    var isConnected: Bool { get }
    var hasBufferedFrame: Bool { get }
    /// Sends one whole frame; false if it was refused or dropped.
    func send(_ frame: UnsafeRawBufferPointer) -> Bool
    /// Copies the next whole frame into `buffer` and returns its length, or 0.
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int
    /// Whether every frame sent and received starts with the 12-byte virtio-net header (a tap
    /// with IFF_VNET_HDR): then checksum and segmentation offloads can pass through.
    var carriesVirtioHeader: Bool { get }
    /// What the host may hand the guest (the guest's GUEST_* features); only with the header.
    func setOffloads(checksum: Bool, tso4: Bool, tso6: Bool, ecn: Bool)
    /// A queue of a multiqueue tap: whether the kernel may steer frames to it (the driver's
    /// active queue pairs). Other backends have one queue, always on. Returns 0 or the errno.
    func setQueueEnabled(_ enabled: Bool) -> Int32
}

extension FrameBackend {
    public var carriesVirtioHeader: Bool { false }
    public func setOffloads(checksum: Bool, tso4: Bool, tso6: Bool, ecn: Bool) {}
    public func setQueueEnabled(_ enabled: Bool) -> Int32 { 0 }
}

/// A host tap device: Ethernet frames in and out, without packet-information headers.
public final class TapDevice: FrameBackend {
    public let name: String
    public let fd: Int32
    public let carriesVirtioHeader: Bool

    /// Whether this is one queue of a multiqueue tap (IFF_MULTI_QUEUE).
    public let isQueue: Bool

    /// `queue`: open one queue of a multiqueue tap (a card with several queue pairs opens the
    /// tap once per pair); the tap must have been made multiqueue, or not exist yet.
    public init(name: String, queue: Bool = false) throws(NetworkBackendError) {
        let result = queue ? vireo_tap_open_queue(name) : vireo_tap_open(name)
        guard result >= 0 else { throw queue ? .tapQueue(name: name, errno: -result) : .tap(name: name, errno: -result) }
        self.name = name
        fd = result
        carriesVirtioHeader = true
        isQueue = queue
    }

    /// A tap another process opened and handed over (Vireo's manager makes a VM's taps, plugs
    /// them into bridges and passes the descriptors, so a tap lives exactly as long as its VM).
    public init(descriptor: Int32) throws(NetworkBackendError) {
        var buffer = [CChar](repeating: 0, count: 32)
        let result = vireo_tap_name(descriptor, &buffer, Int32(buffer.count))
        guard result == 0 else {
            throw .descriptor(descriptor, reason: "not an open tap device (\(String(cString: strerror(-result))))")
        }
        name = String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // Vireo's manager opens taps with the header; one opened without keeps plain frames.
        let header = vireo_tap_has_vnet_header(descriptor)
        guard header >= 0 else { throw .descriptor(descriptor, reason: "cannot size its virtio-net header (\(String(cString: strerror(-header))))") }
        carriesVirtioHeader = header == 1
        _ = fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) | O_NONBLOCK)
        _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC)
        fd = descriptor
        // A library card with several pairs inherits each queue of its multiqueue tap.
        isQueue = vireo_tap_is_multiqueue(descriptor) == 1
    }

    deinit { close(fd) }

    public var isConnected: Bool { true }
    public var hasBufferedFrame: Bool { false }
    public func send(_ frame: UnsafeRawBufferPointer) -> Bool { write(fd, frame.baseAddress, frame.count) == frame.count }
    public func setOffloads(checksum: Bool, tso4: Bool, tso6: Bool, ecn: Bool) {
        guard carriesVirtioHeader else { return }
        _ = vireo_tap_set_offloads(fd, checksum ? 1 : 0, tso4 ? 1 : 0, tso6 ? 1 : 0, ecn ? 1 : 0)
    }
    public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int { max(0, read(fd, buffer.baseAddress, buffer.count)) }
    public func setQueueEnabled(_ enabled: Bool) -> Int32 {
        guard isQueue else { return 0 }
        return -vireo_tap_set_queue_enabled(fd, enabled ? 1 : 0)
    }
}

/// Frames on a stream socket, each preceded by its length as 4 big-endian bytes: what passt
/// speaks and QEMU's `-netdev stream` carries. The peer is not trusted: a length above the
/// largest frame ends the stream (it cannot be resynchronised), never a read out of bounds.
public final class StreamFrameBackend: FrameBackend, @unchecked Sendable {
    public let name: String
    public let fd: Int32
    /// Whole frames are written under this lock, so two vCPUs' frames never interleave.
    private let sending = Mutex<Void>(())
    // Receive state: touched only by whoever holds the card's receive turn (one at a time).
    private var pending: [UInt8]
    private var start = 0, end = 0
    private let connected = Atomic<Bool>(true)
    public let maximumFrame: Int

    public init(descriptor: Int32, name: String, maximumFrame: Int = 65536) throws(NetworkBackendError) {
        var type: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(descriptor, SOL_SOCKET, SO_TYPE, &type, &length) == 0, type == Int32(SOCK_STREAM.rawValue) else {
            throw .descriptor(descriptor, reason: "not a stream socket")
        }
        _ = fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) | O_NONBLOCK)
        _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC)
        fd = descriptor
        self.name = name
        self.maximumFrame = maximumFrame
        pending = [UInt8](repeating: 0, count: 4 * (maximumFrame + 4))
    }

    deinit { close(fd) }

    public var isConnected: Bool { connected.load(ordering: .relaxed) }

    public var hasBufferedFrame: Bool {
        guard end - start >= 4 else { return false }
        return end - start >= 4 + frameLength(at: start)
    }

    private func frameLength(at offset: Int) -> Int {
        Int(pending[offset]) << 24 | Int(pending[offset + 1]) << 16 | Int(pending[offset + 2]) << 8 | Int(pending[offset + 3])
    }

    public func send(_ frame: UnsafeRawBufferPointer) -> Bool {
        guard isConnected, frame.count <= maximumFrame else { return false }
        var header = UInt32(frame.count).bigEndian
        return sending.withLock { _ in
            withUnsafeBytes(of: &header) { head in
                var parts = [iovec(iov_base: UnsafeMutableRawPointer(mutating: head.baseAddress), iov_len: 4),
                             iovec(iov_base: UnsafeMutableRawPointer(mutating: frame.baseAddress), iov_len: frame.count)]
                var remaining = 4 + frame.count
                var first = true
                while remaining > 0 {
                    let sent = parts.withUnsafeMutableBufferPointer { writev(fd, $0.baseAddress, Int32($0.count)) }
                    if sent < 0 {
                        if errno == EINTR { continue }
                        // Nothing of this frame went out yet: drop it, as a full tap would.
                        if errno == EAGAIN && first { return false }
                        if errno == EAGAIN {
                            // Part of it went: the rest must follow or the stream is torn.
                            var wait = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                            _ = poll(&wait, 1, 1000)
                            continue
                        }
                        connected.store(false, ordering: .relaxed)
                        return false
                    }
                    first = false
                    remaining -= sent
                    var advance = sent
                    for index in parts.indices where advance > 0 {
                        let take = min(advance, parts[index].iov_len)
                        parts[index].iov_base = parts[index].iov_base.map { $0 + take }
                        parts[index].iov_len -= take
                        advance -= take
                    }
                }
                return true
            }
        }
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int {
        if !hasBufferedFrame && isConnected {
            if start > 0 && (pending.count - end) < maximumFrame + 4 {
                // Move what is left to the front to make room.
                pending.withUnsafeMutableBytes { bytes in
                    if end > start, let base = bytes.baseAddress { memmove(base, base + start, end - start) }
                }
                end -= start
                start = 0
            }
            let space = pending.count - end
            let count = space == 0 ? -1 : pending.withUnsafeMutableBytes { recv(fd, $0.baseAddress.map { $0 + end }, space, Int32(MSG_DONTWAIT)) }
            if space > 0 && (count == 0 || (count < 0 && errno != EAGAIN && errno != EINTR)) {
                connected.store(false, ordering: .relaxed)
            } else if count > 0 {
                end += count
            }
        }
        guard end - start >= 4 else { return 0 }
        let length = frameLength(at: start)
        guard length <= maximumFrame, length <= buffer.count else {
            // A peer that sends an impossible length has lost the framing; nothing after it can
            // be trusted.
            connected.store(false, ordering: .relaxed)
            start = 0; end = 0
            return 0
        }
        guard end - start >= 4 + length else { return 0 }
        pending.withUnsafeBytes { bytes in
            if let base = bytes.baseAddress, let target = buffer.baseAddress { memcpy(target, base + start + 4, length) }
        }
        start += 4 + length
        if start == end { start = 0; end = 0 }
        return length
    }
}

/// virtio-net (virtio 1.x §5.1) on a tap or a frame stream: one receive and one transmit queue.
/// On a tap with virtio-net headers the guest's checksum and segmentation offloads pass straight
/// through (the header goes to the tap as the guest wrote it, and comes from the tap as the
/// kernel wrote it), so a TCP stream moves in frames of up to 64 KiB; mergeable receive buffers
/// spread such a frame over as many of the guest's buffers as it needs.
/// Transmit runs on the notifying vCPU; receive runs on a thread of its own (`runBackground`).
/// With several backends (the queues of a multiqueue tap) it offers VIRTIO_NET_F_MQ and a control
/// queue: queue pair k (receive 2k, transmit 2k+1) carries tap queue k's frames; the driver says
/// how many pairs it uses (VQ_PAIRS_SET, first pair only until then) and the tap's other queues
/// are detached, so the kernel steers no frame to a queue nobody reads.
public final class VirtioNet: VirtioDevice, BackgroundDevice, @unchecked Sendable {
    public static let queueSize: UInt16 = 256
    static let controlQueueSize: UInt16 = 64
    static let headerLength = 12
    /// Largest frame either way: a 64 KiB TCP segment with its Ethernet, IP and TCP headers.
    static let maximumFrame = 65536 + 14 + 60 + 60
    /// Frames delivered per receive interrupt at most: batching without starving transmit.
    static let receiveBatch = 64

    enum Feature {
        static let checksum: UInt64 = 1 << 0
        static let guestChecksum: UInt64 = 1 << 1
        static let mac: UInt64 = 1 << 5
        static let guestTSO4: UInt64 = 1 << 7
        static let guestTSO6: UInt64 = 1 << 8
        static let guestECN: UInt64 = 1 << 9
        static let hostTSO4: UInt64 = 1 << 11
        static let hostTSO6: UInt64 = 1 << 12
        static let hostECN: UInt64 = 1 << 13
        static let mergeableReceiveBuffers: UInt64 = 1 << 15
        static let status: UInt64 = 1 << 16
        static let controlQueue: UInt64 = 1 << 17
        static let multiqueue: UInt64 = 1 << 22
        static let offloads: UInt64 = checksum | guestChecksum | guestTSO4 | guestTSO6 | guestECN | hostTSO4 | hostTSO6 | hostECN
    }
    /// Control queue commands (virtio 1.x §5.1.6.5): class MQ, command VQ_PAIRS_SET; acks.
    enum Control {
        static let multiqueueClass: UInt8 = 4
        static let setQueuePairs: UInt8 = 0
        static let ok: UInt8 = 0
        static let error: UInt8 = 1
    }

    /// One queue pair's host side: its backend and the frame held for its receive queue.
    final class QueuePair: @unchecked Sendable {
        let backend: any FrameBackend
        let slot = ReceiveSlot()
        let receiving = Atomic<Bool>(false)
        /// Whether a frame is held (slot.pending > 0), readable without the turn: the receive
        /// thread decides what to wait for even while a vCPU has the turn.
        let holding = Atomic<Bool>(false)
        /// Whether the backend's tap queue is attached (every queue is, once opened): the kernel
        /// refuses to attach an attached queue or detach a detached one.
        let enabled = Atomic<Bool>(true)
        init(backend: any FrameBackend) { self.backend = backend }

        /// Sets the held frame's length (holding the turn).
        func setPending(_ length: Int) {
            slot.pending = length
            holding.store(length > 0, ordering: .releasing)
        }

        /// A try-lock, never a wait: the vCPU side holds the queue's work lock when it asks, and
        /// the receive thread takes that lock while it holds the turn.
        func takeReceiveTurn() -> Bool {
            receiving.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged
        }
        func endReceiveTurn() { receiving.store(false, ordering: .releasing) }
    }

    /// The first pair's backend: the card's tap or stream, for names and counters.
    public var backend: any FrameBackend { pairs[0].backend }
    let pairs: [QueuePair]
    /// Queue pairs the card offers (its backends).
    public var queuePairs: Int { pairs.count }
    public let mac: MACAddress
    /// Offloads offered (only where the backend carries headers, and unless turned off).
    public let offloadsOffered: Bool
    private let wake: Int32
    private let stopping = Atomic<Bool>(false)
    private let access = VirtioQueueAccessLink()
    /// What the driver accepted; 0 until FEATURES_OK and after a reset.
    private let negotiated = Atomic<UInt64>(0)
    /// Queue pairs in use: 1 until the driver's VQ_PAIRS_SET.
    private let activePairs = Atomic<Int>(1)
    /// The most pairs a driver has asked for (VQ_PAIRS_SET), for the VMM log.
    public let largestPairsSet = Atomic<Int>(0)
    /// Tap queues the kernel refused to attach or detach, and the last errno, for the VMM log.
    public let queueSwitchFailures = Atomic<UInt64>(0)
    public let lastQueueSwitchError = Atomic<Int32>(0)

    public let receivedFrames = Atomic<UInt64>(0)
    public let receivedBytes = Atomic<UInt64>(0)
    public let transmittedFrames = Atomic<UInt64>(0)
    public let transmittedBytes = Atomic<UInt64>(0)
    /// Frames that could not be delivered (guest buffers too small, host tap refused them).
    public let droppedFrames = Atomic<UInt64>(0)

    /// Each direction has its own buckets with the same limits (shared by every queue pair).
    public let receiveLimiter: RateLimiter?
    public let transmitLimiter: RateLimiter?
    /// When throttled transmission may go on; the receive thread does it.
    private let transmitRetry = Mutex<UInt64?>(nil)

    public convenience init(backend: any FrameBackend, mac: MACAddress, rateLimit: RateLimit = RateLimit(), offloads: Bool = true) throws(NetworkBackendError) {
        try self.init(backends: [backend], mac: mac, rateLimit: rateLimit, offloads: offloads)
    }

    /// `backends`: one per queue pair (the queues of one multiqueue tap), at least one.
    public init(backends: [any FrameBackend], mac: MACAddress, rateLimit: RateLimit = RateLimit(), offloads: Bool = true) throws(NetworkBackendError) {
        guard let first = backends.first else { throw .descriptor(-1, reason: "a card needs a backend") }
        pairs = backends.map { QueuePair(backend: $0) }
        self.mac = mac
        offloadsOffered = offloads && backends.allSatisfy(\.carriesVirtioHeader)
        receiveLimiter = rateLimit.isUnlimited ? nil : RateLimiter(rateLimit)
        transmitLimiter = rateLimit.isUnlimited ? nil : RateLimiter(rateLimit)
        wake = vireo_eventfd_nonblocking()
        guard wake >= 0 else { throw .tap(name: first.name, errno: errno) }
        enablePairs(1)
    }

    deinit { close(wake) }

    public var deviceType: UInt32 { 1 }
    public var deviceFeatures: UInt64 {
        VirtioFeature.version1 | Feature.mac | Feature.status | Feature.mergeableReceiveBuffers | (offloadsOffered ? Feature.offloads : 0)
            | (pairs.count > 1 ? Feature.multiqueue | Feature.controlQueue : 0)
    }
    public var queueMaximumSizes: [UInt16] {
        Array(repeating: Self.queueSize, count: 2 * pairs.count) + (pairs.count > 1 ? [Self.controlQueueSize] : [])
    }
    /// The control queue's index: after every pair's two.
    var controlQueueIndex: Int { 2 * pairs.count }

    public func attach(_ access: any VirtioQueueAccess) { self.access.attach(access) }

    public func acceptFeatures(_ features: UInt64) {
        negotiated.store(features, ordering: .releasing)
        // What the host may now send the guest: partial checksums, big TCP segments.
        for pair in pairs {
            pair.backend.setOffloads(checksum: features & Feature.guestChecksum != 0, tso4: features & Feature.guestTSO4 != 0,
                                     tso6: features & Feature.guestTSO6 != 0, ecn: features & Feature.guestECN != 0)
        }
    }

    public func reset() {
        negotiated.store(0, ordering: .releasing)
        for pair in pairs { pair.backend.setOffloads(checksum: false, tso4: false, tso6: false, ecn: false) }
        enablePairs(1)
    }

    /// The features the driver accepted (for tests and `vireo info`).
    public var negotiatedFeatures: UInt64 { negotiated.load(ordering: .acquiring) }
    /// Queue pairs the driver uses now.
    public var queuePairsInUse: Int { activePairs.load(ordering: .acquiring) }

    /// A multiqueue card's state is the pairs its driver uses (2 bytes, little-endian); a card
    /// with one pair keeps none, as before multiqueue.
    public func savedDeviceRecord() throws(StateError) -> [UInt8] {
        guard pairs.count > 1 else { return [] }
        let count = activePairs.load(ordering: .acquiring)
        return [UInt8(truncatingIfNeeded: count), UInt8(truncatingIfNeeded: count >> 8)]
    }

    public func restoreDevice(record: [UInt8]) throws(StateError) {
        guard !record.isEmpty else { return enablePairs(1) }
        guard record.count == 2 else { throw .invalid(field: "queuePairs", reason: "\(record.count) bytes where 2 are expected") }
        let count = Int(record[0]) | Int(record[1]) << 8
        guard count >= 1, count <= pairs.count else {
            throw .invalid(field: "queuePairs", reason: "\(count) pairs in use on a card with \(pairs.count)")
        }
        enablePairs(count)
    }

    /// Uses the first `count` pairs: their tap queues attached, the others detached.
    private func enablePairs(_ count: Int) {
        activePairs.store(count, ordering: .releasing)
        for (index, pair) in pairs.enumerated() where pair.enabled.load(ordering: .acquiring) != (index < count) {
            pair.enabled.store(index < count, ordering: .releasing)
            let error = pair.backend.setQueueEnabled(index < count)
            if error != 0 {
                queueSwitchFailures.add(1, ordering: .relaxed)
                lastQueueSwitchError.store(error, ordering: .relaxed)
            }
        }
        signalWake()
    }

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        // mac[6], status u16 (link up), max_virtqueue_pairs u16.
        let space = mac.bytes + [1, 0, UInt8(truncatingIfNeeded: pairs.count), UInt8(truncatingIfNeeded: pairs.count >> 8)]
        for index in data.indices {
            let position = offset + index
            data[index] = position >= 0 && position < space.count ? space[position] : 0
        }
    }

    public func process(queue index: Int, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        if pairs.count > 1, index == controlQueueIndex { return try control(queue, memory: memory) }
        guard index >= 0, index < 2 * pairs.count else { return false }
        let pair = pairs[index / 2]
        return index % 2 == 0 ? try receiveOnNotify(pair, queue, memory: memory) : try transmit(pair, queue, memory: memory)
    }

    /// The control queue: VQ_PAIRS_SET is the one command a driver may send with the features
    /// offered; anything else is answered VIRTIO_NET_ERR.
    private func control(_ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        var used = false
        while let chain = try queue.popChain() {
            // class u8, command u8, then the command's data (VQ_PAIRS_SET: u16 pairs).
            let request = try memory.gather(chain.readable, limit: 64)
            guard let ack = chain.writable.first, ack.length >= 1 else { throw .malformedRequest("a control request needs a device-writable ack byte") }
            var answer = Control.error
            if request.count == 4, request[0] == Control.multiqueueClass, request[1] == Control.setQueuePairs {
                let count = Int(request[2]) | Int(request[3]) << 8
                if count >= 1, count <= pairs.count {
                    enablePairs(count)
                    largestPairsSet.store(max(largestPairsSet.load(ordering: .relaxed), count), ordering: .relaxed)
                    answer = Control.ok
                }
            }
            _ = try memory.scatter([answer][...], into: [ack])
            try queue.pushUsed(head: chain.head, written: 1)
            used = true
        }
        return used
    }

    private func transmit(_ pair: QueuePair, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        var used = false
        let backend = pair.backend
        let withHeader = backend.carriesVirtioHeader
        while true {
            if let transmitLimiter {
                let wait = transmitLimiter.delay()
                if wait > 0 {
                    let due = RateLimiter.now() + wait
                    transmitRetry.withLock { $0 = min($0 ?? due, due) }
                    signalWake()
                    break
                }
            }
            guard let chain = try queue.popChain() else { break }
            let bytes = try memory.gather(chain.readable, limit: Self.headerLength + Self.maximumFrame)
            transmitLimiter?.consume(bytes: UInt64(max(0, bytes.count - Self.headerLength)))
            if bytes.count > Self.headerLength + 14 {
                let frameLength = bytes.count - Self.headerLength
                // A tap with headers takes the guest's header (checksum and segmentation
                // requests) with the frame; anything else gets the bare frame.
                let sent = bytes.withUnsafeBytes { buffer in
                    backend.send(withHeader ? UnsafeRawBufferPointer(buffer) : UnsafeRawBufferPointer(rebasing: buffer[Self.headerLength...]))
                }
                if sent {
                    transmittedFrames.add(1, ordering: .relaxed)
                    transmittedBytes.add(UInt64(frameLength), ordering: .relaxed)
                } else {
                    droppedFrames.add(1, ordering: .relaxed)
                }
            } else {
                droppedFrames.add(1, ordering: .relaxed)
            }
            try queue.pushUsed(head: chain.head, written: 0)
            used = true
        }
        return used
    }

    private func signalWake() {
        var one: UInt64 = 1
        _ = write(wake, &one, 8)
    }

    public var needsBackgroundThread: Bool { true }

    /// Ends `runBackground`.
    public func stopBackground() {
        stopping.store(true, ordering: .releasing)
        signalWake()
    }

    /// Reads the next frame from the pair's backend into `frame` (its header first: the tap's
    /// own, or a zeroed one) and returns the whole length, or 0 if none is there.
    private func readFrame(_ pair: QueuePair, into frame: inout [UInt8]) -> Int {
        let backend = pair.backend
        let withHeader = backend.carriesVirtioHeader
        let count = frame.withUnsafeMutableBytes { buffer in
            backend.receive(into: withHeader ? buffer : UnsafeMutableRawBufferPointer(rebasing: buffer[Self.headerLength...]))
        }
        if withHeader { return count > Self.headerLength ? count : 0 }
        guard count > 0 else { return 0 }
        for index in 0..<Self.headerLength { frame[index] = 0 }
        return Self.headerLength + count
    }

    /// The frame held for the guest and how long it is. Whoever holds the pair's receive turn
    /// owns it: the receive thread, or a vCPU whose notification brought new receive buffers.
    final class ReceiveSlot: @unchecked Sendable {
        var frame = [UInt8](repeating: 0, count: VirtioNet.headerLength + VirtioNet.maximumFrame)
        var pending = 0
    }

    /// New receive buffers from the driver (on the notifying vCPU, the queue's work lock held):
    /// the frame the receive thread holds goes in now, with whatever else the backend has,
    /// instead of waiting for that thread to wake (QEMU flushes its queue the same way).
    private func receiveOnNotify(_ pair: QueuePair, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        guard receiveLimiter == nil, pair.takeReceiveTurn() else {
            signalWake()
            return false
        }
        defer { pair.endReceiveTurn() }
        guard pair.slot.pending > 0 else {
            // The receive thread may have looked while this turn was taken and missed frames a
            // stream already holds.
            if pair.backend.hasBufferedFrame { signalWake() }
            return false
        }
        let delivered = try deliverBatch(pair, queue, memory: memory)
        // The receive thread sleeps without watching the backend while it holds a frame.
        if pair.slot.pending == 0 { signalWake() }
        return delivered
    }

    /// Delivers the held frame and then, while the guest has room and the backend has frames,
    /// up to `receiveBatch` more; true if any buffer was used. Called holding the pair's turn.
    private func deliverBatch(_ pair: QueuePair, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        var progressed = false
        let slot = pair.slot
        for _ in 0..<Self.receiveBatch {
            let length = slot.pending
            switch try deliver(&slot.frame, length: length, queue: queue, memory: memory) {
            case .delivered:
                receiveLimiter?.consume(bytes: UInt64(length - Self.headerLength))
                receivedFrames.add(1, ordering: .relaxed)
                receivedBytes.add(UInt64(length - Self.headerLength), ordering: .relaxed)
            case .dropped:
                droppedFrames.add(1, ordering: .relaxed)
            case .noBuffer:
                return progressed
            }
            progressed = true
            pair.setPending(0)
            // Throttled cards take one frame per turn, so the limiter sees each.
            guard receiveLimiter == nil else { break }
            pair.setPending(readFrame(pair, into: &slot.frame))
            if slot.pending == 0 { break }
        }
        return progressed
    }

    /// Moves frames from the backends into the guest's receive buffers until `stopBackground()`.
    /// Holds one frame per pair while the guest has no buffer for it and reads no more from that
    /// backend meanwhile, so the tap's own queue absorbs bursts (and drops, as a full NIC would).
    /// Frames already waiting are delivered together, with one interrupt. One thread serves every
    /// pair in use (frames of a pair not in use stay on its backend).
    /// Also resumes throttled transmission when its time comes.
    public func runBackground() {
        var receiveDue: UInt64?
        // Kept across wake-ups: the receive path allocates nothing per frame batch.
        var buffered = [Bool](repeating: false, count: pairs.count)
        var descriptors = [pollfd](repeating: pollfd(fd: -1, events: Int16(POLLIN), revents: 0), count: pairs.count + 1)
        while !stopping.load(ordering: .acquiring) {
            let now = RateLimiter.now()
            let inUse = min(max(activePairs.load(ordering: .acquiring), 1), pairs.count)
            if let due = transmitRetry.withLock({ $0 }), due <= now {
                transmitRetry.withLock { $0 = nil }
                for index in 0..<inUse {
                    let pair = pairs[index]
                    _ = access.current?.withQueue(2 * index + 1) { (queue, memory) throws(VirtioError) -> Bool in
                        try self.transmit(pair, queue, memory: memory)
                    }
                }
                continue
            }
            let retry = transmitRetry.withLock { $0 }
            let deadline = retry.map { due in receiveDue.map { min($0, due) } ?? due } ?? receiveDue
            let timeout = deadline.map { Int32(min(($0 > now ? $0 - now : 0) / 1_000_000 + 1, 60_000)) } ?? -1
            descriptors[0] = pollfd(fd: wake, events: Int16(POLLIN), revents: 0)
            var anyBuffered = false
            for index in 0..<inUse {
                let pair = pairs[index]
                buffered[index] = false
                if pair.takeReceiveTurn() {
                    buffered[index] = pair.slot.pending == 0 && pair.backend.hasBufferedFrame
                    pair.endReceiveTurn()
                }
                // A vCPU may hold the turn for a moment: the backend is watched all the same
                // whenever no frame is held, so a frame arriving meanwhile is not left waiting.
                let watch = !pair.holding.load(ordering: .acquiring) && !buffered[index] && pair.backend.isConnected
                descriptors[index + 1] = pollfd(fd: watch ? pair.backend.fd : -1, events: Int16(POLLIN), revents: 0)
                anyBuffered = anyBuffered || buffered[index]
            }
            if poll(&descriptors, nfds_t(inUse + 1), anyBuffered ? 0 : timeout) < 0 { if errno == EINTR { continue }; return }
            if descriptors[0].revents != 0 {
                var value: UInt64 = 0
                _ = read(wake, &value, 8)
            }
            for index in 0..<inUse {
                let pair = pairs[index]
                guard pair.takeReceiveTurn() else { continue }
                defer { pair.endReceiveTurn() }
                if pair.slot.pending == 0 && (buffered[index] || descriptors[index + 1].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0) {
                    pair.setPending(readFrame(pair, into: &pair.slot.frame))
                }
                if pair.slot.pending > 0, let receiveLimiter {
                    let wait = receiveLimiter.delay()
                    if wait > 0 {
                        receiveDue = RateLimiter.now() + wait
                        continue
                    }
                    receiveDue = nil
                }
                if pair.slot.pending > 0 {
                    _ = access.current?.withQueue(2 * index) { (queue, memory) throws(VirtioError) -> Bool in
                        try self.deliverBatch(pair, queue, memory: memory)
                    }
                }
            }
        }
    }

    enum Delivery { case delivered, dropped, noBuffer }

    /// Puts one frame (header included) into the guest's receive buffers: with mergeable buffers
    /// as many chains as it needs (their count in the header's num_buffers), otherwise one chain
    /// big enough for it. A frame too big for what the guest can ever offer is dropped.
    func deliver(_ frame: inout [UInt8], length: Int, queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Delivery {
        let mergeable = negotiated.load(ordering: .acquiring) & Feature.mergeableReceiveBuffers != 0
        var chains: [(chain: DescriptorChain, capacity: Int)] = []
        var capacity = 0
        repeat {
            guard let chain = try queue.popChain() else {
                queue.unpop(chains.count)
                return .noBuffer
            }
            guard chain.readable.isEmpty else { throw .malformedRequest("a receive buffer must be device-writable") }
            let room = chain.writable.reduce(0) { $0 + Int($1.length) }
            chains.append((chain, room))
            capacity += room
        } while mergeable && capacity < length && chains.count < Int(queue.size)
        guard capacity >= length, chains[0].capacity >= Self.headerLength else {
            try queue.pushUsed(chains.map { ($0.chain.head, UInt32(0)) })
            return .dropped
        }
        frame[10] = UInt8(chains.count & 0xff)     // num_buffers, little-endian
        frame[11] = UInt8(chains.count >> 8)
        var used: [(head: UInt16, written: UInt32)] = []
        var offset = 0
        for (chain, room) in chains {
            let take = min(room, length - offset)
            let written = try memory.scatter(frame[offset..<(offset + take)], into: chain.writable)
            used.append((chain.head, written))
            offset += take
        }
        try queue.pushUsed(used)
        return .delivered
    }
}
