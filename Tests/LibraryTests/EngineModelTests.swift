import Engines
import Foundation
import Library
import MachineSpec
import Testing

/// ISO images built byte by byte: volume descriptors at sector 16 on.
enum SyntheticISO {
    static func descriptor(type: UInt8, body: (inout [UInt8]) -> Void = { _ in }) -> [UInt8] {
        var sector = [UInt8](repeating: 0, count: 2048)
        sector[0] = type
        sector.replaceSubrange(1..<6, with: Array("CD001".utf8))
        sector[6] = 1
        body(&sector)
        return sector
    }

    static func make(label: String, bootable: Bool) -> [UInt8] {
        var image = [UInt8](repeating: 0, count: 16 * 2048)
        image += descriptor(type: 1) { sector in
            let padded = Array((label + String(repeating: " ", count: 32)).utf8.prefix(32))
            sector.replaceSubrange(40..<72, with: padded)
        }
        if bootable {
            image += descriptor(type: 0) { $0.replaceSubrange(7..<30, with: Array("EL TORITO SPECIFICATION".utf8)) }
        }
        image += descriptor(type: 255)
        return image
    }

    static func write(_ bytes: [UInt8]) throws -> String {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-iso-\(UUID().uuidString).iso")
        try Data(bytes).write(to: url)
        return url.path
    }
}

struct InstallMediumTests {
    @Test func bootableISOReadsItsLabel() throws {
        let path = try SyntheticISO.write(SyntheticISO.make(label: "Ubuntu 24.04 LTS amd64", bootable: true))
        let medium = try InstallMedium.inspect(path)
        #expect(medium.volumeLabel == "Ubuntu 24.04 LTS amd64")
        #expect(OSType.guess(fromVolumeLabel: medium.volumeLabel)?.identifier == "ubuntu-64")
    }

    @Test func isoWithoutElToritoIsRefused() throws {
        let path = try SyntheticISO.write(SyntheticISO.make(label: "DATA", bootable: false))
        #expect { try InstallMedium.inspect(path) } throws: { error in
            "\(error)".contains("iso: \(path) is an ISO 9660 image without an El Torito boot record")
        }
    }

    @Test("hostile images: truncated, garbage, a descriptor set that never ends", arguments: [0, 100, 16 * 2048 + 5, 40 * 2048])
    func malformedImagesAreRefused(size: Int) throws {
        var bytes = [UInt8](repeating: 0x43, count: size)
        // Past sector 16, valid-looking descriptors of an unknown type forever: the scan must stop.
        var offset = 16 * 2048
        while offset + 2048 <= size {
            bytes.replaceSubrange(offset..<offset + 2048, with: SyntheticISO.descriptor(type: 7))
            offset += 2048
        }
        let path = try SyntheticISO.write(bytes)
        #expect { try InstallMedium.inspect(path) } throws: { error in
            "\(error)".contains("is not an ISO 9660 image")
        }
    }

    @Test(arguments: [("Debian 12.5.0 amd64 n", "debian-64"), ("Fedora-WS-Live-40-1-14", "fedora-64"),
                      ("alpine-virt 3.20.0 x86_64", "alpine-64"), ("CDROM", nil)])
    func volumeLabelGuesses(label: String, expected: String?) {
        #expect(OSType.guess(fromVolumeLabel: label)?.identifier == expected)
    }
}

struct EngineChoiceTests {
    func temporaryLibrary() -> VMLibrary {
        VMLibrary(root: FileManager.default.temporaryDirectory.appendingPathComponent("vireo-lib-\(UUID().uuidString)").path)
    }

    @Test func anISOMeansQEMUWithTheOSTypesFirmwareAndMemory() throws {
        let library = temporaryLibrary()
        let iso = try SyntheticISO.write(SyntheticISO.make(label: "Ubuntu 24.04 LTS amd64", bootable: true))
        var request = CreateRequest(name: "inst")
        request.iso = iso
        request.diskBytes = 1 << 30
        let (made, notes) = try library.createReporting(request)
        #expect(made.engine == .qemu && made.firmware == .uefi && made.osType == "ubuntu-64")
        #expect(made.cpus == 2 && made.memoryBytes == 4 << 30 && made.iso == iso)
        #expect(made.nvram == "nvram.fd")
        #expect(FileManager.default.fileExists(atPath: library.root + "/inst/nvram.fd"))
        #expect(notes.contains { $0.contains("guessed from the ISO's volume label 'Ubuntu 24.04 LTS amd64'") })
        // Reloads as saved, and a VM saved before the engine fields existed reads as kvm/virtio.
        #expect(try library.bundle(named: "inst").load() == made)
    }

    @Test func aKernelMeansKVMAndTheKVMEngineRefusesAnISO() throws {
        let library = temporaryLibrary()
        let iso = try SyntheticISO.write(SyntheticISO.make(label: "Debian", bootable: true))
        var request = CreateRequest(name: "x")
        request.iso = iso
        request.engine = .kvm
        #expect { try library.create(request) } throws: { "\($0)".contains("iso: an installer ISO needs firmware") }
        #expect(!FileManager.default.fileExists(atPath: library.root + "/x"))
        request.iso = nil
        request.firmware = .bios
        #expect { try library.create(request) } throws: { "\($0)".contains("firmware: the kvm engine boots Linux kernels directly") }
    }

    @Test func theKVMEnginesSlotsAreCheckedWhereTheVMIsDefined() throws {
        var definition = VMDefinition(uuid: "u", name: "many", osType: try OSType.named("linux-64"), createdAt: 0)
        definition.disks = (0..<15).map { DiskAttachment(path: "/d\($0).raw", format: .raw) }
        try VMLibrary.validate(definition)   // 15 disks + balloon + rng = 17 slots
        definition.disks.append(DiskAttachment(path: "/d15.raw", format: .raw))
        #expect { try VMLibrary.validate(definition) } throws: { "\($0)".contains("need 18 virtio slots; the kvm engine has 17") }
        definition.balloon = false
        try VMLibrary.validate(definition)
    }

    @Test func theQEMUEngineHasNoVsock() throws {
        var definition = VMDefinition(uuid: "u", name: "q", osType: try OSType.named("linux-64"), createdAt: 0)
        definition.engine = .qemu
        definition.firmware = .bios
        definition.vsockCID = 3
        #expect { try VMLibrary.validate(definition) } throws: { "\($0)".contains("vsock_cid: the qemu engine has no vsock device") }
    }
}

struct StopRaceTests {
    @Test("stop asks a VM that powers off on its own at that moment (its control socket already gone): it is off, as asked, not an error")
    func stopWhileTheGuestPowersOff() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-lib-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        var request = CreateRequest(name: "leaving")
        request.withoutDisk = true
        _ = try VMLibrary(root: root).create(request)
        let lockPath = try VMLibrary(root: root).bundle(named: "leaving").lockPath
        // Stands in for the VM process in its last moments: the lock held, no control socket.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/flock")
        holder.arguments = ["--exclusive", "--close", lockPath, "sleep", "0.7"]
        try holder.run()
        defer { holder.waitUntilExit() }
        let manager = VMManager(root: root, environment: [:])
        let locked = Date().addingTimeInterval(5)
        while !(try manager.library.bundle(named: "leaving").isLocked), Date() < locked { usleep(10_000) }
        let stopped = try manager.stop("leaving", force: false, timeout: 5)
        #expect(stopped.outcome == .alreadyOff(.stopped))
        // A VM that is still there keeps its error (and is answered without waiting long).
        holder.waitUntilExit()
        let again = Process()
        again.executableURL = URL(fileURLWithPath: "/usr/bin/flock")
        again.arguments = ["--exclusive", "--close", lockPath, "sleep", "5"]
        try again.run()
        defer { again.terminate(); again.waitUntilExit() }
        let held = Date().addingTimeInterval(5)
        while !(try manager.library.bundle(named: "leaving").isLocked), Date() < held { usleep(10_000) }
        #expect(throws: LibraryError.self) { try manager.stop("leaving", force: false, timeout: 5) }
    }
}

struct QEMUCommandLineTests {
    @Test("Windows types: an e1000e on SATA, Hyper-V enlightenments on the CPU (dropped when asked), and an unattended install's kernel booting while the CD loses its boot priority")
    func windowsAndInstallMachines() throws {
        var definition = VMDefinition(uuid: "6c1d2f4e-0000-4000-8000-000000000002", name: "w", osType: try OSType.named("windows11-64"), createdAt: 0)
        definition.engine = .qemu
        definition.firmware = .uefi
        definition.hyperV = true
        definition.networks = [NetworkAttachment(.tap("tap0"), mac: "52:54:00:12:34:56")]
        let bundle = VMBundle(directory: "/lib/w")
        let cards = [PreparedCard(mac: "52:54:00:12:34:56", backend: .tapName("tap0"))]
        let line = QEMUEngine.arguments(definition, bundle: bundle, accelerator: .tcg, cards: cards).joined(separator: " ")
        #expect(line.contains("-cpu max,hv-relaxed,hv-vapic,hv-spinlocks=0x1fff,hv-runtime,hv-time,hv-synic,hv-stimer,hv-frequencies,hv-reset "), "\(line)")
        #expect(QEMUEngine.arguments(definition, bundle: bundle, accelerator: .kvm, cards: cards).joined(separator: " ")
            .contains("-cpu host,hv-relaxed,hv-vapic,hv-spinlocks=0x1fff,hv-vpindex,hv-runtime,"))
        #expect(line.contains("-device e1000e,netdev=net0,mac=52:54:00:12:34:56"), "\(line)")
        definition.hyperV = false
        #expect(QEMUEngine.arguments(definition, bundle: bundle, accelerator: .kvm, cards: cards).joined(separator: " ").contains("-cpu host -smp"))
        let type = try OSType.named("windows11-64")
        #expect(type.tpm && type.secureBoot && type.hyperV && type.diskBus == .sata && type.firmware == .uefi && type.memoryBytes == 4 << 30 && type.diskBytes == 64 << 30)
        #expect(OSType.guess(fromVolumeLabel: "CCCOMA_X64FRE_EN-US_DV9")?.identifier == "windows11-64")

        var install = VMDefinition(uuid: "6c1d2f4e-0000-4000-8000-000000000003", name: "d", osType: try OSType.named("debian-64"), createdAt: 0)
        install.engine = .qemu
        install.firmware = .bios
        install.iso = "/isos/debian.iso"
        install.unattended = UnattendedInstall(installer: DetectedInstaller(family: .debian, description: "Debian", version: "12", osType: "debian-64",
                                                                            kernel: "/install.amd/vmlinuz", initrd: "/install.amd/initrd.gz",
                                                                            packagesOnMedium: true, flavour: nil),
                                               settings: UnattendedAnswerTests.settings, kernel: UnattendedInstall.kernelFile, initrd: UnattendedInstall.initrdFile,
                                               commandLine: "auto=true priority=critical", seed: nil)
        let installLine = QEMUEngine.arguments(install, bundle: VMBundle(directory: "/lib/d"), accelerator: .tcg, cards: []).joined(separator: " ")
        #expect(installLine.contains("-kernel /lib/d/install-kernel -append auto=true priority=critical -initrd /lib/d/install-initrd"), "\(installLine)")
        #expect(installLine.contains("ide-cd,drive=cd0,bus=ide.0,id=cdrom0 ") && !installLine.contains("cdrom0,bootindex"), "\(installLine)")
    }

    @Test func aUEFIInstallerMachine() throws {
        var definition = VMDefinition(uuid: "6c1d2f4e-0000-4000-8000-000000000001", name: "inst", osType: try OSType.named("other"), createdAt: 0)
        definition.engine = .qemu
        definition.firmware = .uefi
        definition.nvram = "nvram.fd"
        definition.iso = "/isos/a,b.iso"
        definition.disks = [DiskAttachment(path: "disk0.qcow2", format: .qcow2)]
        definition.networks = [NetworkAttachment(.tap("tap0"), mac: "52:54:00:12:34:56"), NetworkAttachment(.nat, mac: "52:54:00:12:34:57"),
                               NetworkAttachment(.user, mac: "52:54:00:12:34:58")]
        definition.generationID = "00112233445566778899aabbccddeeff"
        let bundle = VMBundle(directory: "/lib/inst")
        let cards = [PreparedCard(mac: "52:54:00:12:34:56", backend: .tapName("tap0")),
                     PreparedCard(mac: "52:54:00:12:34:57", backend: .tapDescriptor(slot: 0, tap: "vt00000000")),
                     PreparedCard(mac: "52:54:00:12:34:58", backend: .streamDescriptor(slot: 1))]
        let arguments = QEMUEngine.arguments(definition, bundle: bundle, accelerator: .tcg, cards: cards)
        let line = arguments.joined(separator: " ")
        #expect(line.contains("-machine q35,accel=tcg,mem-merge=off -cpu max"), "KSM only when asked: \(line)")
        #expect(line.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"), "\(line)")
        #expect(line.contains("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"))
        #expect(line.contains("if=pflash,format=raw,unit=1,file=/lib/inst/nvram.fd"))
        // Commas in a path are doubled, so a file name cannot add options.
        #expect(line.contains("file=/isos/a,,b.iso,format=raw"))
        #expect(line.contains("ide-cd,drive=cd0,bus=ide.0,id=cdrom0,bootindex=0"))
        // "other" has no virtio drivers: SATA disk, e1000 NIC.
        #expect(line.contains("ide-hd,drive=disk0,bus=ide.1,id=vd0,bootindex=1"))
        #expect(line.contains("e1000,netdev=net0,mac=52:54:00:12:34:56"))
        // Vireo's own taps and passt's socket arrive as inherited descriptors 5, 6, ...
        #expect(line.contains("-netdev tap,id=net0,ifname=tap0,script=no,downscript=no"))
        #expect(line.contains("-netdev tap,id=net1,fd=5 -device e1000,netdev=net1,mac=52:54:00:12:34:57"))
        #expect(line.contains("-netdev stream,id=net2,server=off,addr.type=fd,addr.str=6"))
        #expect(line.contains("vmgenid,guid=00112233-4455-6677-8899-aabbccddeeff"))
        // QEMU's sockets are in the directory its jailed uid may write.
        #expect(line.contains("-vnc unix:/lib/inst/vmm/vnc.sock") && !line.contains("-vnc :"))
        #expect(line.contains("-qmp unix:/lib/inst/vmm/qmp.sock,server=on,wait=off"))
        // The disk's chain is spelled out, each layer in its recorded format; none is probed.
        #expect(line.contains(#"-drive if=none,id=disk0,discard=unmap,file=json:{"driver":"qcow2",,"read-only":false,,"file":{"driver":"file",,"filename":"/lib/inst/disk0.qcow2"},,"backing":null}"#), "\(line)")
    }

    @Test func qemuMemoryBackends() throws {
        var definition = VMDefinition(uuid: "6c1d2f4e-0000-4000-8000-000000000002", name: "mem", osType: try OSType.named("other"), createdAt: 0)
        definition.engine = .qemu
        definition.memoryBytes = 256 << 20
        let bundle = VMBundle(directory: "/lib/mem")
        func line() -> String { QEMUEngine.arguments(definition, bundle: bundle, accelerator: .tcg, cards: []).joined(separator: " ") }
        definition.memoryBacking.numaNode = 0
        #expect(line().contains("-object memory-backend-ram,id=ram0,size=256M,host-nodes=0,policy=bind -machine memory-backend=ram0"), "\(line())")
        definition.memoryBacking.apply(.init(file: "/ram/mem.ram", shared: true))
        #expect(line().contains("-object memory-backend-file,id=ram0,mem-path=/ram/mem.ram,size=256M,share=on,host-nodes=0,policy=bind"), "\(line())")
        definition.memoryBacking.numaNode = nil
        definition.memoryBacking.apply(.init(file: "memfd", shared: false))
        #expect(line().contains("-object memory-backend-memfd,id=ram0,size=256M,share=off -machine memory-backend=ram0"), "\(line())")
        definition.memoryBacking.locked = true
        #expect(line().contains("-overcommit mem-lock=on"))
    }

    @Test("shared folders on the qemu command line: a vhost-user-fs device per share on its virtiofsd's socket, RAM virtiofsd can map (memfd, huge pages or a shared file), the tags the guest's mount script reads in SMBIOS type 11; the server's namespace maps the guest's root to its own unprivileged uid and uid 1000 to the directory's owner, never host root")
    func sharedFolders() throws {
        var definition = VMDefinition(uuid: "6c1d2f4e-0000-4000-8000-000000000003", name: "fs", osType: try OSType.named("linux-64"), createdAt: 0)
        definition.engine = .qemu
        definition.firmware = .bios
        definition.memoryBytes = 512 << 20
        definition.shares = [SharedFolder(tag: "proj", path: "/home/u/proj"), SharedFolder(tag: "docs", path: "/srv/docs", readOnly: true)]
        let bundle = VMBundle(directory: "/lib/fs")
        func line() -> String { QEMUEngine.arguments(definition, bundle: bundle, accelerator: .tcg, cards: []).joined(separator: " ") }
        #expect(line().contains("-chardev socket,id=fs0,path=/lib/fs/vmm/fs-proj.sock -device vhost-user-fs-pci,chardev=fs0,tag=proj,id=share0 -smbios type=11,value=vireo.share=proj"), "\(line())")
        #expect(line().contains("-device vhost-user-fs-pci,chardev=fs1,tag=docs,id=share1 -smbios type=11,value=vireo.share=docs:ro"), "\(line())")
        #expect(line().contains("-object memory-backend-memfd,id=ram0,size=512M,share=on -machine memory-backend=ram0"), "\(line())")
        definition.memoryBacking.hugePages = "2M"
        #expect(line().contains("hugetlb=on,hugetlbsize=2M,share=on"), "\(line())")
        definition.memoryBacking.hugePages = nil
        definition.memoryBacking.apply(.init(file: "memfd", shared: false))
        #expect(line().contains("memory-backend-memfd,id=ram0,size=512M,share=on"), "a memfd is shared for virtiofsd: \(line())")
        // A private RAM file cannot be mapped by virtiofsd: refused with the reason.
        definition.memoryBacking.apply(.init(file: "/tmp/fs.ram", shared: false))
        #expect { try VMLibrary.validate(definition) } throws: { "\($0)".contains("a private RAM file") }
        definition.memoryBacking.apply(.init())
        try VMLibrary.validate(definition)
        // The rules: tags, their count, absolute paths, the engine.
        var bad = definition
        bad.shares.append(SharedFolder(tag: "proj", path: "/tmp"))
        #expect { try VMLibrary.validate(bad) } throws: { "\($0)".contains("tag 'proj' is used twice") }
        bad.shares = [SharedFolder(tag: "a b", path: "/tmp")]
        #expect { try VMLibrary.validate(bad) } throws: { "\($0)".contains("tag 'a b' must be 1 to 36 letters, digits") }
        bad.shares = [SharedFolder(tag: String(repeating: "x", count: 37), path: "/tmp")]
        #expect { try VMLibrary.validate(bad) } throws: { "\($0)".contains("must be 1 to 36") }
        bad.shares = (0..<9).map { SharedFolder(tag: "t\($0)", path: "/tmp") }
        #expect { try VMLibrary.validate(bad) } throws: { "\($0)".contains("9 shared folders is more than the 8") }
        bad.shares = [SharedFolder(tag: "rel", path: "relative/dir")]
        #expect { try VMLibrary.validate(bad) } throws: { "\($0)".contains("not an absolute path") }
        // The kvm engine: a virtio-fs device per share on its virtiofsd's socket, RAM from a shared
        // memfd, the tags on the command line for the mount script; its huge pages and KSM are
        // private RAM virtiofsd cannot map.
        var kvm = definition
        kvm.engine = .kvm
        kvm.firmware = nil
        kvm.kernel = "/boot/vmlinuz"
        kvm.commandLine = "console=ttyS0"
        try VMLibrary.validate(kvm)
        let spec = try KVMEngine.machineSpec(kvm, bundle: bundle, cards: [])
        #expect(spec.sharedFolders == [MachineSpec.FileSystem(tag: "proj", socketPath: "/lib/fs/vmm/fs-proj.sock"),
                                       MachineSpec.FileSystem(tag: "docs", socketPath: "/lib/fs/vmm/fs-docs.sock")])
        #expect(spec.memory.file == .memfd && spec.memory.shared, "\(spec.memory)")
        #expect(spec.commandLine == "console=ttyS0 vireo.share=proj vireo.share=docs:ro", "\(spec.commandLine)")
        #expect(try MachineSpec.parse(spec.arguments).spec == spec, "the --fs flags read back as written")
        kvm.memoryBacking.hugePages = "2M"
        #expect { try VMLibrary.validate(kvm) } throws: { "\($0)".contains("the kvm engine's huge pages") }
        kvm.memoryBacking.hugePages = nil
        kvm.memoryBacking.mergeable = true
        #expect { try VMLibrary.validate(kvm) } throws: { "\($0)".contains("KSM (--ksm) merges private pages only") }
        // --share's syntax and default tags.
        #expect(try SharedFolder.parse("/srv/no-such-dir:data,ro") == SharedFolder(tag: "data", path: "/srv/no-such-dir", readOnly: true))
        #expect(try SharedFolder.parse("/srv/My Project") == SharedFolder(tag: "My-Project", path: "/srv/My Project"))
        #expect(SharedFolder.defaultTag(for: "/") == "share")
        #expect { try SharedFolder.parse("/srv/x,rw,ro,uid=3") } throws: { "\($0)".contains("the options are ro and mount=") }
        // The server's user namespace.
        let maps = ShareServers.maps(owner: (uid: 1001, gid: 1002), server: 2_130_706_500)
        #expect(maps.uid == "0 2130706500 1\n1000 1001 1\n" && maps.gid == "0 2130706500 1\n1000 1002 1\n")
        let rootOwned = ShareServers.maps(owner: (uid: 0, gid: 0), server: 2_130_706_500)
        #expect(rootOwned.uid == "0 2130706500 1\n" && rootOwned.gid == "0 2130706500 1\n", "host root is never mapped")
    }

    @Test("a TPM 2.0 on the qemu command line: QEMU's tpm-emulator on swtpm's socket in the VM's vmm directory, a CRB interface; the kvm engine refuses one by name")
    func tpmDevice() throws {
        var definition = VMDefinition(uuid: "6c1d2f4e-0000-4000-8000-000000000004", name: "win", osType: try OSType.named("other"), createdAt: 0)
        definition.engine = .qemu
        definition.firmware = .bios
        definition.tpm = true
        let line = QEMUEngine.arguments(definition, bundle: VMBundle(directory: "/lib/win"), accelerator: .tcg, cards: []).joined(separator: " ")
        #expect(line.contains("-chardev socket,id=tpm0char,path=/lib/win/vmm/tpm.sock -tpmdev emulator,id=tpm0,chardev=tpm0char -device tpm-crb,tpmdev=tpm0"), "\(line)")
        try VMLibrary.validate(definition)
        definition.engine = .kvm
        definition.firmware = nil
        definition.kernel = "/boot/vmlinuz"
        #expect { try VMLibrary.validate(definition) } throws: { "\($0)".contains("the kvm engine has no TPM device") }
    }

    @Test("Secure Boot on the qemu command line: OVMF's Secure Boot build, SMM on and its flash secure; only with UEFI, only on the qemu engine")
    func secureBootMachine() throws {
        var definition = VMDefinition(uuid: "6c1d2f4e-0000-4000-8000-000000000005", name: "sb", osType: try OSType.named("other"), createdAt: 0)
        definition.engine = .qemu
        definition.firmware = .uefi
        definition.nvram = "nvram.fd"
        definition.secureBoot = true
        let line = QEMUEngine.arguments(definition, bundle: VMBundle(directory: "/lib/sb"), accelerator: .tcg, cards: []).joined(separator: " ")
        #expect(line.contains("-machine q35,accel=tcg,mem-merge=off,smm=on"), "\(line)")
        #expect(line.contains("-global driver=cfi.pflash01,property=secure,value=on -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"), "\(line)")
        try VMLibrary.validate(definition)
        definition.firmware = .bios
        #expect { try VMLibrary.validate(definition) } throws: { "\($0)".contains("Secure Boot is UEFI's; give --firmware uefi") }
        definition.secureBoot = false
        #expect(!QEMUEngine.arguments(definition, bundle: VMBundle(directory: "/lib/sb"), accelerator: .tcg, cards: []).joined(separator: " ").contains("smm=on"))
    }

    @Test func keys() throws {
        #expect(try KeyChord.parse("ctrl-alt-delete").keys == ["ctrl", "alt", "delete"])
        #expect(try KeyChord.parse("Enter").keys == ["ret"])
        #expect { try KeyChord.parse("ctrl-alt-foo") } throws: { "\($0)".contains("'foo' in 'ctrl-alt-foo' is not a key") }
        #expect(try KeyChord.typing("Hi!\n").map(\.keys) == [["shift", "h"], ["i"], ["shift", "1"], ["ret"]])
        #expect { try KeyChord.typing("é") } throws: { "\($0)".contains("text: 'é' has no key") }
    }
}
