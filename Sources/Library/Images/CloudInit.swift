import CCrypt
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// What a VM made from a cloud-init image is told on its first boot: its user, the keys that
/// may log in, an optional password, its host name and the instance ID (a new one means a new
/// machine to cloud-init: new host keys, the user made again).
public struct CloudInitSettings: Codable, Sendable, Equatable {
    public var user: String
    /// OpenSSH public key lines (the library's own key is always among them, so `vireo ssh` works).
    public var authorizedKeys: [String]
    /// A crypt(3) hash (yescrypt); nil: the account has no password (keys only).
    public var passwordHash: String?
    public var hostname: String
    public var instanceID: String

    public init(user: String, authorizedKeys: [String], passwordHash: String?, hostname: String, instanceID: String) {
        self.user = user; self.authorizedKeys = authorizedKeys; self.passwordHash = passwordHash
        self.hostname = hostname; self.instanceID = instanceID
    }

    /// Debian's cloud images call their user `debian`; so do Vireo's.
    public static let defaultUser = "debian"

    /// Debian's adduser rule (NAME_REGEX `^[a-z][-a-z0-9_]*$`), at most 32 characters, and not an
    /// account the base system already has.
    public static func validate(user: String) throws(LibraryError) {
        let rule = "a Debian user name is 1 to 32 characters: a lower-case letter, then lower-case letters, digits, '-' and '_'"
        guard !user.isEmpty, user.utf8.count <= 32, let first = user.unicodeScalars.first, first >= "a", first <= "z",
              user.unicodeScalars.allSatisfy({ ($0 >= "a" && $0 <= "z") || ($0 >= "0" && $0 <= "9") || $0 == "-" || $0 == "_" }) else {
            throw .invalidValue(field: "user", reason: "'\(user)' is not allowed: \(rule)")
        }
        guard !systemAccounts.contains(user), !user.hasPrefix("systemd-") else {
            throw .invalidValue(field: "user", reason: "'\(user)' is an account Debian's base system already has; choose another name (the default is \(defaultUser))")
        }
    }

    /// Accounts in Debian's base-passwd and those the image's packages add.
    static let systemAccounts: Set<String> = [
        "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data",
        "backup", "list", "irc", "gnats", "nobody", "_apt", "messagebus", "sshd", "dhcpcd", "polkitd", "staff", "users",
        "sudo", "adm", "operator", "nogroup", "tty", "disk", "kmem", "dialout", "cdrom", "floppy", "audio", "video", "plugdev",
    ]

    /// A host name (RFC 1123): dot-separated labels of letters, digits and '-', each 1 to 63
    /// characters and not starting or ending with '-', 253 characters at most.
    public static func validate(hostname: String, field: String = "hostname") throws(LibraryError) {
        let labels = hostname.split(separator: ".", omittingEmptySubsequences: false)
        let valid = !hostname.isEmpty && hostname.utf8.count <= 253 && labels.allSatisfy { label in
            !label.isEmpty && label.utf8.count <= 63 && !label.hasPrefix("-") && !label.hasSuffix("-")
                && label.unicodeScalars.allSatisfy { ($0 >= "a" && $0 <= "z") || ($0 >= "A" && $0 <= "Z") || ($0 >= "0" && $0 <= "9") || $0 == "-" }
        }
        guard valid else {
            throw .invalidValue(field: field, reason: "'\(hostname)' is not a host name: dot-separated labels of letters, digits and '-' (1 to 63 characters each, not starting or ending with '-')")
        }
    }

    /// The guest's host name: the one given (checked), else the VM's name as one.
    public static func hostname(given: String?, vmName: String) throws(LibraryError) -> String {
        if let given {
            try validate(hostname: given)
            return given
        }
        guard let derived = hostname(forVM: vmName) else {
            throw .invalidValue(field: "hostname", reason: "the VM's name '\(vmName)' is not a host name; give one with --hostname")
        }
        return derived
    }

    /// The VM's name as a host name: '_' and '.' become '-'; nil when even that is not one.
    public static func hostname(forVM name: String) -> String? {
        var candidate = String(name.map { $0 == "_" || $0 == "." ? "-" : $0 })
        while candidate.hasSuffix("-") { candidate.removeLast() }
        if candidate.utf8.count > 63 { return nil }
        return (try? validate(hostname: candidate)) != nil ? candidate : nil
    }

    /// crypt(3) with yescrypt and a random salt, as `passwd` on Debian 12 would store it.
    public static func hashPassword(_ password: String) throws(LibraryError) -> String {
        guard !password.isEmpty else { throw .invalidValue(field: "password", reason: "the password is empty") }
        guard !password.utf8.contains(0), !password.contains("\n") else {
            throw .invalidValue(field: "password", reason: "the password contains a NUL or newline")
        }
        var output = [CChar](repeating: 0, count: 512)
        let code = vireo_hash_password(password, &output, output.count)
        guard code == 0 else { throw .io(operation: "crypt (hash the password)", path: "libcrypt", errno: code) }
        return String(decoding: output.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// OpenSSH public keys, checked as sshd would read them.
public enum SSHPublicKey {
    static let types: Set<String> = [
        "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com", "ssh-dss",
    ]

    /// The key lines of a public key file (`id_ed25519.pub`, or an authorized_keys list without
    /// options); anything else is refused with what it is.
    public static func read(file: String, field: String = "ssh_key_files") throws(LibraryError) -> [String] {
        let path = HostFiles.absolute(file)
        guard HostFiles.exists(path), !HostFiles.isDirectory(path) else {
            throw .invalidValue(field: field, reason: "\(file) does not exist or is not a file")
        }
        guard HostFiles.size(path) <= 1 << 20 else {
            throw .invalidValue(field: field, reason: "\(file) is \(HostFiles.size(path)) bytes, too large for a public key file")
        }
        let text = String(decoding: try HostFiles.readAll(path), as: UTF8.self)
        if text.contains("PRIVATE KEY-----") {
            throw .invalidValue(field: field, reason: "\(file) is a private key; give the public one (\(file).pub), which is what the VM stores")
        }
        var keys: [String] = []
        for (index, raw) in text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }).enumerated() {
            let line = String(raw).trimmingWhitespace()
            if line.isEmpty || line.hasPrefix("#") { continue }
            try validate(line, where: "\(file) line \(index + 1)", field: field)
            keys.append(line)
        }
        guard !keys.isEmpty else { throw .invalidValue(field: field, reason: "\(file) holds no public key") }
        return keys
    }

    /// `TYPE BASE64 [COMMENT]` whose base64 blob decodes and names the same type.
    public static func validate(_ line: String, where place: String, field: String) throws(LibraryError) {
        let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        guard fields.count >= 2, types.contains(fields[0]) else {
            throw .invalidValue(field: field, reason: "\(place) is not an OpenSSH public key (expected 'TYPE BASE64 [comment]' with TYPE one of \(types.sorted().joined(separator: ", ")))")
        }
        guard let blob = Data(base64Encoded: fields[1]), blob.count > 4 else {
            throw .invalidValue(field: field, reason: "\(place): the key data is not valid base64")
        }
        let bytes = Array(blob)
        let length = Int(bytes[0]) << 24 | Int(bytes[1]) << 16 | Int(bytes[2]) << 8 | Int(bytes[3])
        guard length > 0, length <= bytes.count - 4, String(decoding: bytes[4..<(4 + length)], as: UTF8.self) == fields[0] else {
            throw .invalidValue(field: field, reason: "\(place): the key data does not hold a \(fields[0]) key")
        }
    }
}

/// The NoCloud seed: a small ISO 9660 volume labelled `cidata` holding `user-data`,
/// `meta-data` and `network-config`, which cloud-init finds by its label on any disk.
public enum CloudInitSeed {
    /// The seed's file in the VM's directory; attached read-only as the VM's last disk.
    public static let fileName = "seed.iso"
    public static let serial = "cidata"

    struct User: Encodable {
        var name: String
        var groups: [String]
        var sudo: String
        var shell: String
        var lock_passwd: Bool
        var passwd: String?
        var ssh_authorized_keys: [String]
    }

    struct UserData: Encodable {
        var users: [User]
        var disable_root: Bool
        var manage_etc_hosts: Bool
        var bootcmd: [[String]]
    }

    /// Run by cloud-init at every boot (`bootcmd`): mounts each shared folder the VM lists —
    /// `vireo.share=TAG[:ro][@/MOUNT/POINT]` (SharedFolder.guestListing), which the qemu engine
    /// puts in the SMBIOS OEM strings (type 11) and the kvm engine (which has no SMBIOS) on the
    /// kernel command line, from the definition at each start — at its mount point, /mnt/TAG by
    /// default. So a share added later with `vireo share add` is mounted at the next boot too,
    /// without a new seed. Tags and mount points are letters, digits, '.', '_', '-' (and '/')
    /// (MachineRules); the sed keeps nothing else, and each field is marked with an `x` so an
    /// absent one still holds its place for `read`.
    public static let mountSharesScript = """
        { for raw in /sys/firmware/dmi/entries/11-*/raw; do [ -r "$raw" ] && tr '\\000' '\\n' < "$raw"; done; \
        tr ' ' '\\n' < /proc/cmdline; } | \
        sed -n 's/.*vireo\\.share=\\([A-Za-z0-9._-]*\\)\\(:ro\\)\\{0,1\\}\\(@\\/[A-Za-z0-9._\\/-]*\\)\\{0,1\\}$/\\1 x\\2 x\\3/p' | \
        while read -r tag ro at; do mp=${at#x@}; [ "$mp" = x ] && mp="/mnt/$tag"; mountpoint -q "$mp" && continue; mkdir -p "$mp"; \
        mount -t virtiofs $([ "$ro" = x:ro ] && echo -o ro) "$tag" "$mp" || echo "vireo: cannot mount shared folder $tag at $mp" >&2; done
        """

    /// `#cloud-config` in JSON form (JSON is YAML), so nothing the user typed needs YAML escaping.
    /// No `ssh_pwauth`: setting it makes cloud-init restart sshd late in the first boot, after it
    /// first answered, and `vireo ssh` would meet the restart; sshd's own default stands (a
    /// locked account has no password to log in with anyway).
    public static func userData(_ settings: CloudInitSettings) -> String {
        let user = User(name: settings.user, groups: ["sudo", "adm"], sudo: "ALL=(ALL) NOPASSWD:ALL", shell: "/bin/bash",
                        lock_passwd: settings.passwordHash == nil, passwd: settings.passwordHash,
                        ssh_authorized_keys: settings.authorizedKeys)
        let data = UserData(users: [user], disable_root: true, manage_etc_hosts: true, bootcmd: [["sh", "-c", mountSharesScript]])
        return "#cloud-config\n" + json(data) + "\n"
    }

    public static func metaData(_ settings: CloudInitSettings) -> String {
        json(["instance-id": settings.instanceID, "local-hostname": settings.hostname]) + "\n"
    }

    struct Match: Encodable {
        var macaddress: String
    }

    struct Ethernet: Encodable {
        var match: Match
        var set_name: String
        var dhcp4: Bool
        var optional: Bool?

        enum CodingKeys: String, CodingKey { case match, set_name = "set-name", dhcp4, optional }
    }

    struct NetworkConfig: Encodable {
        var version: Int
        var ethernets: [String: Ethernet]
    }

    /// Version 2: DHCP on every card, found by its MAC and named ethN (N its place in the VM),
    /// whatever the image's naming scheme. Only the first card is waited for at boot. A clone
    /// (new MACs) gets a new seed and instance ID, so this is applied again there.
    public static func networkConfig(macs: [String]) -> String {
        var ethernets: [String: Ethernet] = [:]
        for (index, mac) in macs.enumerated() {
            ethernets["eth\(index)"] = Ethernet(match: Match(macaddress: mac.lowercased()), set_name: "eth\(index)", dhcp4: true,
                                                optional: index == 0 ? nil : true)
        }
        return json(NetworkConfig(version: 2, ethernets: ethernets)) + "\n"
    }

    static func json<T: Encodable>(_ value: T) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(value) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    /// Writes the seed volume to `path` (replacing it atomically) with genisoimage, as
    /// cloud-init's documentation and Debian's cloud-localds make it (Rock Ridge and Joliet
    /// names), or xorriso's mkisofs emulation where genisoimage is missing. genisoimage first:
    /// it takes ~10 ms where xorriso takes ~100, most of a `vireo create --image`.
    public static func write(_ settings: CloudInitSettings, macs: [String], to path: String) throws(LibraryError) {
        try writeVolume([("user-data", userData(settings)), ("meta-data", metaData(settings)), ("network-config", networkConfig(macs: macs))],
                        to: path)
    }

    /// A `cidata` volume holding `files` (name, text), as cloud-init's NoCloud source (and
    /// Subiquity's autoinstall) find it.
    public static func writeVolume(_ files: [(String, String)], to path: String) throws(LibraryError) {
        let tool: (path: String, leading: [String])
        if let genisoimage = HostTools.find("genisoimage") {
            tool = (genisoimage, [])
        } else if let xorriso = HostTools.find("xorriso") {
            tool = (xorriso, ["-as", "mkisofs"])
        } else {
            throw .invalidValue(field: "image", reason: "the cloud-init seed is made with genisoimage (or xorriso), and neither is installed; install Debian's `genisoimage` package")
        }
        let staging = path + ".d-\(getpid())"
        try? HostFiles.removeTree(staging)
        try HostFiles.makeDirectory(staging)
        defer { try? HostFiles.removeTree(staging) }
        for (name, text) in files { try HostFiles.writeAtomically(Array(text.utf8), to: staging + "/" + name) }
        let temporary = path + ".new"
        unlink(temporary)
        let (status, output) = HostCommand.run(tool.path, tool.leading + ["-quiet", "-output", temporary, "-volid", "cidata", "-joliet", "-rock"]
                                                                       + files.map { staging + "/" + $0.0 })
        guard status == 0, HostFiles.exists(temporary) else {
            unlink(temporary)
            throw .io(operation: "\(HostFiles.lastComponent(of: tool.path)) (make the cloud-init seed, status \(status): \(output.suffix(400)))", path: temporary, errno: EIO)
        }
        guard rename(temporary, path) == 0 else {
            let code = errno
            unlink(temporary)
            throw .io(operation: "rename", path: path, errno: code)
        }
    }
}

/// The library's own SSH key pair (`$VIREO_HOME/ssh/id_ed25519`), made on first use like
/// Multipass's: every cloud-init VM authorises it, and `vireo ssh` logs in with it.
public struct LibrarySSHKey: Sendable {
    public let directory: String
    public var privateKey: String { directory + "/id_ed25519" }
    public var publicKey: String { privateKey + ".pub" }

    public init(libraryRoot: String) { directory = libraryRoot + "/ssh" }

    /// The public key line, making the pair first if there is none.
    public func ensure() throws(LibraryError) -> String {
        if !HostFiles.exists(publicKey) || !HostFiles.exists(privateKey) {
            guard let keygen = HostTools.find("ssh-keygen") else {
                throw .invalidValue(field: "image", reason: "making the library's SSH key needs ssh-keygen; install Debian's `openssh-client` package")
            }
            try HostFiles.makeDirectories(HostFiles.parent(of: directory))
            try HostFiles.makeDirectory(directory, mode: 0o700)
            // Made under a temporary name and moved into place, so two creates at once agree on one pair.
            let temporary = directory + "/.new-\(getpid())"
            unlink(temporary); unlink(temporary + ".pub")
            var host = [CChar](repeating: 0, count: 256)
            gethostname(&host, host.count - 1)
            let hostname = String(decoding: host.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let (status, output) = HostCommand.run(keygen, ["-q", "-t", "ed25519", "-N", "", "-C", "vireo@\(hostname)", "-f", temporary])
            guard status == 0 else {
                throw .io(operation: "ssh-keygen (status \(status): \(output.trimmingWhitespace()))", path: temporary, errno: EIO)
            }
            if link(temporary, privateKey) == 0 { _ = rename(temporary + ".pub", publicKey) }
            unlink(temporary); unlink(temporary + ".pub")
        }
        let keys = try SSHPublicKey.read(file: publicKey, field: "library key")
        return keys[0]
    }
}
