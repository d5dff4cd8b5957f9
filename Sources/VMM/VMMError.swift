import KVM
import GuestMemory
import MachineSpec
import X86Boot
import Devices

/// Everything that can stop a VM from being built or run, keeping the underlying cause.
public enum VMMError: Error, CustomStringConvertible, Sendable {
    /// A user-supplied value was refused; `field` is the flag it came from.
    case invalidConfiguration(field: String, reason: String)
    case kvm(KVMError)
    case boot(BootError)
    case memory(GuestMemoryError)
    case bus(BusError)
    case host(operation: String, errno: Int32)
    /// A saved state that cannot be restored: damaged, of another machine, or for another host.
    case savedState(path: String, reason: String)
    /// A live migration that could not go on; `reason` says what happened to the VM.
    case migration(String)
    /// Everything was sent and the destination's answer was lost: the VM may run there, so it
    /// stays paused here.
    case migrationOutcomeUnknown(String)

    public var description: String {
        switch self {
        case let .invalidConfiguration(field, reason): return "\(field): \(reason)"
        case let .kvm(error): return error.description
        case let .boot(error): return error.description
        case let .memory(error): return error.description
        case let .bus(error): return error.description
        case let .host(operation, code): return KVMError(operation: operation, errno: code).description
        case let .savedState(path, reason): return "saved state \(path): \(reason)"
        case let .migration(reason): return "migration: \(reason)"
        case let .migrationOutcomeUnknown(reason): return "migration: \(reason)"
        }
    }
}

extension VMMError {
    /// A machine rule's refusal, named by the flag `vireo-vmm` and `vireo run` take.
    public init(_ error: MachineSpecError) {
        self = .invalidConfiguration(field: error.runFlag, reason: error.reason)
    }
}

extension Size {
    /// `Size.parse`, with the refusal naming `field`.
    public static func parse(_ text: String, field: String) throws(VMMError) -> UInt64 {
        do { return try parse(text) } catch { throw .invalidConfiguration(field: field, reason: error.description) }
    }
}
