// Vireo's container agent: PID 1 of a containerd sandbox VM (docs/containerd.md). It mounts each
// container's root file system from the disk the shim attached, starts the container's processes
// in their own PID, mount, UTS and IPC namespaces (chrooted into that root), and carries their
// stdio, exits and signals over one stream to the shim (ContainerWire.AgentProtocol).
//
// Statically linked and Foundation-free: it is the whole user space of the VM's initramfs. One
// thread and one poll loop: fork is only safe in a single-threaded process, and the loop is what
// orders a process's last output before its exit on the stream.
import CContainerAgent
import ContainerWire
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Small host helpers

func log(_ text: String) {
    let line = Array("vireo-agent: \(text)\n".utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

func errnoText(_ code: Int32 = errno) -> String { String(cString: strerror(code)) }

func readWhole(_ path: String, limit: Int = 1 << 20) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var result: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while result.count < limit {
        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        guard count > 0 else { break }
        result.append(contentsOf: chunk[0..<count])
    }
    return result
}

func readLink(_ path: String) -> String? {
    var buffer = [CChar](repeating: 0, count: 256)
    let count = readlink(path, &buffer, buffer.count - 1)
    guard count > 0 else { return nil }
    return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

func makeDirectories(_ path: String) {
    var prefix = ""
    for part in path.split(separator: "/") {
        prefix += "/" + part
        mkdir(prefix, 0o755)
    }
}

func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
    var offset = 0
    while offset < bytes.count {
        let count = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
        if count < 0 {
            if errno == EINTR { continue }
            if errno == EAGAIN {
                var descriptor = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&descriptor, 1, 1000)
                continue
            }
            return false
        }
        offset += count
    }
    return true
}

func setNonBlocking(_ fd: Int32) { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }

/// A C string that outlives Swift's temporary bridging, for use after fork.
func cString(_ text: String) -> UnsafeMutablePointer<CChar> {
    strdup(text) ?? strdup("")!
}

// MARK: - Boot

func mountEarly() {
    let mounts: [(String, String, String, UInt, String?)] = [
        ("sysfs", "/sys", "sysfs", UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), nil),
        ("devtmpfs", "/dev", "devtmpfs", UInt(MS_NOSUID), "mode=0755"),
        ("devpts", "/dev/pts", "devpts", UInt(MS_NOSUID | MS_NOEXEC), "ptmxmode=0666,mode=0620"),
        ("tmpfs", "/run", "tmpfs", UInt(MS_NOSUID | MS_NODEV), "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", UInt(MS_NOSUID | MS_NODEV), "mode=1777"),
    ]
    for (source, target, type, flags, data) in mounts {
        makeDirectories(target)
        if mount(source, target, type, flags, data) != 0 && errno != EBUSY {
            log("mount \(target): \(errnoText())")
        }
    }
    unlink("/dev/ptmx")
    symlink("pts/ptmx", "/dev/ptmx")
    // Loopback up, so a container's localhost works.
    agent_loopback_up()
}

/// The pod's IPv6, which the kernel's `ip=` cannot configure: `vireo.ipv6=ADDRESS/PREFIX[,GATEWAY]`
/// on the command line (the shim puts what the CNI plugin gave the pod there). A failure is
/// logged on the console and the container runs with IPv4 only.
func configureIPv6() {
    guard let bytes = readWhole("/proc/cmdline") else { return }
    let words = String(decoding: bytes, as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\n" })
    guard let word = words.last(where: { $0.hasPrefix("vireo.ipv6=") }) else { return }
    let value = word.dropFirst("vireo.ipv6=".count)
    let parts = value.split(separator: ",", maxSplits: 1)
    let network = parts.first?.split(separator: "/", maxSplits: 1) ?? []
    guard network.count == 2, let prefix = Int32(network[1]) else {
        log("vireo.ipv6=\(value): not ADDRESS/PREFIX[,GATEWAY]")
        return
    }
    var step: Int32 = 0
    let gateway = parts.count == 2 ? String(parts[1]) : nil
    let result = gateway.map { agent_configure_ipv6("eth0", String(network[0]), prefix, $0, &step) }
        ?? agent_configure_ipv6("eth0", String(network[0]), prefix, nil, &step)
    if result != 0 {
        let what = [0: "take \(value)", 1: "find eth0", 2: "add \(network[0])/\(prefix) to eth0", 3: "add the default route via \(gateway ?? "")"][step] ?? "configure IPv6"
        log("IPv6: cannot \(what): \(errnoText())")
    }
}

func hasVirtioDevice(id: Int) -> Bool {
    guard let directory = opendir("/sys/bus/virtio/devices") else { return false }
    defer { closedir(directory) }
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        guard !name.hasPrefix("."), let text = readWhole("/sys/bus/virtio/devices/\(name)/device") else { continue }
        let value = String(decoding: text.filter { $0 > 32 }, as: UTF8.self)
        if Int(value.hasPrefix("0x") ? String(value.dropFirst(2)) : value, radix: 16) == id { return true }
    }
    return false
}

/// `0123abcd-...` → its 16 bytes.
func uuidBytes(_ text: String) -> [UInt8]? {
    let digits = Array(text.utf8).filter { $0 != UInt8(ascii: "-") }
    guard digits.count == 32 else { return nil }
    var bytes: [UInt8] = []
    for index in stride(from: 0, to: 32, by: 2) {
        guard let high = hexValue(digits[index]), let low = hexValue(digits[index + 1]) else { return nil }
        bytes.append(high << 4 | low)
    }
    return bytes
}

func hexValue(_ digit: UInt8) -> UInt8? {
    switch digit {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return digit - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return digit - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return digit - UInt8(ascii: "A") + 10
    default: return nil
    }
}

/// The shim's channel: the qemu engine's virtio-serial port (named as qemu-guest-agent's, the
/// port every qemu-engine VM has), else a vsock listener on port 1024 (the kvm engine).
func openChannel() -> Int32 {
    for _ in 0..<200 {
        if let directory = opendir("/sys/class/virtio-ports") {
            defer { closedir(directory) }
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard !name.hasPrefix(".") else { continue }
                let portName = readWhole("/sys/class/virtio-ports/\(name)/name").map { String(decoding: $0, as: UTF8.self) } ?? ""
                if portName.hasPrefix(AgentChannel.serialPortName) {
                    let fd = open("/dev/\(name)", O_RDWR | O_CLOEXEC | O_NONBLOCK)
                    if fd >= 0 { return fd }
                    log("open /dev/\(name): \(errnoText())")
                }
            }
        }
        // vsock only when the VM has a virtio-vsock device (virtio device id 19): the accept blocks.
        if hasVirtioDevice(id: 0x13) {
            let connection = agent_vsock_accept(AgentChannel.vsockPort)
            if connection >= 0 { return connection }
            log("vsock port \(AgentChannel.vsockPort): \(errnoText())")
        }
        usleep(50_000)
    }
    log("no channel to the shim: neither a virtio-serial port named \(AgentChannel.serialPortName) nor vsock")
    return -1
}

// MARK: - Containers and processes

struct Container {
    var id: String
    var root: String
    var initHandle: UInt32 = 0
}

final class Process {
    let handle: UInt32
    let container: String
    let pid: pid_t
    var input: Int32          // stdin (pipe write end or the pty master), -1 when closed
    var outputs: [(fd: Int32, kind: AgentFrameKind)]
    let pty: Int32
    var exitStatus: UInt32?
    /// How many OOM kills the VM had seen when it started (KernelLog).
    let oomKillsAtStart: UInt64

    init(handle: UInt32, container: String, pid: pid_t, input: Int32, outputs: [(fd: Int32, kind: AgentFrameKind)], pty: Int32, oomKillsAtStart: UInt64) {
        self.oomKillsAtStart = oomKillsAtStart
        self.handle = handle
        self.container = container
        self.pid = pid
        self.input = input
        self.outputs = outputs
        self.pty = pty
    }
}

/// The guest kernel's log (/dev/kmsg, read without blocking from the agent's start on), counted
/// for the OOM killer's "Killed process" reports: this guest kernel has no VM event counters
/// (/proc/vmstat's oom_kill), being built small.
final class KernelLog {
    let fd: Int32
    private(set) var kills: UInt64 = 0

    init() {
        fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        if fd >= 0 { lseek(fd, 0, SEEK_END) }
    }

    /// The OOM kills reported so far, after reading what the kernel logged since the last call.
    func oomKills() -> UInt64 {
        guard fd >= 0 else { return kills }
        var record = [UInt8](repeating: 0, count: 8192)
        while true {
            let count = record.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                // EPIPE: records were overwritten before they were read; go on with the next.
                if errno == EPIPE || errno == EINTR { continue }
                return kills
            }
            if count == 0 { return kills }
            if record[0..<count].firstRange(of: Array("Killed process ".utf8)) != nil { kills += 1 }
        }
    }
}

final class Agent {
    /// The guest kernel's log, read for its OOM killer's reports.
    let kernelLog = KernelLog()

    let channel: Int32
    var decoder = AgentFrameDecoder()
    var containers: [String: Container] = [:]
    var processes: [UInt32: Process] = [:]
    let childSignals: Int32
    var connected = false

    init(channel: Int32) {
        self.channel = channel
        childSignals = agent_child_signals()
        signal(SIGPIPE, SIG_IGN)
    }

    func send(_ frame: AgentFrame) {
        if !writeAll(channel, frame.encoded) { connected = false }
    }

    func run() -> Never {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            var descriptors = [pollfd(fd: channel, events: Int16(POLLIN), revents: 0), pollfd(fd: childSignals, events: Int16(POLLIN), revents: 0)]
            var owners: [(UInt32, Int)] = []
            for process in processes.values {
                for (index, output) in process.outputs.enumerated() {
                    descriptors.append(pollfd(fd: output.fd, events: Int16(POLLIN), revents: 0))
                    owners.append((process.handle, index))
                }
            }
            let ready = poll(&descriptors, nfds_t(descriptors.count), 1000)
            if ready < 0 && errno != EINTR { log("poll: \(errnoText())") }
            if descriptors[1].revents != 0 { reap() }
            if descriptors[0].revents & Int16(POLLIN) != 0 {
                let count = buffer.withUnsafeMutableBytes { read(channel, $0.baseAddress, $0.count) }
                if count > 0 {
                    decoder.append(buffer[0..<count])
                    do {
                        while let frame = try decoder.next() { handle(frame) }
                    } catch {
                        log("the shim's stream is broken (\(error)); waiting for it to start again")
                        decoder = AgentFrameDecoder()
                    }
                } else if count == 0 {
                    usleep(20_000) // a virtio-serial port reads 0 while the host side is closed
                }
            } else if descriptors[0].revents & Int16(POLLHUP) != 0 {
                usleep(20_000)
            }
            for (offset, owner) in owners.enumerated() where descriptors[offset + 2].revents != 0 {
                pump(handle: owner.0, output: owner.1)
            }
            // Outputs that reached their end are dropped after the pass (indices stay valid in it).
            for process in processes.values { process.outputs.removeAll { $0.fd < 0 } }
        }
    }

    /// Forwards what one output has; at its end, says so and closes it.
    func pump(handle: UInt32, output index: Int) {
        guard let process = processes[handle], index < process.outputs.count, process.outputs[index].fd >= 0 else { return }
        let (fd, kind) = process.outputs[index]
        var buffer = [UInt8](repeating: 0, count: 32768)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count > 0 {
                send(AgentFrame(kind, stream: handle, payload: Array(buffer[0..<count])))
                continue
            }
            if count < 0 && errno == EINTR { continue }
            if count < 0 && errno == EAGAIN { return }
            // EOF, or EIO from a pty master once the last holder of its other side is gone.
            send(AgentFrame(.outputClosed, stream: handle, payload: [kind.rawValue]))
            if fd != process.pty { close(fd) }
            process.outputs[index].fd = -1
            return
        }
    }

    func reap() {
        agent_drain_signals(childSignals)
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            guard pid > 0 else { return }
            guard let process = processes.values.first(where: { $0.pid == pid && $0.exitStatus == nil }) else { continue }
            let code: UInt32
            if status & 0x7f == 0 { code = UInt32((status >> 8) & 0xff) } else { code = 128 + UInt32(status & 0x7f) }
            process.exitStatus = code
            // What the process wrote before it ended goes first.
            for index in process.outputs.indices { pump(handle: process.handle, output: index) }
            // Killed (or its shell's child killed) while the OOM killer was at work: an OOM.
            let oomKilled = code == 128 + UInt32(SIGKILL) && kernelLog.oomKills() > process.oomKillsAtStart
            send(AgentFrame(.exit, stream: process.handle, payload: AgentExit(status: code, oomKilled: oomKilled).encoded))
            if process.input >= 0 && process.input != process.pty { close(process.input) }
            process.input = -1
        }
    }

    func handle(_ frame: AgentFrame) {
        switch frame.kind {
        case .hello:
            connected = true
            send(AgentFrame(.hello, payload: [AgentFrame.protocolVersion]))
        case .request:
            let reply: AgentReply
            do {
                let request = try AgentRequest(decoding: frame.payload)
                reply = perform(request)
            } catch {
                reply = AgentReply(error: "malformed request: \(error)")
            }
            send(AgentFrame(.reply, stream: frame.stream, payload: reply.encoded))
        case .stdin:
            guard let process = processes[frame.stream], process.input >= 0 else { return }
            _ = writeAll(process.input, frame.payload)
        default:
            log("ignoring a frame of kind \(frame.kind) from the shim")
        }
    }

    func perform(_ request: AgentRequest) -> AgentReply {
        switch request.operation {
        case .mountRootfs: return mountRootfs(request)
        case .startProcess: return start(request)
        case .signal: return signalProcesses(request)
        case .resize:
            guard let process = processes[request.handle], process.pty >= 0 else { return AgentReply(error: "process \(request.handle) has no terminal") }
            return agent_resize(process.pty, UInt16(clamping: request.width), UInt16(clamping: request.height)) == 0 ? AgentReply() : AgentReply(error: "resize: \(errnoText())")
        case .closeStdin:
            guard let process = processes[request.handle] else { return AgentReply(error: "no process \(request.handle)") }
            // A terminal's input just stops, as with runc's shim: what the end of it means is the
            // terminal's mode's business (an EOF character typed in cooked mode, nothing in raw).
            if process.pty < 0 && process.input >= 0 {
                close(process.input)
                process.input = -1
            }
            return AgentReply()
        case .pids:
            var reply = AgentReply()
            reply.pids = containerPids(request.container).map { UInt32($0) }
            return reply
        case .removeContainer:
            guard let container = containers[request.container] else { return AgentReply() }
            for (handle, process) in processes where process.container == container.id {
                if process.exitStatus == nil { kill(process.pid, SIGKILL) }
                for output in process.outputs where output.fd >= 0 && output.fd != process.pty { close(output.fd) }
                if process.pty >= 0 { close(process.pty) }
                processes[handle] = nil
            }
            if umount2(container.root, Int32(MNT_DETACH)) != 0 && errno != EINVAL { return AgentReply(error: "unmount \(container.root): \(errnoText())") }
            containers[container.id] = nil
            return AgentReply()
        case .stats:
            var reply = AgentReply()
            let ticks = UInt64(max(1, sysconf(Int32(_SC_CLK_TCK))))
            for pid in containerPids(request.container) {
                if let statm = readWhole("/proc/\(pid)/statm"), let resident = String(decoding: statm, as: UTF8.self).split(separator: " ").dropFirst().first.flatMap({ UInt64($0) }) {
                    reply.memoryBytes += resident * UInt64(sysconf(Int32(_SC_PAGESIZE)))
                }
                if let stat = readWhole("/proc/\(pid)/stat") {
                    // Fields after the command's closing parenthesis: utime and stime are 12th and 13th.
                    let text = String(decoding: stat, as: UTF8.self)
                    if let close = text.lastIndex(of: ")") {
                        let fields = text[text.index(after: close)...].split(separator: " ")
                        if fields.count > 12, let user = UInt64(fields[11]), let system = UInt64(fields[12]) {
                            reply.cpuNanoseconds += (user + system) * 1_000_000_000 / ticks
                        }
                    }
                }
            }
            return reply
        }
    }

    func mountRootfs(_ request: AgentRequest) -> AgentReply {
        guard !request.container.isEmpty, !request.container.contains("/"), request.container != ".", request.container != ".." else {
            return AgentReply(error: "container id '\(request.container)' cannot name a directory")
        }
        // The disk is named by its file system's UUID (the shim made it): device names follow
        // the order the guest found its disks in, which the shim does not control.
        guard request.device.hasPrefix("uuid:"), let uuid = uuidBytes(String(request.device.dropFirst(5))) else {
            return AgentReply(error: "device '\(request.device)' is not uuid:UUID")
        }
        var buffer = [CChar](repeating: 0, count: 64)
        var found: Int32 = -1
        for _ in 0..<100 {
            found = uuid.withUnsafeBufferPointer { agent_find_ext4($0.baseAddress, &buffer, buffer.count) }
            if found == 0 { break }
            usleep(50_000)
        }
        guard found == 0 else { return AgentReply(error: "no disk holds the file system \(request.device.dropFirst(5))") }
        let device = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let root = "/run/vireo/containers/\(request.container)/rootfs"
        makeDirectories(root)
        guard mount(device, root, request.fileSystem.isEmpty ? "ext4" : request.fileSystem, 0, nil) == 0 else {
            return AgentReply(error: "mount \(device) on \(root): \(errnoText())")
        }
        containers[request.container] = Container(id: request.container, root: root)
        return AgentReply()
    }

    /// The PID namespace's identity of a container's first process.
    func namespaceLink(of container: String) -> String? {
        guard let initHandle = containers[container]?.initHandle, let process = processes[initHandle], process.exitStatus == nil else { return nil }
        return readLink("/proc/\(process.pid)/ns/pid")
    }

    func containerPids(_ container: String) -> [pid_t] {
        guard let link = namespaceLink(of: container), let directory = opendir("/proc") else { return [] }
        defer { closedir(directory) }
        var pids: [pid_t] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let pid = pid_t(name), readLink("/proc/\(pid)/ns/pid") == link else { continue }
            pids.append(pid)
        }
        return pids.sorted()
    }

    func signalProcesses(_ request: AgentRequest) -> AgentReply {
        guard let process = processes[request.handle] else { return AgentReply(error: "no process \(request.handle)") }
        let number = Int32(clamping: request.signal)
        if request.all {
            for pid in containerPids(process.container) { kill(pid, number) }
            return AgentReply()
        }
        guard process.exitStatus == nil else { return AgentReply(error: "process \(request.handle) has already exited") }
        return kill(process.pid, number) == 0 ? AgentReply() : AgentReply(error: "kill: \(errnoText())")
    }

    func start(_ request: AgentRequest) -> AgentReply {
        guard var container = containers[request.container] else { return AgentReply(error: "no container '\(request.container)' (its root file system is not mounted)") }
        guard request.handle != 0, processes[request.handle] == nil else { return AgentReply(error: "handle \(request.handle) is taken") }
        guard let program = request.args.first, !program.isEmpty else { return AgentReply(error: "the process has no args") }
        let joining = request.join != 0
        var joinPid: Int32 = 0
        if joining {
            guard let first = processes[request.join], first.exitStatus == nil else { return AgentReply(error: "the container's first process is not running") }
            joinPid = first.pid
        }
        var path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        for variable in request.env where variable.hasPrefix("PATH=") { path = String(variable.dropFirst(5)) }
        let candidates = program.contains("/") ? [program] : path.split(separator: ":").map { "\($0)/\(program)" }
        var candidatePointers: [UnsafePointer<CChar>?] = candidates.map { UnsafePointer(cString($0)) }
        var argv: [UnsafeMutablePointer<CChar>?] = request.args.map { cString($0) } + [nil]
        var envp: [UnsafeMutablePointer<CChar>?] = request.env.map { cString($0) } + [nil]
        let root = cString(container.root), cwd = cString(request.cwd.isEmpty ? "/" : request.cwd), hostname = cString(request.hostname)
        var groups = request.additionalGids
        defer {
            candidatePointers.forEach { free(UnsafeMutablePointer(mutating: $0)) }
            argv.forEach { free($0) }
            envp.forEach { free($0) }
            free(root); free(cwd); free(hostname)
        }
        // Counted before the process exists, so an OOM kill of it right away is not taken for old.
        let oomKillsBefore = kernelLog.oomKills()
        var spawn = agent_spawn()
        spawn.candidate_count = Int32(candidates.count)
        spawn.root = UnsafePointer(root)
        spawn.cwd = UnsafePointer(cwd)
        spawn.hostname = UnsafePointer(hostname)
        spawn.uid = request.uid
        spawn.gid = request.gid
        spawn.group_count = Int32(groups.count)
        spawn.terminal = request.terminal ? 1 : 0
        spawn.width = UInt16(clamping: request.width)
        spawn.height = UInt16(clamping: request.height)
        spawn.want_stdin = request.stdin ? 1 : 0
        spawn.join_pid = joinPid
        let started = candidatePointers.withUnsafeMutableBufferPointer { candidateBuffer in
            argv.withUnsafeMutableBufferPointer { argvBuffer in
                envp.withUnsafeMutableBufferPointer { envpBuffer in
                    groups.withUnsafeMutableBufferPointer { groupBuffer in
                        spawn.candidates = UnsafePointer(candidateBuffer.baseAddress)
                        spawn.argv = UnsafePointer(argvBuffer.baseAddress)
                        spawn.envp = UnsafePointer(envpBuffer.baseAddress)
                        spawn.groups = UnsafePointer(groupBuffer.baseAddress)
                        return agent_spawn(&spawn)
                    }
                }
            }
        }
        guard started == 0 else {
            let steps: [Int32: String] = [1: "open its terminal", 2: "enter its namespaces", 3: "make its mounts private", 4: "mount /proc", 5: "make its /dev",
                                          6: "set the host name", 7: "enter its root file system", 8: "change to its working directory \(request.cwd)",
                                          9: "set its groups", 10: "set gid \(request.gid)", 11: "set uid \(request.uid)", 12: "execute \(program)",
                                          13: "make its pipes", 14: "fork"]
            return AgentReply(error: "cannot \(steps[spawn.failed_step] ?? "start"): \(errnoText(spawn.failed_errno))")
        }
        let process: Process
        if spawn.pty_fd >= 0 {
            process = Process(handle: request.handle, container: container.id, pid: spawn.pid, input: spawn.pty_fd, outputs: [(spawn.pty_fd, .stdout)], pty: spawn.pty_fd,
                              oomKillsAtStart: oomKillsBefore)
        } else {
            process = Process(handle: request.handle, container: container.id, pid: spawn.pid, input: spawn.stdin_fd,
                              outputs: [(spawn.stdout_fd, .stdout), (spawn.stderr_fd, .stderr)], pty: -1, oomKillsAtStart: oomKillsBefore)
        }
        processes[request.handle] = process
        if !joining {
            container.initHandle = request.handle
            containers[container.id] = container
        }
        return AgentReply(pid: UInt32(spawn.pid))
    }
}

if getpid() == 1 {
    mountEarly()
    configureIPv6()
}
let channel = openChannel()
if channel < 0 {
    sleep(5)
    exit(1)
}
log("ready")
Agent(channel: channel).run()
