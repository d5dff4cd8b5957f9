import ContainerWire
import Devices
import DiskImage
import Engines
import GuestMemory
import Library
import MachineSpec
import Server
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Entry points that take arbitrary bytes and drive a parser that faces guests or images with
/// them. Each must only ever return: an error is an answer, a crash is a bug. libFuzzer drives
/// them through `vireo-fuzz` (scripts/fuzz.sh); the unit tests drive them with seeded inputs.
public enum Fuzz {
    /// Guest RAM for the virtqueue target: the input is laid into it, so descriptor tables and
    /// rings are whatever the fuzzer makes them.
    static let memoryBytes: UInt64 = 64 << 10

    /// What one input made a target do, so seeded runs can assert that they exercised the parser
    /// (and not only that the process survived).
    public struct Outcome: Sendable, Equatable {
        /// virtqueue: the ring layout was accepted; qcow2: the image opened.
        public var accepted = false
        /// virtqueue: descriptor chains walked; qcow2: reads and writes that succeeded.
        public var operations = 0

        public init(accepted: Bool = false, operations: Int = 0) { self.accepted = accepted; self.operations = operations }
    }

    /// The input: 2 bytes queue size (its top bit: EVENT_IDX negotiated), 3 × 2 bytes ring page
    /// numbers (descriptor table, available ring, used ring; 4 KiB units), then guest RAM contents.
    public static func virtqueue(_ data: UnsafeRawBufferPointer) { _ = virtqueueOutcome(data) }

    public static func virtqueueOutcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        var outcome = Outcome()
        guard data.count >= 8, let memory = try? GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), memoryBytes)]) else { return outcome }
        let bytes = Array(data)
        func half(_ offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }
        let contents = bytes[8...].prefix(Int(memoryBytes))
        try? memory.write(contents, at: GuestPhysicalAddress(0))
        let page = { (value: UInt16) in GuestPhysicalAddress(UInt64(value % 32) * 4096 + UInt64(value >> 5) % 16) }
        guard let queue = try? VirtQueue(memory: memory, size: half(0) & 0x7fff, maximumSize: 256, descriptorTable: page(half(2)),
                                         availableRing: page(half(4)), usedRing: page(half(6)), usesEventIndex: half(0) & 0x8000 != 0) else { return outcome }
        outcome.accepted = true
        // The device most exposed to guests: every request type with whatever the chains hold.
        let completedBefore = block.completed.load(ordering: .relaxed)
        _ = try? block.process(queue: 0, queue, memory: memory)
        outcome.operations += Int(block.completed.load(ordering: .relaxed) &- completedBefore)
        // And the bare ring walk, for chains the block device stopped at.
        for _ in 0..<64 {
            guard let chain = try? queue.popChain() else { break }
            try? queue.pushUsed(head: chain.head, written: chain.buffers.first?.length ?? 0)
            _ = queue.needsInterrupt()
            outcome.operations += 1
        }
        return outcome
    }

    /// A small scratch disk for the block device the virtqueue target drives.
    static let block: VirtioBlock = {
        let path = "/tmp/vireo-fuzz-disk-\(getpid()).raw"
        unlink(path)
        // A fuzzing run without its disk has nothing to test; stop loudly.
        guard (try? DiskImages.create(path: path, format: .raw, size: 1 << 20)) != nil,
              let disk = try? DiskImages.open(path: path, format: .raw) else { fatalError("cannot create the fuzz scratch disk \(path)") }
        unlink(path)   // the open descriptor keeps it alive; nothing is left behind
        return VirtioBlock(disk: disk, readOnly: false, serial: "fuzz")
    }()

    /// The input is a whole image file: opened as qcow2 (header, L1/L2 and refcount tables,
    /// backing name, compressed clusters), read across, described, then written and zeroed.
    public static func qcow2(_ data: UnsafeRawBufferPointer) { _ = qcow2Outcome(data) }

    public static func qcow2Outcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        withScratchFile(data, suffix: ".qcow2") { path in qcow2Outcome(path: path) } ?? Outcome()
    }

    static func qcow2Outcome(path: String) -> Outcome {
        var outcome = Outcome()
        // What an image import checks first: the header's references, read without following them.
        _ = try? QCOW2References.read(path: path)
        guard let image = try? DiskImages.open(path: path, format: .qcow2) else { return outcome }
        outcome.accepted = true
        _ = try? image.info()
        let size = image.virtualSize
        var buffer = [UInt8](repeating: 0, count: 65536)
        for offset in [0, size / 3, size > 65536 ? size - 65536 : 0] {
            let read: Void? = buffer.withUnsafeMutableBytes { try? image.read(into: $0, at: offset) }
            if read != nil { outcome.operations += 1 }
        }
        if (try? image.write([UInt8](repeating: 0xa5, count: 4096), at: 0)) != nil { outcome.operations += 1 }
        if (try? image.writeZeroes(at: min(size, 65536), length: 65536)) != nil { outcome.operations += 1 }
        _ = try? image.flush()
        return outcome
    }

    /// The input is one saved state (docs/snapshots.md): its first byte picks the decoder, the
    /// rest is what a state file would hold for it. 0: the machine metadata (shape, CPUID, clocks,
    /// interrupt controllers, vCPUs, device list); 1–4: the serial port, i8042, RTC and ACPI
    /// registers; 5–7: a virtio-mmio transport with a block device, a balloon with statistics, an
    /// entropy device, over a small guest RAM (rings must lie inside it).
    public static func savedState(_ data: UnsafeRawBufferPointer) { _ = savedStateOutcome(data) }

    /// A well-formed machine metadata block, for seeding selector 0.
    public static var sampleMachineMetadata: [UInt8] { SavedStateInspection.sampleMetadata() }

    public static func savedStateOutcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        var outcome = Outcome()
        guard let selector = data.first else { return outcome }
        let bytes = Array(data.dropFirst())
        let device: (any Snapshottable)?
        switch selector % 8 {
        case 0:
            outcome.accepted = SavedStateInspection.metadataIsValid(bytes)
            return outcome
        case 1: device = Serial8250(output: DiscardingSerialOutput(), interrupt: SilentInterruptLine())
        case 2: device = I8042 {}
        case 3: device = RTC()
        case 4: device = ACPIRegisters(eventInterrupt: SilentInterruptLine(), softOffSleepType: 5, resetValue: 0xf, powerOff: {}, reset: {})
        default:
            guard let memory = try? GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), memoryBytes)]) else { return outcome }
            let virtio: any VirtioDevice
            switch selector % 8 {
            case 5: virtio = block
            case 6: virtio = VirtioBalloon(deflateOnOOM: true, statisticsInterval: 1)
            default:
                guard let entropy = try? VirtioEntropy() else { return outcome }
                virtio = entropy
            }
            device = VirtioMMIOTransport(device: virtio, memory: memory, interrupt: SilentInterruptLine())
        }
        guard let device else { return outcome }
        if (try? device.restore(record: bytes)) != nil {
            outcome.accepted = true
            // A restored device must also save again: its state is whole.
            outcome.operations = (try? device.savedRecord())?.count ?? 0
            if let transport = device as? VirtioMMIOTransport { transport.resumeWork() }
        }
        return outcome
    }

    /// A destination's incoming migration stream (docs/migration.md): frames, then the machine
    /// message and every later message through the decoders the destination VMM uses.
    public static func migration(_ data: UnsafeRawBufferPointer) { _ = migrationAcceptedMessages(data) }

    public static func migrationAcceptedMessages(_ data: UnsafeRawBufferPointer) -> Int {
        MigrationInspection.acceptedMessages(Array(data))
    }

    /// A well-formed stream, the seed the smoke test mutates.
    public static var sampleMigrationStream: [UInt8] { MigrationInspection.sampleStream() }

    /// Runs a target over files (a corpus, or a crash to reproduce) without libFuzzer.
    public static func replay(_ paths: [String], _ target: (UnsafeRawBufferPointer) -> Void) {
        for path in paths {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { continue }
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if count <= 0 { break }
                bytes += chunk[0..<count]
            }
            close(fd)
            bytes.withUnsafeBytes { target($0) }
        }
    }

    /// Writes the input to a scratch file, for parsers that read files; removed afterwards.
    static func withScratchFile<T>(_ data: UnsafeRawBufferPointer, suffix: String, _ body: (String) -> T) -> T? {
        let path = "/tmp/vireo-fuzz-\(getpid())\(suffix)"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return nil }
        _ = write(fd, data.baseAddress, data.count)
        close(fd)
        defer { unlink(path) }
        return body(path)
    }

    /// The input is the start of an ISO image (sectors 16 onwards hold its volume descriptors):
    /// what `vireo create --iso` reads of an installer before anything boots it.
    public static func iso9660(_ data: UnsafeRawBufferPointer) { _ = iso9660Outcome(data) }

    /// Past the descriptors, the directory tree as an unattended install reads it (its root's
    /// entries, the installer's kernel and `.disk/info` looked up, the installer detected).
    public static func iso9660Outcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        let steps = withScratchFile(data, suffix: ".iso") { path -> Int in
            guard (try? InstallMedium.inspect(path)) != nil else { return 0 }
            var steps = 1
            guard let image = try? ISO9660Image(path: path) else { return steps }
            defer { image.close() }
            if (try? image.entries(of: image.rootEntry)) != nil { steps += 1 }
            for file in ["/install.amd/vmlinuz", "/.disk/info", "/casper/initrd"] {
                if let entry = (try? image.lookup(file)) ?? nil, !entry.isDirectory, (try? image.read(entry, limit: 1 << 16)) != nil { steps += 1 }
            }
            if (try? DetectedInstaller.detect(iso: path)) != nil { steps += 1 }
            return steps
        } ?? 0
        return Outcome(accepted: steps > 0, operations: steps)
    }

    /// The input is an image archive's manifest.json: decoded and checked as an import does.
    public static func manifest(_ data: UnsafeRawBufferPointer) { _ = manifestOutcome(data) }

    public static func manifestOutcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        let accepted = (try? ImageStore.decodeManifest(Array(data), path: "fuzz/manifest.json")) != nil
        return Outcome(accepted: accepted, operations: accepted ? 1 : 0)
    }

    /// The input is a REST API request body, decoded as the largest bodies the API takes.
    public static func apiBody(_ data: UnsafeRawBufferPointer) { _ = apiBodyOutcome(data) }

    public static func apiBodyOutcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        let decoded = APIBodyInspection.decodeEveryBody(Array(data))
        return Outcome(accepted: decoded > 0, operations: decoded)
    }

    /// The input is a migration source's offer (JSON), decoded and held to the receive policy.
    public static func offer(_ data: UnsafeRawBufferPointer) { _ = offerOutcome(data) }

    public static func offerOutcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        let (decoded, accepted) = MigrationOfferInspection.check(Array(data))
        return Outcome(accepted: decoded, operations: accepted ? 1 : 0)
    }

    /// The input is everything an NBD server sends on one connection: handshake and replies.
    public static func nbd(_ data: UnsafeRawBufferPointer) { _ = nbdOutcome(data) }

    public static func nbdOutcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        let (accepted, operations) = NBDInspection.converse(serverBytes: data)
        return Outcome(accepted: accepted, operations: operations)
    }

    /// The input is an appliance's OVF envelope, parsed and planned as `vireo import` does.
    public static func ovf(_ data: UnsafeRawBufferPointer) { _ = ovfOutcome(data) }

    public static func ovfOutcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        let disks = ApplianceInspection.plan(Array(data))
        return Outcome(accepted: disks != nil, operations: disks ?? 0)
    }

    /// The input is what a sandbox VM's container agent (a guest) sends the containerd shim: its
    /// frames, and each reply and exit in them, decoded as the shim does.
    public static func agentStream(_ data: UnsafeRawBufferPointer) { _ = agentStreamOutcome(data) }

    public static func agentStreamOutcome(_ data: UnsafeRawBufferPointer) -> Outcome {
        var decoder = AgentFrameDecoder()
        decoder.append(Array(data)[...])
        var frames = 0
        do throws(ProtoError) {
            while let frame = try decoder.next() {
                frames += 1
                switch frame.kind {
                case .reply: _ = try AgentReply(decoding: frame.payload)
                case .exit: _ = try AgentExit(decoding: frame.payload)
                case .request: _ = try AgentRequest(decoding: frame.payload)
                default: break
                }
            }
        } catch {
            return Outcome(accepted: false, operations: frames)
        }
        return Outcome(accepted: true, operations: frames)
    }

    static var sampleAgentStream: [UInt8] {
        var reply = AgentReply(pid: 42)
        reply.pids = [1, 2, 300]
        return AgentFrame(.hello, payload: [AgentFrame.protocolVersion]).encoded
            + AgentFrame(.reply, stream: 7, payload: reply.encoded).encoded
            + AgentFrame(.stdout, stream: 1, payload: Array("hello\n".utf8)).encoded
            + AgentFrame(.exit, stream: 1, payload: AgentExit(status: 3).encoded).encoded
    }

    public static let targetNames = ["virtqueue", "qcow2", "savedstate", "migration", "iso9660", "manifest", "apibody", "offer", "nbd", "ovf", "agentstream"]

    /// Well-formed inputs a corpus starts from, so the search begins past the magic numbers.
    public static func seeds(named name: String) -> [[UInt8]] {
        switch name {
        case "savedstate": return [[0] + sampleMachineMetadata]
        case "migration": return [sampleMigrationStream]
        case "iso9660":
            var image = [UInt8](repeating: 0, count: 19 * 2048)
            func descriptor(_ sector: Int, type: UInt8, _ body: [UInt8], at offset: Int) {
                let base = sector * 2048
                image[base] = type
                image.replaceSubrange(base + 1..<base + 6, with: Array("CD001".utf8))
                image[base + 6] = 1
                image.replaceSubrange(base + offset..<base + offset + body.count, with: body)
            }
            // A directory record: length, extent and size (both byte orders), flags, name.
            func record(_ name: [UInt8], sector: UInt32, size: UInt32, directory: Bool) -> [UInt8] {
                let length = 33 + name.count + (name.count % 2 == 0 ? 1 : 0)
                var bytes = [UInt8](repeating: 0, count: length)
                bytes[0] = UInt8(length)
                for (offset, value) in [(2, sector), (10, size)] {
                    for index in 0..<4 {
                        bytes[offset + index] = UInt8(value >> (8 * UInt32(index)) & 0xff)
                        bytes[offset + 7 - index] = UInt8(value >> (8 * UInt32(index)) & 0xff)
                    }
                }
                bytes[25] = directory ? 2 : 0
                bytes[32] = UInt8(name.count)
                bytes.replaceSubrange(33..<(33 + name.count), with: name)
                return bytes
            }
            descriptor(16, type: 1, Array("Debian 12 VIREO SEED".utf8) + [UInt8](repeating: 0x20, count: 12), at: 40)
            descriptor(16, type: 1, record([0], sector: 19, size: 2048, directory: true), at: 156)
            descriptor(17, type: 0, Array("EL TORITO SPECIFICATION".utf8), at: 7)
            descriptor(18, type: 255, [], at: 7)
            // The root (sector 19), install.amd/ (20) with vmlinuz (21) and initrd.gz (22).
            image += [UInt8](repeating: 0, count: 4 * 2048)
            func directory(_ sector: Int, _ records: [[UInt8]]) {
                let bytes = records.flatMap { $0 }
                image.replaceSubrange(sector * 2048..<(sector * 2048 + bytes.count), with: bytes)
            }
            directory(19, [record([0], sector: 19, size: 2048, directory: true), record([1], sector: 19, size: 2048, directory: true),
                           record(Array("INSTALL.AMD".utf8), sector: 20, size: 2048, directory: true)])
            directory(20, [record([0], sector: 20, size: 2048, directory: true), record([1], sector: 19, size: 2048, directory: true),
                           record(Array("VMLINUZ.;1".utf8), sector: 21, size: 6, directory: false),
                           record(Array("INITRD.GZ;1".utf8), sector: 22, size: 6, directory: false)])
            image.replaceSubrange(21 * 2048..<(21 * 2048 + 6), with: Array("kernel".utf8))
            image.replaceSubrange(22 * 2048..<(22 * 2048 + 6), with: Array("initrd".utf8))
            return [image]
        case "manifest":
            return [Array(#"{"version":1,"name":"debian-12","description":"d","origin":"build","osType":"debian-64","createdAt":0,"disk":"disk.qcow2","virtualSize":1073741824,"kernel":"vmlinuz","initrd":"initrd.img","commandLine":"root=UUID=x ro","cloudInit":true,"packages":[{"name":"a","version":"1"}],"files":[{"path":"disk.qcow2","size":1,"sha256":"00"},{"path":"vmlinuz","size":1,"sha256":"00"},{"path":"initrd.img","size":1,"sha256":"00"}]}"#.utf8)]
        case "apibody": return [APIBodyInspection.sample]
        case "offer": return [MigrationOfferInspection.sample]
        case "nbd": return [NBDInspection.sample]
        case "ovf": return [ApplianceInspection.sample]
        case "agentstream": return [sampleAgentStream]
        default: return []
        }
    }

    public static func target(named name: String) -> ((UnsafeRawBufferPointer) -> Void)? {
        switch name {
        case "virtqueue": return virtqueue
        case "qcow2": return qcow2
        case "savedstate": return savedState
        case "migration": return migration
        case "iso9660": return iso9660
        case "manifest": return manifest
        case "apibody": return apiBody
        case "offer": return offer
        case "nbd": return nbd
        case "ovf": return ovf
        case "agentstream": return agentStream
        default: return nil
        }
    }
}

/// Serial output nobody reads (fuzzing).
final class DiscardingSerialOutput: SerialOutput, @unchecked Sendable {
    func write(_ bytes: UnsafeRawBufferPointer) {}
}

/// An interrupt line wired to nothing (fuzzing).
struct SilentInterruptLine: InterruptLine {
    func setLevel(_ high: Bool) {}
}
