import CHostSupport
import GuestMemory
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A device whose queues another process serves (vhost-user): the transport hands the guest's
/// notifications straight to `kickDescriptors` (KVM ioeventfds) and turns a signal on
/// `callDescriptors` into the used-buffer interrupt.
public protocol VirtioExternalQueues: AnyObject, Sendable {
    /// One eventfd per queue, written when the driver notifies that queue.
    var kickDescriptors: [Int32] { get }
    /// One eventfd per queue, which the back end writes when it used buffers.
    var callDescriptors: [Int32] { get }
}

/// virtio-fs (virtio 1.2 §5.11, device 26) on a vhost-user back end: Debian's virtiofsd serves
/// the FUSE requests the guest queues, in guest RAM it maps from the VM's memfd. The VMM only
/// describes the device (its tag, one request queue) and tells the back end where the rings are
/// once the driver has set them up; it never reads a request itself. Its state lives in virtiofsd
/// (the guest's open files), so it cannot be saved or migrated, as with QEMU.
public final class VirtioFileSystem: VirtioDevice, VirtioExternalQueues {
    public static let deviceID: UInt32 = 26
    /// The high-priority queue (FUSE_INTERRUPT, FUSE_FORGET) and one request queue.
    public static let queueCount = 2
    /// Ring sizes up to 1024, as virtiofsd's own limit (libvhost-user's VIRTQUEUE_MAX_SIZE).
    public static let maximumQueueSize: UInt16 = 1024
    /// VIRTIO_RING_F_INDIRECT_DESC: the back end walks indirect tables itself.
    static let indirectDescriptors: UInt64 = 1 << 28

    public let tag: String
    public let frontend: VhostUserFrontend
    public let kickDescriptors: [Int32]
    public let callDescriptors: [Int32]
    private let memory: GuestMemory
    /// `struct virtio_fs_config`: the tag (36 bytes, NUL-padded) and the number of request
    /// queues, fixed for the device's life.
    private let configuration: [UInt8]

    private struct Session {
        var accepted: UInt64 = 0
        /// Rings the back end is serving, stopped again at a reset.
        var started: [UInt32] = []
    }
    private let session = Mutex(Session())

    /// Greets the back end on `socket` (a connected Unix stream socket, owned from now on) and
    /// gives it guest RAM, which must be one shared file (`memory.sharedBacking`).
    public init(tag: String, socket: Int32, memory: GuestMemory) throws(VirtioError) {
        do throws(MachineSpecError) { try MachineRules.shareTag(tag) } catch {
            close(socket)
            throw .backend(error.description)
        }
        guard let backing = memory.sharedBacking else {
            close(socket)
            throw .backend("virtio-fs '\(tag)': the back end maps guest RAM, which must be a shared memfd or file (--memory-backing memfd,shared)")
        }
        let frontend = try VhostUserFrontend(socket: socket, name: "virtio-fs '\(tag)'")
        guard frontend.backendFeatures & VirtioFeature.version1 != 0 else {
            throw .backend("virtio-fs '\(tag)': the back end does not offer VIRTIO_F_VERSION_1 (features 0x\(String(frontend.backendFeatures, radix: 16)))")
        }
        let regions = zip(memory.regions, backing.offsets).map { region, offset in
            VhostUserFrontend.MemoryRegion(guestAddress: region.start.rawValue, size: region.size,
                                           userAddress: UInt64(UInt(bitPattern: region.host)), descriptor: backing.descriptor, offset: offset)
        }
        try frontend.setMemoryTable(regions)
        var kicks: [Int32] = [], calls: [Int32] = []
        for _ in 0..<Self.queueCount {
            let kick = vireo_eventfd_nonblocking(), call = vireo_eventfd_nonblocking()
            guard kick >= 0, call >= 0 else {
                let code = errno
                for fd in kicks + calls + [kick, call] where fd >= 0 { close(fd) }
                throw .backend("virtio-fs '\(tag)': eventfd: \(String(cString: strerror(code)))")
            }
            kicks.append(kick)
            calls.append(call)
        }
        self.tag = tag
        self.frontend = frontend
        self.memory = memory
        var configuration = [UInt8](repeating: 0, count: MachineLimits.shareTagLength + 4)
        for (index, byte) in tag.utf8.prefix(MachineLimits.shareTagLength).enumerated() { configuration[index] = byte }
        withUnsafeBytes(of: UInt32(Self.queueCount - 1).littleEndian) { for (index, byte) in $0.enumerated() { configuration[MachineLimits.shareTagLength + index] = byte } }
        self.configuration = configuration
        kickDescriptors = kicks
        callDescriptors = calls
    }

    deinit { for fd in kickDescriptors + callDescriptors { close(fd) } }

    public var deviceType: UInt32 { Self.deviceID }

    /// VERSION_1 and indirect descriptors where the back end has them; EVENT_IDX through
    /// `offersEventIndex`.
    public var deviceFeatures: UInt64 {
        VirtioFeature.version1 | (frontend.backendFeatures & Self.indirectDescriptors)
    }

    /// The back end decides when to interrupt, so the ring feature is offered only if it has it.
    public var offersEventIndex: Bool { frontend.backendFeatures & VirtioFeature.eventIndex != 0 }

    public var queueMaximumSizes: [UInt16] { Array(repeating: Self.maximumQueueSize, count: Self.queueCount) }

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for index in data.indices {
            let position = offset + index
            data[index] = position >= 0 && position < configuration.count ? configuration[position] : 0
        }
    }

    /// A notification that came as an MMIO exit (no ioeventfd): passed on to the back end.
    public func process(queue index: Int, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        guard index >= 0, index < kickDescriptors.count else { return false }
        var one: UInt64 = 1
        _ = write(kickDescriptors[index], &one, 8)
        return false
    }

    public func acceptFeatures(_ features: UInt64) { session.withLock { $0.accepted = features } }

    /// DRIVER_OK: the accepted features, then every ready ring, in this process's addresses.
    public func driverReady(_ queues: [VirtioQueueLayout]) throws(VirtioError) {
        let accepted = session.withLock { $0.accepted }
        try frontend.setFeatures(accepted)
        for queue in queues where queue.index < Self.queueCount {
            let size = UInt64(queue.size)
            let ring = VhostUserFrontend.Vring(
                index: UInt32(queue.index), size: UInt32(queue.size),
                descriptorTable: try userAddress(queue.descriptorTable, length: 16 * size, ring: "descriptor table"),
                availableRing: try userAddress(queue.availableRing, length: 6 + 2 * size, ring: "available ring"),
                usedRing: try userAddress(queue.usedRing, length: 6 + 8 * size, ring: "used ring"))
            try frontend.startVring(ring, kick: kickDescriptors[queue.index], call: callDescriptors[queue.index])
            session.withLock { $0.started.append(UInt32(queue.index)) }
        }
    }

    private func userAddress(_ address: UInt64, length: UInt64, ring: String) throws(VirtioError) -> UInt64 {
        do {
            return UInt64(UInt(bitPattern: try memory.hostPointer(GuestPhysicalAddress(address), length: length)))
        } catch {
            throw .ringOutsideMemory(ring, GuestPhysicalAddress(address))
        }
    }

    /// The driver's session ended: the back end stops every ring it was serving (and answers with
    /// where it stopped, which a fresh session does not need).
    public func reset() {
        let started = session.withLock { session in
            defer { session = Session() }
            return session.started
        }
        for index in started { _ = try? frontend.stopVring(index) }
    }

    /// The guest's open files live in virtiofsd: no record of this device could bring them back.
    public func savedDeviceRecord() throws(StateError) -> [UInt8] {
        throw .invalid(field: "virtio-fs '\(tag)'", reason: "a shared folder's state (the guest's open files) lives in virtiofsd and cannot be saved or migrated")
    }

    public func restoreDevice(record: [UInt8]) throws(StateError) {
        throw .invalid(field: "virtio-fs '\(tag)'", reason: "a shared folder's state cannot be restored")
    }
}
