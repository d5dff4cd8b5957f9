import API
import ArgumentParser
import Engines
import Library
#if canImport(Glibc)
import Glibc
#endif

struct ConsoleCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "console",
        abstract: "Attach to a running VM's serial console. Ctrl-] detaches; the VM keeps running.",
        discussion: """
            Everything you type goes to the guest; the terminal is in raw mode while attached. \
            When standard input is not a terminal it is sent to the guest until it ends, and \
            output is shown until the VM stops or you interrupt. One client at a time: a new \
            attach takes the console over.
            """)

    @Argument(help: "VM name.")
    var name: String

    func run() throws { try attachConsole(name, manager: openManager()) }
}

/// The detach key, virsh's: Ctrl-].
let consoleDetachByte: UInt8 = 0x1d

func attachConsole(_ name: String, manager: VMManager) throws {
    let connection: ConsoleStream
    do throws(LibraryError) { connection = try manager.openConsole(name) } catch { throw fail(error) }
    var early = connection.early
    if !early.isEmpty { early.withUnsafeMutableBytes { _ = writeAll(STDOUT_FILENO, $0) } }

    let interactive = isatty(STDIN_FILENO) == 1
    var saved = termios()
    if interactive {
        tcgetattr(STDIN_FILENO, &saved)
        var raw = saved
        cfmakeraw(&raw)
        tcsetattr(STDIN_FILENO, TCSANOW, &raw)
        printConsoleNote("attached to VM '\(name)'; Ctrl-] detaches", interactive: true)
    }
    defer {
        if interactive {
            tcsetattr(STDIN_FILENO, TCSANOW, &saved)
            printConsoleNote("detached from VM '\(name)'", interactive: false)
        }
    }
    var descriptors = [pollfd(fd: STDIN_FILENO, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: connection.fd, events: Int16(POLLIN), revents: 0)]
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        if poll(&descriptors, 2, -1) < 0 { if errno == EINTR { continue }; return }
        if descriptors[1].revents != 0 {
            let count = buffer.withUnsafeMutableBytes { recv(connection.fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { if count < 0 && errno == EINTR { continue }; return }   // the VM stopped
            _ = buffer.withUnsafeMutableBytes { writeAll(STDOUT_FILENO, UnsafeMutableRawBufferPointer(rebasing: $0[0..<count])) }
        }
        if descriptors[0].revents != 0 {
            let count = buffer.withUnsafeMutableBytes { read(STDIN_FILENO, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 {
                descriptors[0].fd = -1   // input ended; keep showing output
                continue
            }
            var chunk = Array(buffer[0..<count])
            if interactive, let detach = chunk.firstIndex(of: consoleDetachByte) {
                chunk = Array(chunk[..<detach])
                if !chunk.isEmpty { _ = chunk.withUnsafeMutableBytes { send(connection.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }
                return
            }
            _ = chunk.withUnsafeMutableBytes { send(connection.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        }
    }
}

private func printConsoleNote(_ text: String, interactive: Bool) {
    var bytes = Array(("vireo: " + text + (interactive ? "\r\n" : "\n")).utf8)
    _ = bytes.withUnsafeMutableBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
}

struct Logs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "logs",
        abstract: "Print a VM's console output since it last started (the run before is in console.log.1).")

    @Argument(help: "VM name.")
    var name: String

    @Flag(name: [.short, .long], help: "Keep printing new output until the VM stops.")
    var follow = false

    func run() throws {
        let bundle: VMBundle
        do throws(LibraryError) { bundle = try openLibrary().bundle(named: name) } catch { throw fail(error) }
        let fd = open(bundle.consoleLogPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return }   // never started: no output yet
            throw fail(LibraryError.io(operation: "open", path: bundle.consoleLogPath, errno: errno))
        }
        defer { close(fd) }
        // What the VMM noticed about the run that ended (a guest that never found its devices)
        // belongs beside its output; on stderr, so the output itself stays the guest's.
        defer { if !bundle.isLocked { for hint in Self.lastRunHints(bundle) { printNote(hint) } } }
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count > 0 {
                _ = buffer.withUnsafeMutableBytes { writeAll(STDOUT_FILENO, UnsafeMutableRawBufferPointer(rebasing: $0[0..<count])) }
                continue
            }
            guard follow else { return }
            // Checked after reading to the end, so output written just before the stop is shown.
            if !bundle.isLocked {
                let rest = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if rest > 0 { continue }
                return
            }
            usleep(100_000)
        }
    }

    /// The VMM's `hint:` lines from the last run that ended: between the last two `exit status`
    /// lines of its log (the log is appended to at every start).
    static func lastRunHints(_ bundle: VMBundle) -> [String] {
        guard let bytes = try? HostFiles.readAll(bundle.vmmLogPath) else { return [] }
        let lines = String(decoding: bytes.suffix(256 << 10), as: UTF8.self).split(separator: "\n")
        guard let end = lines.lastIndex(where: { $0.hasPrefix("vireo: exit status") }) else { return [] }
        let start = lines[..<end].lastIndex(where: { $0.hasPrefix("vireo: exit status") }).map { $0 + 1 } ?? lines.startIndex
        return lines[start..<end].filter { $0.hasPrefix("vireo: hint: ") }.map { String($0.dropFirst("vireo: ".count)) }
    }
}
