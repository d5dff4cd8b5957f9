import Foundation
import Testing

@Suite(.serialized) struct TPMTests {
    @Test("a TPM without a boot: `vireo create --tpm` picks the qemu engine and `vireo info` shows the state directory; `vireo set --no-tpm` keeps the state; a clone gets no copy of it (its own TPM at its first start); a kvm-engine VM refuses one by name, changing nothing")
    func tpmSettings() throws {
        let library = try TestLibrary()
        let probe = try Harness.probe("pvh")
        let created = library.vireo("create", "t", "--accel", "tcg", "--kernel", probe, "--memory", "128M", "--no-disk", "--no-nic", "--tpm")
        #expect(created.status == 0, "\(created.stderr)")
        let info = library.vireo("info", "t").stdout
        #expect(info.contains("Engine:") && info.contains("qemu") && info.contains("2.0 (swtpm; state in \(library.root.path)/t/tpm)"), "\(info)")
        // The state swtpm would have made at a first start.
        let state = library.root.appendingPathComponent("t/tpm")
        try FileManager.default.createDirectory(at: state, withIntermediateDirectories: true)
        try Data("seeds".utf8).write(to: state.appendingPathComponent("tpm2-00.permall"))
        #expect(library.vireo("clone", "t", "u").status == 0)
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("u/tpm").path), "a clone's TPM is its own")
        #expect(library.vireo("info", "u").stdout.contains("TPM:"))
        let removed = library.vireo("set", "t", "--no-tpm")
        #expect(removed.status == 0 && !library.vireo("info", "t").stdout.contains("TPM:"), "\(removed.stderr)")
        #expect(FileManager.default.fileExists(atPath: state.appendingPathComponent("tpm2-00.permall").path), "--no-tpm keeps the state")
        #expect(library.vireo("create", "k", "--engine", "kvm", "--kernel", probe, "--no-disk", "--no-nic").status == 0)
        let config = library.root.appendingPathComponent("k/config.json")
        let before = try Data(contentsOf: config)
        let refused = library.vireo("set", "k", "--tpm")
        #expect(refused.status != 0 && refused.stderr.contains("the kvm engine has no TPM device"), "\(refused.stderr)")
        #expect(try Data(contentsOf: config) == before)
        let refusedCreate = library.vireo("create", "k2", "--engine", "kvm", "--kernel", probe, "--no-disk", "--no-nic", "--tpm")
        #expect(refusedCreate.status != 0 && refusedCreate.stderr.contains("the kvm engine has no TPM device"), "\(refusedCreate.stderr)")
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("k2").path))
    }

    @Test("Secure Boot without a boot: `--secure-boot` gives a UEFI VM the variable store with Microsoft's keys, `vireo info` says so, `--no-secure-boot` starts it again from the empty store; BIOS and kvm-engine VMs refuse it, changing nothing")
    func secureBootSettings() throws {
        let library = try TestLibrary()
        let probe = try Harness.probe("pvh")
        let created = library.vireo("create", "sb", "--engine", "qemu", "--accel", "tcg", "--kernel", probe, "--firmware", "uefi", "--memory", "128M",
                                    "--no-disk", "--no-nic", "--secure-boot")
        #expect(created.status == 0, "\(created.stderr)")
        let nvram = library.root.appendingPathComponent("sb/nvram.fd")
        #expect(try Data(contentsOf: nvram) == (try Data(contentsOf: URL(fileURLWithPath: "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"))))
        #expect(library.vireo("info", "sb").stdout.contains("on (OVMF's Secure Boot build, Microsoft's keys enrolled)"))
        let off = library.vireo("set", "sb", "--no-secure-boot")
        #expect(off.status == 0, "\(off.stderr)")
        #expect(try Data(contentsOf: nvram) == (try Data(contentsOf: URL(fileURLWithPath: "/usr/share/OVMF/OVMF_VARS_4M.fd"))))
        #expect(!library.vireo("info", "sb").stdout.contains("Secure Boot:"))
        let bios = library.vireo("create", "b", "--engine", "qemu", "--accel", "tcg", "--kernel", probe, "--firmware", "bios", "--no-disk", "--no-nic", "--secure-boot")
        #expect(bios.status != 0 && bios.stderr.contains("Secure Boot is UEFI's; give --firmware uefi"), "\(bios.stderr)")
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("b").path))
        #expect(library.vireo("create", "k", "--engine", "kvm", "--kernel", probe, "--no-disk", "--no-nic").status == 0)
        let before = try Data(contentsOf: library.root.appendingPathComponent("k/config.json"))
        let kvm = library.vireo("set", "k", "--secure-boot")
        #expect(kvm.status != 0 && kvm.stderr.contains("without firmware to enforce Secure Boot"), "\(kvm.stderr)")
        #expect(try Data(contentsOf: library.root.appendingPathComponent("k/config.json")) == before)
    }
}
