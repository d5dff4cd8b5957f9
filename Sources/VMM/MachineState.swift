import CKVM
import Devices
import KVM
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

// What a saved state and a migration stream carry of a machine besides its RAM: Codable records
// written by BinaryRecord, checked where their layout cannot say enough.

struct MachineShape: Equatable {
    var cpus: Int
    var memoryBytes: UInt64
    var usesACPI: Bool
    /// Virtio device types in slot order.
    var virtioTypes: [UInt32]

    init(cpus: Int, memoryBytes: UInt64, usesACPI: Bool, virtioTypes: [UInt32]) {
        self.cpus = cpus
        self.memoryBytes = memoryBytes
        self.usesACPI = usesACPI
        self.virtioTypes = virtioTypes
    }

    /// The shape a spec builds: its virtio devices in the slot order Machine gives them.
    init(_ spec: MachineSpec) {
        var types = [UInt32](repeating: 2, count: spec.disks.count) + [UInt32](repeating: 1, count: spec.nics.count)
        if spec.vsock != nil { types.append(19) }
        if spec.balloon != nil { types.append(5) }
        if spec.entropyDevice { types.append(4) }
        self.init(cpus: spec.cpus, memoryBytes: spec.memoryBytes, usesACPI: spec.acpi, virtioTypes: types)
    }

    /// Why a machine of `self`'s shape cannot take a state saved from `saved`, or nil.
    func mismatch(saved: MachineShape) -> String? {
        if saved.cpus != cpus { return "the state was saved with \(saved.cpus) vCPUs; this VM has \(cpus)" }
        if saved.memoryBytes != memoryBytes { return "the state was saved with \(saved.memoryBytes >> 20) MiB of memory; this VM has \(memoryBytes >> 20) MiB" }
        if saved.usesACPI != usesACPI { return "the state was saved \(saved.usesACPI ? "with" : "without") ACPI; this VM is \(usesACPI ? "with" : "without")" }
        if saved.virtioTypes != virtioTypes {
            return "the state was saved with virtio devices \(Self.names(saved.virtioTypes)); this VM has \(Self.names(virtioTypes))"
        }
        return nil
    }

    static func names(_ types: [UInt32]) -> String {
        let known: [UInt32: String] = [1: "net", 2: "blk", 4: "rng", 5: "balloon", 19: "vsock"]
        return "[" + types.map { known[$0] ?? "type \($0)" }.joined(separator: ", ") + "]"
    }
}

extension MachineSpec {
    /// The spec a saved state or a migration stream carries, from its record, under every
    /// machine rule: a machine no `MachineSpec` could describe is refused before anything is
    /// built from it.
    static func carried(_ record: [UInt8]) throws(StateError) -> MachineSpec {
        do throws(MachineSpecError) {
            return try MachineSpec(decoding: record)
        } catch {
            throw .invalid(field: "machine spec" + (error.field.map { " " + $0.key } ?? ""), reason: error.reason)
        }
    }
}

/// The spec a saved state or a migration stream carries: its record as written (a byte string
/// inside the enclosing record) and what that decodes to under every machine rule. Kept as it
/// came, so a state written again carries the same bytes.
struct CarriedSpec: Codable {
    let record: [UInt8]
    let spec: MachineSpec

    init(spec: MachineSpec, record: [UInt8]) { self.spec = spec; self.record = record }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(record)
    }

    init(from decoder: any Decoder) throws {
        record = try decoder.singleValueContainer().decode([UInt8].self)
        spec = try MachineSpec.carried(record)
    }
}

/// A CPUID entry in a record: function, index, flags, then eax, ebx, ecx and edx, each 32 bits.
extension CPUIDEntry: PackedEntry {
    public static let packedSize = 28

    public func pack(into bytes: inout [UInt8]) {
        for value in [function, index, flags, eax, ebx, ecx, edx] { Self.put(value, into: &bytes) }
    }

    public init(unpacking bytes: UnsafeRawBufferPointer) {
        let word = { (field: Int) in Self.integer(UInt32.self, at: 4 * field, in: bytes) }
        self.init(function: word(0), index: word(1), flags: word(2), eax: word(3), ebx: word(4), ecx: word(5), edx: word(6))
    }
}

/// A KVM structure in a record: its bytes, with the size this host's headers give it, so a host
/// whose headers disagree refuses it instead of misreading it.
struct KVMStruct<Value>: Codable {
    var value: Value

    init(_ value: Value) { self.value = value }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try withUnsafeBytes(of: value) { try container.encode(Array($0)) }
    }

    init(from decoder: any Decoder) throws {
        let bytes = try decoder.singleValueContainer().decode([UInt8].self)
        let field = BinaryRecord.path(decoder.codingPath)
        guard _isPOD(Value.self) else { throw StateError.invalid(field: field, reason: "\(Value.self) is not a plain structure") }
        let size = MemoryLayout<Value>.size
        guard bytes.count == size else {
            throw StateError.invalid(field: field, reason: "\(bytes.count) bytes where this host's \(Value.self) has \(size)")
        }
        let storage = UnsafeMutablePointer<Value>.allocate(capacity: 1)
        defer { storage.deallocate() }
        bytes.withUnsafeBytes { source in
            if let base = source.baseAddress { UnsafeMutableRawPointer(storage).copyMemory(from: base, byteCount: size) }
        }
        value = storage.move()
    }
}

/// A part of the machine whose state KVM holds (each vCPU; the interrupt controllers with the
/// PIT). Like a device's `Snapshottable`, its state is a Codable value captured and applied, but
/// through KVM's calls, which can fail; the machine sequences them (the interrupt controllers
/// before the vCPUs, whose LAPICs they serve), since KVM takes state back only in such an order.
protocol KVMSnapshottable {
    associatedtype Saved: Codable
    func captureState() throws(KVMError) -> Saved
    func applyState(_ saved: Saved) throws(KVMError)
}

/// The in-kernel interrupt controllers (the two PICs and the IOAPIC) and the PIT.
struct InterruptControllerSet: KVMSnapshottable {
    let vm: VirtualMachine

    struct Saved: Codable {
        var chips: [KVMStruct<kvm_irqchip>]
        var timer: KVMStruct<kvm_pit_state2>

        /// Three chips, each in its place.
        func check() throws(StateError) {
            guard chips.count == 3 else {
                throw .invalid(field: "interruptControllers.chips", reason: "\(chips.count), where the machine has 3 (two PICs and the IOAPIC)")
            }
            for (chip, state) in chips.enumerated() where state.value.chip_id != UInt32(chip) {
                throw .invalid(field: "interruptControllers.chips[\(chip)]", reason: "it says it is chip \(state.value.chip_id)")
            }
        }
    }

    func captureState() throws(KVMError) -> Saved {
        let vm = self.vm
        let chips = try (0..<3).map { (chip) throws(KVMError) in KVMStruct(try vm.interruptControllerState(chip: UInt32(chip))) }
        return Saved(chips: chips, timer: KVMStruct(try vm.timerState()))
    }

    func applyState(_ saved: Saved) throws(KVMError) {
        for chip in saved.chips { try vm.setInterruptControllerState(chip.value) }
        try vm.setTimerState(saved.timer.value)
    }
}

/// One vCPU, with what capturing needs of the host (the MSRs KVM saves, whether it has XCRs) and
/// the TSC frequency a restore sets first when it differs from this host's (0: leave it).
struct VCPUComponent: KVMSnapshottable {
    let vcpu: VCPU
    var msrIndices: [UInt32] = []
    var hasExtendedControl = false
    var tscKilohertz: UInt32 = 0

    func captureState() throws(KVMError) -> VCPUSavedState {
        try VCPUSavedState(capturing: vcpu, msrIndices: msrIndices, hasExtendedControl: hasExtendedControl)
    }

    func applyState(_ saved: VCPUSavedState) throws(KVMError) {
        if tscKilohertz != 0, let current = try? vcpu.tscKilohertz(), current != tscKilohertz {
            try vcpu.setTSCKilohertz(tscKilohertz)
        }
        try saved.restore(to: vcpu)
    }
}

/// One vCPU's complete x86 state, in the order KVM takes it back (the anchors document it: the
/// special registers before the LAPIC, whose base they hold; MSRs after the LAPIC, TSC before
/// the TSC deadline; events last, since setting the rest may clear them).
struct VCPUSavedState: Codable {
    struct MSR: Codable, Equatable, PackedEntry {
        var index: UInt32
        var value: UInt64

        static let packedSize = 12
        func pack(into bytes: inout [UInt8]) {
            Self.put(index, into: &bytes)
            Self.put(value, into: &bytes)
        }
        init(index: UInt32, value: UInt64) { self.index = index; self.value = value }
        init(unpacking bytes: UnsafeRawBufferPointer) {
            self.init(index: Self.integer(UInt32.self, at: 0, in: bytes), value: Self.integer(UInt64.self, at: 4, in: bytes))
        }
    }

    var registers: KVMStruct<kvm_regs>
    var specialRegisters: KVMStruct<kvm_sregs>
    var fpu: KVMStruct<kvm_fpu>
    var extendedControl: KVMStruct<kvm_xcrs>?
    var localAPIC: [UInt8]
    @PackedList var msrs: [MSR]
    var debugRegisters: KVMStruct<kvm_debugregs>
    var multiprocessing: KVMStruct<kvm_mp_state>
    var events: KVMStruct<kvm_vcpu_events>

    static let tscMSR: UInt32 = 0x10
    static let tscDeadlineMSR: UInt32 = 0x6e0
    static let localAPICSize = 1024
    static let msrLimit = 4096

    init(capturing vcpu: VCPU, msrIndices: [UInt32], hasExtendedControl: Bool) throws(KVMError) {
        // Events first: reading the rest cannot change them, and they are what a pending
        // exception or interrupt must not lose.
        events = KVMStruct(try vcpu.events())
        multiprocessing = KVMStruct(try vcpu.multiprocessingState())
        registers = KVMStruct(try vcpu.registers())
        specialRegisters = KVMStruct(try vcpu.specialRegisters())
        fpu = KVMStruct(try vcpu.fpu())
        extendedControl = hasExtendedControl ? KVMStruct(try vcpu.extendedControlRegisters()) : nil
        localAPIC = try vcpu.localAPICRegisters()
        debugRegisters = KVMStruct(try vcpu.debugRegisters())
        // KVM stops at the first MSR it cannot read here; skip it and go on with the rest.
        var read: [MSR] = []
        var remaining = msrIndices[...]
        while !remaining.isEmpty {
            let batch = try vcpu.msrs(Array(remaining))
            read += batch.map { MSR(index: $0.index, value: $0.value) }
            remaining = remaining.dropFirst(batch.count + 1)
        }
        msrs = read
    }

    /// A state of zeroes with these MSRs (the fuzz seed's).
    init(zeroedWith msrs: [MSR]) {
        registers = KVMStruct(kvm_regs())
        specialRegisters = KVMStruct(kvm_sregs())
        fpu = KVMStruct(kvm_fpu())
        extendedControl = KVMStruct(kvm_xcrs())
        localAPIC = [UInt8](repeating: 0, count: Self.localAPICSize)
        self.msrs = msrs
        debugRegisters = KVMStruct(kvm_debugregs())
        multiprocessing = KVMStruct(kvm_mp_state())
        events = KVMStruct(kvm_vcpu_events())
    }

    /// What the record's layout cannot say: the LAPIC page's size, how many MSRs, a KVM MP state.
    func check(vcpu index: Int) throws(StateError) {
        let prefix = "vcpus[\(index)]."
        guard localAPIC.count == Self.localAPICSize else {
            throw .invalid(field: prefix + "localAPIC", reason: "\(localAPIC.count) bytes; the register page is \(Self.localAPICSize)")
        }
        guard msrs.count <= Self.msrLimit else { throw .invalid(field: prefix + "msrs", reason: "\(msrs.count), more than \(Self.msrLimit)") }
        guard multiprocessing.value.mp_state <= 8 else {
            throw .invalid(field: prefix + "multiprocessing", reason: "\(multiprocessing.value.mp_state) is not a KVM MP state")
        }
    }

    func restore(to vcpu: VCPU) throws(KVMError) {
        try vcpu.setSpecialRegisters(specialRegisters.value)
        try vcpu.setRegisters(registers.value)
        try vcpu.setFPU(fpu.value)
        if let extendedControl { try vcpu.setExtendedControlRegisters(extendedControl.value) }
        try vcpu.setLocalAPICRegisters(localAPIC)
        let ordered = msrs.filter { $0.index == Self.tscMSR }
            + msrs.filter { $0.index != Self.tscMSR && $0.index != Self.tscDeadlineMSR }
            + msrs.filter { $0.index == Self.tscDeadlineMSR }
        try vcpu.setMSRs(ordered.map { (index: $0.index, value: $0.value) })
        try vcpu.setDebugRegisters(debugRegisters.value)
        try vcpu.setMultiprocessingState(multiprocessing.value)
        try vcpu.setEvents(events.value)
    }
}

/// The CPUID a saved guest saw, checked against what this host's KVM can offer: a restore onto a
/// host without a feature the guest may be using is refused with the features named.
enum CPUIDCompatibility {
    /// (leaf, subleaf, register, bits that are features rather than topology or identification)
    static let featureWords: [(function: UInt32, index: UInt32, register: String, mask: UInt32)] = [
        (0x1, 0, "ecx", 0x7fff_ffff),           // bit 31: hypervisor present, set by Vireo itself
        (0x1, 0, "edx", 0xefff_ffff),           // bit 28: HTT, set by Vireo from the vCPU count
        (0x7, 0, "ebx", 0xffff_ffff),
        (0x7, 0, "ecx", 0xffff_ffff),
        (0x7, 0, "edx", 0xffff_ffff),
        (0xd, 1, "eax", 0xffff_ffff),
        (0x8000_0001, 0, "ecx", 0xffff_ffff),
        (0x8000_0001, 0, "edx", 0xffff_ffff),
    ]

    static func value(_ entries: [CPUIDEntry], _ function: UInt32, _ index: UInt32, _ register: String) -> UInt32 {
        guard let entry = entries.first(where: { $0.function == function && $0.index == index }) else { return 0 }
        switch register {
        case "eax": return entry.eax
        case "ebx": return entry.ebx
        case "ecx": return entry.ecx
        default: return entry.edx
        }
    }

    /// The features `saved` has that `host` lacks, as "CPUID.(leaf,subleaf).register[bit]".
    static func missing(saved: [CPUIDEntry], host: [CPUIDEntry]) -> [String] {
        var missing: [String] = []
        for word in featureWords {
            let lacking = value(saved, word.function, word.index, word.register) & ~value(host, word.function, word.index, word.register) & word.mask
            for bit in 0..<32 where lacking & (1 << bit) != 0 {
                missing.append("CPUID.(0x\(String(word.function, radix: 16)),\(word.index)).\(word.register)[\(bit)]")
            }
        }
        return missing
    }
}

/// Everything but guest RAM: decoded from a file before the machine is built (its shape and
/// CPUID decide how it is built), applied after.
struct SavedMachineState: Codable {
    /// The spec of the machine that was saved.
    var machine: CarriedSpec
    /// KVM's supported CPUID on the saving host, from which each vCPU's was made.
    @PackedList var cpuid: [CPUIDEntry]
    var tscKilohertz: UInt32
    /// kvmclock when saved, and the host's wall clock then: a restore sets kvmclock ahead by the
    /// wall time that passed, so the guest's clock is right and its monotonic time never goes back.
    var clockNanoseconds: UInt64
    var savedAtRealtimeNanoseconds: UInt64
    var interruptControllers: InterruptControllerSet.Saved
    var vcpus: [VCPUSavedState]
    /// Each component's record (`Snapshottable`), in the machine's order: serial, i8042, RTC,
    /// ACPI (when present), then every virtio transport.
    var devices: [[UInt8]]

    static let cpuidLimit = 512
    static let deviceLimit = 128

}

// Outside the declaration, so the memberwise initializer stays.
extension SavedMachineState {
    func encoded() throws(StateError) -> [UInt8] { try BinaryRecord.encode(self) }

    /// The record as a state file's metadata; a state that has no binary form is that file's error.
    func metadata(for path: String) throws(VMMError) -> [UInt8] {
        do throws(StateError) { return try encoded() } catch { throw .savedState(path: path, reason: "cannot be written: \(error)") }
    }

    /// A state from its record, with what the record's layout cannot say checked: the counts
    /// against the machine the state names, each interrupt controller in its place.
    init(decoding bytes: [UInt8]) throws(StateError) {
        self = try BinaryRecord.decode(SavedMachineState.self, from: bytes)
        try Self.check(cpuid: cpuid)
        try interruptControllers.check()
        guard vcpus.count == machine.spec.cpus else {
            throw .invalid(field: "vcpus", reason: "\(vcpus.count) vCPU states for a machine of \(machine.spec.cpus) vCPUs")
        }
        for (index, vcpu) in vcpus.enumerated() { try vcpu.check(vcpu: index) }
        guard devices.count <= Self.deviceLimit else { throw .invalid(field: "devices", reason: "\(devices.count), more than \(Self.deviceLimit)") }
    }

    static func check(cpuid: [CPUIDEntry]) throws(StateError) {
        guard cpuid.count <= cpuidLimit else { throw .invalid(field: "cpuid", reason: "\(cpuid.count) entries, more than \(cpuidLimit)") }
    }
}

public enum SavedStateInspection {
    /// A machine with two vCPUs, 64 MiB and three virtio devices (a disk, a card, the rng).
    static func sampleMachine() -> MachineSpec {
        var spec = MachineSpec(kernel: "/vm/vmlinux")
        spec.cpus = 2
        spec.memoryBytes = 64 << 20
        spec.disks = [MachineSpec.Disk(path: "/vm/disk0.qcow2", format: .qcow2)]
        spec.nics = [MachineSpec.NIC(backend: .tap("vireo-t0"), mac: "52:54:00:12:34:56")]
        spec.entropyDevice = true
        return spec
    }

    /// Whether `bytes` decode as a state file's metadata; never traps, whatever they hold.
    public static func metadataIsValid(_ bytes: [UInt8]) -> Bool {
        (try? SavedMachineState(decoding: bytes)) != nil
    }

    /// A well-formed metadata block (two vCPUs, three virtio devices, zeroed registers), the seed
    /// the fuzz smoke test mutates.
    public static func sampleMetadata() -> [UInt8] {
        var controllers: [kvm_irqchip] = []
        for chip in 0..<3 {
            var state = kvm_irqchip()
            state.chip_id = UInt32(chip)
            controllers.append(state)
        }
        let vcpu = VCPUSavedState(zeroedWith: [VCPUSavedState.MSR(index: 0x10, value: 12345), VCPUSavedState.MSR(index: 0x6e0, value: 0)])
        let state = SavedMachineState(
            machine: CarriedSpec(spec: sampleMachine(), record: (try? sampleMachine().encoded()) ?? []),
            cpuid: [CPUIDEntry(function: 1, index: 0, flags: 0, eax: 0x800f11, ebx: 0, ecx: 0x7ed8320b, edx: 0x178bfbff)],
            tscKilohertz: 2_445_406, clockNanoseconds: 1_000_000, savedAtRealtimeNanoseconds: 1_700_000_000_000_000_000,
            interruptControllers: InterruptControllerSet.Saved(chips: controllers.map { KVMStruct($0) }, timer: KVMStruct(kvm_pit_state2())),
            vcpus: [vcpu, vcpu], devices: [[1, 2, 3], [], [4]])
        return (try? state.encoded()) ?? []
    }
}
