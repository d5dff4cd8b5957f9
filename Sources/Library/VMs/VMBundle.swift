import DiskImage
import FoundationEssentials
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// One VM's directory and the typed paths inside it (tart's layout):
/// `config.json`, `vm.lock`, `control.sock`, `console.log`, `vmm.log`, `vmm.pid`, `kernel`,
/// `initrd` and the VM's own disks.
public struct VMBundle: Sendable {
    public let directory: String
    public var name: String { HostFiles.lastComponent(of: directory) }

    public init(directory: String) { self.directory = directory }

    public var configPath: String { directory + "/config.json" }
    public var lockPath: String { directory + "/vm.lock" }
    public var controlPath: String { directory + "/control.sock" }
    public var consoleLogPath: String { directory + "/console.log" }
    public var vmmLogPath: String { directory + "/vmm.log" }
    public var pidPath: String { directory + "/vmm.pid" }
    /// The state `vireo save` wrote (docs/snapshots.md); `vireo start` resumes from it and the
    /// VMM removes it once restored.
    public var savedStatePath: String { directory + "/vmm/saved.state" }
    public var hasSavedState: Bool { HostFiles.exists(savedStatePath) }
    /// The host side of the VM's vsock device (connect and send `CONNECT <port>`).
    public var vsockPath: String { directory + "/vsock.sock" }
    /// qemu engine: QEMU's QMP control socket, its serial console and its VNC display, in the
    /// directory its (jailed) uid may write (`vmm/`).
    public var qmpPath: String { directory + "/vmm/qmp.sock" }
    public var consoleSocketPath: String { directory + "/vmm/console.sock" }
    /// The qemu engine's channel to qemu-guest-agent in the guest (virtio-serial).
    public var guestAgentPath: String { directory + "/vmm/qga.sock" }
    public var vncPath: String { directory + "/vmm/vnc.sock" }

    /// Where a path stored in the config points on the host.
    public func resolve(_ stored: String) -> String {
        stored.hasPrefix("/") || DiskFormat.isNetworkAddress(stored) ? stored : directory + "/" + stored
    }

    /// The definition in this directory. `vmDirectory`: where its relative disk paths are (a
    /// snapshot's saved definition lives below its VM's directory).
    public func load(vmDirectory: String? = nil) throws(LibraryError) -> VMDefinition {
        let recorded = try loadAsRecorded()
        return recorded.version < 2 ? Self.adoptingChains(recorded, vmDirectory: vmDirectory ?? directory) : recorded
    }

    /// The definition, for a caller that holds the VM's lock exclusively (a start, a change). A
    /// version-1 definition's adopted chains are written down here, so they are adopted once:
    /// a header the VM's own process rewrites afterwards meets the record instead of becoming it.
    public func loadRecordingChains() throws(LibraryError) -> VMDefinition {
        let recorded = try loadAsRecorded()
        guard recorded.version < 2 else { return recorded }
        let adopted = Self.adoptingChains(recorded, vmDirectory: directory)
        try save(adopted)
        return adopted
    }

    /// The definition as its file holds it.
    private func loadAsRecorded() throws(LibraryError) -> VMDefinition {
        let bytes = try HostFiles.readAll(configPath)
        let definition: VMDefinition
        do {
            definition = try JSONDecoder().decode(VMDefinition.self, from: Data(bytes))
        } catch {
            throw .corrupt(path: configPath, reason: "not a valid VM configuration (\(error)); restore it or delete the VM")
        }
        guard definition.version <= VMDefinition.currentVersion else {
            throw .corrupt(path: configPath, reason: "written by a newer Vireo (configuration version \(definition.version), this one reads up to \(VMDefinition.currentVersion))")
        }
        return definition
    }

    /// A version-1 definition recorded no chains: its qcow2 disks adopt, once, the chains their
    /// headers name (in the formats each records; layers in the VM's directory stay relative).
    /// Raw disks rest on nothing, whatever their bytes say. The next save writes version 2.
    static func adoptingChains(_ definition: VMDefinition, vmDirectory: String) -> VMDefinition {
        var adopted = definition
        adopted.version = VMDefinition.currentVersion
        for index in adopted.disks.indices where adopted.disks[index].format == .qcow2 {
            let disk = adopted.disks[index]
            let path = disk.isOwned ? vmDirectory + "/" + disk.path : disk.path
            guard let chain = try? DiskChains.adopt(path, format: .qcow2, field: "disk") else { continue }
            adopted.disks[index].backing = chain.map { layer in
                layer.path.hasPrefix(vmDirectory + "/") ? BackingLayer(path: String(layer.path.dropFirst(vmDirectory.count + 1)), format: layer.format) : layer
            }
        }
        return adopted
    }

    public func save(_ definition: VMDefinition) throws(LibraryError) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data: Data
        do { data = try encoder.encode(definition) } catch {
            throw .corrupt(path: configPath, reason: "cannot encode the configuration: \(error)")
        }
        try HostFiles.writeAtomically(Array(data) + [0x0a], to: configPath)
    }

    /// Why the VM's last run failed, from the end of `vmm.log`: `vireo-vmm` ends every run with
    /// `exit status N` after the reason; status 1 is a failure (triple fault, KVM internal error,
    /// VMM fault). Nil for a clean stop (0), a signal (128+N), a refused start (2), or a run that
    /// left no last line (SIGKILL: the user's or the host's doing, not the guest's).
    public func lastRunFailure() -> String? {
        let fd = open(vmmLogPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        let size = lseek(fd, 0, SEEK_END)
        guard size > 0 else { return nil }
        let length = Int(min(size, 4096))
        var tail = [UInt8](repeating: 0, count: length)
        let count = tail.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(size) - off_t(length)) }
        guard count == length else { return nil }
        let lines = tail.split(separator: 0x0a).map { String(decoding: $0, as: UTF8.self) }
        guard lines.count >= 2, lines[lines.count - 1] == "vireo: exit status 1" else { return nil }
        let reason = lines[lines.count - 2]
        return reason.hasPrefix("vireo: ") ? String(reason.dropFirst(7)) : reason
    }

    /// Why the last run ended, when the kernel's OOM killer ended it inside the VM's memory limit
    /// (the control groups it ran in are listed in `cgroups`; they are made afresh at each start).
    public func outOfMemoryEnd() -> String? {
        guard let listing = try? HostFiles.readAll(directory + "/cgroups") else { return nil }
        for line in String(decoding: listing, as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1)
            guard parts.count == 2, parts[0] == "memory" || parts[0] == "unified" else { continue }
            let file = String(parts[1]) + (parts[0] == "unified" ? "/memory.events" : "/memory.oom_control")
            guard let text = try? HostFiles.readAll(file) else { continue }
            let kills = String(decoding: text, as: UTF8.self).split(separator: "\n").first { $0.hasPrefix("oom_kill ") }.flatMap { Int($0.dropFirst(9)) } ?? 0
            if kills > 0 {
                let limitFile = String(parts[1]) + (parts[0] == "unified" ? "/memory.max" : "/memory.limit_in_bytes")
                let limit = (try? HostFiles.readAll(limitFile)).flatMap { UInt64(String(decoding: $0, as: UTF8.self).filter { !$0.isWhitespace }) }
                return "out of memory: the VM's engine reached its memory limit" + (limit.map { " (\($0 >> 20) MiB)" } ?? "") + " and the kernel's OOM killer ended it"
            }
        }
        return nil
    }

    /// Removes the (empty) control groups the VM's last run left, for `vireo delete`.
    public func removeControlGroups() {
        guard let listing = try? HostFiles.readAll(directory + "/cgroups") else { return }
        for line in String(decoding: listing, as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1)
            guard parts.count == 2, parts[1].hasPrefix("/sys/fs/cgroup/") else { continue }
            // Its real-time budget, if any, back to the parent now rather than when the kernel frees it.
            if parts[0] == "cpu" { _ = try? HostFiles.writeInPlace("0", to: String(parts[1]) + "/cpu.rt_runtime_us") }
            rmdir(String(parts[1]))
        }
    }

    /// Where virtiofsd binds a VM's shared folders, one directory per tag (its mount namespace's
    /// view; the host's are empty mount points). Outside /run/vireo (0700): virtiofsd, as an
    /// unprivileged uid, must pass through to its directory.
    public static let shareMountRoot = "/run/vireo-shares"

    /// Removes the empty mount points of VM `uuid`'s shared folders but those in `keeping`: all of
    /// them (and their directory) for `vireo delete`; before a start, those of shares removed since.
    /// Only empty directories go (rmdir): a server's bind lives in its own mount namespace.
    public static func removeShareMountPoints(uuid: String, keeping: Set<String> = []) {
        let directory = shareMountRoot + "/" + uuid
        for tag in (try? HostFiles.entries(of: directory)) ?? [] where !keeping.contains(tag) { rmdir(directory + "/" + tag) }
        if keeping.isEmpty { rmdir(directory) }
    }

    /// Whether the VM process (or a command changing the VM) holds the lock.
    public var isLocked: Bool { VMLock.isHeld(path: lockPath) }

    /// The processes an engine runs a VM in.
    static let engineProcesses: Set<String> = ["vireo-vmm", "qemu-system-x86_64"]

    /// The pid `vireo start` recorded, if the process still runs and is an engine process for this VM.
    public func recordedPID(uuid: String) -> pid_t? {
        guard let bytes = try? HostFiles.readAll(pidPath),
              let pid = pid_t(String(decoding: bytes.filter { $0 >= 0x30 && $0 <= 0x39 }, as: UTF8.self)), pid > 1,
              let command = try? HostFiles.readAll("/proc/\(pid)/cmdline") else { return nil }
        let words = command.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        guard let program = words.first.map({ HostFiles.lastComponent(of: $0) }), Self.engineProcesses.contains(program),
              words.contains(where: { $0.contains(uuid) }) else { return nil }
        return pid
    }
}
