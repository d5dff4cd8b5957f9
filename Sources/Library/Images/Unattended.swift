import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Unattended installation (docs/unattended.md): Vireo recognises an installer ISO, writes the
/// installer's answer file and boots the installer's own kernel with it, so the install runs
/// without a key pressed and powers the VM off when done. The user's ISO is never written.
public enum InstallerFamily: String, Codable, Sendable {
    /// debian-installer, answered by a preseed file in its initrd.
    case debian
    /// Subiquity, answered by autoinstall `user-data` on a `CIDATA` volume.
    case ubuntu
}

/// What `vireo unattended detect` finds on an ISO, read from its files (never from a guess at
/// its name): the installer's family, release and the kernel and initrd it boots.
public struct DetectedInstaller: Codable, Sendable, Equatable {
    public var family: InstallerFamily
    /// `.disk/info` (printable characters only), or the volume label when there is none.
    public var description: String
    /// "12" for Debian 12, "24.04" for Ubuntu 24.04.
    public var version: String
    public var osType: String
    /// Paths inside the ISO.
    public var kernel: String
    public var initrd: String
    /// Debian: the medium carries a package pool (netinst, DVD), so it installs without a
    /// mirror; false for a netboot-style ISO, which needs one.
    public var packagesOnMedium: Bool
    /// Ubuntu: "server" or "desktop".
    public var flavour: String?

    public init(family: InstallerFamily, description: String, version: String, osType: String, kernel: String, initrd: String,
                packagesOnMedium: Bool, flavour: String?) {
        self.family = family; self.description = description; self.version = version; self.osType = osType
        self.kernel = kernel; self.initrd = initrd; self.packagesOnMedium = packagesOnMedium; self.flavour = flavour
    }

    /// Debian releases by major version.
    static let debianCodenames = ["10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"]

    static let debianKernels = [("/install.amd/vmlinuz", "/install.amd/initrd.gz")]
    static let ubuntuKernels = [("/casper/vmlinuz", "/casper/initrd"), ("/casper/vmlinuz", "/casper/initrd.gz")]
    static let supported = "Debian 10 or later (netinst, DVD or netboot ISOs: /install.amd/vmlinuz and initrd.gz) and Ubuntu Server 22.04 or later or Ubuntu Desktop 23.04 or later (/casper/vmlinuz and initrd)"

    /// Reads the ISO's `.disk/info` and looks for the installer's kernel and initrd.
    public static func detect(iso path: String, field: String = "iso") throws(LibraryError) -> DetectedInstaller {
        let medium = try InstallMedium.inspect(path, field: field)
        let image = try ISO9660Image(path: medium.path, field: field)
        defer { image.close() }
        var info = ""
        if let entry = try image.lookup("/.disk/info"), !entry.isDirectory {
            info = printable(String(decoding: try image.read(entry, limit: 4096), as: UTF8.self))
        }
        let description = info.isEmpty ? printable(medium.volumeLabel) : info
        let words = (info + " " + medium.volumeLabel).lowercased()
        func find(_ pairs: [(String, String)]) throws(LibraryError) -> (String, String)? {
            for (kernel, initrd) in pairs {
                if let k = try image.lookup(kernel), !k.isDirectory, let i = try image.lookup(initrd), !i.isDirectory { return (kernel, initrd) }
            }
            return nil
        }
        if words.contains("debian"), let (kernel, initrd) = try find(debianKernels) {
            let version = firstNumber(in: info.isEmpty ? medium.volumeLabel : info) ?? ""
            guard let major = Int(version.split(separator: ".").first ?? ""), major >= 10 else {
                throw .invalidValue(field: field, reason: "\(medium.path) is a Debian installer whose release (\(version.isEmpty ? "not named" : version)) is not 10 or later; unattended installs support \(supported)")
            }
            let pool = try image.lookup("/pool")
            return DetectedInstaller(family: .debian, description: description, version: String(major), osType: "debian-64",
                                     kernel: kernel, initrd: initrd, packagesOnMedium: pool?.isDirectory == true, flavour: nil)
        }
        if words.contains("ubuntu"), let (kernel, initrd) = try find(ubuntuKernels) {
            let version = firstNumber(in: info.isEmpty ? medium.volumeLabel : info) ?? ""
            let parts = version.split(separator: ".").compactMap { Int($0) }
            let flavour = words.contains("server") ? "server" : "desktop"
            let minimum = flavour == "server" ? [22, 4] : [23, 4]
            guard parts.count >= 2, parts[0] > minimum[0] || (parts[0] == minimum[0] && parts[1] >= minimum[1]) else {
                throw .invalidValue(field: field, reason: "\(medium.path) is an Ubuntu \(flavour) installer \(version.isEmpty ? "of no named release" : version); autoinstall needs Ubuntu Server 22.04 or later, or Ubuntu Desktop 23.04 or later (22.04's desktop installer is Ubiquity, which has no autoinstall)")
            }
            return DetectedInstaller(family: .ubuntu, description: description, version: "\(parts[0]).\(parts[1] < 10 ? "0" : "")\(parts[1])",
                                     osType: "ubuntu-64", kernel: kernel, initrd: initrd, packagesOnMedium: true, flavour: flavour)
        }
        throw .invalidValue(field: field, reason: "\(medium.path) ('\(printable(medium.volumeLabel))') is not an installer Vireo can answer: unattended installs support \(supported)")
    }

    /// The first "12" or "22.04.3" in a text.
    static func firstNumber(in text: String) -> String? {
        var current = ""
        for character in text {
            if character.isASCII, character.isNumber || (character == "." && !current.isEmpty) {
                current.append(character)
            } else if !current.isEmpty {
                break
            }
        }
        while current.hasSuffix(".") { current.removeLast() }
        return current.isEmpty ? nil : current
    }

    /// Printable ASCII only, at most 200 characters: the ISO's words go to a terminal.
    static func printable(_ text: String) -> String {
        String(String(text.unicodeScalars.filter { $0.value >= 0x20 && $0.value < 0x7f }.map(Character.init)).trimmingWhitespace().prefix(200))
    }

    /// What the installer names itself, for people.
    public var summary: String {
        switch family {
        case .debian: return "Debian \(version) (debian-installer, answered by a preseed file; \(packagesOnMedium ? "packages from the disc" : "packages from a mirror"))"
        case .ubuntu: return "Ubuntu \(flavour ?? "") \(version) (Subiquity, answered by autoinstall)"
        }
    }
}

/// What the user asks of an unattended install (`vireo create --unattended`), checked. No
/// password in clear: only its crypt(3) hash is kept, and it reaches the guest inside the answer
/// file, never on a command line or in a log.
public struct UnattendedSettings: Codable, Sendable, Equatable {
    public var user: String
    public var fullName: String?
    public var passwordHash: String
    public var hostname: String
    public var locale: String
    public var timezone: String
    public var packages: [String]
    public var postInstallCommand: String?
    public var authorizedKeys: [String]
    /// Debian: the archive packages come from ("http://deb.debian.org/debian"); nil installs
    /// from the disc alone.
    public var mirror: String?

    public init(user: String, fullName: String?, passwordHash: String, hostname: String, locale: String, timezone: String,
                packages: [String], postInstallCommand: String?, authorizedKeys: [String], mirror: String?) {
        self.user = user; self.fullName = fullName; self.passwordHash = passwordHash; self.hostname = hostname; self.locale = locale
        self.timezone = timezone; self.packages = packages; self.postInstallCommand = postInstallCommand
        self.authorizedKeys = authorizedKeys; self.mirror = mirror
    }

    public static let defaultLocale = "en_US"
    public static let defaultTimezone = "Etc/UTC"
    public static let defaultMirror = "http://deb.debian.org/debian"

    /// `ll_CC`: a language (2 or 3 lower-case letters) and a country (2 upper-case letters).
    public static func validate(locale: String) throws(LibraryError) {
        let parts = locale.split(separator: "_", omittingEmptySubsequences: false)
        guard parts.count == 2, (2...3).contains(parts[0].count), parts[0].unicodeScalars.allSatisfy({ $0 >= "a" && $0 <= "z" }),
              parts[1].count == 2, parts[1].unicodeScalars.allSatisfy({ $0 >= "A" && $0 <= "Z" }) else {
            throw .invalidValue(field: "locale", reason: "'\(locale)' is not a locale: give ll_CC, a language and a country (en_US, de_DE, pt_BR)")
        }
    }

    /// An IANA zone name ("Europe/Berlin"), present in the host's tzdata when it has one.
    public static func validate(timezone: String, zoneinfo: String = "/usr/share/zoneinfo") throws(LibraryError) {
        let components = timezone.split(separator: "/", omittingEmptySubsequences: false)
        let wellFormed = !timezone.isEmpty && timezone.utf8.count <= 64 && components.allSatisfy { component in
            !component.isEmpty && component != "." && component != ".."
                && component.unicodeScalars.allSatisfy { ($0 >= "a" && $0 <= "z") || ($0 >= "A" && $0 <= "Z") || ($0 >= "0" && $0 <= "9") || $0 == "_" || $0 == "-" || $0 == "+" }
        }
        guard wellFormed else {
            throw .invalidValue(field: "timezone", reason: "'\(timezone)' is not a time zone name: give an IANA zone such as Etc/UTC, Europe/Berlin or America/New_York")
        }
        if HostFiles.isDirectory(zoneinfo), !HostFiles.exists(zoneinfo + "/" + timezone) {
            throw .invalidValue(field: "timezone", reason: "'\(timezone)' is not a time zone the tz database knows (no \(zoneinfo)/\(timezone)); give one such as Etc/UTC or Europe/Berlin")
        }
    }

    /// Debian's package name rule: lower-case letters, digits, '+', '-' and '.', starting with a
    /// letter or digit, 2 or more characters; at most 200 of them.
    public static func validate(packages: [String]) throws(LibraryError) {
        guard packages.count <= 200 else { throw .invalidValue(field: "packages", reason: "\(packages.count) packages; at most 200") }
        for name in packages {
            guard name.utf8.count >= 2, name.utf8.count <= 100, let first = name.unicodeScalars.first,
                  (first >= "a" && first <= "z") || (first >= "0" && first <= "9"),
                  name.unicodeScalars.allSatisfy({ ($0 >= "a" && $0 <= "z") || ($0 >= "0" && $0 <= "9") || $0 == "+" || $0 == "-" || $0 == "." }) else {
                throw .invalidValue(field: "packages", reason: "'\(name)' is not a package name: lower-case letters, digits, '+', '-' and '.', starting with a letter or digit")
            }
        }
    }

    /// One line of printable text (the answer files are line-based), at most `limit` bytes.
    static func validateLine(_ text: String, field: String, limit: Int, forbidden: Set<Character> = []) throws(LibraryError) {
        guard !text.isEmpty, text.utf8.count <= limit,
              text.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value != 0x7f }), !text.contains(where: { forbidden.contains($0) }) else {
            throw .invalidValue(field: field, reason: "must be 1 to \(limit) bytes of printable text on one line\(forbidden.isEmpty ? "" : " without \(forbidden.sorted().map { "'\($0)'" }.joined(separator: " or "))")")
        }
    }

    /// `http://` or `https://`, a host, an optional port and a path; nothing a shell or the
    /// preseed format would read specially.
    public static func validate(mirror: String) throws(LibraryError) {
        let rule = "give the archive's URL, http://HOST[:PORT]/PATH (for example \(defaultMirror))"
        guard let schemeEnd = mirror.firstRange(of: "://"), ["http", "https"].contains(String(mirror[..<schemeEnd.lowerBound])) else {
            throw .invalidValue(field: "mirror", reason: "'\(mirror)' is not an http or https URL: \(rule)")
        }
        let rest = mirror[schemeEnd.upperBound...]
        let host = rest.split(separator: "/", maxSplits: 1).first.map(String.init) ?? ""
        let allowed: (Unicode.Scalar) -> Bool = { ($0 >= "a" && $0 <= "z") || ($0 >= "A" && $0 <= "Z") || ($0 >= "0" && $0 <= "9") || "-._~/:".unicodeScalars.contains($0) }
        guard !host.isEmpty, mirror.utf8.count <= 256, rest.unicodeScalars.allSatisfy(allowed), !host.hasPrefix(":") else {
            throw .invalidValue(field: "mirror", reason: "'\(mirror)' is not a plain archive URL (letters, digits and -._~/: only): \(rule)")
        }
    }

    /// The mirror's parts as debian-installer asks for them.
    var mirrorParts: (scheme: String, host: String, directory: String)? {
        guard let mirror, let schemeEnd = mirror.firstRange(of: "://") else { return nil }
        let rest = mirror[schemeEnd.upperBound...]
        let host = rest.split(separator: "/", maxSplits: 1).first.map(String.init) ?? ""
        var directory = String(rest.dropFirst(host.count))
        if directory.isEmpty { directory = "/" }
        return (String(mirror[..<schemeEnd.lowerBound]), host, directory)
    }
}

/// A VM's unattended install, recorded in its definition while it runs: the installer kernel,
/// the initrd with the answers (both in the VM's directory) and the command line boot the VM
/// instead of its disk until the installer reports it finished; then the ISO is ejected and the
/// record dropped, so the next start boots the installed system.
public struct UnattendedInstall: Codable, Sendable, Equatable {
    public var installer: DetectedInstaller
    public var settings: UnattendedSettings
    /// In the VM's directory.
    public var kernel: String
    public var initrd: String
    public var commandLine: String
    /// Ubuntu: the `CIDATA` seed disk's file in the VM's directory (also among the disks).
    public var seed: String?

    public init(installer: DetectedInstaller, settings: UnattendedSettings, kernel: String, initrd: String, commandLine: String, seed: String?) {
        self.installer = installer; self.settings = settings; self.kernel = kernel; self.initrd = initrd
        self.commandLine = commandLine; self.seed = seed
    }

    public static let kernelFile = "install-kernel"
    public static let initrdFile = "install-initrd"
    public static let seedFile = "install-seed.iso"
    /// Written by the installer's last command to the serial console; Vireo ejects the ISO when
    /// a run's console log has it. A guest could print it early; all that buys it is its own
    /// ISO ejected.
    public static let finishedMarker = "VIREO-UNATTENDED-INSTALL-FINISHED"
}

/// The answer files.
public enum UnattendedAnswers {
    /// A value for a POSIX shell in single quotes.
    static func shellQuoted(_ text: String) -> String { "'" + text.replacing("'", with: "'\\''") + "'" }

    /// The serial console the installer's log and the finished marker go to.
    static let console = "/dev/ttyS0"

    /// debian-installer's preseed file (the keys of Debian 12's example-preseed.txt): every
    /// question it asks at priority critical answered, the log streamed to the serial console
    /// (so `vireo info` can tell the step), partitioning on the VM's first disk, and a power-off
    /// at the end.
    public static func preseed(_ settings: UnattendedSettings, installer: DetectedInstaller, disk: String, uefi: Bool) -> String {
        var lines: [String] = []
        func d(_ key: String, _ type: String, _ value: String) { lines.append("d-i \(key) \(type) \(value)") }
        // The installer's syslog on the serial console, from the first moment: Vireo reads the
        // step ("Menu item 'partman-base' selected") from it.
        // The background tail lets go of every descriptor it inherited: the installer's frontend
        // waits for the command's pipes to close, and would wait forever.
        d("preseed/early_command", "string", "(tail -n +1 -f /var/log/syslog < /dev/null > \(console) 2>&1 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &)")
        d("debian-installer/locale", "string", "\(settings.locale).UTF-8")
        d("debian-installer/language", "string", String(settings.locale.prefix(while: { $0 != "_" })))
        d("debian-installer/country", "string", String(settings.locale.split(separator: "_").last ?? "US"))
        d("localechooser/supported-locales", "multiselect", "\(settings.locale).UTF-8")
        d("keyboard-configuration/xkb-keymap", "select", keymap(for: settings.locale))
        d("netcfg/choose_interface", "select", "auto")
        d("netcfg/get_hostname", "string", settings.hostname.split(separator: ".").first.map(String.init) ?? settings.hostname)
        d("netcfg/get_domain", "string", settings.hostname.split(separator: ".").dropFirst().joined(separator: "."))
        d("netcfg/hostname", "string", settings.hostname)
        d("netcfg/wireless_wep", "string", "")
        d("hw-detect/load_firmware", "boolean", "false")
        if let mirror = settings.mirrorParts {
            d("mirror/country", "string", "manual")
            d("mirror/protocol", "select", mirror.scheme)
            d("mirror/\(mirror.scheme)/hostname", "string", mirror.host)
            d("mirror/\(mirror.scheme)/directory", "string", mirror.directory)
            d("mirror/\(mirror.scheme)/proxy", "string", "")
            // The installer's own release, not whatever "stable" is today: its kernel's modules
            // are in that release only.
            if let codename = DetectedInstaller.debianCodenames[installer.version] {
                d("mirror/suite", "string", codename)
                d("mirror/codename", "string", codename)
            }
            d("apt-setup/use_mirror", "boolean", "true")
        } else {
            d("apt-setup/use_mirror", "boolean", "false")
            d("apt-setup/cdrom/set-first", "boolean", "false")
        }
        // No root password: the user gets sudo (VirtualBox's Debian template leaves it out).
        d("passwd/root-login", "boolean", "false")
        d("passwd/make-user", "boolean", "true")
        d("passwd/user-fullname", "string", settings.fullName ?? "")
        d("passwd/username", "string", settings.user)
        d("passwd/user-password-crypted", "password", settings.passwordHash)
        d("passwd/user-default-groups", "string", "audio cdrom video sudo")
        d("clock-setup/utc", "boolean", "true")
        d("time/zone", "string", settings.timezone)
        d("clock-setup/ntp", "boolean", "false")
        d("partman-auto/disk", "string", disk)
        d("partman-auto/method", "string", "regular")
        d("partman-auto/choose_recipe", "select", "atomic")
        d("partman-lvm/device_remove_lvm", "boolean", "true")
        d("partman-md/device_remove_md", "boolean", "true")
        d("partman-partitioning/confirm_write_new_label", "boolean", "true")
        d("partman/choose_partition", "select", "finish")
        d("partman/confirm", "boolean", "true")
        d("partman/confirm_nooverwrite", "boolean", "true")
        if uefi { d("partman-efi/non_efi_system", "boolean", "true") }
        d("base-installer/install-recommends", "boolean", "true")
        d("apt-setup/cdrom/set-next", "boolean", "false")
        d("apt-setup/cdrom/set-failed", "boolean", "false")
        d("apt-setup/non-free-firmware", "boolean", "true")
        d("apt-setup/services-select", "multiselect", settings.mirror == nil ? "" : "security, updates")
        d("tasksel/first", "multiselect", "standard" + (settings.authorizedKeys.isEmpty ? "" : ", ssh-server"))
        var packages = settings.packages
        if !settings.authorizedKeys.isEmpty, !packages.contains("openssh-server") { packages.append("openssh-server") }
        d("pkgsel/include", "string", packages.joined(separator: " "))
        d("pkgsel/upgrade", "select", "none")
        lines.append("popularity-contest popularity-contest/participate boolean false")
        d("grub-installer/only_debian", "boolean", "true")
        d("grub-installer/with_other_os", "boolean", "false")
        d("grub-installer/bootdev", "string", disk)
        if uefi { d("grub-installer/force-efi-extra-removable", "boolean", "true") }
        d("finish-install/reboot_in_progress", "note", "")
        d("cdrom-detect/eject", "boolean", "false")
        d("debian-installer/exit/poweroff", "boolean", "true")
        d("preseed/late_command", "string", lateCommand(settings))
        return lines.joined(separator: "\n") + "\n"
    }

    /// Keys for `vireo ssh`-style logins, the user's own command, then the marker Vireo waits for.
    static func lateCommand(_ settings: UnattendedSettings) -> String {
        var steps: [String] = []
        if !settings.authorizedKeys.isEmpty {
            let home = "/home/\(settings.user)"
            // One quoted word per key: a preseed value is one line, so no newline may be in it.
            let keys = settings.authorizedKeys.map(shellQuoted).joined(separator: " ")
            let script = "mkdir -p \(home)/.ssh && printf '%s\\n' \(keys) >> \(home)/.ssh/authorized_keys && chmod 700 \(home)/.ssh && chmod 600 \(home)/.ssh/authorized_keys && chown -R \(settings.user): \(home)/.ssh"
            steps.append("in-target sh -c \(shellQuoted(script))")
        }
        if let command = settings.postInstallCommand { steps.append("in-target sh -c \(shellQuoted(command))") }
        steps.append("echo \(UnattendedInstall.finishedMarker) > \(console)")
        return steps.joined(separator: "; ")
    }

    /// The console keymap debian-installer would pick for a country, for the common ones; "us"
    /// otherwise (the console keymap is changed later with `dpkg-reconfigure keyboard-configuration`).
    static func keymap(for locale: String) -> String {
        let country = String(locale.split(separator: "_").last ?? "US")
        let maps = ["DE": "de", "AT": "de", "CH": "ch", "FR": "fr", "BE": "be", "GB": "gb", "IE": "gb", "ES": "es", "IT": "it", "PT": "pt",
                    "BR": "br", "NL": "us", "SE": "se", "NO": "no", "DK": "dk", "FI": "fi", "PL": "pl", "CZ": "cz", "RU": "ru", "JP": "jp",
                    "HU": "hu", "TR": "tr", "CA": "us", "US": "us"]
        return maps[country] ?? "us"
    }

    /// Ubuntu autoinstall (Subiquity's `autoinstall:` in cloud-config), as JSON (which is YAML).
    public static func autoinstallUserData(_ settings: UnattendedSettings) -> String {
        var identity: [String: String] = ["hostname": settings.hostname, "username": settings.user, "password": settings.passwordHash]
        if let name = settings.fullName { identity["realname"] = name }
        var late: [String] = []
        if let command = settings.postInstallCommand { late.append("curtin in-target --target=/target -- sh -c \(shellQuoted(command))") }
        late.append("echo \(UnattendedInstall.finishedMarker) > \(console)")
        let document = AutoinstallDocument(autoinstall: .init(
            version: 1, locale: "\(settings.locale).UTF-8", keyboard: ["layout": keymap(for: settings.locale)],
            timezone: settings.timezone, identity: identity,
            ssh: .init(install_server: !settings.authorizedKeys.isEmpty, authorized_keys: settings.authorizedKeys, allow_pw: settings.authorizedKeys.isEmpty),
            packages: settings.packages, storage: ["layout": ["name": "direct"]], late_commands: late, shutdown: "poweroff"))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let json = (try? encoder.encode(document)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return "#cloud-config\n" + json + "\n"
    }

    struct AutoinstallDocument: Encodable {
        struct Body: Encodable {
            struct SSH: Encodable {
                var install_server: Bool
                var authorized_keys: [String]
                var allow_pw: Bool
                enum CodingKeys: String, CodingKey { case install_server = "install-server", authorized_keys = "authorized-keys", allow_pw = "allow-pw" }
            }
            var version: Int
            var locale: String
            var keyboard: [String: String]
            var timezone: String
            var identity: [String: String]
            var ssh: SSH
            var packages: [String]
            var storage: [String: [String: String]]
            var late_commands: [String]
            var shutdown: String
            enum CodingKeys: String, CodingKey {
                case version, locale, keyboard, timezone, identity, ssh, packages, storage, shutdown, late_commands = "late-commands"
            }
        }
        var autoinstall: Body
    }

    /// The installer's kernel command line. Debian: `auto=true priority=critical` with the
    /// preseed file in the initrd; Ubuntu: `autoinstall` (the seed volume is found by its label).
    /// The text installer, never the graphical one; no secret is ever on it.
    public static func commandLine(_ installer: DetectedInstaller, settings: UnattendedSettings) -> String {
        switch installer.family {
        case .debian:
            return "auto=true priority=critical locale=\(settings.locale).UTF-8 keymap=\(keymap(for: settings.locale)) hostname=\(settings.hostname.split(separator: ".").first ?? "") console=tty0 --- quiet"
        case .ubuntu:
            return "autoinstall console=tty0 --- quiet"
        }
    }

    /// A newc cpio archive (the kernel's initramfs format) holding `files` at its root, mode
    /// 0600, ending with the trailer. Appended to a compressed initrd, the kernel unpacks it
    /// after the original, so `/preseed.cfg` is there when debian-installer looks.
    public static func cpio(_ files: [(name: String, bytes: [UInt8])]) -> [UInt8] {
        var archive: [UInt8] = []
        func pad() { while archive.count % 4 != 0 { archive.append(0) } }
        func header(_ name: String, mode: UInt32, size: Int, inode: Int) {
            let fields: [UInt32] = [UInt32(inode), mode, 0, 0, 1, 0, UInt32(size), 0, 0, 0, 0, UInt32(name.utf8.count + 1), 0]
            archive += Array("070701".utf8)
            for field in fields {
                let hex = String(field, radix: 16, uppercase: true)
                archive += Array((String(repeating: "0", count: 8 - hex.count) + hex).utf8)
            }
            archive += Array(name.utf8) + [0]
            pad()
        }
        for (index, file) in files.enumerated() {
            header(file.name, mode: 0o100600, size: file.bytes.count, inode: 0x7000 + index)
            archive += file.bytes
            pad()
        }
        header("TRAILER!!!", mode: 0, size: 0, inode: 0)
        return archive
    }
}

/// How far an unattended install has come, read from the VM's serial console log (the
/// installer's syslog, streamed there by the preseed's first command). Guest-written text:
/// only known step names are shown, and the failure lines are printable characters only.
public struct UnattendedProgress: Sendable, Equatable {
    public var finished: Bool
    /// The installer's current (or last) step, for people ("Partition disks").
    public var step: String?
    /// The console's last lines, for a failed install.
    public var lastLines: [String]

    public init(finished: Bool, step: String?, lastLines: [String]) { self.finished = finished; self.step = step; self.lastLines = lastLines }

    /// debian-installer's main-menu items and what its menu calls them.
    static let steps: [(String, String)] = [
        ("localechooser", "Choose language"), ("console-setup-udeb", "Configure the keyboard"), ("keyboard-setup", "Configure the keyboard"),
        ("cdrom-detect", "Detect and mount installation media"), ("ethdetect", "Detect network hardware"), ("netcfg", "Configure the network"),
        ("choose-mirror", "Choose a mirror of the Debian archive"), ("download-installer", "Download installer components"),
        ("load-cdrom", "Load installer components from installation media"), ("user-setup-udeb", "Set up users and passwords"),
        ("clock-setup", "Configure the clock"), ("disk-detect", "Detect disks"), ("partman-base", "Partition disks"),
        ("base-installer", "Install the base system"), ("apt-setup-udeb", "Configure the package manager"),
        ("pkgsel", "Select and install software"), ("grub-installer", "Install the GRUB boot loader"),
        ("nobootloader", "Continue without boot loader"), ("finish-install", "Finish the installation"),
    ]

    /// Reads `log` (the last 256 KiB of it).
    public static func read(consoleLog path: String) -> UnattendedProgress {
        let text = HostFiles.tail(path, bytes: 256 << 10)
        return parse(text)
    }

    /// Lines end in "\r\n" on a serial console, which Swift reads as one Character: split on
    /// every kind of newline.
    public static func parse(_ text: String) -> UnattendedProgress {
        var step: String?
        var finished = false
        for line in text.split(whereSeparator: \.isNewline) {
            if line.contains(UnattendedInstall.finishedMarker) { finished = true }
            guard let range = line.firstRange(of: "Menu item '") else { continue }
            let item = line[range.upperBound...].prefix(while: { $0 != "'" })
            if let known = steps.first(where: { $0.0 == item }) { step = known.1 }
        }
        let lines = text.split(whereSeparator: \.isNewline).suffix(8).map { line in
            String(String(line.unicodeScalars.filter { $0.value >= 0x20 && $0.value < 0x7f }.map(Character.init)).prefix(160))
        }.filter { !$0.trimmingWhitespace().isEmpty }
        return UnattendedProgress(finished: finished, step: step, lastLines: Array(lines))
    }
}
