import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// The `/dev/kvm` system handle: capability queries and VM creation.
public final class KVMSystem: @unchecked Sendable {
    public let fd: Int32
    public let vcpuMappingSize: Int

    public static let expectedAPIVersion: Int32 = 12

    public init(path: String = "/dev/kvm") throws(KVMError) {
        let fd = try systemCall("open \(path)") { open(path, O_RDWR | O_CLOEXEC) }
        do throws(KVMError) {
            let version = try systemCall("KVM_GET_API_VERSION") { vireo_ioctl_none(fd, VIREO_KVM_GET_API_VERSION) }
            guard version == Self.expectedAPIVersion else {
                throw KVMError(operation: "KVM_GET_API_VERSION returned \(version), expected \(Self.expectedAPIVersion)", errno: EINVAL)
            }
            let size = try systemCall("KVM_GET_VCPU_MMAP_SIZE") { vireo_ioctl_none(fd, VIREO_KVM_GET_VCPU_MMAP_SIZE) }
            self.fd = fd
            self.vcpuMappingSize = Int(size)
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    /// The value of `KVM_CHECK_EXTENSION` (0 when absent).
    public func extensionValue(_ capability: Int32) -> Int32 {
        let value = vireo_ioctl_value(fd, VIREO_KVM_CHECK_EXTENSION, UInt(capability))
        return value < 0 ? 0 : value
    }

    /// The most vCPUs one VM may have on this host.
    public var maximumVCPUs: Int {
        let max = extensionValue(VIREO_KVM_CAP_MAX_VCPUS)
        if max > 0 { return Int(max) }
        let recommended = extensionValue(VIREO_KVM_CAP_NR_VCPUS)
        return recommended > 0 ? Int(recommended) : 4 // the KVM API's documented fallback
    }

    public func requireCapabilities() throws(KVMError) {
        let needed: [(Int32, String)] = [
            (VIREO_KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
            (VIREO_KVM_CAP_PIT2, "KVM_CAP_PIT2"),
            (VIREO_KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
            (VIREO_KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"),
            (VIREO_KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"),
            (VIREO_KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
        ]
        for (capability, name) in needed where extensionValue(capability) <= 0 {
            throw KVMError(operation: "this host's KVM lacks \(name)", errno: ENOTSUP)
        }
    }

    /// `KVM_GET_SUPPORTED_CPUID`, growing the buffer until KVM stops answering E2BIG. It starts
    /// at KVM's own limit (KVM_MAX_CPUID_ENTRIES, 256): KVM runs every CPUID leaf before it can
    /// answer E2BIG, and a second round cost each VM start ~0.4 ms on a nested host, where each
    /// CPUID instruction exits to the outer hypervisor (bench/README.md).
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        var capacity: UInt32 = 256
        while true {
            let size = vireo_cpuid2_size(capacity)
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
            defer { buffer.deallocate() }
            buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
            let cpuid = buffer.assumingMemoryBound(to: kvm_cpuid2.self)
            cpuid.pointee.nent = capacity
            let result = vireo_ioctl_pointer(fd, VIREO_KVM_GET_SUPPORTED_CPUID, buffer)
            if result == -1 {
                let code = Glibc.errno
                if code == E2BIG && capacity < 4096 { capacity *= 2; continue }
                throw KVMError(operation: "KVM_GET_SUPPORTED_CPUID", errno: code)
            }
            let entries = vireo_cpuid2_entries(cpuid)
            return (0..<Int(cpuid.pointee.nent)).map { CPUIDEntry(entries[$0]) }
        }
    }

    /// `KVM_GET_MSR_INDEX_LIST`: the MSRs KVM saves and restores for a vCPU (the set QEMU and
    /// Firecracker migrate), growing the buffer until KVM stops answering E2BIG.
    public func savedMSRIndices() throws(KVMError) -> [UInt32] {
        var capacity: UInt32 = 256
        while true {
            let size = vireo_msr_list_size(capacity)
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
            defer { buffer.deallocate() }
            buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
            let list = buffer.assumingMemoryBound(to: kvm_msr_list.self)
            list.pointee.nmsrs = capacity
            if vireo_ioctl_pointer(fd, VIREO_KVM_GET_MSR_INDEX_LIST, buffer) == -1 {
                let code = Glibc.errno
                if code == E2BIG && capacity < 16384 { capacity = max(capacity * 2, list.pointee.nmsrs); continue }
                throw KVMError(operation: "KVM_GET_MSR_INDEX_LIST", errno: code)
            }
            let indices = vireo_msr_list_indices(list)
            return (0..<Int(list.pointee.nmsrs)).map { indices[$0] }
        }
    }

    public func createVM() throws(KVMError) -> VirtualMachine {
        let vmfd = try systemCall("KVM_CREATE_VM") { vireo_ioctl_value(fd, VIREO_KVM_CREATE_VM, 0) }
        return VirtualMachine(fd: vmfd, vcpuMappingSize: vcpuMappingSize)
    }
}

/// One CPUID leaf/subleaf as KVM describes it.
public struct CPUIDEntry: Sendable, Equatable, Codable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    public init(function: UInt32, index: UInt32, flags: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    public init(_ raw: kvm_cpuid_entry2) {
        self.init(function: raw.function, index: raw.index, flags: raw.flags,
                  eax: raw.eax, ebx: raw.ebx, ecx: raw.ecx, edx: raw.edx)
    }

    public var raw: kvm_cpuid_entry2 {
        var entry = kvm_cpuid_entry2()
        entry.function = function; entry.index = index; entry.flags = flags
        entry.eax = eax; entry.ebx = ebx; entry.ecx = ecx; entry.edx = edx
        return entry
    }
}
