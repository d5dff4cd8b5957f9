import ArgumentParser
import VMM
#if canImport(Glibc)
import Glibc
#endif

public struct Vireo: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "vireo",
        abstract: "A hosted hypervisor for Linux, on KVM.",
        subcommands: [Create.self, ImageCommand.self, SnapshotCommand.self, SSH.self, List.self, Info.self, Start.self, Stop.self, Restart.self, Save.self, Migrate.self, Receive.self, Pause.self, Resume.self, Reset.self, Balloon.self,
                      ConsoleCommand.self, Logs.self, Display.self, Screenshot.self, SendKeys.self, Eject.self, UnattendedCommand.self, Set.self, NetworkCommand.self, PoolCommand.self, ShareCommand.self, NICCommand.self, ForwardCommand.self, Rename.self, Clone.self, Delete.self, Exec.self, Copy.self, Export.self, Import.self, Disk.self, OSTypes.self, Run.self, Serve.self])

    public init() {}
}

/// One "vireo: error: ..." line on stderr.
func printError(_ error: some Error) { printError(text: "\(error)") }

func printError(text: String) {
    var bytes = Array("vireo: error: \(text)\n".utf8)
    _ = bytes.withUnsafeMutableBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
}

/// Reports a failure on stderr and chooses the exit status: 2 for input the user can fix,
/// 1 for a host or VMM failure.
func fail(_ error: VMMError) -> ExitCode {
    printError(error)
    switch error {
    case .invalidConfiguration, .boot, .savedState, .migration, .migrationOutcomeUnknown: return ExitCode(2)
    case .kvm, .memory, .bus, .host: return ExitCode(1)
    }
}
