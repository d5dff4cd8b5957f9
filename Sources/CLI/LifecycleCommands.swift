import API
import ArgumentParser
import Engines
import Library
#if canImport(Glibc)
import Glibc
#endif

struct Start: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "start",
        abstract: "Start a VM in the background (its own vireo-vmm process); it keeps running after this returns.",
        discussion: "Console output goes to the VM's console log (`vireo logs`); attach with `vireo console`.")

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Attach to the serial console once it runs (detach with Ctrl-]).")
    var console = false

    @Flag(help: "Throw away the VM's saved state (`vireo save`) and boot it afresh, as after a power cut.")
    var discardState = false

    @Flag(help: "Debugging: run the VMM without its jail (namespaces, per-VM uid, Landlock). `vireo list` marks the VM.")
    var noJail = false

    @Flag(help: "Debugging: run the VMM without its seccomp filters. `vireo list` marks the VM.")
    var noSeccomp = false

    func run() throws {
        let manager = openManager()
        let started: StartedVM
        do throws(LibraryError) {
            started = try manager.start(name, discardState: discardState, isolation: IsolationRequest(jail: !noJail, seccomp: !noSeccomp))
        } catch { throw fail(error) }
        for warning in started.warnings { printNote("warning: \(warning)") }
        if console {
            try attachConsole(name, manager: manager)
            return
        }
        printLine("Started VM '\(name)' (pid \(started.pid)). Console: vireo console \(name); log: vireo logs \(name)")
    }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop",
        abstract: "Shut a VM down: press its ACPI power button and wait, or power it off with --force.",
        discussion: """
            Without --force the guest decides, as with VirtualBox's "ACPI Shutdown" or `virsh \
            shutdown`: a Linux guest with acpid or systemd-logind powers off. VMs created with \
            --acpi off get Ctrl-Alt-Del instead (systemd's ctrl-alt-del.target). A guest that \
            ignores the request keeps running and this command fails after --timeout, leaving it \
            running.
            """)

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Power off at once, like pulling the plug. The guest gets no chance to flush its caches.")
    var force = false

    @Option(help: "Seconds to wait for the guest to shut down.")
    var timeout: Double = 30

    func run() throws {
        do throws(LibraryError) { try stopVM(name, force: force, timeout: timeout, manager: openManager()) } catch { throw fail(error) }
    }
}

/// Stops a VM and says how it went.
func stopVM(_ name: String, force: Bool, timeout: Double, manager: VMManager) throws(LibraryError) {
    let stopped = try manager.stop(name, force: force, timeout: timeout)
    switch stopped.outcome {
    case let .alreadyOff(state): printLine("VM '\(name)' is already \(state.rawValue)")
    case .poweredOff: printLine("VM '\(name)' powered off")
    case .shutDown: printLine("VM '\(name)' shut down")
    case .shutDownByAgent: printLine("VM '\(name)' shut down (through its guest agent: it did not act on the power button)")
    }
    for warning in stopped.warnings { printNote("warning: \(warning)") }
}

struct Restart: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "restart", abstract: "Stop a VM (gracefully, or with --force) and start it again.")

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Power off instead of asking the guest.")
    var force = false

    @Option(help: "Seconds to wait for the guest to shut down.")
    var timeout: Double = 30

    func run() throws {
        let manager = openManager()
        do throws(LibraryError) {
            try stopVM(name, force: force, timeout: timeout, manager: manager)
            let started = try manager.start(name)
            for warning in started.warnings { printNote("warning: \(warning)") }
            printLine("Started VM '\(name)' (pid \(started.pid))")
        } catch {
            throw fail(error)
        }
    }
}

/// One verb on a running VM that returns nothing; says `done` after.
func perform(_ name: String, done: String, _ verb: (VMManager) throws(LibraryError) -> Void) throws {
    do throws(LibraryError) { try verb(openManager()) } catch { throw fail(error) }
    printLine("VM '\(name)' \(done)")
}

struct Save: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "save",
        abstract: "Save a running VM's state and memory to its directory and stop it; `vireo start` resumes it where it was.",
        discussion: """
            Like VirtualBox's "Save the machine state" and `virsh managedsave`. The VM shows as             "saved" until it is started again (resumed) or started with --discard-state (booted             afresh). Its settings cannot change while it is saved. The guest's clock is set ahead             by the time it spent saved; its vsock connections are reset and its network cards             reattach to their host side. kvm engine only, so far.
            """)

    @Argument(help: "VM name.")
    var name: String

    func run() throws {
        let manager = openManager()
        let warnings: [String]
        do throws(LibraryError) { warnings = try manager.save(name) } catch { throw fail(error) }
        for warning in warnings { printNote("warning: \(warning)") }
        printLine("Saved VM '\(name)'. Resume it with: vireo start \(name)")
    }
}

struct Pause: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pause",
        abstract: "Freeze a running VM: its vCPUs stop between instructions; memory and devices stay as they are.")

    @Argument(help: "VM name.")
    var name: String

    func run() throws { try perform(name, done: "paused") { (manager) throws(LibraryError) in try manager.pause(name) } }
}

struct Resume: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "resume", abstract: "Let a paused VM run again.")

    @Argument(help: "VM name.")
    var name: String

    func run() throws { try perform(name, done: "resumed") { (manager) throws(LibraryError) in try manager.resume(name) } }
}

struct Reset: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reset",
        abstract: "Press a running VM's reset button: the machine restarts at once, without asking the guest.",
        discussion: """
            Like VirtualBox's Reset and `virsh reset`: the guest gets no chance to flush its \
            caches. What follows is the VM's reboot policy (`--on-reboot`): restart (the default) \
            boots it again in the same process; exit stops it.
            """)

    @Argument(help: "VM name.")
    var name: String

    func run() throws { try perform(name, done: "reset") { (manager) throws(LibraryError) in try manager.reset(name) } }
}

struct Balloon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "balloon",
        abstract: "Take memory back from a running guest: set its balloon to SIZE (0 gives it all back).",
        discussion: """
            The guest's balloon driver hands over that much of its RAM, which the VMM returns to \
            the host; the guest can use it again when the balloon shrinks (or, with \
            deflate-on-oom, when it runs short). `vireo info` shows the balloon's size and the \
            guest's memory statistics.
            """)

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: "Balloon size: K, M or G (a bare number is MiB); at most the VM's memory.")
    var size: String

    func run() throws {
        let bytes = try parseSize(size, field: "SIZE", allowZero: true)
        do throws(LibraryError) { try openManager().setBalloon(name, bytes: bytes) } catch { throw fail(error) }
        printLine("VM '\(name)': balloon target \(bytes >> 20) MiB")
    }
}
