import FoundationEssentials
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// An IPv4 address (host byte order inside, dotted quad outside).
public struct IPv4Address: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var value: UInt32

    public init(_ value: UInt32) { self.value = value }

    /// Parses a dotted quad: four decimal numbers 0...255, no leading zeros beyond "0".
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            guard !part.isEmpty, part.count <= 3, part.allSatisfy(\.isASCII), let byte = UInt8(part),
                  part == "0" || !part.hasPrefix("0") else { return nil }
            value = value << 8 | UInt32(byte)
        }
        self.value = value
    }

    public var description: String { "\(value >> 24).\(value >> 16 & 0xff).\(value >> 8 & 0xff).\(value & 0xff)" }
    public static func < (a: IPv4Address, b: IPv4Address) -> Bool { a.value < b.value }
}

/// An IPv4 subnet such as 10.20.0.0/24. Networks Vireo makes need room for a gateway, a DHCP
/// range and a broadcast address, so prefixes run from /8 to /29.
public struct IPv4Subnet: Hashable, Sendable, CustomStringConvertible, Codable {
    public var network: IPv4Address
    public var prefixLength: Int

    public init(network: IPv4Address, prefixLength: Int) { self.network = network; self.prefixLength = prefixLength }

    public static func parse(_ text: String, field: String) throws(LibraryError) -> IPv4Subnet {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let address = IPv4Address(parts[0]), let prefix = Int(parts[1]) else {
            throw .invalidValue(field: field, reason: "'\(text)' is not an IPv4 subnet like 10.20.0.0/24")
        }
        guard (8...29).contains(prefix) else {
            throw .invalidValue(field: field, reason: "prefix /\(prefix) is outside /8 to /29 (a network needs a gateway, guests and a broadcast address)")
        }
        let subnet = IPv4Subnet(network: address, prefixLength: prefix)
        guard address.value & ~subnet.mask == 0 else {
            throw .invalidValue(field: field, reason: "'\(text)' has host bits set; the subnet is \(IPv4Subnet(network: IPv4Address(address.value & subnet.mask), prefixLength: prefix))")
        }
        let first = address.value >> 24
        guard first != 0, first != 127, first < 224, !(first == 169 && address.value >> 16 & 0xff == 254) else {
            throw .invalidValue(field: field, reason: "\(text) is not usable for a network (loopback, link-local, multicast or reserved)")
        }
        return subnet
    }

    public var mask: UInt32 { UInt32.max << UInt32(32 - prefixLength) }
    public var netmask: IPv4Address { IPv4Address(mask) }
    public var broadcast: IPv4Address { IPv4Address(network.value | ~mask) }
    /// The host's address on the network: the first one, as libvirt and VirtualBox do.
    public var gateway: IPv4Address { IPv4Address(network.value + 1) }
    public func contains(_ address: IPv4Address) -> Bool { address.value & mask == network.value }
    public func overlaps(_ other: IPv4Subnet) -> Bool {
        let shorter = min(prefixLength, other.prefixLength)
        let mask = UInt32.max << UInt32(32 - shorter)
        return network.value & mask == other.network.value & mask
    }
    /// Addresses a guest may have: neither the network, the gateway nor the broadcast address.
    public var guestAddresses: ClosedRange<UInt32> { (network.value + 2)...(broadcast.value - 1) }
    public var description: String { "\(network)/\(prefixLength)" }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do { self = try Self.parse(text, field: "subnet") } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.description))
        }
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// What a network connects, as VirtualBox names it.
public enum NetworkMode: String, Codable, Sendable, CaseIterable {
    /// VMs reach out through the host, masqueraded; the host reaches them; port forwards.
    case nat
    /// VMs and the host, nothing beyond.
    case hostOnly = "host-only"
    /// VMs among themselves; the host has no address on it.
    case `internal`
}

public struct DHCPRange: Codable, Sendable, Equatable, CustomStringConvertible {
    public var first: IPv4Address
    public var last: IPv4Address

    public init(first: IPv4Address, last: IPv4Address) { self.first = first; self.last = last }

    public static func parse(_ text: String, field: String) throws(LibraryError) -> DHCPRange {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, let first = IPv4Address(parts[0]), let last = IPv4Address(parts[1]) else {
            throw .invalidValue(field: field, reason: "'\(text)' is not a range of IPv4 addresses like 10.20.0.100-10.20.0.200")
        }
        guard first <= last else { throw .invalidValue(field: field, reason: "\(first) comes after \(last)") }
        return DHCPRange(first: first, last: last)
    }

    public var description: String { "\(first)-\(last)" }
    public var count: Int { Int(last.value - first.value) + 1 }

    enum CodingKeys: String, CodingKey { case first, last }
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let texts = (try container.decode(String.self, forKey: .first), try container.decode(String.self, forKey: .last))
        guard let first = IPv4Address(texts.0), let last = IPv4Address(texts.1) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "DHCP range \(texts) is not two IPv4 addresses"))
        }
        self.first = first; self.last = last
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(first.description, forKey: .first)
        try container.encode(last.description, forKey: .last)
    }
}

/// One virtual network, stored as `networks/NAME/network.json` in the library.
public struct NetworkDefinition: Codable, Sendable, Equatable {
    public static let currentVersion = 1
    public var version: Int
    public var name: String
    public var mode: NetworkMode
    public var subnet: IPv4Subnet
    /// Addresses dnsmasq hands out; nil: no DHCP (always so on internal networks, which give the
    /// host no address to serve from).
    public var dhcp: DHCPRange?
    /// Stays up when no VM uses it (otherwise it goes down with its last VM).
    public var autostart: Bool
    /// The host bridge, at most 15 characters.
    public var bridge: String
    public var createdAt: Int64

    /// The host's address on the network; nil on internal networks.
    public var hostAddress: IPv4Address? { mode == .internal ? nil : subnet.gateway }
}

/// What `vireo network create` asks for.
public struct NetworkCreateRequest: Sendable {
    public var name: String
    public var mode: NetworkMode = .nat
    public var subnet: String?
    public var dhcp: String?
    public var withoutDHCP = false
    public var autostart = false

    public init(name: String) { self.name = name }
}

/// How one card reaches the world.
public enum NICAttachment: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// The `default` NAT network (made on first use).
    case nat
    /// A network from `vireo network create`.
    case network(String)
    /// An existing host bridge: the VM appears on that LAN.
    case bridge(String)
    /// User-mode networking through passt: no root, no bridge.
    case user
    /// A host tap device the user manages.
    case tap(String)
    /// A network namespace someone else wired (a CNI plugin, for a containerd pod), named by its
    /// file under /run/netns: Vireo makes the card's tap inside it and joins it to the
    /// namespace's interface with tc redirects both ways, as Kata Containers does, so the guest
    /// is where the plugin's interface was.
    case netns(String)

    public static let syntax = "nat, network:NAME, bridge:BRIDGE, user, tap:NAME or netns:/run/netns/NAME"
    /// Where network namespaces are pinned (`ip netns`, containerd's CRI, CNI's tools).
    public static let namespaceDirectory = "/run/netns"


    public static func parse(_ text: String, field: String) throws(LibraryError) -> NICAttachment {
        switch text {
        case "nat": return .nat
        case "user": return .user
        default: break
        }
        guard let colon = text.firstIndex(of: ":") else {
            throw .invalidValue(field: field, reason: "'\(text)' is not one of \(syntax)")
        }
        let kind = text[..<colon], value = String(text[text.index(after: colon)...])
        switch kind {
        case "network":
            try NetworkName.validate(value, field: field)
            return .network(value)
        case "bridge", "tap":
            guard !value.isEmpty, value.utf8.count <= 15,
                  value.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "/") && $0 != UInt8(ascii: ",") }) else {
                throw .invalidValue(field: field, reason: "\(kind) name '\(value)' must be 1 to 15 printable characters without '/', ',' or spaces (a Linux interface name)")
            }
            return kind == "tap" ? .tap(value) : .bridge(value)
        case "netns":
            return .netns(try namespacePath(value, field: field))
        default:
            throw .invalidValue(field: field, reason: "'\(text)' is not one of \(syntax)")
        }
    }

    /// A namespace's file, as the rule allows it: /run/netns/NAME (or /var/run/netns/NAME,
    /// containerd's spelling; /var/run is /run), NAME plain characters. Root opens it and joins
    /// it to make a tap, so nothing else is taken: not a path through links, not /proc's files.
    static func namespacePath(_ text: String, field: String) throws(LibraryError) -> String {
        let name: Substring
        if text.hasPrefix(namespaceDirectory + "/") {
            name = text.dropFirst(namespaceDirectory.count + 1)
        } else if text.hasPrefix("/var" + namespaceDirectory + "/") {
            name = text.dropFirst(namespaceDirectory.count + 5)
        } else {
            throw .invalidValue(field: field, reason: "network namespace '\(text.prefix(200))' must be a file in \(namespaceDirectory) (where `ip netns` and containerd pin them), like \(namespaceDirectory)/cni-1234")
        }
        guard (1...64).contains(name.utf8.count), name != ".", name != "..",
              name.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5a) || ($0 >= 0x61 && $0 <= 0x7a) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") }) else {
            throw .invalidValue(field: field, reason: "network namespace name '\(name.prefix(100))' must be 1 to 64 letters, digits, '-', '_' or '.'")
        }
        return namespaceDirectory + "/" + name
    }

    public var description: String {
        switch self {
        case .nat: return "nat"
        case .user: return "user"
        case let .network(name): return "network:" + name
        case let .bridge(name): return "bridge:" + name
        case let .tap(name): return "tap:" + name
        case let .netns(path): return "netns:" + path
        }
    }

    /// The library network the card is on, if any.
    public var networkName: String? {
        switch self {
        case .nat: return NetworkStore.defaultName
        case let .network(name): return name
        default: return nil
        }
    }

    /// Cards on a tap Vireo makes (plugged into a bridge, or into a namespace's interface).
    public var isVireoTap: Bool {
        switch self {
        case .nat, .network, .bridge, .netns: return true
        case .user, .tap: return false
        }
    }

    /// Whether the card's tap can be a multiqueue tap (one queue per pair): a tap Vireo makes
    /// on the host or in a pod's namespace, or one the user names. passt's stream is one queue.
    public var takesQueuePairs: Bool {
        switch self {
        case .nat, .network, .bridge, .tap, .netns: return true
        case .user: return false
        }
    }

    /// Whether host ports can be forwarded to the card.
    public var acceptsForwards: Bool {
        switch self {
        case .nat, .network, .user: return true
        case .bridge, .tap, .netns: return false
        }
    }
}

/// A host port handed to a guest port: `tcp:8022:22`.
public struct PortForward: Hashable, Sendable, CustomStringConvertible, Codable {
    public enum Proto: String, Sendable, CaseIterable { case tcp, udp }
    public var proto: Proto
    public var hostPort: UInt16
    public var guestPort: UInt16

    public init(proto: Proto, hostPort: UInt16, guestPort: UInt16) { self.proto = proto; self.hostPort = hostPort; self.guestPort = guestPort }

    public static func parse(_ text: String, field: String) throws(LibraryError) -> PortForward {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 3, let proto = Proto(rawValue: String(parts[0])) else {
            throw .invalidValue(field: field, reason: "'\(text)' is not PROTO:HOSTPORT:GUESTPORT with PROTO tcp or udp, like tcp:8022:22")
        }
        guard let host = UInt16(parts[1]), host > 0, let guest = UInt16(parts[2]), guest > 0 else {
            throw .invalidValue(field: field, reason: "ports in '\(text)' must be numbers from 1 to 65535")
        }
        return PortForward(proto: proto, hostPort: host, guestPort: guest)
    }

    public var description: String { "\(proto.rawValue):\(hostPort):\(guestPort)" }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do { self = try Self.parse(text, field: "forward") } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.description))
        }
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

public enum NetworkName {
    public static let rule = "1 to 32 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"

    public static func validate(_ name: String, field: String = "network name") throws(LibraryError) {
        let allowed = name.unicodeScalars.allSatisfy { scalar in
            (scalar >= "a" && scalar <= "z") || (scalar >= "A" && scalar <= "Z") || (scalar >= "0" && scalar <= "9")
                || scalar == "." || scalar == "_" || scalar == "-"
        }
        guard !name.isEmpty, name.utf8.count <= 32, allowed, let first = name.unicodeScalars.first,
              first != ".", first != "_", first != "-" else {
            throw .invalidValue(field: field, reason: "'\(name)' must be \(rule)")
        }
    }
}

/// The library's networks: `networks/NAME/network.json`, with each network's runtime files
/// (dnsmasq's configuration, leases and pid) beside it. Changes happen under `networks/.lock`.
public struct NetworkStore: Sendable {
    public static let defaultName = "default"
    public let directory: String
    public let libraryRoot: String

    public init(libraryRoot: String) {
        self.libraryRoot = libraryRoot
        directory = libraryRoot + "/networks"
    }

    public func path(of name: String) -> String { directory + "/" + name }
    public func configPath(of name: String) -> String { path(of: name) + "/network.json" }
    public func leasesPath(of name: String) -> String { path(of: name) + "/leases" }
    public func reservationsPath(of name: String) -> String { path(of: name) + "/reservations" }
    public func dnsmasqConfigPath(of name: String) -> String { path(of: name) + "/dnsmasq.conf" }
    public func dnsmasqPIDPath(of name: String) -> String { path(of: name) + "/dnsmasq.pid" }

    /// Holds the store's lock for the duration of `body`: network changes, bring-up and the
    /// firewall are made by one command at a time.
    public func locked<T>(_ body: () throws(LibraryError) -> T) throws(LibraryError) -> T {
        try HostFiles.makeDirectories(directory)
        let lock = try VMLock(path: directory + "/.lock", create: true)
        guard lock.tryExclusive(attempts: 3000) else {
            throw .corrupt(path: lock.path, reason: "another vireo command has held the network lock for 30 s")
        }
        defer { lock.unlock() }
        return try body()
    }

    public func names() throws(LibraryError) -> [String] {
        guard HostFiles.isDirectory(directory) else { return [] }
        return try HostFiles.entries(of: directory).filter { !$0.hasPrefix(".") && HostFiles.exists(configPath(of: $0)) }
    }

    public func exists(_ name: String) -> Bool { HostFiles.exists(configPath(of: name)) }

    public func load(_ name: String) throws(LibraryError) -> NetworkDefinition {
        try NetworkName.validate(name)
        let path = configPath(of: name)
        guard HostFiles.exists(path) else {
            throw .invalidValue(field: "network", reason: "no network named '\(name)' (see `vireo network list`)")
        }
        let bytes = try HostFiles.readAll(path)
        let definition: NetworkDefinition
        do { definition = try JSONDecoder().decode(NetworkDefinition.self, from: Data(bytes)) } catch {
            throw .corrupt(path: path, reason: "not a network definition: \(error)")
        }
        guard definition.version <= NetworkDefinition.currentVersion else {
            throw .corrupt(path: path, reason: "written by a newer Vireo (version \(definition.version))")
        }
        guard definition.name == name else { throw .corrupt(path: path, reason: "names network '\(definition.name)', not '\(name)'") }
        return definition
    }

    public func all() throws(LibraryError) -> [NetworkDefinition] {
        var result: [NetworkDefinition] = []
        for name in try names() { result.append(try load(name)) }
        return result
    }

    func save(_ definition: NetworkDefinition) throws(LibraryError) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let bytes: Data
        do { bytes = try encoder.encode(definition) } catch {
            throw .corrupt(path: configPath(of: definition.name), reason: "cannot encode: \(error)")
        }
        try HostFiles.writeAtomically(Array(bytes) + [10], to: configPath(of: definition.name))
    }

    /// A bridge name of at most 15 characters: `vireo-NAME` when it fits, else a hash of the name.
    static func bridgeName(for name: String) -> String {
        let plain = "vireo-" + name
        if plain.utf8.count <= 15 { return plain }
        // 9 hex digits: "vireo-" and 36 bits of the hash make exactly 15 characters.
        let digits = String(StableHash.fnv1a(name) & 0xf_ffff_ffff, radix: 16)
        return "vireo-" + String(repeating: "0", count: 9 - digits.count) + digits
    }

    /// A bridge name of this library's own: `vireo-` and 9 hex digits of the library's path and
    /// the network's name, for when `bridgeName(for:)` is another library's.
    static func libraryBridgeName(for name: String, libraryRoot: String, salt: Int) -> String {
        let digits = String(StableHash.fnv1a(libraryRoot + "\u{0}" + name + (salt == 0 ? "" : "\u{0}\(salt)")) & 0xf_ffff_ffff, radix: 16)
        return "vireo-" + String(repeating: "0", count: 9 - digits.count) + digits
    }

    /// Creates a network after checking every field: `hostRoutes` are subnets the host already
    /// reaches (a new network must not shadow them). With the host's `registry`, the bridge name
    /// and subnet are ones no other library on this host holds, and they are claimed.
    public func create(_ request: NetworkCreateRequest, hostRoutes: [IPv4Subnet],
                       registry: HostNetworkRegistry? = HostNetworkRegistry()) throws(LibraryError) -> NetworkDefinition {
        try NetworkName.validate(request.name)
        guard let registry else { return try create(request, hostRoutes: hostRoutes, otherLibraries: []) }
        return try registry.locked { () throws(LibraryError) -> NetworkDefinition in
            let definition = try create(request, hostRoutes: hostRoutes, otherLibraries: registry.others(than: libraryRoot))
            try registry.claim(definition, library: libraryRoot)
            return definition
        }
    }

    func create(_ request: NetworkCreateRequest, hostRoutes: [IPv4Subnet], otherLibraries: [HostNetworkRegistry.Claim]) throws(LibraryError) -> NetworkDefinition {
        try locked { () throws(LibraryError) -> NetworkDefinition in
            guard !exists(request.name) else {
                throw .invalidValue(field: "network name", reason: "a network named '\(request.name)' already exists")
            }
            let others = try all()
            // Subnets other libraries' networks hold are taken as if this host routed them.
            let elsewhere = otherLibraries.filter { $0.mode != .internal }
            let subnet: IPv4Subnet
            if let text = request.subnet {
                subnet = try IPv4Subnet.parse(text, field: "subnet")
                if let clash = others.first(where: { $0.subnet.overlaps(subnet) }) {
                    throw .invalidValue(field: "subnet", reason: "\(subnet) overlaps network '\(clash.name)' (\(clash.subnet))")
                }
                if request.mode != .internal, let clash = elsewhere.first(where: { $0.subnet.overlaps(subnet) }) {
                    throw .invalidValue(field: "subnet", reason: "\(subnet) overlaps \(clash.subnet) of network '\(clash.network)' in the library \(clash.library) on this host; choose another")
                }
                if let route = hostRoutes.first(where: { $0.overlaps(subnet) }) {
                    throw .invalidValue(field: "subnet", reason: "\(subnet) overlaps \(route), which this host already routes; choose another")
                }
            } else {
                subnet = try Self.freeSubnet(avoiding: others.map(\.subnet) + elsewhere.map(\.subnet) + hostRoutes)
            }
            var dhcp: DHCPRange?
            if request.mode == .internal {
                if request.dhcp != nil {
                    throw .invalidValue(field: "dhcp", reason: "an internal network gives the host no address to serve DHCP from; give guests static addresses, or use --mode host-only")
                }
            } else if let text = request.dhcp {
                if request.withoutDHCP { throw .invalidValue(field: "dhcp", reason: "choose one of --dhcp RANGE and --no-dhcp") }
                let range = try DHCPRange.parse(text, field: "dhcp")
                guard subnet.guestAddresses.contains(range.first.value), subnet.guestAddresses.contains(range.last.value) else {
                    throw .invalidValue(field: "dhcp", reason: "\(range) is not inside \(subnet)'s guest addresses \(IPv4Address(subnet.guestAddresses.lowerBound))-\(IPv4Address(subnet.guestAddresses.upperBound)) (the first address is the host's)")
                }
                dhcp = range
            } else if !request.withoutDHCP {
                dhcp = Self.defaultRange(subnet)
            }
            // `vireo-NAME` unless another library on this host holds that name.
            var bridge = Self.bridgeName(for: request.name)
            var salt = 0
            while otherLibraries.contains(where: { $0.bridge == bridge }) || others.contains(where: { $0.bridge == bridge }) {
                bridge = Self.libraryBridgeName(for: request.name, libraryRoot: libraryRoot, salt: salt)
                salt += 1
                guard salt < 64 else { throw .invalidValue(field: "network name", reason: "no free bridge name for it on this host; choose another name") }
            }
            let definition = NetworkDefinition(version: NetworkDefinition.currentVersion, name: request.name, mode: request.mode,
                                               subnet: subnet, dhcp: dhcp, autostart: request.autostart,
                                               bridge: bridge, createdAt: Int64(time(nil)))
            if let clash = others.first(where: { $0.bridge == definition.bridge }) {
                throw .invalidValue(field: "network name", reason: "its bridge name \(definition.bridge) is taken by network '\(clash.name)'; choose another name")
            }
            try HostFiles.makeDirectories(path(of: request.name))
            try save(definition)
            return definition
        }
    }

    /// The second half of a subnet, as libvirt's default network hands out .2-.254 of a /24.
    static func defaultRange(_ subnet: IPv4Subnet) -> DHCPRange {
        let addresses = subnet.guestAddresses
        let size = addresses.upperBound - addresses.lowerBound + 1
        let first = size > 16 ? addresses.lowerBound + size / 2 - 1 : addresses.lowerBound
        return DHCPRange(first: IPv4Address(first), last: IPv4Address(addresses.upperBound))
    }

    /// The first /24 of 192.168.122.0 upwards (libvirt's default first) that nothing uses.
    static func freeSubnet(avoiding taken: [IPv4Subnet]) throws(LibraryError) -> IPv4Subnet {
        for third in UInt32(122)...254 {
            let candidate = IPv4Subnet(network: IPv4Address(192 << 24 | 168 << 16 | third << 8), prefixLength: 24)
            if !taken.contains(where: { $0.overlaps(candidate) }) { return candidate }
        }
        throw .invalidValue(field: "subnet", reason: "every 192.168.122-254.0/24 is in use; give one with --subnet")
    }

    /// The `default` NAT network, made on first use like libvirt's.
    public func ensureDefault(hostRoutes: [IPv4Subnet], registry: HostNetworkRegistry? = HostNetworkRegistry()) throws(LibraryError) -> NetworkDefinition {
        if exists(Self.defaultName) { return try load(Self.defaultName) }
        do {
            return try create(NetworkCreateRequest(name: Self.defaultName), hostRoutes: hostRoutes, registry: registry)
        } catch let .invalidValue(field, _) where field == "network name" && exists(Self.defaultName) {
            return try load(Self.defaultName)   // another command made it meanwhile
        }
    }

    /// Deletes a network's definition and files; the caller has checked that nothing uses it
    /// and brought it down.
    public func remove(_ name: String) throws(LibraryError) {
        try NetworkName.validate(name)
        guard exists(name) else { throw .invalidValue(field: "network", reason: "no network named '\(name)' (see `vireo network list`)") }
        try HostFiles.removeTree(path(of: name))
    }

    public func setAutostart(_ name: String, _ value: Bool) throws(LibraryError) {
        try locked { () throws(LibraryError) in
            var definition = try load(name)
            definition.autostart = value
            try save(definition)
        }
    }

    // MARK: leases and reservations

    public struct Lease: Sendable, Equatable {
        public var mac: String
        public var address: IPv4Address
        public var hostname: String?
        public var expires: Int64
    }

    /// dnsmasq's lease file: `EXPIRY MAC IP HOSTNAME CLIENT-ID` per line.
    public func leases(of name: String) -> [Lease] {
        guard let bytes = try? HostFiles.readAll(leasesPath(of: name)), bytes.count < 4 << 20 else { return [] }
        return String(decoding: bytes, as: UTF8.self).split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count >= 4, let expires = Int64(fields[0]), let address = IPv4Address(fields[2]) else { return nil }
            return Lease(mac: fields[1].lowercased(), address: address, hostname: fields[3] == "*" ? nil : String(fields[3]), expires: expires)
        }
    }

    /// Fixed addresses by MAC (`MAC ADDRESS VM` per line), so a VM keeps its address across
    /// restarts and port forwards know where to go.
    public func reservations(of name: String) -> [String: (address: IPv4Address, vm: String)] {
        guard let bytes = try? HostFiles.readAll(reservationsPath(of: name)), bytes.count < 4 << 20 else { return [:] }
        var result: [String: (address: IPv4Address, vm: String)] = [:]
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let fields = line.split(separator: " ")
            // Each line becomes a line of dnsmasq's hosts file: only a real MAC and address pass.
            guard fields.count == 3, let address = IPv4Address(fields[1]), let mac = MachineRules.macBytes(String(fields[0])) else { continue }
            result[MachineRules.macText(mac)] = (address, String(fields[2]))
        }
        return result
    }

    /// The address reserved for `mac`, reserving the first free one in the DHCP range if it has
    /// none. Reservations of MACs no VM has any more (`liveMACs`) are dropped first.
    public func reserve(network: NetworkDefinition, mac: String, vm: String, liveMACs: Set<String>) throws(LibraryError) -> IPv4Address? {
        guard let range = network.dhcp else { return nil }
        var table = reservations(of: network.name).filter { liveMACs.contains($0.key) }
        let key = mac.lowercased()
        if let existing = table[key], range.first <= existing.address, existing.address <= range.last {
            if existing.vm != vm { table[key] = (existing.address, vm); try saveReservations(network.name, table) }
            return existing.address
        }
        let taken = Set(table.values.map(\.address.value))
        // Addresses dnsmasq leased to someone else stay theirs.
        let leased = Set(leases(of: network.name).filter { $0.mac != key }.map(\.address.value))
        guard let free = (range.first.value...range.last.value).first(where: { !taken.contains($0) && !leased.contains($0) }) else {
            throw .invalidValue(field: "network", reason: "network '\(network.name)' has no free address left in its DHCP range \(range)")
        }
        table[key] = (IPv4Address(free), vm)
        try saveReservations(network.name, table)
        return IPv4Address(free)
    }

    func saveReservations(_ name: String, _ table: [String: (address: IPv4Address, vm: String)]) throws(LibraryError) {
        let text = table.sorted { $0.value.address < $1.value.address }.map { "\($0.key) \($0.value.address) \($0.value.vm)\n" }.joined()
        try HostFiles.writeAtomically(Array(text.utf8), to: reservationsPath(of: name))
    }
}

/// FNV-1a, 64-bit: stable names derived from other names (bridges, taps).
public enum StableHash {
    public static func fnv1a(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        return hash
    }
}

extension NetworkAttachment {
    /// A random unicast, locally administered MAC (`x2:...`).
    public static func randomMAC() -> String { MachineRules.macText(MachineRules.randomMAC()) }
}

extension PortForward {
    /// Refuses a host port something on this host already listens on (bound to any address):
    /// a forward would hide it, or passt could not take it.
    public static func checkFree(_ forward: PortForward) throws(LibraryError) {
        let fd = socket(AF_INET, forward.proto == .tcp ? Int32(SOCK_STREAM.rawValue) : Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = forward.hostPort.bigEndian
        address.sin_addr.s_addr = 0
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if bound != 0 && errno == EADDRINUSE {
            throw .invalidValue(field: "forwards", reason: "\(forward): host \(forward.proto.rawValue) port \(forward.hostPort) is already in use on this host; choose another")
        }
    }
}

/// Host programs Vireo runs (iproute2, dnsmasq, nftables, passt).
public enum HostTools {
    /// The whole path of `name` from PATH, or from the sbin directories (not on every user's
    /// PATH, yet where Debian puts ip, dnsmasq and nft).
    public static func find(_ name: String) -> String? {
        let path = (getenv("PATH").map { String(cString: $0) } ?? "") + ":/usr/sbin:/sbin"
        for directory in path.split(separator: ":") where !directory.isEmpty {
            let candidate = "\(directory)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }
}

extension NetworkAttachment {
    /// A card as the CLI's `--nic` and the API's `nics` write it:
    /// `nat|network:NAME|bridge:BR|user|tap:NAME[,mac=...]`, with a MAC made now if none was given.
    public static func parseCard(_ text: String, field: String) throws(LibraryError) -> (card: NetworkAttachment, explicitMAC: Bool) {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let attachment = try NICAttachment.parse(parts[0], field: field)
        var mac: String?
        var queues: Int?
        for option in parts.dropFirst() {
            if option.hasPrefix("queues=") {
                guard let count = Int(option.dropFirst(7)) else {
                    throw .invalidValue(field: field, reason: "queues '\(option.dropFirst(7).prefix(40))' is not a number; allowed: \(MachineLimits.nicQueuePairs.lowerBound) to \(MachineLimits.nicQueuePairs.upperBound)")
                }
                queues = count
                continue
            }
            guard option.hasPrefix("mac=") else {
                throw .invalidValue(field: field, reason: "unknown option '\(option)' in '\(text)'; allowed: mac=XX:XX:XX:XX:XX:XX, queues=N")
            }
            mac = String(option.dropFirst(4)).lowercased()
        }
        return (NetworkAttachment(attachment, mac: mac ?? NetworkAttachment.randomMAC(), queues: queues), mac != nil)
    }
}
