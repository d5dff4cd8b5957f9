import MachineSpec
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The MC146818 CMOS real-time clock at ports 0x70/0x71, reporting the host's UTC time in BCD so the
/// guest's wall clock starts right. Alarms and periodic interrupts are not modelled.
public final class RTC: PortIODevice, Snapshottable {
    public static let basePort: UInt16 = 0x70
    private let index = Mutex<UInt8>(0)
    private let now: @Sendable () -> time_t

    public init(now: @escaping @Sendable () -> time_t = { time(nil) }) {
        self.now = now
    }

    static func bcd(_ value: Int32) -> UInt8 { UInt8(((value / 10) << 4) | (value % 10)) }

    public func register(_ number: UInt8) -> UInt8 {
        var seconds = now()
        var broken = tm()
        gmtime_r(&seconds, &broken)
        switch number {
        case 0x00: return Self.bcd(broken.tm_sec)
        case 0x02: return Self.bcd(broken.tm_min)
        case 0x04: return Self.bcd(broken.tm_hour)
        case 0x06: return Self.bcd(broken.tm_wday + 1)
        case 0x07: return Self.bcd(broken.tm_mday)
        case 0x08: return Self.bcd(broken.tm_mon + 1)
        case 0x09: return Self.bcd(broken.tm_year % 100)
        case 0x32: return Self.bcd((broken.tm_year + 1900) / 100)
        case 0x0a: return 0x26        // divider on, 1024 Hz rate; update never in progress
        case 0x0b: return 0x02        // 24-hour mode, BCD
        case 0x0d: return 0x80        // valid RAM and time
        default: return 0
        }
    }

    /// Only the selected register: the time itself is the host's, read afresh after a restore.
    public struct Saved: Codable, Sendable, Equatable {
        public var index: UInt8
    }

    public func captureState() -> Saved { Saved(index: index.withLock { $0 }) }

    public func applyState(_ saved: Saved) throws(StateError) {
        guard saved.index < 0x80 else { throw .invalid(field: "index", reason: "\(saved.index) is above 127") }
        index.withLock { $0 = saved.index }
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        let value = offset == 1 ? register(index.withLock { $0 }) : 0xff
        for position in data.indices { data[position] = position == 0 ? value : 0 }
    }

    public func write(offset: UInt16, data: UnsafeRawBufferPointer) {
        guard offset == 0, let value = data.first else { return }
        index.withLock { $0 = value & 0x7f }   // bit 7 is the NMI mask, not part of the index
    }
}
