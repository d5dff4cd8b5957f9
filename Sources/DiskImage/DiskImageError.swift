#if canImport(Glibc)
import Glibc
#endif

/// Why a disk image could not be opened, created, read or written. Keeps the path and, for host
/// failures, the errno.
public enum DiskImageError: Error, CustomStringConvertible, Sendable, Equatable {
    case io(operation: String, path: String, errno: Int32)
    /// The file is not a valid image of its format; `reason` says what was wrong.
    case invalidImage(path: String, reason: String)
    /// Valid, but uses something Vireo does not implement.
    case unsupported(path: String, feature: String)
    case outOfRange(path: String, offset: UInt64, length: Int, size: UInt64)
    case alreadyExists(path: String)
    case readOnly(path: String)
    /// Another open of the image (another VM, another disk of this VM, `vireo disk`) holds a
    /// conflicting lock.
    case inUse(path: String)
    /// A block device the host itself holds: mounted (at `mountPoint`, when the mount table names
    /// it), swap, or part of LVM or RAID.
    case deviceBusy(path: String, mountPoint: String?)
    case invalidArgument(field: String, reason: String)
    /// A network disk's server could not be used: unreachable, no such export, not NBD.
    case network(path: String, reason: String)
    /// A qcow2 header names a backing file its disk's definition does not record (`recorded`:
    /// what it does record, if anything). The chain is what the definition says; a header is
    /// never followed past it (docs/security.md).
    case unrecordedBacking(path: String, named: String, recorded: String?)

    public var description: String {
        switch self {
        case let .io(operation, path, code):
            return "\(path): \(operation) failed: \(String(cString: strerror(code))) (errno \(code))"
        case let .invalidImage(path, reason): return "\(path): not a valid disk image: \(reason)"
        case let .unsupported(path, feature): return "\(path): \(feature) is not supported"
        case let .outOfRange(path, offset, length, size):
            return "\(path): access of \(length) bytes at offset \(offset) is beyond the disk's \(size) bytes"
        case let .alreadyExists(path): return "\(path) already exists; refusing to overwrite it"
        case let .readOnly(path): return "\(path) is open read-only"
        case let .inUse(path): return "\(path) is in use (locked by another VM or disk); attach it once, or read-only everywhere"
        case let .deviceBusy(path, mountPoint?):
            return "\(path) is mounted at \(mountPoint); a disk the host uses cannot be a VM's (unmount it first)"
        case let .deviceBusy(path, nil):
            return "\(path) is in use by the host (mounted, swap, or held by LVM or RAID); a disk the host uses cannot be a VM's"
        case let .invalidArgument(field, reason): return "\(field): \(reason)"
        case let .network(path, reason): return "\(path): \(reason)"
        case let .unrecordedBacking(path, named, recorded?):
            return "\(path) names the backing file \(named), but its definition records \(recorded): its header was changed outside Vireo (by the VM's own process?), so it is not opened"
        case let .unrecordedBacking(path, named, nil):
            return "\(path) names the backing file \(named), which its definition does not record (a disk rests only on what its definition says), so it is not opened; if you made this chain yourself, detach the disk and attach it again"
        }
    }
}
