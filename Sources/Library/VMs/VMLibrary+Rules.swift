import API
import DiskImage
import FoundationEssentials
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// The library's rules for a definition: the machine's own (MachineRules) and what the library
/// adds (paths, networks, the engines' limits). Run wherever a definition is made or changed.
extension VMLibrary {
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
            do { parsed = try CPUModel(parsing: model) } catch { throw .invalidValue(field: "cpu_model", reason: error.description) }
            if definition.engine == .qemu, parsed != .host {
                throw .invalidValue(field: "cpu_model", reason: "the qemu engine takes host only so far (it runs -cpu host); '\(model)' needs --engine kvm")
            }
        }
        try validate(networks: definition.networks)
        // QEMU's multiqueue card is virtio-net's; the Intel cards a SATA machine gets have one queue.
        if definition.engine == .qemu, definition.qemuNICModel != "virtio-net-pci",
           let index = definition.networks.firstIndex(where: { ($0.queues ?? 1) > 1 }) {
            throw .invalidValue(field: "nics", reason: "card \(index): queue pairs need a virtio card, and this VM's cards are \(definition.qemuNICModel) (its disk bus is \(definition.diskBus.rawValue), for OS type \(definition.osType)); drop queues=")
        }
        try validate(disks: definition.disks)
        try validate(shares: definition.shares, engine: definition.engine, memoryBacking: definition.memoryBacking)
        for (field, path) in [("kernel", definition.kernel), ("initrd", definition.initrd), ("nvram", definition.nvram)] {
            if let path { try validate(path: path, field: field) }
        }
        if let unattended = definition.unattended { try validate(unattended: unattended, definition: definition) }
        switch definition.engine {
        case .kvm:
            if definition.iso != nil {
                throw .invalidValue(field: "iso", reason: "the kvm engine has no CD-ROM drive; eject the ISO (--iso none) or use --engine qemu")
            }
            if definition.firmware != nil {
                throw .invalidValue(field: "firmware", reason: "the kvm engine boots Linux kernels directly, without firmware; use --engine qemu for firmware")
            }
            if definition.tpm {
                throw .invalidValue(field: "tpm", reason: "the kvm engine has no TPM device; use --engine qemu, or --no-tpm")
            }
            if definition.hyperV {
                throw .invalidValue(field: "hyperv", reason: "Hyper-V enlightenments are the qemu engine's (for Windows guests); use --engine qemu, or --no-hyperv")
            }
            if definition.secureBoot {
                throw .invalidValue(field: "secure_boot", reason: "the kvm engine boots kernels directly, without firmware to enforce Secure Boot; use --engine qemu --firmware uefi, or --no-secure-boot")
            }
            do {
                try MachineRules.virtioDevices(disks: definition.disks.count, nics: definition.networks.count, vsock: definition.vsockCID != nil,
                                               balloon: definition.balloon, entropy: definition.entropyDevice)
            } catch { throw LibraryError(error) }
        case .qemu:
            if definition.vsockCID != nil {
                throw .invalidValue(field: "vsock_cid", reason: "the qemu engine has no vsock device like the kvm engine's; remove it (--no-vsock) or use --engine kvm")
            }
            if definition.kernel == nil && definition.firmware == nil {
                throw .invalidValue(field: "firmware", reason: "a qemu VM without a kernel boots through firmware; give --firmware bios or uefi")
            }
            if let firmware = definition.firmware { try FirmwareFiles.check(firmware, secureBoot: definition.secureBoot) }
            if definition.secureBoot, definition.firmware != .uefi {
                throw .invalidValue(field: "secure_boot", reason: "Secure Boot is UEFI's; give --firmware uefi (the VM has \(definition.firmware.map { "--firmware \($0.rawValue)" } ?? "a direct kernel boot"))")
            }
            let limit = qemuDiskLimit(definition.diskBus)
            guard definition.disks.count <= limit else {
                throw .invalidValue(field: "disks", reason: "\(definition.disks.count) disks is more than the \(limit) a qemu VM with \(definition.diskBus.rawValue) disks takes")
            }
        }
    }

    /// An unattended install: its files are the VM's own (fixed names in its directory), the
    /// installer boots from the qemu engine's CD drive with firmware, and its settings meet the
    /// rules they met at create (a hand-edited definition is checked as a new one would be).
    static func validate(unattended: UnattendedInstall, definition: VMDefinition) throws(LibraryError) {
        guard definition.engine == .qemu, definition.firmware != nil, definition.iso != nil else {
            throw .invalidValue(field: "unattended", reason: "an unattended install runs on the qemu engine with firmware and its installer ISO in the drive; `vireo eject \(definition.name)` gives the install up")
        }
        guard unattended.kernel == UnattendedInstall.kernelFile, unattended.initrd == UnattendedInstall.initrdFile,
              unattended.seed == nil || unattended.seed == UnattendedInstall.seedFile else {
            throw .invalidValue(field: "unattended", reason: "the installer's files must be the VM's own \(UnattendedInstall.kernelFile), \(UnattendedInstall.initrdFile) and \(UnattendedInstall.seedFile)")
        }
        if definition.secureBoot {
            throw .invalidValue(field: "secure_boot", reason: "an unattended install boots the installer's kernel directly, which no key enrolled for Secure Boot signs; install first, then `vireo set \(definition.name) --secure-boot`")
        }
        do throws(MachineSpecError) { try MachineRules.commandLine(unattended.commandLine) } catch { throw LibraryError(error) }
        let settings = unattended.settings
        try CloudInitSettings.validate(user: settings.user)
        try CloudInitSettings.validate(hostname: settings.hostname)
        try UnattendedSettings.validate(locale: settings.locale)
        try UnattendedSettings.validate(timezone: settings.timezone)
        try UnattendedSettings.validate(packages: settings.packages)
        if let name = settings.fullName { try UnattendedSettings.validateLine(name, field: "full_name", limit: 100, forbidden: [":", ","]) }
        if let command = settings.postInstallCommand { try UnattendedSettings.validateLine(command, field: "post_install_command", limit: 4096) }
        if let mirror = settings.mirror { try UnattendedSettings.validate(mirror: mirror) }
        try UnattendedSettings.validateLine(settings.passwordHash, field: "password", limit: 256)
        for (index, key) in settings.authorizedKeys.enumerated() {
            try SSHPublicKey.validate(key, where: "key \(index + 1)", field: "ssh_key_files")
            try UnattendedSettings.validateLine(key, field: "ssh_key_files", limit: 16384, forbidden: ["'"])
        }
    }

    /// Each card's MAC (unicast, unique in the VM) and forwards (only where the host can forward,
    /// each host port once, privileged ports only for root).
    public static func validate(networks: [NetworkAttachment]) throws(LibraryError) {
        var macs = Set<String>(), ports = Set<String>()
        for (index, card) in networks.enumerated() {
            do { _ = try MachineRules.mac(card.mac, card: index) } catch { throw LibraryError(error) }
            guard macs.insert(card.mac.lowercased()).inserted else {
                throw .invalidValue(field: "nics", reason: "card \(index): MAC \(card.mac) is already another card's")
            }
            if let queues = card.queues {
                do { try MachineRules.nicQueuePairs(queues, card: index) } catch { throw LibraryError(error) }
                if queues > 1, !card.attachment.takesQueuePairs {
                    throw .invalidValue(field: "nics", reason: "card \(index) is on \(card.attachment), which has one queue; queues= takes nat, network:NAME, bridge:NAME, tap:NAME and netns:PATH cards")
                }
            }
            if !card.forwards.isEmpty, !card.attachment.acceptsForwards {
                throw .invalidValue(field: "forwards", reason: "card \(index) is on \(card.attachment); ports can be forwarded only to nat, network:NAME and user cards (a bridged or tap card is reached directly)")
            }
            for forward in card.forwards {
                guard ports.insert("\(forward.proto.rawValue):\(forward.hostPort)").inserted else {
                    throw .invalidValue(field: "forwards", reason: "host port \(forward.proto.rawValue) \(forward.hostPort) is forwarded twice")
                }
                if forward.hostPort < 1024, geteuid() != 0 {
                    throw .invalidValue(field: "forwards", reason: "\(forward): host ports below 1024 need root; choose a port from 1024 up")
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
                throw .invalidValue(field: "nics", reason: "no network named '\(name)' (see `vireo network list`; `vireo network create \(name)` makes one)")
            }
            if case let .bridge(name) = card.attachment, !HostFiles.isDirectory("/sys/class/net/\(name)/bridge") {
                throw .invalidValue(field: "nics", reason: HostFiles.exists("/sys/class/net/\(name)")
                    ? "\(name) is not a bridge; bridge:NAME needs a host bridge (see `ip -d link show type bridge`)"
                    : "no bridge named \(name) on this host; make one (`ip link add \(name) type bridge`, with the LAN's interface in it) or use --nic nat")
            }
            if case .user = card.attachment, HostTools.find("passt") == nil {
                throw .invalidValue(field: "nics", reason: "user-mode networking needs passt, which is not installed; install Debian's `passt` package, or use --nic nat")
            }
            if case let .network(name) = card.attachment, !card.forwards.isEmpty, (try? store.load(name))?.mode == .internal {
                throw .invalidValue(field: "forwards", reason: "network '\(name)' is internal: the host has no address on it to forward from")
            }
        }
        let mine = Set(definition.networks.map { $0.mac.lowercased() })
        let myPorts = Set(definition.networks.flatMap(\.forwards).map { "\($0.proto.rawValue):\($0.hostPort)" })
        for other in (try? names()) ?? [] where other != definition.name {
            guard let theirs = try? VMBundle(directory: root + "/" + other).load() else { continue }
            if let card = theirs.networks.first(where: { mine.contains($0.mac.lowercased()) }) {
                throw .invalidValue(field: "nics", reason: "MAC \(card.mac) is already VM '\(other)''s; leave out mac= to get a new one")
            }
            if let forward = theirs.networks.flatMap(\.forwards).first(where: { myPorts.contains("\($0.proto.rawValue):\($0.hostPort)") }) {
                throw .invalidValue(field: "forwards", reason: "host port \(forward.proto.rawValue) \(forward.hostPort) is already forwarded to VM '\(other)'")
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
            if disk.isNetwork {
                // An NBD address, each path parsed as the VMM will.
                do { _ = try NetworkDisk.endpoints(disk.path) } catch { throw .invalidValue(field: field, reason: error.description) }
            } else {
                try validate(path: disk.path, field: field)
            }
            for layer in disk.backing { try validate(path: layer.path, field: field) }
            do throws(MachineSpecError) {
                try MachineRules.networkDisk(path: disk.path, format: disk.format, backing: disk.backing, cache: disk.cache, followsHeader: false, disk: index)
                try MachineRules.diskChain(path: disk.path, format: disk.format, backing: disk.backing, disk: index)
                if let serial = disk.serial { try MachineRules.diskSerial(serial, disk: index) }
            } catch {
                throw LibraryError(error)
            }
        }
    }

    public static func validate(kernel: String) throws(LibraryError) {
        do { _ = try KernelImage.load(path: HostFiles.absolute(kernel)) } catch {
            throw .invalidValue(field: "kernel", reason: error.reason)
        }
    }

    public static func validateReadable(_ path: String, field: String) throws(LibraryError) {
        guard access(HostFiles.absolute(path), R_OK) == 0, !HostFiles.isDirectory(path) else {
            throw .invalidValue(field: field, reason: "\(path) is not a readable file")
        }
    }

    /// An NBD export a person attaches: raw, reached and negotiated now (as the VM will, so a
    /// missing export or a dead server is refused at attach time), each path the same export.
    static func inspectNetworkDisk(_ path: String, format declared: DiskFormat?, field: String, readOnly: Bool,
                                   cache: DiskCache?) throws(LibraryError) -> DiskAttachment {
        do throws(MachineSpecError) {
            try MachineRules.networkDisk(path: path, format: declared ?? .raw, backing: [], cache: cache, followsHeader: false, disk: 0)
        } catch {
            throw .invalidValue(field: declared.map { $0 != .raw } == true ? "format" : "cache", reason: error.description)
        }
        do {
            _ = try DiskImages.open(path: path, format: .raw, readOnly: true)
        } catch {
            throw .invalidValue(field: field, reason: error.description)
        }
        return DiskAttachment(path: path, format: .raw, readOnly: readOnly)
    }

    /// A disk a person attaches: its format is the one they declare (or its file name does),
    /// never the one its bytes claim — a guest can write any header into a raw disk it owns. A
    /// qcow2 image's own chain is recorded as its headers name it (the person made it); the image
    /// is then opened read-only through that chain to check it.
    public static func inspectDisk(_ path: String, format declared: DiskFormat?, field: String, readOnly: Bool = false,
                                   cache: DiskCache? = nil) throws(LibraryError) -> DiskAttachment {
        if DiskFormat.isNetworkAddress(path) { return try inspectNetworkDisk(path, format: declared, field: field, readOnly: readOnly, cache: cache) }
        guard HostFiles.exists(path), !HostFiles.isDirectory(path) else { throw .invalidValue(field: field, reason: "\(path) does not exist or is not a file") }
        guard let format = declared ?? DiskFormat.declared(byName: path) else {
            throw .invalidValue(field: field == "attach_disk" ? "disk_format" : "format",
                                reason: "the name of \(path) does not say whether it is raw or qcow2; give --format raw or --format qcow2 (Vireo never takes a disk's format from its content, which a guest may have written)")
        }
        let chain = try DiskChains.adopt(path, format: format, field: field)
        do {
            // Opened as the VM will open it: a block device the host holds (mounted, swap, LVM)
            // and a file system without O_DIRECT are refused here, not at the first start.
            _ = try DiskImages.open(path: path, format: format, readOnly: true, backing: .recorded(chain), direct: cache == DiskCache.none)
        } catch {
            throw .invalidValue(field: field, reason: error.description)
        }
        return DiskAttachment(path: path, format: format, readOnly: readOnly, backing: chain, cache: cache)
    }
}
