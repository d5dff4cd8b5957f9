import Foundation
import Testing

/// Boots the tiny Linux kernel built from Debian's linux-source (scripts/build-tiny-kernel.sh).
/// Guest kernel mode is emulated on the development machines, so these take minutes; their
/// assertions are the kernel's own milestones and are never weakened for speed.
@Suite(.serialized)
struct LinuxKernelTests {
    /// Options for the emulated test hosts only (see design.md): no XSAVE, no instructions the
    /// emulator lacks, no paravirt hypercalls it mishandles. Real hosts need none of them.
    static let emulatorSafeOptions = "noxsave clearcpuid=smap,popcnt nopv"

    static let kernelDirectory: Result<URL, HarnessError> = {
        let script = Harness.packageRoot.appendingPathComponent("scripts/build-tiny-kernel.sh").path
        let result = Harness.run(["bash", script], timeout: 1800)
        guard result.status == 0, let last = result.stdout.split(separator: "\n").last else {
            return .failure(HarnessError("build-tiny-kernel.sh failed (\(result.status)): \(result.stderr.suffix(2000))"))
        }
        return .success(URL(fileURLWithPath: String(last)))
    }()

    /// An initramfs whose /init is a static program; guest user space cannot make system calls
    /// here, so init dies and the kernel panics and reboots (`panic=-1 reboot=k`).
    static func makeInitramfs(in directory: URL) throws -> URL {
        let source = directory.appendingPathComponent("init.c")
        try Data("void _start(void) { __asm__ volatile(\"mov $60, %eax; xor %edi, %edi; syscall\"); for (;;) {} }\n".utf8).write(to: source)
        let root = directory.appendingPathComponent("root")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        let built = Harness.run(["gcc", "-static", "-nostdlib", "-O2", "-o", root.appendingPathComponent("init").path, source.path])
        guard built.status == 0 else { throw HarnessError("gcc init failed: \(built.stderr)") }
        // Random, so the compressed archive's size (which the kernel reports freeing) is known.
        try Data(randomBytes(64 << 10)).write(to: root.appendingPathComponent("payload"))
        let archive = directory.appendingPathComponent("initramfs.cpio.gz")
        let packed = Harness.run(["sh", "-c", "cd '\(root.path)' && printf 'init\\npayload\\n' | cpio -o -H newc 2>/dev/null | gzip -1 > '\(archive.path)'"])
        guard packed.status == 0 else { throw HarnessError("cpio failed: \(packed.stderr)") }
        return archive
    }

    @Test("vmlinux with 2 vCPUs: both CPUs up, initramfs unpacked, /init run, reboot ends the run", .timeLimit(.minutes(20)))
    func elfKernelBootsToInit() throws {
        try Harness.requireKVM()
        let kernel = try Self.kernelDirectory.get().appendingPathComponent("vmlinux")
        let directory = try Harness.temporaryDirectory()
        let initramfs = try Self.makeInitramfs(in: directory)
        let result = Harness.vireoRun(["--kernel", kernel.path, "--initrd", initramfs.path, "--cpus", "2", "--memory", "256M",
                                       "--cmdline", "console=ttyS0 \(Self.emulatorSafeOptions) panic=-1 reboot=k"],
                                      timeout: 900)
        let console = result.stdout
        #expect(result.status == 0, "status \(result.status); stderr: \(result.stderr); console tail: \(console.suffix(3000))")
        #expect(console.contains("Command line: console=ttyS0"))
        #expect(console.contains("smp: Brought up 1 node, 2 CPUs"), "console tail: \(console.suffix(3000))")
        #expect(console.contains("Unpacking initramfs..."))
        let archiveSize = try FileManager.default.attributesOfItem(atPath: initramfs.path)[.size] as? Int ?? 0
        #expect(console.contains("Freeing initrd memory: \((archiveSize + 4095) / 4096 * 4)K"), "initramfs is \(archiveSize) bytes")
        #expect(console.contains("Run /init as init process"))
        #expect(console.contains("Kernel panic - not syncing: Attempted to kill init!"))
        #expect(result.stderr.contains("guest requested a reset"))
    }

    @Test("bzImage: the decompressor runs and hands over to the kernel, which reads our command line", .timeLimit(.minutes(10)))
    func bzImageBoots() throws {
        try Harness.requireKVM()
        let kernel = try Self.kernelDirectory.get().appendingPathComponent("bzImage")
        let running = RunningProcess([Harness.vireo, "run", "--kernel", kernel.path, "--memory", "128M",
                                      "--cmdline", "console=ttyS0 earlyprintk=serial \(Self.emulatorSafeOptions) bzimage.marker=1"])
        let reached = running.waitForOutput("Command line: console=ttyS0 earlyprintk=serial", timeout: 420)
        running.signal(SIGTERM)
        let status = running.wait(timeout: 60)
        #expect(reached, "console: \(running.stdout.suffix(3000)) stderr: \(running.stderr)")
        #expect(running.stdout.contains("Linux version 6.1"))
        #expect(status == 143)
    }
}
