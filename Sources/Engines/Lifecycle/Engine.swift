import API
import Library
#if canImport(Glibc)
import Glibc
#endif

/// One VM as an engine sees it: its directory and its definition as loaded under the lock.
public struct EngineVM: Sendable {
    public var bundle: VMBundle
    public var definition: VMDefinition
    public var name: String { definition.name }
    /// What confines the engine's process at start (docs/isolation.md).
    public var isolation = IsolationRequest()

    public init(bundle: VMBundle, definition: VMDefinition) { self.bundle = bundle; self.definition = definition }
}

/// What a start produced, for the user.
public struct StartedVM: Sendable {
    public var pid: Int32
    /// Advice the user should see (software emulation, say).
    public var warnings: [String] = []
}

/// A live serial console stream: bytes from the guest arrive on `fd`, bytes written to it go to
/// the guest. Whatever arrived with the attach reply is in `early`.
public final class ConsoleStream {
    public let fd: Int32
    public let early: [UInt8]
    /// Keeps the connection that owns `fd` alive (the kvm engine's control connection).
    private let owner: AnyObject?

    init(fd: Int32, early: [UInt8], owner: AnyObject?) { self.fd = fd; self.early = early; self.owner = owner }

    deinit { if owner == nil { close(fd) } }
}

/// How a VM's screen can be reached.
public struct DisplayAccess: Sendable, Encodable {
    /// A VNC server on a Unix socket (no TCP port is opened).
    public var vncSocket: String
}

/// An engine: something that runs a library VM as one detached process holding the VM's lock.
/// This is what every engine does; what only some can do is a protocol of its own below, so what
/// an engine can do is its conformance (VMManager asks `as? any DisplayEngine`), not a runtime
/// refusal.
public protocol Engine: Sendable {
    var kind: EngineKind { get }

    /// Starts the VM and returns once it runs. `lock` is held exclusively by the caller and is
    /// handed to the VM process, which keeps it for as long as it lives.
    func start(_ vm: EngineVM, lock: VMLock, networking: PreparedNetworking) throws(LibraryError) -> StartedVM
    /// What the running VM says about itself; nil when it does not answer.
    func describe(_ vm: EngineVM) -> VMDescription?
    func counters(_ vm: EngineVM) throws(LibraryError) -> VMCounters
    /// Asks the guest to shut down (ACPI power button); returns at once.
    func requestShutdown(_ vm: EngineVM) throws(LibraryError)
    /// Ends the VM at once; returns at once.
    func powerOff(_ vm: EngineVM) throws(LibraryError)
    func pause(_ vm: EngineVM) throws(LibraryError)
    func resume(_ vm: EngineVM) throws(LibraryError)
    func reset(_ vm: EngineVM) throws(LibraryError)
    func setBalloon(_ vm: EngineVM, bytes: UInt64) throws(LibraryError)
    /// The serial console, live.
    func openConsole(_ vm: EngineVM) throws(LibraryError) -> ConsoleStream
    /// The running VM's vCPU threads by vCPU index, for pinning.
    func vcpuThreads(_ vm: EngineVM, pid: pid_t) -> [Int: pid_t]
}

extension Engine {
    public func vcpuThreads(_ vm: EngineVM, pid: pid_t) -> [Int: pid_t] {
        ThreadPinning.namedVCPUThreads(pid: pid, count: vm.definition.cpus)
    }
}

/// A screen and a keyboard (the qemu engine's VGA and keyboard, reached over VNC and QMP).
public protocol DisplayEngine: Engine {
    func display(_ vm: EngineVM) throws(LibraryError) -> DisplayAccess
    /// Saves the screen as a PNG at `path` (absolute).
    func screenshot(_ vm: EngineVM, to path: String) throws(LibraryError)
    func sendKeys(_ vm: EngineVM, _ chords: [KeyChord]) throws(LibraryError)
}

/// What a command run in the guest by its agent did.
public struct GuestExecResult: Sendable, Encodable {
    public var exitCode: Int32
    /// Set when a signal ended the command.
    public var signal: Int32?
    public var stdout: [UInt8]
    public var stderr: [UInt8]
    /// The agent keeps at most 16 MiB of each stream; more is cut.
    public var truncated: Bool
}

/// A guest agent (qemu-guest-agent) the host can ask to run commands.
public protocol GuestAgentEngine: Engine {
    /// Runs `command` (a path and its arguments, no shell) in the guest and waits up to
    /// `timeoutSeconds` for it to end.
    func exec(_ vm: EngineVM, command: [String], timeoutSeconds: Int) throws(LibraryError) -> GuestExecResult
    /// Sets the guest's clock from the host's (after a resume, a guest's clock is where it was
    /// saved); nil when done or when the guest has no agent, else a warning saying why not.
    func synchroniseClock(_ vm: EngineVM) -> String?
    /// The addresses the guest reports on each of its interfaces, by MAC (lower case): IPv4 and
    /// global IPv6, no loopback or link-local; empty when no agent answers within the time.
    func interfaceAddresses(_ vm: EngineVM, timeoutSeconds: Int) -> [String: [String]]
    /// Asks the guest's agent to power the guest off (`guest-shutdown`); false when no agent runs
    /// or it did not take the request.
    func agentShutdown(_ vm: EngineVM) -> Bool
    /// The agent's own version (`guest-info`), parsed as digits and dots; nil when no agent
    /// answers within the time.
    func agentVersion(_ vm: EngineVM, timeoutSeconds: Int) -> String?
    /// Where the agent is reached, for people: "virtio-serial port org.qemu.guest_agent.0".
    var agentChannel: String { get }
}

/// A guest agent that copies files in and out (`vireo cp`).
public protocol GuestFileEngine: GuestAgentEngine {
    /// Copies a host file to `guestPath` (absolute); `progress(done, total)` after each block.
    func copyToGuest(_ vm: EngineVM, from hostPath: String, to guestPath: String, progress: (UInt64, UInt64) -> Void) throws(LibraryError) -> UInt64
    /// Copies the guest's `guestPath` to a host file; `progress(done)` after each block. The
    /// guest decides how long its file is: past `limit` bytes the copy is refused (nothing kept).
    func copyFromGuest(_ vm: EngineVM, from guestPath: String, to hostPath: String, limit: UInt64?, progress: (UInt64) -> Void) throws(LibraryError) -> UInt64
}

/// A CD-ROM drive whose medium can be taken out while the VM runs.
public protocol RemovableMediaEngine: Engine {
    /// Takes the ISO out of a running VM's CD-ROM drive.
    func ejectMedium(_ vm: EngineVM) throws(LibraryError)
}

/// A running VM's state written out and read back: `vireo save`/`start` and live snapshots.
public protocol StateTransferEngine: Engine {
    /// Writes the running VM's state to its bundle's saved-state file and stops it.
    func saveState(_ vm: EngineVM) throws(LibraryError)
    /// A live snapshot: the state to the snapshot's directory, the disks onto the overlays the
    /// library prepared (docs/snapshots.md); the VM runs on.
    /// Returns nil, or why the snapshot's memory could not be kept (its disks were: the snapshot
    /// is then a disk-only one).
    func snapshot(_ vm: EngineVM, id: String) throws(LibraryError) -> String?
}

/// Live migration, both ways (docs/migration.md).
public protocol MigratingEngine: StateTransferEngine {
    /// Moves the running VM over the connected `connection` to a prepared `vireo receive`,
    /// reporting progress; returns once the destination runs it.
    func migrate(_ vm: EngineVM, over connection: Int32, request: MigrationRequest, progress: (MigrationReport) -> Void,
                 cancelled: () -> Bool) throws(LibraryError) -> MigrationResult
    /// Starts a VM that arrives on the connected migration stream `incoming` instead of booting.
    func start(_ vm: EngineVM, lock: VMLock, networking: PreparedNetworking, incoming: IncomingMigration?) throws(LibraryError) -> StartedVM
}

/// What to say when a VM's engine lacks a capability: what it has instead, and what to do.
enum EngineRefusal {
    static func unsupported(_ vm: EngineVM, _ action: String, _ hint: String) -> LibraryError {
        .unsupported(name: vm.name, engine: vm.definition.engine.rawValue, action: action, hint: hint)
    }
    static func noDisplay(_ vm: EngineVM, action: String) -> LibraryError {
        unsupported(vm, action, "it has no display, only a serial console: `vireo console \(vm.name)` or `vireo logs \(vm.name)`; VMs on the qemu engine (`--engine qemu`) have a screen")
    }
    static func noKeyboard(_ vm: EngineVM) -> LibraryError {
        unsupported(vm, "send keys to", "it has no keyboard, only a serial console: type into `vireo console \(vm.name)`")
    }
    static func noGuestAgent(_ vm: EngineVM) -> LibraryError {
        unsupported(vm, "run a command in", "its engine has no channel to a guest agent yet; VMs on the qemu engine (`--engine qemu`) reach qemu-guest-agent, otherwise use `vireo ssh \(vm.name)`")
    }
    static func noCDROM(_ vm: EngineVM) -> LibraryError {
        unsupported(vm, "eject the CD-ROM of", "it has no CD-ROM drive")
    }
    static func noStateTransfer(_ vm: EngineVM, action: String) -> LibraryError {
        unsupported(vm, action, "this engine cannot write a running VM's state; stop it with `vireo stop \(vm.name)`")
    }
    /// A VM whose lock is held but whose process does not answer is starting or stopping: a
    /// conflict to retry, not a failure of the host (the API's fuzzing raced a stop this way).
    static let notAnsweringState = "starting or stopping"
    static func notAnswering(_ vm: EngineVM, action: String, errno code: Int32) -> LibraryError? {
        guard code == ECONNREFUSED || code == ENOENT else { return nil }
        return .wrongState(name: vm.name, state: notAnsweringState, action: action,
                           hint: "its process is not answering yet or any more; try again, or see `vireo list`")
    }
    static func noMigration(_ vm: EngineVM) -> LibraryError {
        unsupported(vm, "migrate", "live migration is built for the kvm engine; QEMU's own migration is not wired into Vireo yet")
    }
}

/// One key combination as QEMU's `send-key` takes it: keys pressed together, by QEMU key code
/// name ("ctrl-alt-delete" is ctrl, alt and delete).
public struct KeyChord: Sendable, Equatable {
    public var keys: [String]

    public static let names: Set<String> = {
        var names: Set<String> = ["shift", "shift_r", "alt", "alt_r", "ctrl", "ctrl_r", "meta_l", "meta_r", "menu",
                                  "esc", "ret", "kp_enter", "spc", "tab", "backspace", "delete", "insert", "home", "end",
                                  "pgup", "pgdn", "up", "down", "left", "right", "caps_lock", "minus", "equal",
                                  "bracket_left", "bracket_right", "backslash", "semicolon", "apostrophe", "grave_accent",
                                  "comma", "dot", "slash", "sysrq", "print", "pause", "num_lock", "scroll_lock"]
        for letter in "abcdefghijklmnopqrstuvwxyz" { names.insert(String(letter)) }
        for digit in 0...9 { names.insert(String(digit)) }
        for function in 1...12 { names.insert("f\(function)") }
        return names
    }()

    /// Friendlier spellings people type.
    static let aliases = ["enter": "ret", "return": "ret", "space": "spc", "escape": "esc", "del": "delete",
                          "control": "ctrl", "pageup": "pgup", "pagedown": "pgdn", "super": "meta_l", "win": "meta_l"]

    public init(keys: [String]) { self.keys = keys }

    /// `ctrl-alt-delete`, `ret`, `f2`; errors name the word that is not a key.
    public static func parse(_ text: String) throws(LibraryError) -> KeyChord {
        let parts = text.lowercased().split(separator: "-", omittingEmptySubsequences: false).map { aliases[String($0)] ?? String($0) }
        for part in parts where !names.contains(part) {
            throw .invalidValue(field: "KEYS", reason: "'\(part)' in '\(text)' is not a key; use QEMU key names joined by '-', such as ctrl-alt-delete, ret, esc, tab, spc, up, f2, a, 1 (letters, digits, f1–f12, \(names.filter { $0.count > 3 && !$0.hasPrefix("f") }.sorted().prefix(12).joined(separator: ", ")), ...)")
        }
        return KeyChord(keys: parts)
    }

    /// The chords that type `text` on a US keyboard; errors name a character that has no key.
    public static func typing(_ text: String) throws(LibraryError) -> [KeyChord] {
        let plain: [Character: String] = [" ": "spc", "\n": "ret", "\t": "tab", "-": "minus", "=": "equal", "[": "bracket_left",
                                          "]": "bracket_right", "\\": "backslash", ";": "semicolon", "'": "apostrophe",
                                          "`": "grave_accent", ",": "comma", ".": "dot", "/": "slash"]
        let shifted: [Character: String] = ["!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8",
                                            "(": "9", ")": "0", "_": "minus", "+": "equal", "{": "bracket_left",
                                            "}": "bracket_right", "|": "backslash", ":": "semicolon", "\"": "apostrophe",
                                            "~": "grave_accent", "<": "comma", ">": "dot", "?": "slash"]
        var chords: [KeyChord] = []
        for character in text {
            if let key = plain[character] {
                chords.append(KeyChord(keys: [key]))
            } else if let key = shifted[character] {
                chords.append(KeyChord(keys: ["shift", key]))
            } else if character.isASCII, character.isLetter {
                let lower = character.lowercased()
                chords.append(KeyChord(keys: character.isUppercase ? ["shift", lower] : [lower]))
            } else if character.isASCII, character.isNumber {
                chords.append(KeyChord(keys: [String(character)]))
            } else {
                throw .invalidValue(field: "text", reason: "'\(character)' has no key on a US keyboard; type ASCII only")
            }
        }
        return chords
    }
}
