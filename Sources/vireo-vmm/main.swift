import VMM
#if canImport(Glibc)
import Glibc
#endif

// One VM per process, with nothing loaded that the VM does not need: no Foundation, and the
// Swift runtime linked statically (see Package.swift). Exit statuses match `vireo run`.
VMMClock.markStart()

func report(_ error: VMMError) -> Never {
    vmmLog("error: \(error)")
    switch error {
    case .invalidConfiguration, .boot: exit(2)
    case .kvm, .memory, .bus, .host: exit(1)
    }
}

do throws(VMMError) {
    switch try VMMArguments.parse(Array(CommandLine.arguments.dropFirst())) {
    case .help:
        print(VMMArguments.usage)
    case let .run(configuration):
        let machine = try Machine(configuration: configuration)
        let outcome = try machine.run()
        vmmLog(outcome.summary)
        exit(outcome.exitCode)
    }
} catch {
    report(error)
}
