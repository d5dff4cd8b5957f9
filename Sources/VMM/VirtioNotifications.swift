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
/// on the queue index written to QueueNotify) and runs the device's queue work on threads of its
/// own, so a vCPU's notification costs no exit to this process and the vCPU runs on meanwhile.
/// One thread (loop 0) serves every single-queue device; each queue of a device whose queues work
/// independently (a multiqueue disk) gets a loop and thread of its own, so one vCPU's request
/// never waits behind another's.
/// A queue whose ioeventfd cannot be registered keeps the ordinary MMIO path. For a device whose
/// queues another process serves (vhost-user), KVM signals that process's kick eventfds itself,
/// and this thread only turns its call eventfds into the used-buffer interrupt.
final class NotificationDispatcher: @unchecked Sendable {
    private struct Entry {
        enum Kind { case notify, backendUsedBuffers }
        let fd: Int32
        let transport: VirtioMMIOTransport
        let queue: Int
        var kind = Kind.notify
    }
    /// Each loop's descriptors; loop 0 is the shared one.
    private var loops: [[Entry]] = [[]]
    /// Never read: once written it stays readable, so every loop's poll sees it and ends.
    private let wake = vireo_eventfd_cloexec(0)
    private let stopping = Atomic<Bool>(false)

    /// The loops with something to wait for, each to be run on a thread of its own.
    var activeLoops: [Int] { loops.indices.filter { !loops[$0].isEmpty } }

    /// Called while the machine is built, before `run(loop:)`.
    func attach(_ transport: VirtioMMIOTransport, notifyAddress: UInt64, vm: VirtualMachine) {
        let ownLoops = transport.device.processesQueuesConcurrently && transport.queueCount > 1
        for queue in 0..<transport.queueCount {
            let fd = vireo_eventfd_cloexec(0)
            guard fd >= 0 else { return }
            do {
                try vm.registerIOEventFD(address: notifyAddress, length: 4, eventFD: fd, value: UInt64(queue))
                let entry = Entry(fd: fd, transport: transport, queue: queue)
                if ownLoops { loops.append([entry]) } else { loops[0].append(entry) }
            } catch {
                close(fd)
                vmmLog("ioeventfd for queue \(queue) at 0x\(String(notifyAddress, radix: 16)) unavailable (\(error)); using MMIO exits")
            }
        }
    }

    /// A vhost-user device: each queue's kick eventfd registered as its ioeventfd (when
    /// `notifyAddress` is given; else notifications come as MMIO exits, which the device passes
    /// on), and each call eventfd watched here.
    func attach(external device: any VirtioExternalQueues, transport: VirtioMMIOTransport, notifyAddress: UInt64?, vm: VirtualMachine) {
        if let notifyAddress {
            for (queue, fd) in device.kickDescriptors.enumerated() {
                do {
                    try vm.registerIOEventFD(address: notifyAddress, length: 4, eventFD: fd, value: UInt64(queue))
                } catch {
                    vmmLog("ioeventfd for queue \(queue) at 0x\(String(notifyAddress, radix: 16)) unavailable (\(error)); using MMIO exits")
                }
            }
        }
        for (queue, fd) in device.callDescriptors.enumerated() {
            loops[0].append(Entry(fd: fd, transport: transport, queue: queue, kind: .backendUsedBuffers))
        }
    }

    func stop() {
        stopping.store(true, ordering: .releasing)
        var one: UInt64 = 1
        _ = write(wake, &one, 8)
    }

    func run(loop: Int) {
        let entries = loops[loop]
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
                switch entry.kind {
                case .notify: entry.transport.notify(queue: entry.queue)
                case .backendUsedBuffers: entry.transport.signalUsedBuffers()
                }
            }
        }
    }
}
