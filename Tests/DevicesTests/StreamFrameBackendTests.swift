import Foundation
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
