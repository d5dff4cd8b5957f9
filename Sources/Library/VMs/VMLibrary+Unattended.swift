import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Unattended installs (docs/unattended.md): made at create, finished when the installer says so.
extension VMLibrary {
    /// The installer `--unattended` will answer, or nil without `--unattended`; what cannot go
    /// with it is refused by name.
    static func checkUnattendedRequest(_ request: CreateRequest) throws(LibraryError) -> DetectedInstaller? {
        guard request.unattended != nil else { return nil }
        guard let iso = request.iso else {
            throw .invalidValue(field: "unattended", reason: "needs --iso FILE: the installer ISO whose questions Vireo answers")
        }
        for (given, field, what) in [(request.withoutDisk, "no_disk", "a disk to install on"), (request.kernel != nil, "kernel", "the installer's own kernel"),
                                     (request.engine == .kvm, "engine", "the qemu engine (firmware and a CD-ROM drive)"),
                                     (request.secureBoot == true, "secure_boot", "no Secure Boot while it runs (the installer's kernel is booted directly, and no enrolled key signs it; turn it on after the install with `vireo set NAME --secure-boot`)")]
            where given {
            throw .invalidValue(field: field, reason: "an unattended install needs \(what)")
        }
        return try DetectedInstaller.detect(iso: iso)
    }

    /// The checked settings: user and host name by Debian's rules, the password hashed, keys read.
    func makeUnattendedSettings(_ request: UnattendedRequest, vmName: String, installer: DetectedInstaller) throws(LibraryError) -> UnattendedSettings {
        let user = request.user ?? installer.family.rawValue
        try CloudInitSettings.validate(user: user)
        let hostname = try CloudInitSettings.hostname(given: request.hostname, vmName: vmName)
        let locale = request.locale ?? UnattendedSettings.defaultLocale
        try UnattendedSettings.validate(locale: locale)
        let timezone = request.timezone ?? UnattendedSettings.defaultTimezone
        try UnattendedSettings.validate(timezone: timezone)
        try UnattendedSettings.validate(packages: request.packages)
        if let name = request.fullName { try UnattendedSettings.validateLine(name, field: "full_name", limit: 100, forbidden: [":", ","]) }
        if let command = request.postInstallCommand { try UnattendedSettings.validateLine(command, field: "post_install_command", limit: 4096) }
        var mirror: String?
        switch request.mirror {
        case "none"?:
            guard installer.family == .ubuntu || installer.packagesOnMedium else {
                throw .invalidValue(field: "mirror", reason: "this Debian ISO carries no packages (a netboot installer), so it installs from a mirror; give --mirror URL or leave it out for \(UnattendedSettings.defaultMirror)")
            }
        case let given?:
            try UnattendedSettings.validate(mirror: given)
            mirror = given
        case nil:
            if installer.family == .debian { mirror = UnattendedSettings.defaultMirror }
        }
        if installer.family == .ubuntu, mirror != nil {
            throw .invalidValue(field: "mirror", reason: "Ubuntu's installer takes its archive from the ISO and its own configuration; --mirror is for Debian")
        }
        var keys: [String] = []
        for file in request.keyFiles { keys += try SSHPublicKey.read(file: file) }
        for key in keys where key.contains("'") {
            throw .invalidValue(field: "ssh_key_files", reason: "a key's comment holds a quote ('), which the installer's shell would read; remove it from the comment")
        }
        let hash = try CloudInitSettings.hashPassword(request.password)
        return UnattendedSettings(user: user, fullName: request.fullName, passwordHash: hash, hostname: hostname, locale: locale,
                                  timezone: timezone, packages: request.packages, postInstallCommand: request.postInstallCommand,
                                  authorizedKeys: keys, mirror: mirror)
    }

    /// Takes the installer's kernel and initrd out of the ISO into the VM's directory and adds
    /// the answers: Debian's preseed file appended to the initrd as a second cpio archive,
    /// Ubuntu's autoinstall on a `cidata` volume. The ISO is only read.
    func writeInstaller(_ install: UnattendedInstall, definition: VMDefinition, into bundle: VMBundle) throws(LibraryError) {
        guard let iso = definition.iso else { throw .invalidValue(field: "unattended", reason: "needs the installer ISO") }
        let image = try ISO9660Image(path: iso)
        defer { image.close() }
        // Bounds well above any real installer's (Debian's initrds are tens of MiB, Ubuntu's
        // casper initrd a few hundred): a crafted ISO does not fill the library with gigabytes.
        for (inside, file, limit) in [(install.installer.kernel, install.kernel, UInt32(256 << 20)), (install.installer.initrd, install.initrd, UInt32(1 << 30))] {
            guard let entry = try image.lookup(inside), !entry.isDirectory else {
                throw .invalidValue(field: "iso", reason: "\(iso) no longer has \(inside)")
            }
            guard entry.size <= limit else {
                throw .invalidValue(field: "iso", reason: "\(iso): \(inside) is \(entry.size) bytes, more than the \(limit >> 20) MiB an installer's has; the ISO is damaged or not an installer")
            }
            try image.copy(entry, to: bundle.resolve(file))
        }
        switch install.installer.family {
        case .debian:
            let disk = definition.diskBus == .sata ? "/dev/sda" : "/dev/vda"
            let preseed = UnattendedAnswers.preseed(install.settings, installer: install.installer, disk: disk, uefi: definition.firmware == .uefi)
            let archive = UnattendedAnswers.cpio([("preseed.cfg", Array(preseed.utf8))])
            try Self.append(archive, to: bundle.resolve(install.initrd))
        case .ubuntu:
            guard let seed = install.seed else { throw .invalidValue(field: "unattended", reason: "an Ubuntu install needs its seed volume") }
            try CloudInitSeed.writeVolume([("user-data", UnattendedAnswers.autoinstallUserData(install.settings)),
                                           ("meta-data", "{\"instance-id\": \"\(definition.uuid)\"}\n")], to: bundle.resolve(seed))
        }
    }

    /// Appends `bytes` to `path`, after padding it to 4 bytes (cpio archives in an initramfs
    /// start 4-byte aligned).
    static func append(_ bytes: [UInt8], to path: String) throws(LibraryError) {
        let fd = open(path, O_WRONLY | O_APPEND | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        let size = Int(HostFiles.size(path))
        let data = [UInt8](repeating: 0, count: (4 - size % 4) % 4) + bytes
        var written = 0
        while written < data.count {
            let count = data.withUnsafeBytes { write(fd, $0.baseAddress! + written, data.count - written) }
            guard count > 0 else { throw .io(operation: "write", path: path, errno: errno) }
            written += count
        }
        guard fsync(fd) == 0 else { throw .io(operation: "fsync", path: path, errno: errno) }
    }

    /// Ends a finished unattended install: the ISO is ejected, the answers and the installer's
    /// files removed (the answers hold the password's hash), and the VM boots its disk from now
    /// on. Called with the VM's lock held, when it is off.
    public func finishUnattended(_ bundle: VMBundle, _ definition: VMDefinition) throws(LibraryError) -> VMDefinition {
        var finished = definition.withoutUnattended()
        finished.iso = nil
        try bundle.save(finished)
        Self.removeInstallerFiles(bundle)
        return finished
    }

    static func removeInstallerFiles(_ bundle: VMBundle) {
        for file in [UnattendedInstall.kernelFile, UnattendedInstall.initrdFile, UnattendedInstall.seedFile] { unlink(bundle.resolve(file)) }
    }
}

extension UnattendedInstall {
    /// Ubuntu's seed volume as the VM's read-only disk, found by its `cidata` label.
    static func seedDisk(_ file: String) -> DiskAttachment {
        DiskAttachment(path: file, format: .raw, readOnly: true, serial: CloudInitSeed.serial)
    }
}

extension VMDefinition {
    /// The definition without its unattended install (and the seed disk it added).
    public func withoutUnattended() -> VMDefinition {
        var changed = self
        if let seed = unattended?.seed { changed.disks.removeAll { $0.path == seed } }
        changed.unattended = nil
        return changed
    }
}
