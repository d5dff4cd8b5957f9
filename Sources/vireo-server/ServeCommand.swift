import ArgumentParser
import CLI
import Dispatch
import Engines
import Library
import Server
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// `vireo serve`, in a program of its own (`vireo` execs it): the server's libraries load only here.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vireo-server",
        abstract: "Serve the REST API and the web manager for this library (what `vireo serve` runs).",
        discussion: """
            The API is described by /api/openapi.json (docs/api.md); the manager is at / \
            (docs/web-ui.md). Over TCP every /api request needs the library's API token (made on \
            first start in the library's api-token file, mode 0600) as 'Authorization: Bearer \
            TOKEN'; the printed address carries it for the browser. The Unix socket, if asked for, \
            needs no token: its file mode (0600) limits it to this user. VMs run in their own \
            processes: stopping the server leaves them running. Whoever holds the token (or can \
            open the socket) is root on this host in effect: API requests name host files only \
            inside the library and the directories given with --allow-path, and may not start VMs \
            unconfined unless --allow-unconfined says so (docs/security.md).
            """)

    @Option(help: ArgumentHelp("TCP address to listen on, HOST:PORT, or 'none' for the Unix socket only.", valueName: "host:port"))
    var listen = "127.0.0.1:8006"

    @Option(help: ArgumentHelp("Also listen on this Unix socket (no token; mode 0600).", valueName: "path"))
    var socket: String?

    @Option(name: .customLong("tls-cert"), help: ArgumentHelp("PEM certificate chain: serve HTTPS on the TCP address (with --tls-key).", valueName: "file"))
    var tlsCertificate: String?

    @Option(name: .customLong("tls-key"), help: ArgumentHelp("PEM private key of --tls-cert.", valueName: "file"))
    var tlsKey: String?

    @Option(name: .customLong("allow-path"), help: ArgumentHelp("A directory whose files API clients may name (kernels, ISOs, disks, exports) besides the library's (repeatable).", valueName: "dir"))
    var allowPath: [String] = []

    @Option(name: .customLong("allow-disk-server"), help: ArgumentHelp("A server (NBD, iSCSI) API clients' network disks may be on, HOST[:PORT]; without a port, 10809 and 3260 (repeatable). A Unix socket, CHAP file or TLS certificates directory must lie under --allow-path.", valueName: "host:port"))
    var allowDiskServer: [String] = []

    @Flag(name: .customLong("allow-unconfined"), help: "Let API clients start VMs without the jail or seccomp (no_jail, no_seccomp).")
    var allowUnconfined = false

    func run() throws {
        var configuration = APIServer.Configuration()
        if listen != "none" {
            guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]), (0...65535).contains(port) else {
                throw fail(LibraryError.invalidValue(field: "--listen", reason: "'\(listen)' is not HOST:PORT (port 0 to 65535; 0 picks a free one) or none"))
            }
            var host = String(listen[..<colon])
            if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty else { throw fail(LibraryError.invalidValue(field: "--listen", reason: "'\(listen)' has no host; use 127.0.0.1:\(port)")) }
            configuration.host = host
            configuration.port = port
        }
        configuration.socketPath = socket.map(HostFiles.absolute)
        configuration.tlsCertificate = tlsCertificate.map(HostFiles.absolute)
        configuration.tlsKey = tlsKey.map(HostFiles.absolute)
        configuration.allowUnconfined = allowUnconfined
        for directory in allowPath {
            guard let real = HostPath.real(HostFiles.absolute(directory)), HostFiles.isDirectory(real) else {
                throw fail(LibraryError.invalidValue(field: "--allow-path", reason: "\(directory) is not a directory"))
            }
            configuration.allowedPaths.append(real)
        }
        do throws(LibraryError) {
            for server in allowDiskServer { configuration.allowedDiskServers += try TCPEndpoint.diskServers(parsing: server, field: "--allow-disk-server") }
        } catch { throw fail(error) }
        guard configuration.host != nil || configuration.socketPath != nil else {
            throw fail(LibraryError.invalidValue(field: "--listen", reason: "none given and no --socket: nothing to serve on"))
        }
        let manager = openManager()
        let server: APIServer
        do throws(LibraryError) { server = try APIServer(manager: manager, configuration: configuration) } catch { throw fail(error) }
        if let host = configuration.host, !["127.0.0.1", "::1", "localhost"].contains(host), tlsCertificate == nil {
            printNote("warning: listening on \(host), not loopback: the token and everything else travel unencrypted")
        }
        let tokenPath = APIServer.tokenPath(libraryRoot: manager.library.root)
        let token = server.apiToken
        let finished = DispatchSemaphore(value: 0)
        let outcome = ServeOutcome()
        // The server is async (SwiftNIO); this command is not, so its main thread waits here.
        Task {
            do {
                try await server.run { address in
                    if address.hasPrefix("error: ") {
                        printNote(address)
                        Glibc.exit(2)
                    }
                    if address.hasPrefix("http") {  // http:// or https://
                        printLine("Vireo manager: \(address)/#token=\(token)")
                        printLine("API: \(address)/api (token in \(tokenPath))")
                    } else {
                        printLine("API on \(address) (no token needed)")
                    }
                }
            } catch let error as LibraryError {
                outcome.set(fail(error))
            } catch {
                printNote("error: the server stopped: \(error)")
                outcome.set(ExitCode(1))
            }
            finished.signal()
        }
        finished.wait()
        if let failure = outcome.get() { throw failure }
    }
}

private final class ServeOutcome: Sendable {
    private let failure = Mutex<ExitCode?>(nil)
    func set(_ code: ExitCode) { failure.withLock { $0 = code } }
    func get() -> ExitCode? { failure.withLock { $0 } }
}
