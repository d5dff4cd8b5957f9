import Engines
import Library
import MachineSpec
import Testing
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// A setting travels definition → MachineSpec → its binary form on an inherited descriptor → the
/// VMM's MachineSpec (and, for `vireo run` and a hand-run `vireo-vmm`, flags → MachineSpec).
/// These tests hold that nothing is lost or changed on either way, for every field.
@Suite struct MachineSpecRoundTripTests {
    /// A spec with every field away from its default.
    static var everything: MachineSpec {
        var spec = MachineSpec(kernel: "/vm/vmlinux")
        spec.initrd = "/vm/initrd.img"
        spec.commandLine = "console=ttyS0 root=/dev/vda quiet"
        spec.cpus = 6
        spec.cpuModel = "baseline,+avx2,-rdrand"
        spec.memoryBytes = 3 << 30
        spec.memory.file = .path("/dev/shm/guest-ram")
        spec.memory.shared = true
        spec.memory.preallocate = true
        spec.memory.locked = true
        spec.memory.transparentHugePages = false
        spec.memory.numaNode = 0
        var overlay = MachineSpec.Disk(path: "/vm/disk0.qcow2", format: .qcow2, readOnly: false, serial: "SERIAL-0",
                                       backing: [BackingLayer(path: "/images/base.qcow2", format: .qcow2), BackingLayer(path: "/images/root.raw", format: .raw)])
        overlay.rateLimit = RateLimit(bytesPerSecond: 10 << 20, bytesBurst: 1 << 20, operationsPerSecond: 500, operationsBurst: 50)
        var own = MachineSpec.Disk(path: "/data/mine.qcow2", format: .qcow2, readOnly: true)
        own.followsHeader = true
        own.cache = DiskCache.none
        var device = MachineSpec.Disk(path: "/dev/sdb", format: .raw)
        device.cache = DiskCache.none
        spec.disks = [overlay, MachineSpec.Disk(path: "/vm/scratch.img", format: .raw), own, device]
        var card = MachineSpec.NIC(backend: .tapDescriptor(5), mac: "52:54:00:12:34:56")
        card.offloads = false
        card.rateLimit = RateLimit(bytesPerSecond: 1 << 20, operationsPerSecond: 1000)
        spec.nics = [card, MachineSpec.NIC(backend: .streamDescriptor(6)), MachineSpec.NIC(backend: .tap("vtap0"), mac: "02:00:00:00:00:01")]
        spec.vsock = MachineSpec.Vsock(socketPath: "/vm/vsock.sock", guestCID: 42)
        spec.balloon = MachineSpec.Balloon(deflateOnOOM: true, statisticsInterval: 5)
        spec.entropyDevice = true
        spec.acpi = false
        spec.onReboot = .restart
        spec.generationID = "0123456789abcdef0123456789abcdef"
        spec.realTimePriority = 10
        spec.console = "socket:/vm/console.sock"
        return spec
    }

    @Test func everyFieldSurvivesItsFlags() throws {
        let spec = Self.everything
        let (parsed, others) = try MachineSpec.parse(spec.arguments)
        #expect(parsed == spec, "\(spec.arguments)")
        #expect(others.isEmpty)
        // And the defaults, which the flags leave out.
        let plain = MachineSpec(kernel: "/k")
        #expect(try MachineSpec.parse(plain.arguments).spec == plain)
        var huge = MachineSpec(kernel: "/k")
        huge.memory.hugePageSize = 1 << 30
        huge.memory.mergeable = true
        huge.memoryBytes = 2 << 30
        #expect(try MachineSpec.parse(huge.arguments).spec == huge)
    }

    @Test func everyFieldSurvivesItsBinaryForm() throws {
        var huge = MachineSpec(kernel: "/k")
        huge.memory.hugePageSize = 1 << 30
        huge.memory.mergeable = true
        huge.memoryBytes = 2 << 30
        for spec in [Self.everything, MachineSpec(kernel: "/k"), huge] {
            #expect(try MachineSpec(decoding: spec.encoded()) == spec)
        }
    }

    /// The binary form is hostile input once it has been anywhere: every truncation and any
    /// trailing byte is refused, naming the spec, and nothing traps.
    @Test func aDamagedBinaryFormIsRefused() {
        guard let bytes = try? Self.everything.encoded() else { Issue.record("encoding"); return }
        for length in 0..<bytes.count {
            #expect(throws: MachineSpecError.self, "\(length) of \(bytes.count) bytes") { _ = try MachineSpec(decoding: Array(bytes[0..<length])) }
        }
        #expect(throws: MachineSpecError.self) { _ = try MachineSpec(decoding: bytes + [0]) }
        var zeroCPUs = Self.everything
        zeroCPUs.cpus = 0
        #expect(throws: MachineSpecError(.cpus, "0 is not allowed; use 1 to \(MachineLimits.maximumCPUs)")) { _ = try MachineSpec(decoding: try zeroCPUs.encoded()) }
    }

    /// How `vireo start` hands the VMM its machine: whole, on a descriptor; machine flags beside
    /// it are refused rather than merged.
    @Test func theVMMReadsTheSpecFromItsDescriptor() throws {
        let spec = Self.everything
        let path = "/tmp/vireo-spec-\(getpid())"
        let bytes = try spec.encoded()
        let written = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        #expect(written >= 0)
        _ = bytes.withUnsafeBytes { write(written, $0.baseAddress, $0.count) }
        close(written)
        defer { unlink(path) }
        let fd = open(path, O_RDONLY)
        let arguments = ["--spec-fd", String(fd), "--control", "/vm/control.sock", "--name", "v", "--uuid", "u", "--state-file", "/vm/saved.state", "--restore"]
        guard case let .run(parsed, options) = try VMMArguments.parse(arguments) else { Issue.record("help"); return }
        #expect(parsed == spec)
        #expect(options.controlPath == "/vm/control.sock" && options.stateFile == "/vm/saved.state" && options.restore)
        #expect(fcntl(fd, F_GETFD) < 0, "the VMM closes the spec's descriptor once read")
        let again = open(path, O_RDONLY)
        defer { close(again) }
        let refusal = #expect(throws: VMMError.self) { _ = try VMMArguments.parse(["--spec-fd", String(again), "--cpus", "2"]) }
        #expect(refusal?.description == "--cpus: a machine flag cannot be given with --spec-fd, which carries the whole machine")
    }

    /// `vireo-vmm` run by hand reads the same spec from flags, process flags and all.
    @Test func theVMMReadsTheSpecFromFlags() throws {
        let spec = Self.everything
        let arguments = spec.arguments + ["--control", "/vm/control.sock", "--name", "v", "--uuid", "u", "--state-file", "/vm/saved.state", "--restore"]
        guard case let .run(parsed, options) = try VMMArguments.parse(arguments) else { Issue.record("help"); return }
        #expect(parsed == spec)
        #expect(options.controlPath == "/vm/control.sock" && options.stateFile == "/vm/saved.state" && options.restore)
    }

    /// definition → spec: each setting of a library VM arrives in the spec under its own name,
    /// with paths resolved against the VM's directory and each disk's recorded chain.
    @Test func aDefinitionArrivesWhole() throws {
        var definition = VMDefinition(uuid: "00000000-0000-4000-8000-000000000001", name: "trip", osType: OSType.all[0], createdAt: 0)
        definition.engine = .kvm
        definition.kernel = "vmlinux"
        definition.initrd = "/boot/initrd.img"
        definition.commandLine = "console=ttyS0 quiet"
        definition.cpus = 3
        definition.cpuModel = "baseline"
        definition.memoryBytes = 768 << 20
        definition.disks = [DiskAttachment(path: "disk0.qcow2", format: .qcow2, readOnly: false, serial: "S0",
                                           backing: [BackingLayer(path: "/images/base.qcow2", format: .qcow2)]),
                            DiskAttachment(path: "/data/extra.raw", format: .raw, readOnly: true)]
        definition.networks = [NetworkAttachment(.nat, mac: "52:54:00:aa:bb:cc")]
        definition.vsockCID = 7
        definition.balloon = true
        definition.entropyDevice = true
        definition.acpi = false
        definition.onReboot = "restart"
        definition.generationID = "fedcba9876543210fedcba9876543210"
        definition.memoryBacking = MemoryBackingOptions(hugePages: "2M", preallocate: true, mergeable: false, locked: true)
        definition.memoryBacking.transparentHugePages = false
        definition.memoryBacking.numaNode = 0
        definition.resources.rtPriority = 20
        let bundle = VMBundle(directory: "/library/trip")
        let cards = [PreparedCard(mac: "52:54:00:aa:bb:cc", backend: .tapDescriptor(slot: 0, tap: "vireo-t0"))]

        let spec = try KVMEngine.machineSpec(definition, bundle: bundle, cards: cards)
        let read = try MachineSpec(decoding: try spec.encoded())
        #expect(read == spec)
        guard case let .run(fromFlags, _) = try VMMArguments.parse(spec.arguments) else { Issue.record("help"); return }
        #expect(fromFlags == spec)
        #expect(read.kernel == "/library/trip/vmlinux" && read.initrd == "/boot/initrd.img" && read.commandLine == "console=ttyS0 quiet")
        #expect(read.cpus == 3 && read.cpuModel == "baseline" && read.memoryBytes == 768 << 20)
        #expect(read.disks == [MachineSpec.Disk(path: "/library/trip/disk0.qcow2", format: .qcow2, serial: "S0",
                                                backing: [BackingLayer(path: "/images/base.qcow2", format: .qcow2)]),
                               MachineSpec.Disk(path: "/data/extra.raw", format: .raw, readOnly: true)])
        #expect(read.nics == [MachineSpec.NIC(backend: .tapDescriptor(PreparedNetworking.inherited(0)), mac: "52:54:00:aa:bb:cc")])
        #expect(read.vsock == MachineSpec.Vsock(socketPath: bundle.vsockPath, guestCID: 7))
        #expect(read.balloon == MachineSpec.Balloon(deflateOnOOM: true, statisticsInterval: 5))
        #expect(read.entropyDevice && !read.acpi && read.onReboot == .restart && read.generationID == "fedcba9876543210fedcba9876543210")
        #expect(read.memory.hugePageSize == 2 << 20 && read.memory.preallocate && read.memory.locked && !read.memory.mergeable)
        #expect(!read.memory.transparentHugePages && read.memory.numaNode == 0 && read.realTimePriority == 20)
        #expect(read.console == "file:" + bundle.consoleLogPath)
    }

    /// A definition that breaks a machine rule never reaches a VMM: the engine refuses it.
    @Test func theEngineChecksTheRulesBeforeStart() {
        var definition = VMDefinition(uuid: "00000000-0000-4000-8000-000000000002", name: "bad", osType: OSType.all[0], createdAt: 0)
        definition.engine = .kvm
        definition.kernel = "/k"
        definition.cpus = 0
        #expect(throws: LibraryError.self) { try KVMEngine.machineSpec(definition, bundle: VMBundle(directory: "/library/bad"), cards: []) }
    }
}
