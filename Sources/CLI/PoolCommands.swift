import ArgumentParser
import Library
import MachineSpec

struct PoolCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool",
        abstract: "Storage pools: a directory, a block device, an NBD server or an iSCSI target, named once and used by name.",
        discussion: """
            Disks are then made with `vireo disk create --pool NAME VOLUME --size S` (a thin qcow2 \
            in a dir pool), `vireo create VM --disk SIZE --pool NAME`, or attached with `vireo disk \
            attach VM VOLUME --pool NAME` (a file, the device, an export or a LUN number). A --shared \
            pool is one other hosts see at the same place: a VM whose disks lie in it migrates \
            without --copy-disks to a library with the same shared pool. See docs/storage-pools.md.
            """,
        subcommands: [PoolCreate.self, PoolList.self, PoolInfo.self, PoolDelete.self])
}

struct PoolCreate: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "create", abstract: "Define a pool (its directory, device or server must exist and answer).")

    @Argument(help: ArgumentHelp("Pool name (\(NetworkName.rule)).", valueName: "name"))
    var name: String

    @Option(help: ArgumentHelp("dir, block, nbd or iscsi.", valueName: "type"))
    var type: String

    @Argument(help: ArgumentHelp("dir: a directory; block: a device; nbd: nbd://HOST[:PORT] or nbd+unix:///?socket=PATH (nbds:// for TLS); iscsi: the portal HOST[:PORT].", valueName: "source"))
    var source: String

    @Argument(help: ArgumentHelp("iscsi: the target's IQN.", valueName: "target"))
    var target: String?

    @Option(name: .customLong("chap"), help: ArgumentHelp("iscsi: a file holding USER:SECRET, readable by its owner only.", valueName: "file"))
    var chapFile: String?

    @Flag(help: "Other hosts see this pool at the same place (migrations may bring disks that lie in it).")
    var shared = false

    @Flag(help: "Print the new pool as JSON.")
    var json = false

    func run() throws {
        let pool: PoolDefinition
        do throws(LibraryError) {
            guard let kind = PoolDefinition.Kind(rawValue: type) else {
                throw LibraryError.invalidValue(field: "type", reason: "'\(type)' is not one of \(PoolDefinition.Kind.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            pool = try StoragePools(library: openLibrary()).create(.init(name: name, type: kind, source: source, target: target, chapFile: chapFile, shared: shared))
        } catch { throw fail(error) }
        if json { try printJSON(pool); return }
        printLine("Created \(pool.type.rawValue) pool '\(pool.name)' on \(pool.source)" + (pool.target.map { " target \($0)" } ?? "") + (pool.shared ? ", shared" : ""))
    }
}

struct PoolList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the library's pools.")

    @Flag(help: "Machine-readable output.")
    var json = false

    func run() throws {
        let pools: [PoolDefinition]
        do throws(LibraryError) { pools = try StoragePools(library: openLibrary()).store.all() } catch { throw fail(error) }
        if json { try printJSON(pools); return }
        var rows = [["NAME", "TYPE", "SOURCE", "SHARED"]]
        for pool in pools { rows.append([pool.name, pool.type.rawValue, pool.source + (pool.target.map { " \($0)" } ?? ""), pool.shared ? "yes" : "no"]) }
        printTable(rows)
    }
}

struct PoolInfo: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show a pool, its volumes and the VMs using them.")

    @Argument(help: "Pool name.")
    var name: String

    @Flag(help: "Machine-readable output.")
    var json = false

    struct Report: Encodable {
        var pool: PoolDefinition
        var volumes: [StoragePools.Volume]
        /// Why the volumes could not be listed (an NBD server that does not answer).
        var volumesError: String?
        var users: [[String: String]]
    }

    func run() throws {
        let report: Report
        do throws(LibraryError) {
            let pools = StoragePools(library: openLibrary())
            let pool = try pools.store.load(name)
            var listingError: String?
            var volumes: [StoragePools.Volume] = []
            do throws(LibraryError) { volumes = try pools.volumes(of: pool) } catch { listingError = error.description }
            report = Report(pool: pool, volumes: volumes, volumesError: listingError, users: try pools.users(of: pool).map { ["vm": $0.vm, "disk": $0.disk] })
        } catch { throw fail(error) }
        if json { try printJSON(report); return }
        let pool = report.pool
        var rows = [["Pool:", pool.name], ["Type:", pool.type.rawValue], ["Source:", pool.source]]
        if let target = pool.target { rows.append(["Target:", target]) }
        if let chap = pool.chapFile { rows.append(["CHAP file:", chap]) }
        rows.append(["Shared:", pool.shared ? "yes (migrations may bring disks that lie in it)" : "no"])
        if let error = report.volumesError { rows.append(["Volumes:", "cannot be listed: \(error)"]) } else if report.volumes.isEmpty { rows.append(["Volumes:", "none"]) }
        for volume in report.volumes {
            let size = volume.virtualSize.map(Size.describe) ?? "unreadable"
            rows.append(["Volume:", "\(volume.name.isEmpty ? "(the default export, \"\")" : volume.name) (\(volume.format.rawValue), \(size)" + (volume.allocatedBytes.map { ", \(Size.describe($0)) used" } ?? "") + ")"])
        }
        if pool.type == .nbd || pool.type == .iscsi, !report.volumes.isEmpty {
            rows.append(["", "attach one by \(pool.type == .nbd ? "name" : "number"): `vireo disk attach VM \(pool.type == .nbd ? "EXPORT" : "LUN") --pool \(pool.name)`"])
        }
        for user in report.users { rows.append(["Used by:", "\(user["vm"] ?? "") (\(user["disk"] ?? ""))"]) }
        printTable(rows)
    }
}

struct PoolDelete: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete", abstract: "Forget a pool no VM uses; its volumes (files, device, exports, LUNs) are left alone.")

    @Argument(help: "Pool name.")
    var name: String

    func run() throws {
        do throws(LibraryError) { try StoragePools(library: openLibrary()).delete(name) } catch { throw fail(error) }
        printLine("Deleted pool '\(name)'; its volumes are left where they are")
    }
}
