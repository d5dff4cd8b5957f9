import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The manager as its users meet it: schemathesis against the OpenAPI document, a real browser
/// driving the web UI, and load from wrk. Each tool is required: missing, the test fails.
@Suite(.serialized)
struct WebManagerTests {
    static func tool(_ path: String, _ hint: String) throws -> String {
        guard FileManager.default.isExecutableFile(atPath: path) else { throw HarnessError("\(path) is missing: \(hint)") }
        return path
    }

    static var schemathesis: String {
        get throws {
            try tool(FileManager.default.homeDirectoryForCurrentUser.path + "/.cache/vireo/venv/bin/schemathesis",
                     "scripts/setup.sh installs schemathesis from PyPI into ~/.cache/vireo/venv")
        }
    }

    @Test("schemathesis, generating requests from the OpenAPI document, finds no server error and no response outside the schema")
    func schemathesisFindsNothing() throws {
        let tool = try Self.schemathesis
        let library = try TestLibrary()
        // The server runs in a network namespace of its own: whatever generated VMs and cards
        // do when started stays there.
        let namespace = "vireo-st-\(getpid())"
        Harness.run(["ip", "netns", "del", namespace])
        let added = Harness.run(["ip", "netns", "add", namespace])
        #expect(added.status == 0, "\(added.stderr)")
        defer { Harness.run(["ip", "netns", "del", namespace]) }
        Harness.run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        try FileManager.default.createDirectory(at: library.root, withIntermediateDirectories: true)
        let server = RunningProcess(["ip", "netns", "exec", namespace, Harness.vireo, "serve", "--listen", "127.0.0.1:0", "--allow-path", FileManager.default.temporaryDirectory.path],
                                    environment: ["VIREO_HOME": library.root.path])
        defer { server.signal(SIGKILL); _ = server.wait(timeout: 10) }
        #expect(server.waitForOutput("/#token=", timeout: 30), "\(server.stderr)")
        let line = try #require(server.stdout.components(separatedBy: "\n").first { $0.hasPrefix("Vireo manager: ") })
        let base = try #require(line.components(separatedBy: " ").last?.components(separatedBy: "/#token=").first)
        let token = try #require(line.components(separatedBy: "#token=").last)
        // A probe VM for the operations on a VM to reach; generated ones are made by POST /api/vms.
        #expect(library.vireo("create", "st-vm", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk").status == 0)
        let report = try Harness.temporaryDirectory().appendingPathComponent("schemathesis.xml").path
        let result = Harness.run(["ip", "netns", "exec", namespace, tool, "run", base + "/api/openapi.json",
                                  "-H", "Authorization: Bearer \(token)",
                                  "--max-examples", "4", "--seed", "20261130", "--request-timeout", "60",
                                  // Image builds fetch from a mirror, network creation starts dnsmasq; the event
                                  // stream never ends; creating and growing disks and exporting images write
                                  // files at the paths they are given, which generated paths must not be on
                                  // this host. Those are tested with real data by their own tests.
                                  "--exclude-operation-id", "getEvents", "--exclude-operation-id", "postImages",
                                  "--exclude-operation-id", "postNetworks", "--exclude-operation-id", "postDisks",
                                  "--exclude-operation-id", "postDisksResize", "--exclude-operation-id", "postImagesImageExport",
                                  "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
                                  "--report", "junit", "--report-junit-path", report],
                                 timeout: 600, environment: ["VIREO_HOME": library.root.path, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"])
        #expect(result.status == 0, "schemathesis: \(result.stdout.suffix(6000)) \(result.stderr.suffix(2000))")
        let summary = result.stdout.components(separatedBy: "\n").filter { $0.contains("generated") || $0.contains("passed") }
        print("schemathesis: \(summary.joined(separator: " | "))")
        #expect(result.stdout.contains("Tested:") && !result.stdout.contains("Tested: 0"), "\(result.stdout.suffix(3000))")
        // The server survived it all.
        #expect(Harness.run(["ip", "netns", "exec", namespace, "curl", "-sf", "-H", "Authorization: Bearer \(token)", base + "/api/host"]).status == 0)
    }

    @Test("the manager in headless Chromium: the New wizard, start, serial output in xterm.js, pause, resume, charts, stop, a shared folder added (with its mount point) and removed on the Guest tab, a storage pool and a volume made and the pool deleted, delete; the wizard.s TPM choice; a qemu VM.s screen in noVNC")
    func managerInBrowser() throws {
        let python = try Self.tool("/usr/bin/python3", "install python3")
        _ = try Self.tool("/usr/bin/chromedriver", "scripts/setup.sh installs chromium and chromium-driver")
        let library = try TestLibrary()
        // The installer ISO the wizard's unattended step names lives in the test cache.
        // A directory the Guest tab shares, inside a path the server allows.
        let shareDirectory = try Harness.temporaryDirectory().appendingPathComponent("web-share")
        try FileManager.default.createDirectory(at: shareDirectory, withIntermediateDirectories: true)
        let served = try Served(library, extra: ["--allow-path", QEMUEngineTests.cacheDirectory.path, "--allow-path", shareDirectory.path])
        // A qemu-engine VM under TCG whose CD boots a four-byte loop (cli; hlt; jmp back) that
        // leaves SeaBIOS's text on the screen.
        let media = try Harness.temporaryDirectory()
        let root = media.appendingPathComponent("cd")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        try Data([0xfa, 0xf4, 0xeb, 0xfd] + [UInt8](repeating: 0, count: 2044)).write(to: root.appendingPathComponent("loop.bin"))
        let iso = media.appendingPathComponent("loop.iso").path
        let madeISO = Harness.run(["genisoimage", "-quiet", "-V", "LOOP", "-b", "loop.bin", "-no-emul-boot", "-boot-load-size", "4",
                                   "-o", iso, root.path])
        #expect(madeISO.status == 0, "\(madeISO.stderr)")
        let gfx = try served.api.request("POST", "/api/vms", json: ["name": "gfx", "engine": "qemu", "firmware": "bios", "accelerator": "tcg", "iso": iso,
                                                                    "os_type": "other", "without_disk": true, "nics": [] as [String], "memory_bytes": 128 << 20])
        #expect(gfx.status == 201, "\(gfx.text)")
        let started = try served.api.request("POST", "/api/vms/gfx/start", json: [:] as [String: Any])
        #expect(started.status == 200, "\(started.text)")
        let artifacts = ProcessInfo.processInfo.environment["VIREO_TEST_ARTIFACTS"].map { $0 + "/web-ui" }
            ?? Harness.packageRoot.appendingPathComponent(".build/test-artifacts/web-ui").path
        try? FileManager.default.removeItem(atPath: artifacts)
        let result = Harness.run([python, Harness.packageRoot.appendingPathComponent("Tests/web/manager_ui.py").path,
                                  served.url, try Harness.probe("pvh"), artifacts, "gfx", try QEMUEngineTests.installerISO.get().path,
                                  shareDirectory.path], timeout: 400)
        print("manager UI screenshots: \(artifacts)")
        #expect(result.status == 0, "\(result.stdout.suffix(3000)) \(result.stderr.suffix(3000))")
        #expect(result.stdout.contains("every step passed"))
        let shots = (try? FileManager.default.contentsOfDirectory(atPath: artifacts)) ?? []
        for step in ["wizard", "console", "paused", "charts", "share-added", "share-removed", "deleted", "display", "wizard-unattended"] {
            #expect(shots.contains { $0.hasSuffix("-\(step).png") }, "no screenshot of \(step): \(shots)")
        }
        #expect(library.state("ui-vm") == nil, "the VM the browser deleted is still listed")
        // The wizard's unattended install: the answers reached the library, the password as its hash only.
        let install = try served.api.request("GET", "/api/vms/ui-install")
        let unattended = (install.object["definition"] as? [String: Any])?["unattended"] as? [String: Any]
        let settings = unattended?["settings"] as? [String: Any]
        #expect(settings?["user"] as? String == "alice" && settings?["locale"] as? String == "de_DE" && settings?["packages"] as? [String] == ["curl", "htop"],
                "\(install.text.prefix(3000))")
        #expect((settings?["password_hash"] as? String)?.hasPrefix("$y$") == true && !install.text.contains("typed in the browser"))
        // The qemu VM's screen and keyboard through the API too.
        let screen = try served.api.request("GET", "/api/vms/gfx/screenshot")
        #expect(screen.status == 200 && screen.headers["content-type"] == "image/png" && Array(screen.body.prefix(4)) == [0x89, 0x50, 0x4e, 0x47], "\(screen.status) \(screen.text.prefix(300))")
        let keys = try served.api.request("POST", "/api/vms/gfx/send-keys", json: ["keys": ["v", "i", "r", "e", "o", "ret"]])
        #expect(keys.status == 200 && keys.object["chords"] as? Int == 6, "\(keys.text)")
        // The CD comes out of the running VM's drive, and the definition forgets it.
        let ejected = try served.api.request("POST", "/api/vms/gfx/eject")
        #expect(ejected.status == 200 && ejected.object["outcome"] as? String == "ejected-running", "\(ejected.text)")
        #expect((try served.api.request("GET", "/api/vms/gfx").object["definition"] as? [String: Any])?["iso"] == nil)
        #expect(try served.api.request("POST", "/api/vms/gfx/eject").object["outcome"] as? String == "was-empty")
        #expect(library.vireo("stop", "gfx", "--force").status == 0)
        // The QEMU (and swtpm) the server started and nobody waited for are reaped once they end,
        // not kept as zombies for the server's whole life.
        let server = served.process.processIdentifier
        let reaped = library.waitFor(15) {
            !Harness.run(["ps", "--ppid", String(server), "-o", "stat=,comm="]).stdout.split(separator: "\n").contains { $0.hasPrefix("Z") }
        }
        #expect(reaped, "zombies under vireo serve: \(Harness.run(["ps", "--ppid", String(server), "-o", "pid=,stat=,comm="]).stdout)")
    }

    @Test("wrk on loopback: list and show with 100 VMs in the library, every answer a success")
    func loadWith100VMs() throws {
        let wrk = try Self.tool("/usr/bin/wrk", "scripts/setup.sh installs Debian's wrk")
        let library = try TestLibrary()
        let served = try Served(library)
        for index in 0..<100 {
            let reply = try served.api.request("POST", "/api/vms", json: ["name": String(format: "load-%03d", index), "without_disk": true,
                                                                          "nics": [] as [String], "memory_bytes": 64 << 20])
            #expect(reply.status == 201, "\(reply.text)")
        }
        #expect(try served.api.request("GET", "/api/vms").array.count == 100)
        for path in ["/api/vms", "/api/vms/load-050"] {
            let result = Harness.run([wrk, "-t2", "-c8", "-d3s", "--latency", "-H", "Authorization: Bearer \(served.token)",
                                      "http://127.0.0.1:\(served.port)\(path)"], timeout: 60)
            #expect(result.status == 0, "\(result.stderr)")
            print("wrk \(path): " + result.stdout.components(separatedBy: "\n").filter { $0.contains("99%") || $0.contains("50%") || $0.contains("Requests/sec") }
                .map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: ", "))
            #expect(!result.stdout.contains("Non-2xx"), "\(result.stdout)")
            #expect(!result.stdout.contains("Socket errors"), "\(result.stdout)")
            let requests = result.stdout.components(separatedBy: "\n").first { $0.contains("requests in") }
                .flatMap { Int($0.trimmingCharacters(in: .whitespaces).split(separator: " ").first ?? "") } ?? 0
            #expect(requests > 10, "\(result.stdout)")
        }
    }
}
