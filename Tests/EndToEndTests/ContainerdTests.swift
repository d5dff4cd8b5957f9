import ContainerShim
import ContainerWire
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// containerd-shim-vireo-v2 under a private containerd (its own root, state and sockets in the
/// test's directory, CRI off), driven with Debian's `ctr` as a user would: every container runs in
/// its own Vireo VM on the qemu engine under TCG (guest user space cannot make system calls under
/// this host's software KVM; docs/containerd.md). The image is made locally from busybox-static;
/// nothing is pulled.
@Suite(.serialized) struct ContainerdShimTests {
    static let image = "docker.io/vireo/busybox:test"
    static let runtime = "io.containerd.vireo.v2"

    /// A private containerd whose PATH finds the shim beside `vireo`.
    final class Lab {
        let directory: URL
        let library: String
        let settings: String
        var containerd: RunningProcess?
        let socket: String

        init() throws {
            directory = try Harness.temporaryDirectory()
            library = directory.appendingPathComponent("lib").path
            socket = directory.appendingPathComponent("c.sock").path
            let guest = Harness.packageRoot.appendingPathComponent(".build/container-guest-debug")
            let kernel = guest.appendingPathComponent("bzImage").path, initrd = guest.appendingPathComponent("agent.cpio.gz").path
            guard FileManager.default.fileExists(atPath: kernel), FileManager.default.fileExists(atPath: initrd) else {
                throw HarnessError("the container guest is missing in \(guest.path); scripts/test.sh builds it (scripts/build-container-guest.sh)")
            }
            guard FileManager.default.isExecutableFile(atPath: "/usr/bin/containerd"), FileManager.default.isExecutableFile(atPath: "/usr/bin/ctr") else {
                throw HarnessError("containerd and ctr are missing; scripts/setup.sh installs Debian's containerd")
            }
            settings = directory.appendingPathComponent("shim.json").path
            try Data("""
            {"engine": "qemu", "accel": "tcg", "kernel": "\(kernel)", "initrd": "\(initrd)", "library": "\(library)", "bootTimeoutSeconds": 180}
            """.utf8).write(to: URL(fileURLWithPath: settings))
            let root = directory.path
            try Data("""
            version = 2
            root = "\(root)/root"
            state = "\(root)/state"
            disabled_plugins = ["io.containerd.grpc.v1.cri"]
            [grpc]
              address = "\(socket)"
            [ttrpc]
              address = "\(socket).ttrpc"
            """.utf8).write(to: directory.appendingPathComponent("config.toml"))
            try startContainerd()
            let archive = directory.appendingPathComponent("busybox.tar").path
            let made = Harness.run([Harness.packageRoot.appendingPathComponent("scripts/make-test-oci-image.sh").path, archive, ContainerdShimTests.image])
            guard made.status == 0 else { throw HarnessError("make-test-oci-image.sh: \(made.stderr)") }
            let imported = ctr(["image", "import", archive])
            guard imported.status == 0 else { throw HarnessError("ctr image import: \(imported.stderr)") }
        }

        func startContainerd() throws {
            let shimDirectory = URL(fileURLWithPath: Harness.vireo).deletingLastPathComponent().path
            let process = RunningProcess(["/usr/bin/containerd", "--config", directory.appendingPathComponent("config.toml").path],
                                         environment: ["PATH": "\(shimDirectory):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                                       "VIREO_SHIM_CONFIG": settings])
            containerd = process
            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline {
                if ctr(["version"], timeout: 5).status == 0 { return }
                guard !process.hasExited else { throw HarnessError("containerd ended: \(process.stderr.suffix(2000))") }
                usleep(100_000)
            }
            throw HarnessError("containerd did not answer on \(socket): \(process.stderr.suffix(2000))")
        }

        func killContainerd() {
            guard let containerd else { return }
            kill(containerd.processIdentifier, SIGKILL)
            _ = containerd.wait(timeout: 10)
            self.containerd = nil
        }

        @discardableResult
        func ctr(_ arguments: [String], stdin: Data? = nil, timeout: TimeInterval = 240) -> Harness.Completed {
            Harness.run(["/usr/bin/ctr", "-a", socket, "-n", "vt"] + arguments, stdin: stdin, timeout: timeout)
        }

        func vireo(_ arguments: [String], library: String? = nil) -> Harness.Completed {
            Harness.run([Harness.vireo] + arguments, environment: ["VIREO_HOME": library ?? self.library])
        }

        /// The library's VMs by name (`vireo list --json`).
        var vmNames: [String] { vmNames(in: library) }

        func vmNames(in library: String) -> [String] {
            let listed = vireo(["list", "--json"], library: library)
            guard let data = listed.stdout.data(using: .utf8), let array = try? JSONSerialization.jsonObject(with: data) as? [[String: Any]] else { return ["(unreadable: \(listed.stdout) \(listed.stderr))"] }
            return array.compactMap { $0["name"] as? String }
        }

        /// Shim processes serving this lab's containerd.
        var shimProcesses: [String] {
            let listed = Harness.run(["/usr/bin/pgrep", "-af", "containerd-shim-vireo-v2 -namespace vt -address \(socket)"])
            return listed.stdout.split(separator: "\n").map(String.init)
        }

        /// Waits for what `condition` says, up to `seconds`.
        func eventually(_ seconds: TimeInterval, _ condition: () -> Bool) -> Bool {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline {
                if condition() { return true }
                usleep(200_000)
            }
            return condition()
        }

        deinit {
            // Whatever a failed test left: tasks killed and deleted through containerd, then the VMs.
            if containerd != nil {
                let tasks = ctr(["task", "ls", "-q"], timeout: 30).stdout.split(separator: "\n").map(String.init)
                for task in tasks {
                    ctr(["task", "kill", "-s", "SIGKILL", task], timeout: 30)
                    ctr(["task", "rm", "-f", task], timeout: 60)
                }
                for container in ctr(["container", "ls", "-q"], timeout: 30).stdout.split(separator: "\n") { ctr(["container", "rm", String(container)], timeout: 30) }
            }
            killContainerd()
            for library in [library, directory.appendingPathComponent("lib2").path] {
                for name in vmNames(in: library) where !name.hasPrefix("(") {
                    _ = vireo(["stop", name, "--force"], library: library)
                    _ = vireo(["delete", name], library: library)
                }
            }
            for shim in shimProcesses { if let pid = Int32(shim.split(separator: " ").first ?? "") { kill(pid, SIGKILL) } }
            Harness.run(["/bin/umount", "-R", directory.appendingPathComponent("root").path])
            try? FileManager.default.removeItem(at: directory)
        }
    }

    @Test("ctr run in a Vireo VM: exit statuses 0 and 3 pass through, stdout and stderr stay apart, piped stdin reaches the process, -t gives a terminal of the caller's size that follows a resize, the container has its own PID namespace and host name, the spec's limits size the VM and a container past its memory is OOM-killed (137, /tasks/oom), containerd hears the task's events, and --rm leaves no VM, shim or root image")
    func runToCompletion() throws {
        let lab = try Lab()
        let events = RunningProcess(["/usr/bin/ctr", "-a", lab.socket, "events"])
        defer { kill(events.processIdentifier, SIGKILL); _ = events.wait(timeout: 5) }

        let failed = lab.ctr(["run", "--runtime", Self.runtime, "--rm", Self.image, "exit3",
                              "sh", "-c", "echo out; echo err >&2; cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; exit 3"])
        #expect(failed.status == 3, "\(failed.stderr)")
        #expect(failed.stdout == "out\nsh -c echo out; echo err >&2; cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; exit 3 \nexit3\n", "PID 1 is the container's own process")
        #expect(failed.stderr == "err\n" || failed.stderr.hasPrefix("err\n"), "\(failed.stderr)")
        #expect(!failed.stdout.split(separator: "\n").contains("err"), "\(failed.stdout)")

        let piped = lab.ctr(["run", "--runtime", Self.runtime, "--rm", Self.image, "piped", "sh", "-c", "wc -c; id -u"], stdin: Data(repeating: 0x61, count: 100_000))
        #expect(piped.status == 0, "\(piped.stderr)")
        #expect(piped.stdout.split(separator: "\n") == ["100000", "0"], "\(piped.stdout)")

        // A terminal: `script` gives ctr one; its size is the guest's, and a resize (once the task
        // runs) follows. ctr sends the size with its first ResizePty, after Start: the process
        // may look before it arrives (a spec's consoleSize would be there at once), so it waits
        // up to 5 s for one (the test once failed on that race: `stty: standard input`, 0 rows).
        let ctr = "/usr/bin/ctr -a \(lab.socket) -n vt"
        let firstSize = "for i in $(seq 50); do s=$(stty size 2>/dev/null); [ -n \"$s\" ] && break; sleep 0.1; done; echo \"$s\""
        let command = "\(ctr) run -t --runtime \(Self.runtime) --rm \(Self.image) tty sh -c '\(firstSize); tty; sleep 6; stty size; exit 4'"
        let resize = "until \(ctr) task ls | grep -q 'tty.*RUNNING'; do sleep 0.2; done; sleep 1.5; stty cols 77 rows 22; kill -WINCH $!"
        // script's own input stays open (at its end, script types into ctr's terminal).
        let script = RunningProcess(["/usr/bin/script", "-qec", "stty cols 123 rows 45; \(command) & \(resize); wait $!", "/dev/null"])
        let terminal = (status: script.wait(timeout: 240), stdout: script.stdout, stderr: script.stderr)
        script.closeInput()
        #expect(terminal.status == 4, "\(terminal.stdout) \(terminal.stderr)")
        #expect(terminal.stdout.contains("45 123") && terminal.stdout.contains("/dev/pts/0") && terminal.stdout.contains("22 77"), "\(terminal.stdout)")

        let succeeded = lab.ctr(["run", "--runtime", Self.runtime, "--rm", Self.image, "ok", "true"])
        #expect(succeeded.status == 0 && succeeded.stdout.isEmpty, "\(succeeded.stderr)")

        // The OCI spec's resources size the VM: 2 CPUs of quota are 2 vCPUs (and a 200% cap on
        // the VM's process), a 128 MiB limit is 128 MiB plus the guest's overhead. Then the
        // container asks for more than that (awk filling an array without end): the guest's OOM
        // killer ends it, its exit is 137 and containerd hears /tasks/oom.
        let sized = RunningProcess(["/usr/bin/ctr", "-a", lab.socket, "-n", "vt", "run", "--runtime", Self.runtime, "--rm", "--cpus", "2", "--memory-limit", "134217728",
                                    Self.image, "sized", "sh", "-c", "nproc; grep MemTotal /proc/meminfo; sleep 3; awk 'BEGIN { while (1) grow[n++] = n }'"])
        #expect(lab.eventually(120) { lab.vireo(["info", "ctr-vt-sized"]).stdout.contains("200%") }, "\(lab.vireo(["info", "ctr-vt-sized"]).stdout)")
        #expect(sized.wait(timeout: 240) == 137, "\(sized.stdout) \(sized.stderr)")
        #expect(lab.eventually(10) { events.stdout.contains("/tasks/oom") }, "no /tasks/oom: \(events.stdout)")
        let lines = sized.stdout.split(separator: "\n")
        #expect(lines.first == "2", "\(sized.stdout)")
        let kib = lines.dropFirst().first.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
        #expect(kib > 150_000 && kib <= 192 * 1024, "MemTotal \(kib) KiB for 128 MiB + 64 MiB of overhead")

        #expect(lab.eventually(10) { events.stdout.contains("/tasks/exit") }, "\(events.stdout)")
        for topic in ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"] { #expect(events.stdout.contains(topic), "\(topic) in \(events.stdout)") }
        #expect(events.stdout.contains("\"exit_status\":3"), "\(events.stdout)")

        #expect(lab.eventually(10) { lab.vmNames.isEmpty && lab.shimProcesses.isEmpty }, "VMs \(lab.vmNames), shims \(lab.shimProcesses)")
        let images = Harness.run(["/usr/bin/find", lab.directory.appendingPathComponent("state").path, "-name", "vireo-rootfs.img"])
        #expect(images.stdout.isEmpty, "root images left: \(images.stdout)")
    }

    @Test("a running task in its VM: exec passes its exit status through, ps and metrics describe the container's processes, Update caps the VM's CPU at the new quota and gives a lower memory limit's difference to the VM's balloon (one beyond its RAM refused), pause and resume stop and restart the VM, SIGTERM reaches a trapping init, SIGKILL ends it with 137, and delete leaves no VM, shim, mount or root image")
    func runningTask() throws {
        let lab = try Lab()
        let started = lab.ctr(["run", "-d", "--runtime", Self.runtime, Self.image, "web",
                               "sh", "-c", "trap 'echo bye > /tmp/term; exit 7' TERM; while true; do echo tick; sleep 0.02; done"])
        #expect(started.status == 0, "\(started.stderr)")
        #expect(lab.vmNames == ["ctr-vt-web"], "the sandbox is an ordinary library VM: \(lab.vmNames)")
        let info = lab.vireo(["info", "ctr-vt-web"])
        #expect(info.stdout.contains("running") && info.stdout.contains("Managed by:") && info.stdout.contains("containerd (made by it"), "\(info.stdout)")
        #expect(lab.vireo(["list"]).stdout.contains("running [containerd]"), "vireo list marks the VM as containerd's")

        // The init writes all the while (its output frames interleave with the exec's replies).
        let exec = lab.ctr(["task", "exec", "--exec-id", "e1", "web", "sh", "-c", "echo in exec; ps -o pid,args; exit 5"], timeout: 40)
        #expect(exec.status == 5, "\(exec.stderr)")
        #expect(exec.stdout.contains("in exec") && exec.stdout.contains("    1 sh -c trap"), "the exec sees the container's PID namespace: \(exec.stdout)")
        let ps = lab.ctr(["task", "ps", "web"])
        #expect(ps.status == 0 && ps.stdout.split(separator: "\n").count >= 2, "\(ps.stdout) \(ps.stderr)")
        let metrics = lab.ctr(["task", "metrics", "web"])
        #expect(metrics.status == 0 && metrics.stdout.contains("pids.current") && metrics.stdout.contains("cpuacct.usage"), "\(metrics.stdout) \(metrics.stderr)")

        // Update, as CRI's UpdateContainerResources reaches the shim (ctr 1.6 has no command for
        // it): through the shim's own ttrpc socket, the address containerd keeps in the bundle.
        // Half a CPU of quota caps the VM at 50 % at once; a lower memory limit is taken back by
        // the VM's balloon, one beyond its RAM is refused.
        let address = (try? String(contentsOfFile: lab.directory.appendingPathComponent("state/io.containerd.runtime.v2.task/vt/web/address").path, encoding: .utf8)) ?? ""
        let shim = try TTRPCClient(path: String(address.trimmingCharacters(in: .whitespacesAndNewlines).dropFirst("unix://".count)))
        func update(_ json: String) throws(RPCError) {
            var resources = ProtoWriter()
            resources.string(1, "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources")
            resources.bytes(2, Array(json.utf8))
            var request = ProtoWriter()
            request.string(1, "web")
            request.message(2, resources)
            _ = try shim.call(service: "containerd.task.v2.Task", method: "Update", payload: request.bytes)
        }
        try update(#"{"cpu": {"quota": 50000, "period": 100000, "shares": 512}}"#)
        let capped = lab.vireo(["info", "ctr-vt-web"]).stdout
        #expect(capped.contains("50%"), "\(capped)")
        // The settings' 256 MiB VM; a 128 MiB limit and the guest's 64 MiB leave 64 MiB to the
        // balloon, which the guest's driver fills.
        try update(#"{"memory": {"limit": 134217728}}"#)
        #expect(lab.eventually(60) { lab.vireo(["info", "ctr-vt-web"]).stdout.contains("64 MiB of 64 MiB target") },
                "\(lab.vireo(["info", "ctr-vt-web"]).stdout)")
        do throws(RPCError) {
            try update(#"{"memory": {"limit": 1073741824}}"#)
            Issue.record("a memory limit beyond the VM's RAM must be refused")
        } catch {
            #expect(error.code == .unimplemented && error.message.contains("exceed the 256 MiB of RAM the container's VM was made with"), "\(error)")
        }

        #expect(lab.ctr(["task", "pause", "web"]).status == 0)
        #expect(lab.ctr(["task", "ls"]).stdout.contains("PAUSED"))
        #expect(lab.vireo(["info", "ctr-vt-web"]).stdout.contains("paused"))
        #expect(lab.ctr(["task", "resume", "web"]).status == 0)
        #expect(lab.ctr(["task", "ls"]).stdout.contains("RUNNING"))

        // SIGTERM reaches the container's init, which handles it (it is PID 1 in its namespace).
        #expect(lab.ctr(["task", "kill", "web"]).status == 0)
        let waited = lab.ctr(["task", "ls"])
        #expect(lab.eventually(30) { lab.ctr(["task", "ls"]).stdout.contains("STOPPED") }, "\(waited.stdout)")
        let deleted = lab.ctr(["task", "rm", "web"])
        #expect(deleted.status == 0, "\(deleted.stderr)")
        #expect(deleted.stderr.contains("exit code 7"), "the trap's exit status: \(deleted.stderr)")
        #expect(lab.ctr(["container", "rm", "web"]).status == 0)

        // SIGKILL: 137.
        #expect(lab.ctr(["run", "-d", "--runtime", Self.runtime, Self.image, "sleeper", "sleep", "1000"]).status == 0)
        #expect(lab.ctr(["task", "kill", "-s", "SIGKILL", "sleeper"]).status == 0)
        #expect(lab.eventually(30) { lab.ctr(["task", "ls"]).stdout.contains("STOPPED") })
        let killed = lab.ctr(["task", "rm", "sleeper"])
        #expect(killed.status == 0 && killed.stderr.contains("exit code 137"), "\(killed.stderr)")
        #expect(lab.ctr(["container", "rm", "sleeper"]).status == 0)
        #expect(lab.eventually(10) { lab.vmNames.isEmpty && lab.shimProcesses.isEmpty }, "VMs \(lab.vmNames), shims \(lab.shimProcesses)")
        let mounts = (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? ""
        #expect(!mounts.contains(lab.directory.appendingPathComponent("state").path), "mounts left behind")
    }

    @Test("containerd killed and started again finds the running shim (Connect) and the task still execs; a shim killed with SIGKILL is cleaned up by containerd through `shim delete`, which removes its VM")
    func restartsAndCrashes() throws {
        let lab = try Lab()
        #expect(lab.ctr(["run", "-d", "--runtime", Self.runtime, Self.image, "lasting", "sleep", "1000"]).status == 0)
        lab.killContainerd()
        try lab.startContainerd()
        #expect(lab.eventually(20) { lab.ctr(["task", "ls"]).stdout.contains("RUNNING") }, "\(lab.ctr(["task", "ls"]).stdout)")
        let exec = lab.ctr(["task", "exec", "--exec-id", "after", "lasting", "echo", "still here"])
        #expect(exec.status == 0 && exec.stdout == "still here\n", "\(exec.stdout) \(exec.stderr)")

        // Its settings (another library) come from the runtime options only, which `shim delete`
        // is not given: the bundle's record names the VM.
        let otherLibrary = lab.directory.appendingPathComponent("lib2").path
        let otherSettings = lab.directory.appendingPathComponent("other.json")
        try Data(try String(contentsOfFile: lab.settings, encoding: .utf8).replacingOccurrences(of: "\"\(lab.library)\"", with: "\"\(otherLibrary)\"").utf8).write(to: otherSettings)
        #expect(lab.ctr(["run", "-d", "--runtime", Self.runtime, "--runtime-config-path", otherSettings.path, Self.image, "crashing", "sleep", "1000"]).status == 0)
        #expect(lab.vmNames(in: otherLibrary) == ["ctr-vt-crashing"], "\(lab.vmNames(in: otherLibrary))")
        let shims = lab.shimProcesses
        #expect(shims.count == 2, "\(shims)")
        for shim in shims where shim.contains("crashing") || shim.contains("lasting") {
            if let pid = Int32(shim.split(separator: " ").first ?? "") { kill(pid, SIGKILL) }
        }
        #expect(lab.eventually(60) { lab.vmNames.isEmpty && lab.vmNames(in: otherLibrary).isEmpty },
                "the dead shims' VMs are removed: \(lab.vmNames) \(lab.vmNames(in: otherLibrary))")
        #expect(lab.eventually(30) { lab.ctr(["task", "ls", "-q"]).stdout.isEmpty }, "\(lab.ctr(["task", "ls"]).stdout)")
        for name in ["lasting", "crashing"] { lab.ctr(["container", "rm", name]) }
    }

    @Test("a pod: containers that name a sandbox (CRI's annotations) join its shim and VM, each with its own root, PID namespace, host name and terminals (devpts); its exit status and output pass through; the sandbox cannot go before them; deleting all leaves nothing")
    func podSharesOneVM() throws {
        let lab = try Lab()
        let sandbox = ["--annotation", "io.kubernetes.cri.container-type=sandbox", "--annotation", "io.kubernetes.cri.sandbox-id=pod1"]
        let member = ["--annotation", "io.kubernetes.cri.container-type=container", "--annotation", "io.kubernetes.cri.sandbox-id=pod1"]
        let started = lab.ctr(["run", "-d", "--runtime", Self.runtime] + sandbox + [Self.image, "pod1", "sleep", "1000"])
        #expect(started.status == 0, "\(started.stderr)")
        let app = lab.ctr(["run", "-d", "--runtime", Self.runtime] + member + [Self.image, "app1",
                           "sh", "-c", "echo mine > /root/owner; while true; do echo tick; sleep 0.02; done"])
        #expect(app.status == 0, "\(app.stderr)")
        // app1 writes all the while app2 joins (its output frames interleave with the agent's replies).
        let second = lab.ctr(["run", "--rm", "--runtime", Self.runtime] + member + [Self.image, "app2",
                              "sh", "-c", "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; ps -o args > /tmp/ps; grep -c '^sleep' /tmp/ps; cat /root/owner 2>&1; ls /dev; echo pts-dev $(stat -c %d /dev/pts); echo pts-list $(ls /dev/pts); exit 2"])
        #expect(second.status == 2, "\(second.stderr)")
        let lines = second.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first == "app2", "its own host name: \(second.stdout)")
        #expect(lines.count > 2 && lines[1].hasPrefix("sh -c hostname") && lines[2] == "0", "its own PID namespace (no sleep of the others): \(second.stdout)")
        #expect(second.stdout.contains("No such file or directory"), "its own root, without app1's file: \(second.stdout)")
        #expect(lines.contains("urandom") && lines.contains("pts") && !lines.contains { $0.hasPrefix("vd") }, "a /dev without the pod's disks: \(second.stdout)")
        #expect(lab.vmNames == ["ctr-vt-pod1"], "one VM for the pod: \(lab.vmNames)")
        #expect(lab.shimProcesses.count == 1, "one shim for the pod: \(lab.shimProcesses)")
        let exec = lab.ctr(["task", "exec", "--exec-id", "look", "app1", "cat", "/root/owner"])
        #expect(exec.status == 0 && exec.stdout == "mine\n", "\(exec.stdout) \(exec.stderr)")
        // Each container has a devpts of its own (not the VM's, where one container's root could
        // open another's terminal): app2's held nothing but its ptmx, and app1's is another.
        #expect(lines.contains("pts-list ptmx"), "app2's /dev/pts: \(second.stdout)")
        let ownDevice = lines.first { $0.hasPrefix("pts-dev ") }.map { String($0.dropFirst(8)) }
        let other = lab.ctr(["task", "exec", "--exec-id", "pts", "app1", "stat", "-c", "%d", "/dev/pts"])
        #expect(other.status == 0 && ownDevice != nil && other.stdout.trimmingCharacters(in: .whitespacesAndNewlines) != ownDevice,
                "app1's /dev/pts \(other.stdout) \(other.stderr), app2's \(ownDevice ?? "-")")

        // The sandbox goes last.
        #expect(lab.ctr(["task", "kill", "-s", "SIGKILL", "pod1"]).status == 0)
        #expect(lab.eventually(30) { lab.ctr(["task", "ls"]).stdout.contains("pod1    ") && lab.ctr(["task", "ls"]).stdout.contains("STOPPED") })
        let early = lab.ctr(["task", "rm", "pod1"])
        #expect(early.status != 0 && early.stderr.contains("still holds app1"), "\(early.stderr)")
        #expect(lab.ctr(["task", "kill", "-s", "SIGKILL", "app1"]).status == 0)
        #expect(lab.eventually(30) { !lab.ctr(["task", "ls"]).stdout.contains("RUNNING") })
        #expect(lab.ctr(["task", "rm", "app1"]).status == 0)
        #expect(lab.ctr(["task", "rm", "pod1"]).status == 0)
        for name in ["app1", "pod1"] { #expect(lab.ctr(["container", "rm", name]).status == 0) }
        #expect(lab.eventually(10) { lab.vmNames.isEmpty && lab.shimProcesses.isEmpty }, "VMs \(lab.vmNames), shims \(lab.shimProcesses)")
        let images = Harness.run(["/usr/bin/find", lab.directory.appendingPathComponent("state").path, "-name", "vireo-*.img"])
        #expect(images.stdout.isEmpty, "disks left: \(images.stdout)")
    }

    @Test("a pod's network from a real CNI plugin (Debian's bridge and host-local, run as CRI runs them, in namespaces of the test's own): the 2-vCPU VM's card takes over the pod's interface with its MAC and a queue pair per vCPU, the guest has the IPv4 and IPv6 addresses and routes the plugin gave (dual stack), and the container fetches a file from a server on the plugin's bridge over both, by a name from the /etc/hosts bound into it as CRI binds it (with /etc/resolv.conf and a directory volume, copied into its root)")
    func cniNetwork() throws {
        let lab = try Lab()
        let suffix = String(getpid())
        let outside = "vireo-cni-\(suffix)", pod = "vireo-pod-\(suffix)"
        for name in [outside, pod] { #expect(Harness.run(["ip", "netns", "add", name]).status == 0) }
        defer { for name in [pod, outside] { Harness.run(["ip", "netns", "del", name]) } }
        Harness.run(["ip", "-n", outside, "link", "set", "lo", "up"])
        let ipam = lab.directory.appendingPathComponent("ipam").path
        let configuration = Data("""
            {"cniVersion": "1.0.0", "name": "vireo-test", "type": "bridge", "bridge": "cni-vireo0", "isGateway": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.89.0.0/24"}], [{"subnet": "fd89::/64"}]],
                      "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}], "dataDir": "\(ipam)"}}
            """.utf8)
        let cni = { (command: String) -> Harness.Completed in
            Harness.run(["ip", "netns", "exec", outside, "/usr/lib/cni/bridge"], stdin: configuration,
                        environment: ["CNI_COMMAND": command, "CNI_CONTAINERID": "vireo-test-\(suffix)", "CNI_NETNS": "/run/netns/\(pod)",
                                      "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"])
        }
        let added = cni("ADD")
        #expect(added.status == 0, "\(added.stdout) \(added.stderr)")
        defer { _ = cni("DEL") }
        let result = (try? JSONSerialization.jsonObject(with: Data(added.stdout.utf8)) as? [String: Any]) ?? [:]
        let addresses = ((result["ips"] as? [[String: Any]]) ?? []).compactMap { $0["address"] as? String }
        let given = addresses.first { !$0.contains(":") } ?? ""
        let given6 = addresses.first { $0.contains(":") } ?? ""
        #expect(given.hasPrefix("10.89.0.") && given.hasSuffix("/24"), "\(added.stdout)")
        #expect(given6.hasPrefix("fd89::") && given6.hasSuffix("/64"), "dual stack: \(added.stdout)")
        let links = Harness.run(["ip", "-n", pod, "-j", "link", "show", "eth0"]).stdout
        let podMAC = ((try? JSONSerialization.jsonObject(with: Data(links.utf8)) as? [[String: Any]])?.first?["address"] as? String) ?? "?"

        // A server on the plugin's bridge (its gateway address), outside the pod.
        let site = lab.directory.appendingPathComponent("www")
        try FileManager.default.createDirectory(at: site, withIntermediateDirectories: true)
        try Data("from-the-cni-bridge\n".utf8).write(to: site.appendingPathComponent("hello.txt"))
        let server = RunningProcess(["ip", "netns", "exec", outside, "python3", "-m", "http.server", "--bind", "10.89.0.1", "--directory", site.path, "8080"])
        defer { kill(server.processIdentifier, SIGKILL); _ = server.wait(timeout: 5) }
        #expect(lab.eventually(20) { Harness.run(["ip", "netns", "exec", outside, "python3", "-c", "import socket; socket.create_connection(('10.89.0.1', 8080), 1)"]).status == 0 })
        // The same over IPv6, once the bridge's address has passed duplicate detection.
        #expect(lab.eventually(20) {
            let shown = Harness.run(["ip", "-n", outside, "-6", "addr", "show", "dev", "cni-vireo0"]).stdout
            return shown.contains("fd89::1/64") && !shown.contains("tentative")
        }, "\(Harness.run(["ip", "-n", outside, "-6", "addr"]).stdout)")
        let server6 = RunningProcess(["ip", "netns", "exec", outside, "python3", "-m", "http.server", "--bind", "fd89::1", "--directory", site.path, "8081"])
        defer { kill(server6.processIdentifier, SIGKILL); _ = server6.wait(timeout: 5) }
        #expect(lab.eventually(20) { Harness.run(["ip", "netns", "exec", outside, "python3", "-c", "import socket; socket.create_connection(('fd89::1', 8081), 1)"]).status == 0 })

        // The files CRI binds into every container (/etc/hosts, /etc/resolv.conf), read-only,
        // and a directory volume with a nested file and a link: copied into the container's root.
        let files = lab.directory.appendingPathComponent("pod-files")
        try FileManager.default.createDirectory(at: files.appendingPathComponent("volume/nested"), withIntermediateDirectories: true)
        try Data("127.0.0.1 localhost\n10.89.0.1 web.pod.test\n".utf8).write(to: files.appendingPathComponent("hosts"))
        try Data("nameserver 10.89.0.1\nsearch pod.test\n".utf8).write(to: files.appendingPathComponent("resolv.conf"))
        try Data("from-a-volume\n".utf8).write(to: files.appendingPathComponent("volume/nested/data.txt"))
        #expect(symlink("nested/data.txt", files.appendingPathComponent("volume/link").path) == 0)
        // Two CPUs: a 2-vCPU pod VM, whose card gets a queue pair per vCPU (a multiqueue tap
        // made inside the pod's namespace), which the guest's virtio-net driver takes.
        let run = lab.ctr(["run", "--runtime", Self.runtime, "--rm", "--cpus", "2", "--with-ns", "network:/run/netns/\(pod)",
                           "--mount", "type=bind,src=\(files.path)/hosts,dst=/etc/hosts,options=rbind:ro",
                           "--mount", "type=bind,src=\(files.path)/resolv.conf,dst=/etc/resolv.conf,options=rbind:ro",
                           "--mount", "type=bind,src=\(files.path)/volume,dst=/srv/volume,options=rbind:rw",
                           Self.image, "net",
                           "sh", "-c", "ip link show dev eth0; ip -4 addr show dev eth0; ip route; ip -6 addr show dev eth0; ip -6 route; "
                               + "cat /etc/resolv.conf /srv/volume/link; ls -l /etc/hosts; echo v6 $(wget -qO- 'http://[fd89::1]:8081/hello.txt'); "
                               + "wget -qO- http://web.pod.test:8080/hello.txt"])
        #expect(run.status == 0, "\(run.stdout) \(run.stderr)")
        #expect(run.stdout.contains("link/ether \(podMAC) "), "the guest's card has the pod interface's MAC \(podMAC): \(run.stdout)")
        // The kernel gives a device the mq qdisc only when it has several transmit queues: the
        // guest's virtio-net driver negotiated VIRTIO_NET_F_MQ (one queue, and it is pfifo_fast).
        #expect(run.stdout.contains(": eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc mq "), "two queue pairs in the guest: \(run.stdout)")
        #expect(run.stdout.contains("inet \(given)") && run.stdout.contains("default via 10.89.0.1"), "\(run.stdout)")
        // IPv6, which the kernel's ip= lacks: the agent gave the card the plugin's address and
        // route (vireo.ipv6=), and the container fetched the file over it.
        #expect(run.stdout.contains("inet6 \(given6) scope global") && run.stdout.contains("default via fd89::1 dev eth0"), "\(run.stdout)")
        #expect(run.stdout.contains("v6 from-the-cni-bridge\n"), "\(run.stdout) \(run.stderr)")
        #expect(run.stdout.contains("nameserver 10.89.0.1\nsearch pod.test\nfrom-a-volume\n"), "the bound files are not in the container: \(run.stdout)")
        #expect(run.stdout.contains("-r--r--r--"), "a read-only bind keeps its write bits: \(run.stdout)")
        // The name comes from the bound /etc/hosts.
        #expect(run.stdout.hasSuffix("from-the-cni-bridge\n"), "\(run.stdout) \(run.stderr)")
        #expect(lab.eventually(10) { lab.vmNames.isEmpty && lab.shimProcesses.isEmpty }, "VMs \(lab.vmNames), shims \(lab.shimProcesses)")
        // The pod's namespace keeps its interface and the plugin's address (its record of the pod).
        #expect(Harness.run(["ip", "-n", pod, "-4", "addr", "show", "eth0"]).stdout.contains("inet \(given)"))
    }

    @Test("refused at create, with the reason containerd shows, and nothing left behind: a privileged container, the host's network namespace, a network namespace outside /run/netns, a settings file that names an engine Vireo lacks")
    func refusals() throws {
        let lab = try Lab()
        let privileged = lab.ctr(["run", "--privileged", "--runtime", Self.runtime, "--rm", Self.image, "priv", "true"])
        #expect(privileged.status != 0 && privileged.stderr.contains("privileged container"), "\(privileged.stderr)")
        let hostNetwork = lab.ctr(["run", "--net-host", "--runtime", Self.runtime, "--rm", Self.image, "hostnet", "true"])
        #expect(hostNetwork.status != 0 && hostNetwork.stderr.contains("host's network"), "\(hostNetwork.stderr)")
        // A network namespace that is not one pinned in /run/netns: refused before root opens it.
        let strayNamespace = lab.ctr(["run", "--with-ns", "network:/proc/1/ns/net", "--runtime", Self.runtime, "--rm", Self.image, "strayns", "true"])
        #expect(strayNamespace.status != 0 && strayNamespace.stderr.contains("network namespace '/proc/1/ns/net' must be a file in /run/netns"), "\(strayNamespace.stderr)")
        let bad = lab.directory.appendingPathComponent("bad.json")
        try Data(#"{"engine": "xen"}"#.utf8).write(to: bad)
        let badSettings = lab.ctr(["run", "--runtime", Self.runtime, "--runtime-config-path", bad.path, "--rm", Self.image, "badcfg", "true"])
        #expect(badSettings.status != 0 && badSettings.stderr.contains("engine 'xen' is not one of kvm, qemu"), "\(badSettings.stderr)")
        // A program the image lacks: the agent's failed step and its errno reach ctr.
        let missing = lab.ctr(["run", "--runtime", Self.runtime, "--rm", Self.image, "nosuch", "/bin/nosuch"])
        #expect(missing.status != 0 && missing.stderr.contains("cannot execute /bin/nosuch: No such file or directory"), "\(missing.stderr)")
        for name in ["priv", "hostnet", "strayns", "badcfg", "nosuch"] { lab.ctr(["container", "rm", name]) }
        #expect(lab.eventually(10) { lab.vmNames.isEmpty && lab.shimProcesses.isEmpty }, "VMs \(lab.vmNames), shims \(lab.shimProcesses)")
    }
}
