/// Firecracker's boot-timer device: when the guest writes the magic byte, the VMM records how long
/// the guest took to get there. Tests and benchmarks use it as the "guest is up" signal.
public final class BootMarker: MMIODevice {
    public static let magic: UInt8 = 123
    private let marked: @Sendable () -> Void

    public init(marked: @escaping @Sendable () -> Void) { self.marked = marked }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        for index in data.indices { data[index] = 0 }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        if offset == 0, data.first == Self.magic { marked() }
    }
}
