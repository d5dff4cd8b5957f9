import Foundation
import Testing

/// The jailed, seccomp-filtered VMM (docs/isolation.md), proven from the host's side: the
/// kernel's view of the process (/proc/PID/status, /proc/PID/root) and what the VMM itself can
/// still reach, asked through the control socket's test hooks.
@Suite(.serialized)
struct IsolationTests {
    static func status(_ pid: Int) -> [String: String] {
        let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return fields
    }

    /// Every path inside the VMM's root, relative to it: its private /proc skipped, the VM's own
    /// directory listed but not walked.
    static func jailContents(_ pid: Int, vmDirectory: String) -> [String] {
        let root = "/proc/\(pid)/root"
        var found: [String] = []
        var pending = [""]
        while let relative = pending.popLast() {
            for entry in (try? FileManager.default.contentsOfDirectory(atPath: root + (relative.isEmpty ? "/" : relative))) ?? [] {
                let path = relative + "/" + entry
                if path == "/proc" { continue }
                found.append(path)
                var isDirectory: ObjCBool = false
                if relative != vmDirectory, FileManager.default.fileExists(atPath: root + path, isDirectory: &isDirectory), isDirectory.boolValue {
                    pending.append(path)
                }
            }
        }
        return found.sorted()
    }

    static func hooked(_ library: TestLibrary, _ arguments: String...) -> Harness.Completed {
        Harness.run([Harness.vireo] + arguments, timeout: 60, environment: ["VIREO_HOME": library.root.path, "VIREO_TEST_HOOKS": "1"])
    }

    static func reply(_ library: TestLibrary, _ name: String, _ request: String) throws -> [String: Any] {
        let line = try ControlClient.request(request, socket: library.root.appendingPathComponent(name).appendingPathComponent("control.sock").path)
        return (try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]) ?? [:]
    }

    @Test("A library VM started as root runs jailed: non-root per-VM uid (two VMs, two uids), Seccomp: 2, NoNewPrivs: 1, its root holds only its own directory and devices, it cannot open a host file or the other VM's disk, and its own disk still works")
    func jailedVMM() throws {
        let library = try TestLibrary()
        let probe = try Harness.probe("pvh")
        for name in ["first", "second"] {
            let created = library.vireo("create", name, "--kernel", probe, "--memory", "64M", "--disk", "64M",
                                        "--cmdline", "console=ttyS0 probe=ticker")
            #expect(created.status == 0, "\(created.stderr)")
            let started = Self.hooked(library, "start", name)
            #expect(started.status == 0, "\(started.stderr)")
        }
        var uids: [String] = []
        for name in ["first", "second"] {
            let pid = try #require(ResourceTests.pid(library, name))
            let fields = Self.status(pid)
            let uid = try #require(fields["Uid"]?.split(separator: "\t").first.map(String.init))
            #expect(uid != "0", "\(fields)")
            #expect(fields["Seccomp"] == "2", "\(fields)")
            #expect(fields["NoNewPrivs"] == "1", "\(fields)")
            // PID 1 of its own PID namespace.
            #expect(fields["NSpid"]?.hasSuffix("\t1") == true, "\(fields)")
            uids.append(uid)

            let directory = library.root.appendingPathComponent(name).path
            let contents = Self.jailContents(pid, vmDirectory: directory)
            let allowed = Set(["/dev/kvm", "/dev/net/tun", "/dev/null", "/dev/urandom", "/dev", "/dev/net"])
            for path in contents where !allowed.contains(path) {
                // Parents of the VM's directory (made in the jail's tmpfs), the directory, and what is in it.
                #expect(directory.hasPrefix(path + "/") || path == directory || path.hasPrefix(directory + "/"), "\(path) is in the jail of \(name)")
            }
            #expect(contents.contains(directory + "/config.json"))
            #expect(!contents.contains("/etc"), "\(contents)")

            let info = library.vireo("info", name).stdout
            #expect(info.contains("Jail:") && info.contains("uid \(uid)"), "\(info)")
            #expect(info.contains("Seccomp:") && info.contains("[kernel: mode 2]"), "\(info)")
            #expect(info.contains("Landlock:"), "\(info)")
            #expect(info.contains("AppArmor:"), "\(info)")
        }
        #expect(uids[0] != uids[1], "two VMs share uid \(uids[0])")

        // The VMM's view: no host file, not the other VM's disk; its own disk, yes.
        let hostFile = try Self.reply(library, "first", "test-open /etc/passwd")
        #expect(hostFile["opened"] as? Bool == false && hostFile["errno"] as? Int == Int(ENOENT), "\(hostFile)")
        let otherDisk = library.root.appendingPathComponent("second").appendingPathComponent("disk0.qcow2").path
        let other = try Self.reply(library, "first", "test-open \(otherDisk)")
        #expect(other["opened"] as? Bool == false, "\(other)")
        let ownDisk = library.root.appendingPathComponent("first").appendingPathComponent("disk0.qcow2").path
        let own = try Self.reply(library, "first", "test-open \(ownDisk)")
        #expect(own["opened"] as? Bool == true, "\(own)")
        // The VM's definition is root's and private: the VMM can neither rewrite nor read it.
        let config = try Self.reply(library, "first", "test-open \(library.root.appendingPathComponent("first").appendingPathComponent("config.json").path)")
        #expect(config["opened"] as? Bool == false && config["errno"] as? Int == Int(EACCES), "\(config)")
        #expect(access(library.root.appendingPathComponent("first").appendingPathComponent("config.json").path, W_OK) == 0)

        // Save and resume still work from inside the jail (the state goes to the VMM's own directory).
        #expect(library.vireo("save", "first").status == 0)
        #expect(library.vireo("start", "first").status == 0)
        #expect(library.waitFor(20) { library.vmmLog("first").contains("restored from") })
        let ticks = library.ticks("first")
        #expect(library.waitFor(20) { library.ticks("first") > ticks + 2 })
    }

    @Test("A forbidden system call ends the VMM: `vireo info` names the call and the thread, `vireo list` shows it crashed, and the disk it was writing is clean")
    func forbiddenSyscall() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "victim", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--disk", "64M",
                                    "--cmdline", "console=ttyS0 probe=blkloop count=100000")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(Self.hooked(library, "start", "victim").status == 0)
        #expect(library.waitFor(30) { library.consoleLog("victim").contains("blkloop: flushed") })
        _ = try? Self.reply(library, "victim", "test-forbidden-syscall")
        #expect(library.waitFor(20) { library.vireo("list").stdout.contains("crashed") }, "\(library.vireo("list").stdout)")
        let info = library.vireo("info", "victim").stdout
        #expect(info.contains("crashed: seccomp: forbidden system call socket (41) from thread control-conn"), "\(info)")
        #expect(library.vmmLog("victim").contains("seccomp: forbidden system call 41 from thread control-conn"))
        let disk = library.root.appendingPathComponent("victim").appendingPathComponent("disk0.qcow2").path
        let check = Harness.run(["qemu-img", "check", disk], timeout: 60)
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        // It starts again, jailed as before.
        #expect(library.vireo("start", "victim").status == 0)
        #expect(library.vireo("list").stdout.contains("running"))
    }

    @Test("--no-jail and --no-seccomp run the VMM as root and unfiltered, and `vireo list` and `vireo info` say so")
    func isolationOff() throws {
        let library = try TestLibrary()
        #expect(library.vireo("create", "open", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk",
                              "--cmdline", "console=ttyS0 probe=ticker").status == 0)
        #expect(Self.hooked(library, "start", "open", "--no-jail", "--no-seccomp").status == 0)
        let pid = try #require(ResourceTests.pid(library, "open"))
        let fields = Self.status(pid)
        #expect(fields["Uid"]?.hasPrefix("0\t") == true && fields["Seccomp"] == "0", "\(fields)")
        let list = library.vireo("list").stdout
        #expect(list.contains("running (--no-jail --no-seccomp)"), "\(list)")
        let info = library.vireo("info", "open").stdout
        #expect(info.contains("off (started with --no-jail)") && info.contains("off (started with --no-seccomp)"), "\(info)")
        // Without the filter the same call is not caught: the VMM answers and runs on.
        let reply = try Self.reply(library, "open", "test-forbidden-syscall")
        #expect((reply["socket"] as? Int ?? -1) >= 0, "\(reply)")
        #expect(library.vireo("list").stdout.contains("running"))
    }
}
