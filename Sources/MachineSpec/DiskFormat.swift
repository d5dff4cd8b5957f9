/// What a disk image is. Recorded by whoever made the disk, never read from its content: a guest
/// can write any header into a raw disk it owns.
public enum DiskFormat: String, Sendable, CaseIterable, Codable {
    case raw
    case qcow2

    /// The format a file's name declares (`.qcow2`, `.raw`); nil when the name does not say
    /// (`.img` is either).
    public static func declared(byName path: String) -> DiskFormat? {
        let name = path.split(separator: "/").last.map { $0.lowercased() } ?? ""
        if name.hasSuffix(".qcow2") { return .qcow2 }
        if name.hasSuffix(".raw") { return .raw }
        return nil
    }
}

/// One image a disk rests on: its path and its recorded format.
public struct BackingLayer: Sendable, Equatable, Codable {
    public var path: String
    public var format: DiskFormat

    public init(path: String, format: DiskFormat) { self.path = path; self.format = format }
}
