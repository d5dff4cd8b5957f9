import CHostSupport
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The one way Vireo runs a host tool to completion (qemu-img, tar, ip, nft, dnsmasq,
/// debootstrap...): stdin from /dev/null (or a file the caller names), stdout and stderr together into one pipe, every
/// descriptor above 2 closed in the child, signals reset.
///
/// It reads until the tool exits, not until the pipe closes: a daemon's detached child (dnsmasq)
/// keeps the pipe open for good. Synchronous on purpose: every caller is on a thread that may
/// block (the CLI, a server `blocking` task, an image build), which is also why swift-subprocess,
/// whose interface is async, is not used (docs/design-notes.md).
public enum HostCommand {
    /// - Parameters:
    ///   - timeoutSeconds: nil waits as long as the tool takes; else it is killed then, and the
    ///     status is -1 with the output saying so.
    ///   - capacity: how much output is kept (the first bytes); `onLine` still sees every line.
    ///   - environment: nil inherits Vireo's.
    ///   - input: a file to read as standard input (sfdisk's script); nil is /dev/null.
    ///   - onLine: each line of output as it comes.
    /// - Returns: the exit status (128+N for signal N; negative when the tool could not be
    ///   started, with the reason as the output) and the output.
    public static func run(_ path: String, _ arguments: [String], timeoutSeconds: Int? = nil, capacity: Int = 1 << 20,
                           environment: [String]? = nil, input inputPath: String? = nil,
                           onLine: ((String) -> Void)? = nil) -> (status: Int32, output: String) {
        let input = open(inputPath ?? "/dev/null", O_RDONLY | O_CLOEXEC)
        if let inputPath, input < 0 { return (-1, "cannot open \(inputPath): \(String(cString: strerror(errno)))") }
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else {
            if input >= 0 { close(input) }
            return (-1, "pipe: \(String(cString: strerror(errno)))")
        }
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        var pid: pid_t = 0
        let spawned: Int32 = withCStrings([path] + arguments) { argv in
            guard let environment else { return vireo_spawn_piped(path, argv, nil, max(input, 0), ends[1], ends[1], &pid) }
            return withCStrings(environment) { envp in vireo_spawn_piped(path, argv, envp, max(input, 0), ends[1], ends[1], &pid) }
        }
        if input >= 0 { close(input) }
        close(ends[1])
        defer { close(ends[0]) }
        guard spawned == 0 else { return (-spawned, "cannot run \(path): \(String(cString: strerror(spawned)))") }

        var collected: [UInt8] = []
        var pendingLine: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16384)
        func take(_ count: Int) {
            let bytes = buffer[0..<count]
            if collected.count < capacity { collected += bytes.prefix(capacity - collected.count) }
            guard let onLine else { return }
            pendingLine += bytes
            while let newline = pendingLine.firstIndex(of: 10) {
                onLine(String(decoding: pendingLine[pendingLine.startIndex..<newline], as: UTF8.self))
                pendingLine.removeSubrange(pendingLine.startIndex...newline)
            }
        }
        var descriptor = pollfd(fd: ends[0], events: Int16(POLLIN), revents: 0)
        var status: Int32 = 0
        var open = true
        let deadline = timeoutSeconds.map { monotonicSeconds() + Double($0) }
        while true {
            if open {
                let ready = poll(&descriptor, 1, 100)
                if ready > 0 {
                    let count = buffer.withUnsafeMutableBytes { read(ends[0], $0.baseAddress, $0.count) }
                    if count > 0 { take(count) } else if count == 0 || errno != EINTR { open = false }
                }
            } else {
                usleep(20_000)
            }
            let reaped = waitpid(pid, &status, WNOHANG)
            if reaped == pid { break }
            if reaped < 0 && errno != EINTR { return (-1, "waitpid \(path): \(String(cString: strerror(errno)))") }
            if let deadline, monotonicSeconds() > deadline {
                kill(pid, SIGKILL)
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                return (-1, String(decoding: collected, as: UTF8.self) + " (did not finish within \(timeoutSeconds ?? 0) s and was killed)")
            }
        }
        // What the tool left in the pipe before it exited.
        while open, poll(&descriptor, 1, 0) > 0 {
            let count = buffer.withUnsafeMutableBytes { read(ends[0], $0.baseAddress, $0.count) }
            guard count > 0 else { break }
            take(count)
        }
        if let onLine, !pendingLine.isEmpty { onLine(String(decoding: pendingLine, as: UTF8.self)) }
        let exit = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return (exit, String(decoding: collected, as: UTF8.self))
    }

    public static func monotonicSeconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }
}

/// The children a VM's start leaves running and nobody waits for: QEMU, swtpm, vireo-vmm. A
/// short `vireo start` exits and init inherits them; a long-lived `vireo serve` would keep every
/// one that ended as a zombie until it exits itself. Their pids are kept here and `reap()` waits
/// for exactly those pids, never for any child (-1), which would steal the waits of
/// HostCommand.run and the engines' own start-up checks.
public enum DetachedChildren {
    private static let pids = Mutex<Set<pid_t>>([])

    public static func adopt(_ pid: pid_t) {
        guard pid > 0 else { return }
        pids.withLock { _ = $0.insert(pid) }
    }

    /// Reaps the adopted children that have ended; returns how many.
    @discardableResult
    public static func reap() -> Int {
        pids.withLock { set in
            var reaped = 0
            for pid in set {
                var status: Int32 = 0
                let result = waitpid(pid, &status, WNOHANG)
                // ECHILD: not (or no longer) this process's child; someone else waited.
                if result == pid || (result < 0 && errno == ECHILD) {
                    set.remove(pid)
                    reaped += 1
                }
            }
            return reaped
        }
    }
}
