import MachineSpec
import Synchronization

/// The registers of Vireo's hardware-reduced ACPI platform (docs/acpi.md), four I/O ports the
/// FADT and DSDT point at: sleep control, sleep status, reset, and the Generic Event Device's
/// event register. The guest powers off by writing SLP_TYP=5 with SLP_EN, reboots by writing the
/// reset value, and learns of a power-button press from the event register after the GED's
/// interrupt.
public final class ACPIRegisters: PortIODevice, Snapshottable {
    public enum Offset {
        public static let sleepControl: UInt16 = 0
        public static let sleepStatus: UInt16 = 1
        public static let reset: UInt16 = 2
        public static let events: UInt16 = 3
    }
    static let sleepEnable: UInt8 = 1 << 5
    public static let wakeStatus: UInt8 = 1 << 7

    public struct State: Sendable, Equatable, Codable {
        /// Events raised and not yet read by the guest.
        public var pendingEvents: UInt8 = 0
        public var sleepStatus: UInt8 = 0
        public init() {}
    }

    private let state = Mutex(State())
    private let eventInterrupt: any InterruptLine
    private let softOffSleepType: UInt8
    private let resetValue: UInt8
    private let powerOff: @Sendable () -> Void
    private let reset: @Sendable () -> Void
    private let unsupportedSleep: @Sendable (UInt8) -> Void

    public init(eventInterrupt: any InterruptLine, softOffSleepType: UInt8, resetValue: UInt8,
                powerOff: @escaping @Sendable () -> Void, reset: @escaping @Sendable () -> Void,
                unsupportedSleep: @escaping @Sendable (UInt8) -> Void = { _ in }) {
        self.eventInterrupt = eventInterrupt
        self.softOffSleepType = softOffSleepType
        self.resetValue = resetValue
        self.powerOff = powerOff
        self.reset = reset
        self.unsupportedSleep = unsupportedSleep
    }

    public var snapshot: State { state.withLock { $0 } }

    public func captureState() -> State { snapshot }

    public func applyState(_ saved: State) throws(StateError) {
        state.withLock { $0 = saved }
    }

    /// Back to power-on state, for a reboot in place.
    public func resetState() { state.withLock { $0 = State() } }

    /// Raises GED events (the power button, a new VM generation): they are latched until the
    /// guest reads them, and the GED's edge-triggered interrupt fires. A guest that never looks
    /// simply never acts on them.
    public func raiseEvents(_ events: UInt8) {
        state.withLock { $0.pendingEvents |= events }
        eventInterrupt.setLevel(true)
        eventInterrupt.setLevel(false)
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        let value: UInt8 = state.withLock { state in
            switch offset {
            case Offset.events:
                defer { state.pendingEvents = 0 }
                return state.pendingEvents
            case Offset.sleepStatus:
                return state.sleepStatus
            default:
                return 0
            }
        }
        for index in data.indices { data[index] = index == 0 ? value : 0 }
    }

    public func write(offset: UInt16, data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        switch offset {
        case Offset.sleepControl:
            guard value & Self.sleepEnable != 0 else { return }
            let type = (value >> 2) & 0x7
            if type == softOffSleepType { powerOff() } else { unsupportedSleep(type) }
        case Offset.sleepStatus:
            // Write one to clear, as WAK_STS is defined.
            state.withLock { $0.sleepStatus &= ~value }
        case Offset.reset:
            if value == resetValue { reset() }
        default:
            break
        }
    }
}
