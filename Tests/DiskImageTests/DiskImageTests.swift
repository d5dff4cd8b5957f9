import CHostSupport
import DiskImage
import Foundation
import MachineSpec
import Testing

/// Runs a peer tool (qemu-img, qemu-io); the peer is the oracle for every image Vireo writes.
/// Not through Foundation's Process, whose Swift 6.3 version crashes now and then on Linux
/// (swift-corelibs-foundation #5472).
@discardableResult
func tool(_ arguments: [String]) throws -> (status: Int32, output: String) {
    var output = [UInt8](repeating: 0, count: 1 << 20)
    var length = 0
    let argv = arguments.map { strdup($0) } + [nil]
    defer { for pointer in argv { free(pointer) } }
    let status = argv.withUnsafeBufferPointer { vireo_run_collecting(arguments[0], $0.baseAddress, &output, output.count, &length) }
    return (status, String(decoding: output[0..<length], as: UTF8.self))
}

func scratchDirectory() throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-disk-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

func qemuCheck(_ path: String) throws {
    let result = try tool(["qemu-img", "check", path])
    #expect(result.status == 0, "qemu-img check \(path): \(result.output)")
    #expect(result.output.contains("No errors were found"), "\(result.output)")
}

/// The image's content as QEMU sees it, through `qemu-img convert -O raw`.
func contentAccordingToQEMU(_ path: String, in directory: URL) throws -> [UInt8] {
    let raw = directory.appendingPathComponent("qemu-view-\(UUID().uuidString).raw").path
    let result = try tool(["qemu-img", "convert", "-O", "raw", path, raw])
    #expect(result.status == 0, "\(result.output)")
    return Array(try Data(contentsOf: URL(fileURLWithPath: raw)))
}

func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
}

@Suite struct QCOW2Tests {
    @Test("Images Vireo creates and writes pass qemu-img check and hold exactly what was written",
          arguments: [UInt64(512), 4096, 65536, 2 << 20])
    func writeThenCheckWithQEMU(clusterSize: UInt64) throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("disk.qcow2").path
        let size: UInt64 = 8 << 20
        try DiskImages.create(path: path, format: .qcow2, size: size, clusterSize: clusterSize)
        try qemuCheck(path)
        var model = [UInt8](repeating: 0, count: Int(size))
        let image = try DiskImages.open(path: path)
        #expect(image.format == .qcow2)
        #expect(image.virtualSize == size)
        let writes: [(UInt64, Int)] = [(0, 512), (4095, 3000), (65536 * 3 + 17, 200_000), (size - 1000, 1000), (1 << 20, 1)]
        for (index, (offset, length)) in writes.enumerated() {
            let data = pattern(length, seed: UInt8(index + 1))
            try image.write(data, at: offset)
            model.replaceSubrange(Int(offset)..<Int(offset) + length, with: data)
        }
        // Overwrite inside an allocated cluster.
        try image.write([0xee, 0xee], at: 10)
        model[10] = 0xee; model[11] = 0xee
        try image.flush()
        #expect(try image.readBytes(count: Int(size), at: 0) == model)
        try qemuCheck(path)
        #expect(try contentAccordingToQEMU(path, in: directory) == model)
        let info = try tool(["qemu-img", "info", path])
        #expect(info.output.contains("cluster_size: \(clusterSize)"))
    }

    @Test("Images qemu-img creates and qemu-io writes read back byte-exact", arguments: [UInt64(512), 4096, 65536, 2 << 20])
    func readQEMUWrittenImages(clusterSize: UInt64) throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("q.qcow2").path
        #expect(try tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", path, "6M"]).status == 0)
        let io = try tool(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 100k", "-c", "write -P 0xa5 3000k 7k",
                           "-c", "write -z 20k 40k", "-c", "write -P 0x11 5119k 1k", path])
        #expect(io.status == 0, "\(io.output)")
        let expected = try contentAccordingToQEMU(path, in: directory)
        let image = try DiskImages.open(path: path)
        #expect(try image.readBytes(count: expected.count, at: 0) == expected)
        // And Vireo's writes into QEMU's image keep it consistent.
        try image.write(pattern(70_000, seed: 9), at: 50_000)
        try image.flush()
        try qemuCheck(path)
        var model = expected
        model.replaceSubrange(50_000..<120_000, with: pattern(70_000, seed: 9))
        #expect(try contentAccordingToQEMU(path, in: directory) == model)
    }

    @Test("A qcow2 overlay reads through to its backing file and copies on write; the base is untouched",
          arguments: ["raw", "qcow2"])
    func backingFileCopyOnWrite(baseFormat: String) throws {
        let directory = try scratchDirectory()
        let base = directory.appendingPathComponent("base.\(baseFormat)").path
        #expect(try tool(["qemu-img", "create", "-q", "-f", baseFormat, base, "4M"]).status == 0)
        #expect(try tool(["qemu-io", "-f", baseFormat, "-c", "write -P 0x42 0 4M", base]).status == 0)
        let baseBefore = try contentAccordingToQEMU(base, in: directory)
        let overlay = directory.appendingPathComponent("overlay.qcow2").path
        try DiskImages.create(path: overlay, format: .qcow2, size: 4 << 20, backing: BackingLayer(path: "base.\(baseFormat)", format: DiskFormat(rawValue: baseFormat)!))
        let image = try DiskImages.open(path: overlay)
        #expect(try image.readBytes(count: 4 << 20, at: 0) == baseBefore)
        try image.write([1, 2, 3], at: 70_000)
        try image.flush()
        var model = baseBefore
        model.replaceSubrange(70_000..<70_003, with: [1, 2, 3])
        #expect(try image.readBytes(count: 4 << 20, at: 0) == model)
        try qemuCheck(overlay)
        #expect(try contentAccordingToQEMU(overlay, in: directory) == model)
        #expect(try contentAccordingToQEMU(base, in: directory) == baseBefore)
        let info = try image.info()
        #expect(info.backingChain == [directory.path + "/base.\(baseFormat)"])
        let qemuInfo = try tool(["qemu-img", "info", overlay])
        #expect(qemuInfo.output.contains("backing file: base.\(baseFormat)"))
        #expect(qemuInfo.output.contains("backing file format: \(baseFormat)"))
    }

    @Test("Thin provisioning: a new 1 TiB image takes a few clusters, and grows only where written")
    func thinProvisioning() throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("big.qcow2").path
        try DiskImages.create(path: path, format: .qcow2, size: 1 << 40)
        let image = try DiskImages.open(path: path)
        let before = try image.info().allocatedBytes
        #expect(before < 2 << 20)
        try image.write(pattern(4096, seed: 3), at: 700 << 30)
        try image.flush()
        #expect(try image.info().allocatedBytes - before <= 3 * 65536)
        try qemuCheck(path)
    }

    @Test("Resize grows the disk; qemu-img agrees; shrinking is refused")
    func resize() throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("r.qcow2").path
        try DiskImages.create(path: path, format: .qcow2, size: 1 << 30)
        do {
            let image = try #require(try DiskImages.open(path: path) as? QCOW2Image)
            try image.write([7], at: (1 << 30) - 1)
            try image.resize(to: 3 << 30)
            #expect(throws: DiskImageError.self) { try image.resize(to: 1 << 20) }
        }
        try qemuCheck(path)
        #expect(try tool(["qemu-img", "info", path]).output.contains("virtual size: 3 GiB"))
        let reopened = try DiskImages.open(path: path)
        #expect(reopened.virtualSize == 3 << 30)
        #expect(try reopened.readBytes(count: 1, at: (1 << 30) - 1) == [7])
    }

    @Test("Out-of-range accesses are refused, never performed")
    func boundsChecked() throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("b.qcow2").path
        try DiskImages.create(path: path, format: .qcow2, size: 1 << 20)
        let image = try DiskImages.open(path: path)
        #expect(throws: DiskImageError.outOfRange(path: path, offset: (1 << 20) - 1, length: 2, size: 1 << 20)) {
            try image.write([1, 2], at: (1 << 20) - 1)
        }
        #expect(throws: DiskImageError.self) { try image.readBytes(count: 1, at: UInt64.max) }
        try qemuCheck(path)
    }

    @Test("Compressed clusters (qemu-img convert -c) read back byte-exact; overwriting one keeps refcounts right",
          arguments: [UInt64(4096), 65536])
    func compressedClusters(clusterSize: UInt64) throws {
        let directory = try scratchDirectory()
        let raw = directory.appendingPathComponent("src.raw").path
        let compressed = directory.appendingPathComponent("c.qcow2").path
        #expect(try tool(["qemu-img", "create", "-q", "-f", "raw", raw, "1M"]).status == 0)
        // Compressible but not uniform, so every cluster really is deflated.
        try Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: ($0 / 7) ^ ($0 >> 12)) }).write(to: URL(fileURLWithPath: raw))
        #expect(try tool(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=\(clusterSize)", raw, compressed]).status == 0)
        let original = Array(try Data(contentsOf: URL(fileURLWithPath: raw)))
        let image = try DiskImages.open(path: compressed)
        #expect(try image.readBytes(count: 1 << 20, at: 0) == original)
        var model = original
        try image.write([9, 9, 9], at: 5000)
        model.replaceSubrange(5000..<5003, with: [9, 9, 9])
        try image.flush()
        #expect(try image.readBytes(count: 1 << 20, at: 0) == model)
        try qemuCheck(compressed)
        #expect(try contentAccordingToQEMU(compressed, in: directory) == model)
    }

    @Test("Malformed images give an error, never a crash: every header byte mutated")
    func malformedHeaders() throws {
        let directory = try scratchDirectory()
        let good = directory.appendingPathComponent("good.qcow2").path
        try DiskImages.create(path: good, format: .qcow2, size: 4 << 20, clusterSize: 4096)
        let original = Array(try Data(contentsOf: URL(fileURLWithPath: good)))
        // A fixed seed, named in every failure, so a failing mutation can be replayed.
        let seed: UInt64 = 0x0dd_ba11
        var generator = SeededBytes(state: seed)
        var refusedCount = 0
        for position in 0..<112 {
            for value: UInt8 in [0x00, 0xff, generator.next()] where value != original[position] {
                var bytes = original
                bytes[position] = value
                let path = directory.appendingPathComponent("m.qcow2").path
                try? FileManager.default.removeItem(atPath: path)
                try Data(bytes).write(to: URL(fileURLWithPath: path))
                let context = "header byte \(position) set to 0x\(String(value, radix: 16)) (seed 0x\(String(seed, radix: 16)))"
                do {
                    let image = try DiskImages.open(path: path, format: .qcow2)
                    // Accepted: whatever the change meant, reads and writes answer, and a read
                    // within the disk returns exactly what was asked for or a clear error.
                    if let read = try? image.readBytes(count: 4096, at: 0) { #expect(read.count == 4096, "\(context)") }
                    _ = try? image.write(pattern(5000, seed: 1), at: 100)
                } catch {
                    refusedCount += 1
                    // Refused: the error names the file and says what is wrong with it.
                    #expect(error.description.hasPrefix(path), "\(context): \(error)")
                    switch error {
                    case .invalidImage, .unsupported, .outOfRange: break
                    default: Issue.record("\(context): unexpected kind of error \(error)")
                    }
                }
                // The magic and the version are not negotiable.
                if position < 8 {
                    #expect((try? DiskImages.open(path: path, format: .qcow2)) == nil, "\(context) was accepted")
                }
            }
        }
        #expect(refusedCount >= 16, "only \(refusedCount) mutations were refused")
        let truncated = directory.appendingPathComponent("t.qcow2").path
        try Data(original.prefix(50)).write(to: URL(fileURLWithPath: truncated))
        #expect(throws: DiskImageError.self) { try DiskImages.open(path: truncated, format: .qcow2) }
    }
}

@Suite struct RawImageTests {
    @Test func sparseByDefaultPreallocatedOnRequest() throws {
        let directory = try scratchDirectory()
        let thin = directory.appendingPathComponent("thin.raw").path
        try DiskImages.create(path: thin, format: .raw, size: 256 << 20)
        #expect(try DiskImages.open(path: thin).info().allocatedBytes < 1 << 20)
        let full = directory.appendingPathComponent("full.raw").path
        try DiskImages.create(path: full, format: .raw, size: 16 << 20, preallocate: true)
        #expect(try DiskImages.open(path: full).info().allocatedBytes >= 16 << 20)
    }

    @Test func neverOverwritesAnExistingFile() throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("precious.img").path
        try Data("user data".utf8).write(to: URL(fileURLWithPath: path))
        for format in DiskFormat.allCases {
            #expect(throws: DiskImageError.alreadyExists(path: path)) {
                try DiskImages.create(path: path, format: format, size: 1 << 20)
            }
        }
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "user data")
    }

    @Test func readWriteAndBounds() throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("r.raw").path
        try DiskImages.create(path: path, format: .raw, size: 1 << 20)
        do {
            let image = try DiskImages.open(path: path)
            #expect(image.format == .raw)
            try image.write(pattern(3000, seed: 5), at: 1000)
            #expect(try image.readBytes(count: 3000, at: 1000) == pattern(3000, seed: 5))
            #expect(throws: DiskImageError.self) { try image.write([1], at: 1 << 20) }
            // A second opener conflicts with the writer, whether it wants to read or write.
            #expect(throws: DiskImageError.inUse(path: path)) { try DiskImages.open(path: path, readOnly: true) }
            #expect(throws: DiskImageError.inUse(path: path)) { try DiskImages.open(path: path) }
        }
        let readOnly = try DiskImages.open(path: path, readOnly: true)
        let alsoReadOnly = try DiskImages.open(path: path, readOnly: true)
        #expect(throws: DiskImageError.readOnly(path: path)) { try readOnly.write([1], at: 0) }
        #expect(try alsoReadOnly.readBytes(count: 3000, at: 1000) == pattern(3000, seed: 5))
    }
}

/// `cache=none`: O_DIRECT, with bounces for whatever a guest sends unaligned.
@Suite struct DirectIOTests {
    @Test("cache=none: unaligned buffers, offsets and lengths read and write byte-exact (a buffered reader agrees); a file whose size is no block multiple keeps its size")
    func unalignedTransfersBounce() throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("odd.raw").path
        let size: UInt64 = (3 << 20) + 1000
        try DiskImages.create(path: path, format: .raw, size: size)
        let image = try DiskImages.open(path: path, format: .raw, direct: true)
        // An odd address inside a larger buffer, odd offsets and lengths, one across a bounce
        // chunk, one ending at the file's unaligned end.
        let cases: [(offset: UInt64, count: Int, seed: UInt8)] = [(1, 100, 1), (4095, 2, 2), (8192, 4096, 3), (10_000, (1 << 20) + 5000, 4),
                                                                  (size - 700, 700, 5), (512, 512, 6)]
        for entry in cases {
            var bytes = [UInt8](repeating: 0, count: entry.count + 3)
            let data = pattern(entry.count, seed: entry.seed)
            bytes.replaceSubrange(3..<(3 + entry.count), with: data)
            try bytes.withUnsafeBytes { buffer in
                try image.write(UnsafeRawBufferPointer(rebasing: buffer[3...]), at: entry.offset)
            }
            var back = [UInt8](repeating: 0xaa, count: entry.count + 5)
            try back.withUnsafeMutableBytes { buffer in
                try image.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[5...]), at: entry.offset)
            }
            #expect(Array(back[5...]) == data, "at \(entry.offset), \(entry.count) bytes")
        }
        try image.flush()
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.size] as? NSNumber)?.uint64Value == size, "the bounce's padding grew the file")
        // The last write of each range wins, as a buffered reader sees it.
        var expected = [UInt8](repeating: 0, count: Int(size))
        for entry in cases { expected.replaceSubrange(Int(entry.offset)..<Int(entry.offset) + entry.count, with: pattern(entry.count, seed: entry.seed)) }
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: path))) == expected)
        // Unaligned zeroing and out-of-range accesses behave as without O_DIRECT.
        #expect(throws: DiskImageError.self) { try image.write([1, 2], at: size - 1) }
    }

    @Test("cache=none: a qcow2 image written through O_DIRECT (metadata in small unaligned pieces) passes qemu-img check and holds what was written")
    func qcow2ThroughDirectIO() throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("d.qcow2").path
        try DiskImages.create(path: path, format: .qcow2, size: 64 << 20)
        do {
            let image = try DiskImages.open(path: path, format: .qcow2, direct: true)
            try image.write(pattern(5000, seed: 9), at: 3 << 20 + 17)
            try image.write(pattern(70_000, seed: 10), at: 40 << 20)
            try image.flush()
            #expect(try image.readBytes(count: 5000, at: 3 << 20 + 17) == pattern(5000, seed: 9))
        }
        try qemuCheck(path)
        let content = try contentAccordingToQEMU(path, in: directory)
        #expect(Array(content[(3 << 20 + 17)..<(3 << 20 + 17 + 5000)]) == pattern(5000, seed: 9))
        #expect(Array(content[(40 << 20)..<(40 << 20 + 70_000)]) == pattern(70_000, seed: 10))
    }
}

@Suite struct WriteZeroesTests {
    @Test("qcow2: zeroing whole and partial clusters reads back zeros, frees clusters, and stays clean",
          arguments: [UInt64(4096), 65536])
    func qcow2WriteZeroes(clusterSize: UInt64) throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("z.qcow2").path
        let size: UInt64 = 4 << 20
        try DiskImages.create(path: path, format: .qcow2, size: size, clusterSize: clusterSize)
        let image = try DiskImages.open(path: path)
        var model = pattern(Int(size), seed: 3)
        try image.write(model, at: 0)
        try image.flush()
        let before = try image.info().allocatedBytes
        let start = Int(clusterSize) + 100, length = 5 * Int(clusterSize)
        try image.writeZeroes(at: UInt64(start), length: UInt64(length))
        model.replaceSubrange(start..<start + length, with: [UInt8](repeating: 0, count: length))
        try image.writeZeroes(at: size - clusterSize, length: clusterSize)
        model.replaceSubrange(Int(size - clusterSize)..<Int(size), with: [UInt8](repeating: 0, count: Int(clusterSize)))
        try image.flush()
        #expect(try image.readBytes(count: Int(size), at: 0) == model)
        #expect(try image.info().allocatedBytes < before)
        try qemuCheck(path)
        #expect(try contentAccordingToQEMU(path, in: directory) == model)
        // A zeroed cluster can be written again.
        try image.write([1, 2, 3], at: size - clusterSize + 10)
        model.replaceSubrange(Int(size - clusterSize) + 10..<Int(size - clusterSize) + 13, with: [1, 2, 3])
        try image.flush()
        try qemuCheck(path)
        #expect(try contentAccordingToQEMU(path, in: directory) == model)
    }

    @Test("qcow2 overlay: zeroed clusters hide the backing file instead of exposing it")
    func zeroesHideTheBackingFile() throws {
        let directory = try scratchDirectory()
        let base = directory.appendingPathComponent("base.raw").path
        try Data(pattern(1 << 20, seed: 9)).write(to: URL(fileURLWithPath: base))
        let overlay = directory.appendingPathComponent("o.qcow2").path
        try DiskImages.create(path: overlay, format: .qcow2, size: 1 << 20, backing: BackingLayer(path: "base.raw", format: .raw))
        let image = try DiskImages.open(path: overlay)
        try image.writeZeroes(at: 65536, length: 65536)
        var model = pattern(1 << 20, seed: 9)
        model.replaceSubrange(65536..<131072, with: [UInt8](repeating: 0, count: 65536))
        try image.flush()
        #expect(try image.readBytes(count: 1 << 20, at: 0) == model)
        try qemuCheck(overlay)
        #expect(try contentAccordingToQEMU(overlay, in: directory) == model)
    }

    @Test("Zeroing a compressed cluster drops its references; qemu-img check stays clean")
    func zeroCompressedCluster() throws {
        let directory = try scratchDirectory()
        let raw = directory.appendingPathComponent("src.raw").path
        let compressed = directory.appendingPathComponent("c.qcow2").path
        try Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: ($0 / 5) ^ ($0 >> 11)) }).write(to: URL(fileURLWithPath: raw))
        #expect(try tool(["qemu-img", "convert", "-c", "-O", "qcow2", raw, compressed]).status == 0)
        var model = Array(try Data(contentsOf: URL(fileURLWithPath: raw)))
        let image = try DiskImages.open(path: compressed)
        try image.writeZeroes(at: 0, length: 3 * 65536)
        model.replaceSubrange(0..<3 * 65536, with: [UInt8](repeating: 0, count: 3 * 65536))
        try image.flush()
        #expect(try image.readBytes(count: 1 << 20, at: 0) == model)
        try qemuCheck(compressed)
        #expect(try contentAccordingToQEMU(compressed, in: directory) == model)
    }

    @Test("raw: zeroing punches a hole; the file gets smaller on the host and reads zeros")
    func rawPunchesHoles() throws {
        let directory = try scratchDirectory()
        let path = directory.appendingPathComponent("r.raw").path
        try DiskImages.create(path: path, format: .raw, size: 8 << 20, preallocate: true)
        let image = try DiskImages.open(path: path)
        try image.write(pattern(8 << 20, seed: 1), at: 0)
        try image.flush()
        let before = try image.info().allocatedBytes
        try image.writeZeroes(at: 1 << 20, length: 4 << 20)
        #expect(try image.info().allocatedBytes <= before - (4 << 20))
        #expect(try image.readBytes(count: 4 << 20, at: 1 << 20).allSatisfy { $0 == 0 })
        #expect(try image.readBytes(count: 100, at: 0) == Array(pattern(8 << 20, seed: 1)[0..<100]))
        #expect(throws: DiskImageError.self) { try image.writeZeroes(at: 8 << 20, length: 1) }
    }
}

/// Internal snapshots made by qemu-img read back as they were, alongside the changed active disk.
struct QCOW2SnapshotTests {
    @Test func snapshotsMadeByQemuReadBackByteExact() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-snap-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let path = directory.appendingPathComponent("snap.qcow2").path
        func run(_ arguments: [String]) throws {
            let result = try tool(arguments)
            #expect(result.status == 0, "\(arguments.joined(separator: " ")): \(result.output)")
        }
        try run(["qemu-img", "create", "-q", "-f", "qcow2", path, "4M"])
        try run(["qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 4k", path])
        try run(["qemu-img", "snapshot", "-c", "before", path])
        try run(["qemu-io", "-c", "write -P 0x33 0 4k", "-c", "write -P 0x44 2M 4k", path])
        try run(["qemu-img", "resize", "-q", path, "8M"])
        try run(["qemu-img", "snapshot", "-c", "after", path])

        let info = try DiskImages.open(path: path, readOnly: true).info()
        #expect(info.snapshots.map(\.name) == ["before", "after"])
        #expect(info.snapshots.map(\.virtualSize) == [4 << 20, 8 << 20])
        #expect(info.snapshots.allSatisfy { $0.vmStateSize == 0 && $0.date > 1_600_000_000 })

        for (snapshot, size) in [("before", 4 << 20), ("after", 8 << 20), ("1", 4 << 20)] {
            let image = try DiskImages.open(path: path, readOnly: true, snapshot: snapshot)
            #expect(image.virtualSize == UInt64(size))
            let name = snapshot == "1" ? "before" : snapshot
            let expected = directory.appendingPathComponent("\(name).raw").path
            try run(["qemu-img", "convert", "-l", "snapshot.name=\(name)", "-O", "raw", path, expected])
            // qemu-img presents a snapshot at the active image's current size; the snapshot's own
            // disk size (what Vireo uses) is the prefix, and the rest reads as zeros there.
            let reference = Array(try Data(contentsOf: URL(fileURLWithPath: expected)))
            #expect(try image.readBytes(count: size, at: 0) == Array(reference.prefix(size)), "snapshot \(snapshot) differs from qemu-img's view")
            #expect(reference.dropFirst(size).allSatisfy { $0 == 0 })
        }
        let active = try DiskImages.open(path: path, readOnly: true)
        #expect(try active.readBytes(count: 4096, at: 0) == [UInt8](repeating: 0x33, count: 4096))
        #expect(try active.readBytes(count: 4096, at: 2 << 20) == [UInt8](repeating: 0x44, count: 4096))

        #expect(throws: DiskImageError.self) { try DiskImages.open(path: path, readOnly: true, snapshot: "missing") }
        #expect(throws: DiskImageError.self) { try DiskImages.open(path: path, readOnly: false, snapshot: "before") }
    }
}

/// Header fields the fuzzer (scripts/fuzz.sh qcow2) found overflowing offset arithmetic: each
/// is now a clear "not a valid disk image" error instead of a trap.
struct QCOW2HostileHeaderTests {
    func patched(_ patch: (inout [UInt8]) -> Void) throws -> String {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-hostile-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let path = directory.appendingPathComponent("image.qcow2").path
        try DiskImages.create(path: path, format: .qcow2, size: 1 << 20)
        var bytes = Array(try Data(contentsOf: URL(fileURLWithPath: path)))
        patch(&bytes)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    func setBigEndian(_ value: UInt64, at offset: Int, width: Int, in bytes: inout [UInt8]) {
        for index in 0..<width { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(width - 1 - index))) }
    }

    @Test(arguments: [
        ("L1 table offset", 40, 8, UInt64(0xffff_ffff_ffff_0000)),
        ("refcount table offset", 48, 8, UInt64(0xffff_ffff_ffff_0000)),
        ("backing file offset", 8, 8, UInt64(0xffff_ffff_ffff_ff00)),
        ("snapshot table offset", 64, 8, UInt64(0xffff_ffff_ffff_fff8)),
    ])
    func offsetsNearTheTopOfTheAddressSpace(_ field: String, _ offset: Int, _ width: Int, _ value: UInt64) throws {
        let path = try patched { bytes in
            setBigEndian(value, at: offset, width: width, in: &bytes)
            if offset == 8 { setBigEndian(16, at: 16, width: 4, in: &bytes) }     // a backing name length
            if offset == 64 { setBigEndian(1, at: 60, width: 4, in: &bytes) }     // one snapshot
        }
        #expect(throws: DiskImageError.self, "\(field)") { try DiskImages.open(path: path, readOnly: true) }
    }
}

/// A splitmix64 byte source: the same seed gives the same bytes on every run and machine.
struct SeededBytes {
    var state: UInt64
    mutating func next() -> UInt8 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return UInt8(truncatingIfNeeded: z ^ (z >> 31))
    }
}

extension DiskImages {
    /// The tests name their images by extension; overlays follow the chain their headers name.
    static func open(path: String, readOnly: Bool = false, snapshot: String? = nil) throws(DiskImageError) -> any DiskImage {
        try open(path: path, format: DiskFormat.declared(byName: path) ?? .qcow2, readOnly: readOnly, snapshot: snapshot, backing: .fromHeader)
    }
}

/// A disk's format and chain are what its definition says (docs/security.md): the bytes of an
/// image never choose them.
@Suite struct RecordedChainTests {
    /// A qcow2 header naming `backing` (format `format`), as qemu-img writes one.
    static func header(in directory: URL, backing: String, format: String = "raw") throws -> [UInt8] {
        let path = directory.appendingPathComponent("h-\(UUID().uuidString).qcow2").path
        #expect(try tool(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", format, "-b", backing, path, "1M"]).status == 0)
        defer { unlink(path) }
        return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    @Test("a raw disk whose bytes are a qcow2 header is read as raw: its bytes, nothing the header names")
    func rawStaysRaw() throws {
        let directory = try scratchDirectory()
        let secret = directory.appendingPathComponent("secret").path
        try Data(repeating: 0x5a, count: 4096).write(to: URL(fileURLWithPath: secret))
        let raw = directory.appendingPathComponent("guest.raw").path
        try DiskImages.create(path: raw, format: .raw, size: 1 << 20)
        let bytes = try Self.header(in: directory, backing: secret)
        let image = try DiskImages.open(path: raw, format: .raw)
        try image.write(bytes, at: 0)
        try image.flush()
        #expect(try image.readBytes(count: 4096, at: 0) == Array(bytes.prefix(4096)))
        #expect(try image.info().backingChain.isEmpty)
        // Recorded raw, opened with a chain: refused before anything is opened.
        #expect(throws: DiskImageError.self) {
            try DiskImages.open(path: raw, format: .raw, backing: .recorded([BackingLayer(path: secret, format: .raw)]))
        }
    }

    @Test("a qcow2 image is opened only on the chain recorded for it: a header naming anything else, or naming nothing when a layer is recorded, is refused with both named")
    func headerHeldToRecord() throws {
        let directory = try scratchDirectory()
        let base = directory.appendingPathComponent("base.raw").path
        let other = directory.appendingPathComponent("other.raw").path
        for path in [base, other] { try DiskImages.create(path: path, format: .raw, size: 1 << 20) }
        let overlay = directory.appendingPathComponent("overlay.qcow2").path
        try DiskImages.create(path: overlay, format: .qcow2, size: 1 << 20, backing: BackingLayer(path: "base.raw", format: .raw))
        // What it records: opens, and rests on the base.
        do {
            let opened = try DiskImages.open(path: overlay, format: .qcow2, backing: .recorded([BackingLayer(path: base, format: .raw)]))
            #expect(try opened.info().backingChain == [base])
        }
        // Recorded as resting on nothing, or on another file: refused, naming both.
        do {
            _ = try DiskImages.open(path: overlay, format: .qcow2, readOnly: true)
            Issue.record("a header naming an unrecorded backing file was followed")
        } catch {
            #expect(error == .unrecordedBacking(path: overlay, named: directory.path + "/base.raw", recorded: nil), "\(error)")
        }
        do {
            _ = try DiskImages.open(path: overlay, format: .qcow2, readOnly: true, backing: .recorded([BackingLayer(path: other, format: .raw)]))
            Issue.record("a header naming another file was followed")
        } catch {
            #expect(error == .unrecordedBacking(path: overlay, named: directory.path + "/base.raw", recorded: other), "\(error)")
        }
        // The format the header records must agree with the definition's.
        #expect(throws: DiskImageError.self) {
            try DiskImages.open(path: overlay, format: .qcow2, readOnly: true, backing: .recorded([BackingLayer(path: base, format: .qcow2)]))
        }
        // A standalone image recorded as resting on a layer: refused too.
        let standalone = directory.appendingPathComponent("standalone.qcow2").path
        try DiskImages.create(path: standalone, format: .qcow2, size: 1 << 20)
        #expect(throws: DiskImageError.self) {
            try DiskImages.open(path: standalone, format: .qcow2, readOnly: true, backing: .recorded([BackingLayer(path: base, format: .raw)]))
        }
    }

    @Test("following a header needs the format it records: a backing file without one is refused, never probed")
    func headerWithoutFormat() throws {
        let directory = try scratchDirectory()
        let base = directory.appendingPathComponent("base.img").path
        try DiskImages.create(path: base, format: .qcow2, size: 1 << 20)
        let overlay = directory.appendingPathComponent("overlay.qcow2").path
        try DiskImages.create(path: overlay, format: .qcow2, size: 1 << 20, backing: BackingLayer(path: "base.img", format: .qcow2))
        let references = try QCOW2References.read(path: overlay)
        #expect(references.backingName == "base.img" && references.backingFormat == .qcow2)
        // Drop the recorded format, as images made by an old qemu-img lack it:
        var bytes = Array(try Data(contentsOf: URL(fileURLWithPath: overlay)))
        // the backing-format extension's type field, zeroed, ends the extension list before it.
        if let at = (104..<4096).first(where: { bytes[$0] == 0xe2 && bytes[$0 + 1] == 0x79 && bytes[$0 + 2] == 0x2a && bytes[$0 + 3] == 0xca }) {
            for index in at..<at + 8 { bytes[index] = 0 }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: overlay))
        #expect(try QCOW2References.read(path: overlay).backingFormat == nil)
        #expect(throws: DiskImageError.self) { try DiskImages.open(path: overlay, format: .qcow2, readOnly: true, backing: .fromHeader) }
    }

    @Test("the references of a qcow2 header are read without following them: backing file and format, external data file")
    func references() throws {
        let directory = try scratchDirectory()
        let plain = directory.appendingPathComponent("plain.qcow2").path
        #expect(try tool(["qemu-img", "create", "-q", "-f", "qcow2", plain, "1M"]).status == 0)
        #expect(try QCOW2References.read(path: plain).isStandalone)
        let backed = directory.appendingPathComponent("backed.qcow2").path
        #expect(try tool(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/nonexistent/x", backed, "1M"]).status == 0)
        let references = try QCOW2References.read(path: backed)
        #expect(references.backingName == "/nonexistent/x" && references.backingFormat == .raw && !references.hasExternalData)
        let external = directory.appendingPathComponent("external.qcow2").path
        let data = directory.appendingPathComponent("external.data").path
        #expect(try tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=\(data)", external, "1M"]).status == 0)
        let externalReferences = try QCOW2References.read(path: external)
        #expect(externalReferences.hasExternalData && externalReferences.dataFile == data && !externalReferences.isStandalone)
        // Vireo's own reader refuses an external data file rather than ignore it.
        #expect(throws: DiskImageError.self) { try DiskImages.open(path: external, format: .qcow2, readOnly: true) }
    }

    @Test("a name declares a format only when it says it: .qcow2 and .raw; .img and others do not")
    func declaredFormats() {
        #expect(DiskFormat.declared(byName: "/a/b.qcow2") == .qcow2)
        #expect(DiskFormat.declared(byName: "/a/B.RAW") == .raw)
        #expect(DiskFormat.declared(byName: "/a/b.img") == nil)
        #expect(DiskFormat.declared(byName: "/a/qcow2") == nil)
        #expect(DiskImages.normalized("/a/./b/../c//d") == "/a/c/d")
        #expect(DiskImages.normalized("/a/b/../../../etc") == "/etc")
    }

    @Test("new images are private to their owner")
    func privateMode() throws {
        let directory = try scratchDirectory()
        for format in DiskFormat.allCases {
            let path = directory.appendingPathComponent("new.\(format.rawValue)").path
            try DiskImages.create(path: path, format: format, size: 1 << 20)
            var status = stat()
            #expect(stat(path, &status) == 0 && status.st_mode & 0o777 == 0o600, "\(format): \(String(status.st_mode & 0o777, radix: 8))")
        }
    }
}
