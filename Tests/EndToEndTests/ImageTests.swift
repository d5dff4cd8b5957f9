import Foundation
import Testing

/// The debian-12 image, built for real by `vireo image build` with its build cache in
/// ~/.cache/vireo/images (scripts/test.sh builds it before the suite, so a fresh machine builds
/// it once and later runs import the kept build, checksums verified).
enum DebianImage {
    static let cacheDirectory = FileManager.default.homeDirectoryForCurrentUser.appendingPathComponent(".cache/vireo/images").path

    /// Puts `debian-12` into `library` (outside any test namespace: a cold build fetches packages).
    static func install(into library: TestLibrary) throws {
        let built = library.vireo("image", "build", "debian-12", "--cache-dir", cacheDirectory, timeout: 2400)
        guard built.status == 0 else { throw HarnessError("vireo image build debian-12 failed (\(built.status)): \(built.stderr.suffix(3000))") }
    }

    static func manifest(in library: TestLibrary, name: String = "debian-12") throws -> [String: Any] {
        let data = try Data(contentsOf: library.root.appendingPathComponent("images/\(name)/manifest.json"))
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else { throw HarnessError("manifest is not an object") }
        return object
    }

    static func sha256(_ path: String) -> String {
        String(Harness.run(["sha256sum", path]).stdout.prefix(64))
    }

    static func fileSums(_ manifest: [String: Any]) -> [String: String] {
        var sums: [String: String] = [:]
        for file in manifest["files"] as? [[String: Any]] ?? [] {
            if let path = file["path"] as? String, let sum = file["sha256"] as? String { sums[path] = sum }
        }
        return sums
    }
}

@Suite(.serialized)
struct ImageTests {
    @Test("the built debian-12 image: a manifest with every package's version and every file's SHA-256, the image's own kernel and an initramfs with the virtio modules, a compressed qcow2 qemu-img accepts",
          .timeLimit(.minutes(45)))
    func builtImage() throws {
        let library = try TestLibrary()
        try DebianImage.install(into: library)
        let manifest = try DebianImage.manifest(in: library)
        let directory = library.root.appendingPathComponent("images/debian-12").path
        #expect(manifest["release"] as? String == "bookworm")
        #expect(manifest["cloudInit"] as? Bool == true && manifest["kvmEngineBootable"] as? Bool == true && manifest["efiBootable"] as? Bool == true)
        let packages = Dictionary((manifest["packages"] as? [[String: String]] ?? []).map { ($0["name"] ?? "", $0["version"] ?? "") }, uniquingKeysWith: { a, _ in a })
        for wanted in ["linux-image-amd64", "systemd-sysv", "openssh-server", "cloud-init", "initramfs-tools", "sudo", "qemu-guest-agent"] {
            #expect(!(packages[wanted] ?? "").isEmpty, "\(wanted) missing from the manifest's \(packages.count) packages")
        }
        let sums = DebianImage.fileSums(manifest)
        #expect(Set(sums.keys) == ["disk.qcow2", "vmlinuz", "initrd.img"])
        for (file, sum) in sums { #expect(DebianImage.sha256(directory + "/" + file) == sum, "\(file)") }
        let check = Harness.run(["qemu-img", "check", "--output=json", directory + "/disk.qcow2"])
        #expect(check.status == 0 && check.stdout.contains("\"check-errors\": 0") && !check.stdout.contains("corruptions"), "\(check.stdout)")
        #expect(check.stdout.contains("\"compressed-clusters\": ") && !check.stdout.contains("\"compressed-clusters\": 0,"), "\(check.stdout)")
        // The initramfs holds what both engines' devices need.
        let listing = Harness.run(["lsinitramfs", directory + "/initrd.img"], timeout: 120).stdout
        for module in ["virtio_mmio.ko", "virtio_blk.ko", "virtio_net.ko", "virtio_pci.ko", "ext4.ko"] {
            #expect(listing.contains(module), "\(module) not in the initramfs")
        }
        // The kernel and initramfs are the image's own: byte for byte the files in its /boot.
        let raw = try Harness.temporaryDirectory().appendingPathComponent("root.raw").path
        defer { try? FileManager.default.removeItem(atPath: raw) }
        #expect(Harness.run(["qemu-img", "convert", "-O", "raw", directory + "/disk.qcow2", raw], timeout: 300).status == 0)
        // A GPT: the EFI system partition (1 MiB to 64 MiB) and the root file system after it.
        let table = Harness.run(["sfdisk", "--dump", raw]).stdout
        #expect(table.contains("label: gpt") && table.contains("start=        2048, size=      129024, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
                && table.contains("start=      131072,"), "\(table)")
        // Debian's signed shim on the removable-media path, GRUB beside it, and its grub.cfg
        // finding the root file system by UUID.
        let efi = raw + "@@1M"
        let shim = raw + ".shim"
        #expect(Harness.run(["mcopy", "-n", "-i", efi, "::/EFI/BOOT/BOOTX64.EFI", shim]).status == 0)
        #expect(packages["shim-signed"] != nil && packages["grub-efi-amd64-signed"] != nil && packages["cloud-guest-utils"] != nil)
        let grubConfig = Harness.run(["mtype", "-i", efi, "::/EFI/BOOT/grub.cfg"]).stdout
        #expect(grubConfig.contains("search --no-floppy --fs-uuid --set=root ") && grubConfig.contains("linux /vmlinuz root=UUID="), "\(grubConfig)")
        #expect(Harness.run(["mdir", "-i", efi, "::/EFI/BOOT/grubx64.efi"]).status == 0)
        let shimSize = (try? FileManager.default.attributesOfItem(atPath: shim)[.size] as? Int) ?? 0
        #expect(shimSize > 500_000, "shim is \(shimSize) bytes")
        try? FileManager.default.removeItem(atPath: shim)
        let rootFileSystem = raw + "?offset=\(64 << 20)"
        let boot = Harness.run(["debugfs", "-R", "ls -p /boot", rootFileSystem]).stdout
        let version = boot.split(separator: "/").first { $0.hasPrefix("vmlinuz-") }.map { String($0.dropFirst("vmlinuz-".count)) } ?? "?"
        #expect(packages["linux-image-\(version)"] != nil, "kernel \(version); /boot: \(boot)")
        let extracted = raw + ".vmlinuz"
        let initrd = raw + ".initrd"
        Harness.run(["debugfs", "-R", "dump /boot/vmlinuz-\(version) \(extracted)", rootFileSystem])
        Harness.run(["debugfs", "-R", "dump /boot/initrd.img-\(version) \(initrd)", rootFileSystem])
        #expect(DebianImage.sha256(extracted) == sums["vmlinuz"])
        #expect(DebianImage.sha256(initrd) == sums["initrd.img"])
        let fstab = Harness.run(["debugfs", "-R", "cat /etc/fstab", rootFileSystem]).stdout
        #expect(fstab.contains("UUID=") && fstab.contains(" / ext4"), "\(fstab)")
        let listed = library.vireo("image", "list")
        #expect(listed.stdout.contains("debian-12") && listed.stdout.contains("kernel (kvm, qemu)"), "\(listed.stdout)")
        let info = library.vireo("image", "info", "debian-12", "--verify")
        #expect(info.status == 0 && info.stdout.contains("every file matches the manifest") && info.stdout.contains("linux-image-amd64"), "\(info.stdout)\(info.stderr)")
        #expect(info.stdout.contains("an EFI system partition with its boot loader: `--firmware uefi` boots through it"), "\(info.stdout)")
    }

    @Test("a Debian VM from the image on the qemu engine (TCG) in a NAT network (a card with two queue pairs the guest takes) and on user-mode networking: boots through UEFI with Secure Boot (Debian's signed shim, GRUB and kernel) to multi-user, cloud-init makes the user with both keys and the host name, `vireo ssh` runs commands and passes their status, `vireo exec` runs one through qemu-guest-agent without SSH (and the API), files go in and out through the API, `vireo list` shows the address the agent reports on the card Vireo leased nothing, `vireo cp` copies 20 MiB both ways, a TPM 2.0 the guest finds, whose PCRs a save and resume keep, a save and resume sets the guest's clock, `vireo stop` powers it off through ACPI, the overlay passes qemu-img check, and a second boot keeps the first one's files and mounts the shared folders added while stopped (ownership as documented, the read-only one at its own mount point refusing writes; save refused, a live snapshot disk-only with the guest's file systems frozen through the agent), and a guest ignoring the power button is stopped through its agent",
          .timeLimit(.minutes(40)))
    func debianOnQEMUEngine() throws {
        let lab = try NetworkLab()
        try DebianImage.install(into: lab.library)
        let work = try Harness.temporaryDirectory()
        let key = work.appendingPathComponent("id_test").path
        #expect(Harness.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key]).status == 0)
        // A folder to share, owned by uid 1000 as a user's project would be (docs/shared-folders.md).
        let project = work.appendingPathComponent("project").path
        let docs = work.appendingPathComponent("docs").path
        for directory in [project, docs] { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
        try Data("hello-from-host\n".utf8).write(to: URL(fileURLWithPath: project + "/from-host.txt"))
        try Data("readme\n".utf8).write(to: URL(fileURLWithPath: docs + "/readme.txt"))
        #expect(Harness.run(["chown", "-R", "1000:1000", project]).status == 0)
        // One vCPU: TCG then takes one host core, and the rest of the suite keeps the other.
        // --password reads one line from stdin when it is not a terminal.
        let created = Harness.run(["ip", "netns", "exec", lab.host, Harness.vireo, "create", "deb", "--image", "debian-12", "--engine", "qemu",
                                   "--accel", "tcg", "--cpus", "1", "--disk", "6G", "--user", "alice", "--ssh-key", key + ".pub",
                                   "--hostname", "bookworm-vm", "--password", "--nic", "nat,queues=2", "--nic", "user", "--tpm",
                                   "--firmware", "uefi", "--secure-boot"],
                                  stdin: Data("s3cret pass\n".utf8), environment: ["VIREO_HOME": lab.library.root.path])
        #expect(created.status == 0, "\(created.stderr)")
        #expect(created.stdout.contains("cloud-init: user alice (2 SSH keys, a password)"), "\(created.stdout)")
        let config = try String(contentsOf: lab.library.root.appendingPathComponent("deb/config.json"), encoding: .utf8)
        #expect(!config.contains("s3cret"), "only the hash is stored")
        // UEFI boots the image's own boot loader: no kernel is handed to the machine.
        #expect(!config.contains("\"kernel\"") && config.contains("\"secureBoot\" : true"), "\(config)")
        let storedHash = ((try JSONSerialization.jsonObject(with: Data(config.utf8)) as? [String: Any])?["cloudInit"] as? [String: Any])?["passwordHash"] as? String ?? ""
        #expect(storedHash.hasPrefix("$y$"), "\(storedHash)")
        let overlay = lab.library.root.appendingPathComponent("deb/disk0.qcow2").path
        let chain = Harness.run(["qemu-img", "info", "--backing-chain", overlay]).stdout
        #expect(chain.contains("images/debian-12/disk.qcow2") && chain.contains("virtual size: 6 GiB"), "\(chain)")
        // The image is protected while the VM rests on it.
        let refused = lab.vireo("image", "delete", "debian-12")
        #expect(refused.status == 2 && refused.stderr.contains("in use by VM(s) deb"), "\(refused.stderr)")

        lab.start("deb")
        // TCG takes whole cores; at the lowest priority it leaves the suite's emulated kernels
        // (which time out when starved) what they need, and only waits longer itself.
        Self.deprioritise(lab.library.root.appendingPathComponent("deb/vmm.pid"))
        let ssh = { (command: [String]) -> Harness.Completed in
            lab.vireo(arguments: ["ssh", "deb", "--timeout", "1200", "--"] + command, timeout: 1300)
        }
        let release = ssh(["cat", "/etc/os-release"])
        #expect(release.status == 0 && release.stdout.contains("VERSION_CODENAME=bookworm"),
                "status \(release.status): \(release.stdout) \(release.stderr); console: \(lab.library.consoleLog("deb").suffix(3000))")
        // Secure Boot, end to end: OVMF (Microsoft's keys enrolled) ran Debian's shim, shim ran
        // GRUB, and GRUB started the kernel (BOOT_IMAGE is GRUB's), which finds Secure Boot on in
        // the firmware's variable and locked itself down.
        let secureBoot = ssh(["od", "-An", "-tu1", "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c", ";",
                              "cat", "/sys/kernel/security/lockdown", "/proc/cmdline", ";", "sudo", "dmesg", "|", "grep", "-i", "secure.boot"])
        let sbLines = secureBoot.stdout.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
        #expect(sbLines.first?.split(separator: " ").last == "1", "SecureBoot variable: \(secureBoot.stdout) \(secureBoot.stderr)")
        #expect(secureBoot.stdout.contains("[integrity]") && secureBoot.stdout.contains("BOOT_IMAGE=/vmlinuz root=UUID=")
                && secureBoot.stdout.contains("Secure boot enabled"), "\(secureBoot.stdout) \(secureBoot.stderr)")
        #expect(lab.vireo("info", "deb").stdout.contains("on (OVMF's Secure Boot build, Microsoft's keys enrolled)"))
        let failed = ssh(["false"])
        #expect(failed.status == 1, "\(failed.status) \(failed.stderr)")
        let seven = ssh(["exit", "7"])
        #expect(seven.status == 7, "\(seven.stderr)")
        let state = ssh(["systemctl", "is-system-running", "--wait"])
        #expect(["running\n", "degraded\n"].contains(state.stdout), "\(state.stdout) \(ssh(["systemctl", "--failed", "--no-legend"]).stdout)")
        let identity = ssh(["id", ";", "hostname", ";", "sudo", "-n", "true", "&&", "echo", "sudo-ok", ";",
                            "df", "-B1M", "--output=size", "/", ";", "cloud-init", "status"])
        #expect(identity.stdout.contains("uid=1000(alice)") && identity.stdout.contains("(sudo)"), "\(identity.stdout)")
        #expect(identity.stdout.contains("bookworm-vm") && identity.stdout.contains("sudo-ok") && identity.stdout.contains("status: done"), "\(identity.stdout)")
        // cloud-init grew the file system to the overlay's 6 GiB.
        let sizeMiB = identity.stdout.split(separator: "\n").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }.first ?? 0
        #expect(sizeMiB > 5500, "root file system \(sizeMiB) MiB: \(identity.stdout)")
        // The account has exactly the password hash vireo made (yescrypt), not a locked one.
        let shadow = ssh(["sudo", "getent", "shadow", "alice"])
        #expect(shadow.stdout.split(separator: ":").dropFirst().first.map(String.init) == storedHash, "\(shadow.stdout)")
        // sshd was not restarted during the first boot (a restart would drop `vireo ssh` sessions
        // started once it first answered).
        let sshd = ssh(["sudo", "journalctl", "-b", "-u", "ssh", "--no-pager"])
        #expect(sshd.stdout.contains("Started ssh.service") && !sshd.stdout.contains("Stopping ssh.service"), "\(sshd.stdout)")
        // The user's own key works too, with plain ssh.
        let address = lab.listedAddresses()["deb"]?.first ?? ""
        let own = lab.inHost(["ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                              "alice@\(address)", "echo", "own-key"], timeout: 120)
        #expect(own.stdout.contains("own-key"), "\(address): \(own.stderr)")
        #expect(ssh(["sh", "-c", "'echo first-boot > ~/marker && sync'"]).status == 0)
        // `vireo exec`: the same guest through qemu-guest-agent on its virtio-serial port, no SSH:
        // stdout, stderr and the exit status come back; the file SSH wrote is there.
        let executed = lab.vireo(arguments: ["exec", "deb", "--", "/bin/sh", "-c", "cat /etc/hostname /home/alice/marker; echo to-stderr >&2; exit 3"], timeout: 300)
        #expect(executed.status == 3 && executed.stdout == "bookworm-vm\nfirst-boot\n" && executed.stderr.contains("to-stderr"),
                "\(executed.status) \(executed.stdout) \(executed.stderr)")
        let noCommand = lab.vireo("exec", "deb")
        #expect(noCommand.status != 0 && noCommand.stderr.contains("give it after --"), "\(noCommand.stderr)")
        // Card 1 is user-mode networking (passt), which Vireo leases nothing: the guest's agent
        // reports its address (passt gives the guest the host's own), and `vireo list` and
        // `vireo info` show it.
        var listedAddresses: [String] = []
        for _ in 0..<60 {
            listedAddresses = lab.listedAddresses()["deb"] ?? []
            if listedAddresses.count == 2 { break }
            sleep(2)
        }
        #expect(listedAddresses.count == 2 && listedAddresses.last == NetworkLab.hostAddress, "\(listedAddresses)")
        let described = lab.vireo("info", "deb").stdout
        #expect(described.contains("the guest reports \(NetworkLab.hostAddress)"), "\(described)")
        // The NAT card has two queue pairs: QEMU got the library's multiqueue tap as one
        // descriptor per queue, and the guest's virtio-net driver took VIRTIO_NET_F_MQ (bit 22
        // of the features it negotiated); the user card has one pair and no MQ.
        #expect(described.contains("2 queue pairs"), "\(described)")
        let cards = (((try JSONSerialization.jsonObject(with: Data(config.utf8)) as? [String: Any])?["networks"] as? [[String: Any]]) ?? []).compactMap { $0["mac"] as? String }
        let negotiated = lab.vireo(arguments: ["exec", "deb", "--", "/bin/sh", "-c",
                                               "for d in /sys/class/net/*; do [ -e $d/device/features ] && echo $(cat $d/address) $(cat $d/device/features); done; true"], timeout: 300)
        let featuresByMAC = Dictionary(negotiated.stdout.split(separator: "\n").compactMap { line -> (String, [Character])? in
            let words = line.split(separator: " ")
            return words.count == 2 ? (words[0].lowercased(), Array(words[1])) : nil
        }, uniquingKeysWith: { first, _ in first })
        #expect(cards.count == 2 && featuresByMAC.count == 2, "\(cards) \(negotiated.stdout) \(negotiated.stderr)")
        if cards.count == 2, let nat = featuresByMAC[cards[0].lowercased()], let user = featuresByMAC[cards[1].lowercased()], nat.count > 22, user.count > 22 {
            #expect(nat[22] == "1" && user[22] == "0", "NAT card \(String(nat)), user card \(String(user))")
        }
        // The same through the REST API (POST /api/vms/{name}/exec).
        let served = try Served(lab.library)
        let viaAPI = try served.api.request("POST", "/api/vms/deb/exec", json: ["command": ["/bin/sh", "-c", "echo api-out; echo api-err >&2; exit 4"]])
        #expect(viaAPI.status == 200 && viaAPI.object["exit_code"] as? Int == 4 && viaAPI.object["stdout"] as? String == "api-out\n"
                && viaAPI.object["stderr"] as? String == "api-err\n", "\(viaAPI.status) \(viaAPI.text)")
        // Files through the API (PUT and GET /api/vms/{name}/files?path=), the bytes in the body:
        // 3 MiB in and back byte for byte; a missing guest file and a relative path are 422s.
        let payload = (0..<(3 << 20)).map { _ in UInt8.random(in: 0...255) }
        let put = try served.api.request("PUT", "/api/vms/deb/files?path=/home/alice/api.bin", raw: payload, contentType: "application/octet-stream", timeout: 600)
        #expect(put.status == 201 && put.object["bytes"] as? Int == payload.count, "\(put.status) \(put.text)")
        let got = try served.api.request("GET", "/api/vms/deb/files?path=/home/alice/api.bin", timeout: 600)
        #expect(got.status == 200 && Array(got.body) == payload, "\(got.status) \(got.body.count) bytes")
        let absent = try served.api.request("GET", "/api/vms/deb/files?path=/nonexistent")
        #expect(absent.status == 422 && absent.text.contains("failed to open file '/nonexistent'"), "\(absent.status) \(absent.text)")
        let relativeAPI = try served.api.request("PUT", "/api/vms/deb/files?path=home/x", raw: [1, 2, 3], contentType: "application/octet-stream")
        #expect(relativeAPI.status == 422 && relativeAPI.object["field"] as? String == "path", "\(relativeAPI.status) \(relativeAPI.text)")
        // The agent's status: answering, with its version, in `vireo info` and the API's details.
        let details = try served.api.request("GET", "/api/vms/deb")
        let agent = details.object["guest_agent"] as? [String: Any] ?? [:]
        #expect(agent["answers"] as? Bool == true && (agent["version"] as? String ?? "").hasPrefix("7."), "\(details.text.prefix(600))")
        let agentLine = lab.vireo("info", "deb").stdout.split(separator: "\n").first { $0.hasPrefix("Guest agent:") } ?? ""
        #expect(agentLine.contains(" qemu-guest-agent 7.") && agentLine.hasSuffix("answers on its virtio-serial port org.qemu.guest_agent.0"), "\(agentLine)")
        let transfers = ((try? FileManager.default.contentsOfDirectory(atPath: lab.library.root.path)) ?? []).filter { $0.hasPrefix(".transfer-") }
        #expect(transfers.isEmpty, "the transfers' files stay behind: \(transfers)")
        served.kill()

        // `vireo cp` through the agent: 20 MiB in and out, byte for byte; refusals leave nothing.
        let big = work.appendingPathComponent("big").path
        let back = work.appendingPathComponent("back").path
        #expect(Harness.run(["dd", "if=/dev/urandom", "of=\(big)", "bs=1M", "count=20", "status=none"]).status == 0)
        let copiedIn = lab.vireo(arguments: ["cp", big, "deb:/home/alice/big"], timeout: 600)
        #expect(copiedIn.status == 0 && copiedIn.stdout.contains("copied 20971520 bytes"), "\(copiedIn.stdout) \(copiedIn.stderr)")
        let copiedOut = lab.vireo(arguments: ["cp", "deb:/home/alice/big", back], timeout: 600)
        #expect(copiedOut.status == 0 && Harness.run(["cmp", big, back]).status == 0, "\(copiedOut.stdout) \(copiedOut.stderr)")
        let missing = lab.vireo("cp", "deb:/nonexistent", work.appendingPathComponent("none").path)
        #expect(missing.status != 0 && missing.stderr.contains("the guest agent refused: failed to open file '/nonexistent'"), "\(missing.stderr)")
        #expect(!FileManager.default.fileExists(atPath: work.appendingPathComponent("none").path)
                && !FileManager.default.fileExists(atPath: work.appendingPathComponent("none.vireo-partial").path))
        let relative = lab.vireo("cp", big, "deb:home/big")
        #expect(relative.status != 0 && relative.stderr.contains("is not an absolute path in the guest"), "\(relative.stderr)")
        // The TPM 2.0 (swtpm): the guest's kernel finds it, and PCR 16 (the debug PCR) extended
        // by a raw TPM2_PCR_Extend is volatile state that must survive the save below.
        var extend: [UInt8] = [0x80, 0x02, 0, 0, 0, 0x41, 0, 0, 0x01, 0x82, 0, 0, 0, 0x10, 0, 0, 0, 0x09, 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0x0b]
        extend += [UInt8](repeating: 0x41, count: 32)
        let octal = extend.map { "\\" + String(repeating: "0", count: 3 - String($0, radix: 8).count) + String($0, radix: 8) }.joined()
        let tpm = lab.vireo(arguments: ["exec", "deb", "--", "/bin/sh", "-c",
                                        "cat /sys/class/tpm/tpm0/tpm_version_major && exec 3<>/dev/tpm0 && printf '\(octal)' >&3 && dd bs=64 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \\n' && echo && cat /sys/class/tpm/tpm0/pcr-sha256/16"],
                            timeout: 300)
        let tpmLines = tpm.stdout.split(separator: "\n").map(String.init)
        #expect(tpm.status == 0 && tpmLines.count == 3 && tpmLines[0] == "2" && tpmLines[1].hasPrefix("80020000001300000000"), "\(tpm.status) \(tpm.stdout) \(tpm.stderr)")
        let pcr16 = tpmLines.last ?? ""
        #expect(pcr16.count == 64 && pcr16 != String(repeating: "0", count: 64), "\(pcr16)")
        #expect(lab.vireo("info", "deb").stdout.contains("2.0 (swtpm; state in"), "\(lab.vireo("info", "deb").stdout)")
        // The TPM was manufactured with endorsement key certificates (swtpm_setup, signed by the
        // library's CA): TPM2_NV_ReadPublic of the RSA EK certificate's NV index 0x01c00002
        // succeeds (a TPM without one answers TPM_RC_HANDLE, 0x18b), and the index is the
        // certificate's size in the public area.
        let nvReadPublic: [UInt8] = [0x80, 0x01, 0, 0, 0, 0x0e, 0, 0, 0x01, 0x69, 0x01, 0xc0, 0, 0x02]
        let nvOctal = nvReadPublic.map { "\\" + String(repeating: "0", count: 3 - String($0, radix: 8).count) + String($0, radix: 8) }.joined()
        let ekCertificate = lab.vireo(arguments: ["exec", "deb", "--", "/bin/sh", "-c",
                                                  "exec 3<>/dev/tpm0 && printf '\(nvOctal)' >&3 && dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \\n'"],
                                      timeout: 300)
        let nvAnswer = ekCertificate.stdout
        #expect(ekCertificate.status == 0 && nvAnswer.hasPrefix("8001") && nvAnswer.dropFirst(12).hasPrefix("00000000") && nvAnswer.contains("01c00002"),
                "TPM2_NV_ReadPublic(0x01c00002): \(nvAnswer) \(ekCertificate.stderr)")
        #expect(FileManager.default.fileExists(atPath: lab.library.root.appendingPathComponent("tpm-ca/swtpm-localca-rootca-cert.pem").path))
        // A save and a resume 10 s later: the agent sets the guest's clock from the host's at
        // once (without it the guest's clock stands 10 s behind, where it was saved).
        let saved = lab.vireo("save", "deb", timeout: 600)
        #expect(saved.status == 0, "\(saved.stdout) \(saved.stderr)")
        sleep(10)
        lab.start("deb")
        Self.deprioritise(lab.library.root.appendingPathComponent("deb/vmm.pid"))
        let clock = lab.vireo(arguments: ["exec", "deb", "--", "/bin/date", "+%s.%N"], timeout: 300)
        let skew = abs((Double(clock.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0) - Date().timeIntervalSince1970)
        #expect(clock.status == 0 && skew < 2, "guest clock \(clock.stdout) is \(skew) s from the host's after the resume: \(clock.stderr)")
        let pcrAfter = lab.vireo(arguments: ["exec", "deb", "--", "/bin/cat", "/sys/class/tpm/tpm0/pcr-sha256/16"], timeout: 300)
        #expect(pcrAfter.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == pcr16, "the TPM's PCR 16 after the resume: \(pcrAfter.stdout) \(pcrAfter.stderr), before: \(pcr16)")

        let stopped = lab.vireo("stop", "deb", timeout: 600)
        #expect(stopped.status == 0, "\(stopped.stdout) \(stopped.stderr)")
        #expect(!stopped.stdout.contains("forced") && !stopped.stderr.contains("forced"), "\(stopped.stdout) \(stopped.stderr)")
        #expect(lab.vireo("list").stdout.contains("stopped"))
        #expect(lab.library.consoleLog("deb").contains("reboot: Power down"), "\(lab.library.consoleLog("deb").suffix(2000))")
        let checked = Harness.run(["qemu-img", "check", overlay])
        #expect(checked.status == 0, "\(checked.stdout) \(checked.stderr)")
        // Shares added while stopped (docs/shared-folders.md) are mounted at the next boot at
        // /mnt/TAG or their own mount point by the seed's bootcmd, which reads them from SMBIOS at
        // every boot.
        let addedProject = lab.vireo("share", "add", "deb", project, "--tag", "proj")
        #expect(addedProject.status == 0 && addedProject.stdout.contains("mounts it at /mnt/proj when it next boots"), "\(addedProject.stdout) \(addedProject.stderr)")
        // The read-only one at a mount point of its own (--mount-point).
        let added = lab.vireo("share", "add", "deb", docs, "--readonly", "--mount-point", "/srv/docs")
        #expect(added.status == 0 && added.stdout.contains("shares \(docs) as 'docs', read-only") && added.stdout.contains("mounts it at /srv/docs when it next boots"),
                "\(added.stdout) \(added.stderr)")

        lab.start("deb")
        Self.deprioritise(lab.library.root.appendingPathComponent("deb/vmm.pid"))
        let marker = ssh(["cat", "marker"])
        #expect(marker.stdout == "first-boot\n", "\(marker.status) \(marker.stdout) \(marker.stderr)")
        // Read-only in the server's mount, not only in the guest's: a guest that mounts it again
        // read-write still cannot write.
        let readOnly = lab.vireo(arguments: ["exec", "deb", "--", "/bin/sh", "-c",
                                             "cat /srv/docs/readme.txt; umount /srv/docs && mount -t virtiofs docs /srv/docs && touch /srv/docs/new"], timeout: 300)
        #expect(readOnly.status != 0 && readOnly.stdout == "readme\n" && readOnly.stderr.contains("Read-only file system"), "\(readOnly.status) \(readOnly.stdout) \(readOnly.stderr)")
        #expect((try? FileManager.default.contentsOfDirectory(atPath: docs)) == ["readme.txt"])
        // The shared folder (virtio-fs): mounted at /mnt/proj. The guest
        // reads the host's file; what its root writes belongs on the host to the server's
        // unprivileged uid, what its user writes to the directory's owner; no device nodes.
        let sharing = lab.vireo(arguments: ["exec", "deb", "--", "/bin/sh", "-c",
                                            "cat /mnt/proj/from-host.txt && echo root-wrote > /mnt/proj/by-root && chmod u+s /mnt/proj/by-root && su alice -c 'echo alice-wrote > /mnt/proj/by-alice' && stat -c %u /mnt/proj/from-host.txt && ! mknod /mnt/proj/node c 1 3"],
                                timeout: 300)
        #expect(sharing.status == 0 && sharing.stdout == "hello-from-host\n1000\n", "\(sharing.status) \(sharing.stdout) \(sharing.stderr)")
        let owner = { (path: String) -> UInt32 in
            ((try? FileManager.default.attributesOfItem(atPath: path))?[.ownerAccountID] as? NSNumber)?.uint32Value ?? 0
        }
        #expect((try? String(contentsOfFile: project + "/by-root", encoding: .utf8)) == "root-wrote\n")
        #expect(owner(project + "/by-root") >= 2_130_706_432, "guest root's file is owned by uid \(owner(project + "/by-root")) on the host")
        #expect((try? String(contentsOfFile: project + "/by-alice", encoding: .utf8)) == "alice-wrote\n" && owner(project + "/by-alice") == 1000)
        #expect(!FileManager.default.fileExists(atPath: project + "/node"))
        let uuid = ((try JSONSerialization.jsonObject(with: Data(contentsOf: lab.library.root.appendingPathComponent("deb/config.json"))) as? [String: Any])?["uuid"] as? String) ?? "?"
        let server = Harness.run(["pgrep", "-o", "-f", "source=/run/vireo-shares/\(uuid)/proj"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let uidMap = (try? String(contentsOfFile: "/proc/\(server)/uid_map", encoding: .utf8)) ?? ""
        let mapped = uidMap.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        #expect(mapped.count == 2 && mapped[0].first == "0" && (UInt32(mapped[0][1]) ?? 0) >= 2_130_706_432 && mapped[1] == ["1000", "1000", "1"], "virtiofsd \(server): \(uidMap)")
        // QEMU cannot save virtio-fs: `vireo save` says so and the VM runs on; a live snapshot
        // moves the disks and holds no memory, saying why.
        let save = lab.vireo("save", "deb")
        #expect(save.status != 0 && save.stderr.contains("over virtio-fs, whose state QEMU cannot save"), "\(save.stderr)")
        let snapshot = lab.vireo("snapshot", "take", "deb", "with-share")
        #expect(snapshot.status == 0 && (snapshot.stdout + snapshot.stderr).contains("QEMU cannot save the state of its shared folders")
                && snapshot.stderr.contains("file system(s) were frozen for the switch, so the disks are consistent"), "\(snapshot.stdout) \(snapshot.stderr)")
        // The agent froze the guest's file systems around the disk switch, as its journal says.
        let journal = lab.vireo(arguments: ["exec", "deb", "--", "/bin/journalctl", "-b", "-u", "qemu-guest-agent", "--no-pager"], timeout: 300)
        #expect(journal.stdout.contains("guest-fsfreeze called"), "\(journal.stdout.suffix(1500))")
        #expect(lab.vireo("list").stdout.contains("running"))
        // A guest that ignores the power button is shut down through its agent after a third of
        // `vireo stop`'s time.
        let ignoring = lab.vireo(arguments: ["exec", "deb", "--", "/bin/sh", "-c",
                                             "nohup systemd-inhibit --what=handle-power-key --mode=block sleep 100000 >/dev/null 2>&1 & sleep 2; systemd-inhibit --list --no-pager | grep -c handle-power-key"],
                                 timeout: 300)
        #expect(ignoring.status == 0 && ignoring.stdout == "1\n", "\(ignoring.stdout) \(ignoring.stderr)")
        let agentStop = lab.vireo(arguments: ["stop", "deb", "--timeout", "90"], timeout: 300)
        #expect(agentStop.status == 0 && agentStop.stdout.contains("shut down (through its guest agent"), "\(agentStop.status) \(agentStop.stdout) \(agentStop.stderr)")
        #expect(lab.vireo("delete", "deb").status == 0)
        #expect(lab.vireo("image", "delete", "debian-12").status == 0)
        #expect(!FileManager.default.fileExists(atPath: lab.library.root.appendingPathComponent("images/debian-12").path))
    }

    @Test("import and export: Vireo archives (checksums verified), qcow2 and raw disks with the kernel taken out of the root file system, a GPT disk without a kernel boots through firmware; truncated, tampered and foreign files are refused with the reason and leave nothing",
          .timeLimit(.minutes(30)))
    func importAndExport() throws {
        let library = try TestLibrary()
        try DebianImage.install(into: library)
        let work = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: work) }
        let sums = DebianImage.fileSums(try DebianImage.manifest(in: library))
        let images = { Set(((try? FileManager.default.contentsOfDirectory(atPath: library.root.appendingPathComponent("images").path)) ?? []).filter { !$0.hasPrefix(".") }) }

        // A qcow2 export imports as a direct-boot image with the same kernel and initramfs.
        let qcow2 = work.appendingPathComponent("debian.qcow2").path
        #expect(library.vireo("image", "export", "debian-12", qcow2, timeout: 600).status == 0)
        let imported = library.vireo("image", "import", qcow2, "--name", "from-qcow2", timeout: 900)
        #expect(imported.status == 0 && imported.stdout.contains("kernel (kvm, qemu)"), "\(imported.stdout) \(imported.stderr)")
        let fromQcow2 = DebianImage.fileSums(try DebianImage.manifest(in: library, name: "from-qcow2"))
        #expect(fromQcow2["vmlinuz"] == sums["vmlinuz"] && fromQcow2["initrd.img"] == sums["initrd.img"])
        let info = library.vireo("image", "info", "from-qcow2").stdout
        #expect(info.contains("yes: `vireo create --image` attaches a NoCloud seed") && info.contains("Debian GNU/Linux 12 (bookworm)"), "\(info)")

        // An archive round trip, and a tampered one.
        let archive = work.appendingPathComponent("debian.tar").path
        #expect(library.vireo("image", "export", "debian-12", archive, timeout: 600).status == 0)
        #expect(library.vireo("image", "import", archive, "--name", "from-archive", timeout: 600).status == 0)
        let unpacked = work.appendingPathComponent("unpacked")
        try FileManager.default.createDirectory(at: unpacked, withIntermediateDirectories: true)
        #expect(Harness.run(["tar", "-xf", archive, "-C", unpacked.path]).status == 0)
        let handle = try FileHandle(forWritingTo: unpacked.appendingPathComponent("vmlinuz"))
        try handle.seek(toOffset: 4096)
        try handle.write(contentsOf: Data([0x90, 0x90]))
        try handle.close()
        let tampered = work.appendingPathComponent("tampered.tar").path
        #expect(Harness.run(["tar", "-cf", tampered, "-C", unpacked.path, "manifest.json", "disk.qcow2", "vmlinuz", "initrd.img"], timeout: 300).status == 0)
        let truncatedArchive = work.appendingPathComponent("truncated.tar").path
        #expect(Harness.run(["sh", "-c", "head -c 100000000 '\(archive)' > '\(truncatedArchive)'"], timeout: 120).status == 0)
        let truncatedQcow2 = work.appendingPathComponent("truncated.qcow2").path
        #expect(Harness.run(["sh", "-c", "head -c 150000000 '\(qcow2)' > '\(truncatedQcow2)'"], timeout: 120).status == 0)

        // A GPT disk: an EFI system partition and an ext4 root with the image's kernel in /boot;
        // then one without a kernel, which can only boot through firmware.
        let tree = work.appendingPathComponent("tree")
        try FileManager.default.createDirectory(at: tree.appendingPathComponent("boot"), withIntermediateDirectories: true)
        let imageDirectory = library.root.appendingPathComponent("images/debian-12").path
        try FileManager.default.copyItem(atPath: imageDirectory + "/vmlinuz", toPath: tree.appendingPathComponent("boot/vmlinuz-6.1.0-99-amd64").path)
        try FileManager.default.copyItem(atPath: imageDirectory + "/initrd.img", toPath: tree.appendingPathComponent("boot/initrd.img-6.1.0-99-amd64").path)
        let gpt = work.appendingPathComponent("gpt.raw").path
        #expect(Self.makeGPTDisk(gpt, root: tree.path), "making the GPT disk failed")
        let gptImport = library.vireo("image", "import", gpt, "--name", "gpt", timeout: 600)
        // Its initramfs has virtio_mmio, so the kvm engine can boot it too.
        #expect(gptImport.status == 0 && gptImport.stdout.contains("kernel (kvm, qemu)"), "\(gptImport.stdout) \(gptImport.stderr)")
        #expect(gptImport.stderr.contains("GPT with 2 partition(s)") && gptImport.stderr.contains("found kernel 6.1.0-99-amd64"), "\(gptImport.stderr)")
        #expect(DebianImage.fileSums(try DebianImage.manifest(in: library, name: "gpt"))["vmlinuz"] == sums["vmlinuz"])
        // Its EFI system partition holds no boot loader, and an imported disk's contents are not
        // taken for one: Secure Boot would refuse the kernel handed over directly, so it is
        // refused at create, naming why.
        #expect(try DebianImage.manifest(in: library, name: "gpt")["efiBootable"] == nil)
        let secureBoot = library.vireo("create", "sb", "--image", "gpt", "--firmware", "uefi", "--secure-boot")
        #expect(secureBoot.status == 2 && secureBoot.stderr.contains("--secure-boot: image 'gpt' boots by handing its kernel to the machine directly"), "\(secureBoot.stderr)")
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("sb").path))
        try FileManager.default.removeItem(at: tree.appendingPathComponent("boot"))
        try FileManager.default.createDirectory(at: tree.appendingPathComponent("etc"), withIntermediateDirectories: true)
        let firmwareDisk = work.appendingPathComponent("firmware.raw").path
        #expect(Self.makeGPTDisk(firmwareDisk, root: tree.path))
        let firmwareImport = library.vireo("image", "import", firmwareDisk, "--name", "firmware-only", timeout: 600)
        #expect(firmwareImport.status == 0 && firmwareImport.stdout.contains("firmware (uefi, qemu)"), "\(firmwareImport.stdout) \(firmwareImport.stderr)")
        let engineRefused = library.vireo("create", "fw", "--image", "firmware-only", "--engine", "kvm")
        #expect(engineRefused.status == 2 && engineRefused.stderr.contains("boots through firmware"), "\(engineRefused.stderr)")
        let firmwareVM = library.vireo("create", "fw", "--image", "firmware-only", "--json")
        #expect(firmwareVM.status == 0 && firmwareVM.stdout.contains("\"engine\" : \"qemu\"") && firmwareVM.stdout.contains("\"firmware\" : \"uefi\""), "\(firmwareVM.stdout) \(firmwareVM.stderr)")
        #expect(library.vireo("delete", "fw").status == 0)
        let truncatedGPT = work.appendingPathComponent("truncated-gpt.raw").path
        #expect(Harness.run(["sh", "-c", "head -c 40000000 '\(gpt)' > '\(truncatedGPT)'"]).status == 0)

        let text = work.appendingPathComponent("notes.txt").path
        try Data("not a disk\n".utf8).write(to: URL(fileURLWithPath: text))
        let vmdk = work.appendingPathComponent("disk.vmdk").path
        try Data("KDMV".utf8 + [UInt8](repeating: 0, count: 2048)).write(to: URL(fileURLWithPath: vmdk))
        let before = images()
        let refusals: [([String], String)] = [
            (["image", "import", tampered, "--name", "t1"], "does not match its manifest"),
            (["image", "import", truncatedArchive, "--name", "t2"], "is not a complete image archive"),
            (["image", "import", truncatedQcow2, "--name", "t3"], "is damaged or truncated: qemu-img check found"),
            (["image", "import", truncatedGPT, "--name", "t4"], "is truncated: its backup GPT header reaches byte 100663296, but the image holds only 40000000 bytes"),
            (["image", "import", text, "--name", "t5"], "is neither a qcow2 image nor a raw disk image"),
            (["image", "import", vmdk, "--name", "t6"], "is a VMDK disk"),
            (["image", "import", qcow2, "--name", "debian-12"], "--name: an image named 'debian-12' already exists"),
        ]
        for (arguments, message) in refusals {
            let result = library.vireo(arguments: arguments, timeout: 600)
            #expect(result.status == 2 && result.stderr.contains(message), "\(arguments): \(result.status) \(result.stderr)")
        }
        #expect(images() == before, "\(images()) vs \(before)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: library.root.appendingPathComponent("images").path)) ?? []).allSatisfy { !$0.hasPrefix(".importing") })

        // An installed image whose file changed is refused when a VM would be made from it.
        let kernelPath = library.root.appendingPathComponent("images/from-archive/vmlinuz").path
        chmod(kernelPath, 0o644)
        let damage = try FileHandle(forWritingTo: URL(fileURLWithPath: kernelPath))
        try damage.seek(toOffset: 8192)
        try damage.write(contentsOf: Data([0xcc]))
        try damage.close()
        let damaged = library.vireo("create", "d", "--image", "from-archive")
        #expect(damaged.status == 1 && damaged.stderr.contains("does not match the manifest"), "\(damaged.status) \(damaged.stderr)")
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("d").path))
        for name in ["from-qcow2", "from-archive", "gpt", "firmware-only"] { #expect(library.vireo("image", "delete", name).status == 0) }
    }

    /// Lowest CPU priority for the VM's process (every thread of it).
    static func deprioritise(_ pidFile: URL) {
        guard let text = try? String(contentsOf: pidFile, encoding: .utf8), let pid = Int32(text.split(separator: "\n").first ?? "") else { return }
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        for task in tasks { Harness.run(["renice", "-n", "19", "-p", task]) }
    }

    /// A sparse 96 MiB raw disk with a GPT: a 16 MiB EFI system partition and an ext4 root
    /// made from `root` (mke2fs -d with an offset: no loop device).
    static func makeGPTDisk(_ path: String, root: String) -> Bool {
        let layout = "label: gpt\nstart=2048, size=32768, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nstart=34816, size=159744, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
        let steps: [[String]] = [
            ["truncate", "-s", "96M", path],
            ["sh", "-c", "printf '\(layout.replacingOccurrences(of: "\n", with: "\\n"))' | sfdisk -q '\(path)'"],
            ["mkfs.ext4", "-q", "-F", "-E", "offset=\(34816 * 512)", "-d", root, path, "\(159744 / 2)k"],
        ]
        return steps.allSatisfy { Harness.run($0).status == 0 }
    }

    @Test("bad image input is refused before anything is made, naming the field")
    func badInput() throws {
        let library = try TestLibrary()
        let work = try Harness.temporaryDirectory()
        let key = work.appendingPathComponent("id_test").path
        #expect(Harness.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key]).status == 0)
        let notAKey = work.appendingPathComponent("notakey.pub").path
        try Data("ssh-ed25519 bm90IGEga2V5 me@host\n".utf8).write(to: URL(fileURLWithPath: notAKey))
        // A tiny stand-in image, so the checks run without building Debian.
        let disk = work.appendingPathComponent("tiny.raw").path
        let tree = work.appendingPathComponent("tree")
        try FileManager.default.createDirectory(at: tree.appendingPathComponent("usr/bin"), withIntermediateDirectories: true)
        try Data("#!/bin/sh\n".utf8).write(to: tree.appendingPathComponent("usr/bin/cloud-init"))
        #expect(Harness.run(["mkfs.ext4", "-q", "-F", "-d", tree.path, disk, "16M"]).status == 0)
        #expect(library.vireo("image", "import", disk, "--name", "tiny").status == 0)
        let cases: [([String], String)] = [
            (["create", "v", "--image", "nosuch"], "--image: no image named 'nosuch'"),
            (["create", "v", "--image", "tiny", "--disk", "8M"], "--disk: 8 MiB is smaller than image 'tiny''s disk (16 MiB)"),
            (["create", "v", "--image", "tiny", "--ssh-key", key], "--ssh-key: \(key) is a private key; give the public one"),
            (["create", "v", "--image", "tiny", "--ssh-key", notAKey], "does not hold a ssh-ed25519 key"),
            (["create", "v", "--image", "tiny", "--ssh-key", work.appendingPathComponent("missing.pub").path], "does not exist"),
            (["create", "v", "--image", "tiny", "--user", "Alice"], "--user: 'Alice' is not allowed"),
            (["create", "v", "--image", "tiny", "--user", "root"], "--user: 'root' is an account Debian's base system already has"),
            (["create", "v", "--image", "tiny", "--user", "1st"], "--user: '1st' is not allowed"),
            (["create", "v", "--image", "tiny", "--hostname", "bad_host"], "--hostname: 'bad_host' is not a host name"),
            (["create", "v", "--image", "tiny", "--iso", disk], "--iso: cannot be combined with --image"),
            (["create", "v", "--image", "tiny", "--no-disk"], "--no-disk: cannot be combined with --image"),
            (["create", "v", "--no-disk", "--user", "bob"], "cloud-init settings are for VMs made from an image"),
            (["create", "v", "--no-disk", "--full"], "--full: copies an image's disk"),
            (["image", "build", "debian-12", "--size", "512M"], "--size: 512 MiB is smaller than the 1 GiB a debian-12 image needs"),
            (["image", "build", "fedora-40"], "'fedora-40' is not one Vireo can build; choose one of debian-12"),
            (["image", "build", "debian-12", "--packages", "Bad_Name"], "--packages: 'Bad_Name' is not a Debian package name"),
            (["image", "build", "debian-12", "--mirror", "ftp://example"], "--mirror: 'ftp://example' is not a Debian mirror URL"),
            (["image", "build", "debian-12", "--name", "tiny"], "--name: an image named 'tiny' already exists"),
            (["image", "info", "nosuch"], "no image named 'nosuch'"),
            (["image", "delete", "nosuch"], "no image named 'nosuch'"),
            (["image", "export", "tiny", disk], "already exists; give a new file name"),
            (["ssh", "nosuch"], "no VM named 'nosuch'"),
        ]
        for (arguments, message) in cases {
            let result = library.vireo(arguments: arguments)
            #expect(result.status == 2, "\(arguments): \(result.status) \(result.stderr)")
            #expect(result.stderr.contains(message), "\(arguments): \(result.stderr)")
        }
        #expect(library.vireo("list").stdout.contains("No VMs") || !library.vireo("list").stdout.contains(" v "), "\(library.vireo("list").stdout)")
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("v").path))
        // A VM from the tiny image has a seed; ssh to a stopped VM says so.
        #expect(library.vireo("create", "v", "--image", "tiny", "--engine", "qemu").status == 0)
        let seed = Harness.run(["xorriso", "-indev", library.root.appendingPathComponent("v/seed.iso").path, "-pvd_info"]).stdout
        #expect(seed.contains("Volume Id    : cidata"), "\(seed)")
        let stopped = library.vireo("ssh", "v")
        #expect(stopped.status == 2 && stopped.stderr.contains("cannot log in to VM 'v': it is stopped"), "\(stopped.stderr)")
        let inUse = library.vireo("image", "delete", "tiny")
        #expect(inUse.status == 2 && inUse.stderr.contains("in use by VM(s) v"), "\(inUse.stderr)")
        // A clone is a new cloud-init instance with its own seed.
        #expect(library.vireo("clone", "v", "v2").status == 0)
        let clone = library.vireo("info", "v2", "--json").stdout
        #expect(clone.contains("\"hostname\" : \"v2\""), "\(clone)")
        let cloneSeed = library.root.appendingPathComponent("v2/seed.iso").path
        #expect(FileManager.default.fileExists(atPath: cloneSeed))
        #expect(DebianImage.sha256(cloneSeed) != DebianImage.sha256(library.root.appendingPathComponent("v/seed.iso").path))
        // --full: the VM's own copy, grown, no backing file; the image is not held by it.
        #expect(library.vireo("create", "v3", "--image", "tiny", "--full", "--disk", "64M", "--engine", "qemu").status == 0)
        let copy = Harness.run(["qemu-img", "info", library.root.appendingPathComponent("v3/disk0.qcow2").path]).stdout
        #expect(copy.contains("virtual size: 64 MiB") && !copy.contains("backing file"), "\(copy)")
        #expect(library.vireo("delete", "v2").status == 0 && library.vireo("delete", "v").status == 0)
        #expect(library.vireo("image", "delete", "tiny").status == 0)
        let kept = Harness.run(["qemu-img", "check", library.root.appendingPathComponent("v3/disk0.qcow2").path])
        #expect(kept.status == 0, "\(kept.stdout)")
        #expect(library.vireo("delete", "v3").status == 0)
    }
}

/// The kvm engine's image test boots the emulated test kernel, so it runs in LinuxKernelTests'
/// serialised line: two emulated kernels at once on these 2-core hosts starve each other.
extension LinuxKernelTests {
    @Test("the kvm engine path: a VM from the image boots the image's kernel by reference (checksums match), and the ACPI test kernel, finding the disk through ACPI, mounts the image's root file system from the VM's overlay and runs its /sbin/init",
          .timeLimit(.minutes(25)))
    func kvmEngineMountsImageRoot() throws {
        let library = try TestLibrary()
        try DebianImage.install(into: library)
        let created = library.vireo("create", "k", "--image", "debian-12", "--memory", "512M", "--cpus", "1", "--no-balloon", "--no-rng", "--json")
        #expect(created.status == 0, "\(created.stderr)")
        let definition = (try? JSONSerialization.jsonObject(with: Data(created.stdout.utf8)) as? [String: Any]) ?? [:]
        #expect(definition["engine"] as? String == "kvm", "\(created.stdout)")
        let imageDirectory = library.root.appendingPathComponent("images/debian-12").path
        #expect(definition["kernel"] as? String == imageDirectory + "/vmlinuz" && definition["initrd"] as? String == imageDirectory + "/initrd.img", "\(created.stdout)")
        #expect((definition["command_line"] as? String ?? "").contains("root=UUID="), "\(created.stdout)")
        let sums = DebianImage.fileSums(try DebianImage.manifest(in: library))
        #expect(DebianImage.sha256(imageDirectory + "/vmlinuz") == sums["vmlinuz"])
        // This host cannot run the Debian kernel's kernel mode (see the ACPI issue): the ACPI
        // test kernel stands in, with the image's root file system from the VM's overlay.
        let kernel = try LinuxKernelTests.acpiKernelDirectory.get().appendingPathComponent("vmlinux").path
        let set = library.vireo("set", "k", "--kernel", kernel, "--no-initrd", "--on-reboot", "exit",
                                "--cmdline", "console=ttyS0 \(try LinuxKernelTests.acpiEmulatorSafeOptions()) root=/dev/vda2 ro rootfstype=ext4 panic=1 reboot=acpi")
        #expect(set.status == 0, "\(set.stderr)")
        #expect(library.vireo("start", "k").status == 0)
        // Off means stopped (the panic's reboot with --on-reboot exit) or crashed: a crash fails at
        // once with the VMM's log instead of waiting out the time-out.
        #expect(library.waitFor(1200) { ["stopped", "crashed"].contains(library.state("k") ?? "") })
        #expect(library.state("k") == "stopped", "\(library.vmmLog("k"))\n\(library.consoleLog("k").suffix(3000))")
        let console = library.consoleLog("k")
        #expect(!console.contains("virtio_mmio.device="), "the disk must be found through ACPI")
        // The overlay's 20 GiB (the OS type's default disk), not the image's 4 GiB.
        #expect(console.contains("virtio_blk virtio0: [vda] 41943040 512-byte logical blocks"), "\(console.suffix(3000))")
        // The image's GPT: the root file system is its second partition.
        #expect(console.contains(" vda: vda1 vda2"), "\(console.suffix(3000))")
        #expect(console.contains("EXT4-fs (vda2): mounted filesystem"), "\(console.suffix(3000))")
        #expect(console.contains("VFS: Mounted root (ext4 filesystem) readonly on device 254:2."), "\(console.suffix(3000))")
        #expect(console.contains("Run /sbin/init as init process"), "\(console.suffix(3000))")
        let checked = Harness.run(["qemu-img", "check", library.root.appendingPathComponent("k/disk0.qcow2").path])
        #expect(checked.status == 0, "\(checked.stdout)")
    }
}
