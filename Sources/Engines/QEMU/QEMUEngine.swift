import API
import CHostSupport
import DiskImage
import JSONQuoting
import Library
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// Runs library VMs that need firmware, a CD-ROM, a display, keyboard and pointer on QEMU (a q35
/// machine), controlled over QMP. QEMU itself holds the VM's lock: the locked descriptor is
/// inherited as descriptor 3, which QEMU never touches, so "running" means what it means for the
/// kvm engine, and `kill -9` of QEMU leaves the VM stopped. (Not `-add-fd`: QEMU closes fd-set
/// descriptors nobody uses once no monitor is connected, and the lock went with them.) No supervisor process sits beside it (docs/qemu-engine.md says why).
public struct QEMUEngine: DisplayEngine, RemovableMediaEngine, StateTransferEngine {
    public var kind: EngineKind { .qemu }
    /// `$VIREO_QEMU`, else `qemu-system-x86_64` on the PATH.
    public let binary: String?
    /// The oldest QEMU whose QMP has everything used here (`screendump` to PNG came in 7.1).
    static let minimumVersion = (7, 1)

    public init(environment: [String: String]) {
        if let path = environment["VIREO_QEMU"], !path.isEmpty {
            binary = path
        } else {
            let directories = (environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":").map(String.init) + ["/usr/bin"]
            binary = directories.map { $0 + "/qemu-system-x86_64" }.first { access($0, X_OK) == 0 }
        }
    }

    /// The QEMU binary, checked to run and to be new enough; errors name the package to install.
    func checkedBinary(for name: String) throws(LibraryError) -> String {
        guard let binary, access(binary, X_OK) == 0 else {
            throw .engine(name: name, reason: "the qemu engine needs QEMU, which is not installed: install Debian's `qemu-system-x86` package (apt install qemu-system-x86), or point $VIREO_QEMU at qemu-system-x86_64", exitStatus: 2)
        }
        let output = String(HostCommand.run(binary, ["--version"], timeoutSeconds: 10).output.prefix { $0 != "\n" })
        // "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)"
        let words = output.split(separator: " ")
        guard let index = words.firstIndex(of: "version"), index + 1 < words.count else {
            throw .engine(name: name, reason: "\(binary) --version did not say which QEMU it is (\(output.prefix(120))); reinstall `qemu-system-x86`", exitStatus: 1)
        }
        let numbers = words[index + 1].prefix(while: { $0.isNumber || $0 == "." }).split(separator: ".").compactMap { Int($0) }
        guard numbers.count >= 2 else {
            throw .engine(name: name, reason: "cannot read the QEMU version in '\(output.prefix(120))'", exitStatus: 1)
        }
        guard (numbers[0], numbers[1]) >= Self.minimumVersion else {
            throw .engine(name: name, reason: "\(binary) is QEMU \(numbers[0]).\(numbers[1]); the qemu engine needs \(Self.minimumVersion.0).\(Self.minimumVersion.1) or newer (Debian 12's `qemu-system-x86` is 7.2)", exitStatus: 2)
        }
        return binary
    }

    /// What `auto` means on this host: KVM when /dev/kvm opens for reading and writing.
    public static func resolve(_ accelerator: Accelerator) -> Accelerator {
        guard accelerator == .auto else { return accelerator }
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return .tcg }
        close(fd)
        return .kvm
    }

    /// A value inside a QEMU option list: commas are doubled.
    static func quoted(_ value: String) -> String { value.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,") }

    /// QEMU's command line for a definition (without the binary), descriptor 3 being the lock.
    public static func arguments(_ definition: VMDefinition, bundle: VMBundle, accelerator: Accelerator, cards: [PreparedCard],
                                 cpuModel: String? = nil) -> [String] {
        arguments(definition, bundle: bundle, accelerator: accelerator, cards: cards, cpuModel: cpuModel, files: .byPath)
    }

    /// Hyper-V enlightenments, the set libvirt and Proxmox give Windows guests. Under TCG QEMU
    /// refuses hv-vpindex ("kernel doesn't allow setting HyperV VP_INDEX": it is KVM's to
    /// give), and acts on none of them; the rest are kept so the machine is the same one.
    static func hyperVFlags(_ accelerator: Accelerator) -> String {
        "hv-relaxed,hv-vapic,hv-spinlocks=0x1fff" + (accelerator == .tcg ? "" : ",hv-vpindex") + ",hv-runtime,hv-time,hv-synic,hv-stimer,hv-frequencies,hv-reset"
    }

    /// `enlightened`: false when the host's KVM refused the Hyper-V enlightenments (start's fallback).
    static func arguments(_ definition: VMDefinition, bundle: VMBundle, accelerator: Accelerator, cards: [PreparedCard],
                          cpuModel: String? = nil, enlightened: Bool = true, files: QEMUFiles) -> [String] {
        let accel = accelerator == .tcg ? "tcg" : "kvm"
        let cpu = (cpuModel ?? (accelerator == .tcg ? "max" : "host")) + (definition.hyperV && enlightened ? "," + hyperVFlags(accelerator) : "")
        var arguments = [
            "-name", quoted(definition.name), "-uuid", definition.uuid,
            // KSM only when asked (QEMU's default merges every guest's RAM).
            // Secure Boot's OVMF requires SMM: the variable store is then writable from SMM only.
            "-machine", "q35,accel=\(accel),mem-merge=\(definition.memoryBacking.mergeable ? "on" : "off")" + (definition.secureBoot ? ",smm=on" : ""), "-cpu", cpu,
            "-smp", String(definition.cpus), "-m", "\(definition.memoryBytes >> 20)M",
            "-nodefaults", "-no-user-config", "-msg", "timestamp=on",
            // QEMU's own seccomp filter, as libvirt turns it on (docs/isolation.md).
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-qmp", "unix:\(quoted(bundle.qmpPath)),server=on,wait=off",
            "-display", "none", "-vga", "std", "-vnc", "unix:\(quoted(bundle.vncPath))",
            "-device", "qemu-xhci,id=usb", "-device", "usb-tablet,bus=usb.0",
            "-chardev", "socket,id=serial0,path=\(quoted(bundle.consoleSocketPath)),server=on,wait=off,logfile=\(quoted(bundle.consoleLogPath))",
            "-serial", "chardev:serial0",
            // qemu-guest-agent's port (`vireo exec`): the name its udev rule starts it on.
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", "socket,id=qga0,path=\(quoted(bundle.guestAgentPath)),server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ] + files.arguments
        // Shared folders: a vhost-user-fs device per share on the socket its virtiofsd listens
        // on (ShareServers), and the list the guest's mount script reads (SMBIOS type 11).
        for (index, share) in definition.shares.enumerated() {
            arguments += ["-chardev", "socket,id=fs\(index),path=\(quoted(ShareServers.socketPath(bundle, tag: share.tag)))",
                          "-device", "vhost-user-fs-pci,chardev=fs\(index),tag=\(share.tag),id=share\(index)",
                          "-smbios", "type=11,value=vireo.share=\(share.guestListing)"]
        }
        // The TPM 2.0: QEMU's tpm-emulator on swtpm's control socket (QEMUTPM), a CRB interface
        // as Windows 11 and Linux expect.
        if definition.tpm {
            arguments += ["-chardev", "socket,id=tpm0char,path=\(quoted(QEMUTPM.socketPath(bundle)))",
                          "-tpmdev", "emulator,id=tpm0,chardev=tpm0char", "-device", "tpm-crb,tpmdev=tpm0"]
        }
        if definition.firmware == .uefi {
            if definition.secureBoot { arguments += ["-global", "driver=cfi.pflash01,property=secure,value=on"] }
            arguments += ["-drive", "if=pflash,format=raw,unit=0,readonly=on,file=\(quoted(definition.secureBoot ? FirmwareFiles.uefiSecureCode : FirmwareFiles.uefiCode))",
                          "-drive", "if=pflash,format=raw,unit=1,file=\(quoted(files.name(bundle.resolve(definition.nvram ?? "nvram.fd"))))"
                            + (files.usesDescriptors ? ",file.locking=off" : "")]
        }
        if let boot = definition.directBoot {
            arguments += ["-kernel", bundle.resolve(boot.kernel), "-append", boot.commandLine]
            if let initrd = boot.initrd { arguments += ["-initrd", bundle.resolve(initrd)] }
        }
        // The CD-ROM drive is always there for firmware VMs, so an ISO can be ejected and the
        // drive stays; it boots first while it holds a disc (not during an unattended install,
        // whose installer kernel boots directly and reads the disc as a drive).
        if definition.firmware != nil {
            var drive = "if=none,id=cd0,media=cdrom,readonly=on"
            if let iso = definition.iso { drive += ",file=\(quoted(files.name(iso))),format=raw" + (files.usesDescriptors ? ",file.locking=off" : "") }
            arguments += ["-drive", drive, "-device", "ide-cd,drive=cd0,bus=ide.0,id=cdrom0" + (definition.iso != nil && definition.unattended == nil ? ",bootindex=0" : "")]
        }
        for (index, disk) in definition.disks.enumerated() {
            // The whole chain spelled out, each layer in the format the definition records: QEMU
            // opens nothing a header names and guesses no format (libvirt passes its chains so).
            let chain = bundle.chain(of: disk).map { BackingLayer(path: files.name($0.path), format: $0.format) }
            var status = stat()
            let hostDevice = stat(bundle.resolve(disk.path), &status) == 0 && (status.st_mode & S_IFMT) == S_IFBLK
            var drive = "if=none,id=disk\(index),discard=unmap,file=json:" + quoted(QEMUBlockNode.json(path: files.name(bundle.resolve(disk.path)), format: disk.format,
                                                                                                 chain: chain, readOnly: disk.readOnly,
                                                                                                 locking: !files.usesDescriptors, hostDevice: hostDevice,
                                                                                                 direct: disk.cache == DiskCache.none))
            if disk.readOnly { drive += ",readonly=on" }
            var device: String
            switch definition.diskBus {
            case .virtio: device = "virtio-blk-pci,drive=disk\(index),id=vd\(index)"
            case .sata: device = "ide-hd,drive=disk\(index),bus=ide.\(index + 1),id=vd\(index)"
            }
            if let serial = disk.serial { device += ",serial=\(quoted(serial))" }
            device += ",bootindex=\(index + 1)"
            arguments += ["-drive", drive, "-device", device]
        }
        for (index, card) in cards.enumerated() {
            let model = definition.qemuNICModel
            let netdev: String
            var pairs = 1
            switch card.backend {
            case let .tapName(name):
                pairs = max(1, card.queues ?? 1)
                netdev = "tap,id=net\(index),ifname=\(quoted(name)),script=no,downscript=no" + (pairs > 1 ? ",queues=\(pairs)" : "")
            case let .tapDescriptor(slot, _, queueSlots) where !queueSlots.isEmpty:
                // A multiqueue tap Vireo made: one descriptor per queue, QEMU's `fds=`.
                pairs = 1 + queueSlots.count
                netdev = "tap,id=net\(index),fds=" + ([slot] + queueSlots).map { String(PreparedNetworking.inherited($0)) }.joined(separator: ":")
            case let .tapDescriptor(slot, _, _): netdev = "tap,id=net\(index),fd=\(PreparedNetworking.inherited(slot))"
            case let .streamDescriptor(slot): netdev = "stream,id=net\(index),server=off,addr.type=fd,addr.str=\(PreparedNetworking.inherited(slot))"
            }
            // Multiqueue virtio-net: a control queue, and an MSI-X vector for each queue of each
            // pair plus the configuration's and the control queue's (QEMU's and libvirt's 2N+2).
            let multiqueue = pairs > 1 ? ",mq=on,vectors=\(2 * pairs + 2)" : ""
            arguments += ["-netdev", netdev, "-device", "\(model),netdev=net\(index),mac=\(card.mac)" + multiqueue]
        }
        if definition.balloon { arguments += ["-device", "virtio-balloon-pci,id=balloon0,deflate-on-oom=on"] }
        if definition.entropyDevice { arguments += ["-device", "virtio-rng-pci"] }
        if let generationID = definition.generationID, generationID.count == 32 {
            let hex = Array(generationID)
            let guid = [0..<8, 8..<12, 12..<16, 16..<20, 20..<32].map { String(hex[$0]) }.joined(separator: "-")
            arguments += ["-device", "vmgenid,guid=\(guid)"]
        }
        if definition.onReboot == "exit" { arguments.append("-no-reboot") }
        // --numa-node: QEMU binds the backend's memory itself.
        let numa = definition.memoryBacking.numaNode.map { ",host-nodes=\($0),policy=bind" } ?? ""
        // virtiofsd maps the guest's RAM to reach its buffers: shared folders need shared RAM.
        let sharedRAM = !definition.shares.isEmpty
        if let pages = definition.memoryBacking.hugePages {
            arguments += ["-object", "memory-backend-memfd,id=ram0,size=\(definition.memoryBytes >> 20)M,hugetlb=on,hugetlbsize=\(pages)"
                          + (sharedRAM ? ",share=on" : "") + (definition.memoryBacking.preallocate ? ",prealloc=on" : "") + numa,
                          "-machine", "memory-backend=ram0"]
        } else if let file = definition.memoryBacking.file {
            let share = definition.memoryBacking.shared || sharedRAM ? "on" : "off"
            let backend = file == "memfd" ? "memory-backend-memfd,id=ram0" : "memory-backend-file,id=ram0,mem-path=\(file)"
            arguments += ["-object", backend + ",size=\(definition.memoryBytes >> 20)M,share=\(share)"
                          + (definition.memoryBacking.preallocate ? ",prealloc=on" : "") + numa,
                          "-machine", "memory-backend=ram0"]
        } else if sharedRAM {
            arguments += ["-object", "memory-backend-memfd,id=ram0,size=\(definition.memoryBytes >> 20)M,share=on"
                          + (definition.memoryBacking.preallocate ? ",prealloc=on" : "") + numa,
                          "-machine", "memory-backend=ram0"]
        } else if !numa.isEmpty {
            arguments += ["-object", "memory-backend-ram,id=ram0,size=\(definition.memoryBytes >> 20)M"
                          + (definition.memoryBacking.preallocate ? ",prealloc=on" : "") + numa,
                          "-machine", "memory-backend=ram0"]
        } else if definition.memoryBacking.preallocate {
            arguments.append("-mem-prealloc")
        }
        if definition.memoryBacking.locked { arguments += ["-overcommit", "mem-lock=on"] }
        return arguments
    }

    public func start(_ vm: EngineVM, lock: VMLock, networking: PreparedNetworking) throws(LibraryError) -> StartedVM {
        let (bundle, definition, name) = (vm.bundle, vm.definition, vm.name)
        let binary = try checkedBinary(for: name)
        if definition.resources.rtPriority != nil {
            throw .invalidValue(field: "rt_priority", reason: "real-time vCPUs are built for the kvm engine only; `vireo set \(name) --rt-priority none`, or --engine kvm")
        }
        if let firmware = definition.firmware { try FirmwareFiles.check(firmware, secureBoot: definition.secureBoot) }
        if let network = definition.disks.first(where: \.isNetwork) {
            throw .invalidValue(field: "engine", reason: "VM '\(name)' has the network disk \(network.path.prefix(300)), which only the kvm engine connects to; `vireo set \(name) --engine kvm`, or detach it")
        }
        if let iso = definition.iso {
            do { _ = try InstallMedium.inspect(iso) } catch {
                throw .engine(name: name, reason: "its ISO cannot be used: \(error.description); eject it with `vireo set \(name) --iso none` or give another with --iso", exitStatus: 2)
            }
        }
        for path in [bundle.qmpPath, bundle.vncPath, bundle.consoleSocketPath, bundle.consoleLogPath] where path.utf8.count >= 108 {
            throw .engine(name: name, reason: "\(path) is longer than a Unix socket path may be (107 bytes); use a shorter library path ($VIREO_HOME) or VM name", exitStatus: 2)
        }
        let accelerator = Self.resolve(definition.accelerator)
        var warnings: [String] = []
        if accelerator == .tcg {
            warnings.append(definition.accelerator == .tcg
                ? "VM '\(name)' runs under TCG, QEMU's software emulation, as configured: many times slower than KVM"
                : "VM '\(name)' runs under TCG, QEMU's software emulation, because /dev/kvm cannot be opened: many times slower than KVM")
        }
        if HostFiles.size(bundle.consoleLogPath) > 0 { _ = rename(bundle.consoleLogPath, bundle.consoleLogPath + ".1") }
        // A saved VM resumes from its state: QEMU reads it as an incoming migration from the
        // inherited file (docs/snapshots.md), and the file is consumed once the VM runs.
        var incoming: [String] = []
        var stateDescriptor: Int32 = -1
        if bundle.hasSavedState {
            stateDescriptor = open(bundle.savedStatePath, O_RDONLY | O_CLOEXEC)
            guard stateDescriptor >= 0 else { throw .io(operation: "open", path: bundle.savedStatePath, errno: errno) }
            incoming = ["-incoming", "fd:\(PreparedNetworking.inherited(networking.descriptors.count))"]
        }
        defer { if stateDescriptor >= 0 { close(stateDescriptor) } }
        // The jail (docs/isolation.md): only root can build it; without root QEMU runs as the user.
        var jail: QEMUJail?
        defer { if let jail { close(jail.identity.descriptor) } }
        var disabled: [String] = []
        if !vm.isolation.jail { disabled.append("no-jail") } else if geteuid() != 0 { disabled.append("not-root") }
        if vm.isolation.jail && geteuid() == 0 { jail = try QEMUJail(vm) } else { try bundle.prepareVMMDirectory() }
        var extra = stateDescriptor >= 0 ? [stateDescriptor] : []
        let files = try QEMUFiles(opening: definition, bundle: bundle, firstSlot: networking.descriptors.count + extra.count)
        defer { files.close() }
        extra += files.descriptors
        // Held by QEMU for its whole life, so its uid stays its own; never named.
        if let jail { extra.append(jail.identity.descriptor) }
        // Their servers listen before QEMU connects; they end with QEMU's connection, or here if
        // QEMU does not start.
        let qemuOwner = jail.map { ($0.identity.uid, $0.identity.gid) }
        var shareServers = try ShareServers.start(vm, clientOwner: qemuOwner)
        var tpm = QEMUTPM()
        var started = false
        defer {
            if started { shareServers.releaseIdentity() } else { shareServers.stop(); tpm.stop() }
        }
        tpm = try QEMUTPM.start(vm, jail: jail)
        func arguments(cpuModel: String?, enlightened: Bool) -> [String] {
            Self.arguments(definition, bundle: bundle, accelerator: accelerator, cards: networking.cards, cpuModel: cpuModel,
                           enlightened: enlightened, files: files) + incoming
        }
        func recordIsolation() {
            var record = jail?.record ?? IsolationRecord()
            if jail == nil { record.seccomp = "qemu" }
            record.disabled = disabled
            try? HostFiles.writeAtomically(Array((record.line + "\n").utf8), to: bundle.isolationPath)
        }
        // Some hosts' KVM (nested ones, this project's CI) refuse what QEMU asks of them, and
        // QEMU aborts: the ARCH_CAPABILITIES MSR that `-cpu host` sets (the guest then assumes
        // its CPU vulnerable and enables mitigations), or the Hyper-V enlightenments' MSRs (a
        // Windows guest then runs without them, slower). Each is dropped once, with a warning,
        // which beats not starting. A failed QEMU's share servers and TPM ended with it: new
        // ones serve the next.
        var cpuModel: String?
        var enlightened = true
        var attempt = 0
        while true {
            attempt += 1
            do {
                let pid = try launch(binary, arguments(cpuModel: cpuModel, enlightened: enlightened), vm: vm, lock: lock, networking: networking,
                                     extraDescriptors: extra, jail: jail)
                started = true
                DetachedChildren.adopt(pid)
                DetachedChildren.adopt(tpm.pid)
                recordIsolation()
                if stateDescriptor >= 0 { unlink(bundle.savedStatePath) }
                return StartedVM(pid: pid, warnings: warnings)
            } catch let .engine(_, reason, status) where accelerator != .tcg && attempt < 3 {
                if cpuModel == nil, reason.contains("MSR 0x10a") {
                    cpuModel = "host,-arch-capabilities"
                    warnings.append("this host's KVM refuses the ARCH_CAPABILITIES MSR; VM '\(name)' runs with `-cpu host,-arch-capabilities`")
                } else if definition.hyperV, enlightened, reason.contains("HyperV") || reason.contains("MSR 0x4000") {
                    enlightened = false
                    warnings.append("this host's KVM cannot give VM '\(name)' Hyper-V enlightenments; it runs without them (slower for Windows; `vireo set \(name) --no-hyperv` stops asking)")
                } else {
                    throw LibraryError.engine(name: name, reason: reason, exitStatus: status)
                }
                shareServers.stop()
                tpm.stop()
                shareServers = try ShareServers.start(vm, clientOwner: qemuOwner)
                tpm = try QEMUTPM.start(vm, jail: jail)
            }
        }
    }

    /// Runs QEMU detached, holding the lock, and returns its pid once QMP says the machine runs.
    func launch(_ binary: String, _ machine: [String], vm: EngineVM, lock: VMLock, networking: PreparedNetworking,
                extraDescriptors: [Int32] = [], jail: QEMUJail? = nil) throws(LibraryError) -> pid_t {
        let (bundle, name) = (vm.bundle, vm.name)
        let arguments = [binary] + machine
        // Sockets of a run that was killed would make QEMU's bind fail.
        for path in [bundle.qmpPath, bundle.vncPath, bundle.consoleSocketPath] { unlink(path) }
        let log = open(bundle.vmmLogPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard log >= 0 else { throw .io(operation: "open", path: bundle.vmmLogPath, errno: errno) }
        defer { close(log) }
        let logStart = lseek(log, 0, SEEK_END)
        var header = Array("vireo: starting \(arguments.joined(separator: " "))\n".utf8)
        _ = header.withUnsafeMutableBytes { write(log, $0.baseAddress, $0.count) }

        let groups = try VMControlGroups.prepare(vm.definition, bundle: bundle)
        var pid: pid_t = 0
        let inherit = networking.descriptors + extraDescriptors
        if let jail {
            // QEMU joins its groups before it execs: a memory limit covers everything it touches.
            let processFiles = groups?.processFiles ?? []
            do throws(LibraryError) {
                pid = try jail.spawn(binary, arguments, log: log, lock: lock.fd, inherit: inherit, cgroupFiles: processFiles)
            } catch let .engine(_, reason, status) {
                throw .engine(name: name, reason: reason, exitStatus: status)
            }
        } else {
            let spawned = withCStrings(arguments) { argv in
                inherit.withUnsafeBufferPointer {
                    vireo_spawn_detached_inheriting(binary, argv, log, lock.fd, -1, $0.baseAddress, Int32($0.count), &pid)
                }
            }
            guard spawned == 0 else {
                throw .engine(name: name, reason: "cannot run \(binary): \(String(cString: strerror(spawned)))", exitStatus: 1)
            }
        }
        // A jailed QEMU joined its groups before it exec'd; an unjailed one is moved in now.
        if jail == nil { try groups?.enter(pid, name: name) }
        try? HostFiles.writeAtomically(Array("\(pid)\n".utf8), to: bundle.pidPath)

        // Ready once QMP answers and the machine runs; a QEMU that exits first explains why in
        // its log.
        let deadline = time(nil) + 60
        while true {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                let reason = Self.logTail(bundle.vmmLogPath, from: Int64(logStart) + Int64(header.count))
                throw .engine(name: name, reason: "QEMU exited before the VM ran: \(reason.isEmpty ? "no message" : reason) (full log: \(bundle.vmmLogPath))",
                              exitStatus: 1)
            }
            if let connection = try? QMPConnection(path: bundle.qmpPath, timeoutSeconds: 5),
               let state = try? connection.execute("query-status", as: QMPReplies.Status.self),
               state.status == "running" || state.status == "paused" {
                return pid
            }
            if time(nil) > deadline {
                kill(pid, SIGKILL)
                waitpid(pid, &status, 0)
                throw .engine(name: name, reason: "QEMU did not answer on \(bundle.qmpPath) within 60 s and was killed; see \(bundle.vmmLogPath)", exitStatus: 1)
            }
            usleep(20_000)
        }
    }

    /// QEMU's own words from its log, after this run's header line.
    static func logTail(_ path: String, from offset: Int64) -> String {
        guard let bytes = try? HostFiles.readAll(path), Int64(bytes.count) > offset else { return "" }
        let text = String(decoding: bytes[Int(max(offset, 0))...].suffix(2000), as: UTF8.self)
        return text.split(separator: "\n").suffix(4).joined(separator: "; ")
    }

    // MARK: QMP requests

    func connect(_ vm: EngineVM, action: String, timeoutSeconds: Int = 10) throws(LibraryError) -> QMPConnection {
        do { return try QMPConnection(path: vm.bundle.qmpPath, timeoutSeconds: timeoutSeconds) } catch {
            if case let .unreachable(.unreachable(_, code)) = error, let conflict = EngineRefusal.notAnswering(vm, action: action, errno: code) { throw conflict }
            throw .engine(name: vm.name, reason: "cannot \(action) it: QEMU does not answer on \(vm.bundle.qmpPath): \(error)", exitStatus: 1)
        }
    }

    /// A command that returns nothing, refusals turned into the library's errors.
    func run(_ vm: EngineVM, _ command: String, action: String) throws(LibraryError) {
        try run(vm, command, arguments: Optional<QMPConnection.Empty>.none, action: action)
    }

    func run<Arguments: Encodable>(_ vm: EngineVM, _ command: String, arguments: Arguments?, action: String) throws(LibraryError) {
        let connection = try connect(vm, action: action)
        do { _ = try connection.execute(command, arguments: arguments) } catch {
            throw .engine(name: vm.name, reason: "cannot \(action) it: \(error)", exitStatus: 1)
        }
    }

    func status(_ vm: EngineVM, action: String) throws(LibraryError) -> String {
        let connection = try connect(vm, action: action)
        do { return try connection.execute("query-status", as: QMPReplies.Status.self).status } catch {
            throw .engine(name: vm.name, reason: "cannot \(action) it: \(error)", exitStatus: 1)
        }
    }

    /// QEMU's run states in Vireo's words.
    static func state(_ status: String) -> String {
        switch status {
        case "running", "debug": return "running"
        case "paused", "suspended", "save-vm", "restore-vm", "io-error", "watchdog", "guest-panicked", "internal-error": return "paused"
        case "shutdown": return "stopping"
        case "prelaunch", "inmigrate", "postmigrate", "finish-migrate": return "starting"
        default: return "running"
        }
    }

    public func describe(_ vm: EngineVM) -> VMDescription? {
        guard let connection = try? QMPConnection(path: vm.bundle.qmpPath, timeoutSeconds: 2),
              let status = try? connection.execute("query-status", as: QMPReplies.Status.self) else { return nil }
        let kvm = try? connection.execute("query-kvm", as: QMPReplies.KVM.self)
        let pid = vm.bundle.recordedPID(uuid: vm.definition.uuid) ?? 0
        let uptime = pid > 0 ? ProcessFacts.uptimeMilliseconds(pid) : 0
        return VMDescription(name: vm.definition.name, uuid: vm.definition.uuid, pid: pid, state: Self.state(status.status),
                             cpus: vm.definition.cpus, memoryBytes: vm.definition.memoryBytes,
                             startedAt: UInt64(time(nil)) - uptime / 1000, uptimeMs: uptime, acpi: true,
                             engine: "qemu", accelerator: kvm.map { $0.enabled ? "kvm" : "tcg" })
    }

    public func counters(_ vm: EngineVM) throws(LibraryError) -> VMCounters {
        let connection = try connect(vm, action: "read the counters of")
        let blocks: [QMPReplies.BlockStats]
        do { blocks = try connection.execute("query-blockstats", as: [QMPReplies.BlockStats].self) } catch {
            throw .engine(name: vm.name, reason: "cannot read the counters: \(error)", exitStatus: 1)
        }
        let disks = vm.definition.disks.enumerated().compactMap { index, disk -> VMCounters.Disk? in
            guard let entry = blocks.first(where: { $0.device == "disk\(index)" }) else { return nil }
            return VMCounters.Disk(path: vm.bundle.resolve(disk.path), requests: entry.stats.rd_operations + entry.stats.wr_operations,
                                   readBytes: entry.stats.rd_bytes, writtenBytes: entry.stats.wr_bytes)
        }
        // The tap's counters, turned round: what the host sends is what the guest receives.
        // passt's stream has no host interface to count on: it shows zeros.
        let networks = vm.definition.networks.enumerated().map { index, card in
            let interface = HostNetworks.hostInterface(of: vm.definition, card: index, libraryRoot: HostFiles.parent(of: vm.bundle.directory)) ?? "passt"
            let value = { (name: String) in ProcessFacts.number("/sys/class/net/\(interface)/statistics/\(name)") }
            return VMCounters.Network(tap: interface, mac: card.mac, rxFrames: value("tx_packets"), rxBytes: value("tx_bytes"),
                                      txFrames: value("rx_packets"), txBytes: value("rx_bytes"), droppedFrames: value("tx_dropped"))
        }
        var balloon: VMCounters.Balloon?
        if vm.definition.balloon, let reply = try? connection.execute("query-balloon", as: QMPReplies.Balloon.self) {
            let held = vm.definition.memoryBytes > reply.actual ? vm.definition.memoryBytes - reply.actual : 0
            balloon = VMCounters.Balloon(targetBytes: held, actualBytes: held, inflatedPages: 0, deflatedPages: 0, statistics: [:])
        }
        let pid = vm.bundle.recordedPID(uuid: vm.definition.uuid) ?? 0
        return VMCounters(uptimeMs: pid > 0 ? ProcessFacts.uptimeMilliseconds(pid) : 0, vcpuExits: [],
                          rssBytes: pid > 0 ? ProcessFacts.residentBytes(pid) : 0, disks: disks, networks: networks,
                          balloon: balloon, entropyBytes: nil)
    }

    public func requestShutdown(_ vm: EngineVM) throws(LibraryError) {
        if try status(vm, action: "shut down") == "paused" {
            throw .wrongState(name: vm.name, state: "paused", action: "shut down",
                              hint: "resume it first (`vireo resume \(vm.name)`) or power it off (`vireo stop \(vm.name) --force`)")
        }
        try run(vm, "system_powerdown", action: "shut down")
    }

    public func powerOff(_ vm: EngineVM) throws(LibraryError) { try run(vm, "quit", action: "power off") }

    public func pause(_ vm: EngineVM) throws(LibraryError) {
        if try status(vm, action: "pause") == "paused" {
            throw .wrongState(name: vm.name, state: "paused", action: "pause", hint: "`vireo resume \(vm.name)` continues it")
        }
        try run(vm, "stop", action: "pause")
    }

    public func resume(_ vm: EngineVM) throws(LibraryError) {
        guard try status(vm, action: "resume") == "paused" else {
            throw .wrongState(name: vm.name, state: "running", action: "resume", hint: "only a paused VM can be resumed")
        }
        try run(vm, "cont", action: "resume")
    }

    public func reset(_ vm: EngineVM) throws(LibraryError) { try run(vm, "system_reset", action: "reset") }

    /// QEMU names its vCPU threads only with debug-threads; QMP says which thread is which.
    public func vcpuThreads(_ vm: EngineVM, pid: pid_t) -> [Int: pid_t] {
        struct CPU: Decodable {
            var index: Int
            var thread: Int32
            enum CodingKeys: String, CodingKey { case index = "cpu-index", thread = "thread-id" }
        }
        guard let connection = try? connect(vm, action: "pin"),
              let cpus = try? connection.execute("query-cpus-fast", as: [CPU].self) else { return [:] }
        // A jailed QEMU reports thread ids of its own PID namespace; the host's are in NSpid.
        let hostIDs = Self.hostThreadIDs(pid)
        return Dictionary(cpus.map { ($0.index, hostIDs[$0.thread] ?? $0.thread) }, uniquingKeysWith: { first, _ in first })
    }

    /// Thread ids as `pid`'s own PID namespace numbers them, to the host's.
    static func hostThreadIDs(_ pid: pid_t) -> [pid_t: pid_t] {
        var map: [pid_t: pid_t] = [:]
        for task in (try? HostFiles.entries(of: "/proc/\(pid)/task")) ?? [] {
            guard let status = HostFiles.readSmall("/proc/\(pid)/task/\(task)/status"),
                  let line = status.split(separator: "\n").first(where: { $0.hasPrefix("NSpid:") }) else { continue }
            let ids = line.dropFirst(6).split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { pid_t($0) }
            if let host = ids.first, let inner = ids.last { map[inner] = host }
        }
        return map
    }

    // MARK: saved states and live snapshots (QEMU's own migration to a file)

    /// `vireo save`: QEMU migrates its state into the VM's saved-state file (written aside,
    /// fsynced, renamed), which leaves it stopped with its disks flushed; then it quits.
    /// `start` resumes it with `-incoming fd:`.
    public func saveState(_ vm: EngineVM) throws(LibraryError) {
        if let share = vm.definition.shares.first {
            throw .engine(name: vm.name, reason: "it shares \(share.path) ('\(share.tag)') over virtio-fs, whose state QEMU cannot save (virtiofsd keeps the guest's open files); shut it down (`vireo stop \(vm.name)`), or remove its shared folders while it is stopped", exitStatus: 2)
        }
        let connection = try connect(vm, action: "save", timeoutSeconds: 600)
        try vm.bundle.prepareVMMDirectory()
        try writeState(vm, connection, to: vm.bundle.savedStatePath, action: "save")
        do { _ = try connection.execute("quit") } catch {
            throw .engine(name: vm.name, reason: "its state is saved, but QEMU would not quit: \(error); `vireo stop \(vm.name) --force` ends it", exitStatus: 1)
        }
    }

    /// A live snapshot: QEMU migrates its state into the snapshot's directory, ending stopped;
    /// then one QMP transaction moves every writable disk onto the overlay the library prepared
    /// (all or none), and the guest runs on. A failure before the move leaves it as it was.
    public func snapshot(_ vm: EngineVM, id: String) throws(LibraryError) -> String? {
        let bundle = vm.bundle
        // The library has moved the definition onto the overlays already; the running QEMU still
        // writes the images in `vm.definition`.
        let moved = try bundle.load()
        var actions: [QMPReplies.TransactionAction] = []
        for (index, disk) in vm.definition.disks.enumerated() where index < moved.disks.count && moved.disks[index].path != disk.path {
            actions.append(.init(type: "blockdev-snapshot-sync",
                                 data: .init(device: "disk\(index)", snapshotFile: bundle.resolve(moved.disks[index].path), format: "qcow2", mode: "existing")))
        }
        let connection = try connect(vm, action: "snapshot", timeoutSeconds: 600)
        if !vm.definition.shares.isEmpty {
            // QEMU cannot save a virtio-fs device's state: the disks move (all at once, as a
            // power cut would find them) and the snapshot holds no memory, as libvirt's
            // disk-only snapshots.
            // The guest's agent freezes its file systems around the switch, so what is on the
            // disks is what its applications last wrote, as libvirt's --quiesce.
            var moveError: LibraryError?
            let consistency = Self.withFrozenFileSystems(vm, qmp: connection) {
                guard !actions.isEmpty else { return }
                do { _ = try connection.execute("transaction", arguments: QMPReplies.Transaction(actions: actions)) } catch {
                    moveError = .engine(name: vm.name, reason: "cannot move its disks onto the snapshot's overlays (none moved): \(error)", exitStatus: 1)
                }
            }
            if let moveError { throw moveError }
            return "QEMU cannot save the state of its shared folders (virtio-fs); " + consistency
        }
        // Not stopped first: QEMU records the run state the migration starts in, and a restore
        // brings the guest back in it (a paused guest's snapshot restores paused). QEMU stops the
        // guest itself for the migration's last pass, and the disks move while it is stopped.
        let wasRunning: Bool
        do {
            wasRunning = try connection.execute("query-status", as: QMPReplies.Status.self).running
        } catch {
            throw .engine(name: vm.name, reason: "cannot snapshot it: \(error)", exitStatus: 1)
        }
        var failure: LibraryError?
        do throws(LibraryError) {
            try writeState(vm, connection, to: bundle.snapshotStatePath(id), action: "snapshot")
            if !actions.isEmpty {
                do { _ = try connection.execute("transaction", arguments: QMPReplies.Transaction(actions: actions)) } catch {
                    unlink(bundle.snapshotStatePath(id))
                    throw LibraryError.engine(name: vm.name, reason: "cannot move its disks onto the snapshot's overlays (none moved): \(error)", exitStatus: 1)
                }
            }
        } catch {
            failure = error
        }
        // After a migration to a file QEMU is in "postmigrate" with its disks let go: `cont`
        // takes them back, and a guest the user had paused is paused again.
        do {
            _ = try connection.execute("cont")
            if !wasRunning { _ = try connection.execute("stop") }
        } catch {
            failure = failure ?? .engine(name: vm.name, reason: "the snapshot is taken, but the guest would not run on: \(error)", exitStatus: 1)
        }
        if let failure { throw failure }
        return nil
    }

    /// QEMU's migration into a file: `getfd` hands it the descriptor, `migrate fd:` writes, and
    /// `query-migrate` is polled to the end. The file is complete and synced before it is renamed
    /// to `path`; on failure nothing is left at `path`.
    func writeState(_ vm: EngineVM, _ connection: QMPConnection, to path: String, action: String) throws(LibraryError) {
        let partial = path + ".partial"
        unlink(partial)
        let fd = open(partial, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .io(operation: "create", path: partial, errno: errno) }
        var complete = false
        defer {
            close(fd)
            if !complete { unlink(partial) }
        }
        do {
            _ = try connection.execute("getfd", arguments: ["fdname": "vireo-state"], passing: fd)
            _ = try connection.execute("migrate", arguments: ["uri": "fd:vireo-state"])
        } catch {
            throw .engine(name: vm.name, reason: "cannot \(action) it: QEMU refused to write its state: \(error)", exitStatus: 1)
        }
        let deadline = time(nil) + 600
        while true {
            let progress: QMPReplies.Migration
            do { progress = try connection.execute("query-migrate", as: QMPReplies.Migration.self) } catch {
                throw .engine(name: vm.name, reason: "cannot \(action) it: \(error)", exitStatus: 1)
            }
            if progress.status == "completed" { break }
            if progress.status == "failed" || progress.status == "cancelled" {
                throw .engine(name: vm.name, reason: "cannot \(action) it: QEMU's state could not be written: \(progress.errorDescription ?? progress.status ?? "failed"); it runs on", exitStatus: 1)
            }
            if time(nil) > deadline {
                _ = try? connection.execute("migrate_cancel")
                throw .engine(name: vm.name, reason: "cannot \(action) it: writing its state took more than 600 s and was cancelled; it runs on", exitStatus: 1)
            }
            usleep(10_000)
        }
        guard fsync(fd) == 0 else { throw .io(operation: "fsync", path: partial, errno: errno) }
        guard rename(partial, path) == 0 else { throw .io(operation: "rename to \(path)", path: partial, errno: errno) }
        complete = true
        HostFiles.syncDirectory(of: path)
    }

    public func setBalloon(_ vm: EngineVM, bytes: UInt64) throws(LibraryError) {
        guard vm.definition.balloon else {
            throw .wrongState(name: vm.name, state: "without a balloon device", action: "set the balloon of",
                              hint: "stop it and add one with `vireo set \(vm.name) --balloon`")
        }
        struct Target: Encodable { var value: UInt64 }
        // QEMU's balloon takes the memory the guest keeps, not the balloon's size.
        try run(vm, "balloon", arguments: Target(value: vm.definition.memoryBytes - min(bytes, vm.definition.memoryBytes)),
                action: "set the balloon of")
    }

    public func openConsole(_ vm: EngineVM) throws(LibraryError) -> ConsoleStream {
        do {
            let fd = try ControlConnection.connectUnix(path: vm.bundle.consoleSocketPath, timeoutSeconds: 0)
            return ConsoleStream(fd: fd, early: [], owner: nil)
        } catch {
            throw .engine(name: vm.name, reason: "cannot attach to its console: \(error)", exitStatus: 1)
        }
    }

    public func display(_ vm: EngineVM) throws(LibraryError) -> DisplayAccess { DisplayAccess(vncSocket: vm.bundle.vncPath) }

    /// QEMU writes the picture into the VM's own directory (the only place a jailed QEMU can
    /// write, and never a path someone else chose as root); it is then copied to `path`.
    public func screenshot(_ vm: EngineVM, to path: String) throws(LibraryError) {
        struct Arguments: Encodable { var filename: String; var format: String }
        let scratch = vm.bundle.vmmDirectory + "/screen-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).png"
        unlink(scratch)
        defer { unlink(scratch) }
        try run(vm, "screendump", arguments: Arguments(filename: scratch, format: "png"), action: "take a screenshot of")
        let bytes = try HostFiles.readAll(scratch)
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .io(operation: "create", path: path, errno: errno) }
        defer { close(fd) }
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count else { throw .io(operation: "write", path: path, errno: errno) }
    }

    public func sendKeys(_ vm: EngineVM, _ chords: [KeyChord]) throws(LibraryError) {
        struct Key: Encodable { var type = "qcode"; var data: String }
        struct Arguments: Encodable {
            var keys: [Key]
            var holdTime: Int
            enum CodingKeys: String, CodingKey { case keys, holdTime = "hold-time" }
        }
        let connection = try connect(vm, action: "send keys to")
        for chord in chords {
            do {
                _ = try connection.execute("send-key", arguments: Arguments(keys: chord.keys.map { Key(data: $0) }, holdTime: 50))
            } catch {
                throw .engine(name: vm.name, reason: "cannot send \(chord.keys.joined(separator: "-")): \(error)", exitStatus: 1)
            }
            // Keys typed faster than a guest polls its keyboard get lost (firmware menus, installers).
            usleep(30_000)
        }
    }

    public func ejectMedium(_ vm: EngineVM) throws(LibraryError) {
        struct Arguments: Encodable { var id: String; var force: Bool }
        try run(vm, "eject", arguments: Arguments(id: "cdrom0", force: true), action: "eject the CD-ROM of")
    }
}

/// Facts about a process and the host from /proc and /sys.
enum ProcessFacts {
    static func number(_ path: String) -> UInt64 {
        guard let bytes = try? HostFiles.readAll(path) else { return 0 }
        return UInt64(String(decoding: bytes.filter { $0 >= 0x30 && $0 <= 0x39 }, as: UTF8.self)) ?? 0
    }

    static func residentBytes(_ pid: pid_t) -> UInt64 {
        guard let bytes = try? HostFiles.readAll("/proc/\(pid)/statm") else { return 0 }
        let fields = String(decoding: bytes, as: UTF8.self).split(separator: " ")
        guard fields.count > 1, let pages = UInt64(fields[1]) else { return 0 }
        return pages * UInt64(sysconf(Int32(_SC_PAGESIZE)))
    }

    /// How long the process has run: its start (field 22 of /proc/PID/stat, in clock ticks since
    /// boot) against the system's uptime.
    static func uptimeMilliseconds(_ pid: pid_t) -> UInt64 {
        guard let stat = try? HostFiles.readAll("/proc/\(pid)/stat"), let uptime = try? HostFiles.readAll("/proc/uptime") else { return 0 }
        let text = String(decoding: stat, as: UTF8.self)
        // The command name (field 2) may hold spaces; the fields after its ')' do not.
        guard let close = text.lastIndex(of: ")") else { return 0 }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 19, let started = Double(fields[19]),
              let now = Double(String(decoding: uptime, as: UTF8.self).split(separator: " ").first ?? "") else { return 0 }
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        return UInt64(max(0, now - started / ticks) * 1000)
    }
}

