import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

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

    @Test("a new TPM is manufactured by root with its EK certificates (the library's CA made), a state already there is left alone, and a link planted in the state directory (by the jailed uid that owns it) is never written through by root")
    func manufacturing() throws {
        let library = try TestLibrary()
        let probe = try Harness.probe("pvh")
        let work = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: work) }
        for name in ["fresh", "planted"] {
            let created = library.vireo("create", name, "--accel", "tcg", "--kernel", probe, "--memory", "64M", "--no-disk", "--no-nic", "--tpm",
                                        "--cmdline", "console=ttyS0 probe=ticker")
            #expect(created.status == 0, "\(created.stderr)")
        }
        // What swtpm's uid (which owns the state directory once a TPM ran) could leave there after
        // deleting the state: a link where swtpm keeps its lock file, to where root must not write.
        let target = work.appendingPathComponent("written-by-root").path
        let plantedState = library.root.appendingPathComponent("planted/tpm")
        try FileManager.default.createDirectory(at: plantedState, withIntermediateDirectories: true)
        #expect(symlink(target, plantedState.appendingPathComponent(".lock").path) == 0)
        _ = library.vireo("start", "planted")
        _ = library.vireo("stop", "planted", "--force")
        #expect(!FileManager.default.fileExists(atPath: target), "root wrote a TPM state through the planted link")

        let started = library.vireo("start", "fresh")
        #expect(started.status == 0, "\(started.stderr)")
        let state = library.root.appendingPathComponent("fresh/tpm/tpm2-00.permall").path
        let made = (try? FileManager.default.attributesOfItem(atPath: state)[.size] as? Int) ?? 0
        #expect(made > 4000, "the manufactured state is \(made) bytes")
        #expect(FileManager.default.fileExists(atPath: library.root.appendingPathComponent("tpm-ca/swtpm-localca-rootca-cert.pem").path))
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("fresh/.tpm-manufacture").path))
        _ = library.vireo("stop", "fresh", "--force")
        let before = try Data(contentsOf: URL(fileURLWithPath: state))
        #expect(library.vireo("start", "fresh").status == 0)
        _ = library.vireo("stop", "fresh", "--force")
        #expect(try Data(contentsOf: URL(fileURLWithPath: state)).count == before.count, "a second start keeps the TPM it has")
    }

    /// QMP's answers to `commands` (each `[name, arguments-or-null]`), from the running VM's socket.
    static func qmp(_ library: TestLibrary, _ name: String, _ commands: [[Any]]) throws -> [[String: Any]] {
        let script = """
            import json, socket, sys
            s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
            def run(name, arguments):
                f.write(json.dumps({"execute": name, **({"arguments": arguments} if arguments else {})}) + "\\n"); f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply: return reply
            f.readline(); run("qmp_capabilities", None)
            print(json.dumps([run(n, a) for n, a in json.loads(sys.argv[2])]))
            """
        let list = String(decoding: try JSONSerialization.data(withJSONObject: commands.map { [$0[0], $0.count > 1 ? $0[1] : NSNull()] }), as: UTF8.self)
        let result = Harness.run(["python3", "-c", script, library.root.appendingPathComponent("\(name)/vmm/qmp.sock").path, list], timeout: 30)
        guard result.status == 0, let replies = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: Any]] else {
            throw HarnessError("QMP: \(result.stdout) \(result.stderr)")
        }
        return replies
    }

    @Test("Windows 11 as its installer needs it: `--ostype windows11-64` is a qemu VM with UEFI, Secure Boot, a TPM 2.0, SATA, an e1000e and Hyper-V enlightenments; under TCG QEMU's CPU carries them (QMP); this host's KVM, which lacks them, starts the VM without them and says so; --no-tpm and --no-hyperv are honoured; the kvm engine refuses Windows by name")
    func windows11Machine() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "w11", "--ostype", "windows11-64", "--accel", "tcg", "--memory", "512M", "--disk", "1G", "--no-nic")
        #expect(created.status == 0, "\(created.stderr)")
        let info = library.vireo("info", "w11").stdout
        for text in ["qemu", "uefi", "SATA (AHCI), e1000e network", "TPM:", "Secure Boot:", "Hyper-V:"] {
            #expect(info.contains(text), "\(text) missing: \(info)")
        }
        #expect(library.vireo("start", "w11").status == 0)
        let replies = try Self.qmp(library, "w11", [["query-cpus-fast"], ["query-tpm"]])
        let cpu = ((replies[0]["return"] as? [[String: Any]])?.first?["qom-path"] as? String) ?? "/machine/unattached/device[0]"
        let flags = try Self.qmp(library, "w11", [["qom-get", ["path": cpu, "property": "hv-relaxed"]], ["qom-get", ["path": cpu, "property": "hv-stimer"]]])
        #expect(flags.allSatisfy { $0["return"] as? Bool == true }, "\(flags)")
        let tpms = replies[1]["return"] as? [[String: Any]]
        #expect(tpms?.first?["model"] as? String == "tpm-crb", "\(replies[1])")
        #expect(library.vireo("stop", "w11", "--force").status == 0)

        // This host's KVM has no Hyper-V MSRs: the VM starts without the enlightenments and says so.
        // (Nor has it SMM, which Secure Boot's OVMF needs: QEMU refuses "System Management Mode
        // not supported by this hypervisor", so Secure Boot is off for this part.)
        #expect(library.vireo("set", "w11", "--accel", "kvm", "--no-secure-boot").status == 0)
        let onKVM = library.vireo("start", "w11")
        #expect(onKVM.status == 0, "\(onKVM.stderr)")
        let cpuKVM = (((try Self.qmp(library, "w11", [["query-cpus-fast"]]))[0]["return"] as? [[String: Any]])?.first?["qom-path"] as? String) ?? cpu
        let relaxed = try Self.qmp(library, "w11", [["qom-get", ["path": cpuKVM, "property": "hv-relaxed"]]])[0]["return"] as? Bool
        if onKVM.stderr.contains("cannot give VM 'w11' Hyper-V enlightenments") {
            #expect(relaxed == false, "warned, yet the CPU has them")
        } else {
            #expect(relaxed == true, "no warning, yet the CPU lacks them: \(onKVM.stderr)")
        }
        #expect(library.vireo("stop", "w11", "--force").status == 0)

        let plain = library.vireo("create", "w11b", "--ostype", "windows11-64", "--no-tpm", "--no-hyperv", "--no-secure-boot", "--disk", "1G", "--no-nic")
        #expect(plain.status == 0, "\(plain.stderr)")
        let plainInfo = library.vireo("info", "w11b").stdout
        #expect(!plainInfo.contains("TPM:") && !plainInfo.contains("Hyper-V:") && !plainInfo.contains("Secure Boot:"), "\(plainInfo)")
        let kvm = library.vireo("create", "wk", "--ostype", "windows10-64", "--engine", "kvm", "--no-disk")
        #expect(kvm.status != 0 && kvm.stderr.contains("Windows boots through UEFI firmware"), "\(kvm.stderr)")
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("wk").path))
    }
}
