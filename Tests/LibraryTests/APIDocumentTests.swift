import Engines
import Foundation
import Library
@testable import Server
import Testing

/// The OpenAPI document is the API's contract: these hold the server's routes to it, both ways,
/// and check the document is one clients can use (ids, problem responses, auth).
@Suite struct APIDocumentTests {
    static let documentPath = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../Sources/Server/Web/openapi.json").standardized.path

    func document() throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Self.documentPath))
        return try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    func server() throws -> APIServer {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-api-doc-\(UUID().uuidString)").path
        return try APIServer(manager: VMManager(root: root, environment: [:]), configuration: APIServer.Configuration())
    }

    @Test("every route the server answers is in the OpenAPI document, and every documented operation is served")
    func routesMatchDocument() throws {
        let doc = try document()
        #expect(doc["openapi"] as? String == "3.1.0")
        let paths = try #require(doc["paths"] as? [String: [String: Any]])
        var documented = Set<String>()
        for (path, operations) in paths {
            for method in operations.keys { documented.insert("\(method.uppercased()) \(path)") }
        }
        // WebSockets are not OpenAPI operations; the document's description names them instead.
        let webSockets: Set<String> = ["GET /api/vms/{name}/console", "GET /api/vms/{name}/display"]
        let served = Set(try server().routeTable())
        #expect(served.subtracting(webSockets).subtracting(documented).sorted() == [], "served but not documented")
        #expect(documented.subtracting(served).sorted() == [], "documented but not served")
        #expect(served.isSuperset(of: webSockets))
        let info = try #require(doc["info"] as? [String: Any])
        for socket in ["/api/vms/{name}/console", "/api/vms/{name}/display"] {
            #expect((info["description"] as? String)?.contains(socket) == true, "the document does not mention \(socket)")
        }
    }

    @Test("every operation has an id, requires the bearer token, and documents its problems as problem+json")
    func operationsAreComplete() throws {
        let doc = try document()
        #expect((doc["security"] as? [[String: Any]])?.first?["bearer"] != nil)
        let paths = try #require(doc["paths"] as? [String: [String: [String: Any]]])
        var ids = Set<String>()
        for (path, operations) in paths {
            for (method, operation) in operations {
                let id = try #require(operation["operationId"] as? String, "\(method) \(path) has no operationId")
                #expect(ids.insert(id).inserted, "operationId \(id) is used twice")
                let responses = try #require(operation["responses"] as? [String: [String: Any]])
                #expect(responses["401"] != nil, "\(method) \(path) does not document 401")
                #expect(responses["500"] != nil, "\(method) \(path) does not document 500")
                if path.contains("{") { #expect(responses["404"] != nil, "\(method) \(path) does not document 404") }
                if let body = operation["requestBody"] as? [String: Any] {
                    // A JSON body can be malformed (400) or not JSON (415); a file's bytes are whatever they are.
                    let json = (body["content"] as? [String: Any])?["application/json"] != nil
                    for code in json ? ["400", "413", "415", "422"] : ["413", "422"] {
                        #expect(responses[code] != nil, "\(method) \(path) takes a body but does not document \(code)")
                    }
                }
                for (code, response) in responses where code.hasPrefix("4") || code.hasPrefix("5") {
                    let content = response["content"] as? [String: Any]
                    #expect(content?["application/problem+json"] != nil, "\(method) \(path) \(code) is not problem+json")
                }
            }
        }
        #expect(ids.count >= 30)
    }

    @Test("the API token is made once, 0600, and kept across servers")
    func tokenFile() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-api-token-\(UUID().uuidString)").path
        let first = try APIServer(manager: VMManager(root: root, environment: [:]), configuration: APIServer.Configuration())
        let second = try APIServer(manager: VMManager(root: root, environment: [:]), configuration: APIServer.Configuration())
        #expect(first.apiToken == second.apiToken)
        #expect(first.apiToken.count == 64 && first.apiToken.allSatisfy(\.isHexDigit))
        let attributes = try FileManager.default.attributesOfItem(atPath: APIServer.tokenPath(libraryRoot: root))
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
        // A token others can read is refused rather than used.
        chmod(APIServer.tokenPath(libraryRoot: root), 0o644)
        #expect(throws: LibraryError.self) { try APIServer(manager: VMManager(root: root, environment: [:]), configuration: APIServer.Configuration()) }
        try? FileManager.default.removeItem(atPath: root)
    }

    @Test("the list's hand-written JSON is byte for byte what the encoder writes, in the CLI's and the API's layout, for every field and awkward text")
    func summaryJSONMatchesEncoder() throws {
        var summary = VMOverview(name: "web-1", state: "running")
        summary.uuid = "0a"; summary.isolationOff = "--no-jail"; summary.engine = "kvm"; summary.osType = "debian-64"; summary.managedBy = "containerd"
        summary.cpus = 2; summary.memoryBytes = 1 << 30; summary.addresses = ["192.168.122.10", "fd00::1"]; summary.diskAllocatedBytes = 12
        summary.diskVirtualBytes = 1 << 34; summary.actions = ["stop", "pause"]
        summary.error = "/var/lib/x: quote \" backslash \\ newline \n tab \t bell \u{07} bs \u{08} ff \u{0c} us \u{1f} del \u{7f} é 🦉 \u{2028}"
        // Every field of the row is set above: a field added to VMOverview without a value here
        // (and so perhaps without a line in jsonObject) fails this count.
        let encodedKeys = try JSONSerialization.jsonObject(with: Data(APIJSON.encode(summary))) as? [String: Any]
        #expect(encodedKeys?.count == Mirror(reflecting: summary).children.count, "\(encodedKeys?.keys.sorted() ?? [])")
        let pretty = JSONEncoder()
        pretty.outputFormatting = [.prettyPrinted, .sortedKeys]
        pretty.keyEncodingStrategy = JSONStyle.keyEncoding()
        for rows in [[summary, VMOverview(name: "bare", state: "stopped")], [VMOverview(name: "one/slash", state: "saved")], []] {
            #expect(VMOverview.json(rows, .compact) == String(decoding: APIJSON.encode(rows), as: UTF8.self), "\(VMOverview.json(rows, .compact))")
            #expect(VMOverview.json(rows, .pretty) == String(decoding: try pretty.encode(rows), as: UTF8.self), "\(VMOverview.json(rows, .pretty))")
        }
    }
}
