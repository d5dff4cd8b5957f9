/// What a disk image is. Recorded by whoever made the disk, never read from its content: a guest
/// can write any header into a raw disk it owns.
public enum DiskFormat: String, Sendable, CaseIterable, Codable {
    case raw
    case qcow2

    /// The schemes of an NBD export's address: TCP or a Unix socket, plain or over TLS.
    public static let nbdSchemes = ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]

    /// Whether a disk's path names a network disk — NBD exports (`nbdSchemes`) or iSCSI LUNs
    /// (`iscsi://`), joined by `|` — rather than a file or device.
    public static func isNetworkAddress(_ path: String) -> Bool {
        nbdSchemes.contains { path.hasPrefix($0) } || path.hasPrefix("iscsi://")
    }

    /// The format a file's name declares (`.qcow2`, `.raw`); nil when the name does not say
    /// (`.img` is either). A device under `/dev` (`/dev/sdb`, `/dev/loop0`, `/dev/mapper/vg-lv`)
    /// and a network disk (an NBD export, an iSCSI LUN) are raw disks: none can grow, so none holds
    /// qcow2.
    public static func declared(byName path: String) -> DiskFormat? {
        if path.hasPrefix("/dev/") { return .raw }
        // A network disk is the disk itself, as a device is.
        if isNetworkAddress(path) { return .raw }
        let name = path.split(separator: "/").last.map { $0.lowercased() } ?? ""
        if name.hasSuffix(".qcow2") { return .qcow2 }
        if name.hasSuffix(".raw") { return .raw }
        return nil
    }
}

/// How a disk's I/O meets the host's page cache (QEMU's `cache=` names). `writeback`, the
/// default: through it, made durable when the guest flushes. `none`: around it (O_DIRECT), as
/// databases and shared or network storage want: no second copy of the guest's data in host
/// memory, and no stale pages after another host wrote the device.
public enum DiskCache: String, Sendable, CaseIterable, Codable {
    case writeback
    case none
}

/// One image a disk rests on: its path and its recorded format.
public struct BackingLayer: Sendable, Equatable, Codable {
    public var path: String
    public var format: DiskFormat

    public init(path: String, format: DiskFormat) { self.path = path; self.format = format }
}
