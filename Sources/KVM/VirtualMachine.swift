import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// A KVM VM file descriptor: memory slots, the in-kernel interrupt controllers and vCPU creation.
public final class VirtualMachine: @unchecked Sendable {
    public let fd: Int32
    let vcpuMappingSize: Int

    init(fd: Int32, vcpuMappingSize: Int) {
        self.fd = fd
        self.vcpuMappingSize = vcpuMappingSize
    }

    deinit { close(fd) }

    /// With `logDirtyPages`, KVM records every page the guest writes in the slot until
    /// `dirtyLog(slot:into:)` fetches and clears the record (live migration's pre-copy).
    public func setUserMemoryRegion(slot: UInt32, guestPhysicalAddress: UInt64, size: UInt64,
                                    hostAddress: UnsafeMutableRawPointer, logDirtyPages: Bool = false) throws(KVMError) {
        var region = kvm_userspace_memory_region(
            slot: slot, flags: logDirtyPages ? VIREO_KVM_MEM_LOG_DIRTY_PAGES : 0, guest_phys_addr: guestPhysicalAddress,
            memory_size: size, userspace_addr: UInt64(UInt(bitPattern: hostAddress)))
        _ = try systemCall("KVM_SET_USER_MEMORY_REGION slot \(slot)") {
            vireo_ioctl_pointer(fd, VIREO_KVM_SET_USER_MEMORY_REGION, &region)
        }
    }

    /// Intel VMX needs three pages for a real-mode TSS and one for an identity map, somewhere the
    /// guest never uses; callers put them just below 4 GiB, in the MMIO hole.
    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        _ = try systemCall("KVM_SET_TSS_ADDR") { vireo_ioctl_value(fd, VIREO_KVM_SET_TSS_ADDR, UInt(address)) }
    }

    /// In-kernel PIC pair, IOAPIC and per-vCPU LAPICs.
    public func createInterruptController() throws(KVMError) {
        _ = try systemCall("KVM_CREATE_IRQCHIP") { vireo_ioctl_none(fd, VIREO_KVM_CREATE_IRQCHIP) }
    }

    /// In-kernel i8254 PIT. `KVM_PIT_SPEAKER_DUMMY` makes port 0x61 read sanely without a speaker.
    public func createProgrammableIntervalTimer() throws(KVMError) {
        var config = kvm_pit_config()
        config.flags = UInt32(KVM_PIT_SPEAKER_DUMMY)
        _ = try systemCall("KVM_CREATE_PIT2") { vireo_ioctl_pointer(fd, VIREO_KVM_CREATE_PIT2, &config) }
    }

    /// One in-kernel interrupt controller's state: 0 and 1 are the master and slave PICs, 2 the IOAPIC.
    public func interruptControllerState(chip: UInt32) throws(KVMError) -> kvm_irqchip {
        var state = kvm_irqchip()
        state.chip_id = chip
        _ = try systemCall("KVM_GET_IRQCHIP \(chip)") { vireo_ioctl_pointer(fd, VIREO_KVM_GET_IRQCHIP, &state) }
        return state
    }

    public func setInterruptControllerState(_ state: kvm_irqchip) throws(KVMError) {
        var state = state
        _ = try systemCall("KVM_SET_IRQCHIP \(state.chip_id)") { vireo_ioctl_pointer(fd, VIREO_KVM_SET_IRQCHIP, &state) }
    }

    public func timerState() throws(KVMError) -> kvm_pit_state2 {
        var state = kvm_pit_state2()
        _ = try systemCall("KVM_GET_PIT2") { vireo_ioctl_pointer(fd, VIREO_KVM_GET_PIT2, &state) }
        return state
    }

    public func setTimerState(_ state: kvm_pit_state2) throws(KVMError) {
        var state = state
        _ = try systemCall("KVM_SET_PIT2") { vireo_ioctl_pointer(fd, VIREO_KVM_SET_PIT2, &state) }
    }

    /// `KVM_GET_DIRTY_LOG`: the pages of `slot` the guest wrote since dirty logging began or the
    /// last call, one bit per 4 KiB page, stored into `bitmap` (at least pages/64 words, rounded
    /// up); KVM clears its record as it hands it over.
    public func dirtyLog(slot: UInt32, into bitmap: UnsafeMutablePointer<UInt64>) throws(KVMError) {
        var log = kvm_dirty_log()
        log.slot = slot
        log.dirty_bitmap = UnsafeMutableRawPointer(bitmap)
        _ = try systemCall("KVM_GET_DIRTY_LOG slot \(slot)") { vireo_ioctl_pointer(fd, VIREO_KVM_GET_DIRTY_LOG, &log) }
    }

    /// kvmclock's base (`KVM_GET_CLOCK`): the guest's notion of nanoseconds since it booted.
    public func clock() throws(KVMError) -> kvm_clock_data {
        var data = kvm_clock_data()
        _ = try systemCall("KVM_GET_CLOCK") { vireo_ioctl_pointer(fd, VIREO_KVM_GET_CLOCK, &data) }
        return data
    }

    /// `KVM_SET_CLOCK` with only the clock value (no realtime flags): kvmclock continues from it.
    public func setClock(nanoseconds: UInt64) throws(KVMError) {
        var data = kvm_clock_data()
        data.clock = nanoseconds
        _ = try systemCall("KVM_SET_CLOCK") { vireo_ioctl_pointer(fd, VIREO_KVM_SET_CLOCK, &data) }
    }

    /// Drives an interrupt line (GSI) of the in-kernel PIC/IOAPIC.
    public func setInterruptLine(_ line: UInt32, level: Bool) throws(KVMError) {
        var irq = kvm_irq_level()
        irq.irq = line
        irq.level = level ? 1 : 0
        _ = try systemCall("KVM_IRQ_LINE \(line)") { vireo_ioctl_pointer(fd, VIREO_KVM_IRQ_LINE, &irq) }
    }

    /// Makes guest writes to `[address, address+length)` (of `value`, if given) signal `eventFD`
    /// inside KVM instead of exiting to this process.
    public func registerIOEventFD(address: UInt64, length: UInt32, eventFD: Int32, value: UInt64?) throws(KVMError) {
        var request = kvm_ioeventfd()
        request.addr = address
        request.len = length
        request.fd = eventFD
        if let value {
            request.datamatch = value
            request.flags = VIREO_KVM_IOEVENTFD_FLAG_DATAMATCH
        }
        _ = try systemCall("KVM_IOEVENTFD 0x\(String(address, radix: 16))") { vireo_ioctl_pointer(fd, VIREO_KVM_IOEVENTFD, &request) }
    }

    /// Makes each write to `eventFD` pulse interrupt line `line` (GSI) without an ioctl.
    public func registerIRQFD(eventFD: Int32, line: UInt32) throws(KVMError) {
        var request = kvm_irqfd()
        request.fd = UInt32(bitPattern: eventFD)
        request.gsi = line
        _ = try systemCall("KVM_IRQFD \(line)") { vireo_ioctl_pointer(fd, VIREO_KVM_IRQFD, &request) }
    }

    public func createVCPU(id: UInt32) throws(KVMError) -> VCPU {
        let vcpufd = try systemCall("KVM_CREATE_VCPU \(id)") { vireo_ioctl_value(fd, VIREO_KVM_CREATE_VCPU, UInt(id)) }
        do throws(KVMError) {
            return try VCPU(fd: vcpufd, id: id, mappingSize: vcpuMappingSize)
        } catch {
            close(vcpufd)
            throw error
        }
    }
}
