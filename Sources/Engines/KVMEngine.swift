import API
import CHostSupport
import Library
#if canImport(Glibc)
import Glibc
#endif

/// Runs library VMs on Vireo's own VMM: each one a detached `vireo-vmm` process that holds the
/// VM's lock for as long as it lives.
public struct KVMEngine: Sendable {
    /// The `vireo-vmm` executable: `$VIREO_VMM`, else the one beside the running `vireo`.
    public let vmmPath: String

    public init(environment: [String: String]) {
        if let path = environment["VIREO_VMM"], !path.isEmpty {
            vmmPath = path
        } else {
            var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
            let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
            let me = count > 0 ? String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "vireo"
            vmmPath = (me.lastIndex(of: "/").map { String(me[..<$0]) } ?? ".") + "/vireo-vmm"
        }
    }

    /// The `vireo-vmm` arguments for a definition (everything but the process plumbing).
    public static func machineArguments(_ definition: VMDefinition, bundle: VMBundle) throws(LibraryError) -> [String] {
        guard definition.engine == "kvm" else {
            throw .wrongState(name: definition.name, state: "configured for the '\(definition.engine)' engine", action: "start",
                              hint: "this Vireo only has the kvm engine")
        }
        guard let kernel = definition.kernel else {
            throw .wrongState(name: definition.name, state: "without a kernel", action: "start",
                              hint: "give it one with `vireo set \(definition.name) --kernel PATH` (the kvm engine boots Linux kernels directly)")
        }
        var arguments = ["--kernel", bundle.resolve(kernel), "--cmdline", definition.commandLine,
                         "--cpus", String(definition.cpus), "--memory", String(definition.memoryBytes >> 10) + "K"]
        if let initrd = definition.initrd { arguments += ["--initrd", bundle.resolve(initrd)] }
        for disk in definition.disks {
            var text = bundle.resolve(disk.path) + ",format=" + disk.format.rawValue
            if disk.readOnly { text += ",readonly" }
            if let serial = disk.serial { text += ",serial=" + serial }
            arguments += ["--disk", text]
        }
        for network in definition.networks { arguments += ["--net", "tap:\(network.tap),mac=\(network.mac)"] }
        if let cid = definition.vsockCID { arguments += ["--vsock", "\(bundle.vsockPath),cid=\(cid)"] }
        if definition.balloon { arguments += ["--balloon", "deflate-on-oom,stats=5"] }
        if definition.entropyDevice { arguments.append("--rng") }
        arguments += ["--acpi", definition.acpi ? "on" : "off", "--on-reboot", definition.onReboot]
        if let generationID = definition.generationID { arguments += ["--generation-id", generationID] }
        return arguments
    }

    /// Starts the VM and returns its pid once it runs. The lock is taken here and handed to the
    /// VM process, so two starts (or a start and a delete) cannot both win; when this returns
    /// normally, the VM is running and answering on its control socket.
    public func start(_ name: String, library: VMLibrary) throws(LibraryError) -> Int32 {
        let bundle = try library.bundle(named: name)
        let lock = try VMLock(path: bundle.lockPath, create: true)
        guard lock.tryExclusive() else {
            let state = library.status(of: bundle).state
            if state == .busy { throw .busy(name: name) }
            throw .wrongState(name: name, state: state.rawValue, action: "start",
                              hint: state == .paused ? "resume it with `vireo resume \(name)`" : "see `vireo info \(name)`, or attach with `vireo console \(name)`")
        }
        guard lock.isCurrent else { throw .notFound(name: name, root: library.root) }
        let definition = try bundle.load()
        var arguments = [vmmPath] + (try Self.machineArguments(definition, bundle: bundle))
        arguments += ["--console", "file:" + bundle.consoleLogPath, "--control", bundle.controlPath,
                      "--name", definition.name, "--uuid", definition.uuid, "--lock-fd", "3", "--ready-fd", "4"]

        // The previous run's console output stays readable as console.log.1.
        if HostFiles.size(bundle.consoleLogPath) > 0 { _ = rename(bundle.consoleLogPath, bundle.consoleLogPath + ".1") }
        let log = open(bundle.vmmLogPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard log >= 0 else { throw .io(operation: "open", path: bundle.vmmLogPath, errno: errno) }
        defer { close(log) }
        var pipeEnds: [Int32] = [-1, -1]
        guard pipe(&pipeEnds) == 0 else { throw .io(operation: "pipe", path: bundle.directory, errno: errno) }
        for end in pipeEnds { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        defer { close(pipeEnds[0]) }

        var pid: pid_t = 0
        let spawned = withCStrings(arguments) { argv in
            vireo_spawn_detached(vmmPath, argv, log, lock.fd, pipeEnds[1], &pid)
        }
        close(pipeEnds[1])
        guard spawned == 0 else {
            throw .engine(name: name, reason: "cannot run \(vmmPath): \(String(cString: strerror(spawned)))", exitStatus: 1)
        }
        try? HostFiles.writeAtomically(Array("\(pid)\n".utf8), to: bundle.pidPath)

        let answer = Self.readLine(pipeEnds[0], timeoutMilliseconds: 120_000)
        if answer.hasPrefix("ready") { return pid }
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == 0 && answer.isEmpty {
            // Alive but silent for two minutes: do not leave a half-started VM behind.
            kill(pid, SIGKILL)
            waitpid(pid, &status, 0)
            throw .engine(name: name, reason: "vireo-vmm did not report ready within 120 s and was killed; see \(bundle.vmmLogPath)", exitStatus: 1)
        }
        if answer.hasPrefix("error ") {
            let rest = answer.dropFirst(6)
            let code = Int32(rest.prefix(while: { $0 != " " })) ?? 1
            let message = rest.drop(while: { $0 != " " }).dropFirst()
            throw .engine(name: name, reason: "did not start: \(message)", exitStatus: code)
        }
        throw .engine(name: name, reason: "vireo-vmm exited before the VM was ready; see \(bundle.vmmLogPath)", exitStatus: 1)
    }

    static func readLine(_ fd: Int32, timeoutMilliseconds: Int32) -> String {
        var collected: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1024)
        var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while !collected.contains(0x0a) {
            let ready = poll(&descriptor, 1, timeoutMilliseconds)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { break }
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            collected += buffer[0..<count]
        }
        return String(decoding: collected.prefix(while: { $0 != 0x0a }), as: UTF8.self)
    }
}

/// Calls `body` with a NULL-terminated C array of the strings.
func withCStrings<T>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> T) -> T {
    let array = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: strings.count + 1)
    for (index, string) in strings.enumerated() { array[index] = strdup(string) }
    array[strings.count] = nil
    defer {
        for index in 0..<strings.count { free(array[index]) }
        array.deallocate()
    }
    return body(array)
}
