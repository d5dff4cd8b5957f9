import FoundationEssentials

/// The JSON keys `vireo ... --json` and the REST API write: snake_case, with one difference from
/// Foundation's: an acronym's plural stays one word (`emulatorCPUs` is `emulator_cpus`, where
/// Foundation writes `emulator_cp_us`), so both speak the same names.
public enum JSONStyle {
    public static func snakeCase(_ name: String) -> String {
        // Every key is converted on every encode: a listing of a hundred VMs converts thousands.
        // Swift's property names are ASCII, so the rule runs on bytes; other text takes the
        // same rule on Characters.
        guard name.utf8.allSatisfy({ $0 < 0x80 }) else { return snakeCase(characters: Array(name)) }
        let bytes = Array(name.utf8)
        func isUpper(_ byte: UInt8?) -> Bool { byte.map { $0 >= 0x41 && $0 <= 0x5a } ?? false }
        func isLower(_ byte: UInt8?) -> Bool { byte.map { $0 >= 0x61 && $0 <= 0x7a } ?? false }
        func isDigit(_ byte: UInt8) -> Bool { byte >= 0x30 && byte <= 0x39 }
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count + 4)
        for index in bytes.indices {
            let byte = bytes[index]
            if index > 0, isUpper(byte) {
                let previous = bytes[index - 1]
                let next: UInt8? = index + 1 < bytes.count ? bytes[index + 1] : nil
                let afterNext: UInt8? = index + 2 < bytes.count ? bytes[index + 2] : nil
                let pluralS = next == 0x73 && !isLower(afterNext)
                if isLower(previous) || isDigit(previous) || (isUpper(previous) && isLower(next) && !pluralS) { out.append(0x5f) }
            }
            out.append(isUpper(byte) ? byte + 0x20 : byte)
        }
        return String(decoding: out, as: UTF8.self)
    }

    package static func snakeCase(characters: [Character]) -> String {
        var out = ""
        for (index, character) in characters.enumerated() {
            if index > 0, character.isUppercase {
                let previous = characters[index - 1]
                let next: Character? = index + 1 < characters.count ? characters[index + 1] : nil
                let afterNext: Character? = index + 2 < characters.count ? characters[index + 2] : nil
                let pluralS = next == "s" && !(afterNext?.isLowercase ?? false)
                if previous.isLowercase || previous.isNumber || (previous.isUppercase && (next?.isLowercase ?? false) && !pluralS) { out += "_" }
            }
            out += character.lowercased()
        }
        return out
    }

    /// An encoder's key strategy writing `snakeCase` names.
    public static func keyEncoding() -> JSONEncoder.KeyEncodingStrategy {
        .custom { path in Key(stringValue: snakeCase(path.last?.stringValue ?? "")) }
    }

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }
}
