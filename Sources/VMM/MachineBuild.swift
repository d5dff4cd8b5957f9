import CKVM
import Devices
import DiskImage
import GuestMemory
import KVM
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

// The steps of building a machine from a spec and the host resources opened for it (Firecracker's
// builder.rs), each a value the three entries (`boot`, `restore`, `receive`) share through
// Machine's one build. Nothing here reads what a guest or a peer wrote.

/// The virtio devices behind the transports, before they are on a bus: the network cards on
/// their host backends, vsock on its listener, the balloon and the entropy device. (Disks stand in
/// detached until their files are read once the VMM is confined.)
struct VirtioDevices {
    let networkCards: [VirtioNet]
    let vsock: VirtioVsock?
    let balloon: VirtioBalloon?
    let entropy: VirtioEntropy?
    let fileSystems: [VirtioFileSystem]

    static func create(_ spec: MachineSpec, resources: HostResources) throws(VMMError) -> VirtioDevices {
        var networkCards: [VirtioNet] = []
        for (card, backends) in zip(spec.nics, resources.frameBackends) {
            let mac = card.mac.flatMap(MACAddress.init) ?? MACAddress.random()
            do {
                networkCards.append(try VirtioNet(backends: backends, mac: mac, rateLimit: card.rateLimit, offloads: card.offloads))
            } catch {
                throw .invalidConfiguration(field: "--net", reason: error.description)
            }
        }
        var vsock: VirtioVsock?
        if let socket = spec.vsock, let listener = resources.vsockListener {
            do {
                vsock = try VirtioVsock(guestCID: socket.guestCID, socketPath: socket.socketPath, listener: listener)
            } catch {
                close(listener)
                throw .invalidConfiguration(field: "--vsock", reason: error.description)
            }
        }
        var entropy: VirtioEntropy?
        if spec.entropyDevice {
            do { entropy = try VirtioEntropy() } catch { throw .invalidConfiguration(field: "--rng", reason: error.description) }
        }
        // Each back end is greeted and given guest RAM now, before the jail: from then on the
        // device only tells it where the driver's rings are.
        var fileSystems: [VirtioFileSystem] = []
        for (index, (folder, socket)) in zip(spec.sharedFolders, resources.fileSystemSockets).enumerated() {
            do throws(VirtioError) {
                fileSystems.append(try VirtioFileSystem(tag: folder.tag, socket: socket, memory: resources.memory))
            } catch {
                for later in resources.fileSystemSockets.dropFirst(index + 1) { close(later) }
                throw .invalidConfiguration(field: MachineField.shares.runFlag, reason: "shared folder '\(folder.tag)': \(error)")
            }
        }
        return VirtioDevices(networkCards: networkCards, vsock: vsock,
                             balloon: spec.balloon.map { VirtioBalloon(deflateOnOOM: $0.deflateOnOOM, statisticsInterval: $0.statisticsInterval) },
                             entropy: entropy, fileSystems: fileSystems)
    }
}

/// The KVM VM with guest RAM in its memory slots, the in-kernel interrupt controllers and PIT,
/// and their power-on states (what a reboot in place puts back).
struct KVMPlatform {
    let vm: VirtualMachine
    /// What a reboot in place puts back.
    let interruptControllersAtPowerOn: InterruptControllerSet.Saved

    static func create(_ kvm: KVMSystem, memory: GuestMemory) throws(VMMError) -> KVMPlatform {
        do throws(KVMError) {
            let vm = try kvm.createVM()
            try vm.setTSSAddress(MachineLayout.kvmTSSAddress)
            for (slot, region) in memory.regions.enumerated() {
                try vm.setUserMemoryRegion(slot: UInt32(slot), guestPhysicalAddress: region.start.rawValue, size: region.size, hostAddress: region.host)
            }
            // After the memory slots: once an irqchip exists, every slot change waits for KVM to
            // resynchronise (measured: 5 ms per slot here, against 0.1 ms before it).
            try vm.createInterruptController()
            try vm.createProgrammableIntervalTimer()
            return KVMPlatform(vm: vm, interruptControllersAtPowerOn: try InterruptControllerSet(vm: vm).captureState())
        } catch {
            throw .kvm(error)
        }
    }
}

/// The vCPUs, each with its CPUID (the spec's CPU model over what KVM offers) and its power-on
/// state; with a booted kernel, the boot processor at its entry point. A restored or arriving
/// guest gets the CPU it ran on once its state is read (`Machine.useCPUID`).
struct BuiltVCPUs {
    let vcpus: [VCPU]
    let powerOnStates: [VCPUPowerOnState]
    let supportedCPUID: [CPUIDEntry]
    let cpuidBasis: [CPUIDEntry]

    static func create(_ spec: MachineSpec, kvm: KVMSystem, vm: VirtualMachine, cpus: Int, entry prepared: PreparedBoot?) throws(VMMError) -> BuiltVCPUs {
        let supported: [CPUIDEntry]
        do { supported = try kvm.supportedCPUID() } catch { throw .kvm(error) }
        let basis = try spec.parsedCPUModel().apply(to: supported)
        var vcpus: [VCPU] = []
        var powerOnStates: [VCPUPowerOnState] = []
        do throws(KVMError) {
            let hasExtendedControl = kvm.extensionValue(VIREO_KVM_CAP_XCRS) > 0
            for index in 0..<cpus {
                let vcpu = try vm.createVCPU(id: UInt32(index))
                try vcpu.configureCommon(cpuid: CPUIDTemplate.entries(for: index, of: cpus, supported: basis))
                powerOnStates.append(try VCPUPowerOnState(capturing: vcpu, hasExtendedControl: hasExtendedControl))
                // Application processors wait in the in-kernel LAPIC for the guest's INIT/SIPI.
                if index == 0, let prepared { try vcpu.configureEntry(prepared.cpuState) }
                vcpus.append(vcpu)
            }
        } catch {
            throw .kvm(error)
        }
        return BuiltVCPUs(vcpus: vcpus, powerOnStates: powerOnStates, supportedCPUID: supported, cpuidBasis: basis)
    }
}

/// Every device on its bus: the serial port, the i8042, the ACPI registers (with ACPI) and the
/// RTC on port I/O; the boot marker and a virtio-mmio transport per virtio device, in slot order
/// (disks, cards, vsock, balloon, entropy, shared folders: MachineSpec.guestCommandLine agrees),
/// on MMIO.
struct DeviceBuses {
    let portBus: PortIOBus
    let mmioBus: MMIOBus
    let serial: Serial8250
    let keyboardController: I8042
    let rtc: RTC
    let acpiRegisters: ACPIRegisters?
    let blockDevices: [(path: String, device: VirtioBlock)]
    let transports: [VirtioMMIOTransport]
    let dispatcher: NotificationDispatcher

    static func create(_ spec: MachineSpec, vm: VirtualMachine, memory: GuestMemory, console: Console, usesACPI: Bool,
                       stop: StopController, devices: VirtioDevices) throws(VMMError) -> DeviceBuses {
        let serial = Serial8250(output: console.output, interrupt: KVMInterruptLine(vm: vm, line: Serial8250.defaultInterrupt))
        // Queue notifications through ioeventfd and interrupts through irqfd: the guest's
        // notification does not leave the kernel, and device work runs on the dispatcher's thread.
        let useEventFDs = getenv("VIREO_NO_IOEVENTFD") == nil
        let dispatcher = NotificationDispatcher()
        let keyboard = I8042(interrupt: KVMInterruptLine(vm: vm, line: I8042.defaultInterrupt)) { stop.requestReset("guest reset the machine through the i8042 (0xFE)") }
        let acpi = usesACPI ? ACPIRegisters(
            eventInterrupt: KVMInterruptLine(vm: vm, line: ACPIPlatform.eventInterrupt),
            softOffSleepType: ACPIPlatform.softOffSleepType, resetValue: ACPIPlatform.resetValue,
            powerOff: { stop.request(.guestPowerOff) }, reset: { stop.requestReset("guest reset the machine through the ACPI reset register") },
            unsupportedSleep: { type in vmmLog("guest asked for sleep state S\(type), which this machine does not offer (only S5); ignored") }) : nil
        var ports = PortIOBus()
        var mmio = MMIOBus()
        let rtc = RTC()
        var blockDevices: [(path: String, device: VirtioBlock)] = []
        var transports: [VirtioMMIOTransport] = []
        do throws(BusError) {
            try ports.register(serial, name: "serial 8250 (COM1)", base: UInt64(Serial8250.defaultBase), length: 8)
            try ports.register(keyboard, name: "i8042", base: UInt64(I8042.dataPort), length: 5)
            if let acpi {
                try ports.register(acpi, name: "ACPI registers", base: UInt64(ACPIPlatform.sleepControlPort), length: ACPIPlatform.portCount)
            }
            try ports.register(rtc, name: "CMOS RTC", base: UInt64(RTC.basePort), length: 2)
            try mmio.register(BootMarker {
                let elapsed = VMMClock.elapsedNanoseconds
                vmmLog("guest boot marker reached \(elapsed / 1000) us (\(elapsed / 1_000_000) ms) after VMM start")
            }, name: "boot marker", base: MachineLayout.bootMarkerAddress, length: 0x1000)
            var virtio: [(device: any VirtioDevice, name: String)] = []
            for disk in spec.disks {
                // Each disk stands in detached until its files are read (`decodeDisks`).
                let image = DetachedImage(path: disk.path, format: disk.format, virtualSize: 0, readOnly: disk.readOnly)
                let block = VirtioBlock(disk: image, readOnly: disk.readOnly, serial: disk.serial, rateLimit: disk.rateLimit,
                                        bypassesHostCache: disk.bypassesHostCache, queues: disk.queueCount(cpus: spec.cpus))
                blockDevices.append((disk.path, block))
                virtio.append((block, "virtio-blk \(disk.path)"))
            }
            virtio += devices.networkCards.map { ($0, "virtio-net \($0.backend.name)") }
            if let vsock = devices.vsock { virtio.append((vsock, "virtio-vsock")) }
            if let balloon = devices.balloon { virtio.append((balloon, "virtio-balloon")) }
            if let entropy = devices.entropy { virtio.append((entropy, "virtio-rng")) }
            virtio += devices.fileSystems.map { ($0, "virtio-fs '\($0.tag)'") }
            for (index, entry) in virtio.enumerated() {
                guard let slot = MachineLayout.virtioSlot(index) else { break }
                let interrupt: any InterruptLine
                if useEventFDs, let line = try? IRQFDInterruptLine(vm: vm, line: slot.interrupt) {
                    interrupt = line
                } else {
                    interrupt = KVMInterruptLine(vm: vm, line: slot.interrupt)
                }
                let transport = VirtioMMIOTransport(device: entry.device, memory: memory, interrupt: interrupt)
                try mmio.register(transport, name: entry.name, base: slot.address, length: VirtioMMIOTransport.windowSize)
                transports.append(transport)
                if let external = entry.device as? any VirtioExternalQueues {
                    // The back end's own eventfds: the guest's notification goes straight to it.
                    dispatcher.attach(external: external, transport: transport,
                                      notifyAddress: useEventFDs ? slot.address + VirtioMMIOTransport.queueNotifyOffset : nil, vm: vm)
                } else if useEventFDs {
                    dispatcher.attach(transport, notifyAddress: slot.address + VirtioMMIOTransport.queueNotifyOffset, vm: vm)
                }
            }
        } catch {
            throw .bus(error)
        }
        return DeviceBuses(portBus: ports, mmioBus: mmio, serial: serial, keyboardController: keyboard, rtc: rtc, acpiRegisters: acpi,
                           blockDevices: blockDevices, transports: transports, dispatcher: dispatcher)
    }
}
