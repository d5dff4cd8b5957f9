import MachineSpec
import Testing
@testable import Devices

struct TokenBucketTests {
    @Test func burstThenSustainedRate() {
        var bucket = TokenBucket(rate: 1000, burst: 100, now: 0)
        #expect(bucket.wait(now: 0) == 0)
        bucket.take(100, now: 0)                       // the whole burst
        #expect(bucket.wait(now: 0) > 0)               // empty: wait
        #expect(bucket.wait(now: 2_000_000) == 0)      // 2 ms later: 2 tokens back
        bucket.take(500, now: 2_000_000)               // overdraw by 498
        let wait = bucket.wait(now: 2_000_000)
        #expect(wait >= 498_000_000 && wait <= 500_000_000, "\(wait) ns")
        #expect(bucket.wait(now: 2_000_000 + 500_000_000) == 0)
    }

    @Test func refillNeverExceedsTheBurst() {
        var bucket = TokenBucket(rate: 1000, burst: 10, now: 0)
        bucket.take(10, now: 0)
        bucket.refill(now: 60_000_000_000)             // a minute idle
        #expect(bucket.tokens == 10)
    }

    @Test func defaultBurstIsATenthOfASecond() {
        let bucket = TokenBucket(rate: 10_000, burst: nil, now: 0)
        #expect(bucket.capacity == 1000)
        #expect(TokenBucket(rate: 5, burst: nil, now: 0).capacity == 1)
    }

    @Test func limiterWaitsForTheSlowestBucket() {
        let limiter = RateLimiter(RateLimit(bytesPerSecond: 1 << 30, operationsPerSecond: 10, operationsBurst: 1))
        #expect(limiter.delay() == 0)
        limiter.consume(bytes: 512)
        let delay = limiter.delay()
        #expect(delay > 50_000_000 && delay <= 100_000_000, "\(delay) ns")
    }
}
