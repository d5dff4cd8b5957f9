import DiskImage
import FoundationEssentials
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// What an appliance describes, read from its envelope: what `vireo import --dry-run` shows and
/// what an import makes.
public struct AppliancePlan: Sendable, Encodable {
    public struct Disk: Sendable, Encodable {
        /// The file in the appliance.
        public var file: String
        /// As the envelope declares it (vmdk, vdi, qcow2, raw): the format it is read in.
        public var format: String
        public var capacityBytes: UInt64?
    }

    public var name: String
    public var cpus: Int
    public var memoryBytes: UInt64
    public var disks: [Disk]
    public var nics: Int
    public var firmware: Firmware?
    public var osType: String
    /// A direct-boot VM's files and command line (Vireo's own `BootSection`).
    public var kernel: String?
    public var initrd: String?
    public var commandLine: String?
    /// Hardware the envelope names that the VM will not have, each said plainly.
    public var warnings: [String]
}

/// Where an appliance's files are: members of an OVA, or files beside an OVF.
enum ApplianceFiles {
    case archive(TarArchive)
    case directory(String, envelope: String)

    var envelopeName: String {
        switch self {
        case let .archive(tar): return tar.members[0].name
        case let .directory(_, envelope): return envelope
        }
    }

    func has(_ name: String) -> Bool {
        switch self {
        case let .archive(tar): return tar.member(name) != nil
        case let .directory(directory, _): return Self.isPlainFile(directory + "/" + name)
        }
    }

    /// A regular file itself, not a link: an OVF's neighbours are read as root, so one may not
    /// stand for a file elsewhere.
    static func isPlainFile(_ path: String) -> Bool {
        var status = stat()
        return lstat(path, &status) == 0 && status.st_mode & S_IFMT == S_IFREG
    }

    func read(_ name: String, limit: UInt64) throws(LibraryError) -> [UInt8] {
        switch self {
        case let .archive(tar):
            guard let member = tar.member(name) else { throw .invalidValue(field: "file", reason: "\(name) is not in \(tar.path)") }
            return try tar.read(member, limit: limit)
        case let .directory(directory, _):
            let path = directory + "/" + name
            guard Self.isPlainFile(path) else { throw .invalidValue(field: "file", reason: "\(path) is not a regular file (a link is not followed)") }
            guard HostFiles.size(path) <= limit else { throw .invalidValue(field: "file", reason: "\(path) is \(HostFiles.size(path)) bytes; at most \(limit) are read") }
            return try HostFiles.readAll(path)
        }
    }

    func extract(_ name: String, to target: String) throws(LibraryError) {
        switch self {
        case let .archive(tar):
            guard let member = tar.member(name) else { throw .invalidValue(field: "file", reason: "\(name) is not in \(tar.path)") }
            try tar.extract(member, to: target)
        case let .directory(directory, _):
            guard Self.isPlainFile(directory + "/" + name) else { throw .invalidValue(field: "file", reason: "\(directory)/\(name) is not a regular file (a link is not followed)") }
            try HostFiles.copySparse(directory + "/" + name, target)
        }
    }
}

extension Appliances {
    /// Opens an OVA or an OVF (with its files beside it) and reads its envelope: nothing is made.
    static func open(_ path: String) throws(LibraryError) -> ApplianceFiles {
        let absolute = HostFiles.absolute(path)
        if absolute.hasSuffix(".ovf") {
            let name = HostFiles.lastComponent(of: absolute)
            return .directory(HostFiles.parent(of: absolute), envelope: name)
        }
        guard absolute.hasSuffix(".ova") else { throw .invalidValue(field: "file", reason: "\(path) is neither an .ova nor an .ovf") }
        let tar = try TarArchive(path: absolute)
        guard tar.members[0].name.hasSuffix(".ovf") else {
            throw .invalidValue(field: "file", reason: "\(path): the first member is \(tar.members[0].name), not the OVF envelope (an OVA starts with it)")
        }
        return .archive(tar)
    }

    /// What an appliance holds, as the import would make it.
    public func plan(_ path: String, name: String? = nil) throws(LibraryError) -> AppliancePlan {
        try Self.plan(Self.open(path), path: path, name: name)
    }

    static func plan(_ files: ApplianceFiles, path: String, name rename: String?) throws(LibraryError) -> AppliancePlan {
        try plan(envelope: try files.read(files.envelopeName, limit: descriptorLimit), has: files.has, path: path, name: rename)
    }

    /// The plan an envelope describes; `has` says whether the appliance holds a file.
    static func plan(envelope: [UInt8], has: (String) -> Bool, path: String, name rename: String?) throws(LibraryError) -> AppliancePlan {
        let root = try XMLLite.parse(envelope)
        func refuse(_ why: String) -> LibraryError { .invalidValue(field: "ovf", reason: "\(path): \(why)") }
        guard root.name == "Envelope" else { throw refuse("the envelope's root is <\(root.name)>, not <Envelope>") }
        // Files by id: plain names inside the appliance, never a URL or a path.
        var filesByID: [String: String] = [:]
        for file in root.first("References")?.all("File") ?? [] {
            guard let id = file.attributes["id"], let href = file.attributes["href"] else { throw refuse("a <File> without id or href") }
            guard !href.contains("/"), !href.contains("\\"), !href.hasPrefix("."), !href.contains(":"), !href.isEmpty else {
                throw refuse("the file '\(href.prefix(200))' is not a plain name inside the appliance (a URL or a path is not followed)")
            }
            guard has(href) else { throw refuse("the file \(href) the envelope names is missing") }
            filesByID[id] = href
        }
        var disksByID: [String: AppliancePlan.Disk] = [:]
        for disk in root.first("DiskSection")?.all("Disk") ?? [] {
            guard let id = disk.attributes["diskId"], let fileRef = disk.attributes["fileRef"] else { throw refuse("a <Disk> without diskId or fileRef") }
            guard let file = filesByID[fileRef] else { throw refuse("disk \(id) names the file \(fileRef), which References does not list") }
            let declared = (disk.attributes["format"] ?? "").lowercased()
            let format: String
            if declared.contains("vmdk") { format = "vmdk" } else if declared.contains("vdi") || declared.contains("virtualbox") { format = "vdi" }
            else if declared.contains("qcow") { format = "qcow2" } else if declared.contains("raw") { format = "raw" }
            else { throw refuse("disk \(id)'s format '\(declared.prefix(200))' is not one of VMDK, VDI, qcow2, raw") }
            var capacity = disk.attributes["capacity"].flatMap(UInt64.init)
            if let units = disk.attributes["capacityAllocationUnits"], let factor = Self.unitFactor(units), let given = capacity {
                capacity = given.multipliedReportingOverflow(by: factor).overflow ? nil : given * factor
            }
            disksByID[id] = AppliancePlan.Disk(file: file, format: format, capacityBytes: capacity)
        }
        let systems = root.all("VirtualSystem") + (root.first("VirtualSystemCollection")?.all("VirtualSystem") ?? [])
        guard systems.count == 1, let system = systems.first else { throw refuse("it holds \(systems.count) virtual systems; Vireo imports one") }
        guard let hardware = system.first("VirtualHardwareSection") else { throw refuse("the virtual system has no VirtualHardwareSection") }
        let originalName = system.value("Name") ?? system.attributes["id"] ?? "imported"
        var plan = AppliancePlan(name: rename ?? Self.vmName(from: originalName), cpus: 1, memoryBytes: 512 << 20, disks: [], nics: 0, firmware: nil,
                                 osType: "linux-64", kernel: nil, initrd: nil, commandLine: nil, warnings: [])
        for item in hardware.all("Item") + hardware.all("EthernetPortItem") + hardware.all("StorageItem") {
            let type = Int(item.value("ResourceType") ?? "") ?? -1
            let label = item.value("ElementName") ?? item.value("Caption") ?? "item \(item.value("InstanceID") ?? "?")"
            switch type {
            case 3:
                guard let count = Int(item.value("VirtualQuantity") ?? ""), count >= 1, count <= MachineLimits.maximumCPUs else {
                    throw refuse("the CPU count '\(item.value("VirtualQuantity") ?? "")' is not 1 to \(MachineLimits.maximumCPUs)")
                }
                plan.cpus = count
            case 4:
                guard let quantity = UInt64(item.value("VirtualQuantity") ?? ""),
                      let factor = Self.unitFactor(item.value("AllocationUnits") ?? "byte * 2^20"),
                      !quantity.multipliedReportingOverflow(by: factor).overflow else {
                    throw refuse("the memory size '\(item.value("VirtualQuantity") ?? "") \(item.value("AllocationUnits") ?? "")' is not readable")
                }
                plan.memoryBytes = quantity * factor
            case 17:
                let resource = item.value("HostResource") ?? ""
                let id = resource.split(separator: "/").last.map(String.init) ?? ""
                guard resource.contains("disk/"), let disk = disksByID[id] else { throw refuse("the disk drive \(label) names '\(resource.prefix(200))', which DiskSection does not describe") }
                plan.disks.append(disk)
            case 10:
                plan.nics += 1
            case 5, 6, 20:
                continue   // IDE, SCSI and SATA controllers: where disks hang, not hardware of their own
            case 15, 16:
                plan.warnings.append("\(label): the CD/DVD drive is not imported (attach an ISO with `vireo set NAME --iso FILE`)")
            default:
                plan.warnings.append("\(label) (resource type \(type)) is not imported: Vireo has no such device")
            }
        }
        guard plan.disks.count <= 8 else { throw refuse("\(plan.disks.count) disks; at most 8") }
        // Firmware: VMware's key, or VirtualBox's own section.
        func findAll(_ node: XMLNode, _ name: String) -> [XMLNode] { (node.name == name ? [node] : []) + node.children.flatMap { findAll($0, name) } }
        if findAll(system, "Config").contains(where: { $0.attributes["key"] == "firmware" && $0.attributes["value"]?.lowercased() == "efi" })
            || findAll(system, "Firmware").contains(where: { $0.attributes["type"]?.lowercased().hasPrefix("efi") == true }) {
            plan.firmware = .uefi
        }
        if let boot = system.first("BootSection") {
            for (role, element) in [("kernel", "Kernel"), ("initrd", "Initrd")] {
                guard let ref = boot.first(element)?.attributes["fileRef"] else { continue }
                guard let file = filesByID[ref] else { throw refuse("the \(role) names \(ref), which References does not list") }
                if role == "kernel" { plan.kernel = file } else { plan.initrd = file }
            }
            plan.commandLine = boot.value("CommandLine")
        }
        if plan.kernel == nil, plan.firmware == nil { plan.firmware = .bios }
        if let os = system.first("OperatingSystemSection"), let id = Int(os.attributes["id"] ?? ""), ![36, 79, 80, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107].contains(id) {
            plan.warnings.append("the guest's OS (CIM type \(id)) is not Linux; the VM is made for the qemu engine with firmware, which is what it needs")
        }
        return plan
    }

    /// `byte * 2^20`, `MegaBytes`, `GB`: the bytes one unit is.
    static func unitFactor(_ text: String) -> UInt64? {
        let compact = text.filter { $0 != " " }.lowercased()
        switch compact {
        case "byte", "bytes": return 1
        case "kb", "kilobytes": return 1 << 10
        case "mb", "megabytes": return 1 << 20
        case "gb", "gigabytes": return 1 << 30
        default:
            guard compact.hasPrefix("byte*2^"), let power = UInt64(compact.dropFirst(7)), power < 50 else { return nil }
            return 1 << power
        }
    }

    /// A library name from an appliance's: what VMName allows, the rest replaced.
    static func vmName(from text: String) -> String {
        let cleaned = String(text.unicodeScalars.prefix(48).map { ($0 >= "a" && $0 <= "z") || ($0 >= "A" && $0 <= "Z") || ($0 >= "0" && $0 <= "9") || $0 == "-" || $0 == "_" || $0 == "." ? Character($0) : "-" })
        guard let first = cleaned.unicodeScalars.first, first != ".", first != "-", first != "_" else { return "imported-" + cleaned.prefix(40) }
        return cleaned
    }

    /// Checks every file the manifest lists (SHA256 or SHA1) in `staging`, where they were
    /// extracted. A line that is not `ALGO(file)= hex`, or a digest that differs, refuses the
    /// appliance.
    static func verifyManifest(_ bytes: [UInt8], files: [String: String], path: String) throws(LibraryError) {
        let text = String(decoding: bytes, as: UTF8.self)
        for line in text.split(whereSeparator: \.isNewline) where !String(line).trimmingWhitespace().isEmpty {
            guard let open = line.firstIndex(of: "("), let close = line.lastIndex(of: ")"), open < close,
                  let equals = line[close...].firstIndex(of: "=") else {
                throw .invalidValue(field: "manifest", reason: "\(path): the manifest line '\(line.prefix(200))' is not ALGORITHM(FILE)= DIGEST")
            }
            let algorithm = line[..<open].uppercased()
            let file = String(line[line.index(after: open)..<close])
            let digest = String(line[line.index(after: equals)...]).trimmingWhitespace().lowercased()
            guard let staged = files[file] else { continue }   // the envelope itself, checked by the caller
            let tool = algorithm == "SHA256" ? "sha256sum" : algorithm == "SHA1" ? "sha1sum" : nil
            guard let tool, let program = HostTools.find(tool) else {
                throw .invalidValue(field: "manifest", reason: "\(path): the manifest's algorithm '\(algorithm.prefix(20))' is not SHA256 or SHA1")
            }
            let (status, output) = HostCommand.run(program, ["--", staged])
            guard status == 0, output.split(separator: " ").first.map({ $0.lowercased() }) == digest else {
                throw .invalidValue(field: "manifest", reason: "\(path): \(file) does not match the manifest's \(algorithm) digest (damaged or altered)")
            }
        }
    }

    /// Makes the VM the appliance describes: its disks converted to qcow2 in its directory.
    /// Nothing stays behind on a refusal.
    public func importAppliance(_ path: String, name: String? = nil, progress: (String) -> Void = { _ in }) throws(LibraryError) -> (definition: VMDefinition, plan: AppliancePlan) {
        let files = try Self.open(path)
        let plan = try Self.plan(files, path: path, name: name)
        try VMName.validate(plan.name, in: library.root)
        guard !HostFiles.exists(library.root + "/" + plan.name) else { throw .alreadyExists(name: plan.name) }
        try HostFiles.makeDirectories(library.root)
        let staging = library.root + "/.importing-" + UUID().uuidString.lowercased()
        try HostFiles.makeDirectory(staging)
        defer { try? HostFiles.removeTree(staging) }
        // Every file the VM takes, out of the archive and checked against the manifest.
        var staged: [String: String] = [:]
        for file in plan.disks.map(\.file) + [plan.kernel, plan.initrd].compactMap({ $0 }) where staged[file] == nil {
            progress("reading \(file)")
            try files.extract(file, to: staging + "/" + file)
            staged[file] = staging + "/" + file
        }
        let envelopeBytes = try files.read(files.envelopeName, limit: Self.descriptorLimit)
        try HostFiles.writeAtomically(envelopeBytes, to: staging + "/.envelope")
        staged[files.envelopeName] = staging + "/.envelope"
        let manifestName = String(files.envelopeName.dropLast(4)) + ".mf"
        if files.has(manifestName) {
            try Self.verifyManifest(try files.read(manifestName, limit: Self.descriptorLimit), files: staged, path: path)
        }
        // A disk is read in the format the envelope declares; a VMDK may not rest on a parent
        // (its descriptor could name any host file).
        for disk in plan.disks {
            let source = staging + "/" + disk.file
            guard let tool = HostTools.find("qemu-img") else { throw .invalidValue(field: "qemu-img", reason: "not found; install Debian's qemu-utils") }
            // A hostile image must not hold the import: qemu-img reads only its headers here.
            let (status, output) = HostCommand.run(tool, ["info", "-f", disk.format, "--output=json", source], timeoutSeconds: 60)
            guard status == 0 else { throw .invalidValue(field: "disk", reason: "\(disk.file) is not a usable \(disk.format) image: \(output.trimmingWhitespace().prefix(300))") }
            if output.contains("\"backing-filename\"") {
                throw .invalidValue(field: "disk", reason: "\(disk.file) names a parent image; an appliance's disk must stand alone (it could name any host file)")
            }
        }
        var request = CreateRequest(name: plan.name)
        request.cpus = plan.cpus
        request.memoryBytes = plan.memoryBytes
        request.withoutDisk = true
        request.networks = (0..<plan.nics).map { _ in NetworkAttachment(.nat, mac: NetworkAttachment.randomMAC()) }
        if let kernel = plan.kernel {
            request.engine = .kvm
            request.kernel = staged[kernel]
            request.initrd = plan.initrd.flatMap { staged[$0] }
            request.commandLine = plan.commandLine
        } else {
            request.engine = .qemu
            request.firmware = plan.firmware
        }
        progress("defining VM '\(plan.name)'")
        _ = try library.create(request)
        do throws(LibraryError) {
            let definition = try library.withStoppedVM(plan.name, action: "import") { (bundle, _) throws(LibraryError) -> VMDefinition in
                var definition = try bundle.load()
                for (index, disk) in plan.disks.enumerated() {
                    progress("converting \(disk.file) to disk\(index).qcow2")
                    try Self.qemuImg(["convert", "-f", disk.format, "-O", "qcow2", staging + "/" + disk.file, bundle.resolve("disk\(index).qcow2")])
                    chmod(bundle.resolve("disk\(index).qcow2"), 0o600)
                    definition.disks.append(DiskAttachment(path: "disk\(index).qcow2", format: .qcow2))
                }
                try VMLibrary.validate(definition)
                try bundle.save(definition)
                return definition
            }
            return (definition, plan)
        } catch {
            _ = try? library.delete(plan.name, keepDisks: false)
            throw error
        }
    }
}

/// An envelope as the fuzzer gives it (hostile bytes), and a well-formed one to start from.
public enum ApplianceInspection {
    /// Parses and plans; returns the plan's disk count, or nil when the envelope is refused.
    public static func plan(_ envelope: [UInt8]) -> Int? {
        (try? Appliances.plan(envelope: envelope, has: { _ in true }, path: "fuzz.ovf", name: nil))?.disks.count
    }

    public static let sample: [UInt8] = Array("""
        <?xml version="1.0" encoding="UTF-8"?>
        <Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" \
        xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
          <References><File ovf:href="a.vmdk" ovf:id="file1" ovf:size="1"/></References>
          <DiskSection><Info>d</Info><Disk ovf:capacity="8" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" \
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
          <VirtualSystem ovf:id="a &amp; b"><Info>v</Info><Name>a</Name>
            <VirtualHardwareSection><Info>h</Info>
              <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
              <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>64</rasd:VirtualQuantity></Item>
              <Item><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>
              <Item><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceType>10</rasd:ResourceType></Item>
              <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/><![CDATA[x & y]]><!-- c -->
            </VirtualHardwareSection>
          </VirtualSystem>
        </Envelope>
        """.utf8)
}
