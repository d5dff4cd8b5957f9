import Foundation

/// The shim's settings (docs/containerd.md): a JSON file named by the runtime options'
/// ConfigPath (`ctr run --runtime-config-path`, the CRI runtime's `options.ConfigPath`), else
/// `$VIREO_SHIM_CONFIG`, else /etc/vireo/containerd-shim.json; containerd's environment may
/// override the engine (`VIREO_SHIM_ENGINE`) and the library (`VIREO_HOME`).
public struct ShimConfiguration: Codable, Sendable, Equatable {
    /// kvm (Vireo's VMM, the default) or qemu.
    public var engine = "kvm"
    /// qemu engine: auto, kvm or tcg.
    public var accel = "auto"
    public var kernel = ShimConfiguration.installDirectory + "/bzImage"
    public var initrd = ShimConfiguration.installDirectory + "/agent.cpio.gz"
    public var cpus = 1
    public var memory = "256M"
    /// The Vireo library the sandbox VMs live in; nil: Vireo's default.
    public var library: String?
    /// How long a sandbox VM may take from start to its agent's first answer.
    public var bootTimeoutSeconds = 60.0
    /// Extra kernel command line for the guest.
    public var kernelArguments = ""
    /// A pod's sandbox VM: how many more containers it can take (one spare disk each), and each
    /// one's size (a sparse file: it takes host space only as it is written).
    public var podSlots = 4
    public var podDiskSize = "4G"

    /// `podDiskSize` in bytes (K, M, G, T suffixes; validated at load).
    public var podDiskBytes: UInt64 { Self.bytes(podDiskSize) ?? 4 << 30 }

    static func bytes(_ text: String) -> UInt64? {
        guard let unit = text.last else { return nil }
        let shifts: [Character: UInt64] = ["K": 10, "M": 20, "G": 30, "T": 40]
        if let shift = shifts[unit], let value = UInt64(text.dropLast()), value > 0, value < 1 << (64 - shift) { return value << shift }
        return UInt64(text).flatMap { $0 > 0 ? $0 : nil }
    }

    public static let installDirectory = "/usr/local/lib/vireo/containerd"
    public static let defaultPath = "/etc/vireo/containerd-shim.json"

    public init() {}

    enum CodingKeys: String, CodingKey { case engine, accel, kernel, initrd, cpus, memory, library, bootTimeoutSeconds, kernelArguments, podSlots, podDiskSize }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = ShimConfiguration()
        engine = try container.decodeIfPresent(String.self, forKey: .engine) ?? defaults.engine
        accel = try container.decodeIfPresent(String.self, forKey: .accel) ?? defaults.accel
        kernel = try container.decodeIfPresent(String.self, forKey: .kernel) ?? defaults.kernel
        initrd = try container.decodeIfPresent(String.self, forKey: .initrd) ?? defaults.initrd
        cpus = try container.decodeIfPresent(Int.self, forKey: .cpus) ?? defaults.cpus
        memory = try container.decodeIfPresent(String.self, forKey: .memory) ?? defaults.memory
        library = try container.decodeIfPresent(String.self, forKey: .library)
        bootTimeoutSeconds = try container.decodeIfPresent(Double.self, forKey: .bootTimeoutSeconds) ?? defaults.bootTimeoutSeconds
        kernelArguments = try container.decodeIfPresent(String.self, forKey: .kernelArguments) ?? defaults.kernelArguments
        podSlots = try container.decodeIfPresent(Int.self, forKey: .podSlots) ?? defaults.podSlots
        podDiskSize = try container.decodeIfPresent(String.self, forKey: .podDiskSize) ?? defaults.podDiskSize
    }

    /// The settings for one sandbox: the file, then the environment. An unreadable or invalid
    /// file is an error naming it (a sandbox never starts on settings it did not ask for).
    public static func load(configPath: String?, environment: [String: String]) throws(RPCError) -> ShimConfiguration {
        var configuration = ShimConfiguration()
        let path = configPath.flatMap { $0.isEmpty ? nil : $0 } ?? environment["VIREO_SHIM_CONFIG"].flatMap { $0.isEmpty ? nil : $0 }
        let chosen = path ?? (FileManager.default.fileExists(atPath: defaultPath) ? defaultPath : nil)
        if let chosen {
            guard let data = FileManager.default.contents(atPath: chosen) else { throw RPCError(.invalidArgument, "the shim's settings \(chosen) cannot be read") }
            do { configuration = try JSONDecoder().decode(ShimConfiguration.self, from: data) } catch {
                throw RPCError(.invalidArgument, "the shim's settings \(chosen) are not valid: \(error)")
            }
        }
        if let engine = environment["VIREO_SHIM_ENGINE"], !engine.isEmpty { configuration.engine = engine }
        if let home = environment["VIREO_HOME"], !home.isEmpty { configuration.library = home }
        guard ["kvm", "qemu"].contains(configuration.engine) else {
            throw RPCError(.invalidArgument, "engine '\(configuration.engine)' is not one of kvm, qemu (VIREO_SHIM_ENGINE or \"engine\" in the shim's settings)")
        }
        guard ["auto", "kvm", "tcg"].contains(configuration.accel) else { throw RPCError(.invalidArgument, "accel '\(configuration.accel)' is not one of auto, kvm, tcg") }
        guard (1...64).contains(configuration.cpus) else { throw RPCError(.invalidArgument, "cpus \(configuration.cpus) is not between 1 and 64") }
        guard (0...16).contains(configuration.podSlots) else { throw RPCError(.invalidArgument, "podSlots \(configuration.podSlots) is not between 0 and 16") }
        guard let podDisk = bytes(configuration.podDiskSize), podDisk >= 128 << 20 else {
            throw RPCError(.invalidArgument, "podDiskSize '\(configuration.podDiskSize)' is not a size of 128M or more (K, M, G or T)")
        }
        for (field, file) in [("kernel", configuration.kernel), ("initrd", configuration.initrd)] where !FileManager.default.fileExists(atPath: file) {
            throw RPCError(.invalidArgument, "the guest \(field) \(file) does not exist; run scripts/setup.sh (it builds and installs the container guest) or set \"\(field)\" in the shim's settings")
        }
        return configuration
    }
}
