import Foundation
import GuestMemory
import MachineSpec
import Testing
@testable import Devices

/// passt's framing: each frame after its length in 4 big-endian bytes, on a stream socket.
struct StreamFrameBackendTests {
    func pair() throws -> (StreamFrameBackend, Int32) {
        var ends: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0)
        return (try StreamFrameBackend(descriptor: ends[0], name: "stream", maximumFrame: 2048), ends[1])
    }

    func receiveAll(_ backend: StreamFrameBackend) -> [[UInt8]] {
        var frames: [[UInt8]] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        for _ in 0..<10 {
            let count = buffer.withUnsafeMutableBytes { backend.receive(into: $0) }
            if count > 0 { frames.append(Array(buffer[0..<count])) } else if !backend.hasBufferedFrame { break }
        }
        return frames
    }

    @Test func framesArriveWholeWhateverTheReadsCut() throws {
        let (backend, peer) = try pair()
        defer { close(peer) }
        let first: [UInt8] = Array(repeating: 0xab, count: 60), second: [UInt8] = Array(1...100)
        var stream: [UInt8] = []
        for frame in [first, second] { stream += [0, 0, UInt8(frame.count >> 8), UInt8(frame.count & 0xff)] + frame }
        // Half the first frame now, the rest later: nothing until it is whole.
        #expect(write(peer, stream, 30) == 30)
        #expect(receiveAll(backend).isEmpty)
        let rest = Array(stream[30...])
        #expect(write(peer, rest, rest.count) == rest.count)
        #expect(receiveAll(backend) == [first, second])
    }

    @Test func sentFramesCarryTheirLength() throws {
        let (backend, peer) = try pair()
        defer { close(peer) }
        let frame: [UInt8] = Array(repeating: 7, count: 1500)
        #expect(frame.withUnsafeBytes { backend.send($0) })
        var got = [UInt8](repeating: 0, count: 2000)
        var total = 0
        while total < 1504 { total += max(0, read(peer, &got[total], 2000 - total)) }
        #expect(Array(got[0..<4]) == [0, 0, 0x05, 0xdc] && Array(got[4..<1504]) == frame)
        // Larger than the largest frame: refused, nothing written.
        let huge = [UInt8](repeating: 1, count: 4096)
        #expect(!huge.withUnsafeBytes { backend.send($0) })
    }

    @Test func anImpossibleLengthEndsTheStream() throws {
        let (backend, peer) = try pair()
        defer { close(peer) }
        let bad: [UInt8] = [0x7f, 0xff, 0xff, 0xff, 1, 2, 3]
        #expect(write(peer, bad, bad.count) == bad.count)
        #expect(receiveAll(backend).isEmpty)
        #expect(!backend.isConnected)
    }

    @Test func aClosedPeerIsNoticed() throws {
        let (backend, peer) = try pair()
        close(peer)
        #expect(receiveAll(backend).isEmpty)
        #expect(!backend.isConnected)
        #expect(![UInt8](repeating: 0, count: 64).withUnsafeBytes { backend.send($0) })
    }
}

/// virtio-net multiqueue (VIRTIO_NET_F_MQ with the control queue, virtio 1.x §5.1.6.5): a card
/// with two backends, driven through the transport as a guest would.
@Suite struct VirtioNetMultiqueueTests {
    static let multiqueue: UInt64 = 1 << 22, controlQueue: UInt64 = 1 << 17

    func card(pairs: Int) throws -> (VirtioNet, [Int32]) {
        var backends: [any FrameBackend] = []
        var peers: [Int32] = []
        for _ in 0..<pairs {
            var ends: [Int32] = [-1, -1]
            #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0)
            backends.append(try StreamFrameBackend(descriptor: ends[0], name: "stream", maximumFrame: 2048))
            peers.append(ends[1])
        }
        return (try VirtioNet(backends: backends, mac: MACAddress(bytes: [2, 0, 0, 0, 0, 1])), peers)
    }

    /// A control command (class, command, data) on `driver`'s queue; returns the device's ack.
    func command(_ driver: inout TestDriver, _ bytes: [UInt8]) throws -> UInt8 {
        let base = driver.base
        try driver.memory.write(bytes, at: GuestPhysicalAddress(base + 0x10000))
        try driver.memory.write(UInt8(0xee), at: GuestPhysicalAddress(base + 0x30000))
        driver.nextDescriptor = 0
        let ack = try driver.descriptor(base + 0x30000, 1, writable: true, next: nil)
        let data = try driver.descriptor(base + 0x10002, UInt32(bytes.count - 2), writable: false, next: ack)
        try driver.submit(try driver.descriptor(base + 0x10000, 2, writable: false, next: data))
        return try driver.memory.read(UInt8.self, at: GuestPhysicalAddress(base + 0x30000))
    }

    @Test("a card with two pairs offers MQ and a control queue and says max_virtqueue_pairs = 2; the driver's VQ_PAIRS_SET 2 is taken and 0, 3 or another class are refused; a frame sent on pair 1's transmit queue leaves through pair 1's backend; the pairs in use survive a saved state, which a one-pair card and a damaged record refuse")
    func controlQueueAndPairs() throws {
        let (net, peers) = try card(pairs: 2)
        defer { for peer in peers { close(peer) } }
        #expect(net.queueMaximumSizes == [256, 256, 256, 256, 64])
        let memory = try GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), 1 << 20)])
        let transport = VirtioMMIOTransport(device: net, memory: memory, interrupt: PulseCounter())
        var control = TestDriver(memory: memory, transport: transport, queueSize: 16, queueIndex: 4)
        control.set(0x14, 0)
        #expect(control.register(0x010) & UInt32(Self.multiqueue | Self.controlQueue) == UInt32(Self.multiqueue | Self.controlQueue))
        #expect(control.register(0x100 + 8) & 0xffff == 2, "max_virtqueue_pairs")
        control.initialise(features: VirtioFeature.version1 | Self.multiqueue | Self.controlQueue)
        var transmit = TestDriver(memory: memory, transport: transport, queueSize: 16, queueIndex: 3, base: 0x80000)
        transmit.setUpQueue()
        #expect(net.queuePairsInUse == 1, "more than the first pair before VQ_PAIRS_SET")

        #expect(try command(&control, [4, 0, 2, 0]) == 0)
        #expect(net.queuePairsInUse == 2)
        #expect(try command(&control, [4, 0, 0, 0]) == 1)
        #expect(try command(&control, [4, 0, 3, 0]) == 1)
        #expect(try command(&control, [0, 0, 1]) == 1, "RX mode, which the card does not offer")
        #expect(net.queuePairsInUse == 2)
        #expect(transport.lastError == nil)

        // Pair 1's transmit queue: the 12-byte header, then a 60-byte frame.
        let frame = (0..<60).map { UInt8($0) }
        try memory.write([UInt8](repeating: 0, count: 12) + frame, at: GuestPhysicalAddress(0x80000 + 0x20000))
        try transmit.submit(try transmit.descriptor(0x80000 + 0x20000, 72, writable: false, next: nil))
        #expect(transmit.usedIndex == 1)
        var received = [UInt8](repeating: 0, count: 128)
        let count = read(peers[1], &received, received.count)
        #expect(count == 64 && Array(received[4..<64]) == frame, "\(count)")
        var nothing = [UInt8](repeating: 0, count: 8)
        #expect(recv(peers[0], &nothing, nothing.count, Int32(MSG_DONTWAIT)) < 0, "the frame went out on pair 0")

        #expect(try net.savedDeviceRecord() == [2, 0])
        let (restored, otherPeers) = try card(pairs: 2)
        defer { for peer in otherPeers { close(peer) } }
        try restored.restoreDevice(record: [2, 0])
        #expect(restored.queuePairsInUse == 2)
        #expect(throws: StateError.self) { try restored.restoreDevice(record: [3, 0]) }
        #expect(throws: StateError.self) { try restored.restoreDevice(record: [2]) }
        let (single, singlePeers) = try card(pairs: 1)
        defer { for peer in singlePeers { close(peer) } }
        #expect(try single.savedDeviceRecord() == [])
        #expect(throws: StateError.self) { try single.restoreDevice(record: [2, 0]) }
        #expect(single.queueMaximumSizes == [256, 256])
        nothing.withUnsafeMutableBytes { single.readConfiguration(offset: 8, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<2])) }
        #expect(nothing[0] == 1 && nothing[1] == 0)
    }
}
