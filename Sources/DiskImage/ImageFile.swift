import CDiskHost
#if canImport(Glibc)
import Glibc
#endif

/// An open image file: positioned reads and writes with errors that keep the path and errno.
final class ImageFile: @unchecked Sendable {
    let path: String
    let fd: Int32
    let writable: Bool

    init(path: String, writable: Bool) throws(DiskImageError) {
        let fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        // A writer excludes everyone; readers share. Two writers (or a writer and a reader that
        // caches metadata) on one image would corrupt it or see stale data.
        // A conflict is retried for ~100 ms: a process that forked while another opener held the
        // image keeps the lock alive until it execs, which is brief but real.
        var attempts = 0
        while flock(fd, (writable ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0 {
            let code = errno
            attempts += 1
            if code == EWOULDBLOCK && attempts < 20 {
                usleep(5000)
                continue
            }
            close(fd)
            if code == EWOULDBLOCK { throw .inUse(path: path) }
            throw .io(operation: "lock", path: path, errno: code)
        }
        self.path = path
        self.fd = fd
        self.writable = writable
    }

    /// Opens for reading only what a header says, without a lock: a running VM may hold it.
    init(unlockedReadingAt path: String) throws(DiskImageError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        self.path = path
        self.fd = fd
        self.writable = false
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
    }

    deinit { close(fd) }

    var size: UInt64 {
        get throws(DiskImageError) {
            var info = stat()
            guard fstat(fd, &info) == 0 else { throw .io(operation: "fstat", path: path, errno: errno) }
            return UInt64(info.st_size)
        }
    }

    /// Bytes the file really occupies on the host (sparse files occupy less than their size).
    var allocatedBytes: UInt64 {
        get throws(DiskImageError) {
            var info = stat()
            guard fstat(fd, &info) == 0 else { throw .io(operation: "fstat", path: path, errno: errno) }
            return UInt64(info.st_blocks) * 512
        }
    }

    /// Reads exactly `buffer.count` bytes; bytes past the end of the file read as zero.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard let base = buffer.baseAddress else { return }
        var done = 0
        while done < buffer.count {
            let got = pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if got < 0 {
                if errno == EINTR { continue }
                throw .io(operation: "read at \(offset + UInt64(done))", path: path, errno: errno)
            }
            if got == 0 {
                (base + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
            done += got
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard writable else { throw .readOnly(path: path) }
        guard let base = buffer.baseAddress else { return }
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
        guard ftruncate(fd, off_t(size)) == 0 else { throw .io(operation: "ftruncate to \(size)", path: path, errno: errno) }
    }

    func allocate(_ size: UInt64) throws(DiskImageError) {
        let result = posix_fallocate(fd, 0, off_t(size))
        guard result == 0 else { throw .io(operation: "fallocate \(size) bytes", path: path, errno: result) }
    }

    /// Frees the host blocks behind a range; it then reads as zeros.
    func punchHole(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        guard writable else { throw .readOnly(path: path) }
        let result = vireo_punch_hole(fd, Int64(offset), Int64(length))
        guard result == 0 else { throw .io(operation: "punch hole at \(offset)", path: path, errno: result) }
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
