import ArgumentParser
import VMM
import X86Boot
import MachineSpec

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Boot a throwaway VM from a Linux kernel and watch its serial console.",
        discussion: """
            The guest's serial console (COM1) is this terminal, in raw mode: everything you type \
            goes to the guest. Press Ctrl-A then x to power the VM off and quit; Ctrl-A Ctrl-A \
            sends a literal Ctrl-A.

            Exit status: 0 when the guest powers off or reboots (a reboot ends the run unless \
            --on-reboot restart) or you quit from the console; 1 when a vCPU triple-faults, KVM reports an internal error or \
            the VMM fails (a one-line reason is printed); 2 for invalid input, refused before \
            anything starts; 128+N when stopped by signal N.
            """)

    @Option(help: "Kernel to boot: an ELF vmlinux (64-bit or PVH entry) or a bzImage.")
    var kernel: String

    @Option(help: "Initial RAM disk, loaded as high in guest RAM as the kernel allows.")
    var initrd: String?

    @Option(help: "Kernel command line.")
    var cmdline: String = "console=ttyS0"

    @Option(help: "Number of vCPUs.")
    var cpus: Int = 1

    @Option(help: "Guest RAM: a number with K, M, G or T (binary units); a bare number is MiB.")
    var memory: String = "512M"

    @Option(help: ArgumentHelp("The CPU the guest sees: \(CPUModel.syntax).", valueName: "model"))
    var cpu: String = "host"

    @Option(help: "Serial console: stdio, none, file:PATH (output only) or socket:PATH (a Unix socket to connect to).")
    var console: String = "stdio"

    @Option(help: ArgumentHelp("A virtio-blk disk: PATH[,readonly][,format=raw|qcow2][,backing=FORMAT:PATH|header][,serial=ID][,bps=N[,bps-burst=N]][,iops=N[,iops-burst=N]]. The format is never read from the disk's content: give format= unless the name ends in .qcow2 or .raw. A qcow2 overlay rests only on the layers backing= names (backing=header: what its header names). Repeat for more disks.",
                               valueName: "disk"))
    var disk: [String] = []

    @Option(help: ArgumentHelp("A virtio-net card on a host tap device: tap:NAME[,mac=XX:XX:XX:XX:XX:XX][,bps=N[,bps-burst=N]][,pps=N[,pps-burst=N]]. Repeat for more cards.",
                               valueName: "net"))
    var net: [String] = []

    @Option(help: ArgumentHelp("A virtio-vsock device: PATH[,cid=N] (default cid 3). The host reaches guest port P by connecting to PATH and sending \"CONNECT P\\n\"; the guest reaches host port P at PATH_P.", valueName: "vsock"))
    var vsock: String?

    @Option(help: ArgumentHelp("A virtio-balloon device: on, deflate-on-oom and/or stats=SECONDS, comma-separated.", valueName: "options"))
    var balloon: String?

    @Flag(help: "Attach a virtio-rng device fed from the host's /dev/urandom.")
    var rng = false

    @Option(help: ArgumentHelp("on: describe the machine with ACPI tables (CPUs, devices, power button, reset); off: an MP table and virtio_mmio.device= on the command line, for kernels built without ACPI.", valueName: "on|off"))
    var acpi: String = "on"

    @Option(name: .customLong("on-reboot"), help: ArgumentHelp("What a guest's reboot does: exit ends the run (status 0); restart boots the VM again in this process.", valueName: "restart|exit"))
    var onReboot: String = "exit"

    func run() throws {
        let cpuModel: CPUModel
        do throws(CPUModel.ParseError) {
            cpuModel = try CPUModel(parsing: cpu)
        } catch {
            throw fail(VMMError.invalidConfiguration(field: "--cpu", reason: error.description))
        }
        let machine: Machine
        do {
            var configuration = VMConfiguration(
                kernelPath: kernel, initrdPath: initrd, commandLine: cmdline, cpuCount: cpus,
                memorySize: try Size.parse(memory, field: "--memory"),
                console: try ConsoleConfiguration(parsing: console))
            for text in disk { configuration.disks.append(try DiskConfiguration(parsing: text)) }
            for text in net { configuration.networks.append(try NetworkConfiguration(parsing: text)) }
            if let vsock { configuration.vsock = try VsockConfiguration(parsing: vsock) }
            if let balloon { configuration.balloon = try BalloonConfiguration(parsing: balloon) }
            configuration.entropyDevice = rng
            configuration.cpuModel = cpuModel
            configuration.acpi = try parseACPISwitch(acpi)
            configuration.onReboot = try RebootPolicy(parsing: onReboot)
            machine = try Machine(configuration: configuration)
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
