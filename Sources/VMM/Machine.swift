import CKVM
import Devices
import DiskImage
import GuestMemory
import KVM
import MachineSpec
import MigrationWire
import Synchronization
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// Time since the VMM process began, the reference for the boot marker. `markStart()` is the
/// first thing `main` does.
public enum VMMClock {
    private static let start = Atomic<UInt64>(0)

    public static func now() -> UInt64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
    }

    public static func markStart() { start.store(now(), ordering: .relaxed) }

    public static var elapsedNanoseconds: UInt64 { now() - start.load(ordering: .relaxed) }
}

/// One line to stderr, prefixed, with a carriage return when stderr is a (possibly raw) terminal.
public func vmmLog(_ message: String) {
    let line = "vireo: " + message + (isatty(STDERR_FILENO) == 1 ? "\r\n" : "\n")
    var bytes = Array(line.utf8)
    _ = bytes.withUnsafeMutableBytes { writeAll(STDERR_FILENO, UnsafeRawBufferPointer($0)) }
}

final class ExitCounter: Sendable {
    let value = Atomic<UInt64>(0)
}

/// Drives one GSI of KVM's in-kernel PIC/IOAPIC.
struct KVMInterruptLine: InterruptLine {
    let vm: VirtualMachine
    let line: UInt32
    func setLevel(_ high: Bool) {
        do { try vm.setInterruptLine(line, level: high) } catch { vmmLog("interrupt line \(line): \(error)") }
    }
}

/// A complete x86_64 virtual machine: KVM VM, guest RAM, the booted kernel, vCPUs and devices.
public final class Machine: @unchecked Sendable {
    public let boot: BootConfiguration
    /// What the machine was built from; a save or a migration carries it, for the other side to
    /// check its own against.
    let spec: MachineSpec
    /// SCHED_FIFO priority of the vCPU threads (`--rt-priority`).
    var realTimePriority: Int32? { spec.realTimePriority }
    let kvm: KVMSystem
    let memory: GuestMemory
    let console: Console
    /// What the build made (MachineBuild.swift): the KVM VM and its interrupt controllers, the
    /// vCPUs, the virtio devices, and every device on its bus.
    let platform: KVMPlatform
    let processors: BuiltVCPUs
    let virtioDevices: VirtioDevices
    let buses: DeviceBuses
    var vm: VirtualMachine { platform.vm }
    var vcpus: [VCPU] { processors.vcpus }
    var portBus: PortIOBus { buses.portBus }
    var mmioBus: MMIOBus { buses.mmioBus }
    var serial: Serial8250 { buses.serial }
    var keyboardController: I8042 { buses.keyboardController }
    var rtc: RTC { buses.rtc }
    /// The ACPI platform's registers (sleep, reset, GED events); nil when the machine has no ACPI.
    var acpiRegisters: ACPIRegisters? { buses.acpiRegisters }
    var virtioTransports: [VirtioMMIOTransport] { buses.transports }
    let stop: StopController
    let pauseGate: PauseGate
    /// Exits handled per vCPU, for benchmarks and `info`.
    let exitCounts: [ExitCounter]
    var blockDevices: [(path: String, device: VirtioBlock)] { buses.blockDevices }
    var networkCards: [VirtioNet] { virtioDevices.networkCards }
    var vsock: VirtioVsock? { virtioDevices.vsock }
    var balloon: VirtioBalloon? { virtioDevices.balloon }
    var entropy: VirtioEntropy? { virtioDevices.entropy }
    var dispatcher: NotificationDispatcher { buses.dispatcher }
    /// Set once a graceful shutdown was asked for; the guest decides when it happens.
    let shutdownRequested = Atomic<Bool>(false)
    /// Boots of this machine in this process: 1, plus one per reboot in place.
    let boots = Atomic<Int>(1)
    /// What a reboot in place puts back: each vCPU's and the interrupt controllers' and PIT's
    /// state as built, before the guest first ran.
    private var vcpuPowerOnStates: [VCPUPowerOnState] { processors.powerOnStates }
    /// Serialises pause, resume, reboot and save, which all park and release the vCPUs.
    let lifecycle = Mutex<Void>(())
    /// Set once `save()` has written the state: the machine stays parked until it stops.
    let stateWritten = Atomic<Bool>(false)
    /// Set while a reboot has the vCPUs parked, so that is not reported as a user's pause.
    private let rebooting = Atomic<Bool>(false)
    /// Wall-clock seconds since the epoch when the machine was built, for `describe`.
    public let startedAt = UInt64(time(nil))
    let startedNanoseconds = VMMClock.now()
    private var control: ControlServer?
    /// vCPU threads, once `run()` has started them; guarded by `threadsLock`.
    let threadsLock = Mutex<[HostThread]>([])

    /// The CPUID every vCPU has (the configured model over KVM's supported set, or a restored or
    /// arrived state's), saved with the machine's state. Set before any vCPU runs.
    var cpuidBasis: [CPUIDEntry]
    /// What KVM offers on this host, which a saved or arriving guest's CPU must fit in.
    var supportedCPUID: [CPUIDEntry] { processors.supportedCPUID }
    /// Each disk's files, opened before the jail and read after it (`decodeDisks`): a VM's
    /// writable images are its own uid's to write, so their bytes are read only once confined.
    private var pendingDisks: [DiskFiles?]
    /// Shared disks of an arriving VM: the layers beneath each image, open and read; the image
    /// itself is the source's until it hands it over.
    var arrivingLayers: [(any DiskImage)?] = []
    /// Booted, restored or arriving: which of the three entries built it.
    let start: MachineStart
    /// How an arriving VM's disks come (nil: the VM boots or restores).
    var arrival: ArrivalMode? { if case let .receive(mode) = start { mode } else { nil } }
    /// The guest started from its kernel here (not restored, not arrived): it probes its devices.
    var bootedHere: Bool { start == .boot }
    /// The state file to restore, open but not yet read (`restoreSavedState`), or -1.
    private var pendingState: Int32 = -1
    /// Where `save` writes, and a restore read from; nil when the VMM was given no state file.
    let stateFilePath: String?
    /// Where live snapshots' states go (`<dir>/<id>/state`); nil when the VMM was given none.
    let snapshotDirectory: String?
    /// Live migration (docs/migration.md): set while one runs; the user's cancel; how much of each
    /// 10 ms the vCPUs sleep when auto-converge throttles them; per vCPU, a throttle tick to take.
    let migrating = Atomic<Bool>(false)
    let dirtyLogClaimed = Atomic<Bool>(false)
    let migrationCancelled = Atomic<Bool>(false)
    let throttlePercent = Atomic<Int>(0)
    let throttleTicks: [ExitCounter]
    /// The destination side: the connection the VM arrived on, told `running` once the vCPUs go.
    var arrivedOn: MigrationChannel?
    /// When the arriving state was in place, to log how long the rest of the start took.
    var arrivalFinished: UInt64 = 0

    /// How an arriving VM's disks come: copied in the stream, or shared storage the source hands
    /// over (docs/migration.md). `vireo receive` knows which from the offer.
    public enum ArrivalMode: String, Sendable {
        case copiedDisks = "copied"
        case sharedDisks = "shared"
    }

    /// A machine that boots the spec's kernel. `stateFile`: where a later `save` writes;
    /// `snapshotDirectory`: where live snapshots go.
    public static func boot(_ spec: MachineSpec, stateFile: String? = nil, snapshotDirectory: String? = nil) throws(VMMError) -> Machine {
        try Machine(spec: spec, start: .boot, stateFile: stateFile, snapshotDirectory: snapshotDirectory)
    }

    /// A machine that resumes the guest saved in `stateFile` (read by `finishAssembly`).
    public static func restore(_ spec: MachineSpec, stateFile: String, snapshotDirectory: String? = nil) throws(VMMError) -> Machine {
        try Machine(spec: spec, start: .restore(stateFile: stateFile), stateFile: stateFile, snapshotDirectory: snapshotDirectory)
    }

    /// A machine that takes the guest from a live-migration stream (given to `finishAssembly`).
    public static func receive(_ spec: MachineSpec, disks: ArrivalMode, stateFile: String? = nil, snapshotDirectory: String? = nil) throws(VMMError) -> Machine {
        try Machine(spec: spec, start: .receive(disks), stateFile: stateFile, snapshotDirectory: snapshotDirectory)
    }

    /// Opens what the machine needs of the host (`HostResources`), then builds it. Nothing a
    /// guest, a jailed VMM or a peer could have written is read here: `finishAssembly` does that
    /// once the VMM is confined (docs/isolation.md). The guest does not run until `run()`.
    private convenience init(spec: MachineSpec, start: MachineStart, stateFile: String?, snapshotDirectory: String?) throws(VMMError) {
        try self.init(spec: spec, resources: try HostResources.open(spec, for: start), start: start,
                      stateFile: stateFile, snapshotDirectory: snapshotDirectory)
    }

    /// The build the three entries share: the KVM VM, its memory slots and interrupt
    /// controllers, the vCPUs, and every device on the host resources opened for it.
    private init(spec: MachineSpec, resources: HostResources, start: MachineStart, stateFile: String?, snapshotDirectory: String?) throws(VMMError) {
        stateFilePath = stateFile
        self.snapshotDirectory = snapshotDirectory
        self.start = start
        pendingState = resources.stateDescriptor
        pendingDisks = resources.diskFiles.map { $0 }
        kvm = resources.kvm
        boot = resources.boot
        memory = resources.memory
        console = resources.console
        self.spec = spec
        let stop = try StopController(rebootPolicy: spec.onReboot)
        self.stop = stop

        let devices = try VirtioDevices.create(spec, resources: resources)
        virtioDevices = devices
        platform = try KVMPlatform.create(kvm, memory: memory)
        // A restored or arriving guest's RAM comes from the state file or the stream: nothing to load.
        let prepared: PreparedBoot?
        do { prepared = start == .boot ? try boot.load(into: memory) : nil } catch { throw .boot(error) }
        memory.offerHugePages()
        processors = try BuiltVCPUs.create(spec, kvm: kvm, vm: platform.vm, cpus: boot.cpus, entry: prepared)
        cpuidBasis = processors.cpuidBasis
        exitCounts = (0..<boot.cpus).map { _ in ExitCounter() }
        throttleTicks = (0..<boot.cpus).map { _ in ExitCounter() }
        pauseGate = PauseGate(vcpuCount: boot.cpus)
        buses = try DeviceBuses.create(spec, vm: platform.vm, memory: memory, console: console, usesACPI: boot.platform.usesACPI,
                                       stop: stop, devices: devices)
    }

    deinit { if pendingState >= 0 { close(pendingState) } }

    /// The spec's binary form, as saved states and migration streams carry it: made when one is
    /// written, not at every start, which would pay for Codable's machinery in time and memory.
    func specRecord() throws(StateError) -> [UInt8] {
        do throws(MachineSpecError) { return try spec.encoded() } catch { throw .invalid(field: "machine spec", reason: error.reason) }
    }

    /// Reads what the machine's own files and its arrival hold, once the VMM is confined (or at
    /// once, for a VMM that is not): the disks' headers and tables, then the saved state or the
    /// migration stream. Single-threaded, before `run()`.
    public func finishAssembly(incoming: MigrationChannel? = nil) throws(VMMError) {
        try decodeDisks()
        if pendingState >= 0 { try restoreSavedState() }
        if let incoming {
            try receive(from: incoming)
            arrivedOn = incoming
        }
    }

    /// Each disk's image read through the chain it was opened with, put in its device's place.
    private func decodeDisks() throws(VMMError) {
        for (index, files) in pendingDisks.enumerated() {
            guard let files else { continue }
            let device = blockDevices[index].device
            do throws(DiskImageError) {
                if arrival == .sharedDisks, case let .opened(opened) = files {
                    arrivingLayers.append(try opened.decodeLayers())
                    continue
                }
                // A shared network disk is the disk itself from the start (HostResources).
                if arrival == .sharedDisks { arrivingLayers.append(nil) }
                try device.bind(try files.decode())
            } catch {
                throw .invalidConfiguration(field: "--disk", reason: "\(error)")
            }
        }
        pendingDisks = []
    }

    /// Gives every vCPU the CPU a saved or arriving guest ran on, refusing one this host cannot
    /// offer. Before any vCPU runs.
    func useCPUID(_ entries: [CPUIDEntry], refuse: (String) -> VMMError) throws(VMMError) {
        let missing = CPUIDCompatibility.missing(saved: entries, host: supportedCPUID)
        guard missing.isEmpty else { throw refuse(missing.joined(separator: ", ")) }
        do throws(KVMError) {
            for (index, vcpu) in vcpus.enumerated() {
                try vcpu.setCPUID(CPUIDTemplate.entries(for: index, of: vcpus.count, supported: entries))
            }
        } catch {
            throw .kvm(error)
        }
        cpuidBasis = entries
    }

    /// Restores the state file opened at build: its header and metadata read now, in the jail.
    private func restoreSavedState() throws(VMMError) {
        guard let stateFile = stateFilePath else { return }
        let descriptor = pendingState
        pendingState = -1
        let opened = try SavedStateFile.read(descriptor: descriptor, path: stateFile)
        let saved: SavedMachineState
        do throws(StateError) {
            saved = try SavedMachineState(decoding: opened.metadata)
        } catch {
            throw .savedState(path: stateFile, reason: error.description)
        }
        // The guest keeps the CPU it was saved on; a host that cannot offer it is refused.
        try useCPUID(saved.cpuid) { missing in .savedState(path: stateFile, reason: "this host's CPU lacks features the saved guest may use: \(missing)") }
        let started = VMMClock.now()
        let mapped = try restore(saved, memoryFrom: opened)
        // The guest now runs on from the state; a later save writes a new one. A mapped file
        // lives on, unnamed, until this VMM exits (docs/snapshots.md).
        unlink(stateFile)
        vmmLog("restored from \(stateFile) in \((VMMClock.now() - started) / 1000) us (RAM \(mapped ? "mapped from the file" : "read"))")
    }

    /// Takes the VM from the migration stream: the source's description of it first, checked
    /// against this machine, then RAM, disks and state (`receiveMigration`).
    private func receive(from channel: MigrationChannel) throws(VMMError) {
        let arriving: ArrivingMachine
        do throws(MigrationError) {
            arriving = try ArrivingMachine(receivingFrom: channel)
        } catch {
            throw .migration("the source's first message: \(error)")
        }
        guard arriving.diskSizes.count == blockDevices.count else {
            throw .migration("the source has \(arriving.diskSizes.count) disks, this VM's definition \(blockDevices.count)")
        }
        if !blockDevices.isEmpty, arriving.copiesDisks != (arrival == .copiedDisks) {
            throw .migration("the source \(arriving.copiesDisks ? "copies its disks" : "shares its disks"), but this VM was prepared for \(arrival == .copiedDisks ? "copied" : "shared") disks")
        }
        if arriving.copiesDisks {
            for (index, disk) in blockDevices.enumerated() where disk.device.disk.virtualSize != arriving.diskSizes[index] {
                throw .migration("disk \(disk.path) is \(disk.device.disk.virtualSize) bytes here, \(arriving.diskSizes[index]) on the source")
            }
        }
        try useCPUID(arriving.cpuid) { missing in
            .migration("this host's CPU lacks features the guest may use: \(missing); start it on the source with a CPU model both hosts offer (`vireo set NAME --cpu baseline`)")
        }
        try receiveMigration(arriving, from: channel)
    }

    var consoleDescription: String { console.kind }

    /// Creates the control socket at `path` (docs/control-socket.md); requests are served once
    /// `run()` starts. Call before `run()`.
    public func listenForControl(path: String, identity: VMIdentity?) throws(VMMError) {
        control = try ControlServer(path: path, machine: self, identity: identity)
    }

    /// Runs the guest until it stops, then tears down every vCPU thread.
    public func run() throws(VMMError) -> MachineExit {
        installKickHandler()
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        for signal in [SIGINT, SIGTERM, SIGHUP] {
            sigaddset(&stopSignals, signal)
            // An inherited SIG_IGN would discard the signal before sigwait could take it.
            Glibc.signal(signal, SIG_DFL)
        }
        // Blocked here, so every thread spawned below inherits the mask and only the waiter takes them.
        pthread_sigmask(SIG_BLOCK, &stopSignals, nil)
        let signalSet = stopSignals
        let stop = self.stop
        _ = try HostThread.spawn(name: "signals") {
            var set = signalSet
            var received: Int32 = 0
            while sigwait(&set, &received) == 0 { stop.request(.signal(received)) }
        }

        defer { console.finish() }
        try console.startInput(to: serial, stop: stop)
        defer { control?.finish() }
        try control?.start()
        var dispatcherThreads: [HostThread] = []
        defer {
            dispatcher.stop()
            for thread in dispatcherThreads { thread.join() }
        }
        for loop in dispatcher.activeLoops {
            dispatcherThreads.append(try HostThread.spawn(name: loop == 0 ? "virtio-notify" : "virtio-io\(loop)") { [dispatcher] in
                dispatcher.run(loop: loop)
            })
        }
        // Network receive and throttled queues work on threads of their own, never on a vCPU's.
        let background: [any BackgroundDevice] = (blockDevices.map(\.device) as [any BackgroundDevice] + networkCards
                                                   + (vsock.map { [$0] } ?? []) + (balloon.map { [$0] } ?? [])).filter(\.needsBackgroundThread)
        var workers: [HostThread] = []
        defer {
            for device in background { device.stopBackground() }
            for thread in workers { thread.join() }
        }
        for (index, device) in background.enumerated() {
            workers.append(try HostThread.spawn(name: "device\(index)") { device.runBackground() })
        }
        var threads: [HostThread] = []
        for index in vcpus.indices {
            do {
                threads.append(try HostThread.spawn(name: "vcpu\(index)") { [self] in runVCPU(index) })
            } catch {
                stop.request(.vmmFault(error.description))
                break
            }
        }
        threadsLock.withLock { $0 = threads }
        if let channel = arrivedOn {
            // The source stops only on this word: until it has it, the VM runs nowhere else.
            do throws(MigrationError) {
                try channel.send(.running)
                vmmLog("migration complete: the VM runs here (\((VMMClock.now() - arrivalFinished) / 1000) us after its state was in place)")
            } catch {
                // The source cannot know it runs here; it keeps its copy paused, and this one stops
                // rather than run beside it.
                stop.request(.vmmFault("migration: the source could not be told the VM runs here (\(error)); stopped so it never runs twice"))
            }
            close(channel.fd)
            arrivedOn = nil
        }
        let exit = serveUntilStopped()
        pauseGate.release()
        kickAll(threads)
        for thread in threads { thread.join() }
        logDeviceTotals()
        noteUnprobedDevices()
        return exit
    }

    /// A kernel built without ACPI never learns of devices the DSDT lists; it boots with every
    /// CPU (the MP table) and then finds no disk. Say so, and what to do, when a booted guest
    /// never looked at any of its virtio devices.
    private func noteUnprobedDevices() {
        guard bootedHere, boot.platform.usesACPI, !virtioTransports.isEmpty, !virtioTransports.contains(where: \.wasProbed) else { return }
        vmmLog("hint: the guest never looked for its \(virtioTransports.count) virtio device(s); a kernel built without ACPI "
               + "(CONFIG_ACPI off) finds them only with --acpi off, which names them on its command line")
    }

    /// Waits for the reason to stop, rebooting the machine in place whenever the guest resets it
    /// under the `restart` policy. A reboot that fails stops the VM as a VMM fault.
    private func serveUntilStopped() -> MachineExit {
        while true {
            switch stop.wait() {
            case let .stop(reason):
                return reason
            case .reboot:
                do throws(VMMError) {
                    try rebootInPlace()
                } catch {
                    stop.request(.vmmFault("reboot failed: \(error)"))
                }
            }
        }
    }

    /// One line per virtio device with what it moved, for the VMM log (as Firecracker flushes
    /// its metrics on exit).
    private func logDeviceTotals() {
        for disk in blockDevices {
            let device = disk.device
            var queues = ""
            if device.completedByQueue.count > 1 {
                let counts = device.completedByQueue.map { String($0.count.load(ordering: .relaxed)) }.joined(separator: ", ")
                queues = " (by queue: \(counts); multiqueue taken in \(device.multiqueueSessions.load(ordering: .relaxed)) driver sessions)"
            }
            vmmLog("virtio-blk \(disk.path): \(device.completed.load(ordering: .relaxed)) requests\(queues), "
                   + "\(device.bytesRead.load(ordering: .relaxed)) bytes read, \(device.bytesWritten.load(ordering: .relaxed)) bytes written")
        }
        for card in networkCards {
            var pairs = card.queuePairs > 1
                ? " (\(card.queuePairs) queue pairs; the driver asked for \(card.largestPairsSet.load(ordering: .relaxed)) at most, uses \(card.queuePairsInUse))" : ""
            let failures = card.queueSwitchFailures.load(ordering: .relaxed)
            if failures > 0 {
                pairs += "; \(failures) tap queue attach/detach refused (last: \(String(cString: strerror(card.lastQueueSwitchError.load(ordering: .relaxed)))))"
            }
            vmmLog("virtio-net \(card.backend.name): \(card.receivedFrames.load(ordering: .relaxed)) frames in, "
                   + "\(card.transmittedFrames.load(ordering: .relaxed)) frames out, \(card.droppedFrames.load(ordering: .relaxed)) dropped\(pairs)")
        }
        if let vsock {
            vmmLog("virtio-vsock: \(vsock.packetsFromGuest.load(ordering: .relaxed)) packets from the guest, \(vsock.packetsToGuest.load(ordering: .relaxed)) to it")
        }
        if let entropy { vmmLog("virtio-rng: provided \(entropy.bytesProvided.load(ordering: .relaxed)) bytes") }
        if !virtioTransports.isEmpty {
            let raised = virtioTransports.reduce(UInt64(0)) { $0 + $1.interruptsRaised.load(ordering: .relaxed) }
            let suppressed = virtioTransports.reduce(UInt64(0)) { $0 + $1.interruptsSuppressed.load(ordering: .relaxed) }
            let sessions = virtioTransports.reduce(UInt64(0)) { $0 + $1.eventIndexSessions.load(ordering: .relaxed) }
            vmmLog("virtio: EVENT_IDX taken in \(sessions) driver sessions; \(raised) used-buffer interrupts raised, \(suppressed) left out")
        }
    }

    func kickAll(_ threads: [HostThread]) {
        for (index, thread) in threads.enumerated() {
            vcpus[index].requestImmediateExit()
            thread.kick()
        }
    }

    /// Requests a stop from outside (the control socket, tests).
    public func requestStop(_ reason: MachineExit) { stop.request(reason) }

    public func exitCount(vcpu: Int) -> UInt64 { exitCounts[vcpu].value.load(ordering: .relaxed) }

    public var vcpuCount: Int { vcpus.count }
    public var isPaused: Bool { pauseGate.isPaused && !rebooting.load(ordering: .acquiring) }
    public var isStopping: Bool { stop.isStopping }
    public var isShuttingDown: Bool { shutdownRequested.load(ordering: .relaxed) }
    public var uptimeNanoseconds: UInt64 { VMMClock.now() - startedNanoseconds }

    /// What a pause or resume request came to.
    public enum PauseChange: Sendable {
        case changed
        /// Already paused (for a pause), or not paused or already saved (for a resume).
        case unchanged
        /// A save, live snapshot, reboot or migration switch-over holds the machine: the request
        /// is answered at once, to be tried again, rather than left waiting behind it.
        case busy
    }

    /// Stops every vCPU between instructions; returns once none runs.
    public func pause() -> PauseChange {
        lifecycle.withLockIfAvailable { _ in pauseGate.pause { kickAll(threadsLock.withLock { $0 }) } ? .changed : .unchanged } ?? .busy
    }

    /// Unchanged if it was not paused, or if its state has been saved (it stops in a moment, and
    /// must not run on past the state on disk).
    public func resume() -> PauseChange {
        lifecycle.withLockIfAvailable { _ in !stateWritten.load(ordering: .acquiring) && pauseGate.resume() ? .changed : .unchanged } ?? .busy
    }

    public var bootCount: Int { boots.load(ordering: .relaxed) }
    public var hasACPI: Bool { acpiRegisters != nil }

    /// Asks the guest to shut down: the ACPI power button where the machine has ACPI
    /// (VirtualBox's "ACPI Shutdown", `virsh shutdown`), else Ctrl-Alt-Del on the keyboard
    /// controller. A guest that does not act on it keeps running.
    public func requestShutdown() {
        shutdownRequested.store(true, ordering: .relaxed)
        if let acpiRegisters {
            acpiRegisters.raiseEvents(ACPIPlatform.powerButtonEvent)
        } else {
            keyboardController.pressCtrlAltDel()
        }
    }

    /// The reset button: the machine resets as if the guest had asked, and the reboot policy
    /// decides what follows. Works while paused too (a paused VM restarts paused).
    public func requestReset() { stop.requestReset("reset button pressed (control socket)") }

    public var rebootPolicy: MachineSpec.RebootPolicy { stop.rebootPolicy }

    /// Presses the ACPI power button; false when the machine has no ACPI.
    public func pressPowerButton() -> Bool {
        guard let acpiRegisters else { return false }
        shutdownRequested.store(true, ordering: .relaxed)
        acpiRegisters.raiseEvents(ACPIPlatform.powerButtonEvent)
        return true
    }

    /// The guest reset the machine and the policy is to restart: with every vCPU parked, put
    /// devices, interrupt controllers, vCPUs and RAM back to power-on state, load the kernel,
    /// initrd and tables again, and let the vCPUs go. Disks, taps and sockets stay open. A VM the
    /// user paused meanwhile stays paused, now at the start of its next boot.
    private func rebootInPlace() throws(VMMError) {
        try lifecycle.withLock { (_) throws(VMMError) in
            let started = VMMClock.now()
            // Under the lifecycle lock nobody else pauses or resumes: a pause seen here is the user's.
            if !pauseGate.isPaused { rebooting.store(true, ordering: .releasing) }
            let pausedHere = pauseGate.pause { kickAll(threadsLock.withLock { $0 }) }
            // A reset that fails half-way leaves the vCPUs parked: the VM stops with the error and
            // never runs on half-reset state.
            var resetCompleted = false
            defer {
                if pausedHere && resetCompleted { _ = pauseGate.resume() }
                rebooting.store(false, ordering: .releasing)
            }
            guard !stop.isStopping, !stateWritten.load(ordering: .acquiring) else { return }
            for transport in virtioTransports { transport.resetDevice() }
            serial.resetState()
            keyboardController.resetState()
            acpiRegisters?.resetState()
            shutdownRequested.store(false, ordering: .relaxed)
            do throws(GuestMemoryError) {
                try memory.zeroAll()
            } catch {
                throw .memory(error)
            }
            do throws(KVMError) {
                try InterruptControllerSet(vm: vm).applyState(platform.interruptControllersAtPowerOn)
                for (index, vcpu) in vcpus.enumerated() { try vcpuPowerOnStates[index].restore(to: vcpu) }
            } catch {
                throw .kvm(error)
            }
            let prepared: PreparedBoot
            do throws(BootError) {
                prepared = try boot.load(into: memory)
            } catch {
                throw .boot(error)
            }
            do throws(KVMError) {
                try vcpus[0].configureEntry(prepared.cpuState)
            } catch {
                throw .kvm(error)
            }
            resetCompleted = true
            let count = boots.add(1, ordering: .relaxed).newValue
            vmmLog("guest rebooted; boot \(count) starts (reset took \((VMMClock.now() - started) / 1000) us)")
        }
    }

    private func runVCPU(_ index: Int) {
        acceptKicks()
        if let priority = realTimePriority {
            var parameters = sched_param(sched_priority: priority)
            let result = pthread_setschedparam(pthread_self(), SCHED_FIFO, &parameters)
            guard result == 0 else {
                // Never run a real-time VM at normal priority behind the user's back.
                stop.request(.vmmFault("--rt-priority: vcpu\(index) cannot run SCHED_FIFO at \(priority): \(String(cString: strerror(result))) (the real-time rlimit or the cgroup's real-time budget forbids it)"))
                pauseGate.vcpuExited()
                return
            }
        }
        let vcpu = vcpus[index]
        let counter = exitCounts[index]
        // The buses once, not through the build's value at every exit.
        let ports = portBus
        let mmio = mmioBus
        defer {
            pauseGate.vcpuExited()
            if getenv("VIREO_DUMP_REGISTERS") != nil, let regs = try? vcpu.registers() {
                vmmLog("vCPU \(index): rip=0x\(String(regs.rip, radix: 16)) rsp=0x\(String(regs.rsp, radix: 16)) exits=\(counter.value.load(ordering: .relaxed))")
            }
        }
        while !stop.isStopping {
            // The pause request set immediate_exit to get here; clear it only after parking, so a
            // pause that lands between this check and KVM_RUN still takes effect.
            if pauseGate.checkpoint() {
                vcpu.requestImmediateExit(false)
                continue
            }
            let exit: VCPUExit
            do {
                exit = try vcpu.runOnce()
            } catch {
                stop.request(.vmmFault(error.description))
                return
            }
            counter.value.add(1, ordering: .relaxed)
            // Auto-converge (docs/migration.md): this vCPU sleeps its share of each 10 ms.
            // A plain load first: the exchange (a locked write) only while a migration throttles.
            if throttleTicks[index].value.load(ordering: .relaxed) != 0, throttleTicks[index].value.exchange(0, ordering: .acquiring) != 0 {
                throttleSleep(nanoseconds: UInt64(throttlePercent.load(ordering: .relaxed)) * 10_000_000 / UInt64(max(1, 100 - throttlePercent.load(ordering: .relaxed))))
            }
            switch exit {
            case let .portIO(port, isWrite, size, count, data):
                for item in 0..<count {
                    ports.access(port: port, isWrite: isWrite,
                                   data: UnsafeMutableRawBufferPointer(start: data + item * size, count: size))
                }
            case let .mmio(address, isWrite, length, data):
                mmio.access(address: address, isWrite: isWrite,
                               data: UnsafeMutableRawBufferPointer(start: data, count: min(length, 8)))
            case .halt, .interrupted:
                continue
            case .shutdown:
                stop.request(.tripleFault(vcpu: index))
            case let .systemEvent(type):
                if type == UInt32(KVM_SYSTEM_EVENT_RESET) { stop.requestReset("guest reset the machine through a KVM reset event") } else { stop.request(.guestPowerOff) }
            case let .internalError(suberror, data):
                stop.request(.internalError(vcpu: index, suberror: suberror, data: data))
            case let .failEntry(reason):
                stop.request(.failedEntry(vcpu: index, hardwareReason: reason))
            case let .unhandled(reason):
                stop.request(.vmmFault("vCPU \(index): unhandled KVM exit reason \(reason)"))
            }
        }
    }
}
