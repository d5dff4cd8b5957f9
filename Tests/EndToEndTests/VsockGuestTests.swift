import Foundation
import Testing

@Suite struct VsockGuestTests {
    @Test("vsock both ways: host CONNECT to a guest port and back; the guest connects to a host port; bad greetings are closed")
    func bothDirections() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let socket = directory.appendingPathComponent("v.sock").path
        let host = RunningProcess(["python3", Harness.packageRoot.appendingPathComponent("probes/vsock-host.py").path, socket])
        defer { host.signal(SIGKILL); _ = host.wait(timeout: 5) }
        #expect(host.waitForOutput("ready", timeout: 10), "\(host.stderr)")
        let result = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--memory", "64M", "--vsock", "\(socket),cid=42",
                                       "--cmdline", "console=ttyS0 probe=vsock"], timeout: 60)
        #expect(result.status == 0, "\(result.stderr)")
        let console = result.stdout
        #expect(console.contains("vsock: cid=42 listening on 1234"), "\(console)")
        #expect(console.contains("vsock: connected to host port 5000"), "\(console)")
        #expect(console.contains("vsock: host port 5000 replied host-ack"), "\(console)")
        #expect(console.contains("vsock: host sent ping"), "\(console)")
        #expect(console.contains("vsock: both directions done"), "\(console)")
        _ = host.wait(timeout: 10)
        #expect(host.stdout.contains("port 5000 got hello from the guest"), "\(host.stdout) \(host.stderr)")
        #expect(host.stdout.contains("malformed greeting answered b''"), "\(host.stdout)")
        #expect(host.stdout.contains("unaccepted port answered b'' after 2 s"), "\(host.stdout)")
        #expect(host.stdout.contains("connect reply OK 1073741825"), "\(host.stdout)")
        #expect(host.stdout.contains("echo echo:ping"), "\(host.stdout)")
        #expect(!FileManager.default.fileExists(atPath: socket), "the VMM left its vsock socket behind")
    }

    @Test("bad --vsock values are refused with the reason")
    func refusals() throws {
        try Harness.requireKVM()
        let probe = try Harness.probe("pvh")
        for (value, message) in [("cid=5", "--vsock: 'cid=5' has no socket path; expected PATH[,cid=N]"),
                                 ("/tmp/x.sock,cid=2", "--vsock: cid 2 must be a whole number from 3 to 4294967294"),
                                 ("/tmp/x.sock,port=3", "--vsock: unknown option 'port=3'"),
                                 ("/etc/hostname", "--vsock: /etc/hostname exists and is not a socket; refusing to replace it")] {
            let result = Harness.vireoRun(["--kernel", probe, "--vsock", value])
            #expect(result.status == 2, "\(value): \(result.stderr)")
            #expect(result.stderr.contains(message), "\(value): \(result.stderr)")
        }
    }

    @Test("a library VM's vsock lives in its directory and works after vireo start")
    func libraryVM() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "agent", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk",
                                    "--vsock-cid", "7", "--cmdline", "console=ttyS0 probe=vsock")
        #expect(created.status == 0, "\(created.stderr)")
        let socket = library.root.appendingPathComponent("agent/vsock.sock").path
        #expect(library.vireo("info", "agent").stdout.contains("guest CID 7; host side \(socket)"))
        let host = RunningProcess(["python3", Harness.packageRoot.appendingPathComponent("probes/vsock-host.py").path, socket])
        defer { host.signal(SIGKILL); _ = host.wait(timeout: 5) }
        #expect(host.waitForOutput("ready", timeout: 10))
        #expect(library.vireo("start", "agent").status == 0)
        #expect(library.waitFor(30) { library.state("agent") == "stopped" })
        #expect(library.consoleLog("agent").contains("vsock: cid=7 listening on 1234"))
        #expect(library.consoleLog("agent").contains("vsock: both directions done"), "\(library.consoleLog("agent"))")
    }
}
