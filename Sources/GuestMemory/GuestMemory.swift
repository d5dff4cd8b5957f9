import CHostSupport
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An address in the guest's physical address space.
public struct GuestPhysicalAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rawValue < rhs.rawValue }
    public static func + (lhs: Self, rhs: UInt64) -> Self { Self(lhs.rawValue &+ rhs) }

    public var description: String { "0x" + String(rawValue, radix: 16) }
}

public enum GuestMemoryError: Error, CustomStringConvertible, Sendable, Equatable {
    /// `[address, address+length)` is not wholly inside one RAM region.
    case outOfBounds(address: GuestPhysicalAddress, length: UInt64)
    case mappingFailed(size: UInt64, errno: Int32)
    case overlappingRegions(GuestPhysicalAddress)
    /// The huge-page pool could not give a region its pages.
    case hugePagesUnavailable(size: UInt64, pageSize: UInt64, errno: Int32)
    /// `--lock-memory`: the kernel would not lock guest RAM in memory.
    case lockFailed(size: UInt64, errno: Int32)
    /// `--numa-node`: the kernel would not bind guest RAM to the node.
    case numaBindFailed(node: Int32, errno: Int32)
    /// `--memory-backing file:PATH|memfd`: the backing file could not be made ready.
    case backingFileFailed(path: String, operation: String, errno: Int32)
    /// A saved state's RAM could not be mapped in place of the anonymous RAM (`mapPrivately`).
    case fileMappingFailed(offset: UInt64, errno: Int32)

    public var description: String {
        switch self {
        case let .backingFileFailed(path, operation, code):
            return "--memory-backing: \(operation) \(path): \(String(cString: strerror(code)))"
                + (code == EWOULDBLOCK ? " (another running VM backs its RAM with this file)" : "")
        case let .numaBindFailed(node, code):
            return "--numa-node: cannot bind guest memory to host node \(node): \(String(cString: strerror(code)))"
        case let .lockFailed(size, code):
            return "--lock-memory: cannot lock \(size >> 20) MiB of guest memory in RAM: \(String(cString: strerror(code))); "
                + "the VMM's RLIMIT_MEMLOCK (ulimit -l) or the host's free memory is too small"
        case let .hugePagesUnavailable(size, pageSize, code):
            return "cannot back \(size >> 20) MiB of guest memory with \(pageSize >> 20) MiB huge pages: \(String(cString: strerror(code))); "
                + "reserve at least \(size / pageSize) of them (/proc/sys/vm/nr_hugepages, or the 1 GiB pool) and check RAM is a multiple of the page size"
        case let .fileMappingFailed(offset, code):
            return "cannot map guest memory from the saved state at offset \(offset): \(String(cString: strerror(code))) (errno \(code))"
        case let .outOfBounds(address, length):
            return "guest memory access of \(length) bytes at \(address) is outside guest RAM"
        case let .mappingFailed(size, code):
            return "cannot map \(size) bytes of guest memory: \(String(cString: strerror(code))) (errno \(code))"
        case let .overlappingRegions(address):
            return "guest memory regions overlap at \(address)"
        }
    }
}

/// One contiguous stretch of guest RAM backed by one host mapping.
public struct GuestMemoryRegion: @unchecked Sendable {
    public let start: GuestPhysicalAddress
    public let size: UInt64
    public let host: UnsafeMutableRawPointer

    public var end: UInt64 { start.rawValue + size }

    func contains(_ address: UInt64, length: UInt64) -> Bool {
        address >= start.rawValue && length <= size && address - start.rawValue <= size - length
    }
}

/// Guest RAM: anonymous mappings placed at guest-physical addresses. Every access is bounds-checked
/// against the regions, because addresses and lengths often come from the guest itself.
public final class GuestMemory: @unchecked Sendable {
    public let regions: [GuestMemoryRegion]
    private let ownsMappings: Bool
    /// A MAP_SHARED backing file and each region's offset in it.
    private let sharedFile: (descriptor: Int32, offsets: [UInt64])?
    /// The MAP_SHARED backing file and each region's offset in it, when RAM has one: what a
    /// vhost-user back end maps to reach the guest's buffers (virtio-fs). Nil for private RAM.
    public var sharedBacking: (descriptor: Int32, offsets: [UInt64])? { sharedFile }
    private let privateFileDescriptor: Int32
    /// Pages the VMM itself wrote (device DMA, virtqueue rings, reloads) while `logsWrites` is
    /// set, one bit per 4 KiB page per region: live migration must resend them, and KVM's dirty
    /// log sees only the guest's own writes. Marked before the write lands, so a reader of the
    /// log must treat a page as dirty until the writers have stopped (docs/migration.md).
    private let writeLogs: [UnsafeMutablePointer<UInt64>]
    private let logsWrites = Atomic<Bool>(false)
    public static let pageSize: UInt64 = 4096
    /// The plain anonymous RAM a saved state's file may replace (`mapPrivately`): no backing
    /// file, huge pages, preallocation, lock or NUMA binding, each of which asks for RAM that
    /// is resident or placed as the spec says, which a file mapping would not be.
    public let mayMapFile: Bool
    /// The advice the backing asked for, given again to a mapping that replaces the first.
    private let advisesMergeable: Bool
    private let advisesHugePages: Bool
    /// Set while RAM maps a saved state's file (`mapPrivately`): a page the guest never touched
    /// may then hold data, and a dropped page reads the file again, not zeros.
    private let mapsFile = Atomic<Bool>(false)
    /// Opened with the RAM, before the jail: the jailed VMM runs as another uid, which makes it
    /// undumpable, and /proc/self/pagemap of an undumpable process is root's alone.
    private let pageMap: PageMapFile?
    /// Where mapped RAM comes from (`mapPrivately`): kept open for the life of the memory, so a
    /// reader can tell the state's holes (zeros) from its data.
    private let mappedState = Mutex<SavedStateView?>(nil)

    /// How guest RAM is backed (docs/resources.md).
    /// How the RAM is backed: the machine spec's own value, mapped as it says.
    public typealias Backing = MemoryBacking

    /// Maps anonymous, private, lazily-populated memory for each `(start, size)`.
    public init(anonymousRegions layout: [(start: GuestPhysicalAddress, size: UInt64)], backing: Backing = Backing()) throws(GuestMemoryError) {
        let sorted = layout.sorted { $0.start < $1.start }
        for index in sorted.indices.dropFirst() where sorted[index - 1].start.rawValue + sorted[index - 1].size > sorted[index].start.rawValue {
            throw .overlappingRegions(sorted[index].start)
        }
        var regions: [GuestMemoryRegion] = []
        var backingDescriptor: Int32 = -1
        var fileOffsets: [UInt64] = []
        if let file = backing.file {
            let total = sorted.reduce(UInt64(0)) { $0 + $1.size }
            let name: String
            switch file {
            case .memfd:
                name = "memfd"
                backingDescriptor = vireo_guest_memfd("vireo-guest-ram")
            case let .path(path):
                name = path
                backingDescriptor = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
            }
            guard backingDescriptor >= 0 else { throw .backingFileFailed(path: name, operation: "open", errno: errno) }
            // One VM per file: two guests in one RAM file would read each other's memory.
            guard flock(backingDescriptor, LOCK_EX | LOCK_NB) == 0 else {
                let code = errno
                close(backingDescriptor)
                throw .backingFileFailed(path: name, operation: "lock", errno: code)
            }
            // Guest RAM starts as zeros, whatever the file held.
            guard ftruncate(backingDescriptor, 0) == 0, ftruncate(backingDescriptor, off_t(total)) == 0 else {
                let code = errno
                close(backingDescriptor)
                throw .backingFileFailed(path: name, operation: "size", errno: code)
            }
        }
        var nextOffset: UInt64 = 0
        for (start, size) in sorted where size > 0 {
            var flags = backing.file == nil ? MAP_PRIVATE | MAP_ANONYMOUS : (backing.shared ? MAP_SHARED : MAP_PRIVATE)
            if let page = backing.hugePageSize {
                guard size % page == 0 else {
                    for region in regions { munmap(region.host, Int(region.size)) }
                    throw .hugePagesUnavailable(size: size, pageSize: page, errno: EINVAL)
                }
                // MAP_HUGETLB with the page size's log2 in the bits from MAP_HUGE_SHIFT (26).
                flags |= 0x40000 | Int32(page.trailingZeroBitCount) << 26
            } else if !backing.preallocate {
                flags |= MAP_NORESERVE
            }
            if backing.preallocate { flags |= 0x8000 }   // MAP_POPULATE
            guard let host = mmap(nil, Int(size), PROT_READ | PROT_WRITE, flags, backingDescriptor, off_t(nextOffset)), host != MAP_FAILED else {
                let code = errno
                for region in regions { munmap(region.host, Int(region.size)) }
                if backingDescriptor >= 0 { close(backingDescriptor) }
                if let page = backing.hugePageSize { throw .hugePagesUnavailable(size: size, pageSize: page, errno: code) }
                throw .mappingFailed(size: size, errno: code)
            }
            // Huge pages are offered later (`offerHugePages`), once the boot image is written.
            Self.advise(host, size: Int(size), mergeable: backing.mergeable, hugePages: false)
            if let node = backing.numaNode, vireo_bind_to_numa_node(host, UInt(size), node) != 0 {
                let code = errno
                munmap(host, Int(size))
                for region in regions { munmap(region.host, Int(region.size)) }
                if backingDescriptor >= 0 { close(backingDescriptor) }
                throw .numaBindFailed(node: node, errno: code)
            }
            // Before the jail drops root: an unprivileged uid's RLIMIT_MEMLOCK is a few MiB.
            if backing.locked, mlock(host, Int(size)) != 0 {
                let code = errno
                munmap(host, Int(size))
                for region in regions { munmap(region.host, Int(region.size)) }
                if backingDescriptor >= 0 { close(backingDescriptor) }
                throw .lockFailed(size: size, errno: code)
            }
            regions.append(GuestMemoryRegion(start: start, size: size, host: host))
            fileOffsets.append(nextOffset)
            nextOffset += size
        }
        self.regions = regions
        self.ownsMappings = true
        mayMapFile = backing.file == nil && backing.hugePageSize == nil && !backing.preallocate && !backing.locked && backing.numaNode == nil
        advisesMergeable = backing.mergeable
        advisesHugePages = backing.transparentHugePages && !backing.mergeable && backing.hugePageSize == nil && backing.file == nil
        pageMap = PageMapFile()
        // Pages of a shared file mapping keep their contents when dropped from the mapping: they
        // are zeroed by punching holes in the file instead.
        if backing.shared, backingDescriptor >= 0 {
            sharedFile = (backingDescriptor, fileOffsets)
        } else {
            sharedFile = nil
        }
        // A private file mapping reads the (zeroed, never written) file where pages are dropped.
        if !backing.shared, backingDescriptor >= 0 { privateFileDescriptor = backingDescriptor } else { privateFileDescriptor = -1 }
        writeLogs = regions.map { region in
            let words = Self.bitmapWords(region)
            let log = UnsafeMutablePointer<UInt64>.allocate(capacity: words)
            log.initialize(repeating: 0, count: words)
            return log
        }
    }

    deinit {
        if ownsMappings { for region in regions { munmap(region.host, Int(region.size)) } }
        mappedState.withLock { if let view = $0 { close(view.descriptor) } }
        if let sharedFile { close(sharedFile.descriptor) }
        if privateFileDescriptor >= 0 { close(privateFileDescriptor) }
        for log in writeLogs { log.deallocate() }
    }

    /// Offers RAM to transparent huge pages (`MemoryBacking.transparentHugePages`). The machine
    /// calls it after writing the boot image: a huge page is zeroed whole at its first touch, and
    /// the loader's scattered writes (boot parameters, page tables, the command line, the kernel)
    /// would each zero 2 MiB before the guest's first instruction (0.7 ms of a probe's 5 ms start
    /// here, bench/README.md). Those pages stay small until khugepaged merges them; what the guest
    /// touches itself comes in huge pages, as before.
    public func offerHugePages() {
        guard advisesHugePages else { return }
        for region in regions { Self.advise(region.host, size: Int(region.size), mergeable: false, hugePages: true) }
    }

    private static func advise(_ host: UnsafeMutableRawPointer, size: Int, mergeable: Bool, hugePages: Bool) {
        if mergeable { _ = madvise(host, size, 12) }   // MADV_MERGEABLE
        if hugePages { _ = madvise(host, size, 14) }   // MADV_HUGEPAGE; only advice: a host without THP ignores it
    }

    /// Lazy restore (docs/snapshots.md): every region becomes a private mapping of `descriptor`
    /// from `offset` on, region after region, in place of its anonymous memory, so the guest's
    /// pages are read from the file when first touched and copied when first written; the file
    /// itself never changes. Only for plain anonymous RAM (`mayMapFile`), before any vCPU runs.
    public func mapPrivately(file descriptor: Int32, at offset: UInt64) throws(GuestMemoryError) {
        guard mayMapFile, ownsMappings, offset % Self.pageSize == 0 else { throw .fileMappingFailed(offset: offset, errno: EINVAL) }
        let kept = dup(descriptor)
        guard kept >= 0 else { throw .fileMappingFailed(offset: offset, errno: errno) }
        var view = SavedStateView(descriptor: kept, regions: [])
        var fileOffset = offset
        for region in regions {
            view.regions.append((UInt(bitPattern: region.host), UInt(region.size), fileOffset))
            fileOffset += region.size
        }
        mappedState.withLock { earlier in
            if let earlier { close(earlier.descriptor) }
            earlier = view
        }
        // First, so nothing reads the page map as if RAM were still anonymous.
        mapsFile.store(true, ordering: .sequentiallyConsistent)
        fileOffset = offset
        for region in regions {
            guard region.size % Self.pageSize == 0,
                  let mapped = mmap(region.host, Int(region.size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE,
                                    descriptor, off_t(fileOffset)),
                  mapped == region.host else {
                throw .fileMappingFailed(offset: fileOffset, errno: region.size % Self.pageSize == 0 ? errno : EINVAL)
            }
            Self.advise(region.host, size: Int(region.size), mergeable: advisesMergeable, hugePages: advisesHugePages)
            fileOffset += region.size
        }
    }

    /// Whether RAM is a saved state's file mapped privately (`mapPrivately`) rather than memory
    /// that started as zeros.
    public var mapsSavedState: Bool { mapsFile.load(ordering: .sequentiallyConsistent) }

    /// A reader of which pages read as zeros without being touched, for a writer that would
    /// leave them out without reading them (reading would fault each one in); nil when that
    /// cannot be known (no /proc/self/pagemap). While RAM maps a saved state an untouched page
    /// holds the file's data, so only one over a hole in the file counts.
    public func untouchedPages() -> UntouchedPages? {
        guard let pageMap else { return nil }
        guard mapsSavedState else { return UntouchedPages(pageMap: pageMap, savedState: nil) }
        return mappedState.withLock { $0 }.map { UntouchedPages(pageMap: pageMap, savedState: $0) }
    }

    /// Every region back to zeros (a reboot): dropped pages, or fresh anonymous memory in
    /// place of a saved state's file.
    public func zeroAll() throws(GuestMemoryError) {
        guard mapsSavedState else {
            for region in regions { try discard(region.start, length: region.size) }
            return
        }
        for region in regions {
            guard let mapped = mmap(region.host, Int(region.size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0),
                  mapped == region.host else {
                throw .mappingFailed(size: region.size, errno: errno)
            }
            Self.advise(region.host, size: Int(region.size), mergeable: advisesMergeable, hugePages: advisesHugePages)
        }
        mapsFile.store(false, ordering: .sequentiallyConsistent)
    }

    /// Words of a one-bit-per-page bitmap covering `region`.
    public static func bitmapWords(_ region: GuestMemoryRegion) -> Int {
        Int((region.size / pageSize + 63) / 64)
    }

    /// Starts (with a clean log) or stops recording the pages the VMM writes.
    public func logWrites(_ enabled: Bool) {
        if enabled {
            for (index, region) in regions.enumerated() { writeLogs[index].update(repeating: 0, count: Self.bitmapWords(region)) }
        }
        logsWrites.store(enabled, ordering: .sequentiallyConsistent)
    }

    /// ORs the pages the VMM wrote in region `index` since the last call into `bitmap` and
    /// clears the log.
    public func takeWrittenPages(region index: Int, into bitmap: UnsafeMutablePointer<UInt64>) {
        vireo_bitmap_take(writeLogs[index], bitmap, Self.bitmapWords(regions[index]))
    }

    private func noteWrite(_ address: UInt64, length: UInt64, region index: Int) {
        guard length > 0 else { return }
        let offset = address - regions[index].start.rawValue
        let first = offset / Self.pageSize
        let last = (offset + length - 1) / Self.pageSize
        vireo_bitmap_set_range(writeLogs[index], Int(first), Int(last - first + 1))
    }

    public var totalSize: UInt64 { regions.reduce(0) { $0 + $1.size } }

    /// The host pointer for `[address, address+length)`, which must lie inside one region. The
    /// caller may write through it: while writes are logged, the range counts as written.
    public func hostPointer(_ address: GuestPhysicalAddress, length: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        for (index, region) in regions.enumerated() where region.contains(address.rawValue, length: length) {
            if logsWrites.load(ordering: .relaxed) { noteWrite(address.rawValue, length: length, region: index) }
            return region.host.advanced(by: Int(address.rawValue - region.start.rawValue))
        }
        throw .outOfBounds(address: address, length: length)
    }

    /// As `hostPointer`, for reading only: nothing is logged.
    func readPointer(_ address: GuestPhysicalAddress, length: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        for region in regions where region.contains(address.rawValue, length: length) {
            return region.host.advanced(by: Int(address.rawValue - region.start.rawValue))
        }
        throw .outOfBounds(address: address, length: length)
    }

    /// Gives `[address, address+length)` back to the host (the balloon's inflate): the pages are
    /// freed now and read as zeros when the guest touches them again — or, while RAM maps a saved
    /// state, as the state had them (the guest's own data; a balloon without PAGE_POISON or page
    /// reporting, as Vireo's is, promises the guest nothing about a returned page's contents).
    /// Page-aligned ranges only.
    public func discard(_ address: GuestPhysicalAddress, length: UInt64) throws(GuestMemoryError) {
        guard address.rawValue % 4096 == 0, length % 4096 == 0 else { throw .outOfBounds(address: address, length: length) }
        let pointer = try hostPointer(address, length: length)
        dropPages(pointer, length: Int(length))
    }

    /// Frees whole pages so they read as zeros: MADV_DONTNEED, or a hole punched in a shared
    /// backing file (whose pages would otherwise come back with their old contents).
    @discardableResult
    private func dropPages(_ pointer: UnsafeMutableRawPointer, length: Int) -> Bool {
        guard let sharedFile else { return madvise(pointer, length, MADV_DONTNEED) == 0 }
        let address = UInt(bitPattern: pointer)
        for (index, region) in regions.enumerated() {
            let base = UInt(bitPattern: region.host)
            guard address >= base, address + UInt(length) <= base + UInt(region.size) else { continue }
            let offset = sharedFile.offsets[index] + UInt64(address - base)
            return vireo_file_punch_hole(sharedFile.descriptor, Int64(offset), Int64(length)) == 0
        }
        return false
    }

    public func contains(_ address: GuestPhysicalAddress, length: UInt64) -> Bool {
        regions.contains { $0.contains(address.rawValue, length: length) }
    }

    public func read<T: FixedWidthInteger>(_ type: T.Type, at address: GuestPhysicalAddress) throws(GuestMemoryError) -> T {
        let pointer = try readPointer(address, length: UInt64(MemoryLayout<T>.size))
        return T(littleEndian: pointer.loadUnaligned(as: T.self))
    }

    public func write<T: FixedWidthInteger>(_ value: T, at address: GuestPhysicalAddress) throws(GuestMemoryError) {
        let pointer = try hostPointer(address, length: UInt64(MemoryLayout<T>.size))
        pointer.storeBytes(of: value.littleEndian, as: T.self)
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at address: GuestPhysicalAddress) throws(GuestMemoryError) {
        guard !bytes.isEmpty, let source = bytes.baseAddress else { return }
        let pointer = try hostPointer(address, length: UInt64(bytes.count))
        pointer.copyMemory(from: source, byteCount: bytes.count)
    }

    public func write(_ bytes: [UInt8], at address: GuestPhysicalAddress) throws(GuestMemoryError) {
        try write(bytes[...], at: address)
    }

    public func write(_ bytes: ArraySlice<UInt8>, at address: GuestPhysicalAddress) throws(GuestMemoryError) {
        guard !bytes.isEmpty else { return }
        let pointer = try hostPointer(address, length: UInt64(bytes.count))
        bytes.withUnsafeBytes { buffer in
            if let source = buffer.baseAddress { pointer.copyMemory(from: source, byteCount: buffer.count) }
        }
    }

    public func readBytes(count: Int, at address: GuestPhysicalAddress) throws(GuestMemoryError) -> [UInt8] {
        let pointer = try readPointer(address, length: UInt64(count))
        return Array(UnsafeRawBufferPointer(start: pointer, count: count))
    }

    public func fill(_ value: UInt8, count: Int, at address: GuestPhysicalAddress) throws(GuestMemoryError) {
        let pointer = try hostPointer(address, length: UInt64(count))
        // Zeroing whole pages of our own anonymous mappings: drop them instead, and they read as
        // zeros when touched. Writing zeros would fault in every page (a kernel's 17 MiB .bss cost
        // 15 ms at boot that way).
        let pageSize = 4096
        let start = Int(bitPattern: pointer)
        let firstPage = (start + pageSize - 1) & ~(pageSize - 1)
        let endPage = (start + count) & ~(pageSize - 1)
        // While RAM maps a saved state a dropped page reads the file again: zeros are written.
        guard value == 0, ownsMappings, !mapsSavedState, endPage - firstPage >= 16 * pageSize else {
            pointer.initializeMemory(as: UInt8.self, repeating: value, count: count)
            return
        }
        pointer.initializeMemory(as: UInt8.self, repeating: 0, count: firstPage - start)
        if let pages = UnsafeMutableRawPointer(bitPattern: firstPage), !dropPages(pages, length: endPage - firstPage) {
            pointer.advanced(by: firstPage - start).initializeMemory(as: UInt8.self, repeating: 0, count: endPage - firstPage)
        }
        pointer.advanced(by: endPage - start).initializeMemory(as: UInt8.self, repeating: 0, count: start + count - endPage)
    }
}

/// This process's /proc/self/pagemap, opened once. Reads at offsets (pread) only, so threads
/// share it.
final class PageMapFile: Sendable {
    let fd: Int32

    init?() {
        fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
    }

    deinit { close(fd) }
}

/// The saved state RAM maps: its descriptor and, per region, the host range and file offset.
struct SavedStateView: @unchecked Sendable {
    let descriptor: Int32
    var regions: [(host: UInt, size: UInt, offset: UInt64)]

    /// True when `[address, address+length)` lies in one region and over a hole in the file.
    func isHole(_ address: UInt, length: Int) -> Bool {
        guard let region = regions.first(where: { address >= $0.host && address - $0.host + UInt(length) <= $0.size }) else { return false }
        let start = off_t(region.offset + UInt64(address - region.host))
        // The next data at or after `start`; none (ENXIO) is a hole to the end.
        let data = lseek(descriptor, start, VIREO_SEEK_DATA)
        if data < 0 { return errno == ENXIO }
        return data >= start + off_t(length)
    }
}

/// Which pages read as zeros without being touched: never present in RAM nor swapped out (the
/// page map), and, while RAM maps a saved state, over a hole in its file. Get one from
/// `GuestMemory.untouchedPages()`.
public struct UntouchedPages: Sendable {
    let pageMap: PageMapFile
    let savedState: SavedStateView?
    private static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// True only when every page of the range is known to read as zeros; any doubt says false.
    public func neverTouched(_ address: UnsafeMutableRawPointer, length: Int) -> Bool {
        let first = Int(bitPattern: address) / Self.pageSize
        let count = (length + Self.pageSize - 1) / Self.pageSize
        var entries = [UInt64](repeating: 0, count: count)
        let wanted = count * 8
        let read = entries.withUnsafeMutableBytes { pread(pageMap.fd, $0.baseAddress, wanted, off_t(first) * 8) }
        guard read == wanted else { return false }
        // Bit 63: present in RAM; bit 62: swapped out.
        guard entries.allSatisfy({ $0 & (3 << 62) == 0 }) else { return false }
        return savedState?.isHole(UInt(bitPattern: address), length: length) ?? true
    }
}
