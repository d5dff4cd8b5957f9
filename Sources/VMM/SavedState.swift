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
    /// then each component's record, in the machine's order. `specRecord`: the spec's record
    /// made already (a migration's announcement), not made again inside the pause.
    func captureState(specRecord known: [UInt8]? = nil) throws(CaptureError) -> SavedMachineState {
        let machineRecord: [UInt8]
        if let known {
            machineRecord = known
        } else {
            do throws(StateError) { machineRecord = try specRecord() } catch { throw .state(error.description) }
        }
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
            let interruptControllers = try InterruptControllerSet(vm: vm).captureState()
            var vcpuStates: [VCPUSavedState] = []
            for vcpu in vcpus {
                vcpuStates.append(try VCPUComponent(vcpu: vcpu, msrIndices: msrIndices, hasExtendedControl: hasExtendedControl).captureState())
            }
            let tscKilohertz = kvm.extensionValue(VIREO_KVM_CAP_GET_TSC_KHZ) > 0 ? (try? vcpus[0].tscKilohertz()) ?? 0 : 0
            var realtime = timespec()
            clock_gettime(CLOCK_REALTIME, &realtime)
            return SavedMachineState(
                machine: CarriedSpec(spec: spec, record: machineRecord), cpuid: cpuidBasis, tscKilohertz: tscKilohertz, clockNanoseconds: try vm.clock().clock,
                savedAtRealtimeNanoseconds: UInt64(realtime.tv_sec) * 1_000_000_000 + UInt64(realtime.tv_nsec),
                interruptControllers: interruptControllers, vcpus: vcpuStates, devices: devices)
        } catch {
            throw .kvm(error)
        }
    }

    /// Applies a saved state to this freshly built machine, before any vCPU runs: RAM (mapped
    /// from the file, or read), the interrupt controllers and PIT, each vCPU, each device, and
    /// last kvmclock, set ahead by the wall time the VM spent saved. True when RAM is mapped.
    func restore(_ saved: SavedMachineState, memoryFrom file: borrowing SavedStateFile.Opened) throws(VMMError) -> Bool {
        if let mismatch = shape.mismatch(saved: MachineShape(saved.machine.spec)) { throw .savedState(path: file.path, reason: mismatch) }
        let mapped = try file.loadMemory(into: memory)
        do throws(StateApplicationError) {
            try applyState(saved)
        } catch {
            switch error {
            case let .state(reason): throw .savedState(path: file.path, reason: reason)
            case let .other(error): throw error
            }
        }
        return mapped
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
            try InterruptControllerSet(vm: vm).applyState(saved.interruptControllers)
            let scalesTSC = kvm.extensionValue(VIREO_KVM_CAP_TSC_CONTROL) > 0
            for (index, vcpu) in vcpus.enumerated() {
                try VCPUComponent(vcpu: vcpu, tscKilohertz: scalesTSC ? saved.tscKilohertz : 0).applyState(saved.vcpus[index])
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

    /// A shared folder's state (the guest's open files, FUSE node IDs) lives in its virtiofsd, which
    /// no saved state or migration stream can carry, as with QEMU: refused before anything pauses.
    func refuseStateCapture(_ action: String) throws(VMMError) {
        guard let folder = spec.sharedFolders.first else { return }
        throw .invalidConfiguration(field: MachineField.shares.runFlag, reason: "this VM shares a folder as '\(folder.tag)' (virtio-fs), whose state lives in virtiofsd (the guest's open files) and cannot be \(action); shut the VM down first, or remove the shared folder while it is stopped")
    }

    /// `vireo save`: parks the vCPUs, quiesces the devices, flushes the disks and writes the
    /// machine's state and RAM to the state file, and leaves the machine parked for
    /// `stopAfterSave()`. On any error the VM runs on as before (resumed if this paused it) and
    /// the earlier file is untouched.
    public func save() throws(VMMError) {
        try refuseStateCapture("saved")
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
        try refuseStateCapture("saved in a live snapshot")
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
                let overlay = try DiskImages.openOverlay(path: path, on: current, direct: disk.device.bypassesHostCache)
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
