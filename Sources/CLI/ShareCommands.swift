import ArgumentParser
import Library
import MachineSpec

struct ShareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "share",
        abstract: "Shared folders: host directories a guest mounts over virtio-fs.",
        discussion: """
            Each share is served by Debian's virtiofsd while the VM runs, in a user namespace where \
            the guest's root is an unprivileged host uid and the guest's first user (uid 1000) is \
            the directory's owner. A VM made from a cloud-init image mounts every share at \
            /mnt/TAG (or its --mount-point) at each boot; elsewhere, `mount -t virtiofs TAG DIR` in the guest. Shares are \
            changed on a stopped VM. See docs/shared-folders.md.
            """,
        subcommands: [ShareAdd.self, ShareList.self, ShareRemove.self])
}

struct ShareAdd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "add", abstract: "Share a host directory with a stopped VM.")

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: ArgumentHelp("The host directory.", valueName: "host-dir"))
    var directory: String

    @Option(help: ArgumentHelp("The name the guest mounts it by (1 to 36 letters, digits, '.', '_', '-'); default: the directory's name.", valueName: "tag"))
    var tag: String?

    @Flag(help: "The guest may read but not change the directory.")
    var readonly = false

    @Option(help: ArgumentHelp("Where a cloud-init guest mounts it (an absolute guest path); default: /mnt/TAG.", valueName: "path"))
    var mountPoint: String?

    func run() throws {
        let definition: VMDefinition
        let share = SharedFolder(tag: tag ?? SharedFolder.defaultTag(for: directory), path: directory, readOnly: readonly, mountPoint: mountPoint)
        do throws(LibraryError) { definition = try openLibrary().addShare(name, share) } catch { throw fail(error) }
        guard let added = definition.shares.last else { return }
        printLine("VM '\(name)' shares \(added.path) as '\(added.tag)'\(added.readOnly ? ", read-only" : "")")
        if definition.cloudInit == nil {
            printLine("In the guest: mount -t virtiofs \(added.tag) \(added.guestMountPoint)")
        } else {
            printLine("The guest mounts it at \(added.guestMountPoint) when it next boots")
        }
    }
}

struct ShareList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List a VM's shared folders.")

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Machine-readable output.")
    var json = false

    func run() throws {
        let definition: VMDefinition
        do throws(LibraryError) { definition = try openLibrary().bundle(named: name).load() } catch { throw fail(error) }
        if json { try printJSON(definition.shares); return }
        var rows = [["TAG", "HOST DIRECTORY", "ACCESS", "GUEST MOUNT POINT"]]
        for share in definition.shares { rows.append([share.tag, share.path, share.readOnly ? "read-only" : "read-write", share.guestMountPoint]) }
        printTable(rows)
    }
}

struct ShareRemove: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "remove", abstract: "Stop sharing a folder with a stopped VM (the host directory is untouched).")

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: ArgumentHelp("The share's tag or host directory.", valueName: "tag"))
    var tag: String

    func run() throws {
        let removed: SharedFolder
        do throws(LibraryError) { removed = try openLibrary().removeShare(name, tag).1 } catch { throw fail(error) }
        printLine("VM '\(name)' no longer shares \(removed.path) ('\(removed.tag)')")
    }
}
