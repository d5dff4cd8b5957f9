import Foundation
import GuestMemory
import X86Boot
import Testing

/// Boots the tiny Linux kernel built from Debian's linux-source (scripts/build-tiny-kernel.sh).
/// Guest kernel mode is emulated on the development machines, so these take minutes; their
/// assertions are the kernel's own milestones and are never weakened for speed.
@Suite(.serialized)
struct LinuxKernelTests {
    /// Options for the emulated test hosts only (see design.md): no XSAVE, no instructions the
    /// emulator lacks, no paravirt hypercalls it mishandles. Real hosts need none of them.
    /// `nofsgsbase`: an NMI (the RCU stall detector's backtrace request, when a loaded host starves
    /// a vCPU) enters through paranoid_entry, which with FSGSBASE finds the per-CPU base with LSL,
    /// an instruction the emulator lacks: the VM stopped with an emulation failure on that vCPU.
    static let emulatorSafeOptions = "noxsave clearcpuid=smap,popcnt nopv nofsgsbase"

    /// `nopv` also turns off kvmclock, which is where a guest on a hardware-reduced ACPI platform
    /// learns its TSC frequency (there is no PIT calibration without the legacy PIC, and no HPET or
    /// PM timer to calibrate against). So the ACPI tests hand the frequency over; on a real host
    /// kvmclock does, and no option is needed.
    static func acpiEmulatorSafeOptions() throws -> String {
        guard hostTSCKilohertz > 0 else { throw HarnessError("no 'cpu MHz' in /proc/cpuinfo: cannot tell the ACPI guest its TSC frequency") }
        return emulatorSafeOptions + " tsc_early_khz=\(hostTSCKilohertz)"
    }

    /// The host's TSC frequency, which KVM gives guests by default, from /proc/cpuinfo.
    static let hostTSCKilohertz: Int = {
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let line = cpuinfo.split(separator: "\n").first { $0.hasPrefix("cpu MHz") }
        let megahertz = line.flatMap { Double($0.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "") } ?? 0
        return Int(megahertz * 1000)
    }()

    /// The plain flavour: built without ACPI, so it finds CPUs in the MP table and devices only on
    /// its command line (`--acpi off`).
    static let kernelDirectory = buildKernel("plain")
    /// The ACPI flavour: CPUs, devices and the power button only from Vireo's ACPI tables.
    static let acpiKernelDirectory = buildKernel("acpi")

    static func buildKernel(_ flavour: String) -> Result<URL, HarnessError> {
        let script = Harness.packageRoot.appendingPathComponent("scripts/build-tiny-kernel.sh").path
        let result = Harness.run(["bash", script, flavour], timeout: 1800)
        guard result.status == 0, let last = result.stdout.split(separator: "\n").last else {
            return .failure(HarnessError("build-tiny-kernel.sh \(flavour) failed (\(result.status)): \(result.stderr.suffix(2000))"))
        }
        return .success(URL(fileURLWithPath: String(last)))
    }

    /// Lines no kernel should print on Vireo's ACPI tables.
    static func acpiComplaints(_ console: String) -> [String] {
        console.split(separator: "\n").map(String.init)
            .filter { $0.contains("ACPI Error") || $0.contains("ACPI BIOS Error") || $0.contains("ACPI Warning") || $0.contains("ACPI BIOS Warning") }
    }

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

    @Test("a kernel built without ACPI (the plain kernel) on a machine with ACPI on, the default: 2 vCPUs from the MP table written beside the ACPI tables, initramfs unpacked, /init run, an i8042 reboot ends the run, and the run's end says why its virtio device was never found (--acpi off)",
          .timeLimit(.minutes(20)))
    func elfKernelBootsToInit() throws {
        try Harness.requireKVM()
        let kernel = try Self.kernelDirectory.get().appendingPathComponent("vmlinux")
        let directory = try Harness.temporaryDirectory()
        let initramfs = try Self.makeInitramfs(in: directory)
        // ACPI on (the default) and an entropy device the kernel cannot know of without ACPI.
        let result = Harness.vireoRun(["--kernel", kernel.path, "--initrd", initramfs.path, "--cpus", "2", "--memory", "256M", "--rng",
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
        #expect(result.stderr.contains("guest reset the machine through the i8042 (0xFE)"))
        #expect(result.stderr.contains("guest requested a reset"))
        #expect(result.stderr.contains("hint: the guest never looked for its 1 virtio device(s); a kernel built without ACPI (CONFIG_ACPI off) finds them only with --acpi off"),
                "\(result.stderr)")
    }

    // About 15 minutes here alone (the guest kernel runs in this host's instruction emulator);
    // a busy 2-core machine stretched it past 20, so the limits leave room for that.
    @Test("ACPI only (the acpi kernel, no virtio_mmio.device=): 2 vCPUs from the MADT, virtio-blk (two queues each, multiqueue) and virtio-net (two queue pairs on a multiqueue tap) from the DSDT, DHCP through the tap, the ext4 root mounted from an NBD export (the VMM's own client, qemu-nbd serving it) and a second disk probed on an iSCSI LUN (libiscsi, tgtd serving it), the power button bound, no ACPI complaint, and a reboot through the ACPI reset register",
          .timeLimit(.minutes(30)))
    func ext4RootOnVirtioBlock() throws {
        try Harness.requireKVM()
        let kernel = try Self.acpiKernelDirectory.get().appendingPathComponent("vmlinux")
        let directory = try Harness.temporaryDirectory()
        _ = try Self.makeInitramfs(in: directory)          // builds root/init and root/payload
        let image = directory.appendingPathComponent("root.ext4").path
        let made = Harness.run(["mkfs.ext4", "-q", "-F", "-d", directory.appendingPathComponent("root").path, image, "32M"])
        #expect(made.status == 0, "\(made.stderr)")
        // The network: a tap in a namespace of its own, with dnsmasq answering DHCP on it.
        let namespace = try NetworkNamespace(address: "10.0.2.1/24", multiqueue: true)
        let dhcp = RunningProcess(namespace.inside([
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--interface=\(namespace.tap)", "--bind-interfaces", "--port=0",
            "--dhcp-range=10.0.2.15,10.0.2.15,255.255.255.0,1h", "--dhcp-leasefile=\(directory.path)/leases", "--log-dhcp"]))
        defer { dhcp.signal(SIGTERM); _ = dhcp.wait(timeout: 5) }
        // The root file system is an NBD export (docs/disk-images.md): this boot is also the
        // proof that Linux mounts its root through Vireo's NBD client.
        let server = try NBDServer(image: image, socket: directory.appendingPathComponent("root.sock").path, export: "root")
        // A second disk, an iSCSI LUN served by tgtd in the namespace: Linux probes it (reading
        // its partition table) through libiscsi in the VMM, in the same boot.
        let lun = directory.appendingPathComponent("lun.raw").path
        #expect(Harness.run(["truncate", "-s", "4M", lun]).status == 0)
        let target = try ISCSITarget(image: lun, port: 3260, namespace: namespace.name)
        let result = Harness.run(namespace.inside([
            Harness.vireo, "run", "--kernel", kernel.path, "--cpus", "2", "--memory", "256M", "--disk", "\(server.uri("root")),serial=rootdisk",
            "--disk", target.uri(),
            "--net", "tap:\(namespace.tap),mac=02:00:00:0a:00:0f,queues=2",
            "--cmdline", "console=ttyS0 \(try Self.acpiEmulatorSafeOptions()) root=/dev/vda rootfstype=ext4 ro init=/init ip=dhcp panic=1 reboot=acpi"]),
            timeout: 1740)
        let console = result.stdout
        #expect(console.contains("Command line: console=ttyS0") && !console.contains("virtio_mmio.device="), "console head: \(console.prefix(2000))")
        #expect(console.contains("ACPI: Interpreter enabled"), "console: \(console.prefix(6000))")
        #expect(console.contains("ACPI: Using ACPI (MADT) for SMP configuration information"), "console: \(console.prefix(4000))")
        #expect(console.contains("ACPI: PM: (supports S0 S5)"), "console: \(console.prefix(6000))")
        #expect(console.contains("smp: Brought up 1 node, 2 CPUs"), "console tail: \(console.suffix(3000))")
        #expect(console.contains("ACPI: button: Power Button [PWRB]"), "console: \(console.prefix(8000))")
        #expect(Self.acpiComplaints(console).isEmpty, "\(Self.acpiComplaints(console))")
        #expect(console.contains("IP-Config: Got DHCP answer from 10.0.2.1, my address is 10.0.2.15"), "console tail: \(console.suffix(3000)); dnsmasq: \(dhcp.stderr.suffix(1000))")
        #expect(console.contains("device=eth0, hwaddr=02:00:00:0a:00:0f, ipaddr=10.0.2.15, mask=255.255.255.0"), "console tail: \(console.suffix(3000))")
        #expect(console.contains("virtio_blk virtio0: [vda] 65536 512-byte logical blocks (33.6 MB/32.0 MiB)"), "console tail: \(console.suffix(3000))")
        #expect(console.contains("EXT4-fs (vda): mounted filesystem"))
        // Two vCPUs, two queues per disk: Linux's blk-mq takes VIRTIO_BLK_F_MQ and uses both.
        #expect(console.contains("virtio_blk virtio0: 2/0/0 default/read/poll queues"), "console: \(console.prefix(12000))")
        #expect(result.stderr.contains("multiqueue taken in 1 driver sessions"), "\(result.stderr)")
        // The card's two queue pairs on a multiqueue tap: Linux asks for both (one per vCPU).
        #expect(result.stderr.contains("(2 queue pairs; the driver asked for 2 at most, uses 2)"), "\(result.stderr)")
        #expect(!result.stderr.contains("tap queue attach/detach refused"), "\(result.stderr)")
        #expect(console.contains("virtio_blk virtio1: [vdb] 8192 512-byte logical blocks (4.19 MB/4.00 MiB)"), "console tail: \(console.suffix(3000))")
        #expect(result.stderr.contains("virtio-blk \(target.uri()):"), "\(result.stderr)")
        #expect(console.contains("VFS: Mounted root (ext4 filesystem) readonly on device 254:0."))
        #expect(console.contains("Run /init as init process"))
        #expect(console.contains("Kernel panic - not syncing: Attempted to kill init!"))
        // reboot=acpi: the kernel's own acpi_reboot() writes the FADT's reset register.
        #expect(result.stderr.contains("guest reset the machine through the ACPI reset register"), "\(result.stderr)")
        #expect(result.status == 0, "status \(result.status); stderr: \(result.stderr); console tail: \(console.suffix(3000))")
        #expect(result.stderr.contains("virtio-blk \(server.uri("root")):"), "\(result.stderr)")
        server.kill()
        let check = Harness.run(["e2fsck", "-n", "-f", image])
        #expect(check.status == 0, "\(check.stdout)")
    }

    @Test("a library VM running Linux with ACPI on the default NAT network: pause freezes the boot, resume goes on; saved mid-boot and started again, the kernel boots on from where it was (not from the start) and its network card works through a new tap; the kernel's ip=dhcp gets its address from the network's dnsmasq and `vireo list` shows it; its virtio-rng feeds the kernel; Linux takes EVENT_IDX on its devices; the panic's reboot (ACPI reset register) boots it again in the same process",
          .timeLimit(.minutes(25)))
    func managedLinuxVM() throws {
        // In namespaces of its own (NetworkTests' lab): the VM's nat card brings up the default
        // network there, never on the host.
        let lab = try NetworkLab()
        let library = lab.library
        let kernel = try Self.acpiKernelDirectory.get().appendingPathComponent("vmlinux")
        let initramfs = try Self.makeInitramfs(in: try Harness.temporaryDirectory())
        let created = lab.vireo("create", "tux", "--ostype", "linux-64", "--kernel", kernel.path, "--initrd", initramfs.path,
                                "--memory", "256M", "--no-disk", "--nic", "nat",
                                "--cmdline", "console=ttyS0 \(try Self.acpiEmulatorSafeOptions()) ip=dhcp panic=1 reboot=acpi")
        #expect(created.status == 0, "\(created.stderr)")
        let started = lab.vireo("start", "tux")
        #expect(started.status == 0, "\(started.stderr)")
        #expect(library.waitFor(300) { library.consoleLog("tux").contains("Linux version") }, "\(library.consoleLog("tux").suffix(2000))")

        #expect(lab.vireo("pause", "tux").status == 0)
        let frozen = library.consoleLog("tux")
        Thread.sleep(forTimeInterval: 3)
        #expect(library.consoleLog("tux") == frozen, "the kernel printed while paused")
        #expect(library.state("tux") == "paused")
        #expect(lab.vireo("resume", "tux").status == 0)

        // Saved in the middle of its boot (kernel mode, timers armed) and started again: the
        // restored kernel goes on without a second banner, its card reattached to the tap this
        // start made (DHCP through it, below). docs/snapshots.md.
        let save = lab.vireo("save", "tux", timeout: 300)
        #expect(save.status == 0, "\(save.stderr)")
        #expect(library.state("tux") == "saved")
        let resumed = lab.vireo("start", "tux")
        #expect(resumed.status == 0, "\(resumed.stderr)")
        #expect(library.waitFor(900) { library.consoleLog("tux").contains("Run /init as init process") },
                "\(library.consoleLog("tux").suffix(3000))")
        #expect(!library.consoleLog("tux").contains("Linux version"), "the restored VM booted from the start: \(library.consoleLog("tux").prefix(2000))")
        #expect(library.vmmLog("tux").contains("restored from "), "\(library.vmmLog("tux"))")
        // Linux's own DHCP client, through the tap, the bridge and the network's dnsmasq.
        let console = library.consoleLog("tux")
        let answer = try #require(console.range(of: "IP-Config: Got DHCP answer from 192.168.122.1, my address is "), "\(console.suffix(3000))")
        let address = String(console[answer.upperBound...].prefix { $0.isNumber || $0 == "." })
        #expect(address.hasPrefix("192.168.122."), "\(address)")
        #expect(lab.listedAddresses()["tux"] == [address], "\(lab.listedAddresses())")
        // init dies (no system calls here), the kernel panics and reboots through the ACPI reset
        // register, and the VM boots again in the same process: a second banner, boot 2.
        #expect(library.waitFor(300) { library.consoleLog("tux").contains("Linux version") },
                "\(library.consoleLog("tux").suffix(3000))")
        #expect(library.state("tux") == "running")
        let info = lab.vireo("info", "tux", "--json").stdout
        let process = (try? JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any])?["process"] as? [String: Any]
        #expect(process?["boots"] as? Int == 2, "\(info)")
        let vmmLog = (try? String(contentsOf: library.root.appendingPathComponent("tux/vmm.log"), encoding: .utf8)) ?? ""
        #expect(vmmLog.contains("guest reset the machine through the ACPI reset register"), "\(vmmLog)")
        #expect(vmmLog.contains("guest rebooted; boot 2 starts"), "\(vmmLog)")
        let wholeConsole = library.previousConsoleLog("tux") + library.consoleLog("tux")
        #expect(Self.acpiComplaints(wholeConsole).isEmpty, "\(Self.acpiComplaints(wholeConsole))")
        #expect(lab.vireo("stop", "tux", "--force").status == 0)
        // Linux's own virtio-rng driver (hw_random, quality 1000) drew entropy from the device.
        let finalLog = (try? String(contentsOf: library.root.appendingPathComponent("tux/vmm.log"), encoding: .utf8)) ?? ""
        let provided = finalLog.components(separatedBy: "virtio-rng: provided ").last?.prefix { $0.isNumber } ?? ""
        #expect((Int(provided) ?? 0) > 0, "\(finalLog)")
        // Linux negotiates VIRTIO_F_EVENT_IDX on the card and the rng it used (the run before the
        // save ended before its drivers had looked), and everything above worked with it.
        let taken = finalLog.components(separatedBy: "virtio: EVENT_IDX taken in ").last?.prefix { $0.isNumber } ?? ""
        #expect((Int(taken) ?? 0) >= 2, "\(finalLog.suffix(1500))")
    }

    @Test("bzImage: the decompressor runs and hands over to the kernel, which reads our command line", .timeLimit(.minutes(10)))
    func bzImageBoots() throws {
        try Harness.requireKVM()
        let kernel = try Self.kernelDirectory.get().appendingPathComponent("bzImage")
        let running = RunningProcess([Harness.vireo, "run", "--kernel", kernel.path, "--memory", "128M", "--acpi", "off",
                                      "--cmdline", "console=ttyS0 earlyprintk=serial \(Self.emulatorSafeOptions) bzimage.marker=1"])
        let reached = running.waitForOutput("Command line: console=ttyS0 earlyprintk=serial", timeout: 420)
        running.signal(SIGTERM)
        let status = running.wait(timeout: 60)
        #expect(reached, "console: \(running.stdout.suffix(3000)) stderr: \(running.stderr)")
        #expect(running.stdout.contains("Linux version 6.1"))
        #expect(status == 143)
    }
}

/// The loaders against real kernel files: the tiny kernel's vmlinux and bzImage, and Debian's
/// stock bzImage (downloaded once by scripts/fetch-debian-kernel.sh). No KVM needed.
@Suite struct RealKernelFileTests {
    static let debianKernel: Result<String, HarnessError> = {
        let script = Harness.packageRoot.appendingPathComponent("scripts/fetch-debian-kernel.sh").path
        let result = Harness.run(["bash", script], timeout: 900)
        guard result.status == 0, let last = result.stdout.split(separator: "\n").last else {
            return .failure(HarnessError("fetch-debian-kernel.sh failed (\(result.status)): \(result.stderr.suffix(2000))"))
        }
        return .success(String(last))
    }()

    @Test func debianStockBzImage() throws {
        let path = try Self.debianKernel.get()
        let kernel = try KernelImage.load(path: path)
        #expect(kernel.format == .bzImage)
        #expect(kernel.bootProtocolVersion >= 0x020f)
        #expect(kernel.commandLineLimit == 2047)
        #expect(kernel.initrdAddressMax == 0x7fff_ffff)
        #expect(kernel.entryProtocol == .linux64)
        // Debian's kernel decompresses in place: it needs tens of MiB above 16 MiB.
        #expect(kernel.loadedEnd > 0x100_0000 + (8 << 20))
        let initrd = [UInt8](repeating: 0xab, count: 3 << 20)
        let boot = try BootConfiguration(kernel: kernel, initrd: initrd, initrdPath: "initrd", commandLine: "console=ttyS0 quiet",
                                         memoryBytes: 512 << 20, cpus: 2)
        let memory = try GuestMemory(anonymousRegions: MachineLayout.ramRegions(memoryBytes: 512 << 20))
        let prepared = try boot.load(into: memory)
        #expect(prepared.cpuState.rip == 0x100_0000 + 0x200)
        let zeroPage = try memory.readBytes(count: 4096, at: MachineLayout.zeroPageAddress)
        let file = try readWholeFile(path, field: "--kernel")
        // The setup header is copied verbatim, then the loader's fields are filled in.
        #expect(zeroPage[0x202..<0x210] == file[0x202..<0x210])
        #expect(zeroPage[0x210] == 0xff)
        let initrdAddress = try #require(prepared.initrdAddress)
        let ramdiskImage = zeroPage[0x218..<0x21c].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        #expect(ramdiskImage == initrdAddress.rawValue)
        #expect(initrdAddress.rawValue >= kernel.loadedEnd)
        // The protected-mode kernel is in guest RAM at 16 MiB, byte for byte.
        let setupSectors = Int(file[0x1f1] == 0 ? 4 : file[0x1f1])
        let payload = (setupSectors + 1) * 512
        #expect(try memory.readBytes(count: 4096, at: GuestPhysicalAddress(0x100_0000)) == Array(file[payload..<payload + 4096]))
    }

    @Test func tinyKernelFiles() throws {
        let directory = try LinuxKernelTests.kernelDirectory.get()
        let vmlinux = try KernelImage.load(path: directory.appendingPathComponent("vmlinux").path)
        #expect(vmlinux.format == .elf)
        #expect(vmlinux.entryProtocol == .linux64)
        #expect(vmlinux.loadedEnd > 0x100_0000)
        let bzImage = try KernelImage.load(path: directory.appendingPathComponent("bzImage").path)
        #expect(bzImage.format == .bzImage)
        #expect(bzImage.bootProtocolVersion == 0x020f)
    }
}
