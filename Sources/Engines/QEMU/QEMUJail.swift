import CSandbox
import DiskImage
import Library
#if canImport(Glibc)
import Glibc
#endif

/// How QEMU reaches a VM's images: as descriptors Vireo opened for it, in QEMU's fd sets
/// (`-add-fd`, then `/dev/fdset/N` where a file name goes). Root opens exactly the files the
/// definition names (every layer of every disk, the UEFI variable store, the CD), each in the
/// mode it is used in, and the jailed QEMU needs no view of where they are nor any right to them
/// (libvirt hands QEMU its disks the same way).
struct QEMUFiles {
    /// Path → fd set.
    private(set) var sets: [String: Int] = [:]
    /// `-add-fd` arguments, in order.
    private(set) var arguments: [String] = []
    /// The descriptors, in the order they are inherited after `firstSlot`.
    private(set) var descriptors: [Int32] = []
    let firstSlot: Int

    /// Files are named by path (a test's command line, a VMM that is not jailed).
    static let byPath = QEMUFiles(firstSlot: 0, opening: false)
    private let opening: Bool

    private init(firstSlot: Int, opening: Bool) {
        self.firstSlot = firstSlot
        self.opening = opening
    }

    /// Opens every image `definition` names; inherited descriptors start at slot `firstSlot`.
    init(opening definition: VMDefinition, bundle: VMBundle, firstSlot: Int) throws(LibraryError) {
        self.init(firstSlot: firstSlot, opening: true)
        do throws(LibraryError) {
            for disk in definition.disks {
                try add(bundle.resolve(disk.path), writable: !disk.readOnly)
                for layer in bundle.chain(of: disk) { try add(layer.path, writable: false) }
            }
            if definition.firmware == .uefi, let nvram = definition.nvram { try add(bundle.resolve(nvram), writable: true) }
            if let iso = definition.iso { try add(iso, writable: false) }
        } catch {
            close()
            throw error
        }
    }

    /// A writable file's set holds a read-write and a read-only descriptor: QEMU takes the one
    /// whose mode matches how it opens (a snapshot reopens an image read-only). The sets keep
    /// their descriptors open for QEMU's whole life, so QEMU's own byte-range locks (per open
    /// file) would outlive its use of one and fight its next: they are off (`locking: off`), and
    /// the images are locked here as the kvm engine locks them — the writer's exclusively, for
    /// as long as QEMU runs — so no two VMs of either engine share a writable image.
    private mutating func add(_ path: String, writable: Bool) throws(LibraryError) {
        guard sets[path] == nil else { return }
        let set = sets.count + 1
        for mode in writable ? [O_RDWR, O_RDONLY] : [O_RDONLY] {
            let fd = open(path, mode | O_CLOEXEC)
            guard fd >= 0 else { throw .io(operation: "open for QEMU", path: path, errno: errno) }
            arguments += ["-add-fd", "fd=\(PreparedNetworking.inherited(firstSlot + descriptors.count)),set=\(set)"]
            descriptors.append(fd)
            let lock = mode == O_RDWR ? LOCK_EX : (writable ? nil : LOCK_SH)
            if let lock, flock(fd, lock | LOCK_NB) != 0 {
                throw errno == EWOULDBLOCK ? .disk(.inUse(path: path)) : .io(operation: "lock", path: path, errno: errno)
            }
        }
        sets[path] = set
    }

    /// Whether files arrive as descriptors (and QEMU's own locking is off for them).
    var usesDescriptors: Bool { !sets.isEmpty }

    /// What QEMU is given for `path`: its fd set, or the path itself.
    func name(_ path: String) -> String { sets[path].map { "/dev/fdset/\($0)" } ?? path }

    func close() { for fd in descriptors { Glibc.close(fd) } }
}

/// The qemu engine's jail (docs/isolation.md): what the kvm engine's VMM does to itself once
/// built, QEMU — which cannot — gets from its spawner before it execs: its own PID, mount, IPC,
/// UTS and network namespaces, a root holding only the VM's directory, the programs and
/// firmware under /usr, and the devices it uses; a per-VM uid and gid (with the group that may
/// open /dev/kvm); no capabilities; no_new_privs; Landlock over the same paths. Its images arrive
/// as descriptors (QEMUFiles); QEMU's own `-sandbox` seccomp filter runs on top.
struct QEMUJail {
    let identity: JailIdentity
    let paths: [(path: String, writable: Bool, executable: Bool)]
    let group: gid_t

    static let root = "/run/vireo/jail-root"

    init(_ vm: EngineVM) throws(LibraryError) {
        let (bundle, definition) = (vm.bundle, vm.definition)
        identity = try JailIdentity.allocate(for: definition.uuid)
        do throws(LibraryError) {
            try identity.grant(vm)
            // What QEMU opens by name as its own uid: the console log (written through the
            // chardev), the kernel and initrd in the VM's directory, a RAM backing file.
            let console = open(bundle.consoleLogPath, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0o600)
            guard console >= 0, fchown(console, identity.uid, identity.gid) == 0 else {
                let code = errno
                if console >= 0 { Glibc.close(console) }
                throw .io(operation: "give the VM's uid its console log", path: bundle.consoleLogPath, errno: code)
            }
            Glibc.close(console)
            var paths: [(String, Bool, Bool)] = [(bundle.directory, true, false)]
            for file in [definition.directBoot?.kernel, definition.directBoot?.initrd].compactMap({ $0 }).map(bundle.resolve) {
                if let inside = HostPath.inside(file, bundle.directory) {
                    guard chown(inside, 0, identity.gid) == 0, chmod(inside, 0o640) == 0 else {
                        throw .io(operation: "give the VM's gid \(identity.gid) read access", path: inside, errno: errno)
                    }
                } else {
                    paths.append((file, false, false))
                }
            }
            if let file = definition.memoryBacking.file, file != "memfd" {
                let fd = open(file, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
                guard fd >= 0, fchown(fd, identity.uid, identity.gid) == 0 else {
                    let code = errno
                    if fd >= 0 { Glibc.close(fd) }
                    throw .io(operation: "give the VM's uid its RAM file", path: file, errno: code)
                }
                Glibc.close(fd)
                paths.append((file, true, false))
            }
            // Programs, libraries and firmware: read and run, never written. /lib and /lib64 are
            // bound as named (symbolic links to /usr on Debian) so the loader's paths hold.
            for system in ["/usr", "/lib", "/lib64"] where HostFiles.exists(system) { paths.append((system, false, true)) }
            if HostFiles.exists("/etc/ld.so.cache") { paths.append(("/etc/ld.so.cache", false, false)) }
            for device in ["/dev/kvm", "/dev/null", "/dev/zero", "/dev/urandom"] where access(device, F_OK) == 0 {
                paths.append((device, true, false))
            }
            self.paths = paths
        } catch {
            Glibc.close(identity.descriptor)
            throw error
        }
        // /dev/kvm is its group's (kvm on Debian): QEMU keeps that group, as libvirt's qemu user does.
        var device = stat()
        group = stat("/dev/kvm", &device) == 0 && device.st_mode & 0o060 == 0o060 ? device.st_gid : 0
    }

    /// The same identity confining another of the VM's processes (swtpm) to `paths` and the
    /// system's programs and libraries, without QEMU's device group.
    init(sharing jail: QEMUJail, writable: [String]) {
        identity = jail.identity
        var paths = writable.map { (path: $0, writable: true, executable: false) }
        for system in ["/usr", "/lib", "/lib64"] where HostFiles.exists(system) { paths.append((system, false, true)) }
        if HostFiles.exists("/etc/ld.so.cache") { paths.append(("/etc/ld.so.cache", false, false)) }
        for device in ["/dev/null", "/dev/urandom"] where access(device, F_OK) == 0 { paths.append((device, true, false)) }
        self.paths = paths
        group = 0
    }

    /// Spawns `binary` jailed; returns its pid (in the host's PID namespace).
    func spawn(_ binary: String, _ arguments: [String], log: Int32, lock: Int32, inherit: [Int32], cgroupFiles: [String]) throws(LibraryError) -> pid_t {
        try HostFiles.makeDirectories(Self.root)
        var pid: pid_t = 0
        var error = [CChar](repeating: 0, count: 512)
        let result = withCStrings(arguments) { argv in
            withCStrings(paths.map(\.path)) { names in
                withCStrings(cgroupFiles) { files in
                    inherit.withUnsafeBufferPointer { inherited in
                        paths.map { Int32($0.writable ? 1 : 0) }.withUnsafeBufferPointer { writable in
                            paths.map { Int32($0.executable ? 1 : 0) }.withUnsafeBufferPointer { executable in
                                Self.root.withCString { root in
                                    var spec = vireo_jail_spec(root: root, paths: UnsafePointer(OpaquePointer(names)), writable: writable.baseAddress,
                                                               executable: executable.baseAddress, count: Int32(paths.count),
                                                               uid: identity.uid, gid: identity.gid, group: group, landlock: 1)
                                    return vireo_spawn_jailed(binary, argv, log, lock, inherited.baseAddress, Int32(inherited.count),
                                                              files, Int32(cgroupFiles.count), &spec, &error, Int32(error.count), &pid)
                                }
                            }
                        }
                    }
                }
            }
        }
        guard result == 0 else {
            let step = String(decoding: error.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw .engine(name: "qemu", reason: "cannot start QEMU in its jail\(step.isEmpty ? "" : " (\(step))"): \(String(cString: strerror(result)))", exitStatus: 1)
        }
        return pid
    }

    /// What `vireo info` shows of it (the same record the kvm engine's VMM reports).
    var record: IsolationRecord {
        var record = IsolationRecord()
        record.uid = identity.uid
        record.gid = identity.gid
        record.namespaces = ["pid", "mnt", "ipc", "uts", "net"]
        record.seccomp = "qemu"
        let abi = vireo_landlock_abi()
        record.landlock = abi > 0 ? "abi\(abi)" : "unavailable"
        return record
    }
}
