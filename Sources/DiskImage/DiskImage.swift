#if canImport(Glibc)
import Glibc
#endif

public enum DiskFormat: String, Sendable, CaseIterable, Codable {
    case raw
    case qcow2
}

/// A virtual disk: a byte-addressable device of fixed size backed by an image file.
/// Implementations bounds-check every access against `virtualSize`; offsets come from guests.
public protocol DiskImage: AnyObject, Sendable {
    var path: String { get }
    var format: DiskFormat { get }
    var virtualSize: UInt64 { get }
    var isReadOnly: Bool { get }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError)
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError)
    /// Makes every completed write durable.
    func flush() throws(DiskImageError)
    /// Makes a range read as zeros, freeing host space where whole units (clusters, blocks) allow.
    /// Discard (the guest no longer needs the data) is served the same way: reads after it return
    /// zeros, never stale or backing-file data.
    func writeZeroes(at offset: UInt64, length: UInt64) throws(DiskImageError)
    /// What `vireo disk info` shows.
    func info() throws(DiskImageError) -> DiskInfo
}

public struct DiskInfo: Sendable, Equatable, Codable {
    public var path: String
    public var format: DiskFormat
    public var virtualSize: UInt64
    /// Host bytes the image file occupies.
    public var allocatedBytes: UInt64
    public var clusterSize: UInt64?
    /// The chain below this image, nearest first.
    public var backingChain: [String]
    /// qcow2 internal snapshots, oldest first.
    public var snapshots: [SnapshotInfo] = []
}

/// One qcow2 internal snapshot, as `qemu-img snapshot -l` lists it.
public struct SnapshotInfo: Sendable, Equatable, Codable {
    public var id: String
    public var name: String
    /// The disk's virtual size when the snapshot was taken.
    public var virtualSize: UInt64
    /// Seconds since the epoch.
    public var date: UInt64
    /// Bytes of saved VM state (RAM and devices) stored with it; 0 for disk-only snapshots.
    public var vmStateSize: UInt64
}

extension DiskImage {
    func checkRange(_ offset: UInt64, _ length: Int) throws(DiskImageError) {
        guard offset <= virtualSize, UInt64(length) <= virtualSize - offset else {
            throw .outOfRange(path: path, offset: offset, length: length, size: virtualSize)
        }
    }

    public func readBytes(count: Int, at offset: UInt64) throws(DiskImageError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let outcome: Result<Void, DiskImageError> = bytes.withUnsafeMutableBytes { buffer in
            do throws(DiskImageError) { try read(into: buffer, at: offset); return .success(()) } catch { return .failure(error) }
        }
        try outcome.get()
        return bytes
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws(DiskImageError) {
        let outcome: Result<Void, DiskImageError> = bytes.withUnsafeBytes { buffer in
            do throws(DiskImageError) { try write(buffer, at: offset); return .success(()) } catch { return .failure(error) }
        }
        try outcome.get()
    }
}

public enum DiskImages {
    /// Opens an image, detecting the format from its first bytes unless `format` is given.
    /// `snapshot` (an internal snapshot's name or ID, qcow2 only) opens the disk as it was then,
    /// read-only.
    public static func open(path: String, format: DiskFormat? = nil, readOnly: Bool = false, snapshot: String? = nil) throws(DiskImageError) -> any DiskImage {
        if snapshot != nil && !readOnly { throw .invalidArgument(field: "snapshot", reason: "a snapshot can only be opened read-only") }
        let file = try ImageFile(path: path, writable: !readOnly)
        let detected: DiskFormat
        if let format {
            detected = format
        } else {
            let magic = try file.readBytes(count: 4, at: 0)
            detected = magic == QCOW2Image.magic ? .qcow2 : .raw
        }
        switch detected {
        case .raw:
            if let snapshot { throw .invalidArgument(field: "snapshot", reason: "raw images have no snapshots ('\(snapshot)' asked for)") }
            return try RawImage(file: file)
        case .qcow2: return try QCOW2Image(file: file, depth: 0, snapshot: snapshot)
        }
    }

    /// Opens the qcow2 overlay at `path` whose backing file is `backing`, already open here: a
    /// live snapshot moves a running disk onto an overlay without opening (and locking) its
    /// image twice.
    public static func openOverlay(path: String, on backing: any DiskImage) throws(DiskImageError) -> any DiskImage {
        let file = try ImageFile(path: path, writable: true)
        return try QCOW2Image(file: file, depth: 0, backingImage: backing)
    }

    /// An image's format and virtual size from its header, without opening it as a disk (no
    /// lock, no tables read): for images a running VM holds.
    public static func peek(path: String) throws(DiskImageError) -> (format: DiskFormat, virtualSize: UInt64) {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        var header = [UInt8](repeating: 0, count: 32)
        let count = header.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        if count >= 32, Array(header[0..<4]) == QCOW2Image.magic {
            return (.qcow2, header[24..<32].reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .io(operation: "fstat", path: path, errno: errno) }
        return (.raw, UInt64(info.st_size))
    }

    /// Creates a new image; refuses to touch an existing file.
    public static func create(path: String, format: DiskFormat, size: UInt64, backing: String? = nil,
                              preallocate: Bool = false, clusterSize: UInt64 = 65536) throws(DiskImageError) {
        guard size > 0 else { throw .invalidArgument(field: "--size", reason: "must be greater than zero") }
        switch format {
        case .raw:
            guard backing == nil else { throw .invalidArgument(field: "--backing", reason: "raw images cannot have a backing file; use --format qcow2") }
            try RawImage.create(path: path, size: size, preallocate: preallocate)
        case .qcow2:
            guard !preallocate else { throw .invalidArgument(field: "--preallocate", reason: "only raw images can be preallocated") }
            try QCOW2Image.create(path: path, size: size, backing: backing, clusterSize: clusterSize)
        }
    }
}

/// A raw image: the file is the disk. Created sparse (thin) unless preallocated.
public final class RawImage: DiskImage, @unchecked Sendable {
    let file: ImageFile
    public let virtualSize: UInt64
    public var path: String { file.path }
    public var format: DiskFormat { .raw }
    public var isReadOnly: Bool { !file.writable }

    init(file: ImageFile) throws(DiskImageError) {
        self.file = file
        self.virtualSize = try file.size
    }

    static func create(path: String, size: UInt64, preallocate: Bool) throws(DiskImageError) {
        let file = try ImageFile(creating: path)
        do {
            if preallocate { try file.allocate(size) } else { try file.truncate(to: size) }
        } catch {
            unlink(path)   // ours, just made: never leave a half-made image behind
            throw error
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        try checkRange(offset, buffer.count)
        try file.read(into: buffer, at: offset)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        try checkRange(offset, buffer.count)
        try file.write(buffer, at: offset)
    }

    public func flush() throws(DiskImageError) { try file.sync() }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        guard length <= UInt64(Int.max) else { throw .outOfRange(path: path, offset: offset, length: Int.max, size: virtualSize) }
        try checkRange(offset, Int(length))
        try file.punchHole(at: offset, length: length)
    }

    public func resize(to size: UInt64) throws(DiskImageError) {
        guard size >= virtualSize else {
            throw .invalidArgument(field: "--size", reason: "shrinking would destroy data; \(size) is below the current \(virtualSize) bytes")
        }
        try file.truncate(to: size)
    }

    public func info() throws(DiskImageError) -> DiskInfo {
        DiskInfo(path: path, format: .raw, virtualSize: virtualSize, allocatedBytes: try file.allocatedBytes,
                 clusterSize: nil, backingChain: [])
    }
}

extension DiskImages {
    /// The virtual size an image's header records (qcow2) or its length (raw), read without the
    /// image's lock, for listings of VMs that may be running. Nil if the file cannot be read.
    public static func recordedVirtualSize(path: String) -> UInt64? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var header = [UInt8](repeating: 0, count: 32)
        let count = header.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 32, 0) }
        if count == 32, Array(header[0..<4]) == QCOW2Image.magic {
            return header[24..<32].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        }
        var info = stat()
        return fstat(fd, &info) == 0 ? UInt64(info.st_size) : nil
    }

    /// The backing files an image's header names, nearest first, read without taking the image's
    /// lock (a running VM holds it): what the VM library needs to know which images rest on which.
    /// Stops at the first file that is missing or not qcow2.
    public static func recordedBackingChain(path: String) -> [String] {
        var chain: [String] = []
        var current = path
        while chain.count < 16 {
            let fd = Glibc.open(current, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { break }
            defer { close(fd) }
            var header = [UInt8](repeating: 0, count: 20)
            guard header.withUnsafeMutableBytes({ pread(fd, $0.baseAddress, 20, 0) }) == 20,
                  Array(header[0..<4]) == QCOW2Image.magic else { break }
            let offset = header[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            let length = header[16..<20].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            guard offset != 0, length > 0, length <= 1023, offset < 1 << 21 else { break }
            var name = [UInt8](repeating: 0, count: Int(length))
            guard name.withUnsafeMutableBytes({ pread(fd, $0.baseAddress, Int(length), off_t(offset)) }) == Int(length) else { break }
            let text = String(decoding: name, as: UTF8.self)
            let next = text.hasPrefix("/") ? text : QCOW2Image.directory(of: current) + "/" + text
            chain.append(next)
            current = next
        }
        return chain
    }
}
