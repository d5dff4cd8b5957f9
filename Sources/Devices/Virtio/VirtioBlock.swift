import DiskImage
import GuestMemory
import MachineSpec
import Synchronization

/// virtio-blk (virtio 1.x §5.2) over a `DiskImage`: read, write, flush and get-id. Guest buffers
/// are read and written in place (no bounce copies); disk errors become VIRTIO_BLK_S_IOERR for
/// that request, never a VMM failure. With more than one queue it offers VIRTIO_BLK_F_MQ: a
/// driver that takes it (Linux's blk-mq maps one queue to each vCPU) submits on each, and the
/// queues are worked on at the same time (each has its own I/O thread in the VMM); the image is
/// the only thing they share, and every `DiskImage` takes concurrent requests.
public final class VirtioBlock: VirtioDevice, BackgroundDevice, @unchecked Sendable {
    public static let sectorSize: UInt64 = 512
    public static let queueSize: UInt16 = 256

    enum RequestType {
        static let read: UInt32 = 0
        static let write: UInt32 = 1
        static let flush: UInt32 = 4
        static let getID: UInt32 = 8
        static let discard: UInt32 = 11
        static let writeZeroes: UInt32 = 13
    }
    enum RequestStatus {
        static let ok: UInt8 = 0
        static let ioError: UInt8 = 1
        static let unsupported: UInt8 = 2
    }
    enum Feature {
        static let segmentMaximum: UInt64 = 1 << 2
        static let readOnly: UInt64 = 1 << 5
        static let flush: UInt64 = 1 << 9
        static let multiqueue: UInt64 = 1 << 12
        static let discard: UInt64 = 1 << 13
        static let writeZeroes: UInt64 = 1 << 14
    }
    /// Segments one discard or write-zeroes request may carry, and sectors per segment.
    static let maximumSegments: UInt32 = 32
    static let maximumSegmentSectors: UInt32 = 1 << 22

    /// The image requests go to; a live snapshot swaps in a new overlay whose backing file is
    /// the old image (docs/snapshots.md), with the transport quiesced.
    public var disk: any DiskImage { image.withLock { $0 } }
    private let image: Mutex<any DiskImage>
    public let readOnly: Bool
    /// The disk's files are opened with O_DIRECT (`cache=none`): whatever reopens them (a
    /// migration's handover, a live snapshot's overlay) does the same.
    public let bypassesHostCache: Bool
    public let serial: [UInt8]
    /// Completed requests, for counters and tests.
    public let completed = Atomic<UInt64>(0)
    /// Completed requests by queue, for the VMM log (which queues a multiqueue driver used).
    public let completedByQueue: [RequestCounter]
    /// Driver sessions (FEATURES_OK) that took VIRTIO_BLK_F_MQ.
    public let multiqueueSessions = Atomic<UInt64>(0)
    public final class RequestCounter: Sendable {
        public let count = Atomic<UInt64>(0)
    }
    /// Guest data moved, for `vireo info`.
    public let bytesRead = Atomic<UInt64>(0)
    public let bytesWritten = Atomic<UInt64>(0)

    /// Requests wait here when the disk's rate limit is reached.
    public let limiter: RateLimiter?
    private let deferred = DeferredWork()
    private let access = VirtioQueueAccessLink()

    /// `queues`: request queues, 1 to `MachineLimits.diskQueues.upperBound` (the spec's rule;
    /// clamped here so that a device never has none).
    public init(disk: any DiskImage, readOnly: Bool, serial: String?, rateLimit: RateLimit = RateLimit(), bypassesHostCache: Bool = false,
                queues: Int = 1) {
        image = Mutex(disk)
        let queueCount = min(max(queues, MachineLimits.diskQueues.lowerBound), MachineLimits.diskQueues.upperBound)
        completedByQueue = (0..<queueCount).map { _ in RequestCounter() }
        self.readOnly = readOnly || disk.isReadOnly
        self.bypassesHostCache = bypassesHostCache
        self.serial = Array((serial ?? "").utf8.prefix(20))
        limiter = rateLimit.isUnlimited ? nil : RateLimiter(rateLimit)
    }

    public func attach(_ access: any VirtioQueueAccess) { self.access.attach(access) }

    /// Puts the disk's image in place of the stand-in it was built with (a VMM reads its disks
    /// only once it is confined, after the machine is assembled). Before the guest runs.
    public func bind(_ disk: any DiskImage) throws(DiskImageError) {
        guard !(readOnly == false && disk.isReadOnly) else {
            throw .invalidArgument(field: "disk", reason: "\(disk.path) is open read-only for a writable disk")
        }
        image.withLock { $0 = disk }
    }

    /// Sends every later request to `overlay`, which must show the same disk (an overlay on the
    /// current image, of the same size). Call with the transport quiesced and the old image flushed.
    public func switchImage(to overlay: any DiskImage) throws(DiskImageError) {
        guard overlay.virtualSize == disk.virtualSize else {
            throw .invalidArgument(field: "overlay", reason: "\(overlay.path) is \(overlay.virtualSize) bytes, the disk \(disk.virtualSize)")
        }
        image.withLock { $0 = overlay }
    }

    // A throttled disk finishes its queue on a thread of its own once the limiter allows.
    public var needsBackgroundThread: Bool { limiter != nil }
    public func stopBackground() { deferred.stop() }
    public func runBackground() {
        deferred.run {
            for index in completedByQueue.indices {
                _ = access.current?.withQueue(index) { (queue, memory) throws(VirtioError) -> Bool in
                    try self.process(queue: index, queue, memory: memory)
                }
            }
        }
    }

    public var deviceType: UInt32 { 2 }
    public var deviceFeatures: UInt64 {
        VirtioFeature.version1 | Feature.segmentMaximum | Feature.flush
            | (readOnly ? Feature.readOnly : Feature.discard | Feature.writeZeroes)
            | (completedByQueue.count > 1 ? Feature.multiqueue : 0)
    }
    public var queueMaximumSizes: [UInt16] { Array(repeating: Self.queueSize, count: completedByQueue.count) }
    public var processesQueuesConcurrently: Bool { true }

    public func acceptFeatures(_ features: UInt64) {
        if features & Feature.multiqueue != 0 { multiqueueSessions.add(1, ordering: .relaxed) }
    }

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        // struct virtio_blk_config up to write_zeroes_may_unmap (virtio 1.x §5.2.4).
        var configuration = [UInt8](repeating: 0, count: 60)
        func put(_ value: UInt64, at offset: Int, size: Int) {
            for index in 0..<size { configuration[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
        }
        put(disk.virtualSize / Self.sectorSize, at: 0, size: 8)          // capacity
        put(UInt64(Self.queueSize - 2), at: 12, size: 4)                 // seg_max
        put(UInt64(completedByQueue.count), at: 34, size: 2)             // num_queues
        put(UInt64(Self.maximumSegmentSectors), at: 36, size: 4)         // max_discard_sectors
        put(UInt64(Self.maximumSegments), at: 40, size: 4)               // max_discard_seg
        put(1, at: 44, size: 4)                                          // discard_sector_alignment
        put(UInt64(Self.maximumSegmentSectors), at: 48, size: 4)         // max_write_zeroes_sectors
        put(UInt64(Self.maximumSegments), at: 52, size: 4)               // max_write_zeroes_seg
        put(1, at: 56, size: 1)                                          // write_zeroes_may_unmap
        for index in data.indices {
            let position = offset + index
            data[index] = position >= 0 && position < configuration.count ? configuration[position] : 0
        }
    }

    public func process(queue index: Int, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        var used = false
        while true {
            if let limiter {
                let wait = limiter.delay()
                if wait > 0 {
                    // Left on the ring; the deferred pass picks it up.
                    deferred.schedule(after: wait)
                    break
                }
            }
            guard let chain = try queue.popChain() else { break }
            var moved: UInt64 = 0
            let written = try handle(chain, memory: memory, moved: &moved)
            try queue.pushUsed(head: chain.head, written: written)
            completed.add(1, ordering: .relaxed)
            completedByQueue[index].count.add(1, ordering: .relaxed)
            limiter?.consume(bytes: moved)
            used = true
        }
        return used
    }

    /// Executes one request; returns the bytes written into guest buffers (status byte included)
    /// and adds the disk data it moved to `moved` (the rate limit's measure; this queue's own,
    /// which the shared counters are not while other queues work).
    private func handle(_ chain: DescriptorChain, memory: GuestMemory, moved: inout UInt64) throws(VirtioError) -> UInt32 {
        // The image once per request, not a lock per access (a live snapshot swaps it only while
        // the queue is quiesced, so it cannot change under a request).
        let disk = self.disk
        // Layout: a 16-byte header the device reads, data buffers, then one status byte it writes.
        guard let statusBuffer = chain.buffers.last, statusBuffer.deviceWritable, statusBuffer.length >= 1 else {
            throw .malformedRequest("the last buffer must be a device-writable status byte")
        }
        let header = try gather(chain.readable, count: 16, memory: memory)
        let type = UInt32(header[0]) | UInt32(header[1]) << 8 | UInt32(header[2]) << 16 | UInt32(header[3]) << 24
        let sector = header[8..<16].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        var dataBuffers = Array(chain.buffers.dropLast())
        var status = RequestStatus.ok
        var written: UInt32 = 0
        let statusAddress = statusBuffer.address + UInt64(statusBuffer.length - 1)
        if statusBuffer.length > 1 {
            // Status shares its buffer with data: the data part is everything before the last byte.
            dataBuffers.append(VirtqBuffer(address: statusBuffer.address, length: statusBuffer.length - 1, deviceWritable: true))
        }

        switch type {
        case RequestType.read, RequestType.write:
            let isRead = type == RequestType.read
            // Skip the header bytes among the readable buffers for writes.
            let payload = isRead ? dataBuffers.filter(\.deviceWritable) : try skipping(16, in: dataBuffers.filter { !$0.deviceWritable })
            let length = payload.reduce(UInt64(0)) { $0 + UInt64($1.length) }
            if !isRead && readOnly {
                status = RequestStatus.ioError
            } else if length % Self.sectorSize != 0 || sector > UInt64.max / Self.sectorSize
                        || sector * Self.sectorSize > disk.virtualSize || length > disk.virtualSize - sector * Self.sectorSize {
                status = RequestStatus.ioError
            } else {
                var offset = sector * Self.sectorSize
                do {
                    for buffer in payload where buffer.length > 0 {
                        let host = try memory.hostPointer(buffer.address, length: UInt64(buffer.length))
                        if isRead {
                            try disk.read(into: UnsafeMutableRawBufferPointer(start: host, count: Int(buffer.length)), at: offset)
                            written += buffer.length
                            bytesRead.add(UInt64(buffer.length), ordering: .relaxed)
                            moved += UInt64(buffer.length)
                        } else {
                            try disk.write(UnsafeRawBufferPointer(start: host, count: Int(buffer.length)), at: offset)
                            bytesWritten.add(UInt64(buffer.length), ordering: .relaxed)
                            moved += UInt64(buffer.length)
                        }
                        offset += UInt64(buffer.length)
                    }
                } catch {
                    status = RequestStatus.ioError
                }
            }
        case RequestType.discard, RequestType.writeZeroes:
            // The readable payload after the header is an array of {sector u64, sectors u32, flags u32}.
            let payload = try skipping(16, in: dataBuffers.filter { !$0.deviceWritable })
            let length = payload.reduce(0) { $0 + Int($1.length) }
            if readOnly {
                status = RequestStatus.ioError
            } else if length == 0 || length % 16 != 0 || length / 16 > Int(Self.maximumSegments) {
                status = RequestStatus.unsupported
            } else {
                let segments = try gather(payload, count: length, memory: memory)
                for start in stride(from: 0, to: segments.count, by: 16) {
                    let sector = segments[start..<start + 8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                    let count = segments[start + 8..<start + 12].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                    let flags = segments[start + 12..<start + 16].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                    // Only the unmap flag is defined, and only for write-zeroes.
                    guard flags & ~(type == RequestType.writeZeroes ? 1 : 0) == 0, count <= UInt64(Self.maximumSegmentSectors) else {
                        status = RequestStatus.unsupported
                        break
                    }
                    guard sector <= disk.virtualSize / Self.sectorSize, count <= disk.virtualSize / Self.sectorSize - sector else {
                        status = RequestStatus.ioError
                        break
                    }
                    do {
                        if type == RequestType.discard {
                            try disk.discard(at: sector * Self.sectorSize, length: count * Self.sectorSize)
                        } else {
                            try disk.writeZeroes(at: sector * Self.sectorSize, length: count * Self.sectorSize)
                        }
                    } catch {
                        status = RequestStatus.ioError
                        break
                    }
                }
            }
        case RequestType.flush:
            do { try disk.flush() } catch { status = RequestStatus.ioError }
        case RequestType.getID:
            var identifier = serial
            identifier.append(contentsOf: [UInt8](repeating: 0, count: 20 - identifier.count))
            written += try scatter(identifier, into: dataBuffers.filter(\.deviceWritable), memory: memory)
        default:
            status = RequestStatus.unsupported
        }
        do { try memory.write(status, at: statusAddress) } catch { throw .bufferOutsideMemory(statusAddress, length: 1) }
        return written + 1
    }

    private func gather(_ buffers: [VirtqBuffer], count: Int, memory: GuestMemory) throws(VirtioError) -> [UInt8] {
        let bytes = try memory.gather(buffers, limit: count)
        guard bytes.count == count else { throw .malformedRequest("request header is \(bytes.count) bytes, expected \(count)") }
        return bytes
    }

    private func scatter(_ bytes: [UInt8], into buffers: [VirtqBuffer], memory: GuestMemory) throws(VirtioError) -> UInt32 {
        try memory.scatter(bytes[...], into: buffers)
    }

    private func skipping(_ count: UInt32, in buffers: [VirtqBuffer]) throws(VirtioError) -> [VirtqBuffer] {
        var remaining = count
        var result: [VirtqBuffer] = []
        for buffer in buffers {
            if remaining >= buffer.length { remaining -= buffer.length; continue }
            result.append(VirtqBuffer(address: buffer.address + UInt64(remaining), length: buffer.length - remaining, deviceWritable: false))
            remaining = 0
        }
        return result
    }
}
