import Foundation
import Testing

@Suite(.serialized) struct StoragePoolTests {
    @Test("storage pools: a dir pool makes thin qcow2 volumes (vireo disk create --pool, vireo create --disk --pool) a VM writes to; block, nbd and iscsi pools attach a device, an export and a LUN by name; pool info lists volumes (an NBD server's exports and an iSCSI target's disk LUNs with their sizes, or why they cannot be listed) and users; a pool in use is not deleted and deleting one leaves its volumes; a missing directory, a directory in the library, a non-device, a server that does not answer, an export in an nbd pool's URI, a volume name with a path and a volume of a pool Vireo cannot make are refused naming the field, and nothing is made")
    func pools() throws {
        try Harness.requireKVM()
        let directory = try Harness.temporaryDirectory()
        let probe = try Harness.probe("pvh")
        let library = try TestLibrary()
        let store = directory.appendingPathComponent("store").path
        try FileManager.default.createDirectory(atPath: store, withIntermediateDirectories: true)

        // Refusals first: each names the field, and no pool is defined by them.
        let refusals: [([String], String)] = [
            (["pool", "create", "p", "--type", "dir", directory.appendingPathComponent("absent").path], "path: \(directory.path)/absent is not an existing directory"),
            (["pool", "create", "p", "--type", "block", "/dev/null"], "device: /dev/null is not a block device"),
            (["pool", "create", "p", "--type", "nbd", "nbd://127.0.0.1:\(NBDServer.freePort())"], "connect failed"),
            (["pool", "create", "p", "--type", "nbd", "nbd://127.0.0.1:10809/exp"], "names the export 'exp'"),
            (["pool", "create", "p", "--type", "iscsi", "127.0.0.1:\(NBDServer.freePort())", ISCSITarget.targetName], "connect failed"),
            (["pool", "create", "p", "--type", "iscsi", "127.0.0.1"], "target: an iscsi pool needs the target's IQN"),
            (["pool", "create", "p", "--type", "lvm", store], "--type: 'lvm' is not one of dir, block, nbd, iscsi"),
            (["pool", "create", "p/x", "--type", "dir", store], "must be"),
        ]
        for (arguments, reason) in refusals {
            let refused = library.vireo(arguments: arguments)
            #expect(refused.status != 0 && refused.stderr.contains(reason), "\(arguments): \(refused.stderr)")
        }
        #expect(library.vireo("pool", "list").stdout.split(separator: "\n").count == 1, "\(library.vireo("pool", "list").stdout)")

        // A dir pool: volumes made thin, a VM's disk made in it, a VM writing to it.
        #expect(library.vireo("pool", "create", "local", "--type", "dir", store).status == 0)
        let inLibrary = library.vireo("pool", "create", "p", "--type", "dir", library.root.path)
        #expect(inLibrary.status != 0 && inLibrary.stderr.contains("lies in the library"), "\(inLibrary.stderr)")
        let volume = library.vireo("disk", "create", "--pool", "local", "data", "--size", "20M")
        #expect(volume.status == 0 && volume.stdout.contains("created \(store)/data.qcow2 in pool 'local': qcow2, 20 MiB"), "\(volume.stdout) \(volume.stderr)")
        #expect(Harness.run(["qemu-img", "check", "\(store)/data.qcow2"]).status == 0)
        let again = library.vireo("disk", "create", "--pool", "local", "data", "--size", "20M")
        #expect(again.status != 0 && again.stderr.contains("already exists"), "\(again.stderr)")
        let sneaky = library.vireo("disk", "create", "--pool", "local", "../escape", "--size", "20M")
        #expect(sneaky.status != 0 && sneaky.stderr.contains("is not a file name"), "\(sneaky.stderr)")
        let created = library.vireo("create", "pooled", "--kernel", probe, "--memory", "64M", "--disk", "30M", "--pool", "local", "--no-nic",
                                    "--cmdline", "console=ttyS0 probe=blk sector=1000 seed=77")
        #expect(created.status == 0, "\(created.stderr)")
        #expect(FileManager.default.fileExists(atPath: "\(store)/pooled.qcow2"))
        #expect(!FileManager.default.fileExists(atPath: library.root.appendingPathComponent("pooled/disk0.qcow2").path))
        #expect(library.vireo("disk", "attach", "pooled", "data.qcow2", "--pool", "local").status == 0)
        let missing = library.vireo("disk", "attach", "pooled", "nothing.qcow2", "--pool", "local")
        #expect(missing.status != 0 && missing.stderr.contains("does not exist"), "\(missing.stderr)")
        #expect(library.vireo("start", "pooled").status == 0)
        #expect(library.waitFor(30) { library.consoleLog("pooled").contains("blk: devices=") }, "\(library.consoleLog("pooled"))")
        #expect(library.consoleLog("pooled").contains("blk: dev=0 capacity=61440 ro=0 id_status=0 serial= write_status=0 flush_status=0 read_status=0 match=1"),
                "\(library.consoleLog("pooled"))")
        #expect(library.vireo("stop", "pooled", "--force").status == 0)
        let info = library.vireo("pool", "info", "local").stdout
        #expect(info.contains("Volume:") && info.contains("data.qcow2 (qcow2, 20 MiB") && info.contains("pooled.qcow2 (qcow2, 30 MiB"), "\(info)")
        #expect(info.contains("Used by:  pooled (\(store)/pooled.qcow2)") || info.contains("pooled (\(store)/pooled.qcow2)"), "\(info)")
        let inUse = library.vireo("pool", "delete", "local")
        #expect(inUse.status != 0 && inUse.stderr.contains("VMs use volumes in 'local': pooled"), "\(inUse.stderr)")

        // Pools whose volumes Vireo does not make: a device, an NBD server, an iSCSI target.
        let loop = try LoopDevice(file: directory.appendingPathComponent("loop.raw").path, size: "16M")
        #expect(library.vireo("pool", "create", "dev", "--type", "block", loop.path).status == 0)
        let image = directory.appendingPathComponent("export.raw").path
        #expect(Harness.run(["truncate", "-s", "8M", image]).status == 0)
        let server = try NBDServer(image: image, socket: directory.appendingPathComponent("nbd.sock").path)
        #expect(library.vireo("pool", "create", "exports", "--type", "nbd", "nbd+unix:///?socket=\(server.socket)").status == 0)
        let lun = directory.appendingPathComponent("lun.raw").path
        #expect(Harness.run(["truncate", "-s", "4M", lun]).status == 0)
        let target = try ISCSITarget(image: lun, port: NBDServer.freePort())
        #expect(library.vireo("pool", "create", "san", "--type", "iscsi", "127.0.0.1:\(target.port)", ISCSITarget.targetName, "--shared").status == 0)
        let cannot = library.vireo("disk", "create", "--pool", "exports", "new", "--size", "8M")
        #expect(cannot.status != 0 && cannot.stderr.contains("holds the NBD server's exports, which the server makes"), "\(cannot.stderr)")
        #expect(library.vireo("create", "many", "--kernel", probe, "--memory", "64M", "--no-disk", "--no-nic", "--cmdline", "console=ttyS0 probe=blk").status == 0)
        for (volume, pool) in [("", "dev"), ("exp", "exports"), ("1", "san")] {
            let attached = library.vireo(arguments: ["disk", "attach", "many", volume, "--pool", pool])
            #expect(attached.status == 0, "\(pool): \(attached.stderr)")
        }
        let badLUN = library.vireo("disk", "attach", "many", "lun-one", "--pool", "san")
        #expect(badLUN.status != 0 && badLUN.stderr.contains("is not a LUN number"), "\(badLUN.stderr)")
        #expect(library.vireo("start", "many").status == 0)
        #expect(library.waitFor(30) { library.consoleLog("many").contains("blk: devices=") }, "\(library.consoleLog("many")) \(library.vmmLog("many"))")
        let console = library.consoleLog("many")
        for capacity in [32768, 16384, 8192] {
            #expect(console.contains("capacity=\(capacity) ro=0 id_status=0 serial= write_status=0 flush_status=0 read_status=0 match=1"), "\(capacity): \(console)")
        }
        #expect(library.vireo("stop", "many", "--force").status == 0)
        let list = library.vireo("pool", "list").stdout
        #expect(list.contains("san") && list.contains("127.0.0.1:\(target.port) \(ISCSITarget.targetName)") && list.contains("yes"), "\(list)")
        #expect(library.vireo("pool", "info", "exports").stdout.contains("Used by:  many (nbd+unix:///exp?socket=\(server.socket))"), "\(library.vireo("pool", "info", "exports").stdout)")
        // The target's LUNs that are disks (REPORT LUNS, READ CAPACITY): LUN 1, not the
        // controller LUN 0 tgtd adds.
        let san = library.vireo("pool", "info", "san").stdout
        #expect(san.contains("Volume:   1 (raw, 4 MiB)") && !san.contains("Volume:   0 "), "\(san)")
        // The server's exports, as it lists them (NBD_OPT_LIST), with their sizes (NBD_OPT_INFO).
        #expect(library.vireo("pool", "info", "exports").stdout.contains("Volume:   exp (raw, 8 MiB)"), "\(library.vireo("pool", "info", "exports").stdout)")
        let listed = (try? JSONSerialization.jsonObject(with: Data(library.vireo("pool", "info", "exports", "--json").stdout.utf8))) as? [String: Any]
        let exports = listed?["volumes"] as? [[String: Any]] ?? []
        #expect(exports.count == 1 && exports.first?["name"] as? String == "exp" && exports.first?["virtual_size"] as? Int == 8 << 20
                && exports.first?["path"] as? String == "nbd+unix:///exp?socket=\(server.socket)", "\(String(describing: listed))")
        server.kill()
        let gone = library.vireo("pool", "info", "exports")
        #expect(gone.status == 0 && gone.stdout.contains("Volumes:  cannot be listed:"), "\(gone.stdout) \(gone.stderr)")

        // Deleting: the VMs go, their pool volumes stay; then the pools go, their volumes stay.
        #expect(library.vireo("delete", "pooled").status == 0 && library.vireo("delete", "many").status == 0)
        #expect(FileManager.default.fileExists(atPath: "\(store)/pooled.qcow2") && FileManager.default.fileExists(atPath: "\(store)/data.qcow2"))
        for pool in ["local", "dev", "exports", "san"] {
            let deleted = library.vireo("pool", "delete", pool)
            #expect(deleted.status == 0, "\(pool): \(deleted.stderr)")
        }
        #expect(FileManager.default.fileExists(atPath: "\(store)/pooled.qcow2"))
        #expect(library.vireo("pool", "list").stdout.split(separator: "\n").count == 1)
    }

    @Test("pools and appliances through the REST API: a pool inside the allowed paths is defined and one outside refused naming the flag, a volume made and listed, a VM exported as an OVA by a task and planned back with dry_run; bad input is a 422, never a 500")
    func poolsAndAppliancesThroughTheAPI() throws {
        let directory = try Harness.temporaryDirectory()
        let library = try TestLibrary()
        #expect(library.vireo("create", "exp", "--kernel", try Harness.probe("pvh"), "--memory", "64M", "--disk", "8M", "--no-nic").status == 0)
        let served = try Served(library)
        let api = served.api
        let outside = try api.request("POST", "/api/pools", json: ["name": "etc", "type": "dir", "source": "/etc"])
        #expect(outside.status == 422 && outside.text.contains("--allow-path"), "\(outside.status) \(outside.text)")
        for bad in [["name": "x", "type": "lvm", "source": directory.path], ["name": "x", "type": "nbd", "source": ""], ["name": "", "type": "dir", "source": directory.path]] {
            let refused = try api.request("POST", "/api/pools", json: bad)
            #expect(refused.status == 422, "\(bad): \(refused.status) \(refused.text)")
        }
        let made = try api.request("POST", "/api/pools", json: ["name": "here", "type": "dir", "source": directory.path])
        #expect(made.status == 201, "\(made.status) \(made.text)")
        let volume = try api.request("POST", "/api/pools/here/volumes", json: ["name": "data", "size_bytes": 8 << 20])
        #expect(volume.status == 201 && FileManager.default.fileExists(atPath: directory.path + "/data.qcow2"), "\(volume.status) \(volume.text)")
        let pool = try api.request("GET", "/api/pools/here")
        #expect(pool.status == 200 && pool.text.contains("data.qcow2"), "\(pool.text)")
        #expect(try api.request("GET", "/api/pools/nothing").status == 404)
        let badServer = try api.request("POST", "/api/migrations/receive", json: ["allow_disk_servers": [""], "listen": "127.0.0.1:0"])
        #expect(badServer.status == 422, "\(badServer.status) \(badServer.text)")

        let ova = directory.path + "/exp.ova"
        let export = try api.request("POST", "/api/vms/exp/export", json: ["path": ova])
        #expect(export.status == 202, "\(export.status) \(export.text)")
        let location = try #require(export.headers["location"] ?? export.headers["Location"])
        var task: [String: Any] = [:]
        let deadline = Date().addingTimeInterval(120)
        repeat { task = try api.request("GET", location).object; Thread.sleep(forTimeInterval: 0.2) } while task["state"] as? String == "running" && Date() < deadline
        #expect(task["state"] as? String == "succeeded", "\(task)")
        let plan = try api.request("POST", "/api/appliances/import", json: ["path": ova, "name": "back", "dry_run": true])
        #expect(plan.status == 200 && plan.object["name"] as? String == "back" && (plan.object["disks"] as? [Any])?.count == 1, "\(plan.status) \(plan.text)")
        #expect(library.state("back") == nil)
        #expect(try api.request("DELETE", "/api/pools/here").status == 200)
    }
}
