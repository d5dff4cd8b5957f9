import FuzzTargets
#if canImport(Glibc)
import Glibc
#endif

// Built two ways. With -DFUZZING and -sanitize=fuzzer (scripts/fuzz.sh), libFuzzer owns main and
// calls LLVMFuzzerTestOneInput; VIREO_FUZZ_TARGET picks the target. Otherwise this replays files:
// `vireo-fuzz TARGET FILE...`, how a crash libFuzzer found is reproduced under a debugger.
#if FUZZING
nonisolated(unsafe) let selected: (UnsafeRawBufferPointer) -> Void = {
    let name = getenv("VIREO_FUZZ_TARGET").map { String(cString: $0) } ?? ""
    guard let target = Fuzz.target(named: name) else {
        var message = Array("vireo-fuzz: set VIREO_FUZZ_TARGET to virtqueue or qcow2\n".utf8)
        _ = message.withUnsafeMutableBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
        exit(2)
    }
    return target
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzerTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    selected(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}
#else
@main
struct Replay {
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        guard let name = arguments.first, let target = Fuzz.target(named: name) else {
            print("usage: vireo-fuzz virtqueue|qcow2 FILE...   (libFuzzer builds: scripts/fuzz.sh)")
            exit(2)
        }
        Fuzz.replay(Array(arguments.dropFirst()), target)
    }
}
#endif
