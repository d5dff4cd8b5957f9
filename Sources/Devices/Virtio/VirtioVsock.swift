import CHostSupport
import GuestMemory
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The 44-byte header of every virtio-vsock packet (virtio 1.x §5.10.6), little-endian.
struct VsockHeader: Equatable {
    static let size = 44
    enum Operation: UInt16 {
        case request = 1, response, reset, shutdown, readWrite, creditUpdate, creditRequest
    }
    static let streamType: UInt16 = 1

    var sourceCID: UInt64
    var destinationCID: UInt64
    var sourcePort: UInt32
    var destinationPort: UInt32
    var length: UInt32
    var type: UInt16 = streamType
    var operation: UInt16
    var flags: UInt32 = 0
    var bufferAllocation: UInt32 = 0
    var forwardCount: UInt32 = 0

    init(sourceCID: UInt64, destinationCID: UInt64, sourcePort: UInt32, destinationPort: UInt32,
         length: UInt32 = 0, operation: Operation, flags: UInt32 = 0) {
        self.sourceCID = sourceCID
        self.destinationCID = destinationCID
        self.sourcePort = sourcePort
        self.destinationPort = destinationPort
        self.length = length
        self.operation = operation.rawValue
        self.flags = flags
    }

    init?(_ bytes: [UInt8]) {
        guard bytes.count >= Self.size else { return nil }
        func field<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
            var value: T = 0
            for index in (0..<MemoryLayout<T>.size).reversed() { value = value << 8 | T(bytes[offset + index]) }
            return value
        }
        sourceCID = field(0, UInt64.self)
        destinationCID = field(8, UInt64.self)
        sourcePort = field(16, UInt32.self)
        destinationPort = field(20, UInt32.self)
        length = field(24, UInt32.self)
        type = field(28, UInt16.self)
        operation = field(30, UInt16.self)
        flags = field(32, UInt32.self)
        bufferAllocation = field(36, UInt32.self)
        forwardCount = field(40, UInt32.self)
    }

    var bytes: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(Self.size)
        func append<T: FixedWidthInteger>(_ value: T) {
            for index in 0..<MemoryLayout<T>.size { out.append(UInt8(truncatingIfNeeded: value >> (8 * index))) }
        }
        append(sourceCID); append(destinationCID); append(sourcePort); append(destinationPort); append(length)
        append(type); append(operation); append(flags); append(bufferAllocation); append(forwardCount)
        return out
    }
}

/// One stream between a guest port and a host Unix socket.
struct VsockConnection {
    enum Phase { case awaitingGuest(deadline: UInt64), established, closed }
    let fd: Int32
    let guestPort: UInt32
    let hostPort: UInt32
    var phase: Phase
    var peerBufferAllocation: UInt32 = 0
    var peerForwardCount: UInt32 = 0
    /// Bytes sent to the guest (tx_cnt) and bytes of the guest's forwarded to the host (fwd_cnt).
    var sentToGuest: UInt32 = 0
    var forwardedToHost: UInt32 = 0
    var advertisedForwardCount: UInt32 = 0
    var toHost: [UInt8] = []
    var toGuest: [UInt8] = []
    var hostClosed = false
    var guestStoppedSending = false

    /// How much more the guest has room for.
    var guestCredit: UInt32 { peerBufferAllocation &- (sentToGuest &- peerForwardCount) }

    var key: VsockKey { VsockKey(guestPort: guestPort, hostPort: hostPort) }
}

struct VsockKey: Hashable { let guestPort: UInt32; let hostPort: UInt32 }

/// virtio-vsock (virtio 1.x §5.10) with Firecracker's host side: the host reaches the guest by
/// connecting to the Unix socket at `socketPath` and writing `CONNECT <port>\n` (answered with
/// `OK <host port>\n`); a guest connecting to the host (CID 2) on port P reaches the Unix socket
/// `<socketPath>_P`. Stream sockets only; credit-based flow control both ways.
public final class VirtioVsock: VirtioDevice, BackgroundDevice, Snapshottable, @unchecked Sendable {
    public static let hostCID: UInt64 = 2
    public static let queueSize: UInt16 = 256
    /// What the device advertises as its receive buffer per connection.
    static let bufferAllocation: UInt32 = 256 << 10
    static let maximumPacketPayload = 64 << 10
    /// A host connection whose guest port never answers is reset after this long.
    static let connectTimeout: UInt64 = 2_000_000_000
    static let maximumConnections = 1024

    public let guestCID: UInt64
    public let socketPath: String
    private let listener: Int32
    private let wake: Int32
    private let stopping = Atomic<Bool>(false)
    private let access = VirtioQueueAccessLink()

    struct State {
        var connections: [VsockKey: VsockConnection] = [:]
        /// Host sockets that have not sent their CONNECT line yet.
        var greeting: [Int32: [UInt8]] = [:]
        /// Control packets (no payload) waiting for a receive buffer.
        var control: [VsockHeader] = []
        var nextHostPort: UInt32 = 1 << 30
        /// Descriptors the background thread must close (the vCPU path never closes what it may poll).
        var closing: [Int32] = []
    }
    private let state = Mutex(State())

    public let packetsFromGuest = Atomic<UInt64>(0)
    public let packetsToGuest = Atomic<UInt64>(0)

    public init(guestCID: UInt64, socketPath: String, listener: Int32) throws(NetworkBackendError) {
        self.guestCID = guestCID
        self.socketPath = socketPath
        self.listener = listener
        wake = vireo_eventfd_nonblocking()
        guard wake >= 0 else { throw .tap(name: socketPath, errno: errno) }
        _ = fcntl(listener, F_SETFL, fcntl(listener, F_GETFL) | O_NONBLOCK)
    }

    deinit {
        Glibc.close(wake)
        Glibc.close(listener)
        unlink(socketPath)
    }

    public var deviceType: UInt32 { 19 }
    public var deviceFeatures: UInt64 { VirtioFeature.version1 }
    public var queueMaximumSizes: [UInt16] { [Self.queueSize, Self.queueSize, Self.queueSize] }
    public var needsBackgroundThread: Bool { true }

    public func attach(_ access: any VirtioQueueAccess) { self.access.attach(access) }

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for index in data.indices {
            let position = offset + index
            data[index] = position >= 0 && position < 8 ? UInt8(truncatingIfNeeded: guestCID >> (8 * UInt64(position))) : 0
        }
    }

    public func process(queue index: Int, _ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        switch index {
        case 1: return try transmit(queue, memory: memory)
        case 2: return try deliverTransportReset(queue, memory: memory)
        default:
            // New receive buffers.
            signal()
            return false
        }
    }

    /// Set by a restore: the guest's connections ended with the VMM that saved it (its host
    /// sockets are gone), so the driver is told to reset them all and its applications reconnect.
    private let transportResetPending = Atomic<Bool>(false)

    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.7) in the driver's first event buffer.
    private func deliverTransportReset(_ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        guard transportResetPending.load(ordering: .acquiring), let chain = try queue.popChain() else { return false }
        guard let buffer = chain.writable.first, buffer.length >= 4 else {
            throw .malformedRequest("event buffer of \(chain.writable.first?.length ?? 0) bytes, too small for an event (4)")
        }
        do { try memory.write(UInt32(0), at: buffer.address) } catch { throw .bufferOutsideMemory(buffer.address, length: buffer.length) }
        try queue.pushUsed(head: chain.head, written: 4)
        transportResetPending.store(false, ordering: .releasing)
        return true
    }

    /// The CID the guest knows itself by; connections end with the saving VMM.
    public struct Saved: Codable, Sendable, Equatable {
        public var guestCID: UInt64
    }

    public func captureState() -> Saved { Saved(guestCID: guestCID) }

    public func applyState(_ saved: Saved) throws(StateError) {
        guard saved.guestCID == guestCID else {
            throw .invalid(field: "guestCID", reason: "the guest knows itself as CID \(saved.guestCID), this VM's device has \(guestCID)")
        }
        transportResetPending.store(true, ordering: .releasing)
    }

    private func signal() {
        var one: UInt64 = 1
        _ = write(wake, &one, 8)
    }

    private func header(for connection: VsockConnection, _ operation: VsockHeader.Operation, length: UInt32 = 0, flags: UInt32 = 0) -> VsockHeader {
        var header = VsockHeader(sourceCID: Self.hostCID, destinationCID: guestCID, sourcePort: connection.hostPort,
                                 destinationPort: connection.guestPort, length: length, operation: operation, flags: flags)
        header.bufferAllocation = Self.bufferAllocation
        header.forwardCount = connection.forwardedToHost
        return header
    }

    private func reset(guestPort: UInt32, hostPort: UInt32) -> VsockHeader {
        var header = VsockHeader(sourceCID: Self.hostCID, destinationCID: guestCID, sourcePort: hostPort,
                                 destinationPort: guestPort, operation: .reset)
        header.bufferAllocation = Self.bufferAllocation
        return header
    }

    // MARK: guest to host (vCPU thread, transport lock held)

    private func transmit(_ queue: VirtQueue, memory: GuestMemory) throws(VirtioError) -> Bool {
        var used = false
        while let chain = try queue.popChain() {
            let bytes = try memory.gather(chain.readable, limit: VsockHeader.size + Self.maximumPacketPayload)
            try queue.pushUsed(head: chain.head, written: 0)
            used = true
            packetsFromGuest.add(1, ordering: .relaxed)
            guard let header = VsockHeader(bytes) else { continue }       // too short: dropped
            let payload = Array(bytes[VsockHeader.size...].prefix(Int(header.length)))
            state.withLock { state in handleFromGuest(header, payload: payload, state: &state) }
        }
        signal()
        return used
    }

    private func handleFromGuest(_ packet: VsockHeader, payload: [UInt8], state: inout State) {
        // Only streams from this guest to the host; anything else is answered with a reset.
        guard packet.sourceCID == guestCID, packet.destinationCID == Self.hostCID, packet.type == VsockHeader.streamType else {
            if packet.operation != VsockHeader.Operation.reset.rawValue {
                state.control.append(reset(guestPort: packet.sourcePort, hostPort: packet.destinationPort))
            }
            return
        }
        let key = VsockKey(guestPort: packet.sourcePort, hostPort: packet.destinationPort)
        if var connection = state.connections[key] {
            connection.peerBufferAllocation = packet.bufferAllocation
            connection.peerForwardCount = packet.forwardCount
            switch VsockHeader.Operation(rawValue: packet.operation) {
            case .response:
                if case .awaitingGuest = connection.phase {
                    connection.phase = .established
                    let reply = Array("OK \(connection.hostPort)\n".utf8)
                    _ = reply.withUnsafeBytes { send(connection.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                }
            case .readWrite:
                guard case .established = connection.phase,
                      connection.toHost.count + payload.count <= Int(Self.bufferAllocation) else {
                    // Data before the handshake, or beyond the credit we gave: the guest broke the protocol.
                    retire(&connection, state: &state, resetGuest: true)
                    return
                }
                connection.toHost += payload
                flushToHost(&connection, state: &state)
            case .shutdown:
                if packet.flags & 2 != 0 {
                    connection.guestStoppedSending = true
                    if connection.toHost.isEmpty { shutdown(connection.fd, Int32(SHUT_WR)) }
                }
                if packet.flags & 3 == 3 || (connection.guestStoppedSending && connection.hostClosed) {
                    retire(&connection, state: &state, resetGuest: true)
                    return
                }
            case .reset:
                retire(&connection, state: &state, resetGuest: false)
                return
            case .creditRequest:
                state.control.append(header(for: connection, .creditUpdate))
                connection.advertisedForwardCount = connection.forwardedToHost
            case .creditUpdate, .request, .none:
                break
            }
            state.connections[key] = connection
            return
        }
        guard packet.operation == VsockHeader.Operation.request.rawValue else {
            if packet.operation != VsockHeader.Operation.reset.rawValue {
                state.control.append(reset(guestPort: packet.sourcePort, hostPort: packet.destinationPort))
            }
            return
        }
        // The guest connects to host port P: the host listens at <socketPath>_P.
        guard state.connections.count < Self.maximumConnections, let fd = connectUnix(socketPath + "_\(packet.destinationPort)") else {
            state.control.append(reset(guestPort: packet.sourcePort, hostPort: packet.destinationPort))
            return
        }
        var connection = VsockConnection(fd: fd, guestPort: packet.sourcePort, hostPort: packet.destinationPort, phase: .established)
        connection.peerBufferAllocation = packet.bufferAllocation
        connection.peerForwardCount = packet.forwardCount
        state.control.append(header(for: connection, .response))
        state.connections[key] = connection
    }

    /// Writes what the host socket takes now; the rest waits for POLLOUT.
    private func flushToHost(_ connection: inout VsockConnection, state: inout State) {
        while !connection.toHost.isEmpty {
            let written = connection.toHost.withUnsafeBytes { send(connection.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
            if written < 0 {
                if errno == EINTR { continue }
                if errno != EAGAIN { retire(&connection, state: &state, resetGuest: true) }
                break
            }
            connection.toHost.removeFirst(written)
            connection.forwardedToHost &+= UInt32(written)
        }
        if connection.toHost.isEmpty && connection.guestStoppedSending { shutdown(connection.fd, Int32(SHUT_WR)) }
        // Tell the guest about freed room once a quarter of its window has drained.
        if connection.forwardedToHost &- connection.advertisedForwardCount >= Self.bufferAllocation / 4 {
            state.control.append(header(for: connection, .creditUpdate))
            connection.advertisedForwardCount = connection.forwardedToHost
        }
    }

    /// The driver's session ended: every connection belonged to it. Host sockets are closed (by
    /// the background thread, as everything it may poll), so host peers see the guest go away.
    public func reset() {
        state.withLock { state in
            for connection in state.connections.values { state.closing.append(connection.fd) }
            state.connections.removeAll()
            state.control.removeAll()
        }
        var one: UInt64 = 1
        _ = Glibc.write(wake, &one, 8)
    }

    private func retire(_ connection: inout VsockConnection, state: inout State, resetGuest: Bool) {
        if resetGuest { state.control.append(reset(guestPort: connection.guestPort, hostPort: connection.hostPort)) }
        connection.phase = .closed
        state.connections[connection.key] = nil
        state.closing.append(connection.fd)
    }

    private func connectUnix(_ path: String) -> Int32? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        guard path.utf8.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in path.utf8.enumerated() { buffer[index] = byte }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { Glibc.close(fd); return nil }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        return fd
    }

    // MARK: host to guest (background thread)

    /// Also removes the host socket, so nobody connects to a VM that has gone.
    public func stopBackground() {
        stopping.store(true, ordering: .releasing)
        unlink(socketPath)
        signal()
    }

    public func runBackground() {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while !stopping.load(ordering: .acquiring) {
            // Close what the vCPU path retired, then build this round's poll set.
            let (descriptors, keys, timeout) = state.withLock { state -> ([pollfd], [VsockKey?], Int32) in
                for fd in state.closing { Glibc.close(fd) }
                state.closing = []
                var descriptors = [pollfd(fd: wake, events: Int16(POLLIN), revents: 0),
                                   pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]
                var keys: [VsockKey?] = [nil, nil]
                for fd in state.greeting.keys {
                    descriptors.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0))
                    keys.append(nil)
                }
                let now = RateLimiter.now()
                var nearest: UInt64?
                for connection in state.connections.values {
                    var events: Int16 = 0
                    if case let .awaitingGuest(deadline) = connection.phase { nearest = min(nearest ?? deadline, deadline) }
                    if case .established = connection.phase {
                        if !connection.hostClosed && connection.toGuest.count < Self.maximumPacketPayload { events |= Int16(POLLIN) }
                        if !connection.toHost.isEmpty { events |= Int16(POLLOUT) }
                    }
                    descriptors.append(pollfd(fd: connection.fd, events: events, revents: 0))
                    keys.append(connection.key)
                }
                let timeout = nearest.map { Int32(min(($0 > now ? $0 - now : 0) / 1_000_000 + 1, 60_000)) } ?? -1
                return (descriptors, keys, timeout)
            }
            var polled = descriptors
            if poll(&polled, nfds_t(polled.count), timeout) < 0 && errno != EINTR { return }
            if polled[0].revents != 0 {
                var value: UInt64 = 0
                _ = read(wake, &value, 8)
            }
            if polled[1].revents != 0 { acceptHosts() }
            state.withLock { state in
                let now = RateLimiter.now()
                for (index, descriptor) in polled.enumerated().dropFirst(2) where descriptor.revents != 0 || keys[index] != nil {
                    if let key = keys[index] {
                        guard var connection = state.connections[key] else { continue }
                        if case let .awaitingGuest(deadline) = connection.phase, deadline <= now {
                            retire(&connection, state: &state, resetGuest: true)
                            continue
                        }
                        if descriptor.revents & Int16(POLLOUT) != 0 { flushToHost(&connection, state: &state) }
                        guard case .established = connection.phase else { continue }
                        if descriptor.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                            readFromHost(&connection, buffer: &buffer, state: &state)
                        }
                        if case .closed = connection.phase { continue }
                        state.connections[key] = connection
                    } else {
                        readGreeting(descriptor.fd, state: &state)
                    }
                }
            }
            deliverToGuest()
        }
    }

    private func acceptHosts() {
        while true {
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            state.withLock { state in
                if state.greeting.count + state.connections.count >= Self.maximumConnections { Glibc.close(fd) } else { state.greeting[fd] = [] }
            }
        }
    }

    /// Reads a host's `CONNECT <port>\n` and asks the guest to accept the connection.
    private func readGreeting(_ fd: Int32, state: inout State) {
        var chunk = [UInt8](repeating: 0, count: 64)
        let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if count < 0 && (errno == EAGAIN || errno == EINTR) { return }
        guard count > 0, var line = state.greeting[fd] else {
            state.greeting[fd] = nil
            Glibc.close(fd)
            return
        }
        line += chunk[0..<count]
        guard let newline = line.firstIndex(of: 0x0a) else {
            if line.count > 32 { state.greeting[fd] = nil; Glibc.close(fd) } else { state.greeting[fd] = line }
            return
        }
        state.greeting[fd] = nil
        let text = String(decoding: line[..<newline], as: UTF8.self)
        let words = text.split(separator: " ")
        guard words.count == 2, words[0] == "CONNECT", let port = UInt32(words[1]) else {
            Glibc.close(fd)
            return
        }
        let hostPort = state.nextHostPort
        state.nextHostPort = state.nextHostPort == UInt32.max ? 1 << 30 : state.nextHostPort + 1
        var connection = VsockConnection(fd: fd, guestPort: port, hostPort: hostPort,
                                         phase: .awaitingGuest(deadline: RateLimiter.now() + Self.connectTimeout))
        // Bytes after the line are data for the guest once it accepts.
        connection.toGuest = Array(line[(newline + 1)...])
        state.control.append(header(for: connection, .request))
        state.connections[connection.key] = connection
    }

    private func readFromHost(_ connection: inout VsockConnection, buffer: inout [UInt8], state: inout State) {
        let room = Self.maximumPacketPayload - connection.toGuest.count
        guard room > 0 else { return }
        let count = buffer.withUnsafeMutableBytes { recv(connection.fd, $0.baseAddress, min(room, $0.count), 0) }
        if count > 0 {
            connection.toGuest += buffer[0..<count]
        } else if count == 0 || (errno != EAGAIN && errno != EINTR) {
            // The host closed (or broke) its end: the guest gets no more data.
            connection.hostClosed = true
            if connection.toGuest.isEmpty {
                state.control.append(header(for: connection, .shutdown, flags: 3))
            }
        }
    }

    /// Fills receive buffers: control packets first, then data within each guest's credit.
    private func deliverToGuest() {
        guard let access = access.current else { return }
        _ = access.withQueue(0) { (queue, memory) throws(VirtioError) -> Bool in
            try state.withLock { (state) throws(VirtioError) -> Bool in
                var delivered = false
                while let next = state.control.first {
                    guard let chain = try queue.popChain() else { return delivered }
                    state.control.removeFirst()
                    try put(next.bytes, chain: chain, queue: queue, memory: memory)
                    delivered = true
                }
                for key in Array(state.connections.keys) {
                    guard var connection = state.connections[key], case .established = connection.phase else { continue }
                    while !connection.toGuest.isEmpty && connection.guestCredit > 0 {
                        guard let chain = try queue.popChain() else {
                            state.connections[key] = connection
                            return delivered
                        }
                        let capacity = chain.writable.reduce(0) { $0 + Int($1.length) } - VsockHeader.size
                        guard capacity > 0 else { throw .malformedRequest("a vsock receive buffer smaller than its 44-byte header") }
                        let take = min(connection.toGuest.count, Int(connection.guestCredit), capacity)
                        var packet = header(for: connection, .readWrite, length: UInt32(take)).bytes
                        packet += connection.toGuest[0..<take]
                        connection.toGuest.removeFirst(take)
                        connection.sentToGuest &+= UInt32(take)
                        connection.advertisedForwardCount = connection.forwardedToHost
                        try put(packet, chain: chain, queue: queue, memory: memory)
                        delivered = true
                    }
                    if connection.toGuest.isEmpty && connection.hostClosed {
                        state.control.append(header(for: connection, .shutdown, flags: 3))
                        connection.hostClosed = false    // announced once
                    }
                    state.connections[key] = connection
                }
                // Shutdowns queued just now go out if buffers remain.
                while let next = state.control.first, let chain = try queue.popChain() {
                    state.control.removeFirst()
                    try put(next.bytes, chain: chain, queue: queue, memory: memory)
                    delivered = true
                }
                return delivered
            }
        }
    }

    private func put(_ packet: [UInt8], chain: DescriptorChain, queue: VirtQueue, memory: GuestMemory) throws(VirtioError) {
        guard chain.readable.isEmpty else { throw .malformedRequest("a vsock receive buffer must be device-writable") }
        let capacity = chain.writable.reduce(0) { $0 + Int($1.length) }
        guard capacity >= VsockHeader.size else { throw .malformedRequest("a vsock receive buffer smaller than its 44-byte header") }
        let written = try memory.scatter(packet[...], into: chain.writable)
        try queue.pushUsed(head: chain.head, written: written)
        packetsToGuest.add(1, ordering: .relaxed)
    }
}
