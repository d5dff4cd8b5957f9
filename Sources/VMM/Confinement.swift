import CSandbox
import DiskImage
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// How `vireo-vmm` confines itself once the machine is assembled (docs/isolation.md): the host
/// resources are open by then, so what is left of the host is only what the VM still needs.
public struct JailConfiguration: Sendable, Equatable {
    public var uid: UInt32
    public var gid: UInt32
    /// An empty directory on the host where the jail's tmpfs root is mounted (in the VMM's own
    /// mount namespace, so every VMM can use the same one).
    public var root = "/run/vireo/jail-root"

    /// `uid=N,gid=N[,root=PATH]`.
    public init(parsing text: String) throws(VMMError) {
        var uid: UInt32?
        var gid: UInt32?
        for option in text.split(separator: ",") {
            if option.hasPrefix("uid=") {
                uid = UInt32(option.dropFirst(4))
            } else if option.hasPrefix("gid=") {
                gid = UInt32(option.dropFirst(4))
            } else if option.hasPrefix("root="), option.count > 5 {
                root = String(option.dropFirst(5))
            } else {
                throw .invalidConfiguration(field: "--jail", reason: "unknown option '\(option)' in '\(text)'; expected uid=N,gid=N[,root=PATH]")
            }
        }
        guard let uid, let gid, uid != 0, gid != 0, uid != UInt32.max, gid != UInt32.max else {
            throw .invalidConfiguration(field: "--jail", reason: "'\(text)' needs uid=N and gid=N, neither 0 (root) nor 4294967295")
        }
        guard root.hasPrefix("/") else { throw .invalidConfiguration(field: "--jail", reason: "root '\(root)' is not an absolute path") }
        self.uid = uid
        self.gid = gid
    }
}

/// `--seccomp on|off|log`: `log` allows what the filter would refuse and has the kernel log it
/// (how the allow lists below are checked against a whole test run).
public enum SeccompMode: String, Sendable {
    case on, off, log
}

/// The kinds of threads a VMM runs, each with its own seccomp allow list.
enum ThreadKind: String {
    case vcpu, device, control, main

    var slot: Int32 {
        switch self {
        case .vcpu: 0
        case .device: 1
        case .control: 2
        case .main: 3
        }
    }

    init(threadName name: String) {
        if name.hasPrefix("vcpu") { self = .vcpu }
        else if name.hasPrefix("device") || name.hasPrefix("virtio-") { self = .device }
        else { self = .control }
    }
}

/// The seccomp allow lists. Filters stack: a thread's own filter narrows the one it inherited, so
/// the process-wide filter (installed by the main thread before any other thread exists) is the
/// union, and each thread then installs its kind's list as its first act.
enum SyscallPolicy {
    /// What every thread does: memory, locks, time, signals, logging, its own end.
    static let common = [
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "close", "lseek",
        "futex", "sched_yield", "nanosleep", "clock_nanosleep", "clock_gettime", "gettimeofday",
        "mmap", "munmap", "mprotect", "madvise", "mremap", "brk",
        "rt_sigprocmask", "rt_sigreturn", "rt_sigaction", "sigaltstack", "getpid", "gettid",
        "prctl", "exit", "exit_group", "restart_syscall", "getrandom", "rseq", "set_robust_list",
        "poll", "ppoll", "epoll_wait", "epoll_pwait", "epoll_ctl", "fstat", "newfstatat", "fcntl",
        // A thread installs its own, narrower filter as its first act.
        "seccomp",
    ]
    /// A vCPU runs the guest (KVM_RUN) and emulates devices on its exits: disk and network I/O,
    /// eventfds, interrupt injection, kicks of other threads.
    static let vcpu = common + ["ioctl", "fdatasync", "fsync", "fallocate", "recvfrom", "sendto", "recvmsg", "sendmsg",
                                // The guest's UART output goes out on a vCPU: when it finds a console
                                // client gone it shuts that socket down (found by the API's test that kills
                                // `vireo serve` while it bridges the console: trapped, the VM died).
                                // vsock's half-close of a host stream can run here too.
                                "shutdown",
                                // --rt-priority: each vCPU makes itself SCHED_FIFO as it starts.
                                "sched_setscheduler", "sched_setparam",
                                // An NBD disk's request may run here (a queue without an ioeventfd) and
                                // reconnect a lost Unix-socket path (socket: AF_UNIX only, below); an
                                // iSCSI path reconnects through libiscsi, which checks its connection's
                                // outcome and its own address on a socket made before the jail.
                                "connect", "setsockopt", "getsockopt", "getsockname"]
    /// `ioctl` is allowed whatever its request on vCPU threads (and in the process-wide filter
    /// they inherit): a syscall every filter allows unconditionally skips BPF altogether (the
    /// kernel's seccomp action cache), and checking KVM_RUN's request on every exit cost 1.5–2 %
    /// of port-exit throughput (bench/README.md). The jail leaves only KVM, tap, disk, socket and
    /// eventfd descriptors to aim one at, with no capability to back it.
    /// Opening a file is refused with EACCES rather than trapped: glibc's strerror() looks for a
    /// message catalogue the first time a vCPU logs an error (seen in a `VIREO_SECCOMP=log` run),
    /// and a vCPU that cannot open anything is the point.
    static let vcpuRules: UInt32 = UInt32(VIREO_SECCOMP_SIGNAL_SELF | VIREO_SECCOMP_OPEN_REFUSED | VIREO_SECCOMP_SOCKET_UNIX)
    /// Device threads: network receive, throttled queues, the balloon, vsock streams, virtio
    /// notifications (ioeventfds).
    static let device = vcpu.filter { $0 != "ioctl" } + ["accept4", "accept", "shutdown", "timerfd_create", "timerfd_settime",
                                "epoll_create1", "eventfd2", "pipe2", "dup", "unlink", "openat", "open"]
    /// Device threads' ioctls are checked: KVM's (interrupts), and tty/tun ones — the first log
    /// line a thread writes has stdio ask whether stderr is a terminal (TCGETS).
    /// BLKDISCARD, exactly: a disk on a block device passes the guest's discards down.
    static let deviceRules: UInt32 = UInt32(VIREO_SECCOMP_IOCTL_KVM | VIREO_SECCOMP_IOCTL_TTY_TUN | VIREO_SECCOMP_SIGNAL_SELF
                                            | VIREO_SECCOMP_SOCKET_UNIX | VIREO_SECCOMP_IOCTL_DISCARD)
    /// Control threads serve the control socket: pause, save, snapshots, migration, console
    /// attachment. They start threads (connections, the throttle) and write state files.
    static let control = device + ["set_tid_address", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "unlinkat",
                                   "ftruncate", "flock", "getdents64", "sched_getaffinity", "sched_setaffinity",
                                   "getrusage", "getuid", "geteuid", "getgid", "getegid", "sysinfo", "uname", "statfs", "fstatfs",
                                   "sync_file_range", "copy_file_range", "sendfile", "memfd_create", "mlock", "munlock",
                                   "getsockname", "getpeername", "statx", "faccessat", "faccessat2", "access",
                                   "readlink", "readlinkat", "sched_getparam", "sched_getscheduler", "sched_setscheduler", "getpriority",
                                   "setpriority", "timer_create", "timer_settime", "timer_delete",
                                   "rt_sigtimedwait", "rt_sigsuspend", "pause", "select", "pselect6"]
    static let controlRules: UInt32 = deviceRules | UInt32(VIREO_SECCOMP_CLONE_THREAD)
    /// The main thread waits for the VM to stop and reboots it in place; it also starts the
    /// first threads, so its filter — the process-wide one — is the union: `control` with `ioctl`
    /// unchecked (for the vCPUs' sake, above); control and device threads narrow it again.
    static let main = control + ["ioctl"]
    static let mainRules: UInt32 = controlRules & ~UInt32(VIREO_SECCOMP_IOCTL_KVM | VIREO_SECCOMP_IOCTL_TTY_TUN | VIREO_SECCOMP_IOCTL_DISCARD)

    static func list(_ kind: ThreadKind) -> (names: [String], rules: UInt32) {
        switch kind {
        case .vcpu: (vcpu, vcpuRules)
        case .device: (device, deviceRules)
        case .control: (control, controlRules)
        case .main: (main, mainRules)
        }
    }
}

/// This process's pid as the host sees it: inside its own PID namespace getpid() is 1, and once
/// the jail's /proc shows only that namespace, NSpid's outermost entry is gone too.
public enum HostProcessID {
    nonisolated(unsafe) private static var recorded: Int32 = 0

    /// Reads NSpid from /proc/self/status; called at start, before the jail.
    public static func record() {
        recorded = getpid()
        let fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return }
        let text = String(decoding: buffer[0..<count], as: UTF8.self)
        if let line = text.split(separator: "\n").first(where: { $0.hasPrefix("NSpid:") }),
           let outermost = line.dropFirst(6).split(whereSeparator: { $0 == " " || $0 == "\t" }).first.flatMap({ Int32($0) }) {
            recorded = outermost
        }
    }

    public static var value: Int32 { recorded == 0 ? getpid() : recorded }
}

/// The process-wide confinement state, set once by the main thread before any other thread
/// exists (so every thread reads it after a pthread_create, which orders it).
enum Confinement {
    nonisolated(unsafe) static var seccomp: SeccompMode = .off
    /// Installs the thread's filter, compiled before any thread existed (`prepare`). A filter
    /// that fails to install ends the VMM: no thread runs unconfined.
    static func enter(_ kind: ThreadKind) {
        guard seccomp != .off else { return }
        let result = vireo_seccomp_apply(kind.slot)
        if result != 0 {
            vmmLog("seccomp: cannot confine a \(kind.rawValue) thread (errno \(result)); stopping")
            exit(1)
        }
    }

    /// Compiles every thread kind's filter once, on the main thread.
    static func prepare() -> String? {
        for kind in [ThreadKind.vcpu, .device, .control, .main] {
            let (names, rules) = SyscallPolicy.list(kind)
            var error = [CChar](repeating: 0, count: 256)
            let result = withCStrings(names) { pointers in
                pointers.withUnsafeBufferPointer { buffer in
                    vireo_seccomp_prepare(kind.slot, buffer.baseAddress, Int32(names.count), rules, seccomp == .log ? 1 : 0, &error, Int32(error.count))
                }
            }
            if result != 0 { return "\(kind.rawValue): " + cText(error) + " (errno \(result))" }
        }
        return nil
    }
}

func withCStrings<Result>(_ strings: [String], _ body: ([UnsafePointer<CChar>?]) -> Result) -> Result {
    var owned = strings.map { strdup($0) }
    defer { for pointer in owned { free(pointer) } }
    return owned.withUnsafeMutableBufferPointer { buffer in
        body(buffer.map { UnsafePointer($0) })
    }
}

/// What confined this VMM, for its log and `vireo info`.
public struct ConfinementReport: Sendable {
    public var namespaces: [String] = []
    public var uid: UInt32?
    public var seccomp: SeccompMode = .off
    public var landlock: String = "off"

    public var gid: UInt32?

    public init() {}

    /// `key=value` words, the form `vireo start` records in the VM's `isolation` file.
    public var summary: String {
        "uid=\(uid.map(String.init) ?? "-") gid=\(gid.map(String.init) ?? "-") namespaces=\(namespaces.isEmpty ? "-" : namespaces.joined(separator: ",")) seccomp=\(seccomp.rawValue) landlock=\(landlock)"
    }
}

extension Machine {
    /// Every host path the running VM may still open: the directories of its sockets, state
    /// and snapshots (written), its disks and their backing files. Directories nested in an
    /// exposed directory are covered by it.
    static func jailPaths(_ spec: MachineSpec, controlPath: String?, stateFile: String?, snapshotDirectory: String?) -> [(path: String, writable: Bool)] {
        func directory(_ path: String) -> String {
            guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return "/" }
            return String(path[..<slash])
        }
        func absolute(_ path: String) -> String {
            if path.hasPrefix("/") { return path }
            var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
            let cwd = getcwd(&buffer, buffer.count) != nil ? cText(buffer) : "/"
            return cwd + "/" + path
        }
        var candidates: [(String, Bool)] = []
        for path in [controlPath, stateFile, spec.vsock?.socketPath].compactMap({ $0 }) {
            candidates.append((directory(absolute(path)), true))
        }
        if let snapshotDirectory { candidates.append((absolute(snapshotDirectory), true)) }
        for disk in spec.disks {
            // An NBD disk's Unix sockets are reconnected through their directories (a restarted
            // server makes a new socket there, which a bind of the old one would not show).
            if disk.isNetwork {
                for endpoint in (try? NetworkDisk.endpoints(disk.path)) ?? [] {
                    // Never the host's root: a socket directly under / is not reconnected jailed.
                    if case let .unix(socket, _) = endpoint, directory(socket) != "/" { candidates.append((directory(socket), false)) }
                }
                continue
            }
            let path = absolute(disk.path)
            candidates.append((path, !disk.readOnly))
            // A snapshot's overlays land beside the disk: its directory must be writable when the
            // disk is, which the library's own disks (in the VM's directory) already are. Beneath
            // it, only the chain its definition records (never what a header names).
            for layer in disk.backing { candidates.append((absolute(layer.path), false)) }
        }
        for device in ["/dev/kvm", "/dev/net/tun", "/dev/null", "/dev/urandom"] where access(device, F_OK) == 0 {
            candidates.append((device, true))
        }
        // Shortest first, so a directory is exposed before what lies in it; what lies in an
        // exposed directory (writable, or read-only for read-only entries) is dropped.
        var chosen: [(path: String, writable: Bool)] = []
        for (path, writable) in candidates.sorted(by: { $0.0.count < $1.0.count }) {
            var resolved = [CChar](repeating: 0, count: Int(PATH_MAX))
            guard realpath(path, &resolved) != nil else { continue }
            let real = cText(resolved)
            if let index = chosen.firstIndex(where: { $0.path == real }) {
                chosen[index].writable = chosen[index].writable || writable
                continue
            }
            if chosen.contains(where: { real.hasPrefix($0.path + "/") && ($0.writable || !writable) }) { continue }
            chosen.append((real, writable))
        }
        return chosen
    }

    /// Enters the jail: new network namespace, the pivot into a root holding only `paths`, the
    /// per-VM uid, no_new_privs, rlimits, Landlock, then the process-wide seccomp filter. Must
    /// run while the VMM has a single thread.
    public static func confine(jail: JailConfiguration?, seccomp: SeccompMode, landlock: Bool, realTimePriority: Int32? = nil,
                               spec: MachineSpec, controlPath: String?, stateFile: String?,
                               snapshotDirectory: String?) throws(VMMError) -> ConfinementReport {
        var report = ConfinementReport()
        let threads = threadCount()
        guard threads == 1 else {
            throw .host(operation: "confine the VMM (it has \(threads) threads; the jail must close before the first)", errno: EBUSY)
        }
        if let jail {
            let paths = jailPaths(spec, controlPath: controlPath, stateFile: stateFile, snapshotDirectory: snapshotDirectory)
            // Taps and sockets are open already; the VMM never dials or listens on a network.
            let unshared = vireo_jail_unshare()
            guard unshared == 0 else { throw .host(operation: "unshare(mount, IPC, UTS, network namespaces)", errno: unshared) }
            var error = [CChar](repeating: 0, count: 512)
            let pivoted = withCStrings(paths.map(\.path)) { pointers in
                pointers.withUnsafeBufferPointer { names in
                    paths.map { Int32($0.writable ? 1 : 0) }.withUnsafeBufferPointer { writable in
                        vireo_jail_pivot(jail.root, names.baseAddress, writable.baseAddress, Int32(paths.count), &error, Int32(error.count))
                    }
                }
            }
            guard pivoted == 0 else { throw .host(operation: "build the jail: \(cText(error))", errno: pivoted) }
            _ = sethostname("vireo-vmm", 9)
            let limited = vireo_jail_limit_resources(4096)
            guard limited == 0 else { throw .host(operation: "setrlimit", errno: limited) }
            // A real-time VM's vCPUs make themselves SCHED_FIFO after the uid is dropped, and its
            // locked memory grows with every thread stack (mlockall's MCL_FUTURE): it keeps
            // CAP_SYS_NICE and CAP_IPC_LOCK (raising RLIMIT_RTPRIO would need CAP_SYS_RESOURCE,
            // which root lacks on some hosts, these among them).
            let dropped = vireo_jail_drop_privileges(jail.uid, jail.gid, realTimePriority == nil ? 0 : 1)
            guard dropped == 0 else { throw .host(operation: "drop to uid \(jail.uid) gid \(jail.gid)", errno: dropped) }
            // PID 1 of its own namespace when `vireo start` spawned it there (vireo_spawn_namespaced).
            report.namespaces = (getpid() == 1 ? ["pid"] : []) + ["mnt", "ipc", "uts", "net"]
            report.uid = jail.uid
            report.gid = jail.gid
            if landlock {
                let abi = vireo_landlock_abi()
                if abi > 0 {
                    var failed: Int32 = -1
                    let restricted = withCStrings(paths.map(\.path) + ["/proc"]) { pointers in
                        pointers.withUnsafeBufferPointer { names in
                            (paths.map { Int32($0.writable ? 1 : 0) } + [0]).withUnsafeBufferPointer { writable in
                                vireo_landlock_restrict(names.baseAddress, writable.baseAddress, Int32(paths.count + 1), &failed)
                            }
                        }
                    }
                    guard restricted == 0 else {
                        let path = failed >= 0 && Int(failed) < paths.count ? paths[Int(failed)].path : "restrict_self"
                        throw .host(operation: "Landlock rule for \(path)", errno: restricted)
                    }
                    report.landlock = "abi\(abi)"
                } else {
                    report.landlock = "unavailable"
                }
            }
        }
        if seccomp != .off {
            let caught = vireo_seccomp_catch_violations(2)
            guard caught == 0 else { throw .host(operation: "install the SIGSYS handler", errno: caught) }
            Confinement.seccomp = seccomp
            if let failure = Confinement.prepare() {
                throw .host(operation: "compile the seccomp filters: \(failure)", errno: EINVAL)
            }
            let applied = vireo_seccomp_apply(ThreadKind.main.slot)
            guard applied == 0 else { throw .host(operation: "install the seccomp filter", errno: applied) }
            report.seccomp = seccomp
        }
        return report
    }

    private static func threadCount() -> Int {
        guard let directory = opendir("/proc/self/task") else { return 0 }
        defer { closedir(directory) }
        var count = 0
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != "." && name != ".." { count += 1 }
        }
        return count
    }
}

/// The text of a NUL-terminated C buffer.
func cText(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
