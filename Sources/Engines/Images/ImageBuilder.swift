import CHostSupport
import FoundationEssentials
import Library
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// What a built image is made of. Two builds of one recipe are interchangeable (the build cache
/// keys on `key`); the builder's version is part of it, so changing how images are made
/// invalidates old cached builds.
public struct ImageRecipe: Sendable, Equatable {
    /// Bumped whenever the image's configuration below changes.
    public static let builderVersion = 2

    public struct Distribution: Sendable, Equatable {
        public var identifier: String
        public var release: String
        public var description: String
        public var osType: String
    }

    public static let distributions = [
        Distribution(identifier: "debian-12", release: "bookworm", description: "Debian 12 (bookworm)", osType: "debian-64"),
    ]

    /// What every image has: its kernel and initramfs tools, systemd, SSH, cloud-init and
    /// ifupdown with a DHCP client (cloud-init renders its network configuration for them), and
    /// qemu-guest-agent for `vireo exec` (its udev rule starts it when the VM has the port);
    /// Debian's signed shim and GRUB for the EFI system partition (UEFI and Secure Boot), and
    /// cloud-guest-utils, whose growpart cloud-init needs to grow the root partition.
    /// python3-cffi-backend is named because debootstrap does not resolve the virtual packages
    /// python3-cryptography depends on.
    public static let basePackages = [
        "linux-image-amd64", "initramfs-tools", "systemd-sysv", "udev", "dbus", "openssh-server", "cloud-init",
        "python3-cffi-backend", "ifupdown", "isc-dhcp-client", "iproute2", "netbase", "sudo", "ca-certificates", "qemu-guest-agent",
        "shim-signed", "grub-efi-amd64-signed", "cloud-guest-utils",
    ]

    public static let defaultMirror = "http://deb.debian.org/debian"
    public static let defaultSize: UInt64 = 4 << 30
    /// Below this no Debian with a kernel and cloud-init fits; checked before anything is fetched.
    public static let minimumSize: UInt64 = 1 << 30

    public var distribution: Distribution
    public var extraPackages: [String]
    public var mirror: String
    public var sizeBytes: UInt64

    public init(distribution identifier: String, extraPackages: [String] = [], mirror: String? = nil,
                size: UInt64? = nil) throws(LibraryError) {
        guard let distribution = Self.distributions.first(where: { $0.identifier == identifier }) else {
            throw .invalidValue(field: "DISTRIBUTION", reason: "'\(identifier)' is not one Vireo can build; choose one of \(Self.distributions.map(\.identifier).joined(separator: ", "))")
        }
        self.distribution = distribution
        for package in extraPackages {
            // Debian policy: lower-case letters, digits, '+', '-', '.'; at least two characters, starting alphanumeric.
            let valid = package.utf8.count >= 2 && package.unicodeScalars.allSatisfy { ($0 >= "a" && $0 <= "z") || ($0 >= "0" && $0 <= "9") || "+-.".unicodeScalars.contains($0) }
                && (package.first?.isLetter == true || package.first?.isNumber == true)
            guard valid else {
                throw .invalidValue(field: "packages", reason: "'\(package)' is not a Debian package name (lower-case letters, digits, '+', '-' and '.', starting with a letter or digit)")
            }
        }
        self.extraPackages = extraPackages
        let mirror = mirror ?? Self.defaultMirror
        guard mirror.hasPrefix("http://") || mirror.hasPrefix("https://") || mirror.hasPrefix("file:///"),
              !mirror.contains(" "), !mirror.contains(",") else {
            throw .invalidValue(field: "mirror", reason: "'\(mirror)' is not a Debian mirror URL (http://, https:// or file:///, like \(Self.defaultMirror))")
        }
        self.mirror = mirror
        let size = size ?? Self.defaultSize
        guard size >= Self.minimumSize else {
            throw .invalidValue(field: "size", reason: "\(Size.describe(size)) is smaller than the \(Size.describe(Self.minimumSize)) a \(identifier) image needs at the least (about 1 GiB of files); give --size 2G or more")
        }
        guard size % 512 == 0, size <= 16 << 40 else {
            throw .invalidValue(field: "size", reason: "\(size) bytes must be a whole number of 512-byte sectors, at most 16 TiB")
        }
        sizeBytes = size
    }

    public var packages: [String] { Self.basePackages + extraPackages.filter { !Self.basePackages.contains($0) } }

    /// The recipe as text, and its stable hash.
    public var canonical: String {
        "vireo-image-builder \(Self.builderVersion)\ndistribution \(distribution.identifier) \(distribution.release)\nmirror \(mirror)\npackages \(packages.sorted().joined(separator: ","))\nsize \(sizeBytes)\n"
    }

    public var key: String { String(StableHash.fnv1a(canonical), radix: 16) }
}

/// Builds images from Debian's packages with debootstrap (Debian's own tool), as root: a
/// minimal system in a directory, configured for Vireo's devices and cloud-init, made into an
/// ext4 file system (mke2fs -d, no loop device or mount) and a compressed qcow2 (qemu-img).
public struct ImageBuilder: Sendable {
    public let store: ImageStore
    /// Progress lines for people (phases, packages, bytes).
    public let progress: @Sendable (String) -> Void

    public init(store: ImageStore, progress: @escaping @Sendable (String) -> Void) {
        self.store = store
        self.progress = progress
    }

    public static let environment = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", "HOME=/root"]

    /// Builds image `name`; with `cacheDirectory`, a build of the same recipe kept there is
    /// imported instead (checksums verified), and a new build is kept there.
    public func build(_ recipe: ImageRecipe, name: String, cacheDirectory: String?) throws(LibraryError) -> ImageManifest {
        try ImageName.validate(name)
        guard !store.exists(name) else {
            throw .invalidValue(field: "name", reason: "an image named '\(name)' already exists; delete it first (`vireo image delete \(name)`) or give another --name")
        }
        if let cacheDirectory {
            let cached = cacheDirectory + "/\(recipe.distribution.identifier)-\(recipe.key).tar"
            if HostFiles.exists(cached) {
                progress("reusing the build of this recipe kept in \(cached)")
                do throws(LibraryError) {
                    return try ImageArchive.importArchive(cached, as: name, store: store)
                } catch {
                    progress("the kept build cannot be used (\(error)); building afresh")
                    unlink(cached)
                }
            }
        }
        guard geteuid() == 0 else {
            throw .invalidValue(field: "vireo image build", reason: "building an image needs root (debootstrap installs packages as root in a chroot); run it with sudo")
        }
        var tools: [String: String] = [:]
        for (tool, package) in [("debootstrap", "debootstrap"), ("chroot", "coreutils"), ("mkfs.ext4", "e2fsprogs"), ("qemu-img", "qemu-utils"),
                                ("sfdisk", "fdisk"), ("mformat", "mtools"), ("mmd", "mtools"), ("mcopy", "mtools"), ("dd", "coreutils")] {
            guard let path = HostTools.find(tool) else {
                throw .invalidValue(field: "vireo image build", reason: "\(tool) is not installed; install Debian's `\(package)` package")
            }
            tools[tool] = path
        }
        let (staging, lock) = try store.makeStaging("building-\(name)")
        defer { lock.unlock() }
        do throws(LibraryError) {
            let manifest = try buildInto(staging, recipe: recipe, name: name, tools: tools)
            if let cacheDirectory {
                do throws(LibraryError) {
                    try HostFiles.makeDirectories(cacheDirectory)
                    let cached = cacheDirectory + "/\(recipe.distribution.identifier)-\(recipe.key).tar"
                    try ImageArchive.export(manifest, from: store.path(of: manifest.name), to: cached)
                    progress("kept this build in \(cached) for the next build of the same recipe")
                } catch {
                    progress("warning: could not keep the build in \(cacheDirectory): \(error)")
                }
            }
            return manifest
        } catch {
            if HostMounts.hasMount(under: staging) {
                progress("warning: \(staging) still has a file system mounted inside; unmount it and delete the directory")
            } else {
                try? HostFiles.removeTree(staging)
            }
            throw error
        }
    }

    private func buildInto(_ staging: String, recipe: ImageRecipe, name: String, tools: [String: String]) throws(LibraryError) -> ImageManifest {
        let root = staging + "/root"
        let started = Date()
        // 1. debootstrap, with its downloads kept for the next build.
        try HostFiles.makeDirectories(store.packageCache)
        progress("[1/5] debootstrap \(recipe.distribution.release) from \(recipe.mirror): \(recipe.packages.count) packages asked for, with their dependencies")
        var tracker = DebootstrapProgress(cache: store.packageCache, report: progress)
        let bootstrap = StreamingCommand.run(tools["debootstrap"] ?? "debootstrap", [
            "--variant=minbase", "--components=main", "--cache-dir=\(store.packageCache)",
            "--include=\(recipe.packages.joined(separator: ","))", recipe.distribution.release, root, recipe.mirror,
        ], environment: Self.environment) { line in tracker.consume(line) }
        guard bootstrap.status == 0 else {
            let log = (try? HostFiles.readAll(root + "/debootstrap/debootstrap.log")).map { String(decoding: $0.suffix(1500), as: UTF8.self) } ?? ""
            throw .invalidValue(field: "vireo image build", reason: "debootstrap failed (status \(bootstrap.status)): \(bootstrap.tail.suffix(8).joined(separator: " | "))\(log.isEmpty ? "" : "; its log ends: " + log)")
        }
        tracker.finish()

        // 2. Configuration for Vireo's machines and cloud-init.
        progress("[2/5] configuring: fstab, networking, cloud-init (NoCloud), the initramfs with Vireo's virtio modules")
        let uuid = UUID().uuidString.lowercased()
        try configure(root, recipe: recipe, rootUUID: uuid)
        let initramfs = StreamingCommand.run(tools["chroot"] ?? "chroot", [root, "update-initramfs", "-u", "-k", "all"], environment: Self.environment) { _ in }
        guard initramfs.status == 0 else {
            throw .invalidValue(field: "vireo image build", reason: "update-initramfs in the new system failed (status \(initramfs.status)): \(initramfs.tail.suffix(6).joined(separator: " | "))")
        }
        let listed = HostCommand.run(tools["chroot"] ?? "chroot", [root, "dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Status}\n"])
        guard listed.status == 0 else { throw .invalidValue(field: "vireo image build", reason: "dpkg-query in the new system failed: \(listed.output.suffix(400))") }
        let packages = listed.output.split(separator: "\n").compactMap { line -> ImagePackage? in
            let fields = line.split(separator: "\t", omittingEmptySubsequences: false)
            guard fields.count == 3, fields[2] == "installed" else { return nil }
            return ImagePackage(name: String(fields[0]), version: String(fields[1]))
        }
        for wanted in recipe.packages where !packages.contains(where: { $0.name == wanted }) {
            throw .invalidValue(field: "vireo image build", reason: "package \(wanted) is not installed in the new system (debootstrap left it unconfigured); see \(root)/debootstrap/debootstrap.log")
        }
        let boot = try HostFiles.entries(of: root + "/boot")
        guard let kernel = boot.filter({ $0.hasPrefix("vmlinuz-") }).sorted(by: BootFiles.versionOrder).last else {
            throw .invalidValue(field: "vireo image build", reason: "the new system has no kernel in /boot")
        }
        let version = String(kernel.dropFirst("vmlinuz-".count))
        guard boot.contains("initrd.img-" + version) else {
            throw .invalidValue(field: "vireo image build", reason: "the new system has no initramfs for kernel \(version)")
        }
        // Proven, not assumed: the kvm engine's disks are virtio-mmio devices.
        let contents = HostCommand.run(tools["chroot"] ?? "chroot", [root, "lsinitramfs", "/boot/initrd.img-" + version], capacity: 16 << 20)
        for module in ["virtio_mmio.ko", "virtio_blk.ko", "virtio_net.ko", "virtio_pci.ko"] where !contents.output.contains(module) {
            throw .invalidValue(field: "vireo image build", reason: "the initramfs lacks \(module) (lsinitramfs status \(contents.status))")
        }
        try HostFiles.copySparse(root + "/boot/" + kernel, staging + "/vmlinuz")
        try HostFiles.copySparse(root + "/boot/initrd.img-" + version, staging + "/initrd.img")
        // The boot loader for UEFI machines: Debian's shim (signed by Microsoft's UEFI CA, which
        // OVMF's Secure Boot store trusts) and GRUB (signed by Debian, whose key shim carries).
        // GRUB loads /vmlinuz and /initrd.img, the links Debian keeps pointing at the newest
        // kernel, so a kernel update in the guest is what the next UEFI boot runs.
        var efiFiles: [(source: String, name: String)] = []
        for (path, name) in BuiltDisk.efiLoaders {
            // A regular file of the tree, never a link (which would resolve against the host's
            // files, not the tree's).
            var status = stat()
            guard lstat(root + path, &status) == 0, status.st_mode & S_IFMT == S_IFREG else {
                throw .invalidValue(field: "vireo image build", reason: "the new system has no file \(path) for the EFI system partition (shim-signed and grub-efi-amd64-signed install it)")
            }
            try HostFiles.copySparse(root + path, staging + "/" + name)
            efiFiles.append((staging + "/" + name, name))
        }
        for (link, target) in [("/vmlinuz", "boot/" + kernel), ("/initrd.img", "boot/initrd.img-" + version)] {
            var status = stat()
            if lstat(root + link, &status) != 0 { guard symlink(target, root + link) == 0 else { throw .io(operation: "symlink", path: root + link, errno: errno) } }
        }
        try cleanUp(root)
        let commandLine = "root=UUID=\(uuid) ro console=tty0 console=ttyS0 net.ifnames=0"

        // 3. The disk: a GPT with the EFI system partition and the root file system, sized as
        // asked, checked to fit first.
        let used = Self.usedBytes(root)
        let needed = used + used / 6 + (160 << 20)
        let rootBytes = BuiltDisk.rootBytes(disk: recipe.sizeBytes)
        guard rootBytes >= needed else {
            throw .invalidValue(field: "size", reason: "\(Size.describe(recipe.sizeBytes)) is smaller than the \(Size.describe(needed + BuiltDisk.overhead)) this image needs (its files take \(Size.describe(used)), plus room for the file system and the \(Size.describe(BuiltDisk.overhead)) of partition table and EFI system partition); give --size \(((needed + BuiltDisk.overhead) >> 30) + 1)G or more")
        }
        progress("[3/5] making the disk: an EFI system partition with shim and GRUB, and an ext4 file system of \(Size.describe(rootBytes)) from \(Size.describe(used)) of files")
        let rootRaw = staging + "/root.raw"
        let made = HostCommand.run(tools["mkfs.ext4"] ?? "mkfs.ext4", ["-q", "-F", "-t", "ext4", "-L", "vireo-root", "-U", uuid, "-d", root, rootRaw, "\(rootBytes / 1024)k"])
        guard made.status == 0 else { throw .invalidValue(field: "vireo image build", reason: "mkfs.ext4 failed (status \(made.status)): \(made.output.suffix(600))") }
        try HostFiles.removeTree(root)
        let grubConfig = BuiltDisk.grubConfig(rootUUID: uuid, commandLine: commandLine)
        try HostFiles.writeAtomically(Array(grubConfig.utf8), to: staging + "/grub.cfg", mode: 0o644)
        efiFiles.append((staging + "/grub.cfg", "grub.cfg"))
        let raw = staging + "/disk.raw"
        try BuiltDisk.assemble(raw, size: recipe.sizeBytes, rootFileSystem: rootRaw, efiFiles: efiFiles, staging: staging, tools: tools)
        for file in [rootRaw, staging + "/grub.cfg"] + BuiltDisk.efiLoaders.map({ staging + "/" + $0.name }) { unlink(file) }

        // 4. Compressed qcow2: what the store keeps and VMs' overlays rest on.
        progress("[4/5] compressing into qcow2")
        let converted = HostCommand.run(tools["qemu-img"] ?? "qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zlib", raw, staging + "/disk.qcow2"])
        guard converted.status == 0 else { throw .invalidValue(field: "vireo image build", reason: "qemu-img convert failed (status \(converted.status)): \(converted.output.suffix(600))") }
        unlink(raw)

        // 5. The manifest with every file's checksum, then into the store in one rename.
        progress("[5/5] checksums and manifest")
        var manifest = ImageManifest(name: name, description: "\(recipe.distribution.description), built by debootstrap from \(recipe.mirror)",
                                     origin: "build", osType: recipe.distribution.osType, disk: "disk.qcow2", virtualSize: recipe.sizeBytes)
        manifest.release = recipe.distribution.release
        manifest.kernel = "vmlinuz"
        manifest.initrd = "initrd.img"
        manifest.commandLine = commandLine
        manifest.cloudInit = true
        manifest.kvmEngineBootable = true
        manifest.efiBootable = true
        manifest.packages = packages.sorted { $0.name < $1.name }
        manifest.recipe = recipe.canonical
        let installed = try store.install(staging: staging, manifest: manifest, fileNames: ["disk.qcow2", "vmlinuz", "initrd.img"])
        let seconds = Int(Date().timeIntervalSince(started))
        progress("built image '\(name)' in \(seconds / 60) min \(seconds % 60) s: \(packages.count) packages, kernel \(version), disk \(Size.describe(HostFiles.size(store.path(of: name) + "/disk.qcow2"))) compressed")
        return installed
    }

    /// The files that make the system fit Vireo's VMs.
    private func configure(_ root: String, recipe: ImageRecipe, rootUUID: String) throws(LibraryError) {
        // The guest's files have the guest's modes (readable by its users), whatever private
        // umask vireo itself keeps for the host's files.
        func write(_ path: String, _ text: String) throws(LibraryError) {
            var directory = root
            for component in HostFiles.parent(of: path).split(separator: "/") {
                directory += "/" + component
                if !HostFiles.isDirectory(directory) {
                    try HostFiles.makeDirectory(directory, mode: 0o755)
                    chmod(directory, 0o755)
                }
            }
            try HostFiles.writeAtomically(Array(text.utf8), to: root + path)
            chmod(root + path, 0o644)
        }
        try write("/etc/fstab", "# The root file system, by the UUID `vireo image build` gave it.\nUUID=\(rootUUID) / ext4 errors=remount-ro 0 1\n")
        try write("/etc/hostname", "debian\n")
        try write("/etc/hosts", "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n")
        try write("/etc/network/interfaces", "# cloud-init writes the VM's cards into interfaces.d from its seed.\nauto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n")
        try write("/etc/apt/sources.list", "deb \(recipe.mirror) \(recipe.distribution.release) main\ndeb \(recipe.mirror) \(recipe.distribution.release)-updates main\ndeb http://security.debian.org/debian-security \(recipe.distribution.release)-security main\n")
        // Only the NoCloud seed Vireo attaches (never a metadata server on the network); keep
        // the sources list; no locale generation (C.UTF-8 is built in).
        try write("/etc/cloud/cloud.cfg.d/90-vireo.cfg", """
            # Written by vireo image build.
            datasource_list: [ NoCloud, None ]
            apt:
              preserve_sources_list: true
            locale: false

            """)
        // The modules Vireo's devices need, in the initramfs: virtio-mmio (the kvm engine's
        // transport, found through ACPI), virtio-pci (the qemu engine's), the disk, the network
        // card, the root file system.
        try write("/etc/initramfs-tools/modules", "virtio_mmio\nvirtio_pci\nvirtio_blk\nvirtio_net\next4\n")
        // A new machine ID on each VM's first boot; host keys are cloud-init's to make per VM.
        try write("/etc/machine-id", "")
        unlink(root + "/var/lib/dbus/machine-id")
        for entry in (try? HostFiles.entries(of: root + "/etc/ssh")) ?? [] where entry.hasPrefix("ssh_host_") {
            unlink(root + "/etc/ssh/" + entry)
        }
    }

    /// What only the build needed: downloaded package lists and archives, logs of the build.
    private func cleanUp(_ root: String) throws(LibraryError) {
        for directory in ["/var/lib/apt/lists", "/var/cache/apt/archives", "/debootstrap"] {
            for entry in (try? HostFiles.entries(of: root + directory)) ?? [] where entry != "partial" && entry != "lock" {
                try HostFiles.removeTree(root + directory + "/" + entry)
            }
        }
        for file in ["/var/cache/apt/pkgcache.bin", "/var/cache/apt/srcpkgcache.bin", "/var/log/dpkg.log", "/var/log/alternatives.log",
                     "/var/log/bootstrap.log", "/var/cache/debconf/config.dat-old", "/var/cache/debconf/templates.dat-old"] {
            unlink(root + file)
        }
        try? HostFiles.removeTree(root + "/debootstrap")
    }

    /// Bytes the tree takes on disk (du, without following links or crossing mounts).
    static func usedBytes(_ root: String) -> UInt64 {
        let (status, output) = HostCommand.run("du", ["-s", "-x", "-B1", root])
        guard status == 0, let first = output.split(whereSeparator: { $0 == "\t" || $0 == " " }).first, let bytes = UInt64(first) else { return 0 }
        return bytes
    }
}

/// Turns debootstrap's `I:` lines into a few progress lines: packages validated (the set to
/// install), then unpacked and configured out of that set, with the bytes downloaded.
struct DebootstrapProgress {
    let cache: String
    let report: @Sendable (String) -> Void
    var validated = 0
    var extracted = 0
    var unpacked = 0
    var configured = 0
    var phases: Set<String> = []

    init(cache: String, report: @escaping @Sendable (String) -> Void) {
        self.cache = cache
        self.report = report
    }

    mutating func consume(_ line: String) {
        if line.hasPrefix("I: Validating ") && !line.hasPrefix("I: Validating Packages") {
            validated += 1
            if validated % 50 == 0 { report("  fetched \(validated) packages (\(Size.describe(downloadedBytes())) in the package cache)") }
        } else if line.hasPrefix("I: Extracting ") {
            enter("extracting the essential packages (\(validated) fetched, \(Size.describe(downloadedBytes())))")
            extracted += 1
        } else if line.hasPrefix("I: Unpacking ") && !line.hasPrefix("I: Unpacking the base system") {
            enter("installing")
            unpacked += 1
            if unpacked % 50 == 0 { report("  unpacked \(unpacked) of \(validated) packages") }
        } else if line.hasPrefix("I: Configuring ") {
            enter("configuring")
            configured += 1
            if configured % 50 == 0 { report("  configured \(configured) of \(validated) packages") }
        } else if line.hasPrefix("W: ") || line.hasPrefix("E: ") {
            report("  debootstrap: \(line)")
        }
    }

    /// debootstrap goes back and forth between unpacking and configuring; each is told once.
    mutating func enter(_ name: String) {
        let key = String(name.prefix(while: { $0 != " " }))
        guard phases.insert(key).inserted else { return }
        report("  \(name)")
    }

    func finish() {
        report("  installed \(validated) packages (\(Size.describe(downloadedBytes())) of packages in \(cache))")
    }

    func downloadedBytes() -> UInt64 {
        ((try? HostFiles.entries(of: cache)) ?? []).filter { $0.hasSuffix(".deb") }.reduce(0) { $0 + HostFiles.size(cache + "/" + $1) }
    }
}

/// Runs a command with its output read line by line as it comes (stdout and stderr together),
/// keeping the last lines for error messages.
enum StreamingCommand {
    /// `path` with `arguments`, under the umask a system being built expects (022), not vireo's
    /// own private one: debootstrap and maintainer scripts make the guest's files.
    static func withSystemUmask(_ path: String, _ arguments: [String]) -> (String, [String]) {
        ("/bin/sh", ["-c", "umask 022 && exec \"$0\" \"$@\"", path] + arguments)
    }

    static func run(_ path: String, _ arguments: [String], environment: [String]?, onLine: (String) -> Void) -> (status: Int32, tail: [String]) {
        let (path, arguments) = withSystemUmask(path, arguments)
        var tail: [String] = []
        let (status, output) = withoutActuallyEscaping(onLine) { onLine in
            HostCommand.run(path, arguments, capacity: 0, environment: environment) { line in
                onLine(line)
                tail.append(line)
                if tail.count > 40 { tail.removeFirst() }
            }
        }
        return (status, status < 0 && tail.isEmpty ? [output] : tail)
    }
}

/// A built image's disk: a GPT with an EFI system partition holding Debian's signed shim and
/// GRUB (so UEFI machines, Secure Boot on or off, boot it through its own boot loader, as an
/// installed Debian boots) and the root file system after it. Made without a loop device or a
/// mount: mtools writes the FAT file system, sfdisk the partition table, dd puts both in place.
enum BuiltDisk {
    static let alignment: UInt64 = 1 << 20
    static let efiStart: UInt64 = 1 << 20
    static let efiBytes: UInt64 = 63 << 20
    static let rootStart: UInt64 = efiStart + efiBytes
    /// The partition table at the front, the EFI system partition, and the last MiB, where
    /// GPT's backup header and table go.
    static let overhead: UInt64 = rootStart + alignment
    /// The signed loaders: shim is what firmware runs from the removable-media path
    /// (EFI/BOOT/BOOTX64.EFI, found with no boot entry in the variable store); it runs
    /// grubx64.efi from its own directory.
    static let efiLoaders: [(path: String, name: String)] = [("/usr/lib/shim/shimx64.efi.signed", "BOOTX64.EFI"), ("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed", "grubx64.efi")]
    static let efiSystemPartitionType = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    static let linuxFileSystemType = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

    static func rootBytes(disk: UInt64) -> UInt64 {
        disk > overhead ? (disk - overhead) / alignment * alignment : 0
    }

    /// Debian's signed GRUB, finding no configuration under its built-in prefix (EFI/debian) or
    /// /boot/grub, reads grub.cfg beside itself ($cmdpath). The kernel and initramfs are the root
    /// file system's /vmlinuz and /initrd.img links; Secure Boot has shim check the kernel's
    /// signature (Debian's) before GRUB starts it.
    static func grubConfig(rootUUID: String, commandLine: String) -> String {
        """
        # Written by vireo image build.
        set default=0
        set timeout=0
        menuentry "Debian GNU/Linux" {
        \tsearch --no-floppy --fs-uuid --set=root \(rootUUID)
        \tlinux /vmlinuz \(commandLine)
        \tinitrd /initrd.img
        }

        """
    }

    static func assemble(_ path: String, size: UInt64, rootFileSystem: String, efiFiles: [(source: String, name: String)],
                         staging: String, tools: [String: String]) throws(LibraryError) {
        func fail(_ what: String, _ result: (status: Int32, output: String)) -> LibraryError {
            .invalidValue(field: "vireo image build", reason: "\(what) failed (status \(result.status)): \(result.output.suffix(600))")
        }
        func makeFile(_ file: String, bytes: UInt64) throws(LibraryError) {
            unlink(file)
            let fd = open(file, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw .io(operation: "create", path: file, errno: errno) }
            defer { close(fd) }
            guard ftruncate(fd, off_t(bytes)) == 0 else { throw .io(operation: "truncate", path: file, errno: errno) }
        }
        // The EFI system partition: FAT32 (what UEFI requires of it), its files in EFI/BOOT.
        let efi = staging + "/efi.fat"
        try makeFile(efi, bytes: efiBytes)
        defer { unlink(efi) }
        let mtoolsEnvironment = ImageBuilder.environment + ["MTOOLS_SKIP_CHECK=1"]
        let formatted = HostCommand.run(tools["mformat"] ?? "mformat", ["-i", efi, "-F", "-H", "\(efiStart / 512)", "-v", "VIREO-EFI", "::"], environment: mtoolsEnvironment)
        guard formatted.status == 0 else { throw fail("mformat (the EFI system partition)", formatted) }
        let directories = HostCommand.run(tools["mmd"] ?? "mmd", ["-i", efi, "::/EFI", "::/EFI/BOOT"], environment: mtoolsEnvironment)
        guard directories.status == 0 else { throw fail("mmd (the EFI system partition)", directories) }
        for file in efiFiles {
            let copied = HostCommand.run(tools["mcopy"] ?? "mcopy", ["-i", efi, file.source, "::/EFI/BOOT/" + file.name], environment: mtoolsEnvironment)
            guard copied.status == 0 else { throw fail("mcopy \(file.name) (the EFI system partition)", copied) }
        }
        // The partition table, then both file systems at their partitions' offsets.
        try makeFile(path, bytes: size)
        let script = staging + "/partitions.sfdisk"
        let rootBytes = rootBytes(disk: size)
        let layout = """
            label: gpt
            unit: sectors
            start=\(efiStart / 512), size=\(efiBytes / 512), type=\(efiSystemPartitionType), name="EFI system partition"
            start=\(rootStart / 512), size=\(rootBytes / 512), type=\(linuxFileSystemType), name="root"

            """
        try HostFiles.writeAtomically(Array(layout.utf8), to: script)
        defer { unlink(script) }
        let partitioned = HostCommand.run(tools["sfdisk"] ?? "sfdisk", ["--quiet", "--no-reread", "--no-tell-kernel", path], input: script)
        guard partitioned.status == 0 else { throw fail("sfdisk (the partition table)", partitioned) }
        for (file, offset) in [(efi, efiStart), (rootFileSystem, rootStart)] {
            let placed = HostCommand.run(tools["dd"] ?? "dd", ["if=\(file)", "of=\(path)", "bs=1M", "seek=\(offset / alignment)", "conv=notrunc,sparse", "status=none"])
            guard placed.status == 0 else { throw fail("dd (placing \(HostFiles.lastComponent(of: file)) in the disk)", placed) }
        }
    }
}
