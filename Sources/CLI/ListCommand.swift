import ArgumentParser
import DiskImage
import Engines
import Library
import MachineSpec
import VMM

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the VMs in the library with their state and size.")

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let manager = openManager()
        let networks = HostNetworks(library: manager.library)
        let names: [String]
        do throws(LibraryError) { names = try manager.library.names() } catch { throw fail(error) }
        let rows = manager.overviews(of: names, networks: networks)
        // The same bytes printJSON would write (VMOverview.jsonObject), without the encoder's cost.
        if json { printLine(VMOverview.json(rows, .pretty)); return }
        let table = [["NAME", "STATE", "ENGINE", "CPUS", "MEMORY", "IP", "DISK USED / SIZE"]] + rows.map { row in
            // A VM started with its isolation turned off says so wherever it is listed.
            [row.name, row.error != nil ? "broken" : row.state + (row.isolationOff.map { " (\($0))" } ?? "") + (row.managedBy.map { " [\($0)]" } ?? ""), row.engine ?? "-", row.cpus.map(String.init) ?? "-",
             row.memoryBytes.map(Size.describe) ?? "-", row.addresses.isEmpty ? "-" : row.addresses.joined(separator: ","),
             row.error == nil ? "\(Size.describe(row.diskAllocatedBytes)) / \(Size.describe(row.diskVirtualBytes))" : row.error ?? ""]
        }
        printTable(table)
    }
}

func printTable(_ rows: [[String]]) {
    guard let columns = rows.map(\.count).max() else { return }
    let widths = (0..<columns).map { column in rows.map { column < $0.count ? $0[column].count : 0 }.max() ?? 0 }
    for row in rows {
        var line = ""
        for (column, cell) in row.enumerated() {
            line += column == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[column] - cell.count + 2)
        }
        printLine(line)
    }
}

struct OSTypes: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ostypes", abstract: "List the OS type presets `vireo create --ostype` accepts.")

    @Flag(help: "Print JSON.")
    var json = false

    struct Row: Encodable {
        var identifier: String, description: String, cpus: Int, memoryBytes: UInt64, diskBytes: UInt64, commandLine: String
        var firmware: String, installMemoryBytes: UInt64, diskBus: String
    }

    func run() throws {
        let rows = OSType.all.map { Row(identifier: $0.identifier, description: $0.description, cpus: $0.cpus,
                                         memoryBytes: $0.memoryBytes, diskBytes: $0.diskBytes, commandLine: $0.commandLine,
                                         firmware: $0.firmware.rawValue, installMemoryBytes: $0.installMemoryBytes, diskBus: $0.diskBus.rawValue) }
        if json { try printJSON(rows); return }
        printTable([["ID", "CPUS", "MEMORY", "DISK", "INSTALLER (qemu)", "COMMAND LINE", "DESCRIPTION"]] + rows.map {
            [$0.identifier, String($0.cpus), Size.describe($0.memoryBytes), Size.describe($0.diskBytes),
             "\($0.firmware), \(Size.describe($0.installMemoryBytes)), \($0.diskBus)", $0.commandLine, $0.description]
        })
    }
}
