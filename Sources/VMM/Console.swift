import Devices
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Writes all of a buffer to a file descriptor, retrying short writes and EINTR. Errors drop the
/// output: a console that went away must not stop the guest.
@discardableResult
func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, flags: Int32? = nil) -> Bool {
    guard var cursor = bytes.baseAddress else { return true }
    var remaining = bytes.count
    while remaining > 0 {
        let written = flags.map { send(fd, cursor, remaining, $0) } ?? write(fd, cursor, remaining)
        if written < 0 {
            if errno == EINTR || errno == EAGAIN { continue }
            return false
        }
        cursor += written
        remaining -= written
    }
    return true
}

struct FileDescriptorOutput: SerialOutput {
    let fd: Int32
    func write(_ bytes: UnsafeRawBufferPointer) { writeAll(fd, bytes) }
}

/// The console log file and, while one is attached, a control-socket client.
struct TeeOutput: SerialOutput {
    let first: any SerialOutput
    let second: any SerialOutput
    func write(_ bytes: UnsafeRawBufferPointer) {
        first.write(bytes)
        second.write(bytes)
    }
}

struct DiscardOutput: SerialOutput {
    func write(_ bytes: UnsafeRawBufferPointer) {}
}

/// The console's escape sequence, QEMU's and screen's: Ctrl-A then `x` quits, Ctrl-A Ctrl-A sends
/// one Ctrl-A to the guest; Ctrl-A followed by anything else sends both bytes.
struct ConsoleEscape {
    static let prefix: UInt8 = 0x01
    private var sawPrefix = false

    enum Action: Equatable { case forward([UInt8]), quit }

    mutating func feed(_ bytes: some Sequence<UInt8>) -> Action {
        var forward: [UInt8] = []
        for byte in bytes {
            if sawPrefix {
                sawPrefix = false
                if byte == UInt8(ascii: "x") || byte == UInt8(ascii: "X") { return .quit }
                if byte == Self.prefix { forward.append(byte); continue }
                forward.append(Self.prefix)
                forward.append(byte)
            } else if byte == Self.prefix {
                sawPrefix = true
            } else {
                forward.append(byte)
            }
        }
        return .forward(forward)
    }
}

/// Puts a terminal in raw mode for the guest and restores it afterwards.
final class RawTerminal: @unchecked Sendable {
    private let fd: Int32
    private var saved = termios()

    init?(fd: Int32) {
        guard isatty(fd) == 1 else { return nil }
        self.fd = fd
        guard tcgetattr(fd, &saved) == 0 else { return nil }
        var raw = saved
        cfmakeraw(&raw)
        tcsetattr(fd, TCSANOW, &raw)
    }

    func restore() { tcsetattr(fd, TCSANOW, &saved) }
}

/// A guest serial console bound to one host endpoint.
final class Console: @unchecked Sendable {
    let output: any SerialOutput
    private let configuration: ConsoleConfiguration
    private var terminal: RawTerminal?
    private var listener: Int32 = -1
    private let client = SocketClient()

    init(_ configuration: ConsoleConfiguration) throws(VMMError) {
        self.configuration = configuration
        switch configuration {
        case .stdio:
            output = FileDescriptorOutput(fd: STDOUT_FILENO)
        case .none:
            output = DiscardOutput()
        case let .file(path):
            let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            guard fd >= 0 else {
                throw .invalidConfiguration(field: "--console", reason: "cannot open \(path) for writing: \(String(cString: strerror(errno)))")
            }
            // A managed VM logs here and lets `vireo console` attach through the control socket.
            output = TeeOutput(first: FileDescriptorOutput(fd: fd), second: SocketOutput(client: client))
        case let .socket(path):
            output = SocketOutput(client: client)
            listener = try Self.listen(path: path)
        }
    }

    private static func listen(path: String) throws(VMMError) -> Int32 {
        try listenUnixSocket(path: path, field: "--console")
    }

    /// Starts delivering host input to `serial` on a thread of its own.
    func startInput(to serial: Serial8250, stop: StopController) throws(VMMError) {
        switch configuration {
        case .stdio:
            terminal = RawTerminal(fd: STDIN_FILENO)
            _ = try HostThread.spawn(name: "console-in") {
                var escape = ConsoleEscape()
                var buffer = [UInt8](repeating: 0, count: 256)
                while !stop.isStopping {
                    let count = buffer.withUnsafeMutableBytes { read(STDIN_FILENO, $0.baseAddress, $0.count) }
                    if count < 0 && errno == EINTR { continue }
                    if count <= 0 { return }   // EOF or error: no more input, the guest keeps running
                    switch escape.feed(buffer[0..<count]) {
                    case .quit: stop.request(.consoleQuit); return
                    case let .forward(bytes): if !bytes.isEmpty { serial.receive(bytes) }
                    }
                }
            }
        case .socket:
            let listener = self.listener
            _ = try HostThread.spawn(name: "console-sock") { [self] in
                while !stop.isStopping {
                    let fd = accept(listener, nil, nil)
                    if fd < 0 { if errno == EINTR { continue }; return }
                    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                    serve(client: fd, serial: serial)
                    close(fd)
                }
            }
        case .file, .none:
            break
        }
    }

    /// Makes `fd` the console client until it hangs up: guest output goes to it (as well as to the
    /// log, if any) and what it sends is typed into the guest. A newer client replaces an older one,
    /// as with a serial line. Runs on the caller's thread; the caller closes `fd`.
    func serve(client fd: Int32, serial: Serial8250) {
        let previous = client.fd.withLock { current -> Int32 in defer { current = fd }; return current }
        if previous >= 0 { shutdown(previous, Int32(SHUT_RDWR)) }
        var buffer = [UInt8](repeating: 0, count: 256)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            serial.receive(buffer[0..<count])
        }
        client.fd.withLock { current in if current == fd { current = -1 } }
    }

    var kind: String {
        switch configuration {
        case .stdio: return "stdio"
        case .none: return "none"
        case .file: return "a log file"
        case .socket: return "a socket"
        }
    }

    /// Whether `serve(client:)` can attach to this console: a socket or a log file.
    var acceptsClients: Bool {
        switch configuration {
        case .socket, .file: return true
        case .stdio, .none: return false
        }
    }

    /// Restores the terminal. Safe to call more than once.
    func finish() {
        terminal?.restore()
        terminal = nil
        if case let .socket(path) = configuration, listener >= 0 {
            close(listener)
            listener = -1
            unlink(path)
        }
    }
}

/// The connected console client's socket, or -1.
final class SocketClient: Sendable {
    let fd = Mutex<Int32>(-1)
}

/// Console output to whichever socket client is connected; dropped while none is.
struct SocketOutput: SerialOutput {
    let client: SocketClient
    func write(_ bytes: UnsafeRawBufferPointer) {
        client.fd.withLock { fd in
            if fd >= 0, !writeAll(fd, bytes, flags: Int32(MSG_NOSIGNAL)) { shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }
}

/// Binds a listening Unix socket readable only by its owner. An existing socket file is replaced
/// (a previous run's); anything else at the path is left alone and refused.
func listenUnixSocket(path: String, field: String, backlog: Int32 = 1) throws(VMMError) -> Int32 {
    var info = stat()
    if lstat(path, &info) == 0 {
        guard (info.st_mode & S_IFMT) == S_IFSOCK else {
            throw .invalidConfiguration(field: field, reason: "\(path) exists and is not a socket; refusing to replace it")
        }
        unlink(path)
    }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let capacity = MemoryLayout.size(ofValue: address.sun_path)
    guard path.utf8.count < capacity else {
        throw .invalidConfiguration(field: field, reason: "socket path \(path) is longer than \(capacity - 1) bytes")
    }
    withUnsafeMutableBytes(of: &address.sun_path) { buffer in
        for (index, byte) in path.utf8.enumerated() { buffer[index] = byte }
    }
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw .host(operation: "socket", errno: errno) }
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard bound == 0, Glibc.listen(fd, backlog) == 0 else {
        let code = errno
        close(fd)
        throw .invalidConfiguration(field: field, reason: "cannot listen on \(path): \(String(cString: strerror(code)))")
    }
    chmod(path, 0o600)
    return fd
}
