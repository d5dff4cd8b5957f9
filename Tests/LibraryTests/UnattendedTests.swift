import Foundation
import Library
import Testing

/// Installer ISOs made with xorriso (as Debian's and Ubuntu's are): a tree, an El Torito boot
/// image, Rock Ridge names or plain ISO 9660 ones.
enum InstallerTree {
    static func make(_ files: [String: String], label: String, rockRidge: Bool = true) throws -> String {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-tree-\(UUID().uuidString)")
        for (path, text) in files.merging(["boot/eltorito.img": String(repeating: "\0", count: 2048)], uniquingKeysWith: { a, _ in a }) {
            let url = work.appendingPathComponent(path)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try Data(text.utf8).write(to: url)
        }
        let iso = work.path + ".iso"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/xorriso")
        process.arguments = ["-as", "mkisofs", "-quiet", "-V", label, "-b", "boot/eltorito.img", "-no-emul-boot", "-o", iso]
            + (rockRidge ? ["-R"] : []) + [work.path]
        try process.run()
        process.waitUntilExit()
        try? FileManager.default.removeItem(at: work)
        guard process.terminationStatus == 0 else { throw LibraryError.invalidValue(field: "test", reason: "xorriso failed (scripts/setup.sh installs it)") }
        return iso
    }

    static let debian = ["install.amd/vmlinuz": "kernel bytes", "install.amd/initrd.gz": "initrd bytes",
                         ".disk/info": "Debian GNU/Linux 12.8.0 \"Bookworm\" - Official amd64 NETINST with firmware 20241109-11:04\n",
                         "pool/main/b/base-files/base-files.deb": "x"]
}

struct ISO9660Tests {
    @Test("files are found by Rock Ridge name and by plain ISO 9660 name, whatever the case")
    func lookups() throws {
        for rockRidge in [true, false] {
            let iso = try InstallerTree.make(["install.amd/vmlinuz": "the kernel", "install.amd/initrd.gz": "the initrd"], label: "Debian 12", rockRidge: rockRidge)
            let image = try ISO9660Image(path: iso)
            defer { image.close(); unlink(iso) }
            let kernel = try #require(try image.lookup("/install.amd/vmlinuz"))
            #expect(String(decoding: try image.read(kernel, limit: 100), as: UTF8.self) == "the kernel")
            #expect(try image.lookup("/INSTALL.AMD/INITRD.GZ") != nil)
            #expect(try image.lookup("/install.amd/missing") == nil)
            #expect(try image.lookup("/install.amd/vmlinuz/below") == nil)
            #expect(throws: LibraryError.self) { try image.read(kernel, limit: 3) }
        }
    }

    @Test("an extent past the image's end and a file that is not ISO 9660 are refused, not read")
    func hostileImages() throws {
        let iso = try InstallerTree.make(["install.amd/vmlinuz": "the kernel"], label: "x")
        defer { unlink(iso) }
        let image = try ISO9660Image(path: iso)
        let kernel = try #require(try image.lookup("/install.amd/vmlinuz"))
        image.close()
        // Point the kernel's record far past the end, as a damaged or crafted image would.
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: iso)))
        let needle: [UInt8] = [UInt8(kernel.block & 0xff), UInt8(kernel.block >> 8 & 0xff), UInt8(kernel.block >> 16 & 0xff), UInt8(kernel.block >> 24)]
        var patched = 0
        let size: [UInt8] = [UInt8(kernel.size & 0xff), UInt8(kernel.size >> 8 & 0xff), UInt8(kernel.size >> 16 & 0xff), UInt8(kernel.size >> 24)]
        for offset in 2..<(bytes.count - 40) where Array(bytes[offset..<(offset + 4)]) == needle && Array(bytes[(offset + 8)..<(offset + 12)]) == size && bytes[offset - 2] >= 34 {
            bytes.replaceSubrange((offset + 8)..<(offset + 12), with: [0xff, 0xff, 0xff, 0x7f])
            patched += 1
        }
        #expect(patched > 0)
        try Data(bytes).write(to: URL(fileURLWithPath: iso))
        let damaged = try ISO9660Image(path: iso)
        defer { damaged.close() }
        let entry = try #require(try damaged.lookup("/install.amd/vmlinuz"))
        #expect { try damaged.copy(entry, to: iso + ".out") } throws: { "\($0)".contains("past the image's end") }
        #expect { try damaged.read(entry, limit: .max) } throws: { "\($0)".contains("past the image's end") }
        #expect(!FileManager.default.fileExists(atPath: iso + ".out"))
        let plain = FileManager.default.temporaryDirectory.appendingPathComponent("not-an-iso-\(UUID().uuidString)")
        try Data(repeating: 7, count: 40_000).write(to: plain)
        #expect { try ISO9660Image(path: plain.path) } throws: { "\($0)".contains("no ISO 9660 primary volume descriptor") }
    }
}

struct UnattendedDetectionTests {
    @Test("Debian and Ubuntu installers are recognised from their files; others are refused with what is supported")
    func detection() throws {
        let debian = try InstallerTree.make(InstallerTree.debian, label: "Debian 12.8.0 amd64 n")
        defer { unlink(debian) }
        let found = try DetectedInstaller.detect(iso: debian)
        #expect(found.family == .debian && found.version == "12" && found.packagesOnMedium && found.osType == "debian-64")
        #expect(found.kernel == "/install.amd/vmlinuz" && found.description.hasPrefix("Debian GNU/Linux 12.8.0"))

        let ubuntu = try InstallerTree.make(["casper/vmlinuz": "k", "casper/initrd": "i", ".disk/info": "Ubuntu-Server 24.04.1 LTS \"Noble Numbat\" - Release amd64 (20240827)"],
                                            label: "Ubuntu-Server 24.04.1 LTS amd64")
        defer { unlink(ubuntu) }
        let server = try DetectedInstaller.detect(iso: ubuntu)
        #expect(server.family == .ubuntu && server.version == "24.04" && server.flavour == "server")

        let oldDesktop = try InstallerTree.make(["casper/vmlinuz": "k", "casper/initrd": "i", ".disk/info": "Ubuntu 22.04.4 LTS \"Jammy Jellyfish\" - Release amd64"],
                                                label: "Ubuntu 22.04.4 LTS amd64")
        defer { unlink(oldDesktop) }
        #expect { try DetectedInstaller.detect(iso: oldDesktop) } throws: { "\($0)".contains("Ubiquity") }

        let other = try InstallerTree.make(["boot/vmlinuz": "k", ".disk/info": "Fedora 41 \u{1b}[31mred"], label: "Fedora-WS-Live-41")
        defer { unlink(other) }
        #expect { try DetectedInstaller.detect(iso: other) } throws: { error in
            "\(error)".contains("not an installer Vireo can answer") && "\(error)".contains("Debian 10 or later") && !"\(error)".contains("\u{1b}")
        }
    }
}

struct UnattendedAnswerTests {
    static let settings = UnattendedSettings(user: "alice", fullName: "Alice Example", passwordHash: "$y$j9T$salt$hash", hostname: "box.example.org",
                                             locale: "de_DE", timezone: "Europe/Berlin", packages: ["curl", "htop"],
                                             postInstallCommand: "echo it's done > /root/done", authorizedKeys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9v alice@host", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJh alice@laptop"],
                                             mirror: "http://deb.example.org:8080/debian")

    static func installer(_ family: InstallerFamily = .debian) -> DetectedInstaller {
        DetectedInstaller(family: family, description: "d", version: family == .debian ? "12" : "24.04", osType: "debian-64",
                          kernel: "/install.amd/vmlinuz", initrd: "/install.amd/initrd.gz", packagesOnMedium: false, flavour: family == .ubuntu ? "server" : nil)
    }

    /// The preseed as debconf reads it: key → (type, value).
    static func keys(_ preseed: String) -> [String: (String, String)] {
        var table: [String: (String, String)] = [:]
        for line in preseed.split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: false).map(String.init)
            #expect(parts.count >= 3, "\(line)")
            table[parts[1]] = (parts[2], parts.count > 3 ? parts[3] : "")
        }
        return table
    }

    @Test("the preseed answers debian-installer's critical questions with its documented keys")
    func preseed() {
        let text = UnattendedAnswers.preseed(Self.settings, installer: Self.installer(), disk: "/dev/vda", uefi: true)
        let keys = Self.keys(text)
        let expected: [String: (String, String)] = [
            "debian-installer/locale": ("string", "de_DE.UTF-8"), "keyboard-configuration/xkb-keymap": ("select", "de"),
            "netcfg/get_hostname": ("string", "box"), "netcfg/get_domain": ("string", "example.org"),
            "mirror/country": ("string", "manual"), "mirror/http/hostname": ("string", "deb.example.org:8080"), "mirror/http/directory": ("string", "/debian"),
            "passwd/root-login": ("boolean", "false"), "passwd/username": ("string", "alice"), "passwd/user-fullname": ("string", "Alice Example"),
            "passwd/user-password-crypted": ("password", "$y$j9T$salt$hash"), "time/zone": ("string", "Europe/Berlin"),
            "partman-auto/disk": ("string", "/dev/vda"), "partman-auto/method": ("string", "regular"), "partman/confirm": ("boolean", "true"),
            "partman-efi/non_efi_system": ("boolean", "true"), "grub-installer/bootdev": ("string", "/dev/vda"),
            "grub-installer/force-efi-extra-removable": ("boolean", "true"), "pkgsel/include": ("string", "curl htop openssh-server"),
            "debian-installer/exit/poweroff": ("boolean", "true"), "mirror/suite": ("string", "bookworm"),
        ]
        for (key, value) in expected {
            #expect(keys[key]?.0 == value.0 && keys[key]?.1 == value.1, "\(key): \(String(describing: keys[key]))")
        }
        #expect(keys["passwd/user-default-groups"]?.1.split(separator: " ").contains("sudo") == true, "the user gets sudo")
        let late = keys["preseed/late_command"]?.1 ?? ""
        #expect(late.contains("in-target sh -c 'echo it'\\''s done > /root/done'"), "\(late)")
        // Both keys, on the one line a preseed value is (the check below: every line is a key).
        #expect(late.contains("alice@host") && late.contains("alice@laptop"), "\(late)")
        #expect(late.contains("authorized_keys") && late.hasSuffix("echo \(UnattendedInstall.finishedMarker) > /dev/ttyS0"), "\(late)")
        #expect(keys["preseed/early_command"]?.1.contains("/var/log/syslog") == true)
        #expect(!text.contains("\r") && text.split(separator: "\n").allSatisfy { $0.hasPrefix("d-i ") || $0.hasPrefix("popularity-contest ") })
        var offline = Self.settings
        offline.mirror = nil
        #expect(Self.keys(UnattendedAnswers.preseed(offline, installer: Self.installer(), disk: "/dev/sda", uefi: false))["apt-setup/use_mirror"]?.1 == "false")
    }

    @Test("the kernel command line is the text installer's, automatic, and holds no secret")
    func commandLine() {
        let line = UnattendedAnswers.commandLine(Self.installer(), settings: Self.settings)
        #expect(line.contains("auto=true priority=critical") && line.contains("locale=de_DE.UTF-8") && line.contains("---"))
        #expect(!line.contains("hash") && !line.contains("alice") && !line.contains("gtk"))
        #expect(UnattendedAnswers.commandLine(Self.installer(.ubuntu), settings: Self.settings).hasPrefix("autoinstall"))
    }

    @Test("Ubuntu's autoinstall user-data: identity, keys, packages, late commands and a power-off")
    func autoinstall() throws {
        let text = UnattendedAnswers.autoinstallUserData(Self.settings)
        #expect(text.hasPrefix("#cloud-config\n"))
        let body = try #require(try JSONSerialization.jsonObject(with: Data(text.dropFirst("#cloud-config\n".count).utf8)) as? [String: Any])
        let install = try #require(body["autoinstall"] as? [String: Any])
        #expect(install["version"] as? Int == 1 && install["shutdown"] as? String == "poweroff")
        let identity = try #require(install["identity"] as? [String: String])
        #expect(identity == ["hostname": "box.example.org", "username": "alice", "password": "$y$j9T$salt$hash", "realname": "Alice Example"])
        let ssh = try #require(install["ssh"] as? [String: Any])
        #expect(ssh["install-server"] as? Bool == true && (ssh["authorized-keys"] as? [String])?.count == 2)
        #expect((install["late-commands"] as? [String])?.last == "echo \(UnattendedInstall.finishedMarker) > /dev/ttyS0")
        #expect(install["packages"] as? [String] == ["curl", "htop"])
    }

    @Test("the appended initramfs is a newc cpio archive cpio itself lists and extracts")
    func cpio() throws {
        let archive = UnattendedAnswers.cpio([("preseed.cfg", Array("d-i x string y\n".utf8))])
        #expect(archive.count % 4 == 0)
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-cpio-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        try Data(archive).write(to: directory.appendingPathComponent("a.cpio"))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "cd '\(directory.path)' && cpio -idm --quiet < a.cpio && cat preseed.cfg && stat -c %a preseed.cfg"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        process.waitUntilExit()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(output == "d-i x string y\n600\n", "\(output)")
    }

    @Test("the progress is read from the installer's log on the console; the guest's text is kept printable")
    func progress() {
        // As a serial console writes it: "\r\n".
        let log = "main-menu[312]: INFO: Menu item 'localechooser' selected\r\nmain-menu[312]: INFO: Menu item 'partman-base' selected\r\n\u{1b}[2Jboom\r\n"
        let progress = UnattendedProgress.parse(log)
        #expect(progress.step == "Partition disks" && !progress.finished)
        #expect(progress.lastLines.last == "[2Jboom")
        #expect(UnattendedProgress.parse("Menu item 'x\u{1b}' selected\n\(UnattendedInstall.finishedMarker)\n") == UnattendedProgress(finished: true, step: nil, lastLines: ["Menu item 'x' selected", UnattendedInstall.finishedMarker]))
    }

    @Test("bad answers are refused naming the field and the rule")
    func refusals() {
        #expect { try UnattendedSettings.validate(locale: "german") } throws: { "\($0)".contains("ll_CC") }
        #expect { try UnattendedSettings.validate(timezone: "../../etc/passwd") } throws: { "\($0)".contains("not a time zone name") }
        #expect { try UnattendedSettings.validate(timezone: "Mars/Olympus_Mons") } throws: { "\($0)".contains("tz database") }
        #expect { try UnattendedSettings.validate(packages: ["curl", "rm -rf"]) } throws: { "\($0)".contains("'rm -rf' is not a package name") }
        #expect { try UnattendedSettings.validate(mirror: "ftp://x/debian") } throws: { "\($0)".contains("http or https") }
        #expect { try UnattendedSettings.validate(mirror: "http://x/debian;reboot") } throws: { "\($0)".contains("plain archive URL") }
        #expect(throws: Never.self) { try UnattendedSettings.validate(mirror: "https://deb.debian.org/debian") }
    }
}

struct UnattendedCreateTests {
    func library() throws -> VMLibrary {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-unattended-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        return VMLibrary(root: root.path)
    }

    @Test("create --unattended: the installer's files taken from the ISO with the answers added, the ISO untouched; what cannot go with it is refused and nothing is made")
    func create() throws {
        let iso = try InstallerTree.make(InstallerTree.debian, label: "Debian 12.8.0 amd64 n")
        defer { unlink(iso) }
        let before = try Data(contentsOf: URL(fileURLWithPath: iso))
        let library = try library()
        var request = CreateRequest(name: "deb")
        request.iso = iso
        request.firmware = .bios
        var answers = UnattendedRequest(password: "secret words")
        answers.user = "alice"
        answers.mirror = "none"
        request.unattended = answers
        let (definition, notes) = try library.createReporting(request)
        #expect(notes.contains { $0.contains("from the installer: Debian 12") })
        let install = try #require(definition.unattended)
        #expect(install.settings.mirror == nil && install.settings.passwordHash.hasPrefix("$y$") && install.settings.hostname == "deb")
        let directory = library.root + "/deb/"
        #expect(try Data(contentsOf: URL(fileURLWithPath: directory + "install-kernel")) == Data("kernel bytes".utf8))
        let initrd = try Data(contentsOf: URL(fileURLWithPath: directory + "install-initrd"))
        #expect(initrd.starts(with: Data("initrd bytes".utf8)) && String(decoding: initrd, as: UTF8.self).contains("d-i passwd/username string alice"))
        #expect(try Data(contentsOf: URL(fileURLWithPath: iso)) == before)
        #expect(!String(decoding: try Data(contentsOf: URL(fileURLWithPath: directory + "config.json")), as: UTF8.self).contains("secret words"))
        #expect(definition.directBoot?.kernel == "install-kernel")

        for (change, field) in [({ (r: inout CreateRequest) in r.withoutDisk = true }, "no_disk"), ({ r in r.secureBoot = true; r.firmware = .uefi }, "secure_boot"),
                                ({ r in r.iso = nil }, "unattended"), ({ r in r.unattended?.locale = "xx" }, "locale"),
                                ({ r in r.unattended?.mirror = nil; r.iso = nil }, "unattended")] as [((inout CreateRequest) -> Void, String)] {
            var bad = request
            bad.name = "bad"
            change(&bad)
            #expect { try library.create(bad) } throws: { "\($0)".contains(field) }
            #expect(!FileManager.default.fileExists(atPath: library.root + "/bad"))
        }
        var wrongDisc = request
        wrongDisc.name = "netboot"
        wrongDisc.iso = try InstallerTree.make(["install.amd/vmlinuz": "k", "install.amd/initrd.gz": "i", ".disk/info": "Debian GNU/Linux 12 - netboot"], label: "Debian 12")
        defer { unlink(wrongDisc.iso ?? "") }
        #expect { try library.create(wrongDisc) } throws: { "\($0)".contains("carries no packages") }

        // A clone of a VM not yet installed runs the same install, with its own copy of the installer.
        let clone = try library.clone("deb", to: "deb2", linked: false)
        #expect(clone.unattended == definition.unattended)
        #expect(try Data(contentsOf: URL(fileURLWithPath: library.root + "/deb2/install-initrd")) == initrd)

        // A different disc ends the install; the answers (the password's hash) go with it.
        var eject = ChangeRequest()
        eject.iso = .some(nil)
        let changed = try library.change("deb", eject)
        #expect(changed.unattended == nil && changed.directBoot == nil)
        #expect(!FileManager.default.fileExists(atPath: directory + "install-initrd"))
    }
}
