import API
import DiskImage
import Engines
import FoundationEssentials
import Hummingbird
import Library
import MachineSpec
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// The rest of what the CLI does to one VM: its balloon, CD-ROM, keyboard, screen and disks, and
/// moving it to another host.
extension APIServer {
    func addDeviceRoutes(to api: RouterGroup<APIContext>) {
        struct BalloonBody: Decodable { var targetBytes: UInt64 }
        api.post("vms/:name/balloon") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(BalloonBody.self, from: request, allowed: ["target_bytes"])
            try await blocking { try self.manager.setBalloon(name, bytes: body.targetBytes) }
            return APIJSON.response(try await blocking { try self.statistics(name) })
        }
        api.post("vms/:name/eject") { request, context in
            let name = try context.parameters.require("name")
            _ = try await APIJSON.decode(EmptyBody.self, from: request, allowed: [])
            let outcome = try await blocking { try self.manager.eject(name) }
            struct Ejected: Encodable { var name: String; var outcome: String }
            let text: String
            switch outcome {
            case .wasEmpty: text = "was-empty"
            case .ejectedStopped: text = "ejected"
            case .ejectedRunning: text = "ejected-running"
            }
            self.events.touch()
            return APIJSON.response(Ejected(name: name, outcome: text))
        }
        struct KeysBody: Decodable { var keys: [String] }
        api.post("vms/:name/send-keys") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(KeysBody.self, from: request, allowed: ["keys"])
            guard !body.keys.isEmpty, body.keys.count <= 1024 else { throw APIProblem.invalid("keys", "give 1 to 1024 chords, like \"ctrl-alt-delete\" or \"a\"") }
            var chords: [KeyChord] = []
            for (index, text) in body.keys.enumerated() {
                do throws(LibraryError) { chords.append(try KeyChord.parse(text)) } catch {
                    throw APIProblem.invalid("keys[\(index)]", APIProblem(error).detail)
                }
            }
            let parsed = chords
            try await blocking { try self.manager.sendKeys(name, parsed) }
            struct Sent: Encodable { var name: String; var chords: Int }
            return APIJSON.response(Sent(name: name, chords: parsed.count))
        }
        api.get("vms/:name/screenshot") { _, context in
            let name = try context.parameters.require("name")
            let png = try await blocking { () throws -> [UInt8] in
                // The engine writes a file; it lives in a private directory only for this answer.
                let directory = "/tmp/vireo-screenshot-\(UUID().uuidString.lowercased())"
                guard mkdir(directory, 0o700) == 0 else { throw LibraryError.io(operation: "mkdir", path: directory, errno: errno) }
                defer { try? HostFiles.removeTree(directory) }
                try self.manager.screenshot(name, to: directory + "/screen.png")
                return try HostFiles.readAll(directory + "/screen.png")
            }
            return Response(status: .ok, headers: [.contentType: "image/png"], body: .init(byteBuffer: ByteBuffer(bytes: png)))
        }
        struct DiskBody: Decodable { var path: String; var readOnly: Bool?; var format: String?; var cache: String? }
        api.post("vms/:name/disks") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(DiskBody.self, from: request, allowed: ["path", "read_only", "format", "cache"])
            try self.paths.checkDisk(body.path, field: "path")
            let definition = try await blocking { () throws -> VMDefinition in
                let format = try body.format.map { (text) throws(LibraryError) in try DiskFormat.parse(text, field: "format") }
                let cache = try body.cache.map { (text) throws(LibraryError) in try DiskCache.parse(text, field: "cache") }
                return try self.manager.library.attachDisk(name, path: body.path, readOnly: body.readOnly ?? false, format: format, cache: cache)
            }
            return APIJSON.response(definition, status: .created)
        }
        api.delete("vms/:name/disks") { request, context in
            let name = try context.parameters.require("name")
            guard let path = request.uri.queryParameters["path"].map(String.init), !path.isEmpty else {
                throw APIProblem(.unprocessableContent, kind: "missing-field", detail: "path: required (the disk's path, as the VM's details list it)", field: "path")
            }
            let (definition, _) = try await blocking { try self.manager.library.detachDisk(name, path: path) }
            return APIJSON.response(definition)
        }
        struct MigrateBody: Decodable {
            var destination: String
            var token: String
            var maxDowntimeMs: UInt64?
            var bandwidthBytesPerSecond: UInt64?
            var copyDisks: Bool?
            var autoConverge: Bool?
        }
        api.post("vms/:name/migrate") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(MigrateBody.self, from: request,
                                                allowed: ["destination", "token", "max_downtime_ms", "bandwidth_bytes_per_second", "copy_disks", "auto_converge"])
            let migration = try await blocking { () throws -> MigrationRequest in
                var migration = MigrationRequest(destination: try TCPEndpoint(parsing: body.destination, field: "destination"), token: body.token)
                if let downtime = body.maxDowntimeMs {
                    guard downtime > 0, downtime <= 3_600_000 else {
                        throw LibraryError.invalidValue(field: "max_downtime_ms", reason: "\(downtime) is not from 1 to 3600000")
                    }
                    migration.maximumDowntimeNanoseconds = downtime * 1_000_000
                }
                migration.bandwidthBytesPerSecond = body.bandwidthBytesPerSecond.flatMap { $0 == 0 ? nil : $0 }
                migration.copyDisks = body.copyDisks ?? false
                migration.autoConverge = body.autoConverge ?? true
                // Refused at once when the VM cannot move, rather than as a failed task.
                let state = self.manager.library.status(of: try self.manager.library.bundle(named: name)).state
                guard state == .running || state == .paused else {
                    throw LibraryError.wrongState(name: name, state: state.rawValue, action: "migrate", hint: "only a running or paused VM can be migrated")
                }
                return migration
            }
            let task = self.tasks.start(kind: "migrate", target: name, cancellable: true) { task throws(LibraryError) in
                task.progress(0, "connecting to \(migration.destination)")
                let (result, warnings) = try self.manager.migrate(name, request: migration, progress: { report in
                    let total = report.transferredBytes + report.remainingBytes
                    task.progress(total == 0 ? nil : Double(report.transferredBytes) / Double(total),
                                  "round \(report.iteration): \(Size.describe(report.remainingBytes)) dirty, \(Size.describe(report.transferredBytes)) sent")
                }, cancelled: { task.isCancelled })
                self.events.touch()
                return ["vm": name, "destination": migration.destination.description, "downtime_us": String(result.downtimeUs),
                        "total_ms": String(result.totalMs), "warnings": warnings.joined(separator: "; ")]
            }
            return APIJSON.response(task, status: .accepted, headers: [.location: "/api/tasks/\(task.id)"])
        }
        struct ImportBody: Decodable { var path: String; var name: String }
        api.post("images/import") { request, _ in
            let body = try await APIJSON.decode(ImportBody.self, from: request, allowed: ["path", "name"])
            try self.paths.check(body.path, field: "path")
            let task = self.tasks.start(kind: "image-import", target: body.name) { task throws(LibraryError) in
                let manifest = try ImageImporter.importFile(body.path, as: body.name, store: ImageStore(libraryRoot: self.manager.library.root)) { step in
                    task.progress(nil, step)
                }
                return ["image": manifest.name]
            }
            return APIJSON.response(task, status: .accepted, headers: [.location: "/api/tasks/\(task.id)"])
        }
        for action in ["start", "stop"] {
            api.post(RouterPath("networks/:network/\(action)")) { request, context in
                let name = try context.parameters.require("network")
                _ = try await APIJSON.decode(EmptyBody.self, from: request, allowed: [])
                guard try await blocking({ NetworkStore(libraryRoot: self.manager.library.root).exists(name) }) else {
                    throw APIProblem(.notFound, kind: "not-found", detail: "no network named '\(name)' (see GET /api/networks)")
                }
                try await blocking { () throws in
                    let networks = HostNetworks(library: self.manager.library)
                    if action == "start" { try networks.start(name) } else { try networks.stop(name) }
                }
                let row = try await blocking { try self.networkRows().first { $0.network.name == name } }
                return APIJSON.response(row)
            }
        }
    }
}
