import Foundation
import Testing

/// A network namespace with one tap device, up, so guests' frames have somewhere to go that
/// touches nothing on the host. Removed (with its tap) when released.
final class NetworkNamespace: @unchecked Sendable {
    let name = "vireo-\(UInt32.random(in: 0...UInt32.max))"
    let tap: String

    /// `multiqueue`: the tap is made with `multi_queue`, for cards with `queues=N` (which
    /// only such a tap accepts, and which a one-queue card cannot open).
    init(tap: String = "vtap0", address: String? = nil, multiqueue: Bool = false) throws {
        self.tap = tap
        var commands = [["ip", "netns", "add", name],
                        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                        ["ip", "netns", "exec", name, "ip", "tuntap", "add", tap, "mode", "tap"] + (multiqueue ? ["multi_queue"] : []),
                        ["ip", "netns", "exec", name, "ip", "link", "set", tap, "up"]]
        if let address { commands.append(["ip", "netns", "exec", name, "ip", "address", "add", address, "dev", tap]) }
        for command in commands {
            let result = Harness.run(command)
            guard result.status == 0 else { throw HarnessError("\(command.joined(separator: " ")) failed: \(result.stderr)") }
        }
    }

    deinit { Harness.run(["ip", "netns", "del", name]) }

    /// `arguments` run inside the namespace.
    func inside(_ arguments: [String]) -> [String] { ["ip", "netns", "exec", name] + arguments }
}

@Suite(.serialized)
struct VirtioNetGuestTests {
    @Test("a probe's virtio-net driver sends a frame through a tap to a host socket and gets one back; so does a card with 2 queue pairs on a multiqueue tap, whose driver (the probe's) does not take multiqueue", arguments: [1, 2])
    func frameRoundTrip(pairs: Int) throws {
        try Harness.requireKVM()
        let namespace = try NetworkNamespace(multiqueue: pairs > 1)
        let echo = RunningProcess(namespace.inside(["python3", Harness.packageRoot.appendingPathComponent("probes/ether-echo.py").path, namespace.tap]))
        defer { echo.signal(SIGKILL); _ = echo.wait(timeout: 5) }
        #expect(echo.waitForOutput("ready", timeout: 10), "\(echo.stderr)")
        let result = Harness.run(namespace.inside([Harness.vireo, "run", "--kernel", try Harness.probe("pvh"), "--memory", "64M",
                                                   "--net", "tap:\(namespace.tap),mac=02:11:22:33:44:55" + (pairs > 1 ? ",queues=\(pairs)" : ""),
                                                   "--cmdline", "console=ttyS0 probe=net"]), timeout: 60)
        #expect(result.status == 0, "\(result.stderr)")
        if pairs > 1 {
            #expect(result.stderr.contains("(\(pairs) queue pairs; the driver asked for 0 at most, uses 1)"), "\(result.stderr)")
            #expect(!result.stderr.contains("tap queue attach/detach refused"), "\(result.stderr)")
        }
        #expect(result.stdout.contains("net: mac=02:11:22:33:44:55 link=1"), "\(result.stdout)")
        #expect(result.stdout.contains("net: reply from "), "\(result.stdout)")
        #expect(result.stdout.contains(" to 02:11:22:33:44:55 payload=vireo-pong vireo-ping"), "\(result.stdout)")
        #expect(echo.stdout.contains("answered 02:11:22:33:44:55 vireo-ping"), "\(echo.stdout)")
    }

    @Test("without mac= the card gets a random unicast, locally administered address")
    func generatedMAC() throws {
        try Harness.requireKVM()
        let namespace = try NetworkNamespace()
        let result = Harness.run(namespace.inside([Harness.vireo, "run", "--kernel", try Harness.probe("pvh"), "--memory", "64M",
                                                   "--net", "tap:\(namespace.tap)", "--cmdline", "console=ttyS0 probe=net count=1"]), timeout: 60)
        let line = try #require(result.stdout.replacingOccurrences(of: "\r", with: "").split(separator: "\n").first { $0.hasPrefix("net: mac=") }, "\(result.stdout)")
        let first = try #require(UInt8(line.dropFirst("net: mac=".count).prefix(2), radix: 16))
        #expect(first & 0x01 == 0, "multicast bit set in \(line)")
        #expect(first & 0x02 == 0x02, "not locally administered: \(line)")
    }

    @Test("bad --net values and a busy tap are refused with the reason")
    func refusals() throws {
        try Harness.requireKVM()
        let probe = try Harness.probe("pvh")
        let cases: [(String, String)] = [
            ("bridge:br0", "--net: 'bridge:br0' is not tap:NAME, tap-fd:N or stream-fd:N, then [,mac=XX:XX:XX:XX:XX:XX]"),
            ("tap:x,mac=01:00:00:00:00:01", "--net: card 0: '01:00:00:00:00:01' is not a unicast MAC address like 52:54:00:12:34:56"),
            ("tap:x,mac=zz", "--net: card 0: 'zz' is not a unicast MAC address"),
            ("tap:averyveryverylongname", "--net: tap name 'averyveryverylongname' must be 1 to 15 printable characters"),
            ("tap:x,speed=10", "--net: unknown option 'speed=10' in 'tap:x,speed=10'; allowed: mac="),
            ("tap:x,queues=9", "--net: card 0: 9 queue pairs is not allowed; use 1 to 8"),
            ("tap:x,queues=many", "--net: card 0: queues 'many' is not a number; allowed: 1 to 8"),
            ("tap-fd:5,queues=2", "--net: card 0: 2 queue pairs need a tap opened by name (tap:NAME); tap-fd:5 is one queue"),
            ("tap:x,queue-fds=6", "--net: card 0: queue-fds are the other queues of an inherited tap (tap-fd:N); tap:x has none"),
            ("tap-fd:5,queue-fds=5", "--net: card 0: a tap queue descriptor is named twice"),
            ("tap-fd:5,queue-fds=6+7+8+9+10+11+12+13", "--net: card 0: 9 queue pairs is not allowed; use 1 to 8"),
            ("tap-fd:5,queue-fds=1", "--net: card 0: queue descriptor 1 is not an inherited descriptor (3 to 65535)"),
            ("tap-fd:5,queue-fds=6+x", "--net: card 0: queue-fds '6+x' is not descriptor numbers joined by +"),
        ]
        for (value, message) in cases {
            let result = Harness.vireoRun(["--kernel", probe, "--net", value])
            #expect(result.status == 2, "\(value): \(result.stderr)")
            #expect(result.stderr.contains(message), "\(value): \(result.stderr)")
        }
        let namespace = try NetworkNamespace()
        let first = RunningProcess(namespace.inside([Harness.vireo, "run", "--kernel", probe, "--memory", "64M", "--console", "none",
                                                     "--net", "tap:\(namespace.tap)", "--cmdline", "console=ttyS0 probe=ticker"]))
        defer { first.signal(SIGKILL); _ = first.wait(timeout: 5) }
        Thread.sleep(forTimeInterval: 1)
        let second = Harness.run(namespace.inside([Harness.vireo, "run", "--kernel", probe, "--net", "tap:\(namespace.tap)"]))
        #expect(second.status == 2)
        #expect(second.stderr.contains("--net: cannot open tap device '\(namespace.tap)': Device or resource busy (another process has it open)"), "\(second.stderr)")
        // queues=2 on a tap made without multi_queue: refused, saying how to make one.
        let oneQueue = Harness.run(namespace.inside([Harness.vireo, "run", "--kernel", probe, "--net", "tap:\(namespace.tap),queues=2"]))
        #expect(oneQueue.status == 2)
        #expect(oneQueue.stderr.contains("multi_queue"), "\(oneQueue.stderr)")
    }

    @Test("a library VM keeps the MAC it was created with, and its card works after vireo start")
    func libraryVMNetwork() throws {
        let library = try TestLibrary()
        let namespace = try NetworkNamespace()
        let echo = RunningProcess(namespace.inside(["python3", Harness.packageRoot.appendingPathComponent("probes/ether-echo.py").path, namespace.tap]))
        defer { echo.signal(SIGKILL); _ = echo.wait(timeout: 5) }
        #expect(echo.waitForOutput("ready", timeout: 10))
        let created = library.vireo("create", "netvm", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk",
                                    "--net", "tap:\(namespace.tap)", "--cmdline", "console=ttyS0 probe=net")
        #expect(created.status == 0, "\(created.stderr)")
        let info = library.vireo("info", "netvm", "--json").stdout
        let mac = try #require(info.range(of: #"[0-9a-f]{2}(:[0-9a-f]{2}){5}"#, options: .regularExpression).map { String(info[$0]) }, "\(info)")
        for run in 0..<2 {
            let started = Harness.run(namespace.inside([Harness.vireo, "start", "netvm"]), environment: ["VIREO_HOME": library.root.path])
            #expect(started.status == 0, "\(started.stderr)")
            // The probe resets once answered, which ends the VM.
            #expect(library.waitFor(30) { library.state("netvm") == "stopped" }, "run \(run)")
            let console = library.consoleLog("netvm")
            #expect(console.contains("net: mac=\(mac) link=1"), "run \(run): \(console)")
            #expect(console.contains("payload=vireo-pong vireo-ping"), "run \(run): \(console)")
        }
    }

    /// The probe's TCP server with tso=1 through a tap: it answers "big" with 4000 bytes handed
    /// over as one segment (partial checksum, GSO_TCPV4), and reports how the host's 4000 bytes
    /// arrived. Returns the probe's console and what the host received.
    func offloadExchange(offloads: Bool) throws -> (console: String, fromGuest: Data, reply: String, expected: String) {
        let namespace = try NetworkNamespace(address: "10.0.9.1/24")
        let guest = RunningProcess(namespace.inside([Harness.vireo, "run", "--kernel", try Harness.probe("pvh"), "--memory", "64M",
                                                     "--net", "tap:\(namespace.tap)" + (offloads ? "" : ",offload=off"),
                                                     "--cmdline", "console=ttyS0 probe=ip addr=10.0.9.2/24 serve=9000 tso=1"]))
        defer { guest.signal(SIGKILL); _ = guest.wait(timeout: 5) }
        #expect(guest.waitForOutput("ip: serving tcp and udp port 9000", timeout: 30), "\(guest.stdout) \(guest.stderr)")
        let script = """
            import socket, sys
            s = socket.create_connection(("10.0.9.2", 9000), timeout=10)
            s.sendall(b"big")
            got = b""
            while len(got) < 4000:
                chunk = s.recv(65536)
                if not chunk: break
                got += chunk
            sys.stdout.buffer.write(got[:4000].hex().encode() + b"\\n")
            bulk = bytes((i * 7 + 3) % 256 for i in range(4000))
            h = 2166136261
            for b in bulk: h = ((h ^ b) * 16777619) & 0xffffffff
            s.sendall(bulk)
            print(s.recv(100).decode())
            print("ok:4000:%08x" % h)
            """
        let host = Harness.run(namespace.inside(["python3", "-c", script]), timeout: 30)
        let lines = host.stdout.split(separator: "\n").map(String.init)
        #expect(lines.count == 3, "\(host.stdout) \(host.stderr)")
        let fromGuest = lines.first.flatMap { hex in
            Data(stride(from: 0, to: hex.count - 1, by: 2).compactMap { UInt8(hex.dropFirst($0).prefix(2), radix: 16) })
        } ?? Data()
        _ = guest.waitForOutput("ip: bulk received", timeout: 10)
        return (guest.stdout, fromGuest, lines.count > 1 ? lines[1] : "", lines.count > 2 ? lines[2] : "-")
    }

    @Test("offloads: with a Linux-like driver's features (checksum, TSO, mergeable buffers) a 4000-byte segment goes to the host whole with a partial checksum, and the host's segments arrive in one frame over several receive buffers")
    func offloadsThroughTheTap() throws {
        try Harness.requireKVM()
        let pattern = Data((0..<4000).map { UInt8(ascii: "a") + UInt8($0 % 26) })
        // Without TSO the probe sends 1400-byte segments, the pattern restarting in each.
        let segmented = Data((0..<4000).map { UInt8(ascii: "a") + UInt8(($0 % 1400) % 26) })
        let on = try offloadExchange(offloads: true)
        // CSUM | GUEST_CSUM | GUEST_TSO4 | HOST_TSO4 | MRG_RXBUF, with MAC and STATUS.
        #expect(on.console.contains("net: features=0x188a3"), "\(on.console)")
        #expect(on.console.contains("ip: sent 4000 bytes in one segment"))
        #expect(on.fromGuest == pattern, "the host got \(on.fromGuest.count) bytes")
        #expect(on.reply == on.expected, "guest: \(on.reply), host: \(on.expected)")
        let merged = try #require(on.console.range(of: #"largest frame (\d+) in (\d+) buffers"#, options: .regularExpression).map { String(on.console[$0]) })
        let numbers = merged.split(separator: " ").compactMap { Int($0) }
        #expect(numbers.count == 2 && numbers[0] > 1514 && numbers[1] >= 2, "\(merged): the host's segments should come as one big frame")

        // offload=off: only mergeable buffers are offered; the host segments to the MTU itself.
        let off = try offloadExchange(offloads: false)
        #expect(off.console.contains("net: features=0x18020"), "\(off.console)")
        #expect(off.console.contains("ip: sent 4000 bytes in 3 segments"))
        #expect(off.fromGuest == segmented, "the host got \(off.fromGuest.count) bytes")
        #expect(off.reply == off.expected, "guest: \(off.reply), host: \(off.expected)")
        let plain = try #require(off.console.range(of: #"largest frame (\d+) in (\d+) buffers"#, options: .regularExpression).map { String(off.console[$0]) })
        let sizes = plain.split(separator: " ").compactMap { Int($0) }
        #expect(sizes.count == 2 && sizes[0] <= 1514 && sizes[1] == 1, "\(plain)")
    }
}
