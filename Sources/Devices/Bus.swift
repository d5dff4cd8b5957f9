import Synchronization

/// A device on the x86 I/O port space. `offset` is relative to the base it was registered at.
/// Reads fill `data` completely (1, 2 or 4 bytes).
public protocol PortIODevice: AnyObject, Sendable {
    func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer)
    func write(offset: UInt16, data: UnsafeRawBufferPointer)
}

/// A device in the guest-physical MMIO space.
public protocol MMIODevice: AnyObject, Sendable {
    func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer)
    func write(offset: UInt64, data: UnsafeRawBufferPointer)
}

/// An interrupt input of the platform's interrupt controller, as a device sees it.
public protocol InterruptLine: Sendable {
    func setLevel(_ high: Bool)
}

public enum BusError: Error, CustomStringConvertible, Sendable {
    case overlap(name: String, base: UInt64, length: UInt64, existing: String)
    public var description: String {
        switch self {
        case let .overlap(name, base, length, existing):
            return "cannot place \(name) at 0x\(String(base, radix: 16))+0x\(String(length, radix: 16)): it overlaps \(existing)"
        }
    }
}

/// A fixed address → device map. Devices are registered while the machine is built and never
/// change afterwards, so lookups need no lock.
public struct AddressBus<Device: Sendable>: Sendable {
    struct Range: Sendable {
        let base: UInt64
        let length: UInt64
        let name: String
        let device: Device
    }
    private var ranges: [Range] = []

    public init() {}

    public mutating func register(_ device: Device, name: String, base: UInt64, length: UInt64) throws(BusError) {
        if let clash = ranges.first(where: { base < $0.base + $0.length && $0.base < base + length }) {
            throw .overlap(name: name, base: base, length: length, existing: clash.name)
        }
        ranges.append(Range(base: base, length: length, name: name, device: device))
        ranges.sort { $0.base < $1.base }
    }

    /// The device covering `[address, address+size)` and the offset into it.
    @inline(__always)
    public func lookup(_ address: UInt64, size: UInt64) -> (device: Device, offset: UInt64)? {
        for range in ranges where address >= range.base && address - range.base < range.length {
            guard address - range.base + size <= range.length else { return nil }
            return (range.device, address - range.base)
        }
        return nil
    }
}

public typealias PortIOBus = AddressBus<any PortIODevice>
public typealias MMIOBus = AddressBus<any MMIODevice>

extension AddressBus where Device == any PortIODevice {
    /// Dispatches a port access; reads from ports with no device see all ones, as on real ISA.
    public func access(port: UInt16, isWrite: Bool, data: UnsafeMutableRawBufferPointer) {
        guard let (device, offset) = lookup(UInt64(port), size: UInt64(data.count)) else {
            if !isWrite { for index in data.indices { data[index] = 0xff } }
            return
        }
        if isWrite {
            device.write(offset: UInt16(offset), data: UnsafeRawBufferPointer(data))
        } else {
            device.read(offset: UInt16(offset), into: data)
        }
    }
}

extension AddressBus where Device == any MMIODevice {
    /// Dispatches an MMIO access; unclaimed reads return zero and writes are dropped.
    /// Returns false when no device claimed the address.
    @discardableResult
    public func access(address: UInt64, isWrite: Bool, data: UnsafeMutableRawBufferPointer) -> Bool {
        guard let (device, offset) = lookup(address, size: UInt64(data.count)) else {
            if !isWrite { for index in data.indices { data[index] = 0 } }
            return false
        }
        if isWrite {
            device.write(offset: offset, data: UnsafeRawBufferPointer(data))
        } else {
            device.read(offset: offset, into: data)
        }
        return true
    }
}
