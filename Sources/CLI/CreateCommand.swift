import ArgumentParser
import DiskImage
import Library
import MachineSpec
import X86Boot
import VMM
#if canImport(Glibc)
import Glibc
#endif

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a VM in the library: a directory with its configuration, kernel and a thin-provisioned disk.",
        discussion: """
            The OS type (see `vireo ostypes`) sets the default CPUs, memory, disk size and kernel \
            command line; every default can be overridden here and changed later with `vireo set`. \
            The kernel and initrd are copied into the VM's directory, so the VM keeps working if \
            the originals move. Unless told otherwise a qcow2 disk is created, thin: it takes host \
            space only as the guest writes.
            """)

    @Argument(help: ArgumentHelp("Name of the new VM (\(VMName.rule)).", valueName: "name"))
    var name: String

    @Option(help: "OS type preset (default linux-64; see `vireo ostypes`).")
    var ostype: String?

    @Option(help: "Number of vCPUs.")
    var cpus: Int?

    @Option(help: "Guest RAM (K, M, G; a bare number is MiB).")
    var memory: String?

    @Option(help: "Size of the new thin qcow2 disk (K, M, G, T).")
    var disk: String?

    @Option(help: "Use this existing image (raw or qcow2) as the VM's disk instead of creating one.")
    var attachDisk: String?

    @Option(help: "Make the new disk in this dir pool (as VM-NAME.qcow2) instead of the VM's directory (docs/storage-pools.md).")
    var pool: String?

    @Option(name: .customLong("disk-format"), help: "The format of --attach-disk (raw or qcow2); needed unless its name ends in .qcow2 or .raw. Never read from the disk's content.")
    var diskFormat: String?

    @Flag(help: "Create the VM without a disk.")
    var noDisk = false

    @Option(help: "Linux kernel to boot (ELF vmlinux or bzImage); copied into the VM.")
    var kernel: String?

    @Option(help: "Initial RAM disk; copied into the VM.")
    var initrd: String?

    @Option(help: "Kernel command line (replaces the OS type's).")
    var cmdline: String?

    @OptionGroup var nicOptions: NICOptions

    @Option(help: "Give the VM a virtio-vsock device with this guest CID (3 or more); its host side is vsock.sock in the VM's directory.")
    var vsockCid: UInt64?

    @Flag(inversion: .prefixedNo, help: "Attach a virtio-balloon device, so `vireo balloon` can reclaim guest memory (default on).")
    var balloon = true

    @Flag(inversion: .prefixedNo, help: "Attach a virtio-rng device (default on).")
    var rng = true

    @Option(help: ArgumentHelp("on (default): describe the machine with ACPI (devices, CPUs, power button, reset); off: an MP table and command-line devices, for kernels built without ACPI.", valueName: "on|off"))
    var acpi: String?

    @Option(name: .customLong("on-reboot"), help: ArgumentHelp("What a guest's reboot does: restart (default) boots it again in the same process; exit stops the VM.", valueName: "restart|exit"))
    var onReboot: String?

    @Option(help: ArgumentHelp("The CPU the guest sees: \(CPUModel.syntax). kvm engine; a saved or snapshotted guest keeps its own.", valueName: "model"))
    var cpu: String?

    @OptionGroup var engineOptions: EngineOptions

    @OptionGroup var resourceOptions: ResourceOptions

    @OptionGroup var memoryBackingFlags: MemoryBackingFlags

    @Option(help: ArgumentHelp("Make the VM from this image (`vireo image list`): its disk is a thin overlay on the image's, grown to --disk, and it boots the image's kernel.", valueName: "image"))
    var image: String?

    @Flag(help: "With --image: copy the image's disk and kernel into the VM instead of resting on them.")
    var full = false

    @Option(name: .customLong("ssh-key"), help: ArgumentHelp("With a cloud-init image or --unattended: a public key file the user may log in with (repeatable); for an image the library's own key is always added for `vireo ssh`.", valueName: "file"))
    var sshKeys: [String] = []

    @Option(help: "With a cloud-init image or --unattended: the user to make (default \(CloudInitSettings.defaultUser), or ubuntu for Ubuntu); it may sudo.")
    var user: String?

    @Flag(help: "With a cloud-init image: give the user a password too (asked on the terminal, or one line read from stdin), for the console.")
    var password = false

    @Option(help: "With a cloud-init image or --unattended: the guest's host name (default: the VM's name).")
    var hostname: String?

    @Flag(inversion: .prefixedNo, help: "A TPM 2.0 (qemu engine): Debian's swtpm, its state in the VM's directory, carried by saves and snapshots (default: the OS type's; windows11-64 has one). See docs/tpm.md.")
    var tpm: Bool?

    @Flag(name: .customLong("secure-boot"), inversion: .prefixedNo, help: "UEFI Secure Boot (--firmware uefi): OVMF's Secure Boot build with Microsoft's keys enrolled, as Windows 11 and shim-signed distributions expect (default: the OS type's).")
    var secureBoot: Bool?

    @Flag(name: .customLong("hyperv"), inversion: .prefixedNo, help: "Hyper-V enlightenments for Windows guests (qemu engine; default: the OS type's, on for Windows).")
    var hyperV: Bool?

    @Option(name: .customLong("share"), help: ArgumentHelp("Share a host directory with the guest over virtio-fs (qemu engine; repeatable): HOSTDIR[:TAG][,ro]. A cloud-init image mounts it at /mnt/TAG.", valueName: "share"))
    var shares: [String] = []

    @Option(name: .customLong("managed-by"), help: ArgumentHelp("Mark the VM as made and managed by another program (the containerd shim uses containerd); `vireo list` and `info` show it.", valueName: "program"))
    var managedBy: String?

    @OptionGroup var unattendedOptions: UnattendedOptions

    @Flag(help: "Print the new VM's configuration as JSON.")
    var json = false

    func run() throws {
        var request = CreateRequest(name: name)
        do throws(LibraryError) { request.shares = try shares.map(SharedFolder.parse) } catch { throw fail(error) }
        request.tpm = tpm
        request.secureBoot = secureBoot
        request.hyperV = hyperV
        request.managedBy = managedBy
        request.osType = ostype
        request.cpus = cpus
        request.memoryBytes = try memory.map { try parseSize($0, field: "--memory") }
        request.diskBytes = try disk.map { try parseSize($0, field: "--disk") }
        request.attachDisk = attachDisk
        request.attachDiskFormat = try diskFormat.map { (text) throws(LibraryError) in try DiskFormat.parse(text, field: "--disk-format") }
        request.withoutDisk = noDisk
        request.pool = pool
        request.kernel = kernel
        request.initrd = initrd
        request.commandLine = cmdline
        request.entropyDevice = rng
        request.networks = try nicOptions.cards(kept: nil)?.map(\.card)
        request.balloon = balloon
        request.vsockCID = vsockCid
        request.acpi = try acpi.map(parseACPIFlag)
        request.onReboot = onReboot
        request.cpuModel = cpu
        request.resources = try resourceOptions.limits()
        request.memoryBacking = try memoryBackingFlags.options()
        request.iso = engineOptions.iso
        request.image = image
        request.fullCopy = full
        if unattendedOptions.unattended {
            var unattended = UnattendedRequest(password: try unattendedOptions.password())
            unattended.user = user
            unattended.hostname = hostname
            unattended.keyFiles = sshKeys
            unattendedOptions.fill(&unattended)
            request.unattended = unattended
        } else {
            try unattendedOptions.refuseWithoutUnattended()
            request.cloudInit.keyFiles = sshKeys
            request.cloudInit.user = user
            request.cloudInit.hostname = hostname
            if password { request.cloudInit.password = try readPassword() }
        }
        let library = openLibrary()
        let definition: VMDefinition
        let notes: [String]
        do throws(LibraryError) {
            (request.engine, request.firmware, request.accelerator) = try engineOptions.parsed()
            (definition, notes) = try library.createReporting(request)
        } catch { throw fail(error) }
        for note in notes { printNote(note) }
        if json { try printJSON(definition); return }
        let bundle = VMBundle(directory: library.root + "/" + name)
        printLine("Created VM '\(name)' (\(definition.osType), \(definition.cpus) vCPU, \(Size.describe(definition.memoryBytes)) RAM, \(definition.engine.rawValue) engine) in \(bundle.directory)")
        if definition.engine == .qemu {
            printLine("  firmware \(definition.firmware?.rawValue ?? "none (direct kernel boot)"), acceleration \(definition.accelerator.rawValue)")
            if let iso = definition.iso { printLine("  CD-ROM \(iso) (boots first; `vireo eject \(name)` once installed)") }
        }
        for network in definition.networks { printLine("  network card \(network.mac) on \(describeAttachment(network))") }
        if let cid = definition.vsockCID { printLine("  vsock cid \(cid), host side \(bundle.vsockPath)") }
        for disk in definition.disks {
            printLine("  disk \(bundle.resolve(disk.path)) (\(disk.format.rawValue), \(Size.describe(DiskImages.recordedVirtualSize(path: bundle.resolve(disk.path), format: disk.format) ?? 0)))")
        }
        if let image = definition.image { printLine("  made from image '\(image)'") }
        if let install = definition.unattended {
            printLine("  unattended install: \(install.installer.summary); user \(install.settings.user) (sudo), host name \(install.settings.hostname), \(install.settings.locale), \(install.settings.timezone)\(install.settings.mirror.map { ", mirror \($0)" } ?? "")")
            printLine("  the first start runs the installer with no questions; it powers off when done, and the next start boots the installed system (progress: `vireo info \(name)`)")
        }
        if let settings = definition.cloudInit {
            printLine("  cloud-init: user \(settings.user) (\(settings.authorizedKeys.count) SSH key\(settings.authorizedKeys.count == 1 ? "" : "s")\(settings.passwordHash == nil ? "" : ", a password")), host name \(settings.hostname); log in with `vireo ssh \(name)` once it runs")
        }
        if definition.kernel == nil && definition.engine == .kvm { printLine("  no kernel yet: add one with `vireo set \(name) --kernel PATH`") }
        printLine("Start it with: vireo start \(name)")
    }
}


/// A password from the terminal (asked twice, not echoed) or one line of stdin.
func readPassword() throws -> String {
    if isatty(STDIN_FILENO) != 0 {
        var first = ""
        for attempt in 0..<2 {
            var saved = termios()
            tcgetattr(STDIN_FILENO, &saved)
            var quiet = saved
            quiet.c_lflag &= ~tcflag_t(ECHO)
            tcsetattr(STDIN_FILENO, TCSANOW, &quiet)
            printNote(attempt == 0 ? "password for the VM's user: " : "the same again: ")
            let line = readLine(strippingNewline: true) ?? ""
            tcsetattr(STDIN_FILENO, TCSANOW, &saved)
            if attempt == 0 { first = line } else if line != first {
                throw fail(LibraryError.invalidValue(field: "--password", reason: "the two passwords differ"))
            }
        }
        return first
    }
    guard let line = readLine(strippingNewline: true) else {
        throw fail(LibraryError.invalidValue(field: "--password", reason: "stdin ended before a password line"))
    }
    return line
}

/// `--acpi on|off`, the machine's rule.
func parseACPIFlag(_ text: String) throws -> Bool {
    do throws(MachineSpecError) { return try MachineRules.acpiSwitch(text) } catch { throw fail(LibraryError(error)) }
}

/// A card for people: where it is plugged in and what is forwarded to it.
func describeAttachment(_ card: NetworkAttachment) -> String {
    var text: String
    switch card.attachment {
    case .nat: text = "the default NAT network"
    case let .network(name): text = "network '\(name)'"
    case let .bridge(name): text = "host bridge \(name)"
    case .user: text = "user-mode networking (passt)"
    case let .tap(name): text = "tap \(name)"
    case let .netns(path): text = "network namespace \(path) (its interface, redirected)"
    }
    if !card.forwards.isEmpty { text += ", forwarding " + card.forwards.map(\.description).joined(separator: " ") }
    return text
}

/// The network card options `create` and `set` share.
struct NICOptions: ParsableArguments {
    @Option(name: [.customLong("nic"), .customLong("net")],
            help: ArgumentHelp("A network card: \(NICAttachment.syntax), then [,mac=XX:XX:XX:XX:XX:XX][,queues=N]. Repeatable. New VMs get one `nat` card unless told otherwise.", valueName: "nic"))
    var nic: [String] = []

    @Flag(name: [.customLong("no-nic"), .customLong("no-net")], help: "No network card at all.")
    var noNic = false

    @Option(help: ArgumentHelp("Forward a host port to the guest: tcp|udp:HOSTPORT:GUESTPORT, on the first nat, network or user card. Repeatable.", valueName: "forward"))
    var forward: [String] = []

    var isEmpty: Bool { nic.isEmpty && !noNic && forward.isEmpty }

    /// The cards asked for (nil: none asked for, keep `kept`), each with whether its MAC was given.
    func cards(kept: [NetworkAttachment]?) throws -> [(card: NetworkAttachment, explicitMAC: Bool)]? {
        do throws(LibraryError) {
            if noNic && (!nic.isEmpty || !forward.isEmpty) {
                throw .invalidValue(field: "--no-nic", reason: "contradicts \(nic.isEmpty ? "--forward" : "--nic")")
            }
            if noNic { return [] }
            var cards: [(card: NetworkAttachment, explicitMAC: Bool)]
            if !nic.isEmpty {
                cards = try nic.map(parseNIC)
            } else if !forward.isEmpty {
                cards = (kept ?? [NetworkAttachment(.nat, mac: NetworkAttachment.randomMAC())]).map { ($0, true) }
            } else {
                return nil
            }
            if !forward.isEmpty {
                let forwards = try forward.map { (text) throws(LibraryError) in try PortForward.parse(text, field: "--forward") }
                guard let index = cards.firstIndex(where: { $0.card.attachment.acceptsForwards }) else {
                    throw .invalidValue(field: "--forward", reason: "the VM has no nat, network or user card to forward ports to")
                }
                cards[index].card.forwards = forwards
            }
            return cards
        } catch {
            throw fail(error)
        }
    }
}

/// `nat|network:NAME|bridge:BR|user|tap:NAME[,mac=...]`, with a MAC made now if none was given.
func parseNIC(_ text: String) throws(LibraryError) -> (card: NetworkAttachment, explicitMAC: Bool) {
    try NetworkAttachment.parseCard(text, field: "--nic")
}

/// The engine options `create` and `set` share.
struct EngineOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Which engine runs the VM: kvm (Vireo's VMM, direct-kernel Linux) or qemu (firmware, installers, a display). At create: qemu with --iso or --firmware, else kvm.", valueName: "kvm|qemu"))
    var engine: String?

    @Option(help: ArgumentHelp("Installer ISO for the CD-ROM drive (qemu engine); the VM boots from it until it is ejected (`vireo eject`, or `vireo set NAME --iso none`).", valueName: "path"))
    var iso: String?

    @Option(help: ArgumentHelp("Firmware (qemu engine): bios (SeaBIOS) or uefi (OVMF). At create: the OS type's.", valueName: "bios|uefi"))
    var firmware: String?

    @Option(help: ArgumentHelp("qemu engine: kvm, tcg (software emulation, slow) or auto (KVM when /dev/kvm works; the default).", valueName: "auto|kvm|tcg"))
    var accel: String?

    /// The choices as the library's types; an unknown value names its option and what is allowed.
    func parsed() throws(LibraryError) -> (EngineKind?, Firmware?, Accelerator?) {
        (try engine.map { (text) throws(LibraryError) in try EngineKind.parse(text, field: "--engine") },
         try firmware.map { (text) throws(LibraryError) in try Firmware.parse(text, field: "--firmware") },
         try accel.map { (text) throws(LibraryError) in try Accelerator.parse(text, field: "--accel") })
    }
}
