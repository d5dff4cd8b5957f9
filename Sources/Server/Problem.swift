import Engines
import Hummingbird
import Library
import MachineSpec
import NIOCore

/// An API error as RFC 9457 `application/problem+json`: what was refused, which field and why,
/// and for a VM in the wrong state, the state and what to do. Every route's failure is one of these.
public struct APIProblem: Error, HTTPResponseError, Sendable {
    public var status: HTTPResponse.Status
    /// A short, stable kind (`not-found`, `invalid-value`, `wrong-state`...): the `type` is
    /// `urn:vireo:problem:<kind>`.
    public var kind: String
    public var detail: String
    public var field: String?
    public var vm: String?
    public var state: String?
    public var hint: String?

    public init(_ status: HTTPResponse.Status, kind: String, detail: String, field: String? = nil,
                vm: String? = nil, state: String? = nil, hint: String? = nil) {
        self.status = status; self.kind = kind; self.detail = detail; self.field = field
        self.vm = vm; self.state = state; self.hint = hint
    }

    static func invalid(_ field: String, _ reason: String) -> APIProblem {
        APIProblem(.unprocessableContent, kind: "invalid-value", detail: "\(field): \(reason)", field: field)
    }

    static func malformed(_ detail: String) -> APIProblem {
        APIProblem(.badRequest, kind: "malformed-body", detail: detail)
    }

    public struct Body: Encodable, Sendable {
        var type: String, title: String, status: Int, detail: String
        var field: String?, vm: String?, state: String?, hint: String?
    }

    var body: Body {
        Body(type: "urn:vireo:problem:\(kind)", title: status.reasonPhrase, status: status.code, detail: detail,
             field: field, vm: vm, state: state, hint: hint)
    }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        var headers: HTTPFields = [.contentType: "application/problem+json"]
        if status == .unauthorized { headers[.wwwAuthenticate] = "Bearer realm=\"vireo\"" }
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: APIJSON.encode(body))))
    }
}

extension APIProblem {
    /// The library's refusal as HTTP: what the user can fix is 4xx, the host's failures 500.
    init(_ error: LibraryError) {
        let text = error.description
        switch error {
        case let .invalidName(name, reason):
            self.init(.unprocessableContent, kind: "invalid-name", detail: text, field: "name", vm: name, hint: reason)
        case let .invalidValue(field, _):
            // The library names the field by its JSON key, the API's own name for it.
            self.init(.unprocessableContent, kind: "invalid-value", detail: text, field: field)
        case let .notFound(name, _):
            self.init(.notFound, kind: "not-found", detail: "no VM named '\(name)' in the library", vm: name)
        case let .alreadyExists(name):
            self.init(.conflict, kind: "already-exists", detail: text, field: "name", vm: name)
        case let .wrongState(name, state, _, hint):
            self.init(.conflict, kind: "wrong-state", detail: text, vm: name, state: state, hint: hint)
        case let .busy(name):
            self.init(.conflict, kind: "busy", detail: text, vm: name, state: "busy", hint: "try again")
        case let .unsupported(name, _, _, hint):
            self.init(.conflict, kind: "unsupported", detail: text, vm: name, hint: hint)
        case let .control(name, _, _):
            self.init(.conflict, kind: "refused-by-vm", detail: text, vm: name)
        case let .engine(name, _, status):
            self.init(status == 2 ? .unprocessableContent : .internalServerError, kind: "engine", detail: text, vm: name)
        case .network(_, _, let status):
            self.init(status == 2 ? .unprocessableContent : .internalServerError, kind: "network", detail: text)
        case .disk:
            self.init(error.exitStatus == 2 ? .unprocessableContent : .internalServerError, kind: "disk", detail: text)
        case .io, .corrupt:
            self.init(.internalServerError, kind: "host", detail: text)
        case let .migration(name, _, _):
            self.init(.internalServerError, kind: "migration", detail: text, vm: name)
        }
    }
}
