import Foundation
import MigrationWire
import Testing

/// Two libraries in two network namespaces this test makes ("source" and "destination", one veth
/// apart, 192.0.2.0/24, TEST-NET-1): `vireo receive` listens in one, `vireo migrate` runs in the
/// other. Nothing outside them is contacted.
final class MigrationLab: @unchecked Sendable {
    let source = "vireo-msrc-\(UInt32.random(in: 0...UInt32.max))"
    let destination = "vireo-mdst-\(UInt32.random(in: 0...UInt32.max))"
    static let sourceAddress = "192.0.2.1"
    static let destinationAddress = "192.0.2.2"
    let from: TestLibrary
    let to: TestLibrary
    private var receivers: [RunningProcess] = []

    init() throws {
        from = try TestLibrary()
        to = try TestLibrary()
        let commands = [
            ["ip", "netns", "add", source], ["ip", "netns", "add", destination],
            ["ip", "-n", source, "link", "set", "lo", "up"], ["ip", "-n", destination, "link", "set", "lo", "up"],
            ["ip", "link", "add", "mg0", "netns", source, "type", "veth", "peer", "name", "mg1", "netns", destination],
            ["ip", "-n", source, "address", "add", "\(Self.sourceAddress)/24", "dev", "mg0"], ["ip", "-n", source, "link", "set", "mg0", "up"],
            ["ip", "-n", destination, "address", "add", "\(Self.destinationAddress)/24", "dev", "mg1"], ["ip", "-n", destination, "link", "set", "mg1", "up"],
        ]
        for command in commands {
            let result = Harness.run(command)
            guard result.status == 0 else { throw HarnessError("\(command.joined(separator: " ")) failed: \(result.stderr)") }
        }
    }

    deinit {
        for receiver in receivers { receiver.signal(SIGKILL); _ = receiver.wait(timeout: 5) }
        Harness.run(["ip", "netns", "del", source])
        Harness.run(["ip", "netns", "del", destination])
    }

    /// vireo in the source namespace, on the source library.
    @discardableResult
    func atSource(_ arguments: String..., timeout: TimeInterval = 60) -> Harness.Completed {
        Harness.run(["ip", "netns", "exec", source, Harness.vireo] + TestLibrary.withoutDefaultNetwork(arguments), timeout: timeout,
                    environment: ["VIREO_HOME": from.root.path])
    }

    @discardableResult
    func atDestination(_ arguments: String..., timeout: TimeInterval = 60) -> Harness.Completed {
        Harness.run(["ip", "netns", "exec", destination, Harness.vireo] + arguments, timeout: timeout, environment: ["VIREO_HOME": to.root.path])
    }

    /// `vireo receive` in the destination namespace; returns it with the address and token it printed.
    func receive(_ extra: [String] = [], allowSourceLibrary: Bool = true) throws -> (process: RunningProcess, endpoint: String, token: String) {
        // The source library's directory is the shared storage both "hosts" see.
        let process = RunningProcess(["ip", "netns", "exec", destination, Harness.vireo, "receive", "--listen", "\(Self.destinationAddress):0"]
                                     + (allowSourceLibrary ? ["--allow-disks", from.root.path] : []) + extra,
                                     environment: ["VIREO_HOME": to.root.path])
        receivers.append(process)
        guard process.waitForOutput("Token: ", timeout: 20), process.waitForOutput("On the source", timeout: 5) else {
            throw HarnessError("vireo receive printed no token: \(process.stdout) \(process.stderr)")
        }
        let lines = process.stdout.split(separator: "\n")
        let endpoint = lines.first { $0.hasPrefix("Listening on ") }.map { String($0.dropFirst(13)) } ?? ""
        let token = lines.first { $0.hasPrefix("Token: ") }.map { String($0.dropFirst(7)) } ?? ""
        return (process, endpoint, token)
    }

    /// `vireo migrate` in the source namespace, running (for Ctrl-C).
    func migrating(_ arguments: [String]) -> RunningProcess {
        RunningProcess(["ip", "netns", "exec", source, Harness.vireo, "migrate"] + arguments, environment: ["VIREO_HOME": from.root.path])
    }
}

@Suite(.serialized)
struct MigrationTests {
    static func rounds(_ console: String) -> [Int] { SavedStateTests.rounds(console) }

    static func createDirtying(_ lab: MigrationLab, _ name: String, spin: Int = 2_000_000, memory: String = "64M") {
        let created = lab.atSource("create", name, "--kernel", (try? Harness.probe("pvh")) ?? "", "--memory", memory, "--disk", "32M",
                                   "--cmdline", "console=ttyS0 probe=dirty spin=\(spin)")
        #expect(created.status == 0, "\(created.stderr)")
    }

    @Test("live migration between two libraries in two network namespaces: a wrong token is refused and the VM runs on; with the right one the dirtying probe moves while it runs — its rounds go on at the destination from where they were, every memory sum matches, the source has stopped and retired its entry (the shared disk stays where the destination uses it), the disk's lock moved with it and the disk is clean")
    func migrateBetweenNamespaces() throws {
        let lab = try MigrationLab()
        Self.createDirtying(lab, "mover")
        #expect(lab.atSource("start", "mover").status == 0)
        #expect(lab.from.waitFor(30) { Self.rounds(lab.from.consoleLog("mover")).count >= 20 })
        let (receiver, endpoint, token) = try lab.receive()
        #expect(endpoint == "tcp:\(MigrationLab.destinationAddress):" + (endpoint.split(separator: ":").last.map(String.init) ?? ""), "\(endpoint)")
        #expect(token.count == 32, "\(token)")

        let wrong = lab.atSource("migrate", "mover", endpoint, "--token", String(repeating: "0", count: 32))
        #expect(wrong.status == 1 && wrong.stderr.contains("refused: wrong token"), "\(wrong.stderr)")
        #expect(lab.from.state("mover") == "running")
        #expect(receiver.waitForError("refused a connection with a wrong token", timeout: 10), "\(receiver.stderr)")

        let moved = lab.atSource("migrate", "mover", endpoint, "--token", token, timeout: 120)
        #expect(moved.status == 0, "\(moved.stdout)\(moved.stderr)")
        #expect(moved.stdout.contains("VM 'mover' migrated to \(endpoint)") && moved.stdout.contains("downtime"), "\(moved.stdout)")
        #expect(moved.stderr.contains("round 1:"), "\(moved.stderr)")
        #expect(receiver.wait(timeout: 60) == 0, "\(receiver.stdout)\(receiver.stderr)")
        #expect(receiver.stdout.contains("VM 'mover' arrived from"), "\(receiver.stdout)")

        // Here now, running on from where it was.
        #expect(lab.to.state("mover") == "running")
        #expect(lab.to.waitFor(30) { Self.rounds(lab.to.consoleLog("mover")).count >= 20 }, "\(lab.to.consoleLog("mover").suffix(500))")
        let joined = Self.rounds(lab.from.consoleLog("mover") + lab.to.consoleLog("mover"))
        #expect(joined == Array(0..<joined.count), "rounds: …\(joined.suffix(30))")
        #expect(Self.rounds(lab.to.consoleLog("mover")).first ?? 0 > 20)
        #expect(!lab.to.consoleLog("mover").contains("MISMATCH"), "\(lab.to.consoleLog("mover").suffix(500))")
        #expect(lab.to.vmmLog("mover").contains("migration complete: the VM runs here"), "\(lab.to.vmmLog("mover"))")

        // Gone from there: stopped, its entry retired, the disk left where the destination uses it.
        let sourceDirectory = lab.from.root.appendingPathComponent("mover")
        #expect(lab.from.vmmLog("mover").contains("migrated to \(endpoint); the VM runs there now"), "\(lab.from.vmmLog("mover"))")
        #expect(lab.from.state("mover") == nil, "\(lab.atSource("list").stdout)")
        #expect(FileManager.default.fileExists(atPath: sourceDirectory.appendingPathComponent("MIGRATED").path))
        let disk = sourceDirectory.appendingPathComponent("disk0.qcow2").path
        let info = lab.atDestination("info", "mover", "--json").stdout
        #expect(info.replacingOccurrences(of: "\\/", with: "/").contains(disk), "\(info)")
        // Its lock went with it: nobody else may open the disk while it runs there.
        let check = Harness.run(["flock", "--nonblock", "--exclusive", disk, "true"])
        #expect(check.status == 1, "the disk is not locked by the destination: \(check.status) \(check.stderr)")

        #expect(lab.atDestination("stop", "mover", "--force").status == 0)
        let checked = Harness.run(["qemu-img", "check", disk])
        #expect(checked.status == 0, "\(checked.stdout)\(checked.stderr)")
    }

    @Test("live migration with the disk on an NBD export both hosts reach (TCP, served in the source's namespace), no copy: a receiver not told the server refuses it by name and the VM runs on; with --allow-disk-server it moves, its writes (on queue 1 of the multiqueue disk) go on at the destination, blocks the source wrote read back there, and every block is on the export")
    func migrateOnNetworkDisk() throws {
        let lab = try MigrationLab()
        let directory = try Harness.temporaryDirectory()
        let image = directory.appendingPathComponent("export.raw").path
        #expect(Harness.run(["truncate", "-s", "64M", image]).status == 0)
        let server = try NBDServer(image: image, port: 10809, host: MigrationLab.sourceAddress, namespace: lab.source)
        let uri = server.uri()
        // Two vCPUs, so the disk has two queues, and the guest writes on queue 1: the queue's
        // indices move with the VM, or its writes stop at the destination.
        #expect(lab.atSource("create", "onnbd", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk", "--cpus", "2",
                             "--cmdline", "console=ttyS0 probe=blkloop count=100000000 readback=1 queue=1").status == 0)
        let attached = lab.atSource("disk", "attach", "onnbd", uri)
        #expect(attached.status == 0, "\(attached.stderr)")
        #expect(lab.atSource("start", "onnbd").status == 0)
        #expect(lab.from.waitFor(30) { lab.from.consoleLog("onnbd").contains("blkloop: flushed 160") }, "\(lab.from.consoleLog("onnbd").suffix(300)) \(lab.from.vmmLog("onnbd"))")

        // The peer names the server; a receiver not told of it refuses, naming the flag.
        let (first, firstEndpoint, firstToken) = try lab.receive()
        let refused = lab.atSource("migrate", "onnbd", firstEndpoint, "--token", firstToken, timeout: 60)
        #expect(refused.status != 0 && refused.stderr.contains("--allow-disk-server \(MigrationLab.sourceAddress):10809"), "\(refused.stderr)")
        #expect(lab.from.state("onnbd") == "running")
        first.signal(SIGKILL)

        let (receiver, endpoint, token) = try lab.receive(["--allow-disk-server", "\(MigrationLab.sourceAddress):10809"])
        let moved = lab.atSource("migrate", "onnbd", endpoint, "--token", token, timeout: 120)
        #expect(moved.status == 0, "\(moved.stdout)\(moved.stderr)")
        #expect(receiver.wait(timeout: 60) == 0, "\(receiver.stdout)\(receiver.stderr)")
        #expect(lab.to.state("onnbd") == "running")
        #expect(lab.to.vmmLog("onnbd").contains("migration complete: the VM runs here"), "\(lab.to.vmmLog("onnbd"))")
        #expect(lab.to.vmmLog("onnbd").contains("0 disk bytes"), "the disk was copied: \(lab.to.vmmLog("onnbd"))")
        let flushedThere = { lab.to.consoleLog("onnbd").components(separatedBy: "blkloop: flushed").count }
        #expect(lab.to.waitFor(30) { flushedThere() > 40 }, "the guest's writes did not go on at the destination: \(lab.to.consoleLog("onnbd").suffix(300))")
        #expect(lab.atDestination("stop", "onnbd", "--force").status == 0)
        let console = lab.from.consoleLog("onnbd") + lab.to.consoleLog("onnbd")
        #expect(!console.contains("mismatch") && !console.contains("failed"), "\(console.suffix(300))")
        let last = console.components(separatedBy: "blkloop: flushed ").compactMap { Int($0.prefix { $0.isNumber }) }.max() ?? 0
        #expect(last > 160)
        let missing = try NetworkDiskTests.missingBlocks(image, count: last)
        #expect(missing.isEmpty, "blocks not on the export: \(missing.prefix(10)) of \(last)")
        #expect(lab.to.vireo("info", "onnbd").stdout.contains("\(uri) (raw, NBD export, 1 path)"), "\(lab.to.vireo("info", "onnbd").stdout)")
    }

    @Test("live migration with the disk in a shared dir pool both libraries define: no --allow-disks and no copy; a receiver whose pool of that directory is not marked shared refuses it, naming the way; with the shared pool the VM moves, its memory intact, the disk used in place")
    func migrateOnSharedPool() throws {
        let lab = try MigrationLab()
        let store = try Harness.temporaryDirectory().path
        #expect(lab.atSource("pool", "create", "san", "--type", "dir", store, "--shared").status == 0)
        #expect(lab.atDestination("pool", "create", "san", "--type", "dir", store).status == 0)
        let created = lab.atSource("create", "pooled", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--disk", "32M", "--pool", "san",
                                   "--cmdline", "console=ttyS0 probe=dirty spin=2000000")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(lab.atSource("start", "pooled").status == 0)
        #expect(lab.from.waitFor(30) { Self.rounds(lab.from.consoleLog("pooled")).count >= 10 })

        let (first, firstEndpoint, firstToken) = try lab.receive(allowSourceLibrary: false)
        let refused = lab.atSource("migrate", "pooled", firstEndpoint, "--token", firstToken, timeout: 60)
        #expect(refused.status != 0 && refused.stderr.contains("define a shared pool there"), "\(refused.stderr)")
        #expect(lab.from.state("pooled") == "running")
        first.signal(SIGKILL)

        #expect(lab.atDestination("pool", "delete", "san").status == 0)
        #expect(lab.atDestination("pool", "create", "san", "--type", "dir", store, "--shared").status == 0)
        let (receiver, endpoint, token) = try lab.receive(allowSourceLibrary: false)
        let moved = lab.atSource("migrate", "pooled", endpoint, "--token", token, timeout: 120)
        #expect(moved.status == 0, "\(moved.stdout)\(moved.stderr)")
        #expect(receiver.wait(timeout: 60) == 0, "\(receiver.stdout)\(receiver.stderr)")
        #expect(lab.to.state("pooled") == "running")
        #expect(lab.to.waitFor(30) { Self.rounds(lab.to.consoleLog("pooled")).count >= 10 }, "\(lab.to.consoleLog("pooled").suffix(300))")
        #expect(!lab.to.consoleLog("pooled").contains("MISMATCH"), "\(lab.to.consoleLog("pooled").suffix(300))")
        #expect(lab.to.vmmLog("pooled").contains("0 disk bytes"), "\(lab.to.vmmLog("pooled"))")
        let info = lab.atDestination("pool", "info", "san").stdout
        #expect(info.contains("pooled (\(store)/pooled.qcow2)"), "\(info)")
        #expect(lab.atDestination("stop", "pooled", "--force").status == 0)
        #expect(Harness.run(["qemu-img", "check", "\(store)/pooled.qcow2"]).status == 0)
    }

    @Test("auto-converge: a guest that dirties memory faster than the bandwidth cap is throttled step by step until it fits the downtime limit, and arrives intact; a migration cancelled with Ctrl-C leaves the source running unchanged and nothing behind at the destination")
    func autoConvergeAndCancel() throws {
        let lab = try MigrationLab()
        Self.createDirtying(lab, "busy", spin: 20_000_000)
        #expect(lab.atSource("start", "busy").status == 0)
        #expect(lab.from.waitFor(30) { Self.rounds(lab.from.consoleLog("busy")).count >= 20 })

        // Cancelled: at 1 MiB/s the first round alone takes seconds.
        let first = try lab.receive()
        let cancelled = lab.migrating(["busy", first.endpoint, "--token", first.token, "--bandwidth", "1M"])
        #expect(cancelled.waitForError("round 1:", timeout: 60), "\(cancelled.stderr)")
        cancelled.signal(SIGINT)
        #expect(cancelled.wait(timeout: 60) == 1)
        #expect(cancelled.stderr.contains("cancelled; the VM runs on here as before"), "\(cancelled.stderr)")
        #expect(lab.from.state("busy") == "running")
        let before = Self.rounds(lab.from.consoleLog("busy")).count
        #expect(lab.from.waitFor(30) { Self.rounds(lab.from.consoleLog("busy")).count >= before + 10 }, "the source stopped running")
        #expect(first.process.wait(timeout: 90) != 0, "\(first.process.stdout)\(first.process.stderr)")
        #expect(lab.atDestination("list").stdout.contains("busy") == false)
        #expect(!lab.from.consoleLog("busy").contains("MISMATCH"))
        #expect(lab.from.vmmLog("busy").contains("cancelled; the VM runs on here"), "\(lab.from.vmmLog("busy"))")

        // Converged: 16 MiB/s against a guest rewriting its 8 MiB dozens of times a second, 50 ms allowed.
        let second = try lab.receive()
        let moved = lab.atSource("migrate", "busy", second.endpoint, "--token", second.token, "--bandwidth", "16M", "--max-downtime", "50ms", timeout: 300)
        #expect(moved.status == 0, "\(moved.stdout)\(moved.stderr)")
        #expect(moved.stderr.contains("guest throttled"), "\(moved.stderr)")
        #expect(moved.stdout.contains("guest throttled up to"), "\(moved.stdout)")
        #expect(second.process.wait(timeout: 60) == 0, "\(second.process.stderr)")
        #expect(lab.to.waitFor(30) { Self.rounds(lab.to.consoleLog("busy")).count >= 20 })
        let joined = Self.rounds(lab.from.consoleLog("busy") + lab.to.consoleLog("busy"))
        #expect(joined == Array(0..<joined.count), "rounds: …\(joined.suffix(30))")
        #expect(!lab.to.consoleLog("busy").contains("MISMATCH"))
        // The throttle ends with the migration: the guest runs at full speed there.
        let log = lab.from.vmmLog("busy")
        #expect(log.contains("its vCPUs are throttled to"), "\(log)")
        #expect(lab.atDestination("stop", "busy", "--force").status == 0)
    }

    @Test("--copy-disks: a guest writing its disk throughout is moved with a copy of it (blocks written during the copy sent again); the destination's image holds every block the guest wrote, before and after the switch-over, the source keeps its own VM stopped and clean")
    func copyDisks() throws {
        let lab = try MigrationLab()
        let created = lab.atSource("create", "writer", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--disk", "64M",
                                   "--cmdline", "console=ttyS0 probe=blkloop count=2048")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(lab.atSource("start", "writer").status == 0)
        #expect(lab.from.waitFor(60) { lab.from.consoleLog("writer").contains("blkloop: flushed 64") }, "\(lab.from.consoleLog("writer").suffix(300))")
        let (receiver, endpoint, token) = try lab.receive(["--name", "copied"])
        // Capped so the guest writes while its disk is being copied.
        let moved = lab.atSource("migrate", "writer", endpoint, "--token", token, "--copy-disks", "--bandwidth", "16M", timeout: 300)
        #expect(moved.status == 0, "\(moved.stdout)\(moved.stderr)")
        #expect(moved.stderr.contains("stays defined here, stopped"), "\(moved.stderr)")
        #expect(receiver.wait(timeout: 60) == 0, "\(receiver.stderr)")
        let atSwitch = lab.from.consoleLog("writer")
        #expect(!atSwitch.contains("blkloop: finished"), "the guest finished before it moved; nothing was written during the copy")
        #expect(lab.to.waitFor(300) { lab.to.consoleLog("copied").contains("blkloop: finished") }, "\(lab.to.consoleLog("copied").suffix(300))")
        #expect(!lab.to.consoleLog("copied").contains("failed"), "\(lab.to.consoleLog("copied").suffix(300))")
        #expect(lab.atDestination("stop", "copied", "--force").status == 0)
        #expect(lab.from.state("writer") == "stopped")

        // Every block i holds its pattern (byte j = j*13 + i), whichever side wrote it.
        let image = lab.to.root.appendingPathComponent("copied/disk0.qcow2").path
        #expect(Harness.run(["qemu-img", "check", image]).status == 0)
        let raw = try Harness.temporaryDirectory().appendingPathComponent("copied.raw").path
        #expect(Harness.run(["qemu-img", "convert", "-O", "raw", image, raw]).status == 0)
        let verify = Harness.run(["python3", "-c", """
            import sys
            data = open(sys.argv[1], "rb").read()
            bad = [i for i in range(2048) if data[i*4096:(i+1)*4096] != bytes(((j * 13 + i) & 255) for j in range(4096))]
            print("bad", len(bad), bad[:10])
            """, raw])
        #expect(verify.stdout.hasPrefix("bad 0 "), "\(verify.stdout)\(verify.stderr)")
        #expect(Harness.run(["qemu-img", "check", lab.from.root.appendingPathComponent("writer/disk0.qcow2").path]).status == 0)
    }

    @Test("--copy-disks of a VM on an NBD export: the ranges qemu-nbd's BLOCK_STATUS calls zeros are not read (the source's log says how many MiB), the blocks the guest wrote and the export's own data arrive in the destination's copy; `vireo disk info` gives the export's allocated bytes from the same answers")
    func copyNetworkDisk() throws {
        let lab = try MigrationLab()
        let directory = try Harness.temporaryDirectory()
        let image = directory.appendingPathComponent("sparse.raw").path
        #expect(Harness.run(["truncate", "-s", "256M", image]).status == 0)
        // 3 MiB of data at 100 MiB, the rest of the 256 MiB a hole in the server's file.
        #expect(Harness.run(["dd", "if=/dev/urandom", "of=\(image)", "bs=1M", "count=3", "seek=100", "conv=notrunc"]).status == 0)
        let server = try NBDServer(image: image, port: 10809, host: MigrationLab.sourceAddress, namespace: lab.source)
        let uri = server.uri()
        let described = lab.atSource("disk", "info", uri)
        #expect(described.stdout.contains("allocated:     3 MiB (3145728 bytes)"), "\(described.stdout) \(described.stderr)")
        #expect(lab.atSource("create", "sparse", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk",
                             "--cmdline", "console=ttyS0 probe=blkloop count=100000000").status == 0)
        #expect(lab.atSource("disk", "attach", "sparse", uri).status == 0)
        #expect(lab.atSource("start", "sparse").status == 0)
        #expect(lab.from.waitFor(60) { lab.from.consoleLog("sparse").contains("blkloop: flushed 64") }, "\(lab.from.consoleLog("sparse").suffix(300))")

        let (receiver, endpoint, token) = try lab.receive(["--name", "copied"])
        let moved = lab.atSource("migrate", "sparse", endpoint, "--token", token, "--copy-disks", timeout: 300)
        #expect(moved.status == 0, "\(moved.stdout)\(moved.stderr)")
        #expect(receiver.wait(timeout: 60) == 0, "\(receiver.stderr)")
        let skippedLine = lab.from.vmmLog("sparse").split(separator: "\n").first { $0.contains("MiB of disk the server reported as zeros were not read") }
        let skipped = skippedLine.flatMap { Int($0.components(separatedBy: "migration: ").last?.prefix { $0.isNumber } ?? "") } ?? 0
        #expect(skipped >= 250, "the source read what the server called zeros: \(lab.from.vmmLog("sparse").suffix(600))")
        #expect(lab.atDestination("stop", "copied", "--force").status == 0)
        let copy = lab.to.root.appendingPathComponent("copied/disk0.qcow2").path
        let raw = directory.appendingPathComponent("copied.raw").path
        #expect(Harness.run(["qemu-img", "convert", "-O", "raw", copy, raw]).status == 0)
        #expect(try NetworkDiskTests.missingBlocks(raw, count: 64).isEmpty, "the copy lacks blocks the guest wrote")
        let data = 100 << 20 ..< 103 << 20
        #expect(try Data(contentsOf: URL(fileURLWithPath: raw))[data] == Data(contentsOf: URL(fileURLWithPath: image))[data], "the copy lacks the export's data")
        withExtendedLifetime(server) {}
    }

    @Test("the receiver takes hostile input: garbage, another magic and a wrong token are refused and it waits on; a VMM fed a stream with a bad checksum, an unknown message, an oversized one, pages outside guest RAM, a false page count, a damaged state or a sync with a payload fails with the reason (a sync alone is answered), tells the source, and exits")
    func hostileStreams() throws {
        let library = try TestLibrary()
        // The handshake, against a real receiver on loopback.
        let receiver = RunningProcess([Harness.vireo, "receive", "--listen", "127.0.0.1:0"], environment: ["VIREO_HOME": library.root.path])
        defer { receiver.signal(SIGKILL); _ = receiver.wait(timeout: 5) }
        #expect(receiver.waitForOutput("Token: ", timeout: 20) && receiver.waitForOutput("On the source", timeout: 5), "\(receiver.stderr)")
        let port = receiver.stdout.split(separator: "\n").first { $0.hasPrefix("Listening on ") }?.split(separator: ":").last.map(String.init) ?? ""
        let handshake = Harness.run(["python3", "-c", """
            import socket, struct, sys, zlib
            port, version = int(sys.argv[1]), int(sys.argv[2])
            def frame(kind, payload):
                return struct.pack("<IIQ", kind, zlib.crc32(payload), len(payload)) + payload
            for name, data in [("garbage", b"\\x00" * 64), ("magic", frame(1, b"NOTVIREO" + struct.pack("<I", 1) + b"x" * 32)),
                               ("version", frame(1, b"VIREOMIG" + struct.pack("<I", 99) + b"x" * 32)), ("token", frame(1, b"VIREOMIG" + struct.pack("<I", version) + b"0" * 32))]:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(data)
                try:
                    reply = s.recv(4096)
                except Exception as e:
                    reply = repr(e).encode()
                print(name, reply[16:].decode(errors="replace"))
                s.close()
            """, port, String(MigrationWire.version)])
        #expect(handshake.stdout.contains("magic malformed migration stream: the peer is not a Vireo migration source"), "\(handshake.stdout)\(handshake.stderr)")
        #expect(handshake.stdout.contains("version malformed migration stream: the source speaks migration stream version 99"), "\(handshake.stdout)")
        #expect(handshake.stdout.contains("token wrong token"), "\(handshake.stdout)")
        #expect(!receiver.hasExited, "the receiver gave up: \(receiver.stderr)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: library.root.path)) ?? []).filter { !$0.hasPrefix(".") }.isEmpty)

        // The VMM stream: a real source's first message captured, then damaged streams replayed to
        // a VMM taking a VM from them.
        let probe = try Harness.probe("pvh")
        let vmm = URL(fileURLWithPath: Harness.vireo).deletingLastPathComponent().appendingPathComponent("vireo-vmm").path
        let work = try Harness.temporaryDirectory().path
        let script = """
            import json, os, socket, struct, subprocess, sys, time, zlib
            vmm, probe, work = sys.argv[1:4]
            base = [vmm, "--kernel", probe, "--memory", "64M", "--cmdline", "console=ttyS0 probe=dirty spin=20000000"]
            def frame(kind, payload, crc=None):
                return struct.pack("<IIQ", kind, zlib.crc32(payload) if crc is None else crc, len(payload)) + payload
            def read_frame(s):
                head = b""
                while len(head) < 16:
                    more = s.recv(16 - len(head))
                    if not more: return None, b""
                    head += more
                kind, crc, length = struct.unpack("<IIQ", head)
                body = b""
                while len(body) < length: body += s.recv(length - len(body))
                return kind, body
            # A real source's machine message.
            control = os.path.join(work, "control.sock")
            source = subprocess.Popen(base + ["--control", control, "--console", "none"], stderr=subprocess.DEVNULL)
            for _ in range(100):
                if os.path.exists(control): break
                time.sleep(0.05)
            ours, theirs = socket.socketpair()
            c = socket.socket(socket.AF_UNIX); c.connect(control)
            socket.send_fds(c, [b"migrate tcp:test:1\\n"], [theirs.fileno()]); theirs.close()
            kind, machine = read_frame(ours)
            assert kind == 16, kind
            ours.close(); c.close(); source.kill(); source.wait()
            cases = {
                "checksum": frame(16, machine, crc=1),
                "unknown": frame(99, b""),
                "oversized": struct.pack("<IIQ", 17, 0, 1 << 40),
                "truncated": frame(16, machine[:20]),
                "outside": frame(16, machine) + frame(17, struct.pack("<Q", 1 << 40) + b"\\0" * 4096),
                "unaligned": frame(16, machine) + frame(17, struct.pack("<Q", 4096) + b"\\0" * 100),
                "count": frame(16, machine) + frame(17, struct.pack("<Q", 4096) + b"\\1" * 4096) + frame(21, b"\\0" + b"junk") ,
                "endcount": frame(16, machine) + frame(17, struct.pack("<Q", 4096) + b"\\1" * 4096) + frame(22, struct.pack("<QQ", 7, 0)),
                # A sync is answered (synced, 26) once what came before is in place; one with a payload is refused.
                "sync": frame(16, machine) + frame(17, struct.pack("<Q", 4096) + b"\\1" * 4096) + frame(25, b"") + frame(25, b"x"),
            }
            for name, data in cases.items():
                ours, theirs = socket.socketpair()
                dest = subprocess.Popen(base + ["--incoming-fd", str(theirs.fileno()), "--console", "none"], pass_fds=[theirs.fileno()],
                                        stderr=subprocess.PIPE)
                theirs.close()
                try:
                    ours.sendall(data)
                except OSError:
                    pass
                kind, reason = read_frame(ours)
                if name == "sync":
                    first = kind
                    kind, reason = read_frame(ours)
                    reason = b"after %d: " % first + reason
                status = dest.wait(timeout=30)
                print(name, status, kind, reason.decode(errors="replace").replace("\\n", " "))
            """
        let replay = Harness.run(["python3", "-c", script, vmm, probe, work], timeout: 120)
        let lines = replay.stdout.split(separator: "\n").map(String.init)
        func outcome(_ name: String) -> String { lines.first { $0.hasPrefix(name + " ") } ?? "(no line for \(name)) \(replay.stdout)\(replay.stderr)" }
        #expect(outcome("checksum").hasPrefix("checksum 2 24 ") && outcome("checksum").contains("failed its checksum"), "\(outcome("checksum"))")
        #expect(outcome("unknown").hasPrefix("unknown 2 24 ") && outcome("unknown").contains("unknown message kind 99"), "\(outcome("unknown"))")
        #expect(outcome("oversized").hasPrefix("oversized 2 24 ") && outcome("oversized").contains("more than the"), "\(outcome("oversized"))")
        #expect(outcome("truncated").hasPrefix("truncated 2 24 ") && outcome("truncated").contains("malformed"), "\(outcome("truncated"))")
        #expect(outcome("outside").hasPrefix("outside 2 24 ") && outcome("outside").contains("not whole pages inside guest RAM"), "\(outcome("outside"))")
        #expect(outcome("unaligned").hasPrefix("unaligned 2 24 ") && outcome("unaligned").contains("not whole pages inside guest RAM"), "\(outcome("unaligned"))")
        #expect(outcome("count").hasPrefix("count 2 24 ") && outcome("count").contains("the machine's state"), "\(outcome("count"))")
        #expect(outcome("endcount").hasPrefix("endcount 2 24 ") && outcome("endcount").contains("without the machine's state"), "\(outcome("endcount"))")
        #expect(outcome("sync").hasPrefix("sync 2 24 after 26: ") && outcome("sync").contains("a sync carries 1 bytes"), "\(outcome("sync"))")
    }

    @Test("the tiny Linux kernel migrated mid-boot between two libraries reaches Run /init at the destination without booting again, and its printk clock never goes backwards",
          .timeLimit(.minutes(25)))
    func linuxMigratedMidBoot() throws {
        let lab = try MigrationLab()
        let kernel = try LinuxKernelTests.kernelDirectory.get().appendingPathComponent("vmlinux")
        let initramfs = try LinuxKernelTests.makeInitramfs(in: try Harness.temporaryDirectory())
        let created = lab.atSource("create", "tux", "--ostype", "linux-64", "--kernel", kernel.path, "--initrd", initramfs.path,
                                   "--memory", "256M", "--no-disk", "--acpi", "off",
                                   "--cmdline", "console=ttyS0 \(LinuxKernelTests.emulatorSafeOptions) printk.time=1 panic=-1 reboot=k")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(lab.atSource("start", "tux").status == 0)
        // Mid-boot: the kernel runs in (emulated) kernel mode with its timers armed.
        #expect(lab.from.waitFor(600) { lab.from.consoleLog("tux").contains("Memory: ") }, "\(lab.from.consoleLog("tux").suffix(2000))")
        let (receiver, endpoint, token) = try lab.receive()
        let moved = lab.atSource("migrate", "tux", endpoint, "--token", token, timeout: 300)
        #expect(moved.status == 0, "\(moved.stdout)\(moved.stderr)")
        #expect(receiver.wait(timeout: 120) == 0, "\(receiver.stderr)")
        #expect(!lab.from.consoleLog("tux").contains("Run /init as init process"), "it reached init before it moved")
        #expect(lab.to.waitFor(900) { lab.to.consoleLog("tux").contains("Run /init as init process") }, "\(lab.to.consoleLog("tux").suffix(3000))")
        let arrived = lab.to.consoleLog("tux")
        #expect(!arrived.contains("Linux version"), "it booted again at the destination: \(arrived.prefix(2000))")
        let whole = lab.from.consoleLog("tux") + arrived
        let stamps = whole.split(whereSeparator: \.isNewline).compactMap { text -> Double? in
            let line = text.drop { $0 == " " || $0 == "\r" }
            guard line.hasPrefix("["), let close = line.firstIndex(of: "]") else { return nil }
            return Double(line[line.index(after: line.startIndex)..<close].trimmingCharacters(in: .whitespaces))
        }
        #expect(stamps.count > 50)
        let backwards = zip(stamps, stamps.dropFirst()).filter { $0.1 < $0.0 }
        #expect(backwards.isEmpty, "printk time went backwards: \(backwards.prefix(5))")
        #expect(lab.atDestination("stop", "tux", "--force").status == 0)
    }
}
