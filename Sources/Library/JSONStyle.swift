import FoundationEssentials

/// The JSON keys `vireo ... --json` and the REST API write: snake_case, with one difference from
/// Foundation's: an acronym's plural stays one word (`emulatorCPUs` is `emulator_cpus`, where
/// Foundation writes `emulator_cp_us`), so both speak the same names.
public enum JSONStyle {
    public static func snakeCase(_ name: String) -> String {
        let characters = Array(name)
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
