import ArgumentParser
import Engines
import Library

struct NetworkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "network",
        abstract: "Virtual networks: NAT (the default), host-only and internal, each a host bridge with its own DHCP and DNS.",
        discussion: """
            A `default` NAT network is made the first time a VM with a `nat` card starts. Networks \
            come up when a VM on them starts and go down when the last one stops, unless created \
            with --autostart. See docs/networking.md.
            """,
        subcommands: [NetworkCreate.self, NetworkList.self, NetworkInfo.self, NetworkStart.self, NetworkStop.self, NetworkAutostart.self, NetworkDelete.self])
}

struct NetworkCreate: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "create", abstract: "Define a network.")

    @Argument(help: ArgumentHelp("Network name (\(NetworkName.rule)).", valueName: "name"))
    var name: String

    @Option(help: ArgumentHelp("nat: VMs reach out through the host (masqueraded); host-only: VMs and the host; internal: VMs only.", valueName: "nat|host-only|internal"))
    var mode: String = "nat"

    @Option(help: ArgumentHelp("IPv4 subnet, /8 to /29; the host takes its first address. Default: the first free 192.168.122-254.0/24.", valueName: "subnet"))
    var subnet: String?

    @Option(help: ArgumentHelp("Addresses DHCP hands out, FIRST-LAST inside the subnet. Default: the upper half.", valueName: "range"))
    var dhcp: String?

    @Flag(help: "No DHCP server (guests configure themselves).")
    var noDhcp = false

    @Flag(help: "Keep the network up when no VM uses it.")
    var autostart = false

    @Flag(help: "Print the new network as JSON.")
    var json = false

    func run() throws {
        let library = openLibrary()
        var request = NetworkCreateRequest(name: name)
        request.subnet = subnet
        request.dhcp = dhcp
        request.withoutDHCP = noDhcp
        request.autostart = autostart
        let network: NetworkDefinition
        do throws(LibraryError) {
            request.mode = try NetworkMode.parse(mode, field: "--mode")
            network = try NetworkStore(libraryRoot: library.root).create(request, hostRoutes: HostNetworks.hostRoutes())
            if autostart { try HostNetworks(library: library).start(name) }
        } catch { throw fail(error) }
        if json { try printJSON(network); return }
        printLine("Created \(network.mode.rawValue) network '\(name)': \(network.subnet), bridge \(network.bridge)"
                  + (network.hostAddress.map { ", host \($0)" } ?? ", the host has no address on it")
                  + (network.dhcp.map { ", DHCP \($0)" } ?? ", no DHCP"))
        printLine("Attach VMs with --nic network:\(name)")
    }
}

struct NetworkList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the networks.")

    @Flag(help: "Print JSON.")
    var json = false

    struct Row: Encodable {
        var name: String, mode: String, subnet: String, dhcp: String?, bridge: String, up: Bool, autostart: Bool, vms: [String]
    }

    func run() throws {
        let library = openLibrary()
        let networks = HostNetworks(library: library)
        let all: [NetworkDefinition]
        do throws(LibraryError) { all = try networks.store.all() } catch { throw fail(error) }
        let users = vmsByNetwork(library)
        let rows = all.map { network in
            Row(name: network.name, mode: network.mode.rawValue, subnet: network.subnet.description, dhcp: network.dhcp?.description,
                bridge: network.bridge, up: networks.isUp(network), autostart: network.autostart, vms: users[network.name] ?? [])
        }
        if json { try printJSON(rows); return }
        if rows.isEmpty { printLine("No networks yet; the default NAT network is made when the first VM with a nat card starts."); return }
        printTable([["NAME", "MODE", "SUBNET", "DHCP", "BRIDGE", "STATE", "VMS"]] + rows.map {
            [$0.name, $0.mode, $0.subnet, $0.dhcp ?? "off", $0.bridge, ($0.up ? "up" : "down") + ($0.autostart ? " (autostart)" : ""),
             $0.vms.isEmpty ? "-" : $0.vms.joined(separator: ",")]
        })
    }
}

/// VM names by the networks their cards are on.
func vmsByNetwork(_ library: VMLibrary) -> [String: [String]] {
    var result: [String: [String]] = [:]
    for name in (try? library.names()) ?? [] {
        guard let definition = try? VMBundle(directory: library.root + "/" + name).load() else { continue }
        for network in Swift.Set(definition.networks.compactMap(\.attachment.networkName)) { result[network, default: []].append(name) }
    }
    return result
}

struct NetworkInfo: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show a network: bridge, subnet, DHCP leases (MAC, address, VM).")

    @Argument(help: "Network name.")
    var name: String

    @Flag(help: "Print JSON.")
    var json = false

    struct Lease: Encodable { var mac: String, address: String, vm: String?, hostname: String?, expires: Int64 }
    struct Report: Encodable {
        var network: NetworkDefinition, up: Bool, hostAddress: String?, vms: [String], leases: [Lease], reservations: [Lease]
    }

    func run() throws {
        let library = openLibrary()
        let networks = HostNetworks(library: library)
        let network: NetworkDefinition
        do throws(LibraryError) { network = try networks.store.load(name) } catch { throw fail(error) }
        let reserved = networks.store.reservations(of: name)
        let report = Report(
            network: network, up: networks.isUp(network), hostAddress: network.hostAddress?.description,
            vms: vmsByNetwork(library)[name] ?? [],
            leases: networks.store.leases(of: name).map {
                Lease(mac: $0.mac, address: $0.address.description, vm: reserved[$0.mac]?.vm, hostname: $0.hostname, expires: $0.expires)
            },
            reservations: reserved.sorted { $0.value.address < $1.value.address }.map {
                Lease(mac: $0.key, address: $0.value.address.description, vm: $0.value.vm, hostname: nil, expires: 0)
            })
        if json { try printJSON(report); return }
        var lines: [[String]] = [
            ["Name:", network.name], ["Mode:", network.mode.rawValue], ["Subnet:", network.subnet.description],
            ["Host address:", network.hostAddress.map { "\($0) (gateway and DNS)" } ?? "none (internal)"],
            ["DHCP:", network.dhcp?.description ?? "off"], ["Bridge:", network.bridge],
            ["State:", (report.up ? "up" : "down") + (network.autostart ? ", autostart" : ", goes down with its last VM")],
            ["VMs:", report.vms.isEmpty ? "none" : report.vms.joined(separator: ", ")],
        ]
        for lease in report.leases {
            lines.append(["Lease:", "\(lease.mac) -> \(lease.address) -> \(lease.vm.map { "VM '\($0)'" } ?? "unknown")\(lease.hostname.map { " (\($0))" } ?? "")"])
        }
        for reservation in report.reservations where !report.leases.contains(where: { $0.mac == reservation.mac }) {
            lines.append(["Reserved:", "\(reservation.mac) -> \(reservation.address) -> VM '\(reservation.vm ?? "?")' (not leased yet)"])
        }
        printTable(lines)
    }
}

struct NetworkStart: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "start", abstract: "Bring a network up now (bridge, DHCP, firewall).")
    @Argument(help: "Network name.") var name: String

    func run() throws {
        do throws(LibraryError) { try HostNetworks(library: openLibrary()).start(name) } catch { throw fail(error) }
        printLine("Network '\(name)' is up")
    }
}

struct NetworkStop: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stop", abstract: "Take a network down (refused while a running VM uses it).")
    @Argument(help: "Network name.") var name: String

    func run() throws {
        do throws(LibraryError) { try HostNetworks(library: openLibrary()).stop(name) } catch { throw fail(error) }
        printLine("Network '\(name)' is down")
    }
}

struct NetworkAutostart: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "autostart", abstract: "Keep a network up when no VM uses it (on), or let it go down with its last VM (off).")
    @Argument(help: "Network name.") var name: String
    @Argument(help: ArgumentHelp("on or off.", valueName: "on|off")) var value: String

    func run() throws {
        let library = openLibrary()
        do throws(LibraryError) {
            guard value == "on" || value == "off" else { throw .invalidValue(field: "on|off", reason: "'\(value)' is not one of on, off") }
            try NetworkStore(libraryRoot: library.root).setAutostart(name, value == "on")
            let networks = HostNetworks(library: library)
            if value == "on" { try networks.start(name) } else { for warning in networks.releaseIdle() { printNote("warning: \(warning)") } }
        } catch { throw fail(error) }
        printLine("Network '\(name)': autostart \(value)")
    }
}

struct NetworkDelete: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete", abstract: "Delete a network (refused while any VM has a card on it).")
    @Argument(help: "Network name.") var name: String

    func run() throws {
        do throws(LibraryError) { try HostNetworks(library: openLibrary()).delete(name) } catch { throw fail(error) }
        printLine("Deleted network '\(name)'")
    }
}

struct NICCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nic", abstract: "Add or remove a stopped VM's network cards.",
        subcommands: [NICAdd.self, NICRemove.self])
}

struct NICAdd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "add", abstract: "Add a network card to a stopped VM.")
    @Argument(help: "VM name.") var name: String
    @Argument(help: ArgumentHelp("\(NICAttachment.syntax), then [,mac=XX:XX:XX:XX:XX:XX][,queues=N].", valueName: "nic")) var nic: String
    @Option(help: ArgumentHelp("Forward a host port to this card: tcp|udp:HOSTPORT:GUESTPORT. Repeatable.", valueName: "forward"))
    var forward: [String] = []

    func run() throws {
        let definition: VMDefinition
        do throws(LibraryError) {
            var card = try parseNIC(nic).card
            card.forwards = try forward.map { (text) throws(LibraryError) in try PortForward.parse(text, field: "--forward") }
            definition = try openManager().addCard(name, card)
        } catch { throw fail(error) }
        if let card = definition.networks.last {
            printLine("VM '\(name)': card \(definition.networks.count - 1), \(card.mac) on \(describeAttachment(card))")
        }
    }
}

struct NICRemove: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "remove", abstract: "Remove a stopped VM's network card.")
    @Argument(help: "VM name.") var name: String
    @Argument(help: ArgumentHelp("The card's index (as `vireo info` numbers them) or MAC.", valueName: "card")) var card: String

    func run() throws {
        let removed: NetworkAttachment
        do throws(LibraryError) { removed = try openManager().removeCard(name, card) } catch { throw fail(error) }
        printLine("VM '\(name)': removed card \(removed.mac) on \(describeAttachment(removed))")
    }
}

struct ForwardCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forward", abstract: "Forward host ports to a VM (nat, network and user cards); works while the VM runs for nat and network cards.",
        subcommands: [ForwardAdd.self, ForwardRemove.self, ForwardList.self])
}

struct ForwardAdd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "add", abstract: "Forward a host port: tcp|udp:HOSTPORT:GUESTPORT.")
    @Argument(help: "VM name.") var name: String
    @Argument(help: ArgumentHelp("tcp|udp:HOSTPORT:GUESTPORT, e.g. tcp:8022:22.", valueName: "forward")) var forward: String
    @Option(help: "The card (index) to forward to; default the first nat, network or user card.") var nic: Int?

    func run() throws {
        do throws(LibraryError) {
            let parsed = try PortForward.parse(forward, field: "FORWARD")
            _ = try openManager().changeForward(name, .add(parsed, card: nic))
            printLine("VM '\(name)': host \(parsed.proto.rawValue) port \(parsed.hostPort) forwarded to guest port \(parsed.guestPort)")
        } catch { throw fail(error) }
    }
}

struct ForwardRemove: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "remove", abstract: "Stop forwarding a host port.")
    @Argument(help: "VM name.") var name: String
    @Argument(help: ArgumentHelp("tcp|udp:HOSTPORT:GUESTPORT as added.", valueName: "forward")) var forward: String

    func run() throws {
        do throws(LibraryError) {
            let parsed = try PortForward.parse(forward, field: "FORWARD")
            _ = try openManager().changeForward(name, .remove(parsed))
            printLine("VM '\(name)': no longer forwarding \(parsed)")
        } catch { throw fail(error) }
    }
}

struct ForwardList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List a VM's port forwards.")
    @Argument(help: "VM name.") var name: String

    func run() throws {
        let definition: VMDefinition
        do throws(LibraryError) { definition = try openLibrary().bundle(named: name).load() } catch { throw fail(error) }
        let rows = definition.networks.enumerated().flatMap { index, card in
            card.forwards.map { [$0.proto.rawValue, String($0.hostPort), String($0.guestPort), "\(index) (\(card.attachment))"] }
        }
        if rows.isEmpty { printLine("VM '\(name)' forwards no ports"); return }
        printTable([["PROTO", "HOST PORT", "GUEST PORT", "CARD"]] + rows)
    }
}
