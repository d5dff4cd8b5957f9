import Library
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The one runner of host tools: status, output in order, lines as they come, a deadline, a tool
/// that is missing, and a tool whose detached child keeps the pipe open (as dnsmasq's does).
@Suite struct HostCommandTests {
    @Test func statusAndOutput() {
        var lines: [String] = []
        let result = HostCommand.run("/bin/sh", ["-c", "echo one; echo two >&2; printf three; exit 3"]) { lines.append($0) }
        #expect(result.status == 3)
        #expect(result.output == "one\ntwo\nthree")
        #expect(lines == ["one", "two", "three"])
        let killed = HostCommand.run("/bin/sh", ["-c", "kill -TERM $$"])
        #expect(killed.status == 128 + 15)
        let kept = HostCommand.run("/bin/sh", ["-c", "head -c 100000 /dev/zero"], capacity: 10)
        #expect(kept.status == 0 && kept.output.utf8.count == 10)
    }

    @Test func aMissingToolSaysSo() {
        let result = HostCommand.run("/nonexistent/tool", [])
        #expect(result.status < 0 && result.output.contains("cannot run /nonexistent/tool"), "\(result)")
    }

    /// Without the deadline the tool would run 120 s and end with status 0.
    @Test func aDeadlineKills() {
        let result = HostCommand.run("/bin/sh", ["-c", "echo started; exec sleep 120"], timeoutSeconds: 1)
        #expect(result.status == -1 && result.output.hasPrefix("started") && result.output.contains("did not finish within 1 s and was killed"), "\(result)")
    }

    /// The tool is done when it exits, even if a child it left behind holds the pipe.
    @Test func aDetachedChildDoesNotHoldTheCaller() throws {
        let result = HostCommand.run("/bin/sh", ["-c", "sleep 120 & echo $!"])
        #expect(result.status == 0, "\(result)")
        let child = try #require(Int32(result.output.filter { !$0.isWhitespace }), "\(result)")
        // Back while the child still holds the pipe open.
        #expect(kill(child, 0) == 0)
        kill(child, SIGKILL)
    }
}
