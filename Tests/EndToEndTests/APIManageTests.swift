import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The API for what the CLI does beside a VM's life cycle, each with valid data and against a
/// real peer where there is one: networks (their bridges in the lab's namespace), live port
/// forwards (a guest's echo service reached through them), `vireo set`'s resource and memory
/// options (a memfd-backed guest really runs on a memfd), disk images (qemu-img agrees) and
/// image export (qemu-img compares the bytes).
@Suite(.serialized)
struct APIManageTests {
    @Test("the API does what the CLI does beside the life cycle: network autostart, start and stop; live port forwards; resource and memory options; disks created, inspected, grown and refused while in use; an image built, another imported and exported byte-exact",
          .timeLimit(.minutes(10)))
    func apiManages() throws {
        let lab = try NetworkLab()
        let socket = lab.library.root.path + "/api.sock"
        try FileManager.default.createDirectory(at: lab.library.root, withIntermediateDirectories: true)
        let server = RunningProcess(["ip", "netns", "exec", lab.host, Harness.vireo, "serve", "--listen", "none", "--socket", socket, "--allow-path", FileManager.default.temporaryDirectory.path,
                                     "--allow-path", FileManager.default.homeDirectoryForCurrentUser.path + "/.cache/vireo"],
                                    environment: ["VIREO_HOME": lab.library.root.path])
        defer { server.signal(SIGKILL); _ = server.wait(timeout: 10) }
        #expect(server.waitForOutput("API on unix:", timeout: 30), "\(server.stdout) \(server.stderr)")
        let api = APIClient(address: .unix(path: socket), token: nil)
        func problem(_ reply: APIClient.Reply, _ status: Int, field: String? = nil, _ comment: Comment? = nil) {
            #expect(reply.status == status, "\(reply.text)")
            #expect(reply.headers["content-type"] == "application/problem+json", "\(reply.headers)")
            if let field { #expect(reply.object["field"] as? String == field, "\(reply.text)") }
        }
        func links() -> String { lab.inHost(["ip", "-br", "link"]).stdout }

        // A network: defined, kept up by autostart, let go, started and stopped by hand.
        let made = try api.request("POST", "/api/networks", json: ["name": "lan", "mode": "host-only", "subnet": "10.44.0.0/24"])
        #expect(made.status == 201, "\(made.text)")
        #expect(!links().contains("vireo-lan"))
        let kept = try api.request("PATCH", "/api/networks/lan", json: ["autostart": true])
        #expect(kept.status == 200 && kept.object["up"] as? Bool == true, "\(kept.text)")
        #expect((kept.object["network"] as? [String: Any])?["autostart"] as? Bool == true, "\(kept.text)")
        #expect(links().contains("vireo-lan"), "\(links())")
        let letGo = try api.request("PATCH", "/api/networks/lan", json: ["autostart": false])
        #expect(letGo.status == 200 && letGo.object["up"] as? Bool == false, "\(letGo.text)")
        #expect(!links().contains("vireo-lan"), "an idle network without autostart stays up: \(links())")
        problem(try api.request("PATCH", "/api/networks/nowhere", json: ["autostart": true]), 404)
        problem(try api.request("PATCH", "/api/networks/lan", json: ["autostart": "yes"]), 422, field: "autostart")
        problem(try api.request("PATCH", "/api/networks/lan", json: ["mode": "nat"]), 422, field: "mode")
        #expect(try api.request("POST", "/api/networks/lan/start").object["up"] as? Bool == true)
        #expect(links().contains("vireo-lan"))
        #expect(try api.request("POST", "/api/networks/lan/stop").object["up"] as? Bool == false)
        let lan = try api.request("GET", "/api/networks/lan")
        #expect(lan.status == 200 && (lan.object["network"] as? [String: Any])?["subnet"] as? String == "10.44.0.0/24", "\(lan.text)")
        #expect(try api.request("GET", "/api/networks").array.compactMap { ($0["network"] as? [String: Any])?["name"] as? String }.contains("lan"))
        #expect(try api.request("DELETE", "/api/networks/lan").status == 200)

        // Port forwards added and removed while the guest's echo service runs.
        let probe = try Harness.probe("pvh")
        let created = try api.request("POST", "/api/vms", json: ["name": "web", "kernel": probe, "memory_bytes": 64 << 20, "without_disk": true,
                                                                   "nics": ["nat"], "command_line": "console=ttyS0 probe=ip serve=9000"])
        #expect(created.status == 201, "\(created.text)")
        #expect(try api.request("POST", "/api/vms/web/start").status == 200)
        #expect(lab.console("web", contains: "ip: serving tcp and udp port 9000"), "\(lab.library.consoleLog("web"))")
        let added = try api.request("POST", "/api/vms/web/forwards", json: ["forward": "tcp:8090:9000"])
        #expect(added.status == 201 && added.array.map { $0["forward"] as? String } == ["tcp:8090:9000"], "\(added.text)")
        #expect(added.array.first?["nic"] as? Int == 0 && added.array.first?["host_port"] as? Int == 8090)
        #expect(lab.exchange("tcp", from: lab.host, to: "127.0.0.1", port: 8090) == "echo:hello")
        #expect(lab.exchange("tcp", from: lab.internet, to: NetworkLab.hostAddress, port: 8090) == "echo:hello")
        #expect(try api.request("GET", "/api/vms/web/forwards").array.count == 1)
        problem(try api.request("POST", "/api/vms/web/forwards", json: ["forward": "tcp:8090:9000"]), 422, field: "forward")
        problem(try api.request("POST", "/api/vms/web/forwards", json: ["forward": "tcp:8091"]), 422, field: "forward")
        problem(try api.request("POST", "/api/vms/web/forwards", json: ["forward": "tcp:8091:9000", "nic": 7]), 422, field: "nic")
        problem(try api.request("POST", "/api/vms/nobody/forwards", json: ["forward": "tcp:8091:9000"]), 404)
        #expect(try api.request("DELETE", "/api/vms/web/forwards/tcp:8090:9000").array.isEmpty)
        #expect(lab.exchange("tcp", from: lab.host, to: "127.0.0.1", port: 8090) == "error: ConnectionRefusedError")
        problem(try api.request("DELETE", "/api/vms/web/forwards/tcp:8090:9000"), 404)
        problem(try api.request("DELETE", "/api/vms/web/forwards/sctp:1:2"), 422, field: "forward")

        // Reset, restart, save and start again: the guest's service is back each time, and after
        // the restore a new forward reaches it through the VM's new tap.
        // (A start begins a new console log; a reset goes on in the same one.)
        func servings() -> Int { lab.library.consoleLog("web").components(separatedBy: "ip: serving tcp and udp port 9000").count - 1 }
        let before = servings()
        #expect(try api.request("POST", "/api/vms/web/reset").status == 200)
        #expect(lab.library.waitFor(30) { servings() > before }, "the reset guest did not come back: \(lab.library.consoleLog("web").suffix(1500))")
        let restarted1 = try api.request("POST", "/api/vms/web/restart", json: ["force": true])
        #expect(restarted1.status == 200 && (restarted1.object["pid"] as? Int ?? 0) > 0, "\(restarted1.text)")
        #expect(lab.library.waitFor(30) { servings() == 1 }, "\(lab.library.consoleLog("web").suffix(1500))")
        let save = try api.request("POST", "/api/vms/web/save")
        #expect(save.status == 202, "\(save.text)")
        #expect(try waitForTask(api, save.headers["location"] ?? "")["state"] as? String == "succeeded")
        #expect((try api.request("GET", "/api/vms/web").object["summary"] as? [String: Any])?["state"] as? String == "saved")
        #expect(try api.request("POST", "/api/vms/web/start").status == 200)
        #expect(try api.request("POST", "/api/vms/web/forwards", json: ["forward": "tcp:8091:9000"]).status == 201)
        #expect(lab.exchange("tcp", from: lab.host, to: "127.0.0.1", port: 8091) == "echo:hello", "the restored guest does not answer")
        #expect(try api.request("DELETE", "/api/vms/web/forwards/tcp:8091:9000").status == 200)

        // `vireo set`'s resource and memory options: checked field by field; the backing waits
        // for a stop; a memfd-backed guest then really runs on a memfd. (Pins are unset before
        // it starts again, and so are the I/O limits: `ip netns exec` mounts a /sys without the cgroup
        // file systems they need.)
        problem(try api.request("PATCH", "/api/vms/web", json: ["memory_backing": "hugepages=3M"]), 422, field: "memory_backing")
        problem(try api.request("PATCH", "/api/vms/web", json: ["vcpu_pins": "cpu0=1"]), 422, field: "vcpu_pins")
        problem(try api.request("PATCH", "/api/vms/web", json: ["emulator_cpus": "one"]), 422, field: "emulator_cpus")
        problem(try api.request("PATCH", "/api/vms/web", json: ["io_limits": ["read_iops": 0]]), 422, field: "io_limits.read_iops")
        problem(try api.request("PATCH", "/api/vms/web", json: ["io_limits": ["reads": 5]]), 422, field: "io_limits.reads")
        problem(try api.request("PATCH", "/api/vms/web", json: ["memory_backing": "memfd"]), 409)
        let pinned = try api.request("PATCH", "/api/vms/web", json: ["vcpu_pins": "vcpu0=0", "emulator_cpus": "0"])
        #expect(pinned.status == 200, "\(pinned.text)")
        let resources = (pinned.object["resources"] as? [String: Any]) ?? [:]
        #expect((resources["vcpu_pins"] as? [[String: Any]])?.first?["cpus"] as? [Int] == [0] && resources["emulator_cpus"] as? [Int] == [0], "\(pinned.text)")
        #expect(try api.request("POST", "/api/vms/web/stop", json: ["force": true]).status == 200)
        let backed = try api.request("PATCH", "/api/vms/web", json: ["memory_backing": "memfd", "preallocate": true, "vcpu_pins": NSNull(), "emulator_cpus": NSNull(),
                                                                     "io_limits": ["read_bytes_per_second": 10 << 20, "write_iops": 100]])
        #expect(backed.status == 200, "\(backed.text)")
        let backing = (backed.object["memory_backing"] as? [String: Any]) ?? [:]
        #expect(backing["file"] as? String == "memfd" && backing["preallocate"] as? Bool == true, "\(backed.text)")
        let limits = ((backed.object["resources"] as? [String: Any])?["io_limits"] as? [String: Any]) ?? [:]
        #expect(limits["read_bytes_per_second"] as? Int == 10 << 20 && limits["write_operations_per_second"] as? Int == 100, "\(backed.text)")
        #expect((backed.object["resources"] as? [String: Any])?["vcpu_pins"] == nil, "null unpins: \(backed.text)")
        let unlimited = try api.request("PATCH", "/api/vms/web", json: ["io_limits": NSNull()])
        #expect(unlimited.status == 200 && (unlimited.object["resources"] as? [String: Any])?["io_limits"] == nil, "\(unlimited.text)")
        let restarted = try api.request("POST", "/api/vms/web/start")
        let pid = try #require(restarted.object["pid"] as? Int, "\(restarted.text)")
        let maps = (try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)) ?? ""
        #expect(maps.contains("/memfd:"), "the guest's RAM is not on a memfd: \(maps.prefix(2000))")
        #expect(try api.request("POST", "/api/vms/web/stop", json: ["force": true]).status == 200)
        #expect(try api.request("PATCH", "/api/vms/web", json: ["memory_backing": "anon", "preallocate": false]).status == 200)

        // Disk images on their own, as `vireo disk`: qemu-img agrees with every answer.
        let disks = lab.library.root.path + "/loose-disks"
        try FileManager.default.createDirectory(atPath: disks, withIntermediateDirectories: true)
        let base = disks + "/base.qcow2", overlay = disks + "/overlay.qcow2"
        let made1 = try api.request("POST", "/api/disks", json: ["path": base, "size_bytes": 1 << 30])
        #expect(made1.status == 201 && made1.object["format"] as? String == "qcow2" && made1.object["virtual_size"] as? Int == 1 << 30, "\(made1.text)")
        #expect(Harness.run(["qemu-img", "info", base]).stdout.contains("virtual size: 1 GiB"))
        problem(try api.request("POST", "/api/disks", json: ["path": base, "size_bytes": 1 << 30]), 409, field: "path")
        problem(try api.request("POST", "/api/disks", json: ["path": "relative.qcow2", "size_bytes": 1 << 30]), 422, field: "path")
        problem(try api.request("POST", "/api/disks", json: ["path": disks + "/x.qcow2"]), 422, field: "size_bytes")
        problem(try api.request("POST", "/api/disks", json: ["path": disks + "/x.qcow2", "size_bytes": 1 << 20, "format": "vdi"]), 422, field: "format")
        problem(try api.request("POST", "/api/disks", json: ["path": disks + "/x.raw", "format": "raw", "backing": base]), 422, field: "backing")
        problem(try api.request("POST", "/api/disks", json: ["path": disks + "/x.qcow2", "size_bytes": 1 << 20, "preallocate": true]), 422, field: "preallocate")
        problem(try api.request("POST", "/api/disks", json: ["path": disks + "/x.raw", "format": "raw", "size_bytes": 9_000_000_000_000_000_000 as UInt64]), 422, field: "size_bytes")
        #expect(!FileManager.default.fileExists(atPath: disks + "/x.qcow2") && !FileManager.default.fileExists(atPath: disks + "/x.raw"))
        let layered = try api.request("POST", "/api/disks", json: ["path": overlay, "backing": base])
        #expect(layered.status == 201 && layered.object["backing_chain"] as? [String] == [base] && layered.object["virtual_size"] as? Int == 1 << 30, "\(layered.text)")
        let raw = try api.request("POST", "/api/disks", json: ["path": disks + "/full.raw", "format": "raw", "size_bytes": 4 << 20, "preallocate": true])
        #expect(raw.status == 201 && raw.object["allocated_bytes"] as? Int == 4 << 20, "\(raw.text)")
        let info = try api.request("GET", "/api/disks/info?path=\(overlay)")
        #expect(info.status == 200 && info.object["backing_chain"] as? [String] == [base], "\(info.text)")
        problem(try api.request("GET", "/api/disks/info?path=\(disks)/missing.qcow2"), 422, field: "path")
        problem(try api.request("GET", "/api/disks/info"), 422, field: "path")
        let grown = try api.request("POST", "/api/disks/resize", json: ["path": base, "size_bytes": 2 << 30])
        #expect(grown.status == 200 && grown.object["virtual_size"] as? Int == 2 << 30, "\(grown.text)")
        #expect(Harness.run(["qemu-img", "info", base]).stdout.contains("virtual size: 2 GiB"))
        #expect(Harness.run(["qemu-img", "check", base]).status == 0)
        problem(try api.request("POST", "/api/disks/resize", json: ["path": base, "size_bytes": 1 << 30]), 422, field: "size_bytes")
        // In use by a running VM: refused, the image untouched.
        #expect(try api.request("POST", "/api/vms/web/disks", json: ["path": overlay]).status == 201)
        #expect(try api.request("POST", "/api/vms/web/start").status == 200)
        problem(try api.request("POST", "/api/disks/resize", json: ["path": overlay, "size_bytes": 4 << 30]), 409, field: "path")
        #expect(try api.request("POST", "/api/vms/web/stop", json: ["force": true]).status == 200)
        #expect(Harness.run(["qemu-img", "info", "-U", overlay]).stdout.contains("virtual size: 1 GiB"))
        #expect(try api.request("DELETE", "/api/vms/web/disks?path=\(overlay)").status == 200)

        // An image built as the CLI builds it (from the suite's kept build of the same recipe: no
        // mirror here), then one imported from that build's archive and exported: the same disk,
        // byte for byte.
        problem(try api.request("POST", "/api/images", json: ["distribution": "debian-12", "cache_dir": "cache"]), 422, field: "cache_dir")
        let build = try api.request("POST", "/api/images", json: ["distribution": "debian-12", "name": "built", "cache_dir": DebianImage.cacheDirectory])
        #expect(build.status == 202, "\(build.text)")
        let built = try waitForTask(api, build.headers["location"] ?? "")
        #expect(built["state"] as? String == "succeeded" && (built["result"] as? [String: Any])?["image"] as? String == "built", "\(built)")
        let archive = try #require(try FileManager.default.contentsOfDirectory(atPath: DebianImage.cacheDirectory)
            .filter { $0.hasPrefix("debian-12-") && $0.hasSuffix(".tar") }.sorted().last.map { DebianImage.cacheDirectory + "/" + $0 },
            "no kept debian-12 build in \(DebianImage.cacheDirectory) (scripts/test.sh builds it)")
        let imported = try api.request("POST", "/api/images/import", json: ["path": archive, "name": "deb"])
        #expect(imported.status == 202, "\(imported.text)")
        #expect(try waitForTask(api, imported.headers["location"] ?? "")["state"] as? String == "succeeded")
        let exported = disks + "/deb.qcow2"
        let export = try api.request("POST", "/api/images/deb/export", json: ["path": exported])
        #expect(export.status == 202, "\(export.text)")
        let exportTask = try waitForTask(api, export.headers["location"] ?? "")
        #expect(exportTask["state"] as? String == "succeeded", "\(exportTask)")
        let compared = Harness.run(["qemu-img", "compare", exported, lab.library.root.path + "/images/deb/disk.qcow2"], timeout: 300)
        #expect(compared.status == 0 && compared.stdout.contains("Images are identical"), "\(compared.stdout) \(compared.stderr)")
        problem(try api.request("POST", "/api/images/deb/export", json: ["path": exported]), 422, field: "path")
        problem(try api.request("POST", "/api/images/deb/export", json: ["path": "deb.qcow2"]), 422, field: "path")
        problem(try api.request("POST", "/api/images/nothing/export", json: ["path": disks + "/n.qcow2"]), 404)
        #expect(try api.request("GET", "/api/tasks").array.contains { $0["kind"] as? String == "image-export" && $0["state"] as? String == "succeeded" })
        #expect(try api.request("GET", "/api/images").array.compactMap { ($0["manifest"] as? [String: Any])?["name"] as? String }.sorted() == ["built", "deb"])
        let image = try api.request("GET", "/api/images/deb")
        #expect(image.status == 200 && (image.object["disk_bytes"] as? Int ?? 0) > 0 && image.object["used_by"] as? [String] == [], "\(image.text)")
        #expect(try api.request("DELETE", "/api/images/deb").status == 200)
        problem(try api.request("GET", "/api/images/deb"), 404)
        #expect(!FileManager.default.fileExists(atPath: lab.library.root.path + "/images/deb"))
        #expect(try api.request("DELETE", "/api/vms/web").status == 200)
    }

    func waitForTask(_ api: APIClient, _ location: String, seconds: TimeInterval = 600) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            let task = try api.request("GET", location).object
            if task["state"] as? String != "running" { return task }
            Thread.sleep(forTimeInterval: 0.2)
        }
        throw HarnessError("task \(location) still running after \(Int(seconds)) s")
    }
}
