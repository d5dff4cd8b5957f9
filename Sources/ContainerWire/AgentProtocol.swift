#if canImport(Glibc)
import Glibc
#endif

// The conversation between the containerd shim (host) and Vireo's container agent (PID 1 in the
// sandbox VM), over one byte stream: the VM's virtio-serial port on the qemu engine, a vsock
// connection on the kvm engine. Frames multiplex control requests and every process's stdio on
// that one stream, so stdio needs no polling RPCs (Kata's were behind several of its exec hangs)
// and an exit is always behind the output that preceded it.
//
//   frame = length:u32be (of what follows the header) · kind:u8 · stream:u32be · payload
//
// Requests carry an id in `stream`; the reply has the same id. Process stdio and exits carry the
// process's handle (the shim numbers processes; 0 is never used).

public enum AgentFrameKind: UInt8, Sendable {
    case hello = 1          // both ways, once: payload = protocol version (u8)
    case request = 2        // host → agent: AgentRequest
    case reply = 3          // agent → host: AgentReply
    case stdin = 4          // host → agent: bytes for a process's stdin
    case stdout = 5         // agent → host
    case stderr = 6         // agent → host
    case outputClosed = 7   // agent → host: payload = [5] or [6], that stream reached its end
    case exit = 8           // agent → host: AgentExit
    case log = 9            // agent → host: a line for the shim's log
}

public struct AgentFrame: Sendable {
    public var kind: AgentFrameKind
    public var stream: UInt32
    public var payload: [UInt8]

    public init(_ kind: AgentFrameKind, stream: UInt32 = 0, payload: [UInt8] = []) {
        self.kind = kind
        self.stream = stream
        self.payload = payload
    }

    public static let headerSize = 9
    /// A frame larger than this is a broken or hostile peer: the connection ends.
    public static let maximumPayload = 1 << 20
    public static let protocolVersion: UInt8 = 1

    public var encoded: [UInt8] {
        let length = UInt32(payload.count)
        var bytes: [UInt8] = [UInt8(length >> 24), UInt8(length >> 16 & 0xff), UInt8(length >> 8 & 0xff), UInt8(length & 0xff), kind.rawValue,
                              UInt8(stream >> 24), UInt8(stream >> 16 & 0xff), UInt8(stream >> 8 & 0xff), UInt8(stream & 0xff)]
        bytes.append(contentsOf: payload)
        return bytes
    }
}

/// Splits a byte stream into frames.
public struct AgentFrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    public init() {}

    public mutating func append(_ bytes: ArraySlice<UInt8>) { buffer.append(contentsOf: bytes) }

    public mutating func next() throws(ProtoError) -> AgentFrame? {
        guard buffer.count >= AgentFrame.headerSize else { return nil }
        let length = Int(buffer[0]) << 24 | Int(buffer[1]) << 16 | Int(buffer[2]) << 8 | Int(buffer[3])
        guard length <= AgentFrame.maximumPayload else { throw ProtoError("a frame of \(length) bytes is over the limit of \(AgentFrame.maximumPayload)") }
        guard let kind = AgentFrameKind(rawValue: buffer[4]) else { throw ProtoError("frame kind \(buffer[4]) is unknown") }
        guard buffer.count >= AgentFrame.headerSize + length else { return nil }
        let stream = UInt32(buffer[5]) << 24 | UInt32(buffer[6]) << 16 | UInt32(buffer[7]) << 8 | UInt32(buffer[8])
        let payload = Array(buffer[AgentFrame.headerSize..<AgentFrame.headerSize + length])
        buffer.removeFirst(AgentFrame.headerSize + length)
        return AgentFrame(kind, stream: stream, payload: payload)
    }
}

public enum AgentOperation: UInt64, Sendable {
    case mountRootfs = 1    // container, device, fileSystem
    case startProcess = 2   // container, handle, process fields; reply: pid
    case signal = 3         // handle, signal, all
    case resize = 4         // handle, width, height
    case closeStdin = 5     // handle
    case pids = 6           // container; reply: pids
    case removeContainer = 7 // container: unmounts its root file system
    case stats = 8          // reply: memory and CPU figures of the container's processes
}

/// One request. Fields by number: 1 operation, 2 container, 3 handle, 4 device, 5 fileSystem,
/// 6 args, 7 env, 8 cwd, 9 uid, 10 gid, 11 terminal, 12 hostname, 13 width, 14 height,
/// 15 signal, 16 all, 17 additional gids, 18 join (the handle of the container's first process,
/// whose namespaces an exec joins), 19 stdin (the host will send stdin).
public struct AgentRequest: Sendable, Equatable {
    public var operation: AgentOperation
    public var container = ""
    public var handle: UInt32 = 0
    public var device = ""
    public var fileSystem = ""
    public var args: [String] = []
    public var env: [String] = []
    public var cwd = ""
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    public var additionalGids: [UInt32] = []
    public var terminal = false
    public var hostname = ""
    public var width: UInt32 = 0
    public var height: UInt32 = 0
    public var signal: UInt32 = 0
    public var all = false
    public var join: UInt32 = 0
    public var stdin = false

    public init(_ operation: AgentOperation) { self.operation = operation }

    public var encoded: [UInt8] {
        var writer = ProtoWriter()
        writer.varint(1, operation.rawValue)
        writer.string(2, container)
        writer.uint32(3, handle)
        writer.string(4, device)
        writer.string(5, fileSystem)
        writer.strings(6, args)
        writer.strings(7, env)
        writer.string(8, cwd)
        writer.uint32(9, uid)
        writer.uint32(10, gid)
        writer.bool(11, terminal)
        writer.string(12, hostname)
        writer.uint32(13, width)
        writer.uint32(14, height)
        writer.uint32(15, signal)
        writer.bool(16, all)
        for gid in additionalGids { writer.key(17, 0); writer.rawVarint(UInt64(gid)) }
        writer.uint32(18, join)
        writer.bool(19, stdin)
        return writer.bytes
    }

    public init(decoding bytes: [UInt8]) throws(ProtoError) {
        let message = try ProtoMessage(bytes)
        guard let operation = AgentOperation(rawValue: message.varint(1)) else { throw ProtoError("operation \(message.varint(1)) is unknown") }
        self.operation = operation
        container = message.string(2)
        handle = message.uint32(3)
        device = message.string(4)
        fileSystem = message.string(5)
        args = message.strings(6)
        env = message.strings(7)
        cwd = message.string(8)
        uid = message.uint32(9)
        gid = message.uint32(10)
        terminal = message.bool(11)
        hostname = message.string(12)
        width = message.uint32(13)
        height = message.uint32(14)
        signal = message.uint32(15)
        all = message.bool(16)
        additionalGids = try message.repeatedVarints(17).map { UInt32(truncatingIfNeeded: $0) }
        join = message.uint32(18)
        stdin = message.bool(19)
    }
}

/// A reply: 1 error (empty when it worked), 2 pid, 3 pids, 4 memory bytes, 5 CPU nanoseconds.
public struct AgentReply: Sendable, Equatable {
    public var error = ""
    public var pid: UInt32 = 0
    public var pids: [UInt32] = []
    public var memoryBytes: UInt64 = 0
    public var cpuNanoseconds: UInt64 = 0

    public init(error: String = "", pid: UInt32 = 0) {
        self.error = error
        self.pid = pid
    }

    public var encoded: [UInt8] {
        var writer = ProtoWriter()
        writer.string(1, error)
        writer.uint32(2, pid)
        for pid in pids { writer.key(3, 0); writer.rawVarint(UInt64(pid)) }
        writer.varint(4, memoryBytes)
        writer.varint(5, cpuNanoseconds)
        return writer.bytes
    }

    public init(decoding bytes: [UInt8]) throws(ProtoError) {
        let message = try ProtoMessage(bytes)
        error = message.string(1)
        pid = message.uint32(2)
        pids = try message.repeatedVarints(3).map { UInt32(truncatingIfNeeded: $0) }
        memoryBytes = message.varint(4)
        cpuNanoseconds = message.varint(5)
    }
}

/// A process ended: 1 status as containerd reports it (the exit code, or 128 + the signal).
public struct AgentExit: Sendable, Equatable {
    public var status: UInt32
    /// The guest kernel's OOM killer ended it, or a process under it (a SIGKILL exit, 137, with
    /// an OOM kill in the VM since it started): what containerd's /tasks/oom reports.
    public var oomKilled: Bool
    public init(status: UInt32, oomKilled: Bool = false) { self.status = status; self.oomKilled = oomKilled }
    public var encoded: [UInt8] {
        var writer = ProtoWriter()
        writer.uint32(1, status)
        if oomKilled { writer.bool(2, true) }
        return writer.bytes
    }
    public init(decoding bytes: [UInt8]) throws(ProtoError) {
        let message = try ProtoMessage(bytes)
        status = message.uint32(1)
        oomKilled = message.bool(2)
    }
}

/// Where the agent listens: the port name on the qemu engine's virtio-serial bus (the one every
/// qemu-engine VM has, made for qemu-guest-agent), the vsock port on the kvm engine.
public enum AgentChannel {
    public static let serialPortName = "org.qemu.guest_agent.0"
    public static let vsockPort: UInt32 = 1024
}
