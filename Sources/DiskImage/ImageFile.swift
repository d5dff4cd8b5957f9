import CDiskHost
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An open image file or block device: positioned reads and writes with errors that keep the
/// path and errno.
final class ImageFile: @unchecked Sendable {
    let path: String
    let fd: Int32
    let writable: Bool
    /// A block device (a disk, partition, loop device, LVM volume): its size is the device's, and
    /// zeroing and discarding go to the device (docs/disk-images.md, "Block devices").
    let isBlockDevice: Bool
    /// The device's logical block size (512 for files): the unit its zeroing works in.
    let logicalBlockSize: UInt64
    /// Nonzero when opened with O_DIRECT (`cache=none`): the alignment of buffer address, offset
    /// and length every transfer needs. Transfers that lack it go through an aligned bounce
    /// buffer, so nothing a guest sends can make the host call fail.
    let directAlignment: Int
    private let deviceSize: UInt64
    /// Serialises the read-modify-write of partial blocks under O_DIRECT: two unaligned writes to
    /// different bytes of one block must not both write back the old block.
    private let partialBlocks = Mutex<Void>(())

    init(path: String, writable: Bool, direct: Bool = false) throws(DiskImageError) {
        let flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | (direct ? vireo_open_direct_flag() : 0)
        let fd = open(path, flags)
        guard fd >= 0 else {
            if direct && errno == EINVAL { throw .unsupported(path: path, feature: "cache=none (O_DIRECT) on its file system") }
            throw .io(operation: "open", path: path, errno: errno)
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else { let code = errno; close(fd); throw .io(operation: "fstat", path: path, errno: code) }
        isBlockDevice = (info.st_mode & S_IFMT) == S_IFBLK
        if isBlockDevice {
            // Held exclusively as the kernel sees it (O_EXCL on a block device): refused while it
            // is mounted, swap, or part of LVM or RAID. The open descriptor is reopened, so the
            // claim is on the very device checked. A reader checks and lets go: readers share.
            let claim = open("/proc/self/fd/\(fd)", flags | O_EXCL)
            guard claim >= 0 else {
                let code = errno
                close(fd)
                if code == EBUSY { throw .deviceBusy(path: path, mountPoint: HostMountTable.mountPoint(of: info.st_rdev)) }
                throw .io(operation: "open exclusively", path: path, errno: code)
            }
            var size: UInt64 = 0
            var logical: UInt32 = 512
            let result = vireo_device_geometry(fd, &size, &logical)
            guard result == 0 else { close(claim); close(fd); throw .io(operation: "read the device's size", path: path, errno: result) }
            if writable {
                close(fd)
                self.fd = claim
            } else {
                close(claim)
                self.fd = fd
            }
            deviceSize = size
            logicalBlockSize = UInt64(logical)
        } else {
            guard (info.st_mode & S_IFMT) == S_IFREG else {
                close(fd)
                throw .invalidArgument(field: "disk", reason: "\(path) is neither a regular file nor a block device")
            }
            self.fd = fd
            deviceSize = 0
            logicalBlockSize = 512
        }
        // Files: 4 KiB covers every file system's direct I/O alignment; devices: their own.
        directAlignment = direct ? max(Int(logicalBlockSize), isBlockDevice ? 512 : 4096) : 0
        // A writer excludes everyone; readers share. Two writers (or a writer and a reader that
        // caches metadata) on one image would corrupt it or see stale data.
        // A conflict is retried for ~100 ms: a process that forked while another opener held the
        // image keeps the lock alive until it execs, which is brief but real.
        var attempts = 0
        while flock(self.fd, (writable ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0 {
            let code = errno
            attempts += 1
            if code == EWOULDBLOCK && attempts < 20 {
                usleep(5000)
                continue
            }
            close(self.fd)
            if code == EWOULDBLOCK { throw .inUse(path: path) }
            throw .io(operation: "lock", path: path, errno: code)
        }
        self.path = path
        self.writable = writable
    }

    /// Opens for reading only what a header says, without a lock: a running VM may hold it.
    init(unlockedReadingAt path: String) throws(DiskImageError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        self.path = path
        self.fd = fd
        self.writable = false
        // Only headers are read through it: no device geometry is needed.
        isBlockDevice = false
        deviceSize = 0
        logicalBlockSize = 512
        directAlignment = 0
    }

    /// Creates a new file, private to its owner (guest data is nobody else's); never replaces an
    /// existing one (O_EXCL, and O_NOFOLLOW: not through a link someone planted).
    init(creating path: String) throws(DiskImageError) {
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            if errno == EEXIST { throw .alreadyExists(path: path) }
            throw .io(operation: "create", path: path, errno: errno)
        }
        _ = flock(fd, LOCK_EX | LOCK_NB)
        self.path = path
        self.fd = fd
        self.writable = true
        isBlockDevice = false
        deviceSize = 0
        logicalBlockSize = 512
        directAlignment = 0
    }

    deinit { close(fd) }

    var size: UInt64 {
        get throws(DiskImageError) {
            if isBlockDevice { return deviceSize }
            var info = stat()
            guard fstat(fd, &info) == 0 else { throw .io(operation: "fstat", path: path, errno: errno) }
            return UInt64(info.st_size)
        }
    }

    /// Bytes the file really occupies on the host (sparse files occupy less than their size); a
    /// block device occupies all of itself.
    var allocatedBytes: UInt64 {
        get throws(DiskImageError) {
            if isBlockDevice { return deviceSize }
            var info = stat()
            guard fstat(fd, &info) == 0 else { throw .io(operation: "fstat", path: path, errno: errno) }
            return UInt64(info.st_blocks) * 512
        }
    }

    private func isAligned(_ address: UnsafeRawPointer?, _ count: Int, _ offset: UInt64) -> Bool {
        let alignment = directAlignment
        guard alignment > 0 else { return true }
        return Int(bitPattern: address) % alignment == 0 && count % alignment == 0 && offset % UInt64(alignment) == 0
    }

    /// Reads exactly `buffer.count` bytes; bytes past the end of the file read as zero.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard let base = buffer.baseAddress else { return }
        guard isAligned(base, buffer.count, offset) else { return try bouncedRead(into: buffer, at: offset) }
        var done = 0
        while done < buffer.count {
            let got = pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if got < 0 {
                if errno == EINTR { continue }
                throw .io(operation: "read at \(offset + UInt64(done))", path: path, errno: errno)
            }
            // With O_DIRECT only the end of the file stops a read short of a whole block.
            if got == 0 || (directAlignment > 0 && (done + got) % directAlignment != 0) {
                done += got
                (base + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
            done += got
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard writable else { throw .readOnly(path: path) }
        guard let base = buffer.baseAddress else { return }
        guard isAligned(base, buffer.count, offset) else { return try bouncedWrite(buffer, at: offset) }
        var done = 0
        while done < buffer.count {
            let put = pwrite(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if put < 0 {
                if errno == EINTR { continue }
                throw .io(operation: "write at \(offset + UInt64(done))", path: path, errno: errno)
            }
            done += put
        }
    }

    /// At most this much of an unaligned transfer is bounced at once: a guest's request, however
    /// large, costs the VMM no more memory than this.
    static let bounceChunk = 1 << 20

    /// An aligned buffer for one bounced piece, freed after `body`.
    private func withBounceBuffer<Result>(_ count: Int, _ body: (UnsafeMutableRawBufferPointer) throws(DiskImageError) -> Result) throws(DiskImageError) -> Result {
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, directAlignment, count) == 0, let memory else {
            throw .io(operation: "allocate a \(count)-byte bounce buffer", path: path, errno: ENOMEM)
        }
        defer { free(memory) }
        return try body(UnsafeMutableRawBufferPointer(start: memory, count: count))
    }

    /// The aligned span of blocks around [offset, offset+count).
    private func span(_ offset: UInt64, _ count: Int) -> (start: UInt64, length: Int) {
        let alignment = UInt64(directAlignment)
        let start = offset / alignment * alignment
        let end = (offset + UInt64(count) + alignment - 1) / alignment * alignment
        return (start, Int(end - start))
    }

    private func bouncedRead(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard let base = buffer.baseAddress else { return }
        var done = 0
        while done < buffer.count {
            let piece = min(Self.bounceChunk, buffer.count - done)
            let position = offset + UInt64(done)
            let (start, length) = span(position, piece)
            try withBounceBuffer(length) { (bounce) throws(DiskImageError) in
                try read(into: bounce, at: start)
                (base + done).copyMemory(from: bounce.baseAddress! + Int(position - start), byteCount: piece)
            }
            done += piece
        }
    }

    private func bouncedWrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard let base = buffer.baseAddress else { return }
        let alignment = UInt64(directAlignment)
        var done = 0
        while done < buffer.count {
            let piece = min(Self.bounceChunk, buffer.count - done)
            let position = offset + UInt64(done)
            let (start, length) = span(position, piece)
            try partialBlocks.withLock { (_) throws(DiskImageError) in
                try withBounceBuffer(length) { (bounce) throws(DiskImageError) in
                    let bytes = bounce.baseAddress!
                    let sizeBefore = isBlockDevice ? 0 : try size
                    // The blocks the write covers only in part keep their other bytes.
                    if position % alignment != 0 {
                        try read(into: UnsafeMutableRawBufferPointer(start: bytes, count: Int(alignment)), at: start)
                    }
                    if (position + UInt64(piece)) % alignment != 0 && (length > Int(alignment) || position % alignment == 0) {
                        let last = length - Int(alignment)
                        try read(into: UnsafeMutableRawBufferPointer(start: bytes + last, count: Int(alignment)), at: start + UInt64(last))
                    }
                    (bytes + Int(position - start)).copyMemory(from: base + done, byteCount: piece)
                    try write(UnsafeRawBufferPointer(bounce), at: start)
                    // A file does not grow by the padding of its last block.
                    let end = start + UInt64(length)
                    if !isBlockDevice, end > sizeBefore {
                        let kept = max(sizeBefore, position + UInt64(piece))
                        guard ftruncate(fd, off_t(kept)) == 0 else { throw .io(operation: "ftruncate to \(kept)", path: path, errno: errno) }
                    }
                }
            }
            done += piece
        }
    }

    func readBytes(count: Int, at offset: UInt64) throws(DiskImageError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        // Result rather than a typed-throws closure: the latter crashes this compiler's IRGen.
        let outcome: Result<Void, DiskImageError> = bytes.withUnsafeMutableBytes { buffer in
            do throws(DiskImageError) { try read(into: buffer, at: offset); return .success(()) } catch { return .failure(error) }
        }
        try outcome.get()
        return bytes
    }

    func write(_ bytes: [UInt8], at offset: UInt64) throws(DiskImageError) {
        let outcome: Result<Void, DiskImageError> = bytes.withUnsafeBytes { buffer in
            do throws(DiskImageError) { try write(buffer, at: offset); return .success(()) } catch { return .failure(error) }
        }
        try outcome.get()
    }

    func truncate(to size: UInt64) throws(DiskImageError) {
        if isBlockDevice { throw .unsupported(path: path, feature: "resizing a block device (its size is the device's)") }
        guard ftruncate(fd, off_t(size)) == 0 else { throw .io(operation: "ftruncate to \(size)", path: path, errno: errno) }
    }

    func allocate(_ size: UInt64) throws(DiskImageError) {
        if isBlockDevice { throw .unsupported(path: path, feature: "preallocating a block device") }
        let result = posix_fallocate(fd, 0, off_t(size))
        guard result == 0 else { throw .io(operation: "fallocate \(size) bytes", path: path, errno: result) }
    }

    /// Frees the host blocks behind a range; it then reads as zeros. On a block device: zeroed,
    /// unmapped where the device can promise zeros, else written.
    func punchHole(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        guard writable else { throw .readOnly(path: path) }
        let result = isBlockDevice ? vireo_device_zero(fd, Int64(offset), Int64(length)) : vireo_punch_hole(fd, Int64(offset), Int64(length))
        guard result == 0 else { throw .io(operation: "zero \(length) bytes at \(offset)", path: path, errno: result) }
    }

    /// Tells a block device a range is no longer needed (BLKDISCARD). A device that cannot
    /// discard ignores it: a discard is advice, and the guest learns nothing from its failure.
    func discardOnDevice(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        guard writable else { throw .readOnly(path: path) }
        let result = vireo_device_discard(fd, Int64(offset), Int64(length))
        guard result == 0 || result == EOPNOTSUPP else { throw .io(operation: "discard \(length) bytes at \(offset)", path: path, errno: result) }
    }

    func sync() throws(DiskImageError) {
        guard fdatasync(fd) == 0 else { throw .io(operation: "fdatasync", path: path, errno: errno) }
    }
}

extension Array where Element == UInt8 {
    func be<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        var value: T = 0
        for index in 0..<MemoryLayout<T>.size where offset + index < count { value = value << 8 | T(self[offset + index]) }
        return value
    }

    mutating func setBE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        let size = MemoryLayout<T>.size
        for index in 0..<size { self[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * (size - 1 - index))) }
    }
}

/// The host's mount table, read for one answer: where a block device is mounted.
public enum HostMountTable {
    /// The first mount point of the device `device` (an `st_rdev`), or nil.
    static func mountPoint(of device: dev_t) -> String? {
        let wanted = numbers(of: device)
        let fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while bytes.count < 16 << 20 {
            let got = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if got < 0 && errno == EINTR { continue }
            if got <= 0 { break }
            bytes += chunk[0..<got]
        }
        // Each line: ID PARENT MAJOR:MINOR ROOT MOUNT-POINT ...; spaces in names are \040.
        for line in bytes.split(separator: UInt8(ascii: "\n")) {
            let fields = line.split(separator: UInt8(ascii: " "), maxSplits: 5)
            guard fields.count >= 5, String(decoding: fields[2], as: UTF8.self) == wanted else { continue }
            return unescape(String(decoding: fields[4], as: UTF8.self))
        }
        return nil
    }

    /// `MAJOR:MINOR` of a device number (glibc's gnu_dev_major/minor), as the mount table and
    /// `vireo info` write it.
    public static func numbers(of device: dev_t) -> String {
        let major = UInt64((device >> 8) & 0xfff) | UInt64((device >> 32) & ~0xfff)
        let minor = UInt64(device & 0xff) | UInt64((device >> 12) & ~0xff)
        return "\(major):\(minor)"
    }

    /// A mount table field with its octal escapes (`\040` for a space, and tab, newline and
    /// backslash alike) turned back into the characters they stand for.
    public static func unescape(_ field: String) -> String {
        var out: [UInt8] = []
        let bytes = Array(field.utf8)
        var index = 0
        while index < bytes.count {
            if bytes[index] == UInt8(ascii: "\\"), index + 3 < bytes.count,
               let value = UInt8(String(decoding: bytes[index + 1...index + 3], as: UTF8.self), radix: 8) {
                out.append(value)
                index += 4
            } else {
                out.append(bytes[index])
                index += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
