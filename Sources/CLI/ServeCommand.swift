import ArgumentParser
import Library
#if canImport(Glibc)
import Glibc
#endif

/// `vireo serve` execs `vireo-server` (beside this program, else on PATH) with its arguments: the
/// REST API and the web manager (Hummingbird, SwiftNIO) live in that program alone, so every other
/// `vireo` command starts without loading, relocating and searching them (bench/README.md). The
/// process stays the same (exec): its pid, signals and standard streams are the caller's.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve the REST API and the web manager for this library (runs vireo-server; `vireo serve --help` lists its options).",
        // --help goes to vireo-server, which knows the options.
        helpNames: [])

    @Argument(parsing: .allUnrecognized, help: "vireo-server's options (--listen, --socket, --tls-cert, --tls-key, --allow-path, --allow-disk-server, --allow-unconfined).")
    var arguments: [String] = []

    static let serverName = "vireo-server"

    /// The server program: beside this `vireo` (a build directory, or wherever both were
    /// installed), else the first on PATH.
    static func serverProgram() -> String? {
        var candidates: [String] = []
        if let own = HostPath.real("/proc/self/exe") { candidates.append(HostFiles.parent(of: own) + "/" + serverName) }
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
        candidates += path.split(separator: ":").map { $0 + "/" + serverName }
        return candidates.first { access($0, X_OK) == 0 }
    }

    func run() throws {
        guard let program = Self.serverProgram() else {
            throw fail(LibraryError.invalidValue(field: "vireo serve", reason: "\(Self.serverName) is neither beside vireo nor on PATH; `swift build` makes it beside vireo (install both together)"))
        }
        let argv = ([program] + arguments).map { strdup($0) } + [nil]
        execv(program, argv)
        let code = errno
        throw fail(LibraryError.io(operation: "exec", path: program, errno: code))
    }
}
