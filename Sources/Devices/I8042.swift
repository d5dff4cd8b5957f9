import Synchronization

/// Enough of the PC keyboard controller for guests to reset the machine (command 0xFE, which is
/// what Linux's `reboot=k` uses) and for probes of the controller to get sane answers.
public final class I8042: PortIODevice {
    public static let dataPort: UInt16 = 0x60
    public static let commandPort: UInt16 = 0x64

    struct State {
        var output: [UInt8] = []
        var commandByte: UInt8 = 0x61
        var pendingWrite: UInt8?
    }
    private let state = Mutex(State())
    private let resetRequested: @Sendable () -> Void

    /// Registered at 0x60 with length 5, so offsets are 0 (data) and 4 (command/status).
    public init(resetRequested: @escaping @Sendable () -> Void) {
        self.resetRequested = resetRequested
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        let value: UInt8 = state.withLock { state in
            switch offset {
            case 0:
                return state.output.isEmpty ? 0 : state.output.removeFirst()
            case 4:
                // Status: output buffer full when a reply waits; input buffer always empty.
                return state.output.isEmpty ? 0x00 : 0x01
            default:
                return 0xff
            }
        }
        for index in data.indices { data[index] = index == 0 ? value : 0 }
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
