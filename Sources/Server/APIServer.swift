import API
import Engines
import FoundationEssentials
import HTTPTypes
import Hummingbird
import HummingbirdWebSocket
import Library
import Logging
import NIOCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The request context of every route: Hummingbird's, with WebSocket upgrades.
public typealias APIContext = BasicWebSocketRequestContext

/// `vireo serve`: the REST API (`/api`, described by `/api/openapi.json`) and the web manager
/// (`/`). It holds no VM state of its own: every answer is read from the library when asked, so
/// the CLI and the server agree at every moment, and VMs run in their own processes whether or
/// not a server is up (docs/api.md).
public struct APIServer: Sendable {
    public struct Configuration: Sendable {
        /// TCP address; nil serves only the Unix socket.
        public var host: String?
        public var port: Int = 8006
        public var socketPath: String?
        /// PEM files; with both, TCP serves HTTPS (and WSS) only.
        public var tlsCertificate: String?
        public var tlsKey: String?
        /// Directories besides the library whose files API clients may name (`--allow-path`),
        /// resolved.
        public var allowedPaths: [String] = []
        /// Servers a network disk an API client names may be on (`--allow-disk-server`).
        public var allowedDiskServers: [TCPEndpoint] = []
        /// Whether API clients may start VMs without the jail or seccomp (`--allow-unconfined`).
        public var allowUnconfined = false
        public init() {}
    }

    let manager: VMManager
    let configuration: Configuration
    let token: String
    let tasks: TaskRegistry
    let events: EventSignal
    let definitions = DefinitionCache()
    let paths: APIPathPolicy

    public init(manager: VMManager, configuration: Configuration) throws(LibraryError) {
        self.manager = manager
        self.configuration = configuration
        self.token = try APIToken.loadOrCreate(libraryRoot: manager.library.root)
        self.tasks = TaskRegistry()
        self.events = EventSignal()
        self.paths = APIPathPolicy(libraryRoot: manager.library.root, allowed: configuration.allowedPaths,
                                   diskServers: configuration.allowedDiskServers)
    }

    public static func tokenPath(libraryRoot: String) -> String { APIToken.path(libraryRoot: libraryRoot) }

    /// The bearer token TCP clients must send.
    public var apiToken: String { token }

    /// Every API route this server answers, as `METHOD /api/path/{param}` (OpenAPI's syntax), so
    /// a test can hold the OpenAPI document to the server; WebSocket routes are listed as GET.
    public func routeTable() -> [String] {
        let routes = router(requireToken: true).routes + webSocketRouter(requireToken: true).routes
        return routes.map { route in
            let path = "/" + route.path.description.split(separator: "/").map { part in
                part.hasPrefix(":") ? "{\(part.dropFirst())}" : String(part)
            }.joined(separator: "/")
            return "\(route.method) \(path)"
        }.filter { $0.contains(" /api/") }.sorted()
    }

    /// The router for one listener: TCP requires the bearer token on `/api`; the Unix socket is
    /// guarded by its file mode instead.
    func router(requireToken: Bool) -> Router<APIContext> {
        let router = Router(context: APIContext.self)
        router.add(middleware: ServerHeaders())
        let api = router.group("api")
        if requireToken { api.add(middleware: BearerTokenCheck(token: token)) }
        api.add(middleware: RunningTaskCheck(tasks: tasks))
        api.get("openapi.json") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/json"],
                     body: .init(byteBuffer: ByteBuffer(bytes: PackageResources.openapi_json)))
        }
        addHostRoutes(to: api)
        addVMRoutes(to: api)
        addDeviceRoutes(to: api)
        addNetworkRoutes(to: api)
        addImageRoutes(to: api)
        addStorageRoutes(to: api)
        addGuestRoutes(to: api)
        addManageRoutes(to: api)
        addTaskRoutes(to: api)
        addEventRoutes(to: api)
        addStaticRoutes(to: router)
        return router
    }

    /// WebSocket routes: the serial console and the VNC display. Browsers cannot set headers on
    /// a WebSocket, so on TCP the token comes as a subprotocol (`vireo.token.<token>`), which,
    /// like a header and unlike a cookie, another site's page cannot send.
    func webSocketRouter(requireToken: Bool) -> Router<APIContext> {
        let router = Router(context: APIContext.self)
        for (path, kind) in [("api/vms/:name/console", ConsoleKind.serial), ("api/vms/:name/display", ConsoleKind.display)] {
            router.ws(RouterPath(path)) { request, context in
                guard let name = context.parameters.get("name") else { return .dontUpgrade }
                let offered = (request.headers[.secWebSocketProtocol] ?? "").split(separator: ",").map { String($0).trimmingWhitespace() }
                if requireToken {
                    guard offered.contains(where: { $0.hasPrefix("vireo.token.") && APIToken.matches(String($0.dropFirst(12)), self.token) }) else {
                        return .dontUpgrade
                    }
                }
                _ = name
                // noVNC asks for "binary"; answering with one the client offered is required.
                let chosen = offered.first { $0 == "binary" } ?? offered.first { !$0.hasPrefix("vireo.token.") }
                return .upgrade(chosen.map { [.secWebSocketProtocol: $0] } ?? [:])
            } onUpgrade: { inbound, outbound, context in
                guard let name = context.requestContext.parameters.get("name") else { return }
                let opened: Result<(DescriptorOwner, [UInt8]), APIProblem>
                do {
                    opened = .success(try await self.openStream(name, kind))
                } catch let problem as APIProblem {
                    opened = .failure(problem)
                }
                switch opened {
                case let .success((descriptor, early)):
                    try await bridge(descriptor, first: early, inbound: inbound, outbound: outbound)
                case let .failure(problem):
                    // The page shows why (the VM is not running, has no display).
                    try await outbound.write(.text("\r\nvireo: \(problem.detail)\r\n"))
                    try await outbound.close(.policyViolation, reason: String(problem.detail.prefix(120)))
                }
            }
        }
        return router
    }

    enum ConsoleKind: Sendable { case serial, display }

    func openStream(_ name: String, _ kind: ConsoleKind) async throws -> (DescriptorOwner, [UInt8]) {
        try await blocking { () throws -> (DescriptorOwner, [UInt8]) in
            switch kind {
            case .serial:
                let stream = try self.manager.openConsole(name)
                return (DescriptorOwner(fd: stream.fd, owner: stream), stream.early)
            case .display:
                let access = try self.manager.display(name)
                let fd = try UnixSocket.connect(access.vncSocket)
                return (DescriptorOwner(fd: fd, owner: ClosingDescriptor(fd)), [])
            }
        }
    }

    /// Serves until the process is signalled (SIGINT/SIGTERM end it; VMs keep running).
    /// `ready` is called once per listener as it starts: `http://HOST:PORT` (the port the kernel
    /// chose when 0 was asked for) or `unix:PATH`.
    public func run(ready: @escaping @Sendable (String) -> Void) async throws {
        var applications: [Application<RouterResponder<APIContext>>] = []
        var terminator: TLSTerminator?
        defer { terminator?.remove() }
        if let host = configuration.host {
            if let tls = try TLSTerminator.prepare(configuration: configuration, libraryRoot: manager.library.root) {
                terminator = tls
                // HTTPS: stunnel holds the TCP port and hands the decrypted stream to a private
                // Unix socket, which asks for the token as TCP does (docs/api.md, "TLS").
                applications.append(Application(router: router(requireToken: true),
                                                server: .http1WebSocketUpgrade(webSocketRouter: webSocketRouter(requireToken: true)),
                                                configuration: .init(address: .unixDomainSocket(path: tls.backendSocket), serverName: nil),
                                                onServerRunning: { _ in
                                                    chmod(tls.backendSocket, 0o600)
                                                    do throws(LibraryError) {
                                                        try tls.start()
                                                        ready("https://\(host.contains(":") ? "[\(host)]" : host):\(tls.port)")
                                                    } catch {
                                                        ready("error: \(error)")
                                                    }
                                                },
                                                logger: Self.logger))
            } else {
                applications.append(Application(router: router(requireToken: true),
                                                server: .http1WebSocketUpgrade(webSocketRouter: webSocketRouter(requireToken: true)),
                                                configuration: .init(address: .hostname(host, port: configuration.port), serverName: nil),
                                                onServerRunning: { channel in
                                                    let port = channel.localAddress?.port ?? self.configuration.port
                                                    ready("http://\(host.contains(":") ? "[\(host)]" : host):\(port)")
                                                },
                                                logger: Self.logger))
            }
        }
        if let socket = configuration.socketPath {
            try UnixSocket.prepare(socket)
            applications.append(Application(router: router(requireToken: false),
                                            server: .http1WebSocketUpgrade(webSocketRouter: webSocketRouter(requireToken: false)),
                                            configuration: .init(address: .unixDomainSocket(path: socket), serverName: nil),
                                            onServerRunning: { _ in
                                                // Made 0600 by the process umask already (set at start); said again.
                                                chmod(socket, 0o600)
                                                ready("unix:\(socket)")
                                            },
                                            logger: Self.logger))
        }
        // The QEMU, swtpm and vireo-vmm processes this server's starts left running are reaped
        // when they end (DetachedChildren), not kept as zombies for the server's life.
        let reaper = Task.detached {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                DetachedChildren.reap()
            }
        }
        defer { reaper.cancel() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for application in applications {
                group.addTask { try await application.runService(gracefulShutdownSignals: [.sigterm, .sigint]) }
            }
            try await group.waitForAll()
        }
    }

    static var logger: Logger {
        var logger = Logger(label: "vireo-serve")
        logger.logLevel = ProcessInfo.processInfo.environment["VIREO_SERVE_LOG"] == "debug" ? .debug : .warning
        return logger
    }
}

final class ClosingDescriptor {
    let fd: Int32
    init(_ fd: Int32) { self.fd = fd }
    deinit { close(fd) }
}

/// Headers every answer carries: no caching of API answers, no framing of the UI elsewhere.
struct ServerHeaders: RouterMiddleware {
    typealias Context = APIContext
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var response: Response
        do {
            response = try await next(request, context)
        } catch let error as HTTPResponseError {
            response = try error.response(from: request, context: context)
        }
        // A path no route matches gets a problem too, not an empty 404.
        if response.status == .notFound, response.headers[.contentType] == nil {
            response = try APIProblem(.notFound, kind: "not-found", detail: "no such resource: \(request.method) \(request.uri.path)")
                .response(from: request, context: context)
        }
        response.headers[.xContentTypeOptions] = "nosniff"
        if let frameOptions = HTTPField.Name("X-Frame-Options") { response.headers[frameOptions] = "DENY" }
        if request.uri.path.hasPrefix("/api/") { response.headers[.cacheControl] = "no-store" }
        return response
    }
}

/// Changes to a VM while one of this server's tasks works on it (a save writing its memory, a
/// migration, a clone copying its disks) are refused as busy, naming the task, rather than racing
/// it (schemathesis found a stop sent during a save waiting out the VMM's reply time: a 500).
struct RunningTaskCheck: RouterMiddleware {
    typealias Context = APIContext
    let tasks: TaskRegistry
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let parts = request.uri.path.split(separator: "/")
        if request.method != .get, parts.count >= 3, parts[0] == "api", parts[1] == "vms" {
            let name = String(parts[2])
            if let task = tasks.running(onVM: name) {
                throw APIProblem(.conflict, kind: "busy", detail: "VM '\(name)' has a \(task.kind) task running (\(task.id)); wait for it to end",
                                 vm: name, state: "busy", hint: "follow GET /api/tasks/\(task.id) or /api/events")
            }
        }
        return try await next(request, context)
    }
}

/// `Authorization: Bearer <token>` on every `/api` request over TCP. The token is a header, never
/// a cookie, so a page on another site cannot make a browser send it (no CSRF).
struct BearerTokenCheck: RouterMiddleware {
    typealias Context = APIContext
    let token: String
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let header = request.headers[.authorization] else {
            throw APIProblem(.unauthorized, kind: "unauthorized", detail: "send the API token as 'Authorization: Bearer TOKEN' (it is in the library's api-token file)")
        }
        let parts = header.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer", APIToken.matches(String(parts[1]), token) else {
            throw APIProblem(.unauthorized, kind: "unauthorized", detail: "the bearer token is not this library's API token")
        }
        return try await next(request, context)
    }
}

/// The API token: 32 random bytes, hex, in a 0600 file in the library made on first start.
enum APIToken {
    static func path(libraryRoot: String) -> String { libraryRoot + "/api-token" }

    static func loadOrCreate(libraryRoot: String) throws(LibraryError) -> String {
        let file = path(libraryRoot: libraryRoot)
        if HostFiles.exists(file) {
            var info = stat()
            guard stat(file, &info) == 0 else { throw .io(operation: "stat", path: file, errno: errno) }
            guard info.st_mode & 0o077 == 0 else {
                throw LibraryError.invalidValue(field: "api-token", reason: "\(file) is readable by others (mode \(String(info.st_mode & 0o777, radix: 8))); chmod 600 it or delete it to make a new token")
            }
            let text = String(decoding: try HostFiles.readAll(file), as: UTF8.self).trimmingWhitespace()
            guard text.count >= 32, text.allSatisfy({ $0.isHexDigit }) else { throw .corrupt(path: file, reason: "not an API token; delete it to make a new one") }
            return text
        }
        try HostFiles.makeDirectories(libraryRoot)
        let random = try HostFiles.readExactly("/dev/urandom", count: 32)
        let bytes = random
        let digits = Array("0123456789abcdef")
        let token = String(bytes.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 15)]] })
        let fd = open(file, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            // Another server made it meanwhile: use that one.
            if errno == EEXIST { return try loadOrCreate(libraryRoot: libraryRoot) }
            throw .io(operation: "create", path: file, errno: errno)
        }
        defer { close(fd) }
        let line = Array((token + "\n").utf8)
        guard line.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == line.count, fsync(fd) == 0 else {
            let code = errno
            unlink(file)
            throw .io(operation: "write", path: file, errno: code)
        }
        return token
    }

    /// Compares without stopping at the first difference, so timing tells nothing of the token.
    static func matches(_ offered: String, _ token: String) -> Bool {
        let a = Array(offered.utf8), b = Array(token.utf8)
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for index in 0..<a.count { difference |= a[index] ^ b[index] }
        return difference == 0
    }
}

enum UnixSocket {
    /// Removes a stale socket left by a server that is gone; refuses one a live server answers on.
    static func prepare(_ path: String) throws(LibraryError) {
        guard HostFiles.exists(path) else { return }
        if let fd = try? connect(path) {
            close(fd)
            throw LibraryError.invalidValue(field: "--socket", reason: "another server is listening on \(path)")
        }
        unlink(path)
    }

    static func connect(_ path: String) throws(LibraryError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .io(operation: "socket", path: path, errno: errno) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            close(fd)
            throw LibraryError.invalidValue(field: "socket", reason: "\(path) is too long for a Unix socket")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index] = byte }
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else {
            let code = errno
            close(fd)
            throw .io(operation: "connect", path: path, errno: code)
        }
        return fd
    }
}
