import CHostSupport
import ContainerWire
import MachineSpec
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
        /// containerd's stdin FIFO being passed on to the process (`forwardStdin`).
        var stdinForwarder = StdinForwarder.none

        enum StdinForwarder { case none, running, finished }

        init(execID: String, handle: UInt32, stdin: String, stdout: String, stderr: String, terminal: Bool, spec: OCIProcess) {
            self.execID = execID; self.handle = handle; self.stdin = stdin; self.stdout = stdout; self.stderr = stderr
            self.terminal = terminal; self.spec = spec
        }
    }

    /// One container of the sandbox: its bundle, its processes (its first under ""), and where
    /// its root file system came from.
    final class Container: @unchecked Sendable {
        let id: String
        let bundle: String
        var hostname = ""
        var processes: [String: Process] = [:]
        /// The disk image made for it (the sandbox's own, or a spare slot's file).
        var rootImage = ""
        /// A spare slot of the sandbox VM this container's root is written to (not the first container).
        var slot: Int?
        /// The memory limit its VM was sized for (the sandbox's own container).
        var memoryLimitBytes: Int64?
        /// The VM's RAM (the limit plus the guest's overhead, or the settings' size).
        var vmMemoryBytes: UInt64?
        init(id: String, bundle: String) { self.id = id; self.bundle = bundle }
    }

    let namespace: String
    /// The container the shim was started for: the sandbox, whose VM every container shares.
    let sandboxID: String
    let events: EventPublisher
    let environment: [String: String]
    let lock = NSCondition()
    var vm: SandboxVM?
    var agent: AgentClient?
    var configuration = ShimConfiguration()
    var containers: [String: Container] = [:]
    /// Containers whose Create is under way (the lock is not held through it).
    var creating: Set<String> = []
    /// Spare disk slots of the sandbox VM: the image file of each, and the container using it.
    var slots: [(path: String, user: String?)] = []
    var nextHandle: UInt32 = 1
    var paused = false
    var deleted = false
    /// The socket the shim serves on, removed when it shuts down.
    public var socketPath: String?

    public init(namespace: String, containerID: String, events: EventPublisher, environment: [String: String]) {
        self.namespace = namespace
        self.sandboxID = containerID
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
            case "Pause": return try pause(request, true)
            case "Resume": return try pause(request, false)
            case "ResizePty": return try resize(request)
            case "CloseIO": return try closeIO(request)
            case "Stats": return try stats(request)
            case "Connect": return connect()
            case "Shutdown": return shutdown(request)
            case "Update": return try update(request)
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

    /// The container a request names (the lock is held).
    func container(_ id: String) throws(RPCError) -> Container {
        guard let container = containers[id.isEmpty ? sandboxID : id] else { throw RPCError(.notFound, "container \(id) is not created in this sandbox") }
        return container
    }

    func process(_ request: ProtoMessage) throws(RPCError) -> Process {
        try process(execID: request.string(2), id: request.string(1))
    }

    func process(execID: String, id: String) throws(RPCError) -> Process {
        let container = try container(id)
        guard let process = container.processes[execID] else {
            throw RPCError(.notFound, execID.isEmpty ? "container \(container.id) is not created" : "exec \(execID) does not exist in container \(container.id)")
        }
        return process
    }

    /// Every process of every container, for the agent's events, which name a handle.
    func process(handle: UInt32) -> (Container, Process)? {
        for container in containers.values {
            if let process = container.processes.values.first(where: { $0.handle == handle }) { return (container, process) }
        }
        return nil
    }

    // MARK: - Methods

    /// CRI's annotations: a pod's first container is its sandbox, the rest join its VM.
    static let sandboxIDAnnotation = "io.kubernetes.cri.sandbox-id"
    static let containerTypeAnnotation = "io.kubernetes.cri.container-type"

    func create(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        let id = request.string(1)
        // The lock is not held while the VM starts or the root is written and mounted: the
        // agent's replies may queue behind output frames of the pod's running containers, which
        // the channel's reader hands over under the lock.
        lock.lock()
        guard containers[id] == nil, !creating.contains(id) else {
            lock.unlock()
            throw RPCError(.alreadyExists, "container \(id) is already created")
        }
        creating.insert(id)
        lock.unlock()
        defer {
            lock.lock()
            creating.remove(id)
            lock.unlock()
        }
        let bundle = request.string(2)
        guard request.string(8).isEmpty else { throw RPCError(.unimplemented, "restoring a container from a checkpoint is not implemented") }
        let specData: Data
        do { specData = try Data(contentsOf: URL(fileURLWithPath: bundle + "/config.json")) } catch {
            throw RPCError(.invalidArgument, "the bundle's config.json cannot be read: \(error)")
        }
        let spec = try ContainerSpec(data: specData)
        let terminal = request.bool(4)
        guard terminal == spec.process.terminal else {
            throw RPCError(.invalidArgument, "the request's terminal (\(terminal)) and config.json's process.terminal (\(spec.process.terminal)) disagree")
        }
        let container = Container(id: id, bundle: bundle)
        // As Docker does: a container without a host name of its own is called by its id.
        container.hostname = spec.hostname.isEmpty ? String(id.prefix(63)) : spec.hostname
        let mounts = (try? request.messages(3)) ?? []
        if id == sandboxID {
            try createSandbox(container, request: request, spec: spec, mounts: mounts)
        } else {
            try join(container, spec: spec, mounts: mounts)
        }
        lock.lock()
        let process = Process(execID: "", handle: nextHandle, stdin: request.string(5), stdout: request.string(6), stderr: request.string(7),
                              terminal: terminal, spec: spec.process)
        nextHandle += 1
        process.pid = vm?.enginePid ?? 0
        container.processes[""] = process
        containers[id] = container
        lock.unlock()
        var event = ProtoWriter()
        event.string(1, id)
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

    /// The shim's own container: its VM, with spare disk slots when it is a pod's sandbox.
    func createSandbox(_ container: Container, request: ProtoMessage, spec: ContainerSpec, mounts: [ProtoMessage]) throws(RPCError) {
        var configPath: String?
        if let options = try? request.message(10), options.string(1).hasSuffix("runtimeoptions.v1.Options"), let inner = try? ProtoMessage(options.bytes(2)) {
            configPath = inner.string(2)
        }
        let configuration = try ShimConfiguration.load(configPath: configPath, environment: environment)
        let uuid = UUID().uuidString.lowercased()
        container.rootImage = container.bundle + "/vireo-rootfs.img"
        try Self.makeRootImage(container.rootImage, bundle: container.bundle, mounts: mounts, spec: spec, uuid: uuid, fixedSize: nil)
        let isPod = spec.annotations[Self.containerTypeAnnotation] == "sandbox"
        let size = spec.machineSize(defaults: configuration)
        container.memoryLimitBytes = spec.memoryLimitBytes
        container.vmMemoryBytes = try? Size.parse(size.memory)
        let vm = SandboxVM(name: SandboxVM.name(namespace: namespace, id: container.id), configuration: configuration)
        // Where the VM lives, for `shim delete` after this process died: the settings that chose
        // the library may have come from the runtime options, which that command is not given.
        try? vm.directory.write(toFile: container.bundle + "/" + SandboxVM.recordName, atomically: true, encoding: .utf8)
        var spares: [String] = []
        do throws(RPCError) {
            // A pod's other containers get their roots on spare disks made now (sparse files the
            // shim fills when a container joins): the engines add no disks to a running VM.
            if isPod {
                for index in 0..<configuration.podSlots {
                    let path = container.bundle + "/vireo-slot\(index).img"
                    guard FileManager.default.createFile(atPath: path, contents: nil), truncate(path, off_t(configuration.podDiskBytes)) == 0 else {
                        throw RPCError(.internal, "cannot make the pod's spare disk \(path): \(String(cString: strerror(errno)))")
                    }
                    spares.append(path)
                }
            }
            try vm.create(rootImage: container.rootImage, cpus: size.cpus, memory: size.memory, cpuCapPercent: size.cpuCapPercent, spareDisks: spares,
                          networkNamespace: spec.networkNamespacePath)
            try vm.start()
            let agent = try vm.connectAgent(events: self)
            try mountRoot(of: container.id, uuid: uuid, agent: agent)
            lock.lock()
            self.configuration = configuration
            self.vm = vm
            self.agent = agent
            slots = spares.map { ($0, nil) }
            lock.unlock()
        } catch {
            try? vm.remove()
            for path in spares + [container.rootImage] { try? FileManager.default.removeItem(atPath: path) }
            throw error
        }
    }

    /// Another container of the pod: its root written onto a free spare disk of the running VM.
    func join(_ container: Container, spec: ContainerSpec, mounts: [ProtoMessage]) throws(RPCError) {
        // A free slot is claimed under the lock and given back if anything fails.
        let (agent, slot, slotPath, diskBytes) = try { () throws(RPCError) -> (AgentClient, Int, String, UInt64) in
            lock.lock()
            defer { lock.unlock() }
            guard let agent = self.agent, vm != nil, containers[sandboxID] != nil else {
                throw RPCError(.failedPrecondition, "container \(container.id) joins sandbox \(sandboxID), whose VM is not running")
            }
            guard let slot = slots.firstIndex(where: { $0.user == nil }) else {
                throw RPCError(.failedPrecondition, slots.isEmpty
                    ? "sandbox \(sandboxID) is not a pod's sandbox (its annotation \(Self.containerTypeAnnotation) is not \"sandbox\"), so it has no room for another container"
                    : "sandbox \(sandboxID)'s \(slots.count) spare disks are all in use; raise \"podSlots\" in the shim's settings")
            }
            slots[slot].user = container.id
            return (agent, slot, slots[slot].path, configuration.podDiskBytes)
        }()
        do throws(RPCError) {
            try write(container, spec: spec, mounts: mounts, onto: slotPath, diskBytes: diskBytes, agent: agent)
        } catch {
            lock.lock()
            if slot < slots.count { slots[slot].user = nil }
            lock.unlock()
            throw error
        }
        container.slot = slot
        container.rootImage = slotPath
    }

    func write(_ container: Container, spec: ContainerSpec, mounts: [ProtoMessage], onto slotPath: String, diskBytes: UInt64, agent: AgentClient) throws(RPCError) {
        let uuid = UUID().uuidString.lowercased()
        // The spare disk has been the guest's since the VM started: whatever it wrote there is
        // never read. The image is made in a file of the host's own, then copied over the disk
        // with everything else punched out (mke2fs would otherwise probe and re-read the guest's bytes).
        let staging = container.bundle + "/vireo-staging.img"
        defer { try? FileManager.default.removeItem(atPath: staging) }
        guard FileManager.default.createFile(atPath: staging, contents: nil), truncate(staging, off_t(diskBytes)) == 0 else {
            throw RPCError(.internal, "cannot make \(staging): \(String(cString: strerror(errno)))")
        }
        try Self.makeRootImage(staging, bundle: container.bundle, mounts: mounts, spec: spec, uuid: uuid, fixedSize: diskBytes)
        try Self.overwrite(slotPath, with: staging)
        try mountRoot(of: container.id, uuid: uuid, agent: agent)
    }

    func mountRoot(of id: String, uuid: String, agent: AgentClient) throws(RPCError) {
        var mount = AgentRequest(.mountRootfs)
        mount.container = id
        mount.device = "uuid:" + uuid
        mount.fileSystem = "ext4"
        _ = try agent.request(mount)
    }

    /// A container's root as an ext4 image made from its files (`mke2fs -d`): the guest gets a
    /// block device of its own, and nothing in it is a host path. The snapshotter's mounts are
    /// mounted on BUNDLE/rootfs for the copy and unmounted after it. `fixedSize`: write onto an
    /// existing disk of that size (a pod's spare slot) instead of sizing a new one.
    static func makeRootImage(_ image: String, bundle: String, mounts: [ProtoMessage], spec: ContainerSpec, uuid: String, fixedSize: UInt64?) throws(RPCError) {
        var root = spec.rootPath.hasPrefix("/") ? spec.rootPath : bundle + "/" + spec.rootPath
        var mounted: String?
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
                mounted = root
            }
        }
        defer { if let mounted { umount2(mounted, Int32(MNT_DETACH)) } }
        // The spec's bind mounts are copied in after the root's files (BindMountCopy).
        let binds = try BindMountCopy.plan(spec.bindMounts)
        let sizeArgument: [String]
        if let fixedSize {
            let used = UInt64(diskUsage(root) + binds.bytes)
            guard used + 64 << 20 <= fixedSize else {
                throw RPCError(.failedPrecondition, "the container's files take \(used >> 20) MiB; a pod's spare disk holds \(fixedSize >> 20) MiB (\"podDiskSize\" in the shim's settings)")
            }
            sizeArgument = []
        } else {
            sizeArgument = ["\(max(64, ((diskUsage(root) + binds.bytes) * 3 / 2) >> 20 + 64))M"]
        }
        let mke2fs = Foundation.Process()
        mke2fs.executableURL = URL(fileURLWithPath: "/sbin/mke2fs")
        mke2fs.arguments = ["-q", "-F", "-t", "ext4", "-U", uuid, "-E", "root_owner=0:0", "-O", "^has_journal", "-d", root, image] + sizeArgument
        let errors = Pipe()
        mke2fs.standardError = errors
        mke2fs.standardOutput = errors
        do { try mke2fs.run() } catch { throw RPCError(.internal, "cannot run mke2fs: \(error)") }
        let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        mke2fs.waitUntilExit()
        guard mke2fs.terminationStatus == 0 else { throw RPCError(.internal, "mke2fs could not make the root file system image: \(text)") }
        try BindMountCopy.copy(binds.entries, into: image)
    }

    /// Writes `source`'s data ranges over `target` (same size) after punching all of `target`
    /// out: the target ends as an exact copy, and nothing of it is read.
    static func overwrite(_ target: String, with source: String) throws(RPCError) {
        let input = open(source, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw RPCError(.internal, "open \(source): \(String(cString: strerror(errno)))") }
        defer { close(input) }
        let output = open(target, O_WRONLY | O_CLOEXEC | O_NOFOLLOW)
        guard output >= 0 else { throw RPCError(.internal, "open \(target): \(String(cString: strerror(errno)))") }
        defer { close(output) }
        var status = stat()
        guard fstat(input, &status) == 0 else { throw RPCError(.internal, "stat \(source): \(String(cString: strerror(errno)))") }
        let size = Int64(status.st_size)
        guard vireo_file_punch_hole(output, 0, size) == 0 else { throw RPCError(.internal, "clearing \(target): \(String(cString: strerror(errno)))") }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var offset: Int64 = 0
        while offset < size {
            let data = lseek(input, off_t(offset), VIREO_SEEK_DATA)
            if data < 0 { break }   // ENXIO: no data after offset
            let hole = min(Int64(lseek(input, data, VIREO_SEEK_HOLE)), size)
            var position = Int64(data)
            while position < hole {
                let count = buffer.withUnsafeMutableBytes { pread(input, $0.baseAddress, min($0.count, Int(hole - position)), off_t(position)) }
                guard count > 0 else { throw RPCError(.internal, "read \(source): \(String(cString: strerror(errno)))") }
                var written = 0
                while written < count {
                    let wrote = buffer.withUnsafeBytes { pwrite(output, $0.baseAddress! + written, count - written, off_t(position) + off_t(written)) }
                    guard wrote > 0 else { throw RPCError(.internal, "write \(target): \(String(cString: strerror(errno)))") }
                    written += wrote
                }
                position += Int64(count)
            }
            offset = hole
        }
        guard fsync(output) == 0 else { throw RPCError(.internal, "fsync \(target): \(String(cString: strerror(errno)))") }
    }

    /// What a tree takes, walked with lstat: the image's links are never followed (a link to
    /// `/` would otherwise have the shim, as root, walk the host).
    static func diskUsage(_ root: String) -> Int {
        var total = 0
        var pending = [root]
        while let directory = pending.popLast() {
            guard let handle = opendir(directory) else { continue }
            defer { closedir(handle) }
            while let entry = readdir(handle) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard name != ".", name != ".." else { continue }
                let path = directory + "/" + name
                var status = stat()
                guard lstat(path, &status) == 0 else { continue }
                total += Int(status.st_blocks) * 512 + 4096
                if status.st_mode & S_IFMT == S_IFDIR { pending.append(path) }
            }
        }
        return total
    }

    func start(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        // The agent is asked without the lock held: its reply may queue behind output frames of
        // the container's other processes, which the channel's reader hands over under the lock.
        let (container, process, agent, start) = try { () throws(RPCError) -> (Container, Process, AgentClient, AgentRequest) in
            lock.lock()
            defer { lock.unlock() }
            let container = try self.container(request.string(1))
            let process = try self.process(request)
            guard process.status == .created else { throw RPCError(.failedPrecondition, "process \(process.execID.isEmpty ? container.id : process.execID) is \(process.status), not created") }
            guard let agent = self.agent else { throw RPCError(.failedPrecondition, "the sandbox VM is not running") }
            process.status = .running
            // Open the outputs before the process runs, so nothing it writes is lost.
            for (path, kind) in [(process.stdout, AgentFrameKind.stdout), (process.stderr, .stderr)] where !path.isEmpty {
                if let handle = FileHandle(forWritingAtPath: path) { process.outputs[kind] = handle }
            }
            var start = AgentRequest(.startProcess)
            start.container = container.id
            start.handle = process.handle
            start.args = process.spec.args
            start.env = process.spec.env
            start.cwd = process.spec.cwd
            start.uid = process.spec.uid
            start.gid = process.spec.gid
            start.additionalGids = process.spec.additionalGids
            start.terminal = process.terminal
            start.width = UInt32(process.spec.consoleWidth ?? 0)
            start.height = UInt32(process.spec.consoleHeight ?? 0)
            start.hostname = process.execID.isEmpty ? container.hostname : ""
            start.join = process.execID.isEmpty ? 0 : container.processes[""]?.handle ?? 0
            start.stdin = !process.stdin.isEmpty
            return (container, process, agent, start)
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
        event.string(1, container.id)
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
        lock.lock()
        process.stdinForwarder = .running
        lock.unlock()
        Thread.detachNewThread { [self] in
            defer {
                lock.lock()
                process.stdinForwarder = .finished
                lock.broadcast()
                lock.unlock()
            }
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
        let container = try self.container(request.string(1))
        let process = try self.process(request)
        var response = ProtoWriter()
        response.string(1, container.id)
        response.string(2, container.bundle)
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
        let process: Process, container: Container
        do throws(RPCError) {
            container = try self.container(request.string(1))
            process = try self.process(request)
        } catch {
            lock.unlock()
            throw error
        }
        let signal = request.uint32(3), all = request.bool(4)
        if process.status == .created {
            // Never started: it ends here, as runc's shim ends a created process.
            finish(process, of: container, status: 128 + signal)
            lock.unlock()
            return []
        }
        guard process.status != .stopped || all else {
            lock.unlock()
            throw RPCError(.notFound, "process \(process.execID.isEmpty ? container.id : process.execID) has already finished")
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
        let container = try self.container(request.string(1))
        let execID = request.string(2)
        guard !execID.isEmpty else { throw RPCError(.invalidArgument, "exec_id: missing") }
        guard let first = container.processes[""], first.status == .running else { throw RPCError(.failedPrecondition, "container \(container.id) is not running") }
        guard container.processes[execID] == nil else { throw RPCError(.alreadyExists, "exec \(execID) already exists") }
        guard let any = try? request.message(7) else { throw RPCError(.invalidArgument, "spec: missing; an exec needs its process") }
        let json: Any
        do { json = try JSONSerialization.jsonObject(with: Data(any.bytes(2))) } catch { throw RPCError(.invalidArgument, "spec: not an OCI process in JSON: \(error)") }
        let spec = try OCIProcess(json: json)
        let process = Process(execID: execID, handle: nextHandle, stdin: request.string(4), stdout: request.string(5), stderr: request.string(6),
                              terminal: request.bool(3), spec: spec)
        nextHandle += 1
        container.processes[execID] = process
        var event = ProtoWriter()
        event.string(1, container.id)
        event.string(2, execID)
        events.publish(topic: "/tasks/exec-added", type: "containerd.events.TaskExecAdded", event: event)
        return []
    }

    func delete(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        let (container, process, last) = try { () throws(RPCError) -> (Container, Process, Bool) in
            lock.lock()
            defer { lock.unlock() }
            let container = try self.container(request.string(1))
            let process = try self.process(request)
            guard process.status == .stopped || process.status == .created else {
                throw RPCError(.failedPrecondition, "process \(process.execID.isEmpty ? container.id : process.execID) is still running; kill it first")
            }
            var last = false
            if process.execID.isEmpty {
                for (execID, other) in container.processes where !execID.isEmpty && other.status == .running {
                    throw RPCError(.failedPrecondition, "exec \(execID) is still running in container \(container.id)")
                }
                if container.id == sandboxID {
                    let others = containers.keys.filter { $0 != sandboxID }.sorted()
                    guard others.isEmpty else {
                        throw RPCError(.failedPrecondition, "sandbox \(sandboxID) still holds \(others.joined(separator: ", ")); delete them first")
                    }
                    deleted = true
                    last = true
                }
            }
            if process.status == .created { finish(process, of: container, status: 0) }
            container.processes[process.execID] = nil
            return (container, process, last)
        }()
        if process.execID.isEmpty {
            if last { tearDown() } else { removeJoined(container) }
            var event = ProtoWriter()
            event.string(1, container.id)
            event.uint32(2, process.pid)
            event.uint32(3, process.exitStatus)
            event.message(4, Self.timestamp(process.exitedAt))
            event.string(5, container.id)
            events.publish(topic: "/tasks/delete", type: "containerd.events.TaskDelete", event: event)
        }
        var response = ProtoWriter()
        response.uint32(1, process.pid)
        response.uint32(2, process.exitStatus)
        response.message(3, Self.timestamp(process.exitedAt))
        return response.bytes
    }

    /// A pod's container leaves: the agent unmounts its root and its spare disk is free again.
    func removeJoined(_ container: Container) {
        if let agent = currentAgent {
            var remove = AgentRequest(.removeContainer)
            remove.container = container.id
            _ = try? agent.request(remove, timeoutSeconds: 10)
        }
        lock.lock()
        if let slot = container.slot, slot < slots.count { slots[slot].user = nil }
        containers[container.id] = nil
        lock.unlock()
    }

    /// Removes the VM, the root images and the spare disks: nothing of the sandbox stays behind.
    /// Called without the lock: the agent's last reply may queue behind output frames.
    func tearDown() {
        lock.lock()
        let (agent, vm) = (self.agent, self.vm)
        let images = containers.values.map(\.rootImage) + slots.map(\.path)
        let ids = Array(containers.keys)
        self.agent = nil
        self.vm = nil
        containers = [:]
        slots = []
        lock.unlock()
        if let agent {
            for id in ids {
                var remove = AgentRequest(.removeContainer)
                remove.container = id
                _ = try? agent.request(remove, timeoutSeconds: 5)
            }
        }
        if let vm {
            do { try vm.remove() } catch { ShimLog.write("removing the sandbox VM: \(error.message)") }
        }
        for image in Set(images) where !image.isEmpty { try? FileManager.default.removeItem(atPath: image) }
    }

    /// A request's process and the agent, read under the lock; the agent is then asked without it.
    func processAndAgent(_ request: ProtoMessage) throws(RPCError) -> (Process, AgentClient?) {
        lock.lock()
        defer { lock.unlock() }
        return (try process(request), agent)
    }

    /// A request's container and the agent, read under the lock.
    func containerAndAgent(_ request: ProtoMessage) throws(RPCError) -> (Container, AgentClient) {
        lock.lock()
        defer { lock.unlock() }
        let container = try container(request.string(1))
        guard let agent else { throw RPCError(.failedPrecondition, "the sandbox VM is not running") }
        return (container, agent)
    }

    func pids(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        let (container, agent) = try containerAndAgent(request)
        var query = AgentRequest(.pids)
        query.container = container.id
        var response = ProtoWriter()
        for pid in try agent.request(query).pids {
            var info = ProtoWriter()
            info.uint32(1, pid)
            response.message(1, info)
        }
        return response.bytes
    }

    func pause(_ request: ProtoMessage, _ pausing: Bool) throws(RPCError) -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        let container = try self.container(request.string(1))
        guard let vm else { throw RPCError(.failedPrecondition, "the sandbox VM is not running") }
        // The whole VM stops between instructions: every process of every container in it.
        guard containers.count == 1 else {
            throw RPCError(.unimplemented, "pausing one container of a pod is not implemented: the whole sandbox VM would stop")
        }
        guard paused != pausing else { return [] }
        if pausing { try vm.pause() } else { try vm.resume() }
        paused = pausing
        var event = ProtoWriter()
        event.string(1, container.id)
        events.publish(topic: pausing ? "/tasks/paused" : "/tasks/resumed", type: pausing ? "containerd.events.TaskPaused" : "containerd.events.TaskResumed", event: event)
        return []
    }

    /// Update (`UpdateTaskRequest`: the container's new `LinuxResources` as JSON in an Any, as
    /// containerd's typeurl encodes runtime-spec types): what runc does to the container's cgroup
    /// happens to its VM's, at once, through `vireo set` — a CPU quota becomes the VM's CPU cap
    /// (`--cpu-cap`, 100·quota/period %, none for no quota), CPU shares its weight (`--cpu-weight`,
    /// runc's mapping of cgroup v1 shares onto 1...10000). The vCPUs and the guest's RAM are fixed
    /// while it runs (no hot-plug): a memory limit is the VM's RAM less its balloon (the guest
    /// gives the rest back), a limit beyond the RAM it was made with is refused, as is an update of
    /// one container of a pod of several (the VM is the pod's).
    func update(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        lock.lock()
        let container: Container
        let vm = self.vm
        let containerCount = containers.count
        do throws(RPCError) { container = try self.container(request.string(1)) } catch { lock.unlock(); throw error }
        lock.unlock()
        guard let vm else { throw RPCError(.failedPrecondition, "the sandbox VM is not running") }
        guard containerCount == 1, container.id == sandboxID else {
            throw RPCError(.unimplemented, "updating one container of a pod is not implemented: its containers share one VM, whose limits are the pod's")
        }
        let any: ProtoMessage?
        do throws(ProtoError) { any = try request.message(2) } catch { throw RPCError(.invalidArgument, "resources: \(error)") }
        guard let any else { throw RPCError(.invalidArgument, "resources: missing; Update carries the container's new LinuxResources") }
        let typeURL = any.string(1)
        guard typeURL.hasSuffix("/LinuxResources") || typeURL == "LinuxResources" else {
            throw RPCError(.invalidArgument, "resources: '\(typeURL.prefix(120))' is not runtime-spec LinuxResources")
        }
        let value = any.bytes(2)
        guard value.count <= 1 << 20, let resources = (try? JSONSerialization.jsonObject(with: Data(value))) as? [String: Any] else {
            throw RPCError(.invalidArgument, "resources: not a LinuxResources JSON object (at most 1 MiB)")
        }
        var arguments: [String] = []
        // A memory limit is the VM's RAM less the balloon: the guest hands the difference back
        // to the host (`vireo balloon`). More than the RAM the VM was made with needs hot-plug.
        var balloonBytes: UInt64?
        if let memory = resources["memory"] as? [String: Any], let limit = (memory["limit"] as? NSNumber)?.int64Value, limit > 0 {
            let ram = container.vmMemoryBytes ?? 0
            let mebibytes = UInt64(limit >> 20) + (limit & ((1 << 20) - 1) == 0 ? 0 : 1)
            let (wanted, overflow) = (mebibytes + UInt64(ShimConfiguration.guestOverheadMiB)).multipliedReportingOverflow(by: 1 << 20)
            guard !overflow, wanted <= ram else {
                throw RPCError(.unimplemented, "resources.memory.limit: \(limit >> 20) MiB and the guest's \(ShimConfiguration.guestOverheadMiB) MiB exceed the \(ram >> 20) MiB of RAM the container's VM was made with; a VM's RAM cannot grow while it runs (no memory hot-plug), so create the container again to raise it")
            }
            balloonBytes = ram - wanted
        }
        if let cpu = resources["cpu"] as? [String: Any] {
            if let quota = (cpu["quota"] as? NSNumber)?.int64Value {
                let period = (cpu["period"] as? NSNumber)?.uint64Value ?? 100_000
                guard period > 0 else { throw RPCError(.invalidArgument, "resources.cpu.period: 0") }
                arguments += ["--cpu-cap", quota > 0 ? "\(ContainerSpec.capPercent(quota: quota, period: period))%" : "none"]
            }
            if let shares = (cpu["shares"] as? NSNumber)?.uint64Value, shares > 0 {
                // runc's conversion of cgroup v1 shares (2...262144) to a v2 weight (1...10000).
                let clamped = min(max(shares, 2), 262_144)
                arguments += ["--cpu-weight", String(1 + ((clamped - 2) * 9999) / 262_142)]
            }
        }
        if !arguments.isEmpty { try vm.vireo(["set", vm.name] + arguments) }
        if let balloonBytes { try vm.vireo(["balloon", vm.name, "\(balloonBytes >> 20)M"]) }
        return []
    }

    func resize(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        let (process, agent) = try processAndAgent(request)
        guard let agent, process.status == .running else { throw RPCError(.failedPrecondition, "the process is not running") }
        var resize = AgentRequest(.resize)
        resize.handle = process.handle
        resize.width = request.uint32(3)
        resize.height = request.uint32(4)
        _ = try agent.request(resize)
        return []
    }

    func closeIO(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        let (process, agent) = try processAndAgent(request)
        guard request.bool(3), let agent, process.status == .running else { return [] }
        // containerd closes its end of the stdin FIFO before it asks: what the FIFO still holds
        // is the process's too, and the forwarder ends stdin itself once it has passed that on
        // (closing stdin here at once cut off the tail: `wc -c` counted 98304 of 100000 bytes).
        // A writer that keeps the FIFO open is not waited for longer than a few seconds.
        lock.lock()
        let deadline = Date().addingTimeInterval(5)
        while process.stdinForwarder == .running && lock.wait(until: deadline) {}
        let forwarded = process.stdinForwarder == .finished
        lock.unlock()
        if forwarded { return [] }
        var close = AgentRequest(.closeStdin)
        close.handle = process.handle
        _ = try agent.request(close)
        return []
    }

    /// cgroups v1 Metrics, as `ctr task metrics` reads them, from the agent's view of the
    /// container's processes (their resident memory and CPU time).
    func stats(_ request: ProtoMessage) throws(RPCError) -> [UInt8] {
        let (container, agent) = try containerAndAgent(request)
        var query = AgentRequest(.stats)
        query.container = container.id
        let figures = try agent.request(query)
        var pidsQuery = AgentRequest(.pids)
        pidsQuery.container = container.id
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
        response.uint32(2, containers[sandboxID]?.processes[""]?.pid ?? 0)
        response.string(3, "vireo")
        return response.bytes
    }

    func shutdown(_ request: ProtoMessage) -> [UInt8] {
        lock.lock()
        let done = containers.isEmpty
        lock.unlock()
        // Only once every container is gone (or none ever was): containerd asks after each Delete.
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

    func finish(_ process: Process, of container: Container, status: UInt32) {
        guard process.status != .stopped else { return }
        process.status = .stopped
        process.exitStatus = status
        process.exitedAt = Date()
        process.outputs.values.forEach { try? $0.close() }
        process.outputs = [:]
        lock.broadcast()
        var event = ProtoWriter()
        event.string(1, container.id)
        event.string(2, process.execID.isEmpty ? container.id : process.execID)
        event.uint32(3, process.pid)
        event.uint32(4, status)
        event.message(5, Self.timestamp(process.exitedAt))
        events.publish(topic: "/tasks/exit", type: "containerd.events.TaskExit", event: event)
    }

    public func output(handle: UInt32, kind: AgentFrameKind, bytes: [UInt8]) {
        lock.lock()
        let target = process(handle: handle)?.1.outputs[kind]
        lock.unlock()
        try? target?.write(contentsOf: bytes)
    }

    /// Nothing to do: the FIFOs close at the process's exit, which the agent sends after the
    /// output it had; output a leftover child writes after that has nowhere to go.
    public func outputClosed(handle: UInt32, kind: AgentFrameKind) {}

    public func exited(handle: UInt32, status: UInt32, oomKilled: Bool) {
        lock.lock()
        defer { lock.unlock() }
        guard let (container, process) = process(handle: handle) else { return }
        if oomKilled, process.status != .stopped {
            // containerd.events.TaskOOM, before the exit, as runc's shim orders them.
            var event = ProtoWriter()
            event.string(1, container.id)
            events.publish(topic: "/tasks/oom", type: "containerd.events.TaskOOM", event: event)
        }
        finish(process, of: container, status: status)
    }

    public func channelLost(reason: String) {
        lock.lock()
        defer { lock.unlock() }
        guard !deleted, agent != nil else { return }
        ShimLog.write("the sandbox VM's agent is gone (\(reason)); its processes are reported killed")
        for container in containers.values {
            for process in container.processes.values where process.status == .running { finish(process, of: container, status: 128 + UInt32(SIGKILL)) }
        }
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
