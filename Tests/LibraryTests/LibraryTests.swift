import Foundation
import Library
import Testing

struct VMNameTests {
    @Test(arguments: ["web", "a", "Web-01", "db.prod_2", String(repeating: "x", count: 64)])
    func accepted(_ name: String) throws { try VMName.validate(name) }

    @Test(arguments: ["", "-x", ".hidden", "_x", "a/b", "a b", "ä", "x\u{0}", String(repeating: "x", count: 65), "..", "."])
    func refused(_ name: String) {
        #expect(throws: LibraryError.self) { try VMName.validate(name) }
    }
}

struct VMDefinitionTests {
    func temporaryLibrary() throws -> VMLibrary {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-lib-\(UUID().uuidString)")
        return VMLibrary(root: root.path)
    }

    @Test func createWithoutKernelOrDiskThenReload() throws {
        let library = try temporaryLibrary()
        var request = CreateRequest(name: "plain")
        request.withoutDisk = true
        request.osType = "debian-64"
        let made = try library.create(request)
        #expect(made.cpus == 1 && made.memoryBytes == 1 << 30 && made.commandLine.contains("root=/dev/vda"))
        #expect(made.engine == .kvm)
        let loaded = try library.bundle(named: "plain").load()
        #expect(loaded == made)
        #expect(try library.names() == ["plain"])
        #expect(throws: LibraryError.self) { try library.create(request) }
    }

    @Test func corruptAndNewerConfigurationsAreRefusedClearly() throws {
        let library = try temporaryLibrary()
        var request = CreateRequest(name: "vm")
        request.withoutDisk = true
        _ = try library.create(request)
        let bundle = try library.bundle(named: "vm")
        let original = try Data(contentsOf: URL(fileURLWithPath: bundle.configPath))
        try Data("{\"version\": 1, \"name\": ".utf8).write(to: URL(fileURLWithPath: bundle.configPath))
        #expect { try bundle.load() } throws: { error in
            (error as? LibraryError)?.description.contains("not a valid VM configuration") == true
        }
        var object = try JSONSerialization.jsonObject(with: original) as? [String: Any] ?? [:]
        object["version"] = 99
        try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: bundle.configPath))
        #expect { try bundle.load() } throws: { error in
            (error as? LibraryError)?.description.contains("written by a newer Vireo (configuration version 99") == true
        }
        // Broken, but still listed and deletable.
        #expect(try library.names() == ["vm"])
        _ = try library.delete("vm", keepDisks: false)
        #expect(try library.names().isEmpty)
    }

    @Test("a VM defined before ACPI existed keeps its MP-table platform; new VMs get ACPI, reboot in place and a generation ID")
    func configurationsFromBeforeACPI() throws {
        let library = try temporaryLibrary()
        var request = CreateRequest(name: "old")
        request.withoutDisk = true
        let made = try library.create(request)
        #expect(made.acpi && made.onReboot == "restart")
        #expect(made.generationID?.count == 32 && made.generationID?.allSatisfy(\.isHexDigit) == true)
        let bundle = try library.bundle(named: "old")
        var object = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: bundle.configPath))) as? [String: Any] ?? [:]
        for key in ["acpi", "onReboot", "generationID"] { object[key] = nil }
        try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: bundle.configPath))
        let loaded = try bundle.load()
        #expect(!loaded.acpi)
        #expect(loaded.onReboot == "restart")
        #expect(loaded.generationID == nil)
        var bad = CreateRequest(name: "bad-policy")
        bad.withoutDisk = true
        bad.onReboot = "never"
        #expect { try library.create(bad) } throws: { error in
            // Named by the setting's JSON key; the CLI shows it as --on-reboot (FieldFlags).
            guard case let .invalidValue(field, reason) = error as? LibraryError else { return false }
            return field == "on_reboot" && reason == "'never' is not one of restart, exit"
        }
        #expect(try library.names() == ["old"])
    }

    @Test func invalidValuesCreateNothing() throws {
        let library = try temporaryLibrary()
        var request = CreateRequest(name: "bad")
        request.cpus = 0
        #expect(throws: LibraryError.self) { try library.create(request) }
        request.cpus = 1
        request.memoryBytes = 4097 << 20 + 1
        #expect(throws: LibraryError.self) { try library.create(request) }
        request.memoryBytes = nil
        request.vsockCID = 2
        #expect(throws: LibraryError.self) { try library.create(request) }
        request.vsockCID = nil
        request.osType = "beos"
        #expect(throws: LibraryError.self) { try library.create(request) }
        #expect(try library.names().isEmpty)
        #expect(!FileManager.default.fileExists(atPath: library.root + "/bad"))
    }

    @Test func updateIsAtomicAndValidated() throws {
        let library = try temporaryLibrary()
        var request = CreateRequest(name: "vm")
        request.withoutDisk = true
        _ = try library.create(request)
        let changed = try library.update("vm") { definition, _ in definition.cpus = 4 }
        #expect(changed.cpus == 4)
        #expect(throws: LibraryError.self) { _ = try library.update("vm") { definition, _ in definition.cpus = -1 } }
        #expect(try library.bundle(named: "vm").load().cpus == 4)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: library.root + "/vm").filter { $0.contains(".tmp") }
        #expect(leftovers.isEmpty)
    }

    @Test("a full clone reports how far through its disks' bytes it is, rising to 1, and copies them exactly")
    func cloneReportsProgress() throws {
        let library = try temporaryLibrary()
        defer { try? FileManager.default.removeItem(atPath: library.root) }
        var request = CreateRequest(name: "big")
        request.withoutDisk = true
        _ = try library.create(request)
        // 200 MiB of data with no holes: several of the copy's 64 MiB steps.
        let disk = library.root + "/big-disk.raw"
        var block = [UInt8](repeating: 0, count: 1 << 20)
        for index in block.indices { block[index] = UInt8(truncatingIfNeeded: index &* 31 &+ 7) }
        #expect(FileManager.default.createFile(atPath: disk, contents: nil))
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: disk))
        for _ in 0..<200 { handle.write(Data(block)) }
        try handle.close()
        _ = try library.attachDisk("big", path: disk, readOnly: false)
        var fractions: [Double] = []
        let clone = try library.clone("big", to: "copy", linked: false) { fractions.append($0) }
        #expect(fractions.count >= 4, "\(fractions)")
        #expect(fractions == fractions.sorted() && fractions.last == 1 && (fractions.first ?? 1) < 0.5, "\(fractions)")
        let copied = try library.bundle(named: "copy").resolve(try #require(clone.disks.first).path)
        #expect(FileManager.default.contentsEqual(atPath: disk, andPath: copied))
    }
}

@Suite struct NICQueueDefinitionTests {
    @Test("a card's queue pairs (nat,queues=2) are kept in the definition, by `set --nic` that keeps the card's MAC, and by a clone, which gives the card a new MAC; a user card with queues is refused")
    func queuePairsStay() throws {
        let library = try VMDefinitionTests().temporaryLibrary()
        defer { try? FileManager.default.removeItem(atPath: library.root) }
        var request = CreateRequest(name: "mq")
        request.withoutDisk = true
        request.networks = [try NetworkAttachment.parseCard("nat,queues=2", field: "--nic").card]
        let created = try library.create(request)
        #expect(created.networks.map(\.queues) == [2])
        #expect(try library.bundle(named: "mq").load().networks.map(\.queues) == [2], "not kept on disk")

        var change = ChangeRequest()
        change.networks = [try NetworkAttachment.parseCard("nat,queues=4", field: "--nic").card]
        let changed = try library.change("mq", change)
        #expect(changed.networks.map(\.queues) == [4])
        #expect(changed.networks.map(\.mac) == created.networks.map(\.mac), "the card's MAC was not kept")

        let clone = try library.clone("mq", to: "mq2", linked: false)
        #expect(clone.networks.map(\.queues) == [4])
        #expect(clone.networks.map(\.mac) != created.networks.map(\.mac))

        var refused = CreateRequest(name: "bad")
        refused.withoutDisk = true
        refused.networks = [try NetworkAttachment.parseCard("user,queues=2", field: "--nic").card]
        #expect(throws: LibraryError.self) { _ = try library.create(refused) }
    }
}

@Suite struct VMNameSocketRoomTests {
    @Test("a new VM's name leaves room for its sockets' paths (107 bytes), saying how long it may be")
    func socketPathsFit() throws {
        // 51 bytes: room for 107 - 51 - 1 - 17 = 38 (the longest socket is QEMU's vmm/console.sock).
        let root = "/" + String(repeating: "d", count: 50)
        try VMName.validate(String(repeating: "v", count: 38), in: root)
        #expect(throws: LibraryError.self) { try VMName.validate(String(repeating: "v", count: 39), in: root) }
        do {
            try VMName.validate(String(repeating: "v", count: 64), in: root)
            Issue.record("a 64-character name was accepted under \(root)")
        } catch {
            #expect(error.description.contains("at most 38 characters"), "\(error)")
        }
    }
}

@Suite struct JSONStyleTests {
    @Test("JSON names: Foundation's snake case, but an acronym's plural stays one word", arguments: [
        ("emulatorCPUs", "emulator_cpus"), ("vsockCID", "vsock_cid"), ("IPAddress", "ip_address"), ("generationID", "generation_id"),
        ("memoryLimitBytes", "memory_limit_bytes"), ("uuid", "uuid"), ("readIOPs", "read_iops"), ("l2Entries", "l2_entries"),
    ])
    func names(_ name: String, _ expected: String) {
        #expect(JSONStyle.snakeCase(name) == expected)
        // The byte path (ASCII names) and the Character path agree.
        #expect(JSONStyle.snakeCase(characters: Array(name)) == expected)
    }

    @Test("A name outside ASCII takes the same rule on Characters")
    func unicodeNames() {
        #expect(JSONStyle.snakeCase("größeBytes") == "größe_bytes")
        #expect(JSONStyle.snakeCase("ÄrgerID") == "ärger_id")
    }
}
