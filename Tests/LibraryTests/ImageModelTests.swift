import Foundation
import Testing
@testable import Engines
@testable import Library

struct ImageModelTests {
    @Test func userNamesFollowDebiansRule() throws {
        for good in ["debian", "alice", "a", "dev-ops", "x_1", String(repeating: "a", count: 32)] {
            try CloudInitSettings.validate(user: good)
        }
        for bad in ["", "Alice", "1st", "-x", "a b", "émile", String(repeating: "a", count: 33), "root", "sshd", "systemd-network", "www-data"] {
            #expect(throws: LibraryError.self, "\(bad)") { try CloudInitSettings.validate(user: bad) }
        }
    }

    @Test func hostNames() throws {
        for good in ["deb", "web-1", "a.example.org", String(repeating: "h", count: 63)] { try CloudInitSettings.validate(hostname: good) }
        for bad in ["", "-x", "x-", "bad_host", "a..b", String(repeating: "h", count: 64), "émile"] {
            #expect(throws: LibraryError.self, "\(bad)") { try CloudInitSettings.validate(hostname: bad) }
        }
        #expect(CloudInitSettings.hostname(forVM: "my_vm.1") == "my-vm-1")
        #expect(CloudInitSettings.hostname(forVM: "web-") == "web")
        #expect(CloudInitSettings.hostname(forVM: String(repeating: "v", count: 64)) == nil)
    }

    @Test func publicKeys() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-keys-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        // A blob that names its type, as ssh-keygen writes: uint32 length, "ssh-ed25519", key.
        var blob = Data([0, 0, 0, 11]) + Data("ssh-ed25519".utf8) + Data([0, 0, 0, 32]) + Data(repeating: 7, count: 32)
        let line = "ssh-ed25519 \(blob.base64EncodedString()) me@host"
        let good = directory.appendingPathComponent("good.pub")
        try Data("# a comment\n\n\(line)\n".utf8).write(to: good)
        #expect(try SSHPublicKey.read(file: good.path) == [line])
        blob = Data([0, 0, 0, 7]) + Data("ssh-rsa".utf8)
        let cases: [(String, String)] = [
            ("ssh-ed25519 \(blob.base64EncodedString())", "does not hold a ssh-ed25519 key"),
            ("ssh-ed25519 !!!notbase64", "not valid base64"),
            ("ssh-foo AAAA", "is not an OpenSSH public key"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn==\n-----END OPENSSH PRIVATE KEY-----", "is a private key"),
            ("", "holds no public key"),
        ]
        for (index, (text, message)) in cases.enumerated() {
            let file = directory.appendingPathComponent("bad\(index).pub")
            try Data(text.utf8).write(to: file)
            do {
                _ = try SSHPublicKey.read(file: file.path)
                Issue.record("\(text) was accepted")
            } catch {
                #expect(error.description.contains(message), "\(error)")
            }
        }
    }

    @Test func seedDocuments() throws {
        let settings = CloudInitSettings(user: "alice", authorizedKeys: ["ssh-ed25519 AAAA k1", "ssh-rsa BBBB \"quoted\": k2"],
                                         passwordHash: nil, hostname: "web", instanceID: "1234")
        let userData = CloudInitSeed.userData(settings)
        #expect(userData.hasPrefix("#cloud-config\n"))
        // JSON (so YAML) that carries the keys exactly, quotes and colons included.
        let object = try JSONSerialization.jsonObject(with: Data(userData.dropFirst("#cloud-config\n".count).utf8)) as? [String: Any]
        let user = (object?["users"] as? [[String: Any]])?.first
        #expect(user?["name"] as? String == "alice" && user?["lock_passwd"] as? Bool == true && user?["passwd"] == nil)
        #expect(user?["ssh_authorized_keys"] as? [String] == settings.authorizedKeys)
        #expect(object?["ssh_pwauth"] == nil, "setting it restarts sshd during the first boot")
        let meta = try JSONSerialization.jsonObject(with: Data(CloudInitSeed.metaData(settings).utf8)) as? [String: String]
        #expect(meta == ["instance-id": "1234", "local-hostname": "web"])
        let network = try JSONSerialization.jsonObject(with: Data(CloudInitSeed.networkConfig(macs: ["52:54:00:AA:00:01", "52:54:00:aa:00:02"]).utf8)) as? [String: Any]
        let ethernets = network?["ethernets"] as? [String: [String: Any]]
        #expect(network?["version"] as? Int == 2)
        #expect((ethernets?["eth0"]?["match"] as? [String: String])?["macaddress"] == "52:54:00:aa:00:01")
        #expect(ethernets?["eth0"]?["set-name"] as? String == "eth0" && ethernets?["eth0"]?["optional"] == nil)
        #expect(ethernets?["eth1"]?["optional"] as? Bool == true && ethernets?["eth1"]?["dhcp4"] as? Bool == true)
    }

    @Test func passwordsAreHashedWithYescrypt() throws {
        let hash = try CloudInitSettings.hashPassword("correct horse")
        #expect(hash.hasPrefix("$y$") && !hash.contains("correct"))
        #expect(try CloudInitSettings.hashPassword("correct horse") != hash, "a fresh salt each time")
        #expect(throws: LibraryError.self) { try CloudInitSettings.hashPassword("") }
        #expect(throws: LibraryError.self) { try CloudInitSettings.hashPassword("two\nlines") }
    }

    @Test func recipes() throws {
        let plain = try ImageRecipe(distribution: "debian-12")
        #expect(plain.sizeBytes == 4 << 30 && plain.packages.contains("cloud-init") && plain.packages.contains("linux-image-amd64"))
        #expect(try ImageRecipe(distribution: "debian-12").key == plain.key, "stable")
        #expect(try ImageRecipe(distribution: "debian-12", extraPackages: ["vim"]).key != plain.key)
        #expect(try ImageRecipe(distribution: "debian-12", size: 8 << 30).key != plain.key)
        #expect(try ImageRecipe(distribution: "debian-12", mirror: "http://mirror.local/debian").key != plain.key)
        #expect(try ImageRecipe(distribution: "debian-12", extraPackages: ["sudo"]).packages == plain.packages, "no duplicates")
        #expect(throws: LibraryError.self) { try ImageRecipe(distribution: "debian-12", size: 100 << 20) }
        #expect(throws: LibraryError.self) { try ImageRecipe(distribution: "debian-12", extraPackages: ["a"]) }
        #expect(throws: LibraryError.self) { try ImageRecipe(distribution: "debian-12", mirror: "deb.debian.org") }
        #expect(BootFiles.versionOrder("vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-10-amd64"))
    }

    @Test func manifestsNameOnlyFilesInTheirDirectory() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-manifest-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        var manifest = ImageManifest(name: "x", description: "d", origin: "build", osType: "debian-64", disk: "disk.qcow2", virtualSize: 1 << 30)
        manifest.files = [ImageFile(path: "disk.qcow2", size: 1, sha256: String(repeating: "0", count: 64))]
        for (disk, kernel, message) in [("../../etc/passwd", nil, "not a plain file name"), ("disk.qcow2", "/boot/vmlinuz", "not a plain file name"),
                                        ("disk.qcow2", "vmlinuz", "has no checksum for vmlinuz")] as [(String, String?, String)] {
            var bad = manifest
            bad.disk = disk
            bad.kernel = kernel
            let path = directory.appendingPathComponent("manifest.json")
            try JSONEncoder().encode(bad).write(to: path)
            do {
                _ = try ImageStore.readManifest(path.path)
                Issue.record("\(disk) \(kernel ?? "") accepted")
            } catch {
                #expect(error.description.contains(message), "\(error)")
            }
        }
    }

    @Test func mountPointsAreUnescaped() {
        #expect(HostMounts.unescapeMountField("/tmp/a\\040b") == "/tmp/a b")
        #expect(HostMounts.unescapeMountField("/x\\134y\\011") == "/x\\y\t")
        #expect(HostMounts.unescapeMountField("/plain") == "/plain")
    }
}

/// The guest's mount script (cloud-init's bootcmd) run on the host against made-up SMBIOS entries
/// and a kernel command line, with `mount`, `mountpoint` and `mkdir` standing in as scripts that
/// say what they were asked.
struct MountScriptTests {
    @Test("the mount script mounts each listed share at /mnt/TAG or its own mount point, read-only where marked, from SMBIOS (qemu engine) and the command line (kvm engine), and ignores anything else")
    func mountScriptReadsBothListings() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-mount-\(UUID().uuidString.prefix(8))")
        let bin = directory.appendingPathComponent("bin")
        try FileManager.default.createDirectory(at: directory.appendingPathComponent("11-0"), withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: bin, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        // A type 11 structure: a header, then NUL-separated strings (as /sys/firmware/dmi shows it).
        let strings = ["vireo.share=abc", "vireo.share=docs:ro", "vireo.share=web:ro@/srv/web-docs", "vireo.share=bad;rm@/x", "other=1"]
        try Data([0x0b, 0x05, 0x10, 0x00, 0x05] + strings.flatMap { Array($0.utf8) + [0] } + [0]).write(to: directory.appendingPathComponent("11-0/raw"))
        try Data("console=ttyS0 vireo.share=kvm1 vireo.share=kvm2@/data/in-guest root=x vireo.share=../x\n".utf8).write(to: directory.appendingPathComponent("cmdline"))
        for (tool, body) in [("mount", "echo \"MOUNT $*\""), ("mkdir", "echo \"MKDIR $*\""), ("mountpoint", "exit 1")] {
            let path = bin.appendingPathComponent(tool).path
            try Data("#!/bin/sh\n\(body)\n".utf8).write(to: URL(fileURLWithPath: path))
            chmod(path, 0o755)
        }
        let script = CloudInitSeed.mountSharesScript
            .replacingOccurrences(of: "/sys/firmware/dmi/entries", with: directory.path)
            .replacingOccurrences(of: "/proc/cmdline", with: directory.appendingPathComponent("cmdline").path)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", script]
        process.environment = ["PATH": bin.path + ":/usr/bin:/bin"]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        process.waitUntilExit()
        let lines = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).split(separator: "\n").filter { $0.hasPrefix("MOUNT") }
        #expect(lines == ["MOUNT -t virtiofs abc /mnt/abc", "MOUNT -t virtiofs -o ro docs /mnt/docs", "MOUNT -t virtiofs -o ro web /srv/web-docs",
                          "MOUNT -t virtiofs kvm1 /mnt/kvm1", "MOUNT -t virtiofs kvm2 /data/in-guest"], "\(lines)")
    }

    @Test("--share's mount= option and the mount point's rule: absolute, plain characters, no '..', not /; one mount point per share")
    func mountPoints() throws {
        #expect(try SharedFolder.parse("/srv/no-such:web,ro,mount=/srv/www") == SharedFolder(tag: "web", path: "/srv/no-such", readOnly: true, mountPoint: "/srv/www"))
        #expect(try SharedFolder.parse("/srv/no-such,mount=/data,ro").mountPoint == "/data")
        #expect(SharedFolder(tag: "web", path: "/x", readOnly: true, mountPoint: "/srv/www").guestListing == "web:ro@/srv/www")
        #expect(SharedFolder(tag: "web", path: "/x").guestListing == "web")
        for bad in ["relative", "/", "/a/../etc", "/a b", "/a;b", "/a//b", "/" + String(repeating: "x", count: 200)] {
            #expect(throws: LibraryError.self, "\(bad)") { _ = try SharedFolder.parse("/srv/no-such,mount=\(bad)") }
        }
        var definition = VMDefinition(uuid: "6c1d2f4e-0000-4000-8000-000000000009", name: "mp", osType: try OSType.named("linux-64"), createdAt: 0)
        definition.engine = .qemu
        definition.firmware = .bios
        definition.shares = [SharedFolder(tag: "a", path: "/srv/a", mountPoint: "/mnt/b"), SharedFolder(tag: "b", path: "/srv/b")]
        #expect { try VMLibrary.validate(definition) } throws: { "\($0)".contains("two shared folders would be mounted at /mnt/b") }
    }
}
