import MachineSpec
import Synchronization

/// Where a serial port's transmitted bytes go.
public protocol SerialOutput: Sendable {
    func write(_ bytes: UnsafeRawBufferPointer)
}

/// A 16550A-compatible UART (the "8250" Linux's console driver binds to at 0x3f8/IRQ 4).
/// Transmission completes at once; received bytes wait in a FIFO until the guest reads them.
public final class Serial8250: PortIODevice, Snapshottable {
    public static let defaultBase: UInt16 = 0x3f8
    public static let defaultInterrupt: UInt32 = 4
    public static let receiveCapacity = 4096

    struct Registers {
        var interruptEnable: UInt8 = 0
        var lineControl: UInt8 = 0x03
        var modemControl: UInt8 = 0x08
        var scratch: UInt8 = 0
        var divisorLow: UInt8 = 0x0c   // 9600 baud
        var divisorHigh: UInt8 = 0
        var fifoControl: UInt8 = 0
        var transmitInterruptPending = false
        var receive: [UInt8] = []
        var receiveHead = 0
        var lineLevel = false

        var dataReady: Bool { receiveHead < receive.count }
        var divisorLatch: Bool { lineControl & 0x80 != 0 }
        var loopback: Bool { modemControl & 0x10 != 0 }

        /// Highest-priority pending interrupt, as IIR encodes it (bit 0 set = none).
        var interruptIdentification: UInt8 {
            if interruptEnable & 0x01 != 0 && dataReady { return 0x04 }
            if interruptEnable & 0x02 != 0 && transmitInterruptPending { return 0x02 }
            return 0x01
        }

        mutating func popReceived() -> UInt8 {
            guard dataReady else { return 0 }
            let byte = receive[receiveHead]
            receiveHead += 1
            if receiveHead == receive.count { receive.removeAll(keepingCapacity: true); receiveHead = 0 }
            return byte
        }
    }

    private let state = Mutex(Registers())
    private let output: any SerialOutput
    private let interrupt: any InterruptLine

    public init(output: any SerialOutput, interrupt: any InterruptLine) {
        self.output = output
        self.interrupt = interrupt
    }

    /// Power-on register state, for a reboot in place; bytes the host typed but the guest has not
    /// read are dropped with the old boot, and the interrupt line goes low.
    public func resetState() {
        state.withLock { registers in
            registers = Registers()
            interrupt.setLevel(false)
        }
    }

    /// The registers and the bytes typed but not yet read; the line level follows from them.
    public struct Saved: Codable, Sendable, Equatable {
        public var interruptEnable, lineControl, modemControl, scratch, divisorLow, divisorHigh, fifoControl: UInt8
        public var transmitInterruptPending: Bool
        public var receive: [UInt8]
    }

    public func captureState() -> Saved {
        state.withLock { registers in
            Saved(interruptEnable: registers.interruptEnable, lineControl: registers.lineControl, modemControl: registers.modemControl,
                  scratch: registers.scratch, divisorLow: registers.divisorLow, divisorHigh: registers.divisorHigh,
                  fifoControl: registers.fifoControl, transmitInterruptPending: registers.transmitInterruptPending,
                  receive: Array(registers.receive[registers.receiveHead...]))
        }
    }

    public func applyState(_ saved: Saved) throws(StateError) {
        guard saved.receive.count <= Self.receiveCapacity else {
            throw .invalid(field: "receive", reason: "\(saved.receive.count) bytes, more than the \(Self.receiveCapacity) the UART holds")
        }
        var restored = Registers()
        // Bits the hardware does not have read back as zero.
        restored.interruptEnable = saved.interruptEnable & 0x0f
        restored.lineControl = saved.lineControl
        restored.modemControl = saved.modemControl & 0x1f
        restored.scratch = saved.scratch
        restored.divisorLow = saved.divisorLow
        restored.divisorHigh = saved.divisorHigh
        restored.fifoControl = saved.fifoControl
        restored.transmitInterruptPending = saved.transmitInterruptPending
        restored.receive = saved.receive
        state.withLock { registers in
            registers = restored
            updateLine(&registers)
        }
    }

    /// Bytes from the host side (a terminal, a socket). Drops what does not fit, as a real UART
    /// overruns, rather than growing without bound.
    public func receive(_ bytes: some Sequence<UInt8>) {
        state.withLock { registers in
            for byte in bytes where registers.receive.count - registers.receiveHead < Self.receiveCapacity {
                registers.receive.append(byte)
            }
            updateLine(&registers)
        }
    }

    /// Drives the interrupt line to match the registers. Called with the lock held so that two
    /// vCPUs can never apply their level changes in the opposite order to their state changes.
    private func updateLine(_ registers: inout Registers) {
        let high = registers.interruptIdentification & 0x01 == 0
        guard high != registers.lineLevel else { return }
        registers.lineLevel = high
        interrupt.setLevel(high)
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        var value: UInt8 = 0
        state.withLock { registers in
            switch offset {
            case 0:
                value = registers.divisorLatch ? registers.divisorLow : registers.popReceived()
            case 1:
                value = registers.divisorLatch ? registers.divisorHigh : registers.interruptEnable
            case 2:
                value = registers.interruptIdentification | (registers.fifoControl & 0x01 != 0 ? 0xc0 : 0)
                if value & 0x0f == 0x02 { registers.transmitInterruptPending = false }
            case 3:
                value = registers.lineControl
            case 4:
                value = registers.modemControl
            case 5:
                value = 0x60 | (registers.dataReady ? 0x01 : 0)   // THR empty, transmitter idle
            case 6:
                if registers.loopback {
                    // Loopback wires DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD: Linux probes this.
                    let control = registers.modemControl
                    value = ((control & 0x01) << 5) | ((control & 0x02) << 3) | ((control & 0x04) << 4) | ((control & 0x08) << 4)
                } else {
                    value = 0xb0                                   // DCD, DSR, CTS
                }
            case 7:
                value = registers.scratch
            default:
                value = 0xff
            }
            updateLine(&registers)
        }
        for index in data.indices { data[index] = index == 0 ? value : 0 }
    }

    public func write(offset: UInt16, data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        var transmitted: UInt8?
        state.withLock { registers in
            switch offset {
            case 0:
                if registers.divisorLatch {
                    registers.divisorLow = value
                } else if registers.loopback {
                    if registers.receive.count - registers.receiveHead < Self.receiveCapacity { registers.receive.append(value) }
                    registers.transmitInterruptPending = true
                } else {
                    transmitted = value
                    registers.transmitInterruptPending = true
                }
            case 1:
                if registers.divisorLatch {
                    registers.divisorHigh = value
                } else {
                    let enablingTransmit = registers.interruptEnable & 0x02 == 0 && value & 0x02 != 0
                    registers.interruptEnable = value & 0x0f
                    // The transmitter is always empty, so enabling its interrupt raises it at once.
                    if enablingTransmit { registers.transmitInterruptPending = true }
                }
            case 2:
                registers.fifoControl = value
                if value & 0x02 != 0 { registers.receive.removeAll(); registers.receiveHead = 0 }
            case 3:
                registers.lineControl = value
            case 4:
                registers.modemControl = value & 0x1f
            case 7:
                registers.scratch = value
            default:
                break
            }
            updateLine(&registers)
        }
        if let transmitted {
            withUnsafeBytes(of: transmitted) { output.write($0) }
        }
    }
}
