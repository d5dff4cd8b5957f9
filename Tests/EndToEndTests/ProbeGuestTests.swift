import Foundation
import Testing
import X86Boot

/// Boots the probe guests through `vireo run` and checks what they report seeing.
@Suite(.serialized)
struct ProbeGuestTests {
    /// The e820 map the probe prints for a VM of `memory` bytes.
    func expectedE820Lines(memory: UInt64) -> [String] {
        E820Entry.map(memoryBytes: memory).map {
            "e820: 0x\(String($0.address, radix: 16)) 0x\(String($0.size, radix: 16)) \($0.kind.rawValue)"
        }
    }

    func lines(_ text: String) -> [String] {
        // Serial output ends lines with "\r\n", which Swift counts as one Character.
        text.replacingOccurrences(of: "\r", with: "").split(separator: "\n").map(String.init)
    }

    @Test("Boot information through each entry (64-bit, PVH, PVH in a 32-bit ELF): zero page, e820, command line, initrd bytes, CPUID, and the ACPI tables with the MP table beside them, or the MP table alone",
          arguments: ["linux64", "pvh", "pvh32"], [true, false])
    func bootInformation(variant: String, acpi: Bool) throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let initrd = randomBytes(300_001)
        let initrdPath = directory.appendingPathComponent("initrd.bin")
        try Data(initrd).write(to: initrdPath)
        // Above 3 GiB, so RAM is split around the 32-bit MMIO hole.
        let memory: UInt64 = 3584 << 20
        let commandLine = "probe=info some.option=1 quoted=\"a b\""
        let result = Harness.vireoRun(["--kernel", try Harness.probe(variant), "--initrd", initrdPath.path,
                                       "--cmdline", commandLine, "--memory", "3584M", "--acpi", acpi ? "on" : "off"], timeout: 60)
        #expect(result.status == 0, "stderr: \(result.stderr)")
        let output = lines(result.stdout)
        let mode = variant == "linux64" ? "linux64" : "pvh"
        #expect(output.contains("probe: mode=\(mode)"))
        #expect(output.contains("cmdline: \(commandLine)"))
        let e820 = output.filter { $0.hasPrefix("e820: ") }
        #expect(e820 == expectedE820Lines(memory: memory))
        #expect(e820.contains("e820: 0x100000000 0x20000000 1"))
        let hash = "0x" + String(fnv1a(initrd), radix: 16)
        #expect(output.contains("initrd: size=\(initrd.count) fnv1a=\(hash) aligned=1"))
        if variant == "linux64" {
            #expect(output.contains("zeropage: loader=0xff boot_flag=0xaa55 header=0x53726448"))
        }
        let cpuid = try #require(output.first { $0.hasPrefix("cpuid: ") })
        #expect(cpuid.contains("hypervisor=1"))
        #expect(cpuid.contains("apic=0"))
        #expect(cpuid.contains("hv_signature=KVMKVMKVM"))
        if acpi {
            // The RSDP's address comes in the zero page (acpi_rsdp_addr) or the PVH start info.
            #expect(output.contains("acpi: rsdp=0xe0000 revision=2 source=\(mode == "pvh" ? "pvh" : "zeropage")"), "\(output)")
            #expect(output.contains("acpi: checksums ok"))
            #expect(output.contains("acpi: madt cpus=1 ioapic=0xfec00000"))
            #expect(output.contains("acpi: fadt hw_reduced=1 reset=0x602/0x1 sleep=0x600 status=0x601"))
            #expect(output.contains("acpi: dsdt s5=5 virtio=0 ged_gsi=13 ged_port=0x603"))
            #expect(output.contains { $0.hasPrefix("acpi: vmgenid=") && $0.count == "acpi: vmgenid=".count + 32 })
            // The MP table too, for kernels built without ACPI (as Firecracker and QEMU write it).
            #expect(output.contains("mptable: cpus=1 ioapic=0xfec00000"), "\(output)")
            // The probe ends with S5 where the FADT offers it.
            #expect(result.stderr.contains("guest powered off"))
        } else {
            #expect(output.contains("acpi: none"))
            #expect(output.contains("mptable: cpus=1 ioapic=0xfec00000"))
            #expect(result.stderr.contains("guest reset the machine through the i8042 (0xFE)"))
            #expect(result.stderr.contains("guest requested a reset"))
        }
        #expect(output.contains("probe: done"))
        #expect(result.stderr.contains("guest boot marker reached"))
    }

    @Test("virtio devices appear in the DSDT with ACPI and on the command line without it, in the same slots")
    func devicesAnnouncedOncePerPlatform() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let disk = directory.appendingPathComponent("d.raw").path
        #expect(Harness.run([Harness.vireo, "disk", "create", disk, "--size", "1M", "--format", "raw"]).status == 0)
        let withACPI = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cmdline", "probe=info", "--memory", "64M",
                                         "--disk", disk, "--rng"])
        #expect(withACPI.status == 0, "\(withACPI.stderr)")
        #expect(lines(withACPI.stdout).contains("acpi: dsdt s5=5 virtio=2 ged_gsi=13 ged_port=0x603"), "\(withACPI.stdout)")
        #expect(lines(withACPI.stdout).contains("cmdline: probe=info"), "no virtio_mmio.device= with ACPI")
        let withoutACPI = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cmdline", "probe=info", "--memory", "64M",
                                            "--disk", disk, "--rng", "--acpi", "off"])
        #expect(withoutACPI.status == 0, "\(withoutACPI.stderr)")
        #expect(lines(withoutACPI.stdout).contains("cmdline: probe=info virtio_mmio.device=4K@0xd0001000:5 virtio_mmio.device=4K@0xd0002000:6"),
                "\(withoutACPI.stdout)")
    }

    @Test("The ACPI power button: the GED's interrupt reaches the guest, which reads the event and enters S5; the VMM exits 0")
    func powerButtonAndSoftOff() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let socket = directory.appendingPathComponent("control.sock").path
        let running = RunningProcess([Harness.vireoVMM, "--kernel", try Harness.probe("pvh"), "--cmdline", "probe=acpi",
                                      "--memory", "64M", "--control", socket])
        #expect(running.waitForOutput("acpi: waiting for the power button", timeout: 60), "\(running.stdout) \(running.stderr)")
        let reply = try ControlClient.request("power-button", socket: socket)
        #expect(reply.contains("\"ok\":true"), "\(reply)")
        let status = running.wait(timeout: 30)
        #expect(status == 0, "\(running.stderr)")
        #expect(running.stdout.contains("acpi: ged interrupt events=0x1"))
        #expect(running.stdout.contains("acpi: power button pressed"))
        #expect(running.stdout.contains("acpi: entering S5"))
        #expect(!running.stdout.contains("still running after S5"))
        #expect(running.stderr.contains("guest powered off"))
        #expect(running.stderr.contains("exit status 0"))

        // Without ACPI there is no button to press, and the request says so.
        let plain = RunningProcess([Harness.vireoVMM, "--kernel", try Harness.probe("pvh"), "--cmdline", "probe=ticker spin=5000000",
                                    "--memory", "64M", "--control", socket, "--acpi", "off"])
        #expect(plain.waitForOutput("tick 1", timeout: 60))
        let refused = try ControlClient.request("power-button", socket: socket)
        #expect(refused.contains("\"error\":\"no-acpi\""), "\(refused)")
        _ = try ControlClient.request("power-off", socket: socket)
        #expect(plain.wait(timeout: 30) == 0)
    }

    @Test("Reboot in place: RAM cleared, every AP started again from the MADT, the same process; --on-reboot exit ends the run instead")
    func rebootInPlace() throws {
        try Harness.requireKVM()
        let running = RunningProcess([Harness.vireo, "run", "--kernel", try Harness.probe("linux64"), "--cmdline", "probe=reboot",
                                      "--cpus", "2", "--memory", "64M", "--on-reboot", "restart"])
        let rebooted = running.waitForError("boot 4 starts", timeout: 60)   // three whole boots behind it
        running.signal(SIGTERM)
        let status = running.wait(timeout: 30)
        #expect(rebooted, "\(running.stderr)")
        #expect(status == 143)
        let output = lines(running.stdout)
        #expect(output.filter { $0 == "reboot: RAM clear" }.count >= 3, "\(output)")
        #expect(!output.contains("reboot: marker survived, RAM was not cleared"))
        #expect(output.filter { $0 == "smp: online=2 of 2" }.count >= 3, "\(output)")
        #expect(running.stderr.contains("guest reset the machine through the ACPI reset register"))
        #expect(!running.stderr.contains("requested a reset"), "a reboot in place must not end the run")

        let exits = Harness.vireoRun(["--kernel", try Harness.probe("linux64"), "--cmdline", "probe=reboot", "--cpus", "2", "--memory", "64M"])
        #expect(exits.status == 0, "\(exits.stderr)")
        #expect(lines(exits.stdout).filter { $0 == "reboot: RAM clear" }.count == 1)
        #expect(exits.stderr.contains("guest reset the machine through the ACPI reset register"))
        #expect(exits.stderr.contains("guest requested a reset; the VM has stopped"))
    }

    @Test("The VM generation ID the guest reads is the one given, and a different one each run when none is")
    func generationID() throws {
        try Harness.requireKVM()
        let given = Harness.run([Harness.vireoVMM, "--kernel", try Harness.probe("pvh"), "--cmdline", "probe=info", "--memory", "64M",
                                 "--generation-id", "00112233-4455-6677-8899-AABBCCDDEEFF"])
        #expect(given.status == 0, "\(given.stderr)")
        #expect(lines(given.stdout).contains("acpi: vmgenid=00112233445566778899aabbccddeeff"), "\(given.stdout)")
        let first = lines(Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cmdline", "probe=info", "--memory", "64M"]).stdout)
            .first { $0.hasPrefix("acpi: vmgenid=") }
        let second = lines(Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cmdline", "probe=info", "--memory", "64M"]).stdout)
            .first { $0.hasPrefix("acpi: vmgenid=") }
        #expect(first != nil && second != nil && first != second)
    }

    @Test("No initrd: the probe sees none")
    func noInitrd() throws {
        try Harness.requireKVM()
        let result = Harness.vireoRun(["--kernel", try Harness.probe("linux64"), "--cmdline", "probe=info", "--memory", "64M"])
        #expect(result.status == 0, "stderr: \(result.stderr)")
        #expect(lines(result.stdout).contains("initrd: none"))
        #expect(lines(result.stdout).filter { $0.hasPrefix("e820: ") } == expectedE820Lines(memory: 64 << 20))
    }

    @Test("Every vCPU runs: the guest starts the APs through INIT/SIPI on the in-kernel LAPIC")
    func multipleVCPUs() throws {
        try Harness.requireKVM()
        for acpi in ["on", "off"] {
            let result = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cmdline", "probe=smp", "--cpus", "4", "--memory", "128M",
                                           "--acpi", acpi], timeout: 120)
            #expect(result.status == 0, "stderr: \(result.stderr)")
            let output = lines(result.stdout)
            #expect(output.contains("smp: online=4 of 4"))
            // With ACPI the CPUs come from the MADT, without it from the MP table.
            #expect(output.contains("smp: cpus from the madt") == (acpi == "on"))
            let apics = Set(output.filter { $0.hasPrefix("cpu: ") }.compactMap { $0.split(separator: " ").first { $0.hasPrefix("apic=") } })
            #expect(apics == ["apic=0", "apic=1", "apic=2", "apic=3"])
        }
    }

    @Test("Interrupts: PIT ticks and a serial receive interrupt arrive through the IOAPIC")
    func interrupts() throws {
        try Harness.requireKVM()
        let running = RunningProcess([Harness.vireo, "run", "--kernel", try Harness.probe("linux64"),
                                      "--cmdline", "probe=irq", "--memory", "64M"])
        #expect(running.waitForOutput("irq: waiting for serial input", timeout: 60))
        running.send(Data("Q".utf8))
        let status = running.wait(timeout: 60)
        #expect(status == 0, "stderr: \(running.stderr)")
        #expect(running.stdout.contains("irq: timer ticks>=3 vector=0x20"))
        #expect(running.stdout.contains("irq: serial rx=Q vector=0x24"))
    }

    @Test("vireo-vmm, the lean per-VM process, boots the same guest with the same flags")
    func leanVMMProcess() throws {
        try Harness.requireKVM()
        let result = Harness.run([Harness.vireoVMM, "--kernel", try Harness.probe("linux64"), "--cmdline=probe=smp",
                                  "--cpus", "2", "--memory", "64M"], timeout: 60)
        #expect(result.status == 0, "stderr: \(result.stderr)")
        #expect(result.stdout.contains("smp: online=2 of 2"))
        #expect(result.stderr.contains("guest powered off"))
        let refused = Harness.run([Harness.vireoVMM, "--kernel", try Harness.probe("linux64"), "--cpus", "two"])
        #expect(refused.status == 2)
        #expect(refused.stderr.contains("--cpus: 'two' is not a whole number"))
        let unknown = Harness.run([Harness.vireoVMM, "--kernal", "x"])
        #expect(unknown.status == 2)
        #expect(unknown.stderr.contains("--kernal: unknown argument"))
    }

    @Test("A triple fault stops the VM with status 1 and a one-line reason")
    func tripleFault() throws {
        try Harness.requireKVM()
        let result = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cmdline", "probe=triple", "--memory", "64M"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("triple: faulting now"))
        #expect(!result.stdout.contains("still alive"))
        #expect(result.stderr.contains("vCPU 0 shut down (triple fault, KVM_EXIT_SHUTDOWN)"))
    }

    @Test("Port I/O from guest ring 3 reaches the VMM's devices")
    func userModePortIO() throws {
        try Harness.requireKVM()
        let result = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cmdline", "probe=ports count=5000", "--memory", "64M"])
        #expect(result.status == 0, "stderr: \(result.stderr)")
        #expect(result.stdout.contains("ports: done count=5000"))
    }

    @Test("Console escape Ctrl-A x quits and powers the VM off")
    func consoleEscape() throws {
        try Harness.requireKVM()
        let running = RunningProcess([Harness.vireo, "run", "--kernel", try Harness.probe("linux64"),
                                      "--cmdline", "probe=irq", "--memory", "64M"])
        #expect(running.waitForOutput("irq: waiting for serial input", timeout: 60))
        running.send(Data([0x01, UInt8(ascii: "x")]))
        #expect(running.wait(timeout: 30) == 0)
        #expect(running.stderr.contains("console quit (Ctrl-A x)"))
        #expect(!running.stdout.contains("serial rx="))
    }

    @Test("SIGTERM stops a running VM cleanly with status 143")
    func terminateSignal() throws {
        try Harness.requireKVM()
        let running = RunningProcess([Harness.vireo, "run", "--kernel", try Harness.probe("linux64"),
                                      "--cmdline", "probe=irq", "--memory", "64M"])
        #expect(running.waitForOutput("irq: waiting for serial input", timeout: 60))
        running.signal(SIGTERM)
        #expect(running.wait(timeout: 30) == 143)
        #expect(running.stderr.contains("stopped by signal 15"))
    }

    @Test("--console file:PATH appends the guest's output to a file")
    func fileConsole() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let log = directory.appendingPathComponent("console.log")
        try Data("previous run\n".utf8).write(to: log)
        let result = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cmdline", "probe=hello",
                                       "--memory", "64M", "--console", "file:\(log.path)"])
        #expect(result.status == 0, "stderr: \(result.stderr)")
        let text = try String(contentsOf: log, encoding: .utf8)
        #expect(text.hasPrefix("previous run\n"))
        #expect(text.contains("hello from the probe"))
        #expect(!result.stdout.contains("hello from the probe"))
    }

    @Test("--console socket:PATH serves the console over a Unix socket, input included")
    func socketConsole() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let socketPath = directory.appendingPathComponent("console.sock").path
        let running = RunningProcess([Harness.vireo, "run", "--kernel", try Harness.probe("linux64"),
                                      "--cmdline", "probe=irq", "--memory", "64M", "--console", "socket:\(socketPath)"])
        let fd = try connectUnixSocket(socketPath, timeout: 30)
        defer { close(fd) }
        var attributes = stat()
        #expect(stat(socketPath, &attributes) == 0 && attributes.st_mode & 0o777 == 0o600)
        // The probe waits for input; anything it printed before we connected was dropped.
        Thread.sleep(forTimeInterval: 1)
        _ = "K".withCString { write(fd, $0, 1) }
        var received = ""
        let deadline = Date().addingTimeInterval(60)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while Date() < deadline, !received.contains("probe: done") {
            let count = read(fd, &buffer, buffer.count)
            if count <= 0 { break }
            received += String(decoding: buffer[0..<count], as: UTF8.self)
        }
        #expect(received.contains("irq: serial rx=K vector=0x24"))
        #expect(running.wait(timeout: 30) == 0)
        #expect(!FileManager.default.fileExists(atPath: socketPath))
    }
}

func connectUnixSocket(_ path: String, timeout: TimeInterval) throws -> Int32 {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in path.utf8.enumerated() where index < buffer.count - 1 { buffer[index] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if connected == 0 { return fd }
        close(fd)
        Thread.sleep(forTimeInterval: 0.05)
    }
    throw HarnessError("could not connect to \(path) within \(timeout) s")
}

/// virtio-blk end to end: a probe guest with its own virtio driver writes, flushes and reads back
/// through `vireo run --disk`; qemu-img then checks the image and the bytes on the host.
@Suite struct VirtioBlockGuestTests {
    func expectedPattern(seed: Int) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 13 + seed) } }

    @Test("A guest's writes land in qcow2 and raw images, which stay valid for qemu-img", arguments: ["qcow2", "raw"])
    func guestWritesReachTheImage(format: String) throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let disk = directory.appendingPathComponent("disk.\(format)").path
        let spare = directory.appendingPathComponent("spare.raw").path
        #expect(Harness.run([Harness.vireo, "disk", "create", disk, "--size", "32M", "--format", format]).status == 0)
        #expect(Harness.run([Harness.vireo, "disk", "create", spare, "--size", "1M", "--format", "raw"]).status == 0)
        let result = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--memory", "64M", "--cmdline", "probe=blk sector=1000 seed=77",
                                       "--disk", "\(disk),serial=vireo-disk-0", "--disk", "\(spare),readonly,format=raw"])
        #expect(result.status == 0, "stderr: \(result.stderr)")
        #expect(result.stdout.contains("blk: dev=0 capacity=65536 ro=0 id_status=0 serial=vireo-disk-0 write_status=0 flush_status=0 read_status=0 match=1 beyond_end_status=1"),
                "\(result.stdout)")
        // The read-only disk refuses the write (VIRTIO_BLK_S_IOERR) and still reads.
        #expect(result.stdout.contains("blk: dev=1 capacity=2048 ro=1 id_status=0 serial= write_status=1 flush_status=0 read_status=0"))
        #expect(result.stdout.contains("blk: devices=2"))
        if format == "qcow2" {
            let check = Harness.run(["qemu-img", "check", disk])
            #expect(check.status == 0 && check.stdout.contains("No errors were found"), "\(check.stdout)")
        }
        let raw = directory.appendingPathComponent("view.raw").path
        #expect(Harness.run(["qemu-img", "convert", "-O", "raw", disk, raw]).status == 0)
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: raw)))
        #expect(Array(bytes[512_000..<512_000 + 4096]) == expectedPattern(seed: 77))
        #expect(bytes[0..<512_000].allSatisfy { $0 == 0 })
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: spare))).allSatisfy { $0 == 0 })
    }

    @Test("multiqueue: a 2-vCPU VM's disk has 2 queues (one per vCPU) and queues=4 gives 4; the probe's driver takes VIRTIO_BLK_F_MQ and writes, flushes and reads on queue 1 of each, and the VMM counts its requests there; a driver that ignores MQ uses queue 0; bad queue counts are refused naming the rule")
    func multiqueue() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let disk = directory.appendingPathComponent("mq.qcow2").path
        let second = directory.appendingPathComponent("mq4.raw").path
        #expect(Harness.run([Harness.vireo, "disk", "create", disk, "--size", "32M"]).status == 0)
        #expect(Harness.run([Harness.vireo, "disk", "create", second, "--size", "1M", "--format", "raw"]).status == 0)
        let result = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cpus", "2", "--memory", "64M",
                                       "--cmdline", "probe=blk queue=1 sector=100 seed=9",
                                       "--disk", "\(disk),serial=mq", "--disk", "\(second),queues=4"])
        #expect(result.status == 0, "stderr: \(result.stderr)")
        #expect(result.stdout.contains("blk: dev=0 capacity=65536 ro=0 queue=1 of 2 id_status=0 serial=mq write_status=0 flush_status=0 read_status=0 match=1 beyond_end_status=1"),
                "\(result.stdout)")
        #expect(result.stdout.contains("blk: dev=1 capacity=2048 ro=0 queue=1 of 4 id_status=0 serial= write_status=0 flush_status=0 read_status=0 match=1"),
                "\(result.stdout)")
        // get-id, write, flush, read, the read beyond the end: five requests, all on queue 1.
        #expect(result.stderr.contains("virtio-blk \(disk): 5 requests (by queue: 0, 5; multiqueue taken in 1 driver sessions)"), "\(result.stderr)")
        #expect(result.stderr.contains("virtio-blk \(second): 5 requests (by queue: 0, 5, 0, 0; multiqueue taken in 1 driver sessions)"), "\(result.stderr)")
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: second)))
        #expect(Array(bytes[51_200..<51_200 + 4096]) == expectedPattern(seed: 9))

        let plain = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cpus", "2", "--memory", "64M", "--cmdline", "probe=blk",
                                      "--disk", disk])
        #expect(plain.stdout.contains("blk: dev=0 capacity=65536 ro=0 id_status=0 serial= write_status=0 flush_status=0 read_status=0 match=1"), "\(plain.stdout)")
        #expect(plain.stderr.contains("virtio-blk \(disk): 5 requests (by queue: 5, 0; multiqueue taken in 0 driver sessions)"), "\(plain.stderr)")

        for (option, reason) in [("queues=0", "disk 0: 0 queues is not allowed; use 1 to 16"), ("queues=17", "disk 0: 17 queues is not allowed; use 1 to 16"),
                                 ("queues=two", "disk 0: queues 'two' is not a number; allowed: 1 to 16")] {
            let refused = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--disk", "\(disk),\(option)"])
            #expect(refused.status == 2 && refused.stderr.contains("--disk: \(reason)"), "\(option): \(refused.stderr)")
            #expect(refused.stdout.isEmpty)
        }
    }

    @Test("SIGKILL in the middle of guest writes: the qcow2 image passes qemu-img check and holds every flushed block")
    func killedMidWrite() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let disk = directory.appendingPathComponent("victim.qcow2").path
        #expect(Harness.run([Harness.vireo, "disk", "create", disk, "--size", "64M", "--cluster-size", "4096"]).status == 0)
        let running = RunningProcess([Harness.vireo, "run", "--kernel", try Harness.probe("pvh"), "--memory", "64M",
                                      "--cmdline", "probe=blkloop count=4000", "--disk", disk])
        #expect(running.waitForOutput("blkloop: flushed 160", timeout: 120), "\(running.stdout.suffix(500)) \(running.stderr)")
        running.signal(SIGKILL)
        #expect(running.wait(timeout: 30) == 128 + SIGKILL)
        #expect(!running.stdout.contains("blkloop: finished"))
        let flushed = running.stdout.replacingOccurrences(of: "\r", with: "").split(separator: "\n")
            .compactMap { $0.hasPrefix("blkloop: flushed ") ? Int($0.dropFirst(17)) : nil }.max() ?? 0
        #expect(flushed >= 160)
        // Leaks (exit 3) are acceptable after a crash; corruption (exit 2) is not.
        let check = Harness.run(["qemu-img", "check", disk])
        #expect(check.status == 0 || check.status == 3, "\(check.stdout) \(check.stderr)")
        #expect(!check.stdout.contains("ERROR"), "\(check.stdout)")
        let raw = directory.appendingPathComponent("after.raw").path
        #expect(Harness.run(["qemu-img", "convert", "-O", "raw", disk, raw]).status == 0)
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: raw)))
        for block in 0..<flushed {
            let expected = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 13 + block) }
            guard Array(bytes[block * 4096..<(block + 1) * 4096]) == expected else {
                Issue.record("block \(block) of \(flushed) flushed blocks is not what the guest wrote")
                break
            }
        }
    }

    @Test("The same image attached twice is refused before the VM starts")
    func imageLockedOnce() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let disk = directory.appendingPathComponent("d.qcow2").path
        #expect(Harness.run([Harness.vireo, "disk", "create", disk, "--size", "8M"]).status == 0)
        let result = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cmdline", "probe=blk", "--disk", disk, "--disk", "\(disk),readonly"])
        #expect(result.status == 2)
        #expect(result.stderr.contains("--disk: \(disk) is in use"))
        #expect(result.stdout.isEmpty)
        let bad = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--disk", "\(disk),cache=unsafe"])
        #expect(bad.status == 2 && bad.stderr.contains("--disk: cache 'unsafe' is not one of writeback, none"), "\(bad.stderr)")
        let unknown = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--disk", "\(disk),aio=native"])
        #expect(unknown.status == 2 && unknown.stderr.contains("--disk: unknown option 'aio=native'"), "\(unknown.stderr)")
        let missing = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--disk", directory.appendingPathComponent("nope.raw").path])
        #expect(missing.status == 2)
        #expect(missing.stderr.contains("nope.raw: open failed: No such file or directory"))
        // A name that does not say its format needs format=: a disk's bytes never choose it.
        let undeclared = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--disk", directory.appendingPathComponent("d.img").path])
        #expect(undeclared.status == 2 && undeclared.stderr.contains("add format=raw or format=qcow2"), "\(undeclared.stderr)")
    }

    @Test("a disk limited to 10 operations per second makes the guest wait, and every block still arrives (written on queue 1 of a multiqueue disk)")
    func rateLimitedDisk() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let disk = directory.appendingPathComponent("limited.qcow2").path
        #expect(Harness.run(["qemu-img", "create", "-f", "qcow2", disk, "16M"]).status == 0)
        let started = Date()
        // 40 writes and 5 flushes at 10/s with a burst of 1: at least 4.4 s, however fast the host.
        // On queue 1 of 2 (multiqueue): the throttle's own thread finishes every queue, not just the first.
        let result = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--cpus", "2", "--memory", "64M", "--disk", "\(disk),iops=10,iops-burst=1",
                                       "--cmdline", "probe=blkloop count=40 queue=1"], timeout: 120)
        let elapsed = Date().timeIntervalSince(started)
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("blkloop: finished"), "\(result.stdout.suffix(300))")
        #expect(elapsed >= 4.0, "45 requests at 10/s took only \(elapsed) s")
        let raw = directory.appendingPathComponent("view.raw").path
        #expect(Harness.run(["qemu-img", "convert", "-O", "raw", disk, raw]).status == 0)
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: raw)))
        for block in [0, 17, 39] {
            #expect(Array(bytes[block * 4096..<(block + 1) * 4096]) == expectedPattern(seed: block), "block \(block)")
        }
        let refused = Harness.vireoRun(["--kernel", try Harness.probe("pvh"), "--disk", "\(disk),iops-burst=5"])
        #expect(refused.status == 2)
        #expect(refused.stderr.contains("--disk: iops-burst needs iops"), "\(refused.stderr)")
    }
}

@Suite struct VirtioEntropyGuestTests {
    @Test("--rng: the guest's virtio-rng driver gets random bytes, different on each read")
    func entropyDevice() throws {
        try Harness.requireKVM()
        let result = Harness.vireoRun(["--kernel", try Harness.probe("linux64"), "--memory", "64M", "--cmdline", "probe=rng", "--rng"])
        #expect(result.status == 0, "stderr: \(result.stderr)")
        #expect(result.stdout.contains("rng: read=64 read2=64 differ=1 nonzero=1"), "\(result.stdout)")
        #expect(result.stdout.contains("rng: devices=1"))
        let without = Harness.vireoRun(["--kernel", try Harness.probe("linux64"), "--memory", "64M", "--cmdline", "probe=rng"])
        #expect(without.stdout.contains("rng: devices=0"))
    }
}
