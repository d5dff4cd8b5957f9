import DiskImage
import Foundation
import FuzzTargets
import Testing

/// The fuzz targets (scripts/fuzz.sh runs them under libFuzzer) with seeded pseudo-random
/// inputs, so every CI run covers them too. Passing means: the process is still here.
struct FuzzSmokeTests {
    struct SeededGenerator: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9e37_79b9_7f4a_7c15
            var z = state
            z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
            return z ^ (z >> 31)
        }
    }

    @Test func virtqueueTargetSurvivesHostileRings() {
        var random = SeededGenerator(state: 0x5eed)
        for round in 0..<2000 {
            // Mostly plausible layouts (size a power of two, rings on their own pages), with
            // random descriptor tables and indexes, and some entirely random headers.
            var input = [UInt8](repeating: 0, count: 8 + 4 * 4096)
            let size: UInt16 = round % 5 == 0 ? UInt16.random(in: 0...UInt16.max, using: &random) : 1 << UInt16.random(in: 0...8, using: &random)
            let pages: [UInt16] = round % 7 == 0 ? (0..<3).map { _ in UInt16.random(in: 0...UInt16.max, using: &random) } : [0, 1, 2]
            for (index, value) in ([size] + pages).enumerated() {
                input[2 * index] = UInt8(truncatingIfNeeded: value)
                input[2 * index + 1] = UInt8(truncatingIfNeeded: value >> 8)
            }
            for index in 8..<input.count where UInt8.random(in: 0...3, using: &random) == 0 {
                input[index] = UInt8.random(in: 0...255, using: &random)
            }
            // Make the available index plausible so chains are actually walked.
            input[8 + 4096 + 2] = UInt8.random(in: 0...9, using: &random)
            input.withUnsafeBytes { Fuzz.virtqueue($0) }
        }
    }

    @Test func qcow2TargetSurvivesMutatedImages() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-fuzz-seed-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let seedPath = directory.appendingPathComponent("seed.qcow2").path
        try DiskImages.create(path: seedPath, format: .qcow2, size: 8 << 20, clusterSize: 4096)
        do {
            let image = try DiskImages.open(path: seedPath)
            try image.write([UInt8](repeating: 7, count: 20000), at: 12345)
            try image.flush()
        }
        let seed = Array(try Data(contentsOf: URL(fileURLWithPath: seedPath)))
        var random = SeededGenerator(state: 0xc0ffee)
        for _ in 0..<400 {
            var input = seed
            for _ in 0..<Int.random(in: 1...16, using: &random) {
                // Mostly the header and first tables, where the parser's decisions are.
                let limit = Bool.random(using: &random) ? min(input.count, 512) : input.count
                input[Int.random(in: 0..<limit, using: &random)] = UInt8.random(in: 0...255, using: &random)
            }
            if Int.random(in: 0...9, using: &random) == 0 { input = Array(input.prefix(Int.random(in: 0...input.count, using: &random))) }
            input.withUnsafeBytes { Fuzz.qcow2($0) }
        }
    }
}
