import CZlib
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// QEMU's qcow2 format (versions 2 and 3, 16-bit refcounts): thin provisioning through cluster
/// allocation on first write, backing files with copy-on-write, zero clusters.
///
/// Crash safety: a cluster's refcount is written before anything points at it, and its data before
/// the L2 entry that makes it visible. A VMM killed between two of those writes leaks a cluster
/// (which `qemu-img check` reports as a leak, not corruption); it never exposes garbage.
public final class QCOW2Image: DiskImage, @unchecked Sendable {
    public static let magic: [UInt8] = [0x51, 0x46, 0x49, 0xfb]   // "QFI\xfb"
    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let copiedFlag: UInt64 = 1 << 63
    static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1
    static let maximumBackingDepth = 16

    let file: ImageFile
    public let virtualSize: UInt64
    let version: UInt32
    let clusterBits: UInt64
    let clusterSize: UInt64
    let l1Offset: UInt64
    let l1Capacity: Int
    let refcountTableOffset: UInt64
    let refcountTableEntries: Int
    public let backingPath: String?
    let backing: (any DiskImage)?
    /// The image this one rests on, as it was opened (the chain its definition records).
    public var backingImage: (any DiskImage)? { backing }
    public let snapshots: [SnapshotInfo]

    struct State {
        var l1: [UInt64]
        var refcountTable: [UInt64]
        var fileEnd: UInt64
    }
    private let state: Mutex<State>

    public var path: String { file.path }
    public var format: DiskFormat { .qcow2 }
    public var isReadOnly: Bool { !file.writable }
    var l2Entries: UInt64 { clusterSize / 8 }
    var refcountsPerBlock: UInt64 { clusterSize / 2 }

    /// What the header may name beyond the image, and where that comes from.
    enum BackingSource {
        /// Nothing: the image rests on nothing, whatever its header says.
        case nothing
        /// The image below, already open: the header must name exactly its path (resolved
        /// against this image's directory) and, where it records a format, that image's format.
        case image(any DiskImage)
        /// Whatever the header names, in the format it records (never probed): only for images a
        /// person names directly (`vireo run`, `vireo disk info`), never for a VM's disks.
        case header(depth: Int)
    }

    init(file: ImageFile, snapshot: String? = nil, backing source: BackingSource) throws(DiskImageError) {
        let path = file.path
        func invalid(_ reason: String) -> DiskImageError { .invalidImage(path: path, reason: reason) }
        let fileSize = try file.size
        let header = try file.readBytes(count: 112, at: 0)
        guard Array(header[0..<4]) == Self.magic else { throw invalid("no qcow2 magic") }
        let version = header.be(UInt32.self, at: 4)
        guard version == 2 || version == 3 else { throw .unsupported(path: path, feature: "qcow2 version \(version)") }
        let clusterBits = UInt64(header.be(UInt32.self, at: 20))
        guard (9...21).contains(clusterBits) else { throw invalid("cluster_bits \(clusterBits) is outside 9...21") }
        let clusterSize: UInt64 = 1 << clusterBits
        guard header.be(UInt32.self, at: 32) == 0 else { throw .unsupported(path: path, feature: "encryption") }
        let size = header.be(UInt64.self, at: 24)
        guard size <= 1 << 55 else { throw invalid("virtual size \(size) is implausibly large") }
        let l1Size = UInt64(header.be(UInt32.self, at: 36))
        let l1Offset = header.be(UInt64.self, at: 40)
        let refcountTableOffset = header.be(UInt64.self, at: 48)
        let refcountTableClusters = UInt64(header.be(UInt32.self, at: 56))
        let l2Entries = clusterSize / 8
        let needed = (size + clusterSize * l2Entries - 1) / (clusterSize * l2Entries)
        guard l1Size >= needed else { throw invalid("L1 table has \(l1Size) entries; \(needed) are needed for \(size) bytes") }
        guard l1Size <= 1 << 25 else { throw invalid("L1 table size \(l1Size) is implausibly large") }
        // Offsets come from the file: compare without adding to them, so no value can overflow.
        guard l1Offset % clusterSize == 0, l1Offset > 0, l1Offset <= fileSize, l1Size * 8 <= fileSize - l1Offset else {
            throw invalid("L1 table at \(l1Offset) (\(l1Size) entries) is misaligned or outside the file")
        }
        guard refcountTableOffset % clusterSize == 0, refcountTableOffset > 0, refcountTableClusters > 0,
              refcountTableClusters <= 1 << 16,
              refcountTableOffset <= fileSize, refcountTableClusters * clusterSize <= fileSize + clusterSize - refcountTableOffset else {
            throw invalid("refcount table at \(refcountTableOffset) is misaligned or outside the file")
        }
        var headerLength: UInt64 = 72
        if version == 3 {
            let incompatible = header.be(UInt64.self, at: 72)
            if incompatible & 1 != 0 { throw .unsupported(path: path, feature: "a dirty image (lazy refcounts); run `qemu-img check -r all` first") }
            if incompatible & 2 != 0 { throw invalid("the image is marked corrupt") }
            if incompatible & ~3 != 0 { throw .unsupported(path: path, feature: "incompatible feature bits 0x\(String(incompatible, radix: 16))") }
            let refcountOrder = header.be(UInt32.self, at: 96)
            guard refcountOrder == 4 else { throw .unsupported(path: path, feature: "refcount width of \(1 << refcountOrder) bits (only 16)") }
            headerLength = UInt64(header.be(UInt32.self, at: 100))
            guard headerLength >= 104, headerLength <= clusterSize else { throw invalid("header length \(headerLength)") }
            if headerLength > 104, header[104] != 0 { throw .unsupported(path: path, feature: "compression type \(header[104]) (only zlib)") }
        }

        let references = try QCOW2References(header: header, file: file, version: version, headerLength: headerLength, clusterSize: clusterSize)
        var backingPath: String?
        let backingOffset = header.be(UInt64.self, at: 8)
        let backingLength = UInt64(header.be(UInt32.self, at: 16))
        if backingOffset != 0 {
            guard backingLength > 0, backingLength <= 1023, backingOffset <= min(clusterSize, fileSize),
                  backingLength <= min(clusterSize, fileSize) - backingOffset else {
                throw invalid("backing file name at \(backingOffset) (\(backingLength) bytes) is outside the header cluster")
            }
            let name = String(decoding: try file.readBytes(count: Int(backingLength), at: backingOffset), as: UTF8.self)
            backingPath = name.hasPrefix("/") ? name : Self.directory(of: path) + "/" + name
        }

        // Internal snapshots (qcow2 spec, "Snapshot table"): each names an L1 table of its own.
        let snapshotCount = Int(header.be(UInt32.self, at: 60))
        let snapshotsOffset = header.be(UInt64.self, at: 64)
        var snapshots: [(info: SnapshotInfo, l1Offset: UInt64, l1Size: UInt64)] = []
        if snapshotCount > 0 {
            guard snapshotCount <= 65536, snapshotsOffset % 8 == 0, snapshotsOffset >= clusterSize, snapshotsOffset < fileSize else {
                throw invalid("snapshot table at \(snapshotsOffset) (\(snapshotCount) snapshots) is misaligned or outside the file")
            }
            var cursor = snapshotsOffset
            for _ in 0..<snapshotCount {
                guard cursor + 40 <= fileSize else { throw invalid("snapshot table runs past the end of the file") }
                let entry = try file.readBytes(count: 40, at: cursor)
                let idLength = UInt64(entry.be(UInt16.self, at: 12))
                let nameLength = UInt64(entry.be(UInt16.self, at: 14))
                let extraLength = UInt64(entry.be(UInt32.self, at: 36))
                guard extraLength <= 1024 else { throw invalid("snapshot extra data of \(extraLength) bytes") }
                let total = 40 + extraLength + idLength + nameLength
                guard cursor + total <= fileSize else { throw invalid("snapshot table runs past the end of the file") }
                let rest = try file.readBytes(count: Int(extraLength + idLength + nameLength), at: cursor + 40)
                let snapshotL1Offset = entry.be(UInt64.self, at: 0)
                let snapshotL1Size = UInt64(entry.be(UInt32.self, at: 8))
                var snapshotSize = size
                var stateSize = UInt64(entry.be(UInt32.self, at: 32))
                if extraLength >= 8 { stateSize = max(stateSize, rest.be(UInt64.self, at: 0)) }
                if extraLength >= 16 { snapshotSize = rest.be(UInt64.self, at: 8) }
                let id = String(decoding: rest[Int(extraLength)..<Int(extraLength + idLength)], as: UTF8.self)
                let name = String(decoding: rest[Int(extraLength + idLength)...], as: UTF8.self)
                snapshots.append((SnapshotInfo(id: id, name: name, virtualSize: snapshotSize, date: UInt64(entry.be(UInt32.self, at: 16)),
                                               vmStateSize: stateSize), snapshotL1Offset, snapshotL1Size))
                cursor += (total + 7) / 8 * 8
            }
        }
        self.snapshots = snapshots.map(\.info)
        var activeSize = size
        var activeL1Offset = l1Offset
        var activeL1Size = l1Size
        if let snapshot {
            guard let chosen = snapshots.first(where: { $0.info.name == snapshot }) ?? snapshots.first(where: { $0.info.id == snapshot }) else {
                let names = snapshots.map(\.info.name).joined(separator: ", ")
                throw .invalidArgument(field: "snapshot", reason: "\(path) has no snapshot '\(snapshot)' (it has: \(names.isEmpty ? "none" : names))")
            }
            guard chosen.info.virtualSize <= 1 << 55, chosen.l1Size <= 1 << 25,
                  chosen.l1Size >= (chosen.info.virtualSize + clusterSize * l2Entries - 1) / (clusterSize * l2Entries),
                  chosen.l1Offset % clusterSize == 0, chosen.l1Offset > 0, chosen.l1Offset <= fileSize,
                  chosen.l1Size * 8 <= fileSize - chosen.l1Offset else {
                throw invalid("snapshot '\(snapshot)' has a bad L1 table (\(chosen.l1Size) entries at \(chosen.l1Offset))")
            }
            activeSize = chosen.info.virtualSize
            activeL1Offset = chosen.l1Offset
            activeL1Size = chosen.l1Size
        }

        self.file = file
        self.virtualSize = activeSize
        self.version = version
        self.clusterBits = clusterBits
        self.clusterSize = clusterSize
        self.l1Offset = activeL1Offset
        self.l1Capacity = Int(activeL1Size)
        self.refcountTableOffset = refcountTableOffset
        self.refcountTableEntries = Int(refcountTableClusters * clusterSize / 8)
        self.backingPath = backingPath
        switch source {
        case .nothing:
            if let backingPath {
                throw .unrecordedBacking(path: path, named: backingPath, recorded: nil)
            }
            backing = nil
        case let .image(below):
            guard let backingPath else {
                throw invalid("it names no backing file, but its definition says it rests on \(below.path)")
            }
            guard DiskImages.normalized(backingPath) == DiskImages.normalized(below.path) else {
                throw .unrecordedBacking(path: path, named: backingPath, recorded: below.path)
            }
            if let recordedFormat = references.backingFormat, recordedFormat != below.format {
                throw invalid("it records its backing file \(backingPath) as \(recordedFormat.rawValue), but its definition says \(below.format.rawValue)")
            }
            backing = below
        case let .header(depth):
            if let backingPath {
                guard depth < Self.maximumBackingDepth else { throw invalid("backing chain deeper than \(Self.maximumBackingDepth) (a loop?)") }
                guard let format = references.backingFormat else {
                    throw invalid("it names its backing file \(backingPath) without recording the file's format, and a format is never guessed from content; record it with `qemu-img rebase -u -b \(backingPath) -F raw|qcow2 \(path)`")
                }
                let backingFile = try ImageFile(path: backingPath, writable: false, direct: file.directAlignment > 0)
                switch format {
                case .raw: backing = try RawImage(file: backingFile)
                case .qcow2: backing = try QCOW2Image(file: backingFile, backing: .header(depth: depth + 1))
                }
            } else {
                backing = nil
            }
        }
        let l1Bytes = try file.readBytes(count: Int(activeL1Size) * 8, at: activeL1Offset)
        let l1 = (0..<Int(activeL1Size)).map { l1Bytes.be(UInt64.self, at: $0 * 8) }
        let tableBytes = try file.readBytes(count: refcountTableEntries * 8, at: refcountTableOffset)
        let table = (0..<refcountTableEntries).map { tableBytes.be(UInt64.self, at: $0 * 8) }
        state = Mutex(State(l1: l1, refcountTable: table, fileEnd: (fileSize + clusterSize - 1) / clusterSize * clusterSize))
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    // MARK: Mapping guest offsets to the file

    enum ClusterMapping: Equatable {
        case unallocated          // read from the backing file, or zeros
        case zero(preallocated: UInt64?)   // v3 zero cluster, possibly keeping its host cluster
        case data(UInt64, copied: Bool)
        /// Deflated data at a byte offset, in `sectors` 512-byte sectors.
        case compressed(offset: UInt64, sectors: UInt64)
    }

    private func checkedMetadataOffset(_ offset: UInt64, _ what: String) throws(DiskImageError) -> UInt64 {
        guard offset % clusterSize == 0 else {
            throw .invalidImage(path: path, reason: "\(what) offset \(offset) is not cluster-aligned")
        }
        return offset
    }

    private func mapping(for guestOffset: UInt64, in state: inout State) throws(DiskImageError) -> ClusterMapping {
        let clusterIndex = guestOffset >> clusterBits
        let l1Index = Int(clusterIndex / l2Entries)
        guard l1Index < state.l1.count else { throw .invalidImage(path: path, reason: "L1 index \(l1Index) beyond the table") }
        let l2Table = try checkedMetadataOffset(state.l1[l1Index] & Self.offsetMask, "L2 table")
        if l2Table == 0 { return .unallocated }
        let entryBytes = try file.readBytes(count: 8, at: l2Table + (clusterIndex % l2Entries) * 8)
        let entry = entryBytes.be(UInt64.self, at: 0)
        if entry & Self.compressedFlag != 0 {
            // Offset in the low 62-(cluster_bits-8) bits, then the count of extra sectors.
            let offsetBits = 62 - (clusterBits - 8)
            let offset = entry & ((1 << offsetBits) - 1)
            let sectors = ((entry >> offsetBits) & ((1 << (clusterBits - 8)) - 1)) + 1
            return .compressed(offset: offset, sectors: sectors)
        }
        let host = entry & Self.offsetMask
        if version >= 3 && entry & Self.zeroFlag != 0 {
            let keeps = host != 0 && entry & Self.copiedFlag != 0
            return .zero(preallocated: keeps ? try checkedMetadataOffset(host, "zero cluster") : nil)
        }
        if host == 0 { return .unallocated }
        return .data(try checkedMetadataOffset(host, "data cluster"), copied: entry & Self.copiedFlag != 0)
    }

    // MARK: Reading

    /// Splits `[offset, offset+count)` at cluster boundaries: `body(position, within, range)` gets
    /// each piece's disk offset, its offset inside the cluster, and its range in the caller's buffer.
    private func forEachClusterPiece(offset: UInt64, count: Int,
                                     _ body: (UInt64, UInt64, Range<Int>) throws(DiskImageError) -> Void) throws(DiskImageError) {
        var done = 0
        while done < count {
            let position = offset + UInt64(done)
            let within = position & (clusterSize - 1)
            let piece = min(count - done, Int(clusterSize - within))
            try body(position, within, done..<done + piece)
            done += piece
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        try checkRange(offset, buffer.count)
        try state.withLock { (state) throws(DiskImageError) in
            try forEachClusterPiece(offset: offset, count: buffer.count) { (position, within, range) throws(DiskImageError) in
                try readChunk(into: UnsafeMutableRawBufferPointer(rebasing: buffer[range]), at: position, within: within, state: &state)
            }
        }
    }

    private func readChunk(into target: UnsafeMutableRawBufferPointer, at position: UInt64, within: UInt64,
                           state: inout State) throws(DiskImageError) {
        switch try mapping(for: position, in: &state) {
        case .zero:
            target.initializeMemory(as: UInt8.self, repeating: 0)
        case .unallocated:
            if let backing, position < backing.virtualSize {
                let available = Int(min(UInt64(target.count), backing.virtualSize - position))
                try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: target[0..<available]), at: position)
                if available < target.count {
                    UnsafeMutableRawBufferPointer(rebasing: target[available...]).initializeMemory(as: UInt8.self, repeating: 0)
                }
            } else {
                target.initializeMemory(as: UInt8.self, repeating: 0)
            }
        case let .data(host, _):
            try file.read(into: target, at: host + within)
        case let .compressed(offset, sectors):
            let cluster = try decompressCluster(offset: offset, sectors: sectors)
            cluster.withUnsafeBytes { whole in
                target.copyMemory(from: UnsafeRawBufferPointer(rebasing: whole[Int(within)..<Int(within) + target.count]))
            }
        }
    }

    private func decompressCluster(offset: UInt64, sectors: UInt64) throws(DiskImageError) -> [UInt8] {
        let length = sectors * 512 - (offset & 511)
        guard length <= 2 * clusterSize + 512 else {
            throw .invalidImage(path: path, reason: "compressed cluster at \(offset) claims \(length) bytes")
        }
        let compressed = try file.readBytes(count: Int(length), at: offset)
        var cluster = [UInt8](repeating: 0, count: Int(clusterSize))
        let produced = compressed.withUnsafeBytes { source in
            cluster.withUnsafeMutableBytes { destination in
                vireo_inflate_raw(source.baseAddress, source.count, destination.baseAddress, destination.count)
            }
        }
        guard produced == Int(clusterSize) else {
            throw .invalidImage(path: path, reason: "compressed cluster at \(offset) does not inflate to \(clusterSize) bytes")
        }
        return cluster
    }

    // MARK: Writing

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard file.writable else { throw .readOnly(path: path) }
        try checkRange(offset, buffer.count)
        try state.withLock { (state) throws(DiskImageError) in
            try forEachClusterPiece(offset: offset, count: buffer.count) { (position, within, range) throws(DiskImageError) in
                try writeChunk(UnsafeRawBufferPointer(rebasing: buffer[range]), at: position, within: within, state: &state)
            }
        }
    }

    private func writeChunk(_ source: UnsafeRawBufferPointer, at position: UInt64, within: UInt64,
                            state: inout State) throws(DiskImageError) {
        let current = try mapping(for: position, in: &state)
        if case let .data(host, copied) = current {
            guard copied else { throw .unsupported(path: path, feature: "writing clusters shared with an internal snapshot") }
            try file.write(source, at: host + within)
            return
        }
        if case let .zero(preallocated?) = current {
            // The zero cluster still owns its host cluster: fill it (zeros around the new bytes)
            // and clear the zero flag, rather than leaking it by pointing elsewhere.
            var contents = [UInt8](repeating: 0, count: Int(clusterSize))
            contents.replaceSubrange(Int(within)..<Int(within) + source.count, with: source)
            try file.write(contents, at: preallocated)
            try setL2Entry(for: position, to: preallocated | Self.copiedFlag, state: &state)
            return
        }
        // Copy-on-write into a fresh cluster: what the guest did not overwrite comes from the old
        // view of the cluster (backing file, zeros).
        let clusterStart = position - within
        var contents = [UInt8](repeating: 0, count: Int(clusterSize))
        if source.count < Int(clusterSize) {
            let outcome: Result<Void, DiskImageError> = contents.withUnsafeMutableBytes { whole in
                do throws(DiskImageError) { try readChunk(into: whole, at: clusterStart, within: 0, state: &state); return .success(()) }
                catch { return .failure(error) }
            }
            try outcome.get()
        }
        contents.withUnsafeMutableBytes { whole in
            UnsafeMutableRawBufferPointer(rebasing: whole[Int(within)..<Int(within) + source.count]).copyMemory(from: source)
        }
        _ = try l2TableForWrite(position, state: &state)
        let host = try allocateCluster(state: &state)
        try file.write(contents, at: host)
        try setL2Entry(for: position, to: host | Self.copiedFlag, state: &state)
        if case .compressed = current { try release(current, state: &state) }
    }

    /// Drops the reference a just-replaced L2 entry held on its host clusters. Called only after
    /// the new entry is written, so a crash in between leaks a cluster instead of sharing one.
    /// Clusters nobody references any more are punched out of the file.
    private func release(_ mapping: ClusterMapping, state: inout State) throws(DiskImageError) {
        var clusters: [UInt64] = []
        switch mapping {
        case let .data(host, _), let .zero(preallocated: host?):
            clusters = [host]
        case let .compressed(offset, sectors):
            // Compressed data may share host clusters with its neighbours: each cluster it touches
            // loses one reference.
            let first = offset & ~(clusterSize - 1)
            let last = (offset + sectors * 512 - (offset & 511) - 1) & ~(clusterSize - 1)
            clusters = Array(stride(from: first, through: last, by: Int(clusterSize)))
        case .unallocated, .zero(preallocated: nil):
            return
        }
        for host in clusters {
            let count = try refcount(of: host, state: &state)
            guard count > 0 else { continue }
            try setRefcount(of: host, to: count - 1, state: &state)
            if count == 1 { try file.punchHole(at: host, length: clusterSize) }
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        guard file.writable else { throw .readOnly(path: path) }
        guard length <= UInt64(Int.max) else { throw .outOfRange(path: path, offset: offset, length: Int.max, size: virtualSize) }
        try checkRange(offset, Int(length))
        let zeros = [UInt8](repeating: 0, count: Int(clusterSize))
        try state.withLock { (state) throws(DiskImageError) in
            try forEachClusterPiece(offset: offset, count: Int(length)) { (position, within, range) throws(DiskImageError) in
                let current = try mapping(for: position, in: &state)
                // Partial clusters, and v2 images over a backing file (no zero flag to hide it), get zeros written.
                guard range.count == Int(clusterSize), version >= 3 || backing == nil else {
                    let outcome: Result<Void, DiskImageError> = zeros.withUnsafeBytes { buffer in
                        do throws(DiskImageError) {
                            try writeChunk(UnsafeRawBufferPointer(rebasing: buffer[0..<range.count]), at: position, within: within, state: &state)
                            return .success(())
                        } catch { return .failure(error) }
                    }
                    try outcome.get()
                    return
                }
                if case let .data(_, copied) = current, !copied {
                    throw .unsupported(path: path, feature: "zeroing clusters shared with an internal snapshot")
                }
                if current == .zero(preallocated: nil) { return }
                if current == .unallocated && backing == nil { return }
                try setL2Entry(for: position, to: version >= 3 ? Self.zeroFlag : 0, state: &state)
                try release(current, state: &state)
            }
        }
    }

    private func refcount(of hostOffset: UInt64, state: inout State) throws(DiskImageError) -> UInt16 {
        let clusterIndex = hostOffset >> clusterBits
        let tableIndex = Int(clusterIndex / refcountsPerBlock)
        guard tableIndex < state.refcountTable.count else { return 0 }
        let block = state.refcountTable[tableIndex] & Self.offsetMask
        if block == 0 { return 0 }
        return try file.readBytes(count: 2, at: block + (clusterIndex % refcountsPerBlock) * 2).be(UInt16.self, at: 0)
    }

    private func setL2Entry(for position: UInt64, to value: UInt64, state: inout State) throws(DiskImageError) {
        let l2Table = try l2TableForWrite(position, state: &state)
        var entry = [UInt8](repeating: 0, count: 8)
        entry.setBE(value, at: 0)
        try file.write(entry, at: l2Table + ((position >> clusterBits) % l2Entries) * 8)
    }

    /// The L2 table covering `position`, allocated (zeroed, refcounted, then linked from L1) if absent.
    private func l2TableForWrite(_ position: UInt64, state: inout State) throws(DiskImageError) -> UInt64 {
        let l1Index = Int((position >> clusterBits) / l2Entries)
        let existing = state.l1[l1Index]
        if existing & Self.offsetMask != 0 {
            guard existing & Self.copiedFlag != 0 else {
                throw .unsupported(path: path, feature: "writing L2 tables shared with an internal snapshot")
            }
            return existing & Self.offsetMask
        }
        let table = try allocateCluster(state: &state)
        try file.write([UInt8](repeating: 0, count: Int(clusterSize)), at: table)
        var entry = [UInt8](repeating: 0, count: 8)
        entry.setBE(table | Self.copiedFlag, at: 0)
        try file.write(entry, at: l1Offset + UInt64(l1Index) * 8)
        state.l1[l1Index] = table | Self.copiedFlag
        return table
    }

    /// A new cluster at the end of the file, its refcount already 1.
    private func allocateCluster(state: inout State) throws(DiskImageError) -> UInt64 {
        let cluster = state.fileEnd
        state.fileEnd += clusterSize
        try setRefcount(of: cluster, to: 1, state: &state)
        return cluster
    }

    private func setRefcount(of hostOffset: UInt64, to value: UInt16, state: inout State) throws(DiskImageError) {
        let clusterIndex = hostOffset >> clusterBits
        let tableIndex = Int(clusterIndex / refcountsPerBlock)
        guard tableIndex < state.refcountTable.count else {
            throw .unsupported(path: path, feature: "growing the refcount table (image file beyond \(UInt64(state.refcountTable.count) * refcountsPerBlock * clusterSize) bytes)")
        }
        var block = state.refcountTable[tableIndex] & Self.offsetMask
        if block == 0 {
            block = state.fileEnd
            state.fileEnd += clusterSize
            try file.write([UInt8](repeating: 0, count: Int(clusterSize)), at: block)
            var entry = [UInt8](repeating: 0, count: 8)
            entry.setBE(block, at: 0)
            try file.write(entry, at: refcountTableOffset + UInt64(tableIndex) * 8)
            state.refcountTable[tableIndex] = block
            try setRefcount(of: block, to: 1, state: &state)
        }
        var count = [UInt8](repeating: 0, count: 2)
        count.setBE(value, at: 0)
        try file.write(count, at: block + (clusterIndex % refcountsPerBlock) * 2)
    }

    public func flush() throws(DiskImageError) {
        if file.writable { try file.sync() }
    }

    // MARK: Creating and resizing

    /// `backing` is written as given: its name (relative names are relative to the new image's
    /// directory) and its format, which the caller knows from the definition; nothing is read
    /// from the backing file.
    static func create(path: String, size: UInt64, backing layer: BackingLayer?, clusterSize: UInt64) throws(DiskImageError) {
        guard clusterSize.nonzeroBitCount == 1, (512...(2 << 20)).contains(clusterSize) else {
            throw .invalidArgument(field: "--cluster-size", reason: "\(clusterSize) is not a power of two from 512 to 2 MiB")
        }
        let backing = layer?.path
        let backingFormat = layer?.format
        let clusterBits = UInt64(clusterSize.trailingZeroBitCount)
        let l2Entries = clusterSize / 8
        let l1Size = max(1, (size + clusterSize * l2Entries - 1) / (clusterSize * l2Entries))
        let l1Clusters = (l1Size * 8 + clusterSize - 1) / clusterSize
        // Room for refcounts of every cluster a fully written disk could use, with slack for metadata.
        let refcountsPerBlock = clusterSize / 2
        let worstCaseClusters = size / clusterSize + size / clusterSize / l2Entries + l1Clusters + 64
        let refcountBlocks = (worstCaseClusters + worstCaseClusters / 8 + refcountsPerBlock - 1) / refcountsPerBlock
        let refcountTableClusters = max(1, (refcountBlocks * 8 + clusterSize - 1) / clusterSize)
        let refcountTable = clusterSize
        let firstRefcountBlock = refcountTable + refcountTableClusters * clusterSize
        let l1Table = firstRefcountBlock + clusterSize
        let metadataClusters = l1Table / clusterSize + l1Clusters
        guard metadataClusters <= refcountsPerBlock else {
            throw .invalidArgument(field: "--cluster-size", reason: "\(clusterSize) is too small for a \(size)-byte disk")
        }

        var header = [UInt8](repeating: 0, count: Int(clusterSize))
        header[0..<4] = Self.magic[0..<4]
        header.setBE(UInt32(3), at: 4)
        header.setBE(UInt32(clusterBits), at: 20)
        header.setBE(size, at: 24)
        header.setBE(UInt32(l1Size), at: 36)
        header.setBE(l1Table, at: 40)
        header.setBE(refcountTable, at: 48)
        header.setBE(UInt32(refcountTableClusters), at: 56)
        header.setBE(UInt32(4), at: 96)           // refcount_order: 16-bit
        header.setBE(UInt32(104), at: 100)        // header_length
        var cursor = 104
        if let backing, let backingFormat {
            let name = Array(backingFormat.rawValue.utf8)
            header.setBE(UInt32(0xe279_2aca), at: cursor)   // backing file format name
            header.setBE(UInt32(name.count), at: cursor + 4)
            header.replaceSubrange(cursor + 8..<cursor + 8 + name.count, with: name)
            cursor += 8 + (name.count + 7) / 8 * 8
            cursor += 8                                     // end of extensions: type 0, length 0
            let backingName = Array(backing.utf8)
            guard backingName.count <= 1023, cursor + backingName.count <= Int(clusterSize) else {
                throw .invalidArgument(field: "--backing", reason: "path is longer than the header can hold")
            }
            header.setBE(UInt64(cursor), at: 8)
            header.setBE(UInt32(backingName.count), at: 16)
            header.replaceSubrange(cursor..<cursor + backingName.count, with: backingName)
        }
        var table = [UInt8](repeating: 0, count: Int(refcountTableClusters * clusterSize))
        table.setBE(firstRefcountBlock, at: 0)
        var block = [UInt8](repeating: 0, count: Int(clusterSize))
        for cluster in 0..<Int(metadataClusters) { block.setBE(UInt16(1), at: cluster * 2) }

        let file = try ImageFile(creating: path)
        do {
            try file.write(table, at: refcountTable)
            try file.write(block, at: firstRefcountBlock)
            try file.write([UInt8](repeating: 0, count: Int(l1Clusters * clusterSize)), at: l1Table)
            // The header last: until it is written the file is not an image anyone would open.
            try file.write(header, at: 0)
            try file.sync()
        } catch {
            unlink(path)
            throw error
        }
    }

    /// Grows the virtual disk. The L1 table is not moved, so growth stops where it is full.
    public func resize(to size: UInt64) throws(DiskImageError) {
        guard file.writable else { throw .readOnly(path: path) }
        guard size >= virtualSize else {
            throw .invalidArgument(field: "--size", reason: "shrinking would destroy data; \(size) is below the current \(virtualSize) bytes")
        }
        let needed = (size + clusterSize * l2Entries - 1) / (clusterSize * l2Entries)
        let l1Room = (UInt64(l1Capacity) * 8 + clusterSize - 1) / clusterSize * clusterSize / 8
        guard needed <= l1Room else {
            throw .unsupported(path: path, feature: "growing beyond \(l1Room * clusterSize * l2Entries) bytes (it needs a larger L1 table)")
        }
        var fields = [UInt8](repeating: 0, count: 16)
        fields.setBE(size, at: 0)                 // size at 24, crypt_method (0) at 32, l1_size at 36
        fields.setBE(UInt32(max(needed, UInt64(l1Capacity))), at: 12)
        try file.write(fields, at: 24)
        try file.sync()
    }

    public func info() throws(DiskImageError) -> DiskInfo {
        var chain: [String] = []
        var next = backing
        while let image = next {
            chain.append(image.path)
            next = (image as? QCOW2Image)?.backing
        }
        return DiskInfo(path: path, format: .qcow2, virtualSize: virtualSize, allocatedBytes: try file.allocatedBytes,
                        clusterSize: clusterSize, backingChain: chain, snapshots: snapshots)
    }
}
