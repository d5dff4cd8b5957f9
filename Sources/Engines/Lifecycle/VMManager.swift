import API
import Library
#if canImport(Glibc)
import Glibc
#endif

/// Every VM lifecycle rule in one place, over every engine: the CLI calls this and nothing
/// below it, and so will the REST server. It finds a VM, checks its state, picks its engine and
/// waits where waiting is part of the verb (stop).
public struct VMManager: Sendable {
    public let library: VMLibrary
    public let kvm: KVMEngine
    public let qemu: QEMUEngine

    public init(root: String, environment: [String: String]) {
        let kvm = KVMEngine(environment: environment)
        let qemu = QEMUEngine(environment: environment)
        self.kvm = kvm
        self.qemu = qemu
        library = VMLibrary(root: root) { bundle in
            guard let definition = try? bundle.load() else { return nil }
            let vm = EngineVM(bundle: bundle, definition: definition)
            return definition.engine == .qemu ? qemu.describe(vm) : kvm.describe(vm)
        }
    }

    public init(environment: [String: String]) {
        self.init(root: VMLibrary.defaultRoot(environment: environment), environment: environment)
    }

    public func engine(_ kind: EngineKind) -> any Engine {
        switch kind {
        case .kvm: return kvm
        case .qemu: return qemu
        }
    }

    /// A VM as defined, in whatever state, and its engine.
    func defined(_ name: String) throws(LibraryError) -> (EngineVM, any Engine) {
        let bundle = try library.bundle(named: name)
        let definition = try bundle.load()
        return (EngineVM(bundle: bundle, definition: definition), engine(definition.engine))
    }

    /// Refuses, naming `action`, unless the VM is running or paused (a caller about to do
    /// something costly first, as the API's upload before it stages a file).
    public func requireRunning(_ name: String, action: String) throws(LibraryError) { _ = try running(name, action: action) }

    /// A running (or paused) VM and its engine; a VM that is off gets a refusal naming `action`.
    func running(_ name: String, action: String, hint: String? = nil) throws(LibraryError) -> (EngineVM, any Engine) {
        let bundle = try library.bundle(named: name)
        let definition = try bundle.load()
        let status = library.status(of: bundle)
        guard !status.state.isOff else {
            throw .wrongState(name: name, state: status.state.rawValue, action: action, hint: hint ?? "start it first with `vireo start \(name)`")
        }
        return (EngineVM(bundle: bundle, definition: definition), engine(definition.engine))
    }

    // MARK: start and stop

    /// Starts a stopped VM on its engine. The lock is taken here and handed to the engine's
    /// process, so two starts (or a start and a delete) cannot both win.
    /// With `incoming`, the VM arrives on that connected migration stream instead of booting
    /// (`vireo receive`); this returns once it runs.
    public func start(_ name: String, discardState: Bool = false, incoming: IncomingMigration? = nil,
                      isolation: IsolationRequest = IsolationRequest()) throws(LibraryError) -> StartedVM {
        let bundle = try library.bundle(named: name)
        let lock = try VMLock(path: bundle.lockPath, create: true)
        guard lock.tryExclusive() else {
            let state = library.status(of: bundle).state
            if state == .busy { throw .busy(name: name) }
            throw .wrongState(name: name, state: state.rawValue, action: "start",
                              hint: state == .paused ? "resume it with `vireo resume \(name)`" : "see `vireo info \(name)`, or attach with `vireo console \(name)`")
        }
        guard lock.isCurrent else { throw .notFound(name: name, root: library.root) }
        var definition = try bundle.loadRecordingChains()
        // An unattended install that finished on the last run (its installer printed the marker
        // and powered off): the ISO comes out and the VM boots what it installed.
        var finishedInstall = false
        if definition.unattended != nil, !bundle.hasSavedState, incoming == nil,
           UnattendedProgress.read(consoleLog: bundle.consoleLogPath).finished {
            definition = try library.finishUnattended(bundle, definition)
            finishedInstall = true
        }
        // A definition from an older Vireo (or edited by hand) meets today's rules before it runs.
        try VMLibrary.validate(definition)
        if discardState, bundle.hasSavedState, unlink(bundle.savedStatePath) != 0 {
            throw .io(operation: "remove the saved state", path: bundle.savedStatePath, errno: errno)
        }
        let resuming = bundle.hasSavedState
        var vm = EngineVM(bundle: bundle, definition: definition)
        vm.isolation = isolation
        let networks = HostNetworks(library: library)
        do throws(LibraryError) {
            let networking = try networks.prepare(bundle: vm.bundle, definition: vm.definition)
            var started: StartedVM
            if let incoming {
                guard let arriving = engine(definition.engine) as? any MigratingEngine else { throw EngineRefusal.noMigration(vm) }
                started = try arriving.start(vm, lock: lock, networking: networking, incoming: incoming)
            } else {
                started = try engine(definition.engine).start(vm, lock: lock, networking: networking)
            }
            if definition.resources.vcpuPins != nil || definition.resources.emulatorCPUs != nil {
                do throws(LibraryError) {
                    try ThreadPinning.apply(definition.resources, pid: started.pid,
                                            vcpuThreads: engine(definition.engine).vcpuThreads(vm, pid: started.pid), name: name)
                } catch {
                    // Never left running unpinned against the user's wish.
                    try? engine(definition.engine).powerOff(vm)
                    _ = Self.waitUntilStopped(bundle, seconds: 10)
                    throw error
                }
            }
            // A resumed guest's clock stands where it was saved: its agent sets it from the host's
            // at once, rather than NTP slewing it (or never, offline) — as libvirt's
            // `virsh domtime --now` after a restore.
            if resuming, let agent = engine(definition.engine) as? any GuestAgentEngine, let warning = agent.synchroniseClock(vm) {
                started.warnings.append(warning)
            }
            if finishedInstall {
                started.warnings.append("the unattended install finished on the last run: the ISO is ejected and VM '\(name)' boots its installed system")
            }
            // Networks left up by VMs that powered themselves off since (no daemon saw them go).
            started.warnings += networks.releaseIdle()
            return started
        } catch {
            // Whatever this start brought up for nothing goes down again (its taps already have).
            networks.releaseIdle(failedStart: definition.uuid)
            if resuming, case let .engine(name, reason, status) = error, bundle.hasSavedState {
                throw .engine(name: name, reason: reason + "; the saved state is kept: fix the cause, or boot afresh with `vireo start \(name) --discard-state`", exitStatus: status)
            }
            throw error
        }
    }

    /// `vireo set`: a stopped VM's settings, or a running VM's resource limits, applied at once
    /// to its control groups and kept in its definition (docs/resources.md).
    public func change(_ name: String, _ request: ChangeRequest) throws(LibraryError) -> VMDefinition {
        let bundle = try library.bundle(named: name)
        let status = library.status(of: bundle)
        guard !status.state.isOff, request.changesOnlyResources else { return try library.change(name, request) }
        var definition = try bundle.load()
        let limits = request.applyingResources(to: definition.resources)
        try limits.validate(cpus: definition.cpus, memoryBytes: definition.memoryBytes)
        let cgroupFields = request.fields.filter { !["--pin", "--pin-emulator"].contains($0) }
        if let groups = VMControlGroups.recorded(in: bundle) {
            try groups.apply(limits, cpus: definition.cpus, disks: definition.disks.map { bundle.resolve($0.path) })
        } else if !cgroupFields.isEmpty {
            throw .wrongState(name: name, state: status.state.rawValue, action: "change the limits of",
                              hint: "it was started without control groups; stop it, set the limits, and start it again")
        }
        if request.vcpuPins != nil || request.emulatorCPUs != nil, let pid = status.description?.pid, pid > 0 {
            let vm = EngineVM(bundle: bundle, definition: definition)
            try ThreadPinning.apply(limits, pid: pid, vcpuThreads: engine(definition.engine).vcpuThreads(vm, pid: pid), name: name)
        }
        definition.resources = limits
        try bundle.save(definition)
        return definition
    }

    /// `vireo snapshot take`: of a running (or paused) VM live, with its memory; of one that is
    /// off, its disks (and its saved state, when it is saved).
    /// Returns the snapshot and what the user should know (a live snapshot whose memory could not
    /// be kept is recorded as a disk-only one, and says why).
    public func takeSnapshot(_ name: String, snapshot: String?, description: String?) throws(LibraryError) -> (SnapshotRecord, warnings: [String]) {
        let bundle = try library.bundle(named: name)
        if library.status(of: bundle).state.isOff {
            return (try library.takeSnapshotOffline(name, snapshot: snapshot, description: description), [])
        }
        let (vm, running) = try running(name, action: "snapshot")
        guard let engine = running as? any StateTransferEngine else { throw EngineRefusal.noStateTransfer(vm, action: "snapshot the running") }
        var warnings: [String] = []
        let record = try library.takeSnapshotLive(name, snapshot: snapshot, description: description) { (record) throws(LibraryError) -> Bool in
            guard let lost = try engine.snapshot(vm, id: record.id) else { return true }
            warnings.append("the snapshot's memory could not be kept (\(lost)); it holds the disks only")
            return false
        }
        return (record, warnings)
    }

    /// `vireo save`: the VM's state and memory go to its directory and it stops in state
    /// "saved"; `vireo start` resumes it. A save that fails leaves it running.
    public func save(_ name: String, timeout: Double = 600) throws(LibraryError) -> [String] {
        let (vm, engine) = try running(name, action: "save")
        guard let saving = engine as? any StateTransferEngine else { throw EngineRefusal.noStateTransfer(vm, action: "save the state of") }
        try saving.saveState(vm)
        guard Self.waitUntilStopped(vm.bundle, seconds: timeout) else {
            throw .engine(name: name, reason: "saved its state but did not stop within \(Int(timeout)) s", exitStatus: 1)
        }
        return HostNetworks(library: library).releaseIdle()
    }

    public enum StopOutcome: Sendable, Equatable {
        case alreadyOff(VMState)
        case shutDown
        /// The guest ignored the power button; its agent's guest-shutdown stopped it.
        case shutDownByAgent
        case poweredOff
    }

    /// Stops a VM: asks the guest (the ACPI power button; Ctrl-Alt-Del for kvm VMs without ACPI)
    /// and waits `timeout` seconds, or with `force` powers it off, killing the engine process if
    /// it does not go. A guest that ignores the request keeps running and this throws.
    public func stop(_ name: String, force: Bool, timeout: Double) throws(LibraryError) -> (outcome: StopOutcome, warnings: [String]) {
        let outcome = try stopEngine(name, force: force, timeout: timeout)
        // Networks nothing uses any more go down, and the VM's forwards leave the firewall; the
        // VM is stopped whatever happens there, so failures are warnings.
        return (outcome, HostNetworks(library: library).releaseIdle())
    }

    func stopEngine(_ name: String, force: Bool, timeout: Double) throws(LibraryError) -> StopOutcome {
        guard timeout > 0, timeout.isFinite else { throw .invalidValue(field: "timeout", reason: "\(timeout) is not a number of seconds above 0") }
        let bundle = try library.bundle(named: name)
        let status = library.status(of: bundle)
        if status.state.isOff { return .alreadyOff(status.state) }
        let definition = try bundle.load()
        let vm = EngineVM(bundle: bundle, definition: definition)
        let engine = engine(definition.engine)
        if force {
            try? engine.powerOff(vm)
            if !Self.waitUntilStopped(bundle, seconds: min(timeout, 10)) {
                // The engine no longer answers: end its process.
                if let pid = bundle.recordedPID(uuid: definition.uuid) { kill(pid, SIGKILL) }
                guard Self.waitUntilStopped(bundle, seconds: 10) else {
                    throw .engine(name: name, reason: "did not stop after power-off and SIGKILL; its lock \(bundle.lockPath) is still held", exitStatus: 1)
                }
            }
            return .poweredOff
        }
        do {
            try engine.requestShutdown(vm)
        } catch {
            // The guest may have powered off between the look above and the request (its control
            // socket is gone, or its engine is already stopping): then it is off, as asked.
            if Self.stoppedMeanwhile(bundle, after: error, timeout: timeout) { return .alreadyOff(library.status(of: bundle).state) }
            throw error
        }
        // A guest that ignores the power button (no acpid, a desktop asking its user) but runs
        // an agent is asked through the agent after a third of the time, as `virsh shutdown
        // --mode acpi,agent` falls back.
        var viaAgent = false
        if !Self.waitUntilStopped(bundle, seconds: timeout / 3), let agent = engine as? any GuestAgentEngine {
            viaAgent = agent.agentShutdown(vm)
        }
        guard Self.waitUntilStopped(bundle, seconds: timeout * 2 / 3) else {
            let request = definition.engine == .kvm && !(status.description?.acpi ?? definition.acpi) ? "Ctrl-Alt-Del" : "the ACPI power button"
            throw .engine(name: name, reason: "did not shut down within \(Int(timeout)) s (the guest did not act on \(request)\(viaAgent ? " nor on its agent's guest-shutdown" : "")) and is still running; `vireo stop \(name) --force` powers it off", exitStatus: 1)
        }
        return viaAgent ? .shutDownByAgent : .shutDown
    }

    /// After a failed shutdown request: whether the VM stopped on its own meanwhile. A refusal
    /// for its state ("paused") is answered at once; one saying it is already stopping waits.
    static func stoppedMeanwhile(_ bundle: VMBundle, after error: LibraryError, timeout: Double) -> Bool {
        var wait = 2.0
        if case let .wrongState(_, state, _, _) = error {
            switch state {
            case "stopping": wait = timeout
            // Its process does not answer: on its way out (or still starting), as before.
            case EngineRefusal.notAnsweringState: break
            default: return false
            }
        }
        return waitUntilStopped(bundle, seconds: wait)
    }

    /// Waits until nothing holds the VM's lock (its process has exited). False on time-out.
    public static func waitUntilStopped(_ bundle: VMBundle, seconds: Double) -> Bool {
        var remaining = Int(seconds * 20)
        while bundle.isLocked {
            if remaining <= 0 { return false }
            remaining -= 1
            usleep(50_000)
        }
        return true
    }

    // MARK: running VMs

    public func pause(_ name: String) throws(LibraryError) {
        try onRunning(name, action: "pause") { (vm, engine) throws(LibraryError) in try engine.pause(vm) }
    }

    public func resume(_ name: String) throws(LibraryError) {
        try onRunning(name, action: "resume") { (vm, engine) throws(LibraryError) in try engine.resume(vm) }
    }

    public func reset(_ name: String) throws(LibraryError) {
        try onRunning(name, action: "reset") { (vm, engine) throws(LibraryError) in try engine.reset(vm) }
    }

    public func setBalloon(_ name: String, bytes: UInt64) throws(LibraryError) {
        try onRunning(name, action: "set the balloon of") { (vm, engine) throws(LibraryError) in
            guard bytes <= vm.definition.memoryBytes else {
                throw .invalidValue(field: "SIZE", reason: "\(bytes >> 20) MiB is more than VM '\(name)' has (\(vm.definition.memoryBytes >> 20) MiB)")
            }
            try engine.setBalloon(vm, bytes: bytes)
        }
    }

    public func counters(_ name: String) throws(LibraryError) -> VMCounters {
        try onRunning(name, action: "read the counters of") { (vm, engine) throws(LibraryError) in try engine.counters(vm) }
    }

    /// A request to a running VM's process. When it fails on the way (the process closed the
    /// connection or did not answer) and the VM has stopped meanwhile — the guest powered off as
    /// the request arrived — the answer is the VM's state, a conflict like any other, not a
    /// failure of the host.
    func onRunning<Result>(_ name: String, action: String,
                           _ body: (EngineVM, any Engine) throws(LibraryError) -> Result) throws(LibraryError) -> Result {
        let (vm, engine) = try running(name, action: action)
        do {
            return try body(vm, engine)
        } catch {
            guard case .engine = error, Self.waitUntilStopped(vm.bundle, seconds: 2) else { throw error }
            throw .wrongState(name: name, state: library.status(of: vm.bundle).state.rawValue, action: action,
                              hint: "it stopped while the request was on its way (see `vireo list`)")
        }
    }

    public func openConsole(_ name: String) throws(LibraryError) -> ConsoleStream {
        let (vm, engine) = try running(name, action: "attach to the console of",
                                       hint: "start it with `vireo start \(name) --console`; past output: `vireo logs \(name)`")
        return try engine.openConsole(vm)
    }

    public func display(_ name: String) throws(LibraryError) -> DisplayAccess {
        // What the engine lacks altogether is said first; only then whether the VM runs.
        let (vm, engine) = try defined(name)
        guard let screen = engine as? any DisplayEngine else { throw EngineRefusal.noDisplay(vm, action: "show the display of") }
        _ = try running(name, action: "show the display of")
        return try screen.display(vm)
    }

    /// Runs a command in a running VM's guest through its agent (`vireo exec`).
    public func exec(_ name: String, command: [String], timeoutSeconds: Int = 300) throws(LibraryError) -> GuestExecResult {
        let (vm, engine) = try defined(name)
        guard let agent = engine as? any GuestAgentEngine else { throw EngineRefusal.noGuestAgent(vm) }
        guard timeoutSeconds > 0, timeoutSeconds <= 86_400 else { throw .invalidValue(field: "timeout", reason: "\(timeoutSeconds) is not from 1 to 86400 seconds") }
        _ = try running(name, action: "run a command in")
        return try agent.exec(vm, command: command, timeoutSeconds: timeoutSeconds)
    }

    /// `vireo cp`: a file into (`toGuest`) or out of a running guest through its agent.
    /// `limit`: the most bytes taken from the guest (its file's length is the guest's to say).
    public func copy(_ name: String, hostPath: String, guestPath: String, toGuest: Bool, limit: UInt64? = nil,
                     progress: (UInt64, UInt64?) -> Void = { _, _ in }) throws(LibraryError) -> UInt64 {
        let (vm, engine) = try defined(name)
        guard let agent = engine as? any GuestFileEngine else { throw EngineRefusal.noGuestAgent(vm) }
        _ = try running(name, action: "copy files to or from")
        if toGuest { return try agent.copyToGuest(vm, from: hostPath, to: guestPath) { progress($0, $1) } }
        return try agent.copyFromGuest(vm, from: guestPath, to: hostPath, limit: limit) { progress($0, nil) }
    }

    public func screenshot(_ name: String, to path: String) throws(LibraryError) {
        let absolute = HostFiles.absolute(path)
        guard absolute.hasSuffix(".png") else { throw .invalidValue(field: "FILE", reason: "\(path) must end in .png (screenshots are PNG)") }
        let directory = HostFiles.parent(of: absolute)
        guard HostFiles.isDirectory(directory), access(directory, W_OK) == 0 else {
            throw .invalidValue(field: "FILE", reason: "\(directory) is not a writable directory")
        }
        let (vm, engine) = try defined(name)
        guard let screen = engine as? any DisplayEngine else { throw EngineRefusal.noDisplay(vm, action: "take a screenshot of") }
        _ = try running(name, action: "take a screenshot of")
        // Written next to the target and renamed, so a failed screendump leaves no half a file.
        let temporary = absolute + ".vireo-tmp.png"
        unlink(temporary)
        do { try screen.screenshot(vm, to: temporary) } catch {
            unlink(temporary)
            throw error
        }
        guard HostFiles.size(temporary) > 0, rename(temporary, absolute) == 0 else {
            let code = errno
            unlink(temporary)
            throw .io(operation: "save screenshot", path: absolute, errno: code == 0 ? EIO : code)
        }
    }

    public func sendKeys(_ name: String, _ chords: [KeyChord]) throws(LibraryError) {
        let (vm, engine) = try defined(name)
        guard let keyboard = engine as? any DisplayEngine else { throw EngineRefusal.noKeyboard(vm) }
        _ = try running(name, action: "send keys to")
        try keyboard.sendKeys(vm, chords)
    }

    public enum EjectOutcome: Sendable { case wasEmpty, ejectedStopped, ejectedRunning }

    /// Takes the ISO out: from the definition of a stopped VM, and from the drive of a running
    /// one too. The running VM's definition is rewritten without its lock (QEMU holds it); that
    /// is safe because every other change of a definition needs the lock.
    public func eject(_ name: String) throws(LibraryError) -> EjectOutcome {
        let bundle = try library.bundle(named: name)
        var definition = try bundle.load()
        guard definition.iso != nil else { return .wasEmpty }
        let state = library.status(of: bundle).state
        if state.isOff {
            var request = ChangeRequest()
            request.iso = .some(nil)
            _ = try library.change(name, request)
            return .ejectedStopped
        }
        let vm = EngineVM(bundle: bundle, definition: definition)
        guard let drive = engine(definition.engine) as? any RemovableMediaEngine else { throw EngineRefusal.noCDROM(vm) }
        try drive.ejectMedium(vm)
        // Without its disc the installer cannot go on: the install is abandoned.
        definition = definition.withoutUnattended()
        definition.iso = nil
        try bundle.save(definition)
        return .ejectedRunning
    }

    // MARK: network cards and forwards

    /// Adds a card to a stopped VM.
    public func addCard(_ name: String, _ card: NetworkAttachment) throws(LibraryError) -> VMDefinition {
        try library.update(name, action: "add a network card to") { (definition, _) throws(LibraryError) in
            var changed = definition
            changed.networks.append(card)
            try VMLibrary.validate(changed)
            try library.checkNetworks(changed, previous: definition)
            definition = changed
        }
    }

    /// Removes a stopped VM's card, by index or MAC.
    public func removeCard(_ name: String, _ which: String) throws(LibraryError) -> NetworkAttachment {
        var removed: NetworkAttachment?
        _ = try library.update(name, action: "remove a network card from") { (definition, _) throws(LibraryError) in
            let index = Int(which).flatMap { definition.networks.indices.contains($0) ? $0 : nil }
                ?? definition.networks.firstIndex { $0.mac.lowercased() == which.lowercased() }
            guard let index else {
                throw .invalidValue(field: "CARD", reason: "VM '\(name)' has no card \(which) (its cards: \(definition.networks.enumerated().map { "\($0.offset) \($0.element.mac)" }.joined(separator: ", ").nonEmpty ?? "none"))")
            }
            removed = definition.networks.remove(at: index)
        }
        guard let removed else { throw .invalidValue(field: "CARD", reason: "nothing removed") }
        return removed
    }

    public enum ForwardChange: Sendable { case add(PortForward, card: Int?), remove(PortForward) }

    /// Adds or removes a port forward on a stopped VM, or on a running one whose card is on a
    /// Vireo network (the firewall changes at once). passt takes its forwards when it starts, so
    /// a running VM's user card is refused.
    public func changeForward(_ name: String, _ change: ForwardChange) throws(LibraryError) -> VMDefinition {
        let bundle = try library.bundle(named: name)
        let apply = { (definition: VMDefinition) throws(LibraryError) -> VMDefinition in
            var changed = definition
            switch change {
            case let .add(forward, card):
                let index: Int
                if let card {
                    guard changed.networks.indices.contains(card) else {
                        throw .invalidValue(field: "nics", reason: "VM '\(name)' has no card \(card) (it has \(changed.networks.count))")
                    }
                    index = card
                } else {
                    guard let first = changed.networks.firstIndex(where: { $0.attachment.acceptsForwards }) else {
                        throw .invalidValue(field: "FORWARD", reason: "VM '\(name)' has no nat, network or user card to forward ports to")
                    }
                    index = first
                }
                changed.networks[index].forwards.append(forward)
            case let .remove(forward):
                guard let index = changed.networks.firstIndex(where: { $0.forwards.contains(forward) }) else {
                    let all = changed.networks.flatMap(\.forwards).map(\.description).joined(separator: ", ")
                    throw .invalidValue(field: "FORWARD", reason: "VM '\(name)' does not forward \(forward) (it forwards: \(all.isEmpty ? "nothing" : all))")
                }
                changed.networks[index].forwards.removeAll { $0 == forward }
            }
            try VMLibrary.validate(changed)
            return changed
        }
        if library.status(of: bundle).state.isOff {
            return try library.update(name, action: "change the forwards of") { (definition, _) throws(LibraryError) in
                let changed = try apply(definition)
                try library.checkNetworks(changed, previous: definition)
                definition = changed
            }
        }
        // Running: the definition is rewritten beside the running process (which never reads it
        // again), under the network lock that also orders firewall changes.
        let networks = HostNetworks(library: library)
        return try networks.store.locked { () throws(LibraryError) -> VMDefinition in
            let definition = try bundle.load()
            let changed = try apply(definition)
            for (before, after) in zip(definition.networks, changed.networks) where before.forwards != after.forwards && after.attachment == .user {
                throw .wrongState(name: name, state: "running", action: "change the forwards of a user-mode card of", hint: "passt takes its forwards when the VM starts; stop the VM, change them, and start it again")
            }
            try library.checkNetworks(changed, previous: definition)
            try bundle.save(changed)
            do throws(LibraryError) { try networks.applyFirewall() } catch {
                try? bundle.save(definition)
                throw error
            }
            return changed
        }
    }
}

extension String {
    var nonEmpty: String? { isEmpty ? nil : self }
}
