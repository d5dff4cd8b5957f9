import API
import ArgumentParser
import DiskImage
import Engines
import Library
import MachineSpec
import VMM

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show everything about a VM: configuration, files and, when it runs, its process and counters.")

    @Argument(help: "VM name.")
    var name: String

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let report: VMReport
        do throws(LibraryError) {
            report = try openManager().report(of: name)
        } catch {
            throw fail(error)
        }
        if json { try printJSON(report); return }
        var lines: [[String]] = [
            ["Name:", report.name], ["UUID:", report.uuid],
            ["State:", report.crashReason.map { "\(report.state): \($0)" } ?? report.state], ["OS type:", report.osType],
            ["CPUs:", String(report.cpus) + (report.cpuModel == "host" ? "" : " (\(report.cpuModel))")], ["Memory:", Size.describe(report.memoryBytes)],
            ["Engine:", report.engine == "qemu" ? "qemu (QEMU q35 machine, controlled over QMP)" : "kvm (vireo-vmm)"],
        ]
        if report.engine == "qemu" {
            var acceleration = report.accelerator
            if let running = report.runningAccelerator { acceleration += " (running: \(running)\(running == "tcg" ? ", software emulation: slow" : ""))" }
            lines.append(["Firmware:", report.firmware ?? "none (direct kernel boot)"])
            if report.firmware != nil { lines.append(["CD-ROM:", report.iso ?? "(empty)"]) }
            lines += [["Acceleration:", acceleration], ["Disk bus:", report.diskBus == "sata" ? "SATA (AHCI), \(report.nicModel ?? "e1000") network" : "virtio"]]
        }
        if let saved = report.savedState {
            lines.append(["Saved state:", "\(saved) (`vireo start \(report.name)` resumes; --discard-state boots afresh)"])
        }
        if report.snapshots > 0 {
            lines.append(["Snapshots:", "\(report.snapshots), current: \(report.currentSnapshot ?? "none") (`vireo snapshot list \(report.name)`)"])
        }
        if let image = report.image { lines.append(["Image:", image]) }
        if let user = report.cloudInitUser {
            lines.append(["cloud-init:", "user \(user), host name \(report.hostname ?? "-") (`vireo ssh \(report.name)`)"])
        }
        if report.kernel != nil || report.engine == "kvm" {
            lines += [["Kernel:", report.kernel ?? "(none)"], ["Initrd:", report.initrd ?? "(none)"], ["Command line:", report.commandLine]]
        }
        lines += [
            ["virtio-rng:", report.entropyDevice ? "on" : "off"],
            ["Platform:", report.engine == "qemu" ? "ACPI (QEMU's q35)" : report.acpi ? "ACPI (power button, reset register, devices in the DSDT)" : "MP table, devices on the command line (no ACPI)"],
            ["On reboot:", report.onReboot == "restart" ? "restart in place" : "stop the VM"],
            ["Generation ID:", report.generationId ?? "(new on every start)"],
        ]
        let limits = report.resources
        var limitText: [String] = []
        if let cap = limits.cpuCapPercent { limitText.append("CPU cap \(cap)%") }
        if let weight = limits.cpuWeight { limitText.append("CPU weight \(weight)") }
        if let memory = limits.memoryLimitBytes { limitText.append("memory limit \(Size.describe(memory))") }
        if let pids = limits.pidsLimit { limitText.append("at most \(pids) processes/threads") }
        if let pins = limits.vcpuPins { limitText.append("pinned " + pins.map(\.description).joined(separator: ",")) }
        if let emulator = limits.emulatorCpus { limitText.append("emulator on CPUs " + emulator.map(String.init).joined(separator: ",")) }
        if let priority = limits.rtPriority { limitText.append("real-time vCPUs (SCHED_FIFO \(priority))") }
        if let io = limits.ioLimits { limitText.append("I/O " + io.description) }
        lines.append(["Limits:", limitText.isEmpty ? "none" : limitText.joined(separator: ", ")])
        let backing = report.memoryBacking
        var backingText = [backing.hugePages.map { "\($0) huge pages" }
                           ?? backing.file.map { ($0 == "memfd" ? "a memfd" : "file \($0)") + (backing.shared ? ", shared" : ", private") }
                           ?? (backing.transparentHugePages && !backing.mergeable ? "ordinary pages, offered to transparent huge pages" : "ordinary 4 KiB pages")]
        if backing.preallocate { backingText.append("preallocated") }
        if backing.mergeable { backingText.append("offered to KSM") }
        if backing.locked { backingText.append("locked in RAM") }
        if let node = backing.numaNode { backingText.append("bound to host NUMA node \(node)") }
        lines.append(["Memory backing:", backingText.joined(separator: ", ")])
        if let groups = limits.cgroups {
            var text = groups.keys.sorted().map { "\($0) \(groups[$0] ?? "")" }.joined(separator: ", ")
            if let cpu = limits.cpuNanoseconds { text += "; CPU used \(cpu / 1_000_000) ms" }
            if let memory = limits.memoryBytes { text += ", memory charged \(Size.describe(memory))" }
            lines.append(["Control groups:", text])
        } else if report.process != nil {
            lines.append(["Control groups:", "none (this host gives Vireo none: not root, or no cgroup controllers)"])
        }
        if let isolation = report.isolation {
            var jail: String
            if let uid = isolation.uid {
                jail = "namespaces \(isolation.namespaces.joined(separator: ",")); uid \(uid) gid \(isolation.gid.map(String.init) ?? "-"); root holds only the VM's files"
            } else if isolation.disabled.contains("no-jail") {
                jail = "off (started with --no-jail)"
            } else {
                jail = "off (vireo was not run as root; the jail needs root)"
            }
            if isolation.noNewPrivileges == true { jail += "; no_new_privs" }
            lines.append(["Jail:", jail])
            let seccomp: String
            switch isolation.seccomp {
            case "on": seccomp = "filter per thread kind (vcpu, device, control, main); a forbidden call ends the VMM"
            case "log": seccomp = "log only (VIREO_SECCOMP=log): forbidden calls are allowed and logged by the kernel"
            case "qemu": seccomp = "QEMU's own -sandbox (obsolete, elevateprivileges, spawn, resourcecontrol denied)"
            default: seccomp = isolation.disabled.contains("no-seccomp") ? "off (started with --no-seccomp)" : "off"
            }
            lines.append(["Seccomp:", seccomp + (isolation.kernelSeccompMode.map { " [kernel: mode \($0)]" } ?? "")])
            let landlock: String
            switch isolation.landlock {
            case "off": landlock = "off"
            case "unavailable": landlock = "not available on this kernel"
            default: landlock = "on (ABI \(isolation.landlock.dropFirst(3))): file access limited to the VM's files"
            }
            lines.append(["Landlock:", landlock])
            lines.append(["AppArmor:", isolation.appArmor])
        } else if let process = report.process, report.engine == "qemu" {
            lines.append(["Jail:", "none: the qemu engine's process is not jailed by Vireo (QEMU runs as started)"])
            let mode = (try? HostFiles.readAll("/proc/\(process.pid)/status")).flatMap { bytes in
                String(decoding: bytes, as: UTF8.self).split(separator: "\n").first { $0.hasPrefix("Seccomp:") }?.filter(\.isNumber)
            }
            lines.append(["Seccomp:", "QEMU's own -sandbox (obsolete, elevateprivileges, spawn, resourcecontrol denied)" + (mode.map { " [kernel: mode \($0)]" } ?? "")])
        }
        for (index, disk) in report.disks.enumerated() {
            var text: String
            if let paths = disk.networkPaths {
                text = "\(disk.path) (\(disk.format), \(NetworkDisk.kind(of: disk.path)?.rawValue ?? "network disk"), \(paths.count) path\(paths.count == 1 ? "" : "s")"
            } else {
                text = "\(disk.path) (\(disk.format), \(disk.virtualBytes.map(Size.describe) ?? "unreadable")"
                text += disk.blockDevice.map { ", block device \($0)" } ?? ", \(Size.describe(disk.allocatedBytes)) used"
            }
            if disk.readOnly { text += ", read-only" }
            if let cache = disk.cache { text += ", cache=\(cache)" }
            text += ")"
            if !disk.backingChain.isEmpty { text += " on " + disk.backingChain.joined(separator: " on ") }
            lines.append(["Disk \(index):", text])
        }
        if let managedBy = report.managedBy { lines.append(["Managed by:", "\(managedBy) (made by it; stop and delete it through \(managedBy))"]) }
        if let state = report.tpmState { lines.append(["TPM:", "2.0 (swtpm; state in \(state))"]) }
        if report.secureBoot { lines.append(["Secure Boot:", "on (OVMF's Secure Boot build, Microsoft's keys enrolled)"]) }
        if report.hyperV { lines.append(["Hyper-V:", "enlightenments on (relaxed timing, virtual APIC, spinlocks, reference time, synthetic timers; dropped with a warning where this host's KVM lacks them)"]) }
        if let install = report.unattended {
            let what: String
            switch install.state {
            case "installing": what = "installing, step: \(install.step ?? "starting")"
            case "finished": what = "finished; the next start ejects the ISO and boots the installed system"
            case "interrupted": what = "stopped before the installer finished (last step: \(install.step ?? "none")); the next start runs it again"
            default: what = "not started; the first start runs the installer"
            }
            lines.append(["Unattended:", "\(install.installer): \(what)"])
            for line in install.lastLines ?? [] { lines.append(["", "| " + line]) }
        }
        if let agent = report.guestAgent {
            switch agent.answers {
            case true?: lines.append(["Guest agent:", "qemu-guest-agent \(agent.version ?? "unknown") answers on its \(agent.channel)"])
            case false?: lines.append(["Guest agent:", "none answers on its \(agent.channel) (install and start qemu-guest-agent in the guest for `vireo exec` and `vireo cp`)"])
            case nil: lines.append(["Guest agent:", "reached on its \(agent.channel) while the VM runs"])
            }
        } else {
            lines.append(["Guest agent:", "none (the \(report.engine) engine has no agent channel yet; docs/guest-agent.md)"])
        }
        for share in report.shares {
            lines.append(["Shared folder:", "\(share.path) as '\(share.tag)'\(share.readOnly ? ", read-only" : "") (virtio-fs; the guest mounts it at \(share.guestMountPoint))"])
        }
        for (index, card) in report.networks.enumerated() {
            var text = "\(report.nicModel.map { $0 == "virtio-net-pci" ? "virtio-net" : $0 } ?? "virtio-net") \(card.mac) on \(card.attachment)"
            if let pairs = card.queuePairs { text += ", \(pairs) queue pairs" }
            if let interface = card.hostInterface { text += " (host interface \(interface))" }
            if let address = card.address { text += ", address \(address)" }
            if let reported = card.guestAddresses, !reported.isEmpty { text += ", the guest reports \(reported.joined(separator: " "))" }
            if !card.forwards.isEmpty { text += ", forwarding " + card.forwards.joined(separator: " ") }
            lines.append(["Network \(index):", text])
        }
        if let cid = report.vsockCid, let socket = report.vsockSocket {
            lines.append(["vsock:", "guest CID \(cid); host side \(socket) (send \"CONNECT <port>\\n\"), guest connections to \(socket)_<port>"])
        }
        lines += [["Directory:", report.directory], ["Console log:", report.consoleLog], ["VMM log:", report.vmmLog],
                  ["Control socket:", report.controlSocket]]
        if let display = report.displaySocket { lines.append(["Display:", "VNC on \(display) (`vireo display \(report.name)`)"]) }
        if let process = report.process {
            lines += [["PID:", String(process.pid)], ["Uptime:", "\(process.uptimeMs / 1000).\(process.uptimeMs % 1000 / 100) s"]]
            if let boots = process.boots { lines.append(["Boots:", "\(boots) (\(boots - 1) reboot\(boots == 2 ? "" : "s") in place)"]) }
        }
        if let counters = report.counters {
            if !counters.vcpuExits.isEmpty { lines.append(["vCPU exits:", counters.vcpuExits.map(String.init).joined(separator: ", ")]) }
            lines.append(["Resident memory:", Size.describe(counters.rssBytes)])
            if let balloon = counters.balloon {
                var text = "\(Size.describe(balloon.actualBytes)) of \(Size.describe(balloon.targetBytes)) target"
                let figures = balloon.statistics.sorted { $0.key < $1.key }.map { entry in
                    // Memory figures are bytes; the rest (faults, swap, hugetlb) are counts.
                    "\(entry.key) " + (entry.key.lowercased().hasSuffix("memory") || entry.key.lowercased().hasSuffix("caches")
                                        ? Size.describe(entry.value) : String(entry.value))
                }
                if !figures.isEmpty { text += "; guest reports " + figures.joined(separator: ", ") }
                lines.append(["Balloon:", text])
            }
            for network in counters.networks {
                lines.append(["Network I/O:", "\(network.tap): \(network.rxFrames) frames (\(Size.describe(network.rxBytes))) in, \(network.txFrames) frames (\(Size.describe(network.txBytes))) out, \(network.droppedFrames) dropped"])
            }
            for disk in counters.disks {
                lines.append(["Disk I/O:", "\(disk.path): \(disk.requests) requests, \(Size.describe(disk.readBytes)) read, \(Size.describe(disk.writtenBytes)) written"])
                for path in disk.networkPaths ?? [] {
                    let state = path.active ? (path.connected ? "active" : "active, reconnecting") : (path.connected ? "standby" : "down")
                    lines.append(["Disk path:", "\(path.address): \(state)" + (path.active ? ", \(disk.networkFailovers ?? 0) failover(s)" : "")])
                }
            }
        }
        printTable(lines)
    }
}
