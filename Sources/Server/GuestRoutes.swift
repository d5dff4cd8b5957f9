import Engines
import FoundationEssentials
import Hummingbird
import Library
#if canImport(Glibc)
import Glibc
#endif

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
            var mountPoint: String?
        }
        api.post("vms/:name/shares") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(ShareBody.self, from: request, allowed: ["path", "tag", "read_only", "mount_point"])
            let path = try self.paths.check(body.path, field: "path")
            let share = SharedFolder(tag: body.tag ?? SharedFolder.defaultTag(for: path), path: path, readOnly: body.readOnly ?? false, mountPoint: body.mountPoint)
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
        // Files in and out of the guest (`vireo cp`), the bytes in the HTTP body: a client never
        // names a host path. Each transfer goes through a file in a private directory of the
        // library's (root's alone), removed when the answer is sent.
        api.put("vms/:name/files") { request, context in
            let name = try context.parameters.require("name")
            let guestPath = try Self.guestPath(request)
            // Refused before the body is staged: an unknown VM (404), one that is not running (409).
            let transfer = try await self.transferDirectory(for: name)
            defer { try? HostFiles.removeTree(transfer) }
            let upload = transfer + "/upload"
            let fd = open(upload, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
            guard fd >= 0 else { throw APIProblem(LibraryError.io(operation: "create", path: upload, errno: errno)) }
            var received: UInt64 = 0
            do {
                defer { close(fd) }
                for try await buffer in request.body {
                    received += UInt64(buffer.readableBytes)
                    guard received <= Self.maximumUpload else {
                        throw APIProblem(.contentTooLarge, kind: "body-too-large", detail: "the file is over \(Self.maximumUpload >> 30) GiB, the most one upload takes; copy larger files with `vireo cp`")
                    }
                    let written = buffer.withUnsafeReadableBytes { bytes in Self.writeAll(fd, bytes) }
                    guard written else { throw APIProblem(LibraryError.io(operation: "write", path: upload, errno: errno)) }
                }
            }
            let copied = try await blocking { () throws -> UInt64 in
                do throws(LibraryError) { return try self.manager.copy(name, hostPath: upload, guestPath: guestPath, toGuest: true) } catch {
                    throw Self.fileProblem(error)
                }
            }
            struct Copied: Encodable { var path: String; var bytes: UInt64 }
            return APIJSON.response(Copied(path: guestPath, bytes: copied), status: .created)
        }
        api.get("vms/:name/files") { request, context in
            let name = try context.parameters.require("name")
            let guestPath = try Self.guestPath(request)
            let transfer = try await self.transferDirectory(for: name)
            let download = transfer + "/download"
            let fd: Int32
            do {
                let size = try await blocking { () throws -> UInt64 in
                    // Staged on the host's disk as root: a guest whose file never ends must not fill it.
                    do throws(LibraryError) { return try self.manager.copy(name, hostPath: download, guestPath: guestPath, toGuest: false, limit: Self.maximumUpload) } catch {
                        throw Self.fileProblem(error)
                    }
                }
                fd = open(download, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
                guard fd >= 0 else { throw APIProblem(LibraryError.io(operation: "open", path: download, errno: errno)) }
                // Open, the file needs no name: the directory goes now, the bytes when it closes.
                try? HostFiles.removeTree(transfer)
                let body = ResponseBody(contentLength: Int(size)) { writer in
                    defer { close(fd) }
                    var chunk = [UInt8](repeating: 0, count: 1 << 20)
                    while true {
                        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                        if count < 0 && errno == EINTR { continue }
                        guard count > 0 else { break }
                        try await writer.write(ByteBuffer(bytes: chunk[0..<count]))
                    }
                    try await writer.finish(nil)
                }
                return Response(status: .ok, headers: [.contentType: "application/octet-stream"], body: body)
            } catch {
                try? HostFiles.removeTree(transfer)
                throw error
            }
        }
    }

    static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let count = write(fd, bytes.baseAddress?.advanced(by: offset), bytes.count - offset)
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return false }
            offset += count
        }
        return true
    }

    /// One file's limit either way: it is staged on the host's disk (before it enters the guest,
    /// or before it is sent).
    static let maximumUpload: UInt64 = 4 << 30

    /// The `path` query parameter: an absolute path in the guest.
    static func guestPath(_ request: Request) throws -> String {
        guard let path = request.uri.queryParameters["path"].map(String.init), !path.isEmpty else {
            throw APIProblem(.unprocessableContent, kind: "missing-field", detail: "path: required (an absolute path in the guest, e.g. ?path=/root/notes.txt)", field: "path")
        }
        guard path.hasPrefix("/"), !path.hasSuffix("/"), !path.utf8.contains(0), path.utf8.count <= 4000 else {
            throw APIProblem.invalid("path", "'\(path.prefix(200))' is not an absolute path of a file in the guest")
        }
        return path
    }

    /// A fresh directory for one transfer's file, root's alone, inside the library, once the VM
    /// is known to run: an unknown VM is a 404, one that is off a 409, before anything is staged.
    func transferDirectory(for name: String) async throws -> String {
        try await blocking { () throws -> String in
            do throws(LibraryError) { try self.manager.requireRunning(name, action: "copy files to or from") } catch { throw APIProblem(error) }
            let directory = self.manager.library.root + "/.transfer-" + UUID().uuidString.lowercased()
            guard mkdir(directory, 0o700) == 0 else { throw APIProblem(LibraryError.io(operation: "mkdir", path: directory, errno: errno)) }
            return directory
        }
    }

    /// The copy's refusals in this route's terms: the guest's file is `path`; the host side is
    /// the server's own file, whose trouble is the host's.
    static func fileProblem(_ error: LibraryError) -> APIProblem {
        if case let .invalidValue(field, reason) = error, field == "GUEST_PATH" { return APIProblem.invalid("path", reason) }
        return APIProblem(error)
    }
}
