import GuestMemory

/// The hardware-reduced ACPI platform Vireo gives its guests (the choice Firecracker and Cloud
/// Hypervisor made; docs/acpi.md says why): RSDP → XSDT → FADT (with the DSDT) and MADT. There are
/// no PM1 or GPE register blocks and no SCI. Sleep control and status, the reset register and a
/// Generic Event Device's event register are four I/O ports handled by the VMM.
public enum ACPIPlatform {
    /// The FADT's SLEEP_CONTROL_REG: SLP_TYPx in bits 2-4, SLP_EN in bit 5.
    public static let sleepControlPort: UInt16 = 0x600
    /// The FADT's SLEEP_STATUS_REG: WAK_STS in bit 7.
    public static let sleepStatusPort: UInt16 = 0x601
    /// The FADT's RESET_REG; writing `resetValue` resets the machine.
    public static let resetPort: UInt16 = 0x602
    public static let resetValue: UInt8 = 0x01
    /// The Generic Event Device's event register: which events are pending; reading clears them.
    public static let eventPort: UInt16 = 0x603
    public static let portCount: UInt64 = 4
    /// Bit 0 of the event register: the power button was pressed.
    public static let powerButtonEvent: UInt8 = 0x01
    /// Bit 1: the VM generation ID changed (a snapshot was restored); the guest re-reads it.
    public static let generationChangeEvent: UInt8 = 0x02
    /// The GED's interrupt: ISA IRQ 13 (the long-gone FPU error line), free on this machine.
    public static let eventInterrupt: UInt32 = 13
    /// `\_S5` sleep type: what the guest writes (shifted into SLP_TYPx) to power off.
    public static let softOffSleepType: UInt8 = 5
}

/// One virtio-mmio device as the DSDT announces it.
public struct ACPIVirtioDevice: Sendable, Equatable {
    public let address: UInt64
    public let interrupt: UInt32
    public init(address: UInt64, interrupt: UInt32) { self.address = address; self.interrupt = interrupt }
}

/// Builds every table from the machine's shape and places them at `MachineLayout.acpiTablesAddress`.
public struct ACPITables: Sendable {
    public let cpus: Int
    public let virtioDevices: [ACPIVirtioDevice]
    /// Where the 16-byte VM generation ID lives in guest memory; nil for no vmgenid device.
    public let generationIDAddress: UInt64?

    static let oemID = Array("VIREO ".utf8)
    static let oemTableID = Array("VIREOVM ".utf8)
    static let creatorID = Array("VIRO".utf8)

    public init(cpus: Int, virtioDevices: [ACPIVirtioDevice], generationIDAddress: UInt64?) {
        self.cpus = cpus
        self.virtioDevices = virtioDevices
        self.generationIDAddress = generationIDAddress
    }

    public var ioapicID: UInt8 { UInt8(cpus) }

    /// A table: the 36-byte header with its checksum, then `body`.
    static func table(_ signature: String, revision: UInt8, body: [UInt8]) -> [UInt8] {
        var bytes = Array(signature.utf8)
        bytes.append(le: UInt32(36 + body.count))
        bytes.append(revision)
        bytes.append(0)                               // checksum, below
        bytes += oemID + oemTableID
        bytes.append(le: UInt32(1))                   // OEM revision
        bytes += creatorID
        bytes.append(le: UInt32(1))                   // creator revision
        bytes += body
        bytes[9] = checksumByte(bytes)
        return bytes
    }

    /// A Generic Address Structure for a byte-wide register in I/O space.
    static func ioRegister(_ port: UInt16) -> [UInt8] {
        var gas: [UInt8] = [1, 8, 0, 1]               // SystemIO, 8 bits, offset 0, byte access
        gas.append(le: UInt64(port))
        return gas
    }

    public var dsdt: [UInt8] {
        var devices: [any AMLTerm] = [
            AMLDevice("COM1", [
                AMLNamed("_HID", AMLEISAID("PNP0501")),
                AMLNamed("_UID", AMLInteger(1)),
                AMLNamed("_CRS", AMLResourceTemplate([.ioPort(base: 0x3f8, length: 8), .isaInterrupt(4)])),
            ]),
            AMLDevice("PS2K", [
                AMLNamed("_HID", AMLEISAID("PNP0303")),
                AMLNamed("_CRS", AMLResourceTemplate([.ioPort(base: 0x60, length: 1), .ioPort(base: 0x64, length: 1), .isaInterrupt(1)])),
            ]),
            // The CMOS clock has no alarm interrupt here, so none is claimed.
            AMLDevice("RTC", [
                AMLNamed("_HID", AMLEISAID("PNP0B00")),
                AMLNamed("_CRS", AMLResourceTemplate([.ioPort(base: 0x70, length: 2)])),
            ]),
            AMLDevice("PWRB", [
                AMLNamed("_HID", AMLEISAID("PNP0C0C")),
                AMLNamed("_UID", AMLInteger(0)),
            ]),
            // The Generic Event Device: its interrupt runs _EVT, which reads (and so clears) the
            // event register and turns the power-button bit into the button's notification (and
            // the generation bit into the vmgenid device's, when there is one).
            AMLDevice("GED0", [
                AMLNamed("_HID", AMLString("ACPI0013")),
                AMLNamed("_UID", AMLInteger(0)),
                AMLNamed("_CRS", AMLResourceTemplate([.interrupt(gsi: ACPIPlatform.eventInterrupt, edgeTriggered: true)])),
                AMLOperationRegion("GDST", space: .systemIO, offset: UInt64(ACPIPlatform.eventPort), length: 1),
                AMLField("GDST", [("GDAT", 8)]),
                AMLMethod("_EVT", arguments: 1, [
                    AMLStore(.name("GDAT"), into: .local(0)),
                    AMLIf(.and(.local(0), .integer(UInt64(ACPIPlatform.powerButtonEvent))), [
                        AMLNotify("PWRB", 0x80),
                    ]),
                ] as [any AMLTerm] + (generationIDAddress == nil ? [] : [
                    AMLIf(.and(.local(0), .integer(UInt64(ACPIPlatform.generationChangeEvent))), [
                        AMLNotify("VGEN", 0x80),
                    ]),
                ])),
            ]),
        ]
        for (index, device) in virtioDevices.enumerated() {
            devices.append(AMLDevice(AMLName(Self.virtioDeviceName(index)), [
                AMLNamed("_HID", AMLString("LNRO0005")),
                AMLNamed("_UID", AMLInteger(UInt64(index))),
                AMLNamed("_CRS", AMLResourceTemplate([
                    .memory32Fixed(base: UInt32(device.address), length: UInt32(MachineLayout.virtioMMIOWindow)),
                    .interrupt(gsi: device.interrupt, edgeTriggered: true),
                ])),
            ]))
        }
        if let generationIDAddress {
            // Linux 6.1's vmgenid driver matches the _HID; QEMU, Hyper-V and Firecracker guests
            // look for the "VM_Gen_Counter" compatible ID. ADDR is the ID's address as two DWORDs.
            devices.append(AMLDevice("VGEN", [
                AMLNamed("_HID", AMLString("VMGENCTR")),
                AMLNamed("_CID", AMLString("VM_Gen_Counter")),
                AMLNamed("_DDN", AMLString("VM_Gen_Counter")),
                AMLNamed("ADDR", AMLPackage([AMLDWord(UInt32(truncatingIfNeeded: generationIDAddress)),
                                             AMLDWord(UInt32(truncatingIfNeeded: generationIDAddress >> 32))])),
            ]))
        }
        let body: [any AMLTerm] = [
            AMLScope("\\_SB", devices),
            AMLNamed("\\_S5", AMLPackage([AMLInteger(UInt64(ACPIPlatform.softOffSleepType)), AMLInteger(0), AMLInteger(0), AMLInteger(0)])),
        ]
        return Self.table("DSDT", revision: 2, body: body.flatMap(\.aml))
    }

    /// `VR00`…`VR16`: stable names, one per virtio slot.
    public static func virtioDeviceName(_ index: Int) -> String {
        "VR" + (index < 10 ? "0" : "") + String(index)
    }

    public func fadt(dsdtAddress: UInt64) -> [UInt8] {
        var body = [UInt8](repeating: 0, count: 276 - 36)
        func at(_ offset: Int) -> Int { offset - 36 }
        body.setLE(UInt32(truncatingIfNeeded: dsdtAddress), at: at(40))
        // IAPC_BOOT_ARCH: an 8042 is present (bit 1), VGA is not (bit 2).
        body.setLE(UInt16(0x0002 | 0x0004), at: at(109))
        // Flags: power and sleep buttons are not fixed features (bits 4, 5), RESET_REG_SUP
        // (bit 10), HW_REDUCED_ACPI (bit 20).
        body.setLE(UInt32(1 << 4 | 1 << 5 | 1 << 10 | 1 << 20), at: at(112))
        for (index, byte) in Self.ioRegister(ACPIPlatform.resetPort).enumerated() { body[at(116) + index] = byte }
        body[at(128)] = ACPIPlatform.resetValue
        body[at(131)] = 5                                   // FADT minor version: ACPI 6.5
        body.setLE(dsdtAddress, at: at(140))                // X_DSDT
        for (index, byte) in Self.ioRegister(ACPIPlatform.sleepControlPort).enumerated() { body[at(244) + index] = byte }
        for (index, byte) in Self.ioRegister(ACPIPlatform.sleepStatusPort).enumerated() { body[at(256) + index] = byte }
        for (index, byte) in Array("VIREO   ".utf8).enumerated() { body[at(268) + index] = byte }  // hypervisor vendor
        return Self.table("FACP", revision: 6, body: body)
    }

    public var madt: [UInt8] {
        var body: [UInt8] = []
        body.append(le: UInt32(MachineLayout.lapicAddress))
        body.append(le: UInt32(1))                          // PCAT_COMPAT: the 8259s exist
        for cpu in 0..<cpus {
            if cpu < 255 {
                body += [0, 8, UInt8(cpu), UInt8(cpu)]      // Processor Local APIC: UID, APIC ID
                body.append(le: UInt32(1))                  // enabled
            } else {
                body += [9, 16, 0, 0]                       // Processor Local x2APIC
                body.append(le: UInt32(cpu))                // x2APIC ID
                body.append(le: UInt32(1))                  // enabled
                body.append(le: UInt32(cpu))                // UID
            }
        }
        body += [1, 12, ioapicID, 0]                        // I/O APIC
        body.append(le: UInt32(MachineLayout.ioapicAddress))
        body.append(le: UInt32(0))                          // GSI base
        // ISA IRQ 0 stays on GSI 0: KVM's default routing wires the PIT there, not to pin 2 as a
        // PC chipset would, and saying so keeps a guest from assuming the PC convention.
        body += [2, 10, 0, 0]
        body.append(le: UInt32(0))
        body.append(le: UInt16(0))                          // conforms to the bus
        body += [4, 6, 0xff]                                // Local APIC NMI, all processors,
        body.append(le: UInt16(0))                          // bus-conforming flags,
        body.append(1)                                      // on LINT1
        return Self.table("APIC", revision: 5, body: body)
    }

    public func xsdt(entries: [UInt64]) -> [UInt8] {
        var body: [UInt8] = []
        for entry in entries { body.append(le: entry) }
        return Self.table("XSDT", revision: 1, body: body)
    }

    public static func rsdp(xsdtAddress: UInt64) -> [UInt8] {
        var bytes = Array("RSD PTR ".utf8)
        bytes.append(0)                                     // checksum of the first 20 bytes
        bytes += oemID
        bytes.append(2)                                     // revision: ACPI 2.0+, XSDT
        bytes.append(le: UInt32(0))                         // no RSDT
        bytes.append(le: UInt32(36))
        bytes.append(le: xsdtAddress)
        bytes += [0, 0, 0, 0]                               // extended checksum, reserved
        bytes[8] = checksumByte(bytes[0..<20])
        bytes[32] = checksumByte(bytes)
        return bytes
    }

    /// Every table with the guest-physical address it goes to; the RSDP first.
    public var placed: [(name: String, address: UInt64, bytes: [UInt8])] {
        let base = MachineLayout.acpiTablesAddress.rawValue
        func align(_ value: UInt64) -> UInt64 { (value + 15) & ~15 }
        let rsdpAddress = base
        let dsdtAddress = align(rsdpAddress + 36)
        let dsdt = self.dsdt
        let fadtAddress = align(dsdtAddress + UInt64(dsdt.count))
        let fadt = self.fadt(dsdtAddress: dsdtAddress)
        let madtAddress = align(fadtAddress + UInt64(fadt.count))
        let madt = self.madt
        let xsdtAddress = align(madtAddress + UInt64(madt.count))
        let xsdt = self.xsdt(entries: [fadtAddress, madtAddress])
        return [("RSDP", rsdpAddress, Self.rsdp(xsdtAddress: xsdtAddress)), ("DSDT", dsdtAddress, dsdt),
                ("FACP", fadtAddress, fadt), ("APIC", madtAddress, madt), ("XSDT", xsdtAddress, xsdt)]
    }

    public var rsdpAddress: GuestPhysicalAddress { MachineLayout.acpiTablesAddress }

    /// Every table placed, refused if they outgrow their area. Built once, before anything starts
    /// (building them costs ~0.15 ms, a visible share of a 3 ms start), then written at each boot.
    public func validatedPlacement() throws(BootError) -> [PlacedTable] {
        let tables = placed.map { PlacedTable(name: $0.name, address: $0.address, bytes: $0.bytes) }
        let end = tables.map { $0.address + UInt64($0.bytes.count) }.max() ?? 0
        let limit = MachineLayout.acpiTablesAddress.rawValue + MachineLayout.acpiTablesLimit
        guard end <= limit else {
            throw .acpiTablesTooLarge(size: end - MachineLayout.acpiTablesAddress.rawValue, limit: MachineLayout.acpiTablesLimit)
        }
        return tables
    }

    public func validate() throws(BootError) { _ = try validatedPlacement() }
}

/// One ACPI table (or the RSDP) and where it goes in guest memory.
public struct PlacedTable: Sendable {
    public let name: String
    public let address: UInt64
    public let bytes: [UInt8]

    /// Writes the tables. The area's bound is checked again here, so no table ever spills into
    /// the generation ID or the MP table area.
    public static func write(_ tables: [PlacedTable], into memory: GuestMemory) throws(GuestMemoryError) {
        let limit = MachineLayout.acpiTablesAddress.rawValue + MachineLayout.acpiTablesLimit
        for table in tables {
            guard table.address + UInt64(table.bytes.count) <= limit else {
                throw .outOfBounds(address: GuestPhysicalAddress(table.address), length: UInt64(table.bytes.count))
            }
            try memory.write(table.bytes, at: GuestPhysicalAddress(table.address))
        }
    }
}
