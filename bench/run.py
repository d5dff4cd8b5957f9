#!/usr/bin/env python3
"""Side-by-side VMM benchmark: Vireo vs QEMU microvm vs a minimal C KVM loop, all booting the same
PVH probe guest in one run. Prints a Markdown table of medians and ratios.

  bench/run.py [--runs N] [--port-writes N]

Needs: a release build (swift build -c release), gcc, qemu-system-x86_64, qemu-img, /dev/kvm, and fio
(apt-get install fio) for the host ceiling row.
"""
import argparse
import os
import shutil
import select
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, ".build", "bench")
MEMORY_MIB = 128


def build():
    os.makedirs(OUT, exist_ok=True)
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "probes"), f"OUT={OUT}"], check=True)
    subprocess.run(["gcc", "-O2", "-o", os.path.join(OUT, "kvm-baseline"), os.path.join(ROOT, "bench", "kvm-baseline.c")], check=True)
    subprocess.run(["swift", "build", "-c", "release", "--package-path", ROOT], check=True, stdout=subprocess.DEVNULL)


def commands(cmdline):
    probe = os.path.join(OUT, "probe-pvh.elf")
    vireo = os.path.join(ROOT, ".build", "release", "vireo")
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")
    return {
        "vireo-vmm": [vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", cmdline],
        "vireo run": [vireo, "run", "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", cmdline],
        # -cpu host minus arch-capabilities: this host's KVM refuses MSR 0x10a, which QEMU asserts on.
        "qemu-microvm": ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on", "-accel", "kvm",
                         "-cpu", "host,-arch-capabilities", "-m", f"{MEMORY_MIB}M", "-smp", "1", "-nodefaults",
                         "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
                         "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-kernel", probe, "-append", cmdline],
        "c-kvm-loop": [os.path.join(OUT, "kvm-baseline"), probe, cmdline],
    }


class Guest:
    """A VMM process whose stdout (the guest console) is read with arrival timestamps."""

    def __init__(self, argv, **popen):
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, **popen)
        self.buffer = b""
        self.first_byte = None

    def wait_for(self, text, timeout=60):
        deadline = time.perf_counter() + timeout
        needle = text.encode()
        while needle not in self.buffer:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"{text!r} not seen; got {self.buffer[-300:]!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                now = time.perf_counter()
                if not chunk:
                    raise EOFError(f"exited before {text!r}; got {self.buffer[-300:]!r}")
                if self.first_byte is None:
                    self.first_byte = now - self.start
                self.buffer += chunk
        return time.perf_counter()

    def finish(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def first_byte_ms(argv):
    guest = Guest(argv)
    try:
        guest.wait_for("probe: done")
        return guest.first_byte * 1000
    finally:
        guest.finish()


def vmm_memory_kib(argv):
    """(RSS, private dirty) of the VMM process outside its guest-RAM mapping, guest idle in HLT.
    RSS counts shared library pages too; private dirty is what each extra VM really costs."""
    guest = Guest(argv)
    try:
        guest.wait_for("irq: waiting for serial input")
        time.sleep(0.3)
        return smaps_excluding_guest_ram(guest.proc.pid)
    finally:
        guest.finish()


def exits_per_second(argv, count):
    guest = Guest(argv)
    try:
        start = guest.wait_for("ports: start")
        end = guest.wait_for(f"ports: done count={count}", timeout=600)
        return count / (end - start)
    finally:
        guest.finish()


def blk_commands(image, image_format, cmdline):
    probe = os.path.join(OUT, "probe-pvh.elf")
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")
    return {
        "vireo-vmm": [vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", cmdline,
                      "--disk", f"{image},format={image_format}"],
        # The same VMM with queue notifications as MMIO exits handled on the vCPU (no ioeventfd/irqfd).
        "vireo-vmm (MMIO exits)": ["env", "VIREO_NO_IOEVENTFD=1", vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M",
                                   "--cmdline", cmdline, "--disk", f"{image},format={image_format}"],
        "qemu-microvm": microvm_with_disk(cmdline, "-drive", f"id=d0,file={image},format={image_format},if=none,cache=writeback,aio=threads"),
    }


def microvm_with_disk(cmdline, *drive):
    """QEMU microvm running the PVH probe with one virtio-blk disk, its drive given by `drive`
    (a -drive or -blockdev with id/node-name d0). acpi=off makes microvm announce its virtio-mmio
    devices on the command line, as Vireo does; force-legacy=false gives the virtio 1.x interface
    the probe's driver speaks."""
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
            "-global", "virtio-mmio.force-legacy=false", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
            "-m", f"{MEMORY_MIB}M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", *drive,
            "-device", "virtio-blk-device,drive=d0", "-kernel", os.path.join(OUT, "probe-pvh.elf"), "-append", cmdline]


def blk_phases(argv, disk_mib, count):
    """Seconds per phase of probe=blkbench, from the guest's start/done lines."""
    guest = Guest(argv)
    try:
        guest.wait_for("blkbench: ready")
        results = {}
        for phase in ("seqwrite", "seqread", "randwrite", "randread"):
            start = guest.wait_for(f"blkbench: {phase} start")
            end = guest.wait_for(f"blkbench: {phase} done", timeout=600)
            seconds = end - start
            results[phase] = disk_mib / seconds if phase.startswith("seq") else count / seconds
        return results
    finally:
        guest.finish()


def host_ceiling(image, disk_mib):
    """fio on the image file itself: buffered (page cache, as both VMMs use it) 1 MiB sequential
    write and read, one job, psync, cache not dropped first."""
    ceiling = {}
    for rw in ("write", "read"):
        out = subprocess.run(["fio", "--name=ceiling", f"--filename={image}", f"--rw={rw}", "--bs=1M", f"--size={disk_mib}M",
                              "--ioengine=psync", "--direct=0", "--invalidate=0", "--output-format=terse", "--terse-version=3"],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1].split(";")
        # terse v3: read bandwidth (KiB/s) is field 7, write bandwidth field 48.
        ceiling["seq" + rw] = int(out[47 if rw == "write" else 6]) / 1024
    return ceiling


def blk_benchmark(runs, count):
    disk_mib = 256
    raw = os.path.join(OUT, "bench.raw")
    qcow2 = os.path.join(OUT, "bench.qcow2")
    for path in (raw, qcow2):
        if os.path.exists(path):
            os.remove(path)
    with open(raw, "wb") as f:
        f.write(os.urandom(disk_mib << 20))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2], check=True)
    cmdline = f"probe=blkbench count={count}"
    print()
    print(f"virtio-blk, one request in flight, {disk_mib} MiB image, median of {runs}:")
    print()
    print("| image | VMM | seq write MiB/s | seq read MiB/s | rand write IOPS | rand read IOPS |")
    print("|---|---|---|---|---|---|")
    table = {}
    for image, image_format in ((raw, "raw"), (qcow2, "qcow2")):
        samples = {name: [] for name in ("vireo-vmm", "vireo-vmm (MMIO exits)", "qemu-microvm")}
        for _ in range(runs):
            for name, argv in blk_commands(image, image_format, cmdline).items():
                samples[name].append(blk_phases(argv, disk_mib, count))
        for name, rows in samples.items():
            medians = {phase: statistics.median(r[phase] for r in rows) for phase in rows[0]}
            table[(image_format, name)] = medians
            print(f"| {image_format} | {name} | {medians['seqwrite']:.0f} | {medians['seqread']:.0f} | "
                  f"{medians['randwrite']:.0f} | {medians['randread']:.0f} |")
    if shutil.which("fio"):
        ceiling = host_ceiling(raw, disk_mib)
        print(f"| raw | host fio (ceiling) | {ceiling['seqwrite']:.0f} | {ceiling['seqread']:.0f} | | |")
        v = table[("raw", "vireo-vmm")]
        print()
        print(f"vireo-vmm vs host ceiling, 1 MiB sequential: write {v['seqwrite'] / ceiling['seqwrite']:.2f}, "
              f"read {v['seqread'] / ceiling['seqread']:.2f}")
    for image_format in ("raw", "qcow2"):
        v, q = table[(image_format, "vireo-vmm")], table[(image_format, "qemu-microvm")]
        m = table[(image_format, "vireo-vmm (MMIO exits)")]
        print(f"{image_format}: vireo-vmm/qemu " + ", ".join(f"{k} {v[k] / q[k]:.2f}" for k in v))
        print(f"{image_format}: ioeventfd/MMIO exits " + ", ".join(f"{k} {v[k] / m[k]:.2f}" for k in v))


def multiqueue_benchmark(runs, count):
    """virtio-blk multiqueue on a 2-vCPU machine (the probe stays on one vCPU; its driver takes
    VIRTIO_BLK_F_MQ with queue=1): the disk with one queue, served by the VMM's shared
    notification thread, against the probe on queue 1 of two, served by that queue's own I/O
    thread; the same under QEMU microvm (num-queues). Then the VMM's memory with 1, 2 and 4
    queues, the guest idle. The probe keeps one request in flight, so this measures what a
    queue of its own costs or saves per request, not parallel throughput (the probe cannot drive
    two vCPUs from ring 3, and this host emulates a Linux guest's kernel; bench/README.md)."""
    disk_mib = 256
    raw = os.path.join(OUT, "bench-mq.raw")
    with open(raw, "wb") as f:
        f.write(os.urandom(disk_mib << 20))
    probe = os.path.join(OUT, "probe-pvh.elf")
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")

    def vireo(cmdline, queues):
        return [vmm, "--kernel", probe, "--cpus", "2", "--memory", f"{MEMORY_MIB}M", "--cmdline", cmdline,
                "--disk", f"{raw},format=raw,queues={queues}"]

    def qemu(cmdline, queues):
        argv = microvm_with_disk(cmdline, "-drive", f"id=d0,file={raw},format=raw,if=none,cache=writeback,aio=threads")
        argv[argv.index("-smp") + 1] = "2"
        argv[argv.index("virtio-blk-device,drive=d0")] = f"virtio-blk-device,drive=d0,num-queues={queues}"
        return argv

    bench = f"probe=blkbench count={count}"
    configurations = {
        ("vireo-vmm", "1 queue"): vireo(bench, 1),
        ("vireo-vmm", "queue 1 of 2"): vireo(bench + " queue=1", 2),
        ("qemu-microvm", "1 queue"): qemu(bench, 1),
        ("qemu-microvm", "queue 1 of 2"): qemu(bench + " queue=1", 2),
    }
    samples = {key: [] for key in configurations}
    for _ in range(runs):
        for key, argv in configurations.items():
            samples[key].append(blk_phases(argv, disk_mib, count))
    print()
    print(f"virtio-blk multiqueue, 2 vCPUs, one request in flight, {disk_mib} MiB raw image, median of {runs} interleaved:")
    print()
    print("| VMM | disk | seq write MiB/s | seq read MiB/s | rand write IOPS | rand read IOPS |")
    print("|---|---|---|---|---|---|")
    table = {}
    for key, rows in samples.items():
        medians = {phase: statistics.median(r[phase] for r in rows) for phase in rows[0]}
        table[key] = medians
        print(f"| {key[0]} | {key[1]} | {medians['seqwrite']:.0f} | {medians['seqread']:.0f} | {medians['randwrite']:.0f} | {medians['randread']:.0f} |")
    print()
    for vmm_name in ("vireo-vmm", "qemu-microvm"):
        one, two = table[(vmm_name, "1 queue")], table[(vmm_name, "queue 1 of 2")]
        print(f"{vmm_name}: queue 1 of 2 / 1 queue " + ", ".join(f"{k} {two[k] / one[k]:.2f}" for k in one))
    for disk in ("1 queue", "queue 1 of 2"):
        v, q = table[("vireo-vmm", disk)], table[("qemu-microvm", disk)]
        print(f"{disk}: vireo-vmm/qemu " + ", ".join(f"{k} {v[k] / q[k]:.2f}" for k in v))
    print()
    print("| vireo-vmm, 2 vCPUs, guest idle | RSS excl. guest RAM (KiB) | private dirty excl. guest RAM (KiB) | threads |")
    print("|---|---|---|---|")
    for queues in (1, 2, 4):
        memory = []
        threads = []
        for _ in range(3):
            guest = Guest(vireo("probe=irq", queues))
            try:
                guest.wait_for("irq: waiting for serial input")
                time.sleep(0.3)
                memory.append(smaps_excluding_guest_ram(guest.proc.pid))
                threads.append(len(os.listdir(f"/proc/{guest.proc.pid}/task")))
            finally:
                guest.finish()
        print(f"| {queues} queue{'s' if queues > 1 else ''} | {statistics.median(m[0] for m in memory):.0f} | "
              f"{statistics.median(m[1] for m in memory):.0f} | {statistics.median(threads):.0f} |")


class DiskServers:
    """qemu-nbd on a Unix socket and on a loopback TCP port, and tgtd on a loopback port, all
    serving one raw file: the same servers for Vireo's clients and QEMU's drivers."""

    TARGET = "iqn.2026-12.dev.vireo.bench:disk"

    def __init__(self, image):
        import socket as sockets
        self.socket = os.path.join(OUT, "bench-nbd.sock")
        if os.path.exists(self.socket):
            os.remove(self.socket)

        def free_port():
            with sockets.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]
        self.nbd_port, self.iscsi_port, self.tls_port = free_port(), free_port(), free_port()
        self.control = 4000 + os.getpid() % 20000
        self.certificates = make_tls_certificates(os.path.join(OUT, "bench-tls"))
        opts = ["--image-opts", f"driver=raw,file.driver=file,file.filename={image},file.locking=off"]
        tls = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={self.certificates}/server,verify-peer=yes", "--tls-creds", "tls0"]
        self.processes = [
            subprocess.Popen(["qemu-nbd", "-k", self.socket, "-x", "exp", "--persistent", "-e", "4", "--cache=writeback"] + opts),
            subprocess.Popen(["qemu-nbd", "-b", "127.0.0.1", "-p", str(self.nbd_port), "-x", "exp", "--persistent", "-e", "4", "--cache=writeback"] + opts),
            subprocess.Popen(["qemu-nbd", "-b", "127.0.0.1", "-p", str(self.tls_port), "-x", "exp", "--persistent", "-e", "4", "--cache=writeback"] + tls + opts),
        ]
        os.makedirs("/var/run/tgtd", exist_ok=True)
        self.processes.append(subprocess.Popen(["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.iscsi_port}"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 10
        while not os.path.exists(f"/var/run/tgtd/socket.{self.control}") or not os.path.exists(self.socket):
            if time.time() > deadline:
                raise TimeoutError("the disk servers did not start")
            time.sleep(0.05)
        time.sleep(0.3)
        for command in (["--op", "new", "--mode", "target", "--tid", "1", "-T", self.TARGET],
                        ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", image],
                        ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]):
            subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi"] + command, check=True)

    def addresses(self):
        """Each disk: Vireo's address, and QEMU's arguments for the same (a drive with id d0)."""
        def drive(uri):
            return ["-drive", f"id=d0,file={uri},format=raw,if=none,cache=writeback"]
        return {
            "NBD, Unix socket": (f"nbd+unix:///exp?socket={self.socket}", drive(f"nbd+unix:///exp?socket={self.socket}")),
            "NBD, TCP loopback": (f"nbd://127.0.0.1:{self.nbd_port}/exp", drive(f"nbd://127.0.0.1:{self.nbd_port}/exp")),
            "NBD over TLS, TCP loopback": (
                f"nbds://127.0.0.1:{self.tls_port}/exp?tls-certificates={self.certificates}/client",
                ["-object", f"tls-creds-x509,id=tls0,endpoint=client,dir={self.certificates}/client",
                 "-drive", "id=d0,driver=raw,if=none,cache=writeback,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,"
                 f"file.server.port={self.tls_port},file.export=exp,file.tls-creds=tls0"]),
            "iSCSI, TCP loopback": (f"iscsi://127.0.0.1:{self.iscsi_port}/{self.TARGET}/1", drive(f"iscsi://127.0.0.1:{self.iscsi_port}/{self.TARGET}/1")),
        }

    def close(self):
        for process in self.processes:
            process.kill()
            process.wait()
        for suffix in ("", ".lock"):
            try:
                os.remove(f"/var/run/tgtd/socket.{self.control}{suffix}")
            except FileNotFoundError:
                pass


def make_tls_certificates(directory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate (EC keys), in the
    directories qemu-nbd and Vireo read: `server` and `client`, each with the CA's certificate."""
    for sub in ("server", "client"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    quiet = dict(check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["openssl", "req", "-x509", *key, "-keyout", f"{directory}/ca-key.pem", "-out", f"{directory}/ca-cert.pem",
                    "-days", "2", "-subj", "/CN=Vireo bench CA"], **quiet)
    for name, subject, extensions in (("server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                                      ("client", "/CN=vireo-bench", "extendedKeyUsage=clientAuth\n")):
        with open(f"{directory}/{name}.ext", "w") as f:
            f.write(extensions)
        subprocess.run(["openssl", "req", *key, "-keyout", f"{directory}/{name}/{name}-key.pem", "-out", f"{directory}/{name}.csr", "-subj", subject], **quiet)
        subprocess.run(["openssl", "x509", "-req", "-in", f"{directory}/{name}.csr", "-CA", f"{directory}/ca-cert.pem", "-CAkey", f"{directory}/ca-key.pem",
                        "-CAcreateserial", "-out", f"{directory}/{name}/{name}-cert.pem", "-days", "2", "-extfile", f"{directory}/{name}.ext"], **quiet)
        shutil.copy(f"{directory}/ca-cert.pem", f"{directory}/{name}/ca-cert.pem")
    return directory


def network_disk_benchmark(runs, count):
    """probe=blkbench on an NBD export and an iSCSI LUN: Vireo's own clients (NBD) and libiscsi
    in vireo-vmm against QEMU microvm's nbd and iscsi drivers, the same servers and file."""
    disk_mib = 128
    image = os.path.join(OUT, "bench-network.raw")
    with open(image, "wb") as f:
        f.write(os.urandom(disk_mib << 20))
    servers = DiskServers(image)
    probe = os.path.join(OUT, "probe-pvh.elf")
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")
    cmdline = f"probe=blkbench count={count}"
    print()
    print(f"virtio-blk on network disks, one request in flight, {disk_mib} MiB, servers on this host, median of {runs}:")
    print()
    print("| disk | VMM | seq write MiB/s | seq read MiB/s | rand write IOPS | rand read IOPS |")
    print("|---|---|---|---|---|---|")
    try:
        for label, (ours, qemus) in servers.addresses().items():
            argvs = {
                "vireo-vmm": [vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", cmdline, "--disk", ours],
                "qemu-microvm": microvm_with_disk(cmdline, *qemus),
            }
            samples = {name: [] for name in argvs}
            for _ in range(runs):
                for name, argv in argvs.items():
                    samples[name].append(blk_phases(argv, disk_mib, count))
            medians = {}
            for name, rows in samples.items():
                medians[name] = {phase: statistics.median(r[phase] for r in rows) for phase in rows[0]}
                m = medians[name]
                print(f"| {label} | {name} | {m['seqwrite']:.0f} | {m['seqread']:.0f} | {m['randwrite']:.0f} | {m['randread']:.0f} |")
            v, q = medians["vireo-vmm"], medians["qemu-microvm"]
            print(f"| {label} | vireo/qemu | " + " | ".join(f"{v[k] / q[k]:.2f}" for k in ("seqwrite", "seqread", "randwrite", "randread")) + " |")
    finally:
        servers.close()
    reconnect_benchmark(runs)


def reconnect_benchmark(runs):
    """How long a guest's writes stall when the NBD server dies and is back 0.5 s later: Vireo's
    reconnection against QEMU's (reconnect-delay=30), and Vireo's failover to a second path."""
    image = os.path.join(OUT, "bench-reconnect.raw")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    probe = os.path.join(OUT, "probe-pvh.elf")
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")
    sockets = [os.path.join(OUT, f"bench-reconnect-{i}.sock") for i in range(2)]
    opts = ["--image-opts", f"driver=raw,file.driver=file,file.filename={image},file.locking=off"]

    def serve(path):
        if os.path.exists(path):
            os.remove(path)
        process = subprocess.Popen(["qemu-nbd", "-k", path, "-x", "exp", "--persistent", "-e", "4"] + opts)
        while not os.path.exists(path):
            time.sleep(0.01)
        return process

    def stall(argv, restart):
        """The longest gap between two of the guest's flush lines from just before the server's
        death until 5 s after it, each line timed as it arrives."""
        import threading
        servers = [serve(sockets[0]), serve(sockets[1])]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        arrivals = []

        def read():
            for line in process.stdout:
                if b"blkloop: flushed" in line:
                    arrivals.append(time.perf_counter())
        threading.Thread(target=read, daemon=True).start()
        try:
            deadline = time.perf_counter() + 60
            while len(arrivals) < 50:
                if time.perf_counter() > deadline or process.poll() is not None:
                    raise TimeoutError("the guest did not start writing")
                time.sleep(0.01)
            killed = time.perf_counter()
            servers[0].kill()
            servers[0].wait()
            if restart:
                time.sleep(0.5)
                servers[0] = serve(sockets[0])
            deadline = killed + 60
            while not arrivals or arrivals[-1] < killed + 5:
                if time.perf_counter() > deadline or process.poll() is not None:
                    raise TimeoutError("the guest's writes did not go on")
                time.sleep(0.05)
            window = [t for t in list(arrivals) if t >= killed - 0.5 and t <= killed + 5]
            return max(b - a for a, b in zip(window, window[1:])) * 1000
        finally:
            process.kill()
            process.wait()
            for server in servers:
                server.kill()
                server.wait()

    one = f"nbd+unix:///exp?socket={sockets[0]}"
    two = one + "|" + f"nbd+unix:///exp?socket={sockets[1]}"
    cmdline = "probe=blkloop count=100000000"
    qemu = microvm_with_disk(cmdline, "-blockdev", f"driver=nbd,node-name=d0,server.type=unix,server.path={sockets[0]},export=exp,reconnect-delay=30")
    cases = {
        "vireo-vmm, server back after 0.5 s": ([vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", cmdline, "--disk", one], True),
        "qemu-microvm (reconnect-delay=30), server back after 0.5 s": (qemu, True),
        "vireo-vmm, two paths, the active one gone": ([vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", cmdline, "--disk", two], False),
    }
    print()
    print(f"The longest stall of a guest writing 4 KiB blocks when its NBD server dies, median of {runs} (ms):")
    print()
    print("| case | stall ms |")
    print("|---|---|")
    results = {}
    for name, (argv, restart) in cases.items():
        results[name] = statistics.median(stall(argv, restart) for _ in range(runs))
        print(f"| {name} | {results[name]:.0f} |")
    names = list(cases)
    print(f"\nreconnection stall, vireo/qemu: {results[names[0]] / results[names[1]]:.2f}")


def bench_library():
    """A throwaway VM library and a function running the release `vireo` on it."""
    import tempfile
    vireo = os.path.join(ROOT, ".build", "release", "vireo")
    home = tempfile.mkdtemp(prefix="vireo-bench-")
    env = dict(os.environ, VIREO_HOME=home)

    def cli(*arguments):
        # A failing step says why (a lifecycle run once lost one VM's create to a reason nobody saw).
        result = subprocess.run([vireo, *arguments], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"vireo {' '.join(arguments)}: exit {result.returncode}: {result.stderr.strip()}")
    return home, cli


def lifecycle_benchmark(runs, vm_count):
    """The manager's overhead: start-to-first-guest-byte through `vireo start` vs `vireo run` vs
    `vireo-vmm`, and VMs created-and-started per second (two workers, one per core here)."""
    import concurrent.futures
    probe = os.path.join(OUT, "probe-pvh.elf")
    home, cli = bench_library()

    # probe=irq idles in HLT waiting for serial input, so started VMs cost no CPU.
    cli("create", "fb", "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--no-disk", "--no-rng", "--no-nic", "--cmdline", "console=ttyS0 probe=irq")
    log = os.path.join(home, "fb", "console.log")
    start_samples = []
    for _ in range(runs):
        begin = time.perf_counter()
        cli("start", "fb")
        while not (os.path.exists(log) and os.path.getsize(log) > 0):
            time.sleep(0.0002)
        start_samples.append((time.perf_counter() - begin) * 1000)
        cli("stop", "fb", "--force")
    run_samples = [first_byte_ms(commands("probe=hello")["vireo run"]) for _ in range(runs)]
    vmm_samples = [first_byte_ms(commands("probe=hello")["vireo-vmm"]) for _ in range(runs)]

    def create_and_start(index):
        cli("create", f"vm{index}", "--kernel", probe, "--memory", "32M", "--disk", "1G", "--no-rng", "--no-nic", "--cmdline", "console=ttyS0 probe=irq")
        cli("start", f"vm{index}")

    workers = os.cpu_count() or 1
    begin = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(create_and_start, range(vm_count)))
        managed_rate = vm_count / (time.perf_counter() - begin)
    finally:
        # Every VM made, also when a step failed: none may outlive the run.
        for index in range(vm_count):
            if os.path.exists(os.path.join(home, f"vm{index}", "config.json")):
                cli("delete", f"vm{index}", "--force")

    # The same number of throwaway VMs through `vireo run`, each counted once its guest printed.
    def run_one(_):
        guest = Guest(commands("probe=irq")["vireo run"])
        guest.wait_for("irq: waiting")
        return guest
    begin = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        guests = list(pool.map(run_one, range(vm_count)))
    run_rate = vm_count / (time.perf_counter() - begin)
    for guest in guests:
        guest.finish()
    shutil.rmtree(home, ignore_errors=True)

    start_ms, run_ms, vmm_ms = (statistics.median(x) for x in (start_samples, run_samples, vmm_samples))
    print(f"| path | start to first guest byte (ms, median of {runs}) | VMs created+started per second ({vm_count} VMs, {workers} workers) | per core |")
    print("|---|---|---|---|")
    print(f"| vireo create + vireo start | {start_ms:.1f} | {managed_rate:.1f} | {managed_rate / workers:.1f} |")
    print(f"| vireo run (no library) | {run_ms:.1f} | {run_rate:.1f} | {run_rate / workers:.1f} |")
    print(f"| vireo-vmm alone | {vmm_ms:.1f} | | |")
    print()
    print(f"vireo start / vireo run first byte: {start_ms / run_ms:.2f}x; managed / run VMs per second: {managed_rate / run_rate:.2f}x")


def acpi_benchmark(runs, reboots=10):
    """What ACPI costs at start-up (first serial byte with --acpi on vs off, beside QEMU microvm with
    and without its own ACPI), and how long a reboot in place takes (the guest's line just before
    it writes the reset register to the next boot's first line) beside a fresh vireo-vmm start."""
    probe = os.path.join(OUT, "probe-pvh.elf")
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")

    def qemu(acpi, cmdline, reboot=False):
        return ["qemu-system-x86_64", "-M", f"microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi={acpi}", "-accel", "kvm",
                "-cpu", "host,-arch-capabilities", "-m", f"{MEMORY_MIB}M", "-smp", "1", "-nodefaults", "-no-user-config",
                "-nographic", "-serial", "stdio"] + ([] if reboot else ["-no-reboot"]) + [
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-kernel", probe, "-append", cmdline]

    variants = {
        "vireo-vmm --acpi on": [vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", "probe=hello", "--acpi", "on"],
        "vireo-vmm --acpi off": [vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", "probe=hello", "--acpi", "off"],
        "qemu-microvm acpi=on": qemu("on", "probe=hello"),
        "qemu-microvm acpi=off": qemu("off", "probe=hello"),
    }
    samples = {name: [] for name in variants}
    for _ in range(runs):          # interleaved, so background load hits every variant alike
        for name, argv in variants.items():
            samples[name].append(first_byte_ms(argv))
    first = {name: statistics.median(values) for name, values in samples.items()}

    def reboot_intervals(argv):
        guest = Guest(argv)
        intervals = []
        try:
            guest.wait_for("probe: mode=")
            while len(intervals) < reboots:
                # The guest prints this line just before it writes the reset register.
                resets = guest.buffer.count(b"reboot: resetting")
                while guest.buffer.count(b"reboot: resetting") == resets:
                    _read_more(guest)
                reset_at = time.perf_counter()
                boots = guest.buffer.count(b"probe: mode=")
                while guest.buffer.count(b"probe: mode=") == boots:
                    _read_more(guest)
                intervals.append((time.perf_counter() - reset_at) * 1000)
        finally:
            guest.finish()
        return intervals

    def marker_us(argv):
        """The VMM's own clock from its start to the guest's first instruction that writes the
        boot marker: free of pipe and process-spawn noise, so small differences show."""
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        for line in result.stderr.decode(errors="replace").splitlines():
            if "boot marker reached" in line:
                return int(line.split("reached ")[1].split(" us")[0])
        raise RuntimeError(f"no boot marker line: {result.stderr[-300:]!r}")

    marker = {"on": [], "off": []}
    for _ in range(runs * 3):
        for mode in ("on", "off"):
            marker[mode].append(marker_us(variants[f"vireo-vmm --acpi {mode}"]))
    marker_on, marker_off = statistics.median(marker["on"]), statistics.median(marker["off"])

    vireo_reboot = reboot_intervals([vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", "probe=reboot", "--on-reboot", "restart"])
    qemu_reboot = reboot_intervals(qemu("on", "probe=reboot", reboot=True))
    print(f"| start-up (first serial byte, ms, median of {runs}, interleaved) | ms | vs vireo-vmm --acpi off |")
    print("|---|---|---|")
    for name, value in first.items():
        print(f"| {name} | {value:.1f} | {value / first['vireo-vmm --acpi off']:.2f} |")
    print()
    print(f"ACPI's start-up cost in vireo-vmm: {first['vireo-vmm --acpi on'] - first['vireo-vmm --acpi off']:+.2f} ms "
          f"(QEMU microvm's: {first['qemu-microvm acpi=on'] - first['qemu-microvm acpi=off']:+.2f} ms)")
    print(f"VMM start to the guest's boot marker (median of {runs * 3}, interleaved): --acpi on {marker_on / 1000:.2f} ms, "
          f"--acpi off {marker_off / 1000:.2f} ms, difference {(marker_on - marker_off) / 1000:+.3f} ms")
    print()
    print(f"| reboot in place (reset request → next boot's first line, ms, median of {reboots}) | ms |")
    print("|---|---|")
    vr, qr = statistics.median(vireo_reboot), statistics.median(qemu_reboot)
    print(f"| vireo-vmm --on-reboot restart | {vr:.1f} |")
    print(f"| qemu-microvm (reset in place) | {qr:.1f} |")
    print(f"| vireo-vmm fresh start (first byte) | {first['vireo-vmm --acpi on']:.1f} |")
    print()
    print(f"vireo/qemu reboot: {vr / qr:.2f}x; vireo reboot vs fresh start: {vr / first['vireo-vmm --acpi on']:.2f}x")


def smaps_excluding_guest_ram(pid):
    """(RSS, private dirty) in KiB of a process outside its guest-RAM mapping."""
    rss = dirty = 0
    in_guest_ram = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if parts[0] == "Size:":
                in_guest_ram = int(parts[1]) >= MEMORY_MIB * 1024
            elif in_guest_ram:
                continue
            elif parts[0] == "Rss:":
                rss += int(parts[1])
            elif parts[0] == "Private_Dirty:":
                dirty += int(parts[1])
    return rss, dirty


def qemu_engine_benchmark(runs):
    """The qemu engine: `vireo start` to the guest's first serial byte against the same QEMU
    command line started by hand (the line vireo logged), the time to first output through the
    firmware (SeaBIOS, then QEMU's linuxboot ROM loads the probe), and the QEMU process's memory
    beside vireo-vmm's for the same guest. The kvm engine's `vireo start` first byte is measured in
    the same run, to show it did not move."""
    import tempfile
    vireo = os.path.join(ROOT, ".build", "release", "vireo")
    probe = os.path.join(OUT, "probe-pvh.elf")
    home = tempfile.mkdtemp(prefix="vireo-bench-")
    env = dict(os.environ, VIREO_HOME=home)

    def cli(*arguments):
        return subprocess.run([vireo, *arguments], env=env, check=True, capture_output=True, text=True)

    def wait_first_byte(log, begin, timeout=120):
        while not (os.path.exists(log) and os.path.getsize(log) > 0):
            if time.perf_counter() - begin > timeout:
                raise TimeoutError(f"no console output in {log}")
            time.sleep(0.001)
        return (time.perf_counter() - begin) * 1000

    # One word on the command line, so the logged QEMU line splits back into its arguments.
    common = ["--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--no-disk", "--no-rng", "--no-balloon", "--no-nic", "--cmdline", "probe=irq"]
    cli("create", "q", "--engine", "qemu", *common)
    cli("create", "k", *common)
    qdir, kdir = os.path.join(home, "q"), os.path.join(home, "k")
    samples = {"vireo start (qemu engine)": [], "same QEMU line by hand": [], "vireo start (kvm engine)": []}
    memory = {}
    warnings = ""
    for run in range(runs):
        begin = time.perf_counter()
        warnings = cli("start", "q").stderr
        samples["vireo start (qemu engine)"].append(wait_first_byte(os.path.join(qdir, "console.log"), begin))
        if run == 0:
            time.sleep(1)
            pid = int(open(os.path.join(qdir, "vmm.pid")).read())
            memory["qemu (q35, SeaBIOS)"] = smaps_excluding_guest_ram(pid)
        cli("stop", "q", "--force")
        line = [l for l in open(os.path.join(qdir, "vmm.log")) if l.startswith("vireo: starting ")][-1]
        argv = line[len("vireo: starting "):].split()
        for name in ("qmp.sock", "vnc.sock", "console.sock", "console.log"):
            try:
                os.unlink(os.path.join(qdir, name))
            except FileNotFoundError:
                pass
        begin = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples["same QEMU line by hand"].append(wait_first_byte(os.path.join(qdir, "console.log"), begin))
        proc.kill()
        proc.wait()
        begin = time.perf_counter()
        cli("start", "k")
        samples["vireo start (kvm engine)"].append(wait_first_byte(os.path.join(kdir, "console.log"), begin))
        if run == 0:
            time.sleep(1)
            pid = int(open(os.path.join(kdir, "vmm.pid")).read())
            memory["vireo-vmm"] = smaps_excluding_guest_ram(pid)
        cli("stop", "k", "--force")
    shutil.rmtree(home, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    if "arch-capabilities" in warnings:
        print("(this host's KVM refuses the ARCH_CAPABILITIES MSR: every qemu-engine start launches QEMU twice)")
    print(f"| path | start to first guest byte, through the firmware for QEMU (ms, median of {runs}) |")
    print("|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} |")
    print()
    print("| process (guest idle, 128 MiB RAM) | RSS excl. guest RAM (KiB) | private dirty excl. guest RAM (KiB) |")
    print("|---|---|---|")
    for name, (rss, dirty) in memory.items():
        print(f"| {name} | {rss} | {dirty} |")
    print()
    q, h = medians["vireo start (qemu engine)"], medians["same QEMU line by hand"]
    print(f"vireo start / QEMU by hand: {q / h:.2f}x (target <= 1.1x); "
          f"vireo-vmm / QEMU RSS: {memory['vireo-vmm'][0] / memory['qemu (q35, SeaBIOS)'][0]:.2f}x, "
          f"private dirty: {memory['vireo-vmm'][1] / memory['qemu (q35, SeaBIOS)'][1]:.2f}x")


NET_NS = "vireo-bench-net"
NET_TAP = "vbt0"


def net_commands(cmdline, offloads=True):
    """The probe with one card on the tap NET_TAP, under Vireo and under QEMU microvm (vhost off,
    as Vireo has no vhost either), both run inside NET_NS."""
    probe = os.path.join(OUT, "probe-pvh.elf")
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")
    inside = ["ip", "netns", "exec", NET_NS]
    mac = "02:00:00:77:00:02"
    return {
        "vireo-vmm": inside + [vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--cmdline", cmdline,
                               "--net", f"tap:{NET_TAP},mac={mac}" + ("" if offloads else ",offload=off")],
        "qemu-microvm": inside + ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
                                  "-global", "virtio-mmio.force-legacy=false", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
                                  "-m", f"{MEMORY_MIB}M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
                                  "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
                                  "-netdev", f"tap,id=n0,ifname={NET_TAP},script=no,downscript=no,vhost=off",
                                  "-device", f"virtio-net-device,netdev=n0,mac={mac}" + ("" if offloads else ",csum=off,guest_csum=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off,host_ecn=off,guest_ecn=off"),
                                  "-kernel", probe, "-append", cmdline],
    }


def _fields_after(guest, mark, timeout=30):
    """The key=value fields of the console line that starts with `mark`, once it is whole."""
    deadline = time.perf_counter() + timeout
    while True:
        text = guest.buffer.decode(errors="replace")
        if mark in text and "\n" in text.split(mark, 1)[1]:
            line = text.split(mark, 1)[1].split("\n", 1)[0]
            return dict(part.split("=", 1) for part in line.split() if "=" in part)
        _read_more(guest, max(0.1, deadline - time.perf_counter()))


def net_benchmark(runs):
    """virtio-net through a tap, Vireo beside QEMU microvm with the same probe guest (ring 3, native
    speed here): frames per second guest to host (small UDP), bulk throughput guest to host with
    and without TSO (64 KiB segments vs MTU frames), frames per second host to guest, and UDP
    round trips. The guest sends to a MAC nobody has, so the host drops frames right after the tap:
    what is measured is the VMM's path."""
    subprocess.run(["ip", "netns", "del", NET_NS], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "add", NET_NS], check=True)
    try:
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "tuntap", "add", NET_TAP, "mode", "tap", "vnet_hdr"],
                        ["ip", "address", "add", "10.77.0.1/24", "dev", NET_TAP], ["ip", "link", "set", NET_TAP, "up"]):
            subprocess.run(["ip", "netns", "exec", NET_NS] + command, check=True)
        echo = subprocess.Popen(["ip", "netns", "exec", NET_NS, "python3", "-c",
                                 "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.77.0.1',7))\n"
                                 "while True:\n d,a=s.recvfrom(2048); s.sendto(d,a)"])
        base = "probe=ip addr=10.77.0.2/24"
        rows = [
            ("guest to host, 64-byte frames (frames/s)", f"{base} blast=200000 size=18", "frames"),
            ("guest to host, 1514-byte frames (MB/s)", f"{base} blast=50000 size=1472", "bytes"),
            ("guest to host, 64 KiB TSO segments (MB/s)", f"{base} tso=1 blast=5000 size=65000", "bytes"),
            ("UDP round trips to a host echo (per s)", f"{base} rtt=10.77.0.1:7 count=5000", "rtt"),
        ]
        results = {}
        for label, cmdline, kind in rows:
            samples = {"vireo-vmm": [], "qemu-microvm": []}
            for _ in range(runs):
                for name, argv in net_commands(cmdline).items():
                    guest = Guest(argv)
                    try:
                        start_mark, done_mark = ("rtt: start", "rtt: done") if kind == "rtt" else ("blast: start", "blast: done")
                        start = guest.wait_for(start_mark)
                        end = guest.wait_for(done_mark, timeout=300)
                        fields = _fields_after(guest, done_mark)
                        seconds = end - start
                        if kind == "frames":
                            samples[name].append(int(fields["count"]) / seconds)
                        elif kind == "bytes":
                            samples[name].append(int(fields["bytes"]) / seconds / 1e6)
                        else:
                            samples[name].append((int(fields["count"]) - int(fields["lost"])) / seconds)
                    finally:
                        guest.finish()
            results[label] = {name: statistics.median(values) for name, values in samples.items()}
        # Host to guest: a host sender blasts frames at the guest's MAC; the guest counts them.
        sender = ("import socket,sys,time\n"
                  "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind(('" + NET_TAP + "',0))\n"
                  "f=bytes.fromhex('020000770002')+bytes.fromhex('020000770001')+b'\\x88\\xb5'+bytes(50)\n"
                  "n=int(sys.argv[1])\nt=time.perf_counter()\n"
                  "for i in range(n):\n  try: s.send(f)\n  except OSError: pass\n"
                  "print(n/(time.perf_counter()-t))")
        samples = {"vireo-vmm": [], "qemu-microvm": []}
        count = 200000
        for _ in range(runs):
            for name, argv in net_commands(f"{base} sink={count}").items():
                guest = Guest(argv)
                try:
                    guest.wait_for("sink: ready")
                    start = time.perf_counter()
                    subprocess.run(["ip", "netns", "exec", NET_NS, "python3", "-c", sender, str(count)], check=True, capture_output=True)
                    sent_seconds = time.perf_counter() - start
                    _fields_after(guest, "sink: got", timeout=30)
                    got = int(guest.buffer.decode(errors="replace").split("sink: got ", 1)[1].split(" ", 1)[0])
                    samples[name].append(got / sent_seconds)
                finally:
                    guest.finish()
        results["host to guest, 64-byte frames delivered (frames/s)"] = {name: statistics.median(v) for name, v in samples.items()}
        # Offloads on vs off (Vireo): the same bulk run with the card's offloads turned off.
        offload = {"on": [], "off": []}
        for _ in range(runs):
            for state in ("on", "off"):
                guest = Guest(net_commands(f"{base} tso=1 blast=5000 size=65000", offloads=state == "on")["vireo-vmm"])
                try:
                    start = guest.wait_for("blast: start")
                    end = guest.wait_for("blast: done", timeout=300)
                    fields = _fields_after(guest, "blast: done")
                    offload[state].append(int(fields["bytes"]) / (end - start) / 1e6)
                finally:
                    guest.finish()
        echo.kill()
    finally:
        subprocess.run(["ip", "netns", "del", NET_NS], stderr=subprocess.DEVNULL)
    print()
    print(f"virtio-net through a tap, same probe guest (median of {runs}; QEMU microvm with vhost=off):")
    print()
    print("| path | vireo-vmm | qemu-microvm | vireo/qemu |")
    print("|---|---|---|---|")
    for label, values in results.items():
        v, q = values["vireo-vmm"], values["qemu-microvm"]
        print(f"| {label} | {v:,.0f} | {q:,.0f} | {v / q:.2f}x |")
    on, off = statistics.median(offload["on"]), statistics.median(offload["off"])
    print()
    print(f"vireo-vmm offloads on vs off (guest asks for 64 KiB TSO; off: the card offers no TSO, so the probe sends MTU frames): "
          f"{on:,.0f} vs {off:,.0f} MB/s, {on / off:.2f}x")


def _read_more(guest, timeout=30):
    """Blocks until more console output arrives (or fails after `timeout`)."""
    ready, _, _ = select.select([guest.proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no output for {timeout} s; got {guest.buffer[-300:]!r}")
    chunk = os.read(guest.proc.stdout.fileno(), 65536)
    if not chunk:
        raise EOFError(f"exited; got {guest.buffer[-300:]!r}")
    guest.buffer += chunk


def images_benchmark(runs, cold=False):
    """Images (issue 11): `vireo image build debian-12` beside bare debootstrap of the same
    packages (the floor: the rest is configuration, mke2fs and compression), and the same build
    through --cache-dir; `vireo create --image` of a 20 GiB linked overlay beside `qemu-img create`
    of the same overlay; boot to SSH on the qemu engine (TCG on these hosts) beside the same image
    started by a plain QEMU command line, both reached over a loopback port forward. With --cold,
    the first build also starts with an empty package cache (it downloads ~130 MiB)."""
    import socket
    import tempfile
    vireo = os.path.join(ROOT, ".build", "release", "vireo")
    work = tempfile.mkdtemp(prefix="vireo-bench-images-")
    home = os.path.join(work, "home")
    debs = os.path.join(work, "debs")
    os.makedirs(os.path.join(home, "images"))
    env = dict(os.environ, VIREO_HOME=home)
    shared = os.path.expanduser("~/.cache/vireo/images/debs")
    if not cold and os.path.isdir(shared):
        shutil.copytree(shared, debs)
    os.symlink(debs if os.path.isdir(debs) else shared, os.path.join(home, "images", ".debs"))
    if cold:
        os.unlink(os.path.join(home, "images", ".debs"))
        os.makedirs(debs, exist_ok=True)
        os.symlink(debs, os.path.join(home, "images", ".debs"))

    def cli(*arguments, check=True):
        return subprocess.run([vireo, *arguments], env=env, check=check, capture_output=True, text=True)

    def timed(argv, **kwargs):
        begin = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, **kwargs)
        return time.perf_counter() - begin

    rows = []
    cache = os.path.join(work, "cache")
    build_s = timed([vireo, "image", "build", "debian-12", "--cache-dir", cache], env=env)
    rows.append(("vireo image build debian-12" + (" (empty package cache)" if cold else " (packages cached)"), build_s))
    packages = ",".join(json_manifest(home)["recipe"].split("packages ")[1].split("\n")[0].split(","))
    root = os.path.join(work, "bare-root")
    floor_s = timed(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", f"--include={packages}", "bookworm", root,
                     "http://deb.debian.org/debian"])
    shutil.rmtree(root, ignore_errors=True)
    rows.append(("bare debootstrap, same packages (floor)", floor_s))
    cli("image", "delete", "debian-12")
    cached_s = timed([vireo, "image", "build", "debian-12", "--cache-dir", cache], env=env)
    rows.append(("vireo image build --cache-dir (kept build)", cached_s))
    print("| image build | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"\nbuild / bare debootstrap: {build_s / floor_s:.2f}x; cached / build: {cached_s / build_s:.3f}x\n")

    # create --image: a 20 GiB linked overlay, against qemu-img making the same overlay.
    base = os.path.join(home, "images", "debian-12", "disk.qcow2")
    create_ms, qemu_img_ms = [], []
    for index in range(max(runs, 5)):
        begin = time.perf_counter()
        cli("create", f"c{index}", "--image", "debian-12", "--disk", "20G", "--no-nic")
        create_ms.append((time.perf_counter() - begin) * 1000)
        overlay = os.path.join(work, f"overlay{index}.qcow2")
        qemu_img_ms.append(timed(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay, "20G"]) * 1000)
    for index in range(max(runs, 5)):
        cli("delete", f"c{index}")
    c, q = statistics.median(create_ms), statistics.median(qemu_img_ms)
    print(f"| 20 GiB linked overlay | ms (median of {len(create_ms)}) |")
    print("|---|---|")
    print(f"| vireo create --image debian-12 --disk 20G (overlay, cloud-init seed, key, config) | {c:.1f} |")
    print(f"| qemu-img create -b (the overlay alone) | {q:.1f} |")
    print(f"\nvireo create / qemu-img create: {c / q:.2f}x (target: create <= 50 ms)\n")

    # Boot to SSH, qemu engine (TCG here) against a plain QEMU line, alternating, fresh disks.
    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    key = os.path.join(home, "ssh", "id_ed25519")

    def wait_ssh(port, user, timeout=1200):
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            result = subprocess.run(["ssh", "-i", key, "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                     "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"{user}@127.0.0.1", "true"],
                                    capture_output=True)
            if result.returncode == 0:
                return
            time.sleep(1)
        raise TimeoutError(f"no SSH on port {port}")

    manifest = json_manifest(home)
    image_dir = os.path.join(home, "images", "debian-12")
    boots = {"vireo start (qemu engine, TCG)": [], "plain QEMU line (TCG)": []}
    for run in range(runs):
        port = free_port()
        cli("create", "b", "--image", "debian-12", "--engine", "qemu", "--accel", "tcg", "--cpus", "2", "--nic", "user", "--forward", f"tcp:{port}:22")
        begin = time.perf_counter()
        cli("start", "b")
        wait_ssh(port, "debian")
        boots["vireo start (qemu engine, TCG)"].append(time.perf_counter() - begin)
        cli("stop", "b", "--force")
        cli("delete", "b")
        # The same image, fresh: a new VM's overlay and seed (its first boot too), never started by vireo.
        cli("create", "plain", "--image", "debian-12", "--engine", "qemu", "--accel", "tcg", "--cpus", "2", "--nic", "user")
        plain = os.path.join(home, "plain")
        port = free_port()
        argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "1G", "-nodefaults", "-no-user-config",
                "-display", "none", "-serial", "file:" + os.path.join(work, "plain-console.log"),
                "-kernel", os.path.join(image_dir, "vmlinuz"), "-initrd", os.path.join(image_dir, "initrd.img"), "-append", manifest["commandLine"],
                "-drive", f"if=none,id=d0,file={os.path.join(plain, 'disk0.qcow2')},format=qcow2", "-device", "virtio-blk-pci,drive=d0",
                "-drive", f"if=none,id=d1,file={os.path.join(plain, 'seed.iso')},format=raw,readonly=on", "-device", "virtio-blk-pci,drive=d1",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", f"virtio-net-pci,netdev=n0,mac={clone_mac(plain)}"]
        begin = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ssh(port, "debian")
        boots["plain QEMU line (TCG)"].append(time.perf_counter() - begin)
        proc.kill()
        proc.wait()
        cli("delete", "plain")
    cli("image", "delete", "debian-12")
    shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in boots.items()}
    print(f"| first boot to SSH (debian-12, 2 vCPUs, 1 GiB) | seconds (median of {runs}) |")
    print("|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} |")
    v, p = medians["vireo start (qemu engine, TCG)"], medians["plain QEMU line (TCG)"]
    print(f"\nvireo / plain QEMU boot to SSH: {v / p:.2f}x (target: near 1)")


def _qmp(path, *commands):
    """Sends QMP commands to QEMU's monitor socket; returns each command's reply."""
    import json
    import socket
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    stream = sock.makefile("rw")
    json.loads(stream.readline())                      # greeting
    replies = []
    for command in (({"execute": "qmp_capabilities"},) + commands):
        stream.write(json.dumps(command) + "\n")
        stream.flush()
        while True:
            reply = json.loads(stream.readline())
            if "return" in reply or "error" in reply:
                replies.append(reply)
                break
    sock.close()
    return replies[1:]


def saved_state_benchmark(runs, sizes=(256, 2048, 8192)):
    """Saving a running guest's state to a file and resuming from it: Vireo's `save` request and
    `--restore` against QEMU's own migration to a file (`migrate exec:cat > FILE`, then
    `-incoming exec:cat FILE`) of the same dirtying probe guest (it rewrites 8 MiB from ring 3 and
    prints a line per round), for guests of three sizes, each idle apart from its 8 MiB and then
    with every page of RAM written first (`fill=1`, up to the probe's 4 GiB identity map). Save:
    from the request to the file complete (Vireo fsyncs the file before answering; QEMU's stream
    through cat is not synced). Resume: from the process start to the guest's next console line
    (the first byte after the restore: its round touches the 8 MiB again). Both files' allocated
    sizes too. The large filled guests run at most 3 times."""
    import json
    import tempfile
    probe = os.path.join(OUT, "probe-pvh.elf")
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")
    work = tempfile.mkdtemp(prefix="vireo-bench-state-")
    results = []
    for size, filled in [(size, filled) for filled in (False, True) for size in sizes]:
        cmdline = "probe=dirty spin=200000" + (" fill=1" if filled else "")
        vireo_save, vireo_resume, qemu_save, qemu_resume = [], [], [], []
        vireo_bytes = qemu_bytes = 0
        for _ in range(runs if not filled or size <= 2048 else min(runs, 3)):
            state = os.path.join(work, "vireo.state")
            control = os.path.join(work, "control.sock")
            argv = [vmm, "--kernel", probe, "--memory", f"{size}M", "--cmdline", cmdline, "--control", control, "--state-file", state]
            guest = Guest(argv)
            guest.wait_for("dirty 20 ", timeout=300)
            begin = time.perf_counter()
            reply = subprocess.run(["python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                                    "s.sendall(b'save\\n'); print(s.recv(200).decode())", control], capture_output=True, text=True).stdout
            vireo_save.append((time.perf_counter() - begin) * 1000)
            assert '"ok":true' in reply, reply
            guest.proc.wait()
            vireo_bytes = os.stat(state).st_blocks * 512     # allocated: untouched RAM is a hole
            resumed = Guest(argv + ["--restore"])
            resumed.wait_for("dirty ")
            vireo_resume.append(resumed.first_byte * 1000)
            resumed.finish()

            qmp = os.path.join(work, "qmp.sock")
            image = os.path.join(work, "qemu.state")
            qemu = commands(cmdline)["qemu-microvm"]
            qemu = [a if a != f"{MEMORY_MIB}M" else f"{size}M" for a in qemu] + ["-qmp", f"unix:{qmp},server=on,wait=off"]
            guest = Guest(qemu)
            guest.wait_for("dirty 20 ", timeout=300)
            begin = time.perf_counter()
            _qmp(qmp, {"execute": "migrate", "arguments": {"uri": f"exec:cat > {image}"}})
            while True:
                status = _qmp(qmp, {"execute": "query-migrate"})[0]["return"].get("status")
                if status in ("completed", "failed"):
                    break
                time.sleep(0.002)
            qemu_save.append((time.perf_counter() - begin) * 1000)
            assert status == "completed", status
            guest.finish()
            qemu_bytes = os.stat(image).st_blocks * 512
            os.unlink(qmp)
            resumed = Guest(qemu + ["-incoming", f"exec:cat {image}"])
            try:
                # An incoming QEMU waits paused for the stream, then stays paused until told to run.
                deadline = time.perf_counter() + 300
                while True:
                    try:
                        if _qmp(qmp, {"execute": "query-migrate"})[0]["return"].get("status") == "completed":
                            break
                    except (FileNotFoundError, ConnectionRefusedError):
                        pass
                    if time.perf_counter() > deadline:
                        raise TimeoutError("QEMU did not take the incoming state")
                    time.sleep(0.001)
                _qmp(qmp, {"execute": "cont"})
                resumed.wait_for("dirty ")
                qemu_resume.append(resumed.first_byte * 1000)
            finally:
                # Never leave a guest spinning behind a failed run (it would load every later test).
                resumed.finish()
            for leftover in (state, image, qmp, control):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
        results.append((size, filled, len(vireo_save), statistics.median(vireo_save), statistics.median(qemu_save), statistics.median(vireo_resume),
                        statistics.median(qemu_resume), vireo_bytes, qemu_bytes))
    shutil.rmtree(work, ignore_errors=True)
    print("| guest RAM | written by the guest | runs | save: vireo / QEMU (ms, median) | ratio | resume to first guest output: vireo / QEMU (ms) | ratio | state file allocated: vireo / QEMU (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for size, filled, count, vs, qs, vr, qr, vb, qb in results:
        print(f"| {size} MiB | {'every page' if filled else '8 MiB'} | {count} | {vs:.0f} / {qs:.0f} | {vs / qs:.2f}x | {vr:.1f} / {qr:.0f} | {vr / qr:.3f}x | {vb / 2**20:.1f} / {qb / 2**20:.1f} |")


def migration_benchmark(runs, memory_mib=256, downtime_ms=10):
    """Live migration on loopback: Vireo's VMM-to-VMM stream (the control socket's `migrate` with the
    connection attached, the destination `vireo-vmm --incoming-fd`) against QEMU's own migration
    (`migrate tcp:` to `-incoming tcp:`) of the same dirtying probe guest, both with the same downtime
    limit, unlimited bandwidth and auto-converge on. A lightly dirtying guest (a round every few
    hundred ms) and a heavily dirtying one (its 8 MiB rewritten continuously). Downtime and total time
    as each VMM reports them (QEMU's `query-migrate` in whole ms, Vireo's in us)."""
    import json
    import socket
    import tempfile
    probe = os.path.join(OUT, "probe-pvh.elf")
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")
    work = tempfile.mkdtemp(prefix="vireo-bench-migrate-")
    kinds = [("lightly dirtying", "probe=dirty spin=400000000"), ("heavily dirtying (8 MiB rewritten continuously)", "probe=dirty spin=200000")]
    rows = []
    for kind, cmdline in kinds:
        vireo_down, vireo_total, qemu_down, qemu_total = [], [], [], []
        for _ in range(runs):
            control = os.path.join(work, "control.sock")
            base = [vmm, "--kernel", probe, "--memory", f"{memory_mib}M", "--cmdline", cmdline]
            source = Guest(base + ["--control", control])
            destination = None
            try:
                source.wait_for("dirty 3 ")
                listener = socket.socket()
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                client = socket.create_connection(listener.getsockname())
                server, _ = listener.accept()
                listener.close()
                destination = Guest(base + ["--incoming-fd", str(server.fileno())], pass_fds=[server.fileno()])
                server.close()
                ctl = socket.socket(socket.AF_UNIX)
                ctl.connect(control)
                socket.send_fds(ctl, [f"migrate tcp:127.0.0.1 downtime_us={downtime_ms * 1000}\n".encode()], [client.fileno()])
                client.close()
                stream = ctl.makefile("r")
                while True:
                    reply = json.loads(stream.readline())
                    if "ok" in reply:
                        break
                ctl.close()
                assert reply["ok"], reply
                vireo_down.append(reply["downtime_us"] / 1000)
                vireo_total.append(reply["total_ms"])
                destination.wait_for("dirty ")             # it runs there
                source.proc.wait(timeout=30)
            finally:
                source.finish()
                if destination:
                    destination.finish()
                for leftover in (control,):
                    try:
                        os.unlink(leftover)
                    except FileNotFoundError:
                        pass

            qmp, qmp_in = os.path.join(work, "qmp.sock"), os.path.join(work, "qmp-in.sock")
            qemu = commands(cmdline)["qemu-microvm"]
            qemu = [a if a != f"{MEMORY_MIB}M" else f"{memory_mib}M" for a in qemu]
            with socket.socket() as probe_port:
                probe_port.bind(("127.0.0.1", 0))
                port = probe_port.getsockname()[1]
            source = Guest(qemu + ["-qmp", f"unix:{qmp},server=on,wait=off"])
            destination = Guest(qemu + ["-qmp", f"unix:{qmp_in},server=on,wait=off", "-incoming", f"tcp:127.0.0.1:{port}"])
            try:
                source.wait_for("dirty 3 ")
                for _ in range(200):
                    if os.path.exists(qmp_in):
                        break
                    time.sleep(0.01)
                _qmp(qmp, {"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "auto-converge", "state": True}]}},
                     {"execute": "migrate-set-parameters", "arguments": {"downtime-limit": downtime_ms, "max-bandwidth": 1 << 40}},
                     {"execute": "migrate", "arguments": {"uri": f"tcp:127.0.0.1:{port}"}})
                while True:
                    info = _qmp(qmp, {"execute": "query-migrate"})[0]["return"]
                    if info.get("status") in ("completed", "failed"):
                        break
                    time.sleep(0.005)
                assert info["status"] == "completed", info
                qemu_down.append(float(info["downtime"]))
                qemu_total.append(float(info["total-time"]))
                destination.wait_for("dirty ")
            finally:
                source.finish()
                destination.finish()
                for leftover in (qmp, qmp_in):
                    try:
                        os.unlink(leftover)
                    except FileNotFoundError:
                        pass
        rows.append((kind, statistics.median(vireo_down), statistics.median(qemu_down), statistics.median(vireo_total), statistics.median(qemu_total)))
    shutil.rmtree(work, ignore_errors=True)
    print(f"| {memory_mib} MiB guest, loopback, downtime limit {downtime_ms} ms | downtime: vireo / QEMU (ms, median of {runs}) | ratio | total: vireo / QEMU (ms) | ratio |")
    print("|---|---|---|---|---|")
    for kind, vd, qd, vt, qt in rows:
        print(f"| {kind} | {vd:.1f} / {qd:.0f} | {vd / max(qd, 1):.2f}x | {vt:.0f} / {qt:.0f} | {vt / max(qt, 1):.2f}x |")


def guest_benchmark(runs):
    """Guest integration (issue 26) on the qemu engine, TCG on these hosts: one plain QEMU boot of
    the Debian image with the same host directory's contents reached three ways at once, a
    virtio-fs share (Debian's virtiofsd, as Vireo serves shares), an ext4 file system on a
    virtio-blk disk and QEMU's 9p (`-virtfs`): sequential write (64 MiB, fsync) and read (64 MiB
    after dropping the guest's caches) and small-file creation (300 files, then sync), each in
    the same guest, run by one SSH command. Then a Vireo VM from the image: `vireo exec` of
    /bin/true against `vireo ssh` of `true` (each a whole CLI round trip), alternating."""
    import json
    import socket
    import tempfile
    vireo = os.path.join(ROOT, ".build", "release", "vireo")
    work = tempfile.mkdtemp(prefix="vireo-bench-guest-")
    home = os.path.join(work, "home")
    os.makedirs(os.path.join(home, "images"))
    env = dict(os.environ, VIREO_HOME=home)

    def cli(*arguments, check=True, timeout=None):
        # No terminal and no input: `vireo ssh` execs ssh, which would otherwise wait on them.
        return subprocess.run([vireo, *arguments], env=env, check=check, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    cli("image", "build", "debian-12", "--cache-dir", os.path.expanduser("~/.cache/vireo/images"))
    key = os.path.join(home, "ssh", "id_ed25519")
    ssh_options = ["-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                   "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"]

    def ssh(port, command, timeout=600):
        return subprocess.run(["ssh", *ssh_options, "-p", str(port), "debian@127.0.0.1", command], capture_output=True, text=True, timeout=timeout)

    def wait_ssh(port, timeout=1500):
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if ssh(port, "true", timeout=30).returncode == 0:
                return
            time.sleep(2)
        raise TimeoutError(f"no SSH on port {port}")

    # The plain QEMU boot: the image's kernel, a fresh overlay and seed (a Vireo VM's, never started).
    manifest = json_manifest(home)
    image_dir = os.path.join(home, "images", "debian-12")
    cli("create", "plain", "--image", "debian-12", "--engine", "qemu", "--accel", "tcg", "--cpus", "2", "--nic", "user")
    plain = os.path.join(home, "plain")
    shared, ninep, blk = (os.path.join(work, name) for name in ("virtiofs-dir", "9p-dir", "blk.raw"))
    os.makedirs(shared)
    os.makedirs(ninep)
    subprocess.run(["truncate", "-s", "1G", blk], check=True)
    socket_path = os.path.join(work, "fs.sock")
    virtiofsd = subprocess.Popen(["/usr/lib/qemu/virtiofsd", f"--socket-path={socket_path}", "-o", f"source={shared}", "-o", "cache=auto"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(socket_path):
            break
        time.sleep(0.05)
    port = free_port()
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "1G", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "file:" + os.path.join(work, "plain-console.log"),
            "-object", "memory-backend-memfd,id=ram0,size=1G,share=on", "-machine", "memory-backend=ram0",
            "-kernel", os.path.join(image_dir, "vmlinuz"), "-initrd", os.path.join(image_dir, "initrd.img"), "-append", manifest["commandLine"],
            "-drive", f"if=none,id=d0,file={os.path.join(plain, 'disk0.qcow2')},format=qcow2", "-device", "virtio-blk-pci,drive=d0",
            "-drive", f"if=none,id=d1,file={os.path.join(plain, 'seed.iso')},format=raw,readonly=on", "-device", "virtio-blk-pci,drive=d1",
            "-drive", f"if=none,id=d2,file={blk},format=raw,cache=none", "-device", "virtio-blk-pci,drive=d2,serial=benchblk",
            "-chardev", f"socket,id=fs0,path={socket_path}", "-device", "vhost-user-fs-pci,chardev=fs0,tag=benchfs",
            "-virtfs", f"local,path={ninep},mount_tag=bench9p,security_model=none,id=p9",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", f"virtio-net-pci,netdev=n0,mac={clone_mac(plain)}"]
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = {}
    try:
        wait_ssh(port)
        prepared = ssh(port, "sudo sh -c 'set -e; mkdir -p /mnt/fs /mnt/blk /mnt/p9; mount -t virtiofs benchfs /mnt/fs; "
                             "mkfs.ext4 -q /dev/disk/by-id/virtio-benchblk; mount /dev/disk/by-id/virtio-benchblk /mnt/blk; "
                             "mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 bench9p /mnt/p9'")
        if prepared.returncode != 0:
            raise RuntimeError(f"guest mounts failed: {prepared.stderr}")
        script = ("for m in /mnt/fs /mnt/blk /mnt/p9; do sync; echo 3 > /proc/sys/vm/drop_caches; "
                  "a=$(date +%s%N); dd if=/dev/zero of=$m/big bs=1M count=64 conv=fsync status=none; b=$(date +%s%N); "
                  "echo 3 > /proc/sys/vm/drop_caches; dd if=$m/big of=/dev/null bs=1M status=none; c=$(date +%s%N); "
                  "mkdir $m/small; d=$(date +%s%N); for i in $(seq 1 300); do echo x > $m/small/$i; done; sync; e=$(date +%s%N); "
                  "rm -rf $m/small $m/big; echo $m $((b-a)) $((c-b)) $((e-d)); done")
        samples = {}
        for _ in range(runs):
            result = ssh(port, f"sudo sh -c '{script}'")
            if result.returncode != 0:
                raise RuntimeError(f"guest measurement failed: {result.stderr}")
            for line in result.stdout.split("\n"):
                words = line.split()
                if len(words) == 4:
                    samples.setdefault(words[0], []).append(tuple(int(w) / 1e9 for w in words[1:]))
        for mount, values in samples.items():
            rows[mount] = tuple(statistics.median(v[i] for v in values) for i in range(3))
    finally:
        qemu.kill()
        qemu.wait()
        virtiofsd.kill()
        virtiofsd.wait()
        cli("delete", "plain", check=False)
    names = {"/mnt/fs": "virtio-fs (virtiofsd, cache=auto)", "/mnt/blk": "virtio-blk, ext4 (cache=none)", "/mnt/p9": "9p (QEMU -virtfs, msize 512 KiB)"}
    print(f"| file system in one TCG guest (median of {runs}) | write 64 MiB + fsync (MiB/s) | read 64 MiB, cold (MiB/s) | 300 small files + sync (files/s) |")
    print("|---|---|---|---|")
    for mount, (write_s, read_s, small_s) in rows.items():
        print(f"| {names[mount]} | {64 / write_s:.1f} | {64 / read_s:.1f} | {300 / small_s:.0f} |")
    fs, block, p9 = rows["/mnt/fs"], rows["/mnt/blk"], rows["/mnt/p9"]
    print(f"\nvirtio-fs / virtio-blk: write {block[0] / fs[0]:.2f}x, read {block[1] / fs[1]:.2f}x, small files {block[2] / fs[2]:.2f}x; "
          f"virtio-fs / 9p: write {p9[0] / fs[0]:.2f}x, read {p9[1] / fs[1]:.2f}x, small files {p9[2] / fs[2]:.2f}x (above 1: virtio-fs faster)\n")

    # vireo exec against vireo ssh, each a whole CLI round trip, on a Vireo VM from the image.
    port = free_port()
    cli("create", "g", "--image", "debian-12", "--engine", "qemu", "--accel", "tcg", "--cpus", "2", "--nic", "user", "--forward", f"tcp:{port}:22")
    cli("start", "g")
    try:
        wait_ssh(port)
        for _ in range(60):
            if cli("exec", "g", "--", "/bin/true", check=False, timeout=60).returncode == 0:
                break
            time.sleep(2)
        exec_ms, ssh_ms = [], []
        for _ in range(max(runs, 5) * 2):
            begin = time.perf_counter()
            cli("exec", "g", "--", "/bin/true", timeout=120)
            exec_ms.append((time.perf_counter() - begin) * 1000)
            begin = time.perf_counter()
            try:
                cli("ssh", "g", "--", "true", timeout=120)
            except subprocess.TimeoutExpired as timeout:
                raise RuntimeError(f"vireo ssh did not return: {timeout.stderr}") from None
            ssh_ms.append((time.perf_counter() - begin) * 1000)
    finally:
        cli("stop", "g", "--force", check=False)
        cli("delete", "g", check=False)
        shutil.rmtree(work, ignore_errors=True)
    e, s = statistics.median(exec_ms), statistics.median(ssh_ms)
    print(f"| a command in the guest, CLI round trip (TCG guest, median of {len(exec_ms)}) | ms |")
    print("|---|---|")
    print(f"| vireo exec g -- /bin/true (qemu-guest-agent over virtio-serial) | {e:.0f} |")
    print(f"| vireo ssh g -- true (OpenSSH over user-mode networking) | {s:.0f} |")
    print(f"\nvireo exec / vireo ssh: {e / s:.2f}x")


def json_manifest(home):
    import json
    with open(os.path.join(home, "images", "debian-12", "manifest.json")) as handle:
        return json.load(handle)


def clone_mac(bundle):
    import json
    with open(os.path.join(bundle, "config.json")) as handle:
        return json.load(handle)["networks"][0]["mac"]


def isolation_benchmark(runs, port_writes):
    """What the jail and seccomp cost a library VM: `vireo start` to the first console byte, port
    exits per second and the VMM's private memory, with both on (the default) and with
    --no-jail --no-seccomp, interleaved so background load hits both alike."""
    probe = os.path.join(OUT, "probe-pvh.elf")
    home, cli = bench_library()

    def wait_console(name, text, timeout=120):
        log = os.path.join(home, name, "console.log")
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            try:
                with open(log, "rb") as f:
                    if text.encode() in f.read():
                        return time.perf_counter()
            except FileNotFoundError:
                pass
            time.sleep(0.0005)
        raise TimeoutError(f"{name}: {text!r} not seen")

    modes = {"jail + seccomp": [], "--no-jail --no-seccomp": ["--no-jail", "--no-seccomp"]}
    cli("create", "fb", "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--no-disk", "--no-rng", "--no-nic", "--cmdline", "console=ttyS0 probe=irq")
    cli("create", "ex", "--kernel", probe, "--memory", f"{MEMORY_MIB}M", "--no-disk", "--no-rng", "--no-nic",
        "--cmdline", f"console=ttyS0 probe=ports count={port_writes}")
    first = {mode: [] for mode in modes}
    memory = {mode: [] for mode in modes}
    exits = {mode: [] for mode in modes}
    for index in range(runs):
        for mode, flags in modes.items():
            log = os.path.join(home, "fb", "console.log")
            begin = time.perf_counter()
            cli("start", "fb", *flags)
            while not (os.path.exists(log) and os.path.getsize(log) > 0):
                time.sleep(0.0002)
            first[mode].append((time.perf_counter() - begin) * 1000)
            if index < 3:
                wait_console("fb", "irq: waiting for serial input")
                time.sleep(0.3)
                with open(os.path.join(home, "fb", "vmm.pid")) as f:
                    memory[mode].append(smaps_excluding_guest_ram(int(f.read().strip()))[1])
            cli("stop", "fb", "--force")
            if index < 5:
                cli("start", "ex", *flags)
                start = wait_console("ex", "ports: start")
                end = wait_console("ex", f"ports: done count={port_writes}", timeout=600)
                exits[mode].append(port_writes / (end - start))
                cli("stop", "ex", "--force")
    shutil.rmtree(home, ignore_errors=True)
    on, off = list(modes)
    print(f"| library VM | start to first console byte (ms, median of {runs}) | port exits/s (median of 5) | VMM private dirty excl. guest RAM (KiB) |")
    print("|---|---|---|---|")
    for mode in modes:
        print(f"| {mode} | {statistics.median(first[mode]):.1f} | {statistics.median(exits[mode]):.0f} | {statistics.median(memory[mode]):.0f} |")
    print()
    print(f"isolation cost: start +{statistics.median(first[on]) - statistics.median(first[off]):.1f} ms "
          f"({statistics.median(first[on]) / statistics.median(first[off]):.2f}x); "
          f"exits {statistics.median(exits[on]) / statistics.median(exits[off]):.3f}x; "
          f"private memory {statistics.median(memory[on]) / statistics.median(memory[off]):.2f}x")


def memory_backing_benchmark(runs, rounds=300):
    """Huge pages against 4 KiB pages for a guest that touches memory: the dirtying probe rewrites
    its 8 MiB region word by word from ring 3 (native speed here) and sums it, round after round.
    Time to the first round (every page faulted in through EPT) and rounds per second after it,
    with --memory-backing anon and hugepages (2 MiB, from a pool reserved here and given back)."""
    vmm = os.path.join(ROOT, ".build", "release", "vireo-vmm")
    probe = os.path.join(OUT, "probe-pvh.elf")
    pool = "/proc/sys/vm/nr_hugepages"
    with open(pool) as f:
        before = int(f.read())
    with open(pool, "w") as f:
        f.write(str(before + MEMORY_MIB // 2))
    modes = {"4 KiB pages (anon, --thp off)": ["--thp", "off"], "transparent huge pages (anon, the default)": [],
             "2 MiB huge pages (hugetlb pool)": ["--memory-backing", "hugepages"]}
    first = {mode: [] for mode in modes}
    rate = {mode: [] for mode in modes}
    try:
        for _ in range(runs):
            for mode, flags in modes.items():
                guest = Guest([vmm, "--kernel", probe, "--memory", f"{MEMORY_MIB}M", *flags,
                               "--cmdline", "probe=dirty spin=0 stride=1"])
                try:
                    zero = guest.wait_for("dirty 0 ")
                    first[mode].append((zero - guest.start) * 1000)
                    start = guest.wait_for("dirty 10 ")
                    end = guest.wait_for(f"dirty {rounds + 10} ", timeout=300)
                    rate[mode].append(rounds / (end - start))
                    if b"MISMATCH" in guest.buffer:
                        raise RuntimeError(f"{mode}: the probe's sums do not match")
                finally:
                    guest.finish()
    finally:
        with open(pool, "w") as f:
            f.write(str(before))
    print(f"| guest RAM ({MEMORY_MIB} MiB) | VMM start to the first round, all 8 MiB touched (ms, median of {runs}) | rounds per second after it (8 MiB rewritten and summed) |")
    print("|---|---|---|")
    for mode in modes:
        print(f"| {mode} | {statistics.median(first[mode]):.1f} | {statistics.median(rate[mode]):.1f} |")
    small, thp, huge = list(modes)
    print()
    for name, mode in (("hugetlb", huge), ("THP", thp)):
        print(f"{name} / 4 KiB pages: first round {statistics.median(first[mode]) / statistics.median(first[small]):.2f}x the time; "
              f"rounds per second {statistics.median(rate[mode]) / statistics.median(rate[small]):.2f}x")


def api_benchmark(runs, vm_count=100, seconds=10):
    """`vireo serve` with 100 VMs in the library: list and show latency under a bounded wrk load
    (2 connections), beside the CLI doing the same (`vireo list --json`, a fresh process per
    answer, what scripts do without the API); a full page load in headless Chromium until the
    manager is interactive; the server's memory at rest and after the load."""
    import json as json_module
    import re
    import urllib.request
    vireo = os.path.join(ROOT, ".build", "release", "vireo")
    home, cli = bench_library()
    env = dict(os.environ, VIREO_HOME=home)
    # The probe kernel lies outside the library: the API takes only paths it is allowed (docs/api.md).
    server = subprocess.Popen([vireo, "serve", "--listen", "127.0.0.1:0", "--allow-path", OUT], env=env, stdout=subprocess.PIPE, text=True)
    line = ""
    while "#token=" not in line:
        line = server.stdout.readline()
        if not line:
            raise SystemExit("vireo serve did not start")
    url = line.split()[-1]
    base, token = url.split("/#token=")

    def call(method, path, body=None):
        request = urllib.request.Request(base + path, method=method, data=None if body is None else json_module.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            return response.read()

    def rss_kib():
        with open(f"/proc/{server.pid}/status") as status:
            return int(next(l for l in status if l.startswith("VmRSS:")).split()[1])

    time.sleep(1)
    rest_empty = rss_kib()
    probe = os.path.join(OUT, "probe-pvh.elf")
    for index in range(vm_count):
        # Every tenth with a thin disk and a NAT card, as a real library has (nothing runs).
        body = {"name": f"vm-{index:03d}", "kernel": probe, "memory_bytes": 64 << 20, "nics": []}
        if index % 10 == 0:
            body.update(disk_bytes=1 << 30, nics=["nat"])
        else:
            body.update(without_disk=True)
        call("POST", "/api/vms", body)
    time.sleep(1)
    rest_full = rss_kib()

    def wrk(path):
        output = subprocess.run(["wrk", "-t1", "-c2", f"-d{seconds}s", "--latency", "-H", f"Authorization: Bearer {token}", base + path],
                                check=True, capture_output=True, text=True).stdout
        def percentile(name):
            match = re.search(rf"^\s*{name}\s+([0-9.]+)(us|ms|s)\s*$", output, re.M)
            value, unit = float(match.group(1)), match.group(2)
            return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
        rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1))
        errors = "Non-2xx" in output or "Socket errors" in output
        return percentile("50%"), percentile("99%"), rate, errors

    results = {}
    for label, path in [("list (100 VMs)", "/api/vms"), ("show one VM", "/api/vms/vm-050")]:
        samples = [wrk(path) for _ in range(max(1, runs // 5))]
        results[label] = tuple(statistics.median(s[i] for s in samples) for i in range(3)) + (any(s[3] for s in samples),)
    after_load = rss_kib()

    cli_samples = []
    for _ in range(runs):
        begin = time.perf_counter()
        subprocess.run([vireo, "list", "--json"], env=env, check=True, stdout=subprocess.DEVNULL)
        cli_samples.append((time.perf_counter() - begin) * 1000)
    cli_samples.sort()
    cli_p50 = statistics.median(cli_samples)
    cli_p99 = cli_samples[min(len(cli_samples) - 1, int(len(cli_samples) * 0.99))]

    # The page: navigation start until the manager says it is ready (list drawn, buttons wired).
    page_ms = []
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--disable-dev-shm-usage"]:
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            for _ in range(runs):
                driver.get("about:blank")
                driver.get(url)
                deadline = time.time() + 30
                while driver.execute_script("return document.body && document.body.dataset.ready") != "true":
                    if time.time() > deadline:
                        raise SystemExit("the page never became ready")
                    time.sleep(0.005)
                page_ms.append(driver.execute_script("return Number(document.body.dataset.readyMs)"))
        finally:
            driver.quit()
    except ImportError:
        print("(no python3-selenium: page load not measured)")
    server.terminate()
    server.wait()
    shutil.rmtree(home, ignore_errors=True)

    print(f"| request (wrk, 2 connections, {seconds} s) | p50 (ms) | p99 (ms) | requests/s | errors |")
    print("|---|---|---|---|---|")
    for label, (p50, p99, rate, errors) in results.items():
        print(f"| {label} | {p50:.2f} | {p99:.2f} | {rate:.0f} | {'yes' if errors else 'none'} |")
    print(f"| peer: `vireo list --json` (new process each, {runs} runs) | {cli_p50:.2f} | {cli_p99:.2f} | {1000 / cli_p50:.0f} | |")
    print()
    list_p50, list_p99 = results["list (100 VMs)"][0], results["list (100 VMs)"][1]
    print(f"API list / CLI list p50: {list_p50 / cli_p50:.2f}x; list p99 {list_p99:.2f} ms (target <= 20)")
    if page_ms:
        # The first load fills the browser's cache; the later ones are what a returning user sees.
        print(f"page interactive: median {statistics.median(page_ms):.0f} ms of {len(page_ms)} loads (target <= 300); "
              f"first load (empty cache) {page_ms[0]:.0f} ms, slowest {max(page_ms):.0f} ms")
    print(f"vireo serve RSS: {rest_empty} KiB at rest with an empty library, {rest_full} KiB with {vm_count} VMs, {after_load} KiB after the load")


def nat_start_benchmark(runs):
    """A VM's first `vireo start` on a running NAT network beside one without a card (issue 29):
    each new VM reserves an address, which dnsmasq must learn. Runs itself again inside a network
    namespace of its own, so the host's links, firewall and dnsmasq are never touched."""
    if os.environ.get("VIREO_BENCH_NETNS") != "1":
        name = f"vireo-bench-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
            env = dict(os.environ, VIREO_BENCH_NETNS="1")
            subprocess.run(["ip", "netns", "exec", name, sys.executable, os.path.abspath(__file__), "--only", "nat-start", "--runs", str(runs)],
                           check=True, env=env)
        finally:
            subprocess.run(["ip", "netns", "delete", name])
        return
    probe = os.path.join(OUT, "probe-pvh.elf")
    home, cli = bench_library()
    nat, plain = [], []
    try:
        # The network up, with a VM on it, before anything is timed.
        cli("create", "first", "--kernel", probe, "--memory", "32M", "--no-disk", "--no-rng", "--nic", "nat", "--cmdline", "console=ttyS0 probe=irq")
        cli("start", "first")
        for index in range(runs):
            for samples, card in ((nat, ["--nic", "nat"]), (plain, ["--no-nic"])):
                name = f"{'n' if samples is nat else 'p'}{index}"
                cli("create", name, "--kernel", probe, "--memory", "32M", "--no-disk", "--no-rng", *card, "--cmdline", "console=ttyS0 probe=irq")
                begin = time.perf_counter()
                cli("start", name)
                samples.append((time.perf_counter() - begin) * 1000)
    finally:
        # Every VM, then the network and its dnsmasq: nothing may outlive the namespace.
        vireo, env = os.path.join(ROOT, ".build", "release", "vireo"), dict(os.environ, VIREO_HOME=home)
        for name in sorted(os.listdir(home)):
            if os.path.exists(os.path.join(home, name, "config.json")):
                subprocess.run([vireo, "delete", name, "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([vireo, "network", "delete", "default"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)
    nat_ms, plain_ms = statistics.median(nat), statistics.median(plain)
    print(f"| first `vireo start` of a new VM (ms, median of {runs}) | on the running NAT network | without a card | ratio |")
    print("|---|---|---|---|")
    print(f"| library VM, 32 MiB probe | {nat_ms:.0f} | {plain_ms:.0f} | {nat_ms / plain_ms:.2f}x |")


def cli_benchmark(runs, vm_count=100):
    """`vireo list` on an empty library and on 100 VMs (table and --json), a new process each as a
    script's loop runs it, interleaved with the issue's yardstick `qemu-img --version`. Every tenth
    VM has a thin disk and a NAT card, as the API benchmark's library; the VMs are made inside a
    private network namespace so the host's networking is untouched (nothing runs)."""
    vireo = os.path.join(ROOT, ".build", "release", "vireo")
    probe = os.path.join(OUT, "probe-pvh.elf")
    home, _ = bench_library()
    empty, _ = bench_library()
    namespace = f"vireo-bench-cli-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    env = dict(os.environ, VIREO_HOME=home)
    try:
        for index in range(vm_count):
            extra = ["--disk", "1G", "--nic", "nat"] if index % 10 == 0 else ["--no-disk", "--no-nic"]
            subprocess.run(["ip", "netns", "exec", namespace, vireo, "create", f"vm-{index:03d}", "--kernel", probe, "--memory", "64M", *extra],
                           env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cases = [("`qemu-img --version` (the yardstick)", ["qemu-img", "--version"], home),
                 ("`vireo list`, empty library", [vireo, "list"], empty),
                 (f"`vireo list`, {vm_count} VMs (table)", [vireo, "list"], home),
                 (f"`vireo list --json`, {vm_count} VMs", [vireo, "list", "--json"], home)]
        samples = {label: [] for label, _, _ in cases}
        for _ in range(runs):
            for label, command, library in cases:
                begin = time.perf_counter()
                subprocess.run(command, env=dict(os.environ, VIREO_HOME=library), check=True, stdout=subprocess.DEVNULL)
                samples[label].append((time.perf_counter() - begin) * 1000)
    finally:
        for name in sorted(os.listdir(home)):
            if os.path.exists(os.path.join(home, name, "config.json")):
                subprocess.run(["ip", "netns", "exec", namespace, vireo, "delete", name, "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "exec", namespace, vireo, "network", "delete", "default"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "delete", namespace])
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(empty, ignore_errors=True)
    yardstick = statistics.median(samples[cases[0][0]])
    print(f"| command ({runs} runs each, interleaved; wall time per process) | median (ms) | p90 (ms) | / `qemu-img --version` |")
    print("|---|---|---|---|")
    for label, _, _ in cases:
        ordered = sorted(samples[label])
        median = statistics.median(ordered)
        print(f"| {label} | {median:.2f} | {ordered[int(len(ordered) * 0.9)]:.2f} | {median / yardstick:.2f}x |")


def containerd_benchmark(runs):
    """`ctr run --rm IMAGE NAME true` end to end under a private containerd (its own root, state and
    socket; CRI off), with Debian's runc shim and with containerd-shim-vireo-v2 (a new VM per
    container: the qemu engine under TCG here, where the kvm engine cannot run guest user space),
    and what one running container costs in host memory (RSS of its shim, and of the container's
    process or the VM's engine). The image is busybox-static, made locally."""
    guest = subprocess.run([os.path.join(ROOT, "scripts", "build-container-guest.sh"), "release"], check=True,
                           capture_output=True, text=True).stdout.strip()
    work = subprocess.run(["mktemp", "-d", "/tmp/vireo-ctrd.XXXXXX"], check=True, capture_output=True, text=True).stdout.strip()
    socket = os.path.join(work, "c.sock")
    settings = os.path.join(work, "shim.json")
    with open(settings, "w") as f:
        f.write('{"engine": "qemu", "accel": "tcg", "kernel": "%s/bzImage", "initrd": "%s/agent.cpio.gz", "library": "%s/lib"}' % (guest, guest, work))
    with open(os.path.join(work, "config.toml"), "w") as f:
        f.write(f'version = 2\nroot = "{work}/root"\nstate = "{work}/state"\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                f'[grpc]\n  address = "{socket}"\n[ttrpc]\n  address = "{socket}.ttrpc"\n')
    env = dict(os.environ, PATH=os.path.join(ROOT, ".build", "release") + ":" + os.environ.get("PATH", "/usr/bin:/bin"), VIREO_SHIM_CONFIG=settings)
    daemon = subprocess.Popen(["containerd", "--config", os.path.join(work, "config.toml")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # runc keeps its state under /run/containerd/runc/NAMESPACE whatever containerd's root is: a
    # namespace of this run's own.
    namespace = f"bench{os.getpid()}"
    ctr = ["ctr", "-a", socket, "-n", namespace]
    image = "docker.io/vireo/busybox:test"

    def rss_kib(pid):
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def tree_rss_kib(root):
        children = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True).stdout.split()
        return rss_kib(root) + sum(tree_rss_kib(int(child)) for child in children)

    try:
        for _ in range(100):
            if subprocess.run(ctr + ["version"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        archive = os.path.join(work, "busybox.tar")
        subprocess.run([os.path.join(ROOT, "scripts", "make-test-oci-image.sh"), archive, image], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(ctr + ["image", "import", archive], check=True, stdout=subprocess.DEVNULL)
        runtimes = {"runc": "io.containerd.runc.v2", "vireo": "io.containerd.vireo.v2"}
        samples = {name: [] for name in runtimes}
        for index in range(runs):
            for name, runtime in runtimes.items():
                begin = time.perf_counter()
                subprocess.run(ctr + ["run", "--runtime", runtime, "--rm", image, f"{name}{index}", "true"], check=True)
                samples[name].append((time.perf_counter() - begin) * 1000)
        memory = {}
        for name, runtime in runtimes.items():
            subprocess.run(ctr + ["run", "-d", "--runtime", runtime, image, f"{name}-idle", "sleep", "1000"], check=True, stdout=subprocess.DEVNULL)
            time.sleep(2)
            shim = int(subprocess.run(["pgrep", "-f", f"containerd-shim-.*-namespace {namespace} .*{name}-idle"],
                                      capture_output=True, text=True).stdout.split()[0])
            if name == "vireo":
                with open(os.path.join(work, "lib", f"ctr-{namespace}-vireo-idle", "vmm.pid")) as f:
                    engine = int(f.read().strip())
                memory[name] = (rss_kib(shim), tree_rss_kib(engine))
            else:
                memory[name] = (rss_kib(shim), sum(tree_rss_kib(int(child)) for child in
                                                   subprocess.run(["pgrep", "-P", str(shim)], capture_output=True, text=True).stdout.split()))
            subprocess.run(ctr + ["task", "kill", "-s", "SIGKILL", f"{name}-idle"], check=True)
            time.sleep(1)
            subprocess.run(ctr + ["task", "rm", f"{name}-idle"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run(ctr + ["container", "rm", f"{name}-idle"], check=True)
    finally:
        for task in subprocess.run(ctr + ["task", "ls", "-q"], capture_output=True, text=True).stdout.split():
            subprocess.run(ctr + ["task", "kill", "-s", "SIGKILL", task], stderr=subprocess.DEVNULL)
            time.sleep(1)
            subprocess.run(ctr + ["task", "rm", "-f", task], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        daemon.terminate()
        daemon.wait()
        subprocess.run(["umount", "-R", os.path.join(work, "root")], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    runc_ms, vireo_ms = statistics.median(samples["runc"]), statistics.median(samples["vireo"])
    print(f"| `ctr run --rm busybox true` (ms, median of {runs}) | runc | Vireo (qemu engine, TCG) | ratio |")
    print("|---|---|---|---|")
    print(f"| end to end | {runc_ms:.0f} | {vireo_ms:.0f} | {vireo_ms / runc_ms:.1f}x |")
    print()
    print("| one idle container (`sleep 1000`), RSS in KiB | shim | container process / VM engine (QEMU) | total |")
    print("|---|---|---|---|")
    for name in runtimes:
        shim, body = memory[name]
        print(f"| {name} | {shim} | {body} | {shim + body} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--port-writes", type=int, default=100000)
    parser.add_argument("--only", choices=["vmm", "blk", "lifecycle", "acpi", "qemu-engine", "net", "images", "saved-state", "migration", "isolation", "memory-backing", "api", "nat-start", "network-disks", "disk-stall", "containerd", "guest", "multiqueue", "cli"], help="run one part only")
    parser.add_argument("--vm-count", type=int, default=20, help="VMs created and started in the lifecycle benchmark")
    parser.add_argument("--random-requests", type=int, default=5000)
    parser.add_argument("--cold", action="store_true", help="images: start the first build with an empty package cache")
    args = parser.parse_args()
    build()
    if args.only == "images":
        images_benchmark(min(args.runs, 3), cold=args.cold)
        return
    if args.only == "blk":
        blk_benchmark(3, args.random_requests)
        return
    if args.only == "multiqueue":
        multiqueue_benchmark(3, args.random_requests)
        return
    if args.only == "network-disks":
        network_disk_benchmark(3, args.random_requests)
        return
    if args.only == "disk-stall":
        reconnect_benchmark(3)
        return
    if args.only == "lifecycle":
        lifecycle_benchmark(args.runs, args.vm_count)
        return
    if args.only == "acpi":
        acpi_benchmark(args.runs)
        return
    if args.only == "qemu-engine":
        qemu_engine_benchmark(min(args.runs, 7))
        return
    if args.only == "net":
        net_benchmark(min(args.runs, 5))
        return
    if args.only == "saved-state":
        saved_state_benchmark(min(args.runs, 5))
        return
    if args.only == "migration":
        migration_benchmark(min(args.runs, 5))
        return
    if args.only == "isolation":
        isolation_benchmark(args.runs, args.port_writes)
        return
    if args.only == "memory-backing":
        memory_backing_benchmark(min(args.runs, 7))
        return
    if args.only == "api":
        api_benchmark(args.runs)
        return
    if args.only == "nat-start":
        nat_start_benchmark(min(args.runs, 10))
        return
    if args.only == "containerd":
        containerd_benchmark(min(args.runs, 7))
        return
    if args.only == "cli":
        cli_benchmark(args.runs)
        return
    if args.only == "guest":
        guest_benchmark(min(args.runs, 3))
        return
    names = list(commands("").keys())
    results = {name: {} for name in names}
    for name in names:
        samples = [first_byte_ms(commands("probe=hello")[name]) for _ in range(args.runs)]
        results[name]["first_byte_ms"] = statistics.median(samples)
        if name != "c-kvm-loop":   # the C loop has no interrupt controller, so it cannot run probe=irq
            samples = [vmm_memory_kib(commands("probe=irq")[name]) for _ in range(3)]
            results[name]["rss_kib"] = statistics.median(s[0] for s in samples)
            results[name]["dirty_kib"] = statistics.median(s[1] for s in samples)
    # Interleave the exit runs so background load hits all three alike.
    exit_samples = {name: [] for name in names}
    for _ in range(3):
        for name in names:
            exit_samples[name].append(exits_per_second(commands(f"probe=ports count={args.port_writes}")[name], args.port_writes))
    for name in names:
        results[name]["exits_per_s"] = statistics.median(exit_samples[name])

    base = results["c-kvm-loop"]
    print(f"| VMM | first serial byte (ms, median of {args.runs}) | RSS excl. guest RAM (KiB) | private dirty excl. guest RAM (KiB) | port exits/s (median of 3) | exits vs C loop |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = results[name]
        rss = f"{r['rss_kib']:.0f}" if "rss_kib" in r else "n/a"
        dirty = f"{r['dirty_kib']:.0f}" if "dirty_kib" in r else "n/a"
        print(f"| {name} | {r['first_byte_ms']:.1f} | {rss} | {dirty} | {r['exits_per_s']:.0f} | {r['exits_per_s'] / base['exits_per_s']:.2f} |")
    v, q = results["vireo-vmm"], results["qemu-microvm"]
    print()
    print(f"vireo-vmm/qemu first byte: {v['first_byte_ms'] / q['first_byte_ms']:.2f}x; "
          f"RSS: {v['rss_kib'] / q['rss_kib']:.2f}x; private dirty: {v['dirty_kib'] / q['dirty_kib']:.2f}x; "
          f"exits: {v['exits_per_s'] / q['exits_per_s']:.2f}x")
    if args.only != "vmm":
        blk_benchmark(3, args.random_requests)
        multiqueue_benchmark(3, args.random_requests)
        lifecycle_benchmark(args.runs, args.vm_count)
        acpi_benchmark(args.runs)
        qemu_engine_benchmark(min(args.runs, 7))
        net_benchmark(min(args.runs, 5))
        saved_state_benchmark(min(args.runs, 5))
        migration_benchmark(min(args.runs, 5))
        isolation_benchmark(args.runs, args.port_writes)
        memory_backing_benchmark(min(args.runs, 7))
        api_benchmark(args.runs)


if __name__ == "__main__":
    sys.exit(main())
