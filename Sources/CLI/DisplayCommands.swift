import ArgumentParser
import Engines
import Library

struct Display: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "display",
        abstract: "Say how to see a running VM's screen (qemu engine: VNC on a Unix socket in its directory).",
        discussion: "No TCP port is opened for the display; connect through the socket, or forward it yourself.")

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let access: DisplayAccess
        do throws(LibraryError) { access = try openManager().display(name) } catch { throw fail(error) }
        if json { try printJSON(access); return }
        printLine("VM '\(name)': VNC on the Unix socket \(access.vncSocket)")
        printLine("  virt-viewer:   remote-viewer vnc+unix://\(access.vncSocket)")
        printLine("  any VNC client: socat TCP-LISTEN:5900,bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:\(access.vncSocket)  then connect to 127.0.0.1:5900")
        printLine("  a still image: vireo screenshot \(name) screen.png")
    }
}

struct Screenshot: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "screenshot", abstract: "Save a running VM's screen as a PNG file.")

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: ArgumentHelp("Where to save it (a .png path).", valueName: "file"))
    var file: String

    func run() throws {
        do throws(LibraryError) { try openManager().screenshot(name, to: file) } catch { throw fail(error) }
        printLine("VM '\(name)': screen saved to \(HostFiles.absolute(file))")
    }
}

struct SendKeys: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send-keys",
        abstract: "Press keys on a running VM's keyboard (qemu engine): combinations such as ctrl-alt-delete, ret, esc, f2, and text.",
        discussion: "Keys are QEMU key names joined by '-' for keys held together. --text types a string on a US layout; it is sent after the KEYS.")

    @Argument(help: "VM name.")
    var name: String

    @Argument(help: ArgumentHelp("Key combinations, pressed one after the other.", valueName: "keys"))
    var keys: [String] = []

    @Option(help: "Text to type (ASCII; \\n is Enter).")
    var text: String?

    func run() throws {
        do throws(LibraryError) {
            guard !keys.isEmpty || text != nil else {
                throw LibraryError.invalidValue(field: "KEYS", reason: "nothing to send; give key combinations (ctrl-alt-delete, ret, ...) and/or --text")
            }
            var chords = try keys.map { (key) throws(LibraryError) in try KeyChord.parse(key) }
            if let text { chords += try KeyChord.typing(text.replacingEscapedNewlines()) }
            try openManager().sendKeys(name, chords)
            printLine("VM '\(name)': sent \(chords.count) key press\(chords.count == 1 ? "" : "es")")
        } catch {
            throw fail(error)
        }
    }
}

extension String {
    /// `\n` typed on a command line as two characters means Enter.
    func replacingEscapedNewlines() -> String { split(separator: "\\n", omittingEmptySubsequences: false).joined(separator: "\n") }
}
