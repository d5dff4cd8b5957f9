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
        router.get("/") { _, _ in Self.file(PackageResources.index_html, type: "text/html; charset=utf-8") }
        router.get("/favicon.ico") { _, _ in Response(status: .noContent) }
        router.get("/app.js") { _, _ in Self.file(PackageResources.app_js, type: "text/javascript; charset=utf-8") }
        router.get("/app.css") { _, _ in Self.file(PackageResources.app_css, type: "text/css; charset=utf-8") }
        router.get("/static/xterm.js") { _, _ in
            Self.file(try await blocking { try XtermBundle.shared.bundle() }, type: "text/javascript; charset=utf-8")
        }
        router.get("/static/:file") { _, context in
            let name = try context.parameters.require("file")
            guard let path = Self.debianFiles[name] else { throw APIProblem(.notFound, kind: "not-found", detail: "no static file '\(name)'") }
            return Self.file(try await blocking { try Self.packageFile(path) }, type: Self.contentType(path))
        }
        router.get("/static/novnc/**") { request, _ in
            let relative = String(request.uri.path.dropFirst("/static/novnc/".count))
            let parts = relative.split(separator: "/")
            // Only plain names below the package's directory: no "..", no hidden files.
            guard !parts.isEmpty, parts.allSatisfy({ !$0.hasPrefix(".") && !$0.isEmpty }) else {
                throw APIProblem(.notFound, kind: "not-found", detail: "no such noVNC file")
            }
            let path = Self.novncRoot + "/" + parts.joined(separator: "/")
            return Self.file(try await blocking { try Self.packageFile(path) }, type: Self.contentType(path))
        }
    }

    static func file(_ bytes: [UInt8], type: String) -> Response {
        Response(status: .ok, headers: [.contentType: type, .cacheControl: "no-cache"], body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
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
