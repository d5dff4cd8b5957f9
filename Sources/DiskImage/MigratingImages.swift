import CHostSupport
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Stands in for an image another process holds: the destination of a live migration before the
/// source hands its disks over, or the source after it has. It has the disk's size and format, and
/// any I/O is an error (no vCPU runs while one is in place).
public final class DetachedImage: DiskImage, @unchecked Sendable {
    public let path: String
    public let format: DiskFormat
    public let virtualSize: UInt64
    public let isReadOnly: Bool

    public init(path: String, format: DiskFormat, virtualSize: UInt64, readOnly: Bool) {
        self.path = path
        self.format = format
        self.virtualSize = virtualSize
        isReadOnly = readOnly
    }

    private var detached: DiskImageError { .io(operation: "use (the image is handed over to another VMM)", path: path, errno: EBUSY) }
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError) { throw detached }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError) { throw detached }
    public func flush() throws(DiskImageError) { throw detached }
    public func writeZeroes(at offset: UInt64, length: UInt64) throws(DiskImageError) { throw detached }
    public func info() throws(DiskImageError) -> DiskInfo {
        DiskInfo(path: path, format: format, virtualSize: virtualSize, allocatedBytes: 0, clusterSize: nil, backingChain: [])
    }
}

/// An image whose writes are recorded in a bitmap of `chunkSize` chunks, for a live migration
/// that copies the disk while the guest keeps writing (`vireo migrate --copy-disks`). A chunk is
/// marked after its write completes, so a reader that takes the marks and then reads the chunk
/// never misses a write: one that lands after the read marks the chunk again.
public final class DirtyTrackingImage: DiskImage, @unchecked Sendable {
    public static let chunkSize: UInt64 = 1 << 20
    public let underlying: any DiskImage
    private let words: UnsafeMutablePointer<UInt64>
    public let chunkCount: Int

    public init(wrapping underlying: any DiskImage) {
        self.underlying = underlying
        chunkCount = Int((underlying.virtualSize + Self.chunkSize - 1) / Self.chunkSize)
        let count = max(1, (chunkCount + 63) / 64)
        words = .allocate(capacity: count)
        words.initialize(repeating: 0, count: count)
    }

    deinit { words.deallocate() }

    public var wordCount: Int { max(1, (chunkCount + 63) / 64) }
    public var path: String { underlying.path }
    public var format: DiskFormat { underlying.format }
    public var virtualSize: UInt64 { underlying.virtualSize }
    public var isReadOnly: Bool { underlying.isReadOnly }

    private func mark(_ offset: UInt64, _ length: UInt64) {
        guard length > 0 else { return }
        let first = offset / Self.chunkSize
        let last = (offset + length - 1) / Self.chunkSize
        vireo_bitmap_set_range(words, Int(first), Int(last - first + 1))
    }

    /// ORs the chunks written since the last call into `bitmap` (`wordCount` words) and clears them.
    public func takeWrittenChunks(into bitmap: UnsafeMutablePointer<UInt64>) {
        vireo_bitmap_take(words, bitmap, wordCount)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        try underlying.read(into: buffer, at: offset)
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        defer { mark(offset, UInt64(buffer.count)) }
        try underlying.write(buffer, at: offset)
    }
    public func flush() throws(DiskImageError) { try underlying.flush() }
    public func writeZeroes(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        defer { mark(offset, length) }
        try underlying.writeZeroes(at: offset, length: length)
    }
    public func info() throws(DiskImageError) -> DiskInfo { try underlying.info() }
}
