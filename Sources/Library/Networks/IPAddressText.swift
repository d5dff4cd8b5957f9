#if canImport(Glibc)
import Glibc
#endif

/// Addresses a guest, a CNI plugin or a tool reports, parsed rather than believed: only what
/// parses as an address is kept, in the form the host's own library prints it.
public enum IPAddressText {
    public static func canonicalIPv4(_ text: String) -> String? {
        guard text.utf8.count <= 15 else { return nil }
        var address = in_addr()
        guard inet_pton(AF_INET, text, &address) == 1 else { return nil }
        return withUnsafeBytes(of: &address) { format(AF_INET, $0.baseAddress, length: Int(INET_ADDRSTRLEN)) }
    }

    public static func canonicalIPv6(_ text: String) -> String? {
        guard text.utf8.count <= 45 else { return nil }
        var address = in6_addr()
        guard inet_pton(AF_INET6, text, &address) == 1 else { return nil }
        return withUnsafeBytes(of: &address) { format(AF_INET6, $0.baseAddress, length: Int(INET6_ADDRSTRLEN)) }
    }

    private static func format(_ family: Int32, _ address: UnsafeRawPointer?, length: Int) -> String? {
        var buffer = [CChar](repeating: 0, count: length)
        guard let address, inet_ntop(family, address, &buffer, socklen_t(length)) != nil else { return nil }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
