import ArgumentParser
import DiskImage
import Engines
import Library
import MachineSpec
import VMM

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the VMs in the library with their state and size.")

    @Flag(help: "Print JSON.")
    var json = false

    struct Row: Encodable {
        var name: String
        var uuid: String?
        var state: String
        var engine: String?
        var cpus: Int?
        var memoryBytes: UInt64?
        var diskAllocatedBytes: UInt64
        var diskVirtualBytes: UInt64
        /// IPv4 addresses the VM's cards were leased, in card order.
        var addresses: [String] = []
        var error: String?
    }

    func run() throws {
        let library = openLibrary()
        let networks = HostNetworks(library: library)
        let names: [String]
        do throws(LibraryError) { names = try library.names() } catch { throw fail(error) }
        var rows: [Row] = []
        for name in names {
            let bundle = VMBundle(directory: library.root + "/" + name)
            let status = library.status(of: bundle).state
            var state = status.rawValue
            // A VM started with its isolation turned off says so wherever it is listed.
            if !status.isOff, let mark = bundle.isolation()?.mark { state += " (\(mark))" }
            do throws(LibraryError) {
                let definition = try bundle.load()
                let paths = definition.disks.map { (path: bundle.resolve($0.path), format: $0.format) }
                rows.append(Row(name: name, uuid: definition.uuid, state: state, engine: definition.engine.rawValue, cpus: definition.cpus, memoryBytes: definition.memoryBytes,
                                diskAllocatedBytes: paths.reduce(0) { $0 + HostFiles.allocatedBytes($1.path) },
                                diskVirtualBytes: paths.reduce(0) { $0 + (DiskImages.recordedVirtualSize(path: $1.path, format: $1.format) ?? 0) },
                                addresses: networks.addresses(of: definition).compactMap { $0?.description }))
            } catch {
                // A VM whose configuration cannot be read is shown, not hidden: it can be deleted.
                rows.append(Row(name: name, state: state, diskAllocatedBytes: 0, diskVirtualBytes: 0, error: error.description))
            }
        }
        if json { try printJSON(rows); return }
        let table = [["NAME", "STATE", "ENGINE", "CPUS", "MEMORY", "IP", "DISK USED / SIZE"]] + rows.map { row in
            [row.name, row.error == nil ? row.state : "broken", row.engine ?? "-", row.cpus.map(String.init) ?? "-",
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
