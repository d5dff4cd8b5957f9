import CZlib
import Devices
import GuestMemory
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// A state file written while the guest runs (live snapshots, docs/snapshots.md): RAM goes in
/// first, round after round of what the guest dirtied, then — during the short pause — the last
/// dirty pages and the machine's state into the room kept for it before RAM. After the guest runs
/// on, the trailer (the front's checksum) goes at the end and the file is synced and renamed into
/// place. Same format as `SavedStateFile.write`'s, with a wider gap between the metadata and RAM.
final class StateFileInProgress {
    let path: String
    let temporary: String
    private let fd: Int32
    private let memory: GuestMemory
    /// Where RAM starts: the header and the room reserved for the metadata come first.
    let memoryOffset: UInt64
    /// The checksum of the front, once `writeFront` has written it.
    private var frontChecksum: UInt32?
    private var finished = false
    /// A run of pages on its way to the file.
    private let buffer = UnsafeMutableRawPointer.allocate(byteCount: 256 * 4096, alignment: 4096)

    /// Room for the metadata: its size grows with the vCPUs (registers, LAPIC, MSRs); a state
    /// that outgrows it is written the whole-file way instead.
    static func metadataRoom(cpus: Int) -> Int { (256 << 10) + cpus * (32 << 10) }

    init(path: String, memory: GuestMemory, cpus: Int) throws(VMMError) {
        self.path = path
        temporary = path + ".precopy"
        self.memory = memory
        let room = Self.metadataRoom(cpus: cpus)
        memoryOffset = UInt64((SavedStateFile.headerSize + room + SavedStateFile.pageSize - 1) / SavedStateFile.pageSize * SavedStateFile.pageSize)
        fd = open(temporary, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .host(operation: "create \(temporary)", errno: errno) }
        // Sparse to its full length: RAM never written stays a hole.
        guard ftruncate(fd, off_t(memoryOffset + memory.totalSize)) == 0 else {
            let code = errno
            close(fd)
            unlink(temporary)
            throw .host(operation: "size \(temporary)", errno: code)
        }
    }

    deinit {
        buffer.deallocate()
        close(fd)
        if !finished { unlink(temporary) }
    }

    /// Writes every page marked in `bitmaps` (one per RAM region) as it is now, clearing the
    /// marks. With `skipZeroPages` (the first round, into a file that is all holes) zero pages are
    /// left out; afterwards a page that became zero is written as zeros.
    func writePages(_ bitmaps: [PageBitmap], skipZeroPages: Bool) throws(VMMError) {
        var regionOffset: UInt64 = 0
        for (index, region) in memory.regions.enumerated() {
            let bitmap = bitmaps[index]
            let pageCount = Int(region.size / 4096)
            var runStart = -1
            var runLength = 0
            func flush() throws(VMMError) {
                guard runStart >= 0, runLength > 0 else { return }
                defer { runStart = -1; runLength = 0 }
                buffer.copyMemory(from: region.host + runStart * 4096, byteCount: runLength * 4096)
                let at = off_t(memoryOffset + regionOffset + UInt64(runStart) * 4096)
                try writeAll(UnsafeRawBufferPointer(start: buffer, count: runLength * 4096), at: at)
            }
            try bitmap.drain(below: pageCount) { (page) throws(VMMError) in
                if skipZeroPages && vireo_is_zero(region.host + page * 4096, 4096) != 0 {
                    try flush()
                    return
                }
                if runStart >= 0 && (page != runStart + runLength || runLength == 256) { try flush() }
                if runStart < 0 { runStart = page }
                runLength += 1
            }
            try flush()
            regionOffset += region.size
        }
    }

    /// The header and the metadata, during the pause. False when the metadata does not fit the
    /// room kept for it.
    func writeFront(metadata: [UInt8]) throws(VMMError) -> Bool {
        guard SavedStateFile.headerSize + metadata.count <= Int(memoryOffset) else { return false }
        var header = StateWriter()
        header.put(SavedStateFile.version)
        header.put(UInt32(0))
        header.put(UInt64(metadata.count))
        header.put(memoryOffset)
        header.put(memory.totalSize)
        var front = SavedStateFile.magic + header.bytes + metadata
        front += [UInt8](repeating: 0, count: Int(memoryOffset) - front.count)
        try front.withUnsafeBytes { bytes in Result { () throws(VMMError) in try writeAll(bytes, at: 0) } }.get()
        frontChecksum = SavedStateFile.frontChecksum(front)
        return true
    }

    /// After the pause: the trailer, fsync, rename into place.
    func finish() throws(VMMError) {
        guard let frontChecksum else { throw .host(operation: "finish \(temporary) before its metadata was written", errno: EINVAL) }
        let end = off_t(memoryOffset + memory.totalSize)
        try SavedStateFile.trailer(checksum: frontChecksum).withUnsafeBytes { bytes in Result { () throws(VMMError) in try writeAll(bytes, at: end) } }.get()
        guard fsync(fd) == 0 else { throw .host(operation: "fsync \(temporary)", errno: errno) }
        guard rename(temporary, path) == 0 else { throw .host(operation: "rename \(temporary) to \(path)", errno: errno) }
        finished = true
    }

    private func writeAll(_ bytes: UnsafeRawBufferPointer, at start: off_t) throws(VMMError) {
        var done = 0
        while done < bytes.count {
            let written = pwrite(fd, bytes.baseAddress.map { $0 + done }, bytes.count - done, start + off_t(done))
            if written < 0 {
                if errno == EINTR { continue }
                throw .host(operation: "write \(temporary)", errno: errno)
            }
            done += written
        }
    }
}
