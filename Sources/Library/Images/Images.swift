import CHostSupport
import DiskImage
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Image names follow VM names' rule (they are directory names and command-line words).
public enum ImageName {
    public static func validate(_ name: String) throws(LibraryError) {
        do throws(LibraryError) { try VMName.validate(name) } catch {
            throw .invalidValue(field: "image name", reason: "'\(name)' must be \(VMName.rule)")
        }
    }
}

/// One file of an image, as the manifest records it.
public struct ImageFile: Codable, Sendable, Equatable {
    public var path: String
    public var size: UInt64
    public var sha256: String

    public init(path: String, size: UInt64, sha256: String) { self.path = path; self.size = size; self.sha256 = sha256 }
}

public struct ImagePackage: Codable, Sendable, Equatable {
    public var name: String
    public var version: String

    public init(name: String, version: String) { self.name = name; self.version = version }
}

/// What an image is and how it boots, stored beside its files as `manifest.json`.
public struct ImageManifest: Codable, Sendable, Equatable {
    public static let currentVersion = 1

    public var version: Int
    public var name: String
    /// For people: "Debian 12 (bookworm), built by debootstrap".
    public var description: String
    /// "build" (vireo image build) or "import" (vireo image import).
    public var origin: String
    /// The Debian release it was built from, when built.
    public var release: String?
    /// The OS type new VMs get (see `vireo ostypes`).
    public var osType: String
    public var createdAt: Int64
    /// The base disk, qcow2, inside the image's directory; never written once installed.
    public var disk: String
    public var virtualSize: UInt64
    /// The image's own kernel and initramfs, for a direct boot (either engine); nil when the
    /// image boots through firmware (qemu engine only).
    public var kernel: String?
    public var initrd: String?
    /// The command line a direct boot needs (the root file system by UUID, the serial console).
    public var commandLine: String?
    /// Firmware a firmware-booted image needs.
    public var firmware: Firmware?
    /// Whether the disk has an EFI system partition with a boot loader: a VM made with
    /// `--firmware uefi` then boots through it (Debian's signed shim and GRUB, so Secure Boot
    /// checks every step) instead of being handed the kernel directly. Set by `vireo image
    /// build`, which put the loader there; never inferred from an imported disk's contents.
    public var efiBootable: Bool?
    /// Whether the kvm engine can boot the kernel: virtio-mmio (how its disks reach the guest)
    /// is built in or in the initramfs. Otherwise new VMs get the qemu engine.
    public var kvmEngineBootable: Bool?
    /// Whether the image runs cloud-init (so `vireo create --image` gives it a NoCloud seed).
    public var cloudInit: Bool
    /// Installed packages with versions (built images; empty when unknown).
    public var packages: [ImagePackage]
    /// Every file of the image but the manifest, with its size and SHA-256.
    public var files: [ImageFile]
    /// Identifies how a built image was made (release, packages, mirror, size, builder version):
    /// builds with the same recipe are interchangeable, which is what a build cache keys on.
    public var recipe: String?

    public init(name: String, description: String, origin: String, osType: String, disk: String, virtualSize: UInt64) {
        version = Self.currentVersion
        self.name = name; self.description = description; self.origin = origin; self.osType = osType
        createdAt = Int64(time(nil))
        self.disk = disk; self.virtualSize = virtualSize
        cloudInit = false
        packages = []
        files = []
    }

    /// Direct kernel boot (either engine) or firmware (qemu engine only).
    public var bootsDirectly: Bool { kernel != nil }
}

/// The image store: `$VIREO_HOME/images/NAME/` holding `manifest.json`, the base disk and, for
/// directly booted images, the kernel and initramfs. Installed images never change; VMs rest on
/// them through qcow2 overlays and refer to their kernels by path.
public struct ImageStore: Sendable {
    public let directory: String
    public let libraryRoot: String

    public init(libraryRoot: String) {
        self.libraryRoot = libraryRoot
        directory = libraryRoot + "/images"
    }

    public func path(of name: String) -> String { directory + "/" + name }
    public func manifestPath(of name: String) -> String { path(of: name) + "/manifest.json" }
    /// Downloaded Debian packages, kept between builds (debootstrap's --cache-dir).
    public var packageCache: String { directory + "/.debs" }

    public func exists(_ name: String) -> Bool { HostFiles.exists(manifestPath(of: name)) }

    /// Serialises changes to the store (install, delete) with VMs being made from it. Never held
    /// while another store's lock is taken.
    public func locked<T>(_ body: () throws(LibraryError) -> T) throws(LibraryError) -> T {
        try HostFiles.makeDirectories(directory)
        let lock = try VMLock(path: directory + "/.lock", create: true)
        guard lock.tryExclusive(attempts: 600) else {
            throw .busy(name: "the image store (\(directory))")
        }
        defer { lock.unlock() }
        return try body()
    }

    public func names() -> [String] {
        guard let entries = try? HostFiles.entries(of: directory) else { return [] }
        return entries.filter { !$0.hasPrefix(".") && exists($0) }
    }

    public func load(_ name: String) throws(LibraryError) -> ImageManifest {
        try ImageName.validate(name)
        guard exists(name) else {
            let known = names()
            throw .invalidValue(field: "image", reason: "no image named '\(name)' in \(directory) (\(known.isEmpty ? "there are none; `vireo image build debian-12` makes one" : "images: " + known.joined(separator: ", ")))")
        }
        return try Self.readManifest(manifestPath(of: name))
    }

    public static func readManifest(_ path: String) throws(LibraryError) -> ImageManifest {
        try decodeManifest(try HostFiles.readAll(path), path: path)
    }

    /// A manifest's bytes (an archive's, so hostile input), checked: a newer version is refused,
    /// and every file it names is a plain name in the image's directory with a checksum.
    public static func decodeManifest(_ bytes: [UInt8], path: String) throws(LibraryError) -> ImageManifest {
        guard bytes.count <= 1 << 20 else { throw .corrupt(path: path, reason: "a manifest of \(bytes.count) bytes is not one Vireo wrote") }
        let manifest: ImageManifest
        do { manifest = try JSONDecoder().decode(ImageManifest.self, from: Data(bytes)) } catch {
            throw .corrupt(path: path, reason: "not a valid image manifest (\(error))")
        }
        guard manifest.version <= ImageManifest.currentVersion else {
            throw .corrupt(path: path, reason: "written by a newer Vireo (manifest version \(manifest.version), this one reads up to \(ImageManifest.currentVersion))")
        }
        // The manifest names files inside the image's directory and nothing else.
        for file in manifest.files.map(\.path) + [manifest.disk] + [manifest.kernel, manifest.initrd].compactMap({ $0 }) {
            guard !file.isEmpty, !file.contains("/"), file != ".", file != ".." else {
                throw .corrupt(path: path, reason: "names the file '\(file)', which is not a plain file name in the image's directory")
            }
        }
        let listed = Set(manifest.files.map(\.path))
        for file in [manifest.disk] + [manifest.kernel, manifest.initrd].compactMap({ $0 }) where !listed.contains(file) {
            throw .corrupt(path: path, reason: "has no checksum for \(file)")
        }
        return manifest
    }

    /// The manifest entries for `files` in `directory`: sizes and SHA-256 (sha256sum, coreutils).
    public static func describeFiles(_ files: [String], in directory: String) throws(LibraryError) -> [ImageFile] {
        try files.map { (file) throws(LibraryError) in
            let path = directory + "/" + file
            return ImageFile(path: file, size: HostFiles.size(path), sha256: try sha256(of: path))
        }
    }

    public static func sha256(of path: String) throws(LibraryError) -> String {
        guard let tool = HostTools.find("sha256sum") else { throw .invalidValue(field: "sha256sum", reason: "not found; install Debian's coreutils") }
        let (status, output) = HostCommand.run(tool, ["--", path])
        let digest = output.split(separator: " ").first.map(String.init) ?? ""
        guard status == 0, digest.count == 64, digest.allSatisfy(\.isHexDigit) else {
            throw .corrupt(path: path, reason: "cannot checksum it: \(output.trimmingWhitespace())")
        }
        return digest
    }

    /// Checks every file against the manifest: present, the recorded size and, when `full` or
    /// when the file changed since it was last verified, the recorded SHA-256. A mismatch refuses
    /// the image with which file and what differs.
    public func verify(_ manifest: ImageManifest, in imageDirectory: String? = nil, full: Bool = false) throws(LibraryError) {
        let root = imageDirectory ?? path(of: manifest.name)
        let stampPath = root + "/.verified"
        let recorded = (try? HostFiles.readAll(stampPath)).map { String(decoding: $0, as: UTF8.self) } ?? ""
        var stamps: [String] = []
        var needsHash: [ImageFile] = []
        for file in manifest.files {
            let path = root + "/" + file.path
            var info = stat()
            guard stat(path, &info) == 0 else {
                throw .corrupt(path: path, reason: "image '\(manifest.name)' is missing this file; delete the image and build or import it again")
            }
            guard UInt64(info.st_size) == file.size else {
                throw .corrupt(path: path, reason: "image '\(manifest.name)': the manifest says \(file.size) bytes, the file has \(info.st_size) (truncated or changed); delete the image and build or import it again")
            }
            let stamp = "\(file.path) \(info.st_size) \(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec) \(info.st_ino) \(file.sha256)"
            stamps.append(stamp)
            if full || !recorded.split(separator: "\n").contains(Substring(stamp)) { needsHash.append(file) }
        }
        for file in needsHash {
            let path = root + "/" + file.path
            let digest = try Self.sha256(of: path)
            guard digest == file.sha256 else {
                throw .corrupt(path: path, reason: "image '\(manifest.name)': SHA-256 \(digest) does not match the manifest's \(file.sha256) (damaged or changed); delete the image and build or import it again")
            }
        }
        if !needsHash.isEmpty { try? HostFiles.writeAtomically(Array((stamps.joined(separator: "\n") + "\n").utf8), to: stampPath) }
    }

    /// An image's disk must be a qcow2 image that names nothing beyond itself: VMs rest on it,
    /// and whatever its header named would be read (as root, before any jail) by every VM made
    /// from it. Checked on every image before it is installed, whatever it came from (a build,
    /// the build cache, an archive, an import).
    public static func checkStandaloneDisk(_ path: String, image: String) throws(LibraryError) {
        let references: QCOW2References
        do { references = try QCOW2References.read(path: path) } catch {
            throw .invalidValue(field: "image disk", reason: "image '\(image)': \(error)")
        }
        if let backing = references.backingName {
            throw .invalidValue(field: "image disk", reason: "image '\(image)': its disk names the backing file \(backing); an image's disk must stand alone (an image from elsewhere never names a host file). Flatten it first: qemu-img convert -O qcow2 DISK flat.qcow2")
        }
        if references.hasExternalData {
            throw .invalidValue(field: "image disk", reason: "image '\(image)': its disk keeps its data in the external data file \(references.dataFile ?? "(unnamed)"); an image's disk must stand alone. Convert it first: qemu-img convert -O qcow2 DISK flat.qcow2")
        }
    }

    /// Writes the manifest (with checksums of `fileNames`) into `staging` and moves it into place
    /// as image `manifest.name`, in one rename; the files become read-only.
    public func install(staging: String, manifest input: ImageManifest, fileNames: [String], verified: [ImageFile]? = nil) throws(LibraryError) -> ImageManifest {
        try Self.checkStandaloneDisk(staging + "/" + input.disk, image: input.name)
        var manifest = input
        if let verified { manifest.files = verified } else { manifest.files = try Self.describeFiles(fileNames, in: staging) }
        for file in fileNames { chmod(staging + "/" + file, 0o444) }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data: Data
        do { data = try encoder.encode(manifest) } catch { throw .corrupt(path: staging, reason: "cannot encode the manifest: \(error)") }
        try HostFiles.writeAtomically(Array(data) + [10], to: staging + "/manifest.json")
        _ = try ImageStore.readManifest(staging + "/manifest.json")
        try verify(manifest, in: staging, full: false)
        try locked { () throws(LibraryError) in
            guard !exists(manifest.name) else {
                throw .invalidValue(field: "image name", reason: "an image named '\(manifest.name)' already exists; delete it first (`vireo image delete \(manifest.name)`) or give --name")
            }
            try HostFiles.renameNoReplace(staging, path(of: manifest.name))
        }
        unlink(path(of: manifest.name) + "/.lock")
        return manifest
    }

    /// A hidden directory in the store for an image being made; swept when its maker is gone.
    public func makeStaging(_ purpose: String) throws(LibraryError) -> (path: String, lock: VMLock) {
        try HostFiles.makeDirectories(directory)
        sweepAbandoned()
        let path = directory + "/.\(purpose)-" + UUID().uuidString.lowercased()
        try HostFiles.makeDirectory(path, mode: 0o755)
        let lock = try VMLock(path: path + "/.lock", create: true)
        _ = lock.tryExclusive(attempts: 1)
        return (path, lock)
    }

    /// Removes staging directories whose maker died (their lock is free). A directory with a file
    /// system mounted inside (a build killed while its chroot had /proc) is left for the admin.
    func sweepAbandoned() {
        for entry in (try? HostFiles.entries(of: directory)) ?? [] where entry.hasPrefix(".building-") || entry.hasPrefix(".importing-") {
            let path = directory + "/" + entry
            if VMLock.isHeld(path: path + "/.lock") || HostMounts.hasMount(under: path) { continue }
            try? HostFiles.removeTree(path)
        }
    }

    /// VMs whose disks rest on the image's disk or that boot its kernel.
    public func users(of name: String, library: VMLibrary) -> [String] {
        let prefix = path(of: name) + "/"
        var found: [String] = []
        for vm in (try? library.names()) ?? [] {
            let bundle = VMBundle(directory: library.root + "/" + vm)
            guard let definition = try? bundle.load() else { continue }
            let rests = definition.disks.contains { disk in
                ([bundle.resolve(disk.path)] + bundle.chain(of: disk).map(\.path)).contains { DiskImages.normalized($0).hasPrefix(prefix) }
            } || [definition.kernel, definition.initrd].compactMap { $0 }.contains { $0.hasPrefix(prefix) }
            if rests { found.append(vm) }
        }
        return found
    }

    public func delete(_ name: String, library: VMLibrary) throws(LibraryError) {
        _ = try load(name)
        try locked { () throws(LibraryError) in
            let users = users(of: name, library: library)
            guard users.isEmpty else {
                throw .invalidValue(field: "image", reason: "image '\(name)' is in use by VM(s) \(users.joined(separator: ", ")) (their disks rest on it); delete those VMs first, or give them their own disks with `vireo clone --full` and delete the originals")
            }
            let doomed = directory + "/.deleting-" + UUID().uuidString.lowercased()
            try HostFiles.renameNoReplace(path(of: name), doomed)
            try HostFiles.removeTree(doomed)
        }
    }
}

/// Mounts, from /proc/self/mountinfo.
public enum HostMounts {
    public static func mountPoints() -> [String] {
        guard let bytes = try? HostFiles.readAll("/proc/self/mountinfo") else { return [] }
        return String(decoding: bytes, as: UTF8.self).split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count > 4 else { return nil }
            return unescapeMountField(String(fields[4]))
        }
    }

    /// mountinfo writes space, tab, newline and backslash as octal escapes (\\040): read as
    /// DiskImage reads them (one parser for the mount table's escapes).
    static func unescapeMountField(_ field: String) -> String {
        HostMountTable.unescape(field)
    }

    public static func hasMount(under directory: String) -> Bool {
        mountPoints().contains { $0 == directory || $0.hasPrefix(directory + "/") }
    }
}

/// A NULL-terminated argv for the C spawn helpers, valid during `body`.
public func withCStrings<T>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> T) -> T {
    let array = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: strings.count + 1)
    for (index, string) in strings.enumerated() { array[index] = strdup(string) }
    array[strings.count] = nil
    defer {
        for index in 0..<strings.count { free(array[index]) }
        array.deallocate()
    }
    return body(array)
}
