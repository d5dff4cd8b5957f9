import CHostSupport
import Foundation
import GuestMemory
import Testing
@testable import X86Boot

/// The ACPI tables against their oracle: acpica-tools' `iasl` disassembles each one, and what it
/// reads back must be what the VMM meant (devices, resources, registers), with no error or
/// warning. iasl is installed by scripts/setup.sh; without it these fail, never skip.
@Suite struct ACPITablesTests {
    static let machine = ACPITables(
        cpus: 3,
        virtioDevices: (0..<4).compactMap { MachineLayout.virtioSlot($0) }.map { ACPIVirtioDevice(address: $0.address, interrupt: $0.interrupt) },
        generationIDAddress: MachineLayout.generationIDAddress.rawValue)

    /// Disassembles `bytes` as a table named `signature` and returns the ASL text.
    static func disassemble(_ bytes: [UInt8], signature: String) throws -> String {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-acpi-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("\(signature.lowercased()).dat")
        try Data(bytes).write(to: file)
        // Through posix_spawn, not Foundation's Process (which crashes now and then on Linux in
        // Swift 6.3, swift-corelibs-foundation #5472); iasl writes the .dsl in its directory.
        let arguments = ["sh", "-c", "cd \"$0\" && exec iasl -d \"$1\"", directory.path, file.path]
        var output = [UInt8](repeating: 0, count: 1 << 16)
        var length = 0
        let argv = arguments.map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        let status = argv.withUnsafeBufferPointer { vireo_run_collecting("sh", $0.baseAddress, &output, output.count, &length) }
        let log = String(decoding: output[0..<length], as: UTF8.self)
        guard status == 0 else {
            throw HarnessFailure("iasl -d \(signature) exited \(status) (is acpica-tools installed? scripts/setup.sh installs it): \(log)")
        }
        let asl = try String(contentsOf: directory.appendingPathComponent("\(signature.lowercased()).dsl"), encoding: .utf8)
        return asl
    }

    /// iasl's disassembler notes problems in the output as comments rather than failing.
    static func expectClean(_ asl: String, _ name: String) {
        for marker in ["Error", "Warning", "**** Unknown", "Invalid", "Bad checksum", "Incorrect checksum"] {
            #expect(!asl.contains(marker), "\(name): iasl noted '\(marker)':\n\(asl)")
        }
    }

    @Test func everyChecksumIsZero() {
        for table in Self.machine.placed {
            if table.name == "RSDP" {
                #expect(table.bytes[0..<20].reduce(UInt8(0), &+) == 0, "RSDP first 20 bytes")
                #expect(table.bytes.reduce(UInt8(0), &+) == 0, "RSDP extended")
            } else {
                #expect(table.bytes.reduce(UInt8(0), &+) == 0, "\(table.name)")
                #expect(Int(table.bytes.le(UInt32.self, at: 4) ?? 0) == table.bytes.count, "\(table.name) length field")
            }
        }
    }

    @Test func tablesFitTheirAreaAndPointAtEachOther() throws {
        let placed = Self.machine.placed
        let byName = Dictionary(uniqueKeysWithValues: placed.map { ($0.name, $0) })
        let rsdp = try #require(byName["RSDP"])
        #expect(rsdp.address == MachineLayout.acpiTablesAddress.rawValue && rsdp.address % 16 == 0)
        let xsdt = try #require(byName["XSDT"])
        #expect(rsdp.bytes.le(UInt64.self, at: 24) == xsdt.address)
        let entries = (0..<(xsdt.bytes.count - 36) / 8).compactMap { xsdt.bytes.le(UInt64.self, at: 36 + $0 * 8) }
        #expect(Set(entries) == Set([byName["FACP"]?.address, byName["APIC"]?.address].compactMap { $0 }))
        let fadt = try #require(byName["FACP"])
        #expect(fadt.bytes.le(UInt64.self, at: 140) == byName["DSDT"]?.address)
        for table in placed {
            #expect(table.address + UInt64(table.bytes.count) <= MachineLayout.generationIDAddress.rawValue, "\(table.name) overlaps the generation ID")
        }
        try Self.machine.validate()
    }

    @Test func dsdtDisassemblesToTheDevicesWeMeant() throws {
        let asl = try Self.disassemble(Self.machine.dsdt, signature: "DSDT")
        Self.expectClean(asl, "DSDT")
        #expect(asl.contains("Device (COM1)") && asl.contains("EisaId (\"PNP0501\")"), "\(asl)")
        #expect(squeezed(asl).contains("IO (Decode16, 0x03F8, // Range Minimum 0x03F8, // Range Maximum 0x01, // Alignment 0x08, // Length"), "\(asl)")
        #expect(asl.contains("EisaId (\"PNP0303\")") && asl.contains("EisaId (\"PNP0B00\")"))
        #expect(asl.contains("Device (PWRB)") && asl.contains("EisaId (\"PNP0C0C\")"))
        #expect(asl.contains("Device (GED0)") && asl.contains("\"ACPI0013\""))
        #expect(asl.contains("OperationRegion (GDST, SystemIO, 0x0603, One)"), "\(asl)")
        #expect(asl.contains("Method (_EVT, 1, NotSerialized)"))
        #expect(asl.contains("Notify (PWRB, 0x80)"), "\(asl)")
        #expect(asl.contains("0x0000000D,"), "GED interrupt 13: \(asl)")
        for index in 0..<4 {
            let slot = try #require(MachineLayout.virtioSlot(index))
            #expect(asl.contains("Device (VR0\(index))"))
            let address = "0x" + String(slot.address, radix: 16, uppercase: true).leftPadded(to: 8)
            #expect(asl.contains(address), "virtio \(index) at \(address)")
        }
        #expect(asl.components(separatedBy: "\"LNRO0005\"").count - 1 == 4)
        #expect(asl.contains("Device (VGEN)") && asl.contains("\"VM_Gen_Counter\"") && asl.contains("\"VMGENCTR\""))
        #expect(asl.contains("0x000EF000"), "generation ID address: \(asl)")
        #expect(squeezed(asl).contains("Name (\\_S5, Package (0x04) // _S5_: S5 System State { 0x05, Zero, Zero, Zero })"), "\(asl)")
    }

    @Test func fadtIsHardwareReducedWithResetAndSleepRegisters() throws {
        let placed = Self.machine.placed
        let dsdtAddress = try #require(placed.first { $0.name == "DSDT" }).address
        let asl = try Self.disassemble(Self.machine.fadt(dsdtAddress: dsdtAddress), signature: "FACP")
        Self.expectClean(asl, "FADT")
        #expect(asl.contains("Hardware Reduced (V5) : 1"), "\(asl)")
        #expect(asl.contains("Reset Register Supported (V2) : 1"))
        #expect(asl.contains("Value to cause reset : 01"))
        // The three I/O registers, at the ports the VMM serves.
        for port in ["0000000000000600", "0000000000000601", "0000000000000602"] {
            #expect(asl.contains("Address : \(port)"), "port \(port): \(asl)")
        }
    }

    @Test func madtListsEveryCPUTheIOAPICAndTheNMILine() throws {
        let asl = try Self.disassemble(Self.machine.madt, signature: "APIC")
        Self.expectClean(asl, "MADT")
        #expect(asl.components(separatedBy: "Subtable Type : 00 [Processor Local APIC]").count - 1 == 3, "\(asl)")
        #expect(asl.contains("Subtable Type : 01 [I/O APIC]"))
        #expect(asl.contains("Address : FEC00000"))
        #expect(asl.contains("Subtable Type : 04 [Local APIC NMI]"))
        #expect(asl.contains("Local Apic Address : FEE00000"))
    }

    @Test func xsdtAndRSDP() throws {
        let asl = try Self.disassemble(Self.machine.xsdt(entries: [0xe1000, 0xe2000]), signature: "XSDT")
        Self.expectClean(asl, "XSDT")
        #expect(asl.contains("ACPI Table Address   0 : 00000000000E1000"), "\(asl)")
        // iasl (20200925) only disassembles files with a table header, which the RSDP lacks: its
        // fields and both checksums are checked here, and the guests (probe and Linux) read it.
        let rsdp = ACPITables.rsdp(xsdtAddress: 0xe1000)
        #expect(Array(rsdp[0..<8]) == Array("RSD PTR ".utf8))
        #expect(rsdp[15] == 2)
        #expect(rsdp.le(UInt32.self, at: 20) == 36)
        #expect(rsdp.le(UInt64.self, at: 24) == 0xe1000)
    }

    @Test("the largest machine (every virtio slot, 254 vCPUs) still fits the ACPI area")
    func largestMachineFits() throws {
        let tables = ACPITables(cpus: BootConfiguration.maximumCPUs,
                                virtioDevices: MachineLayout.virtioInterrupts.indices.compactMap { MachineLayout.virtioSlot($0) }
                                    .map { ACPIVirtioDevice(address: $0.address, interrupt: $0.interrupt) },
                                generationIDAddress: MachineLayout.generationIDAddress.rawValue)
        try tables.validate()
        let asl = try Self.disassemble(tables.dsdt, signature: "DSDT")
        Self.expectClean(asl, "DSDT (17 virtio devices)")
        #expect(asl.contains("Device (VR16)"))
        let madt = try Self.disassemble(tables.madt, signature: "APIC")
        Self.expectClean(madt, "MADT (254 CPUs)")
    }

    @Test func amlEncodings() {
        #expect(AMLEISAID("PNP0501").value == 0x0105_d041)
        #expect(AMLEISAID("PNP0C0C").value == 0x0c0c_d041)
        #expect(AMLInteger(0).aml == [0x00])
        #expect(AMLInteger(1).aml == [0x01])
        #expect(AMLInteger(5).aml == [0x0a, 5])
        #expect(AMLInteger(0x1234).aml == [0x0b, 0x34, 0x12])
        let rooted: [UInt8] = [0x5c, 0x2e] + Array("_SB_PWRB".utf8)
        #expect(AMLName("\\_SB.PWRB").aml == rooted)
        #expect(AMLName("RTC").aml == Array("RTC_".utf8))
        // PkgLength: one byte below 63 bytes of body, two bytes (with the low nibble first) above.
        #expect(encodePackageLength(10, includingItself: true) == [11])
        let twoBytes: [UInt8] = [0x46, 0x06]               // 102 = 0x66: lead 0x40 | 6, then 0x66 >> 4
        #expect(encodePackageLength(100, includingItself: true) == twoBytes)
        let threeBytes: [UInt8] = [0x8b, 0x38, 0x01]       // 5003 = 0x138b
        #expect(encodePackageLength(5000, includingItself: true) == threeBytes)
    }

    @Test func zeroPageAndPVHCarryTheRSDP() throws {
        let memory = try GuestMemory(anonymousRegions: MachineLayout.ramRegions(memoryBytes: 64 << 20))
        try PVHStartInfo(commandLineAddress: MachineLayout.commandLineAddress, initrdAddress: nil, initrdSize: 0,
                         e820: E820Entry.map(memoryBytes: 64 << 20), rsdpAddress: MachineLayout.acpiTablesAddress).write(into: memory)
        #expect(try memory.read(UInt64.self, at: MachineLayout.pvhStartInfoAddress + 32) == 0xe0000)
    }
}

/// Whitespace runs folded to one space, so multi-line ASL can be matched as one phrase.
func squeezed(_ text: String) -> String {
    text.split(whereSeparator: { $0 == " " || $0 == "\n" }).joined(separator: " ")
}

struct HarnessFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

@Suite struct GuestMemoryFillTests {
    /// Large zero fills drop whole pages instead of writing them; what the guest reads must be the
    /// same as a byte-by-byte fill, up to the unaligned edges and not a byte beyond.
    @Test func zeroFillOfManyPagesReadsAsZerosAndStopsAtItsEdges() throws {
        let memory = try GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), 4 << 20)])
        try memory.fill(0xab, count: 4 << 20, at: GuestPhysicalAddress(0))
        let start: UInt64 = 0x1_0123, count = (1 << 20) + 0x345
        try memory.fill(0, count: Int(count), at: GuestPhysicalAddress(start))
        let view = try memory.readBytes(count: Int(count) + 2, at: GuestPhysicalAddress(start - 1))
        #expect(view.first == 0xab && view.last == 0xab)
        #expect(view.dropFirst().dropLast().allSatisfy { $0 == 0 })
        // Pages the fill dropped are ordinary memory again afterwards.
        try memory.write(UInt64(0x1122_3344_5566_7788), at: GuestPhysicalAddress(0x4_0000))
        #expect(try memory.read(UInt64.self, at: GuestPhysicalAddress(0x4_0000)) == 0x1122_3344_5566_7788)
    }
}
