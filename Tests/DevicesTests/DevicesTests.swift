import Synchronization
import Testing
@testable import Devices

final class RecordingOutput: SerialOutput, Sendable {
    let bytes = Mutex<[UInt8]>([])
    func write(_ data: UnsafeRawBufferPointer) { bytes.withLock { $0 += Array(data) } }
}

final class RecordingLine: InterruptLine, Sendable {
    let levels = Mutex<[Bool]>([])
    func setLevel(_ high: Bool) { levels.withLock { $0.append(high) } }
    var current: Bool { levels.withLock { $0.last ?? false } }
}

extension PortIODevice {
    func readByte(_ offset: UInt16) -> UInt8 {
        var value: UInt8 = 0
        withUnsafeMutableBytes(of: &value) { read(offset: offset, into: $0) }
        return value
    }
    func writeByte(_ offset: UInt16, _ value: UInt8) {
        withUnsafeBytes(of: value) { write(offset: offset, data: $0) }
    }
}

@Suite struct SerialTests {
    @Test func transmitsWhatTheGuestWrites() {
        let output = RecordingOutput()
        let serial = Serial8250(output: output, interrupt: RecordingLine())
        for byte in Array("ok\n".utf8) { serial.writeByte(0, byte) }
        #expect(output.bytes.withLock { $0 } == Array("ok\n".utf8))
        #expect(serial.readByte(5) & 0x60 == 0x60)
    }

    @Test func receivedBytesRaiseAndClearTheInterrupt() {
        let line = RecordingLine()
        let serial = Serial8250(output: RecordingOutput(), interrupt: line)
        serial.writeByte(1, 0x01)                     // IER: received data
        serial.receive(Array("ab".utf8))
        #expect(line.current)
        #expect(serial.readByte(5) & 0x01 == 0x01)
        #expect(serial.readByte(2) & 0x0f == 0x04)
        #expect(serial.readByte(0) == UInt8(ascii: "a"))
        #expect(line.current)
        #expect(serial.readByte(0) == UInt8(ascii: "b"))
        #expect(!line.current)
        #expect(serial.readByte(5) & 0x01 == 0)
        #expect(serial.readByte(2) & 0x01 == 0x01)
    }

    @Test func transmitterEmptyInterruptIsRaisedOnEnableAndClearedByIIR() {
        let line = RecordingLine()
        let serial = Serial8250(output: RecordingOutput(), interrupt: line)
        serial.writeByte(1, 0x02)
        #expect(line.current)
        #expect(serial.readByte(2) & 0x0f == 0x02)
        #expect(!line.current)
        serial.writeByte(0, 0x41)
        #expect(line.current)
    }

    @Test func loopbackLooksLikeA16550ToLinuxsProbe() {
        let output = RecordingOutput()
        let serial = Serial8250(output: output, interrupt: RecordingLine())
        serial.writeByte(4, 0x1a)                     // loopback, RTS, OUT2
        #expect(serial.readByte(6) & 0xf0 == 0x90)    // CTS and DCD, as autoconfig expects
        serial.writeByte(0, 0x55)
        #expect(serial.readByte(0) == 0x55)
        #expect(output.bytes.withLock { $0.isEmpty })
    }

    @Test func divisorLatchAndScratch() {
        let serial = Serial8250(output: RecordingOutput(), interrupt: RecordingLine())
        serial.writeByte(3, 0x80)
        serial.writeByte(0, 0x01)
        serial.writeByte(1, 0x00)
        #expect(serial.readByte(0) == 0x01)
        serial.writeByte(3, 0x03)
        serial.writeByte(7, 0xa5)
        #expect(serial.readByte(7) == 0xa5)
    }

    @Test func receiveBufferIsBounded() {
        let serial = Serial8250(output: RecordingOutput(), interrupt: RecordingLine())
        serial.receive([UInt8](repeating: 1, count: Serial8250.receiveCapacity + 100))
        var count = 0
        while serial.readByte(5) & 0x01 != 0 { _ = serial.readByte(0); count += 1 }
        #expect(count == Serial8250.receiveCapacity)
    }
}

@Suite struct PlatformDeviceTests {
    @Test func i8042ResetCommandRequestsReset() {
        let resets = Mutex(0)
        let controller = I8042 { resets.withLock { $0 += 1 } }
        controller.writeByte(4, 0x20)
        #expect(controller.readByte(4) & 0x01 == 0x01)
        #expect(controller.readByte(0) == 0x61)
        #expect(resets.withLock { $0 } == 0)
        controller.writeByte(4, 0xfe)
        #expect(resets.withLock { $0 } == 1)
    }

    @Test func rtcReportsTimeInBCD() {
        let rtc = RTC(now: { 1_700_000_000 })          // 2023-11-14 22:13:20 UTC
        let expected: [(UInt8, UInt8)] = [(0x00, 0x20), (0x02, 0x13), (0x04, 0x22), (0x07, 0x14), (0x08, 0x11), (0x09, 0x23), (0x32, 0x20)]
        for (register, value) in expected {
            rtc.writeByte(0, register | 0x80)          // NMI-mask bit must not change the index
            #expect(rtc.readByte(1) == value, "register \(register)")
        }
    }

    @Test func busRefusesOverlapsAndFloatsUnclaimedPorts() throws {
        var bus = PortIOBus()
        try bus.register(RTC(), name: "rtc", base: 0x70, length: 2)
        #expect(throws: BusError.self) { try bus.register(RTC(), name: "other", base: 0x71, length: 2) }
        var value: UInt16 = 0
        withUnsafeMutableBytes(of: &value) { bus.access(port: 0x2f8, isWrite: false, data: $0) }
        #expect(value == 0xffff)
        #expect(bus.lookup(0x71, size: 2) == nil)     // straddles the end of the device
    }

    @Test func bootMarkerFiresOnlyOnTheMagic() {
        let marks = Mutex(0)
        let marker = BootMarker { marks.withLock { $0 += 1 } }
        withUnsafeBytes(of: UInt8(1)) { marker.write(offset: 0, data: $0) }
        withUnsafeBytes(of: BootMarker.magic) { marker.write(offset: 4, data: $0) }
        withUnsafeBytes(of: BootMarker.magic) { marker.write(offset: 0, data: $0) }
        #expect(marks.withLock { $0 } == 1)
    }
}
