import CKVM
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Why a VM stopped running.
public enum MachineExit: Equatable, Sendable {
    /// The guest reset the machine (the ACPI reset register, i8042 0xFE, a KVM reset event) and
    /// the reboot policy is `exit`.
    case guestReset
    /// The guest asked to power off.
    case guestPowerOff
    /// The user typed the console escape (Ctrl-A x).
    case consoleQuit
    /// A power-off request arrived on the control socket.
    case powerOffRequested
    /// The VMM received SIGINT, SIGTERM or SIGHUP.
    case signal(Int32)
    /// A vCPU shut down: a triple fault, or guest state KVM could not continue from.
    case tripleFault(vcpu: Int)
    case internalError(vcpu: Int, suberror: UInt32, data: [UInt64])
    case failedEntry(vcpu: Int, hardwareReason: UInt64)
    /// Something in the VMM itself failed while the guest ran.
    case vmmFault(String)
    /// The VM's state was saved to `path` (`vireo save`); starting it again resumes from there.
    case saved(path: String)
    /// The VM moved to another VMM (`vireo migrate`), which confirmed it runs there.
    case migrated(destination: String)

    /// 0 for stops the guest or the user asked for; 128+N for a signal; 1 for every failure.
    public var exitCode: Int32 {
        switch self {
        case .guestReset, .guestPowerOff, .consoleQuit, .powerOffRequested, .saved, .migrated: return 0
        case let .signal(number): return 128 + number
        case .tripleFault, .internalError, .failedEntry, .vmmFault: return 1
        }
    }

    public var summary: String {
        switch self {
        case .guestReset: return "guest requested a reset; the VM has stopped"
        case .guestPowerOff: return "guest powered off"
        case .consoleQuit: return "console quit (Ctrl-A x); the VM has been powered off"
        case .powerOffRequested: return "powered off on request (control socket)"
        case let .signal(number): return "stopped by signal \(number) (\(String(cString: strsignal(number))))"
        case let .tripleFault(vcpu): return "vCPU \(vcpu) shut down (triple fault, KVM_EXIT_SHUTDOWN)"
        case let .internalError(vcpu, suberror, data):
            let names: [UInt32: String] = [1: "emulation failure", 2: "simultaneous exceptions", 3: "delivery event failed",
                                           4: "unexpected exit reason during event delivery"]
            let words = data.map { "0x" + String($0, radix: 16) }.joined(separator: " ")
            return "KVM internal error on vCPU \(vcpu): suberror \(suberror) (\(names[suberror] ?? "unknown")), data [\(words)]"
        case let .failedEntry(vcpu, reason):
            return "KVM could not enter vCPU \(vcpu): hardware entry failure reason 0x\(String(reason, radix: 16))"
        case let .vmmFault(message): return "VMM fault: \(message)"
        case let .saved(path): return "state saved to \(path); the VM has stopped"
        case let .migrated(destination): return "migrated to \(destination); the VM runs there now"
        }
    }
}

/// What the thread that owns the machine is woken for.
enum MachineEvent: Equatable {
    case stop(MachineExit)
    /// The guest reset the machine and the policy is to boot it again in this process.
    case reboot
}

/// Collects the first reason to stop and wakes the thread waiting for it. Later reasons are
/// dropped: the first is the cause, the rest are consequences of stopping. A guest's reset either
/// stops the run or asks that thread for a reboot in place, as the reboot policy says.
final class StopController: Sendable {
    private let reason = Mutex<MachineExit?>(nil)
    private let stopping = Atomic<Bool>(false)
    private let rebootPending = Atomic<Bool>(false)
    private let eventFD: Int32
    let rebootPolicy: MachineSpec.RebootPolicy

    init(rebootPolicy: MachineSpec.RebootPolicy) throws(VMMError) {
        let fd = vireo_eventfd_cloexec(0)
        guard fd >= 0 else { throw .host(operation: "eventfd", errno: errno) }
        eventFD = fd
        self.rebootPolicy = rebootPolicy
    }

    /// The machine was reset (`event` says how, for the log); from a vCPU, a device or the control
    /// socket, never blocking.
    func requestReset(_ event: String) {
        vmmLog(event)
        guard rebootPolicy == .restart else { request(.guestReset); return }
        guard !rebootPending.exchange(true, ordering: .acquiringAndReleasing) else { return }
        var one: UInt64 = 1
        _ = write(eventFD, &one, 8)
    }

    deinit { close(eventFD) }

    var isStopping: Bool { stopping.load(ordering: .acquiring) }

    func request(_ exit: MachineExit) {
        let first = reason.withLock { current -> Bool in
            guard current == nil else { return false }
            current = exit
            return true
        }
        guard first else { return }
        stopping.store(true, ordering: .releasing)
        var one: UInt64 = 1
        _ = write(eventFD, &one, 8)
    }

    /// Blocks until there is a stop or a reboot to act on; a stop wins over a pending reboot.
    func wait() -> MachineEvent {
        while true {
            var value: UInt64 = 0
            while read(eventFD, &value, 8) < 0 && errno == EINTR {}
            if let exit = reason.withLock({ $0 }) { return .stop(exit) }
            if rebootPending.exchange(false, ordering: .acquiringAndReleasing) { return .reboot }
        }
    }
}
