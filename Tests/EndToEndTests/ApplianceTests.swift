import Foundation
import Testing

/// Appliances written the way VirtualBox and VMware write them, made by the tests from those
/// formats' documented structure (declared as such: no file from either product is used).
enum ApplianceFixtures {
    /// VirtualBox 7's Export Appliance, OVF 1.0: an IDE and a SATA controller, a streamOptimized
    /// VMDK, a CD drive, a sound card, USB, one NAT card, and its own vbox:Machine section (EFI).
    static func virtualBox(disk: String, capacity: UInt64, diskSize: UInt64) -> String {
        """
        <?xml version="1.0"?>
        <Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
          <References>
            <File ovf:id="file1" ovf:href="\(disk)" ovf:size="\(diskSize)"/>
          </References>
          <DiskSection>
            <Info>List of the virtual disks used in the package</Info>
            <Disk ovf:capacity="\(capacity)" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" vbox:uuid="3c4f1b6e-0d6e-4b8a-9b7e-1f2a3b4c5d6e"/>
          </DiskSection>
          <NetworkSection>
            <Info>Logical networks used in the package</Info>
            <Network ovf:name="NAT">
              <Description>Logical network used by this appliance.</Description>
            </Network>
          </NetworkSection>
          <VirtualSystem ovf:id="Debian &amp; friends">
            <Info>A virtual machine</Info>
            <OperatingSystemSection ovf:id="96">
              <Info>The kind of installed guest operating system</Info>
              <Description>Debian_64</Description>
              <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
            </OperatingSystemSection>
            <VirtualHardwareSection>
              <Info>Virtual hardware requirements for a virtual machine</Info>
              <System>
                <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
                <vssd:InstanceID>0</vssd:InstanceID>
                <vssd:VirtualSystemIdentifier>Debian &amp; friends</vssd:VirtualSystemIdentifier>
                <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
              </System>
              <Item>
                <rasd:Caption>2 virtual CPU</rasd:Caption>
                <rasd:Description>Number of virtual CPUs</rasd:Description>
                <rasd:ElementName>2 virtual CPU</rasd:ElementName>
                <rasd:InstanceID>1</rasd:InstanceID>
                <rasd:ResourceType>3</rasd:ResourceType>
                <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
              </Item>
              <Item>
                <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
                <rasd:Caption>1024 MB of memory</rasd:Caption>
                <rasd:ElementName>1024 MB of memory</rasd:ElementName>
                <rasd:InstanceID>2</rasd:InstanceID>
                <rasd:ResourceType>4</rasd:ResourceType>
                <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
              </Item>
              <Item>
                <rasd:Address>0</rasd:Address>
                <rasd:Caption>ideController0</rasd:Caption>
                <rasd:ElementName>ideController0</rasd:ElementName>
                <rasd:InstanceID>3</rasd:InstanceID>
                <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
                <rasd:ResourceType>5</rasd:ResourceType>
              </Item>
              <Item>
                <rasd:Address>0</rasd:Address>
                <rasd:Caption>sataController0</rasd:Caption>
                <rasd:ElementName>sataController0</rasd:ElementName>
                <rasd:InstanceID>4</rasd:InstanceID>
                <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
                <rasd:ResourceType>20</rasd:ResourceType>
              </Item>
              <Item>
                <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
                <rasd:Caption>usb</rasd:Caption>
                <rasd:ElementName>usb</rasd:ElementName>
                <rasd:InstanceID>5</rasd:InstanceID>
                <rasd:ResourceType>23</rasd:ResourceType>
              </Item>
              <Item>
                <rasd:AddressOnParent>3</rasd:AddressOnParent>
                <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
                <rasd:Caption>sound</rasd:Caption>
                <rasd:ElementName>sound</rasd:ElementName>
                <rasd:InstanceID>6</rasd:InstanceID>
                <rasd:ResourceSubType>ensoniq1371</rasd:ResourceSubType>
                <rasd:ResourceType>35</rasd:ResourceType>
              </Item>
              <Item>
                <rasd:AddressOnParent>0</rasd:AddressOnParent>
                <rasd:Caption>disk1</rasd:Caption>
                <rasd:ElementName>disk1</rasd:ElementName>
                <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
                <rasd:InstanceID>7</rasd:InstanceID>
                <rasd:Parent>4</rasd:Parent>
                <rasd:ResourceType>17</rasd:ResourceType>
              </Item>
              <Item>
                <rasd:AddressOnParent>0</rasd:AddressOnParent>
                <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
                <rasd:Caption>cdrom1</rasd:Caption>
                <rasd:ElementName>cdrom1</rasd:ElementName>
                <rasd:InstanceID>8</rasd:InstanceID>
                <rasd:Parent>3</rasd:Parent>
                <rasd:ResourceType>15</rasd:ResourceType>
              </Item>
              <Item>
                <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
                <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
                <rasd:Connection>NAT</rasd:Connection>
                <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
                <rasd:InstanceID>9</rasd:InstanceID>
                <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
                <rasd:ResourceType>10</rasd:ResourceType>
              </Item>
            </VirtualHardwareSection>
            <vbox:Machine ovf:required="false" version="1.19-linux" uuid="{3c4f1b6e-0d6e-4b8a-9b7e-1f2a3b4c5d6f}" name="Debian &amp; friends" OSType="Debian_64">
              <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
              <Hardware>
                <Firmware type="EFI"/>
                <CPU count="2"/>
                <Memory RAMSize="1024"/>
              </Hardware>
            </vbox:Machine>
          </VirtualSystem>
        </Envelope>
        """
    }

    /// VMware's ovftool, OVF 1.0: a SCSI controller with two disks, memory in `byte * 2^20`,
    /// `vmw:Config firmware=efi`, a VMXNET3 card and a video card.
    static func vmware(disks: [(file: String, capacity: UInt64, size: UInt64)]) -> String {
        var references = ""
        var diskSection = ""
        var items = ""
        for (index, disk) in disks.enumerated() {
            references += "    <File ovf:href=\"\(disk.file)\" ovf:id=\"file\(index + 1)\" ovf:size=\"\(disk.size)\"/>\n"
            diskSection += "    <Disk ovf:capacity=\"\(disk.capacity >> 20)\" ovf:capacityAllocationUnits=\"byte * 2^20\" ovf:diskId=\"vmdisk\(index + 1)\" ovf:fileRef=\"file\(index + 1)\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\" ovf:populatedSize=\"0\"/>\n"
            items += """
                      <Item>
                        <rasd:AddressOnParent>\(index)</rasd:AddressOnParent>
                        <rasd:ElementName>Hard Disk \(index + 1)</rasd:ElementName>
                        <rasd:HostResource>ovf:/disk/vmdisk\(index + 1)</rasd:HostResource>
                        <rasd:InstanceID>\(10 + index)</rasd:InstanceID>
                        <rasd:Parent>3</rasd:Parent>
                        <rasd:ResourceType>17</rasd:ResourceType>
                        <vmw:Config ovf:required="false" vmw:key="backing.writeThrough" vmw:value="false"/>
                      </Item>

                """
        }
        return """
            <?xml version="1.0" encoding="UTF-8"?>
            <!--Generated by VMware ovftool 4.4.0 (build-16360108), UTC time: 2026-12-06T10:00:00.000Z-->
            <Envelope vmw:buildId="build-16360108" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
              <References>
            \(references)  </References>
              <DiskSection>
                <Info>Virtual disk information</Info>
            \(diskSection)  </DiskSection>
              <NetworkSection>
                <Info>The list of logical networks</Info>
                <Network ovf:name="VM Network">
                  <Description>The VM Network network</Description>
                </Network>
              </NetworkSection>
              <VirtualSystem ovf:id="web-01">
                <Info>A virtual machine</Info>
                <Name>web-01</Name>
                <OperatingSystemSection ovf:id="101" vmw:osType="debian11_64Guest">
                  <Info>The kind of installed guest operating system</Info>
                </OperatingSystemSection>
                <VirtualHardwareSection>
                  <Info>Virtual hardware requirements</Info>
                  <System>
                    <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
                    <vssd:InstanceID>0</vssd:InstanceID>
                    <vssd:VirtualSystemIdentifier>web-01</vssd:VirtualSystemIdentifier>
                    <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
                  </System>
                  <Item>
                    <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
                    <rasd:Description>Number of Virtual CPUs</rasd:Description>
                    <rasd:ElementName>4 virtual CPU(s)</rasd:ElementName>
                    <rasd:InstanceID>1</rasd:InstanceID>
                    <rasd:ResourceType>3</rasd:ResourceType>
                    <rasd:VirtualQuantity>4</rasd:VirtualQuantity>
                  </Item>
                  <Item>
                    <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
                    <rasd:Description>Memory Size</rasd:Description>
                    <rasd:ElementName>2048MB of memory</rasd:ElementName>
                    <rasd:InstanceID>2</rasd:InstanceID>
                    <rasd:ResourceType>4</rasd:ResourceType>
                    <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
                  </Item>
                  <Item>
                    <rasd:Address>0</rasd:Address>
                    <rasd:Description>SCSI Controller</rasd:Description>
                    <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
                    <rasd:InstanceID>3</rasd:InstanceID>
                    <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
                    <rasd:ResourceType>6</rasd:ResourceType>
                  </Item>
            \(items)      <Item>
                    <rasd:AddressOnParent>7</rasd:AddressOnParent>
                    <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
                    <rasd:Connection>VM Network</rasd:Connection>
                    <rasd:ElementName>Network adapter 1</rasd:ElementName>
                    <rasd:InstanceID>20</rasd:InstanceID>
                    <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
                    <rasd:ResourceType>10</rasd:ResourceType>
                  </Item>
                  <Item ovf:required="false">
                    <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
                    <rasd:ElementName>Video card</rasd:ElementName>
                    <rasd:InstanceID>21</rasd:InstanceID>
                    <rasd:ResourceType>24</rasd:ResourceType>
                  </Item>
                  <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
                </VirtualHardwareSection>
              </VirtualSystem>
            </Envelope>
            """
    }

    /// A tar of `files` (name, source path) in that order, written by Python's tarfile (USTAR).
    static func tar(_ archive: String, _ files: [(name: String, path: String)]) -> Harness.Completed {
        let script = """
            import sys, tarfile
            with tarfile.open(sys.argv[1], "w", format=tarfile.USTAR_FORMAT) as out:
                for name, path in zip(sys.argv[2::2], sys.argv[3::2]):
                    out.add(path, arcname=name)
            """
        return Harness.run(["python3", "-c", script, archive] + files.flatMap { [$0.name, $0.path] })
    }

    static func sha256(_ path: String) -> String {
        Harness.run(["sha256sum", path]).stdout.split(separator: " ").first.map(String.init) ?? ""
    }
}

@Suite(.serialized) struct ApplianceTests {
    @Test("OVA export and import: a VM exported (envelope first, then the manifest, then a streamOptimized VMDK; the manifest's digests right; the envelope well-formed with its hardware) and imported into another library boots and its disk is identical; appliances written as VirtualBox and VMware write them become the expected VMs with unknown hardware listed; a damaged manifest, a missing disk, a path-traversing name, a VMDK with a parent, a DOCTYPE and a 10 GiB envelope are refused with the reason and nothing is made")
    func appliances() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let probe = try Harness.probe("pvh")
        let source = try TestLibrary()
        #expect(source.vireo("create", "src", "--kernel", probe, "--memory", "64M", "--disk", "16M", "--cpus", "2", "--no-nic",
                             "--cmdline", "console=ttyS0 probe=blk sector=1000 seed=77").status == 0)
        #expect(source.vireo("start", "src").status == 0)
        #expect(source.waitFor(30) { source.consoleLog("src").contains("blk: devices=") })
        #expect(source.vireo("stop", "src", "--force").status == 0)

        // Export: the archive's order, its manifest, its envelope.
        let ova = directory.appendingPathComponent("src.ova").path
        let exported = source.vireo("export", "src", ova)
        #expect(exported.status == 0, "\(exported.stderr)")
        let listing = Harness.run(["tar", "tf", ova]).stdout.split(separator: "\n").map(String.init)
        #expect(listing == ["src.ovf", "src.mf", "src-disk1.vmdk", "src-kernel"], "\(listing)")
        let unpacked = directory.appendingPathComponent("unpacked").path
        try FileManager.default.createDirectory(atPath: unpacked, withIntermediateDirectories: true)
        #expect(Harness.run(["tar", "xf", ova, "-C", unpacked]).status == 0)
        let manifest = try String(contentsOfFile: unpacked + "/src.mf", encoding: .utf8)
        for file in ["src.ovf", "src-disk1.vmdk", "src-kernel"] {
            #expect(manifest.contains("SHA256(\(file))= \(ApplianceFixtures.sha256(unpacked + "/" + file))"), "\(file): \(manifest)")
        }
        #expect(Harness.run(["xmllint", "--noout", unpacked + "/src.ovf"]).status == 0)
        func xpath(_ expression: String) -> String {
            Harness.run(["xmllint", "--xpath", expression, unpacked + "/src.ovf"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(xpath("string(//*[local-name()='Item'][*[local-name()='ResourceType']='3']/*[local-name()='VirtualQuantity'])") == "2")
        #expect(xpath("string(//*[local-name()='Item'][*[local-name()='ResourceType']='4']/*[local-name()='VirtualQuantity'])") == "64")
        #expect(xpath("string(//*[local-name()='Disk']/@*[local-name()='capacity'])") == "16777216")
        #expect(xpath("count(//*[local-name()='Item'][*[local-name()='ResourceType']='20'])") == "1")
        let vmdk = Harness.run(["qemu-img", "info", "-f", "vmdk", unpacked + "/src-disk1.vmdk"]).stdout
        #expect(vmdk.contains("create type: streamOptimized"), "\(vmdk)")
        let again = source.vireo("export", "src", ova)
        #expect(again.status != 0 && again.stderr.contains("exists already"), "\(again.stderr)")

        // Import into another library: the same disk, and it boots.
        let target = try TestLibrary()
        let dry = target.vireo("import", ova, "--dry-run")
        #expect(dry.status == 0 && dry.stdout.contains("Nothing was made") && target.state("src") == nil, "\(dry.stdout) \(dry.stderr)")
        let imported = target.vireo("import", ova, "--name", "copy")
        #expect(imported.status == 0, "\(imported.stderr)")
        let compared = Harness.run(["qemu-img", "compare", source.root.path + "/src/disk0.qcow2", target.root.path + "/copy/disk0.qcow2"])
        #expect(compared.status == 0, "\(compared.stdout) \(compared.stderr)")
        #expect(target.vireo("start", "copy").status == 0)
        #expect(target.waitFor(30) { target.consoleLog("copy").contains("blk: devices=") }, "\(target.consoleLog("copy"))")
        #expect(target.consoleLog("copy").contains("blk: dev=0 capacity=32768 ro=0 id_status=0 serial= write_status=0 flush_status=0 read_status=0 match=1"),
                "\(target.consoleLog("copy"))")
        #expect(target.vireo("stop", "copy", "--force").status == 0)

        // As VirtualBox writes them: one OVA, EFI from its own section, hardware Vireo lacks listed.
        let disk = directory.appendingPathComponent("vbox-disk1.vmdk").path
        #expect(Harness.run(["qemu-img", "create", "-f", "vmdk", "-o", "subformat=streamOptimized", disk, "32M"]).status == 0)
        let vboxOVF = directory.appendingPathComponent("Debian.ovf").path
        try ApplianceFixtures.virtualBox(disk: "vbox-disk1.vmdk", capacity: 32 << 20, diskSize: UInt64(Harness.run(["stat", "-c", "%s", disk]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0)
            .write(toFile: vboxOVF, atomically: true, encoding: .utf8)
        let vboxMF = directory.appendingPathComponent("Debian.mf").path
        try "SHA1(Debian.ovf)= \(Harness.run(["sha1sum", vboxOVF]).stdout.prefix(40))\nSHA1(vbox-disk1.vmdk)= \(Harness.run(["sha1sum", disk]).stdout.prefix(40))\n"
            .write(toFile: vboxMF, atomically: true, encoding: .utf8)
        let vboxOVA = directory.appendingPathComponent("Debian.ova").path
        #expect(ApplianceFixtures.tar(vboxOVA, [("Debian.ovf", vboxOVF), ("vbox-disk1.vmdk", disk), ("Debian.mf", vboxMF)]).status == 0)
        let vbox = target.vireo("import", vboxOVA)
        #expect(vbox.status == 0, "\(vbox.stderr)")
        #expect(vbox.stdout.contains("VM:       Debian---friends") || vbox.stdout.contains("Debian---friends"), "\(vbox.stdout)")
        for warning in ["usb (resource type 23) is not imported", "sound (resource type 35) is not imported", "cdrom1: the CD/DVD drive is not imported"] {
            #expect(vbox.stdout.contains(warning), "\(warning): \(vbox.stdout)")
        }
        let vboxInfo = target.vireo("info", "Debian---friends", "--json").stdout
        #expect(vboxInfo.contains("\"cpus\" : 2") && vboxInfo.contains("\"memory_bytes\" : 1073741824") && vboxInfo.contains("\"firmware\" : \"uefi\"")
                && vboxInfo.contains("\"engine\" : \"qemu\""), "\(vboxInfo)")

        // As VMware's ovftool writes an OVF with its files beside it: two disks, EFI, 4 CPUs.
        let vmwareDirectory = directory.appendingPathComponent("vmware").path
        try FileManager.default.createDirectory(atPath: vmwareDirectory, withIntermediateDirectories: true)
        var vmwareDisks: [(file: String, capacity: UInt64, size: UInt64)] = []
        for index in 1...2 {
            let file = "web-01-disk\(index).vmdk"
            #expect(Harness.run(["qemu-img", "create", "-f", "vmdk", "-o", "subformat=streamOptimized", vmwareDirectory + "/" + file, "\(index * 8)M"]).status == 0)
            vmwareDisks.append((file, UInt64(index * 8) << 20, UInt64(Harness.run(["stat", "-c", "%s", vmwareDirectory + "/" + file]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0))
        }
        try ApplianceFixtures.vmware(disks: vmwareDisks).write(toFile: vmwareDirectory + "/web-01.ovf", atomically: true, encoding: .utf8)
        let vmware = target.vireo("import", vmwareDirectory + "/web-01.ovf")
        #expect(vmware.status == 0, "\(vmware.stderr)")
        #expect(vmware.stdout.contains("Video card (resource type 24) is not imported"), "\(vmware.stdout)")
        let vmwareInfo = target.vireo("info", "web-01").stdout
        #expect(vmwareInfo.contains("CPUs:            4") && vmwareInfo.contains("2 GiB") && vmwareInfo.contains("disk1.qcow2 (qcow2, 16 MiB"), "\(vmwareInfo)")

        // Hostile appliances: each refused naming why, and nothing made.
        let names = { target.vireo("list").stdout }
        let before = names()
        func hostile(_ name: String, _ files: [(String, String)]) -> String {
            let path = directory.appendingPathComponent(name).path
            #expect(ApplianceFixtures.tar(path, files).status == 0)
            return path
        }
        var damaged = manifest.replacingOccurrences(of: ApplianceFixtures.sha256(unpacked + "/src-disk1.vmdk"), with: String(repeating: "0", count: 64))
        try damaged.write(toFile: directory.appendingPathComponent("damaged.mf").path, atomically: true, encoding: .utf8)
        damaged = ""
        let ovf = unpacked + "/src.ovf"
        let parent = directory.appendingPathComponent("parent.vmdk").path
        #expect(Harness.run(["qemu-img", "create", "-f", "vmdk", parent, "16M"]).status == 0)
        let child = directory.appendingPathComponent("child.vmdk").path
        #expect(Harness.run(["qemu-img", "create", "-f", "vmdk", "-b", parent, "-F", "vmdk", child]).status == 0)
        let doctype = directory.appendingPathComponent("doctype.ovf").path
        try ("<?xml version=\"1.0\"?>\n<!DOCTYPE Envelope [<!ENTITY x SYSTEM \"file:///etc/shadow\">]>\n" + (try String(contentsOfFile: ovf, encoding: .utf8)).split(separator: "\n").dropFirst().joined(separator: "\n"))
            .write(toFile: doctype, atomically: true, encoding: .utf8)
        // A 10 GiB envelope: its header says so and the archive is that long (sparse).
        let huge = directory.appendingPathComponent("huge.ova").path
        let script = """
            import sys, tarfile
            info = tarfile.TarInfo("huge.ovf"); info.size = 10 << 30
            with open(sys.argv[1], "wb") as out:
                out.write(info.tobuf(format=tarfile.GNU_FORMAT)); out.truncate(512 + (10 << 30) + 1024)
            """
        #expect(Harness.run(["python3", "-c", script, huge]).status == 0)
        let cases: [(String, String)] = [
            (hostile("damaged.ova", [("src.ovf", ovf), ("src.mf", directory.appendingPathComponent("damaged.mf").path), ("src-disk1.vmdk", unpacked + "/src-disk1.vmdk"), ("src-kernel", unpacked + "/src-kernel")]),
             "src-disk1.vmdk does not match the manifest's SHA256 digest"),
            (hostile("missing.ova", [("src.ovf", ovf), ("src-kernel", unpacked + "/src-kernel")]), "the file src-disk1.vmdk the envelope names is missing"),
            (hostile("traversal.ova", [("src.ovf", ovf), ("../src-disk1.vmdk", unpacked + "/src-disk1.vmdk")]), "is not a plain file name"),
            (hostile("parent.ova", [("src.ovf", ovf), ("src-disk1.vmdk", child), ("src-kernel", unpacked + "/src-kernel")]), "names a parent image"),
            (hostile("doctype.ova", [("src.ovf", doctype)]), "a DOCTYPE (entities and DTDs are not accepted)"),
            (hostile("disk-first.ova", [("src-disk1.vmdk", unpacked + "/src-disk1.vmdk"), ("src.ovf", ovf)]), "the first member is src-disk1.vmdk, not the OVF envelope"),
            (huge, "huge.ovf in \(huge) is 10737418240 bytes; at most 4194304 are read"),
        ]
        for (path, reason) in cases {
            let refused = target.vireo("import", path, "--name", "hostile")
            #expect(refused.status != 0 && refused.stderr.contains(reason), "\(path): \(refused.stderr)")
        }
        // An OVF's neighbours that are links to files elsewhere are not read (root reads them).
        let linked = directory.appendingPathComponent("linked").path
        try FileManager.default.createDirectory(atPath: linked, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: vmwareDirectory + "/web-01.ovf", toPath: linked + "/web-01.ovf")
        for disk in vmwareDisks { try FileManager.default.createSymbolicLink(atPath: linked + "/" + disk.file, withDestinationPath: vmwareDirectory + "/" + disk.file) }
        let throughLinks = target.vireo("import", linked + "/web-01.ovf", "--name", "hostile")
        #expect(throughLinks.status != 0 && throughLinks.stderr.contains("the file web-01-disk1.vmdk the envelope names is missing"), "\(throughLinks.stderr)")
        #expect(names() == before, "a refused import left something: \(names())")

        // Export reads a disk through the chain its definition records, never a backing name
        // written into its header (which the VM's own process can write): a header pointed at a
        // host file does not carry that file into the appliance.
        let secret = directory.appendingPathComponent("secret").path
        try Data(String(repeating: "HOST-SECRET-", count: 200_000).utf8).write(to: URL(fileURLWithPath: secret))
        #expect(Harness.run(["qemu-img", "rebase", "-u", "-b", secret, "-F", "raw", source.root.path + "/src/disk0.qcow2"]).status == 0)
        let leaky = directory.appendingPathComponent("leaky.ova").path
        #expect(source.vireo("export", "src", leaky).status == 0)
        let leakyDirectory = directory.appendingPathComponent("leaky").path
        try FileManager.default.createDirectory(atPath: leakyDirectory, withIntermediateDirectories: true)
        #expect(Harness.run(["tar", "xf", leaky, "-C", leakyDirectory]).status == 0)
        #expect(Harness.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", leakyDirectory + "/src-disk1.vmdk", leakyDirectory + "/flat.raw"]).status == 0)
        let flat = try Data(contentsOf: URL(fileURLWithPath: leakyDirectory + "/flat.raw"))
        #expect(flat.range(of: Data("HOST-SECRET-".utf8)) == nil, "the export followed a backing name from the disk's header")
        #expect(target.state("hostile") == nil)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: target.root.path).filter { $0.hasPrefix(".importing") || $0.hasPrefix(".creating") }
        #expect(leftovers.isEmpty, "\(leftovers)")
    }
}
