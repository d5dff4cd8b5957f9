import Foundation
import Testing

@Suite(.serialized) struct SharedFolderTests {
    @Test("shared folders without a boot: `vireo create --share` and `vireo share add/list/remove` keep the directory's real path; a missing path, a file, `/`, the library or a directory holding it, a duplicate or malformed tag, a bad --share option and a share on a kvm-engine VM are refused naming the field, and the definition is unchanged")
    func sharesAndRefusals() throws {
        let library = try TestLibrary()
        let work = try Harness.temporaryDirectory()
        let project = work.appendingPathComponent("my project").path
        try FileManager.default.createDirectory(atPath: project, withIntermediateDirectories: true)
        let file = work.appendingPathComponent("file.txt").path
        try Data("x".utf8).write(to: URL(fileURLWithPath: file))
        // A link to the directory is stored as the directory itself.
        let link = work.appendingPathComponent("link").path
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: project)
        let probe = try Harness.probe("pvh")

        let created = library.vireo("create", "q", "--engine", "qemu", "--accel", "tcg", "--kernel", probe, "--memory", "128M",
                                    "--no-disk", "--no-nic", "--share", link + ":proj")
        #expect(created.status == 0, "\(created.stderr)")
        let listed = library.vireo("share", "list", "q", "--json")
        let shares = (try? JSONSerialization.jsonObject(with: Data(listed.stdout.utf8))) as? [[String: Any]] ?? []
        #expect(shares.count == 1 && shares.first?["tag"] as? String == "proj" && shares.first?["path"] as? String == project
                && shares.first?["read_only"] as? Bool == false, "\(listed.stdout)")
        // With --share and no --engine, the qemu engine is chosen (the kvm engine has no virtio-fs).
        let chosen = library.vireo("create", "auto", "--kernel", probe, "--memory", "128M", "--no-disk", "--no-nic", "--share", project)
        #expect(chosen.status == 0, "\(chosen.stderr)")
        #expect(library.vireo("info", "auto").stdout.contains("Shared folder:   \(project) as 'my-project'"), "\(library.vireo("info", "auto").stdout)")

        let config = library.root.appendingPathComponent("q/config.json")
        let before = try Data(contentsOf: config)
        let refusals: [([String], String)] = [
            (["share", "add", "q", work.appendingPathComponent("absent").path], "--share: \(work.path)/absent does not exist"),
            (["share", "add", "q", file], "is not a directory; a shared folder is a directory"),
            (["share", "add", "q", "/"], "the host's root directory cannot be shared"),
            (["share", "add", "q", library.root.appendingPathComponent("q").path], "lies inside Vireo's library"),
            (["share", "add", "q", library.root.deletingLastPathComponent().path], "holds Vireo's library"),
            (["share", "add", "q", project, "--tag", "proj"], "tag: VM 'q' already shares \(project) as 'proj'; give another --tag"),
            (["share", "add", "q", project, "--tag", "no/slash"], "--share: tag 'no/slash' must be 1 to 36 letters"),
            (["share", "add", "q", project, "--tag", String(repeating: "t", count: 37)], "must be 1 to 36"),
            (["share", "remove", "q", "nope"], "TAG: VM 'q' has no shared folder 'nope' (shares: proj (\(project)))"),
            (["share", "add", "absent-vm", project], "no VM named 'absent-vm'"),
            (["create", "bad", "--engine", "qemu", "--accel", "tcg", "--kernel", probe, "--no-disk", "--no-nic", "--share", project + ",uid=5"], "the only option is ro"),
            (["create", "k", "--engine", "kvm", "--kernel", probe, "--no-disk", "--no-nic", "--share", project], "shared folders run on the qemu engine so far"),
        ]
        for (arguments, reason) in refusals {
            let refused = library.vireo(arguments: arguments)
            #expect(refused.status != 0 && refused.stderr.contains(reason), "\(arguments): \(refused.stderr)")
        }
        #expect(try Data(contentsOf: config) == before, "a refused change changes nothing")
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("k").path))
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("bad").path))
        // A kvm-engine VM cannot take one either, nor be switched to kvm with one.
        #expect(library.vireo("create", "kv", "--engine", "kvm", "--kernel", probe, "--no-disk", "--no-nic").status == 0)
        let onKVM = library.vireo("share", "add", "kv", project)
        #expect(onKVM.status != 0 && onKVM.stderr.contains("shared folders run on the qemu engine so far"), "\(onKVM.stderr)")
        let toKVM = library.vireo("set", "q", "--engine", "kvm")
        #expect(toKVM.status != 0 && toKVM.stderr.contains("shared folders run on the qemu engine so far"), "\(toKVM.stderr)")

        let readOnly = library.vireo("share", "add", "q", work.path, "--tag", "work", "--readonly")
        #expect(readOnly.status == 0 && readOnly.stdout.contains("shares \(work.path) as 'work', read-only"), "\(readOnly.stdout) \(readOnly.stderr)")
        let removed = library.vireo("share", "remove", "q", "proj")
        #expect(removed.status == 0 && removed.stdout.contains("no longer shares \(project)"), "\(removed.stdout) \(removed.stderr)")
        #expect(FileManager.default.fileExists(atPath: project), "the host directory is untouched")
        #expect(library.vireo("share", "list", "q").stdout.split(separator: "\n").count == 2)

        // A directory on the share's way replaced by a link after it was added: the start is
        // refused before any server or QEMU runs (the share would serve someone else's files).
        let parent = work.appendingPathComponent("parent").path
        let elsewhere = work.appendingPathComponent("elsewhere").path
        for directory in [parent + "/data", elsewhere + "/data"] { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
        #expect(library.vireo("share", "add", "q", parent + "/data", "--tag", "data").status == 0)
        try FileManager.default.moveItem(atPath: parent, toPath: parent + "-old")
        try FileManager.default.createSymbolicLink(atPath: parent, withDestinationPath: elsewhere)
        let swapped = library.vireo("start", "q")
        #expect(swapped.status != 0 && swapped.stderr.contains("now resolves to \(elsewhere)/data"), "\(swapped.stderr)")
        #expect(library.state("q") == "stopped")
    }

    @Test("shared folders and exec through the REST API: a share inside the allowed paths is added, listed and removed; one outside them, a file, a duplicate tag and an unknown field are 422s; removing an unknown tag is a 404; exec on a stopped VM is a 409 and an empty command a 422; nothing is changed by a refusal")
    func sharesThroughTheAPI() throws {
        let library = try TestLibrary()
        let work = try Harness.temporaryDirectory()
        let project = work.appendingPathComponent("proj").path
        try FileManager.default.createDirectory(atPath: project, withIntermediateDirectories: true)
        let probe = try Harness.probe("pvh")
        #expect(library.vireo("create", "q", "--engine", "qemu", "--accel", "tcg", "--kernel", probe, "--memory", "128M", "--no-disk", "--no-nic").status == 0)
        let served = try Served(library)
        let api = served.api
        let added = try api.request("POST", "/api/vms/q/shares", json: ["path": project, "read_only": true])
        #expect(added.status == 201 && added.text.contains("\"tag\":\"proj\"") && added.text.contains("\"read_only\":true"), "\(added.status) \(added.text)")
        let config = library.root.appendingPathComponent("q/config.json")
        let before = try Data(contentsOf: config)
        let refusals: [([String: Any], String)] = [
            (["path": "/etc"], "--allow-path"),
            (["path": project + "/../proj", "tag": "proj"], "already shares"),
            (["path": project, "tag": "bad tag"], "must be 1 to 36"),
            (["path": project, "uid": 5], "uid"),
        ]
        for (body, reason) in refusals {
            let refused = try api.request("POST", "/api/vms/q/shares", json: body)
            #expect(refused.status == 422 && refused.text.contains(reason), "\(body): \(refused.status) \(refused.text)")
        }
        #expect(try Data(contentsOf: config) == before)
        let listed = try api.request("GET", "/api/vms/q/shares")
        #expect(listed.status == 200 && listed.array.count == 1, "\(listed.text)")
        #expect(try api.request("DELETE", "/api/vms/q/shares/nope").status == 404)
        let removed = try api.request("DELETE", "/api/vms/q/shares/proj")
        #expect(removed.status == 200 && removed.array.isEmpty, "\(removed.status) \(removed.text)")
        let stopped = try api.request("POST", "/api/vms/q/exec", json: ["command": ["/bin/true"]])
        #expect(stopped.status == 409, "\(stopped.status) \(stopped.text)")
        let empty = try api.request("POST", "/api/vms/q/exec", json: ["command": [] as [String]])
        #expect(empty.status == 422 && empty.text.contains("command"), "\(empty.status) \(empty.text)")
        let created = try api.request("POST", "/api/vms", json: ["name": "w", "engine": "qemu", "accelerator": "tcg", "kernel": probe, "memory_bytes": 128 << 20,
                                                                  "without_disk": true, "nics": [] as [String], "shares": [project + ":work,ro"]])
        #expect(created.status == 201 && created.text.contains("\"tag\":\"work\""), "\(created.status) \(created.text)")
        let outside = try api.request("POST", "/api/vms", json: ["name": "o", "engine": "qemu", "kernel": probe, "without_disk": true, "shares": ["/etc:etc"]])
        #expect(outside.status == 422 && outside.text.contains("shares[0]"), "\(outside.status) \(outside.text)")
    }
}
