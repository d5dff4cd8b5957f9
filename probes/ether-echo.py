#!/usr/bin/env python3
"""The host end of the net probe: on interface IFACE, answers every Ethernet frame of type 0x88b5
whose payload starts with b"vireo-ping" with a frame back to its sender carrying
b"vireo-pong " + the ping. Prints one line per answer."""
import socket
import sys

ETHERTYPE = 0x88B5
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
sock.bind((sys.argv[1], 0))
own_mac = sock.getsockname()[4]
print("ready", flush=True)
while True:
    frame = sock.recv(65536)
    if frame[12:14] == b"\x88\xb5" and frame[14:24] == b"vireo-ping":
        sock.send(frame[6:12] + own_mac + b"\x88\xb5" + b"vireo-pong " + frame[14:])
        print("answered", frame[6:12].hex(":"), frame[14:].decode(errors="replace"), flush=True)
