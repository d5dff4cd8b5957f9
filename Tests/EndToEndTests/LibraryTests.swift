import Foundation
import Testing

/// A VM library in a temporary directory, driven through the real `vireo` binary.
final class TestLibrary: @unchecked Sendable {
    let root: URL

    init() throws {
        try Harness.requireKVM()
        root = try Harness.temporaryDirectory().appendingPathComponent("library")
    }

    /// Powers off whatever a test left running, so no VMM outlives the test.
    deinit {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? [] where !name.hasPrefix(".") {
            _ = Harness.run([Harness.vireo, "stop", name, "--force"], timeout: 30, environment: ["VIREO_HOME": root.path])
        }
    }

    @discardableResult
    func vireo(_ arguments: String..., timeout: TimeInterval = 60) -> Harness.Completed {
        Harness.run([Harness.vireo] + Self.withoutDefaultNetwork(arguments), timeout: timeout, environment: ["VIREO_HOME": root.path])
    }

    func vireo(arguments: [String], timeout: TimeInterval = 60) -> Harness.Completed {
        Harness.run([Harness.vireo] + Self.withoutDefaultNetwork(arguments), timeout: timeout, environment: ["VIREO_HOME": root.path])
    }

    func start(_ arguments: [String]) -> RunningProcess {
        RunningProcess([Harness.vireo] + Self.withoutDefaultNetwork(arguments), environment: ["VIREO_HOME": root.path])
    }

    /// These tests run in the host's own network namespace, where no test may bring up a network:
    /// a VM created without a word about cards gets none (instead of the default NAT card).
    /// NetworkTests say what they want, inside namespaces they make.
    static func withoutDefaultNetwork(_ arguments: [String]) -> [String] {
        guard arguments.first == "create", !arguments.contains(where: { ["--nic", "--net", "--no-nic", "--no-net", "--forward"].contains($0) }) else {
            return arguments
        }
        return arguments + ["--no-nic"]
    }

    func consoleLog(_ name: String) -> String {
        (try? String(contentsOf: root.appendingPathComponent(name).appendingPathComponent("console.log"), encoding: .utf8)) ?? ""
    }

    /// The console of the run before the last (`vireo start` keeps it as console.log.1).
    func previousConsoleLog(_ name: String) -> String {
        (try? String(contentsOf: root.appendingPathComponent(name).appendingPathComponent("console.log.1"), encoding: .utf8)) ?? ""
    }

    func vmmLog(_ name: String) -> String {
        (try? String(contentsOf: root.appendingPathComponent(name).appendingPathComponent("vmm.log"), encoding: .utf8)) ?? ""
    }

    func ticks(_ name: String) -> Int { consoleLog(name).components(separatedBy: "tick ").count - 1 }

    /// Polls until `condition` holds; false at the time-out. Quickly at first, then once a second:
    /// conditions often run `vireo`, and ten runs a second for minutes would take CPU from the
    /// emulated guest kernels being waited for.
    func waitFor(_ seconds: TimeInterval, _ condition: () -> Bool) -> Bool {
        let start = Date()
        let deadline = start.addingTimeInterval(seconds)
        while Date() < deadline {
            if condition() { return true }
            Thread.sleep(forTimeInterval: Date().timeIntervalSince(start) < 5 ? 0.1 : 1)
        }
        return condition()
    }

    func state(_ name: String) -> String? {
        let listed = vireo("list", "--json")
        guard let rows = try? JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]] else { return nil }
        return rows.first { $0["name"] as? String == name }?["state"] as? String
    }

    func createTicker(_ name: String, extra: [String] = []) throws {
        try createProbe(name, command: "probe=ticker spin=5000000", extra: ["--disk", "32M"] + extra)
    }

    /// A VM booting the probe guest `variant` with `command` on its command line.
    func createProbe(_ name: String, variant: String = "pvh", command: String, extra: [String] = ["--no-disk"]) throws {
        let created = vireo(arguments: ["create", name, "--kernel", try Harness.probe(variant), "--memory", "64M",
                                        "--cmdline", "console=ttyS0 " + command] + extra)
        #expect(created.status == 0, "\(created.stderr)")
    }
}

@Suite(.serialized)
struct LibraryLifecycleTests {
    @Test("create → start → console output → pause (no progress) → resume → graceful stop → start → clone → delete")
    func fullLifecycle() throws {
        let library = try TestLibrary()
        try library.createTicker("web")
        #expect(library.state("web") == "stopped")

        let started = library.vireo("start", "web")
        #expect(started.status == 0, "\(started.stderr)")
        #expect(started.stdout.contains("Started VM 'web'"))
        #expect(library.waitFor(20) { library.ticks("web") >= 3 }, "console log: \(library.consoleLog("web").suffix(500))")
        #expect(library.state("web") == "running")

        // Paused: the guest's counter stops, and so do its exits.
        #expect(library.vireo("pause", "web").status == 0)
        #expect(library.state("web") == "paused")
        let frozen = library.ticks("web")
        Thread.sleep(forTimeInterval: 1.5)
        #expect(library.ticks("web") == frozen, "ticks moved while paused")
        let info = library.vireo("info", "web", "--json")
        #expect(info.stdout.contains("\"state\" : \"paused\""), "\(info.stdout)")
        #expect(info.stdout.contains("\"vcpu_exits\""))

        #expect(library.vireo("resume", "web").status == 0)
        #expect(library.waitFor(20) { library.ticks("web") >= frozen + 3 }, "no progress after resume")

        // Graceful stop: the ACPI power button; the probe answers it by entering S5.
        let stopped = library.vireo("stop", "web", "--timeout", "30")
        #expect(stopped.status == 0, "\(stopped.stderr)")
        #expect(library.consoleLog("web").contains("ticker: power button, entering S5"))
        #expect(library.state("web") == "stopped")
        let vmmLog = (try? String(contentsOf: library.root.appendingPathComponent("web/vmm.log"), encoding: .utf8)) ?? ""
        #expect(vmmLog.contains("guest powered off") && vmmLog.hasSuffix("exit status 0\n"), "\(vmmLog)")

        // Starts again; the previous run's output moved to console.log.1.
        #expect(library.vireo("start", "web").status == 0)
        #expect(library.waitFor(20) { library.ticks("web") >= 1 })
        #expect(FileManager.default.fileExists(atPath: library.root.appendingPathComponent("web/console.log.1").path))
        let forced = library.vireo("stop", "web", "--force")
        #expect(forced.status == 0 && forced.stdout.contains("powered off"), "\(forced.stderr)")

        // Clones: full and linked both boot; the linked one rests on the source's frozen disk.
        #expect(library.vireo("clone", "web", "web-full").status == 0)
        let linked = library.vireo("clone", "web", "web-linked", "--linked")
        #expect(linked.status == 0, "\(linked.stderr)")
        let linkedInfo = library.vireo("info", "web-linked")
        #expect(linkedInfo.stdout.contains(" on \(library.root.path)/web/base-"), "\(linkedInfo.stdout)")
        #expect(library.vireo("start", "web-linked").status == 0)
        #expect(library.waitFor(20) { library.ticks("web-linked") >= 2 })
        #expect(library.vireo("stop", "web-linked", "--force").status == 0)
        for disk in ["web/disk0.qcow2", "web-full/disk0.qcow2", "web-linked/disk0.qcow2"] {
            let check = Harness.run(["qemu-img", "check", library.root.appendingPathComponent(disk).path])
            #expect(check.status == 0, "\(disk): \(check.stdout) \(check.stderr)")
        }

        // The source protects its base while a linked clone rests on it.
        let refused = library.vireo("delete", "web")
        #expect(refused.status == 2)
        #expect(refused.stderr.contains("cannot delete VM 'web': it is the base of linked clone(s) web-linked; delete those clones first"), "\(refused.stderr)")
        for name in ["web-linked", "web-full", "web"] {
            let deleted = library.vireo("delete", name)
            #expect(deleted.status == 0, "\(name): \(deleted.stderr)")
        }
        #expect(library.vireo("list").stdout.split(separator: "\n").count == 1)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: library.root.path)
        #expect(leftovers.isEmpty, "left in the library: \(leftovers)")
    }

    @Test("kill -9 of the VMM: the VM shows stopped, its disk checks clean, and it starts again")
    func crashedVMMLeavesConsistentLibrary() throws {
        let library = try TestLibrary()
        try library.createTicker("crashy")
        #expect(library.vireo("start", "crashy").status == 0)
        let pidText = try String(contentsOf: library.root.appendingPathComponent("crashy/vmm.pid"), encoding: .utf8)
        let pid = try #require(Int32(pidText.trimmingCharacters(in: .whitespacesAndNewlines)))
        #expect(kill(pid, SIGKILL) == 0)
        #expect(library.waitFor(10) { library.state("crashy") == "stopped" })
        let check = Harness.run(["qemu-img", "check", library.root.appendingPathComponent("crashy/disk0.qcow2").path])
        #expect(check.status == 0, "\(check.stdout)")
        let again = library.vireo("start", "crashy")
        #expect(again.status == 0, "\(again.stderr)")
        #expect(library.state("crashy") == "running")
        #expect(library.vireo("stop", "crashy", "--force").status == 0)
    }

    @Test("two starts race: exactly one wins; start against delete: never both")
    func racingCommands() throws {
        let library = try TestLibrary()
        try library.createTicker("race")
        let first = library.start(["start", "race"])
        let second = library.start(["start", "race"])
        let statuses = [first.wait(timeout: 60), second.wait(timeout: 60)]
        #expect(statuses.sorted() == [0, 2], "statuses \(statuses); \(first.stderr) \(second.stderr)")
        let loser = statuses[0] == 0 ? second : first
        #expect(loser.stderr.contains("cannot start VM 'race': it is"), "\(loser.stderr)")
        #expect(library.vireo("stop", "race", "--force").status == 0)

        let start = library.start(["start", "race"])
        let delete = library.start(["delete", "race"])
        let startStatus = start.wait(timeout: 60)
        let deleteStatus = delete.wait(timeout: 60)
        #expect((startStatus == 0) != (deleteStatus == 0), "start \(startStatus) \(start.stderr); delete \(deleteStatus) \(delete.stderr)")
        if startStatus == 0 {
            #expect(library.state("race") == "running")
        } else {
            #expect(library.state("race") == nil)
            #expect(library.vireo("info", "race").status == 2)
        }
    }

    @Test("create killed at random moments never leaves a half-made VM holding the name")
    func interruptedCreate() throws {
        let library = try TestLibrary()
        let kernel = try Harness.probe("pvh")
        // A create takes some tens of milliseconds here; the kills land before, during and after.
        for attempt in 0..<10 {
            let name = "half\(attempt)"
            let create = library.start(["create", name, "--kernel", kernel, "--disk", "64M"])
            Thread.sleep(forTimeInterval: Double(attempt) * 0.008)
            create.signal(SIGKILL)
            _ = create.wait(timeout: 30)
            let info = library.vireo("info", name)
            if info.status == 0 {
                // Complete: a usable VM.
                #expect(info.stdout.contains("disk0.qcow2"), "\(info.stdout)")
            } else {
                // Absent: the name is free again.
                #expect(info.stderr.contains("no VM named '\(name)'"), "\(info.stderr)")
                let again = library.vireo("create", name, "--kernel", kernel, "--disk", "64M")
                #expect(again.status == 0, "\(again.stderr)")
            }
        }
        // Whatever the kills left, and exactly what a create killed after writing everything
        // but before its final rename leaves: a hidden staging directory whose lock is free.
        let staging = library.root.appendingPathComponent(".creating-0000")
        try FileManager.default.createDirectory(at: staging, withIntermediateDirectories: true)
        try FileManager.default.copyItem(at: library.root.appendingPathComponent("half9/config.json"), to: staging.appendingPathComponent("config.json"))
        _ = FileManager.default.createFile(atPath: staging.appendingPathComponent("vm.lock").path, contents: nil)
        let listed = library.vireo("list")
        #expect(!listed.stdout.contains(".creating"))
        let hidden = try FileManager.default.contentsOfDirectory(atPath: library.root.path).filter { $0.hasPrefix(".") }
        #expect(hidden.isEmpty, "left behind: \(hidden)")
    }

    @Test("vireo console attaches to the running guest's serial port and ends when the VM stops")
    func consoleAttach() throws {
        let library = try TestLibrary()
        try library.createTicker("talk")
        #expect(library.vireo("start", "talk").status == 0)
        let console = library.start(["console", "talk"])
        #expect(console.waitForOutput("tick", timeout: 20), "\(console.stderr)")
        #expect(library.vireo("stop", "talk", "--force").status == 0)
        #expect(console.wait(timeout: 20) == 0, "\(console.stderr)")
        let logs = library.vireo("logs", "talk")
        #expect(logs.stdout.contains("probe: mode=pvh"))
        // The probe never looks for its virtio devices (disk, balloon, rng), as a kernel built without ACPI
        // would not on an ACPI machine: the VMM's hint about that run comes with its output.
        #expect(logs.stderr.contains("vireo: hint: the guest never looked for its 3 virtio device(s)") && logs.stderr.contains("--acpi off"), "\(logs.stderr)")
        #expect(!logs.stdout.contains("hint:"))
    }

    @Test("refusals name the VM, its state and what to do instead; bad input changes nothing")
    func refusalsAndValidation() throws {
        let library = try TestLibrary()
        let badName = library.vireo("create", "-x")
        #expect(badName.status != 0)
        let badName2 = library.vireo("create", "a/b")
        #expect(badName2.status == 2)
        #expect(badName2.stderr.contains("invalid VM name 'a/b': must be 1 to 64 characters: letters, digits, '.', '_' and '-'"), "\(badName2.stderr)")
        let badType = library.vireo("create", "x", "--ostype", "windows-11")
        #expect(badType.status == 2)
        #expect(badType.stderr.contains("--ostype: 'windows-11' is not an OS type; choose one of ubuntu-64"), "\(badType.stderr)")
        let badMemory = library.vireo("create", "x", "--memory", "1M")
        #expect(badMemory.stderr.contains("--memory: 1 MiB is below the minimum"), "\(badMemory.stderr)")
        let badKernel = library.vireo("create", "x", "--kernel", "/etc/hostname")
        #expect(badKernel.status == 2)
        #expect(badKernel.stderr.contains("--kernel:"), "\(badKernel.stderr)")
        #expect(library.vireo("list", "--json").stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "[\n\n]"
                || library.vireo("list", "--json").stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "[]")

        try library.createTicker("busy")
        let duplicate = library.vireo("create", "busy")
        #expect(duplicate.status == 2)
        #expect(duplicate.stderr.contains("a VM named 'busy' already exists"))
        let missing = library.vireo("start", "nope")
        #expect(missing.status == 2)
        #expect(missing.stderr.contains("no VM named 'nope'"))
        let notRunning = library.vireo("pause", "busy")
        #expect(notRunning.stderr.contains("cannot pause VM 'busy': it is stopped; start it first with `vireo start busy`"), "\(notRunning.stderr)")
        let noKernel = library.vireo("create", "bare", "--no-disk")
        #expect(noKernel.status == 0)
        let cannotStart = library.vireo("start", "bare")
        #expect(cannotStart.status == 2)
        #expect(cannotStart.stderr.contains("cannot start VM 'bare': it is without a kernel; give it one with `vireo set bare --kernel PATH`"), "\(cannotStart.stderr)")

        #expect(library.vireo("start", "busy").status == 0)
        let config = library.root.appendingPathComponent("busy/config.json")
        let before = try Data(contentsOf: config)
        let set = library.vireo("set", "busy", "--cpus", "2")
        #expect(set.status == 2)
        #expect(set.stderr.contains("cannot change --cpus of VM 'busy': it is running; stop it first with `vireo stop busy`"), "\(set.stderr)")
        let delete = library.vireo("delete", "busy")
        #expect(delete.status == 2)
        #expect(delete.stderr.contains("cannot delete VM 'busy': it is running"))
        let again = library.vireo("start", "busy")
        #expect(again.stderr.contains("cannot start VM 'busy': it is running"), "\(again.stderr)")
        #expect(try Data(contentsOf: config) == before, "a refused command changed the configuration")

        #expect(library.vireo("stop", "busy", "--force").status == 0)
        let badSet = library.vireo("set", "busy", "--cpus", "0")
        #expect(badSet.status == 2)
        #expect(badSet.stderr.contains("--cpus: 0 is not allowed; use 1 to"), "\(badSet.stderr)")
        #expect(try Data(contentsOf: config) == before)
        let goodSet = library.vireo("set", "busy", "--cpus", "2", "--memory", "96M")
        #expect(goodSet.status == 0, "\(goodSet.stderr)")
        let shown = library.vireo("info", "busy", "--json").stdout
        #expect(shown.contains("\"cpus\" : 2") && shown.contains("\"memory_bytes\" : 100663296"), "\(shown)")
        #expect(library.vireo("rename", "busy", "calm").status == 0)
        #expect(library.vireo("start", "calm").status == 0)
        #expect(library.waitFor(20) { library.ticks("calm") >= 1 })
        #expect(library.vireo("delete", "calm", "--force").status == 0)
    }

    @Test("disk attach and detach on a stopped VM; the guest sees the attached disk")
    func diskAttachDetach() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "disks", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk",
                                    "--no-rng", "--cmdline", "console=ttyS0 probe=blk")
        #expect(created.status == 0, "\(created.stderr)")
        let image = library.root.deletingLastPathComponent().appendingPathComponent("extra.qcow2").path
        #expect(Harness.run([Harness.vireo, "disk", "create", image, "--size", "8M"]).status == 0)
        let attached = library.vireo("disk", "attach", "disks", image)
        #expect(attached.status == 0, "\(attached.stderr)")
        #expect(library.vireo("disk", "attach", "disks", image).stderr.contains("is already attached to VM 'disks'"))
        #expect(library.vireo("start", "disks").status == 0)
        #expect(library.waitFor(30) { library.consoleLog("disks").contains("probe: done") }, "\(library.consoleLog("disks").suffix(800))")
        #expect(library.consoleLog("disks").contains("blk: dev=0 capacity=16384 ro=0 id_status=0 serial= write_status=0 flush_status=0 read_status=0 match=1"), "\(library.consoleLog("disks").suffix(800))")
        _ = library.vireo("stop", "disks", "--force")
        let detached = library.vireo("disk", "detach", "disks", image)
        #expect(detached.status == 0, "\(detached.stderr)")
        #expect(library.vireo("delete", "disks").stdout.contains("left attached disk") == false)
        #expect(FileManager.default.fileExists(atPath: image), "an attached disk from outside the VM was deleted")
    }

    @Test("vireo balloon takes 16 MiB back from a guest (the VMM's RSS drops) and gives it back")
    func balloonReclaimsMemory() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "squeeze", "--kernel", try Harness.probe("pvh"), "--memory", "128M", "--no-disk",
                                    "--cmdline", "console=ttyS0 probe=balloon")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(library.vireo("start", "squeeze").status == 0)
        #expect(library.waitFor(20) { library.consoleLog("squeeze").contains("balloon: statistics refreshed") },
                "\(library.consoleLog("squeeze"))")
        func counters() throws -> [String: Any] {
            let info = library.vireo("info", "squeeze", "--json").stdout
            let object = try JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any]
            return try #require(object?["counters"] as? [String: Any], "\(info)")
        }
        let before = try #require(try counters()["rss_bytes"] as? Int)
        let set = library.vireo("balloon", "squeeze", "16M")
        #expect(set.status == 0, "\(set.stderr)")
        #expect(library.waitFor(20) { library.consoleLog("squeeze").contains("balloon: inflated 4096 pages") })
        let after = try counters()
        let rss = try #require(after["rss_bytes"] as? Int)
        #expect(before - rss >= 12 << 20, "RSS \(before >> 20) MiB -> \(rss >> 20) MiB after inflating 16 MiB")
        let balloon = try #require(after["balloon"] as? [String: Any])
        #expect(balloon["actual_bytes"] as? Int == 16 << 20 && balloon["inflated_pages"] as? Int == 4096, "\(balloon)")
        #expect(library.vireo("info", "squeeze").stdout.contains("Balloon:          16 MiB of 16 MiB target; guest reports"),
                "\(library.vireo("info", "squeeze").stdout)")
        let tooBig = library.vireo("balloon", "squeeze", "1G")
        #expect(tooBig.status == 2)
        #expect(tooBig.stderr.contains("SIZE: 1024 MiB is more than VM 'squeeze' has (128 MiB)"), "\(tooBig.stderr)")
        #expect(library.vireo("balloon", "squeeze", "0").status == 0)
        #expect(library.waitFor(20) { library.state("squeeze") == "stopped" })
        #expect(library.consoleLog("squeeze").contains("balloon: deflated to 0 pages"))
        #expect(library.consoleLog("squeeze").contains("balloon: done"))
        let stopped = library.vireo("balloon", "squeeze", "8M")
        #expect(stopped.stderr.contains("cannot set the balloon of VM 'squeeze': it is stopped"), "\(stopped.stderr)")
    }

    @Test("vireo stop against a guest that ignores the power button times out naming the VM and --force; the VM keeps running; vireo reset restarts it in place")
    func ignoredPowerButton() throws {
        let library = try TestLibrary()
        try library.createProbe("deaf", command: "probe=ticker spin=5000000 ignore-button=1")
        #expect(library.vireo("start", "deaf").status == 0)
        #expect(library.waitFor(20) { library.ticks("deaf") >= 2 })
        let refused = library.vireo("stop", "deaf", "--timeout", "3")
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("VM 'deaf': did not shut down within 3 s (the guest did not act on the ACPI power button) and is still running; `vireo stop deaf --force` powers it off"),
                "\(refused.stderr)")
        #expect(library.consoleLog("deaf").contains("ticker: power button, ignored"))
        #expect(library.state("deaf") == "shutting-down", "asked to shut down, still running")
        // The reset button works where the power button is ignored: the machine restarts in place.
        let reset = library.vireo("reset", "deaf")
        #expect(reset.status == 0 && reset.stdout.contains("VM 'deaf' reset"), "\(reset.stderr)")
        #expect(library.waitFor(20) { library.consoleLog("deaf").components(separatedBy: "probe: mode=pvh").count - 1 == 2 },
                "\(library.consoleLog("deaf").suffix(300))")
        #expect(library.state("deaf") == "running")
        #expect(library.vireo("info", "deaf").stdout.contains("Boots:            2 (1 reboot in place)"), "\(library.vireo("info", "deaf").stdout)")
        #expect(library.vireo("stop", "deaf", "--force").status == 0)
        #expect(library.state("deaf") == "stopped")
    }

    @Test("a guest that triple-faults leaves its VM crashed, with the reason; a guest's own power-off (S5) leaves it stopped; a crashed VM starts again")
    func crashedIsNotStopped() throws {
        let library = try TestLibrary()
        try library.createProbe("fragile", command: "probe=triple")
        #expect(library.vireo("start", "fragile").status == 0)
        #expect(library.waitFor(30) { library.state("fragile") == "crashed" }, "\(library.state("fragile") ?? "?")")
        let info = library.vireo("info", "fragile").stdout
        #expect(info.contains("crashed: vCPU 0 shut down (triple fault, KVM_EXIT_SHUTDOWN)"), "\(info)")
        let stop = library.vireo("stop", "fragile")
        #expect(stop.status == 0 && stop.stdout.contains("VM 'fragile' is already crashed"), "\(stop.stdout) \(stop.stderr)")
        // Crashed is not running: it can be changed and started again.
        #expect(library.vireo("set", "fragile", "--cmdline", "console=ttyS0 probe=hello").status == 0)
        #expect(library.vireo("start", "fragile").status == 0)
        #expect(library.waitFor(30) { library.state("fragile") == "stopped" })
        #expect(library.consoleLog("fragile").contains("hello from the probe"))
    }

    @Test("a library VM reboots in place by default (boots counted, the same process, RAM cleared, APs back); --on-reboot exit stops it instead; clones get a new generation ID")
    func rebootInPlaceAndGenerationID() throws {
        let library = try TestLibrary()
        try library.createProbe("phoenix", variant: "linux64", command: "probe=reboot", extra: ["--no-disk", "--cpus", "2"])
        #expect(library.vireo("start", "phoenix").status == 0)
        func boots() -> Int {
            let info = library.vireo("info", "phoenix", "--json").stdout
            let object = try? JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any]
            return (object?["process"] as? [String: Any])?["boots"] as? Int ?? 0
        }
        let pid = (try? JSONSerialization.jsonObject(with: Data(library.vireo("info", "phoenix", "--json").stdout.utf8)) as? [String: Any])
            .flatMap { ($0["process"] as? [String: Any])?["pid"] as? Int }
        #expect(library.waitFor(30) { boots() >= 4 }, "\(library.consoleLog("phoenix").suffix(500))")
        let info = library.vireo("info", "phoenix", "--json").stdout
        let samePID = (try? JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any])
            .flatMap { ($0["process"] as? [String: Any])?["pid"] as? Int }
        #expect(pid != nil && pid == samePID, "rebooting must not start a new process")
        #expect(library.state("phoenix") == "running")
        let console = library.consoleLog("phoenix")
        #expect(console.components(separatedBy: "reboot: RAM clear").count - 1 >= 3)
        #expect(!console.contains("marker survived"))
        #expect(console.components(separatedBy: "smp: online=2 of 2").count - 1 >= 3)
        #expect(library.vireo("info", "phoenix").stdout.contains("reboots in place)"))
        #expect(library.vireo("stop", "phoenix", "--force").status == 0)

        // --on-reboot exit: the first reset ends the VM, cleanly.
        let set = library.vireo("set", "phoenix", "--on-reboot", "exit")
        #expect(set.status == 0, "\(set.stderr)")
        #expect(library.vireo("start", "phoenix").status == 0)
        #expect(library.waitFor(30) { library.state("phoenix") == "stopped" })
        let vmmLog = (try? String(contentsOf: library.root.appendingPathComponent("phoenix/vmm.log"), encoding: .utf8)) ?? ""
        #expect(vmmLog.hasSuffix("guest requested a reset; the VM has stopped\nvireo: exit status 0\n"), "\(vmmLog.suffix(400))")
        #expect(library.consoleLog("phoenix").components(separatedBy: "reboot: RAM clear").count - 1 == 1)

        let badPolicy = library.vireo("set", "phoenix", "--on-reboot", "sometimes")
        #expect(badPolicy.status == 2 && badPolicy.stderr.contains("--on-reboot: 'sometimes' is not one of restart, exit"), "\(badPolicy.stderr)")
        let badACPI = library.vireo("set", "phoenix", "--acpi", "maybe")
        #expect(badACPI.status == 2 && badACPI.stderr.contains("--acpi: 'maybe' is not one of on, off"), "\(badACPI.stderr)")

        // A clone is a new machine to its guest: a new generation ID, which the guest sees.
        #expect(library.vireo("clone", "phoenix", "chick").status == 0)
        func generationID(_ name: String) -> String? {
            let info = library.vireo("info", name, "--json").stdout
            return (try? JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any])?["generation_id"] as? String
        }
        let parent = try #require(generationID("phoenix"))
        let child = try #require(generationID("chick"))
        #expect(parent.count == 32 && child.count == 32 && parent != child)
        #expect(library.vireo("set", "chick", "--cmdline", "console=ttyS0 probe=info").status == 0)
        #expect(library.vireo("start", "chick").status == 0)
        #expect(library.waitFor(30) { library.state("chick") == "stopped" })
        #expect(library.consoleLog("chick").contains("acpi: vmgenid=\(child)"), "\(library.consoleLog("chick"))")
    }

    @Test("restart brings a VM back; logs --follow streams until the VM stops; start --console attaches")
    func restartFollowAndStartConsole() throws {
        let library = try TestLibrary()
        try library.createTicker("loop")
        #expect(library.vireo("start", "loop").status == 0)
        #expect(library.waitFor(20) { library.ticks("loop") >= 2 })
        let restarted = library.vireo("restart", "loop", "--force")
        #expect(restarted.status == 0, "\(restarted.stderr)")
        #expect(restarted.stdout.contains("powered off") && restarted.stdout.contains("Started VM 'loop'"), "\(restarted.stdout)")
        #expect(library.state("loop") == "running")
        #expect(FileManager.default.fileExists(atPath: library.root.appendingPathComponent("loop/console.log.1").path))

        let follow = library.start(["logs", "loop", "--follow"])
        #expect(library.waitFor(20) { follow.stdout.contains("tick 3") }, "\(follow.stdout.suffix(200))")
        #expect(library.vireo("stop", "loop", "--force").status == 0)
        #expect(follow.wait(timeout: 20) == 0, "logs --follow did not end with the VM")

        // start --console: starts, then streams the console until the VM stops.
        let attached = library.start(["start", "loop", "--console"])
        #expect(attached.waitForOutput("tick 1", timeout: 20), "\(attached.stdout.suffix(200)) \(attached.stderr)")
        #expect(library.vireo("stop", "loop", "--force").status == 0)
        #expect(attached.wait(timeout: 20) == 0, "\(attached.stderr)")
    }
}
