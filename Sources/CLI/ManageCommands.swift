import ArgumentParser
import Engines
import Library
import MachineSpec
import X86Boot
import VMM

struct Set: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set",
        abstract: "Change a VM's settings.",
        discussion: "Resource limits (--cpu-cap, --cpu-weight, --memory-limit, --pids-limit) change a running VM at once; everything else needs it stopped. Each value is checked as `vireo create` checks it.")

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

    @OptionGroup var nicOptions: NICOptions

    @Option(help: "Give the VM a virtio-vsock device with this guest CID (3 or more).")
    var vsockCid: UInt64?

    @Flag(help: "Remove the vsock device.")
    var noVsock = false

    @Flag(inversion: .prefixedNo, help: "Attach a virtio-balloon device.")
    var balloon: Bool?

    @Flag(inversion: .prefixedNo, help: "A TPM 2.0 (qemu engine; swtpm). --no-tpm removes the device and keeps its state in the VM's directory.")
    var tpm: Bool?

    @Flag(inversion: .prefixedNo, help: "UEFI Secure Boot on or off; the variable store starts again from the matching template (Microsoft's keys, or none).")
    var secureBoot: Bool?

    @Flag(name: .customLong("hyperv"), inversion: .prefixedNo, help: "Hyper-V enlightenments for Windows guests (qemu engine).")
    var hyperV: Bool?

    @Option(help: ArgumentHelp("Describe the machine with ACPI (on) or an MP table and command-line devices (off).", valueName: "on|off"))
    var acpi: String?

    @Option(name: .customLong("on-reboot"), help: ArgumentHelp("What a guest's reboot does: restart or exit.", valueName: "restart|exit"))
    var onReboot: String?

    @Option(help: ArgumentHelp("The CPU the guest sees: \(CPUModel.syntax). kvm engine; a saved or snapshotted guest keeps its own.", valueName: "model"))
    var cpu: String?

    @OptionGroup var engineOptions: EngineOptions

    @OptionGroup var resourceOptions: ResourceOptions

    @OptionGroup var memoryBackingFlags: MemoryBackingFlags

    func run() throws {
        var request = ChangeRequest()
        try resourceOptions.apply(to: &request)
        try memoryBackingFlags.apply(to: &request)
        request.cpus = cpus
        request.memoryBytes = try memory.map { try parseSize($0, field: "--memory") }
        request.commandLine = cmdline
        request.kernel = kernel
        request.initrd = initrd
        request.removeInitrd = noInitrd
        request.osType = ostype
        request.entropyDevice = rng
        if !nicOptions.isEmpty {
            let kept = try? openLibrary().bundle(named: name).load().networks
            if let cards = try nicOptions.cards(kept: kept) {
                request.networks = cards.map(\.card)
                request.explicitMACs = cards.map(\.explicitMAC)
            }
        }
        if vsockCid != nil || noVsock { request.vsockCID = .some(vsockCid) }
        request.balloon = balloon
        request.tpm = tpm
        request.secureBoot = secureBoot
        request.hyperV = hyperV
        request.acpi = try acpi.map(parseACPIFlag)
        request.onReboot = onReboot
        request.cpuModel = cpu
        let iso = engineOptions.iso
        if let iso { request.iso = .some(iso == "none" ? nil : iso) }
        let changed: VMDefinition
        do throws(LibraryError) {
            if vsockCid != nil && noVsock { throw LibraryError.invalidValue(field: "--vsock-cid", reason: "--vsock-cid and --no-vsock contradict each other") }
            (request.engine, request.firmware, request.accelerator) = try engineOptions.parsed()
            changed = try openManager().change(name, request)
        } catch {
            throw fail(error)
        }
        printLine("VM '\(name)' updated: \(request.fields.joined(separator: ", "))")
        if changed.engine == .qemu, changed.iso == nil, iso == "none" { printLine("  the CD-ROM drive is empty; the VM boots from its disk") }
    }
}

struct Eject: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eject",
        abstract: "Take the installer ISO out of a VM's CD-ROM drive, so it boots from its disk.",
        discussion: "Works on a stopped VM and on a running qemu VM (the disc leaves the drive at once), like `vireo set NAME --iso none`.")

    @Argument(help: "VM name.")
    var name: String

    func run() throws {
        let outcome: VMManager.EjectOutcome
        do throws(LibraryError) { outcome = try openManager().eject(name) } catch { throw fail(error) }
        switch outcome {
        case .wasEmpty: printLine("VM '\(name)' has no ISO in its CD-ROM drive")
        case .ejectedStopped: printLine("VM '\(name)': ISO ejected; it boots from its disk next time")
        case .ejectedRunning: printLine("VM '\(name)': ISO ejected from the running VM; it boots from its disk from now on")
        }
    }
}

struct Rename: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "rename", abstract: "Rename a stopped VM (its directory moves with it).")

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
        commandName: "delete",
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
        let manager = openManager()
        let report: DeleteReport
        do throws(LibraryError) {
            if force { try stopVM(name, force: true, timeout: 10, manager: manager) }
            report = try manager.library.delete(name, keepDisks: keepDisks)
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
        commandName: "clone",
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

/// `--memory-backing`, `--prealloc`, `--ksm` (docs/resources.md), for create and set.
struct MemoryBackingFlags: ParsableArguments {
    @Option(help: ArgumentHelp("Back guest RAM with ordinary pages, huge pages from the kernel's pool (reserve them first), a memfd or a file (zeroed at each start); ',shared' maps the file shared, so the guest's writes land in it.", valueName: "anon|hugepages[=2M|1G]|memfd[,shared]|file:PATH[,shared]"))
    var memoryBacking: String?

    @Flag(inversion: .prefixedNo, help: "Fault all guest RAM in at start (no allocation surprises later; costs the RAM at once).")
    var prealloc: Bool?

    @Flag(inversion: .prefixedNo, help: "Offer guest RAM to KSM, which merges identical pages across VMs (off by default).")
    var ksm: Bool?

    @Flag(inversion: .prefixedNo, help: "Lock guest RAM in host memory: never swapped, all of it taken at start.")
    var lockMemory: Bool?

    @Flag(inversion: .prefixedNo, help: "Offer ordinary guest RAM to transparent huge pages (on by default: fewer faults as the guest touches memory).")
    var thp: Bool?

    @Option(help: ArgumentHelp("Bind guest RAM to this host NUMA node (none: no binding).", valueName: "N|none"))
    var numaNode: String?

    func parsedNUMANode() throws -> Int?? {
        guard let numaNode else { return nil }
        if numaNode == "none" { return .some(nil) }
        guard let node = Int(numaNode), node >= 0 else {
            throw fail(LibraryError.invalidValue(field: "--numa-node", reason: "'\(numaNode)' is not a node number (0, 1, ...) or none"))
        }
        return .some(node)
    }

    func apply(to request: inout ChangeRequest) throws {
        if let memoryBacking {
            do throws(LibraryError) { request.memoryBackingChoice = try MemoryBackingOptions.parseBacking(memoryBacking) } catch { throw fail(error) }
        }
        request.preallocate = prealloc
        request.mergeable = ksm
        request.lockMemory = lockMemory
        request.transparentHugePages = thp
        request.numaNode = try parsedNUMANode()
    }

    func options() throws -> MemoryBackingOptions {
        var options = MemoryBackingOptions()
        if let memoryBacking {
            do throws(LibraryError) { options.apply(try MemoryBackingOptions.parseBacking(memoryBacking)) } catch { throw fail(error) }
        }
        options.preallocate = prealloc ?? false
        options.mergeable = ksm ?? false
        options.locked = lockMemory ?? false
        options.transparentHugePages = thp ?? true
        options.numaNode = try parsedNUMANode() ?? nil
        return options
    }
}

/// `--cpu-cap`, `--cpu-weight`, `--memory-limit`, `--pids-limit` (docs/resources.md), for create and set.
struct ResourceOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Cap the VM's CPU time in percent of one CPU (150% is one and a half CPUs); none removes the cap.", valueName: "N%|none"))
    var cpuCap: String?

    @Option(help: ArgumentHelp("The VM's share of contended CPU, 1 to 10000 (100 is everyone's default); none resets it.", valueName: "N|none"))
    var cpuWeight: String?

    @Option(help: ArgumentHelp("Memory limit for the VM's whole engine process, guest RAM included (K, M, G); none removes it. Past it the kernel kills the VM (\"crashed: out of memory\").", valueName: "size|none"))
    var memoryLimit: String?

    @Option(help: ArgumentHelp("Most processes and threads the VM's engine may have; none removes the limit.", valueName: "N|none"))
    var pidsLimit: String?

    @Option(help: ArgumentHelp("Pin vCPU threads to host CPUs: vcpu0=2,vcpu1=3 (vcpu0=2-3 for a range); none unpins.", valueName: "vcpuN=CPU,...|none"))
    var pin: String?

    @Option(help: ArgumentHelp("Host CPUs for the engine's other threads (devices, console, control): 0-1 or 0,2; none unpins.", valueName: "CPUS|none"))
    var pinEmulator: String?

    @Option(help: ArgumentHelp("Run vCPU threads real-time (SCHED_FIFO, 1-99) with the VM's memory locked, inside a real-time budget that leaves the host most of each CPU; none for normal scheduling. Taken at the next start.", valueName: "N|none"))
    var rtPriority: String?

    @Option(help: ArgumentHelp("Block I/O limits for the VM's engine on the host devices its disks are on, on top of each disk's own rate limit: read=10M,write=5M,read-iops=200,write-iops=100 (per second); none removes them.", valueName: "KEY=VALUE,...|none"))
    var ioLimit: String?

    var isEmpty: Bool { cpuCap == nil && cpuWeight == nil && memoryLimit == nil && pidsLimit == nil && pin == nil && pinEmulator == nil && rtPriority == nil && ioLimit == nil }

    static func number(_ text: String, field: String, percent: Bool = false) throws -> Int? {
        if text == "none" { return nil }
        let digits = percent && text.hasSuffix("%") ? String(text.dropLast()) : text
        guard let value = Int(digits) else {
            throw fail(LibraryError.invalidValue(field: field, reason: "'\(text)' is not \(percent ? "a percentage like 50% or 150%" : "a whole number") or none"))
        }
        return value
    }

    func apply(to request: inout ChangeRequest) throws {
        if let cpuCap { request.cpuCapPercent = .some(try Self.number(cpuCap, field: "--cpu-cap", percent: true)) }
        if let cpuWeight { request.cpuWeight = .some(try Self.number(cpuWeight, field: "--cpu-weight")) }
        if let memoryLimit { request.memoryLimitBytes = .some(memoryLimit == "none" ? nil : try parseSize(memoryLimit, field: "--memory-limit")) }
        if let pidsLimit { request.pidsLimit = .some(try Self.number(pidsLimit, field: "--pids-limit")) }
        if let rtPriority { request.rtPriority = .some(try Self.number(rtPriority, field: "--rt-priority")) }
        if let ioLimit {
            do throws(LibraryError) { request.ioLimits = .some(ioLimit == "none" ? nil : try IOLimits.parse(ioLimit) { try? Size.parse($0, field: "--io-limit") }) } catch { throw fail(error) }
        }
        if let pin {
            do throws(LibraryError) { request.vcpuPins = .some(pin == "none" ? nil : try VCPUPin.parse(pin)) } catch { throw fail(error) }
        }
        if let pinEmulator {
            guard pinEmulator == "none" || VCPUPin.parseCPUs(pinEmulator) != nil else {
                throw fail(LibraryError.invalidValue(field: "--pin-emulator", reason: "'\(pinEmulator)' is not a CPU list like 0-1 or 0,2, or none"))
            }
            request.emulatorCPUs = .some(pinEmulator == "none" ? nil : VCPUPin.parseCPUs(pinEmulator))
        }
    }

    func limits() throws -> ResourceLimits {
        var request = ChangeRequest()
        try apply(to: &request)
        return request.applyingResources(to: ResourceLimits())
    }
}
