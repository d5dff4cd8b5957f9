import Hummingbird
import Library
import NIOCore
import Synchronization

/// The web manager's files: its own page (embedded in the binary) and the libraries Debian
/// ships (`node-xterm`/`libjs-xterm`, `novnc`, `libjs-chart.js`), read from where the packages
/// put them; nothing is copied into the repository or fetched from the internet.
extension APIServer {
    static let debianFiles: [String: String] = [
        "chart.js": "/usr/share/javascript/chart.js/chart.min.js",
        "xterm.css": "/usr/share/javascript/xterm/xterm.css",
    ]
    static let novncRoot = "/usr/share/novnc"
    static let xtermModules = "/usr/share/nodejs/xterm/lib"

    func addStaticRoutes(to router: Router<APIContext>) {
        router.get("/") { request, _ in Self.file(Self.indexPage, type: "text/html; charset=utf-8", tag: Self.assetVersion, request: request) }
        router.get("/app.js") { request, _ in
            Self.file(PackageResources.app_js, type: "text/javascript; charset=utf-8", tag: Self.assetVersion, request: request, versioned: true)
        }
        router.get("/app.css") { request, _ in
            Self.file(PackageResources.app_css, type: "text/css; charset=utf-8", tag: Self.assetVersion, request: request, versioned: true)
        }
        router.get("/static/xterm.js") { request, _ in
            let bytes = try await blocking { try XtermBundle.shared.bundle() }
            return Self.file(bytes, type: "text/javascript; charset=utf-8", tag: Self.contentTag(bytes), request: request)
        }
        router.get("/static/:file") { request, context in
            let name = try context.parameters.require("file")
            guard let path = Self.debianFiles[name] else { throw APIProblem(.notFound, kind: "not-found", detail: "no static file '\(name)'") }
            let bytes = try await blocking { try Self.packageFile(path) }
            return Self.file(bytes, type: Self.contentType(path), tag: Self.contentTag(bytes), request: request)
        }
        router.get("/static/novnc/**") { request, _ in
            let relative = String(request.uri.path.dropFirst("/static/novnc/".count))
            let parts = relative.split(separator: "/")
            // Only plain names below the package's directory: no "..", no hidden files.
            guard !parts.isEmpty, parts.allSatisfy({ !$0.hasPrefix(".") && !$0.isEmpty }) else {
                throw APIProblem(.notFound, kind: "not-found", detail: "no such noVNC file")
            }
            let path = Self.novncRoot + "/" + parts.joined(separator: "/")
            let bytes = try await blocking { try Self.packageFile(path) }
            return Self.file(bytes, type: Self.contentType(path), tag: Self.contentTag(bytes), request: request)
        }
    }

    /// The page's own files change only with the binary: the page names them with this version
    /// (`/app.js?v=...`), so a browser keeps them for good and a new binary's page asks anew.
    static let assetVersion = contentTag(PackageResources.app_js + PackageResources.app_css + PackageResources.index_html)

    static let indexPage: [UInt8] = Array(String(decoding: PackageResources.index_html, as: UTF8.self)
        .replacing("\"/app.js\"", with: "\"/app.js?v=\(assetVersion)\"")
        .replacing("\"/app.css\"", with: "\"/app.css?v=\(assetVersion)\"").utf8)

    /// A validator for `If-None-Match`: FNV-1a over the bytes, which are small (at most a few
    /// hundred KiB) and read anyway.
    static func contentTag(_ bytes: [UInt8]) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        let text = String(hash, radix: 16)
        return String(repeating: "0", count: 16 - text.count) + text
    }

    /// A static file: 304 when the browser's copy is current; `versioned` files asked for by
    /// this binary's version are cached for good, everything else revalidated on each use.
    static func file(_ bytes: [UInt8], type: String, tag: String, request: Request, versioned: Bool = false) -> Response {
        let etag = "\"\(tag)\""
        let lasting = versioned && request.uri.queryParameters["v"].map(String.init) == assetVersion
        let headers: HTTPFields = [.contentType: type, .eTag: etag,
                                   .cacheControl: lasting ? "public, max-age=31536000, immutable" : "no-cache"]
        if let given = request.headers[.ifNoneMatch], given.split(separator: ",").contains(where: { String($0).trimmingWhitespace() == etag }) {
            return Response(status: .notModified, headers: headers)
        }
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    /// A file from a Debian package; missing means the package is not installed (setup.sh
    /// installs it), which the page reports rather than failing silently.
    static func packageFile(_ path: String) throws(LibraryError) -> [UInt8] {
        guard HostFiles.exists(path) else {
            throw .invalidValue(field: "static file", reason: "\(path) is missing: install Debian's node-xterm, libjs-xterm, novnc and libjs-chart.js (scripts/setup.sh does)")
        }
        return try HostFiles.readAll(path)
    }

    static func contentType(_ path: String) -> String {
        switch path.split(separator: ".").last {
        case "js", "mjs": return "text/javascript; charset=utf-8"
        case "css": return "text/css; charset=utf-8"
        case "html": return "text/html; charset=utf-8"
        case "svg": return "image/svg+xml"
        case "png": return "image/png"
        case "ico": return "image/x-icon"
        case "json": return "application/json"
        default: return "application/octet-stream"
        }
    }
}

/// Debian 12's `libjs-xterm` ships only a stub `xterm.js` that `require`s modules it does not
/// include; the compiled modules are in `node-xterm` as CommonJS. The server joins them into one
/// script with a few lines of `require`, once, the first time a page asks.
final class XtermBundle: Sendable {
    static let shared = XtermBundle()
    private let cached = Mutex<[UInt8]?>(nil)

    func bundle() throws(LibraryError) -> [UInt8] {
        if let bytes = cached.withLock({ $0 }) { return bytes }
        let root = APIServer.xtermModules
        guard HostFiles.isDirectory(root) else {
            throw .invalidValue(field: "static file", reason: "\(root) is missing: install Debian's node-xterm (scripts/setup.sh does)")
        }
        var modules: [String] = []
        func walk(_ directory: String, _ prefix: String) throws(LibraryError) {
            for entry in try HostFiles.entries(of: directory).sorted() {
                let path = directory + "/" + entry
                if HostFiles.isDirectory(path) { try walk(path, prefix + entry + "/"); continue }
                guard entry.hasSuffix(".js"), !entry.hasSuffix(".test.js") else { continue }
                modules.append(prefix + String(entry.dropLast(3)))
            }
        }
        try walk(root, "")
        var script = """
            (function () {
            var definitions = {}, cache = {};
            function resolve(from, name) {
              var parts = from.split('/'); parts.pop();
              name.split('/').forEach(function (p) { if (p === '..') parts.pop(); else if (p !== '.') parts.push(p); });
              return parts.join('/');
            }
            function load(id) {
              if (cache[id]) return cache[id].exports;
              if (!definitions[id]) throw new Error('xterm bundle: no module ' + id);
              var module = cache[id] = { exports: {} };
              definitions[id](function (name) { return load(resolve(id, name)); }, module, module.exports);
              return module.exports;
            }

            """
        for module in modules {
            let source = String(decoding: try HostFiles.readAll(root + "/" + module + ".js"), as: UTF8.self)
                .replacing("//# sourceMappingURL=", with: "// map: ")
            script += "definitions[\"\(module)\"] = function (require, module, exports) {\n\(source)\n};\n"
        }
        script += "window.Terminal = load('public/Terminal').Terminal;\n})();\n"
        let bytes = Array(script.utf8)
        cached.withLock { $0 = bytes }
        return bytes
    }
}
