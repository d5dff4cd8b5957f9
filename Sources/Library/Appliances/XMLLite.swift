/// A small XML reader for OVF envelopes, which are hostile input (an appliance comes from anyone).
/// It takes elements, attributes, text, comments, CDATA, processing instructions and the five
/// predefined and numeric character references, and refuses a DOCTYPE (so no entity can expand
/// or reach outside the file), more than 64 levels, more than 100,000 elements and anything
/// malformed. Names keep their prefix off: OVF's `ovf:`, `rasd:` and `vssd:` prefixes vary
/// between writers, the local names do not.
public struct XMLNode: Sendable {
    public var name: String
    public var attributes: [String: String]
    public var children: [XMLNode]
    public var text: String

    /// Children named `name` (local name).
    public func all(_ name: String) -> [XMLNode] { children.filter { $0.name == name } }
    public func first(_ name: String) -> XMLNode? { children.first { $0.name == name } }
    /// The trimmed text of the first child named `name`.
    public func value(_ name: String) -> String? { first(name).map { $0.text.trimmingWhitespace() } }
}

public enum XMLLite {
    static let maximumDepth = 64
    static let maximumElements = 100_000

    public static func parse(_ bytes: [UInt8]) throws(LibraryError) -> XMLNode {
        var parser = Parser(bytes: bytes)
        return try parser.document()
    }

    private struct Parser {
        let bytes: [UInt8]
        var at = 0
        var elements = 0

        init(bytes: [UInt8]) {
            self.bytes = bytes
            // A UTF-8 byte order mark.
            if bytes.starts(with: [0xef, 0xbb, 0xbf]) { at = 3 }
        }

        func refuse(_ why: String) -> LibraryError {
            .invalidValue(field: "ovf", reason: "the OVF envelope is not usable XML: \(why) (at byte \(at))")
        }

        var atEnd: Bool { at >= bytes.count }

        /// Whether `text` (ASCII) comes next; compared in place, as it runs for every byte of text.
        func peek(_ text: StaticString) -> Bool { matches(text, at: at) }

        func matches(_ text: StaticString, at position: Int) -> Bool {
            let count = text.utf8CodeUnitCount
            guard position + count <= bytes.count else { return false }
            let pattern = text.utf8Start
            for index in 0..<count where bytes[position + index] != pattern[index] { return false }
            return true
        }

        mutating func skipSpace() {
            while at < bytes.count, [0x20, 0x09, 0x0a, 0x0d].contains(bytes[at]) { at += 1 }
        }

        mutating func skip(past end: StaticString) throws(LibraryError) {
            while at + end.utf8CodeUnitCount <= bytes.count {
                if matches(end, at: at) { at += end.utf8CodeUnitCount; return }
                at += 1
            }
            throw refuse("'\(end)' never comes")
        }

        /// Comments, processing instructions and space between markup.
        mutating func skipMisc() throws(LibraryError) {
            while true {
                skipSpace()
                if peek("<!--") { try skip(past: "-->") } else if peek("<?") { try skip(past: "?>") } else { return }
            }
        }

        mutating func document() throws(LibraryError) -> XMLNode {
            try skipMisc()
            if peek("<!DOCTYPE") || peek("<!doctype") { throw refuse("a DOCTYPE (entities and DTDs are not accepted)") }
            guard peek("<") else { throw refuse("no root element") }
            let root = try element(depth: 0)
            try skipMisc()
            guard atEnd else { throw refuse("content after the root element") }
            return root
        }

        mutating func name() throws(LibraryError) -> String {
            let start = at
            while at < bytes.count {
                let byte = bytes[at]
                let isNameByte = byte >= 0x80 || (byte >= 0x61 && byte <= 0x7a) || (byte >= 0x41 && byte <= 0x5a) || (byte >= 0x30 && byte <= 0x39)
                    || byte == 0x3a || byte == 0x5f || byte == 0x2d || byte == 0x2e
                guard isNameByte else { break }
                at += 1
            }
            guard at > start, at - start <= 256 else { throw refuse("a missing or overlong name") }
            let full = String(decoding: bytes[start..<at], as: UTF8.self)
            // The local name: OVF writers choose their own prefixes.
            return full.split(separator: ":").last.map(String.init) ?? full
        }

        mutating func element(depth: Int) throws(LibraryError) -> XMLNode {
            guard depth < XMLLite.maximumDepth else { throw refuse("more than \(XMLLite.maximumDepth) levels") }
            elements += 1
            guard elements <= XMLLite.maximumElements else { throw refuse("more than \(XMLLite.maximumElements) elements") }
            at += 1   // <
            let tag = try name()
            var node = XMLNode(name: tag, attributes: [:], children: [], text: "")
            while true {
                skipSpace()
                guard !atEnd else { throw refuse("the tag <\(tag)> never ends") }
                if peek("/>") { at += 2; return node }
                if peek(">") { at += 1; break }
                let attribute = try name()
                skipSpace()
                guard peek("=") else { throw refuse("attribute \(attribute) has no value") }
                at += 1
                skipSpace()
                guard !atEnd, bytes[at] == 0x22 || bytes[at] == 0x27 else { throw refuse("attribute \(attribute)'s value is not quoted") }
                let quote = bytes[at]
                at += 1
                let start = at
                while at < bytes.count, bytes[at] != quote { at += 1 }
                guard !atEnd else { throw refuse("attribute \(attribute)'s value never ends") }
                node.attributes[attribute] = try decodeText(bytes[start..<at])
                at += 1
            }
            var text: [UInt8] = []
            while true {
                guard !atEnd else { throw refuse("<\(tag)> is never closed") }
                if peek("</") {
                    at += 2
                    let closing = try name()
                    skipSpace()
                    guard closing == tag, peek(">") else { throw refuse("</\(closing)> closes <\(tag)>") }
                    at += 1
                    node.text = try decodeText(text[...])
                    return node
                }
                if peek("<!--") { try skip(past: "-->"); continue }
                if peek("<?") { try skip(past: "?>"); continue }
                if peek("<![CDATA[") {
                    at += 9
                    let start = at
                    try skip(past: "]]>")
                    // CDATA is literal: escape what decodeText would read as a reference.
                    for byte in bytes[start..<at - 3] { text += byte == 0x26 ? Array("&amp;".utf8) : [byte] }
                    continue
                }
                if peek("<!") { throw refuse("a declaration inside an element") }
                if peek("<") {
                    node.children.append(try element(depth: depth + 1))
                    continue
                }
                text.append(bytes[at])
                at += 1
            }
        }

        /// Text with its character references replaced; other entities are refused.
        func decodeText(_ raw: ArraySlice<UInt8>) throws(LibraryError) -> String {
            guard raw.contains(0x26) else { return String(decoding: raw, as: UTF8.self) }
            var out: [UInt8] = []
            var index = raw.startIndex
            while index < raw.endIndex {
                guard raw[index] == 0x26 else { out.append(raw[index]); index += 1; continue }
                guard let semicolon = raw[index...].firstIndex(of: 0x3b), semicolon - index <= 12 else { throw refuse("an unterminated '&'") }
                let entity = String(decoding: raw[(index + 1)..<semicolon], as: UTF8.self)
                switch entity {
                case "lt": out.append(0x3c)
                case "gt": out.append(0x3e)
                case "amp": out.append(0x26)
                case "quot": out.append(0x22)
                case "apos": out.append(0x27)
                default:
                    let number: UInt32? = entity.hasPrefix("#x") ? UInt32(entity.dropFirst(2), radix: 16) : entity.hasPrefix("#") ? UInt32(entity.dropFirst()) : nil
                    guard let number, number > 0, let scalar = Unicode.Scalar(number) else { throw refuse("the entity &\(entity.prefix(12)); (only the predefined and numeric ones are accepted)") }
                    out += Array(String(Character(scalar)).utf8)
                }
                index = semicolon + 1
            }
            return String(decoding: out, as: UTF8.self)
        }
    }
}
