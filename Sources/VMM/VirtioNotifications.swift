import CKVM
import Devices
import KVM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An interrupt line driven through KVM's irqfd: a write to the eventfd pulses the GSI, from any
/// thread, without an ioctl. Virtio-mmio lines are edge-triggered, so raising is all there is.
struct IRQFDInterruptLine: InterruptLine {
    let fd: Int32

    init(vm: VirtualMachine, line: UInt32) throws(VMMError) {
        let fd = vireo_eventfd_cloexec(0)
        guard fd >= 0 else { throw .host(operation: "eventfd", errno: errno) }
        do { try vm.registerIRQFD(eventFD: fd, line: line) } catch {
            close(fd)
            throw .kvm(error)
        }
        self.fd = fd
    }

    func setLevel(_ high: Bool) {
        guard high else { return }
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }
}

/// Receives virtio queue notifications that KVM signals on ioeventfds (one per queue, matched
/// on the queue index written to QueueNotify) and runs the device's queue work on its own thread,
/// so a vCPU's notification costs no exit to this process and the vCPU runs on meanwhile.
/// A queue whose ioeventfd cannot be registered keeps the ordinary MMIO path.
final class NotificationDispatcher: @unchecked Sendable {
    private struct Entry {
        let fd: Int32
        let transport: VirtioMMIOTransport
        let queue: Int
    }
    private var entries: [Entry] = []
    private let wake = vireo_eventfd_cloexec(0)
    private let stopping = Atomic<Bool>(false)

    var isActive: Bool { !entries.isEmpty }

    /// Called while the machine is built, before `run()`.
    func attach(_ transport: VirtioMMIOTransport, notifyAddress: UInt64, vm: VirtualMachine) {
        for queue in 0..<transport.queueCount {
            let fd = vireo_eventfd_cloexec(0)
            guard fd >= 0 else { return }
            do {
                try vm.registerIOEventFD(address: notifyAddress, length: 4, eventFD: fd, value: UInt64(queue))
                entries.append(Entry(fd: fd, transport: transport, queue: queue))
            } catch {
                close(fd)
                vmmLog("ioeventfd for queue \(queue) at 0x\(String(notifyAddress, radix: 16)) unavailable (\(error)); using MMIO exits")
            }
        }
    }

    func stop() {
        stopping.store(true, ordering: .releasing)
        var one: UInt64 = 1
        _ = write(wake, &one, 8)
    }

    func run() {
        var descriptors = [pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
            + entries.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
        while !stopping.load(ordering: .acquiring) {
            if poll(&descriptors, nfds_t(descriptors.count), -1) < 0 {
                if errno == EINTR { continue }
                vmmLog("virtio notification thread: poll failed (errno \(errno))")
                return
            }
            for (index, descriptor) in descriptors.enumerated().dropFirst() where descriptor.revents != 0 {
                var count: UInt64 = 0
                _ = read(descriptor.fd, &count, 8)
                let entry = entries[index - 1]
                entry.transport.notify(queue: entry.queue)
            }
        }
    }
}
