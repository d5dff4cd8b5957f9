import Foundation
import Testing

/// A qemu-nbd serving one raw image on a Unix socket or a loopback TCP port (QEMU's own NBD
/// server, the peer for Vireo's client), killed when the test ends.
final class NBDServer: @unchecked Sendable {
    let socket: String
    let port: UInt16?
    let process: RunningProcess

    /// `shared`: the image is opened without QEMU's lock, so a second server can serve it too
    /// (two paths to one export).
    /// `tls`: a directory with ca-cert.pem, server-cert.pem and server-key.pem; the server then
    /// talks only TLS and wants a client certificate from that CA.
    init(image: String, socket: String, export: String = "exp", shared: Bool = false, tls: String? = nil) throws {
        self.socket = socket
        port = nil
        host = ""
        unlink(socket)
        process = RunningProcess(["qemu-nbd", "-k", socket] + Self.arguments(image: image, export: export, shared: shared, tls: tls))
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) {
            guard Date() < deadline, !process.hasExited else { throw HarnessError("qemu-nbd did not start: \(process.stderr)") }
            usleep(20_000)
        }
    }

    let host: String

    /// On `host`:`port`: 127.0.0.1 (loopback only), or an address in a network namespace the
    /// test made (`namespace`).
    init(image: String, port: UInt16, host: String = "127.0.0.1", namespace: String? = nil, export: String = "exp", shared: Bool = false,
         tls: String? = nil) throws {
        socket = ""
        self.port = port
        self.host = host
        let command = ["qemu-nbd", "-b", host, "-p", String(port)] + Self.arguments(image: image, export: export, shared: shared, tls: tls)
        process = RunningProcess(namespace.map { ["ip", "netns", "exec", $0] } .map { $0 + command } ?? command)
        let deadline = Date().addingTimeInterval(10)
        func listening() -> Bool {
            guard let namespace else { return Self.answers(port) }
            return Harness.run(["ip", "netns", "exec", namespace, "ss", "-Hltn", "sport = :\(port)"]).stdout.contains(":\(port)")
        }
        while !listening() {
            guard Date() < deadline, !process.hasExited else { throw HarnessError("qemu-nbd did not start on port \(port): \(process.stderr)") }
            usleep(20_000)
        }
    }

    private static func arguments(image: String, export: String, shared: Bool, tls: String?) -> [String] {
        let source = shared ? ["--image-opts", "driver=raw,file.driver=file,file.filename=\(image),file.locking=off"] : ["-f", "raw", image]
        let encrypted = tls.map { ["--object", "tls-creds-x509,id=tls0,endpoint=server,dir=\($0),verify-peer=yes", "--tls-creds", "tls0"] } ?? []
        // -e 4: a few clients at once (qemu-nbd's default is one; a second then waits unanswered).
        return ["-x", export, "--persistent", "-e", "4"] + encrypted + source
    }

    /// Whether something listens on 127.0.0.1:`port`.
    static func answers(_ port: UInt16) -> Bool {
        let fd = Foundation.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Foundation.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }

    /// A loopback port nothing listens on now.
    static func freePort() -> UInt16 {
        let fd = Foundation.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Foundation.bind(fd, $0, length) == 0 ? getsockname(fd, $0, &length) : -1 }
        }
        return UInt16(bigEndian: address.sin_port)
    }

    func kill() {
        process.signal(SIGKILL)
        _ = process.wait(timeout: 10)
    }

    deinit { kill() }

    func uri(_ export: String = "exp") -> String {
        if let port { return "nbd://\(host):\(port)/\(export)" }
        return "nbd+unix:///\(export)?socket=\(socket)"
    }
}

@Suite(.serialized) struct NetworkDiskTests {
    /// probe=blkloop's block `index`.
    static func block(_ index: Int) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 13 + index) } }

    /// Every block 0..<count of `image` holds what probe=blkloop wrote there.
    static func missingBlocks(_ image: String, count: Int) throws -> [Int] {
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: image)))
        return (0..<count).filter { Array(bytes[$0 * 4096..<($0 + 1) * 4096]) != block($0) }
    }

    /// A started library VM `name` writing with probe=blkloop to a disk on two paths: `vireo info`
    /// shows the first active and the second standby; once `kill` ends the first, the writes go
    /// on through the second, with no error for the guest, and `vireo info` says so.
    static func checkFailover(_ library: TestLibrary, _ name: String, kind: String, active: String, standby: String, kill: () -> Void) {
        #expect(library.waitFor(30) { library.consoleLog(name).contains("blkloop: flushed 80") }, "\(library.consoleLog(name).suffix(500)) \(library.vmmLog(name))")
        let before = library.vireo("info", name).stdout
        #expect(before.contains("\(active)|\(standby) (raw, \(kind), 2 paths)"), "\(before)")
        #expect(before.contains("\(active): active, 0 failover(s)") && before.contains("\(standby): standby"), "\(before)")
        kill()
        #expect(library.waitFor(30) { library.vmmLog(name).contains("now on \(standby)") }, "\(library.vmmLog(name))")
        let flushed = library.consoleLog(name).components(separatedBy: "blkloop: flushed").count
        #expect(library.waitFor(30) { library.consoleLog(name).components(separatedBy: "blkloop: flushed").count > flushed + 10 },
                "the guest's writes stopped after the failover: \(library.consoleLog(name).suffix(300))")
        #expect(!library.consoleLog(name).contains("failed"), "\(library.consoleLog(name).suffix(300))")
        let after = library.vireo("info", name).stdout
        #expect(after.contains("\(active): down") && after.contains("\(standby): active, 1 failover(s)"), "\(after)")
    }

    @Test("NBD disks (the VMM's own client, qemu-nbd and nbdkit the servers): a probe's writes land on the export, and a discard reaches nbdkit; the server killed and started again mid-write loses no write and the guest sees no error; with two paths, killing the active one moves I/O to the other; a jailed library VM on two paths writes to an export attached with `vireo disk attach` (checked at attach time) and `vireo info` shows each path's state before and after the active one dies; clones refuse it and deletion leaves it; a missing export, an unreachable socket and a malformed address are refused naming why")
    func nbdDisks() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let image = directory.appendingPathComponent("export.raw").path
        #expect(Harness.run(["truncate", "-s", "32M", image]).status == 0)
        let probe = try Harness.probe("pvh")

        // Data through NBD, in odd pieces, read back and on the export.
        var server: NBDServer? = try NBDServer(image: image, socket: directory.appendingPathComponent("a.sock").path)
        let uri = try #require(server).uri()
        let written = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=77 split=1", "--disk", uri])
        #expect(written.status == 0, "\(written.stderr)")
        #expect(written.stdout.contains("blk: dev=0 capacity=65536 ro=0 id_status=0 serial= write_status=0 flush_status=0 read_status=0 match=1 beyond_end_status=1"),
                "\(written.stdout) \(written.stderr)")
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: image)))
        #expect(Array(bytes[512_000..<516_096]) == BlockDeviceTests.written(seed: 77), "the guest's write is not on the export")

        // nbdkit, the other server: the same write byte-exact, and a discard that reaches it.
        let kitImage = directory.appendingPathComponent("kit.raw").path
        #expect(Harness.run(["truncate", "-s", "16M", kitImage]).status == 0)
        let kitSocket = directory.appendingPathComponent("kit.sock").path
        let kit = RunningProcess(["nbdkit", "--foreground", "-U", kitSocket, "-e", "exp", "file", kitImage])
        let kitDeadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: kitSocket), Date() < kitDeadline, !kit.hasExited { usleep(20_000) }
        #expect(FileManager.default.fileExists(atPath: kitSocket), "nbdkit did not start: \(kit.stderr)")
        let kitURI = "nbd+unix:///exp?socket=\(kitSocket)"
        let kitWritten = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=79 split=1", "--disk", kitURI])
        #expect(kitWritten.stdout.contains("blk: dev=0 capacity=32768 ro=0 id_status=0 serial= write_status=0 flush_status=0 read_status=0 match=1"),
                "\(kitWritten.stdout) \(kitWritten.stderr)")
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: kitImage))[512_000..<516_096]) == BlockDeviceTests.written(seed: 79), "the write is not on nbdkit's file")
        let kitDiscarded = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=80 discard=1", "--disk", kitURI])
        #expect(kitDiscarded.stdout.contains("discard_status=0 zero_after_discard=1"), "\(kitDiscarded.stdout) \(kitDiscarded.stderr)")
        kit.signal(SIGKILL)
        _ = kit.wait(timeout: 10)

        // The server dies mid-stream and comes back: the guest's writes wait and all arrive.
        let count = 400
        let writer = RunningProcess([Harness.vireo, "run", "--kernel", probe, "--memory", "64M", "--cmdline", "probe=blkloop count=\(count)", "--disk", uri])
        #expect(writer.waitForOutput("blkloop: flushed 80", timeout: 60), "\(writer.stdout.suffix(300)) \(writer.stderr)")
        server?.kill()
        usleep(300_000)
        server = try NBDServer(image: image, socket: directory.appendingPathComponent("a.sock").path)
        #expect(writer.waitForOutput("blkloop: flushed \(count)", timeout: 120), "\(writer.stdout.suffix(300)) \(writer.stderr)")
        #expect(writer.wait(timeout: 30) == 0)
        #expect(!writer.stdout.contains("failed"), "the guest saw an error: \(writer.stdout.suffix(300))")
        #expect(writer.stderr.contains("failed during") && writer.stderr.contains("connected again through \(uri)"), "\(writer.stderr)")
        let lostAcrossReconnection = try Self.missingBlocks(image, count: count)
        #expect(lostAcrossReconnection.isEmpty, "blocks lost across the reconnection: \(lostAcrossReconnection.prefix(10))")

        // Two paths to one export: the active one dies for good, the other carries on.
        server?.kill()
        server = nil
        #expect(Harness.run(["truncate", "-s", "0", image]).status == 0 && Harness.run(["truncate", "-s", "32M", image]).status == 0)
        let first = try NBDServer(image: image, socket: directory.appendingPathComponent("p1.sock").path, shared: true)
        let second = try NBDServer(image: image, socket: directory.appendingPathComponent("p2.sock").path, shared: true)
        let failover = RunningProcess([Harness.vireo, "run", "--kernel", probe, "--memory", "64M", "--cmdline", "probe=blkloop count=\(count)",
                                       "--disk", first.uri() + "|" + second.uri()])
        #expect(failover.waitForOutput("blkloop: flushed 80", timeout: 60), "\(failover.stdout.suffix(300)) \(failover.stderr)")
        first.kill()
        #expect(failover.waitForOutput("blkloop: flushed \(count)", timeout: 120), "\(failover.stdout.suffix(300)) \(failover.stderr)")
        #expect(failover.wait(timeout: 30) == 0)
        #expect(!failover.stdout.contains("failed"), "the guest saw an error: \(failover.stdout.suffix(300))")
        #expect(failover.stderr.contains("now on \(second.uri())"), "\(failover.stderr)")
        let lostInFailover = try Self.missingBlocks(image, count: count)
        #expect(lostInFailover.isEmpty, "blocks lost in the failover: \(lostInFailover.prefix(10))")

        // A library VM (jailed) on two paths: the export attached (checked at attach time), its
        // writes on the export, `vireo info` naming each path's state before and after the active
        // one dies, clones refused, the export left alone by the VM's deletion.
        let third = try NBDServer(image: image, socket: directory.appendingPathComponent("p3.sock").path, shared: true)
        let library = try TestLibrary()
        #expect(library.vireo("create", "nbd", "--kernel", probe, "--memory", "64M", "--no-disk",
                              "--cmdline", "console=ttyS0 probe=blkloop count=100000000").status == 0)
        let missing = library.vireo("disk", "attach", "nbd", second.uri("nothing"))
        #expect(missing.status != 0 && missing.stderr.contains("has no export named 'nothing'"), "\(missing.stderr)")
        let unreachable = library.vireo("disk", "attach", "nbd", "nbd+unix:///exp?socket=\(directory.path)/absent.sock")
        #expect(unreachable.status != 0 && unreachable.stderr.contains("connect failed"), "\(unreachable.stderr)")
        let paths = third.uri() + "|" + second.uri()
        let attached = library.vireo("disk", "attach", "nbd", paths)
        #expect(attached.status == 0, "\(attached.stderr)")
        #expect(library.vireo("start", "nbd").status == 0)
        Self.checkFailover(library, "nbd", kind: "NBD export", active: third.uri(), standby: second.uri()) { third.kill() }
        #expect(library.vmmLog("nbd").contains("isolation:"), "\(library.vmmLog("nbd"))")
        #expect(try Self.missingBlocks(image, count: 80).isEmpty, "the library VM's first 80 blocks are not on the export")
        // A second client of the same server (qemu-nbd -e 4) while the VM holds the export.
        let described = Harness.run([Harness.vireo, "disk", "info", second.uri()])
        #expect(described.status == 0 && described.stdout.contains("virtual size:  32 MiB (33554432 bytes)"), "\(described.stdout) \(described.stderr)")
        #expect(library.vireo("stop", "nbd", "--force").status == 0)
        let clone = library.vireo("clone", "nbd", "nbd2")
        #expect(clone.status != 0 && clone.stderr.contains("network disk"), "\(clone.stderr)")
        #expect(library.vireo("delete", "nbd").status == 0)
        #expect(try Self.missingBlocks(image, count: 80).isEmpty, "deleting the VM touched the export")
        // TCP from inside the jail: the path's socket was made before the jail, in the host's
        // network namespace, and is dialled again in place when the server comes back.
        let port = NBDServer.freePort()
        var tcpServer: NBDServer? = try NBDServer(image: image, port: port)
        let tcpURI = try #require(tcpServer).uri()
        #expect(library.vireo("create", "tcp", "--kernel", probe, "--memory", "64M", "--no-disk",
                              "--cmdline", "console=ttyS0 probe=blkloop count=100000000").status == 0)
        #expect(library.vireo("disk", "attach", "tcp", tcpURI).status == 0)
        #expect(library.vireo("start", "tcp").status == 0)
        #expect(library.waitFor(30) { library.consoleLog("tcp").contains("blkloop: flushed 80") }, "\(library.consoleLog("tcp").suffix(500)) \(library.vmmLog("tcp"))")
        tcpServer?.kill()
        #expect(library.waitFor(30) { library.vmmLog("tcp").contains("failed during") }, "\(library.vmmLog("tcp"))")
        tcpServer = try NBDServer(image: image, port: port)
        #expect(library.waitFor(30) { library.vmmLog("tcp").contains("connected again through \(tcpURI)") }, "\(library.vmmLog("tcp"))")
        let flushedBeforeTCP = library.consoleLog("tcp").components(separatedBy: "blkloop: flushed").count
        #expect(library.waitFor(30) { library.consoleLog("tcp").components(separatedBy: "blkloop: flushed").count > flushedBeforeTCP + 10 },
                "the guest's writes stopped after the reconnection: \(library.consoleLog("tcp").suffix(300))")
        #expect(!library.consoleLog("tcp").contains("failed"), "\(library.consoleLog("tcp").suffix(300))")
        #expect(library.vireo("info", "tcp").stdout.contains("\(tcpURI): active, 0 failover(s)"), "\(library.vireo("info", "tcp").stdout)")
        #expect(library.vireo("stop", "tcp", "--force").status == 0 && library.vireo("delete", "tcp").status == 0)
        tcpServer = nil

        // `vireo create --attach-disk` takes the address as it is, checked the same way.
        let created = library.vireo("create", "nbd3", "--kernel", probe, "--memory", "64M", "--attach-disk", second.uri())
        #expect(created.status == 0, "\(created.stderr)")
        #expect(library.vireo("info", "nbd3").stdout.contains("\(second.uri()) (raw, NBD export, 1 path)"), "\(library.vireo("info", "nbd3").stdout)")
        let absent = library.vireo("create", "nbd4", "--kernel", probe, "--memory", "64M", "--attach-disk", second.uri("nothing"))
        #expect(absent.status != 0 && absent.stderr.contains("has no export named 'nothing'") && library.state("nbd4") == nil, "\(absent.stderr)")
        #expect(library.vireo("delete", "nbd3").status == 0)

        // Bad input: each refused before the guest runs, naming the disk and the reason.
        let refusals: [(String, String)] = [
            (second.uri("nothing"), "has no export named 'nothing'"),
            ("nbd+unix:///exp?socket=\(directory.path)/absent.sock", "absent.sock: connect failed: No such file or directory"),
            ("nbd+unix:///exp", "has no ?socket="),
            ("nbd://:10809/exp", "has no usable host"),
            (second.uri() + ",format=qcow2", "is a network disk (an NBD export or iSCSI LUN), which is a raw disk"),
            (second.uri() + ",cache=none", "cache=none is for files and block devices"),
        ]
        for (disk, reason) in refusals {
            let refused = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk", "--disk", disk])
            #expect(refused.status != 0 && refused.stderr.contains(reason), "\(disk): \(refused.stderr)")
            #expect(!refused.stdout.contains("blk: dev=0 capacity"), "\(disk): the guest ran")
        }
    }

    /// A CA, a server certificate for localhost and 127.0.0.1, a client certificate, and a second
    /// CA that signed neither; in the directories qemu-nbd and Vireo read (`server`, `client`,
    /// `client-without-certificate`, `other-ca`).
    static func makeCertificates(in directory: URL) throws {
        let base = directory.path
        func openssl(_ arguments: [String]) throws {
            let made = Harness.run(["openssl"] + arguments)
            guard made.status == 0 else { throw HarnessError("openssl \(arguments.prefix(2)): \(made.stderr)") }
        }
        for sub in ["server", "client", "client-without-certificate", "other-ca"] {
            try FileManager.default.createDirectory(atPath: "\(base)/\(sub)", withIntermediateDirectories: true)
        }
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        try openssl(["req", "-x509"] + key + ["-keyout", "\(base)/ca-key.pem", "-out", "\(base)/ca-cert.pem", "-days", "2", "-subj", "/CN=Vireo test CA"])
        try openssl(["req", "-x509"] + key + ["-keyout", "\(base)/other-ca/ca-key.pem", "-out", "\(base)/other-ca/ca-cert.pem", "-days", "2", "-subj", "/CN=Another CA"])
        for (name, subject, extensions) in [("server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                                            ("client", "/CN=vireo-client", "extendedKeyUsage=clientAuth\n")] {
            try openssl(["req"] + key + ["-keyout", "\(base)/\(name)/\(name)-key.pem", "-out", "\(base)/\(name).csr", "-subj", subject])
            try extensions.write(toFile: "\(base)/\(name).ext", atomically: true, encoding: .utf8)
            try openssl(["x509", "-req", "-in", "\(base)/\(name).csr", "-CA", "\(base)/ca-cert.pem", "-CAkey", "\(base)/ca-key.pem", "-CAcreateserial",
                         "-out", "\(base)/\(name)/\(name)-cert.pem", "-days", "2", "-extfile", "\(base)/\(name).ext"])
        }
        for sub in ["server", "client", "client-without-certificate"] {
            try FileManager.default.copyItem(atPath: "\(base)/ca-cert.pem", toPath: "\(base)/\(sub)/ca-cert.pem")
        }
    }

    @Test("NBD over TLS (nbds://, GnuTLS against qemu-nbd's TLS with client certificates): a probe's writes land on the export over TCP and over a Unix socket; a jailed library VM keeps writing across the server's restart, the handshake done again inside the jail; a pool lists the exports over TLS; a server certificate from another CA or for another name, a missing client certificate, TLS asked of a plain server or refused by a TLS one, and a missing certificates directory are refused naming why")
    func nbdOverTLS() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        try Self.makeCertificates(in: directory)
        let certificates = directory.path
        let image = directory.appendingPathComponent("export.raw").path
        #expect(Harness.run(["truncate", "-s", "32M", image]).status == 0)
        let probe = try Harness.probe("pvh")
        let port = NBDServer.freePort()
        var server: NBDServer? = try NBDServer(image: image, port: port, shared: true, tls: "\(certificates)/server")
        let uri = "nbds://127.0.0.1:\(port)/exp?tls-certificates=\(certificates)/client"

        // Over TCP, the server's name checked against its certificate (127.0.0.1 and localhost).
        for (address, seed) in [(uri, 81), ("nbds://localhost:\(port)/exp?tls-certificates=\(certificates)/client", 82)] {
            let written = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=\(seed) split=1", "--disk", address])
            #expect(written.stdout.contains("write_status=0 flush_status=0 read_status=0 match=1 beyond_end_status=1"), "\(address): \(written.stdout) \(written.stderr)")
            #expect(Array(try Data(contentsOf: URL(fileURLWithPath: image))[512_000..<516_096]) == BlockDeviceTests.written(seed: seed), "\(address): the write is not on the export")
        }
        // Over a Unix socket: the chain is checked (a socket has no host name to match).
        let socket = directory.appendingPathComponent("tls.sock").path
        let unixServer = try NBDServer(image: image, socket: socket, shared: true, tls: "\(certificates)/server")
        let unixURI = "nbds+unix:///exp?socket=\(socket)&tls-certificates=\(certificates)/client"
        let overUnix = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=83 split=1", "--disk", unixURI])
        #expect(overUnix.stdout.contains("read_status=0 match=1"), "\(overUnix.stdout) \(overUnix.stderr)")
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: image))[512_000..<516_096]) == BlockDeviceTests.written(seed: 83), "the write over the socket is not on the export")

        // Refusals, each before the guest runs.
        let plainSocket = directory.appendingPathComponent("plain.sock").path
        let plain = try NBDServer(image: image, socket: plainSocket, shared: true)
        let refusals: [(String, String)] = [
            ("nbds://127.0.0.1:\(port)/exp?tls-certificates=\(certificates)/other-ca", "the server's certificate was refused: The certificate is NOT trusted. The certificate issuer is unknown."),
            ("\(uri)&tls-hostname=elsewhere.example", "The name in the certificate does not match the expected."),
            ("nbds://127.0.0.1:\(port)/exp?tls-certificates=\(certificates)/client-without-certificate",
             "the server closed the connection after the TLS handshake; if it checks clients' certificates, put client-cert.pem and client-key.pem"),
            ("nbd://127.0.0.1:\(port)/exp", "the server requires TLS; name it with nbds://"),
            ("nbds+unix:///exp?socket=\(plainSocket)&tls-certificates=\(certificates)/client", "the server does not offer TLS"),
            ("nbds://127.0.0.1:\(port)/exp?tls-certificates=\(certificates)/absent", "the TLS certificates directory \(certificates)/absent does not exist"),
            ("nbd://127.0.0.1:\(port)/exp?tls-certificates=\(certificates)/client", "sets tls-certificates on a plain NBD address; TLS needs nbds://"),
            ("nbds://127.0.0.1:\(port)/exp?tls-certificates=relative", "needs an absolute tls-certificates directory"),
        ]
        for (disk, reason) in refusals {
            let refused = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk", "--disk", disk])
            #expect(refused.status != 0 && refused.stderr.contains(reason), "\(disk): \(refused.stderr)")
            #expect(!refused.stdout.contains("blk: dev=0 capacity"), "\(disk): the guest ran")
        }
        plain.kill()
        unixServer.kill()

        // A jailed library VM: the credentials are read before the jail, every handshake (the
        // first, and the one after the server comes back) happens inside it.
        let library = try TestLibrary()
        #expect(library.vireo("create", "tls", "--kernel", probe, "--memory", "64M", "--no-disk", "--no-nic",
                              "--cmdline", "console=ttyS0 probe=blkloop count=100000000").status == 0)
        let attached = library.vireo("disk", "attach", "tls", uri)
        #expect(attached.status == 0, "\(attached.stderr)")
        #expect(library.vireo("start", "tls").status == 0)
        #expect(library.waitFor(30) { library.consoleLog("tls").contains("blkloop: flushed 80") }, "\(library.consoleLog("tls").suffix(500)) \(library.vmmLog("tls"))")
        #expect(library.vmmLog("tls").contains("seccomp=on"), "\(library.vmmLog("tls"))")
        server?.kill()
        #expect(library.waitFor(30) { library.vmmLog("tls").contains("failed during") }, "\(library.vmmLog("tls"))")
        server = try NBDServer(image: image, port: port, shared: true, tls: "\(certificates)/server")
        #expect(library.waitFor(30) { library.vmmLog("tls").contains("connected again through \(uri)") }, "\(library.vmmLog("tls"))")
        let flushed = library.consoleLog("tls").components(separatedBy: "blkloop: flushed").count
        #expect(library.waitFor(30) { library.consoleLog("tls").components(separatedBy: "blkloop: flushed").count > flushed + 10 },
                "the guest's writes stopped after the reconnection: \(library.consoleLog("tls").suffix(300))")
        #expect(!library.consoleLog("tls").contains("failed"), "\(library.consoleLog("tls").suffix(300))")
        #expect(library.vireo("stop", "tls", "--force").status == 0)
        #expect(try Self.missingBlocks(image, count: 80).isEmpty, "the library VM's first 80 blocks are not on the export")

        // A pool on the TLS server lists its exports through the same handshake.
        let pool = library.vireo("pool", "create", "secure", "--type", "nbd", "nbds://127.0.0.1:\(port)?tls-certificates=\(certificates)/client")
        #expect(pool.status == 0, "\(pool.stderr)")
        let listed = library.vireo("pool", "info", "secure").stdout
        #expect(listed.contains("Volume:   exp (raw, 32 MiB)"), "\(listed)")
        withExtendedLifetime(server) {}
    }

    @Test("the REST API takes network disks where the server allows them: an NBD server `vireo serve --allow-disk-server` names is attached; another server, a Unix socket outside --allow-path and a CHAP file or TLS certificates directory outside it are refused naming the flag, and the VM is unchanged")
    func networkDisksThroughTheAPI() throws {
        let directory = try Harness.temporaryDirectory()
        let image = directory.appendingPathComponent("export.raw").path
        #expect(Harness.run(["truncate", "-s", "8M", image]).status == 0)
        let port = NBDServer.freePort()
        let server = try NBDServer(image: image, port: port)
        let outside = "/dev/shm/vireo-api-\(UInt32.random(in: 0...UInt32.max)).sock"
        let hidden = try NBDServer(image: image, socket: outside, shared: true)
        defer { hidden.kill(); unlink(outside) }
        let library = try TestLibrary()
        #expect(library.vireo("create", "apivm", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk", "--no-nic").status == 0)
        let served = try Served(library, extra: ["--allow-disk-server", "127.0.0.1:\(port)"])
        let api = served.api
        let other = NBDServer.freePort()
        let refusals: [(String, String)] = [
            ("nbd://127.0.0.1:\(other)/exp", "start `vireo serve` with --allow-disk-server 127.0.0.1:\(other)"),
            (hidden.uri(), "is outside what this server lets API clients name"),
            ("iscsi://127.0.0.1:\(port)/iqn.2026-12.dev.vireo.test:disk/1?chap=/etc/shadow", "/etc/shadow is outside what this server lets API clients name"),
            ("nbds://127.0.0.1:\(port)/exp?tls-certificates=/etc/ssl/private", "/etc/ssl/private is outside what this server lets API clients name"),
            ("nbd://127.0.0.1:\(port)/exp|", "is not an NBD address"),
        ]
        for (path, reason) in refusals {
            let refused = try api.request("POST", "/api/vms/apivm/disks", json: ["path": path])
            #expect(refused.status == 422 && refused.text.contains(reason), "\(path): \(refused.status) \(refused.text)")
        }
        #expect(library.vireo("info", "apivm").stdout.contains("Disk") == false, "\(library.vireo("info", "apivm").stdout)")
        let attached = try api.request("POST", "/api/vms/apivm/disks", json: ["path": server.uri()])
        #expect(attached.status == 201, "\(attached.status) \(attached.text)")
        #expect(library.vireo("info", "apivm").stdout.contains("\(server.uri()) (raw, NBD export, 1 path)"), "\(library.vireo("info", "apivm").stdout)")
    }
}
