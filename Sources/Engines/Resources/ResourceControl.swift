import CHostSupport
import Library
#if canImport(Glibc)
import Glibc
#endif

/// A VM's control groups (docs/resources.md): one per controller under the `vireo/<uuid>` group
/// beside the starting process's own, cgroup v2 where the host has a unified hierarchy with the
/// controllers and v1 where it mounts them separately (these machines). The engine's process
/// joins them before it execs (`processFiles`), so every page it touches is charged to the VM;
/// the directories are listed in the VM's bundle
/// (`cgroups`), so later commands find them whatever cgroup they run in.
public struct VMControlGroups: Sendable {
    /// Controller name → the VM's directory for it (v1), or "unified" → its one directory (v2).
    public var directories: [String: String]

    public var isUnified: Bool { directories["unified"] != nil }

    static let root = "/sys/fs/cgroup"

    /// The directories a VM with `uuid` gets on this host for one run: `vireo/<uuid>.<random>`,
    /// since two libraries on one host can hold VMs with one UUID (a migrated VM and the copy it
    /// left). Controllers the host lacks are left out; a limit that needs one is refused by `apply`.
    public static func make(uuid: String) throws(LibraryError) -> VMControlGroups {
        var directories: [String: String] = [:]
        var generator = SystemRandomNumberGenerator()
        let group = uuid + "." + String(generator.next() as UInt32, radix: 16)
        let own = ownGroups()
        if HostFiles.exists(root + "/cgroup.controllers") {
            // v2: enable the controllers for the children of the groups on the way down.
            let base = root + (own[""] ?? "")
            let directory = base + "/vireo/" + group
            try HostFiles.makeDirectories(directory)
            for parent in [base, base + "/vireo"] {
                _ = try? HostFiles.writeInPlace("+cpu +memory +pids +io +cpuset", to: parent + "/cgroup.subtree_control")
            }
            directories["unified"] = directory
        } else {
            for controller in ["cpu", "cpuacct", "memory", "pids", "cpuset", "blkio"] where HostFiles.isDirectory(root + "/" + controller) {
                let base = root + "/" + controller + (own[controller] ?? "")
                let directory = base + "/vireo/" + group
                try HostFiles.makeDirectories(directory)
                if controller == "cpuset" {
                    // v1 makes cpuset groups empty, and a task cannot join a group with no CPUs or
                    // memory nodes: each level takes its parent's until `apply` narrows the VM's.
                    for (parent, child) in [(base, base + "/vireo"), (base + "/vireo", directory)] {
                        for file in ["cpuset.mems", "cpuset.cpus"] where read(child + "/" + file).trimmed.isEmpty {
                            try HostFiles.writeInPlace(read(parent + "/" + file).trimmed, to: child + "/" + file)
                        }
                    }
                }
                directories[controller] = directory
            }
        }
        return VMControlGroups(directories: directories)
    }

    /// This process's group per controller ("" for v2), from /proc/self/cgroup.
    static func ownGroups() -> [String: String] {
        guard let bytes = try? HostFiles.readAll("/proc/self/cgroup") else { return [:] }
        var groups: [String: String] = [:]
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3 else { continue }
            let path = fields[2] == "/" ? "" : String(fields[2])
            for controller in fields[1].split(separator: ",") { groups[String(controller)] = path }
            if fields[1].isEmpty { groups[""] = path }
        }
        return groups
    }

    /// Writes `limits` (nil fields: no limit) into the groups.
    public func apply(_ limits: ResourceLimits, cpus: Int, disks: [String] = []) throws(LibraryError) {
        // A controller the host lacks is only an error when a limit needs it.
        func write(_ value: String, _ controller: String, _ file: String, field: String, limited: Bool) throws(LibraryError) {
            guard let directory = directories[isUnified ? "unified" : controller] else {
                if !limited { return }
                throw .invalidValue(field: field, reason: "this host has no \(controller) cgroup controller mounted")
            }
            do { try HostFiles.writeInPlace(value, to: directory + "/" + file) } catch {
                throw .invalidValue(field: field, reason: "the kernel refused \(value) for \(directory)/\(file): \(error)")
            }
        }
        let period = 100_000
        if isUnified {
            try write(limits.cpuCapPercent.map { "\($0 * period / 100) \(period)" } ?? "max \(period)", "cpu", "cpu.max", field: "cpu_cap_percent",
                      limited: limits.cpuCapPercent != nil)
            try write(String(limits.cpuWeight ?? 100), "cpu", "cpu.weight", field: "cpu_weight", limited: limits.cpuWeight != nil)
            try write(limits.memoryLimitBytes.map(String.init) ?? "max", "memory", "memory.max", field: "memory_limit_bytes", limited: limits.memoryLimitBytes != nil)
            try write(limits.pidsLimit.map(String.init) ?? "max", "pids", "pids.max", field: "pids_limit", limited: limits.pidsLimit != nil)
            return
        }
        try write(String(period), "cpu", "cpu.cfs_period_us", field: "cpu_cap_percent", limited: limits.cpuCapPercent != nil)
        try write(limits.cpuCapPercent.map { String($0 * period / 100) } ?? "-1", "cpu", "cpu.cfs_quota_us", field: "cpu_cap_percent",
                  limited: limits.cpuCapPercent != nil)
        // v2's weight 1–10000 (default 100) onto v1's shares (default 1024).
        try write(String(max(2, (limits.cpuWeight ?? 100) * 1024 / 100)), "cpu", "cpu.shares", field: "cpu_weight", limited: limits.cpuWeight != nil)
        try write(limits.memoryLimitBytes.map(String.init) ?? "-1", "memory", "memory.limit_in_bytes", field: "memory_limit_bytes",
                  limited: limits.memoryLimitBytes != nil)
        try write(limits.pidsLimit.map(String.init) ?? "max", "pids", "pids.max", field: "pids_limit", limited: limits.pidsLimit != nil)
        // Pinning's cpuset: every CPU the pins and the emulator name (affinity does the per-thread
        // part); all of the parent's while some threads may run anywhere.
        if let directory = directories[isUnified ? "unified" : "cpuset"], HostFiles.exists(directory + "/cpuset.cpus") {
            let pinned = Set((limits.vcpuPins ?? []).flatMap(\.cpus) + (limits.emulatorCPUs ?? []))
            let everything = limits.vcpuPins == nil || limits.emulatorCPUs == nil
            let cpus = everything
                ? Self.read(HostFiles.parent(of: directory) + "/cpuset.cpus").trimmed
                : pinned.sorted().map(String.init).joined(separator: ",")
            // v2's parents may leave it empty (meaning "the parent's"): then write nothing.
            if !cpus.isEmpty {
                do { try HostFiles.writeInPlace(cpus, to: directory + "/cpuset.cpus") } catch {
                    throw .invalidValue(field: "vcpu_pins", reason: "the kernel refused CPUs \(cpus) for \(directory)/cpuset.cpus: \(error)")
                }
            }
        }
        try applyIOLimits(limits.ioLimits, disks: disks)
        if let directory = directories["cpu"], HostFiles.exists(directory + "/cpu.rt_runtime_us") {
            try Self.grantRealTime(limits.rtPriority == nil ? 0 : Self.realTimeBudget, to: directory)
        }
    }

    /// `--io-limit` on every host block device holding one of `disks`: v1's
    /// `blkio.throttle.*_device` files (0 removes a rule), v2's `io.max` ("max" removes one). On
    /// v1 buffered writes are throttled only when they are flushed from the VM's own process (the
    /// VMM's fdatasync on a guest flush); reads and v2's writeback are throttled as they happen.
    func applyIOLimits(_ limits: IOLimits?, disks: [String]) throws(LibraryError) {
        let devices: [String]
        if limits == nil {
            // Removing: whatever devices can still be found.
            devices = (try? Self.blockDevices(holding: disks)) ?? []
        } else {
            devices = try Self.blockDevices(holding: disks)
        }
        guard !devices.isEmpty else { return }
        if let directory = directories["unified"] {
            func value(_ number: UInt64?) -> String { number.map(String.init) ?? "max" }
            for device in devices {
                let line = "\(device) rbps=\(value(limits?.readBytesPerSecond)) wbps=\(value(limits?.writeBytesPerSecond)) riops=\(value(limits?.readOperationsPerSecond)) wiops=\(value(limits?.writeOperationsPerSecond))"
                do { try HostFiles.writeInPlace(line, to: directory + "/io.max") } catch {
                    if limits == nil { continue }
                    throw .invalidValue(field: "io_limits", reason: "the kernel refused '\(line)' in \(directory)/io.max: \(error)")
                }
            }
            return
        }
        guard let directory = directories["blkio"] else {
            if limits == nil { return }
            throw .invalidValue(field: "io_limits", reason: "this host has no blkio (block I/O) cgroup controller mounted")
        }
        let files: [(String, UInt64?)] = [("read_bps_device", limits?.readBytesPerSecond), ("write_bps_device", limits?.writeBytesPerSecond),
                                          ("read_iops_device", limits?.readOperationsPerSecond), ("write_iops_device", limits?.writeOperationsPerSecond)]
        for device in devices {
            for (file, number) in files {
                let line = "\(device) \(number ?? 0)"
                do { try HostFiles.writeInPlace(line, to: directory + "/blkio.throttle." + file) } catch {
                    // Clearing a rule that never was is no reason to refuse a start.
                    if limits == nil { continue }
                    throw .invalidValue(field: "io_limits", reason: "the kernel refused '\(line)' in \(directory)/blkio.throttle.\(file): \(error)")
                }
            }
        }
    }

    /// The whole-disk block devices (`MAJ:MIN`) of the file systems holding `paths`: the block
    /// controller throttles disks, not partitions or files.
    static func blockDevices(holding paths: [String]) throws(LibraryError) -> [String] {
        var devices: [String] = []
        for path in paths {
            var status = stat()
            guard stat(path, &status) == 0 else { throw .io(operation: "stat", path: path, errno: errno) }
            let device = UInt64(status.st_dev)
            let major = ((device >> 8) & 0xfff) | ((device >> 32) & ~UInt64(0xfff))
            let minor = (device & 0xff) | ((device >> 12) & ~UInt64(0xff))
            var name = "\(major):\(minor)"
            let sys = "/sys/dev/block/" + name
            guard HostFiles.exists(sys) else {
                throw .invalidValue(field: "io_limits", reason: "\(path) is on a file system with no block device (\(name): tmpfs, overlay, NFS...); the block controller cannot limit it")
            }
            if HostFiles.exists(sys + "/partition") {
                // …/block/vda/vda1: the disk is the partition's parent directory.
                var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
                if realpath(sys, &buffer) != nil {
                    let parent = HostFiles.parent(of: String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
                    let text = read(parent + "/dev").trimmed
                    if !text.isEmpty { name = text }
                }
            }
            if !devices.contains(name) { devices.append(name) }
        }
        return devices
    }

    /// Real-time microseconds per second a real-time VM's group may use on each CPU: 40 %, so a
    /// vCPU spinning at SCHED_FIFO is throttled and the host keeps the rest (the watchdog against
    /// starving it, enforced by the kernel).
    public static let realTimeBudget = 400_000

    /// With RT group scheduling (v1's cpu.rt_runtime_us), a group may run SCHED_FIFO threads
    /// only within a budget carved out of its parent's: the `vireo` parent is raised to what its
    /// live children hold plus this one's (stopped VMs' leftover groups give theirs back first).
    static func grantRealTime(_ budget: Int, to directory: String) throws(LibraryError) {
        let file = directory + "/cpu.rt_runtime_us"
        guard budget > 0 else {
            _ = try? HostFiles.writeInPlace("0", to: file)
            return
        }
        if let text = try? HostFiles.readAll("/proc/sys/kernel/sched_rt_runtime_us"), String(decoding: text, as: UTF8.self).trimmed == "-1" {
            throw .invalidValue(field: "rt_priority", reason: "the kernel's real-time throttling is off (/proc/sys/kernel/sched_rt_runtime_us is -1), so a spinning vCPU could starve the host; set it back (950000 is the default) or drop --rt-priority")
        }
        let parent = HostFiles.parent(of: directory)
        var held = 0
        for entry in (try? HostFiles.entries(of: parent)) ?? [] {
            let sibling = parent + "/" + entry
            guard sibling != directory, HostFiles.isDirectory(sibling) else { continue }
            if read(sibling + "/cgroup.procs").trimmed.isEmpty { _ = try? HostFiles.writeInPlace("0", to: sibling + "/cpu.rt_runtime_us") }
            held += Int(read(sibling + "/cpu.rt_runtime_us").trimmed) ?? 0
        }
        let needed = held + budget
        let parentFile = parent + "/cpu.rt_runtime_us"
        do {
            if (Int(read(parentFile).trimmed) ?? 0) < needed { try HostFiles.writeInPlace(String(needed), to: parentFile) }
            try HostFiles.writeInPlace(String(budget), to: file)
        } catch {
            throw .invalidValue(field: "rt_priority", reason: "the host's real-time budget has no room for this VM's \(budget) µs per second (\(parentFile) would need \(needed); the kernel allows 950000 in all by default): \(error)")
        }
    }

    /// The file of each group a spawned child writes "0" (itself) to before it execs. On v1 that
    /// is the group's `tasks`: the child has one thread, so moving it moves the process, and a
    /// thread moving itself is the one migration the kernel makes without write-locking every
    /// thread group (`cgroup_threadgroup_rwsem`). Through `cgroup.procs` that lock waited for an
    /// RCU grace period at every start, 7–16 ms on this host's kernel (bench/README.md; a kernel
    /// that locks for `tasks` too is no slower than before). v2 has `cgroup.procs` only (its
    /// `cgroup.threads` takes threaded groups).
    public var processFiles: [String] {
        Set(directories.map { controller, directory in directory + (controller == "unified" ? "/cgroup.procs" : "/tasks") }).sorted()
    }

    /// Moves `pid` (with all its threads) into every group.
    public func adopt(_ pid: pid_t) throws(LibraryError) {
        for directory in Set(directories.values) {
            do { try HostFiles.writeInPlace(String(pid), to: directory + "/cgroup.procs") } catch {
                throw .io(operation: "move pid \(pid) into the cgroup", path: directory, errno: EPERM)
            }
        }
    }

    /// CPU time the VM's processes used, in nanoseconds.
    public var cpuNanoseconds: UInt64? {
        if let directory = directories["unified"] {
            let stat = Self.read(directory + "/cpu.stat")
            let usage = stat.split(separator: "\n").first { $0.hasPrefix("usage_usec ") }.flatMap { UInt64($0.dropFirst(11)) }
            return usage.map { $0 * 1000 }
        }
        return directories["cpuacct"].flatMap { UInt64(Self.read($0 + "/cpuacct.usage").trimmed) }
    }

    public var memoryBytes: UInt64? {
        if let directory = directories["unified"] { return UInt64(Self.read(directory + "/memory.current").trimmed) }
        return directories["memory"].flatMap { UInt64(Self.read($0 + "/memory.usage_in_bytes").trimmed) }
    }

    /// How many times the kernel's OOM killer acted inside the VM's memory limit.
    public var outOfMemoryKills: UInt64 {
        let text: String
        if let directory = directories["unified"] { text = Self.read(directory + "/memory.events") } else if let directory = directories["memory"] {
            text = Self.read(directory + "/memory.oom_control")
        } else { return 0 }
        return text.split(separator: "\n").first { $0.hasPrefix("oom_kill ") }.flatMap { UInt64($0.dropFirst(9)) } ?? 0
    }

    /// Removes the groups (they must be empty: the VM stopped).
    public func remove() {
        // A removed group's real-time budget goes back to its parent only when the kernel frees
        // the group, some time after rmdir: given back first, the next start can have it at once.
        if let cpu = directories["cpu"], HostFiles.exists(cpu + "/cpu.rt_runtime_us"), Int(Self.read(cpu + "/cpu.rt_runtime_us").trimmed) != 0 {
            _ = try? HostFiles.writeInPlace("0", to: cpu + "/cpu.rt_runtime_us")
            // And the `vireo` parent down to what its other children still hold, so stopped
            // real-time VMs leave no budget reserved from the rest of the host.
            let parent = HostFiles.parent(of: cpu)
            let held = ((try? HostFiles.entries(of: parent)) ?? []).reduce(0) { sum, entry in
                sum + (Int(Self.read(parent + "/" + entry + "/cpu.rt_runtime_us").trimmed) ?? 0)
            }
            _ = try? HostFiles.writeInPlace(String(held), to: parent + "/cpu.rt_runtime_us")
        }
        for directory in Set(directories.values) { rmdir(directory) }
    }

    static func read(_ path: String) -> String {
        (try? HostFiles.readAll(path)).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }

    /// Before a start: the VM's groups afresh (an earlier run's, OOM counts and all, removed),
    /// with its limits. Nil when this host gives none (not root, no controllers) and the VM asks
    /// for no limit; an error when it asks for one.
    public static func prepare(_ definition: VMDefinition, bundle: VMBundle) throws(LibraryError) -> VMControlGroups? {
        recorded(in: bundle)?.remove()
        unlink(bundle.directory + "/cgroups")
        let groups: VMControlGroups
        do throws(LibraryError) {
            groups = try make(uuid: definition.uuid)
            // `ip netns exec` and containers can hide the cgroup file systems altogether.
            guard !groups.directories.isEmpty else { throw .io(operation: "find a cgroup controller under", path: root, errno: ENOENT) }
        } catch {
            if definition.resources.isUnlimited { return nil }
            throw .invalidValue(field: "resource limits", reason: "VM '\(definition.name)' has limits, but its control groups cannot be made here: \(error) (Vireo must run as root with the cgroup file systems mounted)")
        }
        try groups.apply(definition.resources, cpus: definition.cpus, disks: definition.disks.map { bundle.resolve($0.path) })
        try groups.record(in: bundle)
        return groups
    }

    /// After the spawn: the engine's process goes into the groups, or is killed (a VM never runs
    /// outside the limits it was given).
    public func enter(_ pid: pid_t, name: String) throws(LibraryError) {
        do throws(LibraryError) {
            try adopt(pid)
        } catch {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            throw .engine(name: name, reason: "its process could not be moved into its control groups (\(error)); it was stopped", exitStatus: 1)
        }
    }

    // MARK: the record in the bundle

    public static func recorded(in bundle: VMBundle) -> VMControlGroups? {
        let text = read(bundle.directory + "/cgroups")
        var directories: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1)
            guard parts.count == 2, parts[1].hasPrefix(root + "/") else { continue }
            directories[String(parts[0])] = String(parts[1])
        }
        return directories.isEmpty ? nil : VMControlGroups(directories: directories)
    }

    public func record(in bundle: VMBundle) throws(LibraryError) {
        let text = directories.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)\n" }.joined()
        try HostFiles.writeAtomically(Array(text.utf8), to: bundle.directory + "/cgroups")
    }
}

extension String {
    var trimmed: String { String(self.filter { !$0.isWhitespace }) }
}

/// vCPU and emulator pinning (`--pin`, `--pin-emulator`), applied to the running engine's threads
/// with sched_setaffinity from outside, so both engines and a running VM's `vireo set` work alike.
public enum ThreadPinning {
    /// Each pinned vCPU's thread to its CPUs; every other thread of `pid` to the emulator CPUs
    /// (all CPUs when none are given, so `none` unpins).
    public static func apply(_ limits: ResourceLimits, pid: pid_t, vcpuThreads: [Int: pid_t], name: String) throws(LibraryError) {
        let all = Array(0..<ResourceLimits.hostCPUCount)
        var pinned: [pid_t: [Int]] = [:]
        for (vcpu, thread) in vcpuThreads {
            pinned[thread] = limits.vcpuPins?.first { $0.vcpu == vcpu }?.cpus ?? all
        }
        if let pins = limits.vcpuPins {
            for pin in pins where vcpuThreads[pin.vcpu] == nil {
                throw .engine(name: name, reason: "its vcpu\(pin.vcpu) thread was not found in process \(pid) to pin it", exitStatus: 1)
            }
        }
        for thread in tasks(of: pid) where pinned[thread] == nil { pinned[thread] = limits.emulatorCPUs ?? all }
        for (thread, cpus) in pinned {
            let list = cpus.map { Int32($0) }
            let failure = list.withUnsafeBufferPointer { vireo_set_affinity(thread, $0.baseAddress, Int32($0.count)) }
            // A thread that ended meanwhile is nothing to pin.
            if failure != 0 && failure != ESRCH {
                throw .io(operation: "pin thread \(thread) of VM '\(name)' to CPUs \(cpus)", path: "/proc/\(pid)/task/\(thread)", errno: failure)
            }
        }
    }

    /// The thread ids of process `pid`.
    static func tasks(of pid: pid_t) -> [pid_t] {
        ((try? HostFiles.entries(of: "/proc/\(pid)/task")) ?? []).compactMap { pid_t($0) }
    }

    /// `vireo-vmm`'s vCPU threads (named vcpuN), waited for a moment after a start: they are
    /// made just after the VMM reports ready.
    public static func namedVCPUThreads(pid: pid_t, count: Int) -> [Int: pid_t] {
        var found: [Int: pid_t] = [:]
        for _ in 0..<100 {
            for thread in tasks(of: pid) {
                let comm = (try? HostFiles.readAll("/proc/\(pid)/task/\(thread)/comm")).map { String(decoding: $0, as: UTF8.self) } ?? ""
                let name = comm.filter { !$0.isWhitespace }
                if name.hasPrefix("vcpu"), let index = Int(name.dropFirst(4)) { found[index] = thread }
            }
            if found.count >= count { break }
            usleep(20_000)
        }
        return found
    }
}
