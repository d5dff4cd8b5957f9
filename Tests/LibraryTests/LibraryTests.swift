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
        #expect(made.engine == "kvm")
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
}
