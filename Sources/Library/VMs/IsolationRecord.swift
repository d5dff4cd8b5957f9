import CSandbox
#if canImport(Glibc)
import Glibc
#endif

/// What confined a VM's last run (docs/isolation.md), as `vireo start` recorded it in the
/// bundle's `isolation` file from the VMM's own report: one `key=value` line.
public struct IsolationRecord: Sendable, Equatable {
    /// The per-VM uid and gid the jailed VMM runs as; nil when it ran without the jail.
    public var uid: UInt32?
    public var gid: UInt32?
    public var namespaces: [String] = []
    /// on, off or log.
    public var seccomp = "off"
    /// `abi7`, `unavailable` or `off`.
    public var landlock = "off"
    /// What the user turned off at start (`--no-jail`, `--no-seccomp`), or why the jail was not
    /// applied (`not-root`).
    public var disabled: [String] = []

    public init() {}

    public var line: String {
        var words = ["uid=\(uid.map(String.init) ?? "-")", "gid=\(gid.map(String.init) ?? "-")",
                     "namespaces=\(namespaces.isEmpty ? "-" : namespaces.joined(separator: ","))",
                     "seccomp=\(seccomp)", "landlock=\(landlock)"]
        if !disabled.isEmpty { words.append("disabled=\(disabled.joined(separator: ","))") }
        return words.joined(separator: " ")
    }

    public init?(parsing text: String) {
        var fields: [String: String] = [:]
        for word in text.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
            guard let equals = word.firstIndex(of: "=") else { continue }
            fields[String(word[..<equals])] = String(word[word.index(after: equals)...])
        }
        guard let seccomp = fields["seccomp"] else { return nil }
        self.seccomp = seccomp
        uid = fields["uid"].flatMap { UInt32($0) }
        gid = fields["gid"].flatMap { UInt32($0) }
        namespaces = fields["namespaces"].map { $0 == "-" ? [] : $0.split(separator: ",").map(String.init) } ?? []
        landlock = fields["landlock"] ?? "off"
        disabled = fields["disabled"].map { $0.split(separator: ",").map(String.init) } ?? []
    }

    /// How `vireo list` marks a VM started with isolation turned off.
    public var mark: String? {
        let off = disabled.filter { $0 == "no-jail" || $0 == "no-seccomp" }
        return off.isEmpty ? nil : off.map { "--" + $0 }.joined(separator: " ")
    }
}

extension VMBundle {
    /// The directory the VMM may write in (owned by its jail uid): its saved state.
    public var vmmDirectory: String { directory + "/vmm" }
    public var isolationPath: String { directory + "/isolation" }

    public func isolation() -> IsolationRecord? {
        guard let bytes = try? HostFiles.readAll(isolationPath) else { return nil }
        return IsolationRecord(parsing: String(decoding: bytes, as: UTF8.self))
    }

    /// Makes the VMM's directory, handed to `owner` (the jail's uid and gid) when given.
    public func prepareVMMDirectory(owner: (uid: UInt32, gid: UInt32)? = nil) throws(LibraryError) {
        if mkdir(vmmDirectory, 0o700) != 0 && errno != EEXIST {
            throw .io(operation: "mkdir", path: vmmDirectory, errno: errno)
        }
        if let owner, chown(vmmDirectory, owner.uid, owner.gid) != 0 {
            throw .io(operation: "chown", path: vmmDirectory, errno: errno)
        }
    }

    /// Hands files the library made for a running, jailed VMM (a live snapshot's overlays and
    /// state directory) to its uid, so it can open them inside its jail. A VMM without the jail
    /// runs as root and needs nothing.
    public func grantToRunningVMM(_ paths: [String]) throws(LibraryError) {
        guard let record = isolation(), let uid = record.uid, let gid = record.gid else { return }
        for path in paths where chown(path, uid, gid) != 0 {
            throw .io(operation: "chown to the VM's uid \(uid)", path: path, errno: errno)
        }
    }

    /// Why the last run ended, when its seccomp filter ended it: the VMM's SIGSYS handler writes
    /// `seccomp: forbidden system call NR from thread NAME` as its last line.
    public func seccompEnd() -> String? {
        guard let line = lastLogLines(2).last, line.hasPrefix("vireo: seccomp: forbidden system call ") else { return nil }
        let words = line.split(separator: " ")
        guard words.count >= 9, let number = Int32(words[5]) else { return String(line.dropFirst(7)) }
        let name = vireo_seccomp_syscall_name(number).map { pointer -> String in
            defer { free(pointer) }
            return String(cString: pointer)
        } ?? "unknown"
        return "seccomp: forbidden system call \(name) (\(number)) from thread \(words[8...].joined(separator: " "))"
    }

    func lastLogLines(_ count: Int) -> [String] {
        let fd = open(vmmLogPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        let size = lseek(fd, 0, SEEK_END)
        guard size > 0 else { return [] }
        let length = Int(min(size, 4096))
        var tail = [UInt8](repeating: 0, count: length)
        let read = tail.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(size) - off_t(length)) }
        guard read == length else { return [] }
        return Array(tail.split(separator: 0x0a).map { String(decoding: $0, as: UTF8.self) }.suffix(count))
    }
}

/// The host's mandatory access control, as `vireo info` reports it.
public enum HostSecurity {
    /// Vireo generates no AppArmor profiles; where AppArmor is the host's LSM that is said plainly,
    /// and where it is absent (these machines: Landlock and BPF) so is that.
    public static var appArmorState: String {
        let enabled = (try? HostFiles.readAll("/sys/module/apparmor/parameters/enabled")).map { String(decoding: $0, as: UTF8.self) }
        guard let enabled, enabled.hasPrefix("Y") else {
            return "not on this host (no AppArmor module); Landlock and the jail confine the VMM"
        }
        return "enabled on this host, but Vireo does not generate per-VM profiles yet; Landlock and the jail confine the VMM"
    }
}
