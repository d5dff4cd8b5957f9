import Foundation

/// What the shim takes from an OCI runtime spec (the bundle's config.json, or an exec's
/// process), and what it refuses: the VM is the container's boundary, so a spec asking to reach
/// past it (the host's PID or network namespace, every host device) cannot be honoured.
public struct OCIProcess: Sendable, Equatable {
    public var args: [String]
    public var env: [String]
    public var cwd: String
    public var uid: UInt32
    public var gid: UInt32
    public var additionalGids: [UInt32]
    public var terminal: Bool
    /// The terminal's size before the process starts (`process.consoleSize`), as runc applies it;
    /// nil without one (the first ResizePty sets it).
    public var consoleWidth: UInt16?
    public var consoleHeight: UInt16?

    public init(json: Any) throws(RPCError) {
        guard let object = json as? [String: Any] else { throw RPCError(.invalidArgument, "process: not an object") }
        guard let args = object["args"] as? [String], let first = args.first, !first.isEmpty else {
            throw RPCError(.invalidArgument, "process.args: missing or empty; the container needs a program to run")
        }
        self.args = args
        env = object["env"] as? [String] ?? []
        cwd = object["cwd"] as? String ?? "/"
        guard cwd.hasPrefix("/") else { throw RPCError(.invalidArgument, "process.cwd '\(cwd)' is not absolute") }
        let user = object["user"] as? [String: Any] ?? [:]
        func id(_ value: Any?, _ field: String) throws(RPCError) -> UInt32 {
            guard let value else { return 0 }
            guard let number = value as? NSNumber, let id = UInt32(exactly: number.doubleValue) else { throw RPCError(.invalidArgument, "process.user.\(field): not a uid/gid") }
            return id
        }
        uid = try id(user["uid"], "uid")
        gid = try id(user["gid"], "gid")
        var groups: [UInt32] = []
        for value in user["additionalGids"] as? [Any] ?? [] { groups.append(try id(value, "additionalGids")) }
        additionalGids = groups
        terminal = object["terminal"] as? Bool ?? false
        if let size = object["consoleSize"] {
            guard let fields = size as? [String: Any] else { throw RPCError(.invalidArgument, "process.consoleSize: not an object") }
            func dimension(_ name: String) throws(RPCError) -> UInt16 {
                guard let number = fields[name] as? NSNumber, let value = UInt16(exactly: number.doubleValue) else {
                    throw RPCError(.invalidArgument, "process.consoleSize.\(name): not a size from 0 to 65535")
                }
                return value
            }
            consoleWidth = try dimension("width")
            consoleHeight = try dimension("height")
        }
    }
}

public struct ContainerSpec: Sendable {
    public var process: OCIProcess
    public var hostname: String
    /// The root file system when the snapshotter gave no mounts: spec.root.path, relative to the bundle.
    public var rootPath: String
    public var memoryLimitBytes: Int64?
    /// The spec's annotations (CRI names a pod's sandbox in them).
    public var annotations: [String: String]
    public var cpuQuota: (quota: Int64, period: UInt64)?
    /// The network namespace the spec joins (`linux.namespaces[type=network].path`): where CNI
    /// wired the pod (CRI, `ctr run --cni` or `--with-ns`). Nil: a namespace of its own, which
    /// has only loopback, as with runc.
    public var networkNamespacePath: String?
    /// The spec's bind mounts of host files and directories (CRI's /etc/hosts, /etc/hostname,
    /// /etc/resolv.conf, Kubernetes' volumes, `ctr run --mount`), in the spec's order.
    public var bindMounts: [BindMount] = []

    /// A host file or directory the container sees at `destination`. The host path cannot reach
    /// into a VM: its contents are copied into the container's root image at Create.
    public struct BindMount: Sendable, Equatable {
        public var source: String
        public var destination: String
        public var readOnly: Bool
    }

    public init(data: Data) throws(RPCError) {
        let json: Any
        do { json = try JSONSerialization.jsonObject(with: data) } catch { throw RPCError(.invalidArgument, "config.json is not JSON: \(error)") }
        guard let spec = json as? [String: Any] else { throw RPCError(.invalidArgument, "config.json: not an object") }
        guard let process = spec["process"] else { throw RPCError(.invalidArgument, "config.json: no process") }
        self.process = try OCIProcess(json: process)
        hostname = spec["hostname"] as? String ?? ""
        annotations = spec["annotations"] as? [String: String] ?? [:]
        rootPath = (spec["root"] as? [String: Any])?["path"] as? String ?? "rootfs"
        let linux = spec["linux"] as? [String: Any] ?? [:]
        let namespaceEntries = linux["namespaces"] as? [[String: Any]] ?? []
        let namespaces = namespaceEntries.compactMap { $0["type"] as? String }
        if let path = namespaceEntries.first(where: { $0["type"] as? String == "network" })?["path"] as? String, !path.isEmpty {
            networkNamespacePath = path
        }
        guard namespaces.contains("pid") else {
            throw RPCError(.invalidArgument, "linux.namespaces: no pid namespace, so the container asks for the host's PID namespace; a Vireo container runs in its own VM and cannot see the host's processes")
        }
        guard namespaces.contains("network") else {
            throw RPCError(.invalidArgument, "linux.namespaces: no network namespace, so the container asks for the host's network; a Vireo container runs in its own VM and cannot share the host's network stack")
        }
        let resources = linux["resources"] as? [String: Any] ?? [:]
        for rule in resources["devices"] as? [[String: Any]] ?? [] where rule["allow"] as? Bool == true {
            let type = rule["type"] as? String ?? "a"
            if type == "a" && rule["major"] == nil && rule["minor"] == nil {
                throw RPCError(.invalidArgument, "linux.resources.devices allows every device (a privileged container); a Vireo container runs in its own VM and cannot be given the host's devices")
            }
        }
        for (index, mount) in (spec["mounts"] as? [[String: Any]] ?? []).enumerated() {
            let options = mount["options"] as? [String] ?? []
            guard mount["type"] as? String == "bind" || options.contains("bind") || options.contains("rbind") else { continue }
            let source = mount["source"] as? String ?? "", destination = mount["destination"] as? String ?? ""
            guard Self.isPlainPath(source) else {
                throw RPCError(.invalidArgument, "mounts[\(index)]: a bind mount's source '\(source.prefix(200))' must be an absolute host path without '..', quotes or control characters")
            }
            guard Self.isPlainPath(destination) else {
                throw RPCError(.invalidArgument, "mounts[\(index)]: the destination '\(destination.prefix(200))' must be an absolute path without '..', quotes or control characters")
            }
            bindMounts.append(BindMount(source: source, destination: destination, readOnly: options.contains("ro")))
        }
        if let memory = resources["memory"] as? [String: Any], let limit = (memory["limit"] as? NSNumber)?.int64Value, limit > 0 { memoryLimitBytes = limit }
        if let cpu = resources["cpu"] as? [String: Any], let quota = (cpu["quota"] as? NSNumber)?.int64Value, quota > 0 {
            cpuQuota = (quota, (cpu["period"] as? NSNumber)?.uint64Value ?? 100_000)
        }
    }

    /// A path debugfs can be told in a script line: absolute, at most 1024 bytes, no `..`, no
    /// quotes, backslashes or control characters.
    static func isPlainPath(_ path: String) -> Bool {
        path.hasPrefix("/") && path.utf8.count <= 1024 && !path.split(separator: "/").contains("..")
            && !path.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7f || $0 == "\"" || $0 == "\\" }
    }

    /// The VM's size for this container: its memory limit plus the guest's own overhead, its CPU
    /// quota rounded up to whole vCPUs; the settings' defaults otherwise.
    public func machineSize(defaults: ShimConfiguration) -> (cpus: Int, memory: String, cpuCapPercent: Int?) {
        var cpus = defaults.cpus
        // Whole vCPUs, rounded up, without the rounding's addition (quota may be Int64's limit).
        if let quota = cpuQuota, quota.period > 0 {
            let whole = UInt64(quota.quota) / quota.period + (UInt64(quota.quota) % quota.period == 0 ? 0 : 1)
            cpus = Int(max(1, min(64, whole)))
        }
        var memory = defaults.memory
        if let limit = memoryLimitBytes {
            let mebibytes = (limit >> 20) + (limit & ((1 << 20) - 1) == 0 ? 0 : 1)
            memory = "\(mebibytes + ShimConfiguration.guestOverheadMiB)M"
        }
        // The quota also caps the VM's engine process (its cgroup), as it would the container's.
        let cap = cpuQuota.flatMap { $0.period > 0 ? Self.capPercent(quota: $0.quota, period: $0.period) : nil }
        return (cpus, memory, cap)
    }

    /// The most `vireo --cpu-cap` takes (ResourceLimits: 1024 CPUs' worth): a larger quota is as
    /// good as none on any host Vireo runs on.
    public static let maximumCapPercent = 100 * 1024

    /// A CPU quota over its period as the VM's CPU cap in percent of one CPU, at least 1, at most
    /// `maximumCapPercent` (the spec's numbers reach Int64's limit; they saturate, never overflow).
    public static func capPercent(quota: Int64, period: UInt64) -> Int {
        guard quota > 0, period > 0 else { return 1 }
        let (scaled, overflow) = UInt64(quota).multipliedReportingOverflow(by: 100)
        let percent = overflow ? UInt64.max : scaled / period
        return Int(max(1, min(UInt64(maximumCapPercent), percent)))
    }
}

extension ShimConfiguration {
    /// What the guest's kernel and agent take beyond a container's own memory limit (measured in
    /// docs/containerd.md; Kubernetes' PodOverhead).
    public static let guestOverheadMiB: Int64 = 64
}
