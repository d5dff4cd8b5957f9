import API
import DiskImage
import FoundationEssentials
import MachineSpec
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
    /// Not running, with a saved state (`vireo save`) that `vireo start` resumes. VirtualBox
    /// calls this "Saved".
    case saved

    /// No VMM runs it: it can be started or deleted (and changed, unless it is saved).
    public var isOff: Bool { self == .stopped || self == .crashed || self == .saved }
}

/// What `vireo create` asks for; nil means "the OS type's default".
public struct CreateRequest: Sendable {
    public var name: String
    public var osType: String?
    public var cpus: Int?
    public var memoryBytes: UInt64?
    public var diskBytes: UInt64?
    public var attachDisk: String?
    /// The attached disk's format (`--disk-format`); nil: what its file name declares.
    public var attachDiskFormat: DiskFormat?
    public var withoutDisk = false
    public var kernel: String?
    public var initrd: String?
    public var commandLine: String?
    public var entropyDevice: Bool?
    /// nil: one card on the `default` NAT network, as VirtualBox and libvirt give new VMs.
    public var networks: [NetworkAttachment]?
    public var vsockCID: UInt64?
    public var balloon: Bool?
    public var acpi: Bool?
    public var onReboot: String?
    /// `--cpu`: host, baseline, with ±features.
    public var cpuModel: String?
    /// nil: chosen from the rest (an ISO or firmware means qemu, otherwise kvm).
    public var engine: EngineKind?
    public var iso: String?
    public var firmware: Firmware?
    public var accelerator: Accelerator?
    /// An image from the store (`vireo image list`): the disk becomes a thin overlay on it (or a
    /// full copy), and the VM boots the image's kernel (or its firmware).
    public var image: String?
    /// With `image`: copy the image's disk and kernel into the VM instead of resting on them.
    public var fullCopy = false
    /// CPU, memory and process limits (docs/resources.md).
    public var resources = ResourceLimits()
    public var memoryBacking = MemoryBackingOptions()
    /// With a cloud-init image: the user, keys, password and host name of its NoCloud seed.
    public var cloudInit = CloudInitRequest()

    public init(name: String) { self.name = name }
}

/// `vireo create --image` options for cloud-init; nil or empty: the defaults.
public struct CloudInitRequest: Sendable {
    public var user: String?
    /// Public key files (`--ssh-key`); the library's own key is always added.
    public var keyFiles: [String] = []
    /// In clear, hashed before anything is stored.
    public var password: String?
    public var hostname: String?

    public init() {}

    public var isEmpty: Bool { user == nil && keyFiles.isEmpty && password == nil && hostname == nil }
}

/// What `vireo set` asks to change on a stopped VM; nil leaves a setting as it is.
public struct ChangeRequest: Sendable {
    public var cpus: Int?
    public var memoryBytes: UInt64?
    public var commandLine: String?
    public var kernel: String?
    public var initrd: String?
    public var removeInitrd = false
    public var osType: String?
    public var entropyDevice: Bool?
    /// Replaces every card; a card without an explicit MAC on an attachment the VM already used
    /// keeps that card's MAC (and its forwards unless new ones are given), as a reconfigured NIC would.
    public var networks: [NetworkAttachment]?
    public var explicitMACs: [Bool] = []
    public var vsockCID: UInt64??
    public var balloon: Bool?
    public var acpi: Bool?
    public var onReboot: String?
    /// `--cpu`: host, baseline, with ±features.
    public var cpuModel: String?
    public var engine: EngineKind?
    /// `.some(nil)` ejects the ISO.
    public var iso: String??
    public var firmware: Firmware?
    public var accelerator: Accelerator?
    /// Resource limits to set (`.some(nil)` removes one): the only changes a running VM takes.
    public var cpuCapPercent: Int??
    public var cpuWeight: Int??
    public var memoryLimitBytes: UInt64??
    public var pidsLimit: Int??
    public var vcpuPins: [VCPUPin]??
    public var emulatorCPUs: [Int]??
    /// `--rt-priority` (`.some(nil)` removes it); taken at the next start.
    public var rtPriority: Int??
    /// `--io-limit` (`.some(nil)` removes the limits).
    public var ioLimits: IOLimits??
    /// `--memory-backing` (`.some(nil)`: ordinary pages), `--prealloc`, `--ksm`.
    public var memoryBackingChoice: MemoryBackingOptions.Choice?
    public var lockMemory: Bool?
    public var transparentHugePages: Bool?
    /// `--numa-node` (`.some(nil)`: no binding).
    public var numaNode: Int??
    public var preallocate: Bool?
    public var mergeable: Bool?

    public init() {}

    /// Whether only resource limits change (which a running VM takes live).
    public var changesOnlyResources: Bool {
        fields.allSatisfy { ["--cpu-cap", "--cpu-weight", "--memory-limit", "--pids-limit", "--pin", "--pin-emulator", "--io-limit"].contains($0) } && !fields.isEmpty
    }

    public func applyingResources(to limits: ResourceLimits) -> ResourceLimits {
        var changed = limits
        if let cap = cpuCapPercent { changed.cpuCapPercent = cap }
        if let weight = cpuWeight { changed.cpuWeight = weight }
        if let memory = memoryLimitBytes { changed.memoryLimitBytes = memory }
        if let pids = pidsLimit { changed.pidsLimit = pids }
        if let pins = vcpuPins { changed.vcpuPins = pins }
        if let emulator = emulatorCPUs { changed.emulatorCPUs = emulator }
        if let priority = rtPriority { changed.rtPriority = priority }
        if let io = ioLimits { changed.ioLimits = io }
        return changed
    }

    /// The options this request changes, as the user typed them, for messages.
    public var fields: [String] {
        [cpus != nil ? "--cpus" : nil, memoryBytes != nil ? "--memory" : nil, commandLine != nil ? "--cmdline" : nil,
         kernel != nil ? "--kernel" : nil, initrd != nil || removeInitrd ? "--initrd" : nil,
         osType != nil ? "--ostype" : nil, entropyDevice != nil ? "--rng" : nil, networks != nil ? "--nic" : nil,
         vsockCID != nil ? "--vsock-cid" : nil, balloon != nil ? "--balloon" : nil, acpi != nil ? "--acpi" : nil,
         onReboot != nil ? "--on-reboot" : nil, cpuModel != nil ? "--cpu" : nil, engine != nil ? "--engine" : nil, iso != nil ? "--iso" : nil,
         firmware != nil ? "--firmware" : nil, accelerator != nil ? "--accel" : nil,
         cpuCapPercent != nil ? "--cpu-cap" : nil, cpuWeight != nil ? "--cpu-weight" : nil,
         memoryLimitBytes != nil ? "--memory-limit" : nil, pidsLimit != nil ? "--pids-limit" : nil,
         vcpuPins != nil ? "--pin" : nil, emulatorCPUs != nil ? "--pin-emulator" : nil, rtPriority != nil ? "--rt-priority" : nil, ioLimits != nil ? "--io-limit" : nil,
         memoryBackingChoice != nil ? "--memory-backing" : nil, preallocate != nil ? "--prealloc" : nil, mergeable != nil ? "--ksm" : nil, lockMemory != nil ? "--lock-memory" : nil, transparentHugePages != nil ? "--thp" : nil, numaNode != nil ? "--numa-node" : nil].compactMap { $0 }
    }
}

/// What `vireo delete` did, so the CLI can say it.
public struct DeleteReport: Sendable {
    public var keptDisks: [String] = []
    public var untouchedDisks: [String] = []
}

/// The VM library: one directory per VM under `root`.
public struct VMLibrary: Sendable {
    public let root: String
    /// Asks the engine running a locked VM what it is doing; nil when it does not answer. The
    /// engines module supplies it (the library knows no engine's protocol).
    public let describeRunning: @Sendable (VMBundle) -> VMDescription?

    public init(root: String, describeRunning: @escaping @Sendable (VMBundle) -> VMDescription? = { _ in nil }) {
        self.root = root
        self.describeRunning = describeRunning
    }

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

    /// Removes a staging directory whose creator is gone (its lock is free). Without a lock file
    /// it may be a delete in progress that has just removed it: such a directory is left alone
    /// for a minute (found when `vireo serve`'s event stream listed the library during deletes).
    private func sweepAbandoned(_ directory: String) {
        let lock = directory + "/vm.lock"
        if HostFiles.exists(lock) {
            if VMLock.isHeld(path: lock) { return }
        } else {
            var info = stat()
            guard stat(directory, &info) == 0, time(nil) - info.st_ctim.tv_sec > 60 else { return }
        }
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
            if bundle.hasSavedState { return Status(state: .saved) }
            if let reason = bundle.outOfMemoryEnd() ?? bundle.seccompEnd() ?? bundle.lastRunFailure() { return Status(state: .crashed, crashReason: reason) }
            return Status(state: .stopped)
        }
        if let description = describeRunning(bundle) {
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
        do {
            _ = try bundle.loadRecordingChains()
        } catch .corrupt(let path, _) where path == bundle.configPath {
            // An unreadable definition is the body's to judge: delete still removes it.
        }
        return try body(bundle, lock)
    }

    // MARK: create

    public func create(_ request: CreateRequest) throws(LibraryError) -> VMDefinition {
        try createReporting(request).definition
    }

    /// Creates a VM and says what was chosen for the user (an OS type guessed from the ISO).
    public func createReporting(_ request: CreateRequest) throws(LibraryError) -> (definition: VMDefinition, notes: [String]) {
        try VMName.validate(request.name, in: root)
        var notes: [String] = []
        if let name = request.image {
            for (given, field) in [(request.iso != nil, "--iso"), (request.attachDisk != nil, "--attach-disk"), (request.withoutDisk, "--no-disk")] where given {
                throw .invalidValue(field: field, reason: "cannot be combined with --image: the VM's disk is made from image '\(name)'")
            }
        }
        let medium = try request.iso.map { (path) throws(LibraryError) in try InstallMedium.inspect(path) }
        let images = ImageStore(libraryRoot: root)
        let image = try request.image.map { (name) throws(LibraryError) in try images.load(name) }
        let engine = try Self.chooseEngine(request, image: image)
        let type: OSType
        if let identifier = request.osType {
            type = try OSType.named(identifier)
        } else if let image {
            type = try OSType.named(image.osType)
        } else if let medium {
            let guessed = OSType.guess(fromVolumeLabel: medium.volumeLabel)
            type = try OSType.named(guessed?.identifier ?? "other")
            notes.append("OS type \(type.identifier), guessed from the ISO's volume label '\(medium.volumeLabel)'\(guessed == nil ? " (nothing recognised)" : ""); change it with --ostype")
        } else {
            type = try OSType.named(OSType.defaultIdentifier)
        }
        var definition = VMDefinition(uuid: UUID().uuidString.lowercased(), name: request.name, osType: type,
                                      createdAt: Int64(time(nil)))
        definition.engine = engine
        if engine == .qemu {
            definition.accelerator = request.accelerator ?? .auto
            definition.iso = medium?.path
            // A firmware boot unless the user boots a kernel directly.
            if request.kernel == nil || request.firmware != nil { definition.firmware = request.firmware ?? type.firmware }
            if medium != nil { definition.memoryBytes = type.installMemoryBytes }
            // QEMU's own i8042, PIT and RTC are always there; the ACPI setting is the kvm VMM's.
            definition.acpi = true
        }
        if let cpus = request.cpus { definition.cpus = cpus }
        if let memory = request.memoryBytes { definition.memoryBytes = memory }
        if let line = request.commandLine { definition.commandLine = line }
        if let rng = request.entropyDevice { definition.entropyDevice = rng }
        definition.networks = request.networks ?? [NetworkAttachment(.nat, mac: NetworkAttachment.randomMAC())]
        definition.vsockCID = request.vsockCID
        if let balloon = request.balloon { definition.balloon = balloon }
        if let acpi = request.acpi { definition.acpi = acpi }
        if let policy = request.onReboot { definition.onReboot = policy }
        if let model = request.cpuModel { definition.cpuModel = model }
        definition.resources = request.resources
        definition.memoryBacking = request.memoryBacking
        if let kernel = request.kernel { try Self.validate(kernel: kernel) }
        if let initrd = request.initrd { try Self.validateReadable(initrd, field: "--initrd") }
        guard request.diskBytes == nil || request.attachDisk == nil, !(request.withoutDisk && (request.diskBytes != nil || request.attachDisk != nil)) else {
            throw .invalidValue(field: "--disk", reason: "choose one of --disk SIZE, --attach-disk PATH and --no-disk")
        }
        var attached: DiskAttachment?
        if let path = request.attachDisk { attached = try Self.inspectDisk(HostFiles.absolute(path), format: request.attachDiskFormat, field: "--attach-disk") }
        if request.attachDisk == nil, request.attachDiskFormat != nil {
            throw .invalidValue(field: "--disk-format", reason: "declares the format of --attach-disk, which is not given")
        }
        if image == nil, request.fullCopy { throw .invalidValue(field: "--full", reason: "copies an image's disk; give --image NAME") }
        if image == nil, !request.cloudInit.isEmpty {
            throw .invalidValue(field: request.cloudInit.keyFiles.isEmpty ? "--user/--password/--hostname" : "--ssh-key",
                                reason: "cloud-init settings are for VMs made from an image; give --image NAME")
        }
        var imageDiskBytes: UInt64 = 0
        var cloudInit: CloudInitSettings?
        if let image {
            try Self.checkImageRequest(request, image: image)
            imageDiskBytes = request.diskBytes ?? max(type.diskBytes, image.virtualSize)
            guard imageDiskBytes >= image.virtualSize else {
                throw .invalidValue(field: "--disk", reason: "\(HostFiles.describeSize(imageDiskBytes)) is smaller than image '\(image.name)''s disk (\(HostFiles.describeSize(image.virtualSize))); give --disk \(HostFiles.describeSize(image.virtualSize)) or more")
            }
            definition.image = image.name
            if image.bootsDirectly {
                // The image's kernel boots directly on either engine; no firmware unless asked for.
                if request.firmware == nil { definition.firmware = nil }
                if request.kernel == nil, let kernel = image.kernel {
                    definition.kernel = images.path(of: image.name) + "/" + kernel
                    if request.initrd == nil, let initrd = image.initrd { definition.initrd = images.path(of: image.name) + "/" + initrd }
                }
                if request.commandLine == nil, let line = image.commandLine { definition.commandLine = line }
            } else if engine == .qemu, request.kernel == nil {
                definition.firmware = request.firmware ?? image.firmware ?? type.firmware
            }
            if image.cloudInit {
                cloudInit = try makeCloudInit(request.cloudInit, vmName: request.name, instanceID: definition.uuid)
            }
        }
        // Every rule, checked on what would be saved (the disks as they will be).
        var planned = definition
        if request.kernel != nil { planned.kernel = "kernel" }
        if let attached { planned.disks = [attached] } else if !request.withoutDisk { planned.disks = [DiskAttachment(path: "disk0.qcow2", format: .qcow2)] }
        if cloudInit != nil { planned.disks.append(DiskAttachment(path: CloudInitSeed.fileName, format: .raw, readOnly: true, serial: CloudInitSeed.serial)) }
        try Self.validate(planned)
        try checkNetworks(planned, previous: nil)

        try prepareRoot()
        let final = root + "/" + request.name
        guard !HostFiles.exists(final) else { throw .alreadyExists(name: request.name) }
        // A VM resting on an image is made under the image store's lock, so the image cannot be
        // deleted between the check and the overlay.
        if let image {
            return try images.locked { () throws(LibraryError) in
                guard images.exists(image.name) else { throw .invalidValue(field: "--image", reason: "image '\(image.name)' was deleted meanwhile") }
                try images.verify(image)
                return try makeBundle(request, definition: definition, type: type, attached: nil, image: image, imageDiskBytes: imageDiskBytes,
                                      cloudInit: cloudInit, notes: notes)
            }
        }
        return try makeBundle(request, definition: definition, type: type, attached: attached, image: nil, imageDiskBytes: 0,
                              cloudInit: nil, notes: notes)
    }

    /// Makes the VM's directory and files under a hidden name and renames it into place.
    private func makeBundle(_ request: CreateRequest, definition input: VMDefinition, type: OSType, attached: DiskAttachment?,
                            image: ImageManifest?, imageDiskBytes: UInt64, cloudInit: CloudInitSettings?,
                            notes: [String]) throws(LibraryError) -> (definition: VMDefinition, notes: [String]) {
        var definition = input
        let images = ImageStore(libraryRoot: root)
        let final = root + "/" + request.name
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
            if definition.firmware == .uefi {
                try HostFiles.copySparse(FirmwareFiles.uefiVariables, bundle.resolve("nvram.fd"))
                definition.nvram = "nvram.fd"
            }
            if let image {
                let base = images.path(of: image.name) + "/" + image.disk
                if request.fullCopy {
                    try HostFiles.copySparse(base, bundle.resolve("disk0.qcow2"))
                    chmod(bundle.resolve("disk0.qcow2"), 0o600)
                    do throws(DiskImageError) {
                        // The store holds standalone qcow2 disks only (ImageStore.install checks).
                        guard let copy = try DiskImages.open(path: bundle.resolve("disk0.qcow2"), format: .qcow2) as? QCOW2Image else {
                            throw .invalidArgument(field: "--image", reason: "the image's disk is not qcow2")
                        }
                        try copy.resize(to: imageDiskBytes)
                    } catch { throw .disk(error) }
                    // The kernel and initramfs too: a full copy does not depend on the image at all.
                    for (field, stored) in [(definition.kernel, "kernel"), (definition.initrd, "initrd")] {
                        guard let path = field, path.hasPrefix(images.path(of: image.name) + "/") else { continue }
                        try HostFiles.copySparse(path, bundle.resolve(stored))
                        chmod(bundle.resolve(stored), 0o600)
                        if stored == "kernel" { definition.kernel = stored } else { definition.initrd = stored }
                    }
                    definition.disks.append(DiskAttachment(path: "disk0.qcow2", format: .qcow2))
                } else {
                    let layer = BackingLayer(path: base, format: .qcow2)
                    try Self.createDisk(bundle.resolve("disk0.qcow2"), size: imageDiskBytes, backing: layer)
                    definition.disks.append(DiskAttachment(path: "disk0.qcow2", format: .qcow2, backing: [layer]))
                }
                if let cloudInit {
                    try CloudInitSeed.write(cloudInit, macs: definition.networks.map(\.mac), to: bundle.resolve(CloudInitSeed.fileName))
                    definition.cloudInit = cloudInit
                    definition.disks.append(DiskAttachment(path: CloudInitSeed.fileName, format: .raw, readOnly: true, serial: CloudInitSeed.serial))
                }
            } else if let attached {
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
        return (definition, notes)
    }

    /// cloud-init settings for an image without cloud-init.
    static func checkImageRequest(_ request: CreateRequest, image: ImageManifest) throws(LibraryError) {
        if !image.cloudInit, !request.cloudInit.isEmpty {
            throw .invalidValue(field: request.cloudInit.keyFiles.isEmpty ? "--user/--password/--hostname" : "--ssh-key",
                                reason: "image '\(image.name)' has no cloud-init to apply them; log in as the image's own user")
        }
    }

    /// The cloud-init settings of a new VM: its user (checked), the library's key and the
    /// user's keys, a hashed password and a host name.
    func makeCloudInit(_ request: CloudInitRequest, vmName: String, instanceID: String) throws(LibraryError) -> CloudInitSettings {
        let user = request.user ?? CloudInitSettings.defaultUser
        try CloudInitSettings.validate(user: user)
        var keys: [String] = []
        for file in request.keyFiles { keys += try SSHPublicKey.read(file: file) }
        let hostname: String
        if let given = request.hostname {
            try CloudInitSettings.validate(hostname: given)
            hostname = given
        } else {
            guard let derived = CloudInitSettings.hostname(forVM: vmName) else {
                throw .invalidValue(field: "--hostname", reason: "the VM's name '\(vmName)' is not a host name; give one with --hostname")
            }
            hostname = derived
        }
        let hash = try request.password.map { (password) throws(LibraryError) in try CloudInitSettings.hashPassword(password) }
        let libraryKey = try LibrarySSHKey(libraryRoot: root).ensure()
        keys = [libraryKey] + keys.filter { $0 != libraryKey }
        return CloudInitSettings(user: user, authorizedKeys: keys, passwordHash: hash, hostname: hostname, instanceID: instanceID)
    }

    static func chooseEngine(_ request: CreateRequest, image: ImageManifest? = nil) throws(LibraryError) -> EngineKind {
        if let image, !image.bootsDirectly {
            if request.engine == .kvm {
                throw .invalidValue(field: "--engine", reason: "image '\(image.name)' boots through firmware (no kernel could be taken out of it), which only the qemu engine has; leave out --engine")
            }
            return .qemu
        }
        if let image, request.engine == nil, request.kernel == nil {
            return image.kvmEngineBootable == true ? .kvm : .qemu
        }
        if request.engine == .kvm {
            if request.iso != nil {
                throw .invalidValue(field: "--iso", reason: "an installer ISO needs firmware and a CD-ROM drive, which the kvm engine does not have; leave out --engine (or give --engine qemu)")
            }
            if request.firmware != nil {
                throw .invalidValue(field: "--firmware", reason: "the kvm engine boots Linux kernels directly, without firmware; leave out --engine (or give --engine qemu)")
            }
            if request.accelerator != nil {
                throw .invalidValue(field: "--accel", reason: "the kvm engine always uses KVM; --accel is for the qemu engine")
            }
        }
        if let engine = request.engine { return engine }
        return request.iso != nil || request.firmware != nil ? .qemu : .kvm
    }

    // MARK: validation shared by create and set

    /// The kvm VMM's virtio slots: disks, network cards, vsock, balloon and rng each take one.
    /// The qemu machine's disks: six AHCI ports less the CD-ROM's, or PCI slots for virtio.
    public static func qemuDiskLimit(_ bus: DiskBus) -> Int { bus == .sata ? 5 : 16 }

    /// Every rule a VM definition must meet, checked once, wherever a definition is made or
    /// changed, so nothing saved can be refused at start.
    public static func validate(_ definition: VMDefinition) throws(LibraryError) {
        do throws(MachineSpecError) {
            try MachineRules.cpus(definition.cpus)
            try MachineRules.memory(definition.memoryBytes)
            try MachineRules.commandLine(definition.commandLine)
            try MachineRules.onReboot(definition.onReboot)
            if let cid = definition.vsockCID { try MachineRules.vsockCID(cid) }
        } catch {
            throw LibraryError(error)
        }
        try definition.resources.validate(cpus: definition.cpus, memoryBytes: definition.memoryBytes)
        try definition.memoryBacking.validate(memoryBytes: definition.memoryBytes)
        if let model = definition.cpuModel {
            let parsed: CPUModel
            do { parsed = try CPUModel(parsing: model) } catch { throw .invalidValue(field: "--cpu", reason: error.description) }
            if definition.engine == .qemu, parsed != .host {
                throw .invalidValue(field: "--cpu", reason: "the qemu engine takes host only so far (it runs -cpu host); '\(model)' needs --engine kvm")
            }
        }
        try validate(networks: definition.networks)
        try validate(disks: definition.disks)
        for (field, path) in [("--kernel", definition.kernel), ("--initrd", definition.initrd), ("nvram", definition.nvram)] {
            if let path { try validate(path: path, field: field) }
        }
        switch definition.engine {
        case .kvm:
            if definition.iso != nil {
                throw .invalidValue(field: "--iso", reason: "the kvm engine has no CD-ROM drive; eject the ISO (--iso none) or use --engine qemu")
            }
            if definition.firmware != nil {
                throw .invalidValue(field: "--firmware", reason: "the kvm engine boots Linux kernels directly, without firmware; use --engine qemu for firmware")
            }
            do {
                try MachineRules.virtioDevices(disks: definition.disks.count, nics: definition.networks.count, vsock: definition.vsockCID != nil,
                                               balloon: definition.balloon, entropy: definition.entropyDevice)
            } catch { throw LibraryError(error) }
        case .qemu:
            if definition.vsockCID != nil {
                throw .invalidValue(field: "--vsock-cid", reason: "the qemu engine has no vsock device like the kvm engine's; remove it (--no-vsock) or use --engine kvm")
            }
            if definition.kernel == nil && definition.firmware == nil {
                throw .invalidValue(field: "--firmware", reason: "a qemu VM without a kernel boots through firmware; give --firmware bios or uefi")
            }
            if let firmware = definition.firmware { try FirmwareFiles.check(firmware) }
            let limit = qemuDiskLimit(definition.diskBus)
            guard definition.disks.count <= limit else {
                throw .invalidValue(field: "disks", reason: "\(definition.disks.count) disks is more than the \(limit) a qemu VM with \(definition.diskBus.rawValue) disks takes")
            }
        }
    }

    /// Each card's MAC (unicast, unique in the VM) and forwards (only where the host can forward,
    /// each host port once, privileged ports only for root).
    public static func validate(networks: [NetworkAttachment]) throws(LibraryError) {
        var macs = Set<String>(), ports = Set<String>()
        for (index, card) in networks.enumerated() {
            do { _ = try MachineRules.mac(card.mac, card: index) } catch { throw LibraryError(error) }
            guard macs.insert(card.mac.lowercased()).inserted else {
                throw .invalidValue(field: "--nic", reason: "card \(index): MAC \(card.mac) is already another card's")
            }
            if !card.forwards.isEmpty, !card.attachment.acceptsForwards {
                throw .invalidValue(field: "--forward", reason: "card \(index) is on \(card.attachment); ports can be forwarded only to nat, network:NAME and user cards (a bridged or tap card is reached directly)")
            }
            for forward in card.forwards {
                guard ports.insert("\(forward.proto.rawValue):\(forward.hostPort)").inserted else {
                    throw .invalidValue(field: "--forward", reason: "host port \(forward.proto.rawValue) \(forward.hostPort) is forwarded twice")
                }
                if forward.hostPort < 1024, geteuid() != 0 {
                    throw .invalidValue(field: "--forward", reason: "\(forward): host ports below 1024 need root; choose a port from 1024 up")
                }
            }
        }
    }

    /// The rules that need the rest of the library: the networks cards name exist, no other VM
    /// has a card with the same MAC, no other VM forwards the same host port, and ports newly
    /// forwarded are free on this host.
    public func checkNetworks(_ definition: VMDefinition, previous: VMDefinition?) throws(LibraryError) {
        let store = NetworkStore(libraryRoot: root)
        for card in definition.networks {
            if case let .network(name) = card.attachment, !store.exists(name) {
                throw .invalidValue(field: "--nic", reason: "no network named '\(name)' (see `vireo network list`; `vireo network create \(name)` makes one)")
            }
            if case let .bridge(name) = card.attachment, !HostFiles.isDirectory("/sys/class/net/\(name)/bridge") {
                throw .invalidValue(field: "--nic", reason: HostFiles.exists("/sys/class/net/\(name)")
                    ? "\(name) is not a bridge; bridge:NAME needs a host bridge (see `ip -d link show type bridge`)"
                    : "no bridge named \(name) on this host; make one (`ip link add \(name) type bridge`, with the LAN's interface in it) or use --nic nat")
            }
            if case .user = card.attachment, HostTools.find("passt") == nil {
                throw .invalidValue(field: "--nic", reason: "user-mode networking needs passt, which is not installed; install Debian's `passt` package, or use --nic nat")
            }
            if case let .network(name) = card.attachment, !card.forwards.isEmpty, (try? store.load(name))?.mode == .internal {
                throw .invalidValue(field: "--forward", reason: "network '\(name)' is internal: the host has no address on it to forward from")
            }
        }
        let mine = Set(definition.networks.map { $0.mac.lowercased() })
        let myPorts = Set(definition.networks.flatMap(\.forwards).map { "\($0.proto.rawValue):\($0.hostPort)" })
        for other in (try? names()) ?? [] where other != definition.name {
            guard let theirs = try? VMBundle(directory: root + "/" + other).load() else { continue }
            if let card = theirs.networks.first(where: { mine.contains($0.mac.lowercased()) }) {
                throw .invalidValue(field: "--nic", reason: "MAC \(card.mac) is already VM '\(other)''s; leave out mac= to get a new one")
            }
            if let forward = theirs.networks.flatMap(\.forwards).first(where: { myPorts.contains("\($0.proto.rawValue):\($0.hostPort)") }) {
                throw .invalidValue(field: "--forward", reason: "host port \(forward.proto.rawValue) \(forward.hostPort) is already forwarded to VM '\(other)'")
            }
        }
        let before = Set(previous?.networks.flatMap(\.forwards) ?? [])
        for forward in definition.networks.flatMap(\.forwards) where !before.contains(forward) {
            try PortForward.checkFree(forward)
        }
    }

    /// A path a definition records: absolute, or relative to the VM's directory and inside it
    /// (no `..` or empty components), and without what the VMM's argument syntax reserves.
    public static func validate(path: String, field: String) throws(LibraryError) {
        guard !path.isEmpty, path.utf8.count <= 4096, !path.utf8.contains(0), !path.contains(",") else {
            throw .invalidValue(field: field, reason: "'\(path.prefix(200))' is not a usable path (empty, too long, or with a NUL byte or a comma)")
        }
        if !path.hasPrefix("/"), path.split(separator: "/", omittingEmptySubsequences: false).contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }) {
            throw .invalidValue(field: field, reason: "'\(path.prefix(200))' is relative to the VM's directory and must stay inside it (no '.', '..' or empty components)")
        }
    }

    /// Each disk: its path and chain's paths, the chain's shape (a raw image rests on nothing;
    /// at most 16 layers) and its serial (what the VMM and QEMU accept).
    public static func validate(disks: [DiskAttachment]) throws(LibraryError) {
        for (index, disk) in disks.enumerated() {
            let field = "disk \(index)"
            try validate(path: disk.path, field: field)
            for layer in disk.backing { try validate(path: layer.path, field: field) }
            do throws(MachineSpecError) {
                try MachineRules.diskChain(path: disk.path, format: disk.format, backing: disk.backing, disk: index)
                if let serial = disk.serial { try MachineRules.diskSerial(serial, disk: index) }
            } catch {
                throw LibraryError(error)
            }
        }
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

    /// A disk a person attaches: its format is the one they declare (or its file name does),
    /// never the one its bytes claim — a guest can write any header into a raw disk it owns. A
    /// qcow2 image's own chain is recorded as its headers name it (the person made it); the image
    /// is then opened read-only through that chain to check it.
    public static func inspectDisk(_ path: String, format declared: DiskFormat?, field: String, readOnly: Bool = false) throws(LibraryError) -> DiskAttachment {
        guard HostFiles.exists(path), !HostFiles.isDirectory(path) else { throw .invalidValue(field: field, reason: "\(path) does not exist or is not a file") }
        guard let format = declared ?? DiskFormat.declared(byName: path) else {
            throw .invalidValue(field: field == "--attach-disk" ? "--disk-format" : "--format",
                                reason: "the name of \(path) does not say whether it is raw or qcow2; give --format raw or --format qcow2 (Vireo never takes a disk's format from its content, which a guest may have written)")
        }
        let chain = try DiskChains.adopt(path, format: format, field: field)
        do {
            _ = try DiskImages.open(path: path, format: format, readOnly: true, backing: .recorded(chain))
        } catch {
            throw .invalidValue(field: field, reason: error.description)
        }
        return DiskAttachment(path: path, format: format, readOnly: readOnly, backing: chain)
    }

    // MARK: set, attach, detach

    /// Changes a stopped VM's definition; `change` validates its own fields.
    public func update(_ name: String, action: String = "change",
                       _ change: (inout VMDefinition, VMBundle) throws(LibraryError) -> Void) throws(LibraryError) -> VMDefinition {
        try withStoppedVM(name, action: action) { (bundle, _) throws(LibraryError) -> VMDefinition in
            // The saved guest expects the machine it was saved on: same CPUs, memory, devices, disks.
            guard !bundle.hasSavedState else {
                throw .wrongState(name: name, state: VMState.saved.rawValue, action: action,
                                  hint: "start it to resume where it was saved (`vireo start \(name)`), or boot it afresh with `vireo start \(name) --discard-state`")
            }
            var definition = try bundle.load()
            try change(&definition, bundle)
            try Self.validate(definition)
            try bundle.save(definition)
            return definition
        }
    }

    /// `vireo set`: every value is checked as `create` checks it, on the definition as it would
    /// be saved, before any file is touched; a refused change changes nothing.
    public func change(_ name: String, _ request: ChangeRequest) throws(LibraryError) -> VMDefinition {
        let fields = request.fields
        guard !fields.isEmpty else {
            throw .invalidValue(field: "vireo set", reason: "nothing to change; give at least one of --cpus, --memory, --cmdline, --kernel, --initrd, --no-initrd, --ostype, --rng/--no-rng, --nic, --no-nic, --forward, --vsock-cid, --no-vsock, --balloon/--no-balloon, --acpi, --on-reboot, --cpu, --engine, --iso, --firmware, --accel, --cpu-cap, --cpu-weight, --memory-limit, --pids-limit, --pin, --pin-emulator, --rt-priority, --io-limit, --memory-backing, --prealloc, --ksm, --lock-memory, --thp/--no-thp, --numa-node")
        }
        if request.initrd != nil && request.removeInitrd { throw .invalidValue(field: "--initrd", reason: "--initrd and --no-initrd contradict each other") }
        if let kernel = request.kernel { try Self.validate(kernel: kernel) }
        if let initrd = request.initrd { try Self.validateReadable(initrd, field: "--initrd") }
        if let type = request.osType { _ = try OSType.named(type) }
        let medium = try request.iso.flatMap { $0 }.map { (path) throws(LibraryError) in try InstallMedium.inspect(path) }
        return try update(name, action: "change \(fields.joined(separator: ", ")) of") { (definition, bundle) throws(LibraryError) in
            var changed = definition
            if let cpus = request.cpus { changed.cpus = cpus }
            if let memory = request.memoryBytes { changed.memoryBytes = memory }
            if let line = request.commandLine { changed.commandLine = line }
            if let type = request.osType { changed.osType = type }
            if let rng = request.entropyDevice { changed.entropyDevice = rng }
            if request.kernel != nil { changed.kernel = "kernel" }
            if request.initrd != nil { changed.initrd = "initrd" }
            if request.removeInitrd { changed.initrd = nil }
            if let cid = request.vsockCID { changed.vsockCID = cid }
            if let balloon = request.balloon { changed.balloon = balloon }
            if let acpi = request.acpi { changed.acpi = acpi }
            if let policy = request.onReboot { changed.onReboot = policy }
            if let model = request.cpuModel { changed.cpuModel = model }
            if let networks = request.networks {
                let previous = definition.networks
                changed.networks = networks.enumerated().map { index, card in
                    let explicit = index < request.explicitMACs.count && request.explicitMACs[index]
                    guard !explicit, let kept = previous.first(where: { $0.attachment == card.attachment }) else { return card }
                    return NetworkAttachment(card.attachment, mac: kept.mac, forwards: card.forwards.isEmpty ? kept.forwards : card.forwards)
                }
            }
            if let engine = request.engine {
                changed.engine = engine
                if engine == .kvm, request.firmware == nil { changed.firmware = nil }
                if engine == .qemu, changed.firmware == nil, changed.kernel == nil {
                    changed.firmware = try OSType.named(changed.osType).firmware
                }
            }
            if let iso = request.iso { changed.iso = iso == nil ? nil : medium?.path }
            if let firmware = request.firmware { changed.firmware = firmware }
            if let accelerator = request.accelerator { changed.accelerator = accelerator }
            changed.resources = request.applyingResources(to: changed.resources)
            if let choice = request.memoryBackingChoice { changed.memoryBacking.apply(choice) }
            if let preallocate = request.preallocate { changed.memoryBacking.preallocate = preallocate }
            if let locked = request.lockMemory { changed.memoryBacking.locked = locked }
            if let thp = request.transparentHugePages { changed.memoryBacking.transparentHugePages = thp }
            if let node = request.numaNode { changed.memoryBacking.numaNode = node }
            if let mergeable = request.mergeable { changed.memoryBacking.mergeable = mergeable }
            if changed.engine == .kvm, request.accelerator != nil {
                throw .invalidValue(field: "--accel", reason: "the kvm engine always uses KVM; --accel is for the qemu engine")
            }
            try Self.validate(changed)
            try checkNetworks(changed, previous: definition)
            // Now the files: the kernel and initrd copies, and a variable store for UEFI.
            if let kernel = request.kernel { try Self.installFile(kernel, as: "kernel", in: bundle) }
            if let initrd = request.initrd { try Self.installFile(initrd, as: "initrd", in: bundle) }
            if changed.firmware == .uefi, changed.nvram == nil || !HostFiles.exists(bundle.resolve(changed.nvram ?? "")) {
                try Self.installFile(FirmwareFiles.uefiVariables, as: "nvram.fd", in: bundle)
                changed.nvram = "nvram.fd"
            }
            definition = changed
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

    public func attachDisk(_ name: String, path: String, readOnly: Bool, format: DiskFormat? = nil) throws(LibraryError) -> VMDefinition {
        try update(name, action: "attach a disk to") { (definition, bundle) throws(LibraryError) in
            let absolute = DiskImages.normalized(HostFiles.absolute(path))
            var attachment = try Self.inspectDisk(absolute, format: format, field: "PATH", readOnly: readOnly)
            // What lies in the VM's directory is recorded relative to it (it moves with a rename).
            let prefix = bundle.directory + "/"
            if absolute.hasPrefix(prefix) { attachment.path = String(absolute.dropFirst(prefix.count)) }
            attachment.backing = attachment.backing.map { layer in
                layer.path.hasPrefix(prefix) ? BackingLayer(path: String(layer.path.dropFirst(prefix.count)), format: layer.format) : layer
            }
            guard !definition.disks.contains(where: { bundle.resolve($0.path) == absolute }) else {
                throw .invalidValue(field: "PATH", reason: "\(absolute) is already attached to VM '\(name)'")
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
            // the original's (one port cannot be forwarded to two VMs).
            definition.networks = original.networks.map { NetworkAttachment($0.attachment, mac: NetworkAttachment.randomMAC()) }
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
            // What a full clone copies, by the size of each disk's file (holes count as they
            // are passed over, so a thin disk moves on quickly).
            let copied = linked ? [] : original.disks.filter { !$0.readOnly && !($0.isOwned && $0.path == CloudInitSeed.fileName) }
            let total = max(copied.reduce(UInt64(0)) { $0 + HostFiles.size(bundle.resolve($1.path)) }, 1)
            var finished: UInt64 = 0
            do throws(LibraryError) {
                let target = VMBundle(directory: staging)
                // The kernel, initrd and UEFI variable store are the VM's own: each clone gets a copy.
                for file in [original.kernel, original.initrd, original.nvram].compactMap({ $0 }) where !file.hasPrefix("/") {
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
