import ArgumentParser
@testable import CLI
import Testing

/// Every command names itself. ArgumentParser otherwise derives a name with
/// `String(describing: Self.self)`, a dynamic cast that searches the process's conformance
/// records once per command type at every run: it was 40 % of `vireo list`'s 15 ms.
@Suite struct CommandTreeTests {
    @Test func everyCommandNamesItself() {
        var unnamed: [String] = []
        var seen = 0
        func walk(_ command: any ParsableCommand.Type, path: String) {
            seen += 1
            let configuration = command.configuration
            if configuration.commandName == nil { unnamed.append(path + "/" + "\(command)") }
            let names = configuration.subcommands.compactMap { $0.configuration.commandName }
            #expect(Swift.Set(names).count == names.count, "\(path): two subcommands share a name: \(names)")
            for subcommand in configuration.subcommands {
                walk(subcommand, path: path + "/" + (subcommand.configuration.commandName ?? "?"))
            }
        }
        walk(Vireo.self, path: "vireo")
        #expect(seen > 50, "the walk found only \(seen) commands")
        #expect(unnamed.isEmpty, "commands without a commandName: \(unnamed)")
    }
}
