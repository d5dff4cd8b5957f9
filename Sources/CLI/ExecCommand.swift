import ArgumentParser
import Engines
import Library
#if canImport(Glibc)
import Glibc
#endif

struct Exec: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command in a running VM's guest through its guest agent, without SSH or a network; its output and exit status come back.",
        discussion: """
            The qemu engine reaches qemu-guest-agent on a virtio-serial port (`vireo image build` images \
            have it; elsewhere install Debian's qemu-guest-agent). No shell runs unless you name one: \
            `vireo exec web -- /bin/sh -c 'echo $HOSTNAME'`. See docs/guest-agent.md.
            """)

    @Argument(help: "VM name.")
    var name: String

    @Option(help: "Seconds to wait for the command to end (it is left running after).")
    var timeout = 300

    @Argument(parsing: .postTerminator, help: "The program (an absolute path or one the guest's PATH finds) and its arguments, after --.")
    var command: [String] = []

    func run() throws {
        let result: GuestExecResult
        do throws(LibraryError) {
            guard !command.isEmpty else { throw LibraryError.invalidValue(field: "COMMAND", reason: "missing; give it after --: vireo exec \(name) -- /bin/uname -a") }
            result = try openManager().exec(name, command: command, timeoutSeconds: timeout)
        } catch { throw fail(error) }
        for (stream, bytes) in [(STDOUT_FILENO, result.stdout), (STDERR_FILENO, result.stderr)] where !bytes.isEmpty {
            _ = bytes.withUnsafeBytes { write(stream, $0.baseAddress, $0.count) }
        }
        if result.truncated { printNote("the guest agent cut the output at 16 MiB") }
        if let signal = result.signal { printNote("the command ended by signal \(signal)") }
        if result.exitCode != 0 { throw ExitCode(result.exitCode) }
    }
}
