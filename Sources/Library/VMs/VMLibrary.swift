import API
import DiskImage
import FoundationEssentials
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// What a VM is doing, as `vireo list` shows it.
public enum VMState: String, Codable, Sendable {
    case stopped, starting, running, paused, stopping
    case shuttingDown = "shutting-down"
    /// Not running, and its last run ended in a failure (a triple fault, a KVM internal error, a
    /// VMM fault: `vireo-vmm` exited with status 1). VirtualBox calls this "Aborted".
    case crashed
    /// Locked by another vireo command that is changing it.
    case busy
    /// Not running, with a saved state (`vireo save`) that `vireo start` resumes. VirtualBox
    /// calls this "Saved".
    case saved

    /// No VMM runs it: it can be started or deleted (and changed, unless it is saved).
    public var isOff: Bool { self == .stopped || self == .crashed || self == .saved }
}

/// The VM library: one directory per VM under `root`.
public struct VMLibrary: Sendable {
    public let root: String
    /// Asks the engine running a locked VM what it is doing; nil when it does not answer. The
    /// engines module supplies it (the library knows no engine's protocol).
    public let describeRunning: @Sendable (VMBundle) -> VMDescription?

    public init(root: String, describeRunning: @escaping @Sendable (VMBundle) -> VMDescription? = { _ in nil }) {
        self.root = root
        self.describeRunning = describeRunning
    }

    /// `$VIREO_HOME`, else `/var/lib/vireo` for root, else `$XDG_DATA_HOME/vireo` (or
    /// `~/.local/share/vireo`).
    public static func defaultRoot(environment: [String: String]) -> String {
        if let home = environment["VIREO_HOME"], !home.isEmpty { return HostFiles.absolute(home) }
        if getuid() == 0 { return "/var/lib/vireo" }
        if let data = environment["XDG_DATA_HOME"], !data.isEmpty { return data + "/vireo" }
        return (environment["HOME"] ?? "/tmp") + "/.local/share/vireo"
    }

    func prepareRoot() throws(LibraryError) { try HostFiles.makeDirectories(root) }

    /// The bundle of an existing VM.
    public func bundle(named name: String) throws(LibraryError) -> VMBundle {
        try VMName.validate(name)
        let bundle = VMBundle(directory: root + "/" + name)
        guard HostFiles.exists(bundle.configPath) else { throw .notFound(name: name, root: root) }
        return bundle
    }

    /// Names of every VM, sorted. In-progress creates and deletes (hidden directories) are not VMs;
    /// leftovers of interrupted ones are cleared away here.
    public func names() throws(LibraryError) -> [String] {
        guard HostFiles.isDirectory(root) else { return [] }
        var names: [String] = []
        for entry in try HostFiles.entries(of: root) {
            if entry.hasPrefix(".creating-") || entry.hasPrefix(".deleting-") {
                sweepAbandoned(root + "/" + entry)
                continue
            }
            if !entry.hasPrefix("."), HostFiles.exists(root + "/" + entry + "/config.json") { names.append(entry) }
        }
        return names
    }

    /// Removes a staging directory whose creator is gone (its lock is free). Without a lock file
    /// it may be a delete in progress that has just removed it: such a directory is left alone
    /// for a minute (found when `vireo serve`'s event stream listed the library during deletes).
    private func sweepAbandoned(_ directory: String) {
        let lock = directory + "/vm.lock"
        if HostFiles.exists(lock) {
            if VMLock.isHeld(path: lock) { return }
        } else {
            var info = stat()
            guard stat(directory, &info) == 0, time(nil) - info.st_ctim.tv_sec > 60 else { return }
        }
        try? HostFiles.removeTree(directory)
    }

    // MARK: state

    public struct Status: Sendable {
        public var state: VMState
        public var description: VMDescription?
        /// Why the last run crashed, when `state` is `.crashed`.
        public var crashReason: String?
    }

    public func status(of bundle: VMBundle) -> Status {
        guard bundle.isLocked else {
            if bundle.hasSavedState { return Status(state: .saved) }
            if let reason = bundle.outOfMemoryEnd() ?? bundle.seccompEnd() ?? bundle.lastRunFailure() { return Status(state: .crashed, crashReason: reason) }
            return Status(state: .stopped)
        }
        if let description = describeRunning(bundle) {
            return Status(state: VMState(rawValue: description.state) ?? .running, description: description)
        }
        if let definition = try? bundle.load(), bundle.recordedPID(uuid: definition.uuid) != nil {
            return Status(state: .starting)
        }
        return Status(state: .busy)
    }

    /// Runs `body` with the VM locked: nothing runs it or changes it meanwhile. Refuses, naming
    /// the state, if it is running.
    func withStoppedVM<T>(_ name: String, action: String,
                          _ body: (VMBundle, VMLock) throws(LibraryError) -> T) throws(LibraryError) -> T {
        let bundle = try bundle(named: name)
        let lock = try VMLock(path: bundle.lockPath, create: true)
        guard lock.tryExclusive() else {
            let state = status(of: bundle).state
            if state == .busy { throw .busy(name: name) }
            throw .wrongState(name: name, state: state.rawValue, action: action,
                              hint: "stop it first with `vireo stop \(name)` (add --force to power it off)")
        }
        defer { lock.unlock() }
        guard lock.isCurrent, HostFiles.exists(bundle.configPath) else { throw .notFound(name: name, root: root) }
        do {
            _ = try bundle.loadRecordingChains()
        } catch .corrupt(let path, _) where path == bundle.configPath {
            // An unreadable definition is the body's to judge: delete still removes it.
        }
        return try body(bundle, lock)
    }
}
