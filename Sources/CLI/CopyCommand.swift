import ArgumentParser
import Engines
import Library
#if canImport(Glibc)
import Glibc
#endif

struct Copy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cp",
        abstract: "Copy a file into or out of a running VM's guest through its guest agent (no SSH, no network).",
        discussion: """
            One side is VM:/absolute/path in the guest, the other a host path: \
            `vireo cp notes.txt web:/root/notes.txt`, `vireo cp web:/var/log/syslog ./syslog`. \
            The file arrives whole or not at all: it is written beside its target and moved into \
            place at the end. See docs/guest-agent.md.
            """)

    @Argument(help: ArgumentHelp("HOST_PATH or VM:GUEST_PATH.", valueName: "source"))
    var source: String

    @Argument(help: ArgumentHelp("VM:GUEST_PATH or HOST_PATH.", valueName: "destination"))
    var destination: String

    /// `VM:/path`: a VM name (no '/') before the first ':', an absolute guest path after it.
    static func guestSide(_ text: String) -> (vm: String, path: String)? {
        guard let colon = text.firstIndex(of: ":") else { return nil }
        let name = String(text[..<colon])
        guard !name.isEmpty, !name.contains("/") else { return nil }
        return (name, String(text[text.index(after: colon)...]))
    }

    func run() throws {
        let showProgress = isatty(STDERR_FILENO) == 1
        var lastShown = 0
        func show(_ done: UInt64, _ total: UInt64?) {
            guard showProgress else { return }
            let mebibytes = Int(done >> 20)
            guard mebibytes >= lastShown + 8 else { return }
            lastShown = mebibytes
            let text = total.map { "\r\(mebibytes) of \($0 >> 20) MiB" } ?? "\r\(mebibytes) MiB"
            _ = text.utf8CString.withUnsafeBufferPointer { write(STDERR_FILENO, $0.baseAddress, $0.count - 1) }
        }
        let bytes: UInt64
        do throws(LibraryError) {
            switch (Self.guestSide(source), Self.guestSide(destination)) {
            case let (nil, guest?):
                bytes = try openManager().copy(guest.vm, hostPath: source, guestPath: guest.path, toGuest: true, progress: show)
            case let (guest?, nil):
                bytes = try openManager().copy(guest.vm, hostPath: destination, guestPath: guest.path, toGuest: false, progress: show)
            case (.some, .some):
                throw LibraryError.invalidValue(field: "DESTINATION", reason: "both sides name a VM; copy through the host, one side at a time")
            case (nil, nil):
                throw LibraryError.invalidValue(field: "SOURCE", reason: "neither side names a VM; write one as VM:/path/in/guest")
            }
        } catch { throw fail(error) }
        if showProgress && lastShown > 0 { _ = "\n".utf8CString.withUnsafeBufferPointer { write(STDERR_FILENO, $0.baseAddress, 1) } }
        printLine("copied \(bytes) bytes")
    }
}
