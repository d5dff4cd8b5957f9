import ContainerWire
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// containerd's runtime v2 shim command line: `start` spawns the long-lived shim and prints its
/// ttrpc address; `delete` cleans up after a shim that died; with neither, serve the Task API on
/// the socket `start` handed over as descriptor 3.
public enum ShimMain {
    struct Flags {
        var namespace = "default"
        var address = ""
        var id = ""
        var bundle = FileManager.default.currentDirectoryPath
        var command = ""
    }

    static func parse(_ arguments: [String]) -> Flags {
        var flags = Flags()
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            let name = argument.hasPrefix("--") ? String(argument.dropFirst(2)) : argument.hasPrefix("-") ? String(argument.dropFirst()) : ""
            func value() -> String {
                index += 1
                return index < arguments.count ? arguments[index] : ""
            }
            switch name {
            case "namespace": flags.namespace = value()
            case "address": flags.address = value()
            case "id": flags.id = value()
            case "bundle": flags.bundle = value()
            case "publish-binary": _ = value()
            case "debug", "v": break
            case "": flags.command = argument
            default: break
            }
            index += 1
        }
        return flags
    }

    /// Where the shim listens: short (a Unix socket path has 108 bytes) and the same for the
    /// same container, so a second `start` finds the first.
    static func socketPath(_ flags: Flags) -> String {
        let key = "\(flags.address)|\(flags.namespace)|\(flags.id)"
        let digest = Array(key.utf8).reduce(UInt64(0xcbf2_9ce4_8422_2325)) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 }
        return "/run/vireo-shim/\(String(digest, radix: 16)).sock"
    }

    public static func run(_ arguments: [String]) -> Never {
        let flags = parse(Array(arguments.dropFirst()))
        switch flags.command {
        case "start": start(flags, arguments: arguments)
        case "delete": delete(flags)
        case "": serve(flags)
        default:
            FileHandle.standardError.write(Data("containerd-shim-vireo-v2: unknown command '\(flags.command)' (start, delete, or none to serve)\n".utf8))
            exit(2)
        }
    }

    static func start(_ flags: Flags, arguments: [String]) -> Never {
        guard !flags.id.isEmpty else { fail("-id is missing") }
        // A pod's containers share their sandbox's shim (and VM), as runc's shim groups them:
        // CRI names the sandbox in the spec's annotations.
        if let data = FileManager.default.contents(atPath: flags.bundle + "/config.json"),
           let spec = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
           let annotations = spec["annotations"] as? [String: String],
           annotations[TaskService.containerTypeAnnotation] == "container",
           let sandbox = annotations[TaskService.sandboxIDAnnotation], !sandbox.isEmpty, sandbox != flags.id {
            var sandboxFlags = flags
            sandboxFlags.id = sandbox
            let path = socketPath(sandboxFlags)
            guard let fd = try? UnixSocket.connect(path) else {
                fail("container \(flags.id) belongs to sandbox \(sandbox), whose shim is not running (no \(path))")
            }
            close(fd)
            try? ("unix://" + path).write(toFile: flags.bundle + "/address", atomically: true, encoding: .utf8)
            print("unix://" + path)
            exit(0)
        }
        let path = socketPath(flags)
        try? FileManager.default.createDirectory(atPath: "/run/vireo-shim", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let listener: Int32
        do { listener = try UnixSocket.listen(path) } catch { fail(error.message) }
        // The long-lived shim: the same binary without `start`, in its own session, the socket as
        // descriptor 3, its output to the bundle's log (containerd waits for this command's
        // output to end, so the child must not hold it).
        var child = arguments.filter { $0 != "start" }
        child[0] = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? arguments[0]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, listener, 3)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        posix_spawnattr_setflags(&attributes, 0x80) // POSIX_SPAWN_SETSID (glibc 2.26), not exported to Swift
        var pid: pid_t = 0
        let argv = child.map { strdup($0) } + [nil]
        let environment = ProcessInfo.processInfo.environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        let spawned = posix_spawn(&pid, child[0], &actions, &attributes, argv, environment)
        guard spawned == 0 else { fail("cannot start the shim: \(String(cString: strerror(spawned)))") }
        let address = "unix://" + path
        try? address.write(toFile: flags.bundle + "/address", atomically: true, encoding: .utf8)
        print(address)
        exit(0)
    }

    /// After a shim died: take its VM and files away and say how the task ended.
    static func delete(_ flags: Flags) -> Never {
        ShimLog.open(flags.bundle + "/shim.log")
        let environment = ProcessInfo.processInfo.environment
        let configuration = (try? ShimConfiguration.load(configPath: nil, environment: environment)) ?? {
            var fallback = ShimConfiguration()
            fallback.library = environment["VIREO_HOME"]
            return fallback
        }()
        let vm = SandboxVM.recorded(inBundle: flags.bundle, configuration: configuration)
            ?? SandboxVM(name: SandboxVM.name(namespace: flags.namespace, id: flags.id), configuration: configuration)
        do { try vm.remove() } catch { ShimLog.write("delete: \(error.message)") }
        umount2(flags.bundle + "/rootfs", Int32(MNT_DETACH))
        try? FileManager.default.removeItem(atPath: flags.bundle + "/vireo-rootfs.img")
        unlink(socketPath(flags))
        var response = ProtoWriter()
        response.uint32(2, 128 + UInt32(SIGKILL))
        response.message(3, TaskService.timestamp(Date()))
        FileHandle.standardOutput.write(Data(response.bytes))
        exit(0)
    }

    static func serve(_ flags: Flags) -> Never {
        // containerd reads the bundle's `log` FIFO while the shim lives; a file otherwise.
        let fifo = flags.bundle + "/log"
        let logFd = open(fifo, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
        if logFd >= 0 {
            _ = fcntl(logFd, F_SETFL, fcntl(logFd, F_GETFL) & ~O_NONBLOCK)
            ShimLog.fd = logFd
        } else {
            ShimLog.open(flags.bundle + "/shim.log")
        }
        signal(SIGPIPE, SIG_IGN)
        let environment = ProcessInfo.processInfo.environment
        let service = TaskService(namespace: flags.namespace, containerID: flags.id,
                                  events: EventPublisher(address: environment["TTRPC_ADDRESS"], namespace: flags.namespace),
                                  environment: environment)
        service.socketPath = socketPath(flags)
        ShimLog.write("serving \(flags.namespace)/\(flags.id) on \(socketPath(flags))")
        let server = TTRPCServer(listener: 3, service: TaskService.serviceName) { method, payload throws(RPCError) in
            try service.handle(method: method, payload: payload)
        }
        server.serve()
    }

    static func fail(_ message: String) -> Never {
        FileHandle.standardError.write(Data("containerd-shim-vireo-v2: \(message)\n".utf8))
        exit(1)
    }
}
