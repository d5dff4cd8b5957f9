import JSONQuoting

/// Builds one JSON object as text. `vireo-vmm` answers the control socket in JSON without
/// Foundation's encoder, whose loading would cost more than the VMM's whole start-up.
struct JSONObject {
    private var members: [String] = []

    /// Whether this is a success reply (`"ok":true` first, as `ControlServer.success()` makes it).
    var isSuccess: Bool { members.first == Self.quote("ok") + ":true" }

    mutating func add(_ key: String, _ value: String) { members.append(Self.quote(key) + ":" + Self.quote(value)) }
    mutating func add(_ key: String, _ value: Bool) { members.append(Self.quote(key) + ":" + (value ? "true" : "false")) }
    mutating func add<Number: BinaryInteger>(_ key: String, _ value: Number) { members.append(Self.quote(key) + ":" + String(value)) }
    mutating func add<Number: BinaryInteger>(_ key: String, _ values: [Number]) {
        members.append(Self.quote(key) + ":[" + values.map { String($0) }.joined(separator: ",") + "]")
    }
    mutating func add(_ key: String, _ values: [String]) {
        members.append(Self.quote(key) + ":[" + values.map(Self.quote).joined(separator: ",") + "]")
    }
    mutating func add(_ key: String, _ object: JSONObject) { members.append(Self.quote(key) + ":" + object.text) }
    mutating func add(_ key: String, _ objects: [JSONObject]) {
        members.append(Self.quote(key) + ":[" + objects.map(\.text).joined(separator: ",") + "]")
    }

    var text: String { "{" + members.joined(separator: ",") + "}" }

    static func quote(_ string: String) -> String { JSONString.quote(string) }
}
