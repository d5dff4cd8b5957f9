import API
import CHostSupport
import CSandbox
import Library
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// A connected migration stream a VM arrives on, and how its disks come (docs/migration.md).
public struct IncomingMigration: Sendable {
    public var fd: Int32
    public var copiesDisks: Bool
    public init(fd: Int32, copiesDisks: Bool) { self.fd = fd; self.copiesDisks = copiesDisks }
}

/// Runs library VMs on Vireo's own VMM: each one a detached `vireo-vmm` process that holds the
/// VM's lock for as long as it lives, answering on its control socket (docs/control-socket.md).
public struct KVMEngine: MigratingEngine {
    public var kind: EngineKind { .kvm }
    /// The `vireo-vmm` executable: `$VIREO_VMM`, else the one beside the running `vireo`.
    public let vmmPath: String
    /// `$VIREO_SECCOMP=log`: filters allow and the kernel logs what they would refuse.
    let seccompLogOnly: Bool

    public init(environment: [String: String]) {
        seccompLogOnly = environment["VIREO_SECCOMP"] == "log"
        if let path = environment["VIREO_VMM"], !path.isEmpty {
            vmmPath = path
        } else {
            var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
            let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
            let me = count > 0 ? String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "vireo"
            vmmPath = (me.lastIndex(of: "/").map { String(me[..<$0]) } ?? ".") + "/vireo-vmm"
        }
    }

    /// The machine a definition describes, as the VMM will build it: paths resolved against the
    /// VM's directory, each disk's recorded chain, each card on the backend prepared for it.
    /// Every machine rule is checked here, before anything is spawned.
    public static func machineSpec(_ definition: VMDefinition, bundle: VMBundle, cards: [PreparedCard]) throws(LibraryError) -> MachineSpec {
        guard let kernel = definition.kernel else {
            throw .wrongState(name: definition.name, state: "without a kernel", action: "start",
                              hint: "give it one with `vireo set \(definition.name) --kernel PATH` (the kvm engine boots Linux kernels directly)")
        }
        var spec = MachineSpec(kernel: bundle.resolve(kernel))
        spec.initrd = definition.initrd.map(bundle.resolve)
        spec.commandLine = definition.commandLine
        spec.cpus = definition.cpus
        spec.cpuModel = definition.cpuModel ?? "host"
        spec.memoryBytes = definition.memoryBytes
        // The format and the chain the definition records: the VMM opens nothing else.
        spec.disks = definition.disks.map { disk in
            var machineDisk = MachineSpec.Disk(path: bundle.resolve(disk.path), format: disk.format, readOnly: disk.readOnly, serial: disk.serial,
                                               backing: bundle.chain(of: disk))
            machineDisk.cache = disk.cache
            return machineDisk
        }
        spec.nics = cards.map { card in
            switch card.backend {
            case let .tapName(name):
                var nic = MachineSpec.NIC(backend: .tap(name), mac: card.mac)
                nic.queues = card.queues.flatMap { $0 > 1 ? $0 : nil }
                return nic
            case let .tapDescriptor(slot, _, queueSlots):
                var nic = MachineSpec.NIC(backend: .tapDescriptor(PreparedNetworking.inherited(slot)), mac: card.mac)
                if !queueSlots.isEmpty { nic.queueDescriptors = queueSlots.map(PreparedNetworking.inherited) }
                return nic
            case let .streamDescriptor(slot): return MachineSpec.NIC(backend: .streamDescriptor(PreparedNetworking.inherited(slot)), mac: card.mac)
            }
        }
        spec.vsock = definition.vsockCID.map { MachineSpec.Vsock(socketPath: bundle.vsockPath, guestCID: $0) }
        if definition.balloon { spec.balloon = MachineSpec.Balloon(deflateOnOOM: true, statisticsInterval: 5) }
        spec.entropyDevice = definition.entropyDevice
        spec.acpi = definition.acpi
        spec.onReboot = MachineSpec.RebootPolicy(rawValue: definition.onReboot) ?? .exit
        spec.generationID = definition.generationID
        spec.memory = definition.memoryBacking.machineBacking
        if !definition.shares.isEmpty {
            // A virtio-fs device per share on the socket its virtiofsd listens on (ShareServers),
            // and the list the guest's mount script reads (CloudInit.mountSharesScript) on the
            // command line, as this engine has no SMBIOS. virtiofsd maps guest RAM to reach the
            // guest's buffers: RAM is a memfd both map shared (QEMU's memory-backend-memfd,share=on).
            spec.fileSystems = definition.shares.map { MachineSpec.FileSystem(tag: $0.tag, socketPath: ShareServers.socketPath(bundle, tag: $0.tag)) }
            spec.commandLine += definition.shares.map { " vireo.share=" + $0.guestListing }.joined()
            if spec.memory.file == nil { spec.memory.file = .memfd }
            spec.memory.shared = true
        }
        spec.realTimePriority = definition.resources.rtPriority.map { Int32(truncatingIfNeeded: $0) }
        spec.console = "file:" + bundle.consoleLogPath
        do { try MachineRules.check(spec) } catch { throw LibraryError(error) }
        return spec
    }

    /// Starts the VM and returns its pid once it runs and answers on its control socket.
    public func start(_ vm: EngineVM, lock: VMLock, networking: PreparedNetworking) throws(LibraryError) -> StartedVM {
        try start(vm, lock: lock, networking: networking, incoming: nil)
    }

    /// With `incoming` (a connected migration stream), the VMM takes the VM from it instead of
    /// booting, and this waits for as long as the migration takes.
    public func start(_ vm: EngineVM, lock: VMLock, networking: PreparedNetworking, incoming: IncomingMigration?) throws(LibraryError) -> StartedVM {
        let (bundle, definition, name) = (vm.bundle, vm.definition, vm.name)
        var inherit = networking.descriptors
        // The machine goes whole, in its binary form, on a sealed memfd the VMM inherits: no
        // setting is rendered as text and read back, and nobody can change it on the way.
        let spec = try Self.machineSpec(definition, bundle: bundle, cards: networking.cards)
        let encoded: [UInt8]
        do throws(MachineSpecError) { encoded = try spec.encoded() } catch { throw LibraryError(error) }
        let specDescriptor = encoded.withUnsafeBytes { vireo_sealed_memfd("vireo-machine-spec", $0.baseAddress, $0.count) }
        guard specDescriptor >= 0 else { throw .io(operation: "memfd_create (machine spec)", path: bundle.directory, errno: errno) }
        defer { close(specDescriptor) }
        // Their servers listen before the VMM connects; they end with its connection, or here if
        // it does not start. The VMM connects as root, before its jail.
        var shareServers = try ShareServers.start(vm, clientOwner: nil)
        var ready = false
        defer { if ready { shareServers.releaseIdentity() } else { shareServers.stop() } }
        var arguments = [vmmPath, "--spec-fd", String(PreparedNetworking.inherited(inherit.count))]
        inherit.append(specDescriptor)
        arguments += ["--control", bundle.controlPath,
                      "--name", definition.name, "--uuid", definition.uuid, "--lock-fd", "3", "--ready-fd", "4",
                      "--state-file", bundle.savedStatePath, "--snapshot-dir", bundle.vmmDirectory]
        // The jail (docs/isolation.md): only root can build it; without root the VMM runs as
        // the user, seccomp-filtered all the same.
        var disabled: [String] = []
        if !vm.isolation.jail { disabled.append("no-jail") } else if geteuid() != 0 { disabled.append("not-root") }
        if !vm.isolation.seccomp { disabled.append("no-seccomp") }
        var identity: JailIdentity?
        defer { if let identity { close(identity.descriptor) } }
        if vm.isolation.jail && geteuid() == 0 {
            let allocated = try JailIdentity.allocate(for: definition.uuid)
            identity = allocated
            try allocated.grant(vm)
            arguments += ["--jail", "uid=\(allocated.uid),gid=\(allocated.gid)"]
            // Held by the VMM for its whole life; never named, never used.
            inherit.append(allocated.descriptor)
        } else {
            try bundle.prepareVMMDirectory()
        }
        if vm.isolation.seccomp {
            // `log` (allow, and have the kernel log what the filter would refuse) is how the
            // allow lists are checked against a whole test run.
            let mode = seccompLogOnly ? "log" : "on"
            arguments += ["--seccomp", mode]
        }
        if let incoming {
            arguments += ["--incoming-fd", String(PreparedNetworking.inherited(inherit.count)),
                          "--incoming-disks", incoming.copiesDisks ? "copied" : "shared"]
            inherit.append(incoming.fd)
        } else if bundle.hasSavedState {
            arguments.append("--restore")
        }

        // The previous run's console output stays readable as console.log.1.
        if HostFiles.size(bundle.consoleLogPath) > 0 { _ = rename(bundle.consoleLogPath, bundle.consoleLogPath + ".1") }
        let log = open(bundle.vmmLogPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard log >= 0 else { throw .io(operation: "open", path: bundle.vmmLogPath, errno: errno) }
        defer { close(log) }
        var pipeEnds: [Int32] = [-1, -1]
        guard pipe(&pipeEnds) == 0 else { throw .io(operation: "pipe", path: bundle.directory, errno: errno) }
        for end in pipeEnds { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        defer { close(pipeEnds[0]) }

        let groups = try VMControlGroups.prepare(definition, bundle: bundle)
        var pid: pid_t = 0
        // The jailed VMM joins its groups before it execs (a memory limit covers every page it
        // touches); one started without a jail is moved in right after the spawn.
        let processFiles = groups?.processFiles ?? []
        let spawned = withCStrings(arguments) { argv in
            inherit.withUnsafeBufferPointer { inherited in
                guard identity != nil else {
                    return vireo_spawn_detached_inheriting(vmmPath, argv, log, lock.fd, pipeEnds[1], inherited.baseAddress, Int32(inherited.count), &pid)
                }
                return withCStrings(processFiles) { files in
                    vireo_spawn_namespaced(vmmPath, argv, log, lock.fd, pipeEnds[1], inherited.baseAddress, Int32(inherited.count),
                                           files, Int32(processFiles.count), &pid)
                }
            }
        }
        close(pipeEnds[1])
        // The VMM has its own copies now; ours would keep taps and passt alive after it exits.
        networking.close()
        guard spawned == 0 else {
            throw .engine(name: name, reason: "cannot run \(vmmPath): \(String(cString: strerror(spawned)))", exitStatus: 1)
        }
        if identity == nil { try groups?.enter(pid, name: name) }
        try? HostFiles.writeAtomically(Array("\(pid)\n".utf8), to: bundle.pidPath)

        // An arriving VM is ready when the migration is done, however long that takes; a VMM that
        // dies closes the pipe.
        let answer = Self.readLine(pipeEnds[0], timeoutMilliseconds: incoming == nil ? 120_000 : -1)
        if answer.hasPrefix("ready") {
            // "ready PID uid=... seccomp=..." : what actually confines the VMM, as it reports it.
            var record = IsolationRecord(parsing: answer) ?? IsolationRecord()
            record.disabled = disabled
            try? HostFiles.writeAtomically(Array((record.line + "\n").utf8), to: bundle.isolationPath)
            DetachedChildren.adopt(pid)
            ready = true
            return StartedVM(pid: pid)
        }
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == 0 && answer.isEmpty {
            // Alive but silent for two minutes: do not leave a half-started VM behind.
            kill(pid, SIGKILL)
            waitpid(pid, &status, 0)
            throw .engine(name: name, reason: "vireo-vmm did not report ready within 120 s and was killed; see \(bundle.vmmLogPath)", exitStatus: 1)
        }
        // A VMM that said why it failed is still exiting, and holds the VM's lock until it has:
        // wait for that (bounded), so that `vireo start` returning means the VM is at rest again
        // (CI saw `vireo list` call the VM "busy" right after a refused start).
        Self.reapExiting(pid)
        if answer.hasPrefix("error ") {
            let rest = answer.dropFirst(6)
            let code = Int32(rest.prefix(while: { $0 != " " })) ?? 1
            let message = rest.drop(while: { $0 != " " }).dropFirst()
            throw .engine(name: name, reason: "did not start: \(message)", exitStatus: code)
        }
        throw .engine(name: name, reason: "vireo-vmm exited before the VM was ready; see \(bundle.vmmLogPath)", exitStatus: 1)
    }

    /// Waits up to ten seconds for a VMM that has given up to exit, then kills it.
    static func reapExiting(_ pid: pid_t) {
        var status: Int32 = 0
        for _ in 0..<1000 {
            let reaped = waitpid(pid, &status, WNOHANG)
            if reaped == pid || (reaped < 0 && errno != EINTR) { return }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        waitpid(pid, &status, 0)
    }

    // MARK: control requests

    /// A shared folder's state (the guest's open files) lives in its virtiofsd, which no saved
    /// state can carry (the VMM refuses too; this says so before asking it).
    static func refuseStateCapture(_ vm: EngineVM, action: String, hint: String) throws(LibraryError) {
        guard let share = vm.definition.shares.first else { return }
        throw .engine(name: vm.name, reason: "cannot \(action) it: it shares \(share.path) ('\(share.tag)') over virtio-fs, whose state virtiofsd keeps (the guest's open files) and no saved state can hold; \(hint)", exitStatus: 2)
    }

    public func describe(_ vm: EngineVM) -> VMDescription? {
        guard let connection = try? ControlConnection(path: vm.bundle.controlPath, timeoutSeconds: 2) else { return nil }
        return try? connection.call("describe", as: VMDescription.self)
    }

    public func counters(_ vm: EngineVM) throws(LibraryError) -> VMCounters {
        try call(vm, "counters", as: VMCounters.self, action: "read the counters of")
    }
    public func requestShutdown(_ vm: EngineVM) throws(LibraryError) { _ = try call(vm, "shutdown", action: "shut down") }
    public func powerOff(_ vm: EngineVM) throws(LibraryError) { _ = try call(vm, "power-off", action: "power off") }
    public func pause(_ vm: EngineVM) throws(LibraryError) { _ = try call(vm, "pause", action: "pause") }
    public func resume(_ vm: EngineVM) throws(LibraryError) { _ = try call(vm, "resume", action: "resume") }
    public func reset(_ vm: EngineVM) throws(LibraryError) { _ = try call(vm, "reset", action: "reset") }
    public func snapshot(_ vm: EngineVM, id: String) throws(LibraryError) -> String? {
        try Self.refuseStateCapture(vm, action: "take a live snapshot of", hint: "take the snapshot while it is stopped")
        struct Taken: Decodable { var memoryLost: String?; enum CodingKeys: String, CodingKey { case memoryLost = "memory_lost" } }
        do {
            let connection = try ControlConnection(path: vm.bundle.controlPath, timeoutSeconds: 600)
            let lost = try connection.call("snapshot \(id)", as: Taken.self).memoryLost
            // The VMM writes only in its own directory (docs/isolation.md); the state joins the
            // snapshot here.
            let written = vm.bundle.vmmDirectory + "/" + id + ".state"
            if lost == nil, rename(written, vm.bundle.snapshotStatePath(id)) != 0 {
                let code = errno
                unlink(written)
                return "its state was written but could not be moved into the snapshot (\(String(cString: strerror(code))))"
            }
            return lost
        } catch {
            throw Self.translate(error, vm: vm, action: "snapshot")
        }
    }
    public func saveState(_ vm: EngineVM) throws(LibraryError) {
        try Self.refuseStateCapture(vm, action: "save", hint: "shut it down (`vireo stop \(vm.name)`), or remove its shared folders while it is stopped")
        // Writing a large guest's RAM takes longer than the usual request time-out.
        do {
            let connection = try ControlConnection(path: vm.bundle.controlPath, timeoutSeconds: 600)
            _ = try connection.call("save", as: ControlStatus.self)
        } catch {
            throw Self.translate(error, vm: vm, action: "save")
        }
    }
    public func setBalloon(_ vm: EngineVM, bytes: UInt64) throws(LibraryError) {
        _ = try call(vm, "balloon \(bytes >> 20)", action: "set the balloon of")
    }

    public func openConsole(_ vm: EngineVM) throws(LibraryError) -> ConsoleStream {
        let connection: ControlConnection
        do {
            connection = try ControlConnection(path: vm.bundle.controlPath)
            _ = try connection.call("console", as: ControlStatus.self)
        } catch {
            throw Self.translate(error, vm: vm, action: "attach to the console of")
        }
        // The console streams indefinitely; only the request had a time-out.
        var never = timeval(tv_sec: 0, tv_usec: 0)
        setsockopt(connection.fd, SOL_SOCKET, SO_RCVTIMEO, &never, socklen_t(MemoryLayout<timeval>.size))
        return ConsoleStream(fd: connection.fd, early: connection.takePending(), owner: connection)
    }

    /// One request on the VM's control socket, its refusals turned into the library's errors.
    func call<Reply: Decodable>(_ vm: EngineVM, _ request: String, as type: Reply.Type = ControlStatus.self,
                                action: String) throws(LibraryError) -> Reply {
        do {
            let connection = try ControlConnection(path: vm.bundle.controlPath)
            return try connection.call(request, as: type)
        } catch {
            throw Self.translate(error, vm: vm, action: action)
        }
    }

    static func translate(_ error: ControlError, vm: EngineVM, action: String) -> LibraryError {
        let name = vm.name
        if case let .unreachable(_, code) = error, let conflict = EngineRefusal.notAnswering(vm, action: action, errno: code) { return conflict }
        guard case let .refused(code, message) = error else { return .engine(name: name, reason: error.description, exitStatus: 1) }
        switch code {
        case "paused":
            return .wrongState(name: name, state: "paused", action: action,
                               hint: action == "pause" ? "`vireo resume \(name)` continues it"
                                   : "resume it first (`vireo resume \(name)`) or power it off (`vireo stop \(name) --force`)")
        case "not-paused":
            return .wrongState(name: name, state: "running", action: action, hint: "only a paused VM can be resumed")
        case "no-balloon":
            return .wrongState(name: name, state: "without a balloon device", action: action,
                               hint: "stop it and add one with `vireo set \(name) --balloon`")
        case "migrating":
            return .wrongState(name: name, state: "being migrated", action: action, hint: "wait for the migration to finish, or cancel it (Ctrl-C in `vireo migrate`)")
        case "stopping":
            return .wrongState(name: name, state: "stopping", action: action, hint: "wait for it to stop, then `vireo start \(name)`")
        case "busy":
            return .wrongState(name: name, state: "busy with a save, snapshot, reboot or migration", action: action, hint: "try again in a moment")
        default:
            return .control(name: name, code: code, message: message)
        }
    }

    static func readLine(_ fd: Int32, timeoutMilliseconds: Int32) -> String {
        var collected: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1024)
        var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while !collected.contains(0x0a) {
            let ready = poll(&descriptor, 1, timeoutMilliseconds)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { break }
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            collected += buffer[0..<count]
        }
        return String(decoding: collected.prefix(while: { $0 != 0x0a }), as: UTF8.self)
    }
}

