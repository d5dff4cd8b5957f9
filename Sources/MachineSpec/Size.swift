/// Human sizes in binary units, as `--memory` takes them (`512M`, `2G`, `1048576K`, plain MiB).
public enum Size {
    /// Why a size did not parse; the caller names the field.
    public struct ParseError: Error, Sendable, CustomStringConvertible {
        public var description: String
    }

    public static func parse(_ text: String) throws(ParseError) -> UInt64 {
        // `4096B`: a plain byte count (without the B a bare number means MiB).
        if text.hasSuffix("B"), text.dropLast().last?.isNumber == true {
            guard let bytes = UInt64(text.dropLast()), bytes > 0 else {
                throw ParseError(description: "'\(text)' is not a positive whole number of bytes")
            }
            return bytes
        }
        var trimmed = Substring(text)
        if trimmed.hasSuffix("iB") { trimmed = trimmed.dropLast(2) } else if trimmed.hasSuffix("B") { trimmed = trimmed.dropLast() }
        guard let last = trimmed.last else {
            throw ParseError(description: "empty size; use a number with K, M, G or T (e.g. 512M)")
        }
        let shift: UInt64
        var digits = trimmed
        switch last {
        case "K", "k": shift = 10; digits = digits.dropLast()
        case "M", "m": shift = 20; digits = digits.dropLast()
        case "G", "g": shift = 30; digits = digits.dropLast()
        case "T", "t": shift = 40; digits = digits.dropLast()
        case "0"..."9": shift = 20    // a bare number means MiB, as in QEMU's -m
        default:
            throw ParseError(description: "'\(text)' has unknown unit '\(last)'; use K, M, G or T (e.g. 512M)")
        }
        guard let value = UInt64(digits), value > 0 else {
            throw ParseError(description: "'\(text)' is not a positive whole number with K, M, G or T (e.g. 512M)")
        }
        guard value <= UInt64.max >> shift else {
            throw ParseError(description: "'\(text)' is too large")
        }
        return value << shift
    }

    public static func describe(_ bytes: UInt64) -> String {
        for (shift, unit) in [(UInt64(40), "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] where bytes >= 1 << shift {
            let whole = bytes >> shift
            let tenth = ((bytes & ((1 << shift) - 1)) * 10) >> shift
            return tenth == 0 ? "\(whole) \(unit)" : "\(whole).\(tenth) \(unit)"
        }
        return "\(bytes) bytes"
    }
}
