import DiskImage
import MachineSpec

/// Disk images on their own, outside any VM: what `vireo disk create/info/resize` and
/// `POST /api/disks`, `GET /api/disks/info`, `POST /api/disks/resize` do. Written once here;
/// each front end parses, applies its own path policy (the API's `--allow-path`), calls one of
/// these and renders the result. A format is what the caller declares (or the name does), never
/// what the content claims.
public enum StandaloneDisks {
    public struct CreateRequest: Sendable {
        public var path: String
        public var format: DiskFormat
        /// nil: the backing image's size.
        public var sizeBytes: UInt64?
        /// The image the new one rests on (qcow2 only); a relative path is relative to the new
        /// image's directory, as qcow2 records it.
        public var backing: BackingLayer?
        public var preallocate = false
        public var clusterSize: UInt64 = 65536

        public init(path: String, format: DiskFormat, sizeBytes: UInt64? = nil, backing: BackingLayer? = nil) {
            self.path = path; self.format = format; self.sizeBytes = sizeBytes; self.backing = backing
        }
    }

    /// Makes a new image (never over an existing file) and returns what it is.
    public static func create(_ request: CreateRequest) throws(DiskImageError) -> DiskInfo {
        var size = request.sizeBytes
        if size == nil, let layer = request.backing {
            let base = layer.path.hasPrefix("/") ? layer.path : directory(of: request.path) + "/" + layer.path
            size = try DiskImages.open(path: base, format: layer.format, readOnly: true, backing: .fromHeader).virtualSize
        }
        guard let size else {
            throw .invalidArgument(field: "--size", reason: "missing; give a size such as 20G (or a backing image to take it from)")
        }
        try DiskImages.create(path: request.path, format: request.format, size: size, backing: request.backing,
                              preallocate: request.preallocate, clusterSize: request.clusterSize)
        return try info(path: request.path, format: request.format)
    }

    /// An image's format, sizes, chain and snapshots, opened read-only.
    public static func info(path: String, format: DiskFormat) throws(DiskImageError) -> DiskInfo {
        try DiskImages.open(path: path, format: format, readOnly: true, backing: .fromHeader).info()
    }

    /// Grows an image (shrinking is refused) and returns it as it now is.
    public static func resize(path: String, format: DiskFormat, to size: UInt64) throws(DiskImageError) -> DiskInfo {
        // Closed before it is read again: an open image keeps the size it was opened with.
        try DiskImages.open(path: path, format: format, backing: .fromHeader).resize(to: size)
        return try info(path: path, format: format)
    }

    /// The directory a path is in, as qcow2 resolves a relative backing name.
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
