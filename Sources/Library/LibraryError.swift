import DiskImage
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// Everything the VM library refuses or fails at, keeping the cause: which VM, which field,
/// which path and errno. Refusals say what state the VM is in and what to do instead.
public enum LibraryError: Error, CustomStringConvertible, Sendable {
    case invalidName(String, reason: String)
    /// `field` is the setting's JSON key (`memory_bytes`, `io_limits`), what definitions and the
    /// REST API call it; the CLI shows its own flag for it (CLI/FieldFlags.swift). A field that is
    /// no setting (`FILE`, `disk 0`) is named as the person would see it.
    case invalidValue(field: String, reason: String)
    case notFound(name: String, root: String)
    case alreadyExists(name: String)
    /// `action` cannot happen while VM `name` is `state`; `hint` says what to do instead.
    case wrongState(name: String, state: String, action: String, hint: String)
    /// Another vireo command holds the VM.
    case busy(name: String)
    case io(operation: String, path: String, errno: Int32)
    case corrupt(path: String, reason: String)
    case disk(DiskImageError)
    /// The VM process failed to start or to answer.
    case engine(name: String, reason: String, exitStatus: Int32)
    case control(name: String, code: String, message: String)
    /// The VM's engine cannot do `action` at all (not in this state: for any VM it runs).
    case unsupported(name: String, engine: String, action: String, hint: String)
    /// The host side of a network could not be made or changed (a bridge, dnsmasq, nftables,
    /// passt); `exitStatus` 2 when the user can fix it (a missing tool, a bridge that is not there).
    case network(name: String, reason: String, exitStatus: Int32)
    /// A live migration failed; unless `outcomeUnknown`, the VM runs on where it was.
    case migration(name: String, reason: String, outcomeUnknown: Bool)

    public var description: String {
        switch self {
        case let .invalidName(name, reason): return "invalid VM name '\(name)': \(reason)"
        case let .invalidValue(field, reason): return "\(field): \(reason)"
        case let .notFound(name, root): return "no VM named '\(name)' in \(root) (see `vireo list`)"
        case let .alreadyExists(name): return "a VM named '\(name)' already exists; choose another name or delete it first"
        case let .wrongState(name, state, action, hint): return "cannot \(action) VM '\(name)': it is \(state); \(hint)"
        case let .busy(name): return "VM '\(name)' is being changed by another vireo command; try again"
        case let .io(operation, path, code): return "\(operation) \(path): \(String(cString: strerror(code))) (errno \(code))"
        case let .corrupt(path, reason): return "\(path): \(reason)"
        case let .disk(error): return error.description
        case let .engine(name, reason, _): return "VM '\(name)': \(reason)"
        case let .control(name, _, message): return "VM '\(name)': \(message)"
        case let .unsupported(name, engine, action, hint): return "cannot \(action) VM '\(name)': the \(engine) engine cannot do that; \(hint)"
        case let .network(name, reason, _): return "network '\(name)': \(reason)"
        case let .migration(name, reason, _): return "migrating VM '\(name)': \(reason)"
        }
    }

    /// 2 for input the user can fix (names, values, states), 1 for host failures.
    public var exitStatus: Int32 {
        switch self {
        case .invalidName, .invalidValue, .notFound, .alreadyExists, .wrongState, .busy, .control, .unsupported: return 2
        case let .engine(_, _, status), let .network(_, _, status): return status == 2 ? 2 : 1
        case let .disk(error):
            switch error {
            case .invalidArgument, .alreadyExists, .inUse, .unsupported, .invalidImage: return 2
            default: return 1
            }
        case .io, .corrupt, .migration: return 1
        }
    }
}

extension LibraryError {
    /// A machine rule's refusal, named by the setting's JSON key (the CLI shows its flag).
    public init(_ error: MachineSpecError) {
        self = .invalidValue(field: error.field?.key ?? error.argument ?? "", reason: error.reason)
    }
}
