#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Synchronization

/// virtio-rng (virtio 1.x §5.4): fills the driver's buffers from the host's `/dev/urandom` (the
/// same pool as `getrandom(2)`, which Swift's Glibc module does not export). The file is opened
/// when the device is made, so a later jail need not contain it.
public final class VirtioEntropy: VirtioDevice, @unchecked Sendable {
    public static let queueSize: UInt16 = 64
    /// Bytes handed to the guest, for counters and tests.
    public let bytesProvided = Atomic<UInt64>(0)

    private let source: Int32

    public init() throws(VirtioError) {
        source = open("/dev/urandom", O_RDONLY | O_CLOEXEC)
        guard source >= 0 else { throw .malformedRequest("cannot open /dev/urandom: errno \(errno)") }
    }

    deinit { close(source) }

    public var deviceType: UInt32 { 4 }
    public var deviceFeatures: UInt64 { VirtioFeature.version1 }
    public var queueMaximumSizes: [UInt16] { [Self.queueSize] }

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        data.initializeMemory(as: UInt8.self, repeating: 0)   // no configuration space
    }

    public func process(queue index: Int, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        var used = false
        while let chain = try queue.popChain() {
            var written: UInt32 = 0
            for buffer in chain.writable where buffer.length > 0 {
                let host: UnsafeMutableRawPointer
                do { host = try memory.hostPointer(buffer.address, length: UInt64(buffer.length)) } catch {
                    throw .bufferOutsideMemory(buffer.address, length: buffer.length)
                }
                var filled = 0
                while filled < Int(buffer.length) {
                    let got = read(source, host + filled, Int(buffer.length) - filled)
                    if got < 0 && errno == EINTR { continue }
                    if got <= 0 { break }   // the host gave nothing: hand back what was filled
                    filled += got
                }
                written += UInt32(filled)
                if filled < Int(buffer.length) { break }
            }
            try queue.pushUsed(head: chain.head, written: written)
            bytesProvided.add(UInt64(written), ordering: .relaxed)
            used = true
        }
        return used
    }
}
