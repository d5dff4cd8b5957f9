import API
import DiskImage
import JSONQuoting
import Library
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

// What a VM is now, assembled once for both front ends: `vireo list` and `GET /api/vms` show
// the overview, `vireo info` and `GET /api/vms/NAME` the report. Each front end only renders.

/// One VM as a list shows it: what VirtualBox's machine list shows, plus the actions its state
/// allows (the web UI's toolbar is enabled from these).
public struct VMOverview: Encodable, Sendable {
    public var name: String
    public var uuid: String?
    public var state: String
    /// `--no-jail --no-seccomp` when a running VM was started with its isolation off.
    public var isolationOff: String?
    public var engine: String?
    public var osType: String?
    /// The program managing the VM (`containerd` for the shim's sandboxes).
    public var managedBy: String?
    public var cpus: Int?
    public var memoryBytes: UInt64?
    /// Each card's address in card order: the one Vireo leased it, else the first its guest's
    /// agent reports (bridged and tap cards, user-mode networking).
    public var addresses: [String] = []
    public var diskAllocatedBytes: UInt64 = 0
    public var diskVirtualBytes: UInt64 = 0
    public var actions: [String] = []
    /// Why a configuration cannot be read (the VM is listed so it can be deleted).
    public var error: String?

    public init(name: String, state: String) { self.name = name; self.state = state }
}

extension VMOverview {
    /// The row as JSON, the same bytes JSONEncoder writes for it with the CLI's and the API's
    /// settings (snake_case keys, sorted, absent optionals left out; a test holds the two equal).
    /// Written by hand because the encoder's generic walk cost more than reading the VMs did
    /// (bench/README.md); a field added to the row is added here, in key order.
    public var jsonObject: JSONObjectText {
        var object = JSONObjectText()
        object.add("actions", actions)
        object.add("addresses", addresses)
        if let cpus { object.add("cpus", cpus) }
        object.add("disk_allocated_bytes", diskAllocatedBytes)
        object.add("disk_virtual_bytes", diskVirtualBytes)
        if let engine { object.add("engine", engine) }
        if let error { object.add("error", error) }
        if let isolationOff { object.add("isolation_off", isolationOff) }
        if let managedBy { object.add("managed_by", managedBy) }
        if let memoryBytes { object.add("memory_bytes", memoryBytes) }
        object.add("name", name)
        if let osType { object.add("os_type", osType) }
        object.add("state", state)
        if let uuid { object.add("uuid", uuid) }
        return object
    }

    /// A list of rows, as `vireo list --json` (`.pretty`) and `GET /api/vms` (`.compact`) write it.
    public static func json(_ rows: [VMOverview], _ layout: JSONObjectText.Layout) -> String {
        JSONObjectText.array(rows.map(\.jsonObject), layout)
    }
}

/// The actions a VM in `state` takes, as the API names them.
public func allowedActions(_ state: VMState, engine: EngineKind?) -> [String] {
    switch state {
    case .stopped, .crashed: return ["start", "clone", "rename", "snapshot", "set", "delete"]
    case .saved: return ["start", "start-fresh", "snapshot", "delete"]
    case .running:
        return ["stop", "force-stop", "pause", "restart", "reset", "snapshot", "console", "set"]
            + (engine == .qemu ? ["display"] : []) + ["save"]
    case .paused: return ["resume", "stop", "force-stop", "snapshot", "console", "save", "set"] + (engine == .qemu ? ["display"] : [])
    case .starting, .stopping, .shuttingDown, .busy: return state == .shuttingDown ? ["force-stop"] : []
    }
}

/// Everything about one VM: its configuration, files and, when it runs, its process, counters,
/// control groups and confinement. Its JSON is `vireo info --json`.
public struct VMReport: Encodable, Sendable {
    public struct Disk: Encodable, Sendable {
        public var path: String, format: String, readOnly: Bool, serial: String?, virtualBytes: UInt64?, allocatedBytes: UInt64, backingChain: [String]
        /// "7:0" for a block device (its major and minor numbers); nil for a file.
        public var blockDevice: String?
        /// "none" when the disk bypasses the host's page cache; nil for writeback, the default.
        public var cache: String?
        /// An NBD disk's paths to its export; nil for files and devices.
        public var networkPaths: [String]?
    }
    public struct Card: Encodable, Sendable {
        public var attachment: String, mac: String, forwards: [String], hostInterface: String?, address: String?
        /// What the guest's agent reports on this card (IPv4 and global IPv6); nil without an agent.
        public var guestAddresses: [String]?
        /// Queue pairs (virtio-net multiqueue); nil for one.
        public var queuePairs: Int?
    }
    public struct Resources: Encodable, Sendable {
        public var cpuCapPercent: Int?, cpuWeight: Int?, memoryLimitBytes: UInt64?, pidsLimit: Int?
        public var vcpuPins: [VCPUPin]?, emulatorCpus: [Int]?
        public var rtPriority: Int?, ioLimits: IOLimits?
        /// The VM's control groups (controller → directory), and what they measured, while it runs.
        public var cgroups: [String: String]?
        public var cpuNanoseconds: UInt64?, memoryBytes: UInt64?
    }
    /// What confines the running VM's process (docs/isolation.md).
    public struct Isolation: Encodable, Sendable {
        public var uid: UInt32?, gid: UInt32?
        public var namespaces: [String]
        public var seccomp: String
        /// The kernel's view of the process: `Seccomp:` and `NoNewPrivs:` of /proc/PID/status.
        public var kernelSeccompMode: Int?, noNewPrivileges: Bool?
        public var landlock: String
        public var appArmor: String
        public var disabled: [String]
    }

    public var name: String, uuid: String, state: String, crashReason: String?, osType: String, cpus: Int, memoryBytes: UInt64
    public var kernel: String?, initrd: String?, commandLine: String, entropyDevice: Bool, createdAt: Int64
    public var acpi: Bool, onReboot: String, generationId: String?, cpuModel: String
    public var engine: String, firmware: String?, iso: String?, accelerator: String, runningAccelerator: String?, diskBus: String
    public var displaySocket: String?
    public var managedBy: String?
    public var image: String?
    public var cloudInitUser: String?
    public var hostname: String?
    public var directory: String, configPath: String, consoleLog: String, vmmLog: String, controlSocket: String
    public var disks: [Disk]
    public var networks: [Card]
    public var vsockCid: UInt64?
    public var vsockSocket: String?
    /// The saved state `vireo start` resumes from, when the VM is saved.
    public var savedState: String?
    public var snapshots: Int, currentSnapshot: String?
    public var process: VMDescription?
    public var counters: VMCounters?
    public var resources: Resources
    public var isolation: Isolation?
    public var memoryBacking: MemoryBackingOptions
    /// Host directories the guest mounts over virtio-fs.
    public var shares: [SharedFolder]
    /// The TPM 2.0's state directory (swtpm's), when the VM has one.
    public var tpmState: String?
    public var secureBoot: Bool
    /// qemu engine: Hyper-V enlightenments asked for; the network card model QEMU gets.
    public var hyperV: Bool
    public var nicModel: String?
    /// An unattended install not yet finished (docs/unattended.md).
    public var unattended: Unattended?
    /// The guest agent (`vireo exec`, `vireo cp`): where the engine reaches it and, while the VM
    /// runs, whether it answers; nil on an engine without an agent channel.
    public var guestAgent: GuestAgent?

    public struct GuestAgent: Encodable, Sendable {
        public var channel: String
        /// nil while the VM is off.
        public var answers: Bool?
        /// qemu-guest-agent's version, as digits and dots ("unknown" if it sent anything else).
        public var version: String?
    }

    public struct Unattended: Encodable, Sendable {
        public var installer: String
        /// installing (running), finished (the next start boots the system), interrupted (off
        /// before the installer finished; the next start runs it again), not-started.
        public var state: String
        /// The installer's step, as its menu names it, read from the console log.
        public var step: String?
        /// The console's last lines when an install was interrupted.
        public var lastLines: [String]?
    }

    /// What the report was read from, for a front end that shows it in its own shape (the API's
    /// VM details); not part of `vireo info --json`.
    public var definition: VMDefinition
    public var snapshotTree: SnapshotTree
    public var overview: VMOverview

    enum CodingKeys: String, CodingKey {
        case name, uuid, state, crashReason, osType, cpus, memoryBytes, kernel, initrd, commandLine, entropyDevice, createdAt
        case acpi, onReboot, generationId, cpuModel, engine, firmware, iso, accelerator, runningAccelerator, diskBus, displaySocket
        case image, cloudInitUser, hostname, directory, configPath, consoleLog, vmmLog, controlSocket, disks, networks
        case vsockCid, vsockSocket, savedState, snapshots, currentSnapshot, process, counters, resources, isolation, memoryBacking, shares, tpmState, secureBoot, hyperV, nicModel, unattended
        case guestAgent
    }
}

extension VMManager {
    /// What a running guest's agent says its cards' addresses are (by MAC); empty without one.
    func guestAddresses(_ vm: EngineVM, timeoutSeconds: Int) -> [String: [String]] {
        (engine(vm.definition.engine) as? any GuestAgentEngine)?.interfaceAddresses(vm, timeoutSeconds: timeoutSeconds) ?? [:]
    }

    /// The rows of the named VMs, in their order: `vireo list` and `GET /api/vms`. (Reading them on
    /// both cores of the bench machine saved nothing measurable, so they are read in turn.)
    public func overviews(of names: [String], networks: HostNetworks,
                          load: (VMBundle) throws(LibraryError) -> VMDefinition = { bundle throws(LibraryError) in try bundle.load() }) -> [VMOverview] {
        names.map { overview(of: $0, networks: networks, load: load) }
    }

    /// A VM's row in a list. `load` reads its definition (the API passes its cache); a VM whose
    /// definition cannot be read is shown with the reason, so it can be deleted.
    public func overview(of name: String, networks: HostNetworks,
                         load: (VMBundle) throws(LibraryError) -> VMDefinition = { bundle throws(LibraryError) in try bundle.load() }) -> VMOverview {
        let bundle = VMBundle(directory: library.root + "/" + name)
        let status = library.status(of: bundle).state
        var row = VMOverview(name: name, state: status.rawValue)
        if !status.isOff { row.isolationOff = bundle.isolation()?.mark }
        do throws(LibraryError) {
            let definition = try load(bundle)
            let paths = definition.disks.map { (path: bundle.resolve($0.path), format: $0.format) }
            row.uuid = definition.uuid
            row.engine = definition.engine.rawValue
            row.osType = definition.osType
            row.managedBy = definition.managedBy
            row.cpus = definition.cpus
            row.memoryBytes = definition.memoryBytes
            // The agent is asked only for cards Vireo leased nothing (a list is polled).
            let leases = networks.addresses(of: definition)
            let reported = status.isOff || !leases.contains(where: { $0 == nil }) ? [:]
                : guestAddresses(EngineVM(bundle: bundle, definition: definition), timeoutSeconds: 1)
            row.addresses = zip(definition.networks, leases).compactMap { card, leased in
                leased?.description ?? reported[card.mac.lowercased()]?.first
            }
            row.diskAllocatedBytes = paths.reduce(0) { $0 + HostFiles.allocatedBytes($1.path) }
            row.diskVirtualBytes = paths.reduce(0) { $0 + (DiskImages.recordedVirtualSize(path: $1.path, format: $1.format) ?? 0) }
            row.actions = allowedActions(status, engine: definition.engine)
        } catch {
            row.error = error.description
            row.actions = status.isOff ? ["delete"] : []
        }
        return row
    }

    /// Everything about one VM. `withCounters`: ask a running VM's process for its counters
    /// (a round trip to it; the API's details leave it to the statistics route).
    public func report(of name: String, withCounters: Bool = true) throws(LibraryError) -> VMReport {
        let bundle = try library.bundle(named: name)
        let definition = try bundle.load()
        let status = library.status(of: bundle)
        let counters = withCounters && status.description != nil ? try? counters(name) : nil
        let tree = try bundle.loadSnapshots()
        let networks = HostNetworks(library: library)
        // The agent is asked for addresses only if it answered at all: each question is a
        // connection to a socket that serves one client at a time.
        let guestAgent = guestAgentStatus(EngineVM(bundle: bundle, definition: definition), running: !status.state.isOff)
        let reported = guestAgent?.answers == true ? guestAddresses(EngineVM(bundle: bundle, definition: definition), timeoutSeconds: 3) : [:]
        let groups = status.state.isOff ? nil : VMControlGroups.recorded(in: bundle)
        let limits = definition.resources
        return VMReport(
            name: definition.name, uuid: definition.uuid, state: status.state.rawValue, crashReason: status.crashReason, osType: definition.osType,
            cpus: definition.cpus, memoryBytes: definition.memoryBytes,
            kernel: definition.kernel.map(bundle.resolve), initrd: definition.initrd.map(bundle.resolve),
            commandLine: definition.commandLine, entropyDevice: definition.entropyDevice, createdAt: definition.createdAt,
            acpi: definition.acpi, onReboot: definition.onReboot, generationId: definition.generationID,
            cpuModel: definition.cpuModel ?? "host",
            engine: definition.engine.rawValue, firmware: definition.firmware?.rawValue, iso: definition.iso,
            accelerator: definition.accelerator.rawValue, runningAccelerator: status.description?.accelerator,
            diskBus: definition.diskBus.rawValue, displaySocket: definition.engine == .qemu ? bundle.vncPath : nil, managedBy: definition.managedBy,
            image: definition.image, cloudInitUser: definition.cloudInit?.user, hostname: definition.cloudInit?.hostname,
            directory: bundle.directory, configPath: bundle.configPath, consoleLog: bundle.consoleLogPath,
            vmmLog: bundle.vmmLogPath, controlSocket: definition.engine == .qemu ? bundle.qmpPath : bundle.controlPath,
            disks: definition.disks.map { disk in
                let path = bundle.resolve(disk.path)
                if disk.isNetwork {
                    // Not asked of the server here: a listing must not wait on the network.
                    return VMReport.Disk(path: path, format: disk.format.rawValue, readOnly: disk.readOnly, serial: disk.serial, virtualBytes: nil,
                                         allocatedBytes: 0, backingChain: [], networkPaths: path.split(separator: "|").map(String.init))
                }
                var status = stat()
                let device = stat(path, &status) == 0 && (status.st_mode & S_IFMT) == S_IFBLK ? HostMountTable.numbers(of: status.st_rdev) : nil
                let virtualBytes = DiskImages.recordedVirtualSize(path: path, format: disk.format)
                return VMReport.Disk(path: path, format: disk.format.rawValue, readOnly: disk.readOnly, serial: disk.serial,
                                     virtualBytes: virtualBytes, allocatedBytes: device == nil ? HostFiles.allocatedBytes(path) : virtualBytes ?? 0,
                                     backingChain: bundle.chain(of: disk).map(\.path), blockDevice: device, cache: disk.cache?.rawValue)
            },
            networks: zip(definition.networks.indices, networks.addresses(of: definition)).map { index, address in
                let card = definition.networks[index]
                return VMReport.Card(attachment: card.attachment.description, mac: card.mac, forwards: card.forwards.map(\.description),
                                     hostInterface: HostNetworks.hostInterface(of: definition, card: index, libraryRoot: library.root), address: address?.description,
                                     guestAddresses: reported[card.mac.lowercased()], queuePairs: card.queues.flatMap { $0 > 1 ? $0 : nil })
            },
            vsockCid: definition.vsockCID,
            vsockSocket: definition.vsockCID == nil ? nil : bundle.vsockPath,
            savedState: bundle.hasSavedState ? bundle.savedStatePath : nil,
            snapshots: tree.snapshots.count, currentSnapshot: tree.current.flatMap { id in tree.snapshots.first { $0.id == id }?.name },
            process: status.description, counters: counters,
            resources: VMReport.Resources(cpuCapPercent: limits.cpuCapPercent, cpuWeight: limits.cpuWeight, memoryLimitBytes: limits.memoryLimitBytes,
                                          pidsLimit: limits.pidsLimit, vcpuPins: limits.vcpuPins, emulatorCpus: limits.emulatorCPUs,
                                          rtPriority: limits.rtPriority, ioLimits: limits.ioLimits,
                                          cgroups: groups?.directories, cpuNanoseconds: groups?.cpuNanoseconds, memoryBytes: groups?.memoryBytes),
            isolation: Self.isolation(of: bundle, definition: definition, state: status.state),
            memoryBacking: definition.memoryBacking, shares: definition.shares,
            tpmState: definition.tpm ? QEMUTPM.stateDirectory(bundle) : nil, secureBoot: definition.secureBoot,
            hyperV: definition.hyperV, nicModel: definition.engine == .qemu ? definition.qemuNICModel : nil,
            unattended: definition.unattended.map { Self.unattendedReport($0, bundle: bundle, state: status.state) },
            guestAgent: guestAgent,
            definition: definition, snapshotTree: tree,
            overview: overview(of: name, networks: networks, load: { _ throws(LibraryError) in definition }))
    }

    /// The agent's channel and, for a running VM, whether it answers (2 s at most).
    func guestAgentStatus(_ vm: EngineVM, running: Bool) -> VMReport.GuestAgent? {
        guard let agent = engine(vm.definition.engine) as? any GuestAgentEngine else { return nil }
        guard running else { return VMReport.GuestAgent(channel: agent.agentChannel) }
        let version = agent.agentVersion(vm, timeoutSeconds: 2)
        return VMReport.GuestAgent(channel: agent.agentChannel, answers: version != nil, version: version)
    }

    /// How far the install is, from the console log (the installer's syslog streams there).
    static func unattendedReport(_ install: UnattendedInstall, bundle: VMBundle, state: VMState) -> VMReport.Unattended {
        let ran = HostFiles.size(bundle.consoleLogPath) > 0
        let progress = UnattendedProgress.read(consoleLog: bundle.consoleLogPath)
        let phase = progress.finished ? "finished" : !state.isOff ? "installing" : ran ? "interrupted" : "not-started"
        return VMReport.Unattended(installer: install.installer.summary, state: phase, step: progress.step,
                                   lastLines: phase == "interrupted" ? progress.lastLines : nil)
    }

    /// What the VMM reported confines it, and what the kernel says of its process.
    static func isolation(of bundle: VMBundle, definition: VMDefinition, state: VMState) -> VMReport.Isolation? {
        guard !state.isOff, let record = bundle.isolation() else { return nil }
        let processStatus = bundle.recordedPID(uuid: definition.uuid).flatMap { try? HostFiles.readAll("/proc/\($0)/status") }
            .map { String(decoding: $0, as: UTF8.self) }
        func field(_ name: String) -> Int? {
            processStatus?.split(separator: "\n").first { $0.hasPrefix(name + ":") }
                .flatMap { Int($0.dropFirst(name.count + 1).filter { !$0.isWhitespace }) }
        }
        return VMReport.Isolation(uid: record.uid, gid: record.gid, namespaces: record.namespaces, seccomp: record.seccomp,
                                  kernelSeccompMode: field("Seccomp"), noNewPrivileges: field("NoNewPrivs").map { $0 == 1 },
                                  landlock: record.landlock, appArmor: HostSecurity.appArmorState, disabled: record.disabled)
    }
}
