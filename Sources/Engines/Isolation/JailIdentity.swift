import CSandbox
import DiskImage
import Library
#if canImport(Glibc)
import Glibc
#endif

/// What `vireo start` confines a VM's engine process with. Both on by default; the flags exist
/// for debugging (`--no-jail`, `--no-seccomp`) and are recorded, so `vireo list` marks the VM.
public struct IsolationRequest: Sendable, Equatable {
    public var jail = true
    public var seccomp = true
    public init(jail: Bool = true, seccomp: Bool = true) { self.jail = jail; self.seccomp = seccomp }
}

/// A per-VM uid and gid for a jailed VMM, unique on this host while the VMM lives: each is a
/// lock file under /run/vireo/jail-ids held (flock) by a descriptor the VMM inherits, so it is
/// released however the VMM ends. What sVirt's per-VM MCS label gives libvirt: two VMMs never
/// share an identity, so one compromised VMM cannot touch the other's files.
struct JailIdentity {
    static let directory = "/run/vireo/jail-ids"
    /// 65536 ids above 2^31 − 2^24: far from any distribution's system and user ranges.
    static let base: UInt32 = 2_130_706_432
    static let count: UInt32 = 65_536

    let uid: UInt32
    var gid: UInt32 { uid }
    /// The open, locked lock file; the VMM inherits it, this process closes its copy.
    let descriptor: Int32

    static func allocate(for uuid: String) throws(LibraryError) -> JailIdentity {
        try HostFiles.makeDirectories(directory)
        // Start where the UUID hashes, so a VM tends to keep its uid from run to run.
        var hash: UInt32 = 2_166_136_261
        for byte in uuid.utf8 { hash = (hash ^ UInt32(byte)) &* 16_777_619 }
        for step in 0..<count {
            let uid = base + (hash &+ step) % count
            let path = directory + "/\(uid)"
            let fd = open(path, O_RDONLY | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
            if flock(fd, LOCK_EX | LOCK_NB) == 0 { return JailIdentity(uid: uid, descriptor: fd) }
            close(fd)
        }
        throw .io(operation: "find a free jail uid (all \(count) are held by running VMs)", path: directory, errno: EAGAIN)
    }

    /// Hands the VMM what it opens after the jail closes (a migration reopens its disks, a live
    /// snapshot its overlays): its own directory and the VM's writable disks become its uid's;
    /// the read-only layers inside the VM's directory become readable by its group only (libvirt's
    /// DAC relabelling does the same for qemu:qemu). The VM's directory itself stays root's: a
    /// compromised VMM must not rewrite the definition the next start trusts. Only files the
    /// definition names are touched, and of those in the VM's directory only what really lies in
    /// it (HostPath): a name never leads root's chown out of the directory.
    func grant(_ vm: EngineVM) throws(LibraryError) {
        let bundle = vm.bundle
        // The VM's directory stays root's and 0700 to everyone else; its group (the VM's gid)
        // may pass through it to what is its own, and list or change nothing.
        guard chown(bundle.directory, 0, gid) == 0, chmod(bundle.directory, 0o710) == 0 else {
            throw .io(operation: "give the VM's gid \(gid) passage", path: bundle.directory, errno: errno)
        }
        try bundle.prepareVMMDirectory(owner: (uid, gid))
        for disk in vm.definition.disks where !disk.isNetwork {
            let path = disk.isOwned ? try HostPath.resolve(bundle.resolve(disk.path), inside: bundle.directory, field: "disk") : disk.path
            // A block device keeps its owner: the VMM opens it as root before the jail closes,
            // and a host device node is not the VM's to keep (nothing reopens it jailed).
            var kind = stat()
            let isDevice = stat(path, &kind) == 0 && (kind.st_mode & S_IFMT) == S_IFBLK
            if !disk.readOnly, !isDevice, chown(path, uid, gid) != 0 {
                throw .io(operation: "chown to the VM's uid \(uid)", path: path, errno: errno)
            }
            let layers = (disk.readOnly ? [path] : []) + bundle.chain(of: disk).map(\.path)
            for layer in layers {
                guard let inside = HostPath.inside(layer, bundle.directory) else { continue }
                var status = stat()
                guard lstat(inside, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else { continue }
                if chown(inside, 0, gid) != 0 || chmod(inside, (status.st_mode & 0o7777 & ~0o022) | 0o040) != 0 {
                    throw .io(operation: "give the VM's gid \(gid) read access", path: inside, errno: errno)
                }
            }
        }
    }
}
