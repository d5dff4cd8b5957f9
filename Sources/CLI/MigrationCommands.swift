import ArgumentParser
import Engines
import Library
import MachineSpec
import MigrationWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

struct Receive: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive",
        abstract: "Wait for one live migration into this library (the destination side of `vireo migrate`).",
        discussion: """
            Prints the address it listens on and a one-time token; give both to `vireo migrate` on \
            the source. The VM is defined here under its own name (or --name) and runs here once the \
            migration completes; if it fails, nothing of it stays here and it runs on at the source. \
            Shared disks must be reachable at the same paths here, inside this library or a \
            directory given with --allow-disks; otherwise the source uses --copy-disks. The source \
            holds the token, not this host: its VM's memory is anonymous or a memfd here, its cards \
            go on this library's networks, and real-time priorities need --allow-rt. Listens on \
            loopback unless --listen says otherwise. See docs/migration.md and docs/security.md.
            """)

    @Option(help: "Address and port to listen on (port 0 picks a free one); other hosts reach it only on an address they can route to, e.g. 0.0.0.0:\(MigrationWire.defaultPort).")
    var listen = "127.0.0.1:\(MigrationWire.defaultPort)"

    @Option(help: "Name for the VM here (default: its name on the source).")
    var name: String?

    @Option(name: .customLong("allow-disks"), help: ArgumentHelp("A directory where shared disks may lie besides the library (repeatable).", valueName: "dir"))
    var allowDisks: [String] = []

    @Option(name: .customLong("allow-disk-server"), help: ArgumentHelp("A server a shared network disk (NBD, iSCSI) may be on, HOST[:PORT]; without a port, NBD's 10809 and iSCSI's 3260 (repeatable; a Unix socket's or CHAP file's directory goes to --allow-disks).", valueName: "host:port"))
    var allowDiskServers: [String] = []

    @Flag(name: .customLong("allow-rt"), help: "Take a VM whose vCPUs run at a real-time priority.")
    var allowRealTime = false

    func run() throws {
        let manager = openManager()
        do throws(LibraryError) {
            if let name { try VMName.validate(name) }
            let endpoint = try TCPEndpoint(parsing: listen, field: "--listen", defaultPort: MigrationWire.defaultPort)
            let (listener, bound) = try manager.listenForMigration(on: endpoint)
            defer { close(listener) }
            let token = newMigrationToken()
            printLine("Listening on \(bound)")
            printLine("Token: \(token)")
            printLine("On the source: vireo migrate NAME \(bound) --token \(token)")
            var policy = ReceivePolicy(allowRealTime: allowRealTime)
            for directory in allowDisks {
                guard let real = HostPath.real(HostFiles.absolute(directory)), HostFiles.isDirectory(real) else {
                    throw LibraryError.invalidValue(field: "--allow-disks", reason: "\(directory) is not a directory")
                }
                policy.allowedDiskDirectories.append(real)
            }
            for server in allowDiskServers { try policy.allowDiskServer(server, field: "--allow-disk-server") }
            let received = try manager.receive(on: listener, token: token, rename: name, policy: policy) { printNote($0) }
            for warning in received.warnings { printNote("warning: \(warning)") }
            printLine("VM '\(received.name)' arrived from \(received.source) and runs here (pid \(received.pid)).")
        } catch {
            throw fail(error)
        }
    }
}

/// Set by Ctrl-C while a migration runs: the migration is cancelled and the VM runs on.
let migrationCancelRequested = Atomic<Bool>(false)

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Move a running VM to another host (or library) while it runs: live migration.",
        discussion: """
            Start `vireo receive` on the destination first; it prints the address and token to use. \
            Memory is copied while the guest runs (pre-copy), rounds of what it dirtied follow, and \
            when the rest fits --max-downtime the guest stops here, its last pages and state cross, \
            and it runs there. A guest that dirties memory faster than the link is throttled step by \
            step (auto-converge). Ctrl-C cancels before the switch-over and leaves the VM running \
            here. This copy stops only after the destination confirms the VM runs there. \
            See docs/migration.md.
            """)

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: "Where `vireo receive` listens: tcp:HOST:PORT.")
    var destination: String

    @Option(help: "The one-time token `vireo receive` printed.")
    var token: String

    @Option(help: "The longest pause the guest may see at the switch-over: N, Nus, Nms or Ns (N alone is ms).")
    var maxDowntime = "300ms"

    @Option(help: "Cap on the pre-copy's bandwidth in bytes per second, with K, M, G suffixes (1024-based); 0: none.")
    var bandwidth = "0"

    @Flag(help: "Copy the disks through the stream (dirty blocks re-sent) instead of handing the same files over.")
    var copyDisks = false

    @Flag(help: "Never throttle the guest; a guest that dirties memory faster than the link then never converges.")
    var noAutoConverge = false

    func run() throws {
        let manager = openManager()
        var request: MigrationRequest
        do throws(LibraryError) {
            request = MigrationRequest(destination: try TCPEndpoint(parsing: destination, field: "DESTINATION"), token: token)
            request.maximumDowntimeNanoseconds = try Self.parseDuration(maxDowntime, field: "--max-downtime")
        } catch {
            throw fail(error)
        }
        let cap = try parseSize(bandwidth, field: "--bandwidth", allowZero: true)
        request.bandwidthBytesPerSecond = cap == 0 ? nil : cap
        request.copyDisks = copyDisks
        request.autoConverge = !noAutoConverge
        signal(SIGINT) { _ in migrationCancelRequested.store(true, ordering: .relaxed) }
        defer { signal(SIGINT, SIG_DFL) }
        let terminal = isatty(STDERR_FILENO) == 1
        var shown = false
        do throws(LibraryError) {
            let (result, warnings) = try manager.migrate(name, request: request, progress: { report in
                let expected = report.expectedDowntimeUs < 0 ? "?" : Self.describe(microseconds: UInt64(report.expectedDowntimeUs))
                var line = "round \(report.iteration): \(Size.describe(report.remainingBytes)) dirty, "
                    + "\(Size.describe(report.transferredBytes)) sent at \(Size.describe(report.rateBytesPerSecond))/s, "
                    + "expected downtime \(expected)"
                if report.throttlePercent > 0 { line += ", guest throttled \(report.throttlePercent) %" }
                if terminal {
                    var bytes = Array(("\r\u{1B}[K" + line).utf8)
                    _ = bytes.withUnsafeMutableBytes { writeAll(STDERR_FILENO, $0) }
                    shown = true
                } else {
                    printNote(line)
                }
            }, cancelled: { migrationCancelRequested.load(ordering: .relaxed) })
            if shown { printNote("") }
            for warning in warnings { printNote("warning: \(warning)") }
            printLine("VM '\(name)' migrated to \(request.destination) in \(result.totalMs) ms: \(result.iterations) rounds, "
                      + "\(Size.describe(result.transferredBytes)) sent, downtime \(Self.describe(microseconds: result.downtimeUs))"
                      + (result.maxThrottlePercent > 0 ? ", guest throttled up to \(result.maxThrottlePercent) %" : "") + ".")
        } catch {
            if shown { printNote("") }
            throw fail(error)
        }
    }

    static func describe(microseconds: UInt64) -> String {
        microseconds < 10_000 ? "\(microseconds) us" : "\(microseconds / 1000) ms"
    }

    /// `10ms`, `500us`, `2s`, or a bare number of milliseconds.
    static func parseDuration(_ text: String, field: String) throws(LibraryError) -> UInt64 {
        let units: [(String, UInt64)] = [("us", 1000), ("ms", 1_000_000), ("s", 1_000_000_000)]
        var number = Substring(text)
        var scale: UInt64 = 1_000_000
        for (suffix, value) in units where text.hasSuffix(suffix) {
            number = text.dropLast(suffix.count)
            scale = value
            break
        }
        guard let value = UInt64(number), value > 0, value <= 3_600_000_000_000 / scale else {
            throw .invalidValue(field: field, reason: "'\(text)' is not a duration above 0 (like 10ms, 500us, 1s; at most an hour)")
        }
        return value * scale
    }
}
