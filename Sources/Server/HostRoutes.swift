import API
import Engines
import FoundationEssentials
import Hummingbird
import Library
import NIOCore
import Synchronization
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

extension APIServer {
    struct HostInfo: Encodable, Sendable {
        struct EngineInfo: Encodable, Sendable { var name: String; var available: Bool; var reason: String? }
        struct OSTypeInfo: Encodable, Sendable {
            var identifier: String, description: String, cpus: Int, memoryBytes: UInt64, diskBytes: UInt64, commandLine: String
            var firmware: String, installMemoryBytes: UInt64
        }
        var kvmUsable: Bool
        var kvmError: String?
        var cpus: Int
        var memoryBytes: UInt64
        var maximumVcpus: Int
        var engines: [EngineInfo]
        var osTypes: [OSTypeInfo]
        var libraryRoot: String
    }

    func hostInfo() -> HostInfo {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        let kvmError = fd >= 0 ? nil : "/dev/kvm: \(String(cString: strerror(errno)))"
        if fd >= 0 { close(fd) }
        var qemu: String?
        for candidate in ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"] where access(candidate, X_OK) == 0 { qemu = candidate; break }
        let pages = UInt64(max(sysconf(Int32(_SC_PHYS_PAGES)), 0)) * UInt64(max(sysconf(Int32(_SC_PAGESIZE)), 0))
        return HostInfo(kvmUsable: fd >= 0, kvmError: kvmError, cpus: Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), memoryBytes: pages,
                        maximumVcpus: BootConfiguration.maximumCPUs,
                        engines: [.init(name: "kvm", available: fd >= 0, reason: kvmError),
                                  .init(name: "qemu", available: qemu != nil, reason: qemu == nil ? "qemu-system-x86_64 is not installed" : nil)],
                        osTypes: OSType.all.map { .init(identifier: $0.identifier, description: $0.description, cpus: $0.cpus, memoryBytes: $0.memoryBytes,
                                                        diskBytes: $0.diskBytes, commandLine: $0.commandLine, firmware: $0.firmware.rawValue,
                                                        installMemoryBytes: $0.installMemoryBytes) },
                        libraryRoot: manager.library.root)
    }

    func addHostRoutes(to api: RouterGroup<APIContext>) {
        api.get("host") { _, _ in APIJSON.response(try await blocking { self.hostInfo() }) }
    }

    // MARK: networks

    struct NetworkRow: Encodable, Sendable {
        var network: NetworkDefinition
        var up: Bool
        var vms: [String]
    }

    func networkRows() throws(LibraryError) -> [NetworkRow] {
        let networks = HostNetworks(library: manager.library)
        var users: [String: [String]] = [:]
        for name in try manager.library.names() {
            guard let definition = try? VMBundle(directory: manager.library.root + "/" + name).load() else { continue }
            for network in Set(definition.networks.compactMap(\.attachment.networkName)) { users[network, default: []].append(name) }
        }
        return try networks.store.all().map { NetworkRow(network: $0, up: networks.isUp($0), vms: users[$0.name] ?? []) }
    }

    func addNetworkRoutes(to api: RouterGroup<APIContext>) {
        api.get("networks") { _, _ in APIJSON.response(try await blocking { try self.networkRows() }) }
        api.get("networks/:network") { _, context in
            let name = try context.parameters.require("network")
            let row = try await blocking { try self.networkRows().first(where: { $0.network.name == name }) }
            guard let row else { throw APIProblem(.notFound, kind: "not-found", detail: "no network named '\(name)' (see GET /api/networks)") }
            return APIJSON.response(row)
        }
        struct NetworkBody: Decodable { var name: String; var mode: String?; var subnet: String?; var dhcp: String?; var noDhcp: Bool?; var autostart: Bool? }
        api.post("networks") { request, _ in
            let body = try await APIJSON.decode(NetworkBody.self, from: request, allowed: ["name", "mode", "subnet", "dhcp", "no_dhcp", "autostart"])
            let network = try await blocking { () throws -> NetworkDefinition in
                var create = NetworkCreateRequest(name: body.name)
                create.mode = try NetworkMode.parse(body.mode ?? "nat", field: "mode")
                create.subnet = body.subnet
                create.dhcp = body.dhcp
                create.withoutDHCP = body.noDhcp ?? false
                create.autostart = body.autostart ?? false
                let network = try NetworkStore(libraryRoot: self.manager.library.root).create(create, hostRoutes: HostNetworks.hostRoutes())
                if create.autostart { try HostNetworks(library: self.manager.library).start(body.name) }
                return network
            }
            return APIJSON.response(network, status: .created, headers: [.location: "/api/networks/\(network.name)"])
        }
        api.delete("networks/:network") { _, context in
            let name = try context.parameters.require("network")
            guard try await blocking({ NetworkStore(libraryRoot: self.manager.library.root).exists(name) }) else {
                throw APIProblem(.notFound, kind: "not-found", detail: "no network named '\(name)' (see GET /api/networks)")
            }
            try await blocking { try HostNetworks(library: self.manager.library).delete(name) }
            struct Deleted: Encodable { var name: String }
            return APIJSON.response(Deleted(name: name))
        }
    }

    // MARK: images

    struct ImageRow: Encodable, Sendable { var manifest: ImageManifest; var diskBytes: UInt64; var usedBy: [String] }

    func addImageRoutes(to api: RouterGroup<APIContext>) {
        api.get("images") { _, _ in
            let rows = try await blocking { () throws -> [ImageRow] in
                let store = ImageStore(libraryRoot: self.manager.library.root)
                return store.names().compactMap { name in try? self.imageRow(name, store: store) }
            }
            return APIJSON.response(rows)
        }
        api.get("images/:image") { _, context in
            let name = try context.parameters.require("image")
            try await self.requireImage(name)
            let row = try await blocking { try self.imageRow(name, store: ImageStore(libraryRoot: self.manager.library.root)) }
            return APIJSON.response(row)
        }
        api.delete("images/:image") { _, context in
            let name = try context.parameters.require("image")
            try await self.requireImage(name)
            try await blocking { try ImageStore(libraryRoot: self.manager.library.root).delete(name, library: self.manager.library) }
            struct Deleted: Encodable { var name: String }
            return APIJSON.response(Deleted(name: name))
        }
        struct BuildBody: Decodable {
            var distribution: String; var name: String?; var sizeBytes: UInt64?; var packages: [String]?; var mirror: String?; var cacheDir: String?
        }
        api.post("images") { request, _ in
            let body = try await APIJSON.decode(BuildBody.self, from: request, allowed: ["distribution", "name", "size_bytes", "packages", "mirror", "cache_dir"])
            let cache = try body.cacheDir.map { try self.paths.check($0, field: "cache_dir") }
            let recipe = try await blocking { () throws -> ImageRecipe in
                try ImageRecipe(distribution: body.distribution, extraPackages: body.packages ?? [], mirror: body.mirror, size: body.sizeBytes)
            }
            let name = body.name ?? body.distribution
            let task = self.tasks.start(kind: "image-build", target: name) { task throws(LibraryError) in
                let builder = ImageBuilder(store: ImageStore(libraryRoot: self.manager.library.root)) { step in task.progress(nil, step) }
                let manifest = try builder.build(recipe, name: name, cacheDirectory: cache)
                return ["image": manifest.name]
            }
            return APIJSON.response(task, status: .accepted, headers: [.location: "/api/tasks/\(task.id)"])
        }
    }

    func imageRow(_ name: String, store: ImageStore) throws(LibraryError) -> ImageRow {
        let manifest = try store.load(name)
        return ImageRow(manifest: manifest, diskBytes: HostFiles.size(store.path(of: name) + "/" + manifest.disk),
                        usedBy: store.users(of: name, library: manager.library))
    }

    func requireImage(_ name: String) async throws {
        guard try await blocking({ ImageStore(libraryRoot: self.manager.library.root).exists(name) }) else {
            throw APIProblem(.notFound, kind: "not-found", detail: "no image named '\(name)' (see GET /api/images)")
        }
    }

    // MARK: tasks and events

    func addTaskRoutes(to api: RouterGroup<APIContext>) {
        api.get("tasks") { _, _ in APIJSON.response(self.tasks.all()) }
        api.delete("tasks/:task") { _, context in
            let id = try context.parameters.require("task")
            guard let task = self.tasks.find(id) else {
                throw APIProblem(.notFound, kind: "not-found", detail: "no task '\(id)' on this server (tasks last as long as the server)")
            }
            guard self.tasks.cancel(id) else {
                throw APIProblem(.conflict, kind: "wrong-state", detail: "task \(id) (\(task.kind)) cannot be cancelled: \(task.state == "running" ? "its work has no safe point to stop at" : "it has ended")",
                                 state: task.state, hint: task.state == "running" ? "wait for it to end" : "nothing to do")
            }
            return APIJSON.response(self.tasks.find(id) ?? task, status: .accepted)
        }
        api.get("tasks/:task") { _, context in
            let id = try context.parameters.require("task")
            guard let task = self.tasks.find(id) else {
                throw APIProblem(.notFound, kind: "not-found", detail: "no task '\(id)' on this server (tasks last as long as the server)")
            }
            return APIJSON.response(task)
        }
    }

    /// `GET /api/events`: Server-Sent Events. `vm` events carry a VM's new state (and `removed`
    /// when it is gone), `task` events a task's record. States are read from the library twice a
    /// second, so changes made by the CLI or a guest powering off show as well as the API's own.
    func addEventRoutes(to api: RouterGroup<APIContext>) {
        api.get("events") { _, _ in
            let body = ResponseBody { writer in
                var known: [String: String] = [:]
                var taskRevision = 0
                var first = true
                var quiet = 0
                while !Task.isCancelled {
                    let states = try await blocking { () throws -> [String: String] in
                        var states: [String: String] = [:]
                        for name in try self.manager.library.names() {
                            states[name] = self.manager.library.status(of: VMBundle(directory: self.manager.library.root + "/" + name)).state.rawValue
                        }
                        return states
                    }
                    var out = ""
                    for (name, state) in states.sorted(by: { $0.key < $1.key }) where known[name] != state {
                        out += Self.event("vm", VMEvent(name: name, state: state, previous: first ? nil : known[name]))
                    }
                    for name in known.keys.sorted() where states[name] == nil {
                        out += Self.event("vm", VMEvent(name: name, state: "removed", previous: known[name]))
                    }
                    known = states
                    for task in self.tasks.changed(since: taskRevision) { out += Self.event("task", task) }
                    taskRevision = self.tasks.revision
                    if first { out += "event: ready\ndata: {}\n\n"; first = false }
                    quiet = out.isEmpty ? quiet + 1 : 0
                    // A comment now and then keeps proxies from closing an idle stream.
                    if quiet >= 30 { out = ": keep-alive\n\n"; quiet = 0 }
                    if !out.isEmpty { try await writer.write(ByteBuffer(string: out)) }
                    await self.events.wait(milliseconds: 500)
                }
                try await writer.finish(nil)
            }
            return Response(status: .ok, headers: [.contentType: "text/event-stream", .cacheControl: "no-store"], body: body)
        }
    }

    struct VMEvent: Encodable { var name: String; var state: String; var previous: String? }

    static func event<T: Encodable>(_ name: String, _ value: T) -> String {
        "event: \(name)\ndata: \(String(decoding: APIJSON.encode(value), as: UTF8.self))\n\n"
    }
}

/// Wakes event streams early after the API changed something, so a client sees its own change
/// at once; other changes are seen at the next poll.
public final class EventSignal: Sendable {
    private let generation = Mutex(0)
    public init() {}
    func touch() { generation.withLock { $0 += 1 } }
    func wait(milliseconds: Int) async {
        let start = generation.withLock { $0 }
        var waited = 0
        while waited < milliseconds {
            try? await Task.sleep(for: .milliseconds(50))
            waited += 50
            if generation.withLock({ $0 }) != start { return }
        }
    }
}
