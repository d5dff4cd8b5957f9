import Foundation
import Testing

/// `vireo disk` end to end, with qemu-img as the judge of what it writes.
@Suite struct DiskCommandTests {
    func vireo(_ arguments: [String]) -> Harness.Completed { Harness.run([Harness.vireo, "disk"] + arguments, timeout: 60) }

    @Test func createInfoResizeAndRefusals() throws {
        let directory = try Harness.temporaryDirectory()
        let base = directory.appendingPathComponent("base.qcow2").path
        let created = vireo(["create", base, "--size", "2G"])
        #expect(created.status == 0, "\(created.stderr)")
        #expect(created.stdout.contains("created \(base): qcow2, 2 GiB"))
        let overlay = directory.appendingPathComponent("overlay.qcow2").path
        #expect(vireo(["create", overlay, "--backing", "base.qcow2"]).status == 0)
        let check = Harness.run(["qemu-img", "check", overlay])
        #expect(check.status == 0 && check.stdout.contains("No errors were found"), "\(check.stdout)")

        let info = vireo(["info", "--json", overlay])
        #expect(info.status == 0)
        let decoded = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any]
        #expect(decoded?["format"] as? String == "qcow2")
        #expect(decoded?["virtualSize"] as? Int == 2 << 30)
        #expect(decoded?["backingChain"] as? [String] == [base])

        #expect(vireo(["resize", base, "--size", "3G"]).status == 0)
        #expect(Harness.run(["qemu-img", "info", base]).stdout.contains("virtual size: 3 GiB"))

        let again = vireo(["create", base, "--size", "1G"])
        #expect(again.status == 2)
        #expect(again.stderr.contains("\(base) already exists; refusing to overwrite it"))
        let shrink = vireo(["resize", base, "--size", "1G"])
        #expect(shrink.status == 2)
        #expect(shrink.stderr.contains("--size: shrinking would destroy data"))
        let badFormat = vireo(["create", directory.appendingPathComponent("x").path, "--size", "1G", "--format", "vdi"])
        #expect(badFormat.stderr.contains("--format: 'vdi' is not one of qcow2, raw"))
        let noSize = vireo(["create", directory.appendingPathComponent("y").path])
        #expect(noSize.stderr.contains("--size: missing"))
        #expect(!FileManager.default.fileExists(atPath: directory.appendingPathComponent("y").path))
        #expect(Harness.run(["qemu-img", "check", base]).status == 0)
        let missing = vireo(["info", directory.appendingPathComponent("absent.qcow2").path])
        #expect(missing.status == 2)
        #expect(missing.stderr.contains("absent.qcow2: open failed: No such file or directory"))
    }

    @Test func rawSparseAndPreallocated() throws {
        let directory = try Harness.temporaryDirectory()
        let thin = directory.appendingPathComponent("thin.raw").path
        #expect(vireo(["create", thin, "--size", "1G", "--format", "raw"]).status == 0)
        let info = vireo(["info", thin])
        #expect(info.stdout.contains("format:        raw"))
        #expect(info.stdout.contains("virtual size:  1 GiB"))
        let full = directory.appendingPathComponent("full.raw").path
        #expect(vireo(["create", full, "--size", "8M", "--format", "raw", "--preallocate"]).status == 0)
        #expect(vireo(["info", full]).stdout.contains("allocated:     8 MiB"))
    }
}
