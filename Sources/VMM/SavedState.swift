import CKVM
import CZlib
import Devices
import DiskImage
import GuestMemory
import KVM
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// The saved-state file (docs/snapshots.md):
///
///     "VIREOSAV"  u32 version  u32 flags  u64 metadata length  u64 memory offset  u64 memory length
///     metadata (StateWriter: the machine's shape, CPUID, clocks, interrupt controllers, vCPUs, devices)
///     zero padding to the memory offset (page-aligned)
///     guest RAM, region after region
///     u32 CRC-32 of everything before it   u32 0   "VIREOEND"
///
/// A state file is hostile input: the header's numbers are checked against each other and the
/// file's size, the checksum before anything reaches KVM, every field as it is decoded.
enum SavedStateFile {
    static let magic = Array("VIREOSAV".utf8)
    static let trailerMagic = Array("VIREOEND".utf8)
    /// Bumped whenever the layout changes; a newer file is refused with the versions named.
    static let version: UInt32 = 2
    static let headerSize = 40
    static let trailerSize = 16
    static let metadataLimit = 64 << 20
    /// The most room a live snapshot's file keeps between the metadata and RAM.
    static let metadataRoomLimit = 16 << 20
    static let pageSize = 4096
    /// lseek's SEEK_DATA and SEEK_HOLE (Linux), which Swift's Glibc module leaves out (they need
    /// _GNU_SOURCE). A file system without them answers as if the file had no holes.
    static let seekData: Int32 = 3
    static let seekHole: Int32 = 4

    struct Header {
        var metadataLength: UInt64
        var memoryOffset: UInt64
        var memoryLength: UInt64
    }
}

/// What must match between a saved machine and the machine built to restore it. Saved states
/// and migration streams carry the whole `MachineSpec` they were taken from; this is the part of
/// it a restore or an arrival depends on, read off that spec and off the machine built here.
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

/// One vCPU's complete x86 state, in the order KVM takes it back (the anchors document it: the
/// special registers before the LAPIC, whose base they hold; MSRs after the LAPIC, TSC before
/// the TSC deadline; events last, since setting the rest may clear them).
struct VCPUSavedState: Codable {
    struct MSR: Codable, Equatable {
        var index: UInt32
        var value: UInt64
    }

    var registers: KVMStruct<kvm_regs>
    var specialRegisters: KVMStruct<kvm_sregs>
    var fpu: KVMStruct<kvm_fpu>
    var extendedControl: KVMStruct<kvm_xcrs>?
    var localAPIC: [UInt8]
    var msrs: [MSR]
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
    /// The spec of the machine that was saved: its binary form as written, and what it decodes
    /// to (under every machine rule) once read.
    var machineRecord: [UInt8]
    var machine: MachineSpec
    /// KVM's supported CPUID on the saving host, from which each vCPU's was made.
    var cpuid: [CPUIDEntry]
    var tscKilohertz: UInt32
    /// kvmclock when saved, and the host's wall clock then: a restore sets kvmclock ahead by the
    /// wall time that passed, so the guest's clock is right and its monotonic time never goes back.
    var clockNanoseconds: UInt64
    var savedAtRealtimeNanoseconds: UInt64
    var interruptControllers: [KVMStruct<kvm_irqchip>]
    var timer: KVMStruct<kvm_pit_state2>
    var vcpus: [VCPUSavedState]
    /// Each component's record (`Snapshottable`), in the machine's order: serial, i8042, RTC,
    /// ACPI (when present), then every virtio transport.
    var devices: [[UInt8]]

    static let cpuidLimit = 512
    static let deviceLimit = 128

    /// Everything but `machine`, which is its record decoded.
    enum CodingKeys: String, CodingKey {
        case machineRecord, cpuid, tscKilohertz, clockNanoseconds, savedAtRealtimeNanoseconds, interruptControllers, timer, vcpus, devices
    }

    init(machine: MachineSpec, machineRecord: [UInt8], cpuid: [CPUIDEntry], tscKilohertz: UInt32, clockNanoseconds: UInt64, savedAtRealtimeNanoseconds: UInt64,
         interruptControllers: [kvm_irqchip], timer: kvm_pit_state2, vcpus: [VCPUSavedState], devices: [[UInt8]]) {
        self.machine = machine
        self.machineRecord = machineRecord
        self.cpuid = cpuid
        self.tscKilohertz = tscKilohertz
        self.clockNanoseconds = clockNanoseconds
        self.savedAtRealtimeNanoseconds = savedAtRealtimeNanoseconds
        self.interruptControllers = interruptControllers.map { KVMStruct($0) }
        self.timer = KVMStruct(timer)
        self.vcpus = vcpus
        self.devices = devices
    }

    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        machineRecord = try container.decode([UInt8].self, forKey: .machineRecord)
        machine = try MachineSpec.carried(machineRecord)
        cpuid = try container.decode([CPUIDEntry].self, forKey: .cpuid)
        tscKilohertz = try container.decode(UInt32.self, forKey: .tscKilohertz)
        clockNanoseconds = try container.decode(UInt64.self, forKey: .clockNanoseconds)
        savedAtRealtimeNanoseconds = try container.decode(UInt64.self, forKey: .savedAtRealtimeNanoseconds)
        interruptControllers = try container.decode([KVMStruct<kvm_irqchip>].self, forKey: .interruptControllers)
        timer = try container.decode(KVMStruct<kvm_pit_state2>.self, forKey: .timer)
        vcpus = try container.decode([VCPUSavedState].self, forKey: .vcpus)
        devices = try container.decode([[UInt8]].self, forKey: .devices)
    }

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
        guard interruptControllers.count == 3 else {
            throw .invalid(field: "interruptControllers", reason: "\(interruptControllers.count), where the machine has 3 (two PICs and the IOAPIC)")
        }
        for (chip, state) in interruptControllers.enumerated() where state.value.chip_id != UInt32(chip) {
            throw .invalid(field: "interruptControllers[\(chip)]", reason: "it says it is chip \(state.value.chip_id)")
        }
        guard vcpus.count == machine.cpus else {
            throw .invalid(field: "vcpus", reason: "\(vcpus.count) vCPU states for a machine of \(machine.cpus) vCPUs")
        }
        for (index, vcpu) in vcpus.enumerated() { try vcpu.check(vcpu: index) }
        guard devices.count <= Self.deviceLimit else { throw .invalid(field: "devices", reason: "\(devices.count), more than \(Self.deviceLimit)") }
    }

    static func check(cpuid: [CPUIDEntry]) throws(StateError) {
        guard cpuid.count <= cpuidLimit else { throw .invalid(field: "cpuid", reason: "\(cpuid.count) entries, more than \(cpuidLimit)") }
    }
}

// MARK: reading and writing the file

extension SavedStateFile {
    /// Writes the state beside `path` and renames it into place only once it is complete and on
    /// disk, so an earlier state at `path` is never half-overwritten.
    static func write(metadata: [UInt8], memory: GuestMemory, to path: String) throws(VMMError) {
        let temporary = path + ".partial"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .host(operation: "create \(temporary)", errno: errno) }
        var completed = false
        defer {
            close(fd)
            if !completed { unlink(temporary) }
        }
        let memoryOffset = UInt64((headerSize + metadata.count + pageSize - 1) / pageSize * pageSize)
        var header = StateWriter()
        header.put(UInt64(0))   // room for the magic, written below
        header.put(version)
        header.put(UInt32(0))
        header.put(UInt64(metadata.count))
        header.put(memoryOffset)
        header.put(memory.totalSize)
        var front = magic + header.bytes.dropFirst(8) + metadata
        front += [UInt8](repeating: 0, count: Int(memoryOffset) - front.count)
        var crc = front.withUnsafeBytes { vireo_crc32(0, $0.baseAddress, $0.count) }
        try writeAll(fd, front, path: temporary)
        // RAM the guest never wrote stays a hole in the file (read back as zeros); the checksum
        // covers it all the same. Pages that were never touched are known from the page map
        // without reading them (reading would fault each one in).
        let pages = PageMap()
        var offset = off_t(memoryOffset)
        for region in memory.regions {
            var done = 0
            while done < Int(region.size) {
                let length = min(chunkSize, Int(region.size) - done)
                let chunk = region.host + done
                if pages?.neverTouched(chunk, length: length) == true || vireo_is_zero(chunk, length) != 0 {
                    crc = vireo_crc32_zeros(crc, UInt64(length))
                } else {
                    crc = vireo_crc32(crc, chunk, length)
                    let failure = writeAllReportingErrno(fd, UnsafeRawBufferPointer(start: chunk, count: length), at: offset)
                    if failure != 0 { throw .host(operation: "write \(temporary)", errno: failure) }
                }
                done += length
                offset += off_t(length)
            }
        }
        guard ftruncate(fd, offset) == 0 else { throw .host(operation: "extend \(temporary)", errno: errno) }
        var trailer = StateWriter()
        trailer.put(UInt32(truncatingIfNeeded: crc))
        trailer.put(UInt32(0))
        let failure = (trailer.bytes + trailerMagic).withUnsafeBytes { writeAllReportingErrno(fd, $0, at: offset) }
        if failure != 0 { throw .host(operation: "write \(temporary)", errno: failure) }
        guard fsync(fd) == 0 else { throw .host(operation: "fsync \(temporary)", errno: errno) }
        guard rename(temporary, path) == 0 else { throw .host(operation: "rename \(temporary) to \(path)", errno: errno) }
        completed = true
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8], path: String) throws(VMMError) {
        let failure = bytes.withUnsafeBytes { writeAllReportingErrno(fd, $0) }
        if failure != 0 { throw .host(operation: "write \(path)", errno: failure) }
    }

    private static func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, path: String) throws(VMMError) {
        let failure = writeAllReportingErrno(fd, buffer)
        if failure != 0 { throw .host(operation: "write \(path)", errno: failure) }
    }

    /// 0, or the errno of the write that failed.
    private static func writeAllReportingErrno(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) -> Int32 {
        var offset = 0
        while offset < buffer.count {
            let written = Glibc.write(fd, buffer.baseAddress.map { $0 + offset }, buffer.count - offset)
            if written < 0 {
                if errno == EINTR { continue }
                return errno
            }
            offset += written
        }
        return 0
    }

    /// The same at a file offset.
    private static func writeAllReportingErrno(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, at start: off_t) -> Int32 {
        var offset = 0
        while offset < buffer.count {
            let written = pwrite(fd, buffer.baseAddress.map { $0 + offset }, buffer.count - offset, start + off_t(offset))
            if written < 0 {
                if errno == EINTR { continue }
                return errno
            }
            offset += written
        }
        return 0
    }

    /// The unit in which RAM is checked for zeros (and left out of the file).
    static let chunkSize = 64 << 10

    /// An open state file whose header has been checked against its size; the metadata is read,
    /// RAM is not yet.
    struct Opened: ~Copyable {
        let fd: Int32
        let path: String
        let header: Header
        let metadata: [UInt8]

        deinit { close(fd) }
    }

    static func openFile(_ path: String) throws(VMMError) -> Opened {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .host(operation: "open saved state \(path)", errno: errno) }
        return try read(descriptor: fd, path: path)
    }

    /// Checks the header of the state file open on `fd` (which it then owns) against its size
    /// and reads the metadata; RAM is read later.
    static func read(descriptor fd: Int32, path: String) throws(VMMError) -> Opened {
        func refuse(_ reason: String) -> VMMError {
            close(fd)
            return .savedState(path: path, reason: reason)
        }
        var status = stat()
        guard fstat(fd, &status) == 0 else { let code = errno; close(fd); throw .host(operation: "stat \(path)", errno: code) }
        let fileSize = UInt64(status.st_size)
        var front = [UInt8](repeating: 0, count: headerSize)
        guard (front.withUnsafeMutableBytes { pread(fd, $0.baseAddress, headerSize, 0) }) == headerSize else {
            throw refuse("shorter than its \(headerSize)-byte header (\(fileSize) bytes)")
        }
        guard Array(front[0..<8]) == magic else { throw refuse("not a Vireo saved state (no VIREOSAV magic)") }
        var reader = StateReader(Array(front[8...]))
        let header: Header
        do throws(StateError) {
            let version = try reader.get(UInt32.self, "version")
            guard version <= Self.version else {
                throw StateError.invalid(field: "version", reason: "the state is format \(version), newer than this Vireo reads (\(Self.version)); restore it with the Vireo that saved it")
            }
            guard version == Self.version else { throw StateError.invalid(field: "version", reason: "format \(version) is not one this Vireo reads (\(Self.version))") }
            let flags = try reader.get(UInt32.self, "flags")
            guard flags == 0 else { throw StateError.invalid(field: "flags", reason: "0x\(String(flags, radix: 16)) are flags this Vireo does not know") }
            header = Header(metadataLength: try reader.get(UInt64.self, "metadata length"),
                            memoryOffset: try reader.get(UInt64.self, "memory offset"),
                            memoryLength: try reader.get(UInt64.self, "memory length"))
        } catch {
            throw refuse(error.description)
        }
        guard header.metadataLength <= UInt64(metadataLimit) else { throw refuse("metadata of \(header.metadataLength) bytes, more than \(metadataLimit)") }
        // RAM follows the metadata within a page, or within the room a live snapshot keeps for it.
        guard header.memoryOffset % UInt64(pageSize) == 0, header.memoryOffset >= UInt64(headerSize) + header.metadataLength,
              header.memoryOffset - (UInt64(headerSize) + header.metadataLength) < UInt64(metadataRoomLimit) else {
            throw refuse("memory offset \(header.memoryOffset) does not follow the metadata")
        }
        let (end, overflow) = header.memoryOffset.addingReportingOverflow(header.memoryLength)
        guard !overflow, end <= UInt64.max - UInt64(trailerSize), end + UInt64(trailerSize) == fileSize else {
            throw refuse("\(fileSize) bytes, but the header describes \(overflow ? "more than can exist" : String(end &+ UInt64(trailerSize))) (truncated or extended)")
        }
        var metadata = [UInt8](repeating: 0, count: Int(header.metadataLength))
        guard (metadata.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(headerSize)) }) == metadata.count else {
            throw refuse("metadata could not be read")
        }
        return Opened(fd: fd, path: path, header: header, metadata: metadata)
    }
}

/// This process's /proc/self/pagemap: which pages of an anonymous mapping were ever touched.
/// A page neither present nor swapped out reads as zeros without having to be faulted in.
final class PageMap {
    private let fd: Int32
    private let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    init?() {
        fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
    }

    deinit { close(fd) }

    /// True only when the page map says so for every page of the range; any doubt says false.
    func neverTouched(_ address: UnsafeMutableRawPointer, length: Int) -> Bool {
        let first = Int(bitPattern: address) / pageSize
        let count = (length + pageSize - 1) / pageSize
        var entries = [UInt64](repeating: 0, count: count)
        let wanted = count * 8
        let read = entries.withUnsafeMutableBytes { pread(fd, $0.baseAddress, wanted, off_t(first) * 8) }
        guard read == wanted else { return false }
        // Bit 63: present in RAM; bit 62: swapped out.
        return entries.allSatisfy { $0 & (3 << 62) == 0 }
    }
}

extension SavedStateFile.Opened {
    /// Reads guest RAM into `memory` and checks the whole file's CRC-32; nothing from the file may
    /// reach KVM before this returns.
    func readMemoryAndVerify(into memory: GuestMemory) throws(VMMError) {
        guard header.memoryLength == memory.totalSize else {
            throw .savedState(path: path, reason: "it holds \(header.memoryLength >> 20) MiB of memory; this VM has \(memory.totalSize >> 20) MiB")
        }
        var front = [UInt8](repeating: 0, count: Int(header.memoryOffset))
        guard (front.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }) == front.count else {
            throw .savedState(path: path, reason: "its header could not be read again")
        }
        var crc = front.withUnsafeBytes { vireo_crc32(0, $0.baseAddress, $0.count) }
        var offset = off_t(header.memoryOffset)
        for region in memory.regions {
            let end = offset + off_t(region.size)
            var done = 0
            while done < Int(region.size) {
                // Holes (RAM the guest never wrote) are zeros: the fresh guest RAM already is.
                let data = lseek(fd, offset, SavedStateFile.seekData)
                let dataStart = data < 0 || data > end ? end : data
                if dataStart > offset {
                    crc = vireo_crc32_zeros(crc, UInt64(dataStart - offset))
                    done += Int(dataStart - offset)
                    offset = dataStart
                    continue
                }
                let hole = lseek(fd, offset, SavedStateFile.seekHole)
                let dataEnd = hole < 0 || hole > end ? end : max(hole, offset + 1)
                let want = min(Int(dataEnd - offset), 64 << 20)
                let count = pread(fd, region.host + done, want, offset)
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { throw .savedState(path: path, reason: "memory could not be read at offset \(offset)") }
                crc = vireo_crc32(crc, region.host + done, count)
                done += count
                offset += off_t(count)
            }
        }
        var trailer = [UInt8](repeating: 0, count: SavedStateFile.trailerSize)
        guard (trailer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, offset) }) == trailer.count,
              Array(trailer[8...]) == SavedStateFile.trailerMagic else {
            throw .savedState(path: path, reason: "no VIREOEND trailer after the memory (truncated?)")
        }
        let recorded = UInt32(trailer[0]) | UInt32(trailer[1]) << 8 | UInt32(trailer[2]) << 16 | UInt32(trailer[3]) << 24
        guard recorded == UInt32(truncatingIfNeeded: crc) else {
            throw .savedState(path: path, reason: "checksum mismatch (recorded 0x\(String(recorded, radix: 16)), computed 0x\(String(UInt32(truncatingIfNeeded: crc), radix: 16))): the file is damaged")
        }
    }
}

// MARK: the machine's side

extension Machine {
    var shape: MachineShape {
        MachineShape(cpus: vcpus.count, memoryBytes: boot.memoryBytes, usesACPI: acpiRegisters != nil,
                     virtioTypes: virtioTransports.map { $0.device.deviceType })
    }

    /// Port devices in the order their states are saved; virtio transports follow.
    /// The components with work of their own, stopped before a capture and let go after.
    var pausableComponents: [any Pausable] { virtioTransports }

    func quiesceComponents() { for component in pausableComponents { component.quiesce() } }

    func resumeComponents() { for component in pausableComponents { component.resumeWork() } }

    private var portDevices: [any Snapshottable] {
        [serial, keyboardController, rtc] + (acpiRegisters.map { [$0] } ?? [])
    }

    /// What capturing can fail on: KVM refusing to give a state, or a component whose state has
    /// no binary form (a programming error, reported rather than trapped on).
    enum CaptureError: Error, CustomStringConvertible {
        case kvm(KVMError)
        case state(String)

        var description: String {
            switch self {
            case let .kvm(error): return error.description
            case let .state(reason): return "a component's state cannot be written: \(reason)"
            }
        }

        var vmmError: VMMError {
            switch self {
            case let .kvm(error): return .kvm(error)
            case .state: return .host(operation: description, errno: EINVAL)
            }
        }
    }

    /// Everything but RAM, with every vCPU parked and every transport quiesced: KVM's state,
    /// then each component's record, in the machine's order.
    func captureState() throws(CaptureError) -> SavedMachineState {
        var devices: [[UInt8]] = []
        let components: [any Snapshottable] = portDevices + virtioTransports
        for (index, component) in components.enumerated() {
            do throws(StateError) {
                devices.append(try component.savedRecord())
            } catch {
                throw .state("device \(index): \(error)")
            }
        }
        do throws(KVMError) {
            let msrIndices = try kvm.savedMSRIndices()
            let hasExtendedControl = kvm.extensionValue(VIREO_KVM_CAP_XCRS) > 0
            let vm = self.vm
            let interruptControllers = try (0..<3).map { (chip) throws(KVMError) in try vm.interruptControllerState(chip: UInt32(chip)) }
            let timer = try vm.timerState()
            var vcpuStates: [VCPUSavedState] = []
            for vcpu in vcpus { vcpuStates.append(try VCPUSavedState(capturing: vcpu, msrIndices: msrIndices, hasExtendedControl: hasExtendedControl)) }
            let tscKilohertz = kvm.extensionValue(VIREO_KVM_CAP_GET_TSC_KHZ) > 0 ? (try? vcpus[0].tscKilohertz()) ?? 0 : 0
            var realtime = timespec()
            clock_gettime(CLOCK_REALTIME, &realtime)
            return SavedMachineState(
                machine: spec, machineRecord: specRecord, cpuid: cpuidBasis, tscKilohertz: tscKilohertz, clockNanoseconds: try vm.clock().clock,
                savedAtRealtimeNanoseconds: UInt64(realtime.tv_sec) * 1_000_000_000 + UInt64(realtime.tv_nsec),
                interruptControllers: interruptControllers, timer: timer, vcpus: vcpuStates, devices: devices)
        } catch {
            throw .kvm(error)
        }
    }

    /// Applies a saved state to this freshly built machine, before any vCPU runs: RAM (checked
    /// against the file's checksum first), the interrupt controllers and PIT, each vCPU, each
    /// device, and last kvmclock, set ahead by the wall time the VM spent saved.
    func restore(_ saved: SavedMachineState, memoryFrom file: borrowing SavedStateFile.Opened) throws(VMMError) {
        if let mismatch = shape.mismatch(saved: MachineShape(saved.machine)) { throw .savedState(path: file.path, reason: mismatch) }
        try file.readMemoryAndVerify(into: memory)
        do throws(StateApplicationError) {
            try applyState(saved)
        } catch {
            switch error {
            case let .state(reason): throw .savedState(path: file.path, reason: reason)
            case let .other(error): throw error
            }
        }
    }

    enum StateApplicationError: Error {
        /// The state itself is at fault (KVM or a device refused it).
        case state(String)
        case other(VMMError)
    }

    /// Everything but RAM, which is in place: the interrupt controllers and PIT, each vCPU, each
    /// device, and last kvmclock, set ahead by the wall time since the state was captured.
    func applyState(_ saved: SavedMachineState) throws(StateApplicationError) {
        let expectedDevices = portDevices.count + virtioTransports.count
        guard saved.devices.count == expectedDevices else {
            throw .state("\(saved.devices.count) device states where this machine has \(expectedDevices) devices")
        }
        do throws(KVMError) {
            for chip in saved.interruptControllers { try vm.setInterruptControllerState(chip.value) }
            try vm.setTimerState(saved.timer.value)
            for (index, vcpu) in vcpus.enumerated() {
                if saved.tscKilohertz != 0, kvm.extensionValue(VIREO_KVM_CAP_TSC_CONTROL) > 0,
                   let current = try? vcpu.tscKilohertz(), current != saved.tscKilohertz {
                    try vcpu.setTSCKilohertz(saved.tscKilohertz)
                }
                try saved.vcpus[index].restore(to: vcpu)
            }
        } catch {
            throw .state("KVM refused the saved CPU state: \(error)")
        }
        let components: [any Snapshottable] = portDevices + virtioTransports
        for (index, component) in components.enumerated() {
            do throws(StateError) {
                try component.restore(record: saved.devices[index])
            } catch {
                throw .state("device \(index): \(error)")
            }
        }
        // A restored snapshot is a new generation of the VM (the library gives it a new ID): the
        // guest's vmgenid device shows it and is notified, so the guest reseeds its RNG and tells
        // its applications they may have been duplicated.
        if case let .acpi(_, generationID) = boot.platform, let acpiRegisters,
           (try? memory.readBytes(count: generationID.count, at: MachineLayout.generationIDAddress)) != generationID {
            do throws(GuestMemoryError) {
                try memory.write(generationID, at: MachineLayout.generationIDAddress)
            } catch {
                throw .other(.memory(error))
            }
            acpiRegisters.raiseEvents(ACPIPlatform.generationChangeEvent)
            vmmLog("VM generation ID changed on restore; the guest is notified")
        }
        var realtime = timespec()
        clock_gettime(CLOCK_REALTIME, &realtime)
        let now = UInt64(realtime.tv_sec) * 1_000_000_000 + UInt64(realtime.tv_nsec)
        // Never backwards: a host clock set back since the save only stops the catch-up.
        let away = now > saved.savedAtRealtimeNanoseconds ? now - saved.savedAtRealtimeNanoseconds : 0
        do throws(KVMError) {
            try vm.setClock(nanoseconds: saved.clockNanoseconds &+ away)
        } catch {
            throw .state("KVM refused the saved clock: \(error)")
        }
        // Work the guest queued while the saving VMM was quiesced (a request, a frame) and the
        // vsock transport reset are done now, before the vCPUs run.
        resumeComponents()
    }

    /// `vireo save`: parks the vCPUs, quiesces the devices, flushes the disks and writes the
    /// machine's state and RAM to the state file, and leaves the machine parked for
    /// `stopAfterSave()`. On any error the VM runs on as before (resumed if this paused it) and
    /// the earlier file is untouched.
    public func save() throws(VMMError) {
        guard let path = stateFilePath else {
            throw .invalidConfiguration(field: "--state-file", reason: "this VMM was started without a state file; it has nowhere to save")
        }
        try lifecycle.withLock { (_) throws(VMMError) in
            guard !stop.isStopping, !stateWritten.load(ordering: .acquiring) else {
                throw .invalidConfiguration(field: "save", reason: "the VM is stopping")
            }
            let started = VMMClock.now()
            let pausedHere = pauseGate.pause { kickAll(threadsLock.withLock { $0 }) }
            quiesceComponents()
            var saved = false
            defer {
                if !saved {
                    resumeComponents()
                    if pausedHere { _ = pauseGate.resume() }
                }
            }
            try writeQuiescedState(to: path)
            saved = true
            stateWritten.store(true, ordering: .releasing)
            vmmLog("saved to \(path) in \((VMMClock.now() - started) / 1000) us")
        }
    }

    /// With the vCPUs parked and the transports quiesced: captures the state, makes every disk's
    /// writes durable (the state refers to what they hold now) and writes the state file.
    private func writeQuiescedState(to path: String) throws(VMMError) {
        let state: SavedMachineState
        do throws(CaptureError) {
            state = try captureState()
        } catch {
            throw error.vmmError
        }
        for disk in blockDevices {
            do throws(DiskImageError) {
                try disk.device.disk.flush()
            } catch {
                throw .host(operation: "flush \(disk.path) before writing the state: \(error)", errno: EIO)
            }
        }
        try SavedStateFile.write(metadata: state.metadata(for: path), memory: memory, to: path)
    }

    /// Ends the run of a machine `save()` has written out: it stays parked until it stops.
    func stopAfterSave() {
        guard let path = stateFilePath else { return }
        stop.request(.saved(path: path))
    }
}

/// The metadata decoder from outside the VMM, for the fuzz target and its seeds.
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
            machine: sampleMachine(), machineRecord: (try? sampleMachine().encoded()) ?? [],
            cpuid: [CPUIDEntry(function: 1, index: 0, flags: 0, eax: 0x800f11, ebx: 0, ecx: 0x7ed8320b, edx: 0x178bfbff)],
            tscKilohertz: 2_445_406, clockNanoseconds: 1_000_000, savedAtRealtimeNanoseconds: 1_700_000_000_000_000_000,
            interruptControllers: controllers, timer: kvm_pit_state2(), vcpus: [vcpu, vcpu], devices: [[1, 2, 3], [], [4]])
        return (try? state.encoded()) ?? []
    }
}

// MARK: live snapshots

extension Machine {
    /// Where a live snapshot's overlay for the image at `path` goes: beside it, named after its
    /// stem and the snapshot (`disk0.qcow2`, `disk0.1a2b3c4d.qcow2`). The library uses the same rule
    /// to prepare it (docs/snapshots.md).
    public static func snapshotOverlayPath(for path: String, snapshot id: String) -> String {
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { String(path[..<$0]) + "/" } ?? ""
        let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        let stem = name.split(separator: ".", maxSplits: 1).first.map(String.init) ?? name
        return directory + stem + "." + id + ".qcow2"
    }

    /// Snapshot IDs the library makes: short lowercase hex, safe in a file name.
    static func isSnapshotID(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= 32 && id.utf8.allSatisfy { ($0 >= 48 && $0 <= 57) || ($0 >= 97 && $0 <= 102) }
    }

    /// A live snapshot: with the vCPUs parked and the devices quiesced, the state and RAM go to
    /// `<snapshot dir>/<id>/state`, and every writable qcow2 disk moves to the overlay the library
    /// prepared on top of its current image, which from then on stays as it is (the snapshot's
    /// disk layer). Then the VM runs on. Returns the overlays now in use and how long the guest
    /// was paused. On any error nothing has switched and the VM runs on as before.
    public func snapshot(id: String) throws(VMMError) -> (overlays: [String], pausedMicroseconds: UInt64, memoryLost: String?) {
        guard let directory = snapshotDirectory else {
            throw .invalidConfiguration(field: "--snapshot-dir", reason: "this VMM was started without a snapshot directory; stop and start the VM to take live snapshots")
        }
        guard Self.isSnapshotID(id) else { throw .invalidConfiguration(field: "snapshot", reason: "'\(id.prefix(40))' is not a snapshot ID (hex digits)") }
        guard !stop.isStopping, !stateWritten.load(ordering: .acquiring) else {
            throw .invalidConfiguration(field: "snapshot", reason: "the VM is stopping")
        }
        guard claimDirtyLog() else {
            throw .invalidConfiguration(field: "snapshot", reason: "a migration or another snapshot of this VM is under way")
        }
        defer { releaseDirtyLog() }
        // Open what the library prepared before the guest is paused.
        var switches: [(device: VirtioBlock, overlay: any DiskImage)] = []
        for disk in blockDevices where !disk.device.readOnly && disk.device.disk.format == .qcow2 {
            let current = disk.device.disk
            let path = Self.snapshotOverlayPath(for: current.path, snapshot: id)
            do throws(DiskImageError) {
                // On the image this VMM already holds, not a second opening of it.
                let overlay = try DiskImages.openOverlay(path: path, on: current)
                guard overlay.virtualSize == current.virtualSize else {
                    throw DiskImageError.invalidArgument(field: "overlay", reason: "\(path) is \(overlay.virtualSize) bytes, the disk \(current.virtualSize)")
                }
                switches.append((disk.device, overlay))
            } catch {
                throw .invalidConfiguration(field: "snapshot", reason: "the overlay for \(current.path): \(error)")
            }
        }
        let statePath = directory + "/" + id + ".state"
        // RAM goes to the file while the guest runs; the pause then takes only what it dirtied
        // since, and the machine's state (docs/snapshots.md).
        let file = try StateFileInProgress(path: statePath, memory: memory, cpus: vcpus.count)
        let pages = DirtyPages(machine: self)
        try lifecycle.withLock { (_) throws(VMMError) in
            // Logging starts with the guest and the devices parked: no write in flight escapes it.
            let pausedHere = pauseGate.pause { kickAll(threadsLock.withLock { $0 }) }
            quiesceComponents()
            defer {
                resumeComponents()
                if pausedHere { _ = pauseGate.resume() }
            }
            do throws(KVMError) { try logDirtyPages(true) } catch { throw .kvm(error) }
        }
        defer { try? logDirtyPages(false) }
        pages.markTouched()
        try file.writePages(pages.dirty, skipZeroPages: true)
        var rounds = 1
        while rounds < 5, pages.collect() >= 256 {
            try file.writePages(pages.dirty, skipZeroPages: false)
            rounds += 1
        }
        var wroteWholeFile = false
        let paused = try lifecycle.withLock { (_) throws(VMMError) -> UInt64 in
            guard !stop.isStopping, !stateWritten.load(ordering: .acquiring) else {
                throw .invalidConfiguration(field: "snapshot", reason: "the VM is stopping")
            }
            let started = VMMClock.now()
            let pausedHere = pauseGate.pause { kickAll(threadsLock.withLock { $0 }) }
            quiesceComponents()
            defer {
                resumeComponents()
                if pausedHere { _ = pauseGate.resume() }
            }
            _ = pages.collect()
            pages.includeEveryVMMWrite()
            try file.writePages(pages.dirty, skipZeroPages: false)
            let state: SavedMachineState
            do throws(CaptureError) { state = try captureState() } catch { throw error.vmmError }
            for disk in blockDevices {
                do throws(DiskImageError) { try disk.device.disk.flush() } catch {
                    throw .host(operation: "flush \(disk.path) before the snapshot: \(error)", errno: EIO)
                }
            }
            let metadata = try state.metadata(for: statePath)
            if try !file.writeFront(metadata: metadata) {
                // A machine state larger than the room kept for it: the whole file now, paused.
                try SavedStateFile.write(metadata: metadata, memory: memory, to: statePath)
                wroteWholeFile = true
            }
            for entry in switches {
                do throws(DiskImageError) {
                    try entry.device.switchImage(to: entry.overlay)
                } catch {
                    // Sizes were equal when opened; an image that changed size meanwhile is not ours.
                    throw .host(operation: "switch to \(entry.overlay.path): \(error)", errno: EIO)
                }
            }
            return (VMMClock.now() - started) / 1000
        }
        // The disks have moved: from here a failure costs the snapshot its memory, never its disks.
        var memoryLost: String?
        if !wroteWholeFile {
            do throws(VMMError) { try file.finish() } catch {
                memoryLost = "\(error)"
                vmmLog("snapshot \(id): its memory could not be kept (\(error)); its disks were")
            }
        }
        vmmLog("snapshot \(id) taken; the guest was paused \(paused) us (\(rounds) rounds of RAM written while it ran)")
        return (switches.map { $0.overlay.path }, paused, memoryLost)
    }
}
