import Foundation
import Testing

/// A loop device over a file in the test's directory, detached when the test ends: the host's
/// block device, with no disk of the machine's put at risk (docs/disk-images.md, "Block devices").
final class LoopDevice: @unchecked Sendable {
    let path: String
    let file: String

    init(file: String, size: String = "64M") throws {
        self.file = file
        let made = Harness.run(["truncate", "-s", size, file])
        guard made.status == 0 else { throw HarnessError("truncate \(file): \(made.stderr)") }
        let attached = Harness.run(["losetup", "--find", "--show", file])
        guard attached.status == 0, attached.stdout.hasPrefix("/dev/loop") else {
            throw HarnessError("losetup: \(attached.stderr) (the block-device tests need loop devices and do not skip)")
        }
        path = attached.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    deinit { Harness.run(["losetup", "-d", path]) }

    /// Bytes of the backing file the host has allocated.
    var allocatedBytes: UInt64 {
        var status = stat()
        return stat(file, &status) == 0 ? UInt64(status.st_blocks) * 512 : 0
    }

    /// "7:3", as `vireo info` names it.
    var numbers: String {
        var status = stat()
        guard stat(path, &status) == 0 else { return "?" }
        let rdev = UInt64(status.st_rdev)
        return "\((rdev >> 8) & 0xfff | (rdev >> 32) & ~0xfff):\(rdev & 0xff | (rdev >> 12) & ~0xff)"
    }
}

@Suite(.serialized) struct BlockDeviceTests {
    /// What probe=blk writes at `sector` with `seed`.
    static func written(seed: Int) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 13 + seed) } }

    @Test("a loop device as a VM's disk: its size from the device, a probe's writes (in odd, unaligned pieces, through O_DIRECT with cache=none) land on it, a discard reaches it (the backing file's blocks are freed, reads give zeros); a mounted device and qcow2 on a device are refused naming why; a library VM holds it jailed with O_DIRECT, `vireo info` shows the device and its owner is left alone")
    func loopDeviceDisk() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let loop = try LoopDevice(file: directory.appendingPathComponent("backing.img").path)
        let probe = try Harness.probe("pvh")

        // Written through O_DIRECT from two descriptors at odd guest addresses.
        let direct = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=77 split=1",
                                       "--disk", loop.path + ",cache=none,serial=loop"])
        #expect(direct.status == 0, "\(direct.stderr)")
        #expect(direct.stdout.contains("blk: dev=0 capacity=131072 ro=0 id_status=0 serial=loop write_status=0 flush_status=0 read_status=0 match=1 beyond_end_status=1"),
                "\(direct.stdout)")
        let backing = try FileHandle(forReadingFrom: URL(fileURLWithPath: loop.file))
        try backing.seek(toOffset: 512_000)
        #expect(Array(try backing.read(upToCount: 4096) ?? Data()) == Self.written(seed: 77), "the guest's write is not on the device")
        try backing.close()
        #expect(loop.allocatedBytes >= 4096)

        // Discarded: the loop device passes it to its file as a hole.
        let discarded = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=78 discard=1", "--disk", loop.path])
        #expect(discarded.stdout.contains("match=1 beyond_end_status=1 discard_status=0 zero_after_discard=1"), "\(discarded.stdout) \(discarded.stderr)")
        #expect(loop.allocatedBytes == 0, "the discard did not reach the device: \(loop.allocatedBytes) bytes still allocated")

        // The host's own: a mounted device is refused, read-only too, and so is qcow2 on a device.
        let mounted = try LoopDevice(file: directory.appendingPathComponent("mounted.img").path, size: "16M")
        let mountPoint = directory.appendingPathComponent("mnt").path
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        #expect(Harness.run(["mkfs.ext4", "-q", mounted.path]).status == 0)
        #expect(Harness.run(["mount", mounted.path, mountPoint]).status == 0)
        defer { Harness.run(["umount", mountPoint]) }
        for spec in [mounted.path, mounted.path + ",readonly"] {
            let refused = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk", "--disk", spec])
            #expect(refused.status != 0 && refused.stderr.contains("--disk: \(mounted.path) is mounted at \(mountPoint)"), "\(spec): \(refused.stderr)")
            #expect(!refused.stdout.contains("blk: dev=0 capacity"), "the guest ran: \(refused.stdout)")
        }
        let qcow2 = Harness.vireoRun(["--kernel", probe, "--memory", "64M", "--cmdline", "probe=blk", "--disk", loop.path + ",format=qcow2"])
        #expect(qcow2.status != 0 && qcow2.stderr.contains("\(loop.path) is a block device, which is a raw disk"), "\(qcow2.stderr)")

        // A library VM: attached (refused while mounted), started jailed, held with O_DIRECT.
        let library = try TestLibrary()
        #expect(library.vireo("create", "bd", "--kernel", probe, "--memory", "64M", "--no-disk",
                              "--cmdline", "console=ttyS0 probe=blkloop count=100000000").status == 0)
        let busy = library.vireo("disk", "attach", "bd", mounted.path)
        #expect(busy.status != 0 && busy.stderr.contains("PATH: \(mounted.path) is mounted at \(mountPoint)"), "\(busy.stderr)")
        let bad = library.vireo("disk", "attach", "bd", loop.path, "--cache", "unsafe")
        #expect(bad.status != 0 && bad.stderr.contains("--cache"), "\(bad.stderr)")
        #expect(library.vireo("disk", "attach", "bd", loop.path, "--cache", "none").status == 0)
        let started = library.vireo("start", "bd")
        #expect(started.status == 0, "\(started.stderr)")
        #expect(library.waitFor(30) { library.consoleLog("bd").contains("blkloop: flushed 80") }, "\(library.consoleLog("bd")) \(library.vmmLog("bd"))")
        let info = library.vireo("info", "bd")
        #expect(info.stdout.contains("\(loop.path) (raw, 64 MiB, block device \(loop.numbers), cache=none)"), "\(info.stdout)")
        #expect(info.stdout.contains("namespaces pid,mnt,ipc,uts,net; uid "), "\(info.stdout)")
        let report = (try? JSONSerialization.jsonObject(with: Data(library.vireo("info", "bd", "--json").stdout.utf8))) as? [String: Any]
        let pid = try #require((report?["process"] as? [String: Any])?["pid"] as? Int, "\(String(describing: report))")
        // The VMM's descriptor for the device carries O_DIRECT (octal 040000 in fdinfo's flags).
        let descriptors = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        var device = stat()
        _ = stat(loop.path, &device)
        let deviceFlags = descriptors.compactMap { fd -> UInt64? in
            // The link names the device as the jail sees it; the device numbers are what count.
            var held = stat()
            guard stat("/proc/\(pid)/fd/\(fd)", &held) == 0, (held.st_mode & S_IFMT) == S_IFBLK, held.st_rdev == device.st_rdev,
                  let info = try? String(contentsOfFile: "/proc/\(pid)/fdinfo/\(fd)", encoding: .utf8),
                  let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags:") }) else { return nil }
            return UInt64(line.dropFirst(6).trimmingCharacters(in: .whitespaces), radix: 8)
        }
        #expect(deviceFlags.count == 1 && deviceFlags.allSatisfy { $0 & 0o40000 != 0 }, "the VMM holds \(loop.path) as \(deviceFlags.map { String($0, radix: 8) })")
        var owner = stat()
        #expect(stat(loop.path, &owner) == 0 && owner.st_uid == 0, "the device's owner changed to \(owner.st_uid)")
        #expect(library.vireo("stop", "bd", "--force").status == 0)
        #expect(library.vireo("delete", "bd").status == 0)
        #expect(FileManager.default.fileExists(atPath: loop.path) && loop.allocatedBytes > 0, "deleting the VM touched the device")
    }
}
