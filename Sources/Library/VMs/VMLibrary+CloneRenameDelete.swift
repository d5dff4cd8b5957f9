import API
import DiskImage
import FoundationEssentials
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// A VM's dependents, rename, delete and clone.
extension VMLibrary {
    /// Other VMs whose disks rest on files in `bundle`'s directory (linked clones of it).
    public func dependents(of bundle: VMBundle) -> [String] {
        let prefix = bundle.directory + "/"
        var found: [String] = []
        for other in (try? names()) ?? [] where other != bundle.name {
            let otherBundle = VMBundle(directory: root + "/" + other)
            guard let definition = try? otherBundle.load() else { continue }
            let rests = definition.disks.contains { disk in
                otherBundle.chain(of: disk).contains { DiskImages.normalized($0.path).hasPrefix(prefix) }
            }
            if rests { found.append(other) }
        }
        return found
    }

    // MARK: rename, delete

    public func rename(_ name: String, to newName: String) throws(LibraryError) {
        try VMName.validate(newName, in: root)
        try withStoppedVM(name, action: "rename") { (bundle, _) throws(LibraryError) in
            let dependents = dependents(of: bundle)
            guard dependents.isEmpty else {
                throw .wrongState(name: name, state: "the base of linked clone(s) \(dependents.joined(separator: ", "))", action: "rename",
                                  hint: "their disks refer to its files by path; delete those clones or make full clones instead")
            }
            var definition = try bundle.load()
            definition.name = newName
            let target = root + "/" + newName
            do throws(LibraryError) { try HostFiles.renameNoReplace(bundle.directory, target) } catch {
                if case let .io(_, _, code) = error, code == EEXIST || code == ENOTEMPTY { throw .alreadyExists(name: newName) }
                throw error
            }
            try VMBundle(directory: target).save(definition)
        }
    }

    public func delete(_ name: String, keepDisks: Bool) throws(LibraryError) -> DeleteReport {
        try withStoppedVM(name, action: "delete") { (bundle, _) throws(LibraryError) -> DeleteReport in
            let dependents = dependents(of: bundle)
            guard dependents.isEmpty else {
                throw .wrongState(name: name, state: "the base of linked clone(s) \(dependents.joined(separator: ", "))", action: "delete",
                                  hint: "delete those clones first")
            }
            // A VM whose configuration cannot be read is still deletable; its disks are then
            // recognised by their file names.
            let loaded = try? bundle.load()
            let uuid = loaded?.uuid ?? UUID().uuidString.lowercased()
            let disks = loaded?.disks ?? ((try? HostFiles.entries(of: bundle.directory)) ?? [])
                .filter { $0.hasSuffix(".qcow2") || $0.hasSuffix(".raw") || $0.hasSuffix(".img") }
                .map { DiskAttachment(path: $0, format: $0.hasSuffix(".qcow2") ? .qcow2 : .raw) }
            var report = DeleteReport()
            report.untouchedDisks = disks.filter { !$0.isOwned }.map(\.path)
            // Renamed away first: the name is free at once and a crash mid-delete leaves a hidden
            // directory that the next `vireo list` sweeps.
            bundle.removeControlGroups()
            VMBundle.removeShareMountPoints(uuid: uuid)
            let doomed = root + "/.deleting-" + uuid
            try HostFiles.renameNoReplace(bundle.directory, doomed)
            if keepDisks {
                // A kept overlay needs the bases in this directory it rests on (its definition
                // records them, relative); they move along, and its relative reference to them
                // stays valid. Only files inside the directory move: nothing a header names.
                var files: [String] = []
                for disk in disks where disk.isOwned {
                    files.append(disk.path)
                    files += disk.backing.filter { !$0.path.hasPrefix("/") }.map(\.path)
                }
                let inside = files.filter { HostPath.inside(doomed + "/" + $0, doomed) != nil }
                if !inside.isEmpty {
                    let kept = root + "/kept-disks"
                    try HostFiles.makeDirectory(kept, mode: 0o700)
                    let keep = kept + "/" + name + "-" + uuid.prefix(8)
                    try HostFiles.makeDirectory(keep, mode: 0o700)
                    for file in inside where HostFiles.exists(doomed + "/" + file) {
                        let target = keep + "/" + HostFiles.lastComponent(of: file)
                        try HostFiles.renameNoReplace(doomed + "/" + file, target)
                        // Root's again, and nobody else's: the VM's jail uid owned it while it ran.
                        _ = lchown(target, 0, 0)
                        _ = chmod(target, 0o600)
                        report.keptDisks.append(target)
                    }
                }
            }
            try HostFiles.removeTree(doomed)
            return report
        }
    }

    // MARK: clone

    /// Copies a stopped VM under a new name: a full copy of its own disks, or with `linked`,
    /// overlays on a frozen base. `progress` hears the fraction of the disks' bytes copied.
    public func clone(_ source: String, to name: String, linked: Bool,
                      progress: (Double) -> Void = { _ in }) throws(LibraryError) -> VMDefinition {
        try VMName.validate(name, in: root)
        guard !HostFiles.exists(root + "/" + name) else { throw .alreadyExists(name: name) }
        return try withStoppedVM(source, action: "clone") { (bundle, _) throws(LibraryError) -> VMDefinition in
            let original = try bundle.load()
            var definition = original
            definition.uuid = UUID().uuidString.lowercased()
            definition.name = name
            definition.createdAt = Int64(time(nil))
            // A clone is a new machine to its guest: a new generation ID makes it reseed its RNG.
            definition.generationID = VMDefinition.newGenerationID()
            // ... and new network cards on the same networks, as VirtualBox's clone gives by
            // default: two VMs with one MAC confuse every switch and DHCP server. Host ports stay
            // the original's (one port cannot be forwarded to two VMs); queue pairs are the card's.
            definition.networks = original.networks.map { NetworkAttachment($0.attachment, mac: NetworkAttachment.randomMAC(), queues: $0.queues) }
            if !linked, let network = original.disks.first(where: { $0.isNetwork && !$0.readOnly }) {
                throw .invalidValue(field: "source", reason: "VM '\(source)' has the writable network disk \(network.path), which a clone cannot copy (two VMs writing one export would corrupt it); detach it first, or attach it read-only")
            }
            if linked, let external = original.disks.first(where: { !$0.isOwned && !$0.readOnly }) {
                throw .invalidValue(field: "linked", reason: "VM '\(source)' has the writable disk \(external.path) outside its directory; a linked clone would freeze it. Make a full clone, or attach it read-only")
            }
            let staging = root + "/.creating-" + definition.uuid
            try HostFiles.makeDirectory(staging)
            let lock = try VMLock(path: staging + "/vm.lock", create: true)
            _ = lock.tryExclusive(attempts: 1)
            defer { lock.unlock() }
            var sourceDefinition = original
            var frozen: [(base: String, original: String, overlay: String?)] = []
            // What a full clone copies, by the size of each disk's file (holes count as they
            // are passed over, so a thin disk moves on quickly).
            let copied = linked ? [] : original.disks.filter { !$0.readOnly && !($0.isOwned && $0.path == CloudInitSeed.fileName) }
            let total = max(copied.reduce(UInt64(0)) { $0 + HostFiles.size(bundle.resolve($1.path)) }, 1)
            var finished: UInt64 = 0
            do throws(LibraryError) {
                let target = VMBundle(directory: staging)
                // The kernel, initrd and UEFI variable store are the VM's own: each clone gets a copy
                // (and of an unfinished unattended install's installer, which the clone runs too).
                for file in [original.kernel, original.initrd, original.nvram, original.unattended?.kernel, original.unattended?.initrd]
                    .compactMap({ $0 }) where !file.hasPrefix("/") {
                    try HostFiles.copySparse(bundle.resolve(file), target.resolve(file))
                }
                definition.disks = []
                for (index, disk) in original.disks.enumerated() {
                    if disk.isOwned, disk.path == CloudInitSeed.fileName, var settings = original.cloudInit {
                        // A clone is a new instance to cloud-init (new host keys; its own host name
                        // when the original's was derived from its name): a seed of its own.
                        settings.instanceID = definition.uuid
                        if settings.hostname == CloudInitSettings.hostname(forVM: original.name) {
                            settings.hostname = CloudInitSettings.hostname(forVM: name) ?? settings.hostname
                        }
                        try CloudInitSeed.write(settings, macs: definition.networks.map(\.mac), to: target.resolve(disk.path))
                        definition.cloudInit = settings
                        definition.disks.append(disk)
                    } else if disk.readOnly {
                        var shared = disk
                        shared.path = bundle.resolve(disk.path)
                        shared.backing = bundle.chain(of: disk)
                        definition.disks.append(shared)
                    } else if !linked {
                        // What anything reads of the disk follows the chain its definition records,
                        // checked against the headers first: the VM may have rewritten them.
                        try DiskChains.verify(disk, in: bundle)
                        let file = HostFiles.lastComponent(of: disk.path)
                        let before = finished
                        var copy = disk
                        copy.path = file
                        // Layers in the VM's directory (snapshots) are folded into the copy, which
                        // rests only on the first layer outside it (an image), if any.
                        let chain = bundle.chain(of: disk)
                        if let firstOwned = disk.backing.firstIndex(where: { !$0.path.hasPrefix("/") }) {
                            let kept = disk.backing[firstOwned...].firstIndex(where: { $0.path.hasPrefix("/") })
                            try Self.copyFlattened(bundle.resolve(disk.path), to: target.resolve(file), keeping: kept.map { chain[$0] })
                            copy.backing = kept.map { Array(chain[$0...]) } ?? []
                        } else {
                            try HostFiles.copySparse(bundle.resolve(disk.path), target.resolve(file)) { done, _ in
                                progress(min(Double(before + done) / Double(total), 1))
                            }
                            copy.backing = chain
                        }
                        finished += HostFiles.size(bundle.resolve(disk.path))
                        progress(min(Double(finished) / Double(total), 1))
                        definition.disks.append(copy)
                    } else {
                        // Freeze the source's disk as a base both VMs' new overlays rest on: the
                        // source keeps writing to its overlay, and the base never changes again.
                        // The base keeps the format its definition records: a raw disk becomes a
                        // raw base, whatever its bytes look like.
                        try DiskChains.verify(disk, in: bundle)
                        let base = "base-\(definition.uuid.prefix(8))-\(index).\(disk.format.rawValue)"
                        try HostFiles.renameNoReplace(bundle.resolve(disk.path), bundle.resolve(base))
                        frozen.append((bundle.resolve(base), bundle.resolve(disk.path), nil))
                        let overlayName = disk.format == .qcow2 ? disk.path : Self.stem(disk.path) + ".qcow2"
                        let size = try Self.virtualSize(bundle.resolve(base), format: disk.format)
                        try Self.createDisk(bundle.resolve(overlayName), size: size, backing: BackingLayer(path: base, format: disk.format))
                        frozen[frozen.count - 1].overlay = bundle.resolve(overlayName)
                        let cloneDisk = "disk\(index).qcow2"
                        try Self.createDisk(target.resolve(cloneDisk), size: size, backing: BackingLayer(path: bundle.resolve(base), format: disk.format))
                        sourceDefinition.disks[index] = DiskAttachment(path: overlayName, format: .qcow2, readOnly: false, serial: disk.serial,
                                                                       backing: [BackingLayer(path: base, format: disk.format)] + disk.backing)
                        definition.disks.append(DiskAttachment(path: cloneDisk, format: .qcow2, readOnly: false, serial: disk.serial,
                                                               backing: [BackingLayer(path: bundle.resolve(base), format: disk.format)] + bundle.chain(of: disk)))
                    }
                }
                try target.save(definition)
                if linked { try bundle.save(sourceDefinition) }
                try HostFiles.renameNoReplace(staging, root + "/" + name)
            } catch {
                // Put the source back exactly as it was.
                for entry in frozen.reversed() {
                    if let overlay = entry.overlay { unlink(overlay) }
                    _ = Glibc.rename(entry.base, entry.original)
                }
                if linked { try? bundle.save(original) }
                try? HostFiles.removeTree(staging)
                if case let .io(_, _, code) = error, code == EEXIST || code == ENOTEMPTY { throw .alreadyExists(name: name) }
                throw error
            }
            return definition
        }
    }

    /// After a live migration that handed the VM's disks over (not copied): the VM now lives in
    /// another library, which uses the disk files where they are. The entry leaves this library
    /// (its definition is kept as `config.json.migrated`, with a note) but its directory and
    /// every file in it stay, so the destination's paths stay valid (docs/migration.md).
    public func forgetMigrated(_ name: String, destination: String) throws(LibraryError) -> String {
        try withStoppedVM(name, action: "forget the migrated") { (bundle, _) throws(LibraryError) -> String in
            let note = "VM '\(name)' was migrated to \(destination) at \(time(nil)) (seconds since the epoch) with its disks handed over; "
                + "the destination uses the disk files in this directory. Delete it only once that VM no longer needs them.\n"
            try HostFiles.writeAtomically(Array(note.utf8), to: bundle.directory + "/MIGRATED")
            try HostFiles.renameNoReplace(bundle.configPath, bundle.configPath + ".migrated")
            return bundle.directory
        }
    }

    /// Copies the qcow2 disk at `source` (its chain verified) into a new image holding every
    /// layer's data above `base`, which the copy rests on (nil: on nothing). qemu-img is told
    /// every format: nothing is probed.
    static func copyFlattened(_ source: String, to destination: String, keeping base: BackingLayer?) throws(LibraryError) {
        guard let qemuImg = HostTools.find("qemu-img") else {
            throw .invalidValue(field: "clone", reason: "qemu-img is not installed (apt install qemu-utils); it copies disks with snapshot layers")
        }
        let keep = base.map { ["-B", $0.path, "-F", $0.format.rawValue] } ?? []
        let (status, output) = HostCommand.run(qemuImg, ["convert", "-q", "-f", "qcow2", "-O", "qcow2"] + keep + [source, destination])
        guard status == 0 else {
            unlink(destination)
            throw .io(operation: "qemu-img convert (\(output.trimmingWhitespace()))", path: destination, errno: EIO)
        }
    }

    static func stem(_ path: String) -> String {
        guard let dot = path.lastIndex(of: "."), dot > path.startIndex else { return path }
        return String(path[..<dot])
    }

    static func createDisk(_ path: String, size: UInt64, backing: BackingLayer? = nil) throws(LibraryError) {
        do { try DiskImages.create(path: path, format: .qcow2, size: size, backing: backing) } catch { throw .disk(error) }
    }

    static func virtualSize(_ path: String, format: DiskFormat) throws(LibraryError) -> UInt64 {
        do { return try DiskImages.peek(path: path, format: format) } catch { throw .disk(error) }
    }
}
