// swift-tools-version: 6.1
import PackageDescription

/// The C and C++ libraries the per-command programs use besides glibc (libstdc++ and libgcc's
/// unwinder for the Swift runtime, zlib, libseccomp, libxcrypt) are linked in from their archives
/// too: each shared library the loader maps and relocates at start cost vireo-vmm's first byte and
/// every `vireo` command time (bench/README.md, "Loading fewer shared libraries"). The linker
/// scripts in Linking/static-archives, first on the library path, turn -lstdc++ (which the Swift
/// driver adds itself), -lz and the rest into their archives; lld reads them wherever they appear
/// on the command line. glibc stays shared: the network-disk libraries vireo-vmm loads with
/// dlopen need the process's own libc.
let staticArchives = Context.packageDirectory + "/Linking/static-archives"

/// A program run once per command (`vireo list` in a script's loop) links the Swift runtime and
/// FoundationEssentials in: the dynamic loader's work on the shared Swift libraries was a third of
/// `vireo list`'s time (bench/README.md). SwiftPM's -static-stdlib leaves out two archives
/// FoundationEssentials needs; lld, unlike GNU ld, does not warn about glibc's mktemp in them.
let staticSwiftRuntimeWithFoundation: [LinkerSetting] = [
    .unsafeFlags(["-static-stdlib", "-use-ld=lld", "-Xlinker", "-l_FoundationCShims", "-Xlinker", "-l_FoundationCollections",
                  "-Xclang-linker", "-L\(staticArchives)"]),
]

let package = Package(
    name: "Vireo",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vireo", targets: ["vireo"]),
        .executable(name: "vireo-server", targets: ["vireo-server"]),
        .executable(name: "vireo-vmm", targets: ["vireo-vmm"]),
        .executable(name: "containerd-shim-vireo-v2", targets: ["containerd-shim-vireo-v2"]),
        .executable(name: "vireo-container-agent", targets: ["vireo-container-agent"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // `vireo serve`: HTTP/1.1 with WebSocket upgrades on SwiftNIO. Hummingbird's default traits
        // pull in swift-configuration and full Foundation, which Vireo does not use.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        .package(url: "https://github.com/hummingbird-project/hummingbird-websocket", from: "2.8.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
    ],
    targets: [
        .target(name: "CKVM"),
        .target(name: "KVM", dependencies: ["CKVM"]),
        .target(name: "GuestMemory", dependencies: ["MachineSpec", "CHostSupport"]),
        .target(name: "X86Boot", dependencies: ["MachineSpec", "GuestMemory"]),
        .target(name: "Devices", dependencies: ["MachineSpec", "GuestMemory", "DiskImage", "CHostSupport"]),
        .target(name: "CZlib", linkerSettings: [.linkedLibrary("z")]),
        .target(name: "CDiskHost"),
        .target(name: "DiskImage", dependencies: ["MachineSpec", "CZlib", "CDiskHost", "CHostSupport"]),
        .target(name: "MigrationWire", dependencies: ["CZlib"]),
        .target(name: "VMM", dependencies: ["MachineSpec", "KVM", "GuestMemory", "X86Boot", "Devices", "DiskImage", "CZlib", "MigrationWire", "CHostSupport", "CSandbox", "JSONQuoting"]),
        .target(name: "CHostSupport"),
        .target(name: "CSandbox", linkerSettings: [.linkedLibrary("seccomp")]),
        .target(name: "JSONQuoting"),
        // containerd's wire (protobuf, ttrpc frames) and the container agent's: no Foundation, the
        // agent is a VM's whole user space (docs/containerd.md).
        .target(name: "ContainerWire"),
        .target(name: "CContainerAgent"),
        .executableTarget(name: "vireo-container-agent", dependencies: ["ContainerWire", "CContainerAgent"],
                          linkerSettings: [.unsafeFlags(["-static-executable"])]),
        // The machine's settings, their names and their rules: a leaf, no Foundation, so vireo-vmm
        // keeps its start-up time (docs/architecture.md).
        .target(name: "MachineSpec"),
        .target(name: "API"),
        .target(name: "CCrypt", linkerSettings: [.linkedLibrary("crypt")]),
        .target(name: "Library", dependencies: ["MachineSpec", "API", "CHostSupport", "CCrypt", "CSandbox", "DiskImage", "X86Boot", "JSONQuoting"]),
        .target(name: "Engines", dependencies: ["MachineSpec", "API", "JSONQuoting", "Library", "CHostSupport", "CSandbox", "MigrationWire", "DiskImage"]),
        .target(name: "Server", dependencies: [
            "MachineSpec", "API", "JSONQuoting", "Library", "Engines", "DiskImage", "MigrationWire", "X86Boot", "CHostSupport",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "HummingbirdWebSocket", package: "hummingbird-websocket"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ], resources: [.embedInCode("Web/index.html"), .embedInCode("Web/app.js"), .embedInCode("Web/app.css"), .embedInCode("Web/openapi.json")]),
        .target(name: "CLI", dependencies: [
            "MachineSpec", "VMM", "X86Boot", "DiskImage", "API", "Library", "Engines", "MigrationWire",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "vireo", dependencies: ["CLI"], linkerSettings: staticSwiftRuntimeWithFoundation),
        // `vireo serve` execs this: the REST API and the web manager (Hummingbird, SwiftNIO) are
        // linked here alone, so every other `vireo` command starts without loading them.
        .executableTarget(name: "vireo-server", dependencies: ["CLI", "Server", "Library", "Engines",
                                                               .product(name: "ArgumentParser", package: "swift-argument-parser")]),
        .target(name: "FuzzTargets", dependencies: ["Devices", "DiskImage", "GuestMemory", "VMM", "Library", "Engines", "Server", "ContainerWire"]),
        .target(name: "CFuzzDriver"),
        .executableTarget(name: "vireo-fuzz", dependencies: ["FuzzTargets", "CFuzzDriver"]),
        .target(name: "ContainerShim", dependencies: ["API", "ContainerWire", "Library", "Engines", "MachineSpec", "CHostSupport"]),
        .executableTarget(name: "containerd-shim-vireo-v2", dependencies: ["ContainerShim"]),
        // The per-VM process: its start-up time and memory are headline numbers, so the Swift
        // runtime is linked in statically (2.7 ms vs 5.8 ms to start a trivial program here), and
        // the C and C++ libraries with it (staticArchives above).
        .executableTarget(name: "vireo-vmm", dependencies: ["VMM", "MigrationWire"],
                          linkerSettings: [.unsafeFlags(["-static-stdlib", "-use-ld=lld", "-Xclang-linker", "-L\(staticArchives)"])]),
        .testTarget(name: "X86BootTests", dependencies: ["MachineSpec", "X86Boot", "GuestMemory", "CHostSupport"]),
        .testTarget(name: "DevicesTests", dependencies: ["MachineSpec", "Devices", "GuestMemory", "DiskImage", "FuzzTargets", "Engines", "Server"]),
        .testTarget(name: "DiskImageTests", dependencies: ["MachineSpec", "DiskImage", "CHostSupport"]),
        .testTarget(name: "MachineSpecTests", dependencies: ["MachineSpec", "Devices", "DiskImage", "GuestMemory", "VMM", "Library", "Engines", "Server", "CLI"]),
        .testTarget(name: "LibraryTests", dependencies: ["MachineSpec", "Library", "Engines", "Server", "ContainerWire", "ContainerShim"]),
        .testTarget(name: "EndToEndTests", dependencies: ["X86Boot", "GuestMemory", "CHostSupport", "MigrationWire", "ContainerShim", "ContainerWire"]),
    ],
    swiftLanguageModes: [.v6]
)
