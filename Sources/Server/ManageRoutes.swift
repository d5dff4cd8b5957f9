import DiskImage
import Engines
import FoundationEssentials
import Hummingbird
import Library
import MachineSpec
import MigrationWire
import NIOCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What the CLI does beside a VM's life cycle: its port forwards, a network's autostart, disk
/// images on their own (`vireo disk create/info/resize`), exporting an image, and receiving a
/// VM another host migrates here (`vireo receive`).
extension APIServer {
    func addManageRoutes(to api: RouterGroup<APIContext>) {
        addForwardRoutes(to: api)
        addDiskRoutes(to: api)

        struct NetworkChange: Decodable { var autostart: Bool }
        api.patch("networks/:network") { request, context in
            let name = try context.parameters.require("network")
            let body = try await APIJSON.decode(NetworkChange.self, from: request, allowed: ["autostart"])
            guard try await blocking({ NetworkStore(libraryRoot: self.manager.library.root).exists(name) }) else {
                throw APIProblem(.notFound, kind: "not-found", detail: "no network named '\(name)' (see GET /api/networks)")
            }
            // As `vireo network autostart`: on brings it up now, off lets it go down if idle.
            let warnings = try await blocking { () throws -> [String] in
                try NetworkStore(libraryRoot: self.manager.library.root).setAutostart(name, body.autostart)
                let networks = HostNetworks(library: self.manager.library)
                if body.autostart { try networks.start(name); return [] }
                return networks.releaseIdle()
            }
            guard let row = try await blocking({ try self.networkRows().first { $0.network.name == name } }) else {
                throw APIProblem(.notFound, kind: "not-found", detail: "network '\(name)' was deleted meanwhile")
            }
            struct Changed: Encodable { var network: NetworkDefinition; var up: Bool; var vms: [String]; var warnings: [String] }
            return APIJSON.response(Changed(network: row.network, up: row.up, vms: row.vms, warnings: warnings))
        }

        struct ExportBody: Decodable { var path: String }
        api.post("images/:image/export") { request, context in
            let name = try context.parameters.require("image")
            let body = try await APIJSON.decode(ExportBody.self, from: request, allowed: ["path"])
            try await self.requireImage(name)
            let path = try self.paths.check(body.path, field: "path")
            // Checked before the task, so a path that cannot be written is a 422, not a failed task.
            try await blocking { () throws in
                guard !HostFiles.exists(path) else { throw LibraryError.invalidValue(field: "path", reason: "\(path) already exists; exports never overwrite") }
                let directory = HostFiles.parent(of: path)
                guard HostFiles.isDirectory(directory), access(directory, W_OK) == 0 else {
                    throw LibraryError.invalidValue(field: "path", reason: "\(directory) is not a writable directory")
                }
            }
            let task = self.tasks.start(kind: "image-export", target: name) { task throws(LibraryError) in
                let store = ImageStore(libraryRoot: self.manager.library.root)
                task.progress(nil, "checking image '\(name)'")
                let manifest = try store.load(name)
                try store.verify(manifest)
                task.progress(nil, "writing \(path)")
                try ImageArchive.export(manifest, from: store.path(of: name), to: path)
                return ["image": name, "path": path, "bytes": String(HostFiles.size(path))]
            }
            return APIJSON.response(task, status: .accepted, headers: [.location: "/api/tasks/\(task.id)"])
        }

        struct ReceiveBody: Decodable { var listen: String?; var name: String?; var allowDisks: [String]?; var allowDiskServers: [String]?; var allowRt: Bool? }
        api.post("migrations/receive") { request, _ in
            let body = try await APIJSON.decode(ReceiveBody.self, from: request, allowed: ["listen", "name", "allow_disks", "allow_disk_servers", "allow_rt"])
            let root = self.manager.library.root
            var allowed: [String] = []
            for (index, directory) in (body.allowDisks ?? []).enumerated() {
                let field = "allow_disks[\(index)]"
                guard directory.hasPrefix("/"), let real = HostPath.real(directory), HostFiles.isDirectory(real) else {
                    throw APIProblem.invalid(field, "\(directory) is not an absolute path of a directory")
                }
                try self.paths.check(real, field: field)
                allowed.append(real)
            }
            var allowing = ReceivePolicy(allowedDiskDirectories: allowed, allowRealTime: body.allowRt ?? false)
            // A LibraryError outside `blocking` is a 422 only once made a problem (schemathesis
            // found the 500 an empty server name gave).
            do throws(LibraryError) {
                for (index, server) in (body.allowDiskServers ?? []).enumerated() {
                    try allowing.allowDiskServer(server, field: "allow_disk_servers[\(index)]")
                }
            } catch { throw APIProblem(error) }
            let policy = allowing
            let (listener, bound) = try await blocking { () throws -> (Int32, TCPEndpoint) in
                if let name = body.name { try VMName.validate(name, in: root) }
                let endpoint = try TCPEndpoint(parsing: body.listen ?? "127.0.0.1:\(MigrationWire.defaultPort)", field: "listen",
                                               defaultPort: MigrationWire.defaultPort)
                do throws(LibraryError) {
                    return try self.manager.listenForMigration(on: endpoint)
                } catch {
                    // A port someone holds, or an address not on this host, is the caller's to change.
                    guard case let .io(_, _, code) = error, [EADDRINUSE, EADDRNOTAVAIL, EACCES].contains(code) else { throw error }
                    throw APIProblem(code == EADDRINUSE ? .conflict : .unprocessableContent, kind: code == EADDRINUSE ? "in-use" : "invalid-value",
                                     detail: "listen: cannot listen on \(endpoint): \(String(cString: strerror(code)))", field: "listen",
                                     hint: code == EADDRINUSE ? "another receive (or program) holds it; give another port, or 0 for any" : nil)
                }
            }
            let token = newMigrationToken()
            // Cancelling shuts the listener down, which ends the wait in accept(); a migration
            // already accepted goes on to its end (the source decides when it is done).
            let socket = ListeningSocket(listener)
            let task = self.tasks.start(kind: "receive", target: body.name ?? "", cancellable: true, onCancel: { socket.shutDown() }) { task throws(LibraryError) in
                defer { socket.close() }
                task.progress(nil, "waiting on \(bound) for `vireo migrate` or POST /api/vms/{name}/migrate")
                do throws(LibraryError) {
                    let received = try self.manager.receive(on: listener, token: token, rename: body.name, policy: policy) { task.progress(nil, $0) }
                    self.events.touch()
                    return ["vm": received.name, "source": received.source, "pid": String(received.pid),
                            "warnings": received.warnings.joined(separator: "; ")]
                } catch {
                    if task.isCancelled { throw LibraryError.migration(name: body.name ?? "(incoming)", reason: "cancelled before a source connected", outcomeUnknown: false) }
                    throw error
                }
            }
            struct Receiving: Encodable { var task: TaskRegistry.Record; var address: String; var token: String }
            return APIJSON.response(Receiving(task: task, address: bound.description, token: token), status: .accepted,
                                    headers: [.location: "/api/tasks/\(task.id)"])
        }
    }

    /// A listening socket a cancel may shut down from another thread: once closed, its number
    /// may belong to someone else's socket, so shutting down and closing take turns.
    final class ListeningSocket: Sendable {
        private let descriptor: Mutex<Int32?>
        init(_ fd: Int32) { descriptor = Mutex(fd) }
        func shutDown() { descriptor.withLock { if let fd = $0 { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) } } }
        func close() { descriptor.withLock { if let fd = $0 { _ = Glibc.close(fd); $0 = nil } } }
    }

    // MARK: port forwards

    struct ForwardRow: Encodable, Sendable { var forward: String; var proto: String; var hostPort: UInt16; var guestPort: UInt16; var nic: Int; var attachment: String }

    static func forwardRows(_ definition: VMDefinition) -> [ForwardRow] {
        definition.networks.enumerated().flatMap { index, card in
            card.forwards.map { ForwardRow(forward: $0.description, proto: $0.proto.rawValue, hostPort: $0.hostPort, guestPort: $0.guestPort,
                                           nic: index, attachment: card.attachment.description) }
        }
    }

    func addForwardRoutes(to api: RouterGroup<APIContext>) {
        api.get("vms/:name/forwards") { _, context in
            let name = try context.parameters.require("name")
            return APIJSON.response(Self.forwardRows(try await blocking { try self.manager.library.bundle(named: name).load() }))
        }
        struct ForwardBody: Decodable { var forward: String; var nic: Int? }
        api.post("vms/:name/forwards") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(ForwardBody.self, from: request, allowed: ["forward", "nic"])
            if let nic = body.nic, nic < 0 { throw APIProblem.invalid("nic", "\(nic) is not a card index (0, 1, ...)") }
            let definition = try await blocking { () throws -> VMDefinition in
                do throws(LibraryError) {
                    let forward = try PortForward.parse(body.forward, field: "forward")
                    return try self.manager.changeForward(name, .add(forward, card: body.nic))
                } catch {
                    // This route's fields are these two; a card the VM lacks is the library's `nics`.
                    if case let .invalidValue(field, reason) = error {
                        let name = ["nics": "nic"][field] ?? "forward"
                        throw APIProblem.invalid(name, reason.hasPrefix(field + ": ") ? String(reason.dropFirst(field.count + 2)) : reason)
                    }
                    throw error
                }
            }
            return APIJSON.response(Self.forwardRows(definition), status: .created)
        }
        api.delete("vms/:name/forwards/:forward") { _, context in
            let name = try context.parameters.require("name")
            let text = try context.parameters.require("forward")
            let definition = try await blocking { () throws -> VMDefinition in
                let forward = try PortForward.parse(text, field: "forward")
                guard try self.manager.library.bundle(named: name).load().networks.contains(where: { $0.forwards.contains(forward) }) else {
                    throw APIProblem(.notFound, kind: "not-found", detail: "VM '\(name)' does not forward \(forward) (see GET /api/vms/\(name)/forwards)", vm: name)
                }
                return try self.manager.changeForward(name, .remove(forward))
            }
            return APIJSON.response(Self.forwardRows(definition))
        }
    }

    // MARK: disk images

    /// `vireo disk`'s errors as problems: what the caller can fix is 4xx and names the field.
    static func diskProblem(_ error: DiskImageError) -> APIProblem {
        let detail = error.description
        switch error {
        case let .invalidArgument(field, reason):
            let known = ["--size": "size_bytes", "--format": "format", "--backing": "backing", "--preallocate": "preallocate", "--cluster-size": "cluster_size"]
            // DiskImage names its arguments as `vireo disk` takes them.
            let name = known[field] ?? String(field.drop { $0 == "-" }).replacing("-", with: "_")
            return APIProblem(.unprocessableContent, kind: "invalid-value", detail: "\(name): \(reason)", field: name)
        case .alreadyExists:
            return APIProblem(.conflict, kind: "already-exists", detail: detail, field: "path", hint: "choose another path; disks are never overwritten")
        case .inUse:
            return APIProblem(.conflict, kind: "in-use", detail: detail, field: "path", hint: "stop the VM that uses it first")
        case .deviceBusy:
            return APIProblem(.conflict, kind: "in-use", detail: detail, field: "path", hint: "unmount the device (or take it out of swap, LVM or RAID) first")
        case let .io(_, _, code) where [ENOENT, ENOTDIR, EACCES, EISDIR, ELOOP, ENAMETOOLONG].contains(code):
            return APIProblem(.unprocessableContent, kind: "invalid-value", detail: detail, field: "path")
        case .io(_, _, EFBIG):
            // A size beyond what the host's file system can hold is the caller's to lower.
            return APIProblem(.unprocessableContent, kind: "invalid-value", detail: detail, field: "size_bytes")
        case .invalidImage, .unsupported, .unrecordedBacking, .network:
            return APIProblem(.unprocessableContent, kind: "invalid-image", detail: detail, field: "path")
        case .io, .outOfRange, .readOnly:
            return APIProblem(.internalServerError, kind: "disk", detail: detail)
        }
    }

    static func diskWork<T: Sendable>(_ body: @escaping @Sendable () throws(DiskImageError) -> T) async throws -> T {
        try await blocking { () throws -> T in
            do throws(DiskImageError) { return try body() } catch { throw diskProblem(error) }
        }
    }

    /// The format an API client declares for an image, or the one its name does; never its content.
    static func format(_ given: String?, of path: String, field: String = "format") throws(DiskImageError) -> DiskFormat {
        try DiskFormat.declared(given, of: path, option: field)
    }

    /// What a qcow2 image an API client names rests on must lie where the client may name files
    /// too: the server follows its header only that far.
    func checkChain(_ path: String, declared: String?, field: String = "path") async throws {
        try await blocking { () throws in
            let format: DiskFormat
            do throws(DiskImageError) { format = try Self.format(declared, of: path) } catch { throw Self.diskProblem(error) }
            guard HostFiles.exists(path) else { return }
            for layer in try DiskChains.adopt(path, format: format, field: field) { try self.paths.check(layer.path, field: field) }
        }
    }

    func addDiskRoutes(to api: RouterGroup<APIContext>) {
        struct CreateDisk: Decodable {
            var path: String; var sizeBytes: UInt64?; var format: String?; var backing: String?; var backingFormat: String?
            var preallocate: Bool?; var clusterSize: UInt64?
        }
        api.post("disks") { request, _ in
            let body = try await APIJSON.decode(CreateDisk.self, from: request,
                                                allowed: ["path", "size_bytes", "format", "backing", "backing_format", "preallocate", "cluster_size"])
            let path = try self.paths.check(body.path, field: "path")
            guard let format = DiskFormat(rawValue: body.format ?? "qcow2") else {
                throw APIProblem.invalid("format", "'\(body.format ?? "")' is not one of qcow2, raw")
            }
            let backing = try body.backing.map { try self.paths.check($0, field: "backing") }
            if let backing { try await self.checkChain(backing, declared: body.backingFormat, field: "backing") }
            let info = try await Self.diskWork { () throws(DiskImageError) -> DiskInfo in
                var create = StandaloneDisks.CreateRequest(path: path, format: format, sizeBytes: body.sizeBytes)
                create.backing = try backing.map { (name) throws(DiskImageError) in
                    BackingLayer(path: name, format: try Self.format(body.backingFormat, of: name, field: "backing_format"))
                }
                create.preallocate = body.preallocate ?? false
                create.clusterSize = body.clusterSize ?? 65536
                return try StandaloneDisks.create(create)
            }
            return APIJSON.response(info, status: .created)
        }
        api.get("disks/info") { request, _ in
            guard let given = request.uri.queryParameters["path"].map(String.init), !given.isEmpty else {
                throw APIProblem(.unprocessableContent, kind: "missing-field", detail: "path: required (the image's absolute path)", field: "path")
            }
            let path = try self.paths.check(given, field: "path")
            let declared = request.uri.queryParameters["format"].map(String.init)
            try await self.checkChain(path, declared: declared)
            return APIJSON.response(try await Self.diskWork { () throws(DiskImageError) -> DiskInfo in
                try StandaloneDisks.info(path: path, format: try Self.format(declared, of: path))
            })
        }
        struct ResizeDisk: Decodable { var path: String; var sizeBytes: UInt64; var format: String? }
        api.post("disks/resize") { request, _ in
            let body = try await APIJSON.decode(ResizeDisk.self, from: request, allowed: ["path", "size_bytes", "format"])
            let path = try self.paths.check(body.path, field: "path")
            try await self.checkChain(path, declared: body.format)
            let info = try await Self.diskWork { () throws(DiskImageError) -> DiskInfo in
                try StandaloneDisks.resize(path: path, format: try Self.format(body.format, of: path), to: body.sizeBytes)
            }
            return APIJSON.response(info)
        }
    }
}
