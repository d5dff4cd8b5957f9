import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `vireo serve` on a test library: TCP on a port the kernel picks, and a Unix socket.
final class Served: @unchecked Sendable {
    let library: TestLibrary
    let process: RunningProcess
    let port: UInt16
    let token: String
    var socketPath: String { library.root.path + "/api.sock" }

    init(_ library: TestLibrary, extra: [String] = []) throws {
        self.library = library
        try FileManager.default.createDirectory(at: library.root, withIntermediateDirectories: true)
        process = RunningProcess([Harness.vireo, "serve", "--listen", "127.0.0.1:0", "--socket", library.root.path + "/api.sock", "--allow-path", FileManager.default.temporaryDirectory.path] + extra,
                                 environment: ["VIREO_HOME": library.root.path])
        guard process.waitForOutput("/#token=", timeout: 30), process.waitForOutput("API on unix:", timeout: 10) else {
            throw HarnessError("vireo serve did not start: \(process.stdout) \(process.stderr)")
        }
        let line = try #require(process.stdout.components(separatedBy: "\n").first { $0.hasPrefix("Vireo manager: ") })
        let address = try #require(line.split(separator: " ").last)
        let afterPort = try #require(address.split(separator: ":").dropFirst(2).first)
        port = try #require(UInt16(afterPort.prefix { $0.isNumber }))
        token = try #require(address.components(separatedBy: "#token=").last)
    }

    deinit { kill() }

    /// SIGKILL: the server gets no chance to tidy up, as in a crash.
    func kill() { process.signal(SIGKILL); _ = process.wait(timeout: 10) }

    var url: String { "http://127.0.0.1:\(port)/#token=\(token)" }
    var api: APIClient { APIClient(address: .tcp(port: port), token: token) }
    var anonymous: APIClient { APIClient(address: .tcp(port: port), token: nil) }
    var unix: APIClient { APIClient(address: .unix(path: socketPath), token: nil) }
}

@Suite(.serialized)
struct APIServerTests {
    @Test("the API against real VMs: auth, every VM verb, bad input changes nothing, a second client and the CLI agree, events, console, the server's death leaves VMs running")
    func apiWithRealVMs() throws {
        let library = try TestLibrary()
        let server = try Served(library)
        let api = server.api

        // Security: TCP needs the token; the Unix socket is 0600 and needs none.
        let refused = try server.anonymous.request("GET", "/api/vms")
        #expect(refused.status == 401 && refused.headers["content-type"] == "application/problem+json", "\(refused.status) \(refused.text)")
        #expect(refused.headers["www-authenticate"]?.hasPrefix("Bearer") == true)
        #expect(try APIClient(address: .tcp(port: server.port), token: String(repeating: "0", count: 64)).request("GET", "/api/host").status == 401)
        #expect(try server.unix.request("GET", "/api/vms").status == 200)
        let socketMode = try FileManager.default.attributesOfItem(atPath: server.socketPath)[.posixPermissions] as? Int
        #expect(socketMode == 0o600)
        let tokenMode = try FileManager.default.attributesOfItem(atPath: library.root.path + "/api-token")[.posixPermissions] as? Int
        #expect(tokenMode == 0o600)
        // The page and its libraries need no token (they hold no data); the API does.
        #expect(try server.anonymous.request("GET", "/").status == 200)
        #expect(try server.anonymous.request("GET", "/static/xterm.js").text.contains("window.Terminal"))
        // The page names its own files by the binary's version, so browsers keep them; every
        // static answer has a validator, and a current copy costs a 304.
        let page = try server.anonymous.request("GET", "/").text
        let version = try #require(page.range(of: "/app.js?v=").map { String(page[$0.upperBound...].prefix { $0.isHexDigit }) })
        let script = try server.anonymous.request("GET", "/app.js?v=\(version)")
        #expect(script.headers["cache-control"]?.contains("immutable") == true, "\(script.headers)")
        let etag = try #require(script.headers["etag"])
        #expect(try server.anonymous.request("GET", "/app.js?v=\(version)", headers: ["If-None-Match": etag]).status == 304)
        #expect(try server.anonymous.request("GET", "/app.js?v=old").headers["cache-control"] == "no-cache")
        let chart = try server.anonymous.request("GET", "/static/chart.js")
        #expect(try server.anonymous.request("GET", "/static/chart.js", headers: ["If-None-Match": chart.headers["etag"] ?? "none"]).status == 304)
        let host = try api.request("GET", "/api/host")
        #expect(host.status == 200 && host.object["kvm_usable"] as? Bool == true, "\(host.text)")
        #expect(try api.request("GET", "/api/openapi.json").object["openapi"] as? String == "3.1.0")

        // Create through the API; the CLI and a second client see it at once.
        let probe = try Harness.probe("pvh")
        let vm: [String: Any] = ["name": "api-vm", "kernel": probe, "memory_bytes": 64 << 20, "without_disk": true, "nics": [] as [String],
                                 "command_line": "console=ttyS0 probe=ticker spin=5000000"]
        let created = try api.request("POST", "/api/vms", json: vm)
        #expect(created.status == 201, "\(created.text)")
        #expect(created.headers["location"] == "/api/vms/api-vm")
        #expect(library.state("api-vm") == "stopped")
        #expect(try server.unix.request("GET", "/api/vms").array.map { $0["name"] as? String } == ["api-vm"])

        // Bad input: a clear problem naming the field, and nothing changed.
        func problem(_ reply: APIClient.Reply, _ status: Int, field: String? = nil, _ comment: Comment? = nil) {
            #expect(reply.status == status, "\(reply.text)")
            #expect(reply.headers["content-type"] == "application/problem+json", "\(reply.headers)")
            if let field { #expect(reply.object["field"] as? String == field, "\(reply.text)") }
            #expect((reply.object["detail"] as? String)?.isEmpty == false)
        }
        problem(try api.request("POST", "/api/vms", json: vm), 409, field: "name")
        problem(try api.request("POST", "/api/vms", json: ["name": "x", "cpus": 2, "colour": "red"]), 422, field: "colour")
        problem(try api.request("POST", "/api/vms", json: ["name": "x", "cpus": "two"]), 422, field: "cpus")
        problem(try api.request("POST", "/api/vms", json: ["name": "x", "memory_bytes": -1]), 422, field: "memory_bytes")
        problem(try api.request("POST", "/api/vms", json: ["name": "x", "cpus": 999]), 422, field: "cpus")
        problem(try api.request("POST", "/api/vms", json: ["name": "bad name!"]), 422, field: "name")
        problem(try api.request("POST", "/api/vms", json: ["name": "x", "nics": ["carrier-pigeon"]]), 422, field: "nics[0]")
        problem(try api.request("POST", "/api/vms", json: ["cpus": 1]), 422, field: "name")
        problem(try api.request("POST", "/api/vms", raw: Array("{\"name\":".utf8)), 400)
        problem(try api.request("POST", "/api/vms", raw: Array("[1,2]".utf8)), 400)
        problem(try api.request("POST", "/api/vms", raw: Array("name=x".utf8), contentType: "application/x-www-form-urlencoded"), 415)
        problem(try api.request("POST", "/api/vms", raw: Array("{\"name\":\"\(String(repeating: "a", count: 70_000))\"}".utf8)), 413)
        problem(try api.request("GET", "/api/vms/no-such-vm"), 404)
        problem(try api.request("GET", "/api/no-such-route"), 404)
        problem(try api.request("POST", "/api/vms/api-vm/stop", json: ["timeout_seconds": 0]), 422, field: "timeout_seconds")
        problem(try api.request("GET", "/api/vms/api-vm/console-log?tail_bytes=lots"), 422, field: "tail_bytes")
        #expect(try api.request("GET", "/api/vms").array.count == 1)
        #expect(library.vireo("list").stdout.components(separatedBy: "\n").filter { $0.hasPrefix("x ") }.isEmpty)

        // Events: state changes by the API and by the CLI reach an open stream.
        let events = try OpenStream.events(api)
        #expect(events.waitFor(10) { $0.contains("event: ready") }, "\(events.text)")

        let started = try api.request("POST", "/api/vms/api-vm/start", json: [:] as [String: Any])
        #expect(started.status == 200, "\(started.text)")
        #expect((started.object["pid"] as? Int ?? 0) > 0)
        #expect(library.waitFor(20) { library.ticks("api-vm") >= 3 })
        #expect(library.state("api-vm") == "running")
        #expect(events.waitFor(10) { $0.contains(#""name":"api-vm","previous":"stopped","state":"running""#) }, "\(events.text)")
        let listed = try api.request("GET", "/api/vms").array.first
        #expect(listed?["state"] as? String == "running")
        #expect((listed?["actions"] as? [String])?.contains("pause") == true && (listed?["actions"] as? [String])?.contains("delete") == false)

        // The state decides: a running VM cannot be deleted or take new CPUs; the problem says why and what to do.
        let deleteRunning = try api.request("DELETE", "/api/vms/api-vm")
        problem(deleteRunning, 409)
        #expect(deleteRunning.object["state"] as? String == "running" && (deleteRunning.object["hint"] as? String)?.contains("stop") == true, "\(deleteRunning.text)")
        problem(try api.request("PATCH", "/api/vms/api-vm", json: ["cpus": 2]), 409)
        let capped = try api.request("PATCH", "/api/vms/api-vm", json: ["cpu_cap_percent": 50])
        #expect(capped.status == 200, "\(capped.text)")
        #expect(try api.request("PATCH", "/api/vms/api-vm", json: ["cpu_cap_percent": NSNull()]).status == 200)

        // Pause and resume; pausing twice is refused with the state.
        #expect(try api.request("POST", "/api/vms/api-vm/pause", json: [:] as [String: Any]).object["state"] as? String == "paused")
        let again = try api.request("POST", "/api/vms/api-vm/pause", json: [:] as [String: Any])
        problem(again, 409)
        #expect(again.object["state"] as? String == "paused", "\(again.text)")
        #expect(library.state("api-vm") == "paused")
        #expect(try api.request("POST", "/api/vms/api-vm/resume").object["state"] as? String == "running")

        // The balloon takes a target while running; stats show the VM's memory.
        let ballooned = try api.request("POST", "/api/vms/api-vm/balloon", json: ["target_bytes": 16 << 20])
        #expect(ballooned.status == 200, "\(ballooned.text)")
        problem(try api.request("POST", "/api/vms/api-vm/balloon", json: ["target_bytes": "lots"]), 422, field: "target_bytes")
        // A kvm-engine VM has no screen or keyboard: refused as such, naming the engine.
        let noScreen = try api.request("GET", "/api/vms/api-vm/screenshot")
        problem(noScreen, 409)
        #expect((noScreen.object["detail"] as? String)?.contains("kvm engine") == true, "\(noScreen.text)")
        problem(try api.request("POST", "/api/vms/api-vm/send-keys", json: ["keys": ["no-such-key-at-all"]]), 422, field: "keys[0]")

        // Counters for the charts; the console log's end.
        let stats = try api.request("GET", "/api/vms/api-vm/stats")
        #expect((stats.object["cpu_seconds"] as? Double ?? 0) > 0 && (stats.object["rss_bytes"] as? Int ?? 0) > 0, "\(stats.text)")
        #expect(try api.request("GET", "/api/vms/api-vm/console-log?tail_bytes=200").text.contains("tick"))

        // The serial console over a WebSocket: the token as a subprotocol, output as it comes.
        let console = try OpenStream.webSocket(api, path: "/api/vms/api-vm/console", protocols: ["vireo.console", "vireo.token.\(server.token)"])
        #expect(console.waitFor(10) { _ in console.upgraded }, "\(console.text.prefix(300))")
        // The guest's lines arrive as it prints them: three of them prove the stream flows.
        #expect(console.waitFor(30) { _ in console.payloads.components(separatedBy: "tick ").count > 3 }, "\(console.payloads.suffix(200))")
        let noToken = try OpenStream.webSocket(api, path: "/api/vms/api-vm/console", protocols: ["vireo.console"])
        #expect(noToken.waitFor(10) { !$0.isEmpty }); #expect(!noToken.upgraded, "\(noToken.text.prefix(200))")

        // A live snapshot with memory.
        let snapshot = try api.request("POST", "/api/vms/api-vm/snapshots", json: ["name": "first", "description": "from the API"])
        #expect(snapshot.status == 201, "\(snapshot.text)")
        #expect((snapshot.object["snapshot"] as? [String: Any])?["has_memory"] as? Bool == true)
        #expect((try api.request("GET", "/api/vms/api-vm/snapshots").object["snapshots"] as? [Any])?.count == 1)

        // The server is not in the data path: killed, the VM runs on; a new server sees it.
        server.kill()
        let ticksAtKill = library.ticks("api-vm")
        #expect(library.waitFor(20) { library.ticks("api-vm") >= ticksAtKill + 3 }, "the VM stopped with the server: \(library.vmmLog("api-vm").suffix(1500))")
        #expect(library.state("api-vm") == "running")
        let second = try Served(library)
        #expect(second.token == server.token, "the token changed across servers")
        #expect(try second.api.request("GET", "/api/vms/api-vm").object["summary"].flatMap { ($0 as? [String: Any])?["state"] as? String } == "running")

        // The CLI stops it; the new server's stream sees that change too.
        let secondEvents = try OpenStream.events(second.api)
        #expect(secondEvents.waitFor(10) { $0.contains("event: ready") })
        #expect(library.vireo("stop", "api-vm", "--force").status == 0)
        #expect(secondEvents.waitFor(10) { $0.contains(#""name":"api-vm","previous":"running","state":"stopped""#) }, "\(secondEvents.text)")

        // Long work is a task: a clone, polled to its end.
        let clone = try second.api.request("POST", "/api/vms/api-vm/clone", json: ["name": "api-clone"])
        #expect(clone.status == 202, "\(clone.text)")
        let task = try #require(clone.headers["location"])
        var finished: [String: Any] = [:]
        #expect(library.waitFor(60) {
            finished = (try? second.api.request("GET", task).object) ?? [:]
            return finished["state"] as? String != "running"
        })
        #expect(finished["state"] as? String == "succeeded" && (finished["result"] as? [String: String])?["vm"] == "api-clone", "\(finished)")
        #expect(library.state("api-clone") == "stopped")
        #expect(secondEvents.waitFor(10) { $0.contains("event: task") && $0.contains(#""state":"succeeded""#) })
        problem(try second.api.request("POST", "/api/vms/api-vm/clone", json: ["name": "api-clone"]), 409, field: "name")

        // Rename, restore the snapshot, delete; each refusal and success as the CLI would see it.
        #expect(try second.api.request("POST", "/api/vms/api-clone/rename", json: ["name": "api-renamed"]).status == 200)
        #expect(library.state("api-renamed") == "stopped" && library.state("api-clone") == nil)
        let snapshotID = try #require((snapshot.object["snapshot"] as? [String: Any])?["id"] as? String)
        let restored = try second.api.request("POST", "/api/vms/api-vm/snapshots/\(snapshotID)/restore", json: [:] as [String: Any])
        #expect(restored.status == 200, "\(restored.text)")
        #expect(library.state("api-vm") == "saved", "a snapshot with memory restores as saved")
        let dropped = try second.api.request("DELETE", "/api/vms/api-vm/snapshots/\(snapshotID)")
        #expect(dropped.status == 200, "\(dropped.text)")
        #expect((try second.api.request("GET", "/api/vms/api-vm/snapshots").object["snapshots"] as? [Any])?.isEmpty == true)
        problem(try second.api.request("DELETE", "/api/vms/api-vm/snapshots/\(snapshotID)"), 404)
        // Cards: a card given again without a MAC keeps the one it had, as `vireo set --nic` does.
        let carded = try second.api.request("PATCH", "/api/vms/api-renamed", json: ["nics": ["nat"]])
        let mac = ((carded.object["networks"] as? [[String: Any]])?.first?["mac"] as? String) ?? ""
        #expect(carded.status == 200 && mac.count == 17, "\(carded.text)")
        let forwarded = try second.api.request("PATCH", "/api/vms/api-renamed", json: ["nics": ["nat"], "forwards": ["tcp:18080:80"]])
        let card = (forwarded.object["networks"] as? [[String: Any]])?.first
        #expect(card?["mac"] as? String == mac && (card?["forwards"] as? [Any])?.count == 1, "\(forwarded.text)")
        let deleted = try second.api.request("DELETE", "/api/vms/api-renamed")
        #expect(deleted.status == 200, "\(deleted.text)")
        problem(try second.api.request("GET", "/api/vms/api-renamed"), 404)
        let deletedSaved = try second.api.request("DELETE", "/api/vms/api-vm")
        #expect(deletedSaved.status == 200, "\(deletedSaved.text)")
        #expect(try second.api.request("GET", "/api/vms").array.isEmpty)
    }

    @Test("a migration through the API is a task with progress; the destination server's receive task takes it (one cancelled while waiting frees its port); the destination library runs the VM")
    func apiMigration() throws {
        func problem(_ reply: APIClient.Reply, field: String) {
            #expect(reply.status == 422 && reply.object["field"] as? String == field, "\(reply.text)")
        }
        let source = try TestLibrary()
        let destination = try TestLibrary()
        let served = try Served(source)
        let created = try served.api.request("POST", "/api/vms", json: ["name": "mover", "kernel": try Harness.probe("pvh"), "memory_bytes": 64 << 20,
                                                                        "without_disk": true, "nics": [] as [String],
                                                                        "command_line": "console=ttyS0 probe=ticker spin=5000000"])
        #expect(created.status == 201, "\(created.text)")
        #expect(try served.api.request("POST", "/api/vms/mover/start").status == 200)
        #expect(source.waitFor(20) { source.ticks("mover") >= 2 })
        // Refused before any task: a stopped VM, a malformed destination.
        let badDestination = try served.api.request("POST", "/api/vms/mover/migrate", json: ["destination": "somewhere", "token": "x"])
        #expect(badDestination.status == 422 && badDestination.object["field"] as? String == "destination", "\(badDestination.text)")

        // A "receiver" that takes the connection and says nothing for 3 s, then hangs up: the
        // task runs meanwhile, so a stop is refused as busy, naming the task; then the migration
        // fails and the VM runs on here.
        let silent = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(silent, $0, length) } }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(silent, $0, &length) } }
        listen(silent, 1)
        let hangUp = Thread {
            let connection = accept(silent, nil, nil)
            Thread.sleep(forTimeInterval: 3)
            close(connection)
            close(silent)
        }
        hangUp.start()
        let doomed = try served.api.request("POST", "/api/vms/mover/migrate",
                                            json: ["destination": "tcp:127.0.0.1:\(UInt16(bigEndian: address.sin_port))", "token": "nobody-checks"])
        #expect(doomed.status == 202, "\(doomed.text)")
        let busy = try served.api.request("POST", "/api/vms/mover/stop", json: ["force": true])
        #expect(busy.status == 409 && busy.object["state"] as? String == "busy" && (busy.object["detail"] as? String)?.contains("migrate task") == true, "\(busy.text)")
        let doomedTask = try #require(doomed.headers["location"])
        var failed: [String: Any] = [:]
        #expect(source.waitFor(30) {
            failed = (try? served.api.request("GET", doomedTask).object) ?? [:]
            return failed["state"] as? String != "running"
        })
        #expect(failed["state"] as? String == "failed" && failed["error"] != nil, "\(failed)")
        #expect(source.state("mover") == "running", "a failed migration left the VM \(source.state("mover") ?? "gone")")

        // The destination is another server's library: its receive is a task with the address
        // and token to give the source. One cancelled while it waits frees its port.
        let arrivals = try Served(destination)
        let waiting = try arrivals.api.request("POST", "/api/migrations/receive", json: ["listen": "127.0.0.1:0"])
        #expect(waiting.status == 202 && waiting.object["token"] is String, "\(waiting.text)")
        let waitingTask = try #require(waiting.headers["location"])
        let waitingPort = try #require((waiting.object["address"] as? String)?.split(separator: ":").last.map(String.init))
        #expect(try arrivals.api.request("DELETE", waitingTask).status == 202)
        var abandoned: [String: Any] = [:]
        #expect(destination.waitFor(10) {
            abandoned = (try? arrivals.api.request("GET", waitingTask).object) ?? [:]
            return abandoned["state"] as? String != "running"
        })
        #expect(abandoned["state"] as? String == "failed" && ((abandoned["error"] as? [String: Any])?["detail"] as? String)?.contains("cancelled") == true, "\(abandoned)")
        #expect(Harness.run(["ss", "-Hltn", "sport = :\(waitingPort)"]).stdout.isEmpty, "the cancelled receive still listens on \(waitingPort)")
        problem(try arrivals.api.request("POST", "/api/migrations/receive", json: ["listen": "127.0.0.1:99999"]), field: "listen")
        problem(try arrivals.api.request("POST", "/api/migrations/receive", json: ["name": "../x"]), field: "name")
        // The source library's directory is the storage both share; the receiver names it.
        let receiving = try arrivals.api.request("POST", "/api/migrations/receive", json: ["listen": "127.0.0.1:0", "allow_disks": [source.root.path]])
        #expect(receiving.status == 202, "\(receiving.text)")
        let endpoint = try #require(receiving.object["address"] as? String)
        let token = try #require(receiving.object["token"] as? String)

        let started = try served.api.request("POST", "/api/vms/mover/migrate", json: ["destination": endpoint, "token": token, "max_downtime_ms": 100])
        #expect(started.status == 202 && started.object["cancellable"] as? Bool == true, "\(started.text)")
        let location = try #require(started.headers["location"])
        var task: [String: Any] = [:]
        #expect(source.waitFor(60) {
            task = (try? served.api.request("GET", location).object) ?? [:]
            return task["state"] as? String != "running"
        })
        #expect(task["state"] as? String == "succeeded", "\(task)")
        #expect((task["progress"] as? Double) == 1)
        let arrived = try #require(receiving.headers["location"])
        var received: [String: Any] = [:]
        #expect(destination.waitFor(30) {
            received = (try? arrivals.api.request("GET", arrived).object) ?? [:]
            return received["state"] as? String != "running"
        })
        #expect(received["state"] as? String == "succeeded" && (received["result"] as? [String: Any])?["vm"] as? String == "mover", "\(received)")
        #expect(destination.waitFor(20) { destination.state("mover") == "running" }, "\(destination.vireo("list").stdout)")
        #expect((try arrivals.api.request("GET", "/api/vms/mover").object["summary"] as? [String: Any])?["state"] as? String == "running")
        let ticks = destination.ticks("mover")
        #expect(destination.waitFor(20) { destination.ticks("mover") >= ticks + 2 }, "the migrated guest does not run")
        #expect(source.state("mover") == nil, "the source still lists the VM")
        // An ended task cannot be cancelled; an unknown one is not found.
        let cancel = try served.api.request("DELETE", location)
        #expect(cancel.status == 409 && cancel.object["state"] as? String == "succeeded", "\(cancel.text)")
        #expect(try served.api.request("DELETE", "/api/tasks/no-such-task").status == 404)
        #expect(destination.vireo("stop", "mover", "--force").status == 0)
    }

    @Test("HTTPS with --tls-cert/--tls-key: the API answers over TLS only, still asks for the token, and the TLS side dies with the server")
    func apiOverTLS() throws {
        let library = try TestLibrary()
        let directory = try Harness.temporaryDirectory()
        let certificate = directory.appendingPathComponent("cert.pem").path, key = directory.appendingPathComponent("key.pem").path
        let made = Harness.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", certificate, "-days", "2",
                                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
        #expect(made.status == 0, "\(made.stderr)")
        try FileManager.default.createDirectory(at: library.root, withIntermediateDirectories: true)
        // Wrong files are refused before anything listens, naming the option.
        let wrong = library.vireo("serve", "--listen", "127.0.0.1:0", "--tls-cert", key, "--tls-key", key)
        #expect(wrong.status == 2 && wrong.stderr.contains("--tls-cert"), "\(wrong.stderr)")
        let half = library.vireo("serve", "--listen", "127.0.0.1:0", "--tls-key", key)
        #expect(half.status == 2 && half.stderr.contains("--tls-cert: required"), "\(half.stderr)")

        let server = RunningProcess([Harness.vireo, "serve", "--listen", "127.0.0.1:0", "--tls-cert", certificate, "--tls-key", key, "--allow-path", FileManager.default.temporaryDirectory.path],
                                    environment: ["VIREO_HOME": library.root.path])
        defer { server.signal(SIGKILL); _ = server.wait(timeout: 10) }
        #expect(server.waitForOutput("/#token=", timeout: 30), "\(server.stderr)")
        let line = try #require(server.stdout.components(separatedBy: "\n").first { $0.hasPrefix("Vireo manager: https://") }, "\(server.stdout)")
        let url = try #require(line.split(separator: " ").last.map(String.init))
        let base = try #require(url.components(separatedBy: "/#token=").first)
        let token = try #require(url.components(separatedBy: "#token=").last)
        let answered = Harness.run(["curl", "-sS", "--cacert", certificate, "-H", "Authorization: Bearer \(token)", "-w", "\n%{http_code}", base + "/api/host"])
        #expect(answered.stdout.hasSuffix("\n200") && answered.stdout.contains("kvm_usable"), "\(answered.stdout) \(answered.stderr)")
        let anonymous = Harness.run(["curl", "-sS", "--cacert", certificate, "-o", "/dev/null", "-w", "%{http_code}", base + "/api/vms"])
        #expect(anonymous.stdout == "401", "\(anonymous.stdout) \(anonymous.stderr)")
        let plain = Harness.run(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", base.replacingOccurrences(of: "https://", with: "http://") + "/api/vms"])
        #expect(plain.status != 0 && plain.stdout != "200", "plain HTTP was answered on the TLS port: \(plain.stdout)")
        // The page over HTTPS too (its console then uses wss://).
        #expect(Harness.run(["curl", "-sSf", "--cacert", certificate, base + "/"]).stdout.contains("Vireo Manager"))

        let tunnel = library.root.path + "/.serve-\(server.processIdentifier)/stunnel.conf"
        #expect(Harness.run(["pgrep", "-f", tunnel]).status == 0, "no stunnel runs for \(tunnel)")
        server.signal(SIGKILL)
        _ = server.wait(timeout: 10)
        #expect(library.waitFor(10) { Harness.run(["pgrep", "-f", tunnel]).status != 0 }, "stunnel outlived the server")
        #expect(Harness.run(["curl", "-sS", "-m", "2", "--cacert", certificate, "-o", "/dev/null", base + "/"]).status != 0)
    }
}
