import ContainerWire
import Foundation
import Library
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// A sandbox's VM, made, started, paused and removed through Vireo's own command line, so it is
/// an ordinary library VM (`vireo list`, `info`, `logs`) with every rule the CLI applies.
public struct SandboxVM: Sendable {
    public let name: String
    public let configuration: ShimConfiguration
    public let vireo: String

    public init(name: String, configuration: ShimConfiguration) {
        self.name = name
        self.configuration = configuration
        vireo = Self.vireoBinary()
    }

    /// A library name for a container: readable when it fits, else a hash (containerd's ids may
    /// be 64 hex digits and a namespace long).
    public static func name(namespace: String, id: String) -> String {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        let readable = "ctr-\(namespace)-\(id)"
        if readable.count <= 64, readable.allSatisfy({ allowed.contains($0) }) { return readable }
        let digest = Array("\(namespace)/\(id)".utf8).reduce(UInt64(0xcbf2_9ce4_8422_2325)) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 }
        let prefix = String(id.filter { allowed.contains($0) }.prefix(24))
        return "ctr-" + (prefix.isEmpty ? "" : prefix + "-") + String(digest, radix: 16)
    }

    /// `vireo` beside the shim (the build directory or an install), else on PATH.
    static func vireoBinary() -> String {
        let own = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        let beside = URL(fileURLWithPath: own).deletingLastPathComponent().appendingPathComponent("vireo").path
        if FileManager.default.isExecutableFile(atPath: beside) { return beside }
        for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin").split(separator: ":") {
            let candidate = "\(directory)/vireo"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return "vireo"
    }

    public var libraryRoot: String {
        if let library = configuration.library { return library }
        return getuid() == 0 ? "/var/lib/vireo" : NSHomeDirectory() + "/.local/share/vireo"
    }

    public var directory: String { libraryRoot + "/" + name }

    /// The file in the bundle naming the VM's directory (`shim delete` reads it).
    public static let recordName = "vireo-sandbox"

    /// The sandbox a bundle's record names, if the record is there.
    public static func recorded(inBundle bundle: String, configuration: ShimConfiguration) -> SandboxVM? {
        guard let text = try? String(contentsOfFile: bundle + "/" + recordName, encoding: .utf8) else { return nil }
        let directory = URL(fileURLWithPath: text.trimmingCharacters(in: .whitespacesAndNewlines))
        var configuration = configuration
        configuration.library = directory.deletingLastPathComponent().path
        return SandboxVM(name: directory.lastPathComponent, configuration: configuration)
    }

    @discardableResult
    func vireo(_ arguments: [String], timeoutSeconds: Double = 120) throws(RPCError) -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: vireo)
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        if let library = configuration.library { environment["VIREO_HOME"] = library }
        process.environment = environment
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        process.standardInput = FileHandle.nullDevice
        do { try process.run() } catch { throw RPCError(.internal, "cannot run \(vireo): \(error)") }
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard process.terminationStatus == 0 else {
            throw RPCError(.internal, "vireo \(arguments.first ?? "") \(name) failed: \(text.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return text
    }

    /// Makes and starts the VM with the container's root file system as its disk. With the
    /// pod's network namespace (CNI's), the VM's one card takes over the namespace's interface
    /// (`--nic netns:PATH` with its MAC, a queue pair per vCPU) and the guest kernel configures the address and
    /// gateway the plugin gave it (`ip=`), before the agent starts.
    public func create(rootImage: String, cpus: Int, memory: String, cpuCapPercent: Int?, spareDisks: [String] = [],
                       networkNamespace: String? = nil) throws(RPCError) {
        var commandLine = "console=ttyS0 quiet panic=-1 rdinit=/init"
        var cards = ["--no-nic"]
        if let networkNamespace {
            let pod: HostNetworks.NamespaceNetwork
            do throws(LibraryError) { pod = try HostNetworks.namespaceNetwork(networkNamespace) } catch {
                throw RPCError(.invalidArgument, "linux.namespaces: the pod's network namespace: \(error)")
            }
            // A queue pair per vCPU, as Kata gives a pod's card and Linux uses them.
            let queues = min(cpus, MachineLimits.nicQueuePairs.upperBound)
            cards = ["--nic", "netns:\(networkNamespace),mac=\(pod.mac)" + (queues > 1 ? ",queues=\(queues)" : "")]
            if let configuration = pod.kernelArgument { commandLine += " " + configuration }
        }
        commandLine += " " + configuration.kernelArguments
        var arguments = ["create", name, "--engine", configuration.engine, "--kernel", configuration.kernel, "--initrd", configuration.initrd,
                         "--cmdline", commandLine.trimmingCharacters(in: .whitespaces),
                         "--cpus", String(cpus), "--memory", memory, "--attach-disk", rootImage, "--disk-format", "raw", "--managed-by", "containerd"] + cards
        if let cpuCapPercent { arguments += ["--cpu-cap", "\(cpuCapPercent)%"] }
        if configuration.engine == "qemu" { arguments += ["--accel", configuration.accel] } else { arguments += ["--vsock-cid", "3"] }
        try vireo(arguments)
        for disk in spareDisks { try vireo(["disk", "attach", name, disk, "--format", "raw"]) }
    }

    public func start() throws(RPCError) { try vireo(["start", name]) }
    public func pause() throws(RPCError) { try vireo(["pause", name]) }
    public func resume() throws(RPCError) { try vireo(["resume", name]) }

    /// Stops (at once: the containers in it have ended or are being killed) and deletes the VM.
    public func remove() throws(RPCError) {
        guard FileManager.default.fileExists(atPath: directory + "/config.json") else { return }
        _ = try? vireo(["stop", name, "--force"])
        try vireo(["delete", name])
    }

    /// The engine's process id (for containerd's records until the container's own runs).
    public var enginePid: UInt32 {
        guard let text = try? String(contentsOfFile: directory + "/vmm.pid", encoding: .utf8) else { return 0 }
        return UInt32(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }

    public func connectAgent(events: any AgentEvents) throws(RPCError) -> AgentClient {
        let deadline = Date().addingTimeInterval(configuration.bootTimeoutSeconds)
        while true {
            do {
                let client = configuration.engine == "qemu"
                    ? try AgentClient(path: directory + "/vmm/qga.sock", vsockPort: nil, events: events)
                    : try AgentClient(path: directory + "/vsock.sock", vsockPort: AgentChannel.vsockPort, events: events)
                try client.waitForAgent(timeoutSeconds: max(1, deadline.timeIntervalSinceNow))
                return client
            } catch {
                // The kvm engine's vsock refuses until the agent listens; a socket not there yet: try again.
                guard Date() < deadline else {
                    let console = (try? String(contentsOfFile: directory + "/console.log", encoding: .utf8)) ?? ""
                    throw RPCError(error.code, "\(error.message); the VM's console ends: \(GuestText.printable(String(console.suffix(600))))")
                }
                usleep(100_000)
            }
        }
    }
}
