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
    @Test("NAT (the default network): two probes get distinct DHCP leases from its dnsmasq, `vireo list` shows them, guests reach 'the internet' masqueraded; after a simulated host reboot the network is rebuilt and the lease holds; after deleting everything the links and ruleset are as before",
          .timeLimit(.minutes(10)))
    func natNetwork() throws {
        let lab = try NetworkLab()
        let before = lab.hostState()
        lab.udpEcho(in: lab.internet, address: NetworkLab.internetAddress, port: 7777)
        lab.createProbe("n1", command: "send=\(NetworkLab.internetAddress):7777", extra: [])
        lab.createProbe("n2", command: "send=\(NetworkLab.internetAddress):7777", extra: ["--nic", "nat"])
        lab.start("n1")
        lab.start("n2")
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

        // As after a host reboot: only the definitions are left, no bridge, dnsmasq or table.
        let pidFile = lab.library.root.appendingPathComponent("networks/default/dnsmasq.pid")
        if let text = try? String(contentsOf: pidFile, encoding: .utf8), let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
            kill(pid, SIGKILL)
        }
        #expect(lab.inHost(["ip", "link", "delete", "vireo-default"]).status == 0)
        #expect(lab.inHost(["nft", "delete", "table", "ip", "vireo"]).status == 0)
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

    @Test("the qemu engine: Debian's installer kernel on a nat card gets its lease from the network's dnsmasq through the tap Vireo handed QEMU; `vireo list` shows it; a forced stop leaves no tap behind",
          .timeLimit(.minutes(8)))
    func qemuEngineOnNAT() throws {
        let lab = try NetworkLab()
        let images = "/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64"
        guard FileManager.default.fileExists(atPath: images + "/linux") else {
            throw HarnessError("\(images)/linux is missing: scripts/setup.sh installs debian-installer-12-netboot-amd64")
        }
        // priority=critical: the installer asks nothing until it has configured the network by
        // DHCP (it then wants a preseed file, which is where this test stops it).
        let created = lab.vireo("create", "di", "--engine", "qemu", "--accel", "tcg", "--kernel", images + "/linux",
                                "--initrd", images + "/initrd.gz", "--memory", "1G", "--no-disk", "--nic", "nat",
                                "--cmdline", "auto=true priority=critical console=ttyS0,115200 DEBIAN_FRONTEND=text")
        #expect(created.status == 0, "\(created.stderr)")
        lab.start("di")
        let vmmLog = { (try? String(contentsOf: lab.library.root.appendingPathComponent("di/vmm.log"), encoding: .utf8)) ?? "" }
        #expect(vmmLog().contains("-netdev tap,id=net0,fd=5"), "\(vmmLog().prefix(2000))")
        #expect(lab.library.waitFor(360) { !(lab.listedAddresses()["di"] ?? []).isEmpty },
                "no lease: \(lab.library.consoleLog("di").suffix(1500))")
        let address = lab.listedAddresses()["di"]?.first ?? ""
        #expect(address.hasPrefix("192.168.122."), "\(address)")
        let leases = (try? String(contentsOf: lab.library.root.appendingPathComponent("networks/default/leases"), encoding: .utf8)) ?? ""
        #expect(leases.contains(" \(address) di "), "the lease carries the VM's name: \(leases)")
        #expect(lab.vireo("stop", "di", "--force").status == 0)
        let links = lab.inHost(["ip", "-br", "link"]).stdout
        #expect(!links.contains("vt") && !links.contains("vireo-default"), "\(links)")
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
            (["create", "v", "--no-disk", "--nic", "wifi"], "--nic: 'wifi' is not one of nat, network:NAME, bridge:BRIDGE, user or tap:NAME"),
            (["create", "v", "--no-disk", "--nic", "nat,mac=01:00:00:00:00:01"], "--nic: card 0: '01:00:00:00:00:01' is not a unicast MAC address"),
            (["create", "v", "--no-disk", "--nic", "nat,mac=02:00:00:00:00:01", "--nic", "user,mac=02:00:00:00:00:01"], "--nic: card 1: MAC 02:00:00:00:00:01 is already another card's"),
            (["create", "v", "--no-disk", "--forward", "tcp:8022"], "--forward: 'tcp:8022' is not PROTO:HOSTPORT:GUESTPORT"),
            (["create", "v", "--no-disk", "--forward", "tcp:0:22"], "--forward: ports in 'tcp:0:22' must be numbers from 1 to 65535"),
            (["create", "v", "--no-disk", "--forward", "sctp:1:2"], "--forward: 'sctp:1:2' is not PROTO:HOSTPORT:GUESTPORT"),
            (["create", "v", "--no-disk", "--nic", "tap:t0", "--forward", "tcp:8022:22"], "--forward: the VM has no nat, network or user card to forward ports to"),
            (["create", "v", "--no-disk", "--forward", "tcp:8022:22", "--forward", "tcp:8022:23"], "--forward: host port tcp 8022 is forwarded twice"),
            (["create", "v", "--no-disk", "--no-nic", "--nic", "nat"], "--no-nic: contradicts --nic"),
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
