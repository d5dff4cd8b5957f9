import Engines
import Hummingbird
import Library
import MachineSpec

/// Storage pools and appliances through the API: what `vireo pool` and `vireo export/import` do,
/// through the same library calls, every host path and server held to the server's path policy.
extension APIServer {
    func requirePool(_ name: String) async throws -> PoolDefinition {
        let pools = StoragePools(library: manager.library)
        guard try await blocking({ pools.store.exists(name) }) else {
            throw APIProblem(.notFound, kind: "not-found", detail: "no pool named '\(name)' (see GET /api/pools)")
        }
        return try await blocking { try pools.store.load(name) }
    }

    /// A pool's source as a client may name it: a directory or device inside the allowed paths,
    /// a server `--allow-disk-server` named (with its socket or credentials inside the paths).
    func checkPoolSource(_ pool: PoolDefinition, field: String) throws {
        let address: String
        do throws(LibraryError) {
            switch pool.type {
            case .dir, .block: address = ""
            case .nbd: address = try pool.path(ofVolume: "")
            case .iscsi: address = try pool.path(ofVolume: "0")
            }
        } catch { throw APIProblem(error) }
        if address.isEmpty { try paths.check(pool.source, field: field) } else { try paths.checkDisk(address, field: field) }
    }

    func addStorageRoutes(to api: RouterGroup<APIContext>) {
        struct PoolReport: Encodable {
            var pool: PoolDefinition
            var volumes: [StoragePools.Volume]
            /// Why the volumes could not be listed (an NBD server that does not answer).
            var volumesError: String?
            var users: [[String: String]]
        }
        api.get("pools") { _, _ in
            APIJSON.response(try await blocking { try StoragePools(library: self.manager.library).store.all() })
        }
        api.get("pools/:pool") { _, context in
            let pool = try await self.requirePool(try context.parameters.require("pool"))
            let report = try await blocking { () throws -> PoolReport in
                let pools = StoragePools(library: self.manager.library)
                var volumes: [StoragePools.Volume] = []
                var listingError: String?
                do throws(LibraryError) { volumes = try pools.volumes(of: pool) } catch { listingError = error.description }
                return PoolReport(pool: pool, volumes: volumes, volumesError: listingError, users: try pools.users(of: pool).map { ["vm": $0.vm, "disk": $0.disk] })
            }
            return APIJSON.response(report)
        }
        struct PoolBody: Decodable { var name: String; var type: String; var source: String; var target: String?; var chap: String?; var shared: Bool? }
        api.post("pools") { request, _ in
            let body = try await APIJSON.decode(PoolBody.self, from: request, allowed: ["name", "type", "source", "target", "chap", "shared"])
            guard let kind = PoolDefinition.Kind(rawValue: body.type) else {
                throw APIProblem.invalid("type", "'\(body.type.prefix(40))' is not one of \(PoolDefinition.Kind.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            // Checked as the pool would be defined, before the library reaches its source.
            let planned = PoolDefinition(name: body.name, type: kind, source: body.source, target: body.target, chapFile: body.chap, shared: body.shared ?? false)
            try self.checkPoolSource(planned, field: "source")
            let pool = try await blocking {
                try StoragePools(library: self.manager.library).create(.init(name: body.name, type: kind, source: body.source, target: body.target,
                                                                             chapFile: body.chap, shared: body.shared ?? false))
            }
            return APIJSON.response(pool, status: .created, headers: [.location: "/api/pools/\(pool.name)"])
        }
        api.delete("pools/:pool") { _, context in
            let name = try context.parameters.require("pool")
            _ = try await self.requirePool(name)
            try await blocking { try StoragePools(library: self.manager.library).delete(name) }
            struct Deleted: Encodable { var name: String }
            return APIJSON.response(Deleted(name: name))
        }
        struct VolumeBody: Decodable { var name: String; var sizeBytes: UInt64; var format: String? }
        api.post("pools/:pool/volumes") { request, context in
            let name = try context.parameters.require("pool")
            _ = try await self.requirePool(name)
            let body = try await APIJSON.decode(VolumeBody.self, from: request, allowed: ["name", "size_bytes", "format"])
            let made = try await blocking { () throws -> StoragePools.Volume in
                let format = try body.format.map { (text) throws(LibraryError) in try DiskFormat.parse(text, field: "format") }
                let made = try StoragePools(library: self.manager.library).createVolume(pool: name, volume: body.name, sizeBytes: body.sizeBytes, format: format)
                return StoragePools.Volume(name: HostFiles.lastComponent(of: made.path), path: made.path, format: made.format, virtualSize: body.sizeBytes, allocatedBytes: nil)
            }
            return APIJSON.response(made, status: .created)
        }

        struct ExportBody: Decodable { var path: String; var manifest: Bool? }
        api.post("vms/:name/export") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(ExportBody.self, from: request, allowed: ["path", "manifest"])
            try self.paths.check(body.path, field: "path")
            try await blocking { _ = try self.manager.library.bundle(named: name) }
            let task = self.tasks.start(kind: "export", target: name) { task throws(LibraryError) in
                let members = try Appliances(library: self.manager.library).export(name, to: body.path, manifest: body.manifest ?? true) { step in
                    task.progress(nil, step)
                }
                return ["vm": name, "path": body.path, "members": members.joined(separator: ", ")]
            }
            return APIJSON.response(task, status: .accepted, headers: [.location: "/api/tasks/\(task.id)"])
        }
        struct ImportBody: Decodable { var path: String; var name: String?; var dryRun: Bool? }
        api.post("appliances/import") { request, _ in
            let body = try await APIJSON.decode(ImportBody.self, from: request, allowed: ["path", "name", "dry_run"])
            try self.paths.check(body.path, field: "path")
            let appliances = Appliances(library: self.manager.library)
            if body.dryRun == true {
                return APIJSON.response(try await blocking { try appliances.plan(body.path, name: body.name) })
            }
            let task = self.tasks.start(kind: "import", target: body.name ?? body.path) { task throws(LibraryError) in
                let (definition, plan) = try appliances.importAppliance(body.path, name: body.name) { step in task.progress(nil, step) }
                self.events.touch()
                return ["vm": definition.name, "warnings": plan.warnings.joined(separator: "; ")]
            }
            return APIJSON.response(task, status: .accepted, headers: [.location: "/api/tasks/\(task.id)"])
        }
    }
}
