import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// Why `KVM_RUN` returned, with the payload the VMM needs to finish the exit.
public enum VCPUExit {
    /// A port access. For `out`, `data` holds `size * count` bytes the guest wrote; for `in`, the
    /// VMM fills them. `data` points into the vCPU's `kvm_run` page.
    case portIO(port: UInt16, isWrite: Bool, size: Int, count: Int, data: UnsafeMutableRawPointer)
    /// A memory access outside guest RAM. For reads, the VMM fills `data` (up to 8 bytes).
    case mmio(address: UInt64, isWrite: Bool, length: Int, data: UnsafeMutableRawPointer)
    case halt
    /// Triple fault (or an unrecoverable guest state): the CPU shut down.
    case shutdown
    /// `KVM_EXIT_SYSTEM_EVENT`: the guest asked for shutdown/reset through a PSCI-like path.
    case systemEvent(type: UInt32)
    /// KVM could not handle something (e.g. an instruction its emulator lacks).
    case internalError(suberror: UInt32, data: [UInt64])
    case failEntry(hardwareReason: UInt64)
    /// `KVM_RUN` returned EINTR: somebody kicked this vCPU.
    case interrupted
    case unhandled(reason: UInt32)
}

/// One virtual CPU: its fd and its shared `kvm_run` page. Owned by exactly one thread while running.
public final class VCPU: @unchecked Sendable {
    public let fd: Int32
    public let id: UInt32
    let run: UnsafeMutablePointer<kvm_run>
    let runBase: UnsafeMutableRawPointer
    let mappingSize: Int

    init(fd: Int32, id: UInt32, mappingSize: Int) throws(KVMError) {
        guard let mapping = mmap(nil, mappingSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0),
              mapping != MAP_FAILED else {
            throw KVMError(operation: "mmap kvm_run of vCPU \(id)", errno: Glibc.errno)
        }
        self.fd = fd
        self.id = id
        self.mappingSize = mappingSize
        self.runBase = mapping
        self.run = mapping.assumingMemoryBound(to: kvm_run.self)
    }

    deinit {
        munmap(runBase, mappingSize)
        close(fd)
    }

    /// Enters the guest until the next exit. Never retries EINTR: a kick must reach the caller.
    public func runOnce() throws(KVMError) -> VCPUExit {
        let result = vireo_ioctl_none(fd, VIREO_KVM_RUN)
        if result == -1 {
            let code = Glibc.errno
            if code == EINTR || code == EAGAIN { return .interrupted }
            throw KVMError(operation: "KVM_RUN on vCPU \(id)", errno: code)
        }
        let reason = vireo_run_exit_reason(run)
        switch Int32(reason) {
        case KVM_EXIT_IO:
            let io = vireo_run_io(run)
            return .portIO(port: io.port, isWrite: io.direction == UInt8(KVM_EXIT_IO_OUT), size: Int(io.size),
                           count: Int(io.count), data: runBase.advanced(by: Int(io.data_offset)))
        case KVM_EXIT_MMIO:
            let mmio = vireo_run_mmio(run)
            return .mmio(address: mmio.physical_address, isWrite: mmio.is_write != 0,
                         length: Int(mmio.length), data: UnsafeMutableRawPointer(mmio.data))
        case KVM_EXIT_HLT:
            return .halt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: vireo_run_system_event_type(run))
        case KVM_EXIT_INTERNAL_ERROR:
            let error = vireo_run_internal_error(run)
            let words = [error.data.0, error.data.1, error.data.2, error.data.3]
            return .internalError(suberror: error.suberror, data: Array(words.prefix(Int(min(error.ndata, 4)))))
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(hardwareReason: vireo_run_fail_entry_reason(run))
        case KVM_EXIT_INTR:
            return .interrupted
        default:
            return .unhandled(reason: reason)
        }
    }

    /// Makes the next (or current, once kicked) `KVM_RUN` return at once. Safe from any thread.
    public func requestImmediateExit(_ value: Bool = true) {
        vireo_run_set_immediate_exit(run, value ? 1 : 0)
    }

    /// `KVM_GET_*` of a fixed-size state structure.
    private func getState<State: BitwiseCopyable>(_ request: UInt, _ name: String, _ empty: State) throws(KVMError) -> State {
        var state = empty
        _ = try systemCall("\(name) on vCPU \(id)") { vireo_ioctl_pointer(fd, request, &state) }
        return state
    }

    /// `KVM_SET_*` of a fixed-size state structure.
    private func setState<State: BitwiseCopyable>(_ request: UInt, _ name: String, _ state: State) throws(KVMError) {
        var state = state
        _ = try systemCall("\(name) on vCPU \(id)") { vireo_ioctl_pointer(fd, request, &state) }
    }

    public func registers() throws(KVMError) -> kvm_regs {
        try getState(VIREO_KVM_GET_REGS, "KVM_GET_REGS", kvm_regs())
    }

    public func setRegisters(_ regs: kvm_regs) throws(KVMError) {
        try setState(VIREO_KVM_SET_REGS, "KVM_SET_REGS", regs)
    }

    public func specialRegisters() throws(KVMError) -> kvm_sregs {
        try getState(VIREO_KVM_GET_SREGS, "KVM_GET_SREGS", kvm_sregs())
    }

    public func setSpecialRegisters(_ sregs: kvm_sregs) throws(KVMError) {
        try setState(VIREO_KVM_SET_SREGS, "KVM_SET_SREGS", sregs)
    }

    public func fpu() throws(KVMError) -> kvm_fpu {
        try getState(VIREO_KVM_GET_FPU, "KVM_GET_FPU", kvm_fpu())
    }

    public func multiprocessingState() throws(KVMError) -> kvm_mp_state {
        try getState(VIREO_KVM_GET_MP_STATE, "KVM_GET_MP_STATE", kvm_mp_state())
    }

    public func setMultiprocessingState(_ state: kvm_mp_state) throws(KVMError) {
        try setState(VIREO_KVM_SET_MP_STATE, "KVM_SET_MP_STATE", state)
    }

    /// Pending exceptions, interrupts, NMIs and SMIs.
    public func events() throws(KVMError) -> kvm_vcpu_events {
        try getState(VIREO_KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", kvm_vcpu_events())
    }

    public func setEvents(_ events: kvm_vcpu_events) throws(KVMError) {
        try setState(VIREO_KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", events)
    }

    public func debugRegisters() throws(KVMError) -> kvm_debugregs {
        try getState(VIREO_KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", kvm_debugregs())
    }

    public func setDebugRegisters(_ registers: kvm_debugregs) throws(KVMError) {
        try setState(VIREO_KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", registers)
    }

    /// Extended control registers (XCR0); only where KVM_CAP_XCRS is offered.
    public func extendedControlRegisters() throws(KVMError) -> kvm_xcrs {
        try getState(VIREO_KVM_GET_XCRS, "KVM_GET_XCRS", kvm_xcrs())
    }

    public func setExtendedControlRegisters(_ registers: kvm_xcrs) throws(KVMError) {
        try setState(VIREO_KVM_SET_XCRS, "KVM_SET_XCRS", registers)
    }

    public func setFPU(_ fpu: kvm_fpu) throws(KVMError) {
        try setState(VIREO_KVM_SET_FPU, "KVM_SET_FPU", fpu)
    }

    public func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
        let size = vireo_cpuid2_size(UInt32(entries.count))
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        let cpuid = buffer.assumingMemoryBound(to: kvm_cpuid2.self)
        cpuid.pointee.nent = UInt32(entries.count)
        let slots = vireo_cpuid2_entries(cpuid)
        for (index, entry) in entries.enumerated() { slots[index] = entry.raw }
        _ = try systemCall("KVM_SET_CPUID2 on vCPU \(id)") { vireo_ioctl_pointer(fd, VIREO_KVM_SET_CPUID2, buffer) }
    }

    /// Writes model-specific registers; KVM reports how many it accepted, and all must be.
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws(KVMError) {
        let size = vireo_msrs_size(UInt32(msrs.count))
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        let header = buffer.assumingMemoryBound(to: kvm_msrs.self)
        header.pointee.nmsrs = UInt32(msrs.count)
        let slots = vireo_msrs_entries(header)
        for (index, msr) in msrs.enumerated() {
            slots[index].index = msr.index
            slots[index].data = msr.value
        }
        let written = try systemCall("KVM_SET_MSRS on vCPU \(id)") { vireo_ioctl_pointer(fd, VIREO_KVM_SET_MSRS, buffer) }
        if Int(written) != msrs.count {
            let rejected = String(msrs[Int(written)].index, radix: 16)
            throw KVMError(operation: "KVM_SET_MSRS on vCPU \(id) rejected MSR 0x\(rejected)", errno: EINVAL)
        }
    }

    /// Reads the given MSRs; KVM stops at the first it cannot read, and only those read are
    /// returned, in order.
    public func msrs(_ indices: [UInt32]) throws(KVMError) -> [(index: UInt32, value: UInt64)] {
        guard !indices.isEmpty else { return [] }
        let size = vireo_msrs_size(UInt32(indices.count))
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        let header = buffer.assumingMemoryBound(to: kvm_msrs.self)
        header.pointee.nmsrs = UInt32(indices.count)
        let slots = vireo_msrs_entries(header)
        for (position, index) in indices.enumerated() { slots[position].index = index }
        let read = try systemCall("KVM_GET_MSRS on vCPU \(id)") { vireo_ioctl_pointer(fd, VIREO_KVM_GET_MSRS, buffer) }
        return (0..<Int(read)).map { (slots[$0].index, slots[$0].data) }
    }

    /// The guest TSC frequency in kHz (`KVM_GET_TSC_KHZ`).
    public func tscKilohertz() throws(KVMError) -> UInt32 {
        UInt32(truncatingIfNeeded: try systemCall("KVM_GET_TSC_KHZ on vCPU \(id)") { vireo_ioctl_none(fd, VIREO_KVM_GET_TSC_KHZ) })
    }

    /// Scales the guest TSC to `kilohertz` (`KVM_SET_TSC_KHZ`), so a guest restored on a host
    /// with another TSC rate keeps the rate it calibrated against.
    public func setTSCKilohertz(_ kilohertz: UInt32) throws(KVMError) {
        _ = try systemCall("KVM_SET_TSC_KHZ on vCPU \(id)") { vireo_ioctl_value(fd, VIREO_KVM_SET_TSC_KHZ, UInt(kilohertz)) }
    }

    /// The LAPIC register page (1 KiB), as `KVM_GET_LAPIC` returns it.
    public func localAPICRegisters() throws(KVMError) -> [UInt8] {
        var state = try getState(VIREO_KVM_GET_LAPIC, "KVM_GET_LAPIC", kvm_lapic_state())
        return withUnsafeBytes(of: &state.regs) { Array($0) }
    }

    public func setLocalAPICRegisters(_ bytes: [UInt8]) throws(KVMError) {
        var state = kvm_lapic_state()
        withUnsafeMutableBytes(of: &state.regs) { destination in
            for index in 0..<min(destination.count, bytes.count) { destination[index] = bytes[index] }
        }
        try setState(VIREO_KVM_SET_LAPIC, "KVM_SET_LAPIC", state)
    }
}
