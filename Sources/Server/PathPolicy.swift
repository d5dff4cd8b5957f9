import DiskImage
import Engines
import Library
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// Which host paths an API client may name (docs/api.md, docs/security.md). The token is root
/// on the host: whoever holds it can start VMs, and a VM reads and writes files as root at
/// start. So by default an API request names files inside the library only; `vireo serve
/// --allow-path DIR` adds directories (ISOs, kernels, shared disks), each resolved once at start.
/// A path is resolved as the file system sees it (links followed, `..` applied) before it is
/// compared; a file that does not exist yet is judged by the directory it would be made in.
struct APIPathPolicy: Sendable {
    /// Resolved: the library's root and every `--allow-path`.
    let directories: [String]
    /// The library's own secrets, never named: the API token and the key `vireo ssh` logs in with.
    let secrets: [String]
    /// What the refusal tells the caller the server allows.
    let description: String
    /// Servers a network disk may be on (`vireo serve --allow-disk-server`).
    let diskServers: [TCPEndpoint]

    init(libraryRoot: String, allowed: [String], diskServers: [TCPEndpoint] = []) {
        let root = HostPath.real(libraryRoot) ?? libraryRoot
        self.diskServers = diskServers
        directories = [root] + allowed
        secrets = [root + "/api-token", root + "/ssh"]
        description = allowed.isEmpty ? "the library \(root)" : "the library \(root) and \(allowed.joined(separator: ", "))"
    }

    /// `path`, absolute, resolved and inside an allowed directory, or a 422 naming the field.
    @discardableResult
    func check(_ path: String, field: String) throws -> String {
        guard path.hasPrefix("/"), path.utf8.count <= 4096, !path.utf8.contains(0) else {
            throw APIProblem.invalid(field, "'\(path.prefix(200))' is not an absolute path (the server's working directory is not yours)")
        }
        let resolved: String
        if let real = HostPath.real(path) {
            resolved = real
        } else if let parent = HostPath.real(HostFiles.parent(of: path)) {
            resolved = (parent == "/" ? "" : parent) + "/" + HostFiles.lastComponent(of: path)
        } else {
            throw APIProblem.invalid(field, "\(path.prefix(300)) is not in an existing directory")
        }
        if secrets.contains(where: { resolved == $0 || resolved.hasPrefix($0 + "/") }) {
            throw APIProblem.invalid(field, "\(path.prefix(300)) is one of the library's secrets (its API token, its SSH key); API clients never name it")
        }
        guard directories.contains(where: { resolved == $0 || resolved.hasPrefix($0 == "/" ? "/" : $0 + "/") }) else {
            throw APIProblem.invalid(field, "\(path.prefix(300)) is outside what this server lets API clients name (\(description)); start `vireo serve` with --allow-path DIR to allow a directory")
        }
        return path
    }

    /// A disk's path: a host path as `check` has it, or a network disk's address whose Unix
    /// sockets and credentials (CHAP files, TLS certificates directories) lie where a client may
    /// name files and whose TCP servers `vireo serve --allow-disk-server` named (root connects
    /// there and presents the credentials).
    func checkDisk(_ path: String, field: String) throws {
        guard DiskFormat.isNetworkAddress(path) else { try check(path, field: field); return }
        let endpoints: [NetworkDisk.Endpoint]
        do { endpoints = try NetworkDisk.endpoints(path) } catch { throw APIProblem.invalid(field, error.description) }
        for endpoint in endpoints {
            switch endpoint {
            case let .unix(socket, credentials):
                try check(socket, field: field)
                if let credentials { try check(credentials, field: field) }
            case let .tcp(host, port, credentials):
                guard TCPEndpoint.allows(diskServers, host: host, port: port) else {
                    throw APIProblem.invalid(field, "the network disk's server \(host.prefix(200)):\(port) is not one this server lets API clients name; start `vireo serve` with --allow-disk-server \(host.prefix(200)):\(port)")
                }
                if let credentials { try check(credentials, field: field) }
            }
        }
    }

    /// `file:PATH` memory backings name a host file too.
    func checkMemoryBacking(_ text: String?, field: String) throws {
        guard let text, text.hasPrefix("file:") else { return }
        let path = String(text.dropFirst(5).split(separator: ",", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
        try check(path, field: field)
    }
}
