import Foundation
import Testing
@testable import Engines
@testable import Library

struct NetworkModelTests {
    @Test func subnets() throws {
        let subnet = try IPv4Subnet.parse("10.20.0.0/24", field: "--subnet")
        #expect(subnet.gateway.description == "10.20.0.1" && subnet.broadcast.description == "10.20.0.255")
        #expect(subnet.netmask.description == "255.255.255.0")
        #expect(subnet.overlaps(try IPv4Subnet.parse("10.0.0.0/8", field: "x")))
        #expect(!subnet.overlaps(try IPv4Subnet.parse("10.21.0.0/24", field: "x")))
        #expect(IPv4Address("10.1.2.03") == nil && IPv4Address("256.1.1.1") == nil && IPv4Address("1.2.3") == nil)
        for bad in ["127.0.0.0/8", "224.0.0.0/24", "169.254.0.0/16", "0.0.0.0/8"] {
            #expect { try IPv4Subnet.parse(bad, field: "--subnet") } throws: { "\($0)".contains("is not usable for a network") }
        }
        // The upper half of a /24 for DHCP, as libvirt's default network hands out the rest.
        #expect(NetworkStore.defaultRange(subnet).description == "10.20.0.127-10.20.0.254")
        #expect(try NetworkStore.freeSubnet(avoiding: [IPv4Subnet.parse("192.168.122.0/24", field: "x")]).description == "192.168.123.0/24")
    }

    @Test func cardsKeepTheirOldFormAndParseTheNew() throws {
        let old = #"{"tap":"vtap0","mac":"02:00:00:00:00:01"}"#
        let card = try JSONDecoder().decode(NetworkAttachment.self, from: Data(old.utf8))
        #expect(card.attachment == .tap("vtap0") && card.forwards.isEmpty)
        let new = NetworkAttachment(.network("lan"), mac: "02:00:00:00:00:02", forwards: [PortForward(proto: .tcp, hostPort: 8022, guestPort: 22)])
        let text = String(decoding: try JSONEncoder().encode(new), as: UTF8.self)
        #expect(text.contains(#""attachment":"network:lan""#) && text.contains(#""forwards":["tcp:8022:22"]"#), "\(text)")
        #expect(try JSONDecoder().decode(NetworkAttachment.self, from: Data(text.utf8)) == new)
        #expect(try NICAttachment.parse("bridge:br0", field: "--nic") == .bridge("br0"))
        #expect { try NICAttachment.parse("network:", field: "--nic") } throws: { "\($0)".contains("network name") || "\($0)".contains("must be") }
    }

    @Test("a pod's namespace as a card: only a file pinned in /run/netns (containerd's /var/run spelling too), named plainly; what the guest kernel is told of the pod's address")
    func namespaceCards() throws {
        #expect(try NICAttachment.parse("netns:/run/netns/cni-1234", field: "--nic") == .netns("/run/netns/cni-1234"))
        #expect(try NICAttachment.parse("netns:/var/run/netns/cni-ab_c.1", field: "--nic") == .netns("/run/netns/cni-ab_c.1"))
        #expect(NICAttachment.netns("/run/netns/p").description == "netns:/run/netns/p" && !NICAttachment.netns("/run/netns/p").acceptsForwards)
        for (text, words) in [("netns:/proc/1/ns/net", "must be a file in /run/netns"), ("netns:/run/netns/../x", "must be 1 to 64 letters"),
                              ("netns:/run/netns/a/b", "must be 1 to 64 letters"), ("netns:/run/netns/", "must be 1 to 64 letters"),
                              ("netns:/tmp/run/netns/x", "must be a file in /run/netns"), ("netns:relative", "must be a file in /run/netns")] {
            #expect { try NICAttachment.parse(text, field: "--nic") } throws: { "\($0)".contains(words) }
        }
        var pod = HostNetworks.NamespaceNetwork(interface: "eth0", mac: "0a:58:0a:59:00:02", mtu: 1500)
        #expect(pod.kernelArgument == nil, "no address, no configuration")
        pod.address = IPv4Address("10.89.0.2"); pod.prefixLength = 24; pod.gateway = IPv4Address("10.89.0.1")
        #expect(pod.kernelArgument == "ip=10.89.0.2::10.89.0.1:255.255.255.0::eth0:off")
        pod.gateway = nil; pod.prefixLength = 32
        #expect(pod.kernelArgument == "ip=10.89.0.2:::255.255.255.255::eth0:off")
        // Dual stack: IPv6 for the agent, beside the kernel's IPv4; IPv6 alone works too.
        pod.ipv6Address = "fd89::2"; pod.ipv6PrefixLength = 64; pod.ipv6Gateway = "fd89::1"
        #expect(pod.kernelArgument == "ip=10.89.0.2:::255.255.255.255::eth0:off vireo.ipv6=fd89::2/64,fd89::1")
        pod.address = nil; pod.ipv6Gateway = nil
        #expect(pod.kernelArgument == "vireo.ipv6=fd89::2/64")
        pod.ipv6PrefixLength = 129
        #expect(pod.kernelArgument == nil)
        #expect(IPAddressText.canonicalIPv6("FD89:0:0::2") == "fd89::2" && IPAddressText.canonicalIPv6("fd89::2 x") == nil && IPAddressText.canonicalIPv6("10.0.0.1") == nil)
    }

    @Test func reservationsAreStableAndSkipOthersLeases() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-net-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        let store = NetworkStore(libraryRoot: root)
        var request = NetworkCreateRequest(name: "lan")
        request.subnet = "10.30.0.0/29"
        let network = try store.create(request, hostRoutes: [])
        #expect(network.dhcp?.description == "10.30.0.2-10.30.0.6")
        // dnsmasq leased .2 to a machine Vireo does not know.
        try Data("0 aa:aa:aa:aa:aa:aa 10.30.0.2 other *\n".utf8).write(to: URL(fileURLWithPath: store.leasesPath(of: "lan")))
        let live: Set<String> = ["02:00:00:00:00:01", "02:00:00:00:00:02"]
        let first = try store.reserve(network: network, mac: "02:00:00:00:00:01", vm: "a", liveMACs: live)
        let second = try store.reserve(network: network, mac: "02:00:00:00:00:02", vm: "b", liveMACs: live)
        #expect(first?.description == "10.30.0.3" && second?.description == "10.30.0.4")
        #expect(try store.reserve(network: network, mac: "02:00:00:00:00:01", vm: "a", liveMACs: live) == first)
        // A VM that is gone gives its address back.
        let again = try store.reserve(network: network, mac: "02:00:00:00:00:03", vm: "c", liveMACs: ["02:00:00:00:00:03"])
        #expect(again?.description == "10.30.0.3")
        // A damaged line never reaches dnsmasq's hosts file: a MAC with a comma would add options.
        try Data("aa:bb,ignore 10.30.0.5 x\n02:00:00:00:00:03 10.30.0.3 c\n".utf8).write(to: URL(fileURLWithPath: store.reservationsPath(of: "lan")))
        #expect(store.reservations(of: "lan").keys.sorted() == ["02:00:00:00:00:03"])
    }

    @Test func namesForTheHost() {
        #expect(NetworkStore.bridgeName(for: "lan") == "vireo-lan")
        let long = NetworkStore.bridgeName(for: "a-rather-long-network-name")
        #expect(long.count == 15 && long.hasPrefix("vireo-"), "\(long)")
        #expect(HostNetworks.hostname(forVM: "web_1.example") == "web-1-example")
        #expect(HostNetworks.hostname(forVM: "_x_") == "x")
        let tap = HostNetworks.tapName(uuid: "6c1d2f4e-0000-4000-8000-000000000001", index: 3, libraryRoot: "/var/lib/vireo")
        #expect(tap.count <= 15)
        // One VM in two libraries on one host (a migration between them) has two taps.
        #expect(tap != HostNetworks.tapName(uuid: "6c1d2f4e-0000-4000-8000-000000000001", index: 3, libraryRoot: "/tmp/other"))
    }

    @Test func theFirewallTable() throws {
        let nat = NetworkDefinition(version: 1, name: "default", mode: .nat, subnet: try IPv4Subnet.parse("192.168.122.0/24", field: "x"),
                                    dhcp: nil, autostart: false, bridge: "vireo-default", createdAt: 0)
        var wire = nat
        wire.name = "wire"; wire.mode = .internal; wire.bridge = "vireo-wire"; wire.subnet = try IPv4Subnet.parse("10.9.0.0/24", field: "x")
        let forward = HostNetworks.ActiveForward(network: nat, address: IPv4Address("192.168.122.130")!,
                                                 forward: PortForward(proto: .tcp, hostPort: 8022, guestPort: 22), vm: "web")
        let table = HostNetworks.firewallTable(libraryRoot: "/var/lib/vireo")
        #expect(table.hasPrefix("vireo_") && table.count == 14 && table != HostNetworks.firewallTable(libraryRoot: "/tmp/other"), "\(table)")
        let text = HostNetworks.ruleset(table: table, networks: [nat, wire], forwards: [forward])
        #expect(text.hasPrefix("table ip \(table)\ndelete table ip \(table)\ntable ip \(table) {"))
        #expect(text.contains("ip saddr 192.168.122.0/24 ip daddr != { 192.168.122.0/24, 224.0.0.0/4, 255.255.255.255 } masquerade"))
        #expect(text.contains("fib daddr type local tcp dport 8022 dnat to 192.168.122.130:22"))
        #expect(text.contains("iifname \"vireo-wire\" drop"))
        #expect(!text.contains("10.9.0.0/24 accept"))
        // A guest's packet to the host's loopback is dropped unless a forward DNATed it; a NAT
        // guest reaches the host only for DHCP and DNS (and replies).
        #expect(text.contains("iifname \"vireo-default\" ip daddr 127.0.0.0/8 ct status dnat accept\n    iifname \"vireo-default\" ip daddr 127.0.0.0/8 drop"))
        #expect(text.contains("iifname \"vireo-default\" udp dport { 53, 67 } accept\n    iifname \"vireo-default\" tcp dport 53 accept\n    iifname \"vireo-default\" drop"))
        // Nothing up: the table goes.
        #expect(HostNetworks.ruleset(table: table, networks: [], forwards: []) == "table ip \(table)\ndelete table ip \(table)\n")
    }
}
