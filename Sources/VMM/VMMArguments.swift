import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// The command line of `vireo-vmm`, the lean one-VM process. It takes the same flags as
/// `vireo run` but is parsed here, without swift-argument-parser, because that library brings
/// FoundationEssentials, whose loading alone costs more than the whole VMM start-up budget
/// (bench/README.md). `--flag value` and `--flag=value` are both accepted.
public enum VMMArguments {
    public static let usage = """
        usage: vireo-vmm MACHINE-FLAGS|--spec-fd N [--control PATH] [--name NAME --uuid UUID] [--lock-fd N] [--ready-fd N]
                         [--state-file PATH [--restore]] [--snapshot-dir PATH] [--incoming-fd N [--incoming-disks copied|shared]]
                         [--jail uid=N,gid=N[,root=PATH]] [--seccomp on|off|log] [--landlock on|off]
        Boots one VM and runs it until it powers off or reboots. Ctrl-A x quits the stdio console.
        The machine (MachineSpec; the same flags as `vireo run`):
        \(MachineSpec.flagHelp)
          --spec-fd N      the whole machine in MachineSpec's binary form, read from inherited descriptor N
                           (how `vireo start` passes it; no machine flag may be given with it)
        The process around it:
          --control PATH   serve the control socket (docs/control-socket.md) at PATH
          --lock-fd N      an inherited descriptor whose flock marks the VM running; held until exit
          --ready-fd N     write "ready" (or "error: ...") there once the VM runs, then close it
          --state-file P   where the control socket's `save` writes the VM's state (docs/snapshots.md)
          --restore        resume from the state file instead of booting; it is removed once restored
          --snapshot-dir P where the control socket's `snapshot ID` writes a live snapshot's state (P/ID.state)
          --incoming-fd N  take the VM from the live-migration stream on inherited descriptor N instead of booting
          --incoming-disks copied (default): the stream carries the disks; shared: the source hands its disk files over
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
        case run(MachineSpec, ProcessOptions)
        case help
    }

    /// The flags of the process around the machine; the machine's own are MachineSpec's.
    static let processFlags: Set<String> = ["--control", "--name", "--uuid", "--lock-fd", "--ready-fd", "--state-file", "--snapshot-dir",
                                            "--incoming-fd", "--incoming-disks", "--jail", "--seccomp", "--landlock"]

    public static func parse(_ arguments: [String]) throws(VMMError) -> Parsed {
        // Help only where a flag stands, not as a flag's value (`--cmdline --help`).
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            if argument == "--help" || argument == "-h" { return .help }
            index += MachineSpec.valueFlags.contains(argument) || processFlags.contains(argument) ? 2 : 1
        }
        let spec: MachineSpec
        var values: [String: String] = [:]
        do throws(MachineSpecError) {
            if arguments.contains(where: { $0 == "--spec-fd" || $0.hasPrefix("--spec-fd=") }) {
                // The engine's way: the machine whole, from a descriptor; only the process's flags beside it.
                for (name, value) in try MachineSpec.flags(arguments, valueFlags: MachineSpec.valueFlags.union(processFlags).union(["--spec-fd"]),
                                                           switches: MachineSpec.switches.union(["--restore"])) {
                    guard !MachineSpec.valueFlags.contains(name), !MachineSpec.switches.contains(name) else {
                        throw MachineSpecError(argument: name, "a machine flag cannot be given with --spec-fd, which carries the whole machine")
                    }
                    guard values[name] == nil else { throw MachineSpecError(argument: name, "given more than once") }
                    values[name] = value
                }
                spec = try readSpec(values["--spec-fd"] ?? "")
            } else {
                (spec, values) = try MachineSpec.parse(arguments, otherFlags: processFlags, otherSwitches: ["--restore"])
            }
        } catch {
            throw VMMError(error)
        }
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
        return .run(spec, options)
    }

    /// The spec from an inherited descriptor (a sealed memfd or a regular file: read from offset 0
    /// whatever the shared offset is), read whole and closed.
    static func readSpec(_ text: String) throws(MachineSpecError) -> MachineSpec {
        guard let fd = Int32(text), fd > 2, fcntl(fd, F_GETFD) >= 0 else {
            throw MachineSpecError(argument: "--spec-fd", "'\(text)' is not an open file descriptor above 2")
        }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let count = chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(bytes.count)) }
            if count < 0, errno == EINTR { continue }
            guard count >= 0 else { throw MachineSpecError(argument: "--spec-fd", "cannot read descriptor \(fd): \(String(cString: strerror(errno)))") }
            if count == 0 { break }
            bytes += chunk[0..<count]
            guard bytes.count <= MachineSpec.encodedLimit else {
                throw MachineSpecError(argument: "--spec-fd", "more than the \(MachineSpec.encodedLimit) bytes a spec can take")
            }
        }
        return try MachineSpec(decoding: bytes)
    }

    private static func descriptor(_ text: String?, field: String) throws(VMMError) -> Int32? {
        guard let text else { return nil }
        guard let fd = Int32(text), fd > 2, fcntl(fd, F_GETFD) >= 0 else {
            throw .invalidConfiguration(field: field, reason: "'\(text)' is not an open file descriptor above 2")
        }
        return fd
    }
}
