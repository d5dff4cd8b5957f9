import DiskImage

/// One VM as stored in its directory's `config.json`. Paths without a leading `/` are inside the
/// VM's directory (the VM owns those files); absolute paths are files it only refers to.
public struct VMDefinition: Codable, Sendable, Equatable {
    /// Bumped when the layout changes incompatibly; older Vireos refuse newer files.
    public static let currentVersion = 1

    public var version: Int
    public var uuid: String
    public var name: String
    public var osType: String
    /// Which engine runs the VM; only "kvm" (Vireo's own VMM) exists so far.
    public var engine: String
    public var cpus: Int
    public var memoryBytes: UInt64
    public var kernel: String?
    public var initrd: String?
    public var commandLine: String
    public var disks: [DiskAttachment]
    /// virtio-net cards; each keeps the MAC it was given at creation, as a real NIC would.
    public var networks: [NetworkAttachment]
    /// The guest CID of a virtio-vsock device whose host side is `vsock.sock` in the VM's
    /// directory; nil for none.
    public var vsockCID: UInt64?
    /// A virtio-balloon device (deflate on OOM, statistics every 5 s), so `vireo balloon` can
    /// take memory back from a running guest.
    public var balloon: Bool
    public var entropyDevice: Bool
    /// Seconds since the epoch.
    public var createdAt: Int64

    public init(uuid: String, name: String, osType: OSType, createdAt: Int64) {
        version = Self.currentVersion
        self.uuid = uuid
        self.name = name
        self.osType = osType.identifier
        engine = "kvm"
        cpus = osType.cpus
        memoryBytes = osType.memoryBytes
        commandLine = osType.commandLine
        disks = []
        networks = []
        balloon = true
        entropyDevice = true
        self.createdAt = createdAt
    }
}

public struct DiskAttachment: Codable, Sendable, Equatable {
    public var path: String
    public var format: DiskFormat
    public var readOnly: Bool
    public var serial: String?

    public init(path: String, format: DiskFormat, readOnly: Bool = false, serial: String? = nil) {
        self.path = path; self.format = format; self.readOnly = readOnly; self.serial = serial
    }

    /// Inside the VM's directory: created, copied and deleted with the VM.
    public var isOwned: Bool { !path.hasPrefix("/") }
}

public struct NetworkAttachment: Codable, Sendable, Equatable {
    /// The host tap device the card is plugged into.
    public var tap: String
    public var mac: String

    public init(tap: String, mac: String) { self.tap = tap; self.mac = mac }
}

/// VirtualBox-style presets for the New VM wizard: what a guest of this kind usually needs.
/// Every value can be overridden at `vireo create` and changed later with `vireo set`.
public struct OSType: Sendable, Equatable {
    public var identifier: String
    public var description: String
    public var cpus: Int
    public var memoryBytes: UInt64
    public var diskBytes: UInt64
    public var commandLine: String

    public static let all: [OSType] = [
        OSType(identifier: "ubuntu-64", description: "Ubuntu (64-bit), root file system on the first disk",
               cpus: 2, memoryBytes: 2 << 30, diskBytes: 25 << 30, commandLine: "console=ttyS0 root=/dev/vda rw"),
        OSType(identifier: "debian-64", description: "Debian (64-bit), root file system on the first disk",
               cpus: 1, memoryBytes: 1 << 30, diskBytes: 20 << 30, commandLine: "console=ttyS0 root=/dev/vda rw"),
        OSType(identifier: "fedora-64", description: "Fedora (64-bit), root file system on the first disk",
               cpus: 2, memoryBytes: 2 << 30, diskBytes: 20 << 30, commandLine: "console=ttyS0 root=/dev/vda rw"),
        OSType(identifier: "alpine-64", description: "Alpine Linux (64-bit), small footprint",
               cpus: 1, memoryBytes: 256 << 20, diskBytes: 2 << 30, commandLine: "console=ttyS0 root=/dev/vda rw"),
        OSType(identifier: "linux-64", description: "Other Linux (64-bit)",
               cpus: 1, memoryBytes: 512 << 20, diskBytes: 8 << 30, commandLine: "console=ttyS0"),
        OSType(identifier: "other", description: "Other or unknown: a kernel and nothing assumed",
               cpus: 1, memoryBytes: 256 << 20, diskBytes: 2 << 30, commandLine: "console=ttyS0"),
    ]

    public static let defaultIdentifier = "linux-64"

    public static func named(_ identifier: String) throws(LibraryError) -> OSType {
        guard let type = all.first(where: { $0.identifier == identifier }) else {
            throw .invalidValue(field: "--ostype", reason: "'\(identifier)' is not an OS type; choose one of \(all.map(\.identifier).joined(separator: ", ")) (see `vireo ostypes`)")
        }
        return type
    }
}

/// VM names: what can safely be a directory name and a command-line word.
public enum VMName {
    public static let maximumLength = 64
    public static let rule = "1 to 64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"

    public static func validate(_ name: String) throws(LibraryError) {
        guard !name.isEmpty, name.utf8.count <= maximumLength else {
            throw .invalidName(name, reason: "must be \(rule)")
        }
        let allowed = name.unicodeScalars.allSatisfy { scalar in
            (scalar >= "a" && scalar <= "z") || (scalar >= "A" && scalar <= "Z") || (scalar >= "0" && scalar <= "9")
                || scalar == "." || scalar == "_" || scalar == "-"
        }
        guard allowed, let first = name.unicodeScalars.first, first != ".", first != "_", first != "-" else {
            throw .invalidName(name, reason: "must be \(rule)")
        }
    }
}
