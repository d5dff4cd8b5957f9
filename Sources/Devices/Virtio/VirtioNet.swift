import CHostSupport
import GuestMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A MAC address, six bytes.
public struct MACAddress: Equatable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]

    /// Parses `52:54:00:12:34:56`; refuses multicast addresses (a NIC cannot have one).
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for part in parts {
            guard part.count == 2, let byte = UInt8(part, radix: 16) else { return nil }
            bytes.append(byte)
        }
        guard bytes[0] & 1 == 0 else { return nil }
        self.bytes = bytes
    }

    public init(bytes: [UInt8]) { self.bytes = bytes }

    /// A random unicast, locally administered address (02:xx:xx:xx:xx:xx style).
    public static func random() -> MACAddress {
        var generator = SystemRandomNumberGenerator()
        var bytes = (0..<6).map { _ in UInt8.random(in: 0...255, using: &generator) }
        bytes[0] = (bytes[0] & 0xfc) | 0x02
        return MACAddress(bytes: bytes)
    }

    public var description: String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }
}

public enum NetworkBackendError: Error, CustomStringConvertible, Sendable {
    case tap(name: String, errno: Int32)

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
        }
    }
}

/// A host tap device: Ethernet frames in and out, without packet-information headers.
public final class TapDevice: Sendable {
    public let name: String
    public let fd: Int32

    public init(name: String) throws(NetworkBackendError) {
        let result = vireo_tap_open(name)
        guard result >= 0 else { throw .tap(name: name, errno: -result) }
        self.name = name
        fd = result
    }

    deinit { close(fd) }
}

/// virtio-net (virtio 1.x §5.1) on a tap device: one receive and one transmit queue, no
/// offloads, so every frame is at most 1514 bytes plus the 12-byte virtio-net header.
/// Transmit runs on the notifying vCPU; receive runs on a thread of its own (`runReceiveLoop`).
public final class VirtioNet: VirtioDevice, BackgroundDevice, @unchecked Sendable {
    public static let queueSize: UInt16 = 256
    static let headerLength = 12
    /// Largest frame accepted either way: 64 KiB is what a tap can hand over.
    static let maximumFrame = 65536

    enum Feature {
        static let mac: UInt64 = 1 << 5
        static let status: UInt64 = 1 << 16
    }

    public let tap: TapDevice
    public let mac: MACAddress
    private let wake: Int32
    private let stopping = Atomic<Bool>(false)
    private let access = Mutex<(any VirtioQueueAccess)?>(nil)

    public let receivedFrames = Atomic<UInt64>(0)
    public let receivedBytes = Atomic<UInt64>(0)
    public let transmittedFrames = Atomic<UInt64>(0)
    public let transmittedBytes = Atomic<UInt64>(0)
    /// Frames that could not be delivered (guest buffers too small, host tap refused them).
    public let droppedFrames = Atomic<UInt64>(0)

    /// Each direction has its own buckets with the same limits.
    public let receiveLimiter: RateLimiter?
    public let transmitLimiter: RateLimiter?
    /// When throttled transmission may go on; the receive thread does it.
    private let transmitRetry = Mutex<UInt64?>(nil)

    public init(tap: TapDevice, mac: MACAddress, rateLimit: RateLimit = RateLimit()) throws(NetworkBackendError) {
        self.tap = tap
        self.mac = mac
        receiveLimiter = rateLimit.isUnlimited ? nil : RateLimiter(rateLimit)
        transmitLimiter = rateLimit.isUnlimited ? nil : RateLimiter(rateLimit)
        wake = vireo_eventfd_nonblocking()
        guard wake >= 0 else { throw .tap(name: tap.name, errno: errno) }
    }

    deinit { close(wake) }

    public var deviceType: UInt32 { 1 }
    public var deviceFeatures: UInt64 { VirtioFeature.version1 | Feature.mac | Feature.status }
    public var queueMaximumSizes: [UInt16] { [Self.queueSize, Self.queueSize] }

    public func attach(_ access: any VirtioQueueAccess) { self.access.withLock { $0 = access } }

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        // mac[6], status u16 (link up), max_virtqueue_pairs u16.
        let space = mac.bytes + [1, 0, 1, 0]
        for index in data.indices {
            let position = offset + index
            data[index] = position >= 0 && position < space.count ? space[position] : 0
        }
    }

    public func process(queue index: Int, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        switch index {
        case 0:
            // New receive buffers: the receive thread may deliver what it holds.
            signalWake()
            return false
        case 1:
            return try transmit(queue, memory: memory)
        default:
            return false
        }
    }

    private func transmit(_ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        var used = false
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
                let written = bytes.withUnsafeBytes { buffer in
                    write(tap.fd, UnsafeRawBufferPointer(rebasing: buffer[Self.headerLength...]).baseAddress, frameLength)
                }
                if written == frameLength {
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

    /// Moves frames from the tap into the guest's receive buffers until `stopReceiving()`. Holds
    /// one frame while the guest has no buffer for it and reads no more meanwhile, so the tap's
    /// own queue absorbs bursts (and drops, as a full NIC would).
    /// Also resumes throttled transmission when its time comes.
    public func runBackground() {
        var frame = [UInt8](repeating: 0, count: Self.headerLength + Self.maximumFrame)
        var pending = 0
        var receiveDue: UInt64?
        while !stopping.load(ordering: .acquiring) {
            let now = RateLimiter.now()
            if let due = transmitRetry.withLock({ $0 }), due <= now {
                transmitRetry.withLock { $0 = nil }
                _ = access.withLock { $0 }?.withQueue(1) { (queue, memory) throws(VirtioError) -> Bool in
                    try self.transmit(queue, memory: memory)
                }
                continue
            }
            let deadlines = [transmitRetry.withLock { $0 }, receiveDue].compactMap { $0 }
            let timeout = deadlines.min().map { Int32(min(($0 > now ? $0 - now : 0) / 1_000_000 + 1, 60_000)) } ?? -1
            var descriptors = [pollfd(fd: wake, events: Int16(POLLIN), revents: 0),
                               pollfd(fd: pending == 0 ? tap.fd : -1, events: Int16(POLLIN), revents: 0)]
            if poll(&descriptors, 2, timeout) < 0 { if errno == EINTR { continue }; return }
            if descriptors[0].revents != 0 {
                var value: UInt64 = 0
                _ = read(wake, &value, 8)
            }
            if pending == 0 && descriptors[1].revents & Int16(POLLIN) != 0 {
                let count = frame.withUnsafeMutableBytes { buffer in
                    read(tap.fd, UnsafeMutableRawBufferPointer(rebasing: buffer[Self.headerLength...]).baseAddress, Self.maximumFrame)
                }
                guard count > 0 else { continue }
                for index in 0..<Self.headerLength { frame[index] = 0 }
                frame[10] = 1    // num_buffers: the whole frame sits in one chain
                pending = Self.headerLength + count
            }
            guard pending > 0 else { continue }
            if let receiveLimiter {
                let wait = receiveLimiter.delay()
                if wait > 0 { receiveDue = RateLimiter.now() + wait; continue }
                receiveDue = nil
            }
            let length = pending
            var outcome = Delivery.noBuffer
            _ = access.withLock { $0 }?.withQueue(0) { (queue, memory) throws(VirtioError) -> Bool in
                outcome = try self.deliver(frame[0..<length], queue: queue, memory: memory)
                return outcome != .noBuffer
            }
            switch outcome {
            case .delivered:
                receiveLimiter?.consume(bytes: UInt64(length - Self.headerLength))
                receivedFrames.add(1, ordering: .relaxed)
                receivedBytes.add(UInt64(length - Self.headerLength), ordering: .relaxed)
                pending = 0
            case .dropped:
                droppedFrames.add(1, ordering: .relaxed)
                pending = 0
            case .noBuffer:
                break
            }
        }
    }

    enum Delivery { case delivered, dropped, noBuffer }

    /// Puts one frame (header included) into the next receive chain. A chain too small for the
    /// frame is returned empty and the frame dropped.
    func deliver(_ bytes: ArraySlice<UInt8>, queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Delivery {
        guard let chain = try queue.popChain() else { return .noBuffer }
        guard chain.readable.isEmpty else { throw .malformedRequest("a receive buffer must be device-writable") }
        let capacity = chain.writable.reduce(0) { $0 + Int($1.length) }
        guard capacity >= bytes.count else {
            try queue.pushUsed(head: chain.head, written: 0)
            return .dropped
        }
        let written = try memory.scatter(bytes, into: chain.writable)
        try queue.pushUsed(head: chain.head, written: written)
        return .delivered
    }
}
