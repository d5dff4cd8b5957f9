import Foundation
import Testing

@Suite(.serialized) struct SharedFolderTests {
    @Test("shared folders without a boot: `vireo create --share` and `vireo share add/list/remove` keep the directory's real path; a missing path, a file, `/`, the library or a directory holding it, a duplicate or malformed tag, a bad --share option and a kvm-engine VM's share on huge pages or KSM are refused naming the field, and the definition is unchanged; a kvm-engine VM takes shares")
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
        // With --share and no --engine, the qemu engine is chosen (it has the guest agent's port too).
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
            (["create", "bad", "--engine", "qemu", "--accel", "tcg", "--kernel", probe, "--no-disk", "--no-nic", "--share", project + ",uid=5"], "the options are ro and mount="),
            (["create", "k", "--engine", "kvm", "--kernel", probe, "--no-disk", "--no-nic", "--memory-backing", "hugepages=2M", "--share", project], "the kvm engine's huge pages"),
            (["create", "k", "--engine", "kvm", "--kernel", probe, "--no-disk", "--no-nic", "--ksm", "--share", project], "KSM (--ksm) merges private pages only"),
        ]
        for (arguments, reason) in refusals {
            let refused = library.vireo(arguments: arguments)
            #expect(refused.status != 0 && refused.stderr.contains(reason), "\(arguments): \(refused.stderr)")
        }
        #expect(try Data(contentsOf: config) == before, "a refused change changes nothing")
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("k").path))
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("bad").path))
        // A kvm-engine VM takes one (its virtio-fs device, SharedFolderTests' boot below), but
        // not on RAM virtiofsd cannot map.
        #expect(library.vireo("create", "kv", "--engine", "kvm", "--kernel", probe, "--no-disk", "--no-nic", "--ksm").status == 0)
        let onKSM = library.vireo("share", "add", "kv", project)
        #expect(onKSM.status != 0 && onKSM.stderr.contains("KSM (--ksm) merges private pages only"), "\(onKSM.stderr)")
        #expect(library.vireo("set", "kv", "--no-ksm").status == 0)
        let onKVM = library.vireo("share", "add", "kv", project)
        #expect(onKVM.status == 0, "\(onKVM.stderr)")
        // Where each engine's agent is (or is not) reached, as `vireo info` says it.
        func agentLine(_ name: String) -> String { library.vireo("info", name).stdout.split(separator: "\n").first { $0.hasPrefix("Guest agent:") }.map(String.init) ?? "" }
        #expect(agentLine("kv").hasSuffix(" none (the kvm engine has no agent channel yet; docs/guest-agent.md)"), "\(agentLine("kv"))")
        #expect(agentLine("q").hasSuffix(" reached on its virtio-serial port org.qemu.guest_agent.0 while the VM runs"), "\(agentLine("q"))")

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

    @Test("the kvm engine's virtio-fs: a library VM boots the ACPI test kernel with its root file system on a shared folder (root=TAG rootfstype=virtiofs) served by virtiofsd in its user namespace, and runs the /init the host put there; a save while it runs is refused naming virtio-fs and changes nothing; deleting the VM removes the share's mount point",
          .timeLimit(.minutes(20)))
    func kvmEngineRootOnSharedFolder() throws {
        try Harness.requireKVM()
        let library = try TestLibrary()
        let kernel = try LinuxKernelTests.acpiKernelDirectory.get().appendingPathComponent("vmlinux").path
        let work = try Harness.temporaryDirectory()
        _ = try LinuxKernelTests.makeInitramfs(in: work)      // work/root holds init and payload
        let root = work.appendingPathComponent("root").path
        let created = library.vireo("create", "fs", "--engine", "kvm", "--kernel", kernel, "--memory", "128M", "--cpus", "1",
                                    "--no-disk", "--no-nic", "--no-balloon", "--no-rng", "--on-reboot", "exit", "--share", root + ":rootfs",
                                    "--cmdline", "console=ttyS0 \(try LinuxKernelTests.acpiEmulatorSafeOptions()) root=rootfs rootfstype=virtiofs rw init=/init panic=1 reboot=acpi")
        #expect(created.status == 0, "\(created.stderr)")
        let started = library.vireo("start", "fs")
        #expect(started.status == 0, "\(started.stderr)")
        // Refused before the VMM is asked; the guest boots on.
        let save = library.vireo("save", "fs")
        #expect(save.status != 0 && save.stderr.contains("over virtio-fs"), "\(save.stderr)")
        #expect(library.state("fs") == "running", "\(library.state("fs") ?? "")")
        // init runs (read from the share through FUSE), cannot make system calls here, dies; the
        // panic's reboot ends the run (--on-reboot exit).
        #expect(library.waitFor(1080) { ["stopped", "crashed"].contains(library.state("fs") ?? "") })
        #expect(library.state("fs") == "stopped", "\(library.vmmLog("fs"))\n\(library.consoleLog("fs").suffix(3000))")
        let console = library.consoleLog("fs")
        #expect(console.contains("vireo.share=rootfs"), "the mount script's list on the command line: \(console.prefix(1500))")
        #expect(console.contains("VFS: Mounted root (virtiofs filesystem) on device"), "\(console.suffix(3000))")
        #expect(console.contains("Run /init as init process"), "\(console.suffix(3000))")
        #expect(console.contains("Kernel panic - not syncing: Attempted to kill init!"), "\(console.suffix(3000))")
        #expect(!library.vmmLog("fs").contains("NEEDS_RESET") && !library.vmmLog("fs").contains("back end"), "\(library.vmmLog("fs"))")
        // The share's mount point (virtiofsd's bind lives in its own mount namespace; the host's
        // is an empty directory) goes with the VM.
        let info = (try? JSONSerialization.jsonObject(with: Data(library.vireo("info", "fs", "--json").stdout.utf8))) as? [String: Any]
        let uuid = info?["uuid"] as? String ?? ""
        let mountPoints = "/run/vireo-shares/\(uuid)"
        #expect(uuid.count == 36 && FileManager.default.fileExists(atPath: mountPoints + "/rootfs"), "\(uuid) \(mountPoints)")
        #expect(library.vireo("delete", "fs").status == 0)
        #expect(!FileManager.default.fileExists(atPath: mountPoints), "\(mountPoints) outlived the VM")
    }

    @Test("bad --fs values are refused with the reason: no socket, an unknown option, a bad or repeated tag, RAM virtiofsd cannot map, a socket nobody serves")
    func badFileSystemFlags() throws {
        try Harness.requireKVM()
        let probe = try Harness.probe("pvh")
        let cases: [([String], String)] = [
            (["--fs", "tag=a"], "--fs: 'tag=a' needs both tag=T and socket=PATH"),
            (["--fs", "tag=a,socket=/tmp/x.sock,cache=none"], "unknown option 'cache=none'"),
            (["--fs", "tag=no space,socket=/tmp/x.sock"], "tag 'no space' must be 1 to 36"),
            (["--fs", "tag=a,socket=/tmp/x.sock", "--fs", "tag=a,socket=/tmp/y.sock"], "tag 'a' is used twice"),
            (["--fs", "tag=a,socket=/tmp/x.sock"], "shared folders need guest RAM their back end (virtiofsd) can map"),
            (["--fs", "tag=a,socket=/nonexistent/vireo-fs.sock", "--memory-backing", "memfd,shared"], "cannot connect to the vhost-user back end at /nonexistent/vireo-fs.sock"),
        ]
        for (arguments, reason) in cases {
            let result = Harness.vireoRun(["--kernel", probe, "--memory", "64M"] + arguments)
            #expect(result.status != 0 && result.stderr.contains(reason), "\(arguments): \(result.status) \(result.stderr)")
        }
    }

    @Test("shared folders and exec through the REST API: a share inside the allowed paths is added, listed and removed; one outside them, a file, a duplicate tag and an unknown field are 422s; removing an unknown tag is a 404; exec on a stopped VM is a 409 and an empty command a 422; a file copy on a stopped or unknown VM or to a relative path is refused; nothing is changed by a refusal")
    func sharesThroughTheAPI() throws {
        let library = try TestLibrary()
        let work = try Harness.temporaryDirectory()
        let project = work.appendingPathComponent("proj").path
        try FileManager.default.createDirectory(atPath: project, withIntermediateDirectories: true)
        let probe = try Harness.probe("pvh")
        #expect(library.vireo("create", "q", "--engine", "qemu", "--accel", "tcg", "--kernel", probe, "--memory", "128M", "--no-disk", "--no-nic").status == 0)
        let served = try Served(library)
        let api = served.api
        let added = try api.request("POST", "/api/vms/q/shares", json: ["path": project, "read_only": true, "mount_point": "/srv/proj"])
        #expect(added.status == 201 && added.text.contains("\"tag\":\"proj\"") && added.text.contains("\"read_only\":true")
                && added.text.contains("\"mount_point\":\"/srv/proj\""), "\(added.status) \(added.text)")
        let config = library.root.appendingPathComponent("q/config.json")
        let before = try Data(contentsOf: config)
        let refusals: [([String: Any], String)] = [
            (["path": "/etc"], "--allow-path"),
            (["path": project + "/../proj", "tag": "proj"], "already shares"),
            (["path": project, "tag": "bad tag"], "must be 1 to 36"),
            (["path": project, "uid": 5], "uid"),
            (["path": project, "tag": "other", "mount_point": "srv/relative"], "mount_point"),
            (["path": project, "tag": "other", "mount_point": "/srv/proj"], "already mounts 'proj' at /srv/proj"),
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
        // Files: refused before a byte is staged when the VM is stopped, unknown, or the path is not absolute.
        let putStopped = try api.request("PUT", "/api/vms/q/files?path=/root/x", raw: [1, 2, 3], contentType: "application/octet-stream")
        #expect(putStopped.status == 409 && putStopped.text.contains("stopped"), "\(putStopped.status) \(putStopped.text)")
        #expect(try api.request("GET", "/api/vms/q/files?path=/etc/hostname").status == 409)
        #expect(try api.request("GET", "/api/vms/nope/files?path=/etc/hostname").status == 404)
        let noPath = try api.request("GET", "/api/vms/q/files")
        #expect(noPath.status == 422 && noPath.object["field"] as? String == "path", "\(noPath.status) \(noPath.text)")
        let relativeFile = try api.request("PUT", "/api/vms/q/files?path=etc/x", raw: [1], contentType: "application/octet-stream")
        #expect(relativeFile.status == 422 && relativeFile.object["field"] as? String == "path", "\(relativeFile.status) \(relativeFile.text)")
        let empty = try api.request("POST", "/api/vms/q/exec", json: ["command": [] as [String]])
        #expect(empty.status == 422 && empty.text.contains("command"), "\(empty.status) \(empty.text)")
        let created = try api.request("POST", "/api/vms", json: ["name": "w", "engine": "qemu", "accelerator": "tcg", "kernel": probe, "memory_bytes": 128 << 20,
                                                                  "without_disk": true, "nics": [] as [String], "shares": [project + ":work,ro"]])
        #expect(created.status == 201 && created.text.contains("\"tag\":\"work\""), "\(created.status) \(created.text)")
        let outside = try api.request("POST", "/api/vms", json: ["name": "o", "engine": "qemu", "kernel": probe, "without_disk": true, "shares": ["/etc:etc"]])
        #expect(outside.status == 422 && outside.text.contains("shares[0]"), "\(outside.status) \(outside.text)")
    }
}
