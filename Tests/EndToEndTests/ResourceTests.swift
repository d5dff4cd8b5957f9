import Foundation
import Testing

/// Resource limits through control groups (docs/resources.md), proven with probes spinning at
/// ring 3 (native speed here) and the kernel's own accounting of the VM's group.
@Suite(.serialized)
struct ResourceTests {
    /// The VM's group directories, from its bundle's `cgroups` record.
    static func groups(_ library: TestLibrary, _ name: String) -> [String: String] {
        let text = (try? String(contentsOf: library.root.appendingPathComponent(name).appendingPathComponent("cgroups"), encoding: .utf8)) ?? ""
        var groups: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1)
            if parts.count == 2 { groups[String(parts[0])] = String(parts[1]) }
        }
        return groups
    }

    /// CPU time the VM's group used, in nanoseconds (v1's cpuacct, or v2's cpu.stat).
    static func cpuNanoseconds(_ groups: [String: String]) -> UInt64? {
        if let directory = groups["unified"] {
            let stat = (try? String(contentsOfFile: directory + "/cpu.stat", encoding: .utf8)) ?? ""
            return stat.split(separator: "\n").first { $0.hasPrefix("usage_usec ") }.flatMap { UInt64($0.dropFirst(11)) }.map { $0 * 1000 }
        }
        guard let directory = groups["cpuacct"] else { return nil }
        return UInt64(((try? String(contentsOfFile: directory + "/cpuacct.usage", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Share of one CPU the VM used over `seconds`.
    static func share(_ groups: [String: String], seconds: Double = 3) -> Double {
        let before = cpuNanoseconds(groups) ?? 0
        let start = Date()
        Thread.sleep(forTimeInterval: seconds)
        let after = cpuNanoseconds(groups) ?? 0
        return Double(after - before) / (Date().timeIntervalSince(start) * 1e9)
    }

    @Test("--cpu-cap: a probe spinning at ring 3 gets about half a CPU at 50%, a quarter once `vireo set` changes the running VM to 25%, and a whole CPU with the cap removed; `vireo info` shows the limit and the VM's control groups")
    func cpuCap() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "spin", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk",
                                    "--cmdline", "console=ttyS0 probe=dirty spin=2000000", "--cpu-cap", "50%")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(library.vireo("start", "spin").status == 0)
        #expect(library.waitFor(20) { SavedStateTests.rounds(library.consoleLog("spin")).count >= 5 })
        let groups = Self.groups(library, "spin")
        #expect(groups["cpuacct"] != nil || groups["unified"] != nil, "\(groups)")
        // The VMM's own pid is in its group.
        let info = library.vireo("info", "spin", "--json").stdout
        let process = (try? JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any])?["process"] as? [String: Any]
        let pid = try #require(process?["pid"] as? Int, "\(info)")
        let procs = (try? String(contentsOfFile: (groups["cpu"] ?? groups["unified"] ?? "") + "/cgroup.procs", encoding: .utf8)) ?? ""
        #expect(procs.split(separator: "\n").contains(Substring(String(pid))), "\(procs)")

        let half = Self.share(groups)
        #expect(half > 0.35 && half < 0.6, "at 50%: \(half)")
        let changed = library.vireo("set", "spin", "--cpu-cap", "25%")
        #expect(changed.status == 0, "\(changed.stderr)")
        let quarter = Self.share(groups)
        #expect(quarter > 0.15 && quarter < 0.32, "at 25%: \(quarter)")
        let shown = library.vireo("info", "spin").stdout
        #expect(shown.contains("CPU cap 25%") && shown.contains("Control groups:"), "\(shown)")
        #expect(library.vireo("set", "spin", "--cpu-cap", "none").status == 0)
        let whole = Self.share(groups)
        #expect(whole > 0.75, "uncapped: \(whole)")
        // Anything but a limit still needs the VM stopped.
        let refused = library.vireo("set", "spin", "--cpus", "2", "--cpu-cap", "50%")
        #expect(refused.status == 2 && refused.stderr.contains("running"), "\(refused.stderr)")
        #expect(library.vireo("stop", "spin", "--force").status == 0)
    }

    @Test("--memory-limit: a guest touching more than its VM's limit gets the VMM killed by the kernel, the VM shows \"crashed: out of memory\" and the host goes on; without the limit it runs")
    func memoryLimit() throws {
        let library = try TestLibrary()
        // probe=balloon dirties 16 MiB at once; 12 MiB holds the VMM but not that.
        let created = library.vireo("create", "hog", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk",
                                    "--cmdline", "console=ttyS0 probe=balloon", "--memory-limit", "12M")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(library.vireo("start", "hog").status == 0)
        #expect(library.waitFor(20) { library.state("hog") == "crashed" }, "\(library.vireo("list").stdout)")
        let info = library.vireo("info", "hog").stdout
        #expect(info.contains("crashed: out of memory: the VM's engine reached its memory limit (12 MiB)"), "\(info)")
        #expect(library.vireo("set", "hog", "--memory-limit", "none").status == 0)
        #expect(library.vireo("start", "hog").status == 0)
        #expect(library.waitFor(20) { library.consoleLog("hog").contains("balloon: ready") }, "\(library.consoleLog("hog").suffix(300))")
        Thread.sleep(forTimeInterval: 1)
        #expect(library.state("hog") == "running", "\(library.vireo("info", "hog").stdout)")
        #expect(library.vireo("stop", "hog", "--force").status == 0)
        #expect(library.vireo("delete", "hog").status == 0)
    }

    @Test("bad resource limits are refused naming the flag and what is allowed, and create nothing")
    func badLimits() throws {
        let library = try TestLibrary()
        let probe = try Harness.probe("pvh")
        let cases: [([String], String)] = [
            (["--cpu-cap", "0%"], "--cpu-cap: 0% is not from 1%"),
            (["--cpu-cap", "half"], "--cpu-cap: 'half' is not a percentage"),
            (["--cpu-weight", "0"], "--cpu-weight: 0 is not from 1 to 10000"),
            (["--memory-limit", "1M"], "--memory-limit: 1 MiB is too little"),
            (["--pids-limit", "5"], "--pids-limit: 5 is not from 16"),
        ]
        for (flags, message) in cases {
            let result = library.vireo(arguments: ["create", "bad", "--kernel", probe, "--no-disk"] + flags)
            #expect(result.status == 2 && result.stderr.contains(message), "\(flags): \(result.stderr)")
            #expect(library.state("bad") == nil)
        }
        #expect(library.vireo("create", "ok", "--kernel", probe, "--no-disk", "--pids-limit", "64", "--cpu-weight", "200").status == 0)
        let refused = library.vireo("set", "ok", "--cpu-weight", "20000")
        #expect(refused.status == 2 && refused.stderr.contains("--cpu-weight: 20000"), "\(refused.stderr)")
        let info = library.vireo("info", "ok").stdout
        #expect(info.contains("CPU weight 200") && info.contains("at most 64 processes/threads"), "\(info)")
    }

    @Test("--pin and --pin-emulator put each thread on its CPUs (changed live by `vireo set`); two VMs pinned to one CPU with --cpu-weight 100 and 300 share it about 1:3")
    func pinningAndWeight() throws {
        let library = try TestLibrary()
        let probe = try Harness.probe("pvh")
        for (name, weight) in [("light", "100"), ("heavy", "300")] {
            let created = library.vireo("create", name, "--kernel", probe, "--memory", "64M", "--no-disk", "--cmdline", "console=ttyS0 probe=dirty spin=2000000",
                                        "--pin", "vcpu0=1", "--pin-emulator", "0", "--cpu-weight", weight)
            #expect(created.status == 0, "\(created.stderr)")
            #expect(library.vireo("start", name).status == 0)
        }
        let info = library.vireo("info", "heavy", "--json").stdout
        let process = (try? JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any])?["process"] as? [String: Any]
        let pid = try #require(process?["pid"] as? Int, "\(info)")
        func affinities() -> [String: String] {
            var result: [String: String] = [:]
            for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? [] {
                let comm = ((try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
                let status = (try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/status", encoding: .utf8)) ?? ""
                result[comm] = status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }.map { $0.split(separator: "\t").last.map(String.init) ?? "" }
            }
            return result
        }
        let pinned = affinities()
        #expect(pinned["vcpu0"] == "1" && pinned["control"] == "0" && pinned["vireo-vmm"] == "0", "\(pinned)")
        // Both spin on CPU 1: the kernel shares it by weight.
        let light = Self.groups(library, "light"), heavy = Self.groups(library, "heavy")
        let beforeLight = Self.cpuNanoseconds(light) ?? 0, beforeHeavy = Self.cpuNanoseconds(heavy) ?? 0
        Thread.sleep(forTimeInterval: 4)
        let usedLight = Double((Self.cpuNanoseconds(light) ?? 0) - beforeLight), usedHeavy = Double((Self.cpuNanoseconds(heavy) ?? 0) - beforeHeavy)
        let heavyShare = usedHeavy / max(usedLight + usedHeavy, 1)
        #expect(heavyShare > 0.65 && heavyShare < 0.85, "weight 300 against 100 on one CPU: \(heavyShare) of it")
        #expect(library.vireo("set", "heavy", "--pin", "none", "--pin-emulator", "none").status == 0)
        let unpinned = affinities()
        #expect(unpinned["vcpu0"] == "0-1" && unpinned["control"] == "0-1", "\(unpinned)")
        let bad = library.vireo("set", "heavy", "--pin", "vcpu1=0")
        #expect(bad.status == 2 && bad.stderr.contains("--pin: vcpu1 does not exist"), "\(bad.stderr)")
        for name in ["light", "heavy"] { #expect(library.vireo("stop", name, "--force").status == 0) }
    }
}
