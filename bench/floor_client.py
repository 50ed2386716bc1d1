"""The floor for a CLI call: Python, msgpack and one Unix-socket round trip.

Connects to SOCKET, sends one framed ``ping`` request, reads the answer
and exits 0 if it is ``pong``. ``busctl ping`` cannot do less than this;
bench/control.py times both. Run: ``python bench/floor_client.py SOCKET``.
"""

import socket
import struct
import sys

import msgpack

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
body = msgpack.packb({"id": 1, "op": "ping"})
sock.sendall(struct.pack(">I", len(body)) + body)
data = b""
while len(data) < 4 or len(data) < 4 + struct.unpack_from(">I", data)[0]:
    chunk = sock.recv(65536)
    if not chunk:
        sys.exit(1)
    data += chunk
answer = msgpack.unpackb(data[4:], raw=False)
sys.exit(0 if answer.get("result") == "pong" else 1)
