import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

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
    /// The guest no longer needs a range. Files (and every layered format) serve it as
    /// `writeZeroes`; a raw block device passes it down as BLKDISCARD, its contents then the
    /// device's business, as on real hardware (virtio 1.x §5.2.6: discarded data is unspecified).
    func discard(at offset: UInt64, length: UInt64) throws(DiskImageError)
    /// What `vireo disk info` shows.
    func info() throws(DiskImageError) -> DiskInfo
    /// Grows the image to `size` bytes; shrinking is refused (it would destroy data).
    func resize(to size: UInt64) throws(DiskImageError)
    /// Whether the range is known to read as zeros without reading it (an NBD server's
    /// BLOCK_STATUS), so a copy may skip it; false when not known.
    func readsAsZeroes(at offset: UInt64, length: UInt64) -> Bool
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
    /// True for a block device (its size is the device's; it occupies all of it); nil for files.
    public var blockDevice: Bool?
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
    public func readsAsZeroes(at offset: UInt64, length: UInt64) -> Bool { false }

    public func discard(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        try writeZeroes(at: offset, length: length)
    }

    /// Formats and wrappers that cannot grow say so.
    public func resize(to size: UInt64) throws(DiskImageError) {
        throw .unsupported(path: path, feature: "resizing this image")
    }

    /// Checks a zeroing or discard range the guest gave: writable, and inside the disk.
    func checkWritableRange(_ offset: UInt64, _ length: UInt64) throws(DiskImageError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        guard length <= UInt64(Int.max) else { throw .outOfRange(path: path, offset: offset, length: Int.max, size: virtualSize) }
        try checkRange(offset, Int(length))
    }

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

/// One image a disk rests on, as the VM's definition records it: where it is and its format.
/// A disk's chain is what its definition says; no header and no content is believed beyond it.
extension DiskFormat {
    /// The format a person gives (`option`'s value), else the one `path`'s name declares, else
    /// an error saying to give it.
    public static func declared(_ given: String?, of path: String, option: String) throws(DiskImageError) -> DiskFormat {
        if let given {
            guard let format = DiskFormat(rawValue: given) else { throw .invalidArgument(field: option, reason: "'\(given)' is not one of qcow2, raw") }
            return format
        }
        guard let format = declared(byName: path) else {
            throw .invalidArgument(field: option, reason: "the name of \(path) does not say whether it is raw or qcow2; give \(option) raw or \(option) qcow2 (a format is never read from a disk's content, which a guest may have written)")
        }
        return format
    }
}

public enum DiskImages {
    /// Which backing files a qcow2 image may rest on.
    public enum Backing: Sendable, Equatable {
        /// Exactly this chain, nearest first, absolute paths with their formats: what a VM's
        /// definition records. `[]`: the image rests on nothing, whatever its header says.
        case recorded([BackingLayer])
        /// Whatever the header names, in the format it records (a missing format is refused,
        /// never probed): for images a person names directly, not for a VM's disks.
        case fromHeader

        public static let standalone = Backing.recorded([])
    }

    /// Opens an image in the format the caller knows (a definition, a declaration), never the
    /// one its bytes claim. `snapshot` (an internal snapshot's name or ID, qcow2 only) opens the
    /// disk as it was then, read-only.
    /// `direct`: O_DIRECT (`cache=none`), the whole chain.
    public static func open(path: String, format: DiskFormat, readOnly: Bool = false, snapshot: String? = nil,
                            backing: Backing = .standalone, direct: Bool = false) throws(DiskImageError) -> any DiskImage {
        if DiskFormat.isNetworkAddress(path) {
            // A network disk is a raw disk on nothing; connected and negotiated at once (no jail here).
            guard format == .raw, snapshot == nil, !direct, backing == .standalone || backing == .fromHeader else {
                throw .invalidArgument(field: "disk", reason: "\(path.prefix(300)) is a network disk: a raw disk resting on nothing, without snapshots or cache=none")
            }
            return try NetworkDisk.connect(path: path, readOnly: readOnly, reconnectSeconds: 0).decode()
        }
        switch backing {
        case let .recorded(layers):
            return try openFiles(path: path, format: format, readOnly: readOnly, snapshot: snapshot, backing: layers, direct: direct).decode()
        case .fromHeader:
            if snapshot != nil && !readOnly { throw .invalidArgument(field: "snapshot", reason: "a snapshot can only be opened read-only") }
            let file = try ImageFile(path: path, writable: !readOnly, direct: direct)
            switch format {
            case .raw:
                if let snapshot { throw .invalidArgument(field: "snapshot", reason: "raw images have no snapshots ('\(snapshot)' asked for)") }
                return try RawImage(file: file)
            case .qcow2:
                try refuseQCOW2(on: file)
                return try QCOW2Image(file: file, snapshot: snapshot, backing: .header(depth: 0))
            }
        }
    }

    /// qcow2 grows its file as clusters are allocated; a block device cannot grow.
    static func refuseQCOW2(on file: ImageFile) throws(DiskImageError) {
        if file.isBlockDevice {
            throw .invalidArgument(field: "format", reason: "\(file.path) is a block device, which is a raw disk (qcow2 needs a file that can grow); give format=raw")
        }
    }

    /// A disk's files, opened (and locked) but not yet read: the image and each layer of the chain
    /// its definition records. A VMM opens these while it may still reach the host and decodes
    /// them once it is confined, since a VM's writable image is its own uid's to write
    /// (docs/isolation.md).
    public struct OpenedFiles: @unchecked Sendable {
        /// Nil when only the layers were opened (`openFiles(layersOf:)`).
        let image: ImageFile?
        let path: String
        let format: DiskFormat
        let snapshot: String?
        let layers: [(file: ImageFile, format: DiskFormat)]

        /// Reads the headers and tables: each layer from the bottom up, each one's header held to
        /// the layer below it.
        public func decode() throws(DiskImageError) -> any DiskImage {
            guard let image else { throw .invalidArgument(field: "disk", reason: "\(path) was not opened, only what it rests on") }
            return try DiskImages.decode(image, format: format, snapshot: snapshot, resting: try decodeLayers())
        }

        /// The layers alone, read: what the image rests on (nil: nothing).
        public func decodeLayers() throws(DiskImageError) -> (any DiskImage)? {
            var below: (any DiskImage)?
            for layer in layers.reversed() {
                below = try DiskImages.decode(layer.file, format: layer.format, snapshot: nil, resting: below)
            }
            return below
        }
    }

    /// The layers a disk rests on, opened read-only, without the image itself: another process
    /// (a migration's source) holds it until it hands it over.
    public static func openFiles(layersOf path: String, format: DiskFormat, backing layers: [BackingLayer]) throws(DiskImageError) -> OpenedFiles {
        let checked = try openFiles(path: nil, displayPath: path, format: format, readOnly: true, snapshot: nil, backing: layers)
        return checked
    }

    /// Opens the image at `path` again, on layers still open: after a migration's handover.
    public static func reopen(path: String, format: DiskFormat, readOnly: Bool, on below: (any DiskImage)?, direct: Bool = false) throws(DiskImageError) -> any DiskImage {
        try decode(try ImageFile(path: path, writable: !readOnly, direct: direct), format: format, snapshot: nil, resting: below)
    }

    public static func openFiles(path: String, format: DiskFormat, readOnly: Bool = false, snapshot: String? = nil,
                                 backing layers: [BackingLayer], direct: Bool = false) throws(DiskImageError) -> OpenedFiles {
        try openFiles(path: path, displayPath: path, format: format, readOnly: readOnly, snapshot: snapshot, backing: layers, direct: direct)
    }

    static func openFiles(path openImage: String?, displayPath path: String, format: DiskFormat, readOnly: Bool, snapshot: String?,
                          backing layers: [BackingLayer], direct: Bool = false) throws(DiskImageError) -> OpenedFiles {
        if snapshot != nil && !readOnly { throw .invalidArgument(field: "snapshot", reason: "a snapshot can only be opened read-only") }
        if format == .raw, !layers.isEmpty {
            throw .invalidArgument(field: "backing", reason: "\(path) is a raw disk, and a raw disk rests on nothing")
        }
        if format == .raw, let snapshot { throw .invalidArgument(field: "snapshot", reason: "raw images have no snapshots ('\(snapshot)' asked for)") }
        guard layers.count <= QCOW2Image.maximumBackingDepth else {
            throw .invalidArgument(field: "backing", reason: "\(path) rests on \(layers.count) images; at most \(QCOW2Image.maximumBackingDepth)")
        }
        for (index, layer) in layers.enumerated() where index + 1 < layers.count && layer.format == .raw {
            throw .invalidArgument(field: "backing", reason: "\(layer.path) is raw, and a raw image cannot rest on \(layers[index + 1].path)")
        }
        var opened: [(file: ImageFile, format: DiskFormat)] = []
        for layer in layers {
            guard layer.path.hasPrefix("/") else { throw .invalidArgument(field: "backing", reason: "\(layer.path) is not an absolute path") }
            opened.append((try ImageFile(path: layer.path, writable: false, direct: direct), layer.format))
        }
        let image = try openImage.map { (top) throws(DiskImageError) in try ImageFile(path: top, writable: !readOnly, direct: direct) }
        return OpenedFiles(image: image, path: path, format: format, snapshot: snapshot, layers: opened)
    }

    static func decode(_ file: ImageFile, format: DiskFormat, snapshot: String?, resting below: (any DiskImage)?) throws(DiskImageError) -> any DiskImage {
        switch format {
        case .raw: return try RawImage(file: file)
        case .qcow2:
            try refuseQCOW2(on: file)
            return try QCOW2Image(file: file, snapshot: snapshot, backing: below.map { QCOW2Image.BackingSource.image($0) } ?? .nothing)
        }
    }

    /// Opens the qcow2 overlay at `path` whose backing file is `backing`, already open here: a
    /// live snapshot moves a running disk onto an overlay without opening (and locking) its
    /// image twice.
    public static func openOverlay(path: String, on backing: any DiskImage, direct: Bool = false) throws(DiskImageError) -> any DiskImage {
        let file = try ImageFile(path: path, writable: true, direct: direct)
        return try QCOW2Image(file: file, backing: .image(backing))
    }

    /// An image's virtual size from its header (qcow2) or its length (raw), read in the format
    /// given, without opening it as a disk (no lock, no tables read): for images a running VM
    /// holds.
    public static func peek(path: String, format: DiskFormat) throws(DiskImageError) -> UInt64 {
        // An export's size is what its server says (NBD_OPT_GO), asked read-only.
        if DiskFormat.isNetworkAddress(path) { return try open(path: path, format: format, readOnly: true).virtualSize }
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        switch format {
        case .qcow2:
            var header = [UInt8](repeating: 0, count: 32)
            let count = header.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            guard count >= 32, Array(header[0..<4]) == QCOW2Image.magic else {
                throw .invalidImage(path: path, reason: "recorded as qcow2, but it has no qcow2 header")
            }
            return header[24..<32].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        case .raw:
            // The end, not st_size: a block device's st_size is 0.
            let end = lseek(fd, 0, SEEK_END)
            guard end >= 0 else { throw .io(operation: "seek to the end", path: path, errno: errno) }
            return UInt64(end)
        }
    }

    /// Creates a new image (private to its owner); refuses to touch an existing file. `backing`
    /// is written into the header as given, name and format: nothing is read from it.
    public static func create(path: String, format: DiskFormat, size: UInt64, backing: BackingLayer? = nil,
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

    /// `path` with `.` and empty components dropped and `..` applied, without asking the file
    /// system: how two names of one backing file are compared.
    public static func normalized(_ path: String) -> String {
        var parts: [Substring] = []
        for part in path.split(separator: "/", omittingEmptySubsequences: true) {
            if part == "." { continue }
            if part == ".." { if !parts.isEmpty { parts.removeLast() }; continue }
            parts.append(part)
        }
        return (path.hasPrefix("/") ? "/" : "") + parts.joined(separator: "/")
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

    public func discard(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        guard file.isBlockDevice else { return try writeZeroes(at: offset, length: length) }
        guard length <= UInt64(Int.max) else { throw .outOfRange(path: path, offset: offset, length: Int.max, size: virtualSize) }
        try checkRange(offset, Int(length))
        try file.discardOnDevice(at: offset, length: length)
    }

    public func resize(to size: UInt64) throws(DiskImageError) {
        guard size >= virtualSize else {
            throw .invalidArgument(field: "--size", reason: "shrinking would destroy data; \(size) is below the current \(virtualSize) bytes")
        }
        try file.truncate(to: size)
    }

    public func info() throws(DiskImageError) -> DiskInfo {
        DiskInfo(path: path, format: .raw, virtualSize: virtualSize, allocatedBytes: try file.allocatedBytes,
                 clusterSize: nil, backingChain: [], blockDevice: file.isBlockDevice ? true : nil)
    }
}

extension DiskImages {
    /// The virtual size of an image in the format its definition records, read without the
    /// image's lock, for listings of VMs that may be running. Nil if the file cannot be read.
    public static func recordedVirtualSize(path: String, format: DiskFormat) -> UInt64? {
        try? peek(path: path, format: format)
    }
}
