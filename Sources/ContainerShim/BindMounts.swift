import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The host files and directories a spec bind-mounts (CRI's /etc/hosts, /etc/hostname and
/// /etc/resolv.conf, Kubernetes' volumes, `ctr run --mount`), copied into the container's root
/// image at Create: a VM cannot see host paths. The copy is written with debugfs, which works
/// inside the image only, so a link in the image can never lead the shim, which runs as root,
/// anywhere on the host; links inside a source tree are copied as links, never followed.
/// What the container then sees is the sources as they were at Create (docs/containerd.md).
enum BindMountCopy {
    /// The most a container's bind mounts may bring into its image, in bytes and entries.
    static let maximumBytes = 256 << 20
    static let maximumEntries = 10_000
    static let maximumDepth = 32

    enum Entry: Equatable {
        case directory(String)
        case file(source: String, destination: String, readOnly: Bool, mode: UInt32)
        case link(target: String, destination: String)
    }

    /// Everything the mounts bring, in order (parents before what they hold), and its bytes.
    static func plan(_ mounts: [ContainerSpec.BindMount]) throws(RPCError) -> (entries: [Entry], bytes: Int) {
        var entries: [Entry] = []
        var bytes = 0
        func add(_ entry: Entry, size: Int) throws(RPCError) {
            entries.append(entry)
            bytes += size + 4096
            guard entries.count <= maximumEntries, bytes <= maximumBytes else {
                throw RPCError(.failedPrecondition, "the bind mounts hold more than \(maximumEntries) entries or \(maximumBytes >> 20) MiB; a Vireo container gets a copy of them in its root image, so large volumes do not fit")
            }
        }
        for mount in mounts {
            var status = stat()
            // The mount's own source is followed, as the kernel's bind mount follows it.
            guard stat(mount.source, &status) == 0 else {
                throw RPCError(.invalidArgument, "the bind mount of \(mount.source) on \(mount.destination): \(String(cString: strerror(errno)))")
            }
            let parents = mount.destination.split(separator: "/").dropLast()
            for depth in parents.indices { try add(.directory("/" + parents[...depth].joined(separator: "/")), size: 0) }
            try walk(mount.source, status, to: mount.destination, readOnly: mount.readOnly, depth: 0, add)
        }
        return (entries, bytes)
    }

    private static func walk(_ source: String, _ status: stat, to destination: String, readOnly: Bool, depth: Int,
                             _ add: (Entry, Int) throws(RPCError) -> Void) throws(RPCError) {
        switch status.st_mode & S_IFMT {
        case S_IFREG:
            try add(.file(source: source, destination: destination, readOnly: readOnly, mode: UInt32(status.st_mode & 0o7777)), Int(status.st_size))
        case S_IFLNK:
            var buffer = [CChar](repeating: 0, count: 4097)
            let length = readlink(source, &buffer, 4096)
            guard length > 0 else { return }
            let target = String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            guard !target.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f || $0 == "\"" || $0 == "\\" }) else {
                throw RPCError(.invalidArgument, "the link \(source) points at a name with quotes or control characters, which cannot be copied into the container")
            }
            try add(.link(target: target, destination: destination), 0)
        case S_IFDIR:
            guard depth < maximumDepth else { throw RPCError(.failedPrecondition, "\(source) is nested more than \(maximumDepth) directories deep") }
            try add(.directory(destination), 0)
            guard let handle = opendir(source) else {
                throw RPCError(.invalidArgument, "the bind mount's directory \(source): \(String(cString: strerror(errno)))")
            }
            var names: [String] = []
            while let entry = readdir(handle) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name != ".", name != ".." { names.append(name) }
            }
            closedir(handle)
            for name in names.sorted() {
                let path = source + "/" + name, target = destination + "/" + name
                guard ContainerSpec.isPlainPath(target) else {
                    throw RPCError(.invalidArgument, "\(path.prefix(300)) has a name with quotes or control characters, which cannot be copied into the container")
                }
                var inner = stat()
                guard lstat(path, &inner) == 0 else { continue }
                try walk(path, inner, to: target, readOnly: readOnly, depth: depth + 1, add)
            }
        default:
            // Sockets, devices and pipes are the host's; the VM has its own.
            return
        }
    }

    /// Writes the planned entries into the ext4 image (not mounted). A file or link replaces
    /// what the image has at its place; a directory is merged into one the image has.
    static func copy(_ entries: [Entry], into image: String) throws(RPCError) {
        guard !entries.isEmpty else { return }
        var lines: [String] = []
        var writes = 0
        for entry in entries {
            switch entry {
            case let .directory(path):
                lines.append("mkdir \"\(path)\"")
            case let .file(source, destination, readOnly, mode):
                lines.append("rm \"\(destination)\"")
                lines.append("write \"\(source)\" \"\(destination)\"")
                writes += 1
                // Read-only files lose their write bits (root in the guest could still chmod them).
                let kept = readOnly ? mode & ~UInt32(0o222) : mode
                lines.append("set_inode_field \"\(destination)\" mode 0\(String(0o100000 | kept, radix: 8))")
                lines.append("set_inode_field \"\(destination)\" uid 0")
                lines.append("set_inode_field \"\(destination)\" gid 0")
            case let .link(target, destination):
                lines.append("rm \"\(destination)\"")
                lines.append("symlink \"\(destination)\" \"\(target)\"")
            }
        }
        let script = image + ".bind-mounts"
        do { try (lines.joined(separator: "\n") + "\n").write(toFile: script, atomically: true, encoding: .utf8) } catch {
            throw RPCError(.internal, "cannot write the bind mounts' copy script: \(error)")
        }
        defer { unlink(script) }
        let debugfs = Foundation.Process()
        debugfs.executableURL = URL(fileURLWithPath: "/sbin/debugfs")
        debugfs.arguments = ["-w", "-f", script, image]
        let output = Pipe(), errors = Pipe()
        debugfs.standardOutput = output
        debugfs.standardError = errors
        do { try debugfs.run() } catch { throw RPCError(.internal, "cannot run debugfs: \(error)") }
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let problems = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        debugfs.waitUntilExit()
        // debugfs goes on after a failed command: each write must be followed by its new inode.
        let echoed = text.split(separator: "\n", omittingEmptySubsequences: false)
        var written = 0
        for (index, line) in echoed.enumerated() where line.hasPrefix("debugfs: write ") {
            guard index + 1 < echoed.count, echoed[index + 1].hasPrefix("Allocated inode") else {
                let failure = problems.split(separator: "\n").filter { $0.hasPrefix("write:") || $0.contains("while") }.prefix(3).joined(separator: "; ")
                throw RPCError(.internal, "cannot copy a bind mount into the container's root (\(line.dropFirst("debugfs: write ".count))): \(failure)")
            }
            written += 1
        }
        guard debugfs.terminationStatus == 0, written == writes else {
            throw RPCError(.internal, "debugfs copied \(written) of the bind mounts' \(writes) files: \(problems.suffix(500))")
        }
    }
}
