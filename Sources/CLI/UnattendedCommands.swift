import ArgumentParser
import Library
#if canImport(Glibc)
import Glibc
#endif

/// `vireo create --iso FILE --unattended ...`: the answers for the installer (docs/unattended.md).
struct UnattendedOptions: ParsableArguments {
    @Flag(help: "With --iso: install the OS without questions (Debian, Ubuntu): Vireo answers the installer, which powers the VM off when done; the next start boots the installed system. See docs/unattended.md.")
    var unattended = false

    @Option(name: .customLong("password-file"), help: ArgumentHelp("With --unattended: the user's password, the file's first line (without it, --password or the terminal asks). Only its hash is kept.", valueName: "file"))
    var passwordFile: String?

    @Option(name: .customLong("full-name"), help: ArgumentHelp("With --unattended: the user's full name.", valueName: "name"))
    var fullName: String?

    @Option(help: ArgumentHelp("With --unattended: the system's locale, ll_CC (default \(UnattendedSettings.defaultLocale)).", valueName: "ll_CC"))
    var locale: String?

    @Option(help: ArgumentHelp("With --unattended: the time zone (default \(UnattendedSettings.defaultTimezone)).", valueName: "zone"))
    var timezone: String?

    @Option(help: ArgumentHelp("With --unattended: more packages to install, comma-separated.", valueName: "a,b"))
    var packages: String?

    @Option(name: .customLong("post-install-command"), help: ArgumentHelp("With --unattended: a shell command run in the installed system at the end.", valueName: "command"))
    var postInstallCommand: String?

    @Option(help: ArgumentHelp("With --unattended, Debian: the archive to install from (default \(UnattendedSettings.defaultMirror)); none: the disc alone.", valueName: "url|none"))
    var mirror: String?

    /// The password: the file's first line, else the terminal (asked twice) or a line of stdin.
    func password() throws -> String {
        guard let passwordFile else { return try readPassword() }
        let path = HostFiles.absolute(passwordFile)
        guard HostFiles.exists(path), !HostFiles.isDirectory(path), HostFiles.size(path) <= 4096 else {
            throw fail(LibraryError.invalidValue(field: "--password-file", reason: "\(passwordFile) is not a readable file of at most 4096 bytes"))
        }
        let bytes: [UInt8]
        do throws(LibraryError) { bytes = try HostFiles.readAll(path) } catch { throw fail(error) }
        let line = String(decoding: bytes.prefix(while: { $0 != UInt8(ascii: "\n") }), as: UTF8.self)
        return line.hasSuffix("\r") ? String(line.dropLast()) : line
    }

    func fill(_ request: inout UnattendedRequest) {
        request.fullName = fullName
        request.locale = locale
        request.timezone = timezone
        request.packages = packages.map { $0.split(separator: ",").map { String($0).trimmingWhitespace() }.filter { !$0.isEmpty } } ?? []
        request.postInstallCommand = postInstallCommand
        request.mirror = mirror
    }

    /// Options that mean nothing without --unattended are refused by name, not ignored.
    func refuseWithoutUnattended() throws {
        let given: [(Bool, String)] = [(passwordFile != nil, "--password-file"), (fullName != nil, "--full-name"), (locale != nil, "--locale"),
                                       (timezone != nil, "--timezone"), (packages != nil, "--packages"),
                                       (postInstallCommand != nil, "--post-install-command"), (mirror != nil, "--mirror")]
        if let (_, name) = given.first(where: { $0.0 }) {
            throw fail(LibraryError.invalidValue(field: name, reason: "is an answer for an unattended install; add --unattended (with --iso FILE)"))
        }
    }
}

struct UnattendedCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unattended",
        abstract: "Unattended installs: what Vireo recognises on an installer ISO (`vireo create --iso FILE --unattended`).",
        subcommands: [UnattendedDetect.self])
}

struct UnattendedDetect: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "detect",
        abstract: "Say which installer an ISO holds and how Vireo would answer it, as `VBoxManage unattended detect` does.")

    @Option(help: ArgumentHelp("The installer ISO.", valueName: "file"))
    var iso: String

    @Flag(help: "Print what was found as JSON.")
    var json = false

    func run() throws {
        let found: DetectedInstaller
        do throws(LibraryError) { found = try DetectedInstaller.detect(iso: iso) } catch { throw fail(error) }
        if json { try printJSON(found); return }
        printLine("Installer:   \(found.summary)")
        printLine("Description: \(found.description)")
        printLine("OS type:     \(found.osType)")
        printLine("Kernel:      \(found.kernel)")
        printLine("Initrd:      \(found.initrd)")
        if found.family == .debian {
            printLine("Packages:    \(found.packagesOnMedium ? "on the disc (--mirror none installs offline)" : "none on the disc: installs from a mirror (--mirror URL, default \(UnattendedSettings.defaultMirror))")")
        }
    }
}
