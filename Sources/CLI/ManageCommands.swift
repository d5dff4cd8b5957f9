import ArgumentParser
import Library
import Devices
import VMM

struct Set: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Change a stopped VM's settings.",
        discussion: "None of these can change while the VM runs: stop it first. Each value is checked as `vireo create` checks it.")

    @Argument(help: "VM name.")
    var name: String

    @Option(help: "Number of vCPUs.")
    var cpus: Int?

    @Option(help: "Guest RAM (K, M, G; a bare number is MiB).")
    var memory: String?

    @Option(help: "Kernel command line.")
    var cmdline: String?

    @Option(help: "A new kernel, copied into the VM.")
    var kernel: String?

    @Option(help: "A new initial RAM disk, copied into the VM.")
    var initrd: String?

    @Flag(help: "Boot without an initial RAM disk.")
    var noInitrd = false

    @Option(help: "OS type label (does not change other settings).")
    var ostype: String?

    @Flag(inversion: .prefixedNo, help: "Attach a virtio-rng device.")
    var rng: Bool?

    @Option(help: ArgumentHelp("Replace the VM's network cards: tap:NAME[,mac=...]. Repeatable; a card whose tap is unchanged keeps its MAC.", valueName: "net"))
    var net: [String] = []

    @Flag(help: "Remove every network card.")
    var noNet = false

    @Option(help: "Give the VM a virtio-vsock device with this guest CID (3 or more).")
    var vsockCid: UInt64?

    @Flag(help: "Remove the vsock device.")
    var noVsock = false

    @Flag(inversion: .prefixedNo, help: "Attach a virtio-balloon device.")
    var balloon: Bool?

    @Option(help: ArgumentHelp("Describe the machine with ACPI (on) or an MP table and command-line devices (off).", valueName: "on|off"))
    var acpi: String?

    @Option(name: .customLong("on-reboot"), help: ArgumentHelp("What a guest's reboot does: restart or exit.", valueName: "restart|exit"))
    var onReboot: String?

    func run() throws {
        let fields = [cpus != nil ? "--cpus" : nil, memory != nil ? "--memory" : nil, cmdline != nil ? "--cmdline" : nil,
                      kernel != nil ? "--kernel" : nil, initrd != nil || noInitrd ? "--initrd" : nil,
                      ostype != nil ? "--ostype" : nil, rng != nil ? "--rng" : nil,
                      !net.isEmpty || noNet ? "--net" : nil, vsockCid != nil || noVsock ? "--vsock-cid" : nil, balloon != nil ? "--balloon" : nil,
                      acpi != nil ? "--acpi" : nil, onReboot != nil ? "--on-reboot" : nil].compactMap { $0 }
        guard !fields.isEmpty else {
            throw fail(LibraryError.invalidValue(field: "vireo set", reason: "nothing to change; give at least one of --cpus, --memory, --cmdline, --kernel, --initrd, --no-initrd, --ostype, --rng/--no-rng, --net, --no-net, --vsock-cid, --no-vsock, --balloon/--no-balloon, --acpi, --on-reboot"))
        }
        let acpiEnabled = try acpi.map(parseACPIFlag)
        let memoryBytes = try memory.map { try parseSize($0, field: "--memory") }
        let explicitMACs = net.map { $0.contains("mac=") }
        let networks = try net.map(parseNetwork)
        do throws(LibraryError) {
            if initrd != nil && noInitrd { throw LibraryError.invalidValue(field: "--initrd", reason: "--initrd and --no-initrd contradict each other") }
            if !net.isEmpty && noNet { throw LibraryError.invalidValue(field: "--net", reason: "--net and --no-net contradict each other") }
            if vsockCid != nil && noVsock { throw LibraryError.invalidValue(field: "--vsock-cid", reason: "--vsock-cid and --no-vsock contradict each other") }
            if let kernel { try VMLibrary.validate(kernel: kernel) }
            if let initrd { try VMLibrary.validateReadable(initrd, field: "--initrd") }
            if let ostype { _ = try OSType.named(ostype) }
            if let onReboot { try VMLibrary.validate(onReboot: onReboot) }
            let action = "change \(fields.joined(separator: ", ")) of"
            _ = try openLibrary().update(name, action: action) { (definition, bundle) throws(LibraryError) in
                if let cpus { definition.cpus = cpus }
                if let memoryBytes { definition.memoryBytes = memoryBytes }
                if let cmdline { definition.commandLine = cmdline }
                if let ostype { definition.osType = ostype }
                if let rng { definition.entropyDevice = rng }
                if let kernel {
                    try VMLibrary.installFile(kernel, as: "kernel", in: bundle)
                    definition.kernel = "kernel"
                }
                if let initrd {
                    try VMLibrary.installFile(initrd, as: "initrd", in: bundle)
                    definition.initrd = "initrd"
                }
                if noInitrd { definition.initrd = nil }
                if noNet { definition.networks = [] }
                if let vsockCid { definition.vsockCID = vsockCid }
                if noVsock { definition.vsockCID = nil }
                if let balloon { definition.balloon = balloon }
                if let acpiEnabled { definition.acpi = acpiEnabled }
                if let onReboot { definition.onReboot = onReboot }
                if !networks.isEmpty {
                    let previous = definition.networks
                    definition.networks = zip(networks, explicitMACs).map { card, explicit in
                        guard !explicit, let kept = previous.first(where: { $0.tap == card.tap }) else { return card }
                        return kept
                    }
                }
            }
        } catch {
            throw fail(error)
        }
        printLine("VM '\(name)' updated: \(fields.joined(separator: ", "))")
    }
}

struct Rename: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Rename a stopped VM (its directory moves with it).")

    @Argument(help: "Current name.")
    var name: String

    @Argument(help: "New name.")
    var newName: String

    func run() throws {
        do throws(LibraryError) { try openLibrary().rename(name, to: newName) } catch { throw fail(error) }
        printLine("VM '\(name)' is now '\(newName)'")
    }
}

struct Delete: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Delete a VM and the files in its directory.",
        discussion: """
            Disks attached from outside the VM's directory are never deleted. A VM whose disks \
            are the base of linked clones cannot be deleted until those clones are.
            """)

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Move the VM's own disks to <library>/kept-disks/ instead of deleting them.")
    var keepDisks = false

    @Flag(help: "Power the VM off first if it is running.")
    var force = false

    func run() throws {
        let library = openLibrary()
        let report: DeleteReport
        do throws(LibraryError) {
            if force { try stopVM(name, force: true, timeout: 10, library: library) }
            report = try library.delete(name, keepDisks: keepDisks)
        } catch {
            if case let .wrongState(_, state, _, _) = error, !force, ["running", "paused", "starting", "shutting-down"].contains(state) {
                printError(error)
                printNote("to delete it anyway, `vireo delete \(name) --force` powers it off first")
                throw ExitCode(error.exitStatus)
            }
            throw fail(error)
        }
        printLine("Deleted VM '\(name)'")
        for disk in report.keptDisks { printLine("  kept disk \(disk)") }
        for disk in report.untouchedDisks { printLine("  left attached disk \(disk) in place") }
    }
}

struct Clone: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy a stopped VM: a full, independent copy, or a linked clone sharing the source's disks.",
        discussion: """
            A linked clone takes no space up front: the source's disks are frozen as base images \
            in the source's directory and both VMs write to their own qcow2 overlays on top. The \
            source can then not be deleted or renamed while linked clones rest on it.
            """)

    @Argument(help: "VM to copy.")
    var source: String

    @Argument(help: "Name of the new VM.")
    var name: String

    @Flag(help: "Make a linked clone (qcow2 overlays on the source's disks) instead of a full copy.")
    var linked = false

    func run() throws {
        let definition: VMDefinition
        do throws(LibraryError) { definition = try openLibrary().clone(source, to: name, linked: linked) } catch { throw fail(error) }
        printLine("Cloned VM '\(source)' to '\(name)' (\(linked ? "linked" : "full") clone, uuid \(definition.uuid))")
    }
}
