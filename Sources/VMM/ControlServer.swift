import CHostSupport
import Devices
import DiskImage
import MigrationWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Who this VM is, as the VM library knows it.
public struct VMIdentity: Sendable {
    public var name: String
    public var uuid: String
    public init(name: String, uuid: String) { self.name = name; self.uuid = uuid }
}

/// The running VM's control socket: one request per line, one JSON object per reply line.
/// docs/control-socket.md is the protocol's reference; keep the two in step.
final class ControlServer: @unchecked Sendable {
    static let maximumRequestLength = 1024
    static let maximumConnections = 16

    let path: String
    private let listener: Int32
    private let machine: Machine
    private let identity: VMIdentity?
    private let connections = Atomic<Int>(0)

    init(path: String, machine: Machine, identity: VMIdentity?) throws(VMMError) {
        self.path = path
        self.machine = machine
        self.identity = identity
        listener = try listenUnixSocket(path: path, field: "--control", backlog: 16)
    }

    func start() throws(VMMError) {
        TestHooks.read()
        _ = try HostThread.spawn(name: "control") { [self] in
            while true {
                let fd = accept(listener, nil, nil)
                if fd < 0 {
                    if errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE { continue }
                    return
                }
                // No child processes exist to inherit it, but keep descriptors private by habit.
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                guard connections.add(1, ordering: .relaxed).newValue <= Self.maximumConnections else {
                    connections.subtract(1, ordering: .relaxed)
                    reply(fd, Self.failure("busy", "more than \(Self.maximumConnections) control connections are open"))
                    close(fd)
                    continue
                }
                do {
                    _ = try HostThread.spawn(name: "control-conn") { [self] in
                        serve(fd)
                        close(fd)
                        connections.subtract(1, ordering: .relaxed)
                    }
                } catch {
                    close(fd)
                    connections.subtract(1, ordering: .relaxed)
                }
            }
        }
    }

    /// Removes the socket file so nobody connects to a VM that has gone.
    func finish() { unlink(path) }

    private func serve(_ fd: Int32) {
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 512)
        // A descriptor that came with a request (`migrate` takes its connection this way).
        var passed: Int32 = -1
        defer { if passed >= 0 { close(passed) } }
        while true {
            var received: Int32 = -1
            let count = buffer.withUnsafeMutableBytes { vireo_receive_with_descriptor(fd, $0.baseAddress, $0.count, &received) }
            if received >= 0 {
                if passed >= 0 { close(passed) }
                passed = received
            }
            if count <= 0 { return }
            pending += buffer[0..<count]
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                let request = line.hasSuffix("\r") ? String(line.dropLast()) : line
                if request == "console" {
                    guard machine.console.acceptsClients else {
                        reply(fd, Self.failure("no-console", "this VM's console is \(machine.consoleDescription); it cannot be attached"))
                        continue
                    }
                    reply(fd, Self.success())
                    // Bytes that arrived with the request line belong to the guest.
                    if !pending.isEmpty { machine.serial.receive(pending) }
                    machine.console.serve(client: fd, serial: machine.serial)
                    return
                }
                if request.hasPrefix("migrate ") {
                    let connection = passed
                    passed = -1
                    migrate(request, connection: connection, replyTo: fd)
                    continue
                }
                let answer = handle(request)
                reply(fd, answer)
                // The VM stops only once the saver has its answer: stopping first would close
                // this connection under the reply.
                if request == "save", answer.isSuccess { machine.stopAfterSave() }
            }
            if pending.count > Self.maximumRequestLength {
                reply(fd, Self.failure("bad-request", "request longer than \(Self.maximumRequestLength) bytes"))
                return
            }
        }
    }

    /// `migrate DESTINATION [downtime_us=N] [bandwidth=BYTES_PER_S] [copy_disks=0|1]
    /// [auto_converge=0|1]`, with the connected stream to the destination attached (SCM_RIGHTS).
    /// Progress lines (`{"progress":{...}}`) precede the one reply; the VM stops after a success.
    private func migrate(_ request: String, connection: Int32, replyTo fd: Int32) {
        defer { if connection >= 0 { close(connection) } }
        let words = request.split(separator: " ").dropFirst()
        guard let destination = words.first, connection >= 0 else {
            reply(fd, Self.failure("bad-request", connection < 0 ? "migrate needs the connection to the destination passed with the request (SCM_RIGHTS)" : "migrate needs a destination"))
            return
        }
        var options = MigrationOptions(destination: String(destination))
        for word in words.dropFirst() {
            let parts = word.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, let value = UInt64(parts[1]) else {
                reply(fd, Self.failure("bad-request", "'\(word.prefix(64))' is not NAME=NUMBER"))
                return
            }
            switch parts[0] {
            case "downtime_us": options.maximumDowntimeNanoseconds = value.multipliedReportingOverflow(by: 1000).partialValue
            case "bandwidth": options.bandwidthBytesPerSecond = value == 0 ? nil : value
            case "copy_disks": options.copyDisks = value != 0
            case "auto_converge": options.autoConverge = value != 0
            default:
                reply(fd, Self.failure("bad-request", "unknown migrate option '\(parts[0].prefix(32))'; expected downtime_us, bandwidth, copy_disks, auto_converge"))
                return
            }
        }
        if machine.isStopping {
            reply(fd, Self.failure("stopping", "\(vmName) is stopping; there is nothing to migrate"))
            return
        }
        let channel = MigrationChannel(fd: connection)
        do throws(VMMError) {
            let outcome = try machine.migrate(over: channel, options: options) { progress in
                var report = JSONObject()
                report.add("iteration", progress.iteration)
                report.add("remaining_bytes", progress.remainingBytes)
                report.add("transferred_bytes", progress.transferredBytes)
                report.add("rate_bytes_per_second", progress.rateBytesPerSecond)
                report.add("expected_downtime_us", progress.expectedDowntimeNanoseconds == UInt64.max ? -1 : Int64(progress.expectedDowntimeNanoseconds / 1000))
                report.add("throttle_percent", progress.throttlePercent)
                var line = JSONObject()
                line.add("progress", report)
                reply(fd, line)
            }
            var object = Self.success()
            object.add("state", "migrated")
            object.add("downtime_us", outcome.downtimeNanoseconds / 1000)
            object.add("total_ms", outcome.totalNanoseconds / 1_000_000)
            object.add("transferred_bytes", outcome.transferredBytes)
            object.add("iterations", outcome.iterations)
            object.add("final_pages", outcome.finalPages)
            object.add("max_throttle_percent", outcome.maximumThrottlePercent)
            reply(fd, object)
            machine.stopAfterMigration(destination: options.destination)
        } catch {
            if case .migrationOutcomeUnknown = error {
                reply(fd, Self.failure("migration-unknown", "\(error)"))
            } else {
                reply(fd, Self.failure("migration-failed", "\(error)"))
            }
        }
    }

    private func reply(_ fd: Int32, _ object: JSONObject) {
        var bytes = Array((object.text + "\n").utf8)
        _ = bytes.withUnsafeMutableBytes { writeAll(fd, UnsafeRawBufferPointer($0), flags: Int32(MSG_NOSIGNAL)) }
    }

    static func success() -> JSONObject {
        var object = JSONObject()
        object.add("ok", true)
        return object
    }

    /// Another change of the machine's state (save, live snapshot, reboot, migration) is under way.
    static func busy(_ vmName: String) -> JSONObject {
        failure("busy", "\(vmName) is being saved, snapshotted, rebooted or migrated; try again in a moment")
    }

    static func failure(_ code: String, _ message: String) -> JSONObject {
        var object = JSONObject()
        object.add("ok", false)
        object.add("error", code)
        object.add("message", message)
        return object
    }

    private var vmName: String { identity.map { "VM '\($0.name)'" } ?? "the VM" }

    private var state: String {
        if machine.isStopping { return "stopping" }
        if machine.isPaused { return "paused" }
        if machine.isShuttingDown { return "shutting-down" }
        return "running"
    }

    func handle(_ request: String) -> JSONObject {
        switch request {
        case "describe":
            var object = Self.success()
            if let identity {
                object.add("name", identity.name)
                object.add("uuid", identity.uuid)
            }
            object.add("pid", HostProcessID.value)
            object.add("state", state)
            object.add("cpus", machine.vcpuCount)
            object.add("memory_bytes", machine.boot.memoryBytes)
            object.add("started_at", machine.startedAt)
            object.add("uptime_ms", machine.uptimeNanoseconds / 1_000_000)
            object.add("boots", machine.bootCount)
            object.add("acpi", machine.hasACPI)
            if machine.isMigrating { object.add("migrating", true) }
            return object
        case "counters":
            var object = Self.success()
            object.add("uptime_ms", machine.uptimeNanoseconds / 1_000_000)
            object.add("vcpu_exits", (0..<machine.vcpuCount).map { machine.exitCount(vcpu: $0) })
            object.add("rss_bytes", Self.residentBytes())
            object.add("disks", machine.blockDevices.map { disk in
                var entry = JSONObject()
                entry.add("path", disk.path)
                entry.add("requests", disk.device.completed.load(ordering: .relaxed))
                entry.add("read_bytes", disk.device.bytesRead.load(ordering: .relaxed))
                entry.add("written_bytes", disk.device.bytesWritten.load(ordering: .relaxed))
                if let network = disk.device.disk as? any MultipathDisk {
                    entry.add("network_paths", network.pathStates.map { path in
                        var state = JSONObject()
                        state.add("address", path.address)
                        state.add("connected", path.connected)
                        state.add("active", path.active)
                        return state
                    })
                    entry.add("network_failovers", network.failovers)
                }
                return entry
            })
            object.add("networks", machine.networkCards.map { card in
                var entry = JSONObject()
                entry.add("tap", card.backend.name)
                entry.add("mac", card.mac.description)
                entry.add("rx_frames", card.receivedFrames.load(ordering: .relaxed))
                entry.add("rx_bytes", card.receivedBytes.load(ordering: .relaxed))
                entry.add("tx_frames", card.transmittedFrames.load(ordering: .relaxed))
                entry.add("tx_bytes", card.transmittedBytes.load(ordering: .relaxed))
                entry.add("dropped_frames", card.droppedFrames.load(ordering: .relaxed))
                return entry
            })
            if let entropy = machine.entropy { object.add("entropy_bytes", entropy.bytesProvided.load(ordering: .relaxed)) }
            if let balloon = machine.balloon {
                let report = balloon.report
                var entry = JSONObject()
                entry.add("target_bytes", UInt64(report.targetPages) * 4096)
                entry.add("actual_bytes", UInt64(report.actualPages) * 4096)
                entry.add("inflated_pages", report.inflatedPages)
                entry.add("deflated_pages", report.deflatedPages)
                var statistics = JSONObject()
                for (tag, value) in report.statistics.sorted(by: { $0.key < $1.key }) {
                    statistics.add(VirtioBalloon.statisticNames[tag] ?? "tag_\(tag)", value)
                }
                entry.add("statistics", statistics)
                object.add("balloon", entry)
            }
            return object
        case "pause":
            if machine.isStopping { return Self.failure("stopping", "\(vmName) is stopping; there is nothing to pause") }
            switch machine.pause() {
            case .changed: break
            case .unchanged: return Self.failure("paused", "\(vmName) is already paused; resume it with `resume`")
            case .busy: return Self.busy(vmName)
            }
            var object = Self.success()
            object.add("state", state)
            return object
        case "resume":
            switch machine.resume() {
            case .changed: break
            case .unchanged: return Self.failure("not-paused", "\(vmName) is \(state), not paused; there is nothing to resume")
            case .busy: return Self.busy(vmName)
            }
            var object = Self.success()
            object.add("state", state)
            return object
        case "shutdown":
            if machine.isPaused {
                return Self.failure("paused", "\(vmName) is paused and cannot act on a shutdown request; resume it first, or power it off")
            }
            if machine.isStopping { return Self.failure("stopping", "\(vmName) is already stopping") }
            machine.requestShutdown()
            var object = Self.success()
            object.add("state", state)
            return object
        case "power-button":
            if machine.isPaused {
                return Self.failure("paused", "\(vmName) is paused and cannot act on the power button; resume it first, or power it off")
            }
            if machine.isStopping { return Self.failure("stopping", "\(vmName) is already stopping") }
            guard machine.pressPowerButton() else {
                return Self.failure("no-acpi", "\(vmName) runs without ACPI (--acpi off) and has no power button; use shutdown (Ctrl-Alt-Del) or power-off")
            }
            var object = Self.success()
            object.add("state", state)
            return object
        case "reset":
            if machine.isStopping { return Self.failure("stopping", "\(vmName) is already stopping") }
            machine.requestReset()
            var object = Self.success()
            object.add("state", machine.rebootPolicy == .restart ? "running" : "stopping")
            return object
        case "save":
            if machine.isStopping { return Self.failure("stopping", "\(vmName) is stopping; there is nothing to save") }
            if machine.isMigrating { return Self.failure("migrating", "\(vmName) is being migrated; wait for it to finish or cancel it (`migrate-cancel`)") }
            do throws(VMMError) {
                try machine.save()
            } catch {
                return Self.failure("save-failed", "\(vmName) could not be saved and runs on: \(error)")
            }
            var object = Self.success()
            object.add("state", "saved")
            return object
        case "migrate-cancel":
            guard machine.cancelMigration() else { return Self.failure("not-migrating", "\(vmName) is not being migrated") }
            return Self.success()
        case "power-off":
            machine.requestStop(.powerOffRequested)
            var object = Self.success()
            object.add("state", "stopping")
            return object
        case let text where text.hasPrefix("snapshot "):
            if machine.isStopping { return Self.failure("stopping", "\(vmName) is stopping; there is nothing to snapshot") }
            if machine.isMigrating { return Self.failure("migrating", "\(vmName) is being migrated; wait for it to finish or cancel it (`migrate-cancel`)") }
            do throws(VMMError) {
                let taken = try machine.snapshot(id: String(text.dropFirst(9)))
                var object = Self.success()
                object.add("overlays", taken.overlays)
                object.add("paused_us", taken.pausedMicroseconds)
                if let lost = taken.memoryLost { object.add("memory_lost", lost) }
                return object
            } catch {
                return Self.failure("snapshot-failed", "\(vmName) could not be snapshotted and runs on unchanged: \(error)")
            }
        case let text where text.hasPrefix("balloon "):
            guard let balloon = machine.balloon else {
                return Self.failure("no-balloon", "\(vmName) has no balloon device; add one (--balloon) while it is stopped")
            }
            guard let mebibytes = UInt64(text.dropFirst(8)), mebibytes << 20 <= machine.boot.memoryBytes else {
                return Self.failure("bad-request", "balloon size '\(text.dropFirst(8))' must be a whole number of MiB from 0 to the VM's \(machine.boot.memoryBytes >> 20) MiB")
            }
            balloon.setTarget(pages: UInt32(mebibytes << 8))
            var object = Self.success()
            object.add("target_bytes", mebibytes << 20)
            return object
        case let text where TestHooks.enabled && text.hasPrefix("test-open "):
            // Whether this VMM can still open a host path (the jail's proof, docs/isolation.md).
            let path = String(text.dropFirst(10))
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            let code = errno
            if fd >= 0 { close(fd) }
            var object = Self.success()
            object.add("opened", fd >= 0)
            object.add("errno", fd >= 0 ? 0 : Int(code))
            return object
        case "test-forbidden-syscall" where TestHooks.enabled:
            // A system call no thread's filter allows: an IPv4 socket (the VMM never dials).
            // With seccomp on the VMM ends here and `vireo info` names the call.
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var object = Self.success()
            object.add("socket", Int(fd))
            return object
        default:
            return Self.failure("unknown-request", "'\(request.prefix(64))' is not a request; expected one of describe, counters, pause, resume, shutdown, power-button, reset, power-off, save, snapshot ID, migrate DESTINATION ..., migrate-cancel, balloon MIB, console")
        }
    }

    /// Resident memory of this process (guest RAM the guest has touched included), from statm.
    static func residentBytes() -> UInt64 {
        let fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 128)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return 0 }
        let fields = buffer[0..<count].split(separator: UInt8(ascii: " "))
        guard fields.count > 1, let pages = UInt64(String(decoding: fields[1], as: UTF8.self)) else { return 0 }
        return pages * UInt64(sysconf(Int32(_SC_PAGESIZE)))
    }
}

/// Control requests only the test suite uses (`test-open PATH`, `test-forbidden-syscall`),
/// answered only by a VMM started with `VIREO_TEST_HOOKS=1` in its environment.
enum TestHooks {
    nonisolated(unsafe) private(set) static var enabled = false
    /// Read once by the main thread before the control thread starts.
    static func read() {
        enabled = getenv("VIREO_TEST_HOOKS").map { String(cString: $0) } == "1"
    }
}
