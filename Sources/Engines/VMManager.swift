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
    public func start(_ name: String) throws(LibraryError) -> StartedVM {
        let bundle = try library.bundle(named: name)
        let lock = try VMLock(path: bundle.lockPath, create: true)
        guard lock.tryExclusive() else {
            let state = library.status(of: bundle).state
            if state == .busy { throw .busy(name: name) }
            throw .wrongState(name: name, state: state.rawValue, action: "start",
                              hint: state == .paused ? "resume it with `vireo resume \(name)`" : "see `vireo info \(name)`, or attach with `vireo console \(name)`")
        }
        guard lock.isCurrent else { throw .notFound(name: name, root: library.root) }
        let definition = try bundle.load()
        // A definition from an older Vireo (or edited by hand) meets today's rules before it runs.
        try VMLibrary.validate(definition)
        return try engine(definition.engine).start(EngineVM(bundle: bundle, definition: definition), lock: lock)
    }

    public enum StopOutcome: Sendable, Equatable {
        case alreadyOff(VMState)
        case shutDown
        case poweredOff
    }

    /// Stops a VM: asks the guest (the ACPI power button; Ctrl-Alt-Del for kvm VMs without ACPI)
    /// and waits `timeout` seconds, or with `force` powers it off, killing the engine process if
    /// it does not go. A guest that ignores the request keeps running and this throws.
    public func stop(_ name: String, force: Bool, timeout: Double) throws(LibraryError) -> StopOutcome {
        guard timeout > 0, timeout.isFinite else { throw .invalidValue(field: "--timeout", reason: "\(timeout) is not a number of seconds above 0") }
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
        try engine.requestShutdown(vm)
        guard Self.waitUntilStopped(bundle, seconds: timeout) else {
            let request = definition.engine == .kvm && !(status.description?.acpi ?? definition.acpi) ? "Ctrl-Alt-Del" : "the ACPI power button"
            throw .engine(name: name, reason: "did not shut down within \(Int(timeout)) s (the guest did not act on \(request)) and is still running; `vireo stop \(name) --force` powers it off", exitStatus: 1)
        }
        return .shutDown
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
        let (vm, engine) = try running(name, action: "pause")
        try engine.pause(vm)
    }

    public func resume(_ name: String) throws(LibraryError) {
        let (vm, engine) = try running(name, action: "resume")
        try engine.resume(vm)
    }

    public func reset(_ name: String) throws(LibraryError) {
        let (vm, engine) = try running(name, action: "reset")
        try engine.reset(vm)
    }

    public func setBalloon(_ name: String, bytes: UInt64) throws(LibraryError) {
        let (vm, engine) = try running(name, action: "set the balloon of")
        guard bytes <= vm.definition.memoryBytes else {
            throw .invalidValue(field: "SIZE", reason: "\(bytes >> 20) MiB is more than VM '\(name)' has (\(vm.definition.memoryBytes >> 20) MiB)")
        }
        try engine.setBalloon(vm, bytes: bytes)
    }

    public func counters(_ name: String) throws(LibraryError) -> VMCounters {
        let (vm, engine) = try running(name, action: "read the counters of")
        return try engine.counters(vm)
    }

    public func openConsole(_ name: String) throws(LibraryError) -> ConsoleStream {
        let (vm, engine) = try running(name, action: "attach to the console of",
                                       hint: "start it with `vireo start \(name) --console`; past output: `vireo logs \(name)`")
        return try engine.openConsole(vm)
    }

    public func display(_ name: String) throws(LibraryError) -> DisplayAccess {
        // What the engine lacks altogether is said first; only then whether the VM runs.
        let (vm, engine) = try defined(name)
        try engine.require(.display, vm, action: "show the display of")
        _ = try running(name, action: "show the display of")
        return try engine.display(vm)
    }

    public func screenshot(_ name: String, to path: String) throws(LibraryError) {
        let absolute = HostFiles.absolute(path)
        guard absolute.hasSuffix(".png") else { throw .invalidValue(field: "FILE", reason: "\(path) must end in .png (screenshots are PNG)") }
        let directory = HostFiles.parent(of: absolute)
        guard HostFiles.isDirectory(directory), access(directory, W_OK) == 0 else {
            throw .invalidValue(field: "FILE", reason: "\(directory) is not a writable directory")
        }
        let (vm, engine) = try defined(name)
        try engine.require(.display, vm, action: "take a screenshot of")
        _ = try running(name, action: "take a screenshot of")
        // Written next to the target and renamed, so a failed screendump leaves no half a file.
        let temporary = absolute + ".vireo-tmp.png"
        unlink(temporary)
        do { try engine.screenshot(vm, to: temporary) } catch {
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
        try engine.require(.keyboard, vm, action: "send keys to")
        _ = try running(name, action: "send keys to")
        try engine.sendKeys(vm, chords)
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
        try engine(definition.engine).ejectMedium(vm)
        definition.iso = nil
        try bundle.save(definition)
        return .ejectedRunning
    }
}
