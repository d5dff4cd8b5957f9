/// The spec's binary form: how the kvm engine hands a VMM its whole machine (an inherited,
/// sealed memfd: `vireo-vmm --spec-fd N`), and the machine a saved state or a migration stream
/// was taken from. Written with StateWriter; read back under every rule in `MachineRules`, since
/// a saved state or a peer's stream is hostile input. The flag form (MachineSpecArguments.swift)
/// is what people type; this one is what programs pass.
extension MachineSpec {
    /// Bumped whenever the layout changes; a reader refuses any other.
    static let encodingVersion: UInt16 = 1
    /// More than any machine's spec needs (17 devices, 16 layers each, 4 KiB paths).
    public static let encodedLimit = 1 << 20
    static let pathLimit = 4096
    static let textLimit = 64 << 10

    public func encoded() -> [UInt8] {
        var writer = StateWriter()
        write(into: &writer)
        return writer.bytes
    }

    public func write(into writer: inout StateWriter) {
        writer.put("machine spec")
        writer.put(Self.encodingVersion)
        writer.put(kernel)
        writer.put(optional: initrd)
        writer.put(commandLine)
        writer.put(UInt32(cpus))
        writer.put(cpuModel)
        writer.put(memoryBytes)
        writer.put(memory.hugePageSize ?? 0)
        writer.put(memory.preallocate)
        writer.put(memory.mergeable)
        writer.put(memory.locked)
        switch memory.file {
        case nil: writer.put(UInt8(0))
        case .memfd: writer.put(UInt8(1))
        case let .path(path): writer.put(UInt8(2)); writer.put(path)
        }
        writer.put(memory.shared)
        writer.put(memory.transparentHugePages)
        writer.put(memory.numaNode ?? -1)
        writer.put(UInt32(disks.count))
        for disk in disks {
            writer.put(disk.path)
            writer.put(disk.format.rawValue)
            writer.put(disk.readOnly)
            writer.put(optional: disk.serial)
            disk.rateLimit.write(into: &writer)
            writer.put(UInt32(disk.backing.count))
            for layer in disk.backing {
                writer.put(layer.path)
                writer.put(layer.format.rawValue)
            }
            writer.put(disk.followsHeader)
        }
        writer.put(UInt32(nics.count))
        for nic in nics {
            switch nic.backend {
            case let .tap(name): writer.put(UInt8(0)); writer.put(name)
            case let .tapDescriptor(fd): writer.put(UInt8(1)); writer.put(fd)
            case let .streamDescriptor(fd): writer.put(UInt8(2)); writer.put(fd)
            }
            writer.put(optional: nic.mac)
            nic.rateLimit.write(into: &writer)
            writer.put(nic.offloads)
        }
        writer.put(vsock != nil)
        if let vsock {
            writer.put(vsock.socketPath)
            writer.put(vsock.guestCID)
        }
        writer.put(balloon != nil)
        if let balloon {
            writer.put(balloon.deflateOnOOM)
            writer.put(balloon.statisticsInterval ?? 0)
        }
        writer.put(entropyDevice)
        writer.put(acpi)
        writer.put(onReboot.rawValue)
        writer.put(optional: generationID)
        writer.put(realTimePriority ?? 0)
        writer.put(console)
    }

    /// A spec from its binary form, refused (naming the field) unless it is whole, alone and
    /// obeys every machine rule.
    public init(decoding bytes: [UInt8]) throws(MachineSpecError) {
        guard bytes.count <= Self.encodedLimit else {
            throw MachineSpecError(argument: "machine spec", "\(bytes.count) bytes, more than the \(Self.encodedLimit) a spec can take")
        }
        var reader = StateReader(bytes)
        do throws(StateError) {
            try self.init(from: &reader)
            guard reader.isAtEnd else { throw StateError.invalid(field: "machine spec", reason: "bytes follow its last field") }
        } catch {
            throw MachineSpecError(argument: "machine spec", error.description)
        }
        try MachineRules.check(self)
    }

    /// Reads a spec written by `write(into:)` inside a larger record (a saved state, a migration
    /// stream's first message). The caller applies `MachineRules.check`.
    public init(from reader: inout StateReader) throws(StateError) {
        try reader.expect("machine spec", "section")
        let version = try reader.get(UInt16.self, "spec version")
        guard version == Self.encodingVersion else {
            throw .invalid(field: "spec version", reason: "\(version) is not the \(Self.encodingVersion) this Vireo reads")
        }
        self.init(kernel: try reader.getString("kernel", limit: Self.pathLimit))
        initrd = try reader.getOptionalString("initrd", limit: Self.pathLimit)
        commandLine = try reader.getString("command line", limit: Self.textLimit)
        cpus = Int(try reader.get(UInt32.self, "vCPU count"))
        cpuModel = try reader.getString("CPU model", limit: Self.textLimit)
        memoryBytes = try reader.get(UInt64.self, "memory size")
        let hugePageSize = try reader.get(UInt64.self, "huge page size")
        memory.hugePageSize = hugePageSize == 0 ? nil : hugePageSize
        memory.preallocate = try reader.getBool("preallocate")
        memory.mergeable = try reader.getBool("KSM")
        memory.locked = try reader.getBool("locked memory")
        switch try reader.get(UInt8.self, "memory file") {
        case 0: memory.file = nil
        case 1: memory.file = .memfd
        case 2: memory.file = .path(try reader.getString("memory file path", limit: Self.pathLimit))
        case let other: throw .invalid(field: "memory file", reason: "kind \(other) is not 0 (none), 1 (memfd) or 2 (path)")
        }
        memory.shared = try reader.getBool("shared memory")
        memory.transparentHugePages = try reader.getBool("transparent huge pages")
        let node = try reader.get(Int32.self, "NUMA node")
        memory.numaNode = node == -1 ? nil : node
        let diskCount = Int(try reader.get(UInt32.self, "disk count"))
        guard diskCount <= MachineLimits.virtioSlots else {
            throw .invalid(field: "disk count", reason: "\(diskCount), more than the \(MachineLimits.virtioSlots) virtio slots")
        }
        for index in 0..<diskCount {
            let field = "disk \(index)"
            let path = try reader.getString(field + " path", limit: Self.pathLimit)
            var disk = Disk(path: path, format: try reader.getFormat(field + " format"))
            disk.readOnly = try reader.getBool(field + " read-only")
            disk.serial = try reader.getOptionalString(field + " serial", limit: 256)
            disk.rateLimit = try RateLimit(from: &reader, field: field)
            let layers = Int(try reader.get(UInt32.self, field + " backing count"))
            guard layers <= MachineLimits.backingLayers else {
                throw .invalid(field: field + " backing count", reason: "\(layers), more than \(MachineLimits.backingLayers)")
            }
            for layer in 0..<layers {
                let layerPath = try reader.getString("\(field) layer \(layer) path", limit: Self.pathLimit)
                disk.backing.append(BackingLayer(path: layerPath, format: try reader.getFormat("\(field) layer \(layer) format")))
            }
            disk.followsHeader = try reader.getBool(field + " follows its header")
            disks.append(disk)
        }
        let nicCount = Int(try reader.get(UInt32.self, "network card count"))
        guard nicCount <= MachineLimits.virtioSlots else {
            throw .invalid(field: "network card count", reason: "\(nicCount), more than the \(MachineLimits.virtioSlots) virtio slots")
        }
        for index in 0..<nicCount {
            let field = "card \(index)"
            let backend: NIC.Backend
            switch try reader.get(UInt8.self, field + " backend") {
            case 0: backend = .tap(try reader.getString(field + " tap", limit: 256))
            case 1: backend = .tapDescriptor(try reader.get(Int32.self, field + " tap descriptor"))
            case 2: backend = .streamDescriptor(try reader.get(Int32.self, field + " stream descriptor"))
            case let other: throw .invalid(field: field + " backend", reason: "kind \(other) is not 0 (tap), 1 (tap-fd) or 2 (stream-fd)")
            }
            var nic = NIC(backend: backend, mac: try reader.getOptionalString(field + " MAC", limit: 256))
            nic.rateLimit = try RateLimit(from: &reader, field: field)
            nic.offloads = try reader.getBool(field + " offloads")
            nics.append(nic)
        }
        if try reader.getBool("vsock") {
            vsock = Vsock(socketPath: try reader.getString("vsock socket", limit: Self.pathLimit), guestCID: try reader.get(UInt64.self, "vsock CID"))
        }
        if try reader.getBool("balloon") {
            let deflate = try reader.getBool("balloon deflate-on-oom")
            let interval = try reader.get(UInt64.self, "balloon statistics interval")
            balloon = Balloon(deflateOnOOM: deflate, statisticsInterval: interval == 0 ? nil : interval)
        }
        entropyDevice = try reader.getBool("rng")
        acpi = try reader.getBool("ACPI")
        let policy = try reader.getString("on reboot", limit: 64)
        guard let parsedPolicy = RebootPolicy(rawValue: policy) else {
            throw .invalid(field: "on reboot", reason: "'\(policy)' is not one of \(MachineLimits.rebootPolicies.joined(separator: ", "))")
        }
        onReboot = parsedPolicy
        generationID = try reader.getOptionalString("generation ID", limit: 256)
        let priority = try reader.get(Int32.self, "real-time priority")
        realTimePriority = priority == 0 ? nil : priority
        console = try reader.getString("console", limit: Self.pathLimit + 16)
    }
}

extension RateLimit {
    func write(into writer: inout StateWriter) {
        for value in [bytesPerSecond, bytesBurst, operationsPerSecond, operationsBurst] { writer.put(value ?? 0) }
    }

    init(from reader: inout StateReader, field: String) throws(StateError) {
        func value(_ name: String) throws(StateError) -> UInt64? {
            let read = try reader.get(UInt64.self, "\(field) \(name)")
            return read == 0 ? nil : read
        }
        self.init(bytesPerSecond: try value("bytes per second"), bytesBurst: try value("bytes burst"),
                  operationsPerSecond: try value("operations per second"), operationsBurst: try value("operations burst"))
    }
}

extension StateWriter {
    /// A string that may be absent: a presence byte, then the string.
    public mutating func put(optional value: String?) {
        put(value != nil)
        if let value { put(value) }
    }
}

extension StateReader {
    public mutating func getOptionalString(_ field: String, limit: Int) throws(StateError) -> String? {
        try getBool(field + " present") ? try getString(field, limit: limit) : nil
    }

    mutating func getFormat(_ field: String) throws(StateError) -> DiskFormat {
        let name = try getString(field, limit: 16)
        guard let format = DiskFormat(rawValue: name) else { throw .invalid(field: field, reason: "'\(name)' is not raw or qcow2") }
        return format
    }
}
