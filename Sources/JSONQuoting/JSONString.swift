/// JSON string literals for text assembled by hand (the API's fast list, QEMU's block-node
/// options, the VMM's control replies): one quoter for all of them. A module of its own, without
/// Foundation: `vireo-vmm` uses it too, and loading Foundation would cost more than its whole start-up.
public enum JSONString {
    /// `text` as a JSON string literal, quotes and control characters escaped.
    public static func quote(_ text: String) -> String {
        var out = "\""
        out.reserveCapacity(text.utf8.count + 2)
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
