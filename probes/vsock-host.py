#!/usr/bin/env python3
"""The host end of the vsock probe (Firecracker's Unix-socket model). Usage: vsock-host.py PATH

- listens on PATH_5000 before the VM starts: the guest's connection to host port 5000 lands here;
  prints what the guest sent and answers "host-ack";
- once the VMM has created PATH, checks that a malformed greeting and a connection to a guest port
  nobody accepts are both closed, then connects to guest port 1234 and exchanges "ping".
Prints one line per step."""
import os
import socket
import sys
import threading
import time

base = sys.argv[1]
server = socket.socket(socket.AF_UNIX)
server.bind(base + "_5000")
# A jailed VMM runs as its VM's own uid (docs/isolation.md): it connects here for the guest only
# if that uid may write the socket.
os.chmod(base + "_5000", 0o666)
server.listen(1)
print("ready", flush=True)


def serve_guest_connection():
    connection, _ = server.accept()
    print("port 5000 got", connection.recv(100).decode().strip(), flush=True)
    connection.sendall(b"host-ack\n")
    time.sleep(2)


threading.Thread(target=serve_guest_connection, daemon=True).start()
deadline = time.time() + 30
while not os.path.exists(base) and time.time() < deadline:
    time.sleep(0.02)


def connect():
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(base)
    return sock


bad = connect()
bad.sendall(b"HELLO\n")
print("malformed greeting answered", repr(bad.recv(100)), flush=True)

started = time.time()
unanswered = connect()
unanswered.sendall(b"CONNECT 999\n")
print("unaccepted port answered", repr(unanswered.recv(100)), "after", round(time.time() - started), "s", flush=True)

sock = connect()
sock.sendall(b"CONNECT 1234\n")
print("connect reply", sock.recv(100).decode().strip(), flush=True)
sock.sendall(b"ping")
print("echo", sock.recv(100).decode().strip(), flush=True)
time.sleep(2)
