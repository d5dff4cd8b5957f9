import API
import DiskImage
import FoundationEssentials
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// What a VM is doing, as `vireo list` shows it.
public enum VMState: String, Codable, Sendable {
    case stopped, starting, running, paused, stopping
    case shuttingDown = "shutting-down"
    /// Not running, and its last run ended in a failure (a triple fault, a KVM internal error, a
    /// VMM fault: `vireo-vmm` exited with status 1). VirtualBox calls this "Aborted".
    case crashed
    /// Locked by another vireo command that is changing it.
    case busy

    /// No VMM runs it: it can be started, changed or deleted.
    public var isOff: Bool { self == .stopped || self == .crashed }
}

/// What `vireo create` asks for; nil means "the OS type's default".
public struct CreateRequest: Sendable {
    public var name: String
    public var osType: String?
    public var cpus: Int?
    public var memoryBytes: UInt64?
    public var diskBytes: UInt64?
    public var attachDisk: String?
    public var withoutDisk = false
    public var kernel: String?
    public var initrd: String?
    public var commandLine: String?
    public var entropyDevice: Bool?
    public var networks: [NetworkAttachment] = []
    public var vsockCID: UInt64?
    public var balloon: Bool?
    public var acpi: Bool?
    public var onReboot: String?

    public init(name: String) { self.name = name }
}

/// What `vireo delete` did, so the CLI can say it.
public struct DeleteReport: Sendable {
    public var keptDisks: [String] = []
    public var untouchedDisks: [String] = []
}

/// The VM library: one directory per VM under `root`.
public struct VMLibrary: Sendable {
    public let root: String

    public init(root: String) { self.root = root }

    /// `$VIREO_HOME`, else `/var/lib/vireo` for root, else `$XDG_DATA_HOME/vireo` (or
    /// `~/.local/share/vireo`).
    public static func defaultRoot(environment: [String: String]) -> String {
        if let home = environment["VIREO_HOME"], !home.isEmpty { return HostFiles.absolute(home) }
        if getuid() == 0 { return "/var/lib/vireo" }
        if let data = environment["XDG_DATA_HOME"], !data.isEmpty { return data + "/vireo" }
        return (environment["HOME"] ?? "/tmp") + "/.local/share/vireo"
    }

    func prepareRoot() throws(LibraryError) { try HostFiles.makeDirectories(root) }

    /// The bundle of an existing VM.
    public func bundle(named name: String) throws(LibraryError) -> VMBundle {
        try VMName.validate(name)
        let bundle = VMBundle(directory: root + "/" + name)
        guard HostFiles.exists(bundle.configPath) else { throw .notFound(name: name, root: root) }
        return bundle
    }

    /// Names of every VM, sorted. In-progress creates and deletes (hidden directories) are not VMs;
    /// leftovers of interrupted ones are cleared away here.
    public func names() throws(LibraryError) -> [String] {
        guard HostFiles.isDirectory(root) else { return [] }
        var names: [String] = []
        for entry in try HostFiles.entries(of: root) {
            if entry.hasPrefix(".creating-") || entry.hasPrefix(".deleting-") {
                sweepAbandoned(root + "/" + entry)
                continue
            }
            if !entry.hasPrefix("."), HostFiles.exists(root + "/" + entry + "/config.json") { names.append(entry) }
        }
        return names
    }

    /// Removes a staging directory whose creator is gone (its lock is free).
    private func sweepAbandoned(_ directory: String) {
        let lock = directory + "/vm.lock"
        if HostFiles.exists(lock), VMLock.isHeld(path: lock) { return }
        try? HostFiles.removeTree(directory)
    }

    // MARK: state

    public struct Status: Sendable {
        public var state: VMState
        public var description: VMDescription?
        /// Why the last run crashed, when `state` is `.crashed`.
        public var crashReason: String?
    }

    public func status(of bundle: VMBundle) -> Status {
        guard bundle.isLocked else {
            if let reason = bundle.lastRunFailure() { return Status(state: .crashed, crashReason: reason) }
            return Status(state: .stopped)
        }
        if let connection = try? ControlConnection(path: bundle.controlPath, timeoutSeconds: 2),
           let description = try? connection.call("describe", as: VMDescription.self) {
            return Status(state: VMState(rawValue: description.state) ?? .running, description: description)
        }
        if let definition = try? bundle.load(), bundle.recordedPID(uuid: definition.uuid) != nil {
            return Status(state: .starting)
        }
        return Status(state: .busy)
    }

    /// Runs `body` with the VM locked: nothing runs it or changes it meanwhile. Refuses, naming
    /// the state, if it is running.
    func withStoppedVM<T>(_ name: String, action: String,
                          _ body: (VMBundle, VMLock) throws(LibraryError) -> T) throws(LibraryError) -> T {
        let bundle = try bundle(named: name)
        let lock = try VMLock(path: bundle.lockPath, create: true)
        guard lock.tryExclusive() else {
            let state = status(of: bundle).state
            if state == .busy { throw .busy(name: name) }
            throw .wrongState(name: name, state: state.rawValue, action: action,
                              hint: "stop it first with `vireo stop \(name)` (add --force to power it off)")
        }
        defer { lock.unlock() }
        guard lock.isCurrent, HostFiles.exists(bundle.configPath) else { throw .notFound(name: name, root: root) }
        return try body(bundle, lock)
    }

    // MARK: create

    public func create(_ request: CreateRequest) throws(LibraryError) -> VMDefinition {
        try VMName.validate(request.name)
        let type = try OSType.named(request.osType ?? OSType.defaultIdentifier)
        var definition = VMDefinition(uuid: UUID().uuidString.lowercased(), name: request.name, osType: type,
                                      createdAt: Int64(time(nil)))
        if let cpus = request.cpus { definition.cpus = cpus }
        if let memory = request.memoryBytes { definition.memoryBytes = memory }
        if let line = request.commandLine { definition.commandLine = line }
        if let rng = request.entropyDevice { definition.entropyDevice = rng }
        definition.networks = request.networks
        definition.vsockCID = request.vsockCID
        if let balloon = request.balloon { definition.balloon = balloon }
        if let acpi = request.acpi { definition.acpi = acpi }
        if let policy = request.onReboot {
            try Self.validate(onReboot: policy)
            definition.onReboot = policy
        }
        try Self.validate(cpus: definition.cpus)
        try Self.validate(memoryBytes: definition.memoryBytes)
        try Self.validate(commandLine: definition.commandLine)
        if let cid = definition.vsockCID { try Self.validate(vsockCID: cid) }
        if let kernel = request.kernel { try Self.validate(kernel: kernel) }
        if let initrd = request.initrd { try Self.validateReadable(initrd, field: "--initrd") }
        guard request.diskBytes == nil || request.attachDisk == nil, !(request.withoutDisk && (request.diskBytes != nil || request.attachDisk != nil)) else {
            throw .invalidValue(field: "--disk", reason: "choose one of --disk SIZE, --attach-disk PATH and --no-disk")
        }
        var attached: DiskAttachment?
        if let path = request.attachDisk { attached = try Self.inspectDisk(HostFiles.absolute(path), field: "--attach-disk") }

        try prepareRoot()
        let final = root + "/" + request.name
        guard !HostFiles.exists(final) else { throw .alreadyExists(name: request.name) }
        // Built under a hidden name and renamed into place in one step: a crash or ^C leaves
        // only a hidden directory (swept later), never a half-made VM holding the name.
        let staging = root + "/.creating-" + definition.uuid
        try HostFiles.makeDirectory(staging)
        let lock: VMLock
        do {
            lock = try VMLock(path: staging + "/vm.lock", create: true)
            _ = lock.tryExclusive(attempts: 1)
        } catch {
            try? HostFiles.removeTree(staging)
            throw error
        }
        do throws(LibraryError) {
            let bundle = VMBundle(directory: staging)
            if let kernel = request.kernel {
                try HostFiles.copySparse(HostFiles.absolute(kernel), bundle.resolve("kernel"))
                definition.kernel = "kernel"
            }
            if let initrd = request.initrd {
                try HostFiles.copySparse(HostFiles.absolute(initrd), bundle.resolve("initrd"))
                definition.initrd = "initrd"
            }
            if let attached {
                definition.disks.append(attached)
            } else if !request.withoutDisk {
                let size = request.diskBytes ?? type.diskBytes
                try Self.createDisk(bundle.resolve("disk0.qcow2"), size: size)
                definition.disks.append(DiskAttachment(path: "disk0.qcow2", format: .qcow2))
            }
            try bundle.save(definition)
            try HostFiles.renameNoReplace(staging, final)
        } catch {
            try? HostFiles.removeTree(staging)
            if case let .io(_, _, code) = error, code == EEXIST || code == ENOTEMPTY { throw .alreadyExists(name: request.name) }
            throw error
        }
        lock.unlock()
        return definition
    }

    // MARK: validation shared by create and set

    public static func validate(onReboot policy: String) throws(LibraryError) {
        guard VMDefinition.rebootPolicies.contains(policy) else {
            throw .invalidValue(field: "--on-reboot", reason: "'\(policy)' is not one of \(VMDefinition.rebootPolicies.joined(separator: ", "))")
        }
    }

    public static func validate(cpus: Int) throws(LibraryError) {
        guard cpus >= 1, cpus <= BootConfiguration.maximumCPUs else {
            throw .invalidValue(field: "--cpus", reason: "\(cpus) is not allowed; use 1 to \(BootConfiguration.maximumCPUs)")
        }
    }

    public static func validate(memoryBytes: UInt64) throws(LibraryError) {
        guard memoryBytes >= MachineLayout.minimumMemory else {
            throw .invalidValue(field: "--memory", reason: "\(memoryBytes >> 20) MiB is below the minimum of \(MachineLayout.minimumMemory >> 20) MiB")
        }
        guard memoryBytes % 4096 == 0 else {
            throw .invalidValue(field: "--memory", reason: "\(memoryBytes) bytes is not a whole number of 4 KiB pages")
        }
    }

    /// 0–2 are reserved (hypervisor, local, host); 0xffffffff is VMADDR_CID_ANY.
    public static func validate(vsockCID: UInt64) throws(LibraryError) {
        guard vsockCID >= 3, vsockCID < 0xffff_ffff else {
            throw .invalidValue(field: "--vsock-cid", reason: "\(vsockCID) must be a whole number from 3 to 4294967294")
        }
    }

    public static func validate(commandLine: String) throws(LibraryError) {
        guard !commandLine.utf8.contains(0) else { throw .invalidValue(field: "--cmdline", reason: "contains a NUL byte") }
    }

    public static func validate(kernel: String) throws(LibraryError) {
        do { _ = try KernelImage.load(path: HostFiles.absolute(kernel)) } catch {
            throw .invalidValue(field: "--kernel", reason: error.description)
        }
    }

    public static func validateReadable(_ path: String, field: String) throws(LibraryError) {
        guard access(HostFiles.absolute(path), R_OK) == 0, !HostFiles.isDirectory(path) else {
            throw .invalidValue(field: field, reason: "\(path) is not a readable file")
        }
    }

    /// Opens an image read-only to learn its format (and that it is one).
    public static func inspectDisk(_ path: String, field: String, readOnly: Bool = false) throws(LibraryError) -> DiskAttachment {
        guard HostFiles.exists(path) else { throw .invalidValue(field: field, reason: "\(path) does not exist") }
        do {
            let image = try DiskImages.open(path: path, readOnly: true)
            return DiskAttachment(path: path, format: image.format, readOnly: readOnly)
        } catch {
            throw .invalidValue(field: field, reason: error.description)
        }
    }

    // MARK: set, attach, detach

    /// Changes a stopped VM's definition; `change` validates its own fields.
    public func update(_ name: String, action: String = "change",
                       _ change: (inout VMDefinition, VMBundle) throws(LibraryError) -> Void) throws(LibraryError) -> VMDefinition {
        try withStoppedVM(name, action: action) { (bundle, _) throws(LibraryError) -> VMDefinition in
            var definition = try bundle.load()
            try change(&definition, bundle)
            try Self.validate(cpus: definition.cpus)
            try Self.validate(memoryBytes: definition.memoryBytes)
            try Self.validate(commandLine: definition.commandLine)
            if let cid = definition.vsockCID { try Self.validate(vsockCID: cid) }
            try bundle.save(definition)
            return definition
        }
    }

    /// Replaces the VM's kernel (or initrd) with a copy of `source`, atomically.
    public static func installFile(_ source: String, as stored: String, in bundle: VMBundle) throws(LibraryError) {
        let target = bundle.resolve(stored)
        let temporary = target + ".new"
        unlink(temporary)
        try HostFiles.copySparse(HostFiles.absolute(source), temporary)
        guard Glibc.rename(temporary, target) == 0 else {
            let code = errno
            unlink(temporary)
            throw .io(operation: "rename", path: target, errno: code)
        }
    }

    public func attachDisk(_ name: String, path: String, readOnly: Bool) throws(LibraryError) -> VMDefinition {
        try update(name, action: "attach a disk to") { (definition, bundle) throws(LibraryError) in
            let absolute = HostFiles.absolute(path)
            var attachment = try Self.inspectDisk(absolute, field: "PATH", readOnly: readOnly)
            if absolute.hasPrefix(bundle.directory + "/") { attachment.path = String(absolute.dropFirst(bundle.directory.count + 1)) }
            guard !definition.disks.contains(where: { bundle.resolve($0.path) == absolute }) else {
                throw .invalidValue(field: "PATH", reason: "\(absolute) is already attached to VM '\(name)'")
            }
            guard definition.disks.count < MachineLayout.virtioInterrupts.count - 1 else {
                throw .invalidValue(field: "PATH", reason: "VM '\(name)' already has \(definition.disks.count) disks, the most it can take")
            }
            definition.disks.append(attachment)
        }
    }

    public func detachDisk(_ name: String, path: String) throws(LibraryError) -> (VMDefinition, DiskAttachment) {
        var removed: DiskAttachment?
        let definition = try update(name, action: "detach a disk from") { (definition, bundle) throws(LibraryError) in
            let wanted = path.hasPrefix("/") ? path : HostFiles.absolute(path)
            guard let index = definition.disks.firstIndex(where: { $0.path == path || bundle.resolve($0.path) == wanted }) else {
                let list = definition.disks.map(\.path).joined(separator: ", ")
                throw .invalidValue(field: "PATH", reason: "\(path) is not attached to VM '\(name)' (attached: \(list.isEmpty ? "none" : list))")
            }
            removed = definition.disks.remove(at: index)
        }
        guard let removed else { throw .invalidValue(field: "PATH", reason: "\(path) is not attached to VM '\(name)'") }
        return (definition, removed)
    }

    // MARK: dependents (linked clones)

    /// Other VMs whose disks rest on files in `bundle`'s directory (linked clones of it).
    public func dependents(of bundle: VMBundle) -> [String] {
        let prefix = bundle.directory + "/"
        var found: [String] = []
        for other in (try? names()) ?? [] where other != bundle.name {
            let otherBundle = VMBundle(directory: root + "/" + other)
            guard let definition = try? otherBundle.load() else { continue }
            let rests = definition.disks.contains { disk in
                DiskImages.recordedBackingChain(path: otherBundle.resolve(disk.path)).contains { $0.hasPrefix(prefix) }
            }
            if rests { found.append(other) }
        }
        return found
    }

    // MARK: rename, delete

    public func rename(_ name: String, to newName: String) throws(LibraryError) {
        try VMName.validate(newName)
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
            let doomed = root + "/.deleting-" + uuid
            try HostFiles.renameNoReplace(bundle.directory, doomed)
            if keepDisks {
                // A kept overlay needs the bases in this directory it rests on; they move along,
                // and its relative reference to them stays valid.
                var files: [String] = []
                for disk in disks where disk.isOwned {
                    files.append(disk.path)
                    for base in DiskImages.recordedBackingChain(path: doomed + "/" + disk.path) where base.hasPrefix(doomed + "/") {
                        files.append(String(base.dropFirst(doomed.count + 1)))
                    }
                }
                if !files.isEmpty {
                    let keep = root + "/kept-disks/" + name + "-" + uuid.prefix(8)
                    try HostFiles.makeDirectories(keep)
                    for file in files where HostFiles.exists(doomed + "/" + file) {
                        let target = keep + "/" + HostFiles.lastComponent(of: file)
                        try HostFiles.renameNoReplace(doomed + "/" + file, target)
                        report.keptDisks.append(target)
                    }
                }
            }
            try HostFiles.removeTree(doomed)
            return report
        }
    }

    // MARK: clone

    public func clone(_ source: String, to name: String, linked: Bool) throws(LibraryError) -> VMDefinition {
        try VMName.validate(name)
        guard !HostFiles.exists(root + "/" + name) else { throw .alreadyExists(name: name) }
        return try withStoppedVM(source, action: "clone") { (bundle, _) throws(LibraryError) -> VMDefinition in
            let original = try bundle.load()
            var definition = original
            definition.uuid = UUID().uuidString.lowercased()
            definition.name = name
            definition.createdAt = Int64(time(nil))
            // A clone is a new machine to its guest: a new generation ID makes it reseed its RNG.
            definition.generationID = VMDefinition.newGenerationID()
            if linked, let external = original.disks.first(where: { !$0.isOwned && !$0.readOnly }) {
                throw .invalidValue(field: "--linked", reason: "VM '\(source)' has the writable disk \(external.path) outside its directory; a linked clone would freeze it. Make a full clone, or attach it read-only")
            }
            let staging = root + "/.creating-" + definition.uuid
            try HostFiles.makeDirectory(staging)
            let lock = try VMLock(path: staging + "/vm.lock", create: true)
            _ = lock.tryExclusive(attempts: 1)
            defer { lock.unlock() }
            var sourceDefinition = original
            var frozen: [(base: String, original: String, overlay: String?)] = []
            do throws(LibraryError) {
                let target = VMBundle(directory: staging)
                for file in [original.kernel, original.initrd].compactMap({ $0 }) where !file.hasPrefix("/") {
                    try HostFiles.copySparse(bundle.resolve(file), target.resolve(file))
                }
                definition.disks = []
                for (index, disk) in original.disks.enumerated() {
                    if disk.readOnly {
                        var shared = disk
                        shared.path = bundle.resolve(disk.path)
                        definition.disks.append(shared)
                    } else if !linked {
                        let file = HostFiles.lastComponent(of: disk.path)
                        try HostFiles.copySparse(bundle.resolve(disk.path), target.resolve(file))
                        var copy = disk
                        copy.path = file
                        definition.disks.append(copy)
                    } else {
                        // Freeze the source's disk as a base both VMs' new overlays rest on: the
                        // source keeps writing to its overlay, and the base never changes again.
                        let base = "base-\(definition.uuid.prefix(8))-\(index).\(disk.format.rawValue)"
                        try HostFiles.renameNoReplace(bundle.resolve(disk.path), bundle.resolve(base))
                        frozen.append((bundle.resolve(base), bundle.resolve(disk.path), nil))
                        let overlayName = disk.format == .qcow2 ? disk.path : Self.stem(disk.path) + ".qcow2"
                        let size = try Self.virtualSize(bundle.resolve(base))
                        try Self.createDisk(bundle.resolve(overlayName), size: size, backing: base)
                        frozen[frozen.count - 1].overlay = bundle.resolve(overlayName)
                        let cloneDisk = "disk\(index).qcow2"
                        try Self.createDisk(target.resolve(cloneDisk), size: size, backing: bundle.resolve(base))
                        sourceDefinition.disks[index].path = overlayName
                        sourceDefinition.disks[index].format = .qcow2
                        definition.disks.append(DiskAttachment(path: cloneDisk, format: .qcow2, readOnly: false, serial: disk.serial))
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

    static func stem(_ path: String) -> String {
        guard let dot = path.lastIndex(of: "."), dot > path.startIndex else { return path }
        return String(path[..<dot])
    }

    static func createDisk(_ path: String, size: UInt64, backing: String? = nil) throws(LibraryError) {
        do { try DiskImages.create(path: path, format: .qcow2, size: size, backing: backing) } catch { throw .disk(error) }
    }

    static func virtualSize(_ path: String) throws(LibraryError) -> UInt64 {
        do { return try DiskImages.open(path: path, readOnly: true).virtualSize } catch { throw .disk(error) }
    }
}
