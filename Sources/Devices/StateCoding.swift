import MachineSpec

/// A component that takes part in save, live snapshot and migration through a value (Firecracker's
/// per-device `*State`, Cloud Hypervisor's `Snapshottable`). `captureState` runs with the machine
/// paused and the component quiesced; `applyState` before the guest runs, and refuses a value this
/// component cannot take (naming the field), since a saved state is hostile input. `Saved` is
/// Codable, so its binary form (BinaryRecord) is written from its declaration: no component keeps
/// an encoder and a decoder in step by hand.
public protocol Snapshottable: AnyObject {
    associatedtype Saved: Codable
    func captureState() -> Saved
    func applyState(_ saved: Saved) throws(StateError)
    /// The component's state as the saved state and the migration stream carry it; by default
    /// `captureState()`'s record (a virtio transport adds its device's).
    func savedRecord() throws(StateError) -> [UInt8]
}

extension Snapshottable {
    public func savedRecord() throws(StateError) -> [UInt8] { try BinaryRecord.encode(captureState()) }

    /// Puts back a record `savedRecord` wrote: decoded whole (nothing may follow), then applied.
    public func restore(record: [UInt8]) throws(StateError) {
        try applyState(try BinaryRecord.decode(Saved.self, from: record))
    }
}

/// A component with work of its own (queues served on device threads, timers) that save, live
/// snapshot and migration stop before they capture state (Cloud Hypervisor's `Pausable`).
/// `quiesce()` returns once none of that work runs and none starts; `resumeWork()` lets it go on,
/// catching up with whatever arrived meanwhile. The vCPUs are parked by the machine's PauseGate.
public protocol Pausable: AnyObject {
    func quiesce()
    func resumeWork()
}
