import CHostSupport
import FoundationEssentials
import Library
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// HTTPS for `vireo serve --tls-cert/--tls-key`, terminated by Debian's stunnel (OpenSSL) in front
/// of a private Unix socket. SwiftNIO's TLS (swift-nio-ssl) compiles BoringSSL: 7 minutes of
/// every clean build on this machine, more than the whole API costs; stunnel is the tool Linux
/// ships for exactly this, and OpenSSL is the host's, patched with it. The backend socket sits
/// in a 0700 directory and asks for the token as TCP does, so the tunnel grants nothing by itself.
final class TLSTerminator: Sendable {
    private let process = Mutex<pid_t>(0)
    let host: String
    let port: Int
    let certificate: String
    let key: String
    let directory: String
    var backendSocket: String { directory + "/https.sock" }
    var logPath: String { directory + "/stunnel.log" }
    var configPath: String { directory + "/stunnel.conf" }

    static let stunnel = "/usr/bin/stunnel4"

    private init(host: String, port: Int, certificate: String, key: String, directory: String) {
        self.host = host; self.port = port; self.certificate = certificate; self.key = key; self.directory = directory
    }

    /// Checks the files and the tool before anything listens; nil without TLS options.
    static func prepare(configuration: APIServer.Configuration, libraryRoot: String) throws(LibraryError) -> TLSTerminator? {
        switch (configuration.tlsCertificate, configuration.tlsKey) {
        case (nil, nil): return nil
        case (nil, _): throw .invalidValue(field: "--tls-cert", reason: "required with --tls-key")
        case (_, nil): throw .invalidValue(field: "--tls-key", reason: "required with --tls-cert")
        case let (certificate?, key?):
            try check(certificate, field: "--tls-cert", marker: "CERTIFICATE")
            try check(key, field: "--tls-key", marker: "PRIVATE KEY")
            guard access(stunnel, X_OK) == 0 else {
                throw .invalidValue(field: "--tls-cert", reason: "\(stunnel) is missing: install Debian's stunnel4 (scripts/setup.sh does)")
            }
            let host = configuration.host ?? "127.0.0.1"
            let port = configuration.port == 0 ? try freePort(host) : configuration.port
            // Leftovers of servers that were killed: their pid is gone.
            for entry in (try? HostFiles.entries(of: libraryRoot)) ?? [] where entry.hasPrefix(".serve-") {
                if let pid = Int32(entry.dropFirst(7)), kill(pid, 0) != 0, errno == ESRCH { try? HostFiles.removeTree(libraryRoot + "/" + entry) }
            }
            let directory = libraryRoot + "/.serve-\(getpid())"
            try? HostFiles.removeTree(directory)
            guard mkdir(directory, 0o700) == 0 else { throw .io(operation: "mkdir", path: directory, errno: errno) }
            return TLSTerminator(host: host, port: port, certificate: certificate, key: key, directory: directory)
        }
    }

    static func check(_ path: String, field: String, marker: String) throws(LibraryError) {
        guard HostFiles.exists(path) else { throw .invalidValue(field: field, reason: "\(path) does not exist") }
        let text = String(decoding: try HostFiles.readAll(path), as: UTF8.self)
        guard text.contains("-----BEGIN") && text.contains(marker) else {
            throw .invalidValue(field: field, reason: "\(path) is not a PEM file with a \(marker.lowercased())")
        }
    }

    /// A port the kernel picks, for `--listen HOST:0`: bound, read back, released for stunnel.
    static func freePort(_ host: String) throws(LibraryError) -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw .io(operation: "socket", path: host, errno: errno) }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr(host)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw .invalidValue(field: "--listen", reason: "cannot bind \(host) (\(String(cString: strerror(errno))))") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// Ends stunnel and removes the private directory (the socket, its configuration and log).
    func remove() {
        let pid = process.withLock { $0 }
        if pid > 0 { kill(pid, SIGKILL); var status: Int32 = 0; waitpid(pid, &status, 0) }
        try? HostFiles.removeTree(directory)
    }

    /// Starts stunnel once the backend socket listens; returns when it accepts on the port, or
    /// throws with stunnel's own words.
    func start() throws(LibraryError) {
        let config = """
            foreground = yes
            pid =
            debug = warning
            [vireo]
            accept = \(host.contains(":") ? "[\(host)]" : host):\(port)
            connect = \(backendSocket)
            cert = \(certificate)
            key = \(key)
            sslVersionMin = TLSv1.2

            """
        let fd = open(configPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .io(operation: "create", path: configPath, errno: errno) }
        let bytes = Array(config.utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        guard written == bytes.count else { throw .io(operation: "write", path: configPath, errno: errno) }
        let log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard log >= 0 else { throw .io(operation: "create", path: logPath, errno: errno) }
        defer { close(log) }
        var pid: pid_t = 0
        let arguments = [Self.stunnel, configPath]
        let result = withCStrings(arguments) { argv in
            vireo_spawn_tied(Self.stunnel, argv, log, &pid)
        }
        guard result == 0 else { throw .io(operation: "spawn", path: Self.stunnel, errno: result) }
        process.withLock { $0 = pid }
        // Ready when the port accepts; stunnel exiting first means it refused the files or the port.
        for _ in 0..<100 {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                let words = String(decoding: (try? HostFiles.readAll(logPath)) ?? [], as: UTF8.self)
                throw .invalidValue(field: "--tls-cert", reason: "stunnel stopped: \(String(words.suffix(600)).trimmingWhitespace())")
            }
            if accepts() { return }
            usleep(50_000)
        }
        kill(pid, SIGKILL)
        throw .invalidValue(field: "--listen", reason: "stunnel did not listen on \(host):\(port) within 5 s")
    }

    private func accepts() -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = inet_addr(host == "0.0.0.0" ? "127.0.0.1" : host)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
    }
}
