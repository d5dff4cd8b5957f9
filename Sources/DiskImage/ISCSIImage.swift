import CDiskHost
import MachineSpec
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where one iSCSI LUN is: `iscsi://HOST[:PORT]/TARGET-IQN/LUN[?chap=FILE]` (QEMU's and
/// libiscsi's URL form, without credentials in it: they come from a file). A disk names one or
/// more joined by `|`, portals to the same target and LUN (docs/disk-images.md, "iSCSI").
public struct ISCSIAddress: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt16
    public var target: String
    public var lun: Int
    /// A file holding `USER:SECRET` for CHAP, readable by its owner alone.
    public var chapFile: String?
    public static let defaultPort: UInt16 = 3260

    public var description: String {
        "iscsi://\(host.contains(":") ? "[\(host)]" : host):\(port)/\(target)/\(lun)" + (chapFile.map { "?chap=\($0)" } ?? "")
    }

    /// HOST:PORT as libiscsi takes a portal.
    var portal: String { "\(host.contains(":") ? "[\(host)]" : host):\(port)" }

    public static func paths(_ text: String) throws(DiskImageError) -> [ISCSIAddress] {
        try NetworkDisk.paths(text, parse, leadingTo: { "\($0.target)/\($0.lun)" }, naming: "LUN")
    }

    public static func parse(_ text: String) throws(DiskImageError) -> ISCSIAddress {
        func refuse(_ why: String) -> DiskImageError {
            .invalidArgument(field: "disk", reason: "'\(text.prefix(300))' \(why); expected iscsi://HOST[:PORT]/TARGET-IQN/LUN[?chap=/FILE]")
        }
        guard text.utf8.count <= 4096, !text.utf8.contains(0), !text.contains(",") else { throw refuse("is not a usable address") }
        guard text.hasPrefix("iscsi://") else { throw refuse("is not an iSCSI address") }
        var rest = Substring(text.dropFirst("iscsi://".count))
        var chapFile: String?
        if let question = rest.firstIndex(of: "?") {
            let query = rest[rest.index(after: question)...]
            rest = rest[..<question]
            guard query.hasPrefix("chap="), !query.contains("&") else { throw refuse("has a query other than chap=FILE") }
            let file = String(query.dropFirst("chap=".count))
            guard file.hasPrefix("/"), file.utf8.count < 4096 else { throw refuse("needs an absolute CHAP file path") }
            chapFile = file
        }
        guard !rest.contains("@") else { throw refuse("carries credentials; put USER:SECRET in a file and name it with ?chap=FILE") }
        let pieces = rest.split(separator: "/", omittingEmptySubsequences: false)
        guard pieces.count == 3 else { throw refuse("does not name a host, a target and a LUN") }
        let (host, port) = try NetworkDisk.hostAndPort(pieces[0], defaultPort: defaultPort, refuse)
        // An iSCSI name (RFC 3720 §3.2.6): at most 223 bytes of lower-case letters, digits, '.', '-', ':'.
        let target = String(pieces[1])
        guard !target.isEmpty, target.utf8.count <= 223,
              target.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2e || $0 == 0x2d || $0 == 0x3a }) else {
            throw refuse("has an unusable target name (an iSCSI name: lower-case letters, digits, '.', '-', ':', at most 223)")
        }
        guard let lun = Int(pieces[2]), lun >= 0, lun < 16384 else { throw refuse("has a LUN that is not a number from 0 to 16383") }
        return ISCSIAddress(host: host, port: port, target: target, lun: lun, chapFile: chapFile)
    }
}

/// CHAP credentials, read from their file before the VMM is confined.
struct ISCSICredentials {
    let user: String
    let secret: String

    /// `USER:SECRET` on the first line of a regular file that only its owner may read.
    static func read(_ path: String, disk: String) throws(DiskImageError) -> ISCSICredentials {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw .io(operation: "open the CHAP file", path: path, errno: errno) }
        defer { close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0 else { throw .io(operation: "stat the CHAP file", path: path, errno: errno) }
        guard status.st_mode & S_IFMT == S_IFREG, status.st_size <= 4096 else {
            throw .invalidArgument(field: "disk", reason: "\(disk.prefix(300)): the CHAP file \(path) is not a regular file of at most 4 KiB")
        }
        guard status.st_mode & 0o077 == 0 else {
            throw .invalidArgument(field: "disk", reason: "\(disk.prefix(300)): the CHAP file \(path) may be read by others than its owner; chmod 600 it")
        }
        var bytes = [UInt8](repeating: 0, count: Int(status.st_size))
        let count = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard count == bytes.count else { throw .io(operation: "read the CHAP file", path: path, errno: count < 0 ? errno : EIO) }
        let line = bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).first ?? []
        guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon > line.startIndex, colon + 1 < line.endIndex,
              !line.contains(0) else {
            throw .invalidArgument(field: "disk", reason: "\(disk.prefix(300)): the CHAP file \(path) must hold USER:SECRET on its first line")
        }
        return ISCSICredentials(user: String(decoding: line[..<colon], as: UTF8.self),
                                secret: String(decoding: line[(colon + 1)...], as: UTF8.self))
    }
}

/// What a path needs to connect and log in again from inside the jail, gathered before it: a
/// TCP socket made in the host's network namespace (libiscsi is handed duplicates of it, see
/// `vireo_iscsi_adopt_socket`), the portal's numeric address (the jail has no resolver), the
/// initiator's name (the jail has a host name of its own) and the CHAP credentials.
final class ISCSIRedial: @unchecked Sendable {
    let template: Int32
    let portal: String
    let initiator: String
    let credentials: ISCSICredentials?

    /// nil when the portal's name does not resolve or no socket can be made: the path then stays
    /// down once it fails.
    init?(_ address: ISCSIAddress, initiator: String, credentials: ISCSICredentials?) {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var found: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(address.host, String(address.port), &hints, &found) == 0, let first = found else { return nil }
        defer { freeaddrinfo(first) }
        var text = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        guard getnameinfo(first.pointee.ai_addr, first.pointee.ai_addrlen, &text, socklen_t(text.count), nil, 0, NI_NUMERICHOST) == 0 else { return nil }
        let made = Glibc.socket(first.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard made >= 0 else { return nil }
        let host = NetworkDisk.text(text)
        template = made
        portal = host.contains(":") ? "[\(host)]:\(address.port)" : "\(host):\(address.port)"
        self.initiator = initiator
        self.credentials = credentials
    }

    deinit { close(template) }
}

/// A disk that is an iSCSI LUN, through libiscsi, over one or more portals. Requests go to the
/// active path; when its connection fails the path is connected and logged in again, or the next
/// path takes over, for up to `reconnectSeconds`, and the request is sent again (whole-range
/// reads and writes are idempotent), as for NBD. A jailed VMM reconnects through each path's
/// socket made before the jail (`ISCSIRedial`). The guest sees an I/O error only when no path
/// answers in that time, or when the target refuses a command.
public final class ISCSIImage: DiskImage, MultipathDisk, @unchecked Sendable {
    public let path: String
    public var format: DiskFormat { .raw }
    public let virtualSize: UInt64
    public let isReadOnly: Bool
    public let addresses: [ISCSIAddress]
    let lun: Int32
    let blockSize: UInt32
    /// Whether the LUN is thin-provisioned (LBPME): then UNMAP serves discards.
    let thin: Bool
    /// One path's libiscsi context, used under the paths' lock only.
    struct Session: @unchecked Sendable {
        let context: UnsafeMutableRawPointer
    }
    private let paths: Mutex<PathTable<Session>>
    /// Each path's means to connect again (nil: it cannot).
    private let redials: [ISCSIRedial?]
    /// How long a request waits for a path (QEMU's `reconnect-delay`, the NBD client's figure).
    static let reconnectSeconds = 30.0
    /// The most one command carries.
    static let maximumTransfer = 1 << 20
    /// The block size Vireo serves: its guests' 512-byte sectors. (A 4096-byte LUN would need
    /// read-modify-write of partial blocks; refused by name.)
    static let servedBlockSize: UInt32 = 512

    /// Each path's TCP connection, made before the VMM is confined; logged in only afterwards.
    public struct Connecting: NetworkDiskConnecting, @unchecked Sendable {
        let path: String
        let addresses: [ISCSIAddress]
        let sessions: [Session?]
        let redials: [ISCSIRedial?]
        let problems: [String]
        let readOnly: Bool

        public func decode() throws(DiskImageError) -> any DiskImage {
            try ISCSIImage(self)
        }
    }

    /// The initiator's name: one per host, as open-iscsi's InitiatorName.
    static var initiatorName: String {
        var buffer = [CChar](repeating: 0, count: 256)
        let host = gethostname(&buffer, buffer.count - 1) == 0 ? NetworkDisk.text(buffer).lowercased() : "host"
        let cleaned = String(host.unicodeScalars.map { ($0 >= "a" && $0 <= "z") || ($0 >= "0" && $0 <= "9") || $0 == "-" || $0 == "." ? Character($0) : "-" })
        return "iqn.2026-12.dev.vireo:" + cleaned.prefix(150)
    }

    /// The most LUNs a listing takes from a target.
    static let maximumListedLUNs = 256

    /// The disks among the LUNs of the target `address` names (its LUN is ignored): each LUN
    /// REPORT LUNS gives whose READ CAPACITY answers, with its size — an iscsi pool's volumes.
    /// Logs in with the address's CHAP file, as a disk does, and out again.
    public static func listLUNs(_ address: ISCSIAddress) throws(DiskImageError) -> [(lun: Int, size: UInt64)] {
        var error = [CChar](repeating: 0, count: 512)
        if vireo_iscsi_load(&error, error.count) != 0 { throw .network(path: address.description, reason: NetworkDisk.text(error)) }
        let credentials = try address.chapFile.map { (file) throws(DiskImageError) in try ISCSICredentials.read(file, disk: address.description) }
        guard let session = vireo_iscsi_connect(initiatorName, address.target, address.portal, credentials?.user, credentials?.secret,
                                                10, &error, error.count) else {
            throw .network(path: address.description, reason: NetworkDisk.text(error))
        }
        var luns = [Int32](repeating: 0, count: maximumListedLUNs)
        var sizes = [UInt64](repeating: 0, count: maximumListedLUNs)
        let count = vireo_iscsi_list_luns(session, &luns, &sizes, Int32(maximumListedLUNs), &error, error.count)
        vireo_iscsi_close(session, count >= 0 ? 1 : 0)
        guard count >= 0 else { throw .network(path: address.description, reason: NetworkDisk.text(error)) }
        return (0..<Int(count)).compactMap { index in
            sizes[index] > 0 && luns[index] >= 0 && luns[index] < 16384 ? (Int(luns[index]), sizes[index]) : nil
        }
    }

    /// Connects every portal it can now; at least one must answer.
    public static func connect(path: String, readOnly: Bool) throws(DiskImageError) -> Connecting {
        let addresses = try ISCSIAddress.paths(path)
        var sessions: [Session?] = []
        var redials: [ISCSIRedial?] = []
        var problems: [String] = []
        var error = [CChar](repeating: 0, count: 512)
        if vireo_iscsi_load(&error, error.count) != 0 { throw .network(path: path, reason: NetworkDisk.text(error)) }
        let initiator = initiatorName
        for address in addresses {
            let credentials = try address.chapFile.map { (file) throws(DiskImageError) in try ISCSICredentials.read(file, disk: path) }
            let session = vireo_iscsi_connect(initiator, address.target, address.portal, credentials?.user, credentials?.secret,
                                              10, &error, error.count)
            sessions.append(session.map(Session.init))
            redials.append(ISCSIRedial(address, initiator: initiator, credentials: credentials))
            if session == nil { problems.append(addresses.count > 1 ? "\(address): \(NetworkDisk.text(error))" : NetworkDisk.text(error)) }
        }
        guard sessions.contains(where: { $0 != nil }) else {
            throw .network(path: path, reason: problems.joined(separator: "; "))
        }
        return Connecting(path: path, addresses: addresses, sessions: sessions, redials: redials, problems: problems, readOnly: readOnly)
    }

    init(_ connecting: Connecting) throws(DiskImageError) {
        path = connecting.path
        addresses = connecting.addresses
        lun = Int32(connecting.addresses[0].lun)
        var sessions = connecting.sessions
        var problems = connecting.problems
        var geometry: (blocks: UInt64, blockSize: UInt32, thin: Bool)?
        var error = [CChar](repeating: 0, count: 512)
        for index in sessions.indices {
            guard let session = sessions[index] else { continue }
            var blocks: UInt64 = 0
            var size: UInt32 = 0
            var thin: Int32 = 0
            let result = vireo_iscsi_login(session.context, lun, &blocks, &size, &thin, &error, error.count)
            let why = NetworkDisk.text(error)
            if result == 0, let known = geometry, known.blocks != blocks || known.blockSize != size {
                ISCSIImage.closeAll(sessions)
                throw .network(path: connecting.path, reason: "\(connecting.addresses[index]) has \(blocks) blocks of \(size) bytes, another path \(known.blocks) of \(known.blockSize): not the same LUN")
            }
            if result == 0 {
                geometry = (blocks, size, thin != 0)
            } else {
                vireo_iscsi_close(session.context, 0)
                sessions[index] = nil
                problems.append(connecting.addresses.count > 1 ? "\(connecting.addresses[index]): \(why)" : why)
            }
        }
        guard let geometry, let first = sessions.firstIndex(where: { $0 != nil }) else {
            ISCSIImage.closeAll(sessions)
            throw .network(path: connecting.path, reason: problems.joined(separator: "; "))
        }
        guard geometry.blockSize == Self.servedBlockSize else {
            ISCSIImage.closeAll(sessions)
            throw .network(path: connecting.path, reason: "the LUN's blocks are \(geometry.blockSize) bytes; Vireo serves LUNs with \(Self.servedBlockSize)-byte blocks")
        }
        let (size, overflow) = geometry.blocks.multipliedReportingOverflow(by: UInt64(geometry.blockSize))
        guard !overflow, size <= UInt64(Int64.max) else {
            ISCSIImage.closeAll(sessions)
            throw .network(path: connecting.path, reason: "the LUN's size (\(geometry.blocks) blocks) is out of range")
        }
        virtualSize = size
        blockSize = geometry.blockSize
        thin = geometry.thin
        isReadOnly = connecting.readOnly
        paths = Mutex(PathTable(sessions: sessions, active: first))
        redials = connecting.redials
        for problem in problems { NetworkDisk.say("iscsi: \(path): path down at start: \(problem)") }
    }

    /// Logs every open path out and frees its libiscsi context.
    private static func closeAll(_ sessions: [Session?]) {
        for case let session? in sessions { vireo_iscsi_close(session.context, 1) }
    }

    deinit {
        paths.withLock { Self.closeAll($0.sessions) }
    }

    /// Runs `body` on the active path; on a failed connection connects that path again or moves
    /// to the next, until one answers or `reconnectSeconds` pass. `body` returns vireo_iscsi_*'s
    /// result.
    private func perform(_ what: String, _ body: (UnsafeMutableRawPointer, UnsafeMutablePointer<CChar>, Int) -> Int32) throws(DiskImageError) {
        try paths.withLock { (state) throws(DiskImageError) in
            var error = [CChar](repeating: 0, count: 512)
            let deadline = Self.monotonicSeconds() + Self.reconnectSeconds
            var lastProblem = ""
            var attempt = 0
            while true {
                if state.sessions[state.active] == nil, let redial = redials[state.active] {
                    do throws(DiskImageError) {
                        state.sessions[state.active] = try reconnect(state.active, redial)
                        NetworkDisk.say("iscsi: \(path): connected again through \(addresses[state.active])")
                    } catch {
                        lastProblem = error.description
                    }
                }
                if let session = state.sessions[state.active] {
                    let result = error.withUnsafeMutableBufferPointer { buffer -> Int32 in
                        guard let base = buffer.baseAddress else { return 2 }
                        return body(session.context, base, buffer.count)
                    }
                    if result == 0 { return }
                    let why = NetworkDisk.text(error)
                    if result != 1 { throw .io(operation: "\(what): \(why)", path: path, errno: EIO) }
                    lastProblem = why
                    vireo_iscsi_close(session.context, 0)
                    state.sessions[state.active] = nil
                    NetworkDisk.say("iscsi: \(path): " + (addresses.count > 1 ? "\(addresses[state.active]) " : "") + "failed during \(what): \(why)")
                }
                guard Self.monotonicSeconds() < deadline else {
                    throw .io(operation: "\(what): no path to the LUN answered for \(Int(Self.reconnectSeconds)) s (last: \(lastProblem))", path: path, errno: EIO)
                }
                // The next path; a path that is down is tried again in its turn.
                let previous = state.active
                state.active = (state.active + 1) % addresses.count
                if state.active != previous {
                    state.failovers += 1
                    NetworkDisk.say("iscsi: \(path): now on \(addresses[state.active])")
                }
                attempt += 1
                if attempt >= addresses.count { usleep(useconds_t(min(100_000 * attempt / addresses.count, 500_000))) }
            }
        }
    }

    /// Path `index` connected and logged in again, through its socket made before the jail; it
    /// must still show the same LUN. Called with the paths' lock held.
    private func reconnect(_ index: Int, _ redial: ISCSIRedial) throws(DiskImageError) -> Session {
        var error = [CChar](repeating: 0, count: 512)
        vireo_iscsi_adopt_socket(redial.template)
        let context = vireo_iscsi_connect(redial.initiator, addresses[index].target, redial.portal, redial.credentials?.user, redial.credentials?.secret,
                                          10, &error, error.count)
        vireo_iscsi_adopt_socket(-1)
        guard let context else { throw .network(path: addresses[index].description, reason: NetworkDisk.text(error)) }
        var blocks: UInt64 = 0
        var size: UInt32 = 0
        var thin: Int32 = 0
        let result = vireo_iscsi_login(context, lun, &blocks, &size, &thin, &error, error.count)
        guard result == 0 else {
            vireo_iscsi_close(context, 0)
            throw .network(path: addresses[index].description, reason: NetworkDisk.text(error))
        }
        guard size == blockSize, blocks.multipliedReportingOverflow(by: UInt64(size)) == (virtualSize, false) else {
            vireo_iscsi_close(context, 1)
            throw .network(path: addresses[index].description, reason: "the LUN is now \(blocks) blocks of \(size) bytes; it was \(virtualSize) bytes")
        }
        return Session(context: context)
    }

    private static func monotonicSeconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }

    public var pathStates: [(address: String, connected: Bool, active: Bool)] {
        paths.withLock { $0.states(addresses.map(\.description)) }
    }

    public var failovers: Int { paths.withLock { $0.failovers } }

    /// Checks a transfer lies on whole blocks (virtio-blk's sectors always do).
    private func checkBlocks(_ offset: UInt64, _ length: UInt64) throws(DiskImageError) {
        guard offset % UInt64(blockSize) == 0, length % UInt64(blockSize) == 0 else {
            throw .invalidArgument(field: "offset", reason: "\(path): \(length) bytes at \(offset) are not whole \(blockSize)-byte blocks of the LUN")
        }
    }

    /// Whole blocks only (callers round; the LUN's size is whole blocks, so rounding stays inside).
    private func transfer(write: Bool, _ base: UnsafeMutableRawPointer, count: Int, at offset: UInt64) throws(DiskImageError) {
        try checkBlocks(offset, UInt64(count))
        var done = 0
        while done < count {
            let piece = min(Self.maximumTransfer, count - done)
            let lba = (offset + UInt64(done)) / UInt64(blockSize)
            try perform(write ? "write" : "read") { session, error, size in
                vireo_iscsi_transfer(session, lun, write ? 1 : 0, lba, UInt32(piece), blockSize, base + done, error, size)
            }
            done += piece
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard let base = buffer.baseAddress else { return try checkRange(offset, 0) }
        try checkRange(offset, buffer.count)
        guard isWholeBlocks(offset, UInt64(buffer.count)) else {
            return try throughWholeBlocks(offset, buffer.count) { (bounce, skip) throws(DiskImageError) in
                base.copyMemory(from: bounce + skip, byteCount: buffer.count)
            }
        }
        try transfer(write: false, base, count: buffer.count, at: offset)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskImageError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        guard let base = buffer.baseAddress else { return try checkRange(offset, 0) }
        try checkRange(offset, buffer.count)
        guard isWholeBlocks(offset, UInt64(buffer.count)) else {
            // Read, modify, write the blocks it touches. Only pieces of one request share a block
            // (a guest's sectors are the LUN's blocks), and one request's pieces run in order.
            let start = offset / UInt64(blockSize) * UInt64(blockSize)
            return try throughWholeBlocks(offset, buffer.count) { (bounce, skip) throws(DiskImageError) in
                (bounce + skip).copyMemory(from: base, byteCount: buffer.count)
                try transfer(write: true, bounce, count: Self.wholeBlocks(offset, buffer.count, blockSize).count, at: start)
            }
        }
        // libiscsi only reads from a write's buffer.
        try transfer(write: true, UnsafeMutableRawPointer(mutating: base), count: buffer.count, at: offset)
    }

    private func isWholeBlocks(_ offset: UInt64, _ length: UInt64) -> Bool {
        offset % UInt64(blockSize) == 0 && length % UInt64(blockSize) == 0
    }

    /// The whole blocks around `count` bytes at `offset`: their length, and where the bytes start in them.
    private static func wholeBlocks(_ offset: UInt64, _ count: Int, _ blockSize: UInt32) -> (count: Int, skip: Int) {
        let size = UInt64(blockSize)
        let start = offset / size * size
        let end = (offset + UInt64(count) + size - 1) / size * size
        return (Int(end - start), Int(offset - start))
    }

    /// Reads the whole blocks around an unaligned range into a bounce buffer and hands it over.
    private func throughWholeBlocks(_ offset: UInt64, _ count: Int,
                                    _ body: (UnsafeMutableRawPointer, Int) throws(DiskImageError) -> Void) throws(DiskImageError) {
        let (length, skip) = Self.wholeBlocks(offset, count, blockSize)
        let bounce = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 16)
        defer { bounce.deallocate() }
        try transfer(write: false, bounce, count: length, at: offset - UInt64(skip))
        try body(bounce, skip)
    }

    public func flush() throws(DiskImageError) {
        guard !isReadOnly else { return }
        try perform("flush") { session, error, size in vireo_iscsi_flush(session, lun, error, size) }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        try checkWritableRange(offset, length)
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(length, UInt64(Self.maximumTransfer))), alignment: 16)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let count = Int(min(UInt64(zeros.count), length - done))
            try write(UnsafeRawBufferPointer(rebasing: zeros[0..<count]), at: offset + done)
            done += UInt64(count)
        }
    }

    /// UNMAP on a thin-provisioned LUN; elsewhere a discard is advice, and kept as data.
    public func discard(at offset: UInt64, length: UInt64) throws(DiskImageError) {
        try checkWritableRange(offset, length)
        // Virtio-blk discards whole sectors, the LUN's blocks; anything else is advice not taken.
        guard thin, isWholeBlocks(offset, length) else { return }
        var done: UInt64 = 0
        while done < length {
            let count = min(length - done, UInt64(Self.maximumTransfer))
            let lba = (offset + done) / UInt64(blockSize)
            let blocks = UInt32(count / UInt64(blockSize))
            try perform("unmap") { session, error, size in vireo_iscsi_unmap(session, lun, lba, blocks, error, size) }
            done += count
        }
    }

    public func info() throws(DiskImageError) -> DiskInfo {
        DiskInfo(path: path, format: .raw, virtualSize: virtualSize, allocatedBytes: virtualSize, clusterSize: nil, backingChain: [])
    }
}
