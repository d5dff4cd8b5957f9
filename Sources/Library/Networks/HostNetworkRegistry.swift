import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// The host-wide names and subnets of every library's networks, per network namespace (bridges,
/// addresses and firewall tables live in one), so that several libraries on one host — root's,
/// a test's, a migration's destination — never take or tear down each other's. One claim file per
/// bridge under `/run/vireo/networks/<namespace>/`, changed under one lock; a claim whose library
/// no longer defines that network is stale and swept. /run is emptied at boot: claims are made
/// again when networks are created or brought up (docs/networking.md).
public struct HostNetworkRegistry: Sendable {
    public static let base = "/run/vireo/networks"
    /// This network namespace's claims.
    public let directory: String

    /// One library network's bridge and subnet.
    public struct Claim: Codable, Sendable, Equatable {
        public var bridge: String
        public var subnet: IPv4Subnet
        public var library: String
        public var network: String
        public var mode: NetworkMode
    }

    /// The registry of this process's network namespace; nil when it cannot be kept (a user who
    /// cannot write /run/vireo cannot make bridges either).
    public init?() {
        guard geteuid() == 0 else { return nil }
        directory = Self.base + "/" + Self.namespaceIdentity()
        do { try HostFiles.makeDirectories(directory) } catch { return nil }
    }

    /// The network namespace's cookie (never reused while the host runs), else its inode.
    static func namespaceIdentity() -> String {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd >= 0 {
            defer { close(fd) }
            var cookie: UInt64 = 0
            var length = socklen_t(MemoryLayout<UInt64>.size)
            // SO_NETNS_COOKIE (Linux 5.14).
            if getsockopt(fd, SOL_SOCKET, 71, &cookie, &length) == 0, cookie != 0 { return "cookie-\(cookie)" }
        }
        var info = stat()
        return stat("/proc/self/ns/net", &info) == 0 ? "inode-\(info.st_ino)" : "unknown"
    }

    public func locked<T>(_ body: () throws(LibraryError) -> T) throws(LibraryError) -> T {
        let lock = try VMLock(path: directory + "/.lock", create: true)
        guard lock.tryExclusive(attempts: 3000) else {
            throw .corrupt(path: lock.path, reason: "another vireo command has held the host's network registry for 30 s")
        }
        defer { lock.unlock() }
        return try body()
    }

    func claimPath(_ bridge: String) -> String { directory + "/" + bridge }

    /// Every live claim; stale ones (their library no longer defines the network with that bridge)
    /// are removed. Call locked.
    public func claims() -> [Claim] {
        var live: [Claim] = []
        for entry in (try? HostFiles.entries(of: directory)) ?? [] where !entry.hasPrefix(".") {
            let path = claimPath(entry)
            guard let bytes = try? HostFiles.readAll(path),
                  let claim = try? JSONDecoder().decode(Claim.self, from: Data(bytes)), claim.bridge == entry else {
                unlink(path)
                continue
            }
            let store = NetworkStore(libraryRoot: claim.library)
            guard let defined = try? store.load(claim.network), defined.bridge == claim.bridge, defined.subnet == claim.subnet else {
                unlink(path)
                continue
            }
            live.append(claim)
        }
        return live
    }

    /// Claims of other libraries.
    public func others(than library: String) -> [Claim] { claims().filter { $0.library != library } }

    /// Records `network` of `library` as holding its bridge and subnet, or says which other
    /// library's network holds either. Call locked.
    public func claim(_ network: NetworkDefinition, library: String) throws(LibraryError) {
        for other in others(than: library) {
            if other.bridge == network.bridge {
                throw .network(name: network.name, reason: "its bridge \(network.bridge) belongs to network '\(other.network)' of the library \(other.library); delete and create this network again to get a bridge of its own", exitStatus: 2)
            }
            if network.mode != .internal, other.mode != .internal, other.subnet.overlaps(network.subnet) {
                throw .network(name: network.name, reason: "its subnet \(network.subnet) overlaps \(other.subnet) of network '\(other.network)' in the library \(other.library); delete and create this network again (or give it another --subnet)", exitStatus: 2)
            }
        }
        let claim = Claim(bridge: network.bridge, subnet: network.subnet, library: library, network: network.name, mode: network.mode)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        guard let bytes = try? encoder.encode(claim) else { return }
        try HostFiles.writeAtomically(Array(bytes), to: claimPath(network.bridge))
    }

    /// Gives up `library`'s claim on `bridge` (its network is deleted). Call locked.
    public func release(bridge: String, library: String) {
        let path = claimPath(bridge)
        guard let bytes = try? HostFiles.readAll(path),
              let claim = try? JSONDecoder().decode(Claim.self, from: Data(bytes)), claim.library == library else { return }
        unlink(path)
    }

    /// Where this namespace's IP forwarding setting from before any Vireo network is kept: the
    /// one setting all libraries share.
    public var forwardingRecord: String { directory + "/.ip_forward-before" }
}
