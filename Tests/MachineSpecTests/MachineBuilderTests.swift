import DiskImage
import FoundationEssentials
import GuestMemory
import MachineSpec
import Testing
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// The machine builder's three entries on one build: boot loads the kernel, restore and receive
/// leave RAM to the state or the stream; each disk stays unread until `finishAssembly`. These
/// need /dev/kvm (they fail without it, never skip).
@Suite struct MachineBuilderTests {
    /// A directory with a one-instruction ELF kernel (`hlt` at 16 MiB) and a 1 MiB raw disk.
    final class Files {
        let directory: String
        var kernel: String { directory + "/kernel.elf" }
        var disk: String { directory + "/disk.raw" }

        init() throws {
            var template = Array("/tmp/vireo-builder-XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else { throw VMMError.host(operation: "mkdtemp", errno: errno) }
            directory = String(cString: made)
            var elf = [UInt8](repeating: 0, count: 64 + 56)
            func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
                withUnsafeBytes(of: value.littleEndian) { for (index, byte) in $0.enumerated() { elf[offset + index] = byte } }
            }
            elf[0...7] = [0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]
            put(UInt16(2), at: 16); put(UInt16(62), at: 18); put(UInt64(0x100_0000), at: 24); put(UInt64(64), at: 32)
            put(UInt16(56), at: 54); put(UInt16(1), at: 56)
            put(UInt32(1), at: 64); put(UInt64(120), at: 72); put(UInt64(0x100_0000), at: 80); put(UInt64(0x100_0000), at: 88)
            put(UInt64(1), at: 96); put(UInt64(1), at: 104)
            elf.append(0xf4)
            try Data(elf).write(to: URL(fileURLWithPath: kernel))
            try Data(count: 1 << 20).write(to: URL(fileURLWithPath: disk))
        }

        deinit { _ = try? FileManager.default.removeItem(atPath: directory) }

        var spec: MachineSpec {
            var spec = MachineSpec(kernel: kernel)
            spec.cpus = 2
            spec.memoryBytes = 64 << 20
            spec.console = "none"
            spec.disks = [MachineSpec.Disk(path: disk, format: .raw)]
            spec.entropyDevice = true
            spec.vsock = MachineSpec.Vsock(socketPath: directory + "/vsock.sock", guestCID: 9)
            return spec
        }
    }

    @Test func bootBuildsAndLoadsTheKernel() throws {
        let files = try Files()
        let machine = try Machine.boot(files.spec)
        #expect(machine.start == .boot && machine.bootedHere)
        #expect(machine.vcpus.count == 2 && machine.virtioTransports.count == 3)
        #expect(try machine.memory.readBytes(count: 1, at: GuestPhysicalAddress(0x100_0000)) == [0xf4])
        // The disk is a stand-in until the VMM is confined and reads it.
        #expect(machine.blockDevices[0].device.disk is DetachedImage)
        try machine.finishAssembly()
        #expect(!(machine.blockDevices[0].device.disk is DetachedImage))
        #expect(machine.blockDevices[0].device.disk.virtualSize == 1 << 20)
    }

    /// A pause or resume that arrives while a save, snapshot, reboot or migration switch-over
    /// holds the machine is answered at once as busy, not left waiting behind it (a control
    /// client gives up after 10 s, which the API reported as a server error).
    @Test func pauseAndResumeAreBusyWhileTheMachineIsHeld() throws {
        let files = try Files()
        let machine = try Machine.boot(files.spec)
        machine.lifecycle.withLock { _ in
            #expect(machine.pause() == .busy)
            #expect(machine.resume() == .busy)
        }
        // Free again: a resume of a VM that is not paused is answered as such.
        #expect(machine.resume() == .unchanged)
    }

    @Test func receiveAndRestoreLeaveRAMToTheirSource() throws {
        let files = try Files()
        do {
            // Each machine holds its disk's lock while it lives: one at a time here.
            let arriving = try Machine.receive(files.spec, disks: .copiedDisks)
            #expect(arriving.start == .receive(.copiedDisks) && arriving.arrival == .copiedDisks && !arriving.bootedHere)
            #expect(try arriving.memory.readBytes(count: 1, at: GuestPhysicalAddress(0x100_0000)) == [0])
            #expect(arriving.vcpus.count == 2 && arriving.virtioTransports.count == 3)
        }

        let missing = files.directory + "/no.state"
        #expect { _ = try Machine.restore(files.spec, stateFile: missing) } throws: { error in
            guard case let .host(operation, code) = error as? VMMError else { return false }
            return operation == "open saved state \(missing)" && code == ENOENT
        }
        _ = FileManager.default.createFile(atPath: missing, contents: Data())
        let restoring = try Machine.restore(files.spec, stateFile: missing)
        #expect(restoring.start == .restore(stateFile: missing) && restoring.stateFilePath == missing && !restoring.bootedHere)
        #expect(try restoring.memory.readBytes(count: 1, at: GuestPhysicalAddress(0x100_0000)) == [0])
    }

    /// A spec the host cannot open leaves nothing behind: the vsock socket is never created when
    /// a disk before it cannot be opened.
    @Test func aFailedOpenChangesNothing() throws {
        let files = try Files()
        var spec = files.spec
        spec.disks = [MachineSpec.Disk(path: files.directory + "/absent.raw", format: .raw)]
        #expect(throws: VMMError.self) { _ = try Machine.boot(spec) }
        #expect(!FileManager.default.fileExists(atPath: files.directory + "/vsock.sock"))
    }
}

/// What the jail binds for an NBD disk: its Unix sockets' directories, read-only, and never the
/// host's root.
@Suite struct NBDJailPathTests {
    @Test func socketDirectoriesAreBoundReadOnlyAndNeverTheRoot() {
        var spec = MachineSpec(kernel: "/tmp")
        spec.disks = [MachineSpec.Disk(path: "nbd+unix:///exp?socket=/tmp/a.sock|nbd+unix:///exp?socket=/b.sock|nbd://host/exp", format: .raw)]
        let paths = Machine.jailPaths(spec, controlPath: nil, stateFile: nil, snapshotDirectory: nil)
        #expect(paths.contains { $0.path == "/tmp" && !$0.writable }, "\(paths)")
        #expect(!paths.contains { $0.path == "/" }, "the host's root would be bound: \(paths)")
        #expect(!paths.contains { $0.path.contains("nbd") }, "\(paths)")
    }
}
