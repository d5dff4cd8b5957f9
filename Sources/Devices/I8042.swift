import MachineSpec
import Synchronization

/// Enough of the PC keyboard controller for guests to reset the machine (command 0xFE, which is
/// what Linux's `reboot=k` uses), for probes of the controller to get sane answers, and for the
/// host to press Ctrl-Alt-Del, the graceful-shutdown request Firecracker also sends this way.
public final class I8042: PortIODevice, Snapshottable {
    public static let dataPort: UInt16 = 0x60
    public static let commandPort: UInt16 = 0x64

    struct State {
        var output: [UInt8] = []
        var commandByte: UInt8 = 0x61
        var pendingWrite: UInt8?
    }
    private let state = Mutex(State())
    private let resetRequested: @Sendable () -> Void
    private let interrupt: (any InterruptLine)?
    public static let defaultInterrupt: UInt32 = 1

    /// Registered at 0x60 with length 5, so offsets are 0 (data) and 4 (command/status).
    public init(interrupt: (any InterruptLine)? = nil, resetRequested: @escaping @Sendable () -> Void) {
        self.interrupt = interrupt
        self.resetRequested = resetRequested
    }

    /// Power-on state, for a reboot in place.
    public func resetState() { state.withLock { $0 = State() } }

    /// At most this many bytes wait for the guest in a saved state (Ctrl-Alt-Del is 11).
    static let outputLimit = 64

    /// The bytes waiting for the guest, the command byte, and a command awaiting its data byte.
    public struct Saved: Codable, Sendable, Equatable {
        public var output: [UInt8]
        public var commandByte: UInt8
        public var pendingWrite: UInt8?
    }

    public func captureState() -> Saved {
        state.withLock { Saved(output: Array($0.output.prefix(Self.outputLimit)), commandByte: $0.commandByte, pendingWrite: $0.pendingWrite) }
    }

    public func applyState(_ saved: Saved) throws(StateError) {
        guard saved.output.count <= Self.outputLimit else {
            throw .invalid(field: "output", reason: "\(saved.output.count) bytes, more than the \(Self.outputLimit) a saved controller holds")
        }
        if let pending = saved.pendingWrite, pending != 0x60 {
            throw .invalid(field: "pendingWrite", reason: "0x\(String(pending, radix: 16)) is not a command this controller takes (0x60)")
        }
        var restored = State()
        restored.output = saved.output
        restored.commandByte = saved.commandByte
        restored.pendingWrite = saved.pendingWrite
        state.withLock { $0 = restored }
    }

    /// Queues the scan codes of Ctrl and Alt and Delete pressed and released, in the code set
    /// the guest reads: set 1 when the controller translates (command byte bit 6, the PC default
    /// and Linux's), set 2 otherwise.
    public func pressCtrlAltDel() {
        let raise = state.withLock { state -> Bool in
            let translated = state.commandByte & 0x40 != 0
            state.output += translated
                ? [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
                : [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
            return state.commandByte & 0x01 != 0
        }
        if raise { pulseInterrupt() }
    }

    /// IRQ 1 is edge-triggered: one pulse per byte waiting, the way Linux's handler reads one
    /// byte per interrupt.
    private func pulseInterrupt() {
        interrupt?.setLevel(true)
        interrupt?.setLevel(false)
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        var more = false
        let value: UInt8 = state.withLock { state in
            switch offset {
            case 0:
                let byte = state.output.isEmpty ? 0 : state.output.removeFirst()
                more = !state.output.isEmpty && state.commandByte & 0x01 != 0
                return byte
            case 4:
                // Status: output buffer full when a reply waits; input buffer always empty; the
                // keyboard not inhibited (bit 4 set: Linux warns "Keylock active" otherwise).
                return (state.output.isEmpty ? 0x00 : 0x01) | 0x10
            default:
                return 0xff
            }
        }
        for index in data.indices { data[index] = index == 0 ? value : 0 }
        if more { pulseInterrupt() }
    }

    public func write(offset: UInt16, data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        var reset = false
        state.withLock { state in
            switch offset {
            case 4:
                switch value {
                case 0x20: state.output = [state.commandByte]          // read command byte
                case 0x60: state.pendingWrite = 0x60                   // write command byte next
                case 0xaa: state.output = [0x55]                       // controller self-test passed
                case 0xab: state.output = [0x00]                       // interface test passed
                case 0xfe: reset = true                                // pulse the CPU reset line
                default: break
                }
            case 0:
                if state.pendingWrite == 0x60 { state.commandByte = value }
                state.pendingWrite = nil
            default:
                break
            }
        }
        if reset { resetRequested() }
    }
}
