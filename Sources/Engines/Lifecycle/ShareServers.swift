import CSandbox
import Library
#if canImport(Glibc)
import Glibc
#endif

/// The virtiofsd processes that serve a VM's shared folders (docs/shared-folders.md), on either
/// engine: one per share, started before QEMU or vireo-vmm on a listening socket Vireo made,
/// ending when that client's connection closes (virtiofsd exits when its one client goes). Each runs in a mount namespace
/// where the directory is bound nosuid and nodev (read-only for a read-only share) and in a user
/// namespace where its root is an unprivileged host uid of its own (JailIdentity) and uid and gid
/// 1000 — the guest's first user — are the directory's owner: what the guest's root creates is
/// owned on the host by that unprivileged uid, and host root's files are nobody's to the guest.
/// virtiofsd's own sandbox (its pid, mount and network namespaces, pivot_root into the directory,
/// seccomp) runs inside that.
public struct ShareServers {
    static let binary = "/usr/lib/qemu/virtiofsd"
    static let mountRoot = VMBundle.shareMountRoot
    /// The guest's first user: cloud-init's user on Debian, Ubuntu and Fedora images.
    static let guestUser: UInt32 = 1000

    private(set) var pids: [pid_t] = []
    private var identity: JailIdentity?

    /// Where QEMU or vireo-vmm connects for share `tag`.
    static func socketPath(_ bundle: VMBundle, tag: String) -> String { bundle.vmmDirectory + "/fs-\(tag).sock" }

    /// The namespace's maps: root is `server`; 1000 is the directory's owner unless that owner is
    /// host root (never mapped: a guest must not own files as host root) or the server itself.
    public static func maps(owner: (uid: UInt32, gid: UInt32), server: UInt32) -> (uid: String, gid: String) {
        let uid = "0 \(server) 1\n" + (owner.uid != 0 && owner.uid != server ? "\(guestUser) \(owner.uid) 1\n" : "")
        let gid = "0 \(server) 1\n" + (owner.gid != 0 && owner.gid != server ? "\(guestUser) \(owner.gid) 1\n" : "")
        return (uid, gid)
    }

    /// Starts a server for every share; on any failure those already started are stopped.
    /// `clientOwner` is the uid and gid the client connects as (QEMU's jail's), given the sockets;
    /// nil leaves them root's (vireo-vmm connects before it drops root).
    static func start(_ vm: EngineVM, clientOwner: (uid: UInt32, gid: UInt32)?) throws(LibraryError) -> ShareServers {
        var servers = ShareServers()
        let shares = vm.definition.shares
        guard !shares.isEmpty else { return servers }
        guard geteuid() == 0 else {
            throw .engine(name: vm.name, reason: "shared folders need Vireo to run as root (virtiofsd runs in a user namespace only root can map); remove them (`vireo share remove`) or run as root", exitStatus: 2)
        }
        guard access(binary, X_OK) == 0 else {
            throw .engine(name: vm.name, reason: "shared folders are served by virtiofsd, which is not installed at \(binary); install Debian's `qemu-system-common` package (apt install qemu-system-x86)", exitStatus: 2)
        }
        do throws(LibraryError) {
            let identity = try JailIdentity.allocate(for: vm.definition.uuid + "/shares")
            servers.identity = identity
            try vm.bundle.prepareVMMDirectory()
            let mounts = mountRoot + "/" + vm.definition.uuid
            try HostFiles.makeDirectories(mounts)
            // Mount points of shares removed since the last start.
            VMBundle.removeShareMountPoints(uuid: vm.definition.uuid, keeping: Set(shares.map(\.tag)))
            // virtiofsd, as its namespace's root, is "other" to these root-owned directories.
            for directory in [mountRoot, mounts] { chmod(directory, 0o711) }
            for share in shares {
                servers.pids.append(try startServer(share, vm: vm, mounts: mounts, identity: identity, clientOwner: clientOwner))
            }
        } catch {
            servers.stop()
            throw error
        }
        return servers
    }

    private static func startServer(_ share: SharedFolder, vm: EngineVM, mounts: String, identity: JailIdentity,
                                     clientOwner: (uid: UInt32, gid: UInt32)?) throws(LibraryError) -> pid_t {
        // The directory as it is now: still a directory, still at its real path (no component
        // became a link: whoever owns a directory on the way must not point the share at someone
        // else's files, whose owner the guest's user would then be), and the child binds exactly
        // this one (its device and inode are checked after the bind).
        var status = stat()
        guard lstat(share.path, &status) == 0, status.st_mode & S_IFMT == S_IFDIR else {
            throw .engine(name: vm.name, reason: "shared folder '\(share.tag)': \(share.path) is no longer a directory (\(String(cString: strerror(errno == 0 ? ENOTDIR : errno)))); `vireo share remove \(vm.name) \(share.tag)`, or put it back", exitStatus: 2)
        }
        guard let real = HostPath.real(share.path), real == share.path else {
            throw .engine(name: vm.name, reason: "shared folder '\(share.tag)': \(share.path) now resolves to \(HostPath.real(share.path) ?? "nothing") (a directory on its way became a link); refusing to serve it. Put it back, or remove the share and add the directory you mean", exitStatus: 2)
        }
        let mountPoint = mounts + "/" + share.tag
        if mkdir(mountPoint, 0o700) != 0 && errno != EEXIST { throw .io(operation: "mkdir", path: mountPoint, errno: errno) }
        let socketPath = socketPath(vm.bundle, tag: share.tag)
        guard socketPath.utf8.count < 108 else {
            throw .engine(name: vm.name, reason: "\(socketPath) is longer than a Unix socket path may be (107 bytes); use a shorter library path ($VIREO_HOME) or tag", exitStatus: 2)
        }
        let listener = try listen(on: socketPath, owner: clientOwner)
        defer { close(listener) }
        let log = open(vm.bundle.vmmDirectory + "/fs-\(share.tag).log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard log >= 0 else { throw .io(operation: "open", path: vm.bundle.vmmDirectory + "/fs-\(share.tag).log", errno: errno) }
        defer { close(log) }
        let maps = maps(owner: (status.st_uid, status.st_gid), server: identity.uid)
        // --fd=3: the listening socket; descriptor 4 holds the server identity's lock for as long
        // as any server lives. cache=auto: the guest caches for a second, as QEMU's default.
        let arguments = [binary, "--fd=3", "-o", "source=\(mountPoint)", "-o", "sandbox=namespace", "-o", "cache=auto",
                         "--rlimit-nofile=0", "--thread-pool-size=8"]
        var pid: pid_t = 0
        var error = [CChar](repeating: 0, count: 256)
        let result = withCStrings(arguments) { argv in
            [listener, identity.descriptor].withUnsafeBufferPointer { inherited in
                share.path.withCString { source in
                    mountPoint.withCString { point in
                        maps.uid.withCString { uidMap in
                            maps.gid.withCString { gidMap in
                                var spec = vireo_share_server_spec(source: source, source_dev: status.st_dev, source_ino: status.st_ino,
                                                                   mount_point: point, read_only: share.readOnly ? 1 : 0,
                                                                   uid_map: uidMap, gid_map: gidMap)
                                return vireo_spawn_share_server(binary, argv, log, inherited.baseAddress, Int32(inherited.count),
                                                                &spec, &error, Int32(error.count), &pid)
                            }
                        }
                    }
                }
            }
        }
        guard result == 0 else {
            let step = String(decoding: error.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw .engine(name: vm.name, reason: "cannot start virtiofsd for shared folder '\(share.tag)' (\(share.path))\(step.isEmpty ? "" : ": \(step)"): \(String(cString: strerror(result)))", exitStatus: 1)
        }
        return pid
    }

    /// A listening Unix socket at `path` (a previous run's socket is replaced), for QEMU or
    /// vireo-vmm to connect to.
    static func listen(on path: String, owner: (uid: UInt32, gid: UInt32)?) throws(LibraryError) -> Int32 {
        var info = stat()
        if lstat(path, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFSOCK else { throw .invalidValue(field: "shares", reason: "\(path) exists and is not a socket; refusing to replace it") }
            unlink(path)
        }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in path.utf8.enumerated() where index < buffer.count - 1 { buffer[index] = byte }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .io(operation: "socket", path: path, errno: errno) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, Glibc.listen(fd, 1) == 0, chmod(path, 0o600) == 0,
              owner.map({ chown(path, $0.uid, $0.gid) == 0 }) ?? true else {
            let code = errno
            close(fd)
            throw .io(operation: "listen", path: path, errno: code)
        }
        return fd
    }

    /// Ends the servers (QEMU or vireo-vmm did not start) and lets their identity go.
    mutating func stop() {
        // Not this process's children (ShareServers' spawn double-forks): gone when kill fails.
        for pid in pids where pid > 0 {
            kill(pid, SIGKILL)
            for _ in 0..<100 where kill(pid, 0) == 0 { usleep(10_000) }
        }
        pids = []
        releaseIdentity()
    }

    /// This process's copy of the identity's lock; the servers keep theirs.
    mutating func releaseIdentity() {
        if let identity { close(identity.descriptor) }
        identity = nil
    }
}
