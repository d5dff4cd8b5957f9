@testable import CLI
import Devices
@testable import Engines
import Library
import MachineSpec
@testable import Server
import Testing
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// The machine's rules are written once (MachineSpec) and every path applies them: these tests
/// hold the boundaries, the one table of names, and — the point of having one rule set — that the
/// library (create, set, attach, migration receive) and the VMM (`vireo-vmm`, `vireo run`) refuse
/// the same values for the same reason.
@Suite struct MachineRulesTests {
    @Test func boundaries() throws {
        try MachineRules.cpus(1)
        try MachineRules.cpus(MachineLimits.maximumCPUs)
        #expect(throws: MachineSpecError(.cpus, "0 is not allowed; use 1 to 254")) { try MachineRules.cpus(0) }
        #expect(throws: MachineSpecError(.cpus, "255 is not allowed; use 1 to 254")) { try MachineRules.cpus(255) }
        #expect(throws: MachineSpecError(.cpus, "9 is more than this host's KVM allows for one VM (at most 8)")) { try MachineRules.cpus(9, hostLimit: 8) }
        try MachineRules.memory(32 << 20)
        #expect(throws: MachineSpecError(.memoryBytes, "31 MiB is below the minimum of 32 MiB")) { try MachineRules.memory(31 << 20) }
        #expect(throws: MachineSpecError(.memoryBytes, "33556480 bytes is not a whole number of 4 KiB pages")) { try MachineRules.memory((32 << 20) + 2048) }
        #expect(throws: MachineSpecError(.memoryBytes, "2 GiB is more than this host's 1 GiB of RAM")) { try MachineRules.memory(2 << 30, hostBytes: 1 << 30) }
        try MachineRules.vsockCID(3)
        try MachineRules.vsockCID(0xffff_fffe)
        #expect(throws: MachineSpecError.self) { try MachineRules.vsockCID(2) }
        #expect(throws: MachineSpecError.self) { try MachineRules.vsockCID(0xffff_ffff) }
        try MachineRules.diskSerial(String(repeating: "s", count: 20), disk: 0)
        #expect(throws: MachineSpecError.self) { try MachineRules.diskSerial(String(repeating: "s", count: 21), disk: 0) }
        #expect(throws: MachineSpecError.self) { try MachineRules.diskSerial("a,b", disk: 0) }
        #expect(throws: MachineSpecError.self) { try MachineRules.diskSerial("tab\there", disk: 0) }
        try MachineRules.virtioDevices(disks: 14, nics: 0, vsock: true, balloon: true, entropy: true)
        #expect(throws: MachineSpecError.self) { try MachineRules.virtioDevices(disks: 15, nics: 0, vsock: true, balloon: true, entropy: true) }
        #expect(try MachineRules.mac("52:54:00:12:34:56", card: 0) == [0x52, 0x54, 0, 0x12, 0x34, 0x56])
        for bad in ["01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:12:34", "52:54:00:12:34:5g", "525400123456"] {
            #expect(throws: MachineSpecError.self, "\(bad)") { try MachineRules.mac(bad, card: 0) }
        }
        let random = MachineRules.randomMAC()
        #expect(random[0] & 1 == 0 && random[0] & 2 == 2)
        try MachineRules.diskChain(path: "a.qcow2", format: .qcow2, backing: [BackingLayer(path: "/b.raw", format: .raw)], disk: 0)
        #expect(throws: MachineSpecError.self) { try MachineRules.diskChain(path: "a.raw", format: .raw, backing: [BackingLayer(path: "/b.raw", format: .raw)], disk: 0) }
        #expect(throws: MachineSpecError.self) {
            try MachineRules.diskChain(path: "a.qcow2", format: .qcow2, backing: [BackingLayer(path: "/b.raw", format: .raw), BackingLayer(path: "/c.raw", format: .raw)], disk: 0)
        }
    }

    /// One table: each field has its own key and flag, a flag finds its field again; the library
    /// names a refusal by the key, which the API shows as it is and the CLI turns into its flag.
    @Test func oneTableOfNames() {
        #expect(Swift.Set(MachineField.allCases.map(\.key)).count == MachineField.allCases.count)
        #expect(Swift.Set(MachineField.allCases.map(\.flag)).count == MachineField.allCases.count)
        for field in MachineField.allCases {
            #expect(MachineField(flag: field.flag) == field)
            // `vireo create --disk SIZE` is the first disk's size, the API's `disk_bytes`.
            if field != .disks { #expect(FieldFlags.flag(for: field.key) == field.flag, "\(field)") }
        }
        #expect(FieldFlags.flag(for: "disk_bytes") == "--disk" && FieldFlags.flag(for: "io_limits") == "--io-limit")
        #expect(FieldFlags.flag(for: "attach_disk") == "--attach-disk" && FieldFlags.flag(for: "FILE") == "FILE")
        #expect(FieldFlags.describe(LibraryError(MachineSpecError(.memoryBytes, "too small"))) == "--memory: too small")
        let refusal = APIProblem(LibraryError(MachineSpecError(.vsockCID, "cid 2 must be a whole number from 3 to 4294967294")))
        #expect(refusal.field == "vsock_cid" && refusal.detail == "vsock_cid: cid 2 must be a whole number from 3 to 4294967294")
    }

    /// The drift this rule set exists to stop: what the library refuses in a definition, the VMM
    /// refuses in its flags, with the same words.
    @Test func libraryAndVMMRefuseAlike() throws {
        func libraryReason(_ change: (inout VMDefinition) -> Void) -> String? {
            var definition = VMDefinition(uuid: "00000000-0000-4000-8000-000000000000", name: "v", osType: OSType.all[0], createdAt: 0)
            definition.engine = .kvm
            definition.kernel = "/boot/vmlinuz"
            definition.disks = []
            change(&definition)
            do { try VMLibrary.validate(definition); return nil } catch {
                guard case let .invalidValue(_, reason) = error else { return "\(error)" }
                return reason
            }
        }
        func vmmReason(_ arguments: [String]) -> String? {
            do {
                guard case let .run(configuration, _) = try VMMArguments.parse(["--kernel", "/boot/vmlinuz"] + arguments) else { return "help" }
                _ = try configuration.validated(maximumVCPUs: 1024)
                return nil
            } catch {
                guard case let .invalidConfiguration(_, reason) = error else { return "\(error)" }
                return reason
            }
        }
        let serial = String(repeating: "x", count: 21)
        let cases: [(String, (inout VMDefinition) -> Void, [String])] = [
            ("no vCPU", { $0.cpus = 0 }, ["--cpus", "0"]),
            ("too many vCPUs", { $0.cpus = 300 }, ["--cpus", "300"]),
            ("too little RAM", { $0.memoryBytes = 16 << 20 }, ["--memory", "16M"]),
            ("a reserved CID", { $0.vsockCID = 2 }, ["--vsock", "/tmp/v.sock,cid=2"]),
            ("a long serial", { $0.disks = [DiskAttachment(path: "d.raw", format: .raw, serial: serial)] }, ["--disk", "/d.raw,serial=\(serial)"]),
            ("a multicast MAC", { $0.networks = [NetworkAttachment(.nat, mac: "01:00:5e:00:00:01")] }, ["--net", "tap:t0,mac=01:00:5e:00:00:01"]),
            ("a raw disk on a chain", { $0.disks = [DiskAttachment(path: "d.raw", format: .raw, backing: [BackingLayer(path: "/b.raw", format: .raw)])] },
             ["--disk", "/d.raw,backing=raw:/b.raw"]),
            ("an unknown reboot policy", { $0.onReboot = "reset" }, ["--on-reboot", "reset"]),
            // The memory-backing rules were the library's alone until they moved into MachineRules.
            ("RAM that is no whole number of huge pages", { $0.memoryBytes = 65 << 20; $0.memoryBacking.hugePages = "2M" },
             ["--memory", "65M", "--memory-backing", "hugepages=2M"]),
            ("KSM on shared pages", { $0.memoryBacking.file = "memfd"; $0.memoryBacking.shared = true; $0.memoryBacking.mergeable = true },
             ["--memory-backing", "memfd,shared", "--ksm"]),
        ]
        for (what, change, arguments) in cases {
            let library = libraryReason(change)
            let vmm = vmmReason(arguments)
            #expect(library != nil && library == vmm?.replacing("/d.raw", with: "d.raw"), "\(what): library '\(library ?? "accepted")', VMM '\(vmm ?? "accepted")'")
        }
    }
}

/// A saved state and a migration stream carry the whole spec they were taken from, read under
/// the same rules: a state file or a peer cannot describe a machine no spec could.
@Suite struct CarriedSpecRulesTests {
    static func carried(_ change: (inout MachineSpec) -> Void) throws -> [UInt8] {
        var spec = SavedStateInspection.sampleMachine()
        change(&spec)
        return try spec.encoded()
    }

    @Test func theCarriedSpecObeysTheMachineRules() throws {
        let spec = try MachineSpec.carried(try Self.carried { _ in })
        #expect(spec == SavedStateInspection.sampleMachine())
        #expect(MachineShape(spec) == MachineShape(cpus: 2, memoryBytes: 64 << 20, usesACPI: true, virtioTypes: [2, 1, 4]))
        let cases: [(String, (inout MachineSpec) -> Void)] = [
            ("no vCPU", { $0.cpus = 0 }), ("255 vCPUs", { $0.cpus = 255 }), ("16 MiB", { $0.memoryBytes = 16 << 20 }),
            ("a partial page", { $0.memoryBytes = (64 << 20) + 1 }),
            ("18 devices", { $0.disks = Array(repeating: MachineSpec.Disk(path: "/d.raw", format: .raw), count: MachineLimits.virtioSlots + 1) }),
            ("a NUL in a disk path", { $0.disks[0].path = "/vm/disk\u{0}.raw" }),
            ("a relative backing image", { $0.disks[0].backing = [BackingLayer(path: "base.qcow2", format: .qcow2)] }),
            ("17 queues on a disk", { $0.disks[0].queues = 17 }), ("no queue on a disk", { $0.disks[0].queues = 0 }),
            ("a multicast MAC", { $0.nics[0].mac = "01:00:5e:00:00:01" }),
            ("stdin as a tap", { $0.nics[0].backend = .tapDescriptor(0) }),
            ("vsock CID 2", { $0.vsock = MachineSpec.Vsock(socketPath: "/vm/v.sock", guestCID: 2) }),
        ]
        for (what, change) in cases {
            let record = try Self.carried(change)
            #expect(throws: StateError.self, "\(what)") { _ = try MachineSpec.carried(record) }
        }
    }

    /// A saved state's metadata names the spec's field that broke a rule.
    @Test func aSavedStateWithAnImpossibleMachineIsRefusedNamingTheField() throws {
        var state = try SavedMachineState(decoding: SavedStateInspection.sampleMetadata())
        #expect(state.machine.spec == SavedStateInspection.sampleMachine())
        var spec = state.machine.spec
        spec.cpus = 0
        state.machine = CarriedSpec(spec: spec, record: try spec.encoded())
        #expect(throws: StateError.invalid(field: "machine spec cpus", reason: "0 is not allowed; use 1 to \(MachineLimits.maximumCPUs)")) {
            _ = try SavedMachineState(decoding: state.encoded())
        }
    }
}

@Suite struct ArgumentEdgeTests {
    @Test func helpOnlyWhereAFlagStands() throws {
        guard case .help = try VMMArguments.parse(["--kernel", "/k", "--help"]) else { Issue.record("--help as a flag"); return }
        guard case let .run(spec, _) = try VMMArguments.parse(["--kernel", "/k", "--cmdline", "--help"]) else { Issue.record("--help as a value"); return }
        #expect(spec.commandLine == "--help")
    }

    /// A disk rule names the VM's disks, in the library and so in the API (not `disk_bytes`).
    @Test func diskRulesNameTheDisks() {
        var definition = VMDefinition(uuid: "00000000-0000-4000-8000-000000000003", name: "d", osType: OSType.all[0], createdAt: 0)
        definition.engine = .kvm
        definition.kernel = "/k"
        definition.disks = [DiskAttachment(path: "d.raw", format: .raw, serial: String(repeating: "s", count: 30))]
        #expect { try VMLibrary.validate(definition) } throws: { error in
            guard case let .invalidValue(field, reason) = error as? LibraryError else { return false }
            return field == "disks" && reason.hasPrefix("disk 0: serial") && APIProblem(error as! LibraryError).field == "disks"
        }
    }
}

/// A running VM whose process does not answer (it is starting or stopping) is a conflict to retry,
/// never a server error: the API's fuzzing raced a stop and got a 500 here.
@Suite struct NotAnsweringTests {
    @Test func aSilentVMIsAConflict() {
        var definition = VMDefinition(uuid: "00000000-0000-4000-8000-000000000004", name: "quiet", osType: OSType.all[0], createdAt: 0)
        definition.engine = .kvm
        let vm = EngineVM(bundle: VMBundle(directory: "/nonexistent/quiet"), definition: definition)
        for code in [ECONNREFUSED, ENOENT] {
            let error = KVMEngine.translate(.unreachable(path: "/nonexistent/quiet/control.sock", errno: code), vm: vm, action: "resume")
            guard case let .wrongState(name, state, action, _) = error else { Issue.record("\(error)"); continue }
            #expect(name == "quiet" && state == "starting or stopping" && action == "resume")
            #expect(APIProblem(error).status == .conflict)
        }
        // Anything else stays the host's failure.
        guard case .engine = KVMEngine.translate(.unreachable(path: "/x", errno: EACCES), vm: vm, action: "resume") else { Issue.record("EACCES"); return }
    }
}
