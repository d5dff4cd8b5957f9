"""Splits live migration's downtime into its parts, as the VMMs log them: the source's (pause
until the last state is sent) and the wait until the destination runs the VM, plus the
destination's time to apply the state. The bench's migration (bench/run.py --only migration) with
a lightly dirtying 256 MiB probe guest, with the VMMs' stderr kept.

    python3 bench/migration_split.py TREE [RUNS]

TREE is a checkout with a release build and the bench's probe (.build/bench/probe-pvh.elf, which
bench/run.py builds); run it for two trees alternately to compare them (bench/README.md)."""
import os, sys, socket, subprocess, json, time, tempfile
tree = sys.argv[1]
vmm = os.path.join(tree, ".build", "release", "vireo-vmm")
probe = os.path.join(tree, ".build", "bench", "probe-pvh.elf")
work = tempfile.mkdtemp(prefix="migtime-")
for run in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    control = os.path.join(work, "control.sock")
    base = [vmm, "--kernel", probe, "--memory", "256M", "--cmdline", "probe=dirty spin=400000000"]
    serr = open(os.path.join(work, f"src{run}.log"), "w"); derr = open(os.path.join(work, f"dst{run}.log"), "w")
    src = subprocess.Popen(base + ["--control", control], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=serr)
    buf = b""
    while b"dirty 3 " not in buf:
        buf += os.read(src.stdout.fileno(), 4096)
    listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(1)
    client = socket.create_connection(listener.getsockname()); server, _ = listener.accept(); listener.close()
    dst = subprocess.Popen(base + ["--incoming-fd", str(server.fileno())], pass_fds=[server.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=derr)
    server.close()
    ctl = socket.socket(socket.AF_UNIX); ctl.connect(control)
    socket.send_fds(ctl, [b"migrate tcp:127.0.0.1 downtime_us=10000\n"], [client.fileno()]); client.close()
    stream = ctl.makefile("r")
    while True:
        reply = json.loads(stream.readline())
        if "ok" in reply: break
    ctl.close()
    time.sleep(0.3)
    src.kill(); dst.kill(); src.wait(); dst.wait(); serr.close(); derr.close()
    s = [l for l in open(os.path.join(work, f"src{run}.log")) if "migrated to" in l]
    d = [l for l in open(os.path.join(work, f"dst{run}.log")) if "migration received" in l]
    c = [l for l in open(os.path.join(work, f"dst{run}.log")) if "migration complete" in l]
    print(tree, reply.get("downtime_us"), "|", s[0].strip()[s[0].find("downtime"):] if s else "-", "|", d[0].strip()[d[0].find("disks taken"):] if d else "-",
          "|", c[0].strip()[c[0].find("(") + 1:c[0].find(" after")] + " to run" if c else "-")
    try: os.unlink(control)
    except FileNotFoundError: pass
