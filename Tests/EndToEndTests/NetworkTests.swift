import Foundation
import Testing

/// Two namespaces this test makes: "host", where vireo runs and its networks live, and
/// "internet", one veth away, playing the rest of the world (203.0.113.0/24, TEST-NET-3). Nothing
/// outside them is touched or contacted.
final class NetworkLab: @unchecked Sendable {
    let host = "vireo-host-\(UInt32.random(in: 0...UInt32.max))"
    let internet = "vireo-inet-\(UInt32.random(in: 0...UInt32.max))"
    static let hostAddress = "203.0.113.1"
    static let internetAddress = "203.0.113.2"
    let library: TestLibrary
    private var servers: [RunningProcess] = []

    init() throws {
        library = try TestLibrary()
        let commands = [
            ["ip", "netns", "add", host], ["ip", "netns", "add", internet],
            ["ip", "-n", host, "link", "set", "lo", "up"], ["ip", "-n", internet, "link", "set", "lo", "up"],
            ["ip", "link", "add", "vx0", "netns", host, "type", "veth", "peer", "name", "vx1", "netns", internet],
            ["ip", "-n", host, "address", "add", "\(Self.hostAddress)/24", "dev", "vx0"], ["ip", "-n", host, "link", "set", "vx0", "up"],
            ["ip", "-n", internet, "address", "add", "\(Self.internetAddress)/24", "dev", "vx1"], ["ip", "-n", internet, "link", "set", "vx1", "up"],
            ["ip", "-n", host, "route", "add", "default", "via", Self.internetAddress],
        ]
        for command in commands {
            let result = Harness.run(command)
            guard result.status == 0 else { throw HarnessError("\(command.joined(separator: " ")) failed: \(result.stderr)") }
        }
    }

    deinit {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: library.root.path)) ?? [] where !name.hasPrefix(".") && name != "networks" {
            _ = vireo("stop", name, "--force", timeout: 30)
        }
        for server in servers { server.signal(SIGKILL); _ = server.wait(timeout: 5) }
        Harness.run(["ip", "netns", "del", host])
        Harness.run(["ip", "netns", "del", internet])
    }

    /// vireo inside the host namespace, on this lab's library.
    @discardableResult
    func vireo(_ arguments: String..., timeout: TimeInterval = 60) -> Harness.Completed {
        vireo(arguments: arguments, timeout: timeout)
    }

    func vireo(arguments: [String], timeout: TimeInterval = 60) -> Harness.Completed {
        Harness.run(["ip", "netns", "exec", host, Harness.vireo] + arguments, timeout: timeout, environment: ["VIREO_HOME": library.root.path])
    }

    func inHost(_ arguments: [String], timeout: TimeInterval = 30) -> Harness.Completed {
        Harness.run(["ip", "netns", "exec", host] + arguments, timeout: timeout)
    }

    /// A UDP echo server ("pong:DATA|from:SOURCE") in `namespace`, so the answer says whose
    /// address the packet arrived from.
    func udpEcho(in namespace: String, address: String, port: Int) {
        let script = """
            import socket, sys
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((sys.argv[1], int(sys.argv[2])))
            print("ready", flush=True)
            while True:
                d, a = s.recvfrom(2048)
                s.sendto(b"pong:" + d + b"|from:" + a[0].encode(), a)
            """
        let server = RunningProcess(["ip", "netns", "exec", namespace, "python3", "-c", script, address, String(port)])
        #expect(server.waitForOutput("ready", timeout: 10), "\(server.stderr)")
        servers.append(server)
    }

    /// One TCP or UDP exchange from `namespace`: sends "hello", returns the answer (or the error).
    func exchange(_ proto: String, from namespace: String, to address: String, port: Int) -> String {
        let script = """
            import socket, sys
            proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
            try:
                if proto == "tcp":
                    s = socket.create_connection((host, port), timeout=5); s.sendall(b"hello"); print(s.recv(100).decode())
                else:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.sendto(b"hello", (host, port)); print(s.recvfrom(100)[0].decode())
            except Exception as e:
                print("error:", type(e).__name__)
            """
        return Harness.run(["ip", "netns", "exec", namespace, "python3", "-c", script, proto, address, String(port)], timeout: 20).stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func createProbe(_ name: String, command: String, extra: [String]) {
        let created = vireo(arguments: ["create", name, "--kernel", (try? Harness.probe("pvh")) ?? "", "--memory", "64M", "--no-disk",
                                        "--cmdline", "console=ttyS0 probe=ip " + command] + extra)
        #expect(created.status == 0, "\(name): \(created.stderr)")
    }

    func start(_ name: String) {
        let started = vireo("start", name)
        #expect(started.status == 0, "\(name): \(started.stderr)")
    }

    /// Waits for `text` on the VM's console.
    func console(_ name: String, contains text: String, seconds: TimeInterval = 30) -> Bool {
        library.waitFor(seconds) { library.consoleLog(name).contains(text) }
    }

    func dhcpAddress(_ name: String) -> String? {
        let log = library.consoleLog(name)
        guard let range = log.range(of: "ip: dhcp address=") else { return nil }
        return String(log[range.upperBound...].prefix { $0 != " " })
    }

    func listedAddresses() -> [String: [String]] {
        let listed = vireo("list", "--json")
        guard let rows = try? JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]] else { return [:] }
        var result: [String: [String]] = [:]
        for row in rows { if let name = row["name"] as? String { result[name] = row["addresses"] as? [String] ?? [] } }
        return result
    }

    /// What an unchanged host namespace looks like: its links and its whole nftables ruleset.
    func hostState() -> String {
        inHost(["ip", "-br", "link"]).stdout + "\n---\n" + inHost(["nft", "list", "ruleset"]).stdout
    }
}

@Suite(.serialized)
struct NetworkTests {
    @Test("NAT (the default network): two probes get distinct DHCP leases (the second on a card with two queue pairs, a multiqueue tap) from its dnsmasq (the second VM's reservation without restarting it), `vireo list` shows them, guests reach 'the internet' masqueraded; after a simulated host reboot the network is rebuilt and the lease holds; after deleting everything the links and ruleset are as before",
          .timeLimit(.minutes(10)))
    func natNetwork() throws {
        let lab = try NetworkLab()
        let before = lab.hostState()
        lab.udpEcho(in: lab.internet, address: NetworkLab.internetAddress, port: 7777)
        lab.createProbe("n1", command: "send=\(NetworkLab.internetAddress):7777", extra: [])
        // n2's card has two queue pairs: Vireo makes its tap a multiqueue tap and hands the VMM
        // both queues; the probe (no multiqueue) uses the first, the second stays detached.
        lab.createProbe("n2", command: "send=\(NetworkLab.internetAddress):7777", extra: ["--nic", "nat,queues=2"])
        let pidFile = lab.library.root.appendingPathComponent("networks/default/dnsmasq.pid")
        func dnsmasqPID() -> Int32? {
            (try? String(contentsOf: pidFile, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        lab.start("n1")
        let served = dnsmasqPID()
        lab.start("n2")
        // n2's reservation reached the running dnsmasq without a restart (it re-reads its hosts
        // file on SIGHUP); the addresses below prove it serves it.
        #expect(served != nil && dnsmasqPID() == served, "dnsmasq \(String(describing: served)) became \(String(describing: dnsmasqPID()))")
        for name in ["n1", "n2"] {
            // The masquerade: the server saw the host's outside address, not the guest's.
            #expect(lab.console(name, contains: "ip: udp reply from \(NetworkLab.internetAddress):7777 payload=pong:vireo-udp 0|from:\(NetworkLab.hostAddress)"),
                    "\(name): \(lab.library.consoleLog(name))")
        }
        let first = try #require(lab.dhcpAddress("n1"), "\(lab.library.consoleLog("n1"))")
        let second = try #require(lab.dhcpAddress("n2"), "\(lab.library.consoleLog("n2"))")
        #expect(first != second)
        #expect(first.hasPrefix("192.168.122.") && second.hasPrefix("192.168.122."), "\(first) \(second)")
        #expect(lab.library.consoleLog("n1").contains("router=192.168.122.1 server=192.168.122.1"))
        let listed = lab.listedAddresses()
        #expect(listed["n1"] == [first] && listed["n2"] == [second], "\(listed)")
        let info = lab.vireo("network", "info", "default")
        #expect(info.stdout.contains("-> \(first) -> VM 'n1'") && info.stdout.contains("-> \(second) -> VM 'n2'"), "\(info.stdout)")
        #expect(lab.vireo("network", "list").stdout.contains("default  nat   192.168.122.0/24"))
        // The probes power off when done; their network stays up until a vireo command looks.
        #expect(lab.library.waitFor(20) { lab.library.state("n1") == "stopped" && lab.library.state("n2") == "stopped" })
        #expect(lab.library.vmmLog("n2").contains("(2 queue pairs; the driver asked for 0 at most, uses 1)"), "\(lab.library.vmmLog("n2"))")
        #expect(!lab.library.vmmLog("n2").contains("tap queue attach/detach refused"), "\(lab.library.vmmLog("n2"))")
        #expect(lab.vireo("info", "n2").stdout.contains(", 2 queue pairs"), "\(lab.vireo("info", "n2").stdout)")

        // As after a host reboot: only the definitions are left, no bridge, dnsmasq or table.
        if let pid = dnsmasqPID() { kill(pid, SIGKILL) }
        #expect(lab.inHost(["ip", "link", "delete", "vireo-default"]).status == 0)
        // The library's own table (each library has one: vireo_ and a hash of its path).
        let table = lab.inHost(["nft", "list", "tables"]).stdout.split(separator: "\n").first { $0.hasPrefix("table ip vireo_") }.map { String($0.dropFirst(9)) } ?? "?"
        #expect(lab.inHost(["nft", "delete", "table", "ip", table]).status == 0)
        // Restart n1: everything comes back; the same address (its reservation), a fresh tap.
        lab.start("n1")
        #expect(lab.library.waitFor(20) { lab.library.consoleLog("n1").contains("probe: done") })
        #expect(lab.dhcpAddress("n1") == first, "\(lab.library.consoleLog("n1"))")
        #expect(lab.library.consoleLog("n1").contains("|from:\(NetworkLab.hostAddress) after"), "\(lab.library.consoleLog("n1"))")

        // Stop (already off) takes the idle network down; delete everything: host as before.
        #expect(lab.vireo("stop", "n1").status == 0)
        for name in ["n1", "n2"] { #expect(lab.vireo("delete", name).status == 0) }
        let deleted = lab.vireo("network", "delete", "default")
        #expect(deleted.status == 0, "\(deleted.stderr)")
        #expect(lab.hostState() == before, "before:\n\(before)\nafter:\n\(lab.hostState())")
    }

    @Test("netns: a card in a pod's network namespace (as a CNI plugin leaves it: eth0 on a veth, holding the pod's address) with two queue pairs: Vireo makes a multiqueue tap inside that namespace, joined to eth0 by tc both ways; the probe's UDP ping from the pod's address is answered from the veth's other end; the VMM has both queues",
          .timeLimit(.minutes(3)))
    func podNamespaceCard() throws {
        let lab = try NetworkLab()
        let pod = "vireo-test-pod-\(getpid())", cni = "vireo-test-cni-\(getpid())"
        defer {
            Harness.run(["ip", "netns", "del", pod])
            Harness.run(["ip", "netns", "del", cni])
        }
        for command in [["ip", "netns", "add", pod], ["ip", "netns", "add", cni],
                        ["ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "cni0p", "netns", cni],
                        ["ip", "-n", pod, "address", "add", "10.88.0.2/24", "dev", "eth0"], ["ip", "-n", pod, "link", "set", "eth0", "up"],
                        ["ip", "-n", cni, "address", "add", "10.88.0.1/24", "dev", "cni0p"], ["ip", "-n", cni, "link", "set", "cni0p", "up"]] {
            let done = Harness.run(command)
            try #require(done.status == 0, "\(command): \(done.stderr)")
        }
        let link = Harness.run(["ip", "-n", pod, "-j", "link", "show", "eth0"]).stdout
        let mac = try #require(link.range(of: #"[0-9a-f]{2}(:[0-9a-f]{2}){5}"#, options: .regularExpression).map { String(link[$0]) }, "\(link)")
        lab.udpEcho(in: cni, address: "10.88.0.1", port: 7777)
        lab.createProbe("p1", command: "addr=10.88.0.2/24 gw=10.88.0.1 send=10.88.0.1:7777",
                        extra: ["--nic", "netns:/run/netns/\(pod),mac=\(mac),queues=2"])
        lab.start("p1")
        #expect(lab.console("p1", contains: "ip: udp reply from 10.88.0.1:7777 payload=pong:vireo-udp 0|from:10.88.0.2"),
                "\(lab.library.consoleLog("p1"))")
        #expect(lab.library.waitFor(20) { lab.library.state("p1") == "stopped" })
        #expect(lab.library.vmmLog("p1").contains("(2 queue pairs; the driver asked for 0 at most, uses 1)"), "\(lab.library.vmmLog("p1"))")
        #expect(!lab.library.vmmLog("p1").contains("tap queue attach/detach refused"), "\(lab.library.vmmLog("p1"))")
        #expect(lab.vireo("info", "p1").stdout.contains(", 2 queue pairs"), "\(lab.vireo("info", "p1").stdout)")
        #expect(lab.vireo("delete", "p1").status == 0)
    }

    @Test("host-only: a guest reaches the host but not beyond; internal: guests reach each other, the host has no address there and is not reached",
          .timeLimit(.minutes(10)))
    func hostOnlyAndInternal() throws {
        let lab = try NetworkLab()
        lab.udpEcho(in: lab.internet, address: NetworkLab.internetAddress, port: 7777)
        lab.udpEcho(in: lab.host, address: "0.0.0.0", port: 7778)
        let made = lab.vireo("network", "create", "lan", "--mode", "host-only", "--subnet", "10.41.0.0/24")
        #expect(made.status == 0, "\(made.stderr)")
        #expect(lab.vireo("network", "create", "wire", "--mode", "internal", "--subnet", "10.42.0.0/24").status == 0)
        lab.createProbe("h1", command: "send=10.41.0.1:7778", extra: ["--nic", "network:lan"])
        // A guest that sets itself a default route anyway is still not forwarded.
        lab.createProbe("h2", command: "addr=10.41.0.50/24 gw=10.41.0.1 send=\(NetworkLab.internetAddress):7777 tries=3", extra: ["--nic", "network:lan"])
        lab.createProbe("i1", command: "addr=10.42.0.10/24 serve=9000", extra: ["--nic", "network:wire"])
        lab.createProbe("i2", command: "addr=10.42.0.11/24 send=10.42.0.10:9000", extra: ["--nic", "network:wire"])
        lab.createProbe("i3", command: "addr=10.42.0.12/24 gw=10.42.0.1 send=\(NetworkLab.hostAddress):7778 tries=3", extra: ["--nic", "network:wire"])
        for name in ["h1", "h2", "i1"] { lab.start(name) }
        #expect(lab.console("i1", contains: "ip: serving tcp and udp port 9000"))
        for name in ["i2", "i3"] { lab.start(name) }

        #expect(lab.console("h1", contains: "ip: udp reply from 10.41.0.1:7778 payload=pong:vireo-udp 0|from:10.41.0."), "\(lab.library.consoleLog("h1"))")
        #expect(lab.console("h2", contains: "ip: no udp reply from \(NetworkLab.internetAddress):7777 after 3 tries"), "\(lab.library.consoleLog("h2"))")
        #expect(lab.library.consoleLog("h1").contains("router=0.0.0.0 server=10.41.0.1"), "a host-only network offers no default route: \(lab.library.consoleLog("h1"))")
        #expect(lab.console("i2", contains: "ip: udp reply from 10.42.0.10:9000 payload=echo:vireo-udp 0"), "\(lab.library.consoleLog("i2"))")
        #expect(lab.console("i3", contains: "ip: no ARP answer for the next hop to \(NetworkLab.hostAddress)"), "\(lab.library.consoleLog("i3"))")
        let bridges = lab.inHost(["ip", "-br", "address", "show", "type", "bridge"]).stdout
        #expect(bridges.contains("10.41.0.1/24"), "\(bridges)")
        let wire = bridges.split(separator: "\n").first { $0.hasPrefix("vireo-wire") } ?? ""
        #expect(!wire.isEmpty && !wire.contains("10.42."), "the internal bridge has no host address: \(bridges)")

        // A network in use cannot be deleted.
        let refused = lab.vireo("network", "delete", "wire")
        #expect(refused.status == 2 && refused.stderr.contains("network 'wire': VMs have cards on it: i1, i2, i3"), "\(refused.stderr)")
    }

    @Test("port forwards: TCP and UDP from the host's loopback, its own address and from outside reach a guest service and bring its answer back; added and removed while the VM runs; a killed VM leaves no tap and starts again",
          .timeLimit(.minutes(10)))
    func portForwards() throws {
        let lab = try NetworkLab()
        lab.createProbe("web", command: "serve=9000", extra: ["--forward", "tcp:8080:9000", "--forward", "udp:8081:9000"])
        lab.start("web")
        #expect(lab.console("web", contains: "ip: serving tcp and udp port 9000"), "\(lab.library.consoleLog("web"))")
        #expect(lab.exchange("tcp", from: lab.host, to: "127.0.0.1", port: 8080) == "echo:hello")
        #expect(lab.exchange("tcp", from: lab.host, to: NetworkLab.hostAddress, port: 8080) == "echo:hello")
        #expect(lab.exchange("tcp", from: lab.internet, to: NetworkLab.hostAddress, port: 8080) == "echo:hello")
        #expect(lab.exchange("udp", from: lab.host, to: "127.0.0.1", port: 8081) == "echo:hello")
        #expect(lab.exchange("udp", from: lab.internet, to: NetworkLab.hostAddress, port: 8081) == "echo:hello")
        #expect(lab.library.consoleLog("web").contains("ip: tcp echo to "))

        let added = lab.vireo("forward", "add", "web", "tcp:8090:9000")
        #expect(added.status == 0, "\(added.stderr)")
        #expect(lab.exchange("tcp", from: lab.host, to: "127.0.0.1", port: 8090) == "echo:hello")
        #expect(lab.vireo("forward", "remove", "web", "tcp:8090:9000").status == 0)
        #expect(lab.exchange("tcp", from: lab.host, to: "127.0.0.1", port: 8090) == "error: ConnectionRefusedError")
        #expect(lab.vireo("forward", "list", "web").stdout.contains("tcp    8080       9000"))
        let info = lab.vireo("info", "web").stdout
        #expect(info.contains("on nat (host interface vt") && info.contains("forwarding tcp:8080:9000 udp:8081:9000"), "\(info)")

        // Killed, as a crash would end it: its tap goes with it, and it starts again at once.
        let described = lab.vireo("info", "web", "--json").stdout
        let process = (try? JSONSerialization.jsonObject(with: Data(described.utf8)) as? [String: Any])?["process"] as? [String: Any]
        let pid = try #require(process?["pid"] as? Int, "\(described)")
        kill(Int32(pid), SIGKILL)
        #expect(lab.library.waitFor(10) { ["stopped", "crashed"].contains(lab.library.state("web") ?? "") })
        #expect(!lab.inHost(["ip", "-br", "link"]).stdout.contains("vt"), "\(lab.inHost(["ip", "-br", "link"]).stdout)")
        lab.start("web")
        #expect(lab.library.waitFor(20) { lab.library.consoleLog("web").contains("ip: serving tcp and udp port 9000") })
        #expect(lab.exchange("tcp", from: lab.host, to: "127.0.0.1", port: 8080) == "echo:hello")

        // Stopped: the forwards leave the firewall with the VM.
        let stopped = lab.vireo("stop", "web", "--force")
        #expect(stopped.status == 0 && !stopped.stderr.contains("warning"), "\(stopped.stdout) \(stopped.stderr)")
        #expect(!lab.inHost(["nft", "list", "ruleset"]).stdout.contains("dport 8080"),
                "stop said: \(stopped.stdout) \(stopped.stderr); links: \(lab.inHost(["ip", "-br", "link"]).stdout); state: \(lab.library.state("web") ?? "?")")
        #expect(lab.exchange("tcp", from: lab.host, to: "127.0.0.1", port: 8080) == "error: ConnectionRefusedError")
    }

    @Test("--nic user: a VM started by an unprivileged user gets DHCP from passt and reaches an echo server in its namespace through passt's gateway mapping",
          .timeLimit(.minutes(6)))
    func userModeWithoutRoot() throws {
        let lab = try NetworkLab()
        lab.udpEcho(in: lab.host, address: "0.0.0.0", port: 7779)
        // An unprivileged user the way Debian grants KVM (the kvm group's 0660): here an ACL for
        // `nobody` on /dev/kvm for this test only, removed however the test ends.
        let granted = Harness.run(["setfacl", "-m", "u:nobody:rw", "/dev/kvm"])
        #expect(granted.status == 0, "\(granted.stderr)")
        defer { Harness.run(["setfacl", "-x", "u:nobody", "/dev/kvm"]) }
        let home = try Harness.temporaryDirectory().appendingPathComponent("user-library")
        try FileManager.default.createDirectory(at: home, withIntermediateDirectories: true)
        let probe = try Harness.probe("pvh")
        // The probe sits in the test's temporary directory; give nobody its own copy.
        let kernel = home.appendingPathComponent("probe.elf").path
        try FileManager.default.copyItem(atPath: probe, toPath: kernel)
        #expect(Harness.run(["chown", "-R", "nobody:nogroup", home.path]).status == 0)
        func asNobody(_ arguments: [String]) -> Harness.Completed {
            Harness.run(["ip", "netns", "exec", lab.host, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                         "env", "VIREO_HOME=\(home.path)", Harness.vireo] + arguments, timeout: 60)
        }
        let created = asNobody(["create", "u1", "--kernel", kernel, "--memory", "64M", "--no-disk", "--nic", "user",
                                "--cmdline", "console=ttyS0 probe=ip send=\(NetworkLab.internetAddress):7779"])
        #expect(created.status == 0, "\(created.stderr)")
        let started = asNobody(["start", "u1"])
        #expect(started.status == 0, "\(started.stderr)")
        let log = { (try? String(contentsOf: home.appendingPathComponent("u1/console.log"), encoding: .utf8)) ?? "" }
        #expect(lab.library.waitFor(30) { log().contains("probe: done") }, "\(log())")
        // passt hands the guest the host's own address and the host's gateway as its router, and
        // maps traffic to the gateway address to the host itself.
        #expect(log().contains("ip: dhcp address=\(NetworkLab.hostAddress) mask=255.255.255.0 router=\(NetworkLab.internetAddress)"), "\(log())")
        #expect(log().contains("ip: udp reply from \(NetworkLab.internetAddress):7779 payload=pong:vireo-udp 0|from:127.0.0.1"), "\(log())")
        _ = asNobody(["stop", "u1", "--force"])
        // Without root, cards needing taps are refused with the way out.
        let nat = asNobody(["create", "u2", "--kernel", kernel, "--memory", "64M", "--no-disk", "--nic", "nat", "--cmdline", "probe=ip"])
        #expect(nat.status == 0, "\(nat.stderr)")
        let refused = asNobody(["start", "u2"])
        #expect(refused.status != 0 && refused.stderr.contains("without them use --nic user"), "\(refused.stderr)")
    }

    /// The archive indexes the installer fetches, which scripts/test.sh fetched from Debian's
    /// archive (scripts/make-installer-mirror.py, cached); served from the lab's "internet" as
    /// its Debian mirror.
    static func installerMirror() throws -> URL {
        let version = Harness.run(["dpkg-query", "-W", "-f=${Version}", "debian-installer-12-netboot-amd64"]).stdout
        let root = QEMUEngineTests.cacheDirectory.appendingPathComponent("installer-mirror-\(version.replacingOccurrences(of: "+", with: "_"))")
        guard FileManager.default.fileExists(atPath: root.appendingPathComponent("debian/.complete").path) else {
            throw HarnessError("\(root.path)/debian is missing: scripts/test.sh fetches it (scripts/make-installer-mirror.py)")
        }
        return root
    }

    // Shares the boot the nat test had (Debian's installer kernel getting its lease): the same
    // installer now runs unattended, from the test ISO, and gets much further.
    @Test("unattended install (qemu engine, TCG): Debian's installer, answered by Vireo's preseed, gets its lease on a nat card and goes through language, keyboard, network, host name and mirror with no key pressed, fetching and verifying the mirror's signed index; `vireo info` shows the step; no password on any command line or log; the finished marker ejects the ISO at the next start",
          .timeLimit(.minutes(12)))
    func unattendedInstallOnNAT() throws {
        let lab = try NetworkLab()
        let iso = try QEMUEngineTests.installerISO.get()
        let mirror = try Self.installerMirror()
        // The mirror, in the lab's "internet": the guest reaches it through the nat network.
        let server = RunningProcess(["ip", "netns", "exec", lab.internet, "python3", "-m", "http.server", "--bind", NetworkLab.internetAddress,
                                     "8080", "--directory", mirror.path])
        defer { server.signal(SIGKILL); _ = server.wait(timeout: 5) }
        let password = "correct horse battery staple"
        let passwordFile = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-password-\(UUID().uuidString)")
        try Data((password + "\n").utf8).write(to: passwordFile)
        defer { try? FileManager.default.removeItem(at: passwordFile) }

        let detected = lab.vireo("unattended", "detect", "--iso", iso.path)
        #expect(detected.status == 0 && detected.stdout.contains("Debian 12 (debian-installer") && detected.stdout.contains("from a mirror"), "\(detected.stdout)\(detected.stderr)")
        let created = lab.vireo("create", "inst", "--iso", iso.path, "--unattended", "--user", "alice", "--password-file", passwordFile.path,
                                "--full-name", "Alice Example", "--hostname", "box.example.org", "--locale", "de_DE", "--timezone", "Europe/Berlin",
                                "--packages", "curl,htop", "--mirror", "http://\(NetworkLab.internetAddress):8080/debian",
                                "--firmware", "bios", "--accel", "tcg", "--memory", "1G", "--disk", "4G", "--nic", "nat")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(created.stderr.contains("OS type debian-64, from the installer: Debian 12"), "\(created.stderr)")
        #expect(created.stdout.contains("unattended install: Debian 12") && created.stdout.contains("user alice (sudo)"), "\(created.stdout)")
        // The ISO is only read; the answers went into the VM's own copy of the initrd.
        let directory = lab.library.root.appendingPathComponent("inst")
        let initrd = try Data(contentsOf: directory.appendingPathComponent("install-initrd"))
        let original = try Data(contentsOf: URL(fileURLWithPath: "/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64/initrd.gz"))
        #expect(initrd.starts(with: original) && initrd.count > original.count, "the preseed is appended to the installer's own initrd")

        lab.start("inst")
        let console = { lab.library.consoleLog("inst") }
        // anna asking the mirror for its first component: every question before it was answered.
        let reached = lab.library.waitFor(540) { server.stderr.contains("GET /debian/pool/") }
        #expect(reached, "the installer never asked the mirror for a component; the mirror saw: \(server.stderr.suffix(1500)); console: \(console().suffix(3000))")
        let requests = server.stderr
        #expect(requests.contains("GET /debian/dists/bookworm/Release") || requests.contains("GET /debian/dists/bookworm/InRelease"), "\(requests.suffix(1500))")
        #expect(requests.contains("GET /debian/dists/bookworm/main/debian-installer/binary-amd64/Packages"), "\(requests.suffix(1500))")
        // (With auto=true and the locale preseeded, the language is chosen before the main menu runs.)
        for step in ["ethdetect", "netcfg", "choose-mirror", "download-installer"] {
            #expect(console().contains("Menu item '\(step)' selected"), "step \(step) missing: \(console().suffix(3000))")
        }
        let info = lab.vireo("info", "inst")
        #expect(info.stdout.contains("Unattended:") && info.stdout.contains("installing, step: Download installer components"), "\(info.stdout)")
        #expect(!(lab.listedAddresses()["inst"] ?? []).isEmpty, "no lease on the nat card")

        // The password is nowhere but (hashed) in the answers: not on QEMU's command line, not in a log.
        let vmmLog = (try? String(contentsOf: directory.appendingPathComponent("vmm.log"), encoding: .utf8)) ?? ""
        #expect(vmmLog.contains("auto=true priority=critical") && vmmLog.contains("-netdev tap,id=net0,fd="), "\(vmmLog.prefix(2000))")
        let processes = Harness.run(["ps", "-eo", "args"]).stdout
        let config = (try? String(contentsOf: directory.appendingPathComponent("config.json"), encoding: .utf8)) ?? ""
        var hash = "missing"
        if let found = config.range(of: "$y$") { hash = String(config[found.lowerBound...].prefix { $0 != "\"" }) }
        #expect(hash.hasPrefix("$y$"), "the hash is kept, the password is not")
        for text in [vmmLog, processes, console(), created.stdout + created.stderr, info.stdout] {
            #expect(!text.contains(password) && !text.contains(hash))
        }

        #expect(lab.vireo("stop", "inst", "--force").status == 0)
        let links = lab.inHost(["ip", "-br", "link"]).stdout
        #expect(!links.contains("vt") && !links.contains("vireo-default"), "\(links)")
        let stopped = lab.vireo("info", "inst")
        #expect(stopped.stdout.contains("stopped before the installer finished (last step: Download installer components)"), "\(stopped.stdout)")

        // The installer's end, as its late command writes it: the next start ejects the ISO, drops
        // the answers and boots the disk.
        let log = FileHandle(forWritingAtPath: directory.appendingPathComponent("console.log").path)
        log?.seekToEndOfFile()
        log?.write(Data("\nVIREO-UNATTENDED-INSTALL-FINISHED\n".utf8))
        try? log?.close()
        #expect(lab.vireo("info", "inst").stdout.contains("finished; the next start ejects the ISO"))
        let again = lab.vireo("start", "inst")
        #expect(again.status == 0 && again.stderr.contains("the unattended install finished on the last run"), "\(again.stderr)")
        let after = (try? JSONSerialization.jsonObject(with: Data(lab.vireo("info", "inst", "--json").stdout.utf8))) as? [String: Any] ?? [:]
        #expect(after["name"] as? String == "inst" && after["iso"] == nil && after["unattended"] == nil, "\(after)")
        #expect(!FileManager.default.fileExists(atPath: directory.appendingPathComponent("install-initrd").path))
        let restarted = (try? String(contentsOf: directory.appendingPathComponent("vmm.log"), encoding: .utf8)) ?? ""
        let lastStart = restarted.components(separatedBy: "vireo: starting").last ?? ""
        #expect(!lastStart.contains("-kernel") && lastStart.contains("id=cd0,media=cdrom,readonly=on -device"), "the disk boots, the drive is empty: \(lastStart.prefix(2000))")
        #expect(lab.vireo("stop", "inst", "--force").status == 0)
    }

    /// A "guest" that is only a network namespace on a veth plugged into `bridge`: it can send
    /// any frame a guest could.
    static func plugGuest(_ lab: NetworkLab, bridge: String, address: String) throws -> String {
        let guest = "vireo-guest-\(UInt32.random(in: 0...UInt32.max))"
        let device = "vg\(UInt16.random(in: 0...UInt16.max))"
        for command in [["ip", "netns", "add", guest], ["ip", "-n", guest, "link", "set", "lo", "up"],
                        ["ip", "-n", lab.host, "link", "add", device, "type", "veth", "peer", "name", "eth0", "netns", guest],
                        ["ip", "-n", lab.host, "link", "set", device, "master", bridge], ["ip", "-n", lab.host, "link", "set", device, "up"],
                        ["ip", "-n", guest, "address", "add", address, "dev", "eth0"], ["ip", "-n", guest, "link", "set", "eth0", "up"]] {
            let result = Harness.run(command)
            guard result.status == 0 else { throw HarnessError("\(command.joined(separator: " ")) failed: \(result.stderr)") }
        }
        // The bridge forwards from a new port once it is in the forwarding state (3).
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, lab.inHost(["cat", "/sys/class/net/\(device)/brport/state"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines) != "3" {
            Thread.sleep(forTimeInterval: 0.1)
        }
        return guest
    }

    /// A UDP listener in the lab's host namespace that prints every datagram it gets.
    static func udpListener(_ lab: NetworkLab, address: String, port: Int) -> RunningProcess {
        let listener = RunningProcess(["ip", "netns", "exec", lab.host, "python3", "-c", """
            import socket, sys
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((sys.argv[1], int(sys.argv[2])))
            print("ready", flush=True)
            while True:
                d, a = s.recvfrom(2048)
                print("got", d.decode(errors="replace"), "from", a[0], flush=True)
            """, address, String(port)])
        return listener
    }

    /// Sends one UDP datagram as a raw Ethernet frame from the guest's eth0 to `mac`, addressed to
    /// `destination`: what a guest can put on the wire whatever its routes say.
    static func craftedFrame(from guest: String, source: String, toMAC mac: String, destination: String, port: Int, payload: [UInt8]) -> Harness.Completed {
        Harness.run(["ip", "netns", "exec", guest, "python3", "-c", """
            import socket, struct, sys, time
            src, dst, mac, port, payload = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), bytes.fromhex(sys.argv[5])
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            s.bind(("eth0", 0))
            own = s.getsockname()[4]
            udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
            header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
            total = sum(struct.unpack("!10H", header))
            while total >> 16: total = (total & 0xffff) + (total >> 16)
            header = header[:10] + struct.pack("!H", ~total & 0xffff) + header[12:]
            frame = bytes.fromhex(mac.replace(":", "")) + own + b"\\x08\\x00" + header + udp
            for _ in range(3):
                s.send(frame)
                time.sleep(0.3)
            print("sent", flush=True)
            """, source, destination, mac, String(port), payload.map { String(format: "%02x", $0) }.joined()])
    }

    @Test("a NAT guest reaches only DHCP and DNS on the host: a frame it crafts to 127.0.0.1 through its gateway reaches no loopback-only listener, nor does one to a host service on the gateway's address; a forward from 127.0.0.1 still reaches the guest",
          .timeLimit(.minutes(5)))
    func natGuestsDoNotReachHostServices() throws {
        let lab = try NetworkLab()
        lab.createProbe("web", command: "serve=9000", extra: ["--forward", "tcp:8080:9000"])
        lab.start("web")
        #expect(lab.console("web", contains: "ip: serving tcp and udp port 9000"), "\(lab.library.consoleLog("web"))")
        let network = try JSONSerialization.jsonObject(with: Data(contentsOf: lab.library.root.appendingPathComponent("networks/default/network.json"))) as? [String: Any]
        let bridge = try #require(network?["bridge"] as? String)
        let guest = try Self.plugGuest(lab, bridge: bridge, address: "192.168.122.250/24")
        defer { Harness.run(["ip", "netns", "del", guest]) }
        // Read after the guest's port joined: a bridge takes the lowest MAC of its ports.
        let mac = lab.inHost(["cat", "/sys/class/net/\(bridge)/address"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let loopback = Self.udpListener(lab, address: "127.0.0.1", port: 7901)
        let anywhere = Self.udpListener(lab, address: "0.0.0.0", port: 7902)
        defer { for listener in [loopback, anywhere] { listener.signal(SIGKILL); _ = listener.wait(timeout: 5) } }
        #expect(loopback.waitForOutput("ready", timeout: 10) && anywhere.waitForOutput("ready", timeout: 10))

        // The host's own loopback traffic works, so a silent listener below means a dropped frame.
        #expect(lab.exchange("udp", from: lab.host, to: "127.0.0.1", port: 7901).contains("error"), "a sanity send")
        #expect(loopback.waitForOutput("got hello", timeout: 5), "the loopback listener hears the host itself")
        // The control: a crafted frame the host must take (a DNS query to the gateway) gets its
        // answer, so a silent listener below means a dropped frame, not a lost one.
        let answers = RunningProcess(["ip", "netns", "exec", guest, "python3", "-c", """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 40000)); s.settimeout(10)
            print("listening", flush=True)
            print("answered", len(s.recvfrom(512)[0]), flush=True)
            """])
        defer { answers.signal(SIGKILL); _ = answers.wait(timeout: 5) }
        #expect(answers.waitForOutput("listening", timeout: 10))
        let query = Array(Data(hexString: "12340100000100000000000003776562000001" + "0001"))
        #expect(Self.craftedFrame(from: guest, source: "192.168.122.250", toMAC: mac, destination: "192.168.122.1", port: 53, payload: query).status == 0)
        #expect(answers.waitForOutput("answered", timeout: 10), "a crafted frame to the gateway's DNS got no answer: \(answers.stdout) \(answers.stderr)")
        #expect(Self.craftedFrame(from: guest, source: "192.168.122.250", toMAC: mac, destination: "127.0.0.1", port: 7901, payload: Array("from-guest".utf8)).status == 0)
        #expect(Self.craftedFrame(from: guest, source: "192.168.122.250", toMAC: mac, destination: "192.168.122.1", port: 7902, payload: Array("from-guest".utf8)).status == 0)
        Thread.sleep(forTimeInterval: 2)
        #expect(!loopback.stdout.contains("from-guest"), "a guest reached a loopback-only host service: \(loopback.stdout)")
        #expect(!anywhere.stdout.contains("from-guest"), "a NAT guest reached a host service on its gateway: \(anywhere.stdout)")

        // DNS on the gateway still answers the guest, and a forward from 127.0.0.1 reaches it.
        let dns = Harness.run(["ip", "netns", "exec", guest, "python3", "-c", """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
            s.sendto(bytes.fromhex("12340100000100000000000003776562000001" + "0001"), ("192.168.122.1", 53))
            print("dns answered", len(s.recvfrom(512)[0]))
            """])
        #expect(dns.stdout.contains("dns answered"), "\(dns.stdout) \(dns.stderr)")
        #expect(lab.exchange("tcp", from: lab.host, to: "127.0.0.1", port: 8080) == "echo:hello")
    }

    @Test("two libraries on one host: each runs NAT VMs at once on its own bridge, subnet and firewall table; stopping and deleting in one leaves the other's bridge, DHCP server and rules working; a same-host migration of a NAT VM works, and a destination that cannot start it tells the source why",
          .timeLimit(.minutes(8)))
    func twoLibrariesOnOneHost() throws {
        let lab = try NetworkLab()
        let other = try TestLibrary()
        func inOther(_ arguments: [String], timeout: TimeInterval = 60) -> Harness.Completed {
            Harness.run(["ip", "netns", "exec", lab.host, Harness.vireo] + arguments, timeout: timeout, environment: ["VIREO_HOME": other.root.path])
        }
        defer { for name in ["b1", "a1"] { _ = inOther(["stop", name, "--force"]) } }
        let probe = try Harness.probe("pvh")
        lab.createProbe("a1", command: "serve=9000", extra: [])
        lab.start("a1")
        #expect(lab.console("a1", contains: "ip: serving tcp and udp port 9000"), "\(lab.library.consoleLog("a1"))")
        let createdB = inOther(["create", "b1", "--kernel", probe, "--memory", "64M", "--no-disk", "--cmdline", "console=ttyS0 probe=ip serve=9000"])
        #expect(createdB.status == 0, "\(createdB.stderr)")
        let startedB = inOther(["start", "b1"])
        #expect(startedB.status == 0, "\(startedB.stderr)")
        #expect(other.waitFor(30) { other.consoleLog("b1").contains("ip: serving tcp and udp port 9000") }, "\(other.consoleLog("b1"))")
        let a = try #require(lab.dhcpAddress("a1"), "\(lab.library.consoleLog("a1"))")
        let bLog = other.consoleLog("b1")
        let b = try #require(bLog.range(of: "ip: dhcp address=").map { String(bLog[$0.upperBound...].prefix { $0 != " " }) }, "\(bLog)")
        #expect(a.split(separator: ".").prefix(3) != b.split(separator: ".").prefix(3), "both libraries' guests are on one subnet: \(a) \(b)")
        #expect(lab.exchange("tcp", from: lab.host, to: a, port: 9000) == "echo:hello")
        #expect(lab.exchange("tcp", from: lab.host, to: b, port: 9000) == "echo:hello")
        let bridgeOf = { (library: TestLibrary) -> String in
            let data = (try? Data(contentsOf: library.root.appendingPathComponent("networks/default/network.json"))) ?? Data()
            return ((try? JSONSerialization.jsonObject(with: data)) as? [String: Any])?["bridge"] as? String ?? "?"
        }
        let bridgeA = bridgeOf(lab.library), bridgeB = bridgeOf(other)
        #expect(bridgeA != bridgeB, "\(bridgeA) \(bridgeB)")

        // B goes away entirely; A's bridge, dnsmasq and rules stay and keep working.
        #expect(inOther(["stop", "b1", "--force"]).status == 0)
        #expect(inOther(["delete", "b1"]).status == 0)
        let deletedNetwork = inOther(["network", "delete", "default"])
        #expect(deletedNetwork.status == 0, "\(deletedNetwork.stderr)")
        #expect(lab.inHost(["ip", "link", "show", bridgeA]).status == 0, "A's bridge went with B's network")
        let pidText = (try? String(contentsOf: lab.library.root.appendingPathComponent("networks/default/dnsmasq.pid"), encoding: .utf8)) ?? ""
        let dnsmasq = Int32(pidText.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        #expect(dnsmasq > 0 && kill(dnsmasq, 0) == 0, "A's dnsmasq is gone")
        #expect(lab.inHost(["nft", "list", "ruleset"]).stdout.contains(bridgeA), "A's firewall rules went with B's network")
        #expect(lab.exchange("tcp", from: lab.host, to: a, port: 9000) == "echo:hello")

        // A destination that cannot start the VM says why, at the source.
        #expect(inOther(["network", "create", "default"]).status == 0)
        let blockedBridge = bridgeOf(other)
        // Something that is not a bridge holds the name (this kernel has no dummy links: a veth).
        #expect(lab.inHost(["ip", "link", "add", blockedBridge, "type", "veth", "peer", "name", "vblock0"]).status == 0)
        func migrate() -> (source: Harness.Completed, receiver: RunningProcess) {
            let receiver = RunningProcess(["ip", "netns", "exec", lab.host, Harness.vireo, "receive", "--listen", "127.0.0.1:0"],
                                          environment: ["VIREO_HOME": other.root.path])
            _ = receiver.waitForOutput("On the source", timeout: 20)
            let lines = receiver.stdout.split(separator: "\n")
            let endpoint = lines.first { $0.hasPrefix("Listening on ") }.map { String($0.dropFirst(13)) } ?? ""
            let token = lines.first { $0.hasPrefix("Token: ") }.map { String($0.dropFirst(7)) } ?? ""
            let source = lab.vireo("migrate", "a1", endpoint, "--token", token, timeout: 120)
            return (source, receiver)
        }
        let refused = migrate()
        #expect(refused.source.status != 0 && refused.source.stderr.contains("not a bridge"), "\(refused.source.stdout) \(refused.source.stderr) \(refused.receiver.stderr)")
        refused.receiver.signal(SIGKILL); _ = refused.receiver.wait(timeout: 5)
        #expect(lab.library.state("a1") == "running")
        #expect(lab.inHost(["ip", "link", "delete", blockedBridge]).status == 0)
        let moved = migrate()
        #expect(moved.source.status == 0, "\(moved.source.stdout) \(moved.source.stderr) \(moved.receiver.stderr)")
        _ = moved.receiver.wait(timeout: 30)
        #expect(inOther(["list"]).stdout.contains("a1"), "\(inOther(["list"]).stdout)")
        #expect(other.waitFor(10) { other.state("a1") == "running" })
    }

    @Test("bad network input is refused before anything changes, naming the field")
    func badInput() throws {
        let lab = try NetworkLab()
        #expect(lab.vireo("network", "create", "lan", "--subnet", "10.50.0.0/24").status == 0)
        let cases: [([String], String)] = [
            (["network", "create", "x", "--subnet", "10.50.0.0/16"], "--subnet: 10.50.0.0/16 overlaps network 'lan' (10.50.0.0/24)"),
            (["network", "create", "x", "--subnet", "10.60.0.0"], "--subnet: '10.60.0.0' is not an IPv4 subnet like 10.20.0.0/24"),
            (["network", "create", "x", "--subnet", "10.60.0.1/24"], "--subnet: '10.60.0.1/24' has host bits set; the subnet is 10.60.0.0/24"),
            (["network", "create", "x", "--subnet", "10.60.0.0/31"], "--subnet: prefix /31 is outside /8 to /29"),
            (["network", "create", "x", "--subnet", "\(NetworkLab.hostAddress.dropLast(2)).0/24"], "overlaps 203.0.113.0/24, which this host already routes"),
            (["network", "create", "x", "--subnet", "10.60.0.0/24", "--dhcp", "10.61.0.10-10.61.0.20"], "--dhcp: 10.61.0.10-10.61.0.20 is not inside 10.60.0.0/24's guest addresses 10.60.0.2-10.60.0.254"),
            (["network", "create", "x", "--subnet", "10.60.0.0/24", "--dhcp", "10.60.0.20-10.60.0.10"], "--dhcp: 10.60.0.20 comes after 10.60.0.10"),
            (["network", "create", "x", "--mode", "internal", "--dhcp", "10.60.0.10-10.60.0.20"], "--dhcp: an internal network gives the host no address to serve DHCP from"),
            (["network", "create", "x", "--mode", "bridged"], "--mode: 'bridged' is not one of nat, host-only, internal"),
            (["network", "create", "lan"], "network name: a network named 'lan' already exists"),
            (["network", "create", "bad/name"], "network name: 'bad/name' must be"),
            (["create", "v", "--no-disk", "--nic", "bridge:nosuchbr"], "--nic: no bridge named nosuchbr on this host"),
            (["create", "v", "--no-disk", "--nic", "bridge:lo"], "--nic: lo is not a bridge"),
            (["create", "v", "--no-disk", "--nic", "network:nosuch"], "--nic: no network named 'nosuch'"),
            (["create", "v", "--no-disk", "--nic", "wifi"], "--nic: 'wifi' is not one of nat, network:NAME, bridge:BRIDGE, user, tap:NAME or netns:/run/netns/NAME"),
            (["create", "v", "--no-disk", "--nic", "netns:/proc/1/ns/net"], "--nic: network namespace '/proc/1/ns/net' must be a file in /run/netns"),
            (["create", "v", "--no-disk", "--nic", "nat,mac=01:00:00:00:00:01"], "--nic: card 0: '01:00:00:00:00:01' is not a unicast MAC address"),
            (["create", "v", "--no-disk", "--nic", "nat,mac=02:00:00:00:00:01", "--nic", "user,mac=02:00:00:00:00:01"], "--nic: card 1: MAC 02:00:00:00:00:01 is already another card's"),
            (["create", "v", "--no-disk", "--forward", "tcp:8022"], "--forward: 'tcp:8022' is not PROTO:HOSTPORT:GUESTPORT"),
            (["create", "v", "--no-disk", "--forward", "tcp:0:22"], "--forward: ports in 'tcp:0:22' must be numbers from 1 to 65535"),
            (["create", "v", "--no-disk", "--forward", "sctp:1:2"], "--forward: 'sctp:1:2' is not PROTO:HOSTPORT:GUESTPORT"),
            (["create", "v", "--no-disk", "--nic", "tap:t0", "--forward", "tcp:8022:22"], "--forward: the VM has no nat, network or user card to forward ports to"),
            (["create", "v", "--no-disk", "--forward", "tcp:8022:22", "--forward", "tcp:8022:23"], "--forward: host port tcp 8022 is forwarded twice"),
            (["create", "v", "--no-disk", "--no-nic", "--nic", "nat"], "--no-nic: contradicts --nic"),
            (["create", "v", "--no-disk", "--nic", "user,queues=2"], "--nic: card 0 is on user, which has one queue; queues= takes nat, network:NAME, bridge:NAME, tap:NAME and netns:PATH cards"),
            (["create", "v", "--no-disk", "--nic", "nat,queues=9"], "--nic: card 0: 9 queue pairs is not allowed; use 1 to 8"),
            (["create", "v", "--no-disk", "--nic", "nat,queues=two"], "--nic: queues 'two' is not a number; allowed: 1 to 8"),
            (["create", "v", "--no-disk", "--engine", "qemu", "--ostype", "other", "--nic", "nat,queues=2"],
             "--nic: card 0: queue pairs need a virtio card, and this VM's cards are e1000 (its disk bus is sata, for OS type other); drop queues="),
        ]
        for (arguments, message) in cases {
            let result = lab.vireo(arguments: arguments)
            #expect(result.status == 2, "\(arguments): \(result.stderr)")
            #expect(result.stderr.contains(message), "\(arguments): \(result.stderr)")
        }
        // A host port something already listens on.
        let listener = RunningProcess(["ip", "netns", "exec", lab.host, "python3", "-c",
                                       "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 8022)); s.listen(); print('ready', flush=True); time.sleep(60)"])
        defer { listener.signal(SIGKILL); _ = listener.wait(timeout: 5) }
        #expect(listener.waitForOutput("ready", timeout: 10))
        let busy = lab.vireo("create", "v", "--no-disk", "--forward", "tcp:8022:22")
        #expect(busy.status == 2 && busy.stderr.contains("--forward: tcp:8022:22: host tcp port 8022 is already in use on this host"), "\(busy.stderr)")
        // A MAC another VM has, and a port another VM forwards.
        #expect(lab.vireo("create", "a", "--no-disk", "--nic", "nat,mac=02:00:00:00:00:aa", "--forward", "tcp:9022:22").status == 0)
        let sameMAC = lab.vireo("create", "b", "--no-disk", "--nic", "nat,mac=02:00:00:00:00:AA")
        #expect(sameMAC.status == 2 && sameMAC.stderr.contains("--nic: MAC 02:00:00:00:00:aa is already VM 'a''s"), "\(sameMAC.stderr)")
        let samePort = lab.vireo("create", "b", "--no-disk", "--forward", "tcp:9022:22")
        #expect(samePort.status == 2 && samePort.stderr.contains("--forward: host port tcp 9022 is already forwarded to VM 'a'"), "\(samePort.stderr)")
        // Nothing was made by any refusal.
        let names = try FileManager.default.contentsOfDirectory(atPath: lab.library.root.path).filter { !$0.hasPrefix(".") }.sorted()
        #expect(names == ["a", "networks"], "\(names)")
        #expect(lab.vireo("network", "list", "--json").stdout.components(separatedBy: "\"name\"").count == 2)
        // Low ports need root.
        let low = Harness.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env",
                               "VIREO_HOME=\(try Harness.temporaryDirectory().path)/nobody", Harness.vireo,
                               "create", "v", "--no-disk", "--nic", "user", "--forward", "tcp:80:80"])
        #expect(low.status == 2 && low.stderr.contains("--forward: tcp:80:80: host ports below 1024 need root"), "\(low.stderr)")
        // passt missing: PATH without it.
        let noPasst = Harness.run(["env", "PATH=/nonexistent", "VIREO_HOME=\(lab.library.root.path)", Harness.vireo,
                                   "create", "v", "--no-disk", "--nic", "user"])
        #expect(noPasst.status == 2 && noPasst.stderr.contains("--nic: user-mode networking needs passt, which is not installed"), "\(noPasst.stderr)")
    }
}

extension Data {
    init(hexString: String) {
        var bytes: [UInt8] = []
        var index = hexString.startIndex
        while index < hexString.endIndex, let next = hexString.index(index, offsetBy: 2, limitedBy: hexString.endIndex) {
            bytes.append(UInt8(hexString[index..<next], radix: 16) ?? 0)
            index = next
        }
        self.init(bytes)
    }
}
