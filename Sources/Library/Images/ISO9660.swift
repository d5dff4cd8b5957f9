#if canImport(Glibc)
import Glibc
#endif

/// Files inside an ISO 9660 image (ECMA-119), read the way the guest's CD-ROM drive would show
/// them: what the unattended install takes out of an installer (its kernel, initrd and
/// `.disk/info`). The image is the user's download, so hostile input: every extent is checked
/// against the file's size, directories are bounded in size, and a path is looked up component
/// by component (no walk of the whole tree, so no loop a crafted image could make).
///
/// Names: a Rock Ridge `NM` entry (what xorriso and genisoimage write for Debian's and Ubuntu's
/// ISOs) when the record has one, else the ISO 9660 name without its `;1` version and trailing
/// dot; compared without regard to case, as the primary names are upper case.
public struct ISO9660Image {
    public struct Entry: Sendable, Equatable {
        public var name: String
        /// First logical block (2048 bytes) of the extent.
        public var block: UInt32
        public var size: UInt32
        public var isDirectory: Bool
    }

    static let blockSize = 2048
    /// Directories larger than this are refused: Debian's largest (pool/main) is a few hundred KiB.
    static let maximumDirectoryBytes: UInt32 = 4 << 20
    /// Path components followed at most.
    static let maximumDepth = 16

    public let path: String
    let fd: Int32
    let fileSize: UInt64
    let root: Entry

    /// Opens `path`, reads its primary volume descriptor and root directory record.
    public init(path: String, field: String = "iso") throws(LibraryError) {
        self.path = path
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open the ISO", path: path, errno: errno) }
        var status = stat()
        guard fstat(fd, &status) == 0 else {
            let code = errno
            Glibc.close(fd)
            throw .io(operation: "stat the ISO", path: path, errno: code)
        }
        self.fd = fd
        fileSize = UInt64(max(status.st_size, 0))
        var descriptor = [UInt8](repeating: 0, count: Self.blockSize)
        let count = descriptor.withUnsafeMutableBytes { pread(fd, $0.baseAddress, Self.blockSize, off_t(16 * Self.blockSize)) }
        guard count == Self.blockSize, descriptor[0] == 1, Array(descriptor[1..<6]) == Array("CD001".utf8),
              let root = Self.record(descriptor, at: 156) else {
            Glibc.close(fd)
            throw .invalidValue(field: field, reason: "\(path) has no ISO 9660 primary volume descriptor with a root directory at sector 16")
        }
        guard root.entry.isDirectory else {
            Glibc.close(fd)
            throw .invalidValue(field: field, reason: "\(path): the ISO 9660 root directory record does not describe a directory")
        }
        self.root = root.entry
    }

    public func close() { Glibc.close(fd) }

    /// The root directory, as the primary volume descriptor records it.
    public var rootEntry: Entry { root }

    /// A directory record at `offset` of `bytes`: its entry and its length, nil when it is
    /// malformed (too short, running past the buffer). The name is Rock Ridge's when given.
    static func record(_ bytes: [UInt8], at offset: Int) -> (entry: Entry, length: Int)? {
        guard offset + 34 <= bytes.count else { return nil }
        let length = Int(bytes[offset])
        let nameLength = Int(bytes[offset + 32])
        guard length >= 34, offset + length <= bytes.count, 33 + nameLength <= length else { return nil }
        func le32(_ at: Int) -> UInt32 {
            UInt32(bytes[offset + at]) | UInt32(bytes[offset + at + 1]) << 8 | UInt32(bytes[offset + at + 2]) << 16 | UInt32(bytes[offset + at + 3]) << 24
        }
        let flags = bytes[offset + 25]
        let rawName = Array(bytes[(offset + 33)..<(offset + 33 + nameLength)])
        var name: String
        if rawName == [0] {
            name = "."
        } else if rawName == [1] {
            name = ".."
        } else {
            name = String(decoding: rawName, as: UTF8.self)
            if let semicolon = name.firstIndex(of: ";") { name = String(name[..<semicolon]) }
            if name.hasSuffix(".") { name.removeLast() }
        }
        // System use area (SUSP): after the name, padded to an even offset.
        var use = offset + 33 + nameLength + (nameLength % 2 == 0 ? 1 : 0)
        let end = offset + length
        var rockRidge: [UInt8] = []
        var sawName = false
        while use + 4 <= end {
            let entryLength = Int(bytes[use + 2])
            guard entryLength >= 4, use + entryLength <= end else { break }
            if bytes[use] == UInt8(ascii: "N"), bytes[use + 1] == UInt8(ascii: "M"), entryLength >= 5 {
                let nameFlags = bytes[use + 4]
                // Flags 2 and 4 are "." and ".."; a plain name has neither.
                if nameFlags & 0x6 == 0 {
                    rockRidge += bytes[(use + 5)..<(use + entryLength)]
                    sawName = true
                }
            }
            use += entryLength
        }
        if sawName, !rockRidge.isEmpty, rockRidge.count <= 255 { name = String(decoding: rockRidge, as: UTF8.self) }
        return (Entry(name: name, block: le32(2), size: le32(10), isDirectory: flags & 0x02 != 0), length)
    }

    /// The entries of a directory, "." and ".." left out.
    public func entries(of directory: Entry) throws(LibraryError) -> [Entry] {
        guard directory.isDirectory else { throw .invalidValue(field: "iso", reason: "\(path): \(directory.name) is not a directory") }
        guard directory.size <= Self.maximumDirectoryBytes else {
            throw .invalidValue(field: "iso", reason: "\(path): directory \(directory.name) is \(directory.size) bytes, more than the \(Self.maximumDirectoryBytes) an installer's has")
        }
        let bytes = try read(directory, limit: Self.maximumDirectoryBytes)
        var entries: [Entry] = []
        var sector = 0
        // Records do not cross sector boundaries; a zero length byte ends a sector's records.
        while sector < bytes.count {
            var offset = sector
            let sectorEnd = min(sector + Self.blockSize, bytes.count)
            while offset < sectorEnd, bytes[offset] != 0 {
                guard let (entry, length) = Self.record(Array(bytes[offset..<sectorEnd]), at: 0) else { break }
                if entry.name != "." && entry.name != ".." { entries.append(entry) }
                offset += length
            }
            sector += Self.blockSize
        }
        return entries
    }

    /// The entry at `path` ("/install.amd/vmlinuz"), nil when some component is missing.
    public func lookup(_ path: String) throws(LibraryError) -> Entry? {
        let components = path.split(separator: "/").map(String.init)
        guard components.count <= Self.maximumDepth else { return nil }
        var current = root
        for component in components {
            guard current.isDirectory else { return nil }
            let wanted = component.lowercased()
            guard let next = try entries(of: current).first(where: { $0.name.lowercased() == wanted }) else { return nil }
            current = next
        }
        return current
    }

    /// An extent's bytes, refusing one larger than `limit` or past the end of the file.
    public func read(_ entry: Entry, limit: UInt32) throws(LibraryError) -> [UInt8] {
        try checkExtent(entry)
        guard entry.size <= limit else {
            throw .invalidValue(field: "iso", reason: "\(path): \(entry.name) is \(entry.size) bytes, more than the \(limit) expected")
        }
        var bytes = [UInt8](repeating: 0, count: Int(entry.size))
        var done = 0
        while done < bytes.count {
            let count = bytes.withUnsafeMutableBytes {
                pread(fd, $0.baseAddress! + done, $0.count - done, off_t(UInt64(entry.block) * UInt64(Self.blockSize) + UInt64(done)))
            }
            guard count > 0 else { throw .io(operation: "read \(entry.name) from the ISO", path: path, errno: count < 0 ? errno : EIO) }
            done += count
        }
        return bytes
    }

    /// Copies a file's extent to `destination` (mode 0600), refusing one past the end of the image.
    public func copy(_ entry: Entry, to destination: String) throws(LibraryError) {
        try checkExtent(entry)
        let output = open(destination, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard output >= 0 else { throw .io(operation: "create", path: destination, errno: errno) }
        defer { Glibc.close(output) }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var done: UInt64 = 0
        let total = UInt64(entry.size)
        let start = UInt64(entry.block) * UInt64(Self.blockSize)
        while done < total {
            let want = Int(min(UInt64(buffer.count), total - done))
            let count = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(start + done)) }
            guard count > 0 else { throw .io(operation: "read \(entry.name) from the ISO", path: path, errno: count < 0 ? errno : EIO) }
            var written = 0
            while written < count {
                let result = buffer.withUnsafeBytes { write(output, $0.baseAddress! + written, count - written) }
                guard result > 0 else { throw .io(operation: "write", path: destination, errno: errno) }
                written += result
            }
            done += UInt64(count)
        }
    }

    func checkExtent(_ entry: Entry) throws(LibraryError) {
        let end = UInt64(entry.block) * UInt64(Self.blockSize) + UInt64(entry.size)
        guard end <= fileSize else {
            throw .invalidValue(field: "iso", reason: "\(path): \(entry.name) claims bytes up to \(end), past the image's end (\(fileSize) bytes); the ISO is truncated or damaged")
        }
    }
}
