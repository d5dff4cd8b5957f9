import CFuzzDriver
import FuzzTargets
#if canImport(Glibc)
import Glibc
#endif

// Built with -sanitize=fuzzer (scripts/fuzz.sh), this hands the target named by
// VIREO_FUZZ_TARGET to libFuzzer. Built normally it replays files: `vireo-fuzz TARGET FILE...`,
// how a crash libFuzzer found is reproduced under a debugger.
nonisolated(unsafe) let selectedTarget: (UnsafeRawBufferPointer) -> Void = {
    let name = getenv("VIREO_FUZZ_TARGET").map { String(cString: $0) } ?? ""
    guard let target = Fuzz.target(named: name) else { FuzzMain.fail("VIREO_FUZZ_TARGET must be one of \(Fuzz.targetNames.joined(separator: ", "))") }
    return target
}()

// What libFuzzer calls, whether its own main runs (some linkers pull it in) or ours does.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzerTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    selectedTarget(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

@main
struct FuzzMain {
    static func main() {
        let environment = getenv("VIREO_FUZZ_TARGET").map { String(cString: $0) }
        if environment != nil {
            let status = vireo_run_fuzzer(CommandLine.argc, CommandLine.unsafeArgv) { data, size in
                fuzzerTestOneInput(data, size)
            }
            guard status >= 0 else { fail("this build has no libFuzzer; build it with scripts/fuzz.sh") }
            exit(status)
        }
        let arguments = Array(CommandLine.arguments.dropFirst())
        // `vireo-fuzz seed TARGET DIR`: writes the target's seeds into a corpus directory.
        if arguments.count == 3, arguments[0] == "seed" {
            for (index, seed) in Fuzz.seeds(named: arguments[1]).enumerated() {
                let fd = open(arguments[2] + "/seed-\(index)", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                guard fd >= 0 else { fail("cannot write a seed into \(arguments[2])") }
                _ = seed.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                close(fd)
            }
            return
        }
        guard let name = arguments.first, let target = Fuzz.target(named: name) else {
            fail("usage: vireo-fuzz \(Fuzz.targetNames.joined(separator: "|")) FILE...   (libFuzzer builds: scripts/fuzz.sh)")
        }
        Fuzz.replay(Array(arguments.dropFirst()), target)
    }

    static func fail(_ message: String) -> Never {
        var bytes = Array("vireo-fuzz: \(message)\n".utf8)
        _ = bytes.withUnsafeMutableBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
        exit(2)
    }
}
