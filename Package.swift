// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "Vireo",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vireo", targets: ["vireo"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .target(name: "CKVM"),
        .target(name: "KVM", dependencies: ["CKVM"]),
        .target(name: "GuestMemory"),
        .target(name: "X86Boot", dependencies: ["GuestMemory"]),
        .target(name: "Devices", dependencies: ["GuestMemory"]),
        .target(name: "VMM", dependencies: ["KVM", "GuestMemory", "X86Boot", "Devices"]),
        .target(name: "CLI", dependencies: [
            "VMM", "X86Boot",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "vireo", dependencies: ["CLI"]),
        .testTarget(name: "X86BootTests", dependencies: ["X86Boot", "GuestMemory"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "GuestMemory"]),
        .testTarget(name: "EndToEndTests", dependencies: ["X86Boot"]),
    ],
    swiftLanguageModes: [.v6]
)
