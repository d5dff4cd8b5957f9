import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where vCPU threads wait while the VM is paused. A vCPU passes `checkpoint()` before every
/// KVM_RUN; `pause()` returns only once every vCPU that is still running has parked, so when it
/// returns the guest executes nothing until `resume()`.
final class PauseGate: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    // Guarded by `mutex`.
    private var paused = false
    private var released = false
    private var parked = 0
    private var running: Int
    /// Mirrors `paused` so the vCPU loop's check costs one atomic load, not a mutex, per exit.
    private let pauseRequested = Atomic<Bool>(false)

    init(vcpuCount: Int) {
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
        running = vcpuCount
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    private func locked<T>(_ body: () -> T) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return body()
    }

    var isPaused: Bool { locked { paused } }

    /// Called by a vCPU thread between runs. Returns true if it parked (the caller then clears the
    /// immediate-exit flag that sent it here).
    func checkpoint() -> Bool {
        // A pause that lands after this load still stops the vCPU: `pause()` sets immediate_exit
        // after the flag, so the next KVM_RUN returns at once and the next pass sees it.
        guard pauseRequested.load(ordering: .acquiring) else { return false }
        return locked {
            guard paused, !released else { return false }
            parked += 1
            pthread_cond_broadcast(condition)
            while paused && !released { pthread_cond_wait(condition, mutex) }
            parked -= 1
            return true
        }
    }

    /// A vCPU thread leaving for good, so `pause()` no longer waits for it.
    func vcpuExited() {
        locked {
            running -= 1
            pthread_cond_broadcast(condition)
        }
    }

    /// Marks the VM paused, lets `kick` push every vCPU out of the guest, and waits until all of
    /// them have parked. Returns false if it was already paused.
    func pause(kick: () -> Void) -> Bool {
        let changed = locked { () -> Bool in
            guard !paused else { return false }
            paused = true
            pauseRequested.store(true, ordering: .releasing)
            return true
        }
        guard changed else { return false }
        kick()
        locked {
            while parked < running && !released { pthread_cond_wait(condition, mutex) }
        }
        return true
    }

    /// Before any vCPU runs: every vCPU parks at its first checkpoint (a migrated VM that was
    /// paused on the source arrives paused).
    func startPaused() {
        locked {
            paused = true
            pauseRequested.store(true, ordering: .releasing)
        }
    }

    /// Whether a pause has been asked for, without taking the lock (a throttled vCPU's sleep ends early).
    var isPauseRequested: Bool { pauseRequested.load(ordering: .acquiring) }

    /// Returns false if it was not paused.
    func resume() -> Bool {
        locked {
            guard paused else { return false }
            paused = false
            pauseRequested.store(false, ordering: .releasing)
            pthread_cond_broadcast(condition)
            return true
        }
    }

    /// The VM is stopping: nobody parks again, and parked vCPUs leave.
    func release() {
        locked {
            released = true
            pthread_cond_broadcast(condition)
        }
    }
}
