@testable import ContainerShim
import ContainerWire
import Foundation
import Testing

/// The containerd shim's pieces without a VM: the OCI spec it accepts and refuses, the VM size a
/// spec asks for, its settings, VM names, and the wire it speaks (the end-to-end runs are
/// ContainerdShimTests).
struct ContainerShimModelTests {
    static func spec(namespaces: [String] = ["pid", "network", "ipc", "uts", "mount"], devices: String = #"[{"allow": false, "access": "rwm"}]"#,
                     resources: String = "", process: String = #"{"args": ["sh"], "cwd": "/", "user": {"uid": 1000, "gid": 100, "additionalGids": [10]}}"#) -> Data {
        let list = namespaces.map { #"{"type": "\#($0)"}"# }.joined(separator: ",")
        return Data(#"{"process": \#(process), "root": {"path": "rootfs"}, "hostname": "h", "linux": {"namespaces": [\#(list)], "resources": {"devices": \#(devices)\#(resources)}}}"#.utf8)
    }

    @Test("an OCI spec: the process is taken whole; the host's PID or network namespace, every device, a relative cwd and a missing program are refused naming the field")
    func specRules() throws {
        let spec = try ContainerSpec(data: Self.spec())
        #expect(spec.process.args == ["sh"] && spec.process.uid == 1000 && spec.process.gid == 100 && spec.process.additionalGids == [10])
        #expect(spec.hostname == "h" && spec.rootPath == "rootfs")
        // A terminal's size before the process starts, as runc takes it.
        let sized = try ContainerSpec(data: Self.spec(process: #"{"args": ["sh"], "terminal": true, "consoleSize": {"width": 123, "height": 45}}"#))
        #expect(sized.process.consoleWidth == 123 && sized.process.consoleHeight == 45 && spec.process.consoleWidth == nil)
        for (data, words) in [(Self.spec(namespaces: ["network"]), "host's PID namespace"),
                              (Self.spec(namespaces: ["pid"]), "host's network"),
                              (Self.spec(devices: #"[{"allow": true, "access": "rwm"}]"#), "privileged container"),
                              (Self.spec(process: #"{"args": ["sh"], "cwd": "tmp"}"#), "process.cwd"),
                              (Self.spec(process: #"{"args": [], "cwd": "/"}"#), "process.args"),
                              (Self.spec(process: #"{"args": ["sh"], "terminal": true, "consoleSize": {"width": 80, "height": -1}}"#), "process.consoleSize.height"),
                              (Self.spec(process: #"{"args": ["sh"], "terminal": true, "consoleSize": {"width": 70000, "height": 24}}"#), "process.consoleSize.width"),
                              (Data("{".utf8), "not JSON")] {
            do throws(RPCError) {
                _ = try ContainerSpec(data: data)
                Issue.record("\(words) must be refused")
            } catch {
                #expect(error.message.contains(words), "\(error.message)")
                #expect(error.code == .invalidArgument)
            }
        }
        // The pod's network namespace (CNI's) is the network entry's path; without one, none.
        #expect(spec.networkNamespacePath == nil)
        let joined = Data(#"{"process": {"args": ["sh"]}, "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-42"}]}}"#.utf8)
        #expect(try ContainerSpec(data: joined).networkNamespacePath == "/var/run/netns/cni-42")
        // A device rule that allows one device is not a privileged container.
        _ = try ContainerSpec(data: Self.spec(devices: #"[{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]"#))
    }

    @Test("bind mounts: a spec's binds are taken in order (proc and tmpfs mounts are the agent's), a relative source, or a source or destination with '..' or quotes, is refused naming the mount; the copy puts files, a tree with a link and read-only bits into an ext4 image, replacing a link the image had, and a source that does not exist is refused")
    func bindMounts() throws {
        func withMounts(_ mounts: String) -> Data {
            Data(#"{"process": {"args": ["sh"]}, "mounts": \#(mounts), "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}}"#.utf8)
        }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("binds-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: directory) }
        try FileManager.default.createDirectory(at: directory.appendingPathComponent("volume/inner"), withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: directory.appendingPathComponent("root/etc"), withIntermediateDirectories: true)
        try Data("nameserver 192.0.2.53\n".utf8).write(to: directory.appendingPathComponent("resolv.conf"))
        try Data("deep\n".utf8).write(to: directory.appendingPathComponent("volume/inner/file"))
        #expect(symlink("inner/file", directory.appendingPathComponent("volume/shortcut").path) == 0)
        // The image's own /etc/resolv.conf is a link out of it (as systemd-resolved's is).
        #expect(symlink("/run/systemd/resolve/stub-resolv.conf", directory.appendingPathComponent("root/etc/resolv.conf").path) == 0)
        let base = directory.path
        let spec = try ContainerSpec(data: withMounts(#"""
            [{"destination": "/proc", "type": "proc", "source": "proc"},
             {"destination": "/etc/resolv.conf", "type": "bind", "source": "\#(base)/resolv.conf", "options": ["rbind", "ro"]},
             {"destination": "/data/volume", "source": "\#(base)/volume", "options": ["rbind", "rw"]}]
            """#))
        #expect(spec.bindMounts == [.init(source: "\(base)/resolv.conf", destination: "/etc/resolv.conf", readOnly: true),
                                    .init(source: "\(base)/volume", destination: "/data/volume", readOnly: false)])
        for (mounts, words) in [(#"[{"destination": "/x", "type": "bind", "source": "relative"}]"#, "mounts[0]: a bind mount's source 'relative' must be an absolute host path"),
                                (#"[{"destination": "/x", "type": "bind", "source": "/tmp/a\"b"}]"#, "mounts[0]: a bind mount's source '/tmp/a\"b' must be an absolute host path without '..', quotes"),
                                (#"[{"destination": "/etc/../x", "type": "bind", "source": "/tmp"}]"#, "mounts[0]: the destination '/etc/../x' must be an absolute path"),
                                (#"[{"destination": "/proc", "type": "proc"}, {"destination": "/a\"b", "options": ["bind"], "source": "/tmp"}]"#, "mounts[1]: the destination")] {
            do throws(RPCError) {
                _ = try ContainerSpec(data: withMounts(mounts))
                Issue.record("\(mounts) must be refused")
            } catch {
                #expect(error.message.contains(words) && error.code == .invalidArgument, "\(error.message)")
            }
        }
        func run(_ arguments: [String]) -> (status: Int32, stdout: String) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: arguments[0])
            process.arguments = Array(arguments.dropFirst())
            let output = Pipe()
            process.standardOutput = output
            process.standardError = FileHandle.nullDevice
            guard (try? process.run()) != nil else { return (-1, "") }
            let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            return (process.terminationStatus, text)
        }
        let image = directory.appendingPathComponent("root.img").path
        #expect(run(["/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-d", "\(base)/root", image, "16M"]).status == 0)
        let plan = try BindMountCopy.plan(spec.bindMounts)
        try BindMountCopy.copy(plan.entries, into: image)
        func read(_ path: String) -> String { run(["/sbin/debugfs", "-R", "cat \(path)", image]).stdout }
        #expect(read("/etc/resolv.conf") == "nameserver 192.0.2.53\n")
        #expect(read("/data/volume/inner/file") == "deep\n")
        let listing = run(["/sbin/debugfs", "-R", "ls -l /data/volume", image]).stdout + run(["/sbin/debugfs", "-R", "stat /etc/resolv.conf", image]).stdout
        #expect(listing.contains("120777") && listing.contains("shortcut"), "the link is not a link: \(listing)")
        #expect(listing.contains("Mode:  0444"), "the read-only file kept its write bits: \(listing)")
        do throws(RPCError) {
            _ = try BindMountCopy.plan([.init(source: "\(base)/absent", destination: "/x", readOnly: false)])
            Issue.record("a missing source must be refused")
        } catch {
            #expect(error.message.contains("\(base)/absent on /x: No such file or directory"), "\(error.message)")
        }
    }

    @Test("the VM a spec asks for: the quota rounded up to vCPUs and a cap on the engine, the memory limit plus the guest's 64 MiB; the settings' size without limits")
    func machineSize() throws {
        let limited = try ContainerSpec(data: Self.spec(resources: #", "cpu": {"quota": 150000, "period": 100000}, "memory": {"limit": 134217728}"#))
        let size = limited.machineSize(defaults: ShimConfiguration())
        #expect(size.cpus == 2 && size.cpuCapPercent == 150 && size.memory == "192M")
        let plain = try ContainerSpec(data: Self.spec()).machineSize(defaults: ShimConfiguration())
        #expect(plain.cpus == 1 && plain.memory == "256M" && plain.cpuCapPercent == nil)
        // The spec's numbers are containerd's to choose, up to Int64's limit: sizes saturate
        // (at the most the library takes) instead of overflowing the shim.
        let huge = try ContainerSpec(data: Self.spec(resources: #", "cpu": {"quota": 9223372036854775807, "period": 1}, "memory": {"limit": 9223372036854775807}"#))
        let saturated = huge.machineSize(defaults: ShimConfiguration())
        #expect(saturated.cpus == 64 && saturated.cpuCapPercent == ContainerSpec.maximumCapPercent && saturated.memory == "\((Int64.max >> 20) + 1 + ShimConfiguration.guestOverheadMiB)M",
                "\(saturated)")
        #expect(ContainerSpec.capPercent(quota: 50_000, period: 100_000) == 50 && ContainerSpec.capPercent(quota: 1, period: 100_000) == 1)
    }

    @Test("VM names: readable when they fit the library's rule, else a hash; always a valid name")
    func names() {
        #expect(SandboxVM.name(namespace: "default", id: "web") == "ctr-default-web")
        let long = SandboxVM.name(namespace: "k8s.io", id: String(repeating: "ab", count: 32))
        #expect(long.count <= 64 && long.hasPrefix("ctr-abababab"), "\(long)")
        let odd = SandboxVM.name(namespace: "ns", id: "a/b c")
        #expect(odd.allSatisfy { $0.isLetter || $0.isNumber || "._-".contains($0) }, "\(odd)")
        #expect(SandboxVM.name(namespace: "ns", id: "a/b c") != SandboxVM.name(namespace: "ns", id: "a/b d"))
    }

    @Test("settings: the file's keys over the defaults, the environment over the file; an unknown engine, a missing kernel or a broken file is an error naming it")
    func settings() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("shim-settings-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let kernel = directory.appendingPathComponent("k").path, initrd = directory.appendingPathComponent("i").path
        #expect(FileManager.default.createFile(atPath: kernel, contents: Data()))
        #expect(FileManager.default.createFile(atPath: initrd, contents: Data()))
        let file = directory.appendingPathComponent("s.json")
        try Data(#"{"engine": "qemu", "kernel": "\#(kernel)", "initrd": "\#(initrd)", "memory": "512M"}"#.utf8).write(to: file)
        let loaded = try ShimConfiguration.load(configPath: file.path, environment: ["VIREO_HOME": "/srv/lib"])
        #expect(loaded.engine == "qemu" && loaded.memory == "512M" && loaded.cpus == 1 && loaded.library == "/srv/lib")
        let overridden = try ShimConfiguration.load(configPath: nil, environment: ["VIREO_SHIM_CONFIG": file.path, "VIREO_SHIM_ENGINE": "kvm"])
        #expect(overridden.engine == "kvm")
        for (body, words) in [(#"{"engine": "xen", "kernel": "\#(kernel)", "initrd": "\#(initrd)"}"#, "engine 'xen' is not one of kvm, qemu"),
                              (#"{"kernel": "/nonexistent"}"#, "the guest kernel /nonexistent does not exist"),
                              (#"{"cpus": "two"}"#, "are not valid")] {
            try Data(body.utf8).write(to: file)
            do throws(RPCError) {
                _ = try ShimConfiguration.load(configPath: file.path, environment: [:])
                Issue.record("\(body) must be refused")
            } catch {
                #expect(error.message.contains(words), "\(error.message)")
            }
        }
    }

    @Test("text the guest wrote loses its control characters before it reaches an error containerd shows")
    func guestText() {
        #expect(GuestText.printable("ok\u{1b}]0;owned\u{07}\nnext\u{9b}2J", limit: 100) == "ok?]0;owned?\nnext?2J")
        #expect(GuestText.printable(String(repeating: "a", count: 50), limit: 10).count == 10)
    }

    @Test("the wire: requests, replies and exits round-trip; frames split anywhere decode the same; varints past ten bytes or lengths past the end are refused")
    func wire() throws {
        var request = AgentRequest(.startProcess)
        request.container = "c"; request.handle = 9; request.args = ["sh", "-c", ""]; request.env = ["A=1"]; request.uid = 1000
        request.additionalGids = [1, 70000]; request.terminal = true; request.width = 80; request.height = 24; request.join = 1; request.stdin = true
        #expect(try AgentRequest(decoding: request.encoded) == request)
        var reply = AgentReply(error: "", pid: 77)
        reply.pids = [1, 2]; reply.memoryBytes = 1 << 40; reply.cpuNanoseconds = 5
        #expect(try AgentReply(decoding: reply.encoded) == reply)
        for exit in [AgentExit(status: 0), AgentExit(status: 137, oomKilled: true)] { #expect(try AgentExit(decoding: exit.encoded) == exit) }
        #expect(AgentExit(status: 3).encoded == [0x08, 0x03], "an ordinary exit is what older agents sent")
        let stream = AgentFrame(.request, stream: 3, payload: request.encoded).encoded + AgentFrame(.stdout, stream: 9, payload: [1, 2, 3]).encoded
        for split in 0...stream.count {
            var decoder = AgentFrameDecoder()
            decoder.append(stream[..<split])
            var frames: [AgentFrame] = []
            while let frame = try decoder.next() { frames.append(frame) }
            decoder.append(stream[split...])
            while let frame = try decoder.next() { frames.append(frame) }
            #expect(frames.map(\.stream) == [3, 9] && frames.last?.payload == [1, 2, 3])
        }
        #expect(throws: ProtoError.self) { try ProtoMessage([0x08] + Array(repeating: 0xff, count: 11)) }
        #expect(throws: ProtoError.self) { try ProtoMessage([0x0a, 0x05, 0x01]) }
        #expect(throws: ProtoError.self) { try ProtoMessage([0x0b]) }   // wire type 3 (groups): not proto3
    }
}
