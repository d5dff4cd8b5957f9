import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// A plain OS thread. vCPUs and blocking console I/O run on these, never in Swift concurrency's
/// cooperative pool, because they block for as long as the guest runs.
final class HostThread: @unchecked Sendable {
    private final class Body {
        let name: String
        let work: @Sendable () -> Void
        init(name: String, work: @escaping @Sendable () -> Void) { self.name = name; self.work = work }
    }

    let handle: pthread_t

    private init(handle: pthread_t) { self.handle = handle }

    static func spawn(name: String, _ work: @escaping @Sendable () -> Void) throws(VMMError) -> HostThread {
        let body = Unmanaged.passRetained(Body(name: name, work: work)).toOpaque()
        var handle = pthread_t()
        let result = pthread_create(&handle, nil, { argument in
            guard let argument else { return nil }
            let body = Unmanaged<Body>.fromOpaque(argument).takeRetainedValue()
            _ = vireo_set_thread_name(String(body.name.prefix(15)))
            Confinement.enter(ThreadKind(threadName: body.name))
            body.work()
            return nil
        }, body)
        guard result == 0 else {
            Unmanaged<Body>.fromOpaque(body).release()
            throw .host(operation: "pthread_create \(name)", errno: result)
        }
        return HostThread(handle: handle)
    }

    func join() { pthread_join(handle, nil) }

    /// Interrupts a blocking system call in this thread (KVM_RUN returns EINTR).
    func kick() { pthread_kill(handle, vcpuKickSignal) }
}

/// The signal used to kick vCPU threads out of KVM_RUN. Its handler does nothing: the point is
/// the EINTR, and it is installed without SA_RESTART so the ioctl is not resumed.
let vcpuKickSignal = SIGUSR1

func installKickHandler() {
    var action = sigaction()
    action.__sigaction_handler.sa_handler = { _ in }
    sigemptyset(&action.sa_mask)
    action.sa_flags = 0
    sigaction(vcpuKickSignal, &action, nil)
}

/// Unblocks the kick signal in the calling thread. A parent may have started us with it blocked
/// (signal masks survive exec), and a vCPU that cannot be kicked cannot be stopped.
func acceptKicks() {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, vcpuKickSignal)
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
}
