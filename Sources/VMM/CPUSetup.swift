import CKVM
import KVM
import X86Boot

/// The per-vCPU view of CPUID: KVM's supported set, with each vCPU's APIC ID and the machine's
/// topology written in, and the hypervisor bit set so the guest knows to look for KVM's leaves.
enum CPUIDTemplate {
    static func entries(for vcpu: Int, of cpus: Int, supported: [CPUIDEntry]) -> [CPUIDEntry] {
        let apicID = UInt32(vcpu)
        // Bits of APIC ID that number CPUs in the package: each vCPU is its own core.
        var coreBits: UInt32 = 0
        while (1 << coreBits) < cpus { coreBits += 1 }
        return supported.map { original in
            var entry = original
            switch entry.function {
            case 0x1:
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apicID << 24) | (UInt32(min(cpus, 255)) << 16)
                entry.ecx |= 1 << 31                            // hypervisor present
                if cpus > 1 { entry.edx |= 1 << 28 } else { entry.edx &= ~(1 << 28) }  // HTT
            case 0x4:
                entry.eax = (entry.eax & 0x03ff_ffff) | (UInt32(cpus - 1) << 26)
            case 0xb:
                switch entry.index {
                case 0:
                    entry.eax = 0; entry.ebx = 1; entry.ecx = (1 << 8) | 0
                case 1:
                    entry.eax = coreBits; entry.ebx = UInt32(cpus); entry.ecx = (2 << 8) | 1
                default:
                    entry.eax = 0; entry.ebx = 0; entry.ecx = entry.index
                }
                entry.edx = apicID
            case 0x8000_0008:
                entry.ecx = (entry.ecx & ~0xf0ff) | (coreBits << 12) | UInt32(cpus - 1)
            case 0x8000_001e:
                entry.eax = apicID
            default:
                break
            }
            return entry
        }
    }
}

/// The MSR values a freshly reset x86 CPU has that Linux relies on (Firecracker's boot set, less
/// IA32_TSC: writing it per vCPU at slightly different moments desynchronises the TSCs, and KVM
/// already starts every vCPU's TSC in step).
enum BootMSRs {
    static let values: [(index: UInt32, value: UInt64)] = [
        (0x174, 0),                 // IA32_SYSENTER_CS
        (0x175, 0),                 // IA32_SYSENTER_ESP
        (0x176, 0),                 // IA32_SYSENTER_EIP
        (0xc000_0081, 0),           // STAR
        (0xc000_0082, 0),           // LSTAR
        (0xc000_0083, 0),           // CSTAR
        (0xc000_0084, 0),           // SYSCALL_MASK
        (0xc000_0102, 0),           // KERNEL_GS_BASE
        (0x1a0, 1),                 // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6),     // MTRRdefType: MTRRs on, write-back by default
        (0x277, 0x0007_0406_0007_0406), // IA32_PAT: its power-on value
    ]

    /// MSRs through which a guest makes KVM write into its memory (kvmclock, async page faults,
    /// steal time, PV EOI) or arms a timer: a reboot turns them off, or the next boot's freshly
    /// cleared RAM would be written by the hypervisor on the old kernel's behalf. KVM refuses
    /// them only where the feature is absent, and then the guest cannot have turned it on.
    static let disabledOnReset: [(index: UInt32, value: UInt64)] = [
        (0x12, 0),                  // MSR_KVM_SYSTEM_TIME (old)
        (0x4b56_4d01, 0),           // MSR_KVM_SYSTEM_TIME_NEW
        (0x4b56_4d02, 0),           // MSR_KVM_ASYNC_PF_EN
        (0x4b56_4d03, 0),           // MSR_KVM_STEAL_TIME
        (0x4b56_4d04, 0),           // MSR_KVM_PV_EOI_EN
        (0x4b56_4d05, 1),           // MSR_KVM_POLL_CONTROL: its reset value
        (0x6e0, 0),                 // IA32_TSC_DEADLINE: disarmed
    ]
}

/// A vCPU's state as built, before the guest first ran: what a reboot in place puts back, in
/// an order KVM accepts (special registers first, since the APIC base and EFER decide how the
/// LAPIC and the rest are read; the LAPIC after them; events last).
struct VCPUPowerOnState {
    let registers: kvm_regs
    let specialRegisters: kvm_sregs
    let fpu: kvm_fpu
    let localAPIC: [UInt8]
    let multiprocessing: kvm_mp_state
    let events: kvm_vcpu_events
    let debugRegisters: kvm_debugregs
    /// Nil where the host has no KVM_CAP_XCRS.
    let extendedControl: kvm_xcrs?

    init(capturing vcpu: VCPU, hasExtendedControl: Bool) throws(KVMError) {
        registers = try vcpu.registers()
        specialRegisters = try vcpu.specialRegisters()
        fpu = try vcpu.fpu()
        localAPIC = try vcpu.localAPICRegisters()
        multiprocessing = try vcpu.multiprocessingState()
        events = try vcpu.events()
        debugRegisters = try vcpu.debugRegisters()
        extendedControl = hasExtendedControl ? try vcpu.extendedControlRegisters() : nil
    }

    func restore(to vcpu: VCPU) throws(KVMError) {
        try vcpu.setSpecialRegisters(specialRegisters)
        try vcpu.setRegisters(registers)
        try vcpu.setFPU(fpu)
        if let extendedControl { try vcpu.setExtendedControlRegisters(extendedControl) }
        try vcpu.setMSRs(BootMSRs.values)
        for msr in BootMSRs.disabledOnReset { try? vcpu.setMSRs([msr]) }
        try vcpu.setLocalAPICRegisters(localAPIC)
        try vcpu.setDebugRegisters(debugRegisters)
        try vcpu.setMultiprocessingState(multiprocessing)
        try vcpu.setEvents(events)
    }
}

extension SegmentRegister {
    var kvmSegment: kvm_segment {
        var segment = kvm_segment()
        segment.base = base
        segment.limit = pageGranular ? (limit << 12) | 0xfff : limit
        segment.selector = selector
        segment.type = type
        segment.present = present ? 1 : 0
        segment.dpl = privilegeLevel
        segment.db = defaultSize32 ? 1 : 0
        segment.s = isCodeOrData ? 1 : 0
        segment.l = longMode ? 1 : 0
        segment.g = pageGranular ? 1 : 0
        return segment
    }
}

extension VCPU {
    /// State every vCPU needs before the guest runs: CPUID, MSRs, FPU, and LINT0/LINT1 wired as
    /// a PC's (ExtINT from the PIC, NMI), so the BSP takes legacy interrupts before the IOAPIC is set up.
    func configureCommon(cpuid: [CPUIDEntry]) throws(KVMError) {
        try setCPUID(cpuid)
        try setMSRs(BootMSRs.values)
        var fpu = kvm_fpu()
        fpu.fcw = 0x37f
        fpu.mxcsr = 0x1f80
        try setFPU(fpu)
        var lapic = try localAPICRegisters()
        func setLVT(_ offset: Int, deliveryMode: UInt32) {
            var value = UInt32(lapic[offset]) | UInt32(lapic[offset + 1]) << 8 | UInt32(lapic[offset + 2]) << 16 | UInt32(lapic[offset + 3]) << 24
            value = (value & ~0x700) | (deliveryMode << 8)
            for byte in 0..<4 { lapic[offset + byte] = UInt8(truncatingIfNeeded: value >> (8 * byte)) }
        }
        setLVT(0x350, deliveryMode: 7)   // LVT0: ExtINT
        setLVT(0x360, deliveryMode: 4)   // LVT1: NMI
        try setLocalAPICRegisters(lapic)
    }

    /// The boot processor's entry state, as the loader decided it.
    func configureEntry(_ state: EntryCPUState) throws(KVMError) {
        var sregs = try specialRegisters()
        let code = state.code.kvmSegment
        let data = state.data.kvmSegment
        sregs.cs = code
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.tr = state.taskRegister.kvmSegment
        sregs.gdt.base = state.gdtBase
        sregs.gdt.limit = state.gdtLimit
        sregs.idt.base = state.idtBase
        sregs.idt.limit = state.idtLimit
        sregs.cr0 = state.cr0
        sregs.cr3 = state.cr3
        sregs.cr4 = state.cr4
        sregs.efer = state.efer
        try setSpecialRegisters(sregs)

        var regs = kvm_regs()
        regs.rip = state.rip
        regs.rsp = state.rsp
        regs.rbp = state.rsp
        regs.rsi = state.rsi
        regs.rbx = state.rbx
        regs.rflags = state.rflags
        try setRegisters(regs)
    }
}
