import GuestMemory
#if canImport(Glibc)
import Glibc
#endif
import Devices
import DiskImage
import MachineSpec
import X86Boot

/// Where the guest's serial console goes.
public enum ConsoleConfiguration: Equatable, Sendable {
    /// This process's stdin/stdout; raw mode when stdin is a terminal.
    case stdio
    /// Output appended to a file; no input.
    case file(path: String)
    /// A Unix socket the VMM listens on; one client at a time reads and writes the console.
    case socket(path: String)
    /// Output discarded, no input.
    case none

    /// Parses `stdio`, `none`, `file:PATH` or `socket:PATH`.
    public init(parsing text: String) throws(VMMError) {
        if text == "stdio" { self = .stdio; return }
        if text == "none" { self = .none; return }
        if text.hasPrefix("file:"), text.count > 5 { self = .file(path: String(text.dropFirst(5))); return }
        if text.hasPrefix("socket:"), text.count > 7 { self = .socket(path: String(text.dropFirst(7))); return }
        throw .invalidConfiguration(field: "--console", reason: "'\(text)' is not one of stdio, none, file:PATH, socket:PATH")
    }
}

/// One `--disk PATH[,readonly][,format=raw|qcow2][,backing=FORMAT:PATH]...[,serial=ID]`.
public struct DiskConfiguration: Equatable, Sendable {
    public var path: String
    public var readOnly = false
    /// What the disk is; never read from its content.
    public var format: DiskFormat
    public var serial: String?
    public var rateLimit = RateLimit()
    /// The chain the disk rests on, nearest first (`backing=FORMAT:PATH` each): the only files
    /// opened beneath it, each header checked against it.
    public var backing: [BackingLayer] = []
    /// `backing=header`: follow what the qcow2 header names instead (a person's own image, for
    /// `vireo run`); library VMs always pass their recorded chain.
    public var followsHeader = false

    public init(path: String, readOnly: Bool = false, format: DiskFormat, serial: String? = nil, backing: [BackingLayer] = []) {
        self.path = path; self.readOnly = readOnly; self.format = format; self.serial = serial; self.backing = backing
    }

    static let syntax = "PATH[,readonly][,format=raw|qcow2][,backing=FORMAT:PATH]...[,backing=header][,serial=ID][,bps=N][,iops=N]"

    public init(parsing text: String) throws(VMMError) {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let path = parts.first, !path.isEmpty else {
            throw .invalidConfiguration(field: "--disk", reason: "'\(text)' has no path; expected \(Self.syntax)")
        }
        self.path = path
        var format: DiskFormat?
        for option in parts.dropFirst() {
            if option == "readonly" || option == "ro" { readOnly = true; continue }
            if option.hasPrefix("format=") {
                let name = String(option.dropFirst(7))
                guard let given = DiskFormat(rawValue: name) else {
                    throw .invalidConfiguration(field: "--disk", reason: "format '\(name)' is not one of raw, qcow2")
                }
                format = given
                continue
            }
            if option == "backing=header" { followsHeader = true; continue }
            if option.hasPrefix("backing=") {
                let value = option.dropFirst(8)
                guard let colon = value.firstIndex(of: ":"), let layerFormat = DiskFormat(rawValue: String(value[..<colon])),
                      value[value.index(after: colon)...].hasPrefix("/") else {
                    throw .invalidConfiguration(field: "--disk", reason: "backing '\(value)' is not FORMAT:/ABSOLUTE/PATH (raw or qcow2) or header")
                }
                backing.append(BackingLayer(path: String(value[value.index(after: colon)...]), format: layerFormat))
                continue
            }
            if option.hasPrefix("serial=") {
                let serial = String(option.dropFirst(7))
                do { try MachineRules.diskSerial(serial, disk: 0) } catch { throw VMMError(error) }
                self.serial = serial
                continue
            }
            if try rateLimit.parse(option, field: "--disk", operations: "iops") { continue }
            throw .invalidConfiguration(field: "--disk", reason: "unknown option '\(option)' in '\(text)'; allowed: readonly, format=raw|qcow2, backing=FORMAT:PATH, backing=header, serial=ID, bps=, bps-burst=, iops=, iops-burst=")
        }
        try rateLimit.validate(field: "--disk", operations: "iops")
        guard let format = format ?? DiskFormat.declared(byName: path) else {
            throw .invalidConfiguration(field: "--disk", reason: "'\(path)' does not say whether it is raw or qcow2; add format=raw or format=qcow2 (a format is never read from a disk's content)")
        }
        self.format = format
        if followsHeader, !backing.isEmpty {
            throw .invalidConfiguration(field: "--disk", reason: "backing=header and backing=FORMAT:PATH contradict each other")
        }
        if format == .raw, followsHeader {
            throw .invalidConfiguration(field: "--disk", reason: "'\(path)' is raw, and a raw disk rests on nothing")
        }
        do { try MachineRules.diskChain(path: path, format: format, backing: backing, disk: 0) } catch { throw VMMError(error) }
    }

    /// Opens the disk's files (the image and each recorded layer) without reading them; a chain
    /// followed from the header is opened and read in one go (only `vireo run` asks for that).
    func openFiles(writable: Bool) throws(DiskImageError) -> DiskFiles {
        if followsHeader {
            return .decoded(try DiskImages.open(path: path, format: format, readOnly: !writable, backing: .fromHeader))
        }
        return .opened(try DiskImages.openFiles(path: path, format: format, readOnly: !writable, backing: backing))
    }
}

/// One `--net BACKEND[,mac=XX:XX:XX:XX:XX:XX]`: a virtio-net card on a host tap device (by name,
/// or a descriptor the parent opened) or on a frame stream (passt's socket, by descriptor).
public struct NetworkConfiguration: Equatable, Sendable {
    public enum Backend: Equatable, Sendable, CustomStringConvertible {
        case tap(String)
        case tapDescriptor(Int32)
        case streamDescriptor(Int32)

        public var description: String {
            switch self {
            case let .tap(name): return "tap:" + name
            case let .tapDescriptor(fd): return "tap-fd:\(fd)"
            case let .streamDescriptor(fd): return "stream-fd:\(fd)"
            }
        }
    }

    public var backend: Backend
    /// Nil: a random locally administered address for this run.
    public var mac: String?
    public var rateLimit = RateLimit()
    /// Checksum and segmentation offloads offered to the guest (where the backend can carry them).
    public var offloads = true

    public init(tap: String, mac: String? = nil) { backend = .tap(tap); self.mac = mac }
    public init(backend: Backend, mac: String? = nil) { self.backend = backend; self.mac = mac }

    static let syntax = "tap:NAME, tap-fd:N or stream-fd:N, then [,mac=XX:XX:XX:XX:XX:XX]"

    public init(parsing text: String) throws(VMMError) {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let first = parts.first ?? ""
        if first.hasPrefix("tap:"), first.count > 4 {
            let tap = String(first.dropFirst(4))
            guard tap.utf8.count <= 15, tap.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "/") }) else {
                throw .invalidConfiguration(field: "--net", reason: "tap name '\(tap)' must be 1 to 15 printable characters without '/' or spaces")
            }
            backend = .tap(tap)
        } else if first.hasPrefix("tap-fd:") || first.hasPrefix("stream-fd:") {
            let number = first.drop(while: { $0 != ":" }).dropFirst()
            guard let fd = Int32(number), fd >= 3, fd < 65536 else {
                throw .invalidConfiguration(field: "--net", reason: "'\(first)' needs an inherited descriptor number from 3 up")
            }
            backend = first.hasPrefix("tap-fd:") ? .tapDescriptor(fd) : .streamDescriptor(fd)
        } else {
            throw .invalidConfiguration(field: "--net", reason: "'\(text)' is not \(Self.syntax)")
        }
        for option in parts.dropFirst() {
            if option.hasPrefix("mac=") {
                let value = String(option.dropFirst(4))
                do { _ = try MachineRules.mac(value, card: 0) } catch { throw VMMError(error) }
                mac = value
                continue
            }
            if option == "offload=on" || option == "offload=off" {
                offloads = option == "offload=on"
                continue
            }
            if try rateLimit.parse(option, field: "--net", operations: "pps") { continue }
            throw .invalidConfiguration(field: "--net", reason: "unknown option '\(option)' in '\(text)'; allowed: mac=XX:XX:XX:XX:XX:XX, offload=on|off, bps=, bps-burst=, pps=, pps-burst=")
        }
        try rateLimit.validate(field: "--net", operations: "pps")
    }
}

/// A disk's files as the VMM holds them between opening (before the jail) and reading (after).
enum DiskFiles {
    case opened(DiskImages.OpenedFiles)
    case decoded(any DiskImage)

    func decode() throws(DiskImageError) -> any DiskImage {
        switch self {
        case let .opened(files): return try files.decode()
        case let .decoded(image): return image
        }
    }
}

/// `--vsock PATH[,cid=N]`: a virtio-vsock device whose host side is the Unix socket PATH
/// (Firecracker's model; docs/vsock.md).
public struct VsockConfiguration: Equatable, Sendable {
    public var socketPath: String
    public var guestCID: UInt64 = 3

    public init(socketPath: String, guestCID: UInt64 = 3) { self.socketPath = socketPath; self.guestCID = guestCID }

    public init(parsing text: String) throws(VMMError) {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let path = parts.first, !path.isEmpty, !path.hasPrefix("cid=") else {
            throw .invalidConfiguration(field: "--vsock", reason: "'\(text)' has no socket path; expected PATH[,cid=N]")
        }
        socketPath = path
        for option in parts.dropFirst() {
            guard option.hasPrefix("cid=") else {
                throw .invalidConfiguration(field: "--vsock", reason: "unknown option '\(option)' in '\(text)'; allowed: cid=N")
            }
            guard let cid = UInt64(option.dropFirst(4)) else {
                throw .invalidConfiguration(field: "--vsock", reason: "cid '\(option.dropFirst(4))' is not a whole number")
            }
            do { try MachineRules.vsockCID(cid) } catch { throw VMMError(error) }
            guestCID = cid
        }
    }
}

/// `--balloon on|deflate-on-oom|stats=SECONDS[,...]`: a virtio-balloon device (docs/balloon.md).
public struct BalloonConfiguration: Equatable, Sendable {
    public var deflateOnOOM = false
    /// Seconds between statistics refreshes; nil: no statistics queue.
    public var statisticsInterval: UInt64?

    public init(deflateOnOOM: Bool = false, statisticsInterval: UInt64? = nil) {
        self.deflateOnOOM = deflateOnOOM
        self.statisticsInterval = statisticsInterval
    }

    public init(parsing text: String) throws(VMMError) {
        for option in text.split(separator: ",").map(String.init) {
            if option == "on" { continue }
            if option == "deflate-on-oom" { deflateOnOOM = true; continue }
            if option.hasPrefix("stats=") {
                guard let seconds = UInt64(option.dropFirst(6)) else {
                    throw .invalidConfiguration(field: "--balloon", reason: "stats interval '\(option.dropFirst(6))' is not a whole number of seconds")
                }
                do { try MachineRules.balloonStatisticsInterval(seconds) } catch { throw VMMError(error) }
                statisticsInterval = seconds
                continue
            }
            throw .invalidConfiguration(field: "--balloon", reason: "unknown option '\(option)'; allowed: on, deflate-on-oom, stats=SECONDS")
        }
    }
}

/// What a guest's reboot does (libvirt's `on_reboot`): start it again in the same process, or end
/// the run as a power-off would.
public enum RebootPolicy: String, Sendable, CaseIterable {
    case restart, exit

    public init(parsing text: String) throws(VMMError) {
        do { try MachineRules.onReboot(text) } catch { throw VMMError(error) }
        self = RebootPolicy(rawValue: text) ?? .exit
    }
}

/// `--acpi on|off`.
public func parseACPISwitch(_ text: String) throws(VMMError) -> Bool {
    switch text {
    case "on": return true
    case "off": return false
    default: throw .invalidConfiguration(field: "--acpi", reason: "'\(text)' is not one of on, off")
    }
}

/// The 128-bit VM generation ID as 32 hex digits (the form the library stores).
public func parseGenerationID(_ text: String) throws(VMMError) -> [UInt8] {
    let digits = Array(text.utf8).filter { $0 != UInt8(ascii: "-") }
    func nibble(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
    guard digits.count == 32 else {
        throw .invalidConfiguration(field: "--generation-id", reason: "'\(text)' is not 32 hex digits (a UUID's 128 bits)")
    }
    var bytes: [UInt8] = []
    for index in stride(from: 0, to: 32, by: 2) {
        guard let high = nibble(digits[index]), let low = nibble(digits[index + 1]) else {
            throw .invalidConfiguration(field: "--generation-id", reason: "'\(text)' is not 32 hex digits (a UUID's 128 bits)")
        }
        bytes.append(high << 4 | low)
    }
    return bytes
}

/// What `vireo run` asks for, before anything is validated against the host.
public struct VMConfiguration: Sendable {
    public var kernelPath: String
    public var initrdPath: String?
    public var commandLine: String
    public var cpuCount: Int
    public var memorySize: UInt64
    public var console: ConsoleConfiguration
    public var disks: [DiskConfiguration] = []
    public var networks: [NetworkConfiguration] = []
    public var vsock: VsockConfiguration?
    public var balloon: BalloonConfiguration?
    /// Attach a virtio-rng device fed from the host's /dev/urandom.
    public var entropyDevice = false
    /// The CPU the guest sees (`--cpu`); a restored guest keeps the one it was saved with.
    public var cpuModel = CPUModel.host
    /// Describe the machine with ACPI tables (on) or an MP table and command-line devices (off).
    public var acpi = true
    public var onReboot: RebootPolicy = .exit
    /// The VM generation ID the guest sees (16 bytes); nil: a random one for this run.
    public var generationID: [UInt8]?
    /// Huge pages, preallocation, KSM (`--memory-backing`, `--prealloc`, `--ksm`).
    public var memoryBacking = GuestMemory.Backing()
    /// `--rt-priority N`: vCPU threads SCHED_FIFO at N, all memory locked (docs/resources.md).
    public var realTimePriority: Int32?

    /// virtio devices in slot order: disks, network cards, vsock, balloon, then the entropy device.
    public var virtioDeviceCount: Int {
        disks.count + networks.count + (vsock == nil ? 0 : 1) + (balloon == nil ? 0 : 1) + (entropyDevice ? 1 : 0)
    }

    public init(kernelPath: String, initrdPath: String? = nil, commandLine: String = "console=ttyS0",
                cpuCount: Int = 1, memorySize: UInt64 = 512 << 20, console: ConsoleConfiguration = .stdio) {
        self.kernelPath = kernelPath
        self.initrdPath = initrdPath
        self.commandLine = commandLine
        self.cpuCount = cpuCount
        self.memorySize = memorySize
        self.console = console
    }

    /// The command line the guest gets: the user's, then — only without ACPI, whose DSDT lists
    /// them — where each virtio-mmio device is, the way Linux's `virtio_mmio.device=` parameter
    /// (and Firecracker) describe them.
    public var guestCommandLine: String {
        var line = commandLine
        if acpi { return line }
        for index in 0..<virtioDeviceCount {
            guard let slot = MachineLayout.virtioSlot(index) else { break }
            line += " virtio_mmio.device=4K@0x\(String(slot.address, radix: 16)):\(slot.interrupt)"
        }
        return line
    }

    /// ACPI tables for this machine's devices in their fixed slots, or the MP table.
    var platform: PlatformDescription {
        guard acpi else { return .mpTable }
        let devices = (0..<virtioDeviceCount).compactMap { MachineLayout.virtioSlot($0) }
            .map { ACPIVirtioDevice(address: $0.address, interrupt: $0.interrupt) }
        var generator = SystemRandomNumberGenerator()
        let identifier = generationID ?? (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
        return .acpi(ACPITables(cpuCount: cpuCount, virtioDevices: devices, generationIDAddress: MachineLayout.generationIDAddress.rawValue),
                     generationID: identifier)
    }

    /// Host RAM in bytes, the ceiling for `--memory`.
    public static var hostMemory: UInt64 {
        UInt64(max(0, sysconf(Int32(_SC_PHYS_PAGES)))) * UInt64(max(0, sysconf(Int32(_SC_PAGESIZE))))
    }

    /// Checks every field against the host and reads the kernel and initrd, so that nothing is
    /// started for input that cannot boot.
    public func validated(maximumVCPUs: Int) throws(VMMError) -> BootConfiguration {
        do throws(MachineSpecError) {
            try MachineRules.cpus(cpuCount, hostLimit: maximumVCPUs)
            try MachineRules.memory(memorySize, hostBytes: Self.hostMemory)
            try MachineRules.commandLine(commandLine)
            try MachineRules.virtioDevices(disks: disks.count, nics: networks.count, vsock: vsock != nil, balloon: balloon != nil, entropy: entropyDevice)
        } catch {
            throw VMMError(error)
        }
        do {
            let kernel = try KernelImage.load(path: kernelPath)
            let initrd = try initrdPath.map { (path) throws(BootError) in try readWholeFile(path, field: "--initrd") }
            return try BootConfiguration(kernel: kernel, initrd: initrd, initrdPath: initrdPath, commandLine: guestCommandLine,
                                         memorySize: memorySize, cpuCount: cpuCount, platform: platform)
        } catch {
            throw .boot(error)
        }
    }
}

extension RateLimit {
    /// Reads one `bps=`, `bps-burst=` (bytes, with K/M/G) or `<operations>=`, `<operations>-burst=`
    /// (a count) option; false if `option` is none of them.
    mutating func parse(_ option: String, field: String, operations: String) throws(VMMError) -> Bool {
        guard let equals = option.firstIndex(of: "=") else { return false }
        let key = String(option[..<equals])
        let value = String(option[option.index(after: equals)...])
        switch key {
        case "bps", "bps-burst":
            // Byte counts: a bare number is bytes here (unlike --memory).
            let bytes: UInt64
            if let plain = UInt64(value), plain > 0 { bytes = plain } else { bytes = try Size.parse(value, field: "\(field) \(key)") }
            if key == "bps" { bytesPerSecond = bytes } else { bytesBurst = bytes }
        case operations, operations + "-burst":
            guard let count = UInt64(value), count > 0 else {
                throw .invalidConfiguration(field: field, reason: "\(key) '\(value)' is not a positive whole number")
            }
            if key == operations { operationsPerSecond = count } else { operationsBurst = count }
        default:
            return false
        }
        return true
    }

    /// A burst without its rate means nothing; called once every option is read.
    func validate(field: String, operations: String) throws(VMMError) {
        if bytesBurst != nil && bytesPerSecond == nil {
            throw .invalidConfiguration(field: field, reason: "bps-burst needs bps (the rate the burst refills at)")
        }
        if operationsBurst != nil && operationsPerSecond == nil {
            throw .invalidConfiguration(field: field, reason: "\(operations)-burst needs \(operations)")
        }
    }
}
