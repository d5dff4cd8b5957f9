import MachineSpec

/// A device whose registers go into a saved state and come back from one. `saveState` is called
/// with the machine paused and its devices quiesced; `restoreState` before the guest runs.
public protocol StatefulDevice: AnyObject {
    func saveState(into writer: inout StateWriter)
    func restoreState(from reader: inout StateReader) throws(StateError)
}
