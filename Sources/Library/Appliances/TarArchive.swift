#if canImport(Glibc)
import Glibc
#endif

/// A USTAR archive (an OVA) read by its headers: each member's name, where its bytes start and
/// how many there are. Only plain files with plain names are taken — no directories, links,
/// devices, long-name or pax extensions, no `/` or `..` in a name — so nothing in an archive can
/// name a place outside the directory it is unpacked into. Every header's checksum and size is
/// checked against the archive's length.
public struct TarArchive: Sendable {
    public struct Member: Sendable, Equatable {
        public var name: String
        public var offset: UInt64
        public var size: UInt64
    }

    public let path: String
    public let members: [Member]
    static let maximumMembers = 1024

    public init(path: String) throws(LibraryError) {
        self.path = path
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0, status.st_mode & S_IFMT == S_IFREG else {
            throw .invalidValue(field: "file", reason: "\(path) is not a regular file")
        }
        let length = UInt64(status.st_size)
        func refuse(_ why: String) -> LibraryError { .invalidValue(field: "file", reason: "\(path) is not a usable OVA (a tar archive): \(why)") }
        var members: [Member] = []
        var offset: UInt64 = 0
        var header = [UInt8](repeating: 0, count: 512)
        while true {
            guard offset + 512 <= length else {
                // Archives end with two zero blocks, but a writer that stops after the last
                // member's padding left nothing out.
                if offset == length, !members.isEmpty { break }
                throw refuse("it ends inside a header at byte \(offset)")
            }
            let count = header.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 512, off_t(offset)) }
            guard count == 512 else { throw .io(operation: "read", path: path, errno: count < 0 ? errno : EIO) }
            if header.allSatisfy({ $0 == 0 }) { break }
            guard members.count < Self.maximumMembers else { throw refuse("more than \(Self.maximumMembers) members") }
            let recorded = Self.octal(header[148..<156])
            let computed = header.enumerated().reduce(UInt64(0)) { $0 + UInt64((148..<156).contains($1.offset) ? 0x20 : $1.element) }
            guard recorded == computed else { throw refuse("the header at byte \(offset) has a wrong checksum") }
            let type = header[156]
            let name = Self.text(header[0..<100])
            // POSIX ustar ("ustar\0") has a name prefix field; GNU's ("ustar ") keeps times there.
            let prefix = Array(header[257..<263]) == Array("ustar".utf8) + [0] ? Self.text(header[345..<500]) : ""
            guard type == 0x30 || type == 0 else {
                let kind = type == 0x35 ? "a directory" : type == 0x31 || type == 0x32 ? "a link" : type == 0x4c || type == 0x78 || type == 0x67 ? "a long-name or pax extension" : "a special file"
                throw refuse("'\(name.prefix(100))' is \(kind); an OVA holds plain files only")
            }
            guard prefix.isEmpty, !name.isEmpty, name.utf8.count <= 99, !name.contains("/"), !name.contains("\\"), !name.hasPrefix("."),
                  name.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value != 0x7f }) else {
                throw refuse("the member name '\((prefix.isEmpty ? "" : prefix + "/") + name.prefix(100))' is not a plain file name (no '/', '..' or leading '.')")
            }
            guard let size = Self.size(header[124..<136]) else { throw refuse("'\(name)' has an unreadable size") }
            let start = offset + 512
            guard size <= length, start <= length - size else { throw refuse("'\(name)' claims \(size) bytes, beyond the archive's end") }
            guard !members.contains(where: { $0.name == name }) else { throw refuse("'\(name)' appears twice") }
            members.append(Member(name: name, offset: start, size: size))
            offset = start + (size + 511) / 512 * 512
        }
        guard !members.isEmpty else { throw refuse("it holds no file") }
        self.members = members
    }

    public func member(_ name: String) -> Member? { members.first { $0.name == name } }

    /// A member's bytes; refused past `limit` (an envelope or manifest is read whole).
    public func read(_ member: Member, limit: UInt64) throws(LibraryError) -> [UInt8] {
        guard member.size <= limit else {
            throw .invalidValue(field: "file", reason: "\(member.name) in \(path) is \(member.size) bytes; at most \(limit) are read")
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: Int(member.size))
        var done = 0
        while done < bytes.count {
            let count = bytes.withUnsafeMutableBytes { raw -> Int in
                guard let base = raw.baseAddress else { return -1 }
                return pread(fd, base + done, raw.count - done, off_t(member.offset) + off_t(done))
            }
            guard count > 0 else { throw .io(operation: "read", path: path, errno: count < 0 ? errno : EIO) }
            done += count
        }
        return bytes
    }

    /// Copies a member into a new file (never over one).
    public func extract(_ member: Member, to target: String) throws(LibraryError) {
        let input = open(path, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(input) }
        let output = open(target, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard output >= 0 else { throw .io(operation: "create", path: target, errno: errno) }
        defer { close(output) }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var done: UInt64 = 0
        while done < member.size {
            let want = Int(min(UInt64(buffer.count), member.size - done))
            let count = buffer.withUnsafeMutableBytes { pread(input, $0.baseAddress, want, off_t(member.offset + done)) }
            guard count > 0 else { throw .io(operation: "copy \(member.name) out of", path: path, errno: count < 0 ? errno : EIO) }
            // Runs of zeros become holes, as in a sparse copy: disks are mostly empty.
            if buffer[0..<count].allSatisfy({ $0 == 0 }) {
                guard ftruncate(output, off_t(done) + off_t(count)) == 0 else { throw .io(operation: "extend", path: target, errno: errno) }
            } else {
                let written = buffer.withUnsafeBytes { pwrite(output, $0.baseAddress, count, off_t(done)) }
                guard written == count else { throw .io(operation: "write", path: target, errno: written < 0 ? errno : EIO) }
            }
            done += UInt64(count)
        }
    }

    static func text(_ field: ArraySlice<UInt8>) -> String {
        String(decoding: field.prefix { $0 != 0 }, as: UTF8.self)
    }

    static func octal(_ field: ArraySlice<UInt8>) -> UInt64? {
        let digits = field.drop { $0 == 0x20 }.prefix { $0 >= 0x30 && $0 <= 0x37 }
        guard !digits.isEmpty, digits.count <= 22 else { return nil }
        return digits.reduce(UInt64(0)) { $0 << 3 | UInt64($1 - 0x30) }
    }

    /// Octal, or GNU's base-256 form (high bit set) for members of 8 GiB and more.
    static func size(_ field: ArraySlice<UInt8>) -> UInt64? {
        guard let first = field.first else { return nil }
        if first & 0x80 != 0 {
            let rest = field.dropFirst()
            guard rest.prefix(rest.count - 8).allSatisfy({ $0 == 0 }) else { return nil }
            return rest.suffix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        }
        return octal(field)
    }
}
