import X86Boot
#if canImport(Glibc)
import Glibc
import MachineSpec
#endif

/// The command line of `vireo-vmm`, the lean one-VM process. It takes the same flags as
/// `vireo run` but is parsed here, without swift-argument-parser, because that library brings
/// FoundationEssentials, whose loading alone costs more than the whole VMM start-up budget
/// (bench/README.md). `--flag value` and `--flag=value` are both accepted.
public enum VMMArguments {
    public static let usage = """
        usage: vireo-vmm --kernel PATH [--initrd PATH] [--cmdline TEXT] [--cpus N] [--cpu MODEL] [--memory SIZE]
                         [--console stdio|none|file:PATH|socket:PATH] [--disk PATH[,readonly][,format=raw|qcow2][,backing=FORMAT:PATH]...[,serial=ID]]... [--net tap:NAME|tap-fd:N|stream-fd:N[,mac=MAC]]... [--vsock PATH[,cid=N]] [--balloon on|deflate-on-oom|stats=S] [--rng]
                         [--acpi on|off] [--on-reboot restart|exit] [--generation-id HEX32]
                         [--memory-backing anon|hugepages[=2M|1G]|memfd[,shared]|file:PATH[,shared]] [--prealloc] [--ksm] [--lock-memory] [--thp on|off] [--numa-node N] [--rt-priority N]
                         [--control PATH] [--name NAME --uuid UUID] [--lock-fd N] [--ready-fd N] [--state-file PATH [--restore]] [--snapshot-dir PATH] [--incoming-fd N [--incoming-disks copied|shared]]
                         [--jail uid=N,gid=N[,root=PATH]] [--seccomp on|off|log] [--landlock on|off]
        Boots one VM and runs it until it powers off or reboots. Ctrl-A x quits the stdio console.
        --cpu MODEL      the CPU the guest sees: host (default) or baseline (x86-64-v2), then ,+FEATURE / ,-FEATURE
        --acpi on|off    describe the machine with ACPI (default) or an MP table and command-line devices
        --on-reboot P    restart: a guest reboot restarts the VM in this process; exit (default): the run ends
        --generation-id  the VM generation ID (32 hex digits) the guest's vmgenid device shows; random if absent
        --control PATH   serve the control socket (docs/control-socket.md) at PATH
        --lock-fd N      an inherited descriptor whose flock marks the VM running; held until exit
        --ready-fd N     write "ready" (or "error: ...") there once the VM runs, then close it
        --state-file P   where the control socket's `save` writes the VM's state (docs/snapshots.md)
        --restore        resume from the state file instead of booting; it is removed once restored
        --snapshot-dir P where the control socket's `snapshot ID` writes a live snapshot's state (P/ID.state)
        --memory-backing anon (default), hugepages (2M, or =1G) from the kernel's pool, memfd or file:PATH (zeroed at start; ,shared maps it MAP_SHARED); --prealloc faults RAM in at start; --ksm offers it to KSM; --lock-memory locks it in RAM (never swapped)
        --thp on|off     offer anonymous guest RAM to transparent huge pages (default on; off without anon backing or with --ksm)
        --numa-node N    bind guest RAM to host NUMA node N (mbind)
        --rt-priority N  vCPU threads run SCHED_FIFO at priority N (1-99); all memory is locked (mlockall)
        --incoming-fd N  take the VM from the live-migration stream on inherited descriptor N instead of booting
        --incoming-disks copied (default): the stream carries the disks; shared: the source hands its disk files over
        --disk ...       format= is what the disk is (never read from its content; .qcow2/.raw names say it too);
                         backing=FORMAT:PATH, once per layer nearest first, is the only chain opened (backing=header follows the image's own header)
        --jail SPEC      once the machine is built: own network namespace, a root holding only the VM's files, uid/gid N (docs/isolation.md)
        --seccomp MODE   on: a system call outside each thread's allow list ends the VMM; log: allowed and logged by the kernel; off (default)
        --landlock on|off  with --jail, also restrict file access with Landlock where the kernel has it (default on)
        """

    /// How the process around the machine behaves; `vireo start` sets these.
    public struct ProcessOptions: Sendable {
        public var controlPath: String?
        public var identity: VMIdentity?
        public var lockDescriptor: Int32?
        public var readyDescriptor: Int32?
        public var stateFile: String?
        public var restore = false
        public var snapshotDirectory: String?
        /// A connected migration stream (docs/migration.md) the VM arrives on.
        public var incomingDescriptor: Int32?
        public var incomingDisks: Machine.ArrivalMode = .copiedDisks
        public var jail: JailConfiguration?
        public var seccomp: SeccompMode = .off
        public var landlock = true
    }

    public enum Parsed {
        case run(VMConfiguration, ProcessOptions)
        case help
    }

    public static func parse(_ arguments: [String]) throws(VMMError) -> Parsed {
        var values: [String: String] = [:]
        var disks: [DiskConfiguration] = []
        var networks: [NetworkConfiguration] = []
        var index = 0
        let known: Set<String> = ["--kernel", "--initrd", "--cmdline", "--cpus", "--cpu", "--memory", "--console", "--disk", "--net", "--vsock", "--balloon",
                                  "--acpi", "--on-reboot", "--generation-id", "--control", "--name", "--uuid", "--lock-fd", "--ready-fd", "--state-file", "--snapshot-dir", "--incoming-fd", "--incoming-disks", "--memory-backing", "--jail", "--seccomp", "--landlock", "--rt-priority", "--thp", "--numa-node"]
        while index < arguments.count {
            let argument = arguments[index]
            if argument == "--help" || argument == "-h" { return .help }
            if argument == "--rng" || argument == "--restore" || argument == "--prealloc" || argument == "--ksm" || argument == "--lock-memory" {
                guard values[argument] == nil else { throw .invalidConfiguration(field: argument, reason: "given more than once") }
                values[argument] = ""
                index += 1
                continue
            }
            var name = argument
            var value: String?
            if let equals = argument.firstIndex(of: "=") {
                name = String(argument[..<equals])
                value = String(argument[argument.index(after: equals)...])
            }
            guard known.contains(name) else {
                throw .invalidConfiguration(field: argument, reason: "unknown argument; expected one of \(known.sorted().joined(separator: ", "))")
            }
            if value == nil {
                index += 1
                guard index < arguments.count else { throw .invalidConfiguration(field: name, reason: "missing value") }
                value = arguments[index]
            }
            if name == "--net", let value {
                networks.append(try NetworkConfiguration(parsing: value))
                index += 1
                continue
            }
            if name == "--disk", let value {
                disks.append(try DiskConfiguration(parsing: value))
                index += 1
                continue
            }
            guard values[name] == nil else { throw .invalidConfiguration(field: name, reason: "given more than once") }
            values[name] = value
            index += 1
        }
        guard let kernel = values["--kernel"] else {
            throw .invalidConfiguration(field: "--kernel", reason: "missing; a kernel image is required")
        }
        var configuration = VMConfiguration(kernelPath: kernel, initrdPath: values["--initrd"])
        configuration.disks = disks
        configuration.networks = networks
        if let vsock = values["--vsock"] { configuration.vsock = try VsockConfiguration(parsing: vsock) }
        if let balloon = values["--balloon"] { configuration.balloon = try BalloonConfiguration(parsing: balloon) }
        configuration.entropyDevice = values["--rng"] != nil
        configuration.memoryBacking.preallocate = values["--prealloc"] != nil
        configuration.memoryBacking.mergeable = values["--ksm"] != nil
        configuration.memoryBacking.locked = values["--lock-memory"] != nil
        if let backing = values["--memory-backing"] {
            switch backing {
            case "anon": break
            case "hugepages", "hugepages=2M": configuration.memoryBacking.hugePageSize = 2 << 20
            case "hugepages=1G": configuration.memoryBacking.hugePageSize = 1 << 30
            default:
                var words = backing.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
                let shared = words.count == 2 && words[1] == "shared"
                if shared { words.removeLast() }
                if words.count == 1, words[0] == "memfd" {
                    configuration.memoryBacking.file = .memfd
                } else if words.count == 1, words[0].hasPrefix("file:/") {
                    configuration.memoryBacking.file = .path(String(words[0].dropFirst(5)))
                } else {
                    throw .invalidConfiguration(field: "--memory-backing", reason: "'\(backing)' is not anon, hugepages[=2M|1G], memfd[,shared] or file:PATH[,shared] (PATH absolute)")
                }
                configuration.memoryBacking.shared = shared
            }
        }
        if let node = values["--numa-node"] {
            guard let value = Int32(node), (0..<1024).contains(value) else {
                throw .invalidConfiguration(field: "--numa-node", reason: "'\(node)' is not a NUMA node number")
            }
            configuration.memoryBacking.numaNode = value
        }
        if let thp = values["--thp"] {
            guard thp == "on" || thp == "off" else { throw .invalidConfiguration(field: "--thp", reason: "'\(thp)' is not on or off") }
            configuration.memoryBacking.transparentHugePages = thp == "on"
        }
        if let priority = values["--rt-priority"] {
            guard let value = Int32(priority) else {
                throw .invalidConfiguration(field: "--rt-priority", reason: "'\(priority)' is not a whole number")
            }
            do { try MachineRules.realTimePriority(Int(value)) } catch { throw VMMError(error) }
            configuration.realTimePriority = value
        }
        if let acpi = values["--acpi"] { configuration.acpi = try parseACPISwitch(acpi) }
        if let policy = values["--on-reboot"] { configuration.onReboot = try RebootPolicy(parsing: policy) }
        if let identifier = values["--generation-id"] { configuration.generationID = try parseGenerationID(identifier) }
        if let commandLine = values["--cmdline"] { configuration.commandLine = commandLine }
        if let cpus = values["--cpus"] {
            guard let count = Int(cpus) else {
                throw .invalidConfiguration(field: "--cpus", reason: "'\(cpus)' is not a whole number")
            }
            configuration.cpuCount = count
        }
        if let memory = values["--memory"] { configuration.memorySize = try Size.parse(memory, field: "--memory") }
        if let model = values["--cpu"] {
            do throws(CPUModel.ParseError) {
                configuration.cpuModel = try CPUModel(parsing: model)
            } catch {
                throw .invalidConfiguration(field: "--cpu", reason: error.description)
            }
        }
        if let console = values["--console"] { configuration.console = try ConsoleConfiguration(parsing: console) }
        var options = ProcessOptions()
        options.controlPath = values["--control"]
        if let name = values["--name"] {
            guard let uuid = values["--uuid"] else { throw .invalidConfiguration(field: "--uuid", reason: "missing; --name needs --uuid") }
            options.identity = VMIdentity(name: name, uuid: uuid)
        }
        options.lockDescriptor = try descriptor(values["--lock-fd"], field: "--lock-fd")
        options.readyDescriptor = try descriptor(values["--ready-fd"], field: "--ready-fd")
        options.stateFile = values["--state-file"]
        options.snapshotDirectory = values["--snapshot-dir"]
        options.restore = values["--restore"] != nil
        options.incomingDescriptor = try descriptor(values["--incoming-fd"], field: "--incoming-fd")
        if let mode = values["--incoming-disks"] {
            guard let parsed = Machine.ArrivalMode(rawValue: mode) else {
                throw .invalidConfiguration(field: "--incoming-disks", reason: "'\(mode)' is not copied or shared")
            }
            guard options.incomingDescriptor != nil else { throw .invalidConfiguration(field: "--incoming-disks", reason: "needs --incoming-fd") }
            options.incomingDisks = parsed
        }
        if let jail = values["--jail"] { options.jail = try JailConfiguration(parsing: jail) }
        if let mode = values["--seccomp"] {
            guard let parsed = SeccompMode(rawValue: mode) else { throw .invalidConfiguration(field: "--seccomp", reason: "'\(mode)' is not on, off or log") }
            options.seccomp = parsed
        }
        if let landlock = values["--landlock"] {
            guard landlock == "on" || landlock == "off" else { throw .invalidConfiguration(field: "--landlock", reason: "'\(landlock)' is not on or off") }
            options.landlock = landlock == "on"
        }
        if options.restore && options.incomingDescriptor != nil {
            throw .invalidConfiguration(field: "--incoming-fd", reason: "cannot be combined with --restore: the VM comes from one or the other")
        }
        if options.restore && options.stateFile == nil {
            throw .invalidConfiguration(field: "--restore", reason: "needs --state-file, the state to restore")
        }
        return .run(configuration, options)
    }

    private static func descriptor(_ text: String?, field: String) throws(VMMError) -> Int32? {
        guard let text else { return nil }
        guard let fd = Int32(text), fd > 2, fcntl(fd, F_GETFD) >= 0 else {
            throw .invalidConfiguration(field: field, reason: "'\(text)' is not an open file descriptor above 2")
        }
        return fd
    }
}
