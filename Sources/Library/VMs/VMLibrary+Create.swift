import API
import DiskImage
import FoundationEssentials
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// Creating a VM: from a kernel, an ISO, an image or a disk; the bundle made all or nothing.
extension VMLibrary {
    public func create(_ request: CreateRequest) throws(LibraryError) -> VMDefinition {
        try createReporting(request).definition
    }

    /// Creates a VM and says what was chosen for the user (an OS type guessed from the ISO).
    public func createReporting(_ request: CreateRequest) throws(LibraryError) -> (definition: VMDefinition, notes: [String]) {
        try VMName.validate(request.name, in: root)
        var notes: [String] = []
        if let name = request.image {
            for (given, field) in [(request.iso != nil, "iso"), (request.attachDisk != nil, "attach_disk"), (request.withoutDisk, "no_disk")] where given {
                throw .invalidValue(field: field, reason: "cannot be combined with --image: the VM's disk is made from image '\(name)'")
            }
        }
        let medium = try request.iso.map { (path) throws(LibraryError) in try InstallMedium.inspect(path) }
        let installer = try Self.checkUnattendedRequest(request)
        let images = ImageStore(libraryRoot: root)
        let image = try request.image.map { (name) throws(LibraryError) in try images.load(name) }
        let engine = try Self.chooseEngine(request, image: image)
        let type: OSType
        if let identifier = request.osType {
            type = try OSType.named(identifier)
        } else if let image {
            type = try OSType.named(image.osType)
        } else if let installer {
            type = try OSType.named(installer.osType)
            notes.append("OS type \(type.identifier), from the installer: \(installer.summary)")
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
        var shares: [SharedFolder] = []
        for share in request.shares { shares.append(try share.checkedOnHost(libraryRoot: root)) }
        definition.shares = shares
        // What the OS type asks for (Windows 11: TPM and Secure Boot) unless the user says otherwise.
        definition.tpm = request.tpm ?? (engine == .qemu && type.tpm)
        definition.secureBoot = request.secureBoot ?? (engine == .qemu && definition.firmware == .uefi && type.secureBoot)
        definition.hyperV = request.hyperV ?? (engine == .qemu && type.hyperV)
        definition.managedBy = try Self.validated(managedBy: request.managedBy)
        if let kernel = request.kernel { try Self.validate(kernel: kernel) }
        if let initrd = request.initrd { try Self.validateReadable(initrd, field: "initrd") }
        guard request.diskBytes == nil || request.attachDisk == nil, !(request.withoutDisk && (request.diskBytes != nil || request.attachDisk != nil)) else {
            throw .invalidValue(field: "disk_bytes", reason: "choose one of --disk SIZE, --attach-disk PATH and --no-disk")
        }
        if let pool = request.pool {
            guard request.attachDisk == nil, !request.withoutDisk, image == nil else {
                throw .invalidValue(field: "pool", reason: "makes the VM's new empty disk (--disk SIZE); it does not go with --attach-disk, --no-disk or --image")
            }
            let definition = try PoolStore(libraryRoot: root).load(pool)
            guard definition.type == .dir else {
                throw .invalidValue(field: "pool", reason: "'\(pool)' is a \(definition.type.rawValue) pool, whose volumes Vireo does not make; attach one with `vireo disk attach VM VOLUME --pool \(pool)`")
            }
        }
        var attached: DiskAttachment?
        if let path = request.attachDisk {
            // An NBD address is kept as written; a file's path is made absolute.
            attached = try Self.inspectDisk(DiskFormat.isNetworkAddress(path) ? path : HostFiles.absolute(path), format: request.attachDiskFormat, field: "attach_disk")
        }
        if request.attachDisk == nil, request.attachDiskFormat != nil {
            throw .invalidValue(field: "disk_format", reason: "declares the format of --attach-disk, which is not given")
        }
        if image == nil, request.fullCopy { throw .invalidValue(field: "full", reason: "copies an image's disk; give --image NAME") }
        if image == nil, !request.cloudInit.isEmpty {
            throw .invalidValue(field: request.cloudInit.keyFiles.isEmpty ? "user" : "ssh_key_files",
                                reason: "cloud-init settings are for VMs made from an image; give --image NAME")
        }
        var imageDiskBytes: UInt64 = 0
        var cloudInit: CloudInitSettings?
        if let image {
            try Self.checkImageRequest(request, image: image)
            imageDiskBytes = request.diskBytes ?? max(type.diskBytes, image.virtualSize)
            guard imageDiskBytes >= image.virtualSize else {
                throw .invalidValue(field: "disk_bytes", reason: "\(Size.describe(imageDiskBytes)) is smaller than image '\(image.name)''s disk (\(Size.describe(image.virtualSize))); give --disk \(Size.describe(image.virtualSize)) or more")
            }
            definition.image = image.name
            if image.bootsDirectly, request.firmware == .uefi, request.kernel == nil, image.efiBootable == true {
                // UEFI boots the disk's own boot loader, as on an installed system: with Secure
                // Boot, shim, GRUB and the kernel are each checked before they run.
                definition.firmware = .uefi
            } else if image.bootsDirectly {
                if request.secureBoot == true, request.firmware == .uefi, request.kernel == nil {
                    throw .invalidValue(field: "secure_boot", reason: "image '\(image.name)' boots by handing its kernel to the machine directly (it has no EFI system partition with a boot loader Vireo knows of), and Secure Boot refuses a kernel handed over that way; use an image from `vireo image build`, whose disk boots through Debian's signed shim and GRUB, or leave out --secure-boot")
                }
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
        if let installer, let wanted = request.unattended {
            let settings = try makeUnattendedSettings(wanted, vmName: request.name, installer: installer)
            definition.unattended = UnattendedInstall(installer: installer, settings: settings, kernel: UnattendedInstall.kernelFile,
                                                      initrd: UnattendedInstall.initrdFile,
                                                      commandLine: UnattendedAnswers.commandLine(installer, settings: settings),
                                                      seed: installer.family == .ubuntu ? UnattendedInstall.seedFile : nil)
        }
        // Every rule, checked on what would be saved (the disks as they will be).
        var planned = definition
        if request.kernel != nil { planned.kernel = "kernel" }
        if let attached { planned.disks = [attached] } else if !request.withoutDisk { planned.disks = [DiskAttachment(path: "disk0.qcow2", format: .qcow2)] }
        if cloudInit != nil { planned.disks.append(DiskAttachment(path: CloudInitSeed.fileName, format: .raw, readOnly: true, serial: CloudInitSeed.serial)) }
        if let seed = definition.unattended?.seed { planned.disks.append(UnattendedInstall.seedDisk(seed)) }
        try Self.validate(planned)
        try checkNetworks(planned, previous: nil)

        try prepareRoot()
        let final = root + "/" + request.name
        guard !HostFiles.exists(final) else { throw .alreadyExists(name: request.name) }
        // A VM resting on an image is made under the image store's lock, so the image cannot be
        // deleted between the check and the overlay.
        if let image {
            return try images.locked { () throws(LibraryError) in
                guard images.exists(image.name) else { throw .invalidValue(field: "image", reason: "image '\(image.name)' was deleted meanwhile") }
                try images.verify(image)
                return try makeBundle(request, definition: definition, type: type, attached: nil, image: image, imageDiskBytes: imageDiskBytes,
                                      cloudInit: cloudInit, notes: notes)
            }
        }
        return try makeBundle(request, definition: definition, type: type, attached: attached, image: nil, imageDiskBytes: 0,
                              cloudInit: nil, notes: notes)
    }

    /// Makes the VM's directory and files under a hidden name and renames it into place.
    fileprivate func makeBundle(_ request: CreateRequest, definition input: VMDefinition, type: OSType, attached: DiskAttachment?,
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
        var madeVolume: String?
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
                try HostFiles.copySparse(FirmwareFiles.variables(secureBoot: definition.secureBoot), bundle.resolve("nvram.fd"))
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
            } else if let pool = request.pool {
                // A volume of the pool, named after the VM; not the VM's own file (deleting the VM
                // leaves it, as any disk outside its directory).
                let made = try StoragePools(library: self).createVolume(pool: pool, volume: request.name + ".qcow2",
                                                                        sizeBytes: request.diskBytes ?? type.diskBytes, format: .qcow2)
                madeVolume = made.path
                definition.disks.append(DiskAttachment(path: made.path, format: .qcow2))
            } else if !request.withoutDisk {
                let size = request.diskBytes ?? type.diskBytes
                try Self.createDisk(bundle.resolve("disk0.qcow2"), size: size)
                definition.disks.append(DiskAttachment(path: "disk0.qcow2", format: .qcow2))
            }
            if let unattended = definition.unattended {
                try writeInstaller(unattended, definition: definition, into: bundle)
                if let seed = unattended.seed { definition.disks.append(UnattendedInstall.seedDisk(seed)) }
            }
            try bundle.save(definition)
            try HostFiles.renameNoReplace(staging, final)
        } catch {
            try? HostFiles.removeTree(staging)
            if let madeVolume { unlink(madeVolume) }
            if case let .io(_, _, code) = error, code == EEXIST || code == ENOTEMPTY { throw .alreadyExists(name: request.name) }
            throw error
        }
        lock.unlock()
        return (definition, notes)
    }

    /// cloud-init settings for an image without cloud-init.
    static func checkImageRequest(_ request: CreateRequest, image: ImageManifest) throws(LibraryError) {
        if !image.cloudInit, !request.cloudInit.isEmpty {
            throw .invalidValue(field: request.cloudInit.keyFiles.isEmpty ? "user" : "ssh_key_files",
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
        let hostname = try CloudInitSettings.hostname(given: request.hostname, vmName: vmName)
        let hash = try request.password.map { (password) throws(LibraryError) in try CloudInitSettings.hashPassword(password) }
        let libraryKey = try LibrarySSHKey(libraryRoot: root).ensure()
        keys = [libraryKey] + keys.filter { $0 != libraryKey }
        return CloudInitSettings(user: user, authorizedKeys: keys, passwordHash: hash, hostname: hostname, instanceID: instanceID)
    }

    static func chooseEngine(_ request: CreateRequest, image: ImageManifest? = nil) throws(LibraryError) -> EngineKind {
        if let image, !image.bootsDirectly {
            if request.engine == .kvm {
                throw .invalidValue(field: "engine", reason: "image '\(image.name)' boots through firmware (no kernel could be taken out of it), which only the qemu engine has; leave out --engine")
            }
            return .qemu
        }
        if let image, request.engine == nil, request.kernel == nil {
            // Shared folders are served on the qemu engine only (so far).
            return image.kvmEngineBootable == true && request.shares.isEmpty && request.tpm != true && request.firmware == nil
                && request.secureBoot != true ? .kvm : .qemu
        }
        let windows = request.osType.map(OSType.isWindows) == true
        if request.engine == .kvm {
            if windows {
                throw .invalidValue(field: "engine", reason: "Windows boots through UEFI firmware, which only the qemu engine has; leave out --engine")
            }
            if request.iso != nil {
                throw .invalidValue(field: "iso", reason: "an installer ISO needs firmware and a CD-ROM drive, which the kvm engine does not have; leave out --engine (or give --engine qemu)")
            }
            if request.firmware != nil {
                throw .invalidValue(field: "firmware", reason: "the kvm engine boots Linux kernels directly, without firmware; leave out --engine (or give --engine qemu)")
            }
            if request.accelerator != nil {
                throw .invalidValue(field: "accelerator", reason: "the kvm engine always uses KVM; --accel is for the qemu engine")
            }
        }
        if let engine = request.engine { return engine }
        return request.iso != nil || request.firmware != nil || !request.shares.isEmpty || request.tpm == true || windows ? .qemu : .kvm
    }
}

extension VMLibrary {
    /// `--managed-by`: a short, printable name (it is shown in lists and reports).
    static func validated(managedBy: String?) throws(LibraryError) -> String? {
        guard let managedBy else { return nil }
        guard (1...64).contains(managedBy.count), managedBy.unicodeScalars.allSatisfy({ $0.value >= 0x21 && $0.value < 0x7f }) else {
            throw .invalidValue(field: "managed-by", reason: "'\(managedBy)' must be 1 to 64 printable ASCII characters without spaces (for example containerd)")
        }
        return managedBy
    }
}
