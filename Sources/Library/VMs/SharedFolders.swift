import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// A host directory the guest mounts over virtio-fs (`vireo share add`, `--share`): served by
/// Debian's virtiofsd, mounted in the guest by its tag (docs/shared-folders.md).
public struct SharedFolder: Codable, Sendable, Equatable {
    public var tag: String
    /// The directory's real path, resolved when the share was added (a later symbolic link in
    /// its place is not followed: the server is handed the directory it was given).
    public var path: String
    public var readOnly: Bool
    /// Where a cloud-init guest mounts it; nil: /mnt/TAG.
    public var mountPoint: String?

    public init(tag: String, path: String, readOnly: Bool = false, mountPoint: String? = nil) {
        self.tag = tag
        self.path = path
        self.readOnly = readOnly
        self.mountPoint = mountPoint
    }

    /// Where the guest's mount script puts it.
    public var guestMountPoint: String { mountPoint ?? "/mnt/" + tag }

    /// The share as the guest's mount script reads it, from SMBIOS (qemu engine) or the kernel
    /// command line (kvm engine): `TAG`, then `:ro`, then `@/MOUNT/POINT` when not the default.
    public var guestListing: String { tag + (readOnly ? ":ro" : "") + (mountPoint.map { "@" + $0 } ?? "") }

    /// `--share HOSTDIR[:TAG][,ro][,mount=/GUEST/PATH]`. A directory whose own name holds a ':'
    /// is taken whole when it exists; otherwise the part after the last ':' is the tag.
    public static func parse(_ text: String) throws(LibraryError) -> SharedFolder {
        var body = Substring(text)
        var readOnly = false
        var mountPoint: String?
        while true {
            if body.hasSuffix(",ro") { body = body.dropLast(3); readOnly = true; continue }
            if body.hasSuffix(",rw") { body = body.dropLast(3); continue }
            // A mount point has no comma (MachineRules.shareMountPoint): the last one starts it.
            if mountPoint == nil, let comma = body.lastIndex(of: ","), body[comma...].hasPrefix(",mount=") {
                mountPoint = String(body[body.index(comma, offsetBy: 7)...])
                body = body[..<comma]
                continue
            }
            break
        }
        if body.contains(","), !HostFiles.isDirectory(String(body)) {
            throw .invalidValue(field: "shares", reason: "'\(text.prefix(200))': give HOSTDIR[:TAG][,ro][,mount=/GUEST/PATH] (the options are ro and mount=)")
        }
        var path = String(body), tag: String?
        if !HostFiles.isDirectory(path), let colon = body.lastIndex(of: ":") {
            path = String(body[..<colon])
            tag = String(body[body.index(after: colon)...])
        }
        guard !path.isEmpty else { throw .invalidValue(field: "shares", reason: "'\(text.prefix(200))' names no host directory; give HOSTDIR[:TAG][,ro][,mount=/GUEST/PATH]") }
        if let mountPoint { do { try MachineRules.shareMountPoint(mountPoint) } catch { throw LibraryError(error) } }
        return SharedFolder(tag: tag ?? defaultTag(for: path), path: path, readOnly: readOnly, mountPoint: mountPoint)
    }

    /// The directory's own name, made a valid tag ("my project" → "my-project").
    public static func defaultTag(for path: String) -> String {
        let name = HostFiles.lastComponent(of: path.hasSuffix("/") && path.count > 1 ? String(path.dropLast()) : path)
        let mapped = String(name.unicodeScalars.map { scalar -> Character in
            let ok = (scalar >= "a" && scalar <= "z") || (scalar >= "A" && scalar <= "Z") || (scalar >= "0" && scalar <= "9") || scalar == "_" || scalar == "-" || scalar == "."
            return ok ? Character(scalar) : "-"
        }.prefix(MachineLimits.shareTagLength))
        return mapped.isEmpty || mapped == "." || mapped == ".." || mapped.allSatisfy({ $0 == "-" }) ? "share" : mapped
    }

    /// What only this host can say, checked where a share is added: the directory exists, is a
    /// directory (its real path is what is stored), and neither holds nor lies inside the
    /// library — a guest must never reach definitions, disks or keys root trusts — nor is `/`.
    public func checkedOnHost(libraryRoot: String) throws(LibraryError) -> SharedFolder {
        let absolute = HostFiles.absolute(path)
        guard let real = HostPath.real(absolute) else {
            throw .invalidValue(field: "shares", reason: "\(path) does not exist; give a host directory to share")
        }
        guard HostFiles.isDirectory(real) else {
            throw .invalidValue(field: "shares", reason: "\(path) is not a directory; a shared folder is a directory (share its parent, or attach a file as a disk)")
        }
        guard real != "/" else { throw .invalidValue(field: "shares", reason: "the host's root directory cannot be shared; share a directory below it") }
        let library = HostPath.real(libraryRoot) ?? libraryRoot
        if real == library || real.hasPrefix(library + "/") {
            throw .invalidValue(field: "shares", reason: "\(real) lies inside Vireo's library (\(library)), whose files the host trusts; share a directory outside it")
        }
        if library.hasPrefix(real + "/") {
            throw .invalidValue(field: "shares", reason: "\(real) holds Vireo's library (\(library)), whose files the host trusts; share a directory that does not contain it")
        }
        var checked = self
        checked.path = real
        return checked
    }
}

extension VMLibrary {
    /// Every share's rules that need no host: tags (MachineRules), absolute paths, and RAM
    /// virtiofsd can map on the engine that runs the VM.
    static func validate(shares: [SharedFolder], engine: EngineKind, memoryBacking: MemoryBackingOptions) throws(LibraryError) {
        do { try MachineRules.shares(tags: shares.map(\.tag)) } catch { throw LibraryError(error) }
        guard !shares.isEmpty else { return }
        var mountPoints = Set<String>()
        for share in shares {
            try validate(path: share.path, field: "shares")
            guard share.path.hasPrefix("/") else { throw .invalidValue(field: "shares", reason: "'\(share.path.prefix(200))' is not an absolute path") }
            if let point = share.mountPoint {
                do { try MachineRules.shareMountPoint(point) } catch { throw .invalidValue(field: "mount_point", reason: error.reason) }
            }
            guard mountPoints.insert(share.guestMountPoint).inserted else {
                throw .invalidValue(field: "shares", reason: "two shared folders would be mounted at \(share.guestMountPoint) in the guest; give one another mount point")
            }
        }
        if engine == .kvm {
            // The kvm engine maps RAM from a shared memfd for virtiofsd (KVMEngine.machineSpec):
            // its huge pages are anonymous, and KSM merges private pages only.
            if let pages = memoryBacking.hugePages {
                throw .invalidValue(field: "shares", reason: "virtiofsd must map the guest's RAM, and the kvm engine's huge pages (--memory-backing hugepages=\(pages)) are private to the VMM; use --engine qemu for huge pages with shared folders, or the default RAM")
            }
            if memoryBacking.mergeable {
                throw .invalidValue(field: "shares", reason: "virtiofsd must map the guest's RAM, which makes it shared, and KSM (--ksm) merges private pages only; drop --ksm or the shared folders")
            }
        }
        if let file = memoryBacking.file, file != "memfd", !memoryBacking.shared {
            throw .invalidValue(field: "shares", reason: "virtiofsd must map the guest's RAM, and a private RAM file (--memory-backing \(file)) cannot be; use the default RAM, memfd or huge pages, or add ',shared'")
        }
    }

    /// `vireo share add`: checked on the host, then added to the stopped VM.
    public func addShare(_ name: String, _ share: SharedFolder) throws(LibraryError) -> VMDefinition {
        let checked = try share.checkedOnHost(libraryRoot: root)
        return try update(name, action: "add a shared folder to") { (definition, _) throws(LibraryError) in
            if let other = definition.shares.first(where: { $0.tag == checked.tag }) {
                throw .invalidValue(field: "tag", reason: "VM '\(name)' already shares \(other.path) as '\(checked.tag)'; give another --tag")
            }
            if let other = definition.shares.first(where: { $0.guestMountPoint == checked.guestMountPoint }) {
                throw .invalidValue(field: "mount_point", reason: "VM '\(name)' already mounts '\(other.tag)' at \(checked.guestMountPoint); give another --mount-point")
            }
            definition.shares.append(checked)
        }
    }

    /// `vireo share remove`: by tag (or the host path it shares).
    public func removeShare(_ name: String, _ tagOrPath: String) throws(LibraryError) -> (VMDefinition, SharedFolder) {
        var removed: SharedFolder?
        let definition = try update(name, action: "remove a shared folder from") { (definition, _) throws(LibraryError) in
            let real = HostPath.real(HostFiles.absolute(tagOrPath))
            guard let index = definition.shares.firstIndex(where: { $0.tag == tagOrPath || $0.path == real }) else {
                let list = definition.shares.map { "\($0.tag) (\($0.path))" }.joined(separator: ", ")
                throw .invalidValue(field: "TAG", reason: "VM '\(name)' has no shared folder '\(tagOrPath)' (shares: \(list.isEmpty ? "none" : list))")
            }
            removed = definition.shares.remove(at: index)
        }
        guard let removed else { throw .invalidValue(field: "TAG", reason: "VM '\(name)' has no shared folder '\(tagOrPath)'") }
        return (definition, removed)
    }
}
