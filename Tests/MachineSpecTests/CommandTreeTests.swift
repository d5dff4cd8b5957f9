import ArgumentParser
@testable import CLI
import Foundation
import Testing

/// Every command names itself. ArgumentParser otherwise derives a name with
/// `String(describing: Self.self)`, a dynamic cast that searches the process's conformance
/// records once per command type at every run: it was 40 % of `vireo list`'s 15 ms.
@Suite struct CommandTreeTests {
    @Test func everyCommandNamesItself() {
        var unnamed: [String] = []
        var seen = 0
        func walk(_ command: any ParsableCommand.Type, path: String) {
            seen += 1
            let configuration = command.configuration
            if configuration.commandName == nil { unnamed.append(path + "/" + "\(command)") }
            let names = configuration.subcommands.compactMap { $0.configuration.commandName }
            #expect(Swift.Set(names).count == names.count, "\(path): two subcommands share a name: \(names)")
            for subcommand in configuration.subcommands {
                walk(subcommand, path: path + "/" + (subcommand.configuration.commandName ?? "?"))
            }
        }
        walk(Vireo.self, path: "vireo")
        #expect(seen > 50, "the walk found only \(seen) commands")
        #expect(unnamed.isEmpty, "commands without a commandName: \(unnamed)")
    }
}

/// `vireo ssh`'s wait for the guest's SSH server, against a server that speaks only once the
/// client has (what a user-mode card's forward through passt looks like from the host).
@Suite struct SSHProbeTests {
    @Test("the SSH probe sends its identification first, so a server that answers only after the client speaks is found")
    func probeSpeaksFirst() throws {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(listener) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) == 0 && listen(listener, 4) == 0 && getsockname(listener, $0, &length) == 0 }
        }
        #expect(bound)
        let port = UInt16(bigEndian: address.sin_port)
        // The server: waits for the client's "SSH-", then answers with its own banner.
        let server = Thread {
            let client = accept(listener, nil, nil)
            guard client >= 0 else { return }
            defer { close(client) }
            var timeout = timeval(tv_sec: 10, tv_usec: 0)
            setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var first = [UInt8](repeating: 0, count: 4)
            guard first.withUnsafeMutableBytes({ recv(client, $0.baseAddress, 4, Int32(MSG_WAITALL)) }) == 4, first == Array("SSH-".utf8) else { return }
            let banner = Array("SSH-2.0-OpenSSH_9.2p1\r\n".utf8)
            _ = banner.withUnsafeBytes { send(client, $0.baseAddress, $0.count, 0) }
            usleep(200_000)
        }
        server.start()
        #expect(SSH.answersSSH(host: "127.0.0.1", port: port), "the probe heard no banner from a server that waits for the client")
    }
}
