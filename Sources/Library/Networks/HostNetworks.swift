import CHostSupport
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A card whose host side is ready: what the engine's process is told to use.
public struct PreparedCard: Sendable {
    public enum Backend: Sendable, Equatable {
        /// A tap the user manages, opened by name.
        case tapName(String)
        /// A tap Vireo made and plugged in; `slot` indexes `PreparedNetworking.descriptors`.
        /// A multiqueue tap's other queues (one per further pair) are in `queueSlots`.
        case tapDescriptor(slot: Int, tap: String, queueSlots: [Int] = [])
        /// One end of a stream socket whose other end passt holds.
        case streamDescriptor(slot: Int)
    }
    public var mac: String
    public var backend: Backend
    /// Queue pairs for a tap the engine opens by name (`tapName`); nil: one.
    public var queues: Int?

    public init(mac: String, backend: Backend, queues: Int? = nil) { self.mac = mac; self.backend = backend; self.queues = queues }
}

/// The host side of a starting VM's cards: descriptors the engine's process inherits (as 5, 6,
/// ... in this order). Vireo's own taps are not persistent, so they vanish with the last
/// descriptor: when the VM's process exits, however it exits, nothing is left behind.
public final class PreparedNetworking: @unchecked Sendable {
    public private(set) var cards: [PreparedCard] = []
    public private(set) var descriptors: [Int32] = []
    /// The first descriptor number the child sees them at.
    public static let firstInheritedDescriptor: Int32 = 5

    public init() {}

    func append(_ card: PreparedCard) { cards.append(card) }
    func adopt(_ fd: Int32) -> Int {
        descriptors.append(fd)
        return descriptors.count - 1
    }

    /// The descriptor number a slot has in the engine's process.
    public static func inherited(_ slot: Int) -> Int32 { firstInheritedDescriptor + Int32(slot) }

    /// Closes this process's copies (after the engine's process has its own, or on failure).
    public func close() {
        for fd in descriptors { Glibc.close(fd) }
        descriptors = []
    }

    deinit { close() }
}

/// The host side of Vireo's networks, built from what Linux ships: bridges and taps (iproute2),
/// one dnsmasq per network for DHCP and DNS, and an nftables table per library (`ip vireo_<hash>`)
/// for masquerading, isolation and port forwards; passt for user-mode cards. No daemon: each
/// command brings up what it needs, idempotently, and takes down what nothing uses.
public struct HostNetworks: Sendable {
    public let library: VMLibrary
    public let store: NetworkStore
    /// The host's record of every library's bridges and subnets in this network namespace (nil
    /// without root, who alone makes bridges).
    let registry: HostNetworkRegistry?
    /// This library's nftables table: each library has its own, so one library's rules never
    /// replace or remove another's.
    public let firewallTable: String

    public init(library: VMLibrary) {
        self.library = library
        store = NetworkStore(libraryRoot: library.root)
        registry = HostNetworkRegistry()
        firewallTable = Self.firewallTable(libraryRoot: library.root)
    }

    /// `vireo_` and 8 hex digits of the library's path.
    public static func firewallTable(libraryRoot: String) -> String {
        let digits = String(StableHash.fnv1a(libraryRoot) & 0xffff_ffff, radix: 16)
        return "vireo_" + String(repeating: "0", count: 8 - digits.count) + digits
    }

    /// Records that this library's `network` holds its bridge and subnet on this host, or says
    /// which other library's network does. Taken before the library's own lock (one order).
    func claimOnHost(_ network: NetworkDefinition) throws(LibraryError) {
        guard let registry else { return }
        try registry.locked { () throws(LibraryError) in try registry.claim(network, library: library.root) }
    }

    // MARK: what the host has

    /// IPv4 subnets this host routes (not default routes, not Vireo's own bridges), so a new
    /// network does not shadow a LAN.
    public static func hostRoutes() -> [IPv4Subnet] {
        guard let bytes = try? HostFiles.readAll("/proc/net/route") else { return [] }
        return String(decoding: bytes, as: UTF8.self).split(separator: "\n").dropFirst().compactMap { line in
            let fields = line.split(whereSeparator: { $0 == "\t" || $0 == " " })
            guard fields.count >= 8, !fields[0].hasPrefix("vireo-"),
                  let destination = UInt32(fields[1], radix: 16), let mask = UInt32(fields[7], radix: 16), mask != 0 else { return nil }
            // The kernel prints them in host (little-endian) order.
            let prefix = mask.nonzeroBitCount
            return IPv4Subnet(network: IPv4Address(destination.byteSwapped), prefixLength: prefix)
        }
    }

    static func tool(_ name: String) -> String? { HostTools.find(name) }

    static func requireTool(_ name: String, package: String, network: String) throws(LibraryError) -> String {
        guard let path = tool(name) else {
            throw .network(name: network, reason: "\(name) is not installed; install Debian's `\(package)` package", exitStatus: 2)
        }
        return path
    }

    /// Runs `ip ARGS...`; a failure carries what ip said.
    static func ip(_ arguments: [String], network: String) throws(LibraryError) {
        let binary = try requireTool("ip", package: "iproute2", network: network)
        let (status, output) = HostCommand.run(binary, arguments, timeoutSeconds: 10)
        guard status == 0 else {
            throw .network(name: network, reason: "`ip \(arguments.joined(separator: " "))` failed: \(output.trimmingWhitespace())", exitStatus: 1)
        }
    }

    /// Whether this process holds CAP_NET_ADMIN (bit 12 of CapEff), which taps, bridges,
    /// addresses and nftables need.
    static func mayAdministerNetworks() -> Bool {
        guard let bytes = try? HostFiles.readAll("/proc/self/status") else { return geteuid() == 0 }
        let line = String(decoding: bytes, as: UTF8.self).split(separator: "\n").first { $0.hasPrefix("CapEff:") }
        guard let hex = line?.split(separator: "\t").last, let mask = UInt64(String(hex).trimmingWhitespace(), radix: 16) else { return geteuid() == 0 }
        return mask & (1 << 12) != 0
    }

    static func linkExists(_ name: String) -> Bool { HostFiles.exists("/sys/class/net/\(name)") }
    static func isBridge(_ name: String) -> Bool { HostFiles.isDirectory("/sys/class/net/\(name)/bridge") }

    public func isUp(_ network: NetworkDefinition) -> Bool { Self.linkExists(network.bridge) }

    // MARK: bringing networks up and down

    /// Makes the network's bridge, address, dnsmasq and firewall rules exist, whatever part of
    /// them already does (a host reboot leaves the definition and none of the rest). Call with
    /// the store locked.
    func bringUp(_ network: NetworkDefinition) throws(LibraryError) {
        let name = network.name
        let madeBridge = !Self.linkExists(network.bridge)
        if madeBridge {
            // A fixed address: a bridge otherwise takes the lowest of its ports' MACs, so the
            // guests' gateway would change its MAC whenever a VM with a lower tap joined.
            try Self.ip(["link", "add", network.bridge, "address", bridgeMAC(network), "type", "bridge"], network: name)
        } else if !Self.isBridge(network.bridge) {
            throw .network(name: name, reason: "\(network.bridge) exists on this host and is not a bridge; delete it or recreate the network under another name", exitStatus: 2)
        }
        if let address = network.hostAddress {
            try Self.ip(["address", "replace", "\(address)/\(network.subnet.prefixLength)", "dev", network.bridge], network: name)
        }
        try Self.ip(["link", "set", network.bridge, "up"], network: name)
        if network.mode == .nat {
            // Forwarded host ports reached from 127.0.0.1 leave through the bridge.
            try? HostFiles.writeInPlace("1\n", to: "/proc/sys/net/ipv4/conf/\(network.bridge)/route_localnet")
            try enableForwarding()
        }
        // A dnsmasq bound to a bridge that was deleted and made again serves nothing: restart it.
        if network.dhcp != nil { try startDNSMasq(network, restart: madeBridge) }
    }

    /// A locally administered unicast MAC for the network's bridge, stable for the library and
    /// network.
    func bridgeMAC(_ network: NetworkDefinition) -> String {
        let hash = StableHash.fnv1a(library.root + "\u{0}" + network.name)
        let bytes = [UInt8(0x02)] + (0..<5).map { UInt8(truncatingIfNeeded: hash >> (8 * UInt64($0))) }
        return bytes.map { String(repeating: "0", count: $0 < 16 ? 1 : 0) + String($0, radix: 16) }.joined(separator: ":")
    }

    /// Stops the network's dnsmasq and deletes its bridge (which unplugs whatever taps remain).
    func bringDown(_ network: NetworkDefinition) {
        stopDNSMasq(network)
        unlink(dhcpHostsPath(network))
        // A bridge of that name another library claims is that library's (two libraries made
        // before bridges were allocated per library may share a name): never delete it.
        if registry?.others(than: library.root).contains(where: { $0.bridge == network.bridge }) == true { return }
        if Self.linkExists(network.bridge), Self.isBridge(network.bridge) {
            try? Self.ip(["link", "delete", network.bridge], network: network.name)
        }
    }

    /// IP forwarding is turned on while a NAT network is up, and back off (if it was off) when
    /// the last one goes down.
    func enableForwarding() throws(LibraryError) {
        let path = "/proc/sys/net/ipv4/ip_forward"
        let current = ((try? HostFiles.readAll(path)).map { String(decoding: $0, as: UTF8.self) } ?? "0").trimmingWhitespace()
        let saved = forwardingRecord
        // Another library turned it on and keeps the setting from before: that one stands.
        if current == "1", otherLibrariesUseNAT() { return }
        if !HostFiles.exists(saved) { try HostFiles.writeAtomically(Array("\(current) \(Self.namespaceID)\n".utf8), to: saved) }
        if current != "1" {
            do { try HostFiles.writeInPlace("1\n", to: path) } catch {
                throw .network(name: "ip_forward", reason: "cannot turn on IPv4 forwarding (\(error)); NAT networks need root", exitStatus: 1)
            }
        }
    }

    /// What forwarding was before Vireo turned it on, and in which network namespace (a library
    /// used from another namespace must not touch this one's setting). One record for all the
    /// libraries of a namespace, in the host's registry, so the last NAT network of any library
    /// puts it back, and no other.
    var forwardingRecord: String { registry?.forwardingRecord ?? store.directory + "/.ip_forward-before" }

    /// Whether another library has a NAT network up in this namespace.
    func otherLibrariesUseNAT() -> Bool {
        (registry?.others(than: library.root) ?? []).contains { $0.mode == .nat && Self.linkExists($0.bridge) }
    }

    /// This process's network namespace, as the inode of /proc/self/ns/net.
    static var namespaceID: String {
        var info = stat()
        return stat("/proc/self/ns/net", &info) == 0 ? String(info.st_ino) : "unknown"
    }

    func restoreForwarding() {
        guard !otherLibrariesUseNAT(), let bytes = try? HostFiles.readAll(forwardingRecord) else { return }
        let fields = String(decoding: bytes, as: UTF8.self).trimmingWhitespace().split(separator: " ")
        guard fields.count == 2, fields[1] == Self.namespaceID else { return }
        if fields[0] == "0" { try? HostFiles.writeInPlace("0\n", to: "/proc/sys/net/ipv4/ip_forward") }
        unlink(forwardingRecord)
    }

    // MARK: dnsmasq

    func dnsmasqConfiguration(_ network: NetworkDefinition) -> String {
        let name = network.name
        var lines = [
            "# Written by vireo for network '\(name)' at every start; edits are lost.",
            "interface=\(network.bridge)", "bind-interfaces", "except-interface=lo",
            "pid-file=\(store.dnsmasqPIDPath(of: name))",
            "dhcp-leasefile=\(store.leasesPath(of: name))",
            "dhcp-authoritative", "dhcp-no-override", "domain-needed", "bogus-priv",
        ]
        if let range = network.dhcp {
            lines.append("dhcp-range=\(range.first),\(range.last),\(network.subnet.netmask),1h")
            lines.append("dhcp-lease-max=\(range.count)")
        }
        // Only NAT networks lead anywhere: the others get no default route, and no upstream DNS.
        if network.mode != .nat {
            lines.append("dhcp-option=option:router")
            lines.append("no-resolv")
        }
        // Reservations are in a hosts file, which dnsmasq re-reads on SIGHUP: a new VM's
        // reservation then needs no restart (one took 1.2-1.9 s here).
        if network.dhcp != nil { lines.append("dhcp-hostsfile=\(dhcpHostsPath(network))") }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The network's reservations as dnsmasq reads them: `MAC,ADDRESS[,HOSTNAME]` per line.
    func dhcpHosts(_ network: NetworkDefinition) -> String {
        store.reservations(of: network.name).sorted(by: { $0.value.address < $1.value.address }).map { mac, entry in
            let hostname = Self.hostname(forVM: entry.vm)
            return "\(mac),\(entry.address)" + (hostname.isEmpty ? "" : ",\(hostname)") + "\n"
        }.joined()
    }

    /// Where dnsmasq finds the network's reservations: world-readable in a directory of its own
    /// under /run, since dnsmasq re-reads the file after dropping root (as `nobody`, who cannot
    /// enter the library, nor /run/vireo when a umask made it 0700). MAC-to-address pairs and
    /// host names are no secret from the host's users. One per library, network and network
    /// namespace; written again whenever dnsmasq is brought up.
    func dhcpHostsPath(_ network: NetworkDefinition) -> String {
        let key = StableHash.fnv1a(store.directory + "\u{0}" + network.name + "\u{0}" + Self.namespaceID)
        return Self.dhcpHostsDirectory + "/" + String(key, radix: 16) + ".hosts"
    }

    static let dhcpHostsDirectory = "/run/vireo-dhcp-hosts"

    /// The hosts directory, searchable by everyone whatever the umask.
    static func makeDHCPHostsDirectory() throws(LibraryError) {
        try HostFiles.makeDirectory(dhcpHostsDirectory, mode: 0o755)
        guard chmod(dhcpHostsDirectory, 0o755) == 0 else { throw .io(operation: "chmod", path: dhcpHostsDirectory, errno: errno) }
    }

    /// A DNS label for a VM's name (VM names may hold '.' and '_', which host names may not).
    static func hostname(forVM name: String) -> String {
        let mapped = String(name.map { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") ? $0 : "-" })
        return String(mapped.drop(while: { $0 == "-" }).reversed().drop(while: { $0 == "-" }).reversed().prefix(63))
    }

    /// The network's dnsmasq if it is alive: the pid file's process, not a zombie, started with
    /// this network's configuration (a reused pid is someone else).
    func dnsmasqPID(_ network: NetworkDefinition) -> pid_t? {
        guard let bytes = try? HostFiles.readAll(store.dnsmasqPIDPath(of: network.name)),
              let pid = pid_t(String(decoding: bytes, as: UTF8.self).trimmingWhitespace()), pid > 1,
              HostFiles.exists("/proc/\(pid)/stat"), !Self.isZombie(pid),
              let arguments = try? HostFiles.readAll("/proc/\(pid)/cmdline") else { return nil }
        guard String(decoding: arguments, as: UTF8.self).contains("--conf-file=\(store.dnsmasqConfigPath(of: network.name))") else { return nil }
        return pid
    }

    /// (Re)starts dnsmasq when it is not running or its configuration changed; when only the
    /// reservations changed, it re-reads them (SIGHUP) and keeps running. Its leases stay in the
    /// lease file across restarts.
    func startDNSMasq(_ network: NetworkDefinition, restart: Bool) throws(LibraryError) {
        let name = network.name
        let binary = try Self.requireTool("dnsmasq", package: "dnsmasq-base", network: name)
        let hosts = dhcpHosts(network)
        let hostsPath = dhcpHostsPath(network)
        let hostsChanged = (try? HostFiles.readAll(hostsPath)).map { String(decoding: $0, as: UTF8.self) } != hosts
        if hostsChanged {
            try Self.makeDHCPHostsDirectory()
            try HostFiles.writeAtomically(Array(hosts.utf8), to: hostsPath, mode: 0o644)
        }
        let text = dnsmasqConfiguration(network)
        let path = store.dnsmasqConfigPath(of: name)
        let previous = (try? HostFiles.readAll(path)).map { String(decoding: $0, as: UTF8.self) }
        if !restart, previous == text, let pid = dnsmasqPID(network) {
            // dnsmasq takes the signal in its next turn, long before a guest started after this
            // sends its first DHCP request.
            if hostsChanged { kill(pid, SIGHUP) }
            return
        }
        stopDNSMasq(network)
        try HostFiles.writeAtomically(Array(text.utf8), to: path)
        if !HostFiles.exists(store.leasesPath(of: name)) { try HostFiles.writeAtomically([], to: store.leasesPath(of: name)) }
        // dnsmasq checks its configuration and binds before it detaches, and says why it cannot.
        let (status, output) = HostCommand.run(binary, ["--conf-file=\(path)"], timeoutSeconds: 10)
        guard status == 0 else {
            throw .network(name: name, reason: "dnsmasq did not start: \(output.trimmingWhitespace())", exitStatus: 1)
        }
    }

    func stopDNSMasq(_ network: NetworkDefinition) {
        if let pid = dnsmasqPID(network) {
            kill(pid, SIGTERM)
            // Until it is gone or a zombie: an init that does not reap it keeps its pid alive.
            for _ in 0..<100 where kill(pid, 0) == 0 && !Self.isZombie(pid) { usleep(20_000) }
        }
        unlink(store.dnsmasqPIDPath(of: network.name))
    }

    static func isZombie(_ pid: pid_t) -> Bool {
        guard let stat = try? HostFiles.readAll("/proc/\(pid)/stat") else { return false }
        let state = String(decoding: stat, as: UTF8.self).split(separator: ")").last?.split(separator: " ").first
        return state == "Z" || state == "X"
    }

    // MARK: the firewall

    /// One forward in effect: a host port to a guest's address.
    struct ActiveForward {
        var network: NetworkDefinition
        var address: IPv4Address
        var forward: PortForward
        var vm: String
    }

    /// The library's table for the networks that are up and the forwards of running VMs.
    static func ruleset(table: String, networks: [NetworkDefinition], forwards: [ActiveForward]) -> String {
        func q(_ name: String) -> String { "\"\(name)\"" }
        var forward: [String] = [], input: [String] = [], prerouting: [String] = [], postrouting: [String] = []
        var early: [String] = []
        // Nothing from a guest reaches the host's loopback: NAT bridges accept 127.0.0.0/8 as a
        // destination (route_localnet, for forwards from 127.0.0.1), so a guest could address
        // services bound to loopback only through its gateway (Kubernetes' CVE-2020-8558). Only
        // replies of connections a forward DNATed pass.
        for network in networks {
            early.append("iifname \(q(network.bridge)) ip daddr 127.0.0.0/8 ct status dnat accept")
            early.append("iifname \(q(network.bridge)) ip daddr 127.0.0.0/8 drop")
        }
        // Guests of one network talk to each other: hosts with br_netfilter (Docker loads it)
        // pass bridged frames through these hooks too, with the bridge as both interfaces.
        for network in networks {
            forward.append("iifname \(q(network.bridge)) oifname \(q(network.bridge)) accept")
        }
        // Then traffic into a network (replies, forwarded ports; nothing else), then out of it,
        // so one network's guests cannot open connections into another.
        for network in networks {
            let bridge = q(network.bridge)
            switch network.mode {
            case .nat, .hostOnly:
                forward.append("oifname \(bridge) ct state established,related accept")
                forward.append("oifname \(bridge) ct status dnat accept")
                forward.append("oifname \(bridge) drop")
            case .internal:
                forward.append("oifname \(bridge) drop")
            }
        }
        for network in networks {
            let bridge = q(network.bridge)
            switch network.mode {
            case .nat:
                forward.append("iifname \(bridge) ip saddr \(network.subnet) accept")
                forward.append("iifname \(bridge) drop")
                postrouting.append("ip saddr \(network.subnet) ip daddr != { \(network.subnet), 224.0.0.0/4, 255.255.255.255 } masquerade")
                postrouting.append("oifname \(bridge) ip saddr 127.0.0.0/8 masquerade")
                // The host is a NAT guest's DHCP and DNS server and its way out, nothing more:
                // replies to what the host opened come back; nothing else the guest opens does.
                input.append("iifname \(bridge) ct state established,related accept")
                input.append("iifname \(bridge) udp dport { 53, 67 } accept")
                input.append("iifname \(bridge) tcp dport 53 accept")
                input.append("iifname \(bridge) drop")
            case .hostOnly:
                forward.append("iifname \(bridge) drop")
            case .internal:
                forward.append("iifname \(bridge) drop")
                // The host is not on an internal network, whatever a guest sends it.
                input.append("iifname \(bridge) drop")
            }
        }
        for active in forwards {
            let proto = active.forward.proto.rawValue
            prerouting.append("fib daddr type local \(proto) dport \(active.forward.hostPort) dnat to \(active.address):\(active.forward.guestPort) comment \(q("vm " + active.vm))")
        }
        var text = "table ip \(table)\ndelete table ip \(table)\n"
        guard !networks.isEmpty else { return text }
        text += "table ip \(table) {\n"
        // After destination NAT (priority dstnat), so forwarded packets are judged where they go.
        text += "  chain prerouting_filter {\n    type filter hook prerouting priority filter; policy accept;\n" + early.map { "    \($0)\n" }.joined() + "  }\n"
        text += "  chain forward {\n    type filter hook forward priority filter; policy accept;\n" + forward.map { "    \($0)\n" }.joined() + "  }\n"
        text += "  chain input {\n    type filter hook input priority filter; policy accept;\n" + input.map { "    \($0)\n" }.joined() + "  }\n"
        text += "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n" + prerouting.map { "    \($0)\n" }.joined() + "  }\n"
        // Connections the host itself opens to a forwarded port (on any of its addresses).
        text += "  chain output {\n    type nat hook output priority -100; policy accept;\n" + prerouting.map { "    \($0)\n" }.joined() + "  }\n"
        text += "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n" + postrouting.map { "    \($0)\n" }.joined() + "  }\n"
        text += "}\n"
        return text
    }

    /// The VMs whose process runs (or is being started, holding the lock), with definitions.
    func runningVMs() -> [VMDefinition] {
        ((try? library.names()) ?? []).compactMap { name in
            let bundle = VMBundle(directory: library.root + "/" + name)
            guard bundle.isLocked, let definition = try? bundle.load() else { return nil }
            return definition
        }
    }

    /// Replaces the library's table in one nftables transaction. Call with the store locked.
    public func applyFirewall() throws(LibraryError) {
        let networks = ((try? store.all()) ?? []).filter(isUp)
        var forwards: [ActiveForward] = []
        for vm in runningVMs() {
            for card in vm.networks where !card.forwards.isEmpty {
                guard let name = card.attachment.networkName, let network = networks.first(where: { $0.name == name }),
                      let address = store.reservations(of: name)[card.mac.lowercased()]?.address else { continue }
                forwards += card.forwards.map { ActiveForward(network: network, address: address, forward: $0, vm: vm.name) }
            }
        }
        let text = Self.ruleset(table: firewallTable, networks: networks, forwards: forwards)
        guard let nft = Self.tool("nft") else {
            if networks.isEmpty { return }
            throw .network(name: networks[0].name, reason: "nft is not installed; install Debian's `nftables` package", exitStatus: 2)
        }
        // Nothing up and no table here (this namespace never had Vireo's networks): leave the
        // ruleset alone rather than make and delete a table. Only "no such table" means absent.
        if networks.isEmpty {
            let listed = HostCommand.run(nft, ["list", "table", "ip", firewallTable], timeoutSeconds: 10)
            if listed.status != 0 && listed.output.contains("No such file or directory") { return }
        }
        let path = store.directory + "/.ruleset.nft"
        try HostFiles.writeAtomically(Array(text.utf8), to: path)
        // nft can fail for a moment while other rulesets change (its cache is rebuilt under a
        // generation that moved); the table is all or nothing, so trying again is safe.
        var attempt = 0
        while true {
            let (status, output) = HostCommand.run(nft, ["-f", path], timeoutSeconds: 10)
            if status == 0 { return }
            attempt += 1
            guard attempt < 3 else {
                throw .network(name: networks.first?.name ?? "vireo", reason: "nft refused Vireo's table (\(path)): \(output.trimmingWhitespace())", exitStatus: 1)
            }
            usleep(100_000)
        }
    }

    // MARK: a VM's cards

    /// Vireo's taps for a VM: `vt`, 8 hex digits of its UUID's hash, the card's index.
    /// Unique on the host: a VM's UUID is the same in two libraries while it migrates between
    /// them on one host, so the library is part of the name.
    static func tapName(uuid: String, index: Int, libraryRoot: String) -> String {
        "vt" + String(format8hex(StableHash.fnv1a(libraryRoot + "\u{0}" + uuid))) + String(index)
    }

    /// The host interface a card's frames cross: the user's tap, Vireo's tap, or nil (passt).
    public static func hostInterface(of definition: VMDefinition, card index: Int, libraryRoot: String) -> String? {
        guard definition.networks.indices.contains(index) else { return nil }
        switch definition.networks[index].attachment {
        case let .tap(name): return name
        // Its tap is in the pod's namespace, not this one's.
        case .user, .netns: return nil
        case .nat, .network, .bridge: return tapName(uuid: definition.uuid, index: index, libraryRoot: libraryRoot)
        }
    }

    static func format8hex(_ value: UInt64) -> String {
        let text = String(value & 0xffff_ffff, radix: 16)
        return String(repeating: "0", count: 8 - text.count) + text
    }

    /// Readies every card of a starting VM (whose lock the caller holds): networks up, addresses
    /// reserved, taps made and plugged in, passt started, forwards in the firewall.
    public func prepare(bundle: VMBundle, definition: VMDefinition) throws(LibraryError) -> PreparedNetworking {
        let prepared = PreparedNetworking()
        for forward in definition.networks.flatMap(\.forwards) { try PortForward.checkFree(forward) }
        if let card = definition.networks.first(where: { $0.attachment.isVireoTap }), !Self.mayAdministerNetworks() {
            throw .network(name: card.attachment.networkName ?? card.attachment.description,
                           reason: "VM '\(definition.name)' has a card on \(card.attachment), which needs a tap Vireo makes (and for a network or bridge, plugs into it), and only root (or CAP_NET_ADMIN) may make taps; without them use --nic user (`vireo set \(definition.name) --nic user`)", exitStatus: 2)
        }
        var usesLibraryNetworks = false
        for (index, card) in definition.networks.enumerated() {
            switch card.attachment {
            case let .tap(name):
                prepared.append(PreparedCard(mac: card.mac, backend: .tapName(name), queues: card.queues))
            case .nat, .network:
                usesLibraryNetworks = true
                let network: NetworkDefinition
                if case .nat = card.attachment {
                    network = try store.ensureDefault(hostRoutes: Self.hostRoutes(), registry: registry)
                } else {
                    network = try store.load(card.attachment.networkName ?? "")
                }
                try claimOnHost(network)
                try store.locked { () throws(LibraryError) in
                    let live = Set(((try? library.names()) ?? []).flatMap { name in
                        ((try? VMBundle(directory: library.root + "/" + name).load())?.networks ?? []).map { $0.mac.lowercased() }
                    })
                    _ = try store.reserve(network: network, mac: card.mac, vm: definition.name, liveMACs: live.union([card.mac.lowercased()]))
                    try bringUp(network)
                }
                let tap = Self.tapName(uuid: definition.uuid, index: index, libraryRoot: library.root)
                let slots = try makeTap(tap, bridge: network.bridge, network: network.name, vm: definition.name, queues: card.queues ?? 1).map(prepared.adopt)
                prepared.append(PreparedCard(mac: card.mac, backend: .tapDescriptor(slot: slots[0], tap: tap, queueSlots: Array(slots.dropFirst()))))
            case let .bridge(bridge):
                guard Self.isBridge(bridge) else {
                    throw .network(name: bridge, reason: Self.linkExists(bridge)
                        ? "\(bridge) is not a bridge; `--nic bridge:NAME` needs a host bridge (see `ip -d link show type bridge`)"
                        : "no bridge named \(bridge) on this host; make one (`ip link add \(bridge) type bridge`) or use --nic nat", exitStatus: 2)
                }
                let tap = Self.tapName(uuid: definition.uuid, index: index, libraryRoot: library.root)
                let slots = try makeTap(tap, bridge: bridge, network: bridge, vm: definition.name, queues: card.queues ?? 1).map(prepared.adopt)
                prepared.append(PreparedCard(mac: card.mac, backend: .tapDescriptor(slot: slots[0], tap: tap, queueSlots: Array(slots.dropFirst()))))
            case let .netns(path):
                let tap = Self.tapName(uuid: definition.uuid, index: index, libraryRoot: library.root)
                let slots = try makeTap(tap, namespace: path, vm: definition.name, queues: card.queues ?? 1).map(prepared.adopt)
                prepared.append(PreparedCard(mac: card.mac, backend: .tapDescriptor(slot: slots[0], tap: tap, queueSlots: Array(slots.dropFirst()))))
            case .user:
                let slot = prepared.adopt(try startPasst(bundle, card: card, index: index))
                prepared.append(PreparedCard(mac: card.mac, backend: .streamDescriptor(slot: slot)))
            }
        }
        if usesLibraryNetworks { try store.locked { () throws(LibraryError) in try applyFirewall() } }
        return prepared
    }

    /// Makes a tap that lives only as long as its descriptors (not persistent) and plugs it into
    /// `bridge`. With `queues` above one it is a multiqueue tap and each descriptor one of its
    /// queues (the first makes the tap, the others attach).
    func makeTap(_ name: String, bridge: String, network: String, vm: String, queues: Int = 1) throws(LibraryError) -> [Int32] {
        var descriptors: [Int32] = []
        for _ in 0..<max(1, queues) {
            let fd = queues > 1 ? vireo_tap_open_queue(name) : vireo_tap_open(name)
            guard fd >= 0 else {
                for opened in descriptors { close(opened) }
                throw Self.tapRefusal(name, vm: vm, network: network, code: -fd)
            }
            descriptors.append(fd)
        }
        do {
            try Self.ip(["link", "set", "dev", name, "master", bridge], network: network)
            try Self.ip(["link", "set", "dev", name, "up"], network: network)
        } catch {
            for fd in descriptors { close(fd) }
            throw error
        }
        return descriptors
    }

    static func tapRefusal(_ name: String, vm: String, network: String, code: Int32) -> LibraryError {
        var reason = "cannot make tap \(name) for VM '\(vm)': \(String(cString: strerror(code)))"
        if code == EPERM || code == EACCES { reason += " (taps and bridges need root or CAP_NET_ADMIN; without them use --nic user)" }
        if code == EBUSY { reason += " (another process holds a tap of that name)" }
        return .network(name: network, reason: reason, exitStatus: code == EPERM || code == EACCES ? 2 : 1)
    }

    /// A tap inside the network namespace at `path` (a CNI pod's), joined to the namespace's own
    /// interface by tc: what arrives on the interface leaves through the tap to the guest, what
    /// the guest sends leaves through the interface, as Kata's tc-redirect does. The interface
    /// keeps its addresses and routes (the plugin's record of the pod); the guest takes them
    /// over (its card has the interface's MAC, and the shim gives it the address). The tap goes
    /// with its last descriptor, as every Vireo tap; the redirects are made again at each start.
    /// With `queues` above one it is a multiqueue tap, a descriptor per queue: the redirects act
    /// on the device, whichever queue a frame goes through.
    func makeTap(_ name: String, namespace path: String, vm: String, queues: Int = 1) throws(LibraryError) -> [Int32] {
        let namespace = HostFiles.lastComponent(of: path)
        guard HostFiles.exists(path) else {
            throw .network(name: path, reason: "VM '\(vm)' has a card in the network namespace \(path), which does not exist (`ip netns list` shows the namespaces there)", exitStatus: 2)
        }
        var descriptors = [Int32](repeating: -1, count: max(1, queues))
        let opened = descriptors.withUnsafeMutableBufferPointer { vireo_tap_open_in_netns(path, name, Int32($0.count), $0.baseAddress) }
        guard opened == 0 else {
            let code = -opened
            var reason = "cannot make tap \(name) in network namespace \(path) for VM '\(vm)': " + (code == EINVAL ? "it is not a network namespace" : String(cString: strerror(code)))
            if code == EPERM || code == EACCES { reason += " (joining a namespace and making a tap need root)" }
            throw .network(name: path, reason: reason, exitStatus: code == EPERM || code == EACCES || code == EINVAL ? 2 : 1)
        }
        do throws(LibraryError) {
            let pod = try Self.namespaceNetwork(path, besides: name)
            try Self.ip(["-n", namespace, "link", "set", "dev", name, "mtu", String(pod.mtu), "up"], network: path)
            let tc = try Self.requireTool("tc", package: "iproute2", network: path)
            for (from, to) in [(pod.interface, name), (name, pod.interface)] {
                // A start after a stop finds the old redirect (to a tap that went): replaced.
                _ = HostCommand.run(tc, ["-n", namespace, "qdisc", "del", "dev", from, "ingress"], timeoutSeconds: 10)
                for arguments in [["qdisc", "add", "dev", from, "ingress"],
                                  ["filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0", "0",
                                   "action", "mirred", "egress", "redirect", "dev", to]] {
                    let (status, output) = HostCommand.run(tc, ["-n", namespace] + arguments, timeoutSeconds: 10)
                    guard status == 0 else {
                        throw .network(name: path, reason: "`tc -n \(namespace) \(arguments.joined(separator: " "))` failed: \(output.trimmingWhitespace())", exitStatus: 1)
                    }
                }
            }
        } catch {
            for fd in descriptors { close(fd) }
            throw error
        }
        return descriptors
    }

    /// What a CNI plugin gave a pod in its namespace, which the guest takes over: the interface,
    /// its MAC and MTU, its IPv4 address and prefix, and the default gateway (nil when the plugin
    /// gave none).
    public struct NamespaceNetwork: Sendable, Equatable {
        public var interface: String
        public var mac: String
        public var mtu: Int
        public var address: IPv4Address?
        public var prefixLength: Int?
        public var gateway: IPv4Address?
        /// The interface's global IPv6 address (canonical text) and prefix, and the default IPv6
        /// route's gateway: a dual-stack plugin's second family.
        public var ipv6Address: String?
        public var ipv6PrefixLength: Int?
        public var ipv6Gateway: String?

        /// How the guest configures its first card, on its command line: the kernel's static
        /// IPv4 (`ip=`, Documentation/admin-guide/nfs/nfsroot.rst), and IPv6, which `ip=` lacks,
        /// as `vireo.ipv6=ADDRESS/PREFIX[,GATEWAY]` for the container agent. Nil without either.
        public var kernelArgument: String? {
            var arguments: [String] = []
            if let address, let prefixLength, (1...32).contains(prefixLength) {
                let mask = IPv4Address(prefixLength == 32 ? UInt32.max : ~(UInt32.max >> UInt32(prefixLength)))
                arguments.append("ip=\(address)::\(gateway.map(\.description) ?? ""):\(mask)::eth0:off")
            }
            if let ipv6Address, let ipv6PrefixLength, (1...128).contains(ipv6PrefixLength) {
                arguments.append("vireo.ipv6=\(ipv6Address)/\(ipv6PrefixLength)" + (ipv6Gateway.map { "," + $0 } ?? ""))
            }
            return arguments.isEmpty ? nil : arguments.joined(separator: " ")
        }
    }

    /// The interface a CNI plugin put in the namespace at `path` for the pod: the one that is not
    /// loopback (nor `besides`, the VM's own tap); `eth0`, CNI's usual name, when there are
    /// several. Read with iproute2's JSON, each value checked for what it must be.
    public static func namespaceNetwork(_ path: String, besides tap: String? = nil) throws(LibraryError) -> NamespaceNetwork {
        struct AddressInfo: Decodable { var family: String?; var local: String?; var prefixlen: Int?; var scope: String? }
        struct Link: Decodable { var ifname: String; var mtu: Int?; var link_type: String?; var address: String?; var addr_info: [AddressInfo]? }
        struct Route: Decodable { var dst: String?; var gateway: String? }
        let validated = try NICAttachment.namespacePath(path, field: "netns")
        let namespace = HostFiles.lastComponent(of: validated)
        let binary = try requireTool("ip", package: "iproute2", network: validated)
        let (status, output) = HostCommand.run(binary, ["-n", namespace, "-j", "address", "show"], timeoutSeconds: 10)
        guard status == 0, let links = try? JSONDecoder().decode([Link].self, from: Data(output.utf8)) else {
            throw .network(name: validated, reason: "cannot list the interfaces of network namespace \(validated): \(output.trimmingWhitespace().prefix(300))", exitStatus: 1)
        }
        let candidates = links.filter { $0.ifname != "lo" && $0.ifname != tap && $0.link_type != "loopback" }
        guard let chosen = candidates.count == 1 ? candidates.first : candidates.first(where: { $0.ifname == "eth0" }) else {
            throw .network(name: validated, reason: candidates.isEmpty
                ? "network namespace \(validated) has no interface besides loopback for the VM's card to take over (a CNI plugin puts one there, usually eth0)"
                : "network namespace \(validated) has several interfaces (\(candidates.map(\.ifname).joined(separator: ", "))) and none is eth0; the VM's card takes over one", exitStatus: 2)
        }
        let mac = (chosen.address ?? "").lowercased()
        guard mac.utf8.count == 17, mac.split(separator: ":").count == 6, mac.split(separator: ":").allSatisfy({ $0.count == 2 && UInt8($0, radix: 16) != nil }) else {
            throw .network(name: validated, reason: "interface \(chosen.ifname) in network namespace \(validated) has no Ethernet address (\(chosen.address ?? "none")) for the VM's card", exitStatus: 2)
        }
        var network = NamespaceNetwork(interface: chosen.ifname, mac: mac, mtu: min(max(chosen.mtu ?? 1500, 68), 65535))
        if let info = chosen.addr_info?.first(where: { $0.family == "inet" }), let local = info.local.flatMap({ IPv4Address($0) }),
           let prefix = info.prefixlen, (1...32).contains(prefix) {
            network.address = local
            network.prefixLength = prefix
            let routes = HostCommand.run(binary, ["-n", namespace, "-j", "-4", "route", "show", "default"], timeoutSeconds: 10)
            if routes.status == 0, let decoded = try? JSONDecoder().decode([Route].self, from: Data(routes.output.utf8)) {
                network.gateway = decoded.compactMap { $0.gateway.flatMap { IPv4Address($0) } }.first
            }
        }
        // Each value parsed, not believed: it goes onto the guest's command line.
        if let info = chosen.addr_info?.first(where: { $0.family == "inet6" && $0.scope == "global" }),
           let local = info.local.flatMap(IPAddressText.canonicalIPv6), let prefix = info.prefixlen, (1...128).contains(prefix) {
            network.ipv6Address = local
            network.ipv6PrefixLength = prefix
            let routes = HostCommand.run(binary, ["-n", namespace, "-j", "-6", "route", "show", "default"], timeoutSeconds: 10)
            if routes.status == 0, let decoded = try? JSONDecoder().decode([Route].self, from: Data(routes.output.utf8)) {
                network.ipv6Gateway = decoded.compactMap { $0.gateway.flatMap(IPAddressText.canonicalIPv6) }.first
            }
        }
        return network
    }

    /// passt on one end of a socket pair (its log in the VM's directory); the VM gets the other
    /// end. passt quits when the VM's end closes, so it lives exactly as long as the VM.
    func startPasst(_ bundle: VMBundle, card: NetworkAttachment, index: Int) throws(LibraryError) -> Int32 {
        guard let passt = Self.tool("passt") else {
            throw .network(name: "user", reason: "--nic user needs passt; install Debian's `passt` package", exitStatus: 2)
        }
        var ends: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &ends) == 0 else {
            throw .io(operation: "socketpair", path: bundle.directory, errno: errno)
        }
        defer { close(ends[1]) }
        var arguments = [passt, "--foreground", "--stderr", "--fd", "5"]
        let tcp = card.forwards.filter { $0.proto == .tcp }.map { "\($0.hostPort):\($0.guestPort)" }
        let udp = card.forwards.filter { $0.proto == .udp }.map { "\($0.hostPort):\($0.guestPort)" }
        arguments += tcp.isEmpty ? ["-t", "none"] : ["-t", tcp.joined(separator: ",")]
        arguments += udp.isEmpty ? ["-u", "none"] : ["-u", udp.joined(separator: ",")]
        let logPath = bundle.directory + "/passt\(index).log"
        let log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard log >= 0 else {
            close(ends[0])
            throw .io(operation: "open", path: logPath, errno: errno)
        }
        defer { close(log) }
        var pid: pid_t = 0
        let inherit = [ends[1]]
        let spawned = withCStrings(arguments) { argv in
            inherit.withUnsafeBufferPointer { vireo_spawn_detached_inheriting(passt, argv, log, -1, -1, $0.baseAddress, 1, &pid) }
        }
        guard spawned == 0 else {
            close(ends[0])
            throw .network(name: "user", reason: "cannot run \(passt): \(String(cString: strerror(spawned)))", exitStatus: 1)
        }
        return ends[0]
    }

    // MARK: taking down what nothing uses

    /// Takes down every network no running VM uses (unless it is `autostart`), and brings the
    /// firewall up to date with the VMs that still run. Errors are not the caller's: a stop
    /// succeeded even if a bridge could not be deleted.
    /// `failedStart`: the UUID of a VM whose start just failed (its lock is still held here).
    /// Returns what could not be done, for the user to see.
    @discardableResult
    public func releaseIdle(failedStart: String? = nil) -> [String] {
        guard HostFiles.isDirectory(store.directory) else { return [] }
        var warnings: [String] = []
        do {
            try store.locked { () throws(LibraryError) in
                let running = runningVMs().filter { $0.uuid != failedStart }
                let used = Set(running.flatMap { $0.networks.compactMap(\.attachment.networkName) })
                let networks = (try? store.all()) ?? []
                for network in networks where isUp(network) && !network.autostart && !used.contains(network.name) {
                    bringDown(network)
                    if isUp(network) { warnings.append("network '\(network.name)': its bridge \(network.bridge) could not be deleted") }
                }
                do throws(LibraryError) { try applyFirewall() } catch { warnings.append(error.description) }
                if !networks.contains(where: { $0.mode == .nat && isUp($0) }) { restoreForwarding() }
            }
        } catch {
            warnings.append(error.description)
        }
        return warnings
    }

    /// Brings a network up now (`vireo network start`), with its firewall.
    public func start(_ name: String) throws(LibraryError) {
        let network = try store.load(name)
        try claimOnHost(network)
        try store.locked { () throws(LibraryError) in
            try bringUp(network)
            try applyFirewall()
        }
    }

    /// Takes a network down (`vireo network stop`); refused while a running VM uses it.
    public func stop(_ name: String) throws(LibraryError) {
        let network = try store.load(name)
        try store.locked { () throws(LibraryError) in
            let users = runningVMs().filter { $0.networks.contains { $0.attachment.networkName == name } }.map(\.name)
            guard users.isEmpty else {
                throw .network(name: name, reason: "running VMs use it: \(users.joined(separator: ", ")); stop them first", exitStatus: 2)
            }
            bringDown(network)
            try applyFirewall()
            if !((try? store.all()) ?? []).contains(where: { $0.mode == .nat && isUp($0) }) { restoreForwarding() }
        }
    }

    /// Deletes a network: refused while any VM's card names it; takes it down first.
    public func delete(_ name: String) throws(LibraryError) {
        let network = try store.load(name)
        let users = ((try? library.names()) ?? []).filter { vm in
            ((try? VMBundle(directory: library.root + "/" + vm).load())?.networks ?? []).contains { $0.attachment.networkName == name }
        }
        guard users.isEmpty else {
            throw .network(name: name, reason: "VMs have cards on it: \(users.joined(separator: ", ")); remove them (`vireo nic remove VM N`) or delete the VMs first", exitStatus: 2)
        }
        try store.locked { () throws(LibraryError) in
            bringDown(network)
            try store.remove(name)
            try applyFirewall()
            if !((try? store.all()) ?? []).contains(where: { $0.mode == .nat && isUp($0) }) { restoreForwarding() }
        }
        if let registry { try? registry.locked { () throws(LibraryError) in registry.release(bridge: network.bridge, library: library.root) } }
    }

    // MARK: addresses

    /// Each card's IPv4 address as its network's DHCP server leased it (nil when unknown:
    /// no lease yet, or a card outside Vireo's networks).
    public func addresses(of definition: VMDefinition) -> [IPv4Address?] {
        var leases: [String: [NetworkStore.Lease]] = [:]
        return definition.networks.map { card in
            guard let name = card.attachment.networkName else { return nil }
            if leases[name] == nil { leases[name] = store.leases(of: name) }
            let now = Int64(time(nil))
            return leases[name]?.filter { $0.mac == card.mac.lowercased() && ($0.expires == 0 || $0.expires > now) }
                .max { $0.expires < $1.expires }?.address
        }
    }
}

