import Foundation
import Testing

/// A tgtd (Debian's user-space iSCSI target) on a loopback port serving one file as LUN 1 of one
/// target, killed when the test ends. Each has its own control port, so several run side by side.
final class ISCSITarget: @unchecked Sendable {
    static let targetName = "iqn.2026-12.dev.vireo.test:disk"
    let port: UInt16
    let control = Int.random(in: 1_000...30_000)
    let process: RunningProcess

    /// `chap`: the account the target demands; `thin`: the LUN is thin-provisioned (UNMAP frees
    /// the file's blocks); `namespace`: a network namespace the test made, whose loopback it
    /// listens on.
    init(image: String, port: UInt16, chap: (user: String, secret: String)? = nil, thin: Bool = false, namespace: String? = nil) throws {
        self.port = port
        try FileManager.default.createDirectory(atPath: "/var/run/tgtd", withIntermediateDirectories: true)
        let command = ["tgtd", "-f", "-C", String(control), "--iscsi", "portal=127.0.0.1:\(port)"]
        process = RunningProcess(namespace.map { ["ip", "netns", "exec", $0] + command } ?? command)
        func listening() -> Bool {
            guard let namespace else { return NBDServer.answers(port) }
            return Harness.run(["ip", "netns", "exec", namespace, "ss", "-Hltn", "sport = :\(port)"]).stdout.contains(":\(port)")
        }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: "/var/run/tgtd/socket.\(control)") || !listening() {
            guard Date() < deadline, !process.hasExited else { throw HarnessError("tgtd did not start on port \(port): \(process.stderr)") }
            usleep(20_000)
        }
        var commands = [
            ["--op", "new", "--mode", "target", "--tid", "1", "-T", Self.targetName],
            ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", image],
            ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
        ]
        if thin { commands.append(["--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "--params", "thin_provisioning=1"]) }
        if let chap {
            commands.append(["--op", "new", "--mode", "account", "--user", chap.user, "--password", chap.secret])
            commands.append(["--op", "bind", "--mode", "account", "--tid", "1", "--user", chap.user])
        }
        for command in commands {
            let done = Harness.run(["tgtadm", "-C", String(control), "--lld", "iscsi"] + command)
            guard done.status == 0 else { throw HarnessError("tgtadm \(command.joined(separator: " ")) failed: \(done.stderr)") }
        }
    }

    func kill() {
        process.signal(SIGKILL)
        _ = process.wait(timeout: 10)
        for suffix in ["", ".lock"] { unlink("/var/run/tgtd/socket.\(control)\(suffix)") }
    }

    deinit { kill() }

    func uri(lun: Int = 1, chap: String? = nil) -> String {
        "iscsi://127.0.0.1:\(port)/\(Self.targetName)/\(lun)" + (chap.map { "?chap=\($0)" } ?? "")
    }
}

@Suite(.serialized) struct ISCSIDiskTests {
    @Test("iSCSI disks (libiscsi loaded by the VMM, tgtd the target): a probe's writes in odd pieces land on the LUN and a discard frees them on a thin LUN; CHAP from a file (right, wrong, readable by others, absent); two portals, the active one killed mid-write, move I/O to the other with no guest error and no block lost; a jailed library VM on two portals shows each path's state before and after, and when the dead portal comes back and the other dies it connects and logs in to it again from inside the jail; unreachable portals, wrong targets and LUNs, malformed addresses are refused naming why")
    func iscsiDisks() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let image = directory.appendingPathComponent("lun.raw").path
        #expect(Harness.run(["truncate", "-s", "32M", image]).status == 0)
        let probe = try Harness.probe("pvh")
        let chap = directory.appendingPathComponent("chap").path
        try "vireo:s3cret-passw0rd\n".write(toFile: chap, atomically: true, encoding: .utf8)
        chmod(chap, 0o600)
        var first: ISCSITarget? = try ISCSITarget(image: image, port: NBDServer.freePort(), chap: ("vireo", "s3cret-passw0rd"), thin: true)
        let firstURI = try #require(first).uri(chap: chap)

        // Data in odd pieces (read-modify-write of the LUN's blocks), then a discard on the thin LUN.
        let written = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=77 split=1", "--disk", firstURI])
        #expect(written.stdout.contains("blk: dev=0 capacity=65536 ro=0 id_status=0 serial= write_status=0 flush_status=0 read_status=0 match=1 beyond_end_status=1"),
                "\(written.stdout) \(written.stderr)")
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: image)))
        #expect(Array(bytes[512_000..<516_096]) == BlockDeviceTests.written(seed: 77), "the guest's write is not on the LUN")
        let discarded = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=78 discard=1", "--disk", firstURI])
        #expect(discarded.stdout.contains("match=1 beyond_end_status=1 discard_status=0 zero_after_discard=1"), "\(discarded.stdout) \(discarded.stderr)")
        let allocated = Harness.run(["du", "--block-size=1", image]).stdout.split(separator: "\t").first.flatMap { Int($0) } ?? -1
        #expect(allocated == 0, "the UNMAP did not free the LUN's blocks: \(allocated) bytes still allocated")

        // CHAP: a wrong secret, a file others may read, none at all.
        let wrong = directory.appendingPathComponent("wrong").path
        try "vireo:not-the-secret\n".write(toFile: wrong, atomically: true, encoding: .utf8)
        chmod(wrong, 0o600)
        let open = directory.appendingPathComponent("open").path
        try "vireo:s3cret-passw0rd\n".write(toFile: open, atomically: true, encoding: .utf8)
        chmod(open, 0o644)
        let unreachable = NBDServer.freePort()
        let target = try #require(first)
        let refusals: [(String, String)] = [
            (target.uri(chap: wrong), "login refused"),
            (target.uri(chap: open), "the CHAP file \(open) may be read by others than its owner; chmod 600 it"),
            (target.uri(), "login refused"),
            (target.uri(lun: 5, chap: chap), "TEST UNIT READY"),
            ("iscsi://127.0.0.1:\(target.port)/iqn.2026-12.dev.vireo.test:nothing/1?chap=\(chap)", "login refused"),
            ("iscsi://127.0.0.1:\(unreachable)/\(ISCSITarget.targetName)/1", "cannot connect to 127.0.0.1:\(unreachable)"),
            ("iscsi://127.0.0.1/\(ISCSITarget.targetName)/x", "has a LUN that is not a number"),
            ("iscsi://vireo%secret@127.0.0.1/\(ISCSITarget.targetName)/1", "carries credentials"),
            ("iscsi://127.0.0.1/Upper.Case/1", "has an unusable target name"),
            (firstURI + ",format=qcow2", "is a network disk (an NBD export or iSCSI LUN), which is a raw disk"),
        ]
        for (disk, reason) in refusals {
            let refused = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk", "--disk", disk])
            #expect(refused.status != 0 && refused.stderr.contains(reason), "\(disk): \(refused.stderr)")
            #expect(!refused.stdout.contains("blk: dev=0 capacity"), "\(disk): the guest ran")
        }

        // Two portals to one LUN (two targets over one file): the active one dies mid-write.
        #expect(Harness.run(["truncate", "-s", "0", image]).status == 0 && Harness.run(["truncate", "-s", "32M", image]).status == 0)
        let second = try ISCSITarget(image: image, port: NBDServer.freePort(), chap: ("vireo", "s3cret-passw0rd"))
        let count = 400
        let failover = RunningProcess([Harness.vireo, "run", "--kernel", probe, "--memory", "64M", "--cmdline", "probe=blkloop count=\(count) readback=1",
                                       "--disk", firstURI + "|" + second.uri(chap: chap)])
        #expect(failover.waitForOutput("blkloop: flushed 80", timeout: 60), "\(failover.stdout.suffix(300)) \(failover.stderr)")
        first?.kill()
        first = nil
        #expect(failover.waitForOutput("blkloop: flushed \(count)", timeout: 120), "\(failover.stdout.suffix(300)) \(failover.stderr)")
        #expect(failover.wait(timeout: 30) == 0)
        #expect(!failover.stdout.contains("failed") && !failover.stdout.contains("mismatch"), "the guest saw an error: \(failover.stdout.suffix(300))")
        #expect(failover.stderr.contains("now on \(second.uri(chap: chap))"), "\(failover.stderr)")
        let lost = try NetworkDiskTests.missingBlocks(image, count: count)
        #expect(lost.isEmpty, "blocks lost in the failover: \(lost.prefix(10))")

        // A library VM (jailed: no network, seccomp) on two portals, `vireo info` naming each.
        let third = try ISCSITarget(image: image, port: NBDServer.freePort(), chap: ("vireo", "s3cret-passw0rd"))
        let library = try TestLibrary()
        #expect(library.vireo("create", "lun", "--kernel", probe, "--memory", "64M", "--no-disk",
                              "--cmdline", "console=ttyS0 probe=blkloop count=100000000").status == 0)
        let paths = third.uri(chap: chap) + "|" + second.uri(chap: chap)
        let attached = library.vireo("disk", "attach", "lun", paths)
        #expect(attached.status == 0, "\(attached.stderr)")
        let badAttach = library.vireo("disk", "attach", "lun", third.uri(chap: wrong))
        #expect(badAttach.status != 0 && badAttach.stderr.contains("login refused"), "\(badAttach.stderr)")
        #expect(library.vireo("start", "lun").status == 0)
        NetworkDiskTests.checkFailover(library, "lun", kind: "iSCSI LUN", active: third.uri(chap: chap), standby: second.uri(chap: chap)) { third.kill() }
        #expect(library.vmmLog("lun").contains("seccomp=on"), "\(library.vmmLog("lun"))")
        // The first portal comes back and the second dies: the jailed VMM (no network of its
        // own, socket(2) for AF_UNIX only) connects and logs in to the first again through the
        // socket it made for that path before the jail, and the writes go on.
        let revived = try ISCSITarget(image: image, port: third.port, chap: ("vireo", "s3cret-passw0rd"))
        second.kill()
        #expect(library.waitFor(40) { library.vmmLog("lun").contains("connected again through \(third.uri(chap: chap))") }, "\(library.vmmLog("lun"))")
        let flushedBefore = library.consoleLog("lun").components(separatedBy: "blkloop: flushed").count
        #expect(library.waitFor(30) { library.consoleLog("lun").components(separatedBy: "blkloop: flushed").count > flushedBefore + 10 },
                "the guest's writes stopped after the reconnection: \(library.consoleLog("lun").suffix(300)) \(library.vmmLog("lun"))")
        #expect(!library.consoleLog("lun").contains("failed"), "\(library.consoleLog("lun").suffix(300))")
        let reconnected = library.vireo("info", "lun").stdout
        #expect(reconnected.contains("\(third.uri(chap: chap)): active, 2 failover(s)") && reconnected.contains("\(second.uri(chap: chap)): down"), "\(reconnected)")
        withExtendedLifetime(revived) {}
        #expect(library.vireo("stop", "lun", "--force").status == 0)
        #expect(library.vireo("delete", "lun").status == 0)
        #expect(try NetworkDiskTests.missingBlocks(image, count: 80).isEmpty, "the library VM's first 80 blocks are not on the LUN")
    }
}
