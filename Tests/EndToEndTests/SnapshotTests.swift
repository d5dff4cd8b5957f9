import Foundation
import Testing

/// `vireo snapshot` (docs/snapshots.md), with qemu-img as the oracle for what the disks hold and
/// whether every image in the chain is sound.
@Suite(.serialized)
struct SnapshotTests {
    static func definition(_ library: TestLibrary, _ name: String) throws -> [String: Any] {
        let data = try Data(contentsOf: library.root.appendingPathComponent(name).appendingPathComponent("config.json"))
        return try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    /// The VM's first disk as the VM sees it now (the top of its chain).
    static func activeDisk(_ library: TestLibrary, _ name: String) throws -> String {
        let disks = try #require(try definition(library, name)["disks"] as? [[String: Any]])
        let path = try #require(disks.first?["path"] as? String)
        return library.root.appendingPathComponent(name).appendingPathComponent(path).path
    }

    static func write(_ pattern: UInt8, at offset: Int, length: Int, to image: String) {
        let result = Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P \(pattern) \(offset) \(length)", image])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    /// A flat copy of what the chain ending in `image` holds, to compare with later.
    static func reference(_ image: String, _ directory: URL, _ name: String) -> String {
        let path = directory.appendingPathComponent(name + ".raw").path
        let result = Harness.run(["qemu-img", "convert", "-O", "raw", image, path])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        return path
    }

    static func same(_ image: String, _ reference: String) -> Bool {
        Harness.run(["qemu-img", "compare", "-q", image, reference]).status == 0
    }

    /// Every image in the VM's directory passes `qemu-img check`.
    static func allClean(_ library: TestLibrary, _ name: String) throws {
        let directory = library.root.appendingPathComponent(name)
        for file in try FileManager.default.contentsOfDirectory(atPath: directory.path) where file.hasSuffix(".qcow2") {
            let checked = Harness.run(["qemu-img", "check", directory.appendingPathComponent(file).path])
            #expect(checked.status == 0, "\(file): \(checked.stdout)\(checked.stderr)")
        }
    }

    @Test("disk snapshots of a stopped VM: take A, write, take B, write; restore A and B give exactly their disks; the tree shows where the VM is; deleting A and then B merges their layers and leaves the disk as it was, every image clean under qemu-img check")
    func diskSnapshotTree() throws {
        let library = try TestLibrary()
        let scratch = try Harness.temporaryDirectory()
        try library.createProbe("tree", command: "probe=hello", extra: ["--disk", "16M"])
        Self.write(0x11, at: 0, length: 1 << 20, to: try Self.activeDisk(library, "tree"))

        let takeA = library.vireo("snapshot", "take", "tree", "A", "--description", "first")
        #expect(takeA.status == 0 && takeA.stdout.contains("Took snapshot 'A' of VM 'tree' (disks only)"), "\(takeA.stdout)\(takeA.stderr)")
        let referenceA = Self.reference(try Self.activeDisk(library, "tree"), scratch, "A")
        Self.write(0x22, at: 512 << 10, length: 1 << 20, to: try Self.activeDisk(library, "tree"))
        #expect(library.vireo("snapshot", "take", "tree", "B").status == 0)
        let referenceB = Self.reference(try Self.activeDisk(library, "tree"), scratch, "B")
        #expect(!Self.same(referenceA, referenceB))
        Self.write(0x33, at: 4 << 20, length: 4096, to: try Self.activeDisk(library, "tree"))

        let listed = library.vireo("snapshot", "list", "tree")
        let lines = listed.stdout.split(separator: "\n").map(String.init)
        #expect(lines.count == 4 && lines[1].hasPrefix("A  ") && lines[1].hasSuffix("first") && lines[2].hasPrefix("  B  ") && lines[3] == "    * current state",
                "\(listed.stdout)")

        let described = library.vireo("info", "tree").stdout
        #expect(described.contains("Snapshots:") && described.contains(" 2, current: B (`vireo snapshot list tree`)"), "\(described)")
        let restoreA = library.vireo("snapshot", "restore", "tree", "A")
        #expect(restoreA.status == 0, "\(restoreA.stderr)")
        #expect(Self.same(try Self.activeDisk(library, "tree"), referenceA), "restoring A did not give A's disk")
        let json = library.vireo("snapshot", "list", "tree", "--json")
        let tree = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
        let snapshots = try #require(tree["snapshots"] as? [[String: Any]])
        let idA = snapshots.first { $0["name"] as? String == "A" }?["id"] as? String
        #expect(tree["current"] as? String == idA && idA != nil, "\(json.stdout)")
        Self.write(0x44, at: 0, length: 4096, to: try Self.activeDisk(library, "tree"))
        #expect(library.vireo("snapshot", "restore", "tree", "B").status == 0)
        #expect(Self.same(try Self.activeDisk(library, "tree"), referenceB), "restoring B did not give B's disk")
        try Self.allClean(library, "tree")
        // A full clone holds the layers' data itself: it rests on nothing in the original's directory.
        let cloned = library.vireo("clone", "tree", "sprout")
        #expect(cloned.status == 0, "\(cloned.stderr)")
        let sprout = try Self.activeDisk(library, "sprout")
        #expect(Self.same(sprout, referenceB), "the clone's disk differs")
        #expect(!Harness.run(["qemu-img", "info", sprout]).stdout.contains("backing file"))
        #expect(library.vireo("delete", "sprout").status == 0)

        // A has one state resting on it (B): its layer merges into B's.
        let deleteA = library.vireo("snapshot", "delete", "tree", "A")
        #expect(deleteA.status == 0, "\(deleteA.stderr)")
        #expect(Self.same(try Self.activeDisk(library, "tree"), referenceB), "deleting A changed the disk")
        try Self.allClean(library, "tree")
        // B has the current state resting on it: its layer merges into the VM's disk.
        #expect(library.vireo("snapshot", "delete", "tree", "B").status == 0)
        #expect(Self.same(try Self.activeDisk(library, "tree"), referenceB), "deleting B changed the disk")
        try Self.allClean(library, "tree")
        let empty = library.vireo("snapshot", "list", "tree")
        #expect(empty.stdout.contains("has no snapshots"), "\(empty.stdout)")
        // One image is left: the VM's own disk, standing alone.
        let images = try FileManager.default.contentsOfDirectory(atPath: library.root.appendingPathComponent("tree").path).filter { $0.hasSuffix(".qcow2") }
        #expect(images.count == 1, "\(images)")
        let info = Harness.run(["qemu-img", "info", try Self.activeDisk(library, "tree")])
        #expect(!info.stdout.contains("backing file"), "\(info.stdout)")
        // And the VM still boots from it.
        #expect(library.vireo("start", "tree").status == 0)
        #expect(library.waitFor(30) { library.consoleLog("tree").contains("hello from the probe") })
    }

    @Test("bad snapshot requests are refused with the reason and change nothing: unknown names, duplicates, a restore or delete of a running VM, a snapshot two states rest on, a writable raw disk")
    func refusals() throws {
        let library = try TestLibrary()
        try library.createProbe("snap", command: "probe=dirty spin=2000000", extra: ["--disk", "16M"])
        let config = try Self.definition(library, "snap")
        let missing = library.vireo("snapshot", "restore", "snap", "nope")
        #expect(missing.status == 2 && missing.stderr.contains("has no snapshot 'nope'") && missing.stderr.contains("vireo snapshot take snap"), "\(missing.stderr)")
        #expect(library.vireo("snapshot", "take", "snap", "one").status == 0)
        let duplicate = library.vireo("snapshot", "take", "snap", "one")
        #expect(duplicate.status == 2 && duplicate.stderr.contains("already has a snapshot named 'one'"), "\(duplicate.stderr)")
        let badName = library.vireo("snapshot", "take", "snap", "-x/")
        #expect(badName.status != 0, "\(badName.stderr)")
        #expect(library.vireo("snapshot", "take", "snap", "two").status == 0)
        #expect(library.vireo("snapshot", "restore", "snap", "one").status == 0)
        #expect(library.vireo("snapshot", "take", "snap", "three").status == 0)
        // "one" now has two snapshots resting on it.
        let busy = library.vireo("snapshot", "delete", "snap", "one")
        #expect(busy.status == 2 && busy.stderr.contains("has 2 states resting on it (two, three)"), "\(busy.stderr)")

        #expect(library.vireo("start", "snap").status == 0)
        let running = library.vireo("snapshot", "restore", "snap", "two")
        #expect(running.status != 0 && running.stderr.contains("running"), "\(running.stderr)")
        let runningDelete = library.vireo("snapshot", "delete", "snap", "two")
        #expect(runningDelete.status != 0 && runningDelete.stderr.contains("running"), "\(runningDelete.stderr)")
        #expect(library.vireo("stop", "snap", "--force").status == 0)

        let rawPath = try Harness.temporaryDirectory().appendingPathComponent("flat.raw").path
        #expect(Harness.run(["qemu-img", "create", "-q", "-f", "raw", rawPath, "16M"]).status == 0)
        let raw = library.vireo("create", "flat", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--attach-disk", rawPath)
        #expect(raw.status == 0, "\(raw.stderr)")
        let refused = library.vireo("snapshot", "take", "flat")
        #expect(refused.status == 2 && refused.stderr.contains("writable raw disk"), "\(refused.stderr)")
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("flat/snapshots/tree.json").path))
        // Nothing the refusals touched changed the first VM's settings beyond its snapshots.
        #expect((try Self.definition(library, "snap"))["cpus"] as? Int == config["cpus"] as? Int)
    }

    @Test("a live snapshot with memory: the guest pauses only while it is written and runs on; later, restoring it leaves the VM saved and start resumes the guest at the snapshot's moment (its rounds and memory sums go on from there) as a new generation, on the snapshot's disk")
    func liveSnapshotWithMemory() throws {
        let library = try TestLibrary()
        try library.createProbe("live", command: "probe=dirty spin=2000000", extra: ["--disk", "16M"])
        #expect(library.vireo("start", "live").status == 0)
        #expect(library.waitFor(30) { SavedStateTests.rounds(library.consoleLog("live")).count >= 10 })
        let before = try #require(SavedStateTests.rounds(library.consoleLog("live")).last)
        let taken = library.vireo("snapshot", "take", "live", "moment", timeout: 120)
        #expect(taken.status == 0 && taken.stdout.contains("with its memory"), "\(taken.stdout)\(taken.stderr)")
        let after = try #require(SavedStateTests.rounds(library.consoleLog("live")).last)
        #expect(library.state("live") == "running")
        #expect(library.vmmLog("live").contains("snapshot ") && library.vmmLog("live").contains("taken; the guest was paused"), "\(library.vmmLog("live"))")
        // It runs on past the snapshot.
        #expect(library.waitFor(30) { (SavedStateTests.rounds(library.consoleLog("live")).last ?? 0) >= after + 20 })
        #expect(library.vireo("stop", "live", "--force").status == 0)
        let disk = try Self.activeDisk(library, "live")
        #expect(disk.hasSuffix(".qcow2") && !disk.hasSuffix("/disk0.qcow2"), "the disk did not move to an overlay: \(disk)")
        try Self.allClean(library, "live")

        let restored = library.vireo("snapshot", "restore", "live", "moment")
        #expect(restored.status == 0 && restored.stdout.contains("resumes it there"), "\(restored.stdout)\(restored.stderr)")
        #expect(library.state("live") == "saved")
        #expect(library.vireo("start", "live").status == 0)
        #expect(library.waitFor(30) { SavedStateTests.rounds(library.consoleLog("live")).count >= 5 })
        let resumed = try #require(SavedStateTests.rounds(library.consoleLog("live")).first)
        #expect(resumed > before && resumed <= after + 2, "resumed at round \(resumed); the snapshot was taken between rounds \(before) and \(after)")
        #expect(!library.consoleLog("live").contains("MISMATCH"), "\(library.consoleLog("live").suffix(400))")
        #expect(library.vmmLog("live").contains("VM generation ID changed on restore"), "\(library.vmmLog("live"))")
        #expect(library.vireo("stop", "live", "--force").status == 0)
        try Self.allClean(library, "live")
    }
}
