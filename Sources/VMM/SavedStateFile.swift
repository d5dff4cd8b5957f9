import CHostSupport
import CZlib
import GuestMemory
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif


/// The saved-state file (docs/snapshots.md):
///
///     "VIREOSAV"  u32 version  u32 flags  u64 metadata length  u64 memory offset  u64 memory length
///     metadata (a BinaryRecord of SavedMachineState: the machine spec, CPUID, clocks, interrupt controllers, vCPUs, devices)
///     zero padding to the memory offset (page-aligned)
///     guest RAM, region after region
///     u32 CRC-32 of everything before the memory   u32 0   "VIREOEND"
///
/// A state file is hostile input: the header's numbers are checked against each other and the
/// file's size, and the checksum of all the VMM parses (header, metadata, padding) before any of
/// it is decoded; every field as it is decoded. Guest RAM is the guest's own data, which no host
/// code interprets: it is not checksummed, so a restore can map it instead of reading it.
enum SavedStateFile {
    static let magic = Array("VIREOSAV".utf8)
    static let trailerMagic = Array("VIREOEND".utf8)
    /// Bumped whenever the layout changes; a newer file is refused with the versions named.
    static let version: UInt32 = 4
    static let headerSize = 40
    static let trailerSize = 16
    static let metadataLimit = 64 << 20
    /// The most room a live snapshot's file keeps between the metadata and RAM.
    static let metadataRoomLimit = 16 << 20
    static let pageSize = 4096

    struct Header {
        var metadataLength: UInt64
        var memoryOffset: UInt64
        var memoryLength: UInt64
    }
}

/// What must match between a saved machine and the machine built to restore it. Saved states
/// and migration streams carry the whole `MachineSpec` they were taken from; this is the part of
/// it a restore or an arrival depends on, read off that spec and off the machine built here.

// MARK: reading and writing the file

extension SavedStateFile {
    /// Writes the state beside `path` and renames it into place only once it is complete and on
    /// disk, so an earlier state at `path` is never half-overwritten.
    static func write(metadata: [UInt8], memory: GuestMemory, to path: String) throws(VMMError) {
        let temporary = path + ".partial"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .host(operation: "create \(temporary)", errno: errno) }
        var completed = false
        defer {
            close(fd)
            if !completed { unlink(temporary) }
        }
        let memoryOffset = UInt64((headerSize + metadata.count + pageSize - 1) / pageSize * pageSize)
        var header = StateWriter()
        header.put(UInt64(0))   // room for the magic, written below
        header.put(version)
        header.put(UInt32(0))
        header.put(UInt64(metadata.count))
        header.put(memoryOffset)
        header.put(memory.totalSize)
        var front = magic + header.bytes.dropFirst(8) + metadata
        front += [UInt8](repeating: 0, count: Int(memoryOffset) - front.count)
        let crc = frontChecksum(front)
        try writeAll(fd, front, path: temporary)
        // RAM the guest never wrote stays a hole in the file (read back as zeros). Pages that were
        // never touched are known from the page map without reading them (reading would fault
        // each one in).
        let pages = memory.untouchedPages()
        var offset = off_t(memoryOffset)
        for region in memory.regions {
            var done = 0
            while done < Int(region.size) {
                let length = min(chunkSize, Int(region.size) - done)
                let chunk = region.host + done
                if pages?.neverTouched(chunk, length: length) != true && vireo_is_zero(chunk, length) == 0 {
                    let failure = writeAllReportingErrno(fd, UnsafeRawBufferPointer(start: chunk, count: length), at: offset)
                    if failure != 0 { throw .host(operation: "write \(temporary)", errno: failure) }
                }
                done += length
                offset += off_t(length)
            }
        }
        guard ftruncate(fd, offset) == 0 else { throw .host(operation: "extend \(temporary)", errno: errno) }
        let failure = trailer(checksum: crc).withUnsafeBytes { writeAllReportingErrno(fd, $0, at: offset) }
        if failure != 0 { throw .host(operation: "write \(temporary)", errno: failure) }
        guard fsync(fd) == 0 else { throw .host(operation: "fsync \(temporary)", errno: errno) }
        guard rename(temporary, path) == 0 else { throw .host(operation: "rename \(temporary) to \(path)", errno: errno) }
        completed = true
    }

    /// The checksum of the front: header, metadata and the padding up to RAM.
    static func frontChecksum(_ front: [UInt8]) -> UInt32 {
        UInt32(truncatingIfNeeded: front.withUnsafeBytes { vireo_crc32(0, $0.baseAddress, $0.count) })
    }

    static func trailer(checksum: UInt32) -> [UInt8] {
        var trailer = StateWriter()
        trailer.put(checksum)
        trailer.put(UInt32(0))
        return trailer.bytes + trailerMagic
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8], path: String) throws(VMMError) {
        let failure = bytes.withUnsafeBytes { writeAllReportingErrno(fd, $0) }
        if failure != 0 { throw .host(operation: "write \(path)", errno: failure) }
    }

    private static func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, path: String) throws(VMMError) {
        let failure = writeAllReportingErrno(fd, buffer)
        if failure != 0 { throw .host(operation: "write \(path)", errno: failure) }
    }

    /// 0, or the errno of the write that failed.
    private static func writeAllReportingErrno(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) -> Int32 {
        var offset = 0
        while offset < buffer.count {
            let written = Glibc.write(fd, buffer.baseAddress.map { $0 + offset }, buffer.count - offset)
            if written < 0 {
                if errno == EINTR { continue }
                return errno
            }
            offset += written
        }
        return 0
    }

    /// The same at a file offset.
    private static func writeAllReportingErrno(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, at start: off_t) -> Int32 {
        var offset = 0
        while offset < buffer.count {
            let written = pwrite(fd, buffer.baseAddress.map { $0 + offset }, buffer.count - offset, start + off_t(offset))
            if written < 0 {
                if errno == EINTR { continue }
                return errno
            }
            offset += written
        }
        return 0
    }

    /// The unit in which RAM is checked for zeros (and left out of the file).
    static let chunkSize = 64 << 10

    /// An open state file whose header has been checked against its size; the metadata is read,
    /// RAM is not yet.
    struct Opened: ~Copyable {
        let fd: Int32
        let path: String
        let header: Header
        let metadata: [UInt8]

        deinit { close(fd) }
    }

    static func openFile(_ path: String) throws(VMMError) -> Opened {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .host(operation: "open saved state \(path)", errno: errno) }
        return try read(descriptor: fd, path: path)
    }

    /// Checks the header of the state file open on `fd` (which it then owns) against its size,
    /// and the front against its checksum, and reads the metadata; RAM comes later.
    static func read(descriptor fd: Int32, path: String) throws(VMMError) -> Opened {
        func refuse(_ reason: String) -> VMMError {
            close(fd)
            return .savedState(path: path, reason: reason)
        }
        var status = stat()
        guard fstat(fd, &status) == 0 else { let code = errno; close(fd); throw .host(operation: "stat \(path)", errno: code) }
        let fileSize = UInt64(status.st_size)
        var headerBytes = [UInt8](repeating: 0, count: headerSize)
        guard (headerBytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, headerSize, 0) }) == headerSize else {
            throw refuse("shorter than its \(headerSize)-byte header (\(fileSize) bytes)")
        }
        guard Array(headerBytes[0..<8]) == magic else { throw refuse("not a Vireo saved state (no VIREOSAV magic)") }
        // The header's own numbers are read before the checksum: they say where it is.
        var reader = StateReader(Array(headerBytes[8...]))
        let header: Header
        do throws(StateError) {
            let version = try reader.get(UInt32.self, "version")
            guard version <= Self.version else {
                throw StateError.invalid(field: "version", reason: "the state is format \(version), newer than this Vireo reads (\(Self.version)); restore it with the Vireo that saved it")
            }
            guard version == Self.version else { throw StateError.invalid(field: "version", reason: "format \(version) is not one this Vireo reads (\(Self.version))") }
            let flags = try reader.get(UInt32.self, "flags")
            guard flags == 0 else { throw StateError.invalid(field: "flags", reason: "0x\(String(flags, radix: 16)) are flags this Vireo does not know") }
            header = Header(metadataLength: try reader.get(UInt64.self, "metadata length"),
                            memoryOffset: try reader.get(UInt64.self, "memory offset"),
                            memoryLength: try reader.get(UInt64.self, "memory length"))
        } catch {
            throw refuse(error.description)
        }
        guard header.metadataLength <= UInt64(metadataLimit) else { throw refuse("metadata of \(header.metadataLength) bytes, more than \(metadataLimit)") }
        // RAM follows the metadata within a page, or within the room a live snapshot keeps for it.
        guard header.memoryOffset % UInt64(pageSize) == 0, header.memoryOffset >= UInt64(headerSize) + header.metadataLength,
              header.memoryOffset - (UInt64(headerSize) + header.metadataLength) < UInt64(metadataRoomLimit) else {
            throw refuse("memory offset \(header.memoryOffset) does not follow the metadata")
        }
        let (end, overflow) = header.memoryOffset.addingReportingOverflow(header.memoryLength)
        guard !overflow, end <= UInt64.max - UInt64(trailerSize), end + UInt64(trailerSize) == fileSize else {
            throw refuse("\(fileSize) bytes, but the header describes \(overflow ? "more than can exist" : String(end &+ UInt64(trailerSize))) (truncated or extended)")
        }
        // The whole front (header, metadata, padding) against the trailer's checksum, before
        // anything in it is decoded.
        var front = [UInt8](repeating: 0, count: Int(header.memoryOffset))
        guard (front.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }) == front.count else {
            throw refuse("metadata could not be read")
        }
        var trailer = [UInt8](repeating: 0, count: trailerSize)
        guard (trailer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(fileSize) - off_t(trailerSize)) }) == trailer.count,
              Array(trailer[8...]) == trailerMagic else {
            throw refuse("no VIREOEND trailer after the memory (truncated?)")
        }
        let recorded = UInt32(trailer[0]) | UInt32(trailer[1]) << 8 | UInt32(trailer[2]) << 16 | UInt32(trailer[3]) << 24
        let computed = frontChecksum(front)
        guard recorded == computed else {
            throw refuse("checksum mismatch in its header and metadata (recorded 0x\(String(recorded, radix: 16)), computed 0x\(String(computed, radix: 16))): the file is damaged")
        }
        let metadata = Array(front[headerSize..<(headerSize + Int(header.metadataLength))])
        return Opened(fd: fd, path: path, header: header, metadata: metadata)
    }
}

extension SavedStateFile.Opened {
    /// Puts the file's RAM under `memory`: mapped privately when the RAM is plain anonymous
    /// memory (the default; pages come from the file as the guest first touches them, so the
    /// cost does not grow with the guest), read now otherwise. True when mapped.
    func loadMemory(into memory: GuestMemory) throws(VMMError) -> Bool {
        guard header.memoryLength == memory.totalSize else {
            throw .savedState(path: path, reason: "it holds \(header.memoryLength >> 20) MiB of memory; this VM has \(memory.totalSize >> 20) MiB")
        }
        if memory.mayMapFile {
            do throws(GuestMemoryError) {
                try memory.mapPrivately(file: fd, at: header.memoryOffset)
            } catch {
                throw .memory(error)
            }
            return true
        }
        var offset = off_t(header.memoryOffset)
        for region in memory.regions {
            let end = offset + off_t(region.size)
            var done = 0
            while done < Int(region.size) {
                // Holes (RAM the guest never wrote) are zeros: the fresh guest RAM already is.
                let data = lseek(fd, offset, VIREO_SEEK_DATA)
                let dataStart = data < 0 || data > end ? end : data
                if dataStart > offset {
                    done += Int(dataStart - offset)
                    offset = dataStart
                    continue
                }
                let hole = lseek(fd, offset, VIREO_SEEK_HOLE)
                let dataEnd = hole < 0 || hole > end ? end : max(hole, offset + 1)
                let want = min(Int(dataEnd - offset), 64 << 20)
                let count = pread(fd, region.host + done, want, offset)
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { throw .savedState(path: path, reason: "memory could not be read at offset \(offset)") }
                done += count
                offset += off_t(count)
            }
        }
        return false
    }
}
