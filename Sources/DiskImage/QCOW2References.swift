import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// What a qcow2 header names beyond the image itself — a backing file (and the format it
/// records for it) and an external data file — read from the header cluster without opening
/// anything it names. Whoever wrote the file chose these bytes: an image from elsewhere must name
/// nothing (docs/security.md), a VM's image must name what its definition records.
public struct QCOW2References: Sendable, Equatable {
    /// The backing file as written; a relative name is relative to the image's directory.
    public var backingName: String?
    /// The backing file's format as the header records it (extension 0xE2792ACA); nil when it
    /// records none.
    public var backingFormat: DiskFormat?
    /// Set when the image keeps its data in another file (incompatible feature bit 2).
    public var hasExternalData = false
    /// That file's name, from the header's data-file extension (0x44415441), when it gives one.
    public var dataFile: String?

    static let backingFormatExtension: UInt32 = 0xe279_2aca
    static let dataFileExtension: UInt32 = 0x4441_5441
    static let externalDataBit: UInt64 = 1 << 2

    /// Parses the header extensions of an image whose fixed header fields `header` (its first 112
    /// bytes) were already checked. Bounded by the header cluster and the file.
    init(header: [UInt8], file: ImageFile, version: UInt32, headerLength: UInt64, clusterSize: UInt64) throws(DiskImageError) {
        let path = file.path
        let fileSize = try file.size
        let limit = min(clusterSize, fileSize)
        let backingOffset = header.be(UInt64.self, at: 8)
        let backingLength = UInt64(header.be(UInt32.self, at: 16))
        if backingOffset != 0 {
            guard backingLength > 0, backingLength <= 1023, backingOffset <= limit, backingLength <= limit - backingOffset else {
                throw .invalidImage(path: path, reason: "backing file name at \(backingOffset) (\(backingLength) bytes) is outside the header cluster")
            }
            backingName = String(decoding: try file.readBytes(count: Int(backingLength), at: backingOffset), as: UTF8.self)
        }
        guard version >= 3 else { return }
        hasExternalData = header.be(UInt64.self, at: 72) & Self.externalDataBit != 0
        // Extensions follow the fixed header: type, length, data padded to 8 bytes; type 0 ends them.
        var cursor = headerLength
        let end = backingOffset != 0 ? min(limit, backingOffset) : limit
        for _ in 0..<256 {
            guard cursor <= end, end - cursor >= 8 else { break }
            let entry = try file.readBytes(count: 8, at: cursor)
            let type = entry.be(UInt32.self, at: 0)
            let length = UInt64(entry.be(UInt32.self, at: 4))
            if type == 0 { break }
            guard length <= end - cursor - 8 else {
                throw .invalidImage(path: path, reason: "header extension 0x\(String(type, radix: 16)) at \(cursor) runs past the header")
            }
            switch type {
            case Self.backingFormatExtension:
                let name = String(decoding: try file.readBytes(count: Int(length), at: cursor + 8), as: UTF8.self)
                guard let format = DiskFormat(rawValue: name) else {
                    throw .unsupported(path: path, feature: "a backing file in format '\(name.prefix(32))' (only raw and qcow2)")
                }
                backingFormat = format
            case Self.dataFileExtension:
                dataFile = String(decoding: try file.readBytes(count: Int(length), at: cursor + 8), as: UTF8.self)
            default:
                break
            }
            cursor += 8 + (length + 7) / 8 * 8
        }
    }

    /// The references of the qcow2 image at `path`, read without its lock (a running VM may
    /// hold it) and without following any of them.
    public static func read(path: String) throws(DiskImageError) -> QCOW2References {
        let file = try ImageFile(unlockedReadingAt: path)
        let header = try file.readBytes(count: 112, at: 0)
        guard Array(header[0..<4]) == QCOW2Image.magic else { throw .invalidImage(path: path, reason: "no qcow2 magic") }
        let version = header.be(UInt32.self, at: 4)
        guard version == 2 || version == 3 else { throw .unsupported(path: path, feature: "qcow2 version \(version)") }
        let clusterBits = UInt64(header.be(UInt32.self, at: 20))
        guard (9...21).contains(clusterBits) else { throw .invalidImage(path: path, reason: "cluster_bits \(clusterBits) is outside 9...21") }
        var headerLength: UInt64 = 72
        if version == 3 {
            headerLength = UInt64(header.be(UInt32.self, at: 100))
            guard headerLength >= 104, headerLength <= 1 << clusterBits else { throw .invalidImage(path: path, reason: "header length \(headerLength)") }
        }
        return try QCOW2References(header: header, file: file, version: version, headerLength: headerLength, clusterSize: 1 << clusterBits)
    }

    /// Nothing beyond the image: what an image from elsewhere must be before Vireo uses it.
    public var isStandalone: Bool { backingName == nil && !hasExternalData }
}
