import CHostSupport
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A token bucket that may be overdrawn: a request is served whole once the bucket holds a
/// token, and its cost is taken afterwards. The long-run rate is exact; a single request can
/// exceed the burst (a 1 MiB write through a 64 KiB burst), as with a real disk's queue.
struct TokenBucket {
    let rate: Double
    let capacity: Double
    var tokens: Double
    var updated: UInt64

    init(rate: UInt64, burst: UInt64?, now: UInt64) {
        self.rate = Double(rate)
        // Default burst: a tenth of a second's worth, so limits bite quickly but small requests flow.
        capacity = Double(max(1, burst ?? max(1, rate / 10)))
        tokens = capacity
        updated = now
    }

    mutating func refill(now: UInt64) {
        guard now > updated else { return }
        tokens = min(capacity, tokens + rate * Double(now - updated) / 1e9)
        updated = now
    }

    /// Nanoseconds until the bucket holds a whole token again (0: now).
    mutating func wait(now: UInt64) -> UInt64 {
        refill(now: now)
        return tokens >= 1 ? 0 : UInt64(((1 - tokens) / rate * 1e9).rounded(.up))
    }

    mutating func take(_ amount: UInt64, now: UInt64) {
        refill(now: now)
        tokens -= Double(amount)
    }
}

public final class RateLimiter: Sendable {
    private let buckets: Mutex<(bytes: TokenBucket?, operations: TokenBucket?)>
    public let limit: RateLimit

    public init(_ limit: RateLimit) {
        self.limit = limit
        let now = Self.now()
        buckets = Mutex((limit.bytesPerSecond.map { TokenBucket(rate: $0, burst: limit.bytesBurst, now: now) },
                         limit.operationsPerSecond.map { TokenBucket(rate: $0, burst: limit.operationsBurst, now: now) }))
    }

    static func now() -> UInt64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
    }

    /// Nanoseconds until another request may start; 0 when it may start now.
    public func delay() -> UInt64 {
        let now = Self.now()
        return buckets.withLock { buckets in
            max(buckets.bytes?.wait(now: now) ?? 0, buckets.operations?.wait(now: now) ?? 0)
        }
    }

    public func consume(bytes: UInt64, operations: UInt64 = 1) {
        let now = Self.now()
        buckets.withLock { buckets in
            buckets.bytes?.take(bytes, now: now)
            buckets.operations?.take(operations, now: now)
        }
    }
}

/// Calls back once a deadline passes, on the thread that runs `run`: how a throttled device
/// finishes its queue later without holding up a vCPU.
final class DeferredWork: Sendable {
    private let wake: Int32
    private let deadline = Mutex<UInt64?>(nil)
    private let stopping = Atomic<Bool>(false)

    init() {
        wake = vireo_eventfd_nonblocking()
    }

    deinit { if wake >= 0 { close(wake) } }

    /// Asks for `run`'s callback after `delay` nanoseconds (the earliest of several requests wins).
    func schedule(after delay: UInt64) {
        let due = RateLimiter.now() + delay
        deadline.withLock { current in current = min(current ?? due, due) }
        signal()
    }

    func stop() {
        stopping.store(true, ordering: .releasing)
        signal()
    }

    private func signal() {
        var one: UInt64 = 1
        _ = write(wake, &one, 8)
    }

    /// Blocks until `stop()`, calling `fire` whenever a scheduled deadline passes.
    func run(_ fire: () -> Void) {
        while !stopping.load(ordering: .acquiring) {
            let due = deadline.withLock { $0 }
            let now = RateLimiter.now()
            if let due, due <= now {
                deadline.withLock { $0 = nil }
                fire()
                continue
            }
            var descriptor = pollfd(fd: wake, events: Int16(POLLIN), revents: 0)
            let timeout = due.map { Int32(min(($0 - now) / 1_000_000 + 1, 60_000)) } ?? -1
            if poll(&descriptor, 1, timeout) > 0 {
                var value: UInt64 = 0
                _ = read(wake, &value, 8)
            }
        }
    }
}

/// A device with work of its own to do off the vCPU threads (network receive, throttled queues).
/// The VMM gives each one a thread that calls `runBackground()` and ends it with `stopBackground()`.
public protocol BackgroundDevice: AnyObject, Sendable {
    var needsBackgroundThread: Bool { get }
    func runBackground()
    func stopBackground()
}
