import ArgumentParser
import MachineSpec
import VMM
import X86Boot

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot a throwaway VM from a Linux kernel and watch its serial console.",
        discussion: """
            The guest's serial console (COM1) is this terminal, in raw mode: everything you type \
            goes to the guest. Press Ctrl-A then x to power the VM off and quit; Ctrl-A Ctrl-A \
            sends a literal Ctrl-A.

            Exit status: 0 when the guest powers off or reboots (a reboot ends the run unless \
            --on-reboot restart) or you quit from the console; 1 when a vCPU triple-faults, KVM reports an internal error or \
            the VMM fails (a one-line reason is printed); 2 for invalid input, refused before \
            anything starts; 128+N when stopped by signal N.

            Flags (the same as vireo-vmm's machine flags and a library VM's settings):

            \(MachineSpec.flagDescriptions.map { "\($0.flag): \($0.meaning)" }.joined(separator: "\n\n"))
            """)

    @Argument(parsing: .allUnrecognized, help: ArgumentHelp("The machine's flags (see the discussion above).", valueName: "flags"))
    var flags: [String] = []

    func run() throws {
        // The machine spec's own flag reader, the one vireo-vmm uses: `vireo run` cannot drift
        // from what the library's VMs take.
        let spec: MachineSpec
        do {
            let (parsed, _) = try MachineSpec.parse(flags)
            spec = parsed
        } catch {
            throw fail(VMMError(error))
        }
        let machine: Machine
        do {
            machine = try Machine.boot(spec)
            // A foreground run is not jailed: its disks are read at once.
            try machine.finishAssembly()
        } catch {
            throw fail(error)
        }
        let exit: MachineExit
        do {
            exit = try machine.run()
        } catch {
            throw fail(error)
        }
        vmmLog(exit.summary)
        if exit.exitCode != 0 { throw ExitCode(exit.exitCode) }
    }
}
