import ArgumentParser
import Library
import MachineSpec

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a stopped VM as an OVA appliance (OVF 1.0, streamOptimized VMDK disks, a SHA-256 manifest) for VirtualBox, VMware or another Vireo.",
        discussion: "See docs/appliances.md.")

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: "The .ova file to write (never over an existing file).")
    var file: String

    @Option(help: ArgumentHelp("sha256 (the default) or none.", valueName: "algorithm"))
    var manifest = "sha256"

    func run() throws {
        let members: [String]
        do throws(LibraryError) {
            guard ["sha256", "none"].contains(manifest) else {
                throw LibraryError.invalidValue(field: "manifest", reason: "'\(manifest)' is not one of sha256, none")
            }
            members = try Appliances(library: openLibrary()).export(name, to: HostFiles.absolute(file), manifest: manifest == "sha256") { printNote($0) }
        } catch { throw fail(error) }
        printLine("Exported VM '\(name)' to \(file): \(members.joined(separator: ", "))")
    }
}

struct Import: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Make a VM from an OVA or OVF appliance (OVF 1.0 or 2.0, as VirtualBox and VMware write them); its disks become qcow2.",
        discussion: "Hardware Vireo lacks is listed as warnings, never dropped silently. See docs/appliances.md.")

    @Argument(help: "The .ova file, or an .ovf with its files beside it.")
    var file: String

    @Option(help: "Name for the VM (default: the appliance's).")
    var name: String?

    @Flag(help: "Show what would be made; make nothing.")
    var dryRun = false

    @Flag(help: "Print the plan as JSON.")
    var json = false

    func run() throws {
        let appliances = Appliances(library: openLibrary())
        let plan: AppliancePlan
        do throws(LibraryError) {
            if dryRun {
                plan = try appliances.plan(file, name: name)
            } else {
                plan = try appliances.importAppliance(file, name: name) { printNote($0) }.plan
            }
        } catch { throw fail(error) }
        if json { try printJSON(plan); return }
        var rows = [["VM:", plan.name], ["CPUs:", String(plan.cpus)], ["Memory:", Size.describe(plan.memoryBytes)]]
        for (index, disk) in plan.disks.enumerated() {
            rows.append(["Disk \(index):", "\(disk.file) (\(disk.format)" + (disk.capacityBytes.map { ", \(Size.describe($0))" } ?? "") + ") → disk\(index).qcow2"])
        }
        rows.append(["Cards:", plan.nics == 0 ? "none" : "\(plan.nics) on the nat network"])
        rows.append(["Boots:", plan.kernel.map { "its kernel \($0) (kvm engine)" } ?? "\(plan.firmware?.rawValue ?? "bios") firmware (qemu engine)"])
        for warning in plan.warnings { rows.append(["Warning:", warning]) }
        printTable(rows)
        printLine(dryRun ? "Nothing was made (--dry-run)." : "Imported VM '\(plan.name)'. Start it with: vireo start \(plan.name)")
    }
}
