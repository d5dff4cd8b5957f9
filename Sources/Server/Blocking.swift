import Library
import NIOPosix

/// Library and engine calls block (files, locks, a VMM's control socket, waiting for a guest to
/// stop), so they run on NIO's blocking-I/O thread pool, never on the cooperative pool or an
/// event loop. A library refusal comes back as its problem.
func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    do {
        return try await NIOThreadPool.singleton.runIfActive(body)
    } catch let error as LibraryError {
        throw APIProblem(error)
    }
}
