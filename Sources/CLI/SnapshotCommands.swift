import ArgumentParser
import Engines
import FoundationEssentials
import Library
#if canImport(Glibc)
import Glibc
#endif

struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Snapshots: a VM's disks (and, when it runs or is saved, its memory) at a moment, as a tree to go back to.",
        discussion: """
            Like VirtualBox's snapshots and `virsh snapshot-*`. Taken of a running VM, a snapshot \
            holds its memory too (the guest pauses while it is written) and restoring it resumes \
            the guest there; taken of a stopped VM, only its disks. Disks are qcow2 overlays: a \
            snapshot freezes each writable disk's image and the VM writes to a new overlay on it. \
            See docs/snapshots.md.
            """,
        subcommands: [SnapshotTake.self, SnapshotList.self, SnapshotRestore.self, SnapshotDelete.self])
}

struct SnapshotTake: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "take", abstract: "Take a snapshot of a VM, running or not.")

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: "Snapshot name (default snapshot-N).")
    var snapshot: String?

    @Option(help: "What this snapshot is for (up to 1024 bytes).")
    var description: String?

    func run() throws {
        let record: SnapshotRecord
        do throws(LibraryError) {
            let (taken, warnings) = try openManager().takeSnapshot(name, snapshot: snapshot, description: description)
            record = taken
            for warning in warnings { printNote("warning: \(warning)") }
        } catch { throw fail(error) }
        printLine("Took snapshot '\(record.name)' of VM '\(name)'\(record.hasMemory ? " with its memory" : " (disks only)").")
    }
}

struct SnapshotList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "Show a VM's snapshots as a tree, the current position marked.")

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Print the tree as JSON.")
    var json = false

    func run() throws {
        let library = openLibrary()
        let tree: SnapshotTree
        do throws(LibraryError) { tree = try library.bundle(named: name).loadSnapshots() } catch { throw fail(error) }
        if json {
            try printJSON(tree)
            return
        }
        guard !tree.snapshots.isEmpty else {
            printLine("VM '\(name)' has no snapshots; take one with `vireo snapshot take \(name)`.")
            return
        }
        var lines = ["SNAPSHOT  TAKEN  MEMORY  DESCRIPTION"]
        func walk(_ parent: String?, depth: Int) {
            for record in tree.children(of: parent).sorted(by: { $0.createdAt < $1.createdAt }) {
                let indent = String(repeating: "  ", count: depth)
                lines.append("\(indent)\(record.name)  \(Self.date(record.createdAt))  \(record.hasMemory ? "yes" : "no")  \(record.description ?? "")")
                if tree.current == record.id { lines.append("\(indent)  * current state") }
                walk(record.id, depth: depth + 1)
            }
        }
        walk(nil, depth: 0)
        printLine(lines.joined(separator: "\n"))
    }

    static func date(_ seconds: Int64) -> String {
        var time = time_t(seconds)
        var broken = tm()
        localtime_r(&time, &broken)
        var buffer = [CChar](repeating: 0, count: 32)
        let count = strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S", &broken)
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

struct SnapshotRestore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Put a stopped or saved VM back to a snapshot; what it held since is discarded.",
        discussion: "A snapshot with memory leaves the VM saved: `vireo start` resumes the guest at that moment, as a new generation (its vmgenid changes).")

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: "Snapshot name.")
    var snapshot: String

    func run() throws {
        let record: SnapshotRecord
        do throws(LibraryError) { record = try openLibrary().restoreSnapshot(name, snapshot: snapshot) } catch { throw fail(error) }
        printLine("Restored VM '\(name)' to snapshot '\(record.name)'." + (record.hasMemory ? " `vireo start \(name)` resumes it there." : ""))
    }
}

struct SnapshotDelete: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete",
        abstract: "Delete a snapshot of a stopped or saved VM; its disk layers merge into what rests on them, nothing else changes.")

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: "Snapshot name.")
    var snapshot: String

    func run() throws {
        let record: SnapshotRecord
        do throws(LibraryError) { record = try openLibrary().deleteSnapshot(name, snapshot: snapshot) } catch { throw fail(error) }
        printLine("Deleted snapshot '\(record.name)' of VM '\(name)'.")
    }
}
