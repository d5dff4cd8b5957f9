import GuestMemory

/// The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs, the
/// IOAPIC and how ISA interrupts reach it. Modelled on what Firecracker and kvmtool give Linux.
public struct MPTable: Sendable {
    public let cpus: Int
    public static let ioapicPinCount = 24
    static let localAPICVersion: UInt8 = 0x14
    static let ioapicVersion: UInt8 = 0x11

    public init(cpus: Int) { self.cpus = cpus }

    public var ioapicID: UInt8 { UInt8(cpus) }

    /// The floating pointer followed by the configuration table, as placed at `mpTableAddress`.
    public var bytes: [UInt8] {
        let base = MachineLayout.mpTableAddress.rawValue
        let configurationAddress = base + 16

        var entries: [UInt8] = []
        var entryCount: UInt16 = 0
        for cpu in 0..<cpus {
            entries.append(0)                                   // processor entry
            entries.append(UInt8(cpu))                          // local APIC id
            entries.append(Self.localAPICVersion)
            entries.append(cpu == 0 ? 0x3 : 0x1)                // enabled, BSP
            entries.append(le: UInt32(0x600))                   // CPU signature: family 6
            entries.append(le: UInt32(0x201))                   // features: FPU, APIC
            entries.append(le: UInt64(0))
            entryCount += 1
        }
        entries.append(contentsOf: [1, 0] + Array("ISA   ".utf8)) // bus 0 is ISA
        entryCount += 1
        entries.append(contentsOf: [2, ioapicID, Self.ioapicVersion, 1])
        entries.append(le: UInt32(MachineLayout.ioapicAddress))
        entryCount += 1
        for pin in 0..<Self.ioapicPinCount {
            // ISA IRQ n → IOAPIC pin n, the identity routing KVM's in-kernel IOAPIC uses by default.
            entries.append(contentsOf: [3, 0])                  // I/O interrupt, INT
            entries.append(le: UInt16(0))                       // polarity/trigger: bus default
            entries.append(contentsOf: [0, UInt8(pin), ioapicID, UInt8(pin)])
            entryCount += 1
        }
        entries.append(contentsOf: [4, 3])                      // local interrupt: ExtINT → LINT0
        entries.append(le: UInt16(0))
        entries.append(contentsOf: [0, 0, 0xff, 0])
        entries.append(contentsOf: [4, 1])                      // local interrupt: NMI → LINT1
        entries.append(le: UInt16(0))
        entries.append(contentsOf: [0, 0, 0xff, 1])
        entryCount += 2

        var configuration: [UInt8] = Array("PCMP".utf8)
        configuration.append(le: UInt16(44 + entries.count))    // base table length
        configuration.append(4)                                 // spec revision 1.4
        configuration.append(0)                                 // checksum, filled below
        configuration.append(contentsOf: Array("VIREO   ".utf8))
        configuration.append(contentsOf: Array("VIREO-VM    ".utf8))
        configuration.append(le: UInt32(0))                     // OEM table pointer
        configuration.append(le: UInt16(0))                     // OEM table size
        configuration.append(le: entryCount)
        configuration.append(le: UInt32(MachineLayout.lapicAddress))
        configuration.append(le: UInt32(0))                     // extended table length/checksum
        configuration.append(contentsOf: entries)
        configuration[7] = checksumByte(configuration)

        var pointer: [UInt8] = Array("_MP_".utf8)
        pointer.append(le: UInt32(configurationAddress))
        pointer.append(contentsOf: [1, 4, 0, 0, 0, 0, 0, 0])   // length (16-byte units), rev 1.4, checksum, features
        pointer[10] = checksumByte(pointer)
        return pointer + configuration
    }

    public func write(into memory: GuestMemory) throws(GuestMemoryError) {
        let table = bytes
        guard UInt64(table.count) <= MachineLayout.mpTableLimit else {
            throw .outOfBounds(address: MachineLayout.mpTableAddress, length: UInt64(table.count))
        }
        try memory.write(table, at: MachineLayout.mpTableAddress)
    }
}
