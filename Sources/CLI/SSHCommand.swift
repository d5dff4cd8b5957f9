import ArgumentParser
import Engines
import FoundationEssentials
import Library
#if canImport(Glibc)
import Glibc
#endif

struct SSH: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ssh",
        abstract: "Log in to a running VM with the system's ssh, as its cloud-init user with the library's key.",
        discussion: """
            The address is the VM's DHCP lease (or reservation) on a Vireo network, or a port \
            forwarded to its port 22 on this host (user-mode cards). While the guest boots, this \
            waits (up to --timeout) for its SSH server to answer. The remote command's exit \
            status is passed through (255 is ssh's own failure). As with ssh, the words after \
            -- are joined with spaces and run by the remote shell.
            """)

    @Argument(help: "VM name.")
    var name: String

    @Option(help: "Log in as this user (default: the one cloud-init made).")
    var user: String?

    @Option(help: "Seconds to wait for the guest's SSH server.")
    var timeout: Int = 300

    @Argument(parsing: .postTerminator, help: ArgumentHelp("A command to run instead of a login shell.", valueName: "command"))
    var command: [String] = []

    func run() throws {
        let library = openLibrary()
        let target: (user: String, host: String, port: UInt16, hostKeyAlias: String, knownHosts: String)
        do throws(LibraryError) {
            guard timeout >= 0 else { throw .invalidValue(field: "--timeout", reason: "\(timeout) must be 0 or more seconds") }
            let bundle = try library.bundle(named: name)
            let definition = try bundle.load()
            let state = library.status(of: bundle).state
            guard state == .running || state == .starting else {
                throw .wrongState(name: name, state: state.rawValue, action: "log in to", hint: "start it with `vireo start \(name)`")
            }
            guard let login = user ?? definition.cloudInit?.user else {
                throw .invalidValue(field: "--user", reason: "VM '\(name)' was not made from a cloud-init image, so Vireo does not know its user; give --user")
            }
            if let user { try CloudInitSettings.validate(user: user) }
            let (host, port) = try Self.address(of: definition, library: library)
            target = (login, host, port, "vireo-\(definition.uuid)", bundle.directory + "/known_hosts")
        } catch { throw fail(error) }

        // The guest may still be booting: wait for an SSH banner.
        let deadline = Date().addingTimeInterval(TimeInterval(timeout))
        var announced = false
        while !Self.answersSSH(host: target.host, port: target.port) {
            guard Date() < deadline else {
                throw fail(LibraryError.engine(name: name, reason: "no SSH server answered at \(target.host):\(target.port) within \(timeout) s; is the guest still booting (`vireo console \(name)`), or is sshd not running in it?", exitStatus: 1))
            }
            if !announced {
                printNote("waiting for VM '\(name)' to answer SSH at \(target.host):\(target.port) (up to \(timeout) s)")
                announced = true
            }
            if let bundle = try? library.bundle(named: name), !library.status(of: bundle).state.isRunningOrStarting {
                throw fail(LibraryError.wrongState(name: name, state: library.status(of: bundle).state.rawValue, action: "log in to",
                                                   hint: "it stopped while waiting; see `vireo logs \(name)`"))
            }
            usleep(1_000_000)
        }

        guard let ssh = HostTools.find("ssh") else {
            throw fail(LibraryError.invalidValue(field: "vireo ssh", reason: "ssh is not installed; install Debian's `openssh-client` package"))
        }
        let key = LibrarySSHKey(libraryRoot: library.root)
        var arguments = [ssh, "-o", "UserKnownHostsFile=\(target.knownHosts)", "-o", "StrictHostKeyChecking=accept-new",
                         "-o", "HostKeyAlias=\(target.hostKeyAlias)", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=15",
                         "-p", String(target.port)]
        if HostFiles.exists(key.privateKey) { arguments += ["-i", key.privateKey] }
        arguments.append("\(target.user)@\(target.host)")
        if !command.isEmpty { arguments += ["--"] + command }
        // ssh replaces this process: its terminal handling and exit status are the user's.
        withCStrings(arguments) { argv in _ = execv(ssh, argv) }
        throw fail(LibraryError.io(operation: "exec", path: ssh, errno: errno))
    }

    /// The first card that can be reached from here: its address on a Vireo network (lease,
    /// else reservation), else a host port forwarded to its port 22.
    static func address(of definition: VMDefinition, library: VMLibrary) throws(LibraryError) -> (String, UInt16) {
        let store = NetworkStore(libraryRoot: library.root)
        let leased = HostNetworks(library: library).addresses(of: definition)
        for (index, card) in definition.networks.enumerated() {
            if let address = leased[index] { return (address.description, 22) }
            if let network = card.attachment.networkName, let reserved = store.reservations(of: network)[card.mac.lowercased()] {
                return (reserved.address.description, 22)
            }
        }
        for card in definition.networks {
            if let forward = card.forwards.first(where: { $0.proto == .tcp && $0.guestPort == 22 }) {
                return ("127.0.0.1", forward.hostPort)
            }
        }
        let cards = definition.networks.map(\.attachment.description)
        throw .invalidValue(field: "vireo ssh", reason: "cannot tell where VM '\(definition.name)''s SSH server is: \(cards.isEmpty ? "it has no network card" : "its cards (\(cards.joined(separator: ", "))) have no address Vireo knows and no forward to port 22"); add one with `vireo forward add \(definition.name) tcp:2222:22`")
    }

    /// Whether something at host:port sends an SSH banner within a few seconds.
    static func answersSSH(host: String, port: UInt16) -> Bool {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else { return false }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if connected != 0 && errno != EINPROGRESS { return false }
        var poller = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        guard poll(&poller, 1, 3000) == 1 else { return false }
        var failure: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &failure, &length) == 0, failure == 0 else { return false }
        // Our identification first (RFC 4253 §4.2 has both sides send one, in either order): a
        // user-mode card's forward (passt) reaches the guest's sshd only once the client has
        // sent something, so a probe that only listened never heard a banner there, and
        // `vireo ssh` waited out its whole time-out while `ssh` itself got in.
        let identification = Array("SSH-2.0-vireo-probe\r\n".utf8)
        guard identification.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == identification.count else { return false }
        poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, 5000) == 1 else { return false }
        var banner = [UInt8](repeating: 0, count: 4)
        let count = banner.withUnsafeMutableBytes { read(fd, $0.baseAddress, 4) }
        return count == 4 && banner == Array("SSH-".utf8)
    }
}

extension VMState {
    var isRunningOrStarting: Bool { self == .running || self == .starting || self == .paused }
}
