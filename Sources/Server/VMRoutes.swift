import API
import DiskImage
import Engines
import FoundationEssentials
import Hummingbird
import Library
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

extension APIServer {
    func summary(_ name: String, networks: HostNetworks) -> VMOverview {
        manager.overview(of: name, networks: networks, load: { bundle throws(LibraryError) in try definitions.load(bundle) })
    }

    /// Every VM's state, read from the library now (no cache): what `vireo list` would print.
    func summaries() throws(LibraryError) -> [VMOverview] {
        let networks = HostNetworks(library: manager.library)
        let names = try manager.library.names()
        definitions.keep(only: Set(names.map { manager.library.root + "/" + $0 + "/config.json" }))
        return manager.overviews(of: names, networks: networks, load: { bundle throws(LibraryError) in try definitions.load(bundle) })
    }

    /// A VM as the web UI's details pane reads it: its row, its definition (the edit forms'
    /// values) and its snapshot tree, from the same report `vireo info` prints.
    struct VMDetails: Encodable, Sendable {
        var summary: VMOverview
        var definition: VMDefinition?
        var crashReason: String?
        var runtime: VMDescription?
        var snapshots: [SnapshotRecord]
        var currentSnapshot: String?
        var directory: String
        var guestAgent: VMReport.GuestAgent?
    }

    func details(_ name: String) throws(LibraryError) -> VMDetails {
        do throws(LibraryError) {
            let report = try manager.report(of: name, withCounters: false)
            return VMDetails(summary: report.overview, definition: report.definition, crashReason: report.crashReason, runtime: report.process,
                             snapshots: report.snapshotTree.snapshots, currentSnapshot: report.snapshotTree.current, directory: report.directory,
                             guestAgent: report.guestAgent)
        } catch {
            // A VM whose definition or snapshot tree cannot be read is still shown, with why, so it can be deleted.
            guard case .corrupt = error else { throw error }
            let bundle = try manager.library.bundle(named: name)
            let status = manager.library.status(of: bundle)
            return VMDetails(summary: summary(name, networks: HostNetworks(library: manager.library)), definition: nil,
                             crashReason: status.crashReason, runtime: status.description, snapshots: [], currentSnapshot: nil, directory: bundle.directory)
        }
    }

    // MARK: bodies

    struct CreateBody: Decodable, Sendable {
        var name: String
        var osType: String?
        var cpus: Int?
        var memoryBytes: UInt64?
        var diskBytes: UInt64?
        var attachDisk: String?
        var attachDiskFormat: String?
        var withoutDisk: Bool?
        var kernel: String?
        var initrd: String?
        var commandLine: String?
        var nics: [String]?
        var forwards: [String]?
        var vsockCid: UInt64?
        var balloon: Bool?
        var entropyDevice: Bool?
        var acpi: Bool?
        var onReboot: String?
        var cpuModel: String?
        var engine: String?
        var iso: String?
        var firmware: String?
        var accelerator: String?
        var image: String?
        var fullCopy: Bool?
        var sshKeyFiles: [String]?
        var user: String?
        var hostname: String?
        var password: String?
        var cpuCapPercent: Int?
        var cpuWeight: Int?
        var memoryLimitBytes: UInt64?
        var pidsLimit: Int?
        /// `--share`'s syntax: HOSTDIR[:TAG][,ro].
        var shares: [String]?
        var tpm: Bool?
        var secureBoot: Bool?
        var hyperV: Bool?
        /// With `iso`: install without questions (docs/unattended.md).
        var unattended: UnattendedBody?

        struct UnattendedBody: Decodable {
            var user: String?
            var password: String
            var fullName: String?
            var hostname: String?
            var locale: String?
            var timezone: String?
            var packages: [String]?
            var postInstallCommand: String?
            var sshKeyFiles: [String]?
            /// A URL, or "none" for the disc alone.
            var mirror: String?

            static let keys: Set<String> = ["user", "password", "full_name", "hostname", "locale", "timezone", "packages", "post_install_command",
                                            "ssh_key_files", "mirror"]

            var request: UnattendedRequest {
                var request = UnattendedRequest(password: password)
                request.user = user
                request.fullName = fullName
                request.hostname = hostname
                request.locale = locale
                request.timezone = timezone
                request.packages = packages ?? []
                request.postInstallCommand = postInstallCommand
                request.keyFiles = sshKeyFiles ?? []
                request.mirror = mirror
                return request
            }
        }

        static let nested: [String: Set<String>] = ["unattended": UnattendedBody.keys]

        static let keys: Set<String> = ["unattended", "hyper_v", "name", "os_type", "cpus", "memory_bytes", "disk_bytes", "attach_disk", "attach_disk_format", "without_disk", "kernel",
                                        "initrd", "command_line", "nics", "forwards", "vsock_cid", "balloon", "entropy_device", "acpi",
                                        "on_reboot", "cpu_model", "engine", "iso", "firmware", "accelerator", "image", "full_copy",
                                        "ssh_key_files", "user", "hostname", "password", "cpu_cap_percent", "cpu_weight",
                                        "memory_limit_bytes", "pids_limit", "shares", "tpm", "secure_boot"]

        func request() throws(LibraryError) -> CreateRequest {
            var request = CreateRequest(name: name)
            request.osType = osType
            request.cpus = cpus
            request.memoryBytes = memoryBytes
            request.diskBytes = diskBytes
            request.attachDisk = attachDisk
            request.attachDiskFormat = try attachDiskFormat.map { (text) throws(LibraryError) in try DiskFormat.parse(text, field: "attach_disk_format") }
            request.withoutDisk = withoutDisk ?? false
            request.kernel = kernel
            request.initrd = initrd
            request.commandLine = commandLine
            request.networks = try APIServer.cards(nics: nics, forwards: forwards, kept: nil)
            request.vsockCID = vsockCid
            request.balloon = balloon
            request.entropyDevice = entropyDevice
            request.acpi = acpi
            request.onReboot = onReboot
            request.cpuModel = cpuModel
            request.engine = try engine.map { (text) throws(LibraryError) in try EngineKind.parse(text, field: "engine") }
            request.iso = iso
            request.firmware = try firmware.map { (text) throws(LibraryError) in try Firmware.parse(text, field: "firmware") }
            request.accelerator = try accelerator.map { (text) throws(LibraryError) in try Accelerator.parse(text, field: "accelerator") }
            request.image = image
            request.fullCopy = fullCopy ?? false
            request.cloudInit.keyFiles = sshKeyFiles ?? []
            request.cloudInit.user = user
            request.cloudInit.hostname = hostname
            request.cloudInit.password = password
            request.resources.cpuCapPercent = cpuCapPercent
            request.resources.cpuWeight = cpuWeight
            request.resources.memoryLimitBytes = memoryLimitBytes
            request.resources.pidsLimit = pidsLimit
            request.shares = try (shares ?? []).map(SharedFolder.parse)
            request.tpm = tpm
            request.secureBoot = secureBoot
            request.hyperV = hyperV
            request.unattended = unattended?.request
            return request
        }
    }

    /// Cards from the API's `nics` (the CLI's `--nic` syntax) and `forwards` (`tcp:8080:80`).
    static func cards(nics: [String]?, forwards: [String]?, kept: [NetworkAttachment]?) throws(LibraryError) -> [NetworkAttachment]? {
        try cardsWithMACs(nics: nics, forwards: forwards, kept: kept)?.map(\.card)
    }

    /// The cards, each with whether its MAC was given (`mac=`): `PATCH` keeps a card's MAC when
    /// the same attachment comes back without one, as `vireo set --nic` does.
    static func cardsWithMACs(nics: [String]?, forwards: [String]?, kept: [NetworkAttachment]?) throws(LibraryError) -> [(card: NetworkAttachment, explicitMAC: Bool)]? {
        guard nics != nil || forwards != nil else { return nil }
        var cards: [(card: NetworkAttachment, explicitMAC: Bool)]
        if let nics {
            cards = []
            for (index, text) in nics.enumerated() { cards.append(try NetworkAttachment.parseCard(text, field: "nics[\(index)]")) }
        } else {
            cards = (kept ?? [NetworkAttachment(.nat, mac: NetworkAttachment.randomMAC())]).map { ($0, true) }
        }
        if let forwards, !forwards.isEmpty {
            var parsed: [PortForward] = []
            for (index, text) in forwards.enumerated() { parsed.append(try PortForward.parse(text, field: "forwards[\(index)]")) }
            guard let index = cards.firstIndex(where: { $0.card.attachment.acceptsForwards }) else {
                throw LibraryError.invalidValue(field: "forwards", reason: "the VM has no nat, network or user card to forward ports to")
            }
            cards[index].card.forwards = parsed
        }
        return cards
    }

    /// `PATCH /api/vms/{name}`: a field present changes, `null` removes a limit, absent keeps.
    struct ChangeBody: Decodable, Sendable {
        var request = ChangeRequest()
        static let keys: Set<String> = ["cpus", "memory_bytes", "command_line", "os_type", "kernel", "initrd", "entropy_device", "balloon",
                                        "acpi", "on_reboot", "cpu_model", "engine", "iso", "firmware", "accelerator", "nics", "forwards",
                                        "vsock_cid", "cpu_cap_percent", "cpu_weight", "memory_limit_bytes", "pids_limit",
                                        "vcpu_pins", "emulator_cpus", "rt_priority", "io_limits", "memory_backing", "preallocate",
                                        "ksm", "lock_memory", "transparent_huge_pages", "numa_node", "tpm", "secure_boot", "hyper_v"]
        static let nested: [String: Set<String>] = ["io_limits": ["read_bytes_per_second", "write_bytes_per_second", "read_iops", "write_iops"]]

        enum Keys: String, CodingKey {
            case cpus, memoryBytes, commandLine, osType, kernel, initrd, entropyDevice, balloon, acpi, onReboot, cpuModel, engine, iso
            case firmware, accelerator, nics, forwards, vsockCid, cpuCapPercent, cpuWeight, memoryLimitBytes, pidsLimit
            case vcpuPins, emulatorCpus, rtPriority, ioLimits, memoryBacking, preallocate, ksm, lockMemory, transparentHugePages, numaNode, tpm, secureBoot, hyperV
        }

        /// `io_limits` as an object: bytes and operations per second, each optional.
        struct IOLimitsBody: Decodable {
            var readBytesPerSecond: UInt64?, writeBytesPerSecond: UInt64?, readIops: UInt64?, writeIops: UInt64?
            func limits() throws -> IOLimits {
                var limits = IOLimits()
                for (key, value) in [("read_bytes_per_second", readBytesPerSecond), ("write_bytes_per_second", writeBytesPerSecond),
                                     ("read_iops", readIops), ("write_iops", writeIops)] where value == 0 {
                    throw APIProblem.invalid("io_limits.\(key)", "must be above 0 (leave it out for no limit)")
                }
                limits.readBytesPerSecond = readBytesPerSecond
                limits.writeBytesPerSecond = writeBytesPerSecond
                limits.readOperationsPerSecond = readIops
                limits.writeOperationsPerSecond = writeIops
                guard limits != IOLimits() else { throw APIProblem.invalid("io_limits", "give at least one limit, or null to remove them") }
                return limits
            }
        }

        var nics: [String]?
        var forwards: [String]?

        init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: Keys.self)
            func optional<T: Decodable>(_ key: Keys) throws -> T?? {
                guard c.contains(key) else { return nil }
                if try c.decodeNil(forKey: key) { return .some(nil) }
                return .some(try c.decode(T.self, forKey: key))
            }
            func required<T: Decodable>(_ key: Keys) throws -> T? {
                guard c.contains(key) else { return nil }
                if try c.decodeNil(forKey: key) { throw APIProblem.invalid(JSONStyle.snakeCase(key.rawValue), "cannot be null") }
                return try c.decode(T.self, forKey: key)
            }
            request.cpus = try required(.cpus)
            request.memoryBytes = try required(.memoryBytes)
            request.commandLine = try required(.commandLine)
            request.osType = try required(.osType)
            request.kernel = try required(.kernel)
            let initrd: String?? = try optional(.initrd)
            if let initrd { if let path = initrd { request.initrd = path } else { request.removeInitrd = true } }
            // Switches: absent leaves them, null is refused. Limits: absent leaves them, null removes.
            let switches: [(Keys, WritableKeyPath<ChangeRequest, Bool?>)] = [
                (.entropyDevice, \.entropyDevice), (.balloon, \.balloon), (.acpi, \.acpi), (.preallocate, \.preallocate),
                (.ksm, \.mergeable), (.lockMemory, \.lockMemory), (.transparentHugePages, \.transparentHugePages), (.tpm, \.tpm), (.secureBoot, \.secureBoot), (.hyperV, \.hyperV)]
            for (key, path) in switches { request[keyPath: path] = try required(key) }
            let limits: [(Keys, WritableKeyPath<ChangeRequest, Int??>)] = [
                (.cpuCapPercent, \.cpuCapPercent), (.cpuWeight, \.cpuWeight), (.pidsLimit, \.pidsLimit),
                (.rtPriority, \.rtPriority), (.numaNode, \.numaNode)]
            for (key, path) in limits { request[keyPath: path] = try optional(key) }
            request.onReboot = try required(.onReboot)
            request.cpuModel = try required(.cpuModel)
            let engine: String? = try required(.engine)
            let firmware: String? = try required(.firmware)
            let accelerator: String? = try required(.accelerator)
            do throws(LibraryError) {
                request.engine = try engine.map { (text) throws(LibraryError) in try EngineKind.parse(text, field: "engine") }
                request.firmware = try firmware.map { (text) throws(LibraryError) in try Firmware.parse(text, field: "firmware") }
                request.accelerator = try accelerator.map { (text) throws(LibraryError) in try Accelerator.parse(text, field: "accelerator") }
            } catch { throw APIProblem(error) }
            request.iso = try optional(.iso)
            request.vsockCID = try optional(.vsockCid)
            request.memoryLimitBytes = try optional(.memoryLimitBytes)
            nics = try required(.nics)
            forwards = try required(.forwards)
            // What `vireo set` takes in a small syntax of its own (pins, a backing) is taken in
            // that syntax here too; null removes what can be removed.
            let pins: String?? = try optional(.vcpuPins)
            let emulator: String?? = try optional(.emulatorCpus)
            let ioLimits: IOLimitsBody?? = try optional(.ioLimits)
            let backing: String? = try required(.memoryBacking)
            do throws(LibraryError) {
                if let pins { request.vcpuPins = .some(try pins.map { (text) throws(LibraryError) in try VCPUPin.parse(text) }) }
                if let backing { request.memoryBackingChoice = try MemoryBackingOptions.parseBacking(backing) }
            } catch { throw APIProblem(error) }
            if let emulator {
                if let text = emulator {
                    guard let cpus = VCPUPin.parseCPUs(text) else { throw APIProblem.invalid("emulator_cpus", "'\(text)' is not a CPU list like 0-1 or 0,2") }
                    request.emulatorCPUs = .some(cpus)
                } else {
                    request.emulatorCPUs = .some(nil)
                }
            }
            if let ioLimits { request.ioLimits = .some(try ioLimits.map { try $0.limits() }) }
        }
    }

    // MARK: routes

    func addVMRoutes(to api: RouterGroup<APIContext>) {
        api.get("vms") { _, _ in
            // Written by hand: Foundation's encoder was a quarter of the time of a list of 100.
            let text = try await blocking { () throws -> String in VMOverview.json(try self.summaries(), .compact) }
            return Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        api.post("vms") { request, _ in
            let body = try await APIJSON.decode(CreateBody.self, from: request, allowed: CreateBody.keys, nested: CreateBody.nested)
            for (field, path) in [("kernel", body.kernel), ("initrd", body.initrd), ("iso", body.iso)] {
                if let path { try self.paths.check(path, field: field) }
            }
            if let disk = body.attachDisk { try self.paths.checkDisk(disk, field: "attach_disk") }
            for (index, path) in (body.sshKeyFiles ?? []).enumerated() { try self.paths.check(path, field: "ssh_key_files[\(index)]") }
            // The server reads these as root: the unattended answers' key files too.
            for (index, path) in (body.unattended?.sshKeyFiles ?? []).enumerated() {
                try self.paths.check(path, field: "unattended.ssh_key_files[\(index)]")
            }
            for (index, text) in (body.shares ?? []).enumerated() {
                let share: SharedFolder
                do throws(LibraryError) { share = try SharedFolder.parse(text) } catch { throw APIProblem(error) }
                try self.paths.check(share.path, field: "shares[\(index)]")
            }
            let (definition, notes) = try await blocking { () throws in
                try self.manager.library.createReporting(try body.request())
            }
            self.events.touch()
            struct Created: Encodable { var definition: VMDefinition; var notes: [String] }
            return APIJSON.response(Created(definition: definition, notes: notes), status: .created,
                                    headers: [.location: "/api/vms/\(definition.name)"])
        }
        api.get("vms/:name") { _, context in
            let name = try context.parameters.require("name")
            return APIJSON.response(try await blocking { try self.details(name) })
        }
        api.patch("vms/:name") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(ChangeBody.self, from: request, allowed: ChangeBody.keys, nested: ChangeBody.nested)
            for (field, path) in [("kernel", body.request.kernel), ("initrd", body.request.initrd), ("iso", body.request.iso ?? nil)] {
                if let path { try self.paths.check(path, field: field) }
            }
            if let file = body.request.memoryBackingChoice?.file, file != "memfd" { try self.paths.check(file, field: "memory_backing") }
            let definition = try await blocking { () throws -> VMDefinition in
                var change = body.request
                if body.nics != nil || body.forwards != nil {
                    let current = try self.manager.library.bundle(named: name).load()
                    let cards = try APIServer.cardsWithMACs(nics: body.nics, forwards: body.forwards, kept: current.networks) ?? []
                    change.networks = cards.map(\.card)
                    change.explicitMACs = cards.map(\.explicitMAC)
                }
                return try self.manager.change(name, change)
            }
            self.events.touch()
            return APIJSON.response(definition)
        }
        api.delete("vms/:name") { request, context in
            let name = try context.parameters.require("name")
            let keep = try Self.flag(request, "keep_disks")
            let report = try await blocking { try self.manager.library.delete(name, keepDisks: keep) }
            self.events.touch()
            struct Deleted: Encodable { var name: String; var keptDisks: [String]; var untouchedDisks: [String] }
            return APIJSON.response(Deleted(name: name, keptDisks: report.keptDisks, untouchedDisks: report.untouchedDisks))
        }
        struct StartBody: Decodable { var discardState: Bool?; var noJail: Bool?; var noSeccomp: Bool? }
        api.post("vms/:name/start") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(StartBody.self, from: request, allowed: ["discard_state", "no_jail", "no_seccomp"])
            for (field, asked) in [("no_jail", body.noJail), ("no_seccomp", body.noSeccomp)] where asked == true && !self.configuration.allowUnconfined {
                throw APIProblem(.forbidden, kind: "forbidden", detail: "\(field): an API client may not start a VM unconfined; start `vireo serve` with --allow-unconfined to allow it (or use `vireo start --\(field == "no_jail" ? "no-jail" : "no-seccomp")` as root)", field: field)
            }
            let started = try await blocking {
                try self.manager.start(name, discardState: body.discardState ?? false,
                                       isolation: IsolationRequest(jail: !(body.noJail ?? false), seccomp: !(body.noSeccomp ?? false)))
            }
            self.events.touch()
            struct Started: Encodable { var name: String; var pid: Int32; var warnings: [String] }
            return APIJSON.response(Started(name: name, pid: started.pid, warnings: started.warnings))
        }
        struct StopBody: Decodable { var force: Bool?; var timeoutSeconds: Double? }
        api.post("vms/:name/stop") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(StopBody.self, from: request, allowed: ["force", "timeout_seconds"])
            let timeout = body.timeoutSeconds ?? 30
            guard timeout > 0, timeout <= 600 else { throw APIProblem.invalid("timeout_seconds", "must be more than 0 and at most 600") }
            let stopped = try await blocking { try self.stop(name, force: body.force ?? false, timeout: timeout) }
            self.events.touch()
            struct Stopped: Encodable { var name: String; var outcome: String; var warnings: [String] }
            let outcome: String
            switch stopped.outcome {
            case let .alreadyOff(state): outcome = "already-\(state.rawValue)"
            case .poweredOff: outcome = "powered-off"
            case .shutDown: outcome = "shut-down"
            case .shutDownByAgent: outcome = "shut-down-by-agent"
            }
            return APIJSON.response(Stopped(name: name, outcome: outcome, warnings: stopped.warnings))
        }
        for action in ["pause", "resume", "reset"] {
            api.post(RouterPath("vms/:name/\(action)")) { request, context in
                let name = try context.parameters.require("name")
                _ = try await APIJSON.decode(EmptyBody.self, from: request, allowed: [])
                try await blocking { () throws in
                    switch action {
                    case "pause": try self.manager.pause(name)
                    case "resume": try self.manager.resume(name)
                    default: try self.manager.reset(name)
                    }
                }
                self.events.touch()
                return APIJSON.response(try await blocking { self.summary(name, networks: HostNetworks(library: self.manager.library)) })
            }
        }
        api.post("vms/:name/restart") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(StopBody.self, from: request, allowed: ["force", "timeout_seconds"])
            let timeout = body.timeoutSeconds ?? 30
            guard timeout > 0, timeout <= 600 else { throw APIProblem.invalid("timeout_seconds", "must be more than 0 and at most 600") }
            let started = try await blocking { () throws -> StartedVM in
                _ = try self.stop(name, force: body.force ?? false, timeout: timeout)
                return try self.manager.start(name)
            }
            self.events.touch()
            struct Started: Encodable { var name: String; var pid: Int32; var warnings: [String] }
            return APIJSON.response(Started(name: name, pid: started.pid, warnings: started.warnings))
        }
        api.post("vms/:name/save") { request, context in
            let name = try context.parameters.require("name")
            _ = try await APIJSON.decode(EmptyBody.self, from: request, allowed: [])
            // Refused at once when the VM cannot be saved, rather than as a failed task.
            _ = try await blocking { () throws -> Bool in
                let status = self.manager.library.status(of: try self.manager.library.bundle(named: name)).state
                guard status == .running || status == .paused else {
                    throw LibraryError.wrongState(name: name, state: status.rawValue, action: "save", hint: "only a running or paused VM can be saved")
                }
                return true
            }
            let task = self.tasks.start(kind: "save", target: name) { task throws(LibraryError) in
                task.progress(nil, "saving state and memory")
                let warnings = try self.manager.save(name)
                return ["vm": name, "warnings": warnings.joined(separator: "; ")]
            }
            return APIJSON.response(task, status: .accepted, headers: [.location: "/api/tasks/\(task.id)"])
        }
        struct RenameBody: Decodable { var name: String }
        api.post("vms/:name/rename") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(RenameBody.self, from: request, allowed: ["name"])
            try await blocking { try self.manager.library.rename(name, to: body.name) }
            self.events.touch()
            return APIJSON.response(try await blocking { try self.details(body.name) }, headers: [.location: "/api/vms/\(body.name)"])
        }
        struct CloneBody: Decodable { var name: String; var linked: Bool? }
        api.post("vms/:name/clone") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(CloneBody.self, from: request, allowed: ["name", "linked"])
            // What can be refused at once is (name, source, state); the copy itself is a task.
            _ = try await blocking { () throws -> Bool in
                try VMName.validate(body.name)
                let bundle = try self.manager.library.bundle(named: name)
                if try self.manager.library.names().contains(body.name) { throw LibraryError.alreadyExists(name: body.name) }
                let state = self.manager.library.status(of: bundle).state
                guard state.isOff else {
                    throw LibraryError.wrongState(name: name, state: state.rawValue, action: "clone", hint: "stop it first (a running VM's disks are changing)")
                }
                return true
            }
            let task = self.tasks.start(kind: "clone", target: name) { task throws(LibraryError) in
                task.progress(nil, body.linked == true ? "making linked overlays" : "copying disks")
                let definition = try self.manager.library.clone(name, to: body.name, linked: body.linked ?? false) { fraction in
                    task.progress(fraction, "copying disks: \(Int(fraction * 100))%")
                }
                self.events.touch()
                return ["vm": definition.name]
            }
            return APIJSON.response(task, status: .accepted, headers: [.location: "/api/tasks/\(task.id)"])
        }
        api.get("vms/:name/stats") { _, context in
            let name = try context.parameters.require("name")
            return APIJSON.response(try await blocking { try self.statistics(name) })
        }
        api.get("vms/:name/console-log") { request, context in
            let name = try context.parameters.require("name")
            let limit = try Self.integer(request, "tail_bytes", default: 65536, range: 0...(16 << 20))
            let text = try await blocking { () throws -> String in
                let bundle = try self.manager.library.bundle(named: name)
                return HostFiles.tail(bundle.consoleLogPath, bytes: limit)
            }
            return Response(status: .ok, headers: [.contentType: "text/plain; charset=utf-8"], body: .init(byteBuffer: .init(string: text)))
        }
        api.get("vms/:name/snapshots") { _, context in
            let name = try context.parameters.require("name")
            let tree = try await blocking { try self.manager.library.bundle(named: name).loadSnapshots() }
            struct Tree: Encodable { var current: String?; var snapshots: [SnapshotRecord] }
            return APIJSON.response(Tree(current: tree.current, snapshots: tree.snapshots))
        }
        struct SnapshotBody: Decodable { var name: String?; var description: String? }
        api.post("vms/:name/snapshots") { request, context in
            let name = try context.parameters.require("name")
            let body = try await APIJSON.decode(SnapshotBody.self, from: request, allowed: ["name", "description"])
            if let description = body.description, description.utf8.count > 4096 { throw APIProblem.invalid("description", "is over 4096 bytes") }
            let (record, warnings) = try await blocking { try self.manager.takeSnapshot(name, snapshot: body.name, description: body.description) }
            self.events.touch()
            struct Taken: Encodable { var snapshot: SnapshotRecord; var warnings: [String] }
            return APIJSON.response(Taken(snapshot: record, warnings: warnings), status: .created,
                                    headers: [.location: "/api/vms/\(name)/snapshots/\(record.id)"])
        }
        api.post("vms/:name/snapshots/:snapshot/restore") { request, context in
            let name = try context.parameters.require("name")
            let snapshot = try context.parameters.require("snapshot")
            _ = try await APIJSON.decode(EmptyBody.self, from: request, allowed: [])
            try await self.requireSnapshot(snapshot, of: name)
            let record = try await blocking { try self.manager.library.restoreSnapshot(name, snapshot: snapshot) }
            self.events.touch()
            return APIJSON.response(record)
        }
        api.delete("vms/:name/snapshots/:snapshot") { _, context in
            let name = try context.parameters.require("name")
            let snapshot = try context.parameters.require("snapshot")
            try await self.requireSnapshot(snapshot, of: name)
            let record = try await blocking { try self.manager.library.deleteSnapshot(name, snapshot: snapshot) }
            self.events.touch()
            return APIJSON.response(record)
        }
    }

    /// A snapshot the path names but the VM lacks is not found (the library, answering the
    /// CLI, calls it a bad argument).
    func requireSnapshot(_ reference: String, of name: String) async throws {
        let known = try await blocking { try self.manager.library.bundle(named: name).loadSnapshots().find(reference) != nil }
        guard known else {
            throw APIProblem(.notFound, kind: "not-found", detail: "VM '\(name)' has no snapshot '\(reference)' (see GET /api/vms/\(name)/snapshots)", vm: name)
        }
    }

    struct Statistics: Encodable, Sendable {
        var name: String
        var state: String
        /// Seconds since the epoch when these were read; rates are differences between reads.
        var sampledAt: Double
        /// Host CPU time the VM's process has used, in seconds (all vCPUs and devices).
        var cpuSeconds: Double?
        var rssBytes: UInt64?
        var memoryBytes: UInt64?
        var diskReadBytes: UInt64?
        var diskWrittenBytes: UInt64?
        var networkReceivedBytes: UInt64?
        var networkTransmittedBytes: UInt64?
    }

    func statistics(_ name: String) throws(LibraryError) -> Statistics {
        let bundle = try manager.library.bundle(named: name)
        let status = manager.library.status(of: bundle)
        var stats = Statistics(name: name, state: status.state.rawValue, sampledAt: Date().timeIntervalSince1970)
        guard let description = status.description else { return stats }
        stats.memoryBytes = description.memoryBytes
        stats.cpuSeconds = ProcessCPU.seconds(pid: description.pid)
        if let counters = try? manager.counters(name) {
            stats.rssBytes = counters.rssBytes
            stats.diskReadBytes = counters.disks.reduce(0) { $0 + $1.readBytes }
            stats.diskWrittenBytes = counters.disks.reduce(0) { $0 + $1.writtenBytes }
            // The tap's receive is the guest's transmit: counted as the guest sees them.
            stats.networkReceivedBytes = counters.networks.reduce(0) { $0 + $1.rxBytes }
            stats.networkTransmittedBytes = counters.networks.reduce(0) { $0 + $1.txBytes }
        } else {
            stats.rssBytes = ProcessCPU.residentBytes(pid: description.pid)
        }
        return stats
    }

    static func flag(_ request: Request, _ name: String) throws -> Bool {
        guard let value = request.uri.queryParameters[Substring(name)] else { return false }
        switch value {
        case "true", "1": return true
        case "false", "0": return false
        default: throw APIProblem.invalid(name, "'\(value)' is not true or false")
        }
    }

    static func integer(_ request: Request, _ name: String, default value: Int, range: ClosedRange<Int>) throws -> Int {
        guard let text = request.uri.queryParameters[Substring(name)] else { return value }
        guard let number = Int(text), range.contains(number) else {
            throw APIProblem.invalid(name, "'\(text)' is not an integer from \(range.lowerBound) to \(range.upperBound)")
        }
        return number
    }
}

extension APIServer {
    /// A stop whose guest ignored the request is the caller's to decide on (wait longer, or
    /// force it), a conflict with the VM's state rather than a failure of the server.
    func stop(_ name: String, force: Bool, timeout: Double) throws -> (outcome: VMManager.StopOutcome, warnings: [String]) {
        do throws(LibraryError) {
            return try manager.stop(name, force: force, timeout: timeout)
        } catch {
            guard case .engine = error, !force, let bundle = try? manager.library.bundle(named: name) else { throw error }
            let state = manager.library.status(of: bundle).state
            guard !state.isOff else { throw error }
            throw APIProblem(.conflict, kind: "still-running", detail: error.description, vm: name, state: state.rawValue,
                             hint: "the guest did not act on the request in time: wait longer (timeout_seconds) or send {\"force\": true}")
        }
    }
}

struct EmptyBody: Decodable {}

/// The host's view of a VM's process: CPU time from `/proc/PID/stat`, as `top` reads it.
enum ProcessCPU {
    static func seconds(pid: Int32) -> Double? {
        guard let text = HostFiles.readSmall("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // After the command: state is field 3, utime 14 and stime 15 (1-based over the whole line).
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    static func residentBytes(pid: Int32) -> UInt64? {
        guard let text = HostFiles.readSmall("/proc/\(pid)/statm") else { return nil }
        let fields = text.split(separator: " ")
        guard fields.count > 1, let pages = UInt64(fields[1]) else { return nil }
        return pages * UInt64(sysconf(Int32(_SC_PAGESIZE)))
    }
}
