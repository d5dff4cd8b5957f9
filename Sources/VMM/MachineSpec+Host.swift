import GuestMemory
#if canImport(Glibc)
import Glibc
#endif
import Devices
import DiskImage
import MachineSpec
import X86Boot

// The machine spec as this host reads it: the VMM builds from a MachineSpec and nothing else;
// what is here turns its text fields into the VMM's types and checks it against the host.

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

extension MachineSpec.Disk {
    /// Opens the disk's files (the image and each recorded layer) without reading them; a chain
    /// followed from the header is opened and read in one go (only `vireo run` asks for that).
    func openFiles(writable: Bool) throws(DiskImageError) -> DiskFiles {
        if isNetwork {
            // Raw, on nothing, default cache: MachineRules.networkDisk, checked with the spec.
            return .network(try NetworkDisk.connect(path: path, readOnly: !writable))
        }
        if followsHeader {
            return .decoded(try DiskImages.open(path: path, format: format, readOnly: !writable, backing: .fromHeader, direct: bypassesHostCache))
        }
        return .opened(try DiskImages.openFiles(path: path, format: format, readOnly: !writable, backing: backing, direct: bypassesHostCache))
    }
}

/// A disk's files as the VMM holds them between opening (before the jail) and reading (after).
enum DiskFiles {
    case opened(DiskImages.OpenedFiles)
    case decoded(any DiskImage)
    /// An NBD export's sockets, connected; negotiated once the VMM is confined.
    case network(any NetworkDiskConnecting)

    func decode() throws(DiskImageError) -> any DiskImage {
        switch self {
        case let .opened(files): return try files.decode()
        case let .decoded(image): return image
        case let .network(connecting): return try connecting.decode()
        }
    }
}

extension MachineSpec {
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
    func platform() throws(VMMError) -> PlatformDescription {
        guard acpi else { return .mpTable }
        let devices = (0..<virtioDeviceCount).compactMap { MachineLayout.virtioSlot($0) }
            .map { ACPIVirtioDevice(address: $0.address, interrupt: $0.interrupt) }
        var generator = SystemRandomNumberGenerator()
        let identifier: [UInt8]
        if let generationID {
            do { identifier = try MachineRules.generationID(generationID) } catch { throw VMMError(error) }
        } else {
            identifier = (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
        }
        return .acpi(ACPITables(cpus: cpus, virtioDevices: devices, generationIDAddress: MachineLayout.generationIDAddress.rawValue),
                     generationID: identifier)
    }

    /// The CPU the guest sees, from `cpuModel`.
    func parsedCPUModel() throws(VMMError) -> CPUModel {
        do throws(CPUModel.ParseError) { return try CPUModel(parsing: cpuModel) } catch {
            throw .invalidConfiguration(field: MachineField.cpuModel.runFlag, reason: error.description)
        }
    }

    /// Host RAM in bytes, the ceiling for `--memory`.
    public static var hostMemory: UInt64 {
        UInt64(max(0, sysconf(Int32(_SC_PHYS_PAGES)))) * UInt64(max(0, sysconf(Int32(_SC_PAGESIZE))))
    }

    /// Checks every field against the machine's rules and the host, and reads the kernel and
    /// initrd, so that nothing is started for input that cannot boot.
    public func validated(maximumVCPUs: Int) throws(VMMError) -> BootConfiguration {
        do { try MachineRules.check(self, hostVCPUs: maximumVCPUs, hostMemory: Self.hostMemory) } catch { throw VMMError(error) }
        _ = try parsedCPUModel()
        let platform = try platform()
        do {
            let kernel = try KernelImage.load(path: kernel)
            let initrd = try initrd.map { (path) throws(BootError) in try readWholeFile(path, field: "--initrd") }
            return try BootConfiguration(kernel: kernel, initrd: initrd, initrdPath: self.initrd, commandLine: guestCommandLine,
                                         memoryBytes: memoryBytes, cpus: cpus, platform: platform)
        } catch {
            throw .boot(error)
        }
    }
}
