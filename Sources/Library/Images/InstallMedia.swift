#if canImport(Glibc)
import Glibc
#endif

/// An installer ISO as the CD-ROM drive will see it: ISO 9660 with an El Torito boot record.
/// Read from the file's volume descriptors only; the file is hostile input like any disk image.
public struct InstallMedium: Sendable, Equatable {
    public var path: String
    /// The primary volume descriptor's volume identifier ("Ubuntu 24.04 LTS amd64"), trimmed.
    public var volumeLabel: String

    /// ISO 9660: volume descriptors start at sector 16 (2048-byte sectors).
    static let sectorSize = 2048
    static let firstDescriptor = 16
    /// More descriptors than any real image has; a bound for a file that never terminates the set.
    static let maximumDescriptors = 64

    /// Checks that `path` is a bootable ISO and reads its label; errors name `field`.
    public static func inspect(_ path: String, field: String = "iso") throws(LibraryError) -> InstallMedium {
        let absolute = HostFiles.absolute(path)
        guard HostFiles.exists(absolute) else { throw .invalidValue(field: field, reason: "\(absolute) does not exist") }
        guard !HostFiles.isDirectory(absolute) else { throw .invalidValue(field: field, reason: "\(absolute) is a directory, not an ISO image") }
        let fd = open(absolute, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw .invalidValue(field: field, reason: "\(absolute) cannot be read: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var label: String?
        var bootable = false
        var sector = [UInt8](repeating: 0, count: sectorSize)
        for index in 0..<maximumDescriptors {
            let offset = off_t((firstDescriptor + index) * sectorSize)
            let count = sector.withUnsafeMutableBytes { pread(fd, $0.baseAddress, sectorSize, offset) }
            guard count == sectorSize, Array(sector[1..<6]) == Array("CD001".utf8) else { break }
            let type = sector[0]
            if type == 255 { break }   // set terminator
            if type == 1, label == nil {
                let identifier = sector[40..<72]
                label = String(decoding: identifier, as: UTF8.self).trimmingSpaces()
            }
            if type == 0, String(decoding: sector[7..<30], as: UTF8.self) == "EL TORITO SPECIFICATION" { bootable = true }
        }
        guard let label else {
            throw .invalidValue(field: field, reason: "\(absolute) is not an ISO 9660 image (no primary volume descriptor at sector 16); give an installer .iso")
        }
        guard bootable else {
            throw .invalidValue(field: field, reason: "\(absolute) is an ISO 9660 image without an El Torito boot record, so no firmware can boot it; give a bootable installer ISO")
        }
        return InstallMedium(path: absolute, volumeLabel: label)
    }
}

extension String {
    func trimmingSpaces() -> String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { $0 != " " && $0 != "\0" }),
              let last = scalars.lastIndex(where: { $0 != " " && $0 != "\0" }) else { return "" }
        return String(scalars[first...last])
    }

    /// Without leading and trailing white space (spaces, tabs, newlines).
    public func trimmingWhitespace() -> String {
        let scalars = unicodeScalars
        let blank: (Unicode.Scalar) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = scalars.firstIndex(where: { !blank($0) }), let last = scalars.lastIndex(where: { !blank($0) }) else { return "" }
        return String(scalars[first...last])
    }
}

/// The firmware files Debian ships, which the qemu engine boots.
public enum FirmwareFiles {
    /// OVMF without Secure Boot keys enrolled, 4 MiB flash layout (Debian's `ovmf`).
    public static let uefiCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    /// The pristine variable store each UEFI VM gets its own copy of.
    public static let uefiVariables = "/usr/share/OVMF/OVMF_VARS_4M.fd"
    /// OVMF's Secure Boot build (SMM required, so the variable store is out of the guest's
    /// reach) and the variable store with Microsoft's keys enrolled (what Windows and shim need).
    public static let uefiSecureCode = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
    public static let uefiMicrosoftVariables = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
    /// The variable store a VM starts from: with Microsoft's keys enrolled for Secure Boot, else
    /// empty (Secure Boot off, as on a machine whose keys were cleared).
    public static func variables(secureBoot: Bool) -> String { secureBoot ? uefiMicrosoftVariables : uefiVariables }
    /// SeaBIOS (Debian's `seabios`); QEMU finds it itself, this is only checked for.
    public static let bios = "/usr/share/seabios/bios-256k.bin"

    /// Refuses a firmware whose files are missing, naming the package that has them.
    public static func check(_ firmware: Firmware, secureBoot: Bool = false, field: String = "firmware") throws(LibraryError) {
        switch firmware {
        case .uefi:
            for file in [uefiCode, uefiVariables] + (secureBoot ? [uefiSecureCode, uefiMicrosoftVariables] : []) where access(file, R_OK) != 0 {
                throw .invalidValue(field: field, reason: "UEFI needs \(file), which is missing: install Debian's `ovmf` package (apt install ovmf), or use --firmware bios")
            }
        case .bios:
            guard access(bios, R_OK) == 0 else {
                throw .invalidValue(field: field, reason: "BIOS needs \(bios), which is missing: install Debian's `seabios` package (apt install seabios)")
            }
        }
    }
}
