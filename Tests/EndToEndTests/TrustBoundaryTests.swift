import Foundation
import MigrationWire
import Testing

/// The trust boundaries of docs/security.md, each attacked as the untrusted party would: bytes a
/// guest wrote on its own raw disk, a header a compromised VMM rewrote, an image archive from
/// elsewhere, a migration peer holding the token, an API client holding the token.
@Suite(.serialized)
struct TrustBoundaryTests {
    /// A root-owned 0600 file no VM may see, and its contents.
    static func secret(_ url: URL) throws -> (path: String, text: String) {
        let text = "TOPSECRET-\(UUID().uuidString)\n"
        try Data(text.utf8).write(to: url)
        chmod(url.path, 0o600)
        return (url.path, text)
    }

    /// The first bytes of a qcow2 image whose backing file is `backing` (format raw): what a guest
    /// can write at the start of a raw disk it owns.
    static func hostileHeader(backing: String, format: String = "raw", scratch: URL) throws -> Data {
        let path = scratch.appendingPathComponent("header-\(UUID().uuidString).qcow2").path
        let made = Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", format, "-b", backing, path, "16M"])
        guard made.status == 0 else { throw HarnessError("qemu-img create: \(made.stderr)") }
        defer { unlink(path) }
        return try Data(contentsOf: URL(fileURLWithPath: path))
    }

    /// Writes `bytes` over the start of `path`, in place, as the guest's own writes would land.
    static func guestWrites(_ bytes: Data, to path: String) throws {
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try handle.seek(toOffset: 0)
        try handle.write(contentsOf: bytes)
        try handle.close()
    }

    /// A new raw disk at `path` attached to `vm` while it is all zeros; then its guest writes a
    /// qcow2 header naming `backing` into it.
    static func attachRawDisk(_ library: TestLibrary, _ vm: String, _ path: String, header: Data) throws {
        #expect(Harness.run([Harness.vireo, "disk", "create", path, "--format", "raw", "--size", "16M"]).status == 0)
        let attached = library.vireo("disk", "attach", vm, path)
        #expect(attached.status == 0, "\(attached.stderr)")
        try guestWrites(header, to: path)
    }

    static func ownership(_ path: String) -> String {
        var info = stat()
        guard lstat(path, &info) == 0 else { return "missing" }
        return "uid=\(info.st_uid) gid=\(info.st_gid) mode=\(String(info.st_mode & 0o7777, radix: 8))"
    }

    static func mode(_ path: String) -> String {
        var info = stat()
        guard stat(path, &info) == 0 else { return "missing" }
        return String(info.st_mode & 0o7777, radix: 8)
    }

    /// Whether the jail of the VM's running engine shows `path`.
    static func jailShows(_ library: TestLibrary, _ name: String, _ path: String) throws -> Bool {
        let pid = try #require(ResourceTests.pid(library, name), "\(name) is not running")
        return FileManager.default.fileExists(atPath: "/proc/\(pid)/root" + path)
    }

    @Test("a qcow2 header a guest wrote on its raw disk is never followed: a jailed start changes no host file's owner or mode and binds none into the jail, full and linked clones hold the disk's own bytes, and delete --keep-disks moves nothing outside the VM")
    func guestHeaderOnRawDisk() throws {
        let library = try TestLibrary()
        let work = library.root.deletingLastPathComponent()
        let secret = try Self.secret(work.appendingPathComponent("secret"))
        let victimDirectory = work.appendingPathComponent("victim-dir").path
        try FileManager.default.createDirectory(atPath: victimDirectory, withIntermediateDirectories: true)
        chmod(victimDirectory, 0o700)
        let before = (Self.ownership(secret.path), Self.ownership(victimDirectory), Self.ownership(work.path))
        let probe = try Harness.probe("pvh")

        // "inside": raw disks in the VM's directory whose guest-written headers name files
        // relative to it (`../../secret` is the test's secret; `../../victim-dir` a directory);
        // "outside": a raw disk outside the library whose header names the secret absolutely.
        for name in ["inside", "outside"] {
            let created = library.vireo("create", name, "--kernel", probe, "--memory", "64M", "--no-disk", "--cmdline", "console=ttyS0 probe=ticker")
            #expect(created.status == 0, "\(created.stderr)")
        }
        let inside = library.root.appendingPathComponent("inside")
        var rawDisks: [(vm: String, path: String, header: Data)] = []
        for (file, backing) in [("data.raw", "../../secret"), ("dir.raw", "../../victim-dir")] {
            let path = inside.appendingPathComponent(file).path
            rawDisks.append(("inside", path, try Self.hostileHeader(backing: backing, scratch: work)))
        }
        let outsidePath = work.appendingPathComponent("outside.raw").path
        rawDisks.append(("outside", outsidePath, try Self.hostileHeader(backing: secret.path, scratch: work)))
        for disk in rawDisks { try Self.attachRawDisk(library, disk.vm, disk.path, header: disk.header) }
        let config = try String(contentsOf: inside.appendingPathComponent("config.json"), encoding: .utf8)
        #expect(config.contains("\"format\" : \"raw\""), "\(config)")

        for name in ["inside", "outside"] {
            let started = library.vireo("start", name)
            #expect(started.status == 0, "\(started.stderr)")
            #expect(library.waitFor(20) { library.ticks(name) >= 1 }, "\(library.vmmLog(name))")
            #expect(try !Self.jailShows(library, name, secret.path), "the guest's header bound \(secret.path) into the jail of \(name)")
            #expect(try !Self.jailShows(library, name, victimDirectory), "the guest's header bound \(victimDirectory) into the jail of \(name)")
            #expect(library.vireo("stop", name, "--force").status == 0)
        }
        #expect((Self.ownership(secret.path), Self.ownership(victimDirectory), Self.ownership(work.path)) == before,
                "a start handed host files to the VM: \(Self.ownership(secret.path)) \(Self.ownership(victimDirectory)) \(Self.ownership(work.path)); before \(before)")

        // Clones of a VM whose only disk is such a raw disk. A full clone copies it as raw: the
        // same bytes, never the file the header names.
        let cloned = library.vireo("create", "cloned", "--kernel", probe, "--memory", "64M", "--no-disk", "--cmdline", "console=ttyS0 probe=ticker")
        #expect(cloned.status == 0, "\(cloned.stderr)")
        let clonedDisk = library.root.appendingPathComponent("cloned/data.raw").path
        try Self.attachRawDisk(library, "cloned", clonedDisk, header: try Self.hostileHeader(backing: "../../secret", scratch: work))
        let full = library.vireo("clone", "cloned", "full")
        #expect(full.status == 0, "\(full.stderr)")
        let original = try Data(contentsOf: URL(fileURLWithPath: clonedDisk))
        let copy = (try? Data(contentsOf: library.root.appendingPathComponent("full/data.raw"))) ?? Data()
        // Compared outside #expect: a failed comparison of two 16 MiB values is diffed for the report.
        let same = copy == original
        #expect(same, "the full clone's data.raw is not the original's bytes (\(copy.count) vs \(original.count) bytes)")
        #expect(copy.range(of: Data(secret.text.utf8)) == nil, "the full clone holds the host's secret")

        // A linked clone freezes the raw disk as a raw base: what the clone reads through its
        // overlay is the disk's bytes.
        let linked = library.vireo("clone", "cloned", "linked", "--linked")
        #expect(linked.status == 0, "\(linked.stderr)")
        let linkedConfig = try String(contentsOf: library.root.appendingPathComponent("linked/config.json"), encoding: .utf8)
        let overlay = try #require(try FileManager.default.contentsOfDirectory(atPath: library.root.appendingPathComponent("linked").path)
            .filter { $0.hasSuffix(".qcow2") }.sorted().first, "\(linkedConfig)")
        let flattened = work.appendingPathComponent("linked-view.raw").path
        let converted = Harness.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", library.root.appendingPathComponent("linked/\(overlay)").path, flattened])
        #expect(converted.status == 0, "\(converted.stderr)")
        let view = try Data(contentsOf: URL(fileURLWithPath: flattened))
        #expect(view.range(of: Data(secret.text.utf8)) == nil, "the linked clone's disk reads the host's secret")
        #expect(library.vireo("start", "linked").status == 0)
        #expect(try !Self.jailShows(library, "linked", secret.path), "the linked clone's jail shows \(secret.path)")
        #expect(library.vireo("stop", "linked", "--force").status == 0)
        #expect((Self.ownership(secret.path), Self.ownership(victimDirectory), Self.ownership(work.path)) == before)

        // delete --keep-disks keeps the VM's disks, and moves no file the guest's header named.
        let victim = library.root.appendingPathComponent("victim").path
        try Data("not a disk\n".utf8).write(to: URL(fileURLWithPath: victim))
        let keeper = library.vireo("create", "keeper", "--kernel", probe, "--memory", "64M", "--no-disk")
        #expect(keeper.status == 0, "\(keeper.stderr)")
        let keptRaw = library.root.appendingPathComponent("keeper/keep.raw").path
        try Self.attachRawDisk(library, "keeper", keptRaw, header: try Self.hostileHeader(backing: "../victim", scratch: work))
        let deleted = library.vireo("delete", "keeper", "--keep-disks")
        #expect(deleted.status == 0, "\(deleted.stderr)")
        #expect(FileManager.default.fileExists(atPath: victim), "delete --keep-disks moved \(victim) away: \(deleted.stdout)")
        let kept = (try? FileManager.default.subpathsOfDirectory(atPath: library.root.appendingPathComponent("kept-disks").path)) ?? []
        #expect(kept.contains { $0.hasSuffix("keep.raw") } && !kept.contains { $0.hasSuffix("victim") }, "\(kept)")
    }

    @Test("a disk's format is what the definition says: a file whose name does not tell is refused at attach without --format, and a qcow2 header a VMM rewrote to name another file stops the next start, naming the disk, before root opens the file")
    func rewrittenOverlayHeader() throws {
        let library = try TestLibrary()
        let work = library.root.deletingLastPathComponent()
        let secret = try Self.secret(work.appendingPathComponent("secret"))
        let before = Self.ownership(secret.path)
        let probe = try Harness.probe("pvh")
        let created = library.vireo("create", "victim", "--kernel", probe, "--memory", "64M", "--disk", "16M", "--cmdline", "console=ttyS0 probe=ticker")
        #expect(created.status == 0, "\(created.stderr)")

        // No format given, and the name does not say: refused, naming the choices.
        let ambiguous = work.appendingPathComponent("disk.img").path
        #expect(Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", ambiguous, "16M"]).status == 0)
        let guessed = library.vireo("disk", "attach", "victim", ambiguous)
        #expect(guessed.status == 2 && guessed.stderr.contains("--format"), "\(guessed.stdout) \(guessed.stderr)")
        let declared = library.vireo("disk", "attach", "victim", ambiguous, "--format", "qcow2", "--readonly")
        #expect(declared.status == 0, "\(declared.stderr)")

        // As the VM's own uid could: the writable overlay's header now names the host's secret.
        let disk = library.root.appendingPathComponent("victim/disk0.qcow2").path
        let rebased = Harness.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", secret.path, disk])
        #expect(rebased.status == 0, "\(rebased.stderr)")
        let started = library.vireo("start", "victim")
        #expect(started.status != 0, "a rewritten header was followed: \(started.stdout)")
        #expect(started.stderr.contains("disk0.qcow2") && started.stderr.contains(secret.path) && started.stderr.contains("backing"), "\(started.stderr)")
        if started.status == 0 {
            #expect(try !Self.jailShows(library, "victim", secret.path))
            _ = library.vireo("stop", "victim", "--force")
        }
        #expect(Self.ownership(secret.path) == before)
    }

    @Test("a definition from before chains were recorded adopts its disks' chains once, at the first operation that locks the VM, and writes them down: a header the VMM rewrites afterwards stops the next start")
    func olderDefinitionAdoptsOnce() throws {
        let library = try TestLibrary()
        let work = library.root.deletingLastPathComponent()
        let secret = try Self.secret(work.appendingPathComponent("secret"))
        let created = library.vireo("create", "older", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--disk", "16M", "--cmdline", "console=ttyS0 probe=ticker")
        #expect(created.status == 0, "\(created.stderr)")
        // As a version-1 Vireo wrote it: no chains recorded.
        let config = library.root.appendingPathComponent("older/config.json")
        var object = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: config)) as? [String: Any])
        object["version"] = 1
        object["disks"] = (object["disks"] as? [[String: Any]] ?? []).map { disk in disk.filter { $0.key != "backing" } }
        try JSONSerialization.data(withJSONObject: object).write(to: config)

        #expect(library.vireo("start", "older").status == 0)
        #expect(library.vireo("stop", "older", "--force").status == 0)
        let written = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: config)) as? [String: Any])
        #expect(written["version"] as? Int == 2, "the adopted chains were not written down: \(written)")

        // The VM's own uid rewrites its overlay's header afterwards: the record stands.
        let disk = library.root.appendingPathComponent("older/disk0.qcow2").path
        #expect(Harness.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", secret.path, disk]).status == 0)
        let started = library.vireo("start", "older")
        #expect(started.status != 0, "the rewritten header was adopted: \(started.stdout)")
        #expect(started.stderr.contains("disk0.qcow2") && started.stderr.contains(secret.path), "\(started.stderr)")
        if started.status == 0 { _ = library.vireo("stop", "older", "--force") }
    }

    @Test("a saved state is decoded only once the VMM is confined: the restore follows the jail in the VMM's log")
    func stateDecodedAfterConfinement() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "saved", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk", "--cmdline", "console=ttyS0 probe=ticker")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(library.vireo("start", "saved").status == 0)
        #expect(library.waitFor(20) { library.ticks("saved") >= 1 })
        #expect(library.vireo("save", "saved").status == 0)
        let logStart = library.vmmLog("saved").count
        #expect(library.vireo("start", "saved").status == 0)
        #expect(library.waitFor(20) { library.vmmLog("saved").contains("restored from") })
        let log = String(library.vmmLog("saved").dropFirst(logStart))
        let confined = try #require(log.range(of: "isolation: uid="), "\(log)")
        let restored = try #require(log.range(of: "restored from"), "\(log)")
        #expect(confined.lowerBound < restored.lowerBound, "the state was decoded before the jail closed: \(log)")
        _ = library.vireo("stop", "saved", "--force")
    }

    @Test("an image archive whose qcow2 names a backing file or an external data file is refused, naming it, and nothing is installed")
    func imageArchiveWithBackingFile() throws {
        let library = try TestLibrary()
        let work = library.root.deletingLastPathComponent()
        let secret = try Self.secret(work.appendingPathComponent("secret"))
        let scratchData = work.appendingPathComponent("data-file").path
        for (name, options) in [("backed", ["-F", "raw", "-b", secret.path]), ("external", ["-o", "data_file=\(scratchData)"])] {
            let staging = work.appendingPathComponent("archive-\(name)")
            try FileManager.default.createDirectory(at: staging, withIntermediateDirectories: true)
            let disk = staging.appendingPathComponent("disk.qcow2").path
            let made = Harness.run(["qemu-img", "create", "-q", "-f", "qcow2"] + options + [disk, "16M"])
            #expect(made.status == 0, "\(made.stderr)")
            let size = (try FileManager.default.attributesOfItem(atPath: disk)[.size] as? NSNumber)?.intValue ?? 0
            let digest = Harness.run(["sha256sum", disk]).stdout.split(separator: " ").first.map(String.init) ?? ""
            let manifest: [String: Any] = [
                "version": 1, "name": name, "description": "hostile", "origin": "import", "osType": "linux-64",
                "createdAt": 0, "disk": "disk.qcow2", "virtualSize": 16 << 20, "cloudInit": false, "packages": [] as [Any],
                "files": [["path": "disk.qcow2", "size": size, "sha256": digest]],
            ]
            try JSONSerialization.data(withJSONObject: manifest).write(to: staging.appendingPathComponent("manifest.json"))
            let archive = work.appendingPathComponent("\(name).tar").path
            #expect(Harness.run(["tar", "-cf", archive, "-C", staging.path, "manifest.json", "disk.qcow2"]).status == 0)
            let imported = library.vireo("image", "import", archive)
            #expect(imported.status == 2, "\(name): \(imported.stdout) \(imported.stderr)")
            let named = name == "backed" ? secret.path : scratchData
            #expect(imported.stderr.contains(named) && imported.stderr.contains(name == "backed" ? "backing file" : "external data file"),
                    "\(name): \(imported.stderr)")
        }
        #expect(library.vireo("image", "list").stdout.contains("backed") == false)
        let images = (try? FileManager.default.contentsOfDirectory(atPath: library.root.appendingPathComponent("images").path)) ?? []
        #expect(images.filter { !$0.hasPrefix(".") }.isEmpty, "\(images)")
    }

    /// A hostile migration source: the right token, then an offer made from a real VM's
    /// definition with `change` applied to it. Prints what the receiver answered.
    static let hostileSource = """
        import json, select, socket, struct, sys, time, zlib
        port, token, config, disks, change = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
        version = int(sys.argv[6])
        def frame(kind, payload):
            return struct.pack("<IIQ", kind, zlib.crc32(payload), len(payload)) + payload
        def read_frame(s):
            head = b""
            while len(head) < 16:
                more = s.recv(16 - len(head))
                if not more: return None, b""
                head += more
            kind, crc, length = struct.unpack("<IIQ", head)
            body = b""
            while len(body) < length: body += s.recv(length - len(body))
            return kind, body
        definition = json.load(open(config))
        for key, value in change.items():
            if key == "memoryBacking": definition["memoryBacking"].update(value)
            elif key == "resources": definition["resources"].update(value)
            else: definition[key] = value
        kernel = open(config.rsplit("/", 1)[0] + "/kernel", "rb").read()
        offer = {"definition": definition, "copyDisks": disks == [], "disks": disks,
                 "files": [{"role": "kernel", "name": "kernel", "size": len(kernel)}], "sourceHost": "hostile"}
        if disks:
            definition["disks"] = [{"path": d["path"], "format": d["format"], "readOnly": False} for d in disks]
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(frame(1, b"VIREOMIG" + struct.pack("<I", version) + token.encode()))
        kind, body = read_frame(s)
        assert kind == 2, (kind, body)
        s.sendall(frame(4, json.dumps(offer).encode()))
        # A refusal of the offer comes at once; otherwise the kernel follows, then the answer.
        readable, _, _ = select.select([s], [], [], 3)
        if not readable:
            for start in range(0, len(kernel), 1 << 20):
                s.sendall(frame(5, b"\\0" + kernel[start:start + (1 << 20)]))
            s.sendall(frame(5, b"\\0"))
        kind, body = read_frame(s)
        print("answer", kind, body.decode(errors="replace").replace("\\n", " "), flush=True)
        if kind == 6:
            # The VM is defined and its VMM waits for the stream: hold the connection while the
            # test looks at that VMM, then go away.
            sys.stdin.readline()
        s.close()
        """

    @Test("a migration offer is held to the receiver's policy: a file memory backing, a shared disk outside the library and --allow-disks or in another VM of the library, a shared NBD disk whose TLS certificates lie outside them, a host tap or bridge or network namespace, a real-time priority without --allow-rt, a shared host directory are refused with the reason and nothing is created; an acceptable one is decoded by a VMM that is already confined")
    func migrationOfferPolicy() throws {
        let library = try TestLibrary()
        let work = library.root.deletingLastPathComponent()
        // A real definition to start from, in a scratch library.
        let scratch = try TestLibrary()
        let made = scratch.vireo("create", "model", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--no-disk", "--cmdline", "console=ttyS0 probe=ticker")
        #expect(made.status == 0, "\(made.stderr)")
        let config = scratch.root.appendingPathComponent("model/config.json").path
        let outside = work.appendingPathComponent("outside.raw").path
        #expect(Harness.run(["qemu-img", "create", "-q", "-f", "raw", outside, "16M"]).status == 0)
        let planted = work.appendingPathComponent("planted-ram").path
        let outsideDisk = "[{\"path\": \"\(outside)\", \"format\": \"raw\", \"virtualSize\": \(16 << 20), \"readOnly\": false}]"
        // A VM the receiving library already has: its disk is inside the library, but it is not the peer's.
        let neighbour = library.vireo("create", "neighbour", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--disk", "16M", "--cmdline", "console=ttyS0 probe=ticker")
        #expect(neighbour.status == 0, "\(neighbour.stderr)")
        let neighbourPath = library.root.appendingPathComponent("neighbour/disk0.qcow2").path
        let neighbourDisk = "[{\"path\": \"\(neighbourPath)\", \"format\": \"qcow2\", \"virtualSize\": \(16 << 20), \"readOnly\": false}]"
        // A shared NBD disk on a server the receiver allows, whose TLS client certificates
        // directory it does not: root would present that key to the server.
        let tlsDisk = "[{\"path\": \"nbds://127.0.0.1:10809/exp?tls-certificates=/etc/ssl/private\", \"format\": \"raw\", \"virtualSize\": \(16 << 20), \"readOnly\": false}]"
        let cases: [(name: String, disks: String, change: String, reason: String, receiving: [String])] = [
            ("memory file", "[]", "{\"memoryBacking\": {\"file\": \"\(planted)\", \"shared\": true}}", "memory", []),
            ("disk outside", outsideDisk, "{}", "--allow-disks", []),
            ("another VM's disk", neighbourDisk, "{}", "VM 'neighbour'", []),
            ("TLS certificates outside", tlsDisk, "{}", "the shared network disk's credentials /etc/ssl/private are outside", ["--allow-disk-server", "127.0.0.1:10809"]),
            ("host tap", "[]", "{\"networks\": [{\"attachment\": \"tap:vt0000000a0\", \"mac\": \"52:54:00:aa:bb:01\"}]}", "tap:vt0000000a0", []),
            ("host namespace", "[]", "{\"networks\": [{\"attachment\": \"netns:/run/netns/theirs\", \"mac\": \"52:54:00:aa:bb:02\"}]}", "netns:/run/netns/theirs, a host interface or namespace", []),
            ("real-time", "[]", "{\"resources\": {\"rtPriority\": 50}}", "--allow-rt", []),
            ("shared folder", "[]", "{\"shares\": [{\"tag\": \"etc\", \"path\": \"/etc\", \"readOnly\": false}]}", "a migrated VM brings no shared folders", []),
        ]
        for entry in cases {
            let receiver = RunningProcess([Harness.vireo, "receive", "--listen", "127.0.0.1:0"] + entry.receiving, environment: ["VIREO_HOME": library.root.path])
            defer { receiver.signal(SIGKILL); _ = receiver.wait(timeout: 5) }
            #expect(receiver.waitForOutput("On the source", timeout: 20), "\(receiver.stderr)")
            let lines = receiver.stdout.split(separator: "\n")
            let port = lines.first { $0.hasPrefix("Listening on ") }?.split(separator: ":").last.map(String.init) ?? ""
            let token = lines.first { $0.hasPrefix("Token: ") }.map { String($0.dropFirst(7)) } ?? ""
            let source = Harness.run(["python3", "-c", Self.hostileSource, port, token, config, entry.disks, entry.change,
                                      String(MigrationWire.version)], timeout: 60)
            #expect(source.stdout.contains("answer 3 ") && source.stdout.contains(entry.reason), "\(entry.name): \(source.stdout) \(source.stderr)")
            _ = receiver.wait(timeout: 20)
            let entries = ((try? FileManager.default.contentsOfDirectory(atPath: library.root.path)) ?? []).filter { !$0.hasPrefix(".") && $0 != "networks" && $0 != "neighbour" }
            #expect(entries.isEmpty, "\(entry.name): the receiver left \(entries)")
        }
        #expect(!FileManager.default.fileExists(atPath: planted), "a peer's memory file was created")

        // An acceptable offer: the VM is defined, and the VMM that will decode the stream is
        // jailed and filtered before the first byte of it arrives.
        let receiver = RunningProcess([Harness.vireo, "receive", "--listen", "127.0.0.1:0"], environment: ["VIREO_HOME": library.root.path])
        defer { receiver.signal(SIGKILL); _ = receiver.wait(timeout: 5) }
        #expect(receiver.waitForOutput("On the source", timeout: 20), "\(receiver.stderr)")
        let lines = receiver.stdout.split(separator: "\n")
        let port = lines.first { $0.hasPrefix("Listening on ") }?.split(separator: ":").last.map(String.init) ?? ""
        let token = lines.first { $0.hasPrefix("Token: ") }.map { String($0.dropFirst(7)) } ?? ""
        let source = RunningProcess(["python3", "-c", Self.hostileSource, port, token, config, "[]", "{\"name\": \"arrived\"}",
                                     String(MigrationWire.version)])
        defer { source.signal(SIGKILL); _ = source.wait(timeout: 5) }
        #expect(source.waitForOutput("answer 6", timeout: 30), "\(source.stdout) \(source.stderr) \(receiver.stderr)")
        let pidFile = library.root.appendingPathComponent("arrived/vmm.pid").path
        var pid: Int?
        #expect(library.waitFor(20) {
            pid = (try? String(contentsOfFile: pidFile, encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            guard let pid else { return false }
            let fields = IsolationTests.status(pid)
            return fields["Seccomp"] == "2"
        }, "the arriving VMM never confined itself: \(pid.map { IsolationTests.status($0) } ?? [:])")
        if let pid {
            let fields = IsolationTests.status(pid)
            #expect(fields["Uid"]?.hasPrefix("0\t") == false && fields["Seccomp"] == "2", "the VMM waiting for the stream is not confined: \(fields)")
        }
        source.send(Data("\n".utf8))
        _ = source.wait(timeout: 10)
        _ = receiver.wait(timeout: 30)
        #expect(library.waitFor(20) { !FileManager.default.fileExists(atPath: library.root.appendingPathComponent("arrived").path) })
    }

    @Test("vireo receive listens on loopback unless told otherwise, and drops a peer that trickles bytes before its hello within a bounded time")
    func receiverDeadline() throws {
        let library = try TestLibrary()
        let receiver = RunningProcess([Harness.vireo, "receive", "--listen", "127.0.0.1:0"], environment: ["VIREO_HOME": library.root.path])
        defer { receiver.signal(SIGKILL); _ = receiver.wait(timeout: 5) }
        #expect(receiver.waitForOutput("On the source", timeout: 20), "\(receiver.stderr)")
        let port = receiver.stdout.split(separator: "\n").first { $0.hasPrefix("Listening on ") }?.split(separator: ":").last.map(String.init) ?? ""
        // A valid header announcing a hello of 4000 bytes, then those bytes one a second.
        let trickle = Harness.run(["python3", "-c", """
            import socket, struct, sys, time
            s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
            start = time.time()
            s.sendall(struct.pack("<IIQ", 1, 0, 4000))
            try:
                while time.time() - start < 45:
                    s.sendall(b"V")
                    time.sleep(1)
                    s.setblocking(False)
                    try:
                        if s.recv(100) == b"":
                            break
                    except BlockingIOError:
                        pass
                    finally:
                        s.setblocking(True)
            except OSError:
                pass
            print("dropped after", int(time.time() - start))
            """, port], timeout: 60)
        let seconds = Int(trickle.stdout.split(separator: " ").last?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? 99
        #expect(seconds <= 20, "a trickling peer held the receiver for \(seconds) s: \(trickle.stdout) \(trickle.stderr)")
        #expect(!receiver.hasExited, "the receiver gave up instead of waiting on: \(receiver.stderr)")

        let plain = RunningProcess([Harness.vireo, "receive"], environment: ["VIREO_HOME": library.root.path])
        defer { plain.signal(SIGKILL); _ = plain.wait(timeout: 5) }
        #expect(plain.waitForOutput("Listening on ", timeout: 20), "\(plain.stderr)")
        #expect(plain.stdout.contains("Listening on tcp:127.0.0.1:"), "\(plain.stdout)")
    }

    @Test("new disks are 0600 and VM directories 0700 (0710 while jailed), kept disks land in a 0700 directory: guest data is nobody else's")
    func privateModes() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "private", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--disk", "16M", "--cmdline", "console=ttyS0 probe=ticker")
        #expect(created.status == 0, "\(created.stderr)")
        let directory = library.root.appendingPathComponent("private").path
        #expect(Self.mode(directory) == "700", "\(Self.mode(directory))")
        #expect(Self.mode(directory + "/disk0.qcow2") == "600", "\(Self.mode(directory + "/disk0.qcow2"))")
        #expect(Self.mode(directory + "/config.json") == "600", "\(Self.mode(directory + "/config.json"))")
        let outside = library.root.deletingLastPathComponent().appendingPathComponent("made.qcow2").path
        #expect(Harness.run([Harness.vireo, "disk", "create", outside, "--size", "16M"]).status == 0)
        #expect(Self.mode(outside) == "600", "\(Self.mode(outside))")
        #expect(library.vireo("start", "private").status == 0)
        #expect(Self.mode(directory) == "710", "\(Self.mode(directory))")
        #expect(library.vireo("stop", "private", "--force").status == 0)
        let deleted = library.vireo("delete", "private", "--keep-disks")
        #expect(deleted.status == 0, "\(deleted.stderr)")
        let kept = library.root.appendingPathComponent("kept-disks").path
        #expect(Self.mode(kept) == "700", "\(Self.mode(kept))")
        for file in (try? FileManager.default.subpathsOfDirectory(atPath: kept)) ?? [] {
            let expected = file.hasSuffix(".qcow2") ? "600" : "700"
            #expect(Self.mode(kept + "/" + file) == expected, "\(file): \(Self.mode(kept + "/" + file))")
        }
    }

    @Test("the qemu engine runs QEMU as libvirt does: its own non-root uid, Seccomp 2, its own mount namespace without the host's /etc, and vireo info says so",
          .timeLimit(.minutes(5)))
    func qemuJailed() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "firmware", "--firmware", "bios", "--accel", "tcg", "--memory", "128M", "--disk", "16M")
        #expect(created.status == 0, "\(created.stderr)")
        let started = library.vireo("start", "firmware")
        #expect(started.status == 0, "\(started.stderr)")
        defer { _ = library.vireo("stop", "firmware", "--force") }
        let pid = try #require(ResourceTests.pid(library, "firmware"), "\(library.vmmLog("firmware"))")
        let fields = IsolationTests.status(pid)
        let uid = fields["Uid"]?.split(separator: "\t").first.map(String.init) ?? "?"
        #expect(uid != "0" && uid != "?", "QEMU runs as uid \(uid)")
        #expect(fields["Seccomp"] == "2", "\(fields)")
        #expect(fields["NoNewPrivs"] == "1", "\(fields)")
        let ownMount = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/mnt")) ?? "self"
        let theirs = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/mnt")) ?? "self"
        #expect(ownMount != theirs, "QEMU shares the host's mount namespace")
        #expect(!FileManager.default.fileExists(atPath: "/proc/\(pid)/root/etc/passwd"), "QEMU sees the host's /etc")
        #expect(!FileManager.default.fileExists(atPath: "/proc/\(pid)/root/root"), "QEMU sees the host's /root")
        let info = library.vireo("info", "firmware").stdout
        #expect(info.contains("Jail:") && info.contains("uid \(uid)"), "\(info)")
        // It still does its work: the disk is its uid's, QMP answers, the screen is there.
        let disk = library.root.appendingPathComponent("firmware/disk0.qcow2").path
        var status = stat()
        #expect(stat(disk, &status) == 0 && String(status.st_uid) == uid, "the disk is not QEMU's uid's")
        let shot = library.root.deletingLastPathComponent().appendingPathComponent("screen.png").path
        let screenshot = library.vireo("screenshot", "firmware", shot)
        #expect(screenshot.status == 0, "\(screenshot.stderr)")
    }
    @Test("the API names host paths only inside the library and under --allow-path directories, and refuses no_jail and no_seccomp unless the server was started with --allow-unconfined")
    func apiPathPolicy() throws {
        let library = try TestLibrary()
        let work = library.root.deletingLastPathComponent()
        let outside = work.appendingPathComponent("outside")
        try FileManager.default.createDirectory(at: outside, withIntermediateDirectories: true)
        let kernel = outside.appendingPathComponent("probe.elf").path
        try FileManager.default.copyItem(atPath: try Harness.probe("pvh"), toPath: kernel)
        func serve(_ extra: [String]) throws -> (RunningProcess, APIClient) {
            let socket = work.appendingPathComponent("api-\(UUID().uuidString.prefix(8)).sock").path
            let server = RunningProcess([Harness.vireo, "serve", "--listen", "none", "--socket", socket] + extra, environment: ["VIREO_HOME": library.root.path])
            guard server.waitForOutput("API on", timeout: 30) else { throw HarnessError("vireo serve did not start: \(server.stderr)") }
            return (server, APIClient(address: .unix(path: socket), token: nil))
        }
        let vm: [String: Any] = ["name": "a", "kernel": kernel, "memory_bytes": 64 << 20, "without_disk": true, "nics": [String](),
                                 "command_line": "console=ttyS0 probe=ticker"]
        do {
            let (server, api) = try serve([])
            defer { server.signal(SIGTERM); _ = server.wait(timeout: 10) }
            let refused = try api.request("POST", "/api/vms", json: vm)
            #expect(refused.status == 422 && refused.text.contains("kernel") && refused.text.contains("--allow-path"), "\(refused.status) \(refused.text)")
            let disk = try api.request("POST", "/api/disks", json: ["path": outside.appendingPathComponent("x.qcow2").path, "size_bytes": 16 << 20])
            #expect(disk.status == 422 && disk.text.contains("--allow-path"), "\(disk.status) \(disk.text)")
            #expect(!FileManager.default.fileExists(atPath: outside.appendingPathComponent("x.qcow2").path))
            let attached = try api.request("POST", "/api/vms", json: ["name": "b", "attach_disk": "/etc/shadow", "memory_bytes": 64 << 20, "nics": [String]()])
            #expect(attached.status == 422 && attached.text.contains("attach_disk"), "\(attached.status) \(attached.text)")
            // An unattended install's key files are read by the server as root: the same policy.
            let keys = try api.request("POST", "/api/vms", json: ["name": "c",
                                                                  "unattended": ["password": "x", "ssh_key_files": ["/etc/hostname"]] as [String: Any]])
            #expect(keys.status == 422 && keys.text.contains("unattended.ssh_key_files[0]") && keys.text.contains("--allow-path"), "\(keys.status) \(keys.text)")
        }
        let (server, api) = try serve(["--allow-path", outside.path])
        defer { server.signal(SIGTERM); _ = server.wait(timeout: 10) }
        let created = try api.request("POST", "/api/vms", json: vm)
        #expect(created.status == 201, "\(created.status) \(created.text)")
        let backing = try api.request("PATCH", "/api/vms/a", json: ["memory_backing": "file:/etc/vireo-ram"])
        #expect(backing.status == 422 && backing.text.contains("memory_backing"), "\(backing.status) \(backing.text)")
        let unconfined = try api.request("POST", "/api/vms/a/start", json: ["no_jail": true])
        #expect(unconfined.status == 403 && unconfined.text.contains("--allow-unconfined"), "\(unconfined.status) \(unconfined.text)")
        #expect(library.state("a") == "stopped")
        let confined = try api.request("POST", "/api/vms/a/start", json: [String: Any]())
        #expect(confined.status == 200, "\(confined.status) \(confined.text)")
        _ = library.vireo("stop", "a", "--force")
    }
}

