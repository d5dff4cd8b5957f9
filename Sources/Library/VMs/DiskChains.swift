import DiskImage
import JSONQuoting
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// Where a path may be. Every path the library touches as root on behalf of a definition, a guest
/// or a peer goes through `resolve(_:inside:)` before anything is done to it: the file system
/// resolves it (symbolic links followed, `..` applied) and the result must lie in the directory
/// it belongs to (docs/security.md).
public enum HostPath {
    /// The real path of an existing file or directory; nil when it does not exist.
    public static func real(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard realpath(path, &buffer) != nil else { return nil }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `path`, resolved, if it lies strictly inside `directory` (resolved too); nil otherwise or
    /// when either does not exist.
    public static func inside(_ path: String, _ directory: String) -> String? {
        guard let base = real(directory), let resolved = real(path) else { return nil }
        let prefix = base == "/" ? "/" : base + "/"
        return resolved.hasPrefix(prefix) && resolved != base ? resolved : nil
    }

    /// `path` resolved and checked to lie inside `directory`, or an error naming both and what
    /// the path really is.
    public static func resolve(_ path: String, inside directory: String, field: String) throws(LibraryError) -> String {
        if let resolved = inside(path, directory) { return resolved }
        guard let resolved = real(path) else { throw .invalidValue(field: field, reason: "\(path) does not exist") }
        throw .invalidValue(field: field, reason: "\(path) is \(resolved), outside \(real(directory) ?? directory), where it must be")
    }

    /// Whether `path` (resolved) lies inside any of `directories`.
    public static func isInside(_ path: String, anyOf directories: [String]) -> Bool {
        directories.contains { inside(path, $0) != nil }
    }
}

extension VMBundle {
    /// The chain `disk` rests on, every path absolute.
    public func chain(of disk: DiskAttachment) -> [BackingLayer] {
        disk.backing.map { BackingLayer(path: resolve($0.path), format: $0.format) }
    }
}

/// Disk chains as definitions record them (`DiskAttachment.backing`).
public enum DiskChains {
    /// The chain an image a person attaches names in its own headers, each layer in the format
    /// its overlay records (never probed; a chain that records none is refused), as absolute
    /// paths: recorded once, when the person declares the image qcow2. Raw images rest on nothing.
    public static func adopt(_ path: String, format: DiskFormat, field: String) throws(LibraryError) -> [BackingLayer] {
        guard format == .qcow2 else { return [] }
        var chain: [BackingLayer] = []
        var current = path
        while true {
            let references: QCOW2References
            do { references = try QCOW2References.read(path: current) } catch { throw .invalidValue(field: field, reason: error.description) }
            if references.hasExternalData {
                throw .invalidValue(field: field, reason: "\(current) keeps its data in an external file\(references.dataFile.map { " (\($0))" } ?? ""), which Vireo does not use; convert it (qemu-img convert -O qcow2)")
            }
            guard let name = references.backingName else { return chain }
            let next = DiskImages.normalized(name.hasPrefix("/") ? name : HostFiles.parent(of: current) + "/" + name)
            guard let format = references.backingFormat else {
                throw .invalidValue(field: field, reason: "\(current) names its backing file \(name) without recording its format, and Vireo never guesses a format from content; record it: qemu-img rebase -u -b \(name) -F raw|qcow2 \(current)")
            }
            guard HostFiles.exists(next) else { throw .invalidValue(field: field, reason: "\(current) rests on \(next), which does not exist") }
            guard chain.count < 16, next != DiskImages.normalized(path), !chain.contains(where: { $0.path == next }) else {
                throw .invalidValue(field: field, reason: "\(path) rests on a chain deeper than 16 images or on itself")
            }
            chain.append(BackingLayer(path: next, format: format))
            if format == .raw { return chain }
            current = next
        }
    }

    /// Checks that every qcow2 image of `disk` names exactly the next layer its definition
    /// records, and the last nothing. Run before anything follows the headers (a VMM, QEMU,
    /// qemu-img): a header changed since — by the VM's own process, which may write its disks —
    /// stops the operation with the disk named. Raw images are not read: their bytes are the guest's.
    public static func verify(_ disk: DiskAttachment, in bundle: VMBundle) throws(LibraryError) {
        try verify(path: bundle.resolve(disk.path), format: disk.format, chain: bundle.chain(of: disk))
    }

    public static func verify(path: String, format: DiskFormat, chain: [BackingLayer]) throws(LibraryError) {
        guard format == .qcow2 else {
            if !chain.isEmpty { throw .corrupt(path: path, reason: "recorded as a raw disk resting on \(chain[0].path); a raw disk rests on nothing") }
            return
        }
        var current = path
        for index in 0...chain.count {
            let references: QCOW2References
            do { references = try QCOW2References.read(path: current) } catch { throw .disk(error) }
            if references.hasExternalData {
                throw .disk(.unsupported(path: current, feature: "an external data file"))
            }
            let expected = index < chain.count ? chain[index] : nil
            if let name = references.backingName {
                let named = DiskImages.normalized(name.hasPrefix("/") ? name : HostFiles.parent(of: current) + "/" + name)
                guard let expected, named == DiskImages.normalized(expected.path) else {
                    throw .disk(.unrecordedBacking(path: current, named: named, recorded: expected?.path))
                }
                if let format = references.backingFormat, format != expected.format {
                    throw .disk(.invalidImage(path: current, reason: "it records its backing file \(named) as \(format.rawValue); its definition says \(expected.format.rawValue)"))
                }
            } else if let expected {
                throw .disk(.invalidImage(path: current, reason: "it names no backing file, but its definition says it rests on \(expected.path)"))
            }
            guard let expected, expected.format == .qcow2 else { return }
            current = expected.path
        }
    }
}

/// A disk as QEMU's tools open it: every layer named, each in the format the definition records,
/// so neither QEMU nor qemu-img follows a header's backing name or probes a format (libvirt passes
/// its chains so). The qemu engine's drives and `vireo export`'s conversion both use it.
public enum QEMUBlockNode {
    /// A block node as QEMU's JSON describes it: the image in `format` on the file `path`,
    /// resting on exactly `chain` (nearest first), or on nothing ("backing": null).
    /// `hostDevice`: the image is a block device (QEMU's `host_device` protocol, which reads its
    /// size from the device); `direct`: `cache=none`, O_DIRECT on every layer.
    public static func json(path: String, format: DiskFormat, chain: [BackingLayer], readOnly: Bool, locking: Bool = true,
                            hostDevice: Bool = false, direct: Bool = false) -> String {
        let cache = direct ? ",\"cache\":{\"direct\":true}" : ""
        var node = "{\"driver\":\"\(format.rawValue)\",\"read-only\":\(readOnly)\(cache),\"file\":{\"driver\":\"\(hostDevice ? "host_device" : "file")\",\"filename\":\(JSONString.quote(path))\(cache)"
        node += locking ? "}" : ",\"locking\":\"off\"}"
        if format == .qcow2 {
            node += ",\"backing\":" + (chain.first.map { json(path: $0.path, format: $0.format, chain: Array(chain.dropFirst()), readOnly: true, locking: locking,
                                                             direct: direct) } ?? "null")
        }
        return node + "}"
    }
}
