import DiskImage
import FoundationEssentials
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// `vireo image export` and `import` of Vireo's own image archives: a tar of the manifest and
/// the files it lists. An archive is hostile input: only plain files with the names the
/// manifest lists are taken, and every checksum must match.
public enum ImageArchive {
    /// Writes image `manifest.name` (in `directory`) as a tar to `path`, or, for a path ending in
    /// `.qcow2`, `.raw` or `.img`, only its disk in that format.
    public static func export(_ manifest: ImageManifest, from directory: String, to path: String) throws(LibraryError) {
        let target = HostFiles.absolute(path)
        guard !HostFiles.exists(target) else {
            throw .invalidValue(field: "FILE", reason: "\(target) already exists; give a new file name (nothing is overwritten)")
        }
        guard HostFiles.isDirectory(HostFiles.parent(of: target)) else {
            throw .invalidValue(field: "FILE", reason: "\(HostFiles.parent(of: target)) is not a directory")
        }
        // Written in a directory of its own (0700, a name no one can predict or plant a link at:
        // tar and qemu-img open what they write by name), then renamed into place.
        var template = Array((HostFiles.parent(of: target) + "/.vireo-export-XXXXXX").utf8CString)
        guard template.withUnsafeMutableBufferPointer({ buffer in buffer.baseAddress.flatMap { mkdtemp($0) } }) != nil else {
            throw .io(operation: "make a private directory for the export beside", path: target, errno: errno)
        }
        let privateDirectory = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { try? HostFiles.removeTree(privateDirectory) }
        let temporary = privateDirectory + "/" + HostFiles.lastComponent(of: target)
        let lower = target.lowercased()
        let status: Int32
        let output: String
        if lower.hasSuffix(".qcow2") || lower.hasSuffix(".raw") || lower.hasSuffix(".img") {
            guard let qemuImg = HostTools.find("qemu-img") else { throw .invalidValue(field: "FILE", reason: "exporting a disk needs qemu-img; install Debian's `qemu-utils`") }
            (status, output) = HostCommand.run(qemuImg, ["convert", "-f", "qcow2", "-O", lower.hasSuffix(".qcow2") ? "qcow2" : "raw",
                                                       directory + "/" + manifest.disk, temporary])
        } else {
            guard let tar = HostTools.find("tar") else { throw .invalidValue(field: "FILE", reason: "exporting needs tar; install Debian's `tar`") }
            (status, output) = HostCommand.run(tar, ["--format=gnu", "--sparse", "-cf", temporary, "-C", directory, "--", "manifest.json"] + manifest.files.map(\.path))
        }
        guard status == 0 else {
            unlink(temporary)
            throw .io(operation: "export image '\(manifest.name)' (status \(status): \(output.suffix(400)))", path: target, errno: EIO)
        }
        do throws(LibraryError) { try HostFiles.renameNoReplace(temporary, target) } catch {
            unlink(temporary)
            throw error
        }
    }

    static func isArchive(_ header: [UInt8]) -> Bool {
        header.count >= 262 && Array(header[257..<262]) == Array("ustar".utf8)
    }

    /// Imports a Vireo image archive as image `name`.
    public static func importArchive(_ path: String, as name: String?, store: ImageStore) throws(LibraryError) -> ImageManifest {
        guard let tar = HostTools.find("tar") else { throw .invalidValue(field: "FILE", reason: "importing an archive needs tar; install Debian's `tar`") }
        let listing = HostCommand.run(tar, ["-tvf", path])
        guard listing.status == 0 else {
            throw .invalidValue(field: "FILE", reason: "\(path) is not a complete image archive (tar: \(listing.output.trimmingWhitespace().suffix(300))); a truncated download? Fetch or export it again")
        }
        var members: [String] = []
        for line in listing.output.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let last = fields.last, line.first == "-" else {
                throw .invalidValue(field: "FILE", reason: "\(path) holds '\(line)', which is not a plain file; an image archive holds only plain files")
            }
            members.append(String(last))
        }
        guard members.contains("manifest.json") else {
            throw .invalidValue(field: "FILE", reason: "\(path) is a tar without manifest.json, not a Vireo image archive")
        }
        let (staging, lock) = try store.makeStaging("importing")
        defer { lock.unlock() }
        do throws(LibraryError) {
            let manifestOnly = HostCommand.run(tar, ["-xf", path, "-C", staging, "--no-same-owner", "--no-same-permissions", "--", "manifest.json"])
            guard manifestOnly.status == 0 else { throw .invalidValue(field: "FILE", reason: "cannot read manifest.json from \(path): \(manifestOnly.output.suffix(300))") }
            var manifest = try ImageStore.readManifest(staging + "/manifest.json")
            let wanted = manifest.files.map(\.path)
            for member in members where member != "manifest.json" && !wanted.contains(member) {
                throw .invalidValue(field: "FILE", reason: "\(path) holds \(member), which its manifest does not list")
            }
            for file in wanted where !members.contains(file) {
                throw .invalidValue(field: "FILE", reason: "\(path) lacks \(file), which its manifest lists (truncated?)")
            }
            let extracted = HostCommand.run(tar, ["-xf", path, "-C", staging, "--no-same-owner", "--no-same-permissions", "--"] + wanted)
            guard extracted.status == 0 else {
                throw .invalidValue(field: "FILE", reason: "\(path) could not be unpacked (tar: \(extracted.output.trimmingWhitespace().suffix(300))); truncated?")
            }
            if let name {
                try ImageName.validate(name)
                manifest.name = name
            }
            try ImageName.validate(manifest.name)
            do throws(LibraryError) { try store.verify(manifest, in: staging, full: true) } catch {
                throw .invalidValue(field: "FILE", reason: "\(path) does not match its manifest: \(error)")
            }
            unlink(staging + "/manifest.json")
            unlink(staging + "/.verified")
            return try store.install(staging: staging, manifest: manifest, fileNames: wanted, verified: manifest.files)
        } catch {
            try? HostFiles.removeTree(staging)
            throw error
        }
    }
}

/// `vireo image import` of a disk image people already have (Debian's or Ubuntu's cloud
/// images, qcow2 or raw): checked, copied into the store as qcow2, and its kernel and initramfs
/// taken out of its root file system (debugfs, no mount) for a direct boot; without them it
/// boots through firmware on the qemu engine.
public enum ImageImporter {
    public static func importFile(_ file: String, as name: String, store: ImageStore, progress: (String) -> Void) throws(LibraryError) -> ImageManifest {
        try ImageName.validate(name)
        let path = HostFiles.absolute(file)
        guard HostFiles.exists(path), !HostFiles.isDirectory(path) else { throw .invalidValue(field: "FILE", reason: "\(file) does not exist or is not a file") }
        guard !store.exists(name) else {
            throw .invalidValue(field: "name", reason: "an image named '\(name)' already exists; delete it first or give another --name")
        }
        let header = try readPrefix(path, count: 0x8806)
        if ImageArchive.isArchive(header) { return try ImageArchive.importArchive(path, as: name, store: store) }
        let format = try sniff(header, path: path)
        guard let qemuImg = HostTools.find("qemu-img") else { throw .invalidValue(field: "FILE", reason: "importing a disk needs qemu-img; install Debian's `qemu-utils`") }
        guard let debugfs = HostTools.find("debugfs") else { throw .invalidValue(field: "FILE", reason: "importing a disk needs debugfs; install Debian's `e2fsprogs`") }
        if format == .qcow2 {
            do throws(DiskImageError) {
                let references = try QCOW2References.read(path: path)
                if let backing = references.backingName {
                    throw .invalidArgument(field: "FILE", reason: "\(file) is an overlay on the backing file \(backing); import a standalone image (qemu-img convert -O qcow2 \(file) flat.qcow2)")
                }
                if references.hasExternalData {
                    throw .invalidArgument(field: "FILE", reason: "\(file) keeps its data in the external data file \(references.dataFile ?? "(unnamed)"); import a standalone image (qemu-img convert -O qcow2 \(file) flat.qcow2)")
                }
                _ = try DiskImages.open(path: path, format: .qcow2, readOnly: true)
            } catch {
                throw .invalidValue(field: "FILE", reason: error.description)
            }
            progress("checking \(file) with qemu-img check")
            let check = HostCommand.run(qemuImg, ["check", "-f", "qcow2", "--output=json", path])
            let corruptions = jsonNumber("corruptions", in: check.output) ?? 0
            let errors = jsonNumber("check-errors", in: check.output) ?? 0
            guard check.status == 0 || check.status == 3, corruptions == 0, errors == 0 else {
                throw .invalidValue(field: "FILE", reason: "\(file) is damaged or truncated: qemu-img check found \(corruptions) corruption(s) and \(errors) error(s) (data it refers to lies past the end of the file: an incomplete download?); fetch it again")
            }
        }
        let (staging, lock) = try store.makeStaging("importing")
        defer { lock.unlock() }
        do throws(LibraryError) {
            // The raw view to look inside: the file itself when raw, a sparse copy when qcow2.
            var rawView = path
            if format == .qcow2 {
                rawView = staging + "/inspect.raw"
                let converted = HostCommand.run(qemuImg, ["convert", "-f", "qcow2", "-O", "raw", path, rawView])
                guard converted.status == 0 else { throw .invalidValue(field: "FILE", reason: "qemu-img could not read \(file): \(converted.output.suffix(400))") }
            }
            let layout = try DiskLayout.read(rawView, displayName: file)
            progress("\(file): \(format.rawValue), \(Size.describe(layout.size)), \(layout.summary)")
            var found: BootFiles?
            for fileSystem in layout.ext4Offsets {
                if let boot = try BootFiles.find(in: rawView, offset: fileSystem, debugfs: debugfs, into: staging) { found = boot; break }
            }
            progress("copying the disk into the store as qcow2")
            let copied = HostCommand.run(qemuImg, ["convert", "-f", format.rawValue, "-O", "qcow2", path, staging + "/disk.qcow2"])
            guard copied.status == 0 else { throw .invalidValue(field: "FILE", reason: "qemu-img could not copy \(file): \(copied.output.suffix(400))") }
            unlink(staging + "/inspect.raw")
            var manifest = ImageManifest(name: name, description: found?.prettyName ?? "imported from \(HostFiles.lastComponent(of: path))",
                                         origin: "import", osType: found?.osType ?? OSType.defaultIdentifier, disk: "disk.qcow2", virtualSize: layout.size)
            manifest.description += " (imported from \(HostFiles.lastComponent(of: path)))"
            var files = ["disk.qcow2"]
            if let found {
                manifest.kernel = "vmlinuz"
                manifest.initrd = found.hasInitrd ? "initrd.img" : nil
                manifest.commandLine = "root=UUID=\(found.rootUUID) ro console=tty0 console=ttyS0 net.ifnames=0"
                manifest.cloudInit = found.cloudInit
                manifest.kvmEngineBootable = found.virtioMMIOReady
                files += found.hasInitrd ? ["vmlinuz", "initrd.img"] : ["vmlinuz"]
                progress("found kernel \(found.kernelVersion)\(found.hasInitrd ? " and its initramfs" : "") in the root file system (UUID \(found.rootUUID)); \(found.cloudInit ? "cloud-init is installed" : "no cloud-init")")
            } else {
                manifest.firmware = layout.hasEFISystemPartition ? .uefi : .bios
                manifest.cloudInit = layout.ext4Offsets.contains { BootFiles.hasCloudInit(in: rawView, offset: $0, debugfs: debugfs) }
                progress("no kernel found in an ext4 root file system: the image boots through \(manifest.firmware == .uefi ? "UEFI" : "BIOS") firmware on the qemu engine")
            }
            return try store.install(staging: staging, manifest: manifest, fileNames: files)
        } catch {
            try? HostFiles.removeTree(staging)
            throw error
        }
    }

    static func readPrefix(_ path: String, count: Int) throws(LibraryError) -> [UInt8] {
        try readBytes(path, at: 0, count: count)
    }

    /// Up to `count` bytes at `offset` (fewer at the end of the file).
    static func readBytes(_ path: String, at offset: UInt64, count: Int) throws(LibraryError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: count)
        let got = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        guard got >= 0 else { throw .io(operation: "read", path: path, errno: errno) }
        return Array(bytes[0..<got])
    }

    /// qcow2 or raw (a partition table or an ext4 file system at the start); anything else is
    /// refused, naming what it looks like.
    static func sniff(_ header: [UInt8], path: String) throws(LibraryError) -> DiskFormat {
        func starts(_ magic: [UInt8], at offset: Int = 0) -> Bool {
            header.count >= offset + magic.count && Array(header[offset..<(offset + magic.count)]) == magic
        }
        if starts(QCOW2Image.magic) { return .qcow2 }
        let others: [([UInt8], Int, String)] = [
            (Array("KDMV".utf8), 0, "a VMDK disk (convert it: qemu-img convert -O qcow2 FILE out.qcow2)"),
            (Array("conectix".utf8), 0, "a VHD disk (convert it: qemu-img convert -O qcow2 FILE out.qcow2)"),
            (Array("vhdxfile".utf8), 0, "a VHDX disk (convert it: qemu-img convert -O qcow2 FILE out.qcow2)"),
            (Array("<<< ".utf8), 0, "a VirtualBox VDI disk (convert it: qemu-img convert -O qcow2 FILE out.qcow2)"),
            ([0x1f, 0x8b], 0, "gzip-compressed; decompress it first (gunzip)"),
            ([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], 0, "xz-compressed; decompress it first (unxz)"),
            ([0x28, 0xb5, 0x2f, 0xfd], 0, "zstd-compressed; decompress it first (unzstd)"),
            (Array("BZh".utf8), 0, "bzip2-compressed; decompress it first (bunzip2)"),
            (Array("CD001".utf8), 0x8001, "an ISO 9660 disc (an installer? `vireo create NAME --iso FILE` boots those)"),
        ]
        for (magic, offset, what) in others where starts(magic, at: offset) {
            throw .invalidValue(field: "FILE", reason: "\(path) is \(what), neither a qcow2 nor a raw disk image")
        }
        let hasMBR = header.count >= 512 && header[510] == 0x55 && header[511] == 0xaa
        let hasExt4 = header.count >= 1082 && header[1080] == 0x53 && header[1081] == 0xef
        guard hasMBR || hasExt4 else {
            throw .invalidValue(field: "FILE", reason: "\(path) is neither a qcow2 image nor a raw disk image (no partition table and no ext4 file system at its start)")
        }
        return .raw
    }

    static func jsonNumber(_ key: String, in text: String) -> Int? {
        for line in text.split(separator: "\n") {
            let trimmed = line.drop(while: { $0 == " " })
            guard trimmed.hasPrefix("\"\(key)\":") else { continue }
            return Int(trimmed.dropFirst(key.count + 3).drop(while: { $0 == " " }).prefix(while: { $0.isNumber }))
        }
        return nil
    }
}

/// Where the file systems are on a raw disk: a whole-disk ext4, or MBR/GPT partitions; checked
/// against the file's size, so a truncated image is refused rather than half-imported.
struct DiskLayout {
    var size: UInt64
    var ext4Offsets: [UInt64]
    var hasEFISystemPartition: Bool
    var summary: String

    static let efiSystemPartition: [UInt8] = [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b]

    static func read(_ path: String, displayName: String) throws(LibraryError) -> DiskLayout {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        let size = HostFiles.size(path)
        func bytes(_ offset: UInt64, _ count: Int) -> [UInt8] {
            var buffer = [UInt8](repeating: 0, count: count)
            let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
            return got == count ? buffer : []
        }
        func truncated(_ what: String, needs: UInt64) -> LibraryError {
            .invalidValue(field: "FILE", reason: "\(displayName) is truncated: \(what) reaches byte \(needs), but the image holds only \(size) bytes (an incomplete download?); fetch it again")
        }
        func ext4End(_ offset: UInt64) -> UInt64? {
            let superblock = bytes(offset + 1024, 1024)
            guard superblock.count == 1024, superblock[56] == 0x53, superblock[57] == 0xef else { return nil }
            let low = UInt64(superblock.le32(4))
            let incompat = superblock.le32(0x60)
            let high = incompat & 0x80 != 0 ? UInt64(superblock.le32(0x150)) : 0
            let logBlock = superblock.le32(0x18)
            guard logBlock <= 6 else { return nil }
            return offset + ((high << 32) | low) * (1024 << UInt64(logBlock))
        }
        var layout = DiskLayout(size: size, ext4Offsets: [], hasEFISystemPartition: false, summary: "")
        if let end = ext4End(0) {
            guard end <= size else { throw truncated("its ext4 file system", needs: end) }
            layout.ext4Offsets = [0]
            layout.summary = "a whole-disk ext4 file system"
            return layout
        }
        let mbr = bytes(0, 512)
        guard mbr.count == 512, mbr[510] == 0x55, mbr[511] == 0xaa else {
            throw .invalidValue(field: "FILE", reason: "\(displayName) has neither a partition table nor an ext4 file system")
        }
        var partitions: [(start: UInt64, end: UInt64, efi: Bool)] = []
        let entries = (0..<4).map { Array(mbr[(446 + $0 * 16)..<(446 + $0 * 16 + 16)]) }
        if entries.contains(where: { $0[4] == 0xee }) {
            let gpt = bytes(512, 92)
            guard gpt.count == 92, Array(gpt[0..<8]) == Array("EFI PART".utf8) else {
                throw .invalidValue(field: "FILE", reason: "\(displayName) has a protective MBR but no GPT header")
            }
            let backup = gpt.le64(32)
            guard backup < UInt64.max / 512, (backup + 1) * 512 <= size else { throw truncated("its backup GPT header", needs: backup < UInt64.max / 512 ? (backup + 1) * 512 : UInt64.max) }
            let tableLBA = gpt.le64(72)
            let count = min(Int(gpt.le32(80)), 256)
            let entrySize = Int(gpt.le32(84))
            guard entrySize >= 128, entrySize <= 1024, tableLBA < UInt64.max / 512 else {
                throw .invalidValue(field: "FILE", reason: "\(displayName) has a GPT header with impossible values")
            }
            let table = bytes(tableLBA * 512, count * entrySize)
            guard table.count == count * entrySize else { throw truncated("its GPT partition table", needs: tableLBA * 512 + UInt64(count * entrySize)) }
            for index in 0..<count {
                let entry = Array(table[(index * entrySize)..<(index * entrySize + 128)])
                guard entry[0..<16].contains(where: { $0 != 0 }) else { continue }
                let first = entry.le64(32), last = entry.le64(40)
                guard first <= last, last < UInt64.max / 512 else { continue }
                partitions.append((first * 512, (last + 1) * 512, Array(entry[0..<16]) == efiSystemPartition))
            }
            layout.summary = "GPT with \(partitions.count) partition(s)"
        } else {
            for entry in entries where entry[4] != 0 {
                let first = UInt64(entry.le32(8)), count = UInt64(entry.le32(12))
                partitions.append((first * 512, (first + count) * 512, entry[4] == 0xef))
            }
            layout.summary = "MBR with \(partitions.count) partition(s)"
        }
        for partition in partitions {
            guard partition.end <= size else { throw truncated("a partition", needs: partition.end) }
            if partition.efi { layout.hasEFISystemPartition = true }
            if let end = ext4End(partition.start) {
                guard end <= size else { throw truncated("an ext4 file system", needs: end) }
                layout.ext4Offsets.append(partition.start)
            }
        }
        return layout
    }
}

/// A kernel and initramfs found in an ext4 file system's /boot, taken out with debugfs.
public struct BootFiles {
    var kernelVersion: String
    var hasInitrd: Bool
    var rootUUID: String
    var cloudInit: Bool
    var virtioMMIOReady: Bool
    var prettyName: String?
    var osType: String

    /// Kernel file names in Debian's version order, enough for "6.1.0-9" < "6.1.0-10": the
    /// newest is the one a build or an import boots.
    public static func versionOrder(_ a: String, _ b: String) -> Bool {
        let numbers: (String) -> [Int] = { $0.split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) } }
        return numbers(a).lexicographicallyPrecedes(numbers(b))
    }

    static func hasCloudInit(in path: String, offset: UInt64, debugfs: String) -> Bool {
        HostCommand.run(debugfs, ["-R", "stat /usr/bin/cloud-init", "\(path)?offset=\(offset)"]).output.contains("Inode:")
    }

    static func find(in path: String, offset: UInt64, debugfs: String, into staging: String) throws(LibraryError) -> BootFiles? {
        let device = "\(path)?offset=\(offset)"
        func run(_ request: String) -> String { HostCommand.run(debugfs, ["-R", request, device]).output }
        // `ls -p`: /inode/mode/uid/gid/name/size/ per entry.
        let names = run("ls -p /boot").split(separator: "\n").compactMap { line -> String? in
            let fields = line.split(separator: "/", omittingEmptySubsequences: false)
            return fields.count >= 7 ? String(fields[5]) : nil
        }
        // Names come from the image (hostile input) and go into debugfs requests: only plain
        // version characters are taken.
        let plain: (String) -> Bool = { name in
            !name.isEmpty && name.utf8.count <= 128 && name.unicodeScalars.allSatisfy {
                ($0 >= "a" && $0 <= "z") || ($0 >= "A" && $0 <= "Z") || ($0 >= "0" && $0 <= "9") || "._+-~".unicodeScalars.contains($0)
            }
        }
        let kernels = names.filter { $0.hasPrefix("vmlinuz-") && plain($0) }.sorted(by: BootFiles.versionOrder)
        guard let kernel = kernels.last else { return nil }
        let version = String(kernel.dropFirst("vmlinuz-".count))
        let hasInitrd = names.contains("initrd.img-" + version)
        _ = run("dump /boot/\(kernel) \"\(staging)/vmlinuz\"")
        guard HostFiles.exists(staging + "/vmlinuz"), HostFiles.size(staging + "/vmlinuz") <= 256 << 20 else {
            unlink(staging + "/vmlinuz")
            return nil
        }
        do { _ = try KernelImage.load(path: staging + "/vmlinuz") } catch {
            unlink(staging + "/vmlinuz")
            return nil
        }
        if hasInitrd {
            _ = run("dump /boot/initrd.img-\(version) \"\(staging)/initrd.img\"")
            guard HostFiles.exists(staging + "/initrd.img") else { return nil }
        }
        let uuidBytes = try ImageImporter.readBytes(path, at: offset + 1024 + 0x68, count: 16)
        let hex = uuidBytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        let uuid = [hex.prefix(8), hex.dropFirst(8).prefix(4), hex.dropFirst(12).prefix(4), hex.dropFirst(16).prefix(4), hex.dropFirst(20)].map(String.init).joined(separator: "-")
        let cloudInit = hasCloudInit(in: path, offset: offset, debugfs: debugfs)
        let osRelease = run("cat /usr/lib/os-release")
        func field(_ key: String) -> String? {
            osRelease.split(separator: "\n").first { $0.hasPrefix(key + "=") }.map { line in
                String(line.dropFirst(key.count + 1)).trimmingCharacters(in: "\"")
            }
        }
        let id = field("ID") ?? ""
        let osType = ["debian": "debian-64", "ubuntu": "ubuntu-64", "fedora": "fedora-64", "alpine": "alpine-64"][id] ?? OSType.defaultIdentifier
        // The kvm engine reaches disks over virtio-mmio: the driver must be in the kernel or
        // in the initramfs, or the root file system is never found.
        let builtin = run("cat /usr/lib/modules/\(version)/modules.builtin") + run("cat /lib/modules/\(version)/modules.builtin")
        var ready = builtin.contains("virtio_mmio.ko")
        if !ready, hasInitrd, let lister = HostTools.find("lsinitramfs") {
            ready = HostCommand.run(lister, [staging + "/initrd.img"], capacity: 8 << 20).output.contains("virtio_mmio.ko")
        }
        return BootFiles(kernelVersion: version, hasInitrd: hasInitrd, rootUUID: uuid, cloudInit: cloudInit, virtioMMIOReady: ready,
                         prettyName: field("PRETTY_NAME"), osType: osType)
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        var text = Substring(self)
        while let first = text.first, set.contains(first) { text = text.dropFirst() }
        while let last = text.last, set.contains(last) { text = text.dropLast() }
        return String(text)
    }
}

extension Array where Element == UInt8 {
    func le32(_ offset: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(self[offset + $1]) << (8 * UInt32($1)) }
    }

    func le64(_ offset: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(self[offset + $1]) << (8 * UInt64($1)) }
    }
}
