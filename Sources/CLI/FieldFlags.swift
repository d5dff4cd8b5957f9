import Library
import MachineSpec

/// The one table from the library's field names to this command line's flags. The library names
/// a refused setting by its JSON key (`memory_bytes`, `io_limits`: what definitions and the REST
/// API call it); the CLI shows the flag a person typed for it (`--memory`, `--io-limit`). A
/// machine setting's flag comes from MachineSpec's own table (MachineField); the rest are here. A
/// field that is no setting (`FILE`, `disk 0`) is shown as it is.
enum FieldFlags {
    /// Library settings whose flag is not their key with dashes.
    static let renamed: [String: String] = [
        "disk_bytes": "--disk", "os_type": "--ostype", "forwards": "--forward", "accelerator": "--accel",
        "ssh_key_files": "--ssh-key", "memory_limit_bytes": "--memory-limit", "cpu_cap_percent": "--cpu-cap",
        "vcpu_pins": "--pin", "emulator_cpus": "--pin-emulator", "io_limits": "--io-limit",
    ]
    /// Library settings whose flag is their key with dashes (`attach_disk` → `--attach-disk`).
    static let sameName: Swift.Set<String> = [
        "attach_disk", "cpu_weight", "pids_limit", "disk_format", "no_disk", "description", "dhcp", "engine", "firmware", "format",
        "full", "hostname", "image", "iso", "linked", "mirror", "name", "packages", "password", "size", "subnet", "text",
        "timeout", "user", "pool", "type", "chap", "secure_boot", "tpm", "hyperv", "unattended",
    ]

    static func flag(for field: String) -> String {
        // The machine's disks (a serial, a chain): the reason names which disk; `--disk` is the
        // first disk's size to `vireo create`.
        if field == MachineField.disks.key { return field }
        if let machine = MachineField(rawValue: field) { return machine.flag }
        if let flag = renamed[field] { return flag }
        return sameName.contains(field) ? "--" + field.replacing("_", with: "-") : field
    }

    /// The error as this command line words it.
    static func describe(_ error: LibraryError) -> String {
        guard case let .invalidValue(field, reason) = error else { return error.description }
        return "\(flag(for: field)): \(reason)"
    }
}
