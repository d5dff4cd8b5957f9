import CHostSupport
import Library
#if canImport(Glibc)
import Glibc
#endif

/// A qemu-engine VM's TPM 2.0 (docs/tpm.md): Debian's swtpm, started before QEMU on a listening
/// socket Vireo made (`--ctrl type=unixio,fd=`), ending when QEMU's connection closes
/// (`--terminate`). Its state is `tpm/` in the VM's directory, so it moves with the VM; QEMU
/// carries the TPM's volatile state in saves and live snapshots (its tpm-emulator migrates it).
/// A guest's TPM commands are hostile input: swtpm runs jailed as QEMU is (QEMUJail: its own
/// namespaces, a root holding only its state directory and the system's programs, the VM's
/// unprivileged uid, no capabilities, Landlock) under its own seccomp filter.
struct QEMUTPM {
    private(set) var pid: pid_t = 0

    static func socketPath(_ bundle: VMBundle) -> String { bundle.vmmDirectory + "/tpm.sock" }
    static func stateDirectory(_ bundle: VMBundle) -> String { bundle.directory + "/tpm" }

    static func start(_ vm: EngineVM, jail: QEMUJail?) throws(LibraryError) -> QEMUTPM {
        let qemuOwner = jail.map { (uid: $0.identity.uid, gid: $0.identity.gid) }
        var tpm = QEMUTPM()
        guard vm.definition.tpm else { return tpm }
        guard let binary = HostTools.find("swtpm") else {
            throw .engine(name: vm.name, reason: "its TPM is emulated by swtpm, which is not installed; install Debian's `swtpm` package (apt install swtpm swtpm-tools), or remove the TPM (`vireo set \(vm.name) --no-tpm`)", exitStatus: 2)
        }
        let bundle = vm.bundle
        let state = stateDirectory(bundle)
        guard !state.contains(",") else {
            throw .engine(name: vm.name, reason: "swtpm cannot take a state directory whose path has a comma (\(state)); use a library path without one", exitStatus: 2)
        }
        do throws(LibraryError) {
            try bundle.prepareVMMDirectory()
            if mkdir(state, 0o700) != 0 && errno != EEXIST { throw .io(operation: "mkdir", path: state, errno: errno) }
            // The state directory is swtpm's jailed uid's (a guest that broke swtpm holds it), so
            // only a name that is not there at all (lstat: not even a link) means a new TPM.
            var entry = stat()
            if lstat(state + "/" + stateFile, &entry) != 0 && errno == ENOENT {
                try manufacture(into: state, work: bundle.directory + "/.tpm-manufacture",
                                authority: HostFiles.parent(of: bundle.directory) + "/" + authorityDirectory, vmName: vm.name)
            }
            let arguments = [binary, "socket", "--tpm2", "--tpmstate", "dir=\(state),mode=0600", "--ctrl", "type=unixio,fd=5",
                             "--terminate", "--log", "fd=6,level=1"]
            // QEMU's own uid, in a jail of its own (QEMUJail): the uid may pass through the VM's
            // directory (0710, its group), and QEMU relays every guest command to the TPM anyway.
            if let owner = qemuOwner { try giveState(state, to: owner.uid) }
            let listener = try ShareServers.listen(on: socketPath(bundle), owner: qemuOwner)
            defer { close(listener) }
            let log = open(bundle.vmmDirectory + "/tpm.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0o600)
            guard log >= 0 else { throw .io(operation: "open", path: bundle.vmmDirectory + "/tpm.log", errno: errno) }
            defer { close(log) }
            // Descriptor 5: the listening socket; 6: the log (swtpm refuses `fd=2` and opens a
            // named file only after dropping to its uid).
            let inherited = [listener, log]
            if let jail {
                do throws(LibraryError) {
                    tpm.pid = try QEMUJail(sharing: jail, writable: [state]).spawn(binary, arguments, log: log, lock: -1, inherit: inherited, cgroupFiles: [])
                } catch let .engine(_, reason, status) {
                    throw .engine(name: vm.name, reason: "swtpm (its TPM): \(reason)", exitStatus: status)
                }
            } else {
                var pid: pid_t = 0
                let result = withCStrings(arguments) { argv in
                    inherited.withUnsafeBufferPointer { vireo_spawn_detached_inheriting(binary, argv, log, -1, -1, $0.baseAddress, Int32($0.count), &pid) }
                }
                guard result == 0 else {
                    throw .engine(name: vm.name, reason: "cannot start swtpm for its TPM: \(String(cString: strerror(result)))", exitStatus: 1)
                }
                tpm.pid = pid
            }
        } catch {
            tpm.stop()
            throw error
        }
        return tpm
    }

    /// swtpm's TPM 2.0 state file: present once the TPM was manufactured (or first ran).
    static let stateFile = "tpm2-00.permall"
    /// The library's TPM certificate authority (`$VIREO_HOME/tpm-ca`).
    static let authorityDirectory = "tpm-ca"

    /// Manufactures a new TPM as its maker would, with swtpm_setup (libvirt does the same): RSA
    /// and ECC endorsement keys with their certificates and a platform certificate in NV memory,
    /// locked there (`--lock-nvram`), signed by the library's own CA, which swtpm_localca makes
    /// at its first use. Windows, tpm2-tools and attestation services read the EK certificate;
    /// a verifier trusts `tpm-ca/swtpm-localca-rootca-cert.pem`. Done once; a state swtpm
    /// already holds (a TPM made before, or copied with its VM) is never made again. swtpm_setup
    /// runs as root in `work`, a directory of root's in the VM's root-owned directory, never in
    /// the state directory (whose owner could plant links for root to write through); the state
    /// file is then renamed in, which replaces whatever name is there instead of following it.
    static func manufacture(into state: String, work: String, authority: String, vmName: String) throws(LibraryError) {
        guard let setup = HostTools.find("swtpm_setup"), let localCA = HostTools.find("swtpm_localca") else {
            throw .engine(name: vmName, reason: "its new TPM is manufactured (endorsement key and certificates) with swtpm_setup and swtpm_localca, which are not installed; install Debian's `swtpm-tools` package", exitStatus: 2)
        }
        if mkdir(authority, 0o700) != 0 && errno != EEXIST { throw .io(operation: "mkdir", path: authority, errno: errno) }
        let files = [
            ("swtpm_setup.conf", "create_certs_tool = \(localCA)\ncreate_certs_tool_config = \(authority)/swtpm-localca.conf\ncreate_certs_tool_options = \(authority)/swtpm-localca.options\nactive_pcr_banks = sha256\n"),
            ("swtpm-localca.conf", "statedir = \(authority)\nsigningkey = \(authority)/signkey.pem\nissuercert = \(authority)/issuercert.pem\ncertserial = \(authority)/certserial\n"),
            ("swtpm-localca.options", "--platform-manufacturer Vireo\n--platform-version 1.0\n--platform-model Vireo\n"),
        ]
        for (name, text) in files where (try? HostFiles.readAll(authority + "/" + name)).map({ String(decoding: $0, as: UTF8.self) }) != text {
            try HostFiles.writeAtomically(Array(text.utf8), to: authority + "/" + name)
        }
        try? HostFiles.removeTree(work)
        try HostFiles.makeDirectory(work, mode: 0o700)
        defer { try? HostFiles.removeTree(work) }
        let (status, output) = HostCommand.run(setup, ["--tpm2", "--tpmstate", work, "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
                                                       "--not-overwrite", "--config", authority + "/swtpm_setup.conf", "--vmid", vmName],
                                               timeoutSeconds: 120)
        // Half a TPM is no TPM: on failure nothing reaches the state, and the next start
        // manufactures it again from nothing.
        guard status == 0, HostFiles.exists(work + "/" + stateFile) else {
            throw .engine(name: vmName, reason: "swtpm_setup could not manufacture its TPM (status \(status)): \(output.split(separator: "\n").suffix(4).joined(separator: " | "))", exitStatus: 1)
        }
        guard rename(work + "/" + stateFile, state + "/" + stateFile) == 0 else {
            throw .io(operation: "rename the new TPM's state into place", path: state + "/" + stateFile, errno: errno)
        }
    }

    /// The state directory and its files become swtpm's uid's. Names in it are not followed: a
    /// link swtpm's uid left there is changed itself, never what it points at.
    private static func giveState(_ state: String, to uid: UInt32) throws(LibraryError) {
        guard lchown(state, uid, uid) == 0, chmod(state, 0o700) == 0 else { throw .io(operation: "chown to swtpm's uid \(uid)", path: state, errno: errno) }
        guard let directory = opendir(state) else { throw .io(operation: "opendir", path: state, errno: errno) }
        defer { closedir(directory) }
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name == "." || name == ".." { continue }
            guard fchownat(dirfd(directory), name, uid, uid, AT_SYMLINK_NOFOLLOW) == 0 else {
                throw .io(operation: "chown to swtpm's uid \(uid)", path: state + "/" + name, errno: errno)
            }
        }
    }

    /// Ends swtpm (QEMU did not start) and lets its identity go.
    mutating func stop() {
        if pid > 0 {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
        pid = 0
    }
}
