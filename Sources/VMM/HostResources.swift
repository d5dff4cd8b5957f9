import Devices
import DiskImage
import GuestMemory
import KVM
import MachineSpec
import X86Boot
#if canImport(Glibc)
import Glibc
#endif

/// How a machine gets its guest. The three entries (`Machine.boot`, `Machine.restore`,
/// `Machine.receive`) share one build; they differ in what fills guest RAM and the vCPUs, which
/// `finishAssembly` reads once the VMM is confined.
public enum MachineStart: Sendable, Equatable {
    /// From the spec's kernel.
    case boot
    /// From the state file `vireo save` wrote (docs/snapshots.md); it is removed once restored.
    case restore(stateFile: String)
    /// From a live-migration stream, with its disks copied in it or shared (docs/migration.md).
    case receive(Machine.ArrivalMode)
}

/// What a machine needs of the host, opened before the VMM is confined (docs/isolation.md):
/// KVM, guest RAM and its backing, the kernel and initrd, each disk's files, each card's host
/// side, the vsock's listening socket, the console and the state file to restore. Nothing here
/// reads what a guest, a jailed VMM or a peer could have written: the disks' headers and the
/// state wait for `Machine.finishAssembly`.
struct HostResources {
    let kvm: KVMSystem
    /// The spec checked against this host, with the kernel and initrd read.
    let boot: BootConfiguration
    let memory: GuestMemory
    /// One per disk, in the spec's order: opened, not read.
    let diskFiles: [DiskFiles]
    /// One per card, in the spec's order.
    /// Each card's backends: one per queue pair (a multiqueue tap's queues), else one.
    let frameBackends: [[any FrameBackend]]
    let vsockListener: Int32?
    /// One per shared folder, in the spec's order: connected to its virtiofsd, not yet greeted.
    let fileSystemSockets: [Int32]
    let console: Console
    /// The state file to restore, open but not read; -1 when the machine does not restore.
    let stateDescriptor: Int32

    static func open(_ spec: MachineSpec, for start: MachineStart) throws(VMMError) -> HostResources {
        let kvm: KVMSystem
        do {
            kvm = try KVMSystem()
            try kvm.requireCapabilities()
        } catch {
            throw .kvm(error)
        }
        let boot = try spec.validated(maximumVCPUs: kvm.maximumVCPUs)
        if start != .boot, let folder = spec.sharedFolders.first {
            // Never saved or migrated (Machine.refuseStateCapture), so no state can hold one.
            throw .invalidConfiguration(field: MachineField.shares.runFlag, reason: "shared folder '\(folder.tag)' cannot be part of a restored or arriving machine: its state lives in virtiofsd")
        }
        var stateDescriptor: Int32 = -1
        if case let .restore(stateFile) = start {
            stateDescriptor = Glibc.open(stateFile, O_RDONLY | O_CLOEXEC)
            guard stateDescriptor >= 0 else { throw .host(operation: "open saved state \(stateFile)", errno: errno) }
        }
        // Everything opened so far is closed again if a later step fails (vireo run goes on
        // living after a refusal it prints).
        var vsockListener: Int32?
        var fileSystemSockets: [Int32] = []
        var opened = false
        defer {
            if !opened {
                if stateDescriptor >= 0 { close(stateDescriptor) }
                if let vsockListener { close(vsockListener) }
                for socket in fileSystemSockets { close(socket) }
            }
        }
        let memory: GuestMemory
        do {
            memory = try GuestMemory(anonymousRegions: MachineLayout.ramRegions(memoryBytes: boot.memoryBytes), backing: spec.memory)
        } catch {
            throw .memory(error)
        }
        var diskFiles: [DiskFiles] = []
        if spec.disks.contains(where: \.isNetwork) {
            NetworkDisk.log.withLock { $0 = { line in vmmLog(line) } }
        }
        for disk in spec.disks {
            do throws(DiskImageError) {
                if start == .receive(.sharedDisks), !disk.isNetwork {
                    // The image is the source's until it hands it over; what it rests on is
                    // opened now, read-only, beside the source.
                    diskFiles.append(.opened(try DiskImages.openFiles(layersOf: disk.path, format: disk.format, backing: disk.backing)))
                } else {
                    // A copied disk is written by the stream, read-only or not; the guest's view
                    // of it stays as configured (VirtioBlock). A shared network disk is connected
                    // now, as at any start: an export has no lock to hand over, and the guest
                    // touches it only once the source has flushed and stopped.
                    diskFiles.append(try disk.openFiles(writable: !disk.readOnly || start == .receive(.copiedDisks)))
                }
            } catch {
                throw .invalidConfiguration(field: "--disk", reason: "\(error)")
            }
        }
        var frameBackends: [[any FrameBackend]] = []
        for card in spec.nics {
            do throws(NetworkBackendError) {
                switch card.backend {
                case let .tap(name):
                    let pairs = card.queuePairs
                    var queues: [any FrameBackend] = []
                    for _ in 0..<pairs { queues.append(try TapDevice(name: name, queue: pairs > 1)) }
                    frameBackends.append(queues)
                case let .tapDescriptor(fd):
                    var queues: [TapDevice] = []
                    for descriptor in [fd] + (card.queueDescriptors ?? []) { queues.append(try TapDevice(descriptor: descriptor)) }
                    if queues.count > 1, let stray = queues.first(where: { !$0.isQueue || $0.name != queues[0].name }) {
                        throw .descriptor(stray.fd, reason: "not a queue of the multiqueue tap \(queues[0].name)")
                    }
                    frameBackends.append(queues as [any FrameBackend])
                case let .streamDescriptor(fd): frameBackends.append([try StreamFrameBackend(descriptor: fd, name: "stream")])
                }
            } catch {
                throw .invalidConfiguration(field: "--net", reason: error.description)
            }
        }
        if let socket = spec.vsock { vsockListener = try listenUnixSocket(path: socket.socketPath, field: "--vsock", backlog: 64) }
        // Connected before the jail, which may not see the back ends' sockets; the greeting waits
        // for the memory table (VirtioDevices).
        for folder in spec.sharedFolders {
            do throws(VirtioError) {
                fileSystemSockets.append(try VhostUserFrontend.connect(path: folder.socketPath))
            } catch {
                throw .invalidConfiguration(field: MachineField.shares.runFlag, reason: "shared folder '\(folder.tag)': \(error)")
            }
        }
        let console = try Console(try ConsoleConfiguration(parsing: spec.console))
        opened = true
        return HostResources(kvm: kvm, boot: boot, memory: memory, diskFiles: diskFiles, frameBackends: frameBackends,
                             vsockListener: vsockListener, fileSystemSockets: fileSystemSockets, console: console, stateDescriptor: stateDescriptor)
    }
}
