import DiskImage
import FoundationEssentials
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// A storage pool (libvirt's model, kept small): a named place a library's disks live, so a disk
/// is made or attached by the pool's name and a volume's name rather than by a path or address.
/// A pool marked shared is one other hosts see at the same place: a migrating VM's disks may lie
/// in it without `--copy-disks` (docs/storage-pools.md).
public struct PoolDefinition: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable, CaseIterable {
        /// A directory: volumes are image files in it, made thin (qcow2) by `vireo disk create --pool`.
        case dir
        /// One block device, which is the pool's one volume.
        case block
        /// An NBD server: volumes are its exports.
        case nbd
        /// An iSCSI target: volumes are its LUNs.
        case iscsi
    }

    public static let currentVersion = 1
    public var version = PoolDefinition.currentVersion
    public var name: String
    public var type: Kind
    /// dir: the directory (absolute, links resolved); block: the device; nbd: the server's URI
    /// without an export; iscsi: the portal, HOST[:PORT].
    public var source: String
    /// iscsi: the target's IQN.
    public var target: String?
    /// iscsi: the file holding USER:SECRET for CHAP.
    public var chapFile: String?
    public var shared: Bool

    public init(name: String, type: Kind, source: String, target: String? = nil, chapFile: String? = nil, shared: Bool = false) {
        self.name = name; self.type = type; self.source = source; self.target = target; self.chapFile = chapFile; self.shared = shared
    }

    /// The disk path (file, device or network address) of volume `volume`; refused naming the
    /// field when the name cannot be one of this pool's volumes.
    public func path(ofVolume volume: String) throws(LibraryError) -> String {
        func refuse(_ why: String) -> LibraryError { .invalidValue(field: "volume", reason: "'\(volume.prefix(200))' \(why) in pool '\(name)' (\(type.rawValue))") }
        guard volume.utf8.count <= 255, !volume.contains("|"), !volume.contains(","), !volume.contains("?"), !volume.utf8.contains(0) else {
            throw refuse("is not a usable volume name")
        }
        switch type {
        case .dir:
            guard !volume.isEmpty, !volume.contains("/"), !volume.hasPrefix(".") else { throw refuse("is not a file name (no '/', not starting with '.')") }
            return source + "/" + volume
        case .block:
            // The device is the pool's only volume, named by nothing or by its own name.
            guard volume.isEmpty || volume == source || "/dev/" + volume == source else { throw refuse("is not its device \(source)") }
            return source
        case .nbd:
            do { return try NBDAddress.parse(source).naming(export: volume).description } catch { throw .invalidValue(field: "volume", reason: error.description) }
        case .iscsi:
            guard let lun = Int(volume), lun >= 0, lun < 16384 else { throw refuse("is not a LUN number (0 to 16383)") }
            return "iscsi://\(source)/\(target ?? "")/\(lun)" + (chapFile.map { "?chap=\($0)" } ?? "")
        }
    }

    /// Whether a disk's path lies in this pool: a file in its directory, its device, or an
    /// address on its server (and, for iSCSI, its target with its CHAP file).
    public func holds(_ diskPath: String) -> Bool {
        switch type {
        case .dir:
            return HostPath.inside(diskPath, source) != nil
        case .block:
            return HostPath.real(diskPath) == HostPath.real(source)
        case .nbd, .iscsi:
            guard DiskFormat.isNetworkAddress(diskPath), let mine = try? NetworkDisk.endpoints(try path(ofVolume: type == .iscsi ? "0" : "")).first,
                  let theirs = try? NetworkDisk.endpoints(diskPath) else { return false }
            if type == .iscsi {
                guard let addresses = try? ISCSIAddress.paths(diskPath), addresses.allSatisfy({ $0.target == target }) else { return false }
            }
            return theirs.allSatisfy { $0 == mine }
        }
    }
}

/// The library's pools: `pools/NAME.json`, changed under `pools/.lock`.
public struct PoolStore: Sendable {
    public let directory: String

    public init(libraryRoot: String) { directory = libraryRoot + "/pools" }

    func configPath(of name: String) -> String { directory + "/" + name + ".json" }

    public func names() throws(LibraryError) -> [String] {
        guard HostFiles.isDirectory(directory) else { return [] }
        return try HostFiles.entries(of: directory).filter { !$0.hasPrefix(".") && $0.hasSuffix(".json") }.map { String($0.dropLast(5)) }.sorted()
    }

    public func exists(_ name: String) -> Bool { HostFiles.exists(configPath(of: name)) }

    public func load(_ name: String) throws(LibraryError) -> PoolDefinition {
        try NetworkName.validate(name, field: "pool")
        let path = configPath(of: name)
        guard HostFiles.exists(path) else { throw .invalidValue(field: "pool", reason: "no pool named '\(name)' (see `vireo pool list`)") }
        let definition: PoolDefinition
        do { definition = try JSONDecoder().decode(PoolDefinition.self, from: Data(try HostFiles.readAll(path))) } catch {
            throw .corrupt(path: path, reason: "not a pool definition: \(error)")
        }
        guard definition.version <= PoolDefinition.currentVersion else { throw .corrupt(path: path, reason: "written by a newer Vireo (version \(definition.version))") }
        guard definition.name == name else { throw .corrupt(path: path, reason: "names pool '\(definition.name)', not '\(name)'") }
        return definition
    }

    public func all() throws(LibraryError) -> [PoolDefinition] {
        var pools: [PoolDefinition] = []
        for name in try names() { pools.append(try load(name)) }
        return pools
    }

    func locked<T>(_ body: () throws(LibraryError) -> T) throws(LibraryError) -> T {
        try HostFiles.makeDirectories(directory)
        let lock = try VMLock(path: directory + "/.lock", create: true)
        guard lock.tryExclusive(attempts: 3000) else { throw .corrupt(path: lock.path, reason: "another vireo command has held the pool lock for 30 s") }
        defer { lock.unlock() }
        return try body()
    }

    func save(_ definition: PoolDefinition) throws(LibraryError) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let bytes: Data
        do { bytes = try encoder.encode(definition) } catch { throw .corrupt(path: configPath(of: definition.name), reason: "cannot encode: \(error)") }
        try HostFiles.writeAtomically(Array(bytes) + [10], to: configPath(of: definition.name))
    }
}

/// What `vireo pool` does, written once for every front end.
public struct StoragePools: Sendable {
    public let store: PoolStore
    let library: VMLibrary

    public init(library: VMLibrary) {
        self.library = library
        store = PoolStore(libraryRoot: library.root)
    }

    /// What `vireo pool create` asks for.
    public struct CreateRequest: Sendable {
        public var name: String
        public var type: PoolDefinition.Kind
        public var source: String
        public var target: String?
        public var chapFile: String?
        public var shared = false

        public init(name: String, type: PoolDefinition.Kind, source: String, target: String? = nil, chapFile: String? = nil, shared: Bool = false) {
            self.name = name; self.type = type; self.source = source; self.target = target; self.chapFile = chapFile; self.shared = shared
        }
    }

    /// Defines a pool once its source is checked: the directory or device exists, the server
    /// answers. Nothing is made on a refusal.
    public func create(_ request: CreateRequest) throws(LibraryError) -> PoolDefinition {
        try NetworkName.validate(request.name, field: "pool")
        var definition = PoolDefinition(name: request.name, type: request.type, source: request.source, shared: request.shared)
        guard request.type == .iscsi || (request.target == nil && request.chapFile == nil) else {
            throw .invalidValue(field: request.target != nil ? "target" : "chap", reason: "only an iscsi pool has a target and a CHAP file")
        }
        switch request.type {
        case .dir:
            let absolute = HostFiles.absolute(request.source)
            guard let real = HostPath.real(absolute), HostFiles.isDirectory(real) else {
                throw .invalidValue(field: "path", reason: "\(absolute) is not an existing directory; make it first (a pool never creates its directory)")
            }
            if let libraryRoot = HostPath.real(library.root), real == libraryRoot || HostPath.inside(real, libraryRoot) != nil {
                throw .invalidValue(field: "path", reason: "\(real) lies in the library \(libraryRoot), whose directories are its VMs' own; give a directory outside it")
            }
            definition.source = real
        case .block:
            var status = stat()
            guard request.source.hasPrefix("/dev/"), stat(request.source, &status) == 0, status.st_mode & S_IFMT == S_IFBLK else {
                throw .invalidValue(field: "device", reason: "\(request.source) is not a block device under /dev")
            }
        case .nbd:
            let address: NBDAddress
            do { address = try NBDAddress.parse(request.source) } catch { throw .invalidValue(field: "uri", reason: error.description) }
            guard address.export.isEmpty else {
                throw .invalidValue(field: "uri", reason: "\(request.source) names the export '\(address.export)'; a pool names the server (nbd://HOST[:PORT] or nbd+unix:///?socket=PATH) and its exports are its volumes")
            }
            definition.source = address.description.hasSuffix("/") ? String(address.description.dropLast()) : address.description
        case .iscsi:
            guard let target = request.target else { throw .invalidValue(field: "target", reason: "an iscsi pool needs the target's IQN") }
            definition.target = target
            if let chap = request.chapFile { definition.chapFile = HostFiles.absolute(chap) }
            // The portal and target as a LUN's address would name them: one parser for both.
            do { _ = try ISCSIAddress.parse(try definition.path(ofVolume: "0")) } catch let error as LibraryError { throw error } catch {
                throw .invalidValue(field: "portal", reason: "\(error)")
            }
        }
        if request.type == .nbd || request.type == .iscsi {
            // As libvirt starts a pool: the server must answer now.
            do {
                for endpoint in try NetworkDisk.endpoints(try definition.path(ofVolume: request.type == .iscsi ? "0" : "")) { try NetworkDisk.reach(endpoint) }
            } catch let error as LibraryError { throw error } catch {
                throw .invalidValue(field: request.type == .nbd ? "uri" : "portal", reason: "\(error)")
            }
        }
        return try store.locked { () throws(LibraryError) in
            guard !store.exists(request.name) else { throw .invalidValue(field: "pool", reason: "a pool named '\(request.name)' exists already") }
            try store.save(definition)
            return definition
        }
    }

    /// The VMs whose disks lie in `pool`, with the disks.
    public func users(of pool: PoolDefinition) throws(LibraryError) -> [(vm: String, disk: String)] {
        var found: [(String, String)] = []
        for name in try library.names() {
            let bundle = try library.bundle(named: name)
            guard let definition = try? bundle.load() else { continue }
            for disk in definition.disks where pool.holds(bundle.resolve(disk.path)) { found.append((name, bundle.resolve(disk.path))) }
        }
        return found
    }

    /// Forgets a pool no VM uses; its volumes stay where they are.
    public func delete(_ name: String) throws(LibraryError) {
        try store.locked { () throws(LibraryError) in
            let pool = try store.load(name)
            let users = try users(of: pool)
            guard users.isEmpty else {
                throw .invalidValue(field: "pool", reason: "VMs use volumes in '\(name)': \(users.map { "\($0.vm) (\($0.disk))" }.joined(separator: ", ")); detach or delete them first")
            }
            guard unlink(store.configPath(of: name)) == 0 else { throw .io(operation: "remove", path: store.configPath(of: name), errno: errno) }
        }
    }

    public struct Volume: Sendable, Codable {
        public var name: String
        public var path: String
        public var format: DiskFormat
        public var virtualSize: UInt64?
        public var allocatedBytes: UInt64?

        public init(name: String, path: String, format: DiskFormat, virtualSize: UInt64?, allocatedBytes: UInt64?) {
            self.name = name; self.path = path; self.format = format; self.virtualSize = virtualSize; self.allocatedBytes = allocatedBytes
        }
    }

    /// A pool's volumes: a dir pool's image files (`.qcow2`, `.raw`), a block pool's device, an NBD
    /// server's exports as it lists them (NBD_OPT_LIST, with sizes). An iSCSI target's LUNs are
    /// not listed (docs/storage-pools.md).
    public func volumes(of pool: PoolDefinition) throws(LibraryError) -> [Volume] {
        switch pool.type {
        case .dir:
            var volumes: [Volume] = []
            for entry in try HostFiles.entries(of: pool.source).sorted() where !entry.hasPrefix(".") {
                let path = pool.source + "/" + entry
                guard !HostFiles.isDirectory(path), let format = DiskFormat.declared(byName: path) else { continue }
                // The header's size only, never its backing name: a VM's own process can write
                // the header of a volume it uses, and this runs as root.
                var status = stat()
                let allocated = lstat(path, &status) == 0 && status.st_mode & S_IFMT == S_IFREG ? UInt64(status.st_blocks) * 512 : nil
                volumes.append(Volume(name: entry, path: path, format: format, virtualSize: try? DiskImages.peek(path: path, format: format), allocatedBytes: allocated))
            }
            return volumes
        case .block:
            let size = try? DiskImages.peek(path: pool.source, format: .raw)
            return [Volume(name: HostFiles.lastComponent(of: pool.source), path: pool.source, format: .raw, virtualSize: size, allocatedBytes: size)]
        case .nbd:
            do throws(DiskImageError) {
                let server = try NBDAddress.parse(pool.source)
                return try NBDImage.listExports(server: pool.source).map { export in
                    Volume(name: export.name, path: server.naming(export: export.name).description, format: .raw, virtualSize: export.size, allocatedBytes: nil)
                }
            } catch {
                throw .disk(error)
            }
        case .iscsi:
            // The target's LUNs that are disks (REPORT LUNS, READ CAPACITY), by number.
            let text = try pool.path(ofVolume: "0")
            let address: ISCSIAddress
            do { address = try ISCSIAddress.parse(text) } catch { throw .disk(error) }
            let luns: [(lun: Int, size: UInt64)]
            do { luns = try ISCSIImage.listLUNs(address) } catch { throw .disk(error) }
            var volumes: [Volume] = []
            for entry in luns {
                volumes.append(Volume(name: String(entry.lun), path: try pool.path(ofVolume: String(entry.lun)), format: .raw, virtualSize: entry.size, allocatedBytes: nil))
            }
            return volumes
        }
    }

    /// Makes a new volume: a thin image file in a dir pool (qcow2 unless the name says `.raw`).
    /// Other pools' volumes are made on their server or device, not by Vireo.
    public func createVolume(pool name: String, volume: String, sizeBytes: UInt64, format: DiskFormat? = nil) throws(LibraryError) -> (path: String, format: DiskFormat) {
        let pool = try store.load(name)
        guard pool.type == .dir else {
            let why = pool.type == .block ? "is one block device, its only volume" : pool.type == .nbd ? "holds the NBD server's exports, which the server makes" : "holds the target's LUNs, which the target makes"
            throw .invalidValue(field: "pool", reason: "'\(name)' \(why); attach one with `vireo disk attach VM VOLUME --pool \(name)`")
        }
        let chosen = format ?? DiskFormat.declared(byName: volume) ?? .qcow2
        let file = DiskFormat.declared(byName: volume) == nil ? volume + "." + chosen.rawValue : volume
        guard DiskFormat.declared(byName: file) == chosen else {
            throw .invalidValue(field: "format", reason: "the volume '\(volume)' is named as \(DiskFormat.declared(byName: volume)?.rawValue ?? "?"), not \(chosen.rawValue)")
        }
        let path = try pool.path(ofVolume: file)
        do { _ = try StandaloneDisks.create(StandaloneDisks.CreateRequest(path: path, format: chosen, sizeBytes: sizeBytes)) } catch {
            throw .disk(error)
        }
        return (path, chosen)
    }
}
