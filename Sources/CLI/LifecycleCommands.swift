import API
import ArgumentParser
import Library
#if canImport(Glibc)
import Glibc
#endif

struct Start: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a VM in the background (its own vireo-vmm process); it keeps running after this returns.",
        discussion: "Console output goes to the VM's console log (`vireo logs`); attach with `vireo console`.")

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Attach to the serial console once it runs (detach with Ctrl-]).")
    var console = false

    func run() throws {
        let library = openLibrary()
        let pid: Int32
        do throws(LibraryError) { pid = try kvmEngine().start(name, library: library) } catch { throw fail(error) }
        if console {
            try attachConsole(name, library: library)
            return
        }
        printLine("Started VM '\(name)' (pid \(pid)). Console: vireo console \(name); log: vireo logs \(name)")
    }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(
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
        do throws(LibraryError) {
            let library = openLibrary()
            try stopVM(name, force: force, timeout: timeout, library: library)
        } catch {
            throw fail(error)
        }
    }
}

/// Stops a VM; returns normally once its process has exited.
func stopVM(_ name: String, force: Bool, timeout: Double, library: VMLibrary) throws(LibraryError) {
    let bundle = try library.bundle(named: name)
    guard guardTimeout(timeout) else { throw .invalidValue(field: "--timeout", reason: "\(timeout) is not a number of seconds above 0") }
    let state = library.status(of: bundle).state
    if state.isOff {
        printLine("VM '\(name)' is already \(state.rawValue)")
        return
    }
    if force {
        _ = try? control(name, "power-off", as: ControlStatus.self, library: library, action: "power off")
        if !waitUntilStopped(bundle, seconds: min(timeout, 10)) {
            // The VMM no longer answers: end its process.
            if let definition = try? bundle.load(), let pid = bundle.recordedPID(uuid: definition.uuid) { kill(pid, SIGKILL) }
            guard waitUntilStopped(bundle, seconds: 10) else {
                throw .engine(name: name, reason: "did not stop after power-off and SIGKILL; its lock \(bundle.lockPath) is still held", exitStatus: 1)
            }
        }
        printLine("VM '\(name)' powered off")
        return
    }
    _ = try control(name, "shutdown", as: ControlStatus.self, library: library, action: "shut down")
    guard waitUntilStopped(bundle, seconds: timeout) else {
        let request = (library.status(of: bundle).description?.acpi ?? true) ? "the ACPI power button" : "Ctrl-Alt-Del"
        throw .engine(name: name, reason: "did not shut down within \(Int(timeout)) s (the guest did not act on \(request)) and is still running; `vireo stop \(name) --force` powers it off", exitStatus: 1)
    }
    printLine("VM '\(name)' shut down")
}

func guardTimeout(_ value: Double) -> Bool { value > 0 && value.isFinite }

struct Restart: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Stop a VM (gracefully, or with --force) and start it again.")

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Power off instead of asking the guest.")
    var force = false

    @Option(help: "Seconds to wait for the guest to shut down.")
    var timeout: Double = 30

    func run() throws {
        let library = openLibrary()
        do throws(LibraryError) {
            try stopVM(name, force: force, timeout: timeout, library: library)
            let pid = try kvmEngine().start(name, library: library)
            printLine("Started VM '\(name)' (pid \(pid))")
        } catch {
            throw fail(error)
        }
    }
}

/// One control request to a running VM, for the commands that are nothing more; says `done` after.
func sendRequest(_ name: String, _ request: String, action: String, done: String) throws {
    do throws(LibraryError) {
        _ = try control(name, request, as: ControlStatus.self, library: openLibrary(), action: action)
    } catch {
        throw fail(error)
    }
    printLine("VM '\(name)' \(done)")
}

struct Pause: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Freeze a running VM: its vCPUs stop between instructions; memory and devices stay as they are.")

    @Argument(help: "VM name.")
    var name: String

    func run() throws { try sendRequest(name, "pause", action: "pause", done: "paused") }
}

struct Resume: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Let a paused VM run again.")

    @Argument(help: "VM name.")
    var name: String

    func run() throws { try sendRequest(name, "resume", action: "resume", done: "resumed") }
}

struct Reset: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Press a running VM's reset button: the machine restarts at once, without asking the guest.",
        discussion: """
            Like VirtualBox's Reset and `virsh reset`: the guest gets no chance to flush its \
            caches. What follows is the VM's reboot policy (`--on-reboot`): restart (the default) \
            boots it again in the same process; exit stops it.
            """)

    @Argument(help: "VM name.")
    var name: String

    func run() throws { try sendRequest(name, "reset", action: "reset", done: "reset") }
}

struct Balloon: ParsableCommand {
    static let configuration = CommandConfiguration(
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
        do throws(LibraryError) {
            _ = try control(name, "balloon \(bytes >> 20)", as: ControlStatus.self, library: openLibrary(), action: "set the balloon of")
        } catch {
            throw fail(error)
        }
        printLine("VM '\(name)': balloon target \(bytes >> 20) MiB")
    }
}
