import Foundation
import Testing

/// `vireo save` and resuming with `vireo start` (docs/snapshots.md), proven with the dirtying
/// probe: it rewrites memory from ring 3 at native speed and checks, every round, that memory
/// holds what it wrote. Across a save and a restore its round counter must go on from where it
/// stopped and every sum must still match.
@Suite(.serialized)
struct SavedStateTests {
    /// The rounds the probe completed, in order, from a console log.
    static func rounds(_ console: String) -> [Int] {
        // Lines end in "\r\n", one Character in Swift: split on any newline.
        console.split(whereSeparator: \.isNewline).compactMap { line -> Int? in
            let fields = line.split(separator: " ")
            guard fields.count == 4, fields[0] == "dirty", fields[2] == "sum" else { return nil }
            return Int(fields[1])
        }
    }

    static func createDirtying(_ library: TestLibrary, _ name: String, fill: Bool = false) throws {
        // A disk (virtio-blk, qcow2) and the default entropy device come along, so their
        // transports' queues are saved and restored too. With `fill` every other page of RAM
        // holds data the guest never touches again.
        try library.createProbe(name, command: "probe=dirty spin=2000000" + (fill ? " fill=1" : ""), extra: ["--disk", "32M"])
    }

    @Test("save: the VM stops as \"saved\" with its state in its directory and cannot be changed; start resumes it: the probe's rounds go on from where they stopped, every memory sum matches, the state file is consumed and the disk is clean; RAM is mapped from the state, and a second save keeps the pages the guest left untouched")
    func saveAndResume() throws {
        let library = try TestLibrary()
        try Self.createDirtying(library, "keep", fill: true)
        #expect(library.vireo("start", "keep").status == 0)
        #expect(library.waitFor(30) { Self.rounds(library.consoleLog("keep")).count >= 20 }, "\(library.consoleLog("keep").suffix(500))")

        let saved = library.vireo("save", "keep", timeout: 120)
        #expect(saved.status == 0, "\(saved.stderr)")
        #expect(saved.stdout.contains("Saved VM 'keep'"), "\(saved.stdout)")
        #expect(library.state("keep") == "saved")
        let statePath = library.root.appendingPathComponent("keep/vmm/saved.state").path
        #expect(FileManager.default.fileExists(atPath: statePath))
        #expect(library.vmmLog("keep").contains("state saved to \(statePath); the VM has stopped"), "\(library.vmmLog("keep"))")
        let info = library.vireo("info", "keep").stdout
        #expect(info.contains("Saved state:") && info.contains("\(statePath) (`vireo start keep` resumes"), "\(info)")
        let before = Self.rounds(library.consoleLog("keep"))
        let last = try #require(before.last)
        // Nothing runs while it is saved.
        Thread.sleep(forTimeInterval: 1)
        #expect(Self.rounds(library.consoleLog("keep")).last == last)

        // The saved guest expects the machine it was saved on.
        let change = library.vireo("set", "keep", "--cpus", "2")
        #expect(change.status == 2 && change.stderr.contains("it is saved") && change.stderr.contains("--discard-state"), "\(change.stderr)")

        // Kept under a second name: the restore unlinks the state it consumed.
        let firstState = library.root.appendingPathComponent("keep-first.state").path
        #expect(link(statePath, firstState) == 0)
        let resumed = library.vireo("start", "keep")
        #expect(resumed.status == 0, "\(resumed.stderr)")
        #expect(library.waitFor(30) { Self.rounds(library.consoleLog("keep")).count >= 20 }, "\(library.consoleLog("keep").suffix(500))")
        let after = Self.rounds(library.consoleLog("keep"))
        // A line the guest was half-way through at the save is finished by the restored guest, so
        // the two runs' logs joined read as one run: every round once, in order, from 0.
        let joined = Self.rounds(library.previousConsoleLog("keep") + library.consoleLog("keep"))
        #expect(joined == Array(0..<joined.count), "rounds before: …\(before.suffix(3)); after: \(after.prefix(3))…")
        #expect((after.first ?? 0) > last && (after.first ?? 0) <= last + 2, "rounds before: …\(before.suffix(3)); after: \(after.prefix(3))…")
        #expect(!library.consoleLog("keep").contains("MISMATCH"), "\(library.consoleLog("keep").suffix(500))")
        #expect(!FileManager.default.fileExists(atPath: statePath), "the state stays after it was restored")
        #expect(library.vmmLog("keep").contains("restored from \(statePath)") && library.vmmLog("keep").contains("(RAM mapped from the file)"),
                "\(library.vmmLog("keep"))")
        #expect(library.state("keep") == "running")

        // Lazy restore: RAM maps the state file, so a page the guest has not touched since (the
        // pages `fill=1` wrote, its boot data) holds data although the page map says it was never
        // touched. A second save must keep every such page: each page with data in the first
        // state has data in the second; and a third run goes on from the second state.
        let secondSave = library.vireo("save", "keep", timeout: 120)
        #expect(secondSave.status == 0, "\(secondSave.stderr)")
        let compared = Harness.run(["python3", "-c", """
            import os, struct, sys
            def ram(path):
                fd = os.open(path, os.O_RDONLY)
                offset, length = struct.unpack_from("<QQ", os.pread(fd, 40, 0), 24)
                return fd, offset, length
            (fd1, o1, length), (fd2, o2, length2) = ram(sys.argv[1]), ram(sys.argv[2])
            assert length == length2, (length, length2)
            kept = lost = 0
            position = 0
            while position < length:
                try:
                    start = os.lseek(fd1, o1 + position, os.SEEK_DATA) - o1
                except OSError:
                    break
                if start >= length:
                    break
                end = min(os.lseek(fd1, o1 + start, os.SEEK_HOLE) - o1, length)
                for page in range(start, end, 4096):
                    if any(os.pread(fd1, 4096, o1 + page)):
                        if any(os.pread(fd2, 4096, o2 + page)):
                            kept += 1
                        else:
                            lost += 1
                position = end
            print(kept, lost)
            """, firstState, statePath])
        let counts = compared.stdout.split(separator: " ").compactMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        #expect(compared.status == 0 && counts.count == 2 && counts[0] > 8192 && counts[1] == 0,
                "pages with data kept, lost: \(compared.stdout) \(compared.stderr)")
        let beforeThird = try #require(Self.rounds(library.consoleLog("keep")).last)
        #expect(library.vireo("start", "keep").status == 0)
        #expect(library.waitFor(30) { Self.rounds(library.consoleLog("keep")).count >= 5 }, "\(library.consoleLog("keep").suffix(500))")
        let third = Self.rounds(library.consoleLog("keep"))
        #expect((third.first ?? 0) > beforeThird && (third.first ?? 0) <= beforeThird + 2, "rounds: …\(beforeThird); then \(third.prefix(3))…")
        #expect(!library.consoleLog("keep").contains("MISMATCH"), "\(library.consoleLog("keep").suffix(500))")

        #expect(library.vireo("stop", "keep", "--force").status == 0)
        #expect(library.state("keep") == "stopped")
        let checked = Harness.run(["qemu-img", "check", library.root.appendingPathComponent("keep/disk0.qcow2").path])
        #expect(checked.status == 0, "\(checked.stdout)\(checked.stderr)")
    }

    @Test("a damaged saved state (a byte flipped in the metadata, the padding or the checksum, truncated, another magic) is refused by start with the reason, changes nothing and is kept; --discard-state boots afresh")
    func damagedStateIsRefused() throws {
        let library = try TestLibrary()
        try Self.createDirtying(library, "hurt")
        #expect(library.vireo("start", "hurt").status == 0)
        #expect(library.waitFor(30) { Self.rounds(library.consoleLog("hurt")).count >= 3 })
        #expect(library.vireo("save", "hurt", timeout: 120).status == 0)
        let last = try #require(Self.rounds(library.consoleLog("hurt")).last)
        let statePath = library.root.appendingPathComponent("hurt/vmm/saved.state").path
        let good = try Data(contentsOf: URL(fileURLWithPath: statePath))

        // The checksum covers all the VMM parses (header, metadata, the padding up to RAM) and is
        // checked before any of it is decoded. RAM is the guest's own data and is not checked:
        // a restore maps it (docs/snapshots.md).
        var damages: [(String, Data, String)] = []
        var flippedMetadata = good
        flippedMetadata[100] ^= 0x01
        damages.append(("a byte of metadata", flippedMetadata, "checksum mismatch in its header and metadata"))
        let memoryOffset = good[24..<32].reversed().reduce(0) { $0 << 8 | Int($1) }
        var flippedPadding = good
        flippedPadding[memoryOffset - 1] ^= 0x01
        damages.append(("a byte of the padding before RAM", flippedPadding, "checksum mismatch"))
        var flippedChecksum = good
        flippedChecksum[good.count - 16] ^= 0x01
        damages.append(("the checksum itself", flippedChecksum, "checksum mismatch"))
        damages.append(("truncated", good.prefix(good.count - 4096), "truncated"))
        damages.append(("truncated header", good.prefix(20), "header"))
        var otherMagic = good
        otherMagic[0] = UInt8(ascii: "X")
        damages.append(("another magic", otherMagic, "not a Vireo saved state"))
        var newer = good
        newer[8] = 99
        damages.append(("a newer format", newer, "newer than this Vireo reads"))

        for (what, bytes, reason) in damages {
            try bytes.write(to: URL(fileURLWithPath: statePath))
            let refused = library.vireo("start", "hurt")
            #expect(refused.status == 2, "\(what): status \(refused.status): \(refused.stderr)")
            #expect(refused.stderr.contains(reason) && refused.stderr.contains("--discard-state"), "\(what): \(refused.stderr)")
            #expect(library.state("hurt") == "saved", "\(what)")
            #expect(try Data(contentsOf: URL(fileURLWithPath: statePath)) == bytes, "\(what): the state file changed")
        }

        // A refused start returns only once the VMM that refused has exited and let go of the
        // VM's lock: right after it the VM is "saved", never "busy" (about one in ten times it
        // was, before `vireo start` waited for that exit).
        try flippedMetadata.write(to: URL(fileURLWithPath: statePath))
        for attempt in 0..<10 {
            #expect(library.vireo("start", "hurt").status == 2)
            #expect(library.state("hurt") == "saved", "refused start \(attempt)")
        }

        // The intact state still resumes after all those refusals.
        try good.write(to: URL(fileURLWithPath: statePath))
        #expect(library.vireo("start", "hurt").status == 0)
        #expect(library.waitFor(30) { Self.rounds(library.consoleLog("hurt")).count >= 2 })
        let resumedAt = Self.rounds(library.consoleLog("hurt")).first ?? 0
        #expect(resumedAt > last && resumedAt <= last + 2, "resumed at round \(resumedAt) after \(last)")
        #expect(library.vireo("stop", "hurt", "--force").status == 0)

        // And --discard-state throws a state away and boots from the start.
        #expect(library.vireo("start", "hurt").status == 0)
        #expect(library.waitFor(30) { Self.rounds(library.consoleLog("hurt")).count >= 2 })
        #expect(library.vireo("save", "hurt", timeout: 120).status == 0)
        let fresh = library.vireo("start", "hurt", "--discard-state")
        #expect(fresh.status == 0, "\(fresh.stderr)")
        #expect(library.waitFor(30) { Self.rounds(library.consoleLog("hurt")).first == 0 }, "\(library.consoleLog("hurt").prefix(300))")
        #expect(!FileManager.default.fileExists(atPath: statePath))
    }

    /// Connects to the VM's vsock socket, asks for guest port 1234 and sends `text`; prints what
    /// the guest echoed (the probe answers "echo:" + text).
    static func vsockEcho(_ socket: String, _ text: String) -> Harness.Completed {
        Harness.run(["python3", "-c", """
            import socket, sys
            s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
            s.sendall(b"CONNECT 1234\\n")
            reply = b""
            while not reply.endswith(b"\\n"): reply += s.recv(1)
            s.sendall(sys.argv[2].encode())
            print(reply.decode().strip(), s.recv(100).decode())
            """, socket, text], timeout: 30)
    }

    @Test("vsock across a save: the guest gets a transport reset event when it is resumed (its old connections ended with the saving VMM) and accepts new connections")
    func vsockIsResetOnRestore() throws {
        let library = try TestLibrary()
        try library.createProbe("agent", command: "probe=vsock stay=1", extra: ["--no-disk", "--vsock-cid", "9"])
        #expect(library.vireo("start", "agent").status == 0)
        #expect(library.waitFor(30) { library.consoleLog("agent").contains("vsock: cid=9 listening on 1234") }, "\(library.consoleLog("agent"))")
        let socket = library.root.appendingPathComponent("agent/vsock.sock").path
        let before = Self.vsockEcho(socket, "before")
        #expect(before.stdout.contains("OK") && before.stdout.contains("echo:before"), "\(before.stdout)\(before.stderr)")

        #expect(library.vireo("save", "agent", timeout: 120).status == 0)
        #expect(library.vireo("start", "agent").status == 0)
        #expect(library.waitFor(30) { library.consoleLog("agent").contains("vsock: event 0 (transport reset)") }, "\(library.consoleLog("agent"))")
        #expect(!library.consoleLog("agent").contains("listening on 1234"), "the restored guest started over")
        let after = Self.vsockEcho(socket, "after")
        #expect(after.stdout.contains("OK") && after.stdout.contains("echo:after"), "\(after.stdout)\(after.stderr)")
    }

    /// The feature words the probe prints (`cpuid-features: 1.ecx=0x… 40000001.eax=0x…`).
    static func features(_ console: String) -> [String: UInt64] {
        guard let line = console.split(whereSeparator: \.isNewline).first(where: { $0.hasPrefix("cpuid-features:") }) else { return [:] }
        var words: [String: UInt64] = [:]
        for field in line.split(separator: " ").dropFirst() {
            let parts = field.split(separator: "=")
            if parts.count == 2, let value = UInt64(parts[1].dropFirst(2), radix: 16) { words[String(parts[0])] = value }
        }
        return words
    }

    @Test("--cpu: the guest's CPUID follows the VM's CPU model (host, -feature, baseline), bad models are refused with the reason, and a saved state whose CPU this host cannot offer is refused with the feature named")
    func cpuModels() throws {
        let library = try TestLibrary()
        for (name, model) in [("plain", nil), ("noipi", "host,-kvm-pv-send-ipi"), ("base", "baseline")] as [(String, String?)] {
            try library.createProbe(name, command: "probe=info", extra: ["--no-disk"] + (model.map { ["--cpu", $0] } ?? []))
            #expect(library.vireo("start", name).status == 0)
            #expect(library.waitFor(30) { library.consoleLog(name).contains("probe: done") || library.state(name) == "stopped" })
        }
        let host = Self.features(library.consoleLog("plain"))
        let noIPI = Self.features(library.consoleLog("noipi"))
        let baseline = Self.features(library.consoleLog("base"))
        let sendIPI: UInt64 = 1 << 11
        // (This host's KVM offers PV send-IPI, and hides 0x80000001's ABM from nobody but baseline.)
        #expect(host["40000001.eax"].map { $0 & sendIPI != 0 } == true, "\(host)")
        #expect(noIPI["40000001.eax"] == host["40000001.eax"].map { $0 & ~sendIPI }, "\(noIPI) vs \(host)")
        #expect(baseline["80000001.ecx"] == host["80000001.ecx"].map { $0 & 1 }, "\(baseline) vs \(host)")
        #expect(baseline["40000001.eax"].map { $0 & sendIPI } == 0, "\(baseline)")
        #expect(library.vireo("info", "noipi").stdout.contains("(host,-kvm-pv-send-ipi)"))

        for (model, reason) in [("fast", "must start with host or baseline"), ("host,-nosuch", "'nosuch' is not a CPU feature"),
                                ("host,avx", "must be +FEATURE or -FEATURE"), ("host,+avx,-avx", "both added and removed")] {
            let refused = library.vireo("set", "plain", "--cpu", model)
            #expect(refused.status == 2 && refused.stderr.contains("--cpu") && refused.stderr.contains(reason), "\(model): \(refused.stderr)")
        }

        // A state saved on a CPU with 3DNow! (CPUID 0x80000001 edx bit 31, which no KVM offers):
        // the saved CPUID is rewritten and the front's checksum made to match, so only the CPU check can refuse it.
        try library.createProbe("moved", command: "probe=dirty spin=2000000", extra: ["--no-disk"])
        #expect(library.vireo("start", "moved").status == 0)
        #expect(library.waitFor(30) { Self.rounds(library.consoleLog("moved")).count >= 3 })
        #expect(library.vireo("save", "moved", timeout: 120).status == 0)
        let statePath = library.root.appendingPathComponent("moved/vmm/saved.state").path
        let patched = Harness.run(["python3", "-c", """
            import struct, sys, zlib
            path = sys.argv[1]
            data = bytearray(open(path, "rb").read())
            # The metadata is a record of named fields; cpuid's value is a byte string of 28-byte
            # entries (function, index, flags, eax, ebx, ecx, edx): find leaf 0x80000001's, then its edx.
            table = data.index(b"\\x05\\x00\\x00\\x00cpuid", 40) + 9
            (length,) = struct.unpack_from("<I", data, table)
            entries = [table + 4 + 28 * n for n in range(length // 28)]
            entry = next(e for e in entries if struct.unpack_from("<II", data, e) == (0x80000001, 0))
            edx = entry + 24
            (value,) = struct.unpack_from("<I", data, edx)
            struct.pack_into("<I", data, edx, value | (1 << 31))
            # The trailer's checksum covers the front: the header, the metadata, up to RAM's offset.
            (memory_offset,) = struct.unpack_from("<Q", data, 24)
            struct.pack_into("<I", data, len(data) - 16, zlib.crc32(bytes(data[:memory_offset])))
            open(path, "wb").write(data)
            """, statePath])
        #expect(patched.status == 0, "\(patched.stderr)")
        let refused = library.vireo("start", "moved")
        #expect(refused.status == 2 && refused.stderr.contains("this host's CPU lacks features the saved guest may use: CPUID.(0x80000001,0).edx[31]"),
                "\(refused.stderr)")
        #expect(library.state("moved") == "saved")
    }

    @Test("save is refused with the reason for a VM that is not running or does not exist")
    func saveRefusals() throws {
        let library = try TestLibrary()
        try Self.createDirtying(library, "idle")
        let stopped = library.vireo("save", "idle")
        #expect(stopped.status != 0 && stopped.stderr.contains("stopped") && stopped.stderr.contains("vireo start idle"), "\(stopped.stderr)")
        let missing = library.vireo("save", "nosuch")
        #expect(missing.status != 0 && missing.stderr.contains("nosuch"), "\(missing.stderr)")
    }

    @Test("the qemu engine saves and resumes through QEMU's own migration to a file, and takes live snapshots with memory (state, then its disks onto the overlays in one QMP transaction): the probe's rounds go on after a resume and start again from the snapshot's round after a restore, every sum matching, every image clean")
    func qemuEngineSaveAndSnapshot() throws {
        let library = try TestLibrary()
        let created = library.vireo("create", "qd", "--engine", "qemu", "--accel", "tcg", "--kernel", try Harness.probe("pvh"), "--memory", "128M",
                                    "--disk", "32M", "--cmdline", "console=ttyS0 probe=dirty spin=20000000")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(library.vireo("start", "qd").status == 0)
        #expect(library.waitFor(60) { Self.rounds(library.consoleLog("qd")).count >= 10 }, "\(library.consoleLog("qd").suffix(500))")
        // QEMU runs under its own seccomp sandbox (docs/isolation.md).
        let info = library.vireo("info", "qd").stdout
        #expect(info.contains("QEMU's own -sandbox") && info.contains("[kernel: mode 2]"), "\(info)")

        let saved = library.vireo("save", "qd", timeout: 300)
        #expect(saved.status == 0, "\(saved.stderr)")
        #expect(library.state("qd") == "saved")
        let last = try #require(Self.rounds(library.consoleLog("qd")).last)
        #expect(library.vireo("start", "qd").status == 0)
        #expect(library.waitFor(60) { Self.rounds(library.consoleLog("qd")).count >= 5 }, "\(library.consoleLog("qd").suffix(500))")
        let joined = Self.rounds(library.previousConsoleLog("qd") + library.consoleLog("qd"))
        #expect(joined == Array(0..<joined.count), "rounds: …\(joined.suffix(20))")
        #expect((Self.rounds(library.consoleLog("qd")).first ?? 0) > last - 1)
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("qd/vmm/saved.state").path), "the state stays after it was restored")

        // A live snapshot, then more rounds, then back to it.
        let taken = library.vireo("snapshot", "take", "qd", "A", timeout: 300)
        #expect(taken.status == 0 && taken.stdout.contains("with its memory"), "\(taken.stdout)\(taken.stderr)")
        #expect(library.state("qd") == "running")
        let atSnapshot = try #require(Self.rounds(library.consoleLog("qd")).last)
        #expect(library.waitFor(60) { (Self.rounds(library.consoleLog("qd")).last ?? 0) >= atSnapshot + 10 })
        #expect(library.vireo("stop", "qd", "--force").status == 0)
        #expect(library.vireo("snapshot", "restore", "qd", "A").status == 0)
        let restarted = library.vireo("start", "qd")
        #expect(restarted.status == 0, "\(restarted.stderr)")
        #expect(library.waitFor(60) { Self.rounds(library.consoleLog("qd")).count >= 5 }, "\(library.consoleLog("qd").suffix(500))")
        let resumed = Self.rounds(library.consoleLog("qd"))
        #expect(abs((resumed.first ?? -100) - atSnapshot) <= 1, "the snapshot was at round \(atSnapshot); the restored guest goes on at \(resumed.prefix(3))")
        #expect(!library.consoleLog("qd").contains("MISMATCH"))
        #expect(library.vireo("stop", "qd", "--force").status == 0)
        let directory = library.root.appendingPathComponent("qd")
        for file in try FileManager.default.contentsOfDirectory(atPath: directory.path) where file.hasSuffix(".qcow2") {
            let checked = Harness.run(["qemu-img", "check", directory.appendingPathComponent(file).path])
            #expect(checked.status == 0, "\(file): \(checked.stdout)\(checked.stderr)")
        }
    }
}
