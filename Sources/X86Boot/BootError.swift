#if canImport(Glibc)
import Glibc
#endif
import GuestMemory

/// Why a kernel, initrd or command line cannot be booted. Each case names the input it is about,
/// so the CLI can say which flag was wrong and what would be accepted.
public enum BootError: Error, CustomStringConvertible, Sendable, Equatable {
    case unreadable(field: String, path: String, errno: Int32)
    case unrecognizedKernel(path: String, firstBytes: [UInt8])
    case malformedELF(path: String, reason: String)
    case malformedBzImage(path: String, reason: String)
    case unsupportedBootProtocol(path: String, version: UInt16, reason: String)
    case kernelDoesNotFit(path: String, needed: UInt64, available: UInt64)
    case commandLineTooLong(length: Int, limit: Int)
    case initrdDoesNotFit(path: String, size: UInt64, available: UInt64)
    case tooManyCPUs(requested: Int, limit: Int)
    case acpiTablesTooLarge(size: UInt64, limit: UInt64)
    case memory(GuestMemoryError)

    /// The description without the flag it begins with (`--kernel: `), for callers that name
    /// the field themselves (the library names it by its JSON key).
    public var reason: String {
        let text = Array(description)
        guard text.starts(with: ["-", "-"]),
              let colon = text.indices.first(where: { text[$0] == ":" && $0 + 1 < text.count && text[$0 + 1] == " " }) else { return description }
        return String(text[(colon + 2)...])
    }

    public var description: String {
        switch self {
        case let .unreadable(field, path, code):
            return "\(field): cannot read \(path): \(String(cString: strerror(code)))"
        case let .unrecognizedKernel(path, bytes):
            let shown = bytes.prefix(4).map { String($0, radix: 16).leftPadded(to: 2) }.joined(separator: " ")
            return "--kernel: \(path) is neither an ELF vmlinux (expected magic 7f 45 4c 46 at offset 0, found \(shown)) "
                + "nor a bzImage (expected \"HdrS\" at offset 0x202 and 55 aa at 0x1fe)"
        case let .malformedELF(path, reason):
            return "--kernel: \(path) is not a bootable ELF kernel: \(reason)"
        case let .malformedBzImage(path, reason):
            return "--kernel: \(path) is not a bootable bzImage: \(reason)"
        case let .unsupportedBootProtocol(path, version, reason):
            return "--kernel: \(path) uses boot protocol \(version >> 8).\(String(version & 0xff, radix: 16).leftPadded(to: 2)): \(reason)"
        case let .kernelDoesNotFit(path, needed, available):
            return "--memory: the kernel \(path) needs guest RAM up to \(needed.mebibytesDescription) but the VM has \(available.mebibytesDescription) below the 32-bit MMIO hole; raise --memory"
        case let .commandLineTooLong(length, limit):
            return "--cmdline: \(length) bytes is longer than this kernel accepts (at most \(limit) bytes)"
        case let .initrdDoesNotFit(path, size, available):
            return "--initrd: \(path) is \(size.mebibytesDescription) but only \(available.mebibytesDescription) of guest RAM is free for it; raise --memory or use a smaller initrd"
        case let .tooManyCPUs(requested, limit):
            return "--cpus: \(requested) is more than this machine model supports (at most \(limit))"
        case let .acpiTablesTooLarge(size, limit):
            return "--disk/--net: the ACPI tables describing these devices need \(size) bytes, more than the \(limit) the machine layout reserves; attach fewer devices"
        case let .memory(error):
            return error.description
        }
    }
}

extension String {
    func leftPadded(to width: Int, with pad: Character = "0") -> String {
        count >= width ? self : String(repeating: pad, count: width - count) + self
    }
}

extension UInt64 {
    var mebibytesDescription: String {
        if self % (1 << 20) == 0 { return "\(self >> 20) MiB" }
        let tenths = (self * 10) >> 20
        return "\(tenths / 10).\(tenths % 10) MiB"
    }
}

/// Reads a whole file. Kernels and initrds are a few MiB to a few hundred; one read keeps the
/// loaders simple and lets them bounds-check against the file's real size.
public func readWholeFile(_ path: String, field: String) throws(BootError) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0 { throw .unreadable(field: field, path: path, errno: errno) }
    defer { close(fd) }
    var info = stat()
    if fstat(fd, &info) != 0 { throw .unreadable(field: field, path: path, errno: errno) }
    if (info.st_mode & S_IFMT) == S_IFDIR { throw .unreadable(field: field, path: path, errno: EISDIR) }
    let size = Int(info.st_size)
    var bytes = [UInt8](repeating: 0, count: size)
    var done = 0
    while done < size {
        let got = bytes.withUnsafeMutableBytes { buffer -> Int in
            guard let base = buffer.baseAddress else { return 0 }
            return read(fd, base.advanced(by: done), size - done)
        }
        if got < 0 {
            if errno == EINTR { continue }
            throw .unreadable(field: field, path: path, errno: errno)
        }
        if got == 0 { break }
        done += got
    }
    if done < size { bytes.removeLast(size - done) }
    return bytes
}
