import Foundation
import GuestMemory
import MachineSpec
import Testing
@testable import Devices

/// The vhost-user front end and the virtio-fs device against Debian's virtiofsd itself, without a
/// guest: the test is the driver, laying out split rings in a shared memfd as Linux would and
/// queueing FUSE requests by hand (INIT, LOOKUP, OPEN, READ) that virtiofsd answers in guest RAM.
@Suite(.serialized)
struct VhostUserTests {
    static let virtiofsd = "/usr/lib/qemu/virtiofsd"

    /// virtiofsd serving `directory` on a socket in it, until `stop`.
    final class Server {
        let process = Process()
        let socket: String
        let log: URL

        init(directory: URL, scratch: URL) throws {
            guard FileManager.default.isExecutableFile(atPath: VhostUserTests.virtiofsd) else {
                throw VirtioError.backend("\(VhostUserTests.virtiofsd) is missing; scripts/setup.sh installs qemu-system-common")
            }
            socket = scratch.appendingPathComponent("fs.sock").path
            log = scratch.appendingPathComponent("virtiofsd.log")
            _ = FileManager.default.createFile(atPath: log.path, contents: nil)
            process.executableURL = URL(fileURLWithPath: VhostUserTests.virtiofsd)
            process.arguments = ["--socket-path=\(socket)", "-o", "source=\(directory.path)", "-o", "cache=none", "-o", "sandbox=chroot"]
            let handle = try FileHandle(forWritingTo: log)
            process.standardOutput = handle
            process.standardError = handle
            try process.run()
            for _ in 0..<200 where !FileManager.default.fileExists(atPath: socket) { usleep(25_000) }
            guard FileManager.default.fileExists(atPath: socket) else { throw VirtioError.backend("virtiofsd made no socket: \(logText)") }
        }

        var logText: String { (try? String(contentsOf: log, encoding: .utf8)) ?? "" }

        func stop() {
            if process.isRunning { process.terminate() }
            process.waitUntilExit()
        }
    }

    /// The driver's side of one split ring of 16 entries in guest RAM.
    struct Ring {
        let memory: GuestMemory
        let base: UInt64
        static let size: UInt16 = 16
        var available: UInt16 = 0
        var used: UInt16 = 0
        var descriptorTable: UInt64 { base }
        var availableRing: UInt64 { base + 0x1000 }
        var usedRing: UInt64 { base + 0x2000 }
        var buffers: UInt64 { base + 0x3000 }

        func layout(index: Int) -> VirtioQueueLayout {
            VirtioQueueLayout(index: index, size: Self.size, descriptorTable: descriptorTable, availableRing: availableRing, usedRing: usedRing)
        }

        /// Queues one request (`request`, read by the device) with a 64 KiB reply buffer, and
        /// returns where the reply will be.
        mutating func submit(_ request: [UInt8]) throws -> UInt64 {
            let slot = UInt64(available % Self.size)
            let input = buffers + slot * 0x20000, reply = input + 0x10000
            try memory.write(request, at: GuestPhysicalAddress(input))
            let head = UInt16(slot * 2)
            try describe(head, address: input, length: UInt32(request.count), flags: 1, next: head + 1)
            try describe(head + 1, address: reply, length: 0x10000, flags: 2, next: 0)
            try memory.write(head, at: GuestPhysicalAddress(availableRing + 4 + 2 * slot))
            available &+= 1
            try memory.write(available, at: GuestPhysicalAddress(availableRing + 2))
            return reply
        }

        func describe(_ index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) throws {
            let entry = GuestPhysicalAddress(descriptorTable + 16 * UInt64(index))
            try memory.write(address, at: entry)
            try memory.write(length, at: entry + 8)
            try memory.write(flags, at: entry + 12)
            try memory.write(next, at: entry + 14)
        }

        /// The device's used index.
        func usedIndex() throws -> UInt16 { try memory.read(UInt16.self, at: GuestPhysicalAddress(usedRing + 2)) }
    }

    static func header(length: Int, opcode: UInt32, unique: UInt64, node: UInt64) -> [UInt8] {
        var bytes: [UInt8] = []
        func put<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
        put(UInt32(40 + length)); put(opcode); put(unique); put(node); put(UInt32(0)); put(UInt32(0)); put(UInt32(1)); put(UInt32(0))
        return bytes
    }

    static func bytes<T: FixedWidthInteger>(_ values: T...) -> [UInt8] {
        values.flatMap { value in withUnsafeBytes(of: value.littleEndian) { Array($0) } }
    }

    /// Waits for the back end's call on `descriptor` and for the used index to reach `count`.
    static func waitForUsed(_ ring: Ring, count: UInt16, call descriptor: Int32) throws {
        for _ in 0..<100 {
            if try ring.usedIndex() == count { return }
            var waiting = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            if poll(&waiting, 1, 100) > 0 {
                var value: UInt64 = 0
                _ = read(descriptor, &value, 8)
            }
        }
        throw VirtioError.backend("the back end used \(try ring.usedIndex()) of \(count) requests in 10 s")
    }

    /// A FUSE reply's header: its length, error and unique.
    static func replyHeader(_ memory: GuestMemory, at address: UInt64) throws -> (length: UInt32, error: Int32, unique: UInt64) {
        (try memory.read(UInt32.self, at: GuestPhysicalAddress(address)),
         Int32(bitPattern: try memory.read(UInt32.self, at: GuestPhysicalAddress(address + 4))),
         try memory.read(UInt64.self, at: GuestPhysicalAddress(address + 8)))
    }

    @Test("virtio-fs over vhost-user with virtiofsd itself: the greeting, the memory table and the rings are accepted, and FUSE INIT, LOOKUP, OPEN and READ come back through the request queue with the host file's bytes; a driver reset stops the rings and a new session on fresh rings is served from FUSE INIT again")
    func fuseThroughVirtiofsd() throws {
        let scratch = try FileManager.default.url(for: .itemReplacementDirectory, in: .userDomainMask, appropriateFor: URL(fileURLWithPath: "/tmp"), create: true)
        defer { try? FileManager.default.removeItem(at: scratch) }
        let shared = scratch.appendingPathComponent("shared")
        try FileManager.default.createDirectory(at: shared, withIntermediateDirectories: true)
        let content = Data((0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) })
        try content.write(to: shared.appendingPathComponent("hello.bin"))
        let server = try Server(directory: shared, scratch: scratch)
        defer { server.stop() }

        var backing = MemoryBacking()
        backing.file = .memfd
        backing.shared = true
        let memory = try GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), 8 << 20)], backing: backing)
        let device = try VirtioFileSystem(tag: "hostshare", socket: try VhostUserFrontend.connect(path: server.socket), memory: memory)
        #expect(device.frontend.backendFeatures & VirtioFeature.version1 != 0)
        #expect(device.frontend.backendFeatures & VhostUserFrontend.protocolFeaturesBit != 0)
        // The configuration space: the tag, NUL-padded, then one request queue.
        var configuration = [UInt8](repeating: 0xff, count: 40)
        configuration.withUnsafeMutableBytes { device.readConfiguration(offset: 0, into: $0) }
        #expect(Array(configuration[0..<9]) == Array("hostshare".utf8) && configuration[9..<36].allSatisfy { $0 == 0 })
        #expect(configuration[36..<40] == [1, 0, 0, 0])

        let high = Ring(memory: memory, base: 0x10000)
        var requests = Ring(memory: memory, base: 0x100000)
        device.acceptFeatures(VirtioFeature.version1)
        try device.driverReady([high.layout(index: 0), requests.layout(index: 1)])

        // INIT (26): protocol 7.31.
        var reply = try requests.submit(Self.header(length: 16, opcode: 26, unique: 1, node: 0) + Self.bytes(UInt32(7), UInt32(31), UInt32(0), UInt32(0)))
        _ = write(device.kickDescriptors[1], [UInt64(1)], 8)
        try Self.waitForUsed(requests, count: 1, call: device.callDescriptors[1])
        var answer = try Self.replyHeader(memory, at: reply)
        #expect(answer.error == 0 && answer.unique == 1, "\(answer) \(server.logText)")
        #expect(try memory.read(UInt32.self, at: GuestPhysicalAddress(reply + 16)) == 7, "FUSE major version")

        // LOOKUP (1) of hello.bin in the root (node 1): its size in the attributes.
        let name = Array("hello.bin".utf8) + [0]
        reply = try requests.submit(Self.header(length: name.count, opcode: 1, unique: 2, node: 1) + name)
        _ = write(device.kickDescriptors[1], [UInt64(1)], 8)
        try Self.waitForUsed(requests, count: 2, call: device.callDescriptors[1])
        answer = try Self.replyHeader(memory, at: reply)
        #expect(answer.error == 0 && answer.unique == 2, "\(answer) \(server.logText)")
        let node = try memory.read(UInt64.self, at: GuestPhysicalAddress(reply + 16))
        // fuse_entry_out: nodeid, generation, entry_valid, attr_valid, two nsec words, then attr (ino, size, ...).
        #expect(try memory.read(UInt64.self, at: GuestPhysicalAddress(reply + 16 + 48)) == UInt64(content.count))

        // OPEN (14) read-only, then READ (15) the whole file.
        reply = try requests.submit(Self.header(length: 8, opcode: 14, unique: 3, node: node) + Self.bytes(UInt32(0), UInt32(0)))
        _ = write(device.kickDescriptors[1], [UInt64(1)], 8)
        try Self.waitForUsed(requests, count: 3, call: device.callDescriptors[1])
        answer = try Self.replyHeader(memory, at: reply)
        #expect(answer.error == 0, "\(answer) \(server.logText)")
        let handle = try memory.read(UInt64.self, at: GuestPhysicalAddress(reply + 16))
        reply = try requests.submit(Self.header(length: 40, opcode: 15, unique: 4, node: node)
                                    + Self.bytes(handle, UInt64(0)) + Self.bytes(UInt32(8192), UInt32(0)) + Self.bytes(UInt64(0)) + Self.bytes(UInt32(0), UInt32(0)))
        _ = write(device.kickDescriptors[1], [UInt64(1)], 8)
        try Self.waitForUsed(requests, count: 4, call: device.callDescriptors[1])
        answer = try Self.replyHeader(memory, at: reply)
        #expect(answer.error == 0 && answer.length == UInt32(16 + content.count), "\(answer) \(server.logText)")
        let read = try memory.readBytes(count: content.count, at: GuestPhysicalAddress(reply + 16))
        #expect(Data(read) == content, "the file's bytes through the request queue")

        // A driver reset (a reboot): the back end stops both rings; a new session on fresh rings
        // is served from its start, FUSE INIT again.
        device.reset()
        #expect(device.frontend.failure == nil, "\(device.frontend.failure ?? "") \(server.logText)")
        let secondHigh = Ring(memory: memory, base: 0x400000)
        var second = Ring(memory: memory, base: 0x500000)
        device.acceptFeatures(VirtioFeature.version1)
        try device.driverReady([secondHigh.layout(index: 0), second.layout(index: 1)])
        reply = try second.submit(Self.header(length: 16, opcode: 26, unique: 5, node: 0) + Self.bytes(UInt32(7), UInt32(31), UInt32(0), UInt32(0)))
        _ = write(device.kickDescriptors[1], [UInt64(1)], 8)
        try Self.waitForUsed(second, count: 1, call: device.callDescriptors[1])
        answer = try Self.replyHeader(memory, at: reply)
        #expect(answer.error == 0 && answer.unique == 5, "\(answer) \(server.logText)")
    }

    @Test("a missing back end, private RAM and a bad tag are refused with the reason")
    func refusals() throws {
        #expect(throws: VirtioError.self) { _ = try VhostUserFrontend.connect(path: "/nonexistent/vireo-fs.sock") }
        do {
            _ = try VhostUserFrontend.connect(path: "/nonexistent/vireo-fs.sock")
        } catch {
            #expect(error.description.contains("cannot connect to the vhost-user back end at /nonexistent/vireo-fs.sock"), "\(error)")
        }
        let memory = try GuestMemory(anonymousRegions: [(GuestPhysicalAddress(0), 1 << 20)])
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { close(pair[1]) }
        do {
            _ = try VirtioFileSystem(tag: "t", socket: pair[0], memory: memory)
            Issue.record("private RAM was accepted")
        } catch {
            #expect(error.description.contains("must be a shared memfd or file"), "\(error)")
        }
        var other: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &other) == 0)
        defer { close(other[1]) }
        do {
            _ = try VirtioFileSystem(tag: "no spaces", socket: other[0], memory: memory)
            Issue.record("a bad tag was accepted")
        } catch {
            #expect(error.description.contains("tag 'no spaces'"), "\(error)")
        }
    }
}
