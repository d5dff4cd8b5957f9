import Foundation
import Testing

/// Bad input is refused before anything starts: status 2, one specific line naming the flag.
@Suite struct InputValidationTests {
    func refused(_ arguments: [String], mentions expected: [String]) throws {
        try Harness.requireKVM()
        let result = Harness.vireoRun(arguments, timeout: 30)
        #expect(result.status == 2, "stdout: \(result.stdout) stderr: \(result.stderr)")
        for text in expected { #expect(result.stderr.contains(text), "stderr was: \(result.stderr)") }
        #expect(!result.stderr.contains("boot marker"))
        #expect(result.stdout.isEmpty)
    }

    @Test func missingKernel() throws {
        try refused(["--kernel", "/nonexistent/vmlinux"],
                    mentions: ["--kernel: cannot read /nonexistent/vmlinux: No such file or directory"])
    }

    @Test func kernelIsADirectory() throws {
        try refused(["--kernel", "/tmp"], mentions: ["--kernel: cannot read /tmp: Is a directory"])
    }

    @Test func notAKernel() throws {
        let directory = try Harness.temporaryDirectory()
        let path = directory.appendingPathComponent("notes.txt")
        try Data("hello, this is not a kernel\n".utf8 + Data(count: 1024)).write(to: path)
        try refused(["--kernel", path.path],
                    mentions: ["is neither an ELF vmlinux (expected magic 7f 45 4c 46 at offset 0, found 68 65 6c 6c)",
                               "nor a bzImage (expected \"HdrS\" at offset 0x202"])
    }

    @Test("a 32-bit ELF kernel without a PVH note is refused, naming the note it lacks")
    func thirtyTwoBitELFWithoutPVH() throws {
        let directory = try Harness.temporaryDirectory()
        let path = directory.appendingPathComponent("elf32")
        var bytes = [UInt8](repeating: 0, count: 256)
        bytes[0...3] = [0x7f, 0x45, 0x4c, 0x46]
        bytes[4] = 1; bytes[5] = 1; bytes[18] = 3                 // ELFCLASS32, little-endian, EM_386
        bytes[28] = 52; bytes[42] = 32; bytes[44] = 1             // one 32-byte program header at 52
        bytes[52] = 1                                             // PT_LOAD
        bytes[56] = 128; bytes[66] = 0x10                         // from offset 128, to 1 MiB
        bytes[68] = 16; bytes[72] = 16                            // 16 bytes
        try Data(bytes).write(to: path)
        try refused(["--kernel", path.path], mentions: ["a 32-bit (ELFCLASS32) kernel boots only through PVH", "XEN_ELFNOTE_PHYS32_ENTRY"])
    }

    @Test("--acpi and --on-reboot take only the values they list")
    func platformSwitches() throws {
        try refused(["--kernel", try Harness.probe("pvh"), "--acpi", "yes"], mentions: ["--acpi: 'yes' is not one of on, off"])
        try refused(["--kernel", try Harness.probe("pvh"), "--on-reboot", "reset"], mentions: ["--on-reboot: 'reset' is not one of restart, exit"])
        let vmm = Harness.run([Harness.vireoVMM, "--kernel", try Harness.probe("pvh"), "--generation-id", "12345"])
        #expect(vmm.status == 2)
        #expect(vmm.stderr.contains("--generation-id: '12345' is not 32 hex digits (a UUID's 128 bits)"), "\(vmm.stderr)")
    }

    @Test func memoryTooSmall() throws {
        try refused(["--kernel", try Harness.probe("pvh"), "--memory", "16M"],
                    mentions: ["--memory: 16 MiB is below the minimum of 32 MiB"])
    }

    @Test func memoryAboveHost() throws {
        try refused(["--kernel", try Harness.probe("pvh"), "--memory", "64T"],
                    mentions: ["--memory: 64 TiB is more than this host's"])
    }

    @Test func memoryUnparseable() throws {
        try refused(["--kernel", try Harness.probe("pvh"), "--memory", "lots"],
                    mentions: ["--memory: 'lots' has unknown unit 's'; use K, M, G or T"])
    }

    @Test func zeroCPUs() throws {
        try refused(["--kernel", try Harness.probe("pvh"), "--cpus", "0"],
                    mentions: ["--cpus: 0 is not allowed; use 1 to 254"])
    }

    @Test func tooManyCPUs() throws {
        try refused(["--kernel", try Harness.probe("pvh"), "--cpus", "100000"],
                    mentions: ["--cpus: 100000 is not allowed; use 1 to 254"])
    }

    @Test func commandLineTooLong() throws {
        try refused(["--kernel", try Harness.probe("pvh"), "--cmdline", String(repeating: "a", count: 3000)],
                    mentions: ["--cmdline: 3000 bytes is longer than this kernel accepts (at most 2047 bytes)"])
    }

    @Test func initrdDoesNotFit() throws {
        let directory = try Harness.temporaryDirectory()
        let path = directory.appendingPathComponent("big.initrd")
        // Sparse: 80 MiB that take no disk space.
        _ = FileManager.default.createFile(atPath: path.path, contents: nil)
        let handle = try FileHandle(forWritingTo: path)
        try handle.truncate(atOffset: 80 << 20)
        try handle.close()
        try refused(["--kernel", try Harness.probe("pvh"), "--initrd", path.path, "--memory", "64M"],
                    mentions: ["--initrd: \(path.path) is 80 MiB but only", "raise --memory or use a smaller initrd"])
    }

    @Test func missingInitrd() throws {
        try refused(["--kernel", try Harness.probe("pvh"), "--initrd", "/nonexistent/initrd.gz"],
                    mentions: ["--initrd: cannot read /nonexistent/initrd.gz: No such file or directory"])
    }

    @Test func badConsole() throws {
        try refused(["--kernel", try Harness.probe("pvh"), "--console", "serial"],
                    mentions: ["--console: 'serial' is not one of stdio, none, file:PATH, socket:PATH"])
    }

    @Test func consoleSocketPathOccupiedByAFile() throws {
        let directory = try Harness.temporaryDirectory()
        let path = directory.appendingPathComponent("precious.txt")
        try Data("keep me".utf8).write(to: path)
        try refused(["--kernel", try Harness.probe("pvh"), "--console", "socket:\(path.path)"],
                    mentions: ["exists and is not a socket; refusing to replace it"])
        #expect(try String(contentsOf: path, encoding: .utf8) == "keep me")
    }
}
