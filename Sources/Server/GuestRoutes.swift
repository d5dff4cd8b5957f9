import Engines
import FoundationEssentials
import Hummingbird
import Library

/// Shared folders and the guest agent through the API: what `vireo share` and `vireo exec` do,
/// through the same library and manager calls; a shared directory is held to the server's path
/// policy like every host path a client names.
extension APIServer {
    // Bodies in the API's snake_case: its decoder and encoder convert the keys.
    func addGuestRoutes(to api: RouterGroup<APIContext>) {
        api.get("vms/:name/shares") { _, context in
            let name = try context.parameters.require("name")
            return APIJSON.response(try await blocking { try self.manager.library.bundle(named: name).load().shares })
        }
        struct ShareBody: Decodable {
            var path: String
            var tag: String?
            var readOnly: Bool?
        }
        api.post("vms/:name/shares") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(ShareBody.self, from: request, allowed: ["path", "tag", "read_only"])
            let path = try self.paths.check(body.path, field: "path")
            let share = SharedFolder(tag: body.tag ?? SharedFolder.defaultTag(for: path), path: path, readOnly: body.readOnly ?? false)
            let definition = try await blocking { () throws -> VMDefinition in
                do throws(LibraryError) { return try self.manager.library.addShare(name, share) } catch {
                    // This route's field for the directory is `path`; the library calls it `shares`.
                    if case let .invalidValue(field, reason) = error, field == "shares" { throw APIProblem.invalid("path", reason) }
                    throw APIProblem(error)
                }
            }
            return APIJSON.response(definition.shares, status: .created)
        }
        api.delete("vms/:name/shares/:tag") { _, context in
            let name = try context.parameters.require("name")
            let tag = try context.parameters.require("tag")
            let definition = try await blocking { () throws -> VMDefinition in
                guard try self.manager.library.bundle(named: name).load().shares.contains(where: { $0.tag == tag }) else {
                    throw APIProblem(.notFound, kind: "not-found", detail: "VM '\(name)' has no shared folder '\(tag)' (see GET /api/vms/\(name)/shares)", vm: name)
                }
                do throws(LibraryError) { return try self.manager.library.removeShare(name, tag).0 } catch { throw APIProblem(error) }
            }
            return APIJSON.response(definition.shares)
        }
        struct ExecBody: Decodable {
            var command: [String]
            var timeoutSeconds: Int?
        }
        struct ExecReply: Encodable {
            var exitCode: Int32
            var signal: Int32?
            /// UTF-8 text as the command wrote it (invalid sequences replaced); base64 alongside.
            var stdout: String
            var stderr: String
            var stdoutBase64: String
            var stderrBase64: String
            var truncated: Bool
        }
        api.post("vms/:name/exec") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(ExecBody.self, from: request, allowed: ["command", "timeout_seconds"])
            guard let program = body.command.first, !program.isEmpty else {
                throw APIProblem.invalid("command", "empty; give the program and its arguments, e.g. [\"/bin/uname\", \"-a\"]")
            }
            let timeout = body.timeoutSeconds ?? 300
            let result = try await blocking { () throws -> GuestExecResult in
                do throws(LibraryError) { return try self.manager.exec(name, command: body.command, timeoutSeconds: timeout) } catch {
                    if case let .invalidValue(field, reason) = error, field == "timeout" { throw APIProblem.invalid("timeout_seconds", reason) }
                    throw APIProblem(error)
                }
            }
            return APIJSON.response(ExecReply(exitCode: result.exitCode, signal: result.signal,
                                              stdout: String(decoding: result.stdout, as: UTF8.self), stderr: String(decoding: result.stderr, as: UTF8.self),
                                              stdoutBase64: Data(result.stdout).base64EncodedString(), stderrBase64: Data(result.stderr).base64EncodedString(),
                                              truncated: result.truncated))
        }
    }
}
