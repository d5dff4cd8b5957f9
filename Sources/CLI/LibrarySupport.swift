import API
import ArgumentParser
import Engines
import FoundationEssentials
import Library
import MachineSpec
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Every VM verb goes through the manager (the library and the engines behind it).
package func openManager() -> VMManager { VMManager(environment: ProcessInfo.processInfo.environment) }

/// The library every management command works on (`$VIREO_HOME` or the default root).
func openLibrary() -> VMLibrary { openManager().library }

/// Reports a library failure on stderr: status 2 for what the user can fix, 1 for the host's.
package func fail(_ error: LibraryError) -> ExitCode {
    printError(text: FieldFlags.describe(error))
    return ExitCode(error.exitStatus)
}

package func printLine(_ text: String) {
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
package func printNote(_ text: String) {
    var bytes = Array("vireo: \(text)\n".utf8)
    _ = bytes.withUnsafeMutableBytes { writeAll(STDERR_FILENO, $0) }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    encoder.keyEncodingStrategy = JSONStyle.keyEncoding()
    printLine(String(decoding: try encoder.encode(value), as: UTF8.self))
}

/// Sizes in the CLI's units, through the same parser as `vireo run`.
func parseSize(_ text: String, field: String, allowZero: Bool = false) throws -> UInt64 {
    if allowZero, text == "0" { return 0 }
    do throws(VMMError) { return try Size.parse(text, field: field) } catch { throw fail(error) }
}

extension VMState: ExpressibleByArgument {}
