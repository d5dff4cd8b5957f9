import DiskImage
import FoundationEssentials
import MachineSpec
#if canImport(Glibc)
import Glibc
#endif

/// OVA appliances: a VM carried to or from another hypervisor (VirtualBox's Export/Import
/// Appliance, VMware's ovftool, virt-v2v). Written as OVF 1.0 — the envelope first, then the
/// manifest, then each disk as a streamOptimized VMDK, in one USTAR archive — and read from OVF
/// 1.0 and 2.0 as VirtualBox and VMware write them (docs/appliances.md). An appliance is hostile
/// input: the archive's names, the envelope's XML, the manifest's digests and every disk are
/// checked before anything is made, and a disk is converted in the format its envelope declares.
public struct Appliances: Sendable {
    let library: VMLibrary

    public init(library: VMLibrary) { self.library = library }

    /// The largest envelope or manifest read (a real one is a few KiB).
    static let descriptorLimit: UInt64 = 4 << 20
    static let vmdkFormat = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

    // MARK: export

    /// Writes VM `name` (stopped) as an OVA at `path` (never over an existing file). Returns the
    /// members in archive order.
    public func export(_ name: String, to path: String, manifest: Bool = true, progress: (String) -> Void = { _ in }) throws(LibraryError) -> [String] {
        guard path.hasSuffix(".ova") else { throw .invalidValue(field: "file", reason: "\(path) does not end in .ova") }
        guard !HostFiles.exists(path) else { throw .invalidValue(field: "file", reason: "\(path) exists already; an export never overwrites") }
        return try library.withStoppedVM(name, action: "export") { (bundle, _) throws(LibraryError) -> [String] in
            let definition = try bundle.load()
            if let network = definition.disks.first(where: \.isNetwork) {
                throw .invalidValue(field: "disks", reason: "\(network.path.prefix(300)) is a network disk, which an appliance cannot carry; detach it first")
            }
            let staging = HostFiles.parent(of: HostFiles.absolute(path)) + "/.vireo-export-" + definition.uuid
            try HostFiles.makeDirectory(staging)
            defer { try? HostFiles.removeTree(staging) }
            let base = Self.fileStem(name)
            var files: [(id: String, name: String)] = []
            var disks: [(file: String, capacity: UInt64)] = []
            for (index, disk) in definition.disks.enumerated() {
                let source = bundle.resolve(disk.path)
                let file = "\(base)-disk\(index + 1).vmdk"
                progress("converting \(source) to \(file)")
                let capacity: UInt64
                do throws(DiskImageError) { capacity = try DiskImages.peek(path: source, format: disk.format) } catch { throw .disk(error) }
                // The chain the definition records, spelled out: qemu-img, running as root, must not
                // follow a backing name the VM's own process may have written into the header.
                let node = QEMUBlockNode.json(path: source, format: disk.format, chain: bundle.chain(of: disk), readOnly: true,
                                               hostDevice: source.hasPrefix("/dev/"))
                try Self.qemuImg(["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "json:" + node, staging + "/" + file])
                files.append(("file\(index + 1)", file))
                disks.append((file, capacity))
            }
            var extras: [(role: String, file: String)] = []
            for (role, stored) in [("kernel", definition.kernel), ("initrd", definition.initrd)] {
                guard let stored else { continue }
                let file = "\(base)-\(role)"
                try HostFiles.copySparse(bundle.resolve(stored), staging + "/" + file)
                files.append(("\(role)1", file))
                extras.append((role, file))
            }
            let ovfName = base + ".ovf"
            let envelope = Self.envelope(definition, files: files.map { ($0.id, $0.name, HostFiles.size(staging + "/" + $0.name)) },
                                         disks: disks, extras: extras)
            try HostFiles.writeAtomically(Array(envelope.utf8), to: staging + "/" + ovfName)
            var members = [ovfName]
            if manifest {
                var lines = ""
                for file in [ovfName] + files.map(\.name) {
                    lines += "SHA256(\(file))= \(try ImageStore.sha256(of: staging + "/" + file))\n"
                }
                try HostFiles.writeAtomically(Array(lines.utf8), to: staging + "/" + base + ".mf")
                members.append(base + ".mf")
            }
            members += files.map(\.name)
            // The envelope first and the manifest next (OVF 1.0, §"OVF package"; VMware and
            // virt-v2v insist), then the files in the envelope's References order.
            let partial = path + ".partial"
            unlink(partial)
            guard let tar = HostTools.find("tar") else { throw .invalidValue(field: "tar", reason: "not found; install Debian's tar") }
            let (status, output) = HostCommand.run(tar, ["--format=ustar", "--owner=0", "--group=0", "--numeric-owner", "-cf", partial, "-C", staging, "--"] + members)
            guard status == 0 else {
                unlink(partial)
                throw .io(operation: "tar: \(output.trimmingWhitespace())", path: partial, errno: EIO)
            }
            try HostFiles.renameNoReplace(partial, path)
            return members
        }
    }

    /// A name safe as a file name in the archive.
    static func fileStem(_ name: String) -> String {
        String(name.unicodeScalars.map { ($0 >= "a" && $0 <= "z") || ($0 >= "A" && $0 <= "Z") || ($0 >= "0" && $0 <= "9") || $0 == "-" || $0 == "_" ? Character($0) : "_" })
    }

    static func escape(_ text: String) -> String {
        var out = ""
        for character in text {
            switch character {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            default: out.append(character)
            }
        }
        return out
    }

    /// OVF 1.0's envelope for a Vireo VM: CPUs, memory, a SATA controller with the disks, a CD
    /// drive when it has an ISO, a card per NIC on one network, UEFI as VMware's firmware key;
    /// the kernel, initrd and command line of a direct-boot VM in a `vireo:Boot` section others
    /// may ignore (ovf:required="false").
    static func envelope(_ vm: VMDefinition, files: [(id: String, name: String, size: UInt64)], disks: [(file: String, capacity: UInt64)],
                         extras: [(role: String, file: String)]) -> String {
        var xml = """
            <?xml version="1.0" encoding="UTF-8"?>
            <Envelope vmw:buildId="vireo" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" \
            xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" \
            xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" \
            xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vireo="https://vireo.dev/ovf/1">
              <References>

            """
        for file in files { xml += "    <File ovf:href=\"\(escape(file.name))\" ovf:id=\"\(file.id)\" ovf:size=\"\(file.size)\"/>\n" }
        xml += "  </References>\n  <DiskSection>\n    <Info>Virtual disk information</Info>\n"
        for (index, disk) in disks.enumerated() {
            xml += "    <Disk ovf:capacity=\"\(disk.capacity)\" ovf:capacityAllocationUnits=\"byte\" ovf:diskId=\"vmdisk\(index + 1)\" ovf:fileRef=\"file\(index + 1)\" ovf:format=\"\(vmdkFormat)\"/>\n"
        }
        xml += """
              </DiskSection>
              <NetworkSection>
                <Info>The logical networks</Info>
                <Network ovf:name="nat">
                  <Description>NAT</Description>
                </Network>
              </NetworkSection>
              <VirtualSystem ovf:id="\(escape(vm.name))">
                <Info>A virtual machine</Info>
                <Name>\(escape(vm.name))</Name>
                <OperatingSystemSection ovf:id="\(vm.osType.hasSuffix("64") ? 101 : 36)" vmw:osType="\(vm.osType.hasSuffix("64") ? "other5xLinux64Guest" : "other5xLinuxGuest")">
                  <Info>The kind of installed guest operating system</Info>
                  <Description>\(escape(vm.osType))</Description>
                </OperatingSystemSection>
                <VirtualHardwareSection>
                  <Info>Virtual hardware requirements</Info>
                  <System>
                    <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
                    <vssd:InstanceID>0</vssd:InstanceID>
                    <vssd:VirtualSystemIdentifier>\(escape(vm.name))</vssd:VirtualSystemIdentifier>
                    <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
                  </System>
                  <Item>
                    <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
                    <rasd:Description>Number of Virtual CPUs</rasd:Description>
                    <rasd:ElementName>\(vm.cpus) virtual CPU(s)</rasd:ElementName>
                    <rasd:InstanceID>1</rasd:InstanceID>
                    <rasd:ResourceType>3</rasd:ResourceType>
                    <rasd:VirtualQuantity>\(vm.cpus)</rasd:VirtualQuantity>
                  </Item>
                  <Item>
                    <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
                    <rasd:Description>Memory Size</rasd:Description>
                    <rasd:ElementName>\(vm.memoryBytes >> 20)MB of memory</rasd:ElementName>
                    <rasd:InstanceID>2</rasd:InstanceID>
                    <rasd:ResourceType>4</rasd:ResourceType>
                    <rasd:VirtualQuantity>\(vm.memoryBytes >> 20)</rasd:VirtualQuantity>
                  </Item>
                  <Item>
                    <rasd:Address>0</rasd:Address>
                    <rasd:Description>SATA Controller</rasd:Description>
                    <rasd:ElementName>sataController0</rasd:ElementName>
                    <rasd:InstanceID>3</rasd:InstanceID>
                    <rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>
                    <rasd:ResourceType>20</rasd:ResourceType>
                  </Item>

            """
        var instance = 4
        for index in disks.indices {
            xml += """
                      <Item>
                        <rasd:AddressOnParent>\(index)</rasd:AddressOnParent>
                        <rasd:ElementName>disk\(index + 1)</rasd:ElementName>
                        <rasd:HostResource>ovf:/disk/vmdisk\(index + 1)</rasd:HostResource>
                        <rasd:InstanceID>\(instance)</rasd:InstanceID>
                        <rasd:Parent>3</rasd:Parent>
                        <rasd:ResourceType>17</rasd:ResourceType>
                      </Item>

                """
            instance += 1
        }
        if vm.iso != nil {
            xml += """
                      <Item ovf:required="false">
                        <rasd:AddressOnParent>\(disks.count)</rasd:AddressOnParent>
                        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
                        <rasd:ElementName>cdrom1</rasd:ElementName>
                        <rasd:InstanceID>\(instance)</rasd:InstanceID>
                        <rasd:Parent>3</rasd:Parent>
                        <rasd:ResourceType>15</rasd:ResourceType>
                      </Item>

                """
            instance += 1
        }
        for (index, card) in vm.networks.enumerated() {
            xml += """
                      <Item>
                        <rasd:Address>\(card.mac)</rasd:Address>
                        <rasd:AddressOnParent>\(index + 7)</rasd:AddressOnParent>
                        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
                        <rasd:Connection>nat</rasd:Connection>
                        <rasd:ElementName>ethernet\(index)</rasd:ElementName>
                        <rasd:InstanceID>\(instance)</rasd:InstanceID>
                        <rasd:ResourceSubType>E1000e</rasd:ResourceSubType>
                        <rasd:ResourceType>10</rasd:ResourceType>
                      </Item>

                """
            instance += 1
        }
        if vm.firmware == .uefi {
            xml += "      <vmw:Config ovf:required=\"false\" vmw:key=\"firmware\" vmw:value=\"efi\"/>\n"
        }
        xml += "    </VirtualHardwareSection>\n"
        if !extras.isEmpty || vm.kernel != nil {
            xml += "    <vireo:BootSection ovf:required=\"false\">\n      <Info>Direct kernel boot (Vireo)</Info>\n"
            for extra in extras { xml += "      <vireo:\(extra.role == "kernel" ? "Kernel" : "Initrd") ovf:fileRef=\"\(extra.role)1\"/>\n" }
            xml += "      <vireo:CommandLine>\(escape(vm.commandLine))</vireo:CommandLine>\n    </vireo:BootSection>\n"
        }
        xml += "  </VirtualSystem>\n</Envelope>\n"
        return xml
    }

    static func qemuImg(_ arguments: [String]) throws(LibraryError) {
        guard let tool = HostTools.find("qemu-img") else { throw .invalidValue(field: "qemu-img", reason: "not found; install Debian's qemu-utils") }
        let (status, output) = HostCommand.run(tool, arguments)
        guard status == 0 else { throw .io(operation: "qemu-img \(arguments.first ?? ""): \(output.trimmingWhitespace().prefix(500))", path: arguments.last ?? "", errno: EIO) }
    }
}
