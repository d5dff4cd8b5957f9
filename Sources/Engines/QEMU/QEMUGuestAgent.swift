import FoundationEssentials
import Library
#if canImport(Glibc)
import Glibc
#endif

/// `vireo exec` on the qemu engine: qemu-guest-agent's `guest-exec` and `guest-exec-status`
/// over the VM's virtio-serial port (docs/guest-agent.md).
extension QEMUEngine: GuestAgentEngine {
    public func exec(_ vm: EngineVM, command: [String], timeoutSeconds: Int) throws(LibraryError) -> GuestExecResult {
        try Self.guestExec(agentPath: vm.bundle.guestAgentPath, vmName: vm.name, command: command, timeoutSeconds: timeoutSeconds)
    }

    /// The exchange itself, on the agent's socket at `agentPath`.
    static func guestExec(agentPath: String, vmName: String, command: [String], timeoutSeconds: Int) throws(LibraryError) -> GuestExecResult {
        guard let path = command.first, !path.isEmpty else { throw .invalidValue(field: "COMMAND", reason: "missing; give the program to run and its arguments") }
        struct Exec: Encodable {
            var path: String
            var arg: [String]
            var captureOutput = true
            enum CodingKeys: String, CodingKey { case path, arg, captureOutput = "capture-output" }
        }
        struct Started: Decodable { var pid: Int }
        struct Status: Encodable { var pid: Int }
        struct Finished: Decodable {
            var exited: Bool
            var exitcode: Int32?
            var signal: Int32?
            var outData: String?
            var errData: String?
            var outTruncated: Bool?
            var errTruncated: Bool?
            enum CodingKeys: String, CodingKey {
                case exited, exitcode, signal, outData = "out-data", errData = "err-data", outTruncated = "out-truncated", errTruncated = "err-truncated"
            }
        }
        func failure(_ error: QMPConnection.Failure) -> LibraryError {
            .engine(name: vmName, reason: "the guest agent: \(error)", exitStatus: 1)
        }
        let agent: QMPConnection
        do { agent = try QMPConnection(path: agentPath, timeoutSeconds: 10, peer: .guestAgent) } catch {
            throw .engine(name: vmName, reason: "no guest agent answers (\(error)); install and start qemu-guest-agent in the guest (`vireo image build` images have it)", exitStatus: 1)
        }
        let started: Started
        do { started = try agent.execute("guest-exec", arguments: Exec(path: path, arg: Array(command.dropFirst())), as: Started.self) } catch {
            throw failure(error)
        }
        let deadline = HostCommand.monotonicSeconds() + Double(timeoutSeconds)
        while true {
            let status: Finished
            do { status = try agent.execute("guest-exec-status", arguments: Status(pid: started.pid), as: Finished.self) } catch { throw failure(error) }
            if status.exited {
                func decode(_ text: String?) -> [UInt8] { text.flatMap { Data(base64Encoded: $0) }.map(Array.init) ?? [] }
                return GuestExecResult(exitCode: status.exitcode ?? (status.signal.map { 128 + $0 } ?? 1), signal: status.signal,
                                       stdout: decode(status.outData), stderr: decode(status.errData),
                                       truncated: status.outTruncated == true || status.errTruncated == true)
            }
            guard HostCommand.monotonicSeconds() < deadline else {
                throw .engine(name: vmName, reason: "\(path) (pid \(started.pid) in the guest) still runs after \(timeoutSeconds) s; it was left running", exitStatus: 1)
            }
            usleep(100_000)
        }
    }
}
