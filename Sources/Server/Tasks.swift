import FoundationEssentials
import Library
import Synchronization

/// Long work the API does in the background (clones, saves, image builds), as VirtualBox's
/// progress objects and Proxmox's tasks: created at once (202 and a `Location`), polled at
/// `/api/tasks/{id}` or followed on `/api/events`. Kept in memory: a task belongs to the
/// server that runs it, and the work itself is in the library either way.
public final class TaskRegistry: Sendable {
    public struct Record: Encodable, Sendable {
        public var id: String
        /// `clone`, `save`, `migrate`, `receive`, `image-build`, `image-import`, `image-export`.
        public var kind: String
        /// The VM or image it works on.
        public var target: String
        /// `running`, `succeeded` or `failed`.
        public var state: String
        /// 0 to 1 when the work can tell how far it is; null when it cannot.
        public var progress: Double?
        /// The latest step the work reported.
        public var message: String?
        public var createdAt: Double
        public var finishedAt: Double?
        /// What the work made (the clone's name, the image's name).
        public var result: [String: String]?
        public var error: APIProblem.Body?
        /// Whether `DELETE /api/tasks/{id}` can stop it (a migration can; a copy cannot).
        public var cancellable: Bool
        /// A cancel was asked for; the work stops at its next safe point.
        public var cancelRequested: Bool?
        /// Bumped on every change, so a stream sends only what changed.
        public var revision: Int
    }

    /// What running work sees of its task: where to report, and whether to stop.
    public struct Context: Sendable {
        let registry: TaskRegistry
        let id: String
        public func progress(_ fraction: Double?, _ message: String) {
            registry.update(id) { $0.progress = fraction.map { min(max($0, 0), 1) } ?? $0.progress; $0.message = message }
        }
        public var isCancelled: Bool { registry.find(id)?.cancelRequested == true }
    }

    private struct State {
        var records: [String: Record] = [:]
        var order: [String] = []
        var revision = 0
        /// What stops a running task's wait at once (a listener to shut down), by task id.
        var cancelHooks: [String: @Sendable () -> Void] = [:]
    }

    private let state = Mutex(State())
    /// Finished tasks kept for clients that poll late.
    static let keptFinished = 200

    public init() {}

    var revision: Int { state.withLock { $0.revision } }

    func all() -> [Record] { state.withLock { state in state.order.compactMap { state.records[$0] } } }

    func find(_ id: String) -> Record? { state.withLock { $0.records[id] } }

    func changed(since revision: Int) -> [Record] { all().filter { $0.revision > revision } }

    /// Starts `work` on its own thread; it reports progress through the closure it is given and
    /// returns its result, or throws the library's error.
    func start(kind: String, target: String, cancellable: Bool = false, onCancel: (@Sendable () -> Void)? = nil,
               _ work: @escaping @Sendable (Context) throws(LibraryError) -> [String: String]) -> Record {
        let id = UUID().uuidString.lowercased()
        let now = Date().timeIntervalSince1970
        let record = state.withLock { state -> Record in
            state.revision += 1
            let record = Record(id: id, kind: kind, target: target, state: "running", createdAt: now, cancellable: cancellable, revision: state.revision)
            state.records[id] = record
            state.order.append(id)
            state.cancelHooks[id] = onCancel
            let finished = state.order.filter { state.records[$0]?.state != "running" }
            for old in finished.dropLast(Self.keptFinished) {
                state.records[old] = nil
                state.order.removeAll { $0 == old }
            }
            return record
        }
        let started = spawnReaderThread { [self] in
            let result: Result<[String: String], LibraryError>
            do throws(LibraryError) {
                result = .success(try work(Context(registry: self, id: id)))
            } catch { result = .failure(error) }
            _ = self.state.withLock { $0.cancelHooks.removeValue(forKey: id) }
            self.update(id) { record in
                record.finishedAt = Date().timeIntervalSince1970
                switch result {
                case let .success(value): record.state = "succeeded"; record.progress = 1; record.result = value
                case let .failure(error): record.state = "failed"; record.error = APIProblem(error).body
                }
            }
        }
        if !started {
            update(id) { $0.state = "failed"; $0.finishedAt = now
                $0.error = APIProblem(.internalServerError, kind: "host", detail: "could not start a thread for the task").body }
        }
        return find(id) ?? record
    }

    /// The running task that works on VM `name` (a save, clone or migration), if any.
    func running(onVM name: String) -> Record? {
        all().first { $0.state == "running" && $0.target == name && ["save", "clone", "migrate"].contains($0.kind) }
    }

    /// Asks cancellable running work to stop; false when the task cannot be cancelled (or ended).
    func cancel(_ id: String) -> Bool {
        guard let record = find(id), record.cancellable, record.state == "running" else { return false }
        update(id) { $0.cancelRequested = true }
        state.withLock { $0.cancelHooks[id] }?()
        return true
    }

    fileprivate func update(_ id: String, _ change: (inout Record) -> Void) {
        state.withLock { state in
            guard var record = state.records[id] else { return }
            change(&record)
            state.revision += 1
            record.revision = state.revision
            state.records[id] = record
        }
    }
}
