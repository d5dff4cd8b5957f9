import MigrationWire
import VMM
#if canImport(Glibc)
import Glibc
#endif

// One VM per process, with nothing loaded that the VM does not need: no Foundation, and the
// Swift runtime linked statically (see Package.swift). Exit statuses match `vireo run`.
VMMClock.markStart()
HostProcessID.record()
// Its sockets, logs and saved states are its owner's alone.
umask(0o077)

/// Where `vireo start` waits to learn whether the VM came up.
nonisolated(unsafe) var readyDescriptor: Int32 = -1

func tellStarter(_ text: String) {
    guard readyDescriptor >= 0 else { return }
    var bytes = Array((text + "\n").utf8)
    _ = bytes.withUnsafeMutableBytes { write(readyDescriptor, $0.baseAddress, $0.count) }
    close(readyDescriptor)
    readyDescriptor = -1
}

/// The stream a migrating VM arrives on: a failure is told to the source, which then runs on.
nonisolated(unsafe) var incomingDescriptor: Int32 = -1

func report(_ error: VMMError) -> Never {
    vmmLog("error: \(error)")
    if incomingDescriptor >= 0 {
        try? MigrationChannel(fd: incomingDescriptor).send(.failed, text: "\(error)")
        shutdown(incomingDescriptor, Int32(SHUT_WR))
    }
    let status: Int32
    switch error {
    case .invalidConfiguration, .boot, .savedState, .migration, .migrationOutcomeUnknown: status = 2
    case .kvm, .memory, .bus, .host: status = 1
    }
    tellStarter("error \(status) \(error)")
    exit(status)
}

do throws(VMMError) {
    switch try VMMArguments.parse(Array(CommandLine.arguments.dropFirst())) {
    case .help:
        print(VMMArguments.usage)
    case let .run(spec, options):
        if let ready = options.readyDescriptor {
            readyDescriptor = ready
            _ = fcntl(ready, F_SETFD, FD_CLOEXEC)
        }
        if let lock = options.lockDescriptor {
            // Normally already held: the starter locked it and handed it over. Taking it again on
            // the same open file is a no-op; failing means someone else runs this VM.
            _ = fcntl(lock, F_SETFD, FD_CLOEXEC)
            guard flock(lock, LOCK_EX | LOCK_NB) == 0 else {
                throw VMMError.invalidConfiguration(field: "--lock-fd", reason: "the VM's lock is held by another process; is it already running?")
            }
        }
        var incoming: MigrationChannel?
        if let fd = options.incomingDescriptor {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            incomingDescriptor = fd
            incoming = MigrationChannel(fd: fd)
        }
        // Everything of the host the VM needs is opened here; nothing a guest, the VM's own
        // (jailed) process or a peer wrote is read before the jail closes (finishAssembly).
        let machine: Machine
        if options.restore, let stateFile = options.stateFile {
            machine = try Machine.restore(spec, stateFile: stateFile, snapshotDirectory: options.snapshotDirectory)
        } else if incoming != nil {
            machine = try Machine.receive(spec, disks: options.incomingDisks, stateFile: options.stateFile, snapshotDirectory: options.snapshotDirectory)
        } else {
            machine = try Machine.boot(spec, stateFile: options.stateFile, snapshotDirectory: options.snapshotDirectory)
        }
        if let path = options.controlPath { try machine.listenForControl(path: path, identity: options.identity) }
        if spec.realTimePriority != nil, mlockall(MCL_CURRENT | MCL_FUTURE) != 0 {
            // A real-time vCPU that page-faults is no longer real-time.
            throw VMMError.host(operation: "--rt-priority: lock the VMM's memory (mlockall; RLIMIT_MEMLOCK too small?)", errno: errno)
        }
        var report = ConfinementReport()
        if options.jail != nil || options.seccomp != .off {
            report = try Machine.confine(jail: options.jail, seccomp: options.seccomp, landlock: options.landlock,
                                         realTimePriority: spec.realTimePriority,
                                         spec: spec, controlPath: options.controlPath,
                                         stateFile: options.stateFile, snapshotDirectory: options.snapshotDirectory)
            vmmLog("isolation: " + report.summary)
        }
        try machine.finishAssembly(incoming: incoming)
        // From here the machine owns the stream (it closes it once the source knows it runs).
        incomingDescriptor = -1
        tellStarter("ready \(HostProcessID.value) \(report.summary)")
        let outcome = try machine.run()
        vmmLog(outcome.summary)
        // The last line of every run, so `vireo info` and tests can tell a clean stop from a crash.
        vmmLog("exit status \(outcome.exitCode)")
        exit(outcome.exitCode)
    }
} catch {
    report(error)
}
