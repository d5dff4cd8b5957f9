/// JSON string literals for text assembled by hand (the VM list, QEMU's block-node options, the
/// VMM's control replies): one quoter for all of them. A module of its own, without Foundation:
/// `vireo-vmm` uses it too, and loading Foundation would cost more than its whole start-up.
public enum JSONString {
    /// `text` as a JSON string literal, escaped as Foundation's JSONEncoder escapes it (`\b`,
    /// `\f`, `\n`, `\r`, `\t`, other control characters as `\u00xx`), so hand-written JSON and
    /// encoded JSON are the same bytes. `escapingSlashes`: `/` as `\/`, JSONEncoder's default.
    public static func quote(_ text: String, escapingSlashes: Bool = false) -> String {
        var out = ""
        append(text, to: &out, escapingSlashes: escapingSlashes)
        return out
    }

    /// `quote(text)` appended to `out`, which a writer of many strings keeps as one buffer.
    public static func append(_ text: String, to out: inout String, escapingSlashes: Bool = false) {
        // Most text (names, states, addresses, numbers' neighbours) needs no escape: one scan of
        // its bytes, then one copy.
        if !text.utf8.contains(where: { $0 < 0x20 || $0 == 0x22 || $0 == 0x5c || ($0 == 0x2f && escapingSlashes) }) {
            out += "\""
            out += text
            out += "\""
            return
        }
        out += "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "/" where escapingSlashes: out += "\\/"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{8}": out += "\\b"
            case "\u{c}": out += "\\f"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        out += "\""
    }
}

/// One JSON object written by hand in the two layouts Vireo's JSONEncoders write, byte for byte:
/// for a listing of many records, where the encoder's generic walk costs more than reading them
/// (bench/README.md). The caller adds members in the order of their keys, as `.sortedKeys` would.
public struct JSONObjectText: Sendable {
    public enum Layout: Sendable {
        /// `vireo ... --json`: `.prettyPrinted, .sortedKeys` (two-space indents, `"key" : value`,
        /// `/` escaped).
        case pretty
        /// The REST API: `.sortedKeys, .withoutEscapingSlashes`, no white space.
        case compact
    }

    private enum Value: Sendable {
        case string(String)
        case number(String)
        case strings([String])
    }

    private var members: [(key: String, value: Value)] = []

    public init() {}

    public mutating func add(_ key: String, _ value: String) { members.append((key, .string(value))) }
    public mutating func add<Number: BinaryInteger>(_ key: String, _ value: Number) { members.append((key, .number(String(value)))) }
    public mutating func add(_ key: String, _ values: [String]) { members.append((key, .strings(values))) }

    /// A top-level array of objects, as the encoder writes `[T]`.
    public static func array(_ objects: [JSONObjectText], _ layout: Layout) -> String {
        var out = ""
        out.reserveCapacity(objects.count * (layout == .pretty ? 480 : 320))
        writeArray(objects.count, to: &out, layout, depth: 0) { index, out in objects[index].write(to: &out, layout, depth: 1) }
        return out
    }

    /// `depth`: how many containers the object is nested in (its indent when pretty).
    private func write(to out: inout String, _ layout: Layout, depth: Int) {
        out += layout == .pretty ? "{\n" : "{"
        for (index, member) in members.enumerated() {
            if index > 0 { out += layout == .pretty ? ",\n" : "," }
            if layout == .pretty { Self.indent(depth + 1, &out) }
            JSONString.append(member.key, to: &out, escapingSlashes: layout == .pretty)
            out += layout == .pretty ? " : " : ":"
            switch member.value {
            case let .string(text): JSONString.append(text, to: &out, escapingSlashes: layout == .pretty)
            case let .number(text): out += text
            case let .strings(values):
                Self.writeArray(values.count, to: &out, layout, depth: depth + 1) { index, out in
                    JSONString.append(values[index], to: &out, escapingSlashes: layout == .pretty)
                }
            }
        }
        if layout == .pretty { out += "\n"; Self.indent(depth, &out) }
        out += "}"
    }

    /// JSONEncoder's arrays; its pretty empty array is `[`, a blank line and `]`.
    private static func writeArray(_ count: Int, to out: inout String, _ layout: Layout, depth: Int,
                                   element: (Int, inout String) -> Void) {
        out += layout == .pretty ? "[\n" : "["
        for index in 0..<count {
            if index > 0 { out += layout == .pretty ? ",\n" : "," }
            if layout == .pretty { indent(depth + 1, &out) }
            element(index, &out)
        }
        if layout == .pretty { out += "\n"; indent(depth, &out) }
        out += "]"
    }

    private static func indent(_ depth: Int, _ out: inout String) {
        for _ in 0..<depth { out += "  " }
    }
}
