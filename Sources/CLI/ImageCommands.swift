import ArgumentParser
import Engines
import FoundationEssentials
import Library
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

struct ImageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "Images: ready operating systems new VMs are made from (`vireo create NAME --image IMAGE`).",
        discussion: """
            `vireo image build debian-12` makes a Debian 12 with its own kernel, systemd, SSH and \
            cloud-init from Debian's packages; `vireo image import` takes a qcow2 or raw cloud \
            image you have. Images live in $VIREO_HOME/images and never change; VMs rest on them \
            through thin overlays. See docs/images.md.
            """,
        subcommands: [ImageBuild.self, ImageList.self, ImageInfo.self, ImageDelete.self, ImageImport.self, ImageExport.self])
}

/// Progress on stderr, so stdout stays for results.
func printProgress(_ text: String) {
    var bytes = Array((text + "\n").utf8)
    _ = bytes.withUnsafeMutableBytes { writeAll(STDERR_FILENO, $0) }
}

struct ImageBuild: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "build",
        abstract: "Build an image from Debian's packages with debootstrap (needs root and a Debian mirror).",
        discussion: """
            The image is a minimal \(ImageRecipe.distributions.map(\.description).joined(separator: ", ")) with \
            \(ImageRecipe.basePackages.joined(separator: ", ")): an ext4 root file system in a \
            compressed qcow2, the image's kernel and initramfs (with the virtio modules both \
            engines need) and a manifest listing every package and every file's SHA-256. \
            Downloaded packages are kept in $VIREO_HOME/images/.debs for the next build.
            """)

    @Argument(help: ArgumentHelp("What to build: \(ImageRecipe.distributions.map(\.identifier).joined(separator: ", ")).", valueName: "distribution"))
    var distribution: String

    @Option(help: "Name of the new image (default: the distribution's).")
    var name: String?

    @Option(help: "Size of the image's disk (K, M, G, T); VMs grow it with --disk. Default 4G.")
    var size: String?

    @Option(help: ArgumentHelp("More Debian packages to install, comma-separated.", valueName: "a,b,..."))
    var packages: String?

    @Option(help: ArgumentHelp("Debian mirror to install from (default \(ImageRecipe.defaultMirror)); a local mirror or file:/// works offline.", valueName: "url"))
    var mirror: String?

    @Option(help: ArgumentHelp("Keep builds here and reuse one made from the same recipe (distribution, packages, mirror, size, builder version) instead of building again.", valueName: "directory"))
    var cacheDir: String?

    @Flag(help: "Print the new image's manifest as JSON.")
    var json = false

    func run() throws {
        let library = openLibrary()
        let manifest: ImageManifest
        do throws(LibraryError) {
            let extra = (packages ?? "").split(separator: ",").map { String($0).trimmingWhitespace() }.filter { !$0.isEmpty }
            let recipe = try ImageRecipe(distribution: distribution, extraPackages: extra, mirror: mirror,
                                         size: try size.map { (text) throws(LibraryError) in try parseLibrarySize(text, field: "--size") })
            let builder = ImageBuilder(store: ImageStore(libraryRoot: library.root), progress: printProgress)
            manifest = try builder.build(recipe, name: name ?? distribution, cacheDirectory: cacheDir.map(HostFiles.absolute))
        } catch { throw fail(error) }
        if json { try printJSON(manifest); return }
        printLine("Built image '\(manifest.name)': \(manifest.description)")
        printLine("Make a VM from it with: vireo create NAME --image \(manifest.name)")
    }
}

/// Sizes through the CLI's parser, as a library error.
func parseLibrarySize(_ text: String, field: String) throws(LibraryError) -> UInt64 {
    do { return try parseSize(text, field: field) } catch {
        throw .invalidValue(field: field, reason: "'\(text)' is not a size like 4G")
    }
}

struct ImageList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the images.")

    @Flag(help: "Print JSON.")
    var json = false

    struct Row: Encodable {
        var name: String, description: String, boot: String, diskBytes: UInt64, virtualSize: UInt64, createdAt: Int64, usedBy: [String]
    }

    func run() throws {
        let library = openLibrary()
        let store = ImageStore(libraryRoot: library.root)
        var rows: [Row] = []
        for name in store.names() {
            guard let manifest = try? store.load(name) else { continue }
            rows.append(Row(name: name, description: manifest.description, boot: Self.boot(manifest),
                            diskBytes: HostFiles.size(store.path(of: name) + "/" + manifest.disk), virtualSize: manifest.virtualSize,
                            createdAt: manifest.createdAt, usedBy: store.users(of: name, library: library)))
        }
        if json { try printJSON(rows); return }
        guard !rows.isEmpty else { printLine("No images. `vireo image build debian-12` makes one; `vireo image import FILE` takes one you have."); return }
        printTable([["NAME", "BOOT", "SIZE", "FILE", "VMS", "DESCRIPTION"]] + rows.map { row in
            [row.name, row.boot, Size.describe(row.virtualSize), Size.describe(row.diskBytes),
             row.usedBy.isEmpty ? "-" : row.usedBy.joined(separator: ","), row.description]
        })
    }

    static func boot(_ manifest: ImageManifest) -> String {
        if !manifest.bootsDirectly { return "firmware (\(manifest.firmware?.rawValue ?? "bios"), qemu)" }
        return manifest.kvmEngineBootable == true ? "kernel (kvm, qemu)" : "kernel (qemu)"
    }
}

struct ImageInfo: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show an image: how it boots, its files and packages.")

    @Argument(help: "Image name.")
    var name: String

    @Flag(help: "Check every file's SHA-256 against the manifest now.")
    var verify = false

    @Flag(help: "Print the manifest as JSON.")
    var json = false

    func run() throws {
        let library = openLibrary()
        let store = ImageStore(libraryRoot: library.root)
        let manifest: ImageManifest
        do throws(LibraryError) {
            manifest = try store.load(name)
            if verify { try store.verify(manifest, full: true) }
        } catch { throw fail(error) }
        if json { try printJSON(manifest); return }
        let directory = store.path(of: name)
        var lines: [[String]] = [
            ["Name:", manifest.name], ["Description:", manifest.description],
            ["Origin:", manifest.origin + (manifest.release.map { " (\($0))" } ?? "")],
            ["Created:", Self.date(manifest.createdAt)], ["OS type:", manifest.osType],
            ["Disk:", "\(directory)/\(manifest.disk) (qcow2, \(Size.describe(manifest.virtualSize)), file \(Size.describe(HostFiles.size(directory + "/" + manifest.disk))))"],
        ]
        if manifest.bootsDirectly {
            lines.append(["Boot:", "the image's own kernel, directly: " + (manifest.kvmEngineBootable == true
                ? "kvm engine (virtio-mmio in its initramfs) or qemu engine"
                : "qemu engine (its initramfs has no virtio-mmio driver, which the kvm engine's disks need)")])
            lines.append(["Kernel:", "\(directory)/\(manifest.kernel ?? "")"])
            if let initrd = manifest.initrd { lines.append(["Initramfs:", "\(directory)/\(initrd)"]) }
            lines.append(["Command line:", manifest.commandLine ?? ""])
            if manifest.efiBootable == true {
                lines.append(["UEFI:", "an EFI system partition with its boot loader: `--firmware uefi` boots through it (and `--secure-boot` has each step checked)"])
            }
        } else {
            lines.append(["Boot:", "through \(manifest.firmware?.rawValue ?? "bios") firmware on the qemu engine (no kernel could be taken out of it)"])
        }
        lines.append(["cloud-init:", manifest.cloudInit ? "yes: `vireo create --image` attaches a NoCloud seed (user, SSH keys, host name)" : "no"])
        let users = store.users(of: name, library: library)
        lines.append(["Used by:", users.isEmpty ? "no VM" : users.joined(separator: ", ")])
        if verify { lines.append(["Checksums:", "every file matches the manifest"]) }
        printTable(lines)
        printLine("Files:")
        for file in manifest.files { printLine("  \(file.sha256)  \(file.path) (\(file.size) bytes)") }
        if !manifest.packages.isEmpty {
            printLine("Packages (\(manifest.packages.count)):")
            printLine("  " + manifest.packages.map { "\($0.name) \($0.version)" }.joined(separator: ", "))
        }
    }

    static func date(_ seconds: Int64) -> String {
        var time = time_t(seconds)
        var parts = tm()
        gmtime_r(&time, &parts)
        var buffer = [CChar](repeating: 0, count: 64)
        let count = strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S UTC", &parts)
        return String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

struct ImageDelete: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete", abstract: "Delete an image (refused while VMs rest on it).")

    @Argument(help: "Image name.")
    var name: String

    func run() throws {
        let library = openLibrary()
        do throws(LibraryError) {
            try ImageStore(libraryRoot: library.root).delete(name, library: library)
        } catch { throw fail(error) }
        printLine("Deleted image '\(name)'")
    }
}

struct ImageImport: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Import an image: a Vireo image archive (`vireo image export`), or a qcow2 or raw disk image such as Debian's or Ubuntu's cloud images.",
        discussion: """
            A disk image is checked (qemu-img check for qcow2; partition table and file system \
            sizes against the file for raw) and copied into the store. When its ext4 root file \
            system has a kernel in /boot, the kernel and initramfs are taken out for a direct \
            boot; otherwise the image boots through firmware on the qemu engine. `vireo image \
            info` says which.
            """)

    @Argument(help: "The archive or disk image.")
    var file: String

    @Option(help: "Name of the new image (default: the file's name without its extensions).")
    var name: String?

    func run() throws {
        let library = openLibrary()
        let store = ImageStore(libraryRoot: library.root)
        let manifest: ImageManifest
        do throws(LibraryError) {
            let chosen = name ?? Self.defaultName(file)
            manifest = try ImageImporter.importFile(file, as: chosen, store: store, progress: printProgress)
        } catch { throw fail(error) }
        printLine("Imported image '\(manifest.name)': \(ImageList.boot(manifest))")
    }

    /// `debian-12-genericcloud-amd64.qcow2` becomes `debian-12-genericcloud-amd64`.
    static func defaultName(_ file: String) -> String {
        var base = HostFiles.lastComponent(of: file)
        for suffix in [".tar", ".qcow2", ".raw", ".img"] where base.lowercased().hasSuffix(suffix) { base = String(base.dropLast(suffix.count)) }
        let cleaned = String(base.map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "_" || $0 == "-" ? $0 : "-" }.prefix(64))
        return cleaned.isEmpty ? "imported" : cleaned
    }
}

struct ImageExport: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write an image to a file: a Vireo image archive (tar with its manifest), or only its disk when FILE ends in .qcow2, .raw or .img.")

    @Argument(help: "Image name.")
    var name: String

    @Argument(help: "The file to write (never overwritten).")
    var file: String

    func run() throws {
        let library = openLibrary()
        let store = ImageStore(libraryRoot: library.root)
        do throws(LibraryError) {
            let manifest = try store.load(name)
            try store.verify(manifest)
            try ImageArchive.export(manifest, from: store.path(of: name), to: file)
        } catch { throw fail(error) }
        printLine("Exported image '\(name)' to \(HostFiles.absolute(file))")
    }
}
