import DiskImage
import FoundationEssentials
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// One snapshot of a VM (docs/snapshots.md): its disks as they were (each writable qcow2 disk's
/// image at that moment, frozen since: later writes go to an overlay on it), its settings, and
/// for a running or saved VM its memory and device state.
public struct SnapshotRecord: Codable, Sendable, Equatable {
    /// Eight hex digits; names the snapshot's directory and its overlays.
    public var id: String
    public var name: String
    public var description: String?
    /// Seconds since the epoch.
    public var createdAt: Int64
    /// The snapshot this one was taken after (the tree's edge); nil for a root.
    public var parent: String?
    /// Whether memory and device state were saved with it (the VM ran, or was saved).
    public var hasMemory: Bool
    /// Per disk of the definition (same order), the frozen image it was; nil for disks a
    /// snapshot leaves alone (read-only ones).
    public var layers: [String?]
}

/// The snapshots of one VM as a tree (`snapshots/tree.json`) and where the VM is in it.
public struct SnapshotTree: Codable, Sendable, Equatable {
    public var snapshots: [SnapshotRecord] = []
    /// The snapshot the VM's current disks rest on (the last taken or restored); nil before any.
    public var current: String?

    public init() {}

    public func find(_ reference: String) -> SnapshotRecord? {
        snapshots.first { $0.name == reference } ?? snapshots.first { $0.id == reference }
    }

    public func children(of id: String?) -> [SnapshotRecord] { snapshots.filter { $0.parent == id } }
}

extension VMBundle {
    public var snapshotsDirectory: String { directory + "/snapshots" }
    var snapshotTreePath: String { snapshotsDirectory + "/tree.json" }
    public func snapshotDirectory(_ id: String) -> String { snapshotsDirectory + "/" + id }
    public func snapshotStatePath(_ id: String) -> String { snapshotDirectory(id) + "/state" }

    public func loadSnapshots() throws(LibraryError) -> SnapshotTree {
        guard HostFiles.exists(snapshotTreePath) else { return SnapshotTree() }
        let bytes = try HostFiles.readAll(snapshotTreePath)
        do {
            return try JSONDecoder().decode(SnapshotTree.self, from: Data(bytes))
        } catch {
            throw .corrupt(path: snapshotTreePath, reason: "not a valid snapshot list (\(error))")
        }
    }

    func saveSnapshots(_ tree: SnapshotTree) throws(LibraryError) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data: Data
        do { data = try encoder.encode(tree) } catch {
            throw .corrupt(path: snapshotTreePath, reason: "cannot encode the snapshot list: \(error)")
        }
        try HostFiles.makeDirectories(snapshotsDirectory)
        try HostFiles.writeAtomically(Array(data) + [0x0a], to: snapshotTreePath)
    }

    func loadSnapshotDefinition(_ id: String) throws(LibraryError) -> VMDefinition {
        try VMBundle(directory: snapshotDirectory(id)).load(vmDirectory: directory)
    }

    func saveSnapshotDefinition(_ definition: VMDefinition, id: String) throws(LibraryError) {
        try VMBundle(directory: snapshotDirectory(id)).save(definition)
    }
}

/// Snapshot names: like VM names, so they are safe as command-line words.
enum SnapshotName {
    static func validate(_ name: String) throws(LibraryError) {
        do {
            try VMName.validate(name)
        } catch {
            throw .invalidValue(field: "SNAPSHOT", reason: "'\(name)' must be \(VMName.rule)")
        }
    }
}

extension Array {
    subscript(safe index: Int) -> Element? { indices.contains(index) ? self[index] : nil }
}

extension VMLibrary {
    /// The overlay a snapshot puts on a disk image: beside it, its stem and the snapshot's ID
    /// (the VMM follows the same rule for live snapshots: Machine.snapshotOverlayPath).
    public static func snapshotOverlayName(for path: String, snapshot id: String) -> String {
        let name = HostFiles.lastComponent(of: path)
        let stem = name.split(separator: ".", maxSplits: 1).first.map(String.init) ?? name
        let directory = path.contains("/") ? String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)]) + "/" : ""
        return directory + stem + "." + id + ".qcow2"
    }

    /// Whether `path` names an overlay a snapshot take or restore made (`STEM.<8 hex>.qcow2`).
    static func isSnapshotOverlay(_ path: String) -> Bool {
        let parts = HostFiles.lastComponent(of: path).split(separator: ".")
        return parts.count == 3 && parts[2] == "qcow2" && parts[1].count == 8
            && parts[1].utf8.allSatisfy { ($0 >= 48 && $0 <= 57) || ($0 >= 97 && $0 <= 102) }
    }

    static func newSnapshotID() -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<4).map { _ in
            let byte = UInt8.random(in: 0...255, using: &generator)
            return String(byte >> 4, radix: 16) + String(byte & 0xf, radix: 16)
        }.joined()
    }

    /// Which disks a snapshot layers (writable qcow2 disks in the VM's directory), refusing VMs
    /// with a writable disk it could not freeze.
    static func snapshotLayers(_ definition: VMDefinition, name: String) throws(LibraryError) -> [String?] {
        try definition.disks.map { (disk) throws(LibraryError) -> String? in
            if disk.readOnly { return nil }
            guard disk.isOwned, disk.format == .qcow2 else {
                throw .invalidValue(field: "snapshot", reason: "VM '\(name)' has the writable \(disk.format.rawValue) disk \(disk.path)\(disk.isOwned ? "" : " outside its directory"); snapshots freeze qcow2 disks in the VM's directory. Attach it read-only, detach it, or convert it (qemu-img convert -O qcow2)")
            }
            return disk.path
        }
    }

    /// Serialises snapshot changes of one VM, running or not (the VM's own lock is the VMM's while
    /// it runs).
    func withSnapshotLock<T>(_ bundle: VMBundle, _ body: () throws(LibraryError) -> T) throws(LibraryError) -> T {
        try HostFiles.makeDirectories(bundle.snapshotsDirectory)
        let lock = try VMLock(path: bundle.snapshotsDirectory + "/.lock", create: true)
        guard lock.tryExclusive(attempts: 600) else { throw .busy(name: bundle.name) }
        defer { lock.unlock() }
        return try body()
    }

    /// Prepares a snapshot: new overlays on every layered disk, the snapshot's directory with the
    /// settings as they are, the definition moved onto the overlays. `commit` records it in the
    /// tree; `abandon` undoes all of it. Shared by the offline and the live path.
    struct PreparedSnapshot {
        let bundle: VMBundle
        var record: SnapshotRecord
        let before: VMDefinition
        let overlays: [String]
    }

    func prepareSnapshot(_ bundle: VMBundle, name requested: String?, description: String?, hasMemory: Bool) throws(LibraryError) -> PreparedSnapshot {
        let definition = try bundle.load()
        var tree = try bundle.loadSnapshots()
        let name = requested ?? "snapshot-\(tree.snapshots.count + 1)"
        try SnapshotName.validate(name)
        if tree.find(name) != nil {
            throw .invalidValue(field: "SNAPSHOT", reason: "VM '\(definition.name)' already has a snapshot named '\(name)'; choose another name")
        }
        if let description, description.utf8.count > 1024 {
            throw .invalidValue(field: "description", reason: "\(description.utf8.count) bytes; at most 1024")
        }
        let layers = try Self.snapshotLayers(definition, name: definition.name)
        var id = Self.newSnapshotID()
        while tree.snapshots.contains(where: { $0.id == id }) { id = Self.newSnapshotID() }
        tree.snapshots.append(SnapshotRecord(id: id, name: name, description: description, createdAt: Int64(time(nil)),
                                             parent: tree.current, hasMemory: hasMemory, layers: layers))
        var moved = definition
        var overlays: [String] = []
        do throws(LibraryError) {
            try HostFiles.makeDirectory(bundle.snapshotDirectory(id))
            // The settings as they were: what a restore puts back.
            try VMBundle(directory: bundle.snapshotDirectory(id)).save(definition)
            for (index, layer) in layers.enumerated() {
                guard let layer else { continue }
                let overlay = Self.snapshotOverlayName(for: layer, snapshot: id)
                // Peeked: a running VM holds its disk locked.
                let size = try Self.virtualSize(bundle.resolve(layer), format: .qcow2)
                try Self.createDisk(bundle.resolve(overlay), size: size, backing: BackingLayer(path: HostFiles.lastComponent(of: layer), format: .qcow2))
                overlays.append(bundle.resolve(overlay))
                moved.disks[index].path = overlay
                moved.disks[index].backing = [BackingLayer(path: layer, format: .qcow2)] + definition.disks[index].backing
            }
            try bundle.save(moved)
        } catch {
            for overlay in overlays { unlink(overlay) }
            try? HostFiles.removeTree(bundle.snapshotDirectory(id))
            try? bundle.save(definition)
            throw error
        }
        return PreparedSnapshot(bundle: bundle, record: tree.snapshots[tree.snapshots.count - 1], before: definition, overlays: overlays)
    }

    func commitSnapshot(_ prepared: PreparedSnapshot) throws(LibraryError) {
        var tree = try prepared.bundle.loadSnapshots()
        tree.snapshots.append(prepared.record)
        tree.current = prepared.record.id
        try prepared.bundle.saveSnapshots(tree)
    }

    func abandonSnapshot(_ prepared: PreparedSnapshot) {
        try? prepared.bundle.save(prepared.before)
        for overlay in prepared.overlays { unlink(overlay) }
        try? HostFiles.removeTree(prepared.bundle.snapshotDirectory(prepared.record.id))
    }

    /// A snapshot of a running VM: `perform` asks its engine to write the state to the snapshot's
    /// directory and move the disks onto the overlays prepared here. A failure before that undoes
    /// everything; once the engine has moved, the snapshot stays (recorded, or reported).
    public func takeSnapshotLive(_ name: String, snapshot: String?, description: String?,
                                 perform: (SnapshotRecord) throws(LibraryError) -> Bool) throws(LibraryError) -> SnapshotRecord {
        let bundle = try bundle(named: name)
        return try withSnapshotLock(bundle) { () throws(LibraryError) -> SnapshotRecord in
            var prepared = try prepareSnapshot(bundle, name: snapshot, description: description, hasMemory: true)
            let keptMemory: Bool
            do throws(LibraryError) {
                // A jailed VMM opens the overlays as its own uid (and writes the state in its own
                // directory; the engine moves it into the snapshot's).
                try bundle.grantToRunningVMM(prepared.overlays)
                keptMemory = try perform(prepared.record)
            } catch {
                abandonSnapshot(prepared)
                throw error
            }
            if !keptMemory {
                // The disks moved; only the memory is missing: a disk-only snapshot.
                prepared.record.hasMemory = false
                unlink(bundle.snapshotStatePath(prepared.record.id))
            }
            try commitSnapshot(prepared)
            return prepared.record
        }
    }

    /// A snapshot of a VM that is not running: its disks, and its saved state when it is saved.
    public func takeSnapshotOffline(_ name: String, snapshot: String?, description: String?) throws(LibraryError) -> SnapshotRecord {
        try withStoppedVM(name, action: "snapshot") { (bundle, _) throws(LibraryError) -> SnapshotRecord in
            try withSnapshotLock(bundle) { () throws(LibraryError) -> SnapshotRecord in
                let saved = bundle.hasSavedState
                let prepared = try prepareSnapshot(bundle, name: snapshot, description: description, hasMemory: saved)
                do throws(LibraryError) {
                    // The saved state is immutable once written (a new one replaces it by rename),
                    // so the snapshot shares it by a hard link.
                    if saved, link(bundle.savedStatePath, bundle.snapshotStatePath(prepared.record.id)) != 0 {
                        throw .io(operation: "link the saved state into the snapshot", path: bundle.snapshotStatePath(prepared.record.id), errno: errno)
                    }
                    try commitSnapshot(prepared)
                } catch {
                    abandonSnapshot(prepared)
                    throw error
                }
                return prepared.record
            }
        }
    }

    /// Puts a VM that is not running back to `snapshot`: new overlays on the snapshot's disk
    /// layers, its settings (keeping the VM's name and identity, with a new generation ID), and
    /// its memory as the saved state when it has one. What the VM held since the last snapshot
    /// is discarded, as VirtualBox's restore does.
    public func restoreSnapshot(_ name: String, snapshot reference: String) throws(LibraryError) -> SnapshotRecord {
        try withStoppedVM(name, action: "restore a snapshot of") { (bundle, _) throws(LibraryError) -> SnapshotRecord in
            try withSnapshotLock(bundle) { () throws(LibraryError) -> SnapshotRecord in
                var tree = try bundle.loadSnapshots()
                guard let record = tree.find(reference) else { throw Self.noSnapshot(reference, of: name, in: tree) }
                let current = try bundle.load()
                var restored = try bundle.loadSnapshotDefinition(record.id)
                restored.name = current.name
                restored.uuid = current.uuid
                restored.createdAt = current.createdAt
                // A new generation: the guest learns it may have been duplicated (vmgenid).
                restored.generationID = VMDefinition.newGenerationID()
                let overlayID = Self.newSnapshotID()
                var made: [String] = []
                do throws(LibraryError) {
                    for (index, layer) in record.layers.enumerated() {
                        guard let layer else { continue }
                        guard index < restored.disks.count else {
                            throw .corrupt(path: bundle.snapshotDirectory(record.id), reason: "the snapshot lists more disks than its settings")
                        }
                        let overlay = Self.snapshotOverlayName(for: layer, snapshot: overlayID)
                        let size = try Self.virtualSize(bundle.resolve(layer), format: .qcow2)
                        try Self.createDisk(bundle.resolve(overlay), size: size, backing: BackingLayer(path: HostFiles.lastComponent(of: layer), format: .qcow2))
                        made.append(bundle.resolve(overlay))
                        // The snapshot's settings recorded the layer as the disk, with its chain.
                        restored.disks[index].backing = [BackingLayer(path: layer, format: .qcow2)] + restored.disks[index].backing
                        restored.disks[index].path = overlay
                    }
                    try bundle.prepareVMMDirectory()
                    let staged = bundle.savedStatePath + ".restoring"
                    unlink(staged)
                    if record.hasMemory, link(bundle.snapshotStatePath(record.id), staged) != 0 {
                        throw .io(operation: "link the snapshot's state", path: staged, errno: errno)
                    }
                    try bundle.save(restored)
                    if record.hasMemory {
                        guard Glibc.rename(staged, bundle.savedStatePath) == 0 else {
                            let code = errno
                            try? bundle.save(current)
                            throw .io(operation: "rename", path: staged, errno: code)
                        }
                    } else {
                        unlink(bundle.savedStatePath)
                    }
                } catch {
                    for file in made { unlink(file) }
                    throw error
                }
                tree.current = record.id
                try bundle.saveSnapshots(tree)
                // The overlays the VM wrote to since are nobody's layer: they go. Only overlays a
                // snapshot made: a disk attached after the snapshot is left in place, detached.
                let layers = Set(tree.snapshots.flatMap { $0.layers.compactMap { $0 } })
                for disk in current.disks where disk.isOwned && Self.isSnapshotOverlay(disk.path) && !layers.contains(disk.path)
                    && !restored.disks.contains(where: { $0.path == disk.path }) {
                    unlink(bundle.resolve(disk.path))
                }
                return record
            }
        }
    }

    /// Deletes a snapshot of a VM that is not running. Its disk layers merge into the one image
    /// resting on them (`qemu-img rebase`), so no other snapshot and not the current state
    /// changes; a snapshot two others rest on is refused.
    public func deleteSnapshot(_ name: String, snapshot reference: String) throws(LibraryError) -> SnapshotRecord {
        try withStoppedVM(name, action: "delete a snapshot of") { (bundle, _) throws(LibraryError) -> SnapshotRecord in
            try withSnapshotLock(bundle) { () throws(LibraryError) -> SnapshotRecord in
                var tree = try bundle.loadSnapshots()
                guard let record = tree.find(reference) else { throw Self.noSnapshot(reference, of: name, in: tree) }
                let definition = try bundle.load()
                let children = tree.children(of: record.id)
                let restsOnIt = tree.current == record.id
                // The images resting on each of the snapshot's layers: its children's layers and,
                // when the VM is at this snapshot, the current disks.
                var dependents: [[String]] = record.layers.map { _ in [] }
                for child in children {
                    for (index, layer) in child.layers.enumerated() where index < dependents.count {
                        if let layer { dependents[index].append(layer) }
                    }
                }
                if restsOnIt {
                    for index in dependents.indices where record.layers[index] != nil && index < definition.disks.count {
                        dependents[index].append(definition.disks[index].path)
                    }
                }
                if dependents.contains(where: { $0.count > 1 }) {
                    let names = children.map(\.name) + (restsOnIt ? ["the current state"] : [])
                    throw .invalidValue(field: "SNAPSHOT", reason: "'\(record.name)' has \(names.count) states resting on it (\(names.joined(separator: ", "))); delete the snapshots after it first")
                }
                guard let qemuImg = HostTools.find("qemu-img") else {
                    throw .invalidValue(field: "snapshot delete", reason: "qemu-img is not installed (apt install qemu-utils); it merges the snapshot's disk layers")
                }
                // What each image rests on is what the definitions record: the snapshot's own
                // settings (taken when the layer was the disk), its children's, the current ones.
                let own = try bundle.loadSnapshotDefinition(record.id)
                var childDefinitions: [String: VMDefinition] = [:]
                for child in children { childDefinitions[child.id] = try bundle.loadSnapshotDefinition(child.id) }
                func recorded(_ path: String, index: Int) -> DiskAttachment? {
                    if path == definition.disks[safe: index]?.path { return definition.disks[index] }
                    for child in children where child.layers[safe: index] == path { return childDefinitions[child.id]?.disks[safe: index] }
                    return nil
                }
                // Each image to merge into must rest on the layer itself (a linked clone may have
                // put a frozen base in between): never rebase the wrong file. Its headers must
                // still say what the definitions record (the VM may have rewritten them).
                var merges: [(dependent: DiskAttachment, layer: DiskAttachment)] = []
                for (index, layer) in record.layers.enumerated() {
                    guard let layer, let dependentPath = dependents[index].first else { continue }
                    guard let dependent = recorded(dependentPath, index: index), let below = own.disks[safe: index], below.path == layer,
                          dependent.backing.first?.path == layer else {
                        throw .invalidValue(field: "SNAPSHOT", reason: "\(dependentPath) does not rest on the snapshot's layer \(layer) in its definition; its layers cannot be merged")
                    }
                    try DiskChains.verify(dependent, in: bundle)
                    try DiskChains.verify(below, in: bundle)
                    merges.append((dependent, below))
                }
                for (dependent, layer) in merges {
                    // The layer's own backing, named as the layer's header names it (relative
                    // names stay relative, so the VM's directory can still be renamed).
                    let next = layer.backing.first
                    let backingName = next.map { below -> String in
                        if below.path.hasPrefix("/") { return below.path }
                        return HostFiles.parent(of: bundle.resolve(dependent.path)) == HostFiles.parent(of: bundle.resolve(below.path))
                            ? HostFiles.lastComponent(of: below.path) : bundle.resolve(below.path)
                    }
                    let arguments = ["rebase", "-q", "-f", "qcow2"] + (next.map { ["-F", $0.format.rawValue, "-b", backingName ?? $0.path] } ?? ["-b", ""])
                        + [bundle.resolve(dependent.path)]
                    let (status, output) = HostCommand.run(qemuImg, arguments)
                    guard status == 0 else {
                        throw .engine(name: name, reason: "merging the snapshot's layer \(layer.path) into \(dependent.path) failed (qemu-img \(status)): \(output.trimmingWhitespace())", exitStatus: 1)
                    }
                }
                // The merged layers leave every chain that recorded them.
                let gone = Set(record.layers.compactMap { $0 })
                func dropping(_ definition: VMDefinition) -> VMDefinition {
                    var changed = definition
                    for index in changed.disks.indices { changed.disks[index].backing.removeAll { gone.contains($0.path) } }
                    return changed
                }
                try bundle.save(dropping(definition))
                for other in tree.snapshots where other.id != record.id {
                    let saved = try bundle.loadSnapshotDefinition(other.id)
                    let changed = dropping(saved)
                    if changed != saved { try bundle.saveSnapshotDefinition(changed, id: other.id) }
                }
                for layer in record.layers.compactMap({ $0 }) { unlink(bundle.resolve(layer)) }
                try HostFiles.removeTree(bundle.snapshotDirectory(record.id))
                for index in tree.snapshots.indices where tree.snapshots[index].parent == record.id {
                    tree.snapshots[index].parent = record.parent
                }
                tree.snapshots.removeAll { $0.id == record.id }
                if restsOnIt { tree.current = record.parent }
                try bundle.saveSnapshots(tree)
                return record
            }
        }
    }

    static func noSnapshot(_ reference: String, of name: String, in tree: SnapshotTree) -> LibraryError {
        let known = tree.snapshots.map(\.name)
        return .invalidValue(field: "SNAPSHOT", reason: "VM '\(name)' has no snapshot '\(reference)'"
                             + (known.isEmpty ? "; it has none (take one with `vireo snapshot take \(name)`)" : "; it has \(known.joined(separator: ", "))"))
    }
}
