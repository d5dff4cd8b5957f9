import ContainerWire
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// containerd.task.v2.Task for one container in its own sandbox VM (docs/containerd.md).
/// Field numbers are runtime/v2/task/shim.proto's; statuses containerd.v1.types.Status's.
public final class TaskService: AgentEvents, @unchecked Sendable {
    public static let serviceName = "containerd.task.v2.Task"

    enum Status: UInt64 { case unknown = 0, created = 1, running = 2, stopped = 3, paused = 4 }

    /// One process of the container; every field is guarded by the service's lock.
    final class Process: @unchecked Sendable {
        let execID: String
        let handle: UInt32
        let stdin: String, stdout: String, stderr: String
        let terminal: Bool
        let spec: OCIProcess
        var pid: UInt32 = 0
        var status = Status.created
        var exitStatus: UInt32 = 0
        var exitedAt = Date(timeIntervalSince1970: 0)
        var outputs: [AgentFrameKind: FileHandle] = [:]

        init(execID: String, handle: UInt32, stdin: String, stdout: String, stderr: String, terminal: Bool, spec: OCIProcess) {
            self.execID = execID; self.handle = handle; self.stdin = stdin; self.stdout = stdout; self.stderr = stderr
            self.terminal = terminal; self.spec = spec
        }
    }

    let namespace: String
    let containerID: String
    let events: EventPublisher
    let environment: [String: String]
    let lock = NSCondition()
    var bundle = ""
    var hostname = ""
    var vm: SandboxVM?
    var agent: AgentClient?
    var rootImage = ""
    var mountedRootfs: String?
    var processes: [String: Process] = [:]
    var nextHandle: UInt32 = 1
    var paused = false
    var deleted = false
    /// The socket the shim serves on, removed when it shuts down.
    public var socketPath: String?

    public init(namespace: String, containerID: String, events: EventPublisher, environment: [String: String]) {
        self.namespace = namespace
        self.containerID = containerID
        self.events = events
        self.environment = environment
    }

    public func handle(method: String, payload: [UInt8]) throws(RPCError) -> [UInt8] {
        let request: ProtoMessage
        do { request = try ProtoMessage(payload) } catch { throw RPCError(.invalidArgument, "\(method): \(error)") }
        ShimLog.write("\(method) \(request.string(1)) \(request.string(2))")
        do throws(RPCError) {
            switch method {
            case "Create": return try create(request)
            case "Start": return try start(request)
            case "State": return try state(request)
            case "Wait": return try wait(request)
            case "Kill": return try kill(request)
            case "Delete": return try delete(request)
            case "Exec": return try exec(request)
            case "Pids": return try pids(request)
            case "Pause": return try pause(true)
            case "Resume": return try pause(false)
            case "ResizePty": return try resize(request)
            case "CloseIO": return try closeIO(request)
            case "Stats": return try stats(request)
            case "Connect": return connect()
            case "Shutdown": return shutdown(request)
            case "Update":
                throw RPCError(.unimplemented, "a running Vireo container's resources cannot change yet: its VM's size is set when the container is created")
            case "Checkpoint":
                throw RPCError(.unimplemented, "checkpointing a Vireo container is not implemented (vireo save works on the sandbox VM itself)")
            default: throw RPCError(.unimplemented, "\(method) is not a method of \(Self.serviceName)")
            }
        } catch {
            ShimLog.write("\(method) failed: \(error.message)")
            throw error
        }
    }

    // MARK: - Encoding helpers

    static func timestamp(_ date: Date) -> ProtoWriter {
        var writer = ProtoWriter()
        let seconds = date.timeIntervalSince1970
        writer.int64(1, Int64(seconds.rounded(.down)))
        writer.int32(2, Int32((seconds - seconds.rounded(.down)) * 1e9))
        return writer
    }

    func process(_ request: ProtoMessage) throws(RPCError) -> Process {
        try process(execID: request.string(2), id: request.string(1))
    }

    func process(execID: String, id: String) throws(RPCError) -> Process {
        guard id == containerID || id.isEmpty else { throw RPCError(.notFound, "this shim serves container \(containerID), not \(id)") }
        guard let process = processes[execID] else {
            throw RPCError(.notFound, execID.isEmpty ? "container \(containerID) is not created" : "exec \(execID) does not exist in container \(containerID)")
        }
        return process
    }

    // MARK: - Methods

    func create(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        guard processes[""] == nil else { throw RPCError(.alreadyExists, "container \(containerID) is already created") }
        let id = request.string(1)
        guard id == containerID else { throw RPCError(.invalidArgument, "id \(id) is not this shim's container \(containerID)") }
        bundle = request.string(2)
        guard request.string(8).isEmpty else { throw RPCError(.unimplemented, "restoring a container from a checkpoint is not implemented") }
        let specData: Data
        do { specData = try Data(contentsOf: URL(fileURLWithPath: bundle + "/config.json")) } catch {
            throw RPCError(.invalidArgument, "the bundle's config.json cannot be read: \(error)")
        }
        let spec = try ContainerSpec(data: specData)
        var configPath: String?
        if let options = try? request.message(10), options.string(1).hasSuffix("runtimeoptions.v1.Options"), let inner = try? ProtoMessage(options.bytes(2)) {
            configPath = inner.string(2)
        }
        let configuration = try ShimConfiguration.load(configPath: configPath, environment: environment)
        let terminal = request.bool(4)
        guard terminal == spec.process.terminal else {
            throw RPCError(.invalidArgument, "the request's terminal (\(terminal)) and config.json's process.terminal (\(spec.process.terminal)) disagree")
        }
        let rootfs = try prepareRootfs(mounts: (try? request.messages(3)) ?? [], spec: spec)
        let size = spec.machineSize(defaults: configuration)
        let vm = SandboxVM(name: SandboxVM.name(namespace: namespace, id: containerID), configuration: configuration)
        // Where the VM lives, for `shim delete` after this process died: the settings that chose
        // the library may have come from the runtime options, which that command is not given.
        try? vm.directory.write(toFile: bundle + "/" + SandboxVM.recordName, atomically: true, encoding: .utf8)
        do {
            try vm.create(rootImage: rootfs, cpus: size.cpus, memory: size.memory, cpuCapPercent: size.cpuCapPercent)
            self.vm = vm
            try vm.start()
            let agent = try vm.connectAgent(events: self)
            self.agent = agent
            var mount = AgentRequest(.mountRootfs)
            mount.container = containerID
            mount.device = "/dev/vda"
            mount.fileSystem = "ext4"
            _ = try agent.request(mount)
        } catch {
            try? vm.remove()
            self.vm = nil
            agent = nil
            try? FileManager.default.removeItem(atPath: rootImage)
            throw error
        }
        // As Docker does: a container without a host name of its own is called by its id.
        hostname = spec.hostname.isEmpty ? String(containerID.prefix(63)) : spec.hostname
        let process = Process(execID: "", handle: nextHandle, stdin: request.string(5), stdout: request.string(6), stderr: request.string(7),
                              terminal: terminal, spec: spec.process)
        nextHandle += 1
        process.pid = vm.enginePid
        processes[""] = process
        var event = ProtoWriter()
        event.string(1, containerID)
        event.string(2, bundle)
        var io = ProtoWriter()
        io.string(1, process.stdin); io.string(2, process.stdout); io.string(3, process.stderr); io.bool(4, terminal)
        event.message(4, io)
        event.uint32(6, process.pid)
        events.publish(topic: "/tasks/create", type: "containerd.events.TaskCreate", event: event)
        var response = ProtoWriter()
        response.uint32(1, process.pid)
        return response.bytes
    }

    /// The container's root as a raw ext4 image made from its files (`mke2fs -d`): the guest
    /// gets a block device of its own, and nothing in it is a host path.
    func prepareRootfs(mounts: [ProtoMessage], spec: ContainerSpec) throws(RPCError) -> String {
        var root = spec.rootPath.hasPrefix("/") ? spec.rootPath : bundle + "/" + spec.rootPath
        if !mounts.isEmpty {
            root = bundle + "/rootfs"
            try? FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            for mount in mounts {
                let type = mount.string(1), source = mount.string(2), options = mount.strings(4)
                var flags: UInt = 0
                var data: [String] = []
                for option in options {
                    switch option {
                    case "ro": flags |= UInt(MS_RDONLY)
                    case "rbind": flags |= UInt(MS_BIND | MS_REC)
                    case "bind": flags |= UInt(MS_BIND)
                    case "rw": break
                    default: data.append(option)
                    }
                }
                guard Glibc.mount(source, root, type, flags, data.joined(separator: ",")) == 0 else {
                    throw RPCError(.internal, "mount the root file system (\(type) from \(source)): \(String(cString: strerror(errno)))")
                }
                mountedRootfs = root
            }
        }
        defer {
            if let mounted = mountedRootfs, umount2(mounted, Int32(MNT_DETACH)) == 0 { mountedRootfs = nil }
        }
        let used = Self.diskUsage(root)
        let sizeMiB = max(64, (used * 3 / 2) >> 20 + 64)
        rootImage = bundle + "/vireo-rootfs.img"
        let mke2fs = Foundation.Process()
        mke2fs.executableURL = URL(fileURLWithPath: "/sbin/mke2fs")
        mke2fs.arguments = ["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-O", "^has_journal", "-d", root, rootImage, "\(sizeMiB)M"]
        let errors = Pipe()
        mke2fs.standardError = errors
        mke2fs.standardOutput = errors
        do { try mke2fs.run() } catch { throw RPCError(.internal, "cannot run mke2fs: \(error)") }
        let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        mke2fs.waitUntilExit()
        guard mke2fs.terminationStatus == 0 else { throw RPCError(.internal, "mke2fs could not make the root file system image: \(text)") }
        return rootImage
    }

    static func diskUsage(_ root: String) -> Int {
        var total = 0
        guard let walker = FileManager.default.enumerator(atPath: root) else { return 0 }
        while let path = walker.nextObject() as? String {
            var status = stat()
            if lstat(root + "/" + path, &status) == 0 { total += Int(status.st_blocks) * 512 + 4096 }
        }
        return total
    }

    func start(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        // The agent is asked without the lock held: its reply may queue behind output frames of
        // the container's other processes, which the channel's reader hands over under the lock.
        let (process, agent, start) = try { () throws(RPCError) -> (Process, AgentClient, AgentRequest) in
            lock.lock()
            defer { lock.unlock() }
            let process = try self.process(request)
            guard process.status == .created else { throw RPCError(.failedPrecondition, "process \(process.execID.isEmpty ? containerID : process.execID) is \(process.status), not created") }
            guard let agent = self.agent else { throw RPCError(.failedPrecondition, "the sandbox VM is not running") }
            process.status = .running
            // Open the outputs before the process runs, so nothing it writes is lost.
            for (path, kind) in [(process.stdout, AgentFrameKind.stdout), (process.stderr, .stderr)] where !path.isEmpty {
                if let handle = FileHandle(forWritingAtPath: path) { process.outputs[kind] = handle }
            }
            var start = AgentRequest(.startProcess)
            start.container = containerID
            start.handle = process.handle
            start.args = process.spec.args
            start.env = process.spec.env
            start.cwd = process.spec.cwd
            start.uid = process.spec.uid
            start.gid = process.spec.gid
            start.additionalGids = process.spec.additionalGids
            start.terminal = process.terminal
            start.hostname = process.execID.isEmpty ? hostname : ""
            start.join = process.execID.isEmpty ? 0 : processes[""]?.handle ?? 0
            start.stdin = !process.stdin.isEmpty
            return (process, agent, start)
        }()
        let pid: UInt32
        do throws(RPCError) {
            pid = try agent.request(start).pid
        } catch {
            lock.lock()
            defer { lock.unlock() }
            process.status = .stopped
            process.exitStatus = 127
            process.exitedAt = Date()
            process.outputs.values.forEach { try? $0.close() }
            process.outputs = [:]
            lock.broadcast()
            throw error
        }
        lock.lock()
        process.pid = pid
        lock.unlock()
        if !process.stdin.isEmpty { forwardStdin(process) }
        var event = ProtoWriter()
        event.string(1, containerID)
        if process.execID.isEmpty {
            event.uint32(2, process.pid)
            events.publish(topic: "/tasks/start", type: "containerd.events.TaskStart", event: event)
        } else {
            event.string(2, process.execID)
            event.uint32(3, process.pid)
            events.publish(topic: "/tasks/exec-started", type: "containerd.events.TaskExecStarted", event: event)
        }
        var response = ProtoWriter()
        response.uint32(1, process.pid)
        return response.bytes
    }

    /// containerd's stdin FIFO to the process, then its end (CloseIO may end it sooner).
    func forwardStdin(_ process: Process) {
        let path = process.stdin
        Thread.detachNewThread { [self] in
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return }
            defer { close(fd) }
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { break }
                guard let agent = self.currentAgent, (try? agent.stdin(handle: process.handle, bytes: Array(buffer[0..<count]))) != nil else { return }
            }
            var close = AgentRequest(.closeStdin)
            close.handle = process.handle
            _ = try? self.currentAgent?.request(close)
        }
    }

    var currentAgent: AgentClient? {
        lock.lock()
        defer { lock.unlock() }
        return agent
    }

    func state(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        let process = try self.process(request)
        var response = ProtoWriter()
        response.string(1, containerID)
        response.string(2, bundle)
        response.uint32(3, process.pid)
        response.varint(4, (paused && process.status == .running ? Status.paused : process.status).rawValue)
        response.string(5, process.stdin)
        response.string(6, process.stdout)
        response.string(7, process.stderr)
        response.bool(8, process.terminal)
        response.uint32(9, process.exitStatus)
        response.message(10, Self.timestamp(process.exitedAt))
        response.string(11, process.execID)
        return response.bytes
    }

    func wait(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        let process = try self.process(request)
        while process.status != .stopped { lock.wait() }
        var response = ProtoWriter()
        response.uint32(1, process.exitStatus)
        response.message(2, Self.timestamp(process.exitedAt))
        return response.bytes
    }

    func kill(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        let process: Process
        do { process = try self.process(request) } catch { lock.unlock(); throw error }
        let signal = request.uint32(3), all = request.bool(4)
        if process.status == .created {
            // Never started: it ends here, as runc's shim ends a created process.
            finish(process, status: 128 + signal)
            lock.unlock()
            return []
        }
        guard process.status != .stopped || all else {
            lock.unlock()
            throw RPCError(.notFound, "process \(process.execID.isEmpty ? containerID : process.execID) has already finished")
        }
        let agent = self.agent
        lock.unlock()
        guard let agent else { throw RPCError(.failedPrecondition, "the sandbox VM is not running") }
        var kill = AgentRequest(.signal)
        kill.handle = process.handle
        kill.signal = signal
        kill.all = all
        _ = try agent.request(kill)
        return []
    }

    func exec(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        let execID = request.string(2)
        guard !execID.isEmpty else { throw RPCError(.invalidArgument, "exec_id: missing") }
        guard let first = processes[""], first.status == .running else { throw RPCError(.failedPrecondition, "container \(containerID) is not running") }
        guard processes[execID] == nil else { throw RPCError(.alreadyExists, "exec \(execID) already exists") }
        guard let any = try? request.message(7) else { throw RPCError(.invalidArgument, "spec: missing; an exec needs its process") }
        let json: Any
        do { json = try JSONSerialization.jsonObject(with: Data(any.bytes(2))) } catch { throw RPCError(.invalidArgument, "spec: not an OCI process in JSON: \(error)") }
        let spec = try OCIProcess(json: json)
        let terminal = request.bool(3)
        let process = Process(execID: execID, handle: nextHandle, stdin: request.string(4), stdout: request.string(5), stderr: request.string(6),
                              terminal: terminal, spec: spec)
        nextHandle += 1
        processes[execID] = process
        var event = ProtoWriter()
        event.string(1, containerID)
        event.string(2, execID)
        events.publish(topic: "/tasks/exec-added", type: "containerd.events.TaskExecAdded", event: event)
        return []
    }

    func delete(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        let process = try { () throws(RPCError) -> Process in
            lock.lock()
            defer { lock.unlock() }
            let process = try self.process(request)
            guard process.status == .stopped || process.status == .created else {
                throw RPCError(.failedPrecondition, "process \(process.execID.isEmpty ? containerID : process.execID) is still running; kill it first")
            }
            if process.execID.isEmpty {
                for (execID, other) in processes where !execID.isEmpty && other.status == .running {
                    throw RPCError(.failedPrecondition, "exec \(execID) is still running in container \(containerID)")
                }
                deleted = true
            }
            if process.status == .created { finish(process, status: 0) }
            processes[process.execID] = nil
            return process
        }()
        if process.execID.isEmpty {
            tearDown()
            var event = ProtoWriter()
            event.string(1, containerID)
            event.uint32(2, process.pid)
            event.uint32(3, process.exitStatus)
            event.message(4, Self.timestamp(process.exitedAt))
            event.string(5, containerID)
            events.publish(topic: "/tasks/delete", type: "containerd.events.TaskDelete", event: event)
        }
        var response = ProtoWriter()
        response.uint32(1, process.pid)
        response.uint32(2, process.exitStatus)
        response.message(3, Self.timestamp(process.exitedAt))
        return response.bytes
    }

    /// Removes the VM, the root image and any mount: nothing of the container stays behind.
    /// Called without the lock: the agent's last reply may queue behind output frames.
    func tearDown() {
        lock.lock()
        let (agent, vm, mounted, image) = (self.agent, self.vm, mountedRootfs, rootImage)
        self.agent = nil
        self.vm = nil
        mountedRootfs = nil
        rootImage = ""
        lock.unlock()
        if let agent {
            var remove = AgentRequest(.removeContainer)
            remove.container = containerID
            _ = try? agent.request(remove, timeoutSeconds: 5)
        }
        if let vm {
            do { try vm.remove() } catch { ShimLog.write("removing the sandbox VM: \(error.message)") }
        }
        if let mounted { umount2(mounted, Int32(MNT_DETACH)) }
        if !image.isEmpty { try? FileManager.default.removeItem(atPath: image) }
    }

    func pids(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        let agent = self.agent
        lock.unlock()
        guard let agent else { throw RPCError(.failedPrecondition, "the sandbox VM is not running") }
        var query = AgentRequest(.pids)
        query.container = containerID
        var response = ProtoWriter()
        for pid in try agent.request(query).pids {
            var info = ProtoWriter()
            info.uint32(1, pid)
            response.message(1, info)
        }
        return response.bytes
    }

    func pause(_ pausing: Bool) throws(RPCError) -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        guard let vm, processes[""] != nil else { throw RPCError(.failedPrecondition, "container \(containerID) is not created") }
        guard paused != pausing else { return [] }
        // The whole VM stops between instructions: every process of the container, as a frozen cgroup.
        if pausing { try vm.pause() } else { try vm.resume() }
        paused = pausing
        var event = ProtoWriter()
        event.string(1, containerID)
        events.publish(topic: pausing ? "/tasks/paused" : "/tasks/resumed", type: pausing ? "containerd.events.TaskPaused" : "containerd.events.TaskResumed", event: event)
        return []
    }

    func resize(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        let process: Process
        do { process = try self.process(request) } catch { lock.unlock(); throw error }
        let agent = self.agent
        lock.unlock()
        guard let agent, process.status == .running else { throw RPCError(.failedPrecondition, "the process is not running") }
        var resize = AgentRequest(.resize)
        resize.handle = process.handle
        resize.width = request.uint32(3)
        resize.height = request.uint32(4)
        _ = try agent.request(resize)
        return []
    }

    func closeIO(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        let process: Process
        do { process = try self.process(request) } catch { lock.unlock(); throw error }
        let agent = self.agent
        lock.unlock()
        guard request.bool(3), let agent, process.status == .running else { return [] }
        var close = AgentRequest(.closeStdin)
        close.handle = process.handle
        _ = try agent.request(close)
        return []
    }

    /// cgroups v1 Metrics, as `ctr task metrics` reads them, from the agent's view of the
    /// container's processes (their resident memory and CPU time).
    func stats(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        let agent = self.agent
        lock.unlock()
        guard let agent else { throw RPCError(.failedPrecondition, "the sandbox VM is not running") }
        var query = AgentRequest(.stats)
        query.container = containerID
        let figures = try agent.request(query)
        var pidsQuery = AgentRequest(.pids)
        pidsQuery.container = containerID
        let count = try agent.request(pidsQuery).pids.count
        var metrics = ProtoWriter()
        var pidsStat = ProtoWriter()
        pidsStat.varint(1, UInt64(count))
        metrics.message(2, pidsStat)
        var usage = ProtoWriter()
        usage.varint(1, figures.cpuNanoseconds)
        var cpu = ProtoWriter()
        cpu.message(1, usage)
        metrics.message(3, cpu)
        var memoryUsage = ProtoWriter()
        memoryUsage.varint(2, figures.memoryBytes)
        var memory = ProtoWriter()
        memory.varint(2, figures.memoryBytes)
        memory.message(33, memoryUsage)
        metrics.message(4, memory)
        var any = ProtoWriter()
        any.string(1, "io.containerd.cgroups.v1.Metrics")
        any.bytes(2, metrics.bytes, always: true)
        var response = ProtoWriter()
        response.message(1, any)
        return response.bytes
    }

    func connect() -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        var response = ProtoWriter()
        response.uint32(1, UInt32(getpid()))
        response.uint32(2, processes[""]?.pid ?? 0)
        response.string(3, "vireo")
        return response.bytes
    }

    func shutdown(_ request: ProtoMessage) -> [UInt8] {
        lock.lock()
        let done = processes.isEmpty
        lock.unlock()
        // Only once the container is gone (or never was): containerd asks after every Delete.
        if done || request.bool(2) {
            if request.bool(2) {
                lock.lock()
                deleted = true
                lock.unlock()
                tearDown()
            }
            let socket = socketPath
            Thread.detachNewThread {
                usleep(100_000)
                if let socket { unlink(socket) }
                exit(0)
            }
        }
        return []
    }

    // MARK: - Agent events (the agent channel's reader thread, in the stream's order)

    func finish(_ process: Process, status: UInt32) {
        guard process.status != .stopped else { return }
        process.status = .stopped
        process.exitStatus = status
        process.exitedAt = Date()
        process.outputs.values.forEach { try? $0.close() }
        process.outputs = [:]
        lock.broadcast()
        var event = ProtoWriter()
        event.string(1, containerID)
        event.string(2, process.execID.isEmpty ? containerID : process.execID)
        event.uint32(3, process.pid)
        event.uint32(4, status)
        event.message(5, Self.timestamp(process.exitedAt))
        events.publish(topic: "/tasks/exit", type: "containerd.events.TaskExit", event: event)
    }

    public func output(handle: UInt32, kind: AgentFrameKind, bytes: [UInt8]) {
        lock.lock()
        let target = processes.values.first { $0.handle == handle }?.outputs[kind]
        lock.unlock()
        try? target?.write(contentsOf: bytes)
    }

    public func outputClosed(handle: UInt32, kind: AgentFrameKind) {}

    public func exited(handle: UInt32, status: UInt32) {
        lock.lock()
        defer { lock.unlock() }
        guard let process = processes.values.first(where: { $0.handle == handle }) else { return }
        finish(process, status: status)
    }

    public func channelLost(reason: String) {
        lock.lock()
        defer { lock.unlock() }
        guard !deleted, agent != nil else { return }
        ShimLog.write("the sandbox VM's agent is gone (\(reason)); its processes are reported killed")
        for process in processes.values where process.status == .running { finish(process, status: 128 + UInt32(SIGKILL)) }
    }
}

/// Publishes task events to containerd (`TTRPC_ADDRESS`), in order, off the caller's thread.
public final class EventPublisher: @unchecked Sendable {
    let address: String?
    let namespace: String
    let queue = DispatchQueue(label: "vireo.shim.events")
    var client: TTRPCClient?

    public init(address: String?, namespace: String) {
        self.address = address.map { $0.hasPrefix("unix://") ? String($0.dropFirst(7)) : $0 }
        self.namespace = namespace
    }

    func publish(topic: String, type: String, event: ProtoWriter) {
        guard let address else { return }
        let namespace = self.namespace
        queue.async { [self] in
            var any = ProtoWriter()
            any.string(1, type)
            any.bytes(2, event.bytes, always: true)
            var envelope = ProtoWriter()
            envelope.message(1, TaskService.timestamp(Date()))
            envelope.string(2, namespace)
            envelope.string(3, topic)
            envelope.message(4, any)
            var forward = ProtoWriter()
            forward.message(1, envelope)
            do throws(RPCError) {
                if client == nil { client = try TTRPCClient(path: address) }
                _ = try client?.call(service: "containerd.services.events.ttrpc.v1.Events", method: "Forward", payload: forward.bytes)
            } catch {
                client = nil
                ShimLog.write("publishing \(topic): \(error.message)")
            }
        }
    }
}
