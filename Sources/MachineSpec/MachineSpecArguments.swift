/// The spec's flag form: what `vireo-vmm` and `vireo run` take and what the library's kvm engine
/// passes. Rendering and reading sit side by side so each setting is spelled once; the round trip
/// (`parse(arguments)` gives the same spec back) is a test (MachineSpecTests).
extension MachineSpec {
    /// Flags that set a machine switch (no value).
    public static let switches: Set<String> = ["--rng", "--prealloc", "--ksm", "--lock-memory"]
    /// Flags that take a value; `--disk`, `--net` and `--fs` may repeat.
    public static let valueFlags: Set<String> = ["--kernel", "--initrd", "--cmdline", "--cpus", "--cpu", "--memory", "--console", "--disk", "--net",
                                                 "--vsock", "--fs", "--balloon", "--acpi", "--on-reboot", "--generation-id", "--memory-backing",
                                                 "--rt-priority", "--thp", "--numa-node"]

    /// What each flag means, for `vireo run --help` and `vireo-vmm --help`.
    public static let flagDescriptions: [(flag: String, meaning: String)] = [
        ("--kernel PATH", "the kernel: an ELF vmlinux (64-bit or PVH entry) or a bzImage (required)"),
        ("--initrd PATH", "an initial RAM disk, loaded as high in guest RAM as the kernel allows"),
        ("--cmdline TEXT", "the kernel command line (default console=ttyS0)"),
        ("--cpus N", "vCPUs (default 1)"),
        ("--cpu MODEL", "the CPU the guest sees: host (default) or baseline (x86-64-v2), then ,+FEATURE / ,-FEATURE"),
        ("--memory SIZE", "guest RAM with K, M, G or T (binary units); a bare number is MiB (default 512M)"),
        ("--console C", "the serial console: stdio (default), none, file:PATH or socket:PATH"),
        ("--disk SPEC", "a virtio-blk disk: \(Disk.syntax); repeat for more. format= is what the disk is (never read from its content; .qcow2/.raw names say it too); backing=FORMAT:PATH, once per layer nearest first, is the only chain opened (backing=header follows the image's own header)"),
        ("--net SPEC", "a virtio-net card: \(NIC.syntax)[,offload=on|off][,bps=N[,bps-burst=N]][,pps=N[,pps-burst=N]]; repeat for more"),
        ("--vsock PATH[,cid=N]", "a virtio-vsock device; the host reaches guest port P by connecting to PATH and sending \"CONNECT P\\n\""),
        ("--fs tag=T,socket=PATH", "a virtio-fs shared folder the guest mounts by tag T (mount -t virtiofs T DIR), served by the vhost-user back end (virtiofsd) listening on PATH; needs --memory-backing memfd,shared; repeat for more"),
        ("--balloon OPTIONS", "a virtio-balloon device: on, deflate-on-oom and/or stats=SECONDS"),
        ("--rng", "a virtio-rng device fed from the host's /dev/urandom"),
        ("--acpi on|off", "describe the machine with ACPI tables and an MP table (default), or the MP table and command-line devices only"),
        ("--on-reboot P", "exit (default): a guest reboot ends the run; restart: boots the VM again in this process"),
        ("--generation-id HEX", "the VM generation ID (32 hex digits) the guest's vmgenid device shows; random if absent"),
        ("--memory-backing B", "\(MemoryBacking.backingForms); --prealloc faults RAM in at start; --ksm offers it to KSM; --lock-memory locks it in RAM"),
        ("--thp on|off", "offer anonymous guest RAM to transparent huge pages (default on)"),
        ("--numa-node N", "bind guest RAM to host NUMA node N"),
        ("--rt-priority N", "vCPU threads run SCHED_FIFO at priority N (1-99); all memory is locked"),
    ]

    /// The flags as an aligned list (vireo-vmm's usage, printed as it is).
    public static var flagHelp: String {
        flagDescriptions.map { "  " + $0.flag + String(repeating: " ", count: max(1, 22 - $0.flag.count)) + $0.meaning }.joined(separator: "\n")
    }

    public var arguments: [String] {
        var arguments = ["--kernel", kernel, "--cmdline", commandLine, "--cpus", String(cpus), "--memory", Self.sizeArgument(memoryBytes)]
        if let initrd { arguments += ["--initrd", initrd] }
        if cpuModel != "host" { arguments += ["--cpu", cpuModel] }
        for disk in disks { arguments += ["--disk", disk.argument] }
        for nic in nics { arguments += ["--net", nic.argument] }
        if let vsock { arguments += ["--vsock", "\(vsock.socketPath),cid=\(vsock.guestCID)"] }
        for folder in sharedFolders { arguments += ["--fs", folder.argument] }
        if let balloon { arguments += ["--balloon", balloon.argument] }
        if entropyDevice { arguments.append("--rng") }
        arguments += ["--acpi", acpi ? "on" : "off", "--on-reboot", onReboot.rawValue]
        if let generationID { arguments += ["--generation-id", generationID] }
        if memory.hugePageSize != nil || memory.file != nil { arguments += ["--memory-backing", memory.backingArgument] }
        if memory.preallocate { arguments.append("--prealloc") }
        if memory.mergeable { arguments.append("--ksm") }
        if memory.locked { arguments.append("--lock-memory") }
        if !memory.transparentHugePages { arguments += ["--thp", "off"] }
        if let node = memory.numaNode { arguments += ["--numa-node", String(node)] }
        if let realTimePriority { arguments += ["--rt-priority", String(realTimePriority)] }
        if console != "stdio" { arguments += ["--console", console] }
        return arguments
    }

    /// The command line as (flag, value) pairs in order, a switch's value empty: `--flag value`
    /// and `--flag=value` both read; a flag that is neither kind is refused, naming it.
    public static func flags(_ arguments: [String], valueFlags: Set<String>, switches: Set<String>) throws(MachineSpecError)
        -> [(name: String, value: String)] {
        var pairs: [(name: String, value: String)] = []
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            if switches.contains(argument) {
                pairs.append((argument, ""))
                continue
            }
            var name = argument
            var value: String?
            if let equals = argument.firstIndex(of: "=") {
                name = String(argument[..<equals])
                value = String(argument[argument.index(after: equals)...])
            }
            guard valueFlags.contains(name) else {
                throw MachineSpecError(argument: argument, "unknown argument; expected one of \(valueFlags.union(switches).sorted().joined(separator: ", "))")
            }
            if value == nil {
                guard index < arguments.count else { throw MachineSpecError(argument: name, "missing value") }
                value = arguments[index]
                index += 1
            }
            pairs.append((name, value ?? ""))
        }
        return pairs
    }

    /// A byte count as `--memory` reads it back exactly (a bare number would mean MiB).
    static func sizeArgument(_ bytes: UInt64) -> String {
        bytes % 1024 == 0 ? "\(bytes >> 10)K" : "\(bytes)B"
    }

    /// Reads a spec from flags (`--flag value` or `--flag=value`). Flags that are the caller's
    /// own (`otherFlags` with a value, `otherSwitches` without) are handed back, by name, for it
    /// to read; anything else is refused, naming it.
    public static func parse(_ arguments: [String], otherFlags: Set<String> = [], otherSwitches: Set<String> = []) throws(MachineSpecError)
        -> (spec: MachineSpec, others: [String: String]) {
        var values: [String: String] = [:]
        var others: [String: String] = [:]
        var disks: [Disk] = []
        var nics: [NIC] = []
        var folders: [FileSystem] = []
        for (name, value) in try flags(arguments, valueFlags: valueFlags.union(otherFlags), switches: switches.union(otherSwitches)) {
            if name == "--net" { nics.append(try NIC(parsing: value, index: nics.count)); continue }
            if name == "--fs" { folders.append(try FileSystem(parsing: value)); continue }
            if name == "--disk" { disks.append(try Disk(parsing: value, index: disks.count)); continue }
            guard values[name] == nil, others[name] == nil else { throw MachineSpecError(argument: name, "given more than once") }
            if valueFlags.contains(name) || switches.contains(name) { values[name] = value } else { others[name] = value }
        }
        guard let kernel = values["--kernel"] else { throw MachineSpecError(.kernel, "missing; a kernel image is required") }
        var spec = MachineSpec(kernel: kernel)
        spec.initrd = values["--initrd"]
        spec.disks = disks
        spec.nics = nics
        if !folders.isEmpty {
            try MachineRules.shares(tags: folders.map(\.tag))
            spec.fileSystems = folders
        }
        if let line = values["--cmdline"] { spec.commandLine = line }
        if let text = values["--cpus"] {
            guard let count = Int(text) else { throw MachineSpecError(.cpus, "'\(text)' is not a whole number") }
            spec.cpus = count
        }
        if let model = values["--cpu"] { spec.cpuModel = model }
        if let text = values["--memory"] {
            do { spec.memoryBytes = try Size.parse(text) } catch { throw MachineSpecError(.memoryBytes, error.description) }
        }
        if let text = values["--vsock"] { spec.vsock = try Vsock(parsing: text) }
        if let text = values["--balloon"] { spec.balloon = try Balloon(parsing: text) }
        spec.entropyDevice = values["--rng"] != nil
        if let text = values["--acpi"] { spec.acpi = try MachineRules.acpiSwitch(text) }
        if let text = values["--on-reboot"] {
            try MachineRules.onReboot(text)
            spec.onReboot = RebootPolicy(rawValue: text) ?? .exit
        }
        if let text = values["--generation-id"] {
            _ = try MachineRules.generationID(text)
            spec.generationID = text
        }
        if let text = values["--memory-backing"] { try spec.memory.parseBacking(text) }
        spec.memory.preallocate = values["--prealloc"] != nil
        spec.memory.mergeable = values["--ksm"] != nil
        spec.memory.locked = values["--lock-memory"] != nil
        if let text = values["--thp"] {
            guard text == "on" || text == "off" else { throw MachineSpecError(.transparentHugePages, "'\(text)' is not on or off") }
            spec.memory.transparentHugePages = text == "on"
        }
        if let text = values["--numa-node"] {
            guard let node = Int32(text) else { throw MachineSpecError(.numaNode, "'\(text)' is not a NUMA node number") }
            spec.memory.numaNode = node
        }
        if let text = values["--rt-priority"] {
            guard let priority = Int32(text) else { throw MachineSpecError(.rtPriority, "'\(text)' is not a whole number") }
            try MachineRules.realTimePriority(Int(priority))
            spec.realTimePriority = priority
        }
        if let text = values["--console"] { spec.console = text }
        try MachineRules.memoryBacking(spec.memory, memoryBytes: spec.memoryBytes)
        return (spec, others)
    }
}

extension MachineSpec.Disk {
    static let syntax = "PATH[,readonly][,format=raw|qcow2][,backing=FORMAT:PATH]...[,backing=header][,serial=ID][,cache=writeback|none][,queues=N][,bps=N][,iops=N]"

    /// `PATH,format=F[,backing=F:PATH]...[,readonly][,serial=ID][,bps=...][,iops=...]`.
    public var argument: String {
        var text = path + ",format=" + format.rawValue
        for layer in backing { text += ",backing=\(layer.format.rawValue):\(layer.path)" }
        if followsHeader { text += ",backing=header" }
        if readOnly { text += ",readonly" }
        if let serial { text += ",serial=" + serial }
        if let cache { text += ",cache=" + cache.rawValue }
        if let queues { text += ",queues=\(queues)" }
        return text + rateLimit.options(operations: "iops")
    }

    /// `index`: which disk this is, for refusals.
    public init(parsing text: String, index: Int = 0) throws(MachineSpecError) {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let path = parts.first, !path.isEmpty else {
            throw MachineSpecError(.disks, "'\(text)' has no path; expected \(Self.syntax)")
        }
        var format: DiskFormat?
        var disk = MachineSpec.Disk(path: path, format: .raw)
        for option in parts.dropFirst() {
            if option == "readonly" || option == "ro" { disk.readOnly = true; continue }
            if option.hasPrefix("format=") {
                let name = String(option.dropFirst(7))
                guard let given = DiskFormat(rawValue: name) else {
                    throw MachineSpecError(.disks, "format '\(name)' is not one of raw, qcow2")
                }
                format = given
                continue
            }
            if option == "backing=header" { disk.followsHeader = true; continue }
            if option.hasPrefix("backing=") {
                let value = option.dropFirst(8)
                guard let colon = value.firstIndex(of: ":"), let layerFormat = DiskFormat(rawValue: String(value[..<colon])),
                      value[value.index(after: colon)...].hasPrefix("/") else {
                    throw MachineSpecError(.disks, "backing '\(value)' is not FORMAT:/ABSOLUTE/PATH (raw or qcow2) or header")
                }
                disk.backing.append(BackingLayer(path: String(value[value.index(after: colon)...]), format: layerFormat))
                continue
            }
            if option.hasPrefix("serial=") {
                let serial = String(option.dropFirst(7))
                try MachineRules.diskSerial(serial, disk: index)
                disk.serial = serial
                continue
            }
            if option.hasPrefix("cache=") {
                let name = String(option.dropFirst(6))
                guard let cache = DiskCache(rawValue: name) else {
                    throw MachineSpecError(.disks, "cache '\(name)' is not one of writeback, none")
                }
                disk.cache = cache == .writeback ? nil : cache
                continue
            }
            if option.hasPrefix("queues=") {
                let text = String(option.dropFirst(7))
                guard let count = Int(text) else {
                    throw MachineSpecError(.disks, "disk \(index): queues '\(text.prefix(40))' is not a number; allowed: \(MachineLimits.diskQueues.lowerBound) to \(MachineLimits.diskQueues.upperBound)")
                }
                try MachineRules.diskQueues(count, disk: index)
                disk.queues = count
                continue
            }
            if try disk.rateLimit.parse(option, field: .disks, operations: "iops") { continue }
            throw MachineSpecError(.disks, "unknown option '\(option)' in '\(text)'; allowed: readonly, format=raw|qcow2, backing=FORMAT:PATH, backing=header, serial=ID, cache=writeback|none, queues=N, bps=, bps-burst=, iops=, iops-burst=")
        }
        try disk.rateLimit.validate(field: .disks, operations: "iops")
        guard let format = format ?? DiskFormat.declared(byName: path) else {
            throw MachineSpecError(.disks, "'\(path)' does not say whether it is raw or qcow2; add format=raw or format=qcow2 (a format is never read from a disk's content; a device under /dev is raw)")
        }
        disk.format = format
        if disk.followsHeader, !disk.backing.isEmpty {
            throw MachineSpecError(.disks, "backing=header and backing=FORMAT:PATH contradict each other")
        }
        if format == .raw, disk.followsHeader {
            throw MachineSpecError(.disks, "'\(path)' is raw, and a raw disk rests on nothing")
        }
        try MachineRules.diskChain(path: path, format: format, backing: disk.backing, disk: index)
        self = disk
    }
}

extension MachineSpec.NIC {
    static let syntax = "tap:NAME, tap-fd:N or stream-fd:N, then [,mac=XX:XX:XX:XX:XX:XX][,queues=N]"

    /// `BACKEND[,mac=MAC][,offload=off][,bps=...][,pps=...]`.
    public var argument: String {
        var text = backend.description
        if let mac { text += ",mac=" + mac }
        if !offloads { text += ",offload=off" }
        if let queues { text += ",queues=\(queues)" }
        if let queueDescriptors { text += ",queue-fds=" + queueDescriptors.map(String.init).joined(separator: "+") }
        return text + rateLimit.options(operations: "pps")
    }

    /// `index`: which card this is, for refusals.
    public init(parsing text: String, index: Int = 0) throws(MachineSpecError) {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let first = parts.first ?? ""
        let backend: Backend
        if first.hasPrefix("tap:"), first.count > 4 {
            backend = .tap(String(first.dropFirst(4)))
        } else if first.hasPrefix("tap-fd:") || first.hasPrefix("stream-fd:") {
            let number = first.drop(while: { $0 != ":" }).dropFirst()
            guard let fd = Int32(number) else {
                throw MachineSpecError(.nics, "'\(first)' needs an inherited descriptor number from 3 up")
            }
            backend = first.hasPrefix("tap-fd:") ? .tapDescriptor(fd) : .streamDescriptor(fd)
        } else {
            throw MachineSpecError(.nics, "'\(text)' is not \(Self.syntax)")
        }
        try MachineRules.nicBackend(backend)
        var nic = MachineSpec.NIC(backend: backend)
        for option in parts.dropFirst() {
            if option.hasPrefix("mac=") {
                let value = String(option.dropFirst(4))
                _ = try MachineRules.mac(value, card: index)
                nic.mac = value
                continue
            }
            if option == "offload=on" || option == "offload=off" {
                nic.offloads = option == "offload=on"
                continue
            }
            if option.hasPrefix("queues=") {
                let value = String(option.dropFirst(7))
                guard let count = Int(value) else {
                    throw MachineSpecError(.nics, "card \(index): queues '\(value.prefix(40))' is not a number; allowed: \(MachineLimits.nicQueuePairs.lowerBound) to \(MachineLimits.nicQueuePairs.upperBound)")
                }
                nic.queues = count
                continue
            }
            if option.hasPrefix("queue-fds=") {
                let list = option.dropFirst(10).split(separator: "+", omittingEmptySubsequences: false)
                let descriptors = list.compactMap { Int32($0) }
                guard !list.isEmpty, descriptors.count == list.count else {
                    throw MachineSpecError(.nics, "card \(index): queue-fds '\(option.dropFirst(10).prefix(60))' is not descriptor numbers joined by +")
                }
                nic.queueDescriptors = descriptors
                continue
            }
            if try nic.rateLimit.parse(option, field: .nics, operations: "pps") { continue }
            throw MachineSpecError(.nics, "unknown option '\(option)' in '\(text)'; allowed: mac=XX:XX:XX:XX:XX:XX, offload=on|off, queues=N, queue-fds=N+N, bps=, bps-burst=, pps=, pps-burst=")
        }
        try nic.rateLimit.validate(field: .nics, operations: "pps")
        if let queues = nic.queues { try MachineRules.nicQueues(queues, backend: nic.backend, card: index) }
        if let descriptors = nic.queueDescriptors { try MachineRules.nicQueueDescriptors(descriptors, backend: nic.backend, card: index) }
        self = nic
    }
}

extension MachineSpec.Vsock {
    /// `PATH[,cid=N]`.
    public init(parsing text: String) throws(MachineSpecError) {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let path = parts.first, !path.isEmpty, !path.hasPrefix("cid=") else {
            throw MachineSpecError(.vsockCID, "'\(text)' has no socket path; expected PATH[,cid=N]")
        }
        self.init(socketPath: path)
        for option in parts.dropFirst() {
            guard option.hasPrefix("cid=") else {
                throw MachineSpecError(.vsockCID, "unknown option '\(option)' in '\(text)'; allowed: cid=N")
            }
            guard let cid = UInt64(option.dropFirst(4)) else {
                throw MachineSpecError(.vsockCID, "cid '\(option.dropFirst(4))' is not a whole number")
            }
            try MachineRules.vsockCID(cid)
            guestCID = cid
        }
    }
}

extension MachineSpec.FileSystem {
    /// `tag=T,socket=PATH`.
    public var argument: String { "tag=\(tag),socket=\(socketPath)" }

    public init(parsing text: String) throws(MachineSpecError) {
        var tag: String?, socket: String?
        for option in text.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
            if option.hasPrefix("tag=") { tag = String(option.dropFirst(4)); continue }
            if option.hasPrefix("socket=") { socket = String(option.dropFirst(7)); continue }
            throw MachineSpecError(.shares, "unknown option '\(option.prefix(100))' in --fs '\(text.prefix(200))'; expected tag=T,socket=PATH")
        }
        guard let tag, let socket, !socket.isEmpty else {
            throw MachineSpecError(.shares, "'\(text.prefix(200))' needs both tag=T and socket=PATH")
        }
        try MachineRules.shareTag(tag)
        self.init(tag: tag, socketPath: socket)
    }
}

extension MachineSpec.Balloon {
    /// `on`, `deflate-on-oom` and/or `stats=SECONDS`, comma-separated.
    public var argument: String {
        var options = ["on"]
        if deflateOnOOM { options.append("deflate-on-oom") }
        if let statisticsInterval { options.append("stats=\(statisticsInterval)") }
        return options.joined(separator: ",")
    }

    public init(parsing text: String) throws(MachineSpecError) {
        self.init()
        for option in text.split(separator: ",").map(String.init) {
            if option == "on" { continue }
            if option == "deflate-on-oom" { deflateOnOOM = true; continue }
            if option.hasPrefix("stats=") {
                guard let seconds = UInt64(option.dropFirst(6)) else {
                    throw MachineSpecError(.balloon, "stats interval '\(option.dropFirst(6))' is not a whole number of seconds")
                }
                try MachineRules.balloonStatisticsInterval(seconds)
                statisticsInterval = seconds
                continue
            }
            throw MachineSpecError(.balloon, "unknown option '\(option)'; allowed: on, deflate-on-oom, stats=SECONDS")
        }
    }
}

extension RateLimit {
    /// `,bps=N[,bps-burst=N][,OPS=N[,OPS-burst=N]]` for what is set.
    func options(operations: String) -> String {
        var text = ""
        if let bytesPerSecond { text += ",bps=\(bytesPerSecond)" }
        if let bytesBurst { text += ",bps-burst=\(bytesBurst)" }
        if let operationsPerSecond { text += ",\(operations)=\(operationsPerSecond)" }
        if let operationsBurst { text += ",\(operations)-burst=\(operationsBurst)" }
        return text
    }

    /// Reads one `bps=`, `bps-burst=` (bytes, with K/M/G) or `<operations>=`, `<operations>-burst=`
    /// (a count) option; false if `option` is none of them.
    mutating func parse(_ option: String, field: MachineField, operations: String) throws(MachineSpecError) -> Bool {
        guard let equals = option.firstIndex(of: "=") else { return false }
        let key = String(option[..<equals])
        let value = String(option[option.index(after: equals)...])
        switch key {
        case "bps", "bps-burst":
            // Byte counts: a bare number is bytes here (unlike --memory).
            let bytes: UInt64
            if let plain = UInt64(value), plain > 0 {
                bytes = plain
            } else {
                do { bytes = try Size.parse(value) } catch { throw MachineSpecError(field, "\(key): \(error.description)") }
            }
            if key == "bps" { bytesPerSecond = bytes } else { bytesBurst = bytes }
        case operations, operations + "-burst":
            guard let count = UInt64(value), count > 0 else {
                throw MachineSpecError(field, "\(key) '\(value)' is not a positive whole number")
            }
            if key == operations { operationsPerSecond = count } else { operationsBurst = count }
        default:
            return false
        }
        return true
    }

    /// A burst without its rate means nothing; called once every option is read.
    public func validate(field: MachineField, operations: String) throws(MachineSpecError) {
        if bytesBurst != nil && bytesPerSecond == nil {
            throw MachineSpecError(field, "bps-burst needs bps (the rate the burst refills at)")
        }
        if operationsBurst != nil && operationsPerSecond == nil {
            throw MachineSpecError(field, "\(operations)-burst needs \(operations)")
        }
    }
}
