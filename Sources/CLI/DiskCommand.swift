import ArgumentParser
import DiskImage
import Library
import FoundationEssentials
import MachineSpec
import VMM
#if canImport(Glibc)
import Glibc
#endif

struct Disk: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disk",
        abstract: "Create, inspect and grow disk images (qcow2 or raw).",
        subcommands: [Create.self, Info.self, Resize.self, Attach.self, Detach.self])

    /// The format the user gives, else the one the file's name declares; never its content's.
    static func declaredFormat(_ given: String?, of path: String, option: String = "--format") throws(DiskImageError) -> DiskFormat {
        try DiskFormat.declared(given, of: path, option: option)
    }

    /// Disk errors are the user's to fix (status 2) unless the host failed (status 1).
    static func reportDiskError(_ error: DiskImageError) -> ExitCode {
        printError(error)
        // A path that does not exist or cannot be opened is the user's to fix; other I/O is the host's.
        if case let .io(_, _, code) = error, ![ENOENT, EACCES, EISDIR, ENOTDIR].contains(code) { return ExitCode(1) }
        return ExitCode(2)
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create",
            abstract: "Create a new, thin-provisioned disk image. Never overwrites an existing file.")

        @Argument(help: "Path of the new image (with --pool: the volume's name in the pool).")
        var path: String

        @Option(help: "Make the image as a volume of this dir pool (docs/storage-pools.md).")
        var pool: String?

        @Option(help: "Virtual size (K, M, G, T; a bare number is MiB). Defaults to the backing file's size.")
        var size: String?

        @Option(help: "Image format: qcow2 or raw.")
        var format: String = "qcow2"

        @Option(help: "Backing file (qcow2 only): reads fall through to it, writes stay in the new image.")
        var backing: String?

        @Option(name: .customLong("backing-format"), help: "The backing file's format (raw or qcow2); needed unless its name ends in .qcow2 or .raw.")
        var backingFormat: String?

        @Flag(help: "Allocate every byte now (raw only).")
        var preallocate = false

        @Option(help: "qcow2 cluster size in bytes (or with K/M), a power of two from 512 to 2M.")
        var clusterSize: String = "64K"

        func run() throws {
            guard let diskFormat = DiskFormat(rawValue: format) else {
                throw Disk.reportDiskError(.invalidArgument(field: "--format", reason: "'\(format)' is not one of qcow2, raw"))
            }
            let cluster: UInt64
            var bytes: UInt64?
            do throws(VMMError) {
                // A bare number is bytes here (cluster sizes are small), unlike --size.
                if let plain = UInt64(clusterSize) { cluster = plain } else { cluster = try Size.parse(clusterSize, field: "--cluster-size") }
                if let size { bytes = try Size.parse(size, field: "--size") }
            } catch {
                throw fail(error)
            }
            if let pool {
                do throws(LibraryError) {
                    guard let bytes else { throw LibraryError.invalidValue(field: "size", reason: "missing; a new volume needs a size such as 20G") }
                    guard backing == nil, !preallocate else { throw LibraryError.invalidValue(field: backing != nil ? "backing" : "preallocate", reason: "a pool's new volume is a thin image resting on nothing") }
                    let made = try StoragePools(library: openLibrary()).createVolume(pool: pool, volume: path, sizeBytes: bytes,
                                                                                          format: DiskFormat.declared(byName: path) ?? diskFormat)
                    print("created \(made.path) in pool '\(pool)': \(made.format.rawValue), \(Size.describe(bytes))")
                } catch { throw fail(error) }
                return
            }
            do throws(DiskImageError) {
                var request = StandaloneDisks.CreateRequest(path: path, format: diskFormat, sizeBytes: bytes)
                request.backing = try backing.map { (name) throws(DiskImageError) in
                    BackingLayer(path: name, format: try Disk.declaredFormat(backingFormat, of: name, option: "--backing-format"))
                }
                request.preallocate = preallocate
                request.clusterSize = cluster
                let info = try StandaloneDisks.create(request)
                print("created \(path): \(diskFormat.rawValue), \(Size.describe(info.virtualSize))" + (backing.map { ", backed by \($0)" } ?? ""))
            } catch {
                throw Disk.reportDiskError(error)
            }
        }
    }

    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "info", abstract: "Show an image's format, sizes and backing chain.")

        @Argument(help: "Image to inspect.")
        var path: String

        @Option(help: "The image's format (raw or qcow2); needed unless its name ends in .qcow2 or .raw.")
        var format: String?

        @Flag(help: "Machine-readable output.")
        var json = false

        func run() throws {
            let info: DiskInfo
            do throws(DiskImageError) {
                info = try StandaloneDisks.info(path: path, format: try Disk.declaredFormat(format, of: path))
            } catch {
                throw Disk.reportDiskError(error)
            }
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
                print(String(decoding: try encoder.encode(info), as: UTF8.self))
                return
            }
            print("path:          \(info.path)")
            print("format:        \(info.format.rawValue)")
            print("virtual size:  \(Size.describe(info.virtualSize)) (\(info.virtualSize) bytes)")
            print("allocated:     \(Size.describe(info.allocatedBytes)) (\(info.allocatedBytes) bytes)")
            if info.blockDevice == true { print("block device:  yes (its size is the device's)") }
            if let cluster = info.clusterSize { print("cluster size:  \(cluster)") }
            for (depth, backing) in info.backingChain.enumerated() { print("backing[\(depth)]:    \(backing)") }
            for snapshot in info.snapshots {
                let state = snapshot.vmStateSize > 0 ? ", VM state \(Size.describe(snapshot.vmStateSize))" : ""
                print("snapshot:      \(snapshot.id) '\(snapshot.name)' (\(Size.describe(snapshot.virtualSize))\(state))")
            }
        }
    }

    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "resize", abstract: "Grow a disk image (shrinking is refused: it would destroy data).")

        @Argument(help: "Image to grow.")
        var path: String

        @Option(help: "New virtual size.")
        var size: String

        @Option(help: "The image's format (raw or qcow2); needed unless its name ends in .qcow2 or .raw.")
        var format: String?

        func run() throws {
            let bytes: UInt64
            do { bytes = try Size.parse(size, field: "--size") } catch { throw fail(error) }
            do throws(DiskImageError) {
                _ = try StandaloneDisks.resize(path: path, format: try Disk.declaredFormat(format, of: path), to: bytes)
            } catch {
                throw Disk.reportDiskError(error)
            }
            print("resized \(path) to \(Size.describe(bytes))")
        }
    }
    struct Attach: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "attach", abstract: "Attach an existing image to a stopped VM as its next virtio disk.")

        @Argument(help: "VM name.")
        var name: String

        @Argument(help: "Image to attach (raw or qcow2). It stays where it is and is not deleted with the VM.")
        var path: String

        @Flag(help: "Attach read-only.")
        var readonly = false

        @Option(help: "The image's format (raw or qcow2); needed unless its name ends in .qcow2 or .raw or it is a device under /dev (raw). Never read from its content.")
        var format: String?

        @Option(help: "writeback (the default: through the host's page cache) or none (O_DIRECT: around it).")
        var cache: String?

        @Option(help: "Take the image from this pool: the argument is then a volume (a file in a dir pool, an export, a LUN number).")
        var pool: String?

        func run() throws {
            var attached = path
            do throws(LibraryError) {
                let library = openLibrary()
                if let pool { attached = try StoragePools(library: library).store.load(pool).path(ofVolume: path) }
                let declared = try format.map { (text) throws(LibraryError) in try DiskFormat.parse(text, field: "--format") }
                let mode = try cache.map { (text) throws(LibraryError) in try DiskCache.parse(text, field: "--cache") }
                _ = try library.attachDisk(name, path: attached, readOnly: readonly, format: declared, cache: mode)
            } catch { throw fail(error) }
            printLine("Attached \(attached) to VM '\(name)'")
        }
    }

    struct Detach: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "detach", abstract: "Detach a disk from a stopped VM; the image file is kept.")

        @Argument(help: "VM name.")
        var name: String

        @Argument(help: "The disk's path (as `vireo info` shows it, or as stored in the VM).")
        var path: String

        func run() throws {
            let removed: DiskAttachment
            do throws(LibraryError) { (_, removed) = try openLibrary().detachDisk(name, path: path) } catch { throw fail(error) }
            printLine("Detached \(removed.path) from VM '\(name)'" + (removed.isOwned ? " (the file stays in the VM's directory until the VM is deleted)" : ""))
        }
    }
}

