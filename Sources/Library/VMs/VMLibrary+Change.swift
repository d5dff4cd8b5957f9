import API
import DiskImage
import FoundationEssentials
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// Changing a stopped VM: its settings, its disks.
extension VMLibrary {
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
            throw .invalidValue(field: "vireo set", reason: "nothing to change; give at least one of --cpus, --memory, --cmdline, --kernel, --initrd, --no-initrd, --ostype, --rng/--no-rng, --nic, --no-nic, --forward, --vsock-cid, --no-vsock, --balloon/--no-balloon, --acpi, --on-reboot, --cpu, --engine, --iso, --firmware, --accel, --cpu-cap, --cpu-weight, --memory-limit, --pids-limit, --pin, --pin-emulator, --rt-priority, --io-limit, --memory-backing, --prealloc, --ksm, --lock-memory, --thp/--no-thp, --numa-node, --tpm/--no-tpm, --secure-boot/--no-secure-boot, --hyperv/--no-hyperv")
        }
        if request.initrd != nil && request.removeInitrd { throw .invalidValue(field: "initrd", reason: "--initrd and --no-initrd contradict each other") }
        if let kernel = request.kernel { try Self.validate(kernel: kernel) }
        if let initrd = request.initrd { try Self.validateReadable(initrd, field: "initrd") }
        if let type = request.osType { _ = try OSType.named(type) }
        let medium = try request.iso.flatMap { $0 }.map { (path) throws(LibraryError) in try InstallMedium.inspect(path) }
        let changed = try update(name, action: "change \(fields.joined(separator: ", ")) of") { (definition, bundle) throws(LibraryError) in
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
            if let tpm = request.tpm { changed.tpm = tpm }
            if let secureBoot = request.secureBoot { changed.secureBoot = secureBoot }
            if let hyperV = request.hyperV { changed.hyperV = hyperV }
            if let acpi = request.acpi { changed.acpi = acpi }
            if let policy = request.onReboot { changed.onReboot = policy }
            if let model = request.cpuModel { changed.cpuModel = model }
            if let networks = request.networks {
                let previous = definition.networks
                changed.networks = networks.enumerated().map { index, card in
                    let explicit = index < request.explicitMACs.count && request.explicitMACs[index]
                    guard !explicit, let kept = previous.first(where: { $0.attachment == card.attachment }) else { return card }
                    return NetworkAttachment(card.attachment, mac: kept.mac, forwards: card.forwards.isEmpty ? kept.forwards : card.forwards,
                                             queues: card.queues)
                }
            }
            if let engine = request.engine {
                changed.engine = engine
                if engine == .kvm, request.firmware == nil { changed.firmware = nil }
                if engine == .qemu, changed.firmware == nil, changed.kernel == nil {
                    changed.firmware = try OSType.named(changed.osType).firmware
                }
            }
            if let iso = request.iso {
                // A different disc (or none) ends an unattended install: its answers were for this one.
                if changed.unattended != nil, (iso == nil ? nil : medium?.path) != changed.iso { changed = changed.withoutUnattended() }
                changed.iso = iso == nil ? nil : medium?.path
            }
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
                throw .invalidValue(field: "accelerator", reason: "the kvm engine always uses KVM; --accel is for the qemu engine")
            }
            try Self.validate(changed)
            try checkNetworks(changed, previous: definition)
            // Now the files: the kernel and initrd copies, and a variable store for UEFI.
            if let kernel = request.kernel { try Self.installFile(kernel, as: "kernel", in: bundle) }
            if let initrd = request.initrd { try Self.installFile(initrd, as: "initrd", in: bundle) }
            // Secure Boot switched: the variable store starts again from the matching template
            // (keys enrolled, or none), which also forgets boot entries the guest made.
            let secureBootSwitched = request.secureBoot != nil && request.secureBoot != definition.secureBoot
            if changed.firmware == .uefi, secureBootSwitched || changed.nvram == nil || !HostFiles.exists(bundle.resolve(changed.nvram ?? "")) {
                try Self.installFile(FirmwareFiles.variables(secureBoot: changed.secureBoot), as: "nvram.fd", in: bundle)
                changed.nvram = "nvram.fd"
            }
            definition = changed
        }
        // An unattended install given up (its disc changed): its answers hold the password's hash.
        if changed.unattended == nil, let bundle = try? bundle(named: name) { Self.removeInstallerFiles(bundle) }
        return changed
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

    public func attachDisk(_ name: String, path: String, readOnly: Bool, format: DiskFormat? = nil, cache: DiskCache? = nil) throws(LibraryError) -> VMDefinition {
        try update(name, action: "attach a disk to") { (definition, bundle) throws(LibraryError) in
            // An NBD address is kept as written; a file's path is made absolute and normal.
            let absolute = DiskFormat.isNetworkAddress(path) ? path : DiskImages.normalized(HostFiles.absolute(path))
            var attachment = try Self.inspectDisk(absolute, format: format, field: "PATH", readOnly: readOnly, cache: cache)
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
}
