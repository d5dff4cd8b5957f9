import API
import ArgumentParser
import Engines
import FoundationEssentials
import Library
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// The library every management command works on (`$VIREO_HOME` or the default root).
func openLibrary() -> VMLibrary {
    VMLibrary(root: VMLibrary.defaultRoot(environment: ProcessInfo.processInfo.environment))
}

func kvmEngine() -> KVMEngine { KVMEngine(environment: ProcessInfo.processInfo.environment) }

/// Reports a library failure on stderr: status 2 for what the user can fix, 1 for the host's.
func fail(_ error: LibraryError) -> ExitCode {
    printError(error)
    return ExitCode(error.exitStatus)
}

func printLine(_ text: String) {
    var bytes = Array((text + "\n").utf8)
    _ = bytes.withUnsafeMutableBytes { writeAll(STDOUT_FILENO, $0) }
}

/// Writes all bytes to a descriptor, retrying short writes and EINTR.
@discardableResult
func writeAll(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer) -> Bool {
    var offset = 0
    while offset < buffer.count {
        let written = write(fd, buffer.baseAddress.map { $0 + offset }, buffer.count - offset)
        if written < 0 { if errno == EINTR { continue }; return false }
        offset += written
    }
    return true
}

/// A "vireo: ..." line on stderr that is advice, not the error itself.
func printNote(_ text: String) {
    var bytes = Array("vireo: \(text)\n".utf8)
    _ = bytes.withUnsafeMutableBytes { writeAll(STDERR_FILENO, $0) }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    encoder.keyEncodingStrategy = .convertToSnakeCase
    printLine(String(decoding: try encoder.encode(value), as: UTF8.self))
}

/// Sizes in the CLI's units, through the same parser as `vireo run`.
func parseSize(_ text: String, field: String, allowZero: Bool = false) throws -> UInt64 {
    if allowZero, text == "0" { return 0 }
    do throws(VMMError) { return try Size.parse(text, field: field) } catch { throw fail(error) }
}

/// Sends one control request to a running VM; a stopped VM gets a refusal that says so.
func control<Reply: Decodable>(_ name: String, _ request: String, as type: Reply.Type,
                               library: VMLibrary, action: String) throws(LibraryError) -> Reply {
    let bundle = try library.bundle(named: name)
    let status = library.status(of: bundle)
    guard !status.state.isOff else {
        throw .wrongState(name: name, state: status.state.rawValue, action: action, hint: "start it first with `vireo start \(name)`")
    }
    do {
        let connection = try ControlConnection(path: bundle.controlPath)
        return try connection.call(request, as: type)
    } catch {
        switch error {
        case let .refused(code, message):
            switch code {
            case "paused":
                throw .wrongState(name: name, state: "paused", action: action,
                                  hint: action == "pause" ? "`vireo resume \(name)` continues it"
                                      : "resume it first (`vireo resume \(name)`) or power it off (`vireo stop \(name) --force`)")
            case "not-paused":
                throw .wrongState(name: name, state: status.state.rawValue, action: action, hint: "only a paused VM can be resumed")
            case "no-balloon":
                throw .wrongState(name: name, state: "without a balloon device", action: action,
                                  hint: "stop it and add one with `vireo set \(name) --balloon`")
            case "stopping":
                throw .wrongState(name: name, state: "stopping", action: action, hint: "wait for it to stop, then `vireo start \(name)`")
            default:
                throw .control(name: name, code: code, message: message)
            }
        default: throw .engine(name: name, reason: error.description, exitStatus: 1)
        }
    }
}

/// Waits until nothing holds the VM's lock (its process has exited). False on time-out.
func waitUntilStopped(_ bundle: VMBundle, seconds: Double) -> Bool {
    let deadline = VMMClock.now() + UInt64(seconds * 1e9)
    while bundle.isLocked {
        if VMMClock.now() > deadline { return false }
        usleep(50_000)
    }
    return true
}

/// The `describe` reply, or nil when the VM is not running.
func describe(_ bundle: VMBundle) -> VMDescription? {
    guard bundle.isLocked, let connection = try? ControlConnection(path: bundle.controlPath, timeoutSeconds: 2) else { return nil }
    return try? connection.call("describe", as: VMDescription.self)
}

extension VMState: ExpressibleByArgument {}
