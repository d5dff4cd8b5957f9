import CHostSupport
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// File operations with the guarantees the library promises: config written atomically, nothing
/// replaced by accident, thin images kept thin.
public enum HostFiles {
    public static func exists(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0
    }

    public static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    public static func makeDirectory(_ path: String, mode: mode_t = 0o700) throws(LibraryError) {
        guard mkdir(path, mode) == 0 || (errno == EEXIST && isDirectory(path)) else {
            throw .io(operation: "mkdir", path: path, errno: errno)
        }
    }

    public static func makeDirectories(_ path: String) throws(LibraryError) {
        var current = ""
        for component in path.split(separator: "/") {
            current += "/" + component
            try makeDirectory(current, mode: 0o755)
        }
    }

    /// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path` and
    /// syncs the directory: a crash leaves the old file or the new one, never a mixture. The file
    /// is its owner's alone unless `mode` says otherwise.
    public static func writeAtomically(_ bytes: [UInt8], to path: String, mode: mode_t = 0o600) throws(LibraryError) {
        let temporary = path + ".tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .io(operation: "create", path: temporary, errno: errno) }
        // fchmod, not open's mode, which the umask trims.
        if mode != 0o600, fchmod(fd, mode) != 0 {
            let code = errno
            close(fd); unlink(temporary)
            throw .io(operation: "chmod", path: temporary, errno: code)
        }
        var written = 0
        while written < bytes.count {
            let count = bytes.withUnsafeBytes { buffer in write(fd, UnsafeRawBufferPointer(rebasing: buffer[written...]).baseAddress, bytes.count - written) }
            if count < 0 {
                if errno == EINTR { continue }
                let code = errno
                close(fd); unlink(temporary)
                throw .io(operation: "write", path: temporary, errno: code)
            }
            written += count
        }
        guard fsync(fd) == 0 else {
            let code = errno
            close(fd); unlink(temporary)
            throw .io(operation: "fsync", path: temporary, errno: code)
        }
        close(fd)
        guard rename(temporary, path) == 0 else {
            let code = errno
            unlink(temporary)
            throw .io(operation: "rename", path: path, errno: code)
        }
        syncDirectory(of: path)
    }

    /// Writes a kernel setting (a /proc/sys or /sys file), which cannot be replaced by rename.
    public static func writeInPlace(_ text: String, to path: String) throws(LibraryError) {
        let fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count else {
            throw .io(operation: "write", path: path, errno: errno)
        }
    }

    public static func syncDirectory(of path: String) {
        let directory = parent(of: path)
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 { fsync(fd); close(fd) }
    }

    public static func readAll(_ path: String) throws(LibraryError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 { if errno == EINTR { continue }; throw .io(operation: "read", path: path, errno: errno) }
            if count == 0 { return bytes }
            bytes += chunk[0..<count]
        }
    }

    /// The first `count` bytes of a file (random bytes from /dev/urandom).
    public static func readExactly(_ path: String, count: Int) throws(LibraryError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: count)
        var filled = 0
        while filled < count {
            let got = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress.map { $0 + filled }, count - filled) }
            if got < 0, errno == EINTR { continue }
            guard got > 0 else { throw .io(operation: "read", path: path, errno: got < 0 ? errno : EIO) }
            filled += got
        }
        return bytes
    }

    /// A small text file (a /proc entry), nil when it cannot be read.
    public static func readSmall(_ path: String) -> String? {
        guard let bytes = try? readAll(path) else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The last `bytes` bytes of a file (a console log) as text; empty when there is none.
    public static func tail(_ path: String, bytes limit: Int) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        let end = lseek(fd, 0, SEEK_END)
        guard end > 0, limit > 0 else { return "" }
        let start = max(0, end - off_t(limit))
        var bytes = [UInt8](repeating: 0, count: Int(end - start))
        var filled = 0
        while filled < bytes.count {
            let count = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress.map { $0 + filled }, $0.count - filled, start + off_t(filled)) }
            if count < 0, errno == EINTR { continue }
            if count <= 0 { break }
            filled += count
        }
        return String(decoding: bytes[0..<filled], as: UTF8.self)
    }

    /// Renames, failing rather than replacing anything at `to`.
    public static func renameNoReplace(_ from: String, _ to: String) throws(LibraryError) {
        let code = vireo_rename_noreplace(from, to)
        guard code == 0 else { throw .io(operation: "rename \(from) to", path: to, errno: code) }
        syncDirectory(of: to)
    }

    public static func copySparse(_ from: String, _ to: String) throws(LibraryError) {
        let code = vireo_copy_sparse(from, to)
        guard code == 0 else { throw .io(operation: "copy \(from) to", path: to, errno: code) }
    }

    /// `copySparse`, telling `progress` how far through the file it is (bytes done, of the
    /// file's size) every 64 MiB or so.
    public static func copySparse(_ from: String, _ to: String, progress: (UInt64, UInt64) -> Void) throws(LibraryError) {
        final class Reporter { let report: (UInt64, UInt64) -> Void; init(_ report: @escaping (UInt64, UInt64) -> Void) { self.report = report } }
        // The C copy calls back only while it runs, so the closure does not outlive this call.
        let code = withoutActuallyEscaping(progress) { report in
            let reporter = Unmanaged.passRetained(Reporter(report))
            defer { reporter.release() }
            return vireo_copy_sparse_reporting(from, to, { context, done, total in
                guard let context else { return }
                Unmanaged<Reporter>.fromOpaque(context).takeUnretainedValue().report(done, total)
            }, reporter.toOpaque())
        }
        guard code == 0 else { throw .io(operation: "copy \(from) to", path: to, errno: code) }
    }

    /// Deletes a directory tree without following symbolic links out of it.
    public static func removeTree(_ path: String) throws(LibraryError) {
        var info = stat()
        guard lstat(path, &info) == 0 else {
            if errno == ENOENT { return }
            throw .io(operation: "stat", path: path, errno: errno)
        }
        if (info.st_mode & S_IFMT) == S_IFDIR {
            // Entries vanishing meanwhile are not errors: another remover of the same tree
            // (a library sweep of an abandoned delete) got there first.
            let names: [String]
            do throws(LibraryError) { names = try entries(of: path) } catch {
                if case .io(_, _, ENOENT) = error { return }
                throw error
            }
            for entry in names { try removeTree(path + "/" + entry) }
            guard rmdir(path) == 0 || errno == ENOENT else { throw .io(operation: "rmdir", path: path, errno: errno) }
        } else {
            guard unlink(path) == 0 || errno == ENOENT else { throw .io(operation: "unlink", path: path, errno: errno) }
        }
    }

    public static func entries(of directory: String) throws(LibraryError) -> [String] {
        guard let handle = opendir(directory) else { throw .io(operation: "opendir", path: directory, errno: errno) }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    public static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    public static func lastComponent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return path }
        return String(path[path.index(after: slash)...])
    }

    /// Bytes the file occupies on the host (its allocated blocks), not its apparent size.
    public static func size(_ path: String) -> UInt64 {
        var info = stat()
        guard stat(path, &info) == 0 else { return 0 }
        return UInt64(info.st_size)
    }

    public static func allocatedBytes(_ path: String) -> UInt64 {
        var info = stat()
        guard stat(path, &info) == 0 else { return 0 }
        return UInt64(info.st_blocks) * 512
    }

    public static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
        guard getcwd(&buffer, buffer.count) != nil else { return path }
        let cwd = String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return (cwd == "/" ? "" : cwd) + "/" + path
    }
}

/// An advisory lock on a VM's `vm.lock`. The VM process holds it exclusively for as long as it
/// runs, so "running" is "locked" and a crashed VMM can never leave a VM that claims to run.
/// Commands that change a stopped VM hold it too, which is how two of them cannot both win.
public final class VMLock {
    public let fd: Int32
    public let path: String

    public init(path: String, create: Bool = false) throws(LibraryError) {
        self.path = path
        fd = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0o600)
        guard fd >= 0 else { throw .io(operation: "open lock", path: path, errno: errno) }
    }

    deinit { close(fd) }

    /// Takes the lock exclusively. Other commands' state probes hold it shared for microseconds,
    /// so a few retries tell those apart from a running VM or a long operation.
    public func tryExclusive(attempts: Int = 20) -> Bool {
        for attempt in 0..<attempts {
            if flock(fd, LOCK_EX | LOCK_NB) == 0 { return true }
            if attempt + 1 < attempts { usleep(10_000) }
        }
        return false
    }

    public func unlock() { flock(fd, LOCK_UN) }

    /// Whether some process holds the lock exclusively, probed without disturbing it for long.
    public static func isHeld(path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        if flock(fd, LOCK_SH | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            return false
        }
        return errno == EWOULDBLOCK
    }

    /// The lock file still is `path` (not deleted or renamed away while we waited for it).
    public var isCurrent: Bool {
        var held = stat(), named = stat()
        return fstat(fd, &held) == 0 && stat(path, &named) == 0 && held.st_ino == named.st_ino && held.st_dev == named.st_dev
    }
}
