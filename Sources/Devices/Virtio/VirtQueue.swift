import GuestMemory
import Synchronization

/// A driver mistake or a hostile guest, found while reading a virtqueue. The transport answers it
/// by marking the device NEEDS_RESET; the VMM itself carries on.
public enum VirtioError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidQueueSize(UInt16, maximum: UInt16)
    case ringOutsideMemory(String, GuestPhysicalAddress)
    case misalignedRing(String, GuestPhysicalAddress)
    case availableIndexJump(from: UInt16, to: UInt16, size: UInt16)
    case descriptorIndexOutOfRange(UInt16, size: UInt16)
    case descriptorChainTooLong(head: UInt16)
    case indirectDescriptorNotNegotiated(head: UInt16)
    case bufferOutsideMemory(GuestPhysicalAddress, length: UInt32)
    case malformedRequest(String)
    /// A vhost-user back end (virtiofsd) failed, refused or went away.
    case backend(String)

    public var description: String {
        switch self {
        case let .invalidQueueSize(size, maximum): return "queue size \(size) is not a power of two up to \(maximum)"
        case let .ringOutsideMemory(ring, address): return "\(ring) at \(address) is outside guest RAM"
        case let .misalignedRing(ring, address): return "\(ring) at \(address) is misaligned"
        case let .availableIndexJump(from, to, size): return "available index jumped from \(from) to \(to) on a queue of \(size)"
        case let .descriptorIndexOutOfRange(index, size): return "descriptor \(index) is outside a queue of \(size)"
        case let .descriptorChainTooLong(head): return "descriptor chain from \(head) is longer than the queue (a loop?)"
        case let .indirectDescriptorNotNegotiated(head): return "descriptor chain from \(head) uses indirect descriptors, which were not offered"
        case let .bufferOutsideMemory(address, length): return "buffer of \(length) bytes at \(address) is outside guest RAM"
        case let .malformedRequest(reason): return "malformed request: \(reason)"
        case let .backend(reason): return reason
        }
    }
}

/// One buffer of a descriptor chain, already checked to lie inside guest RAM.
public struct VirtqBuffer: Sendable, Equatable {
    public let address: GuestPhysicalAddress
    public let length: UInt32
    public let deviceWritable: Bool
}

/// A request the driver made available: its head index and its buffers in order.
public struct DescriptorChain: Sendable, Equatable {
    public let head: UInt16
    public let buffers: [VirtqBuffer]

    public var readable: [VirtqBuffer] { buffers.filter { !$0.deviceWritable } }
    public var writable: [VirtqBuffer] { buffers.filter { $0.deviceWritable } }
}

/// A split virtqueue (virtio 1.x §2.7) in guest memory. Every index and address the guest wrote is
/// checked before use: the guest is not trusted.
public final class VirtQueue: @unchecked Sendable {
    static let nextFlag: UInt16 = 1
    static let writeFlag: UInt16 = 2
    static let indirectFlag: UInt16 = 4

    let memory: GuestMemory
    public let size: UInt16
    let descriptorTable: GuestPhysicalAddress
    let availableRing: GuestPhysicalAddress
    let usedRing: GuestPhysicalAddress
    private(set) var nextAvailable: UInt16 = 0
    private(set) var nextUsed: UInt16 = 0
    /// VIRTIO_F_EVENT_IDX was negotiated (virtio 1.x §2.7.7, §2.7.10): the driver says in
    /// `used_event` after which used entry it wants an interrupt, and the device says in
    /// `avail_event` after which available entry it wants a notification.
    let usesEventIndex: Bool
    /// The used index when the driver was last interrupted; nil when not known (a new or restored
    /// queue), and then the next completion interrupts.
    private var signalledUsed: UInt16?

    public init(memory: GuestMemory, size: UInt16, maximumSize: UInt16, descriptorTable: GuestPhysicalAddress,
                availableRing: GuestPhysicalAddress, usedRing: GuestPhysicalAddress, usesEventIndex: Bool = false) throws(VirtioError) {
        guard size > 0, size <= maximumSize, size.nonzeroBitCount == 1 else { throw .invalidQueueSize(size, maximum: maximumSize) }
        let rings: [(String, GuestPhysicalAddress, UInt64, UInt64)] = [
            ("descriptor table", descriptorTable, 16 * UInt64(size), 16),
            ("available ring", availableRing, 6 + 2 * UInt64(size), 2),
            ("used ring", usedRing, 6 + 8 * UInt64(size), 4),
        ]
        for (name, address, length, alignment) in rings {
            guard address.rawValue % alignment == 0 else { throw .misalignedRing(name, address) }
            guard memory.contains(address, length: length) else { throw .ringOutsideMemory(name, address) }
        }
        self.memory = memory
        self.size = size
        self.descriptorTable = descriptorTable
        self.availableRing = availableRing
        self.usedRing = usedRing
        self.usesEventIndex = usesEventIndex
    }

    /// `used_event`, after the available ring's entries; `avail_event`, after the used ring's.
    /// Both lie inside the rings the initialiser checked.
    private var usedEventAddress: GuestPhysicalAddress { availableRing + 4 + 2 * UInt64(size) }
    private var availableEventAddress: GuestPhysicalAddress { usedRing + 4 + 8 * UInt64(size) }

    /// Where a restored queue resumes: the next available entry to read and the next used slot.
    public func restoreIndices(nextAvailable: UInt16, nextUsed: UInt16) {
        self.nextAvailable = nextAvailable
        self.nextUsed = nextUsed
    }

    public var indices: (nextAvailable: UInt16, nextUsed: UInt16) { (nextAvailable, nextUsed) }

    /// The next chain the driver made available, or nil when there is none.
    public func popChain() throws(VirtioError) -> DescriptorChain? {
        var availableIndex = try read(UInt16.self, availableRing + 2)
        if availableIndex == nextAvailable {
            guard usesEventIndex else { return nil }
            // Drained: ask to be notified of the very next entry, then look once more, since the
            // driver may have added one before it could see the request (§2.7.10).
            try write(nextAvailable, availableEventAddress)
            atomicMemoryFence(ordering: .sequentiallyConsistent)
            availableIndex = try read(UInt16.self, availableRing + 2)
            if availableIndex == nextAvailable { return nil }
        }
        guard availableIndex &- nextAvailable <= size else {
            throw .availableIndexJump(from: nextAvailable, to: availableIndex, size: size)
        }
        // Ring entries are read only after the index that published them.
        atomicMemoryFence(ordering: .acquiring)
        let head = try read(UInt16.self, availableRing + 4 + 2 * UInt64(nextAvailable % size))
        nextAvailable &+= 1

        var buffers: [VirtqBuffer] = []
        var index = head
        while true {
            guard index < size else { throw .descriptorIndexOutOfRange(index, size: size) }
            guard buffers.count < Int(size) else { throw .descriptorChainTooLong(head: head) }
            let entry = descriptorTable + 16 * UInt64(index)
            let address = GuestPhysicalAddress(try read(UInt64.self, entry))
            let length = try read(UInt32.self, entry + 8)
            let flags = try read(UInt16.self, entry + 12)
            let next = try read(UInt16.self, entry + 14)
            guard flags & Self.indirectFlag == 0 else { throw .indirectDescriptorNotNegotiated(head: head) }
            guard memory.contains(address, length: UInt64(length)) else { throw .bufferOutsideMemory(address, length: length) }
            buffers.append(VirtqBuffer(address: address, length: length, deviceWritable: flags & Self.writeFlag != 0))
            guard flags & Self.nextFlag != 0 else { break }
            index = next
        }
        return DescriptorChain(head: head, buffers: buffers)
    }

    /// Gives back the last `count` chains popped and not used, to be popped again later (a frame
    /// that needs more receive buffers than the driver has made available yet).
    public func unpop(_ count: Int) {
        nextAvailable &-= UInt16(truncatingIfNeeded: count)
    }

    /// Returns several finished chains and publishes them with one index update, so the driver
    /// sees all of a frame's buffers at once (mergeable receive buffers) or none.
    public func pushUsed(_ chains: [(head: UInt16, written: UInt32)]) throws(VirtioError) {
        var index = nextUsed
        for chain in chains {
            let slot = usedRing + 4 + 8 * UInt64(index % size)
            try write(UInt32(chain.head), slot)
            try write(chain.written, slot + 4)
            index &+= 1
        }
        nextUsed = index
        atomicMemoryFence(ordering: .releasing)
        try write(nextUsed, usedRing + 2)
    }

    /// Returns a finished chain to the driver with the number of bytes the device wrote.
    public func pushUsed(head: UInt16, written: UInt32) throws(VirtioError) {
        let slot = usedRing + 4 + 8 * UInt64(nextUsed % size)
        try write(UInt32(head), slot)
        try write(written, slot + 4)
        nextUsed &+= 1
        // The element must be visible before the index that publishes it.
        atomicMemoryFence(ordering: .releasing)
        try write(nextUsed, usedRing + 2)
    }

    /// Whether the used entries published since the driver's last interrupt call for one now:
    /// always without EVENT_IDX; with it, when `used_event` lies among them (the spec's
    /// `vring_need_event`). Called once per interrupt decision; it remembers the index.
    public func needsInterrupt() -> Bool {
        guard usesEventIndex else { return true }
        let newUsed = nextUsed
        let previous = signalledUsed
        signalledUsed = newUsed
        // The used index is published before `used_event` is read: the driver writes it and then
        // reads the index, the other half of the same race.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        guard let previous, let event = try? read(UInt16.self, usedEventAddress) else { return true }
        return newUsed &- event &- 1 < newUsed &- previous
    }

    private func read<T: FixedWidthInteger>(_ type: T.Type, _ address: GuestPhysicalAddress) throws(VirtioError) -> T {
        do { return try memory.read(type, at: address) } catch { throw .ringOutsideMemory("virtqueue", address) }
    }

    private func write<T: FixedWidthInteger>(_ value: T, _ address: GuestPhysicalAddress) throws(VirtioError) {
        do { try memory.write(value, at: address) } catch { throw .ringOutsideMemory("virtqueue", address) }
    }
}
