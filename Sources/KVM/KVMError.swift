#if canImport(Glibc)
import Glibc
#endif

/// A failed KVM or host system call. Keeps the operation that failed and the errno it returned,
/// so callers can tell "KVM refused this value" (EINVAL) from "the host is out of memory" (ENOMEM).
public struct KVMError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let errno: Int32

    public init(operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        "\(operation) failed: \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

/// The single funnel for system calls: every `-1` becomes a `KVMError` carrying errno.
/// `EINTR` is retried unless the caller wants to see it (KVM_RUN surfaces it: that is how a vCPU
/// is kicked out of the guest).
@inline(__always)
func systemCall(_ operation: @autoclosure () -> String, retryOnInterrupt: Bool = true,
                _ body: () -> Int32) throws(KVMError) -> Int32 {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR && retryOnInterrupt { continue }
        throw KVMError(operation: operation(), errno: code)
    }
}
