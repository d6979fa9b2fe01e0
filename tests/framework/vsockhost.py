"""The host side of a vmmd vsock device, as a Firecracker client does it: connect to the
device's listener, `CONNECT <port>\\n`, read `OK <host port>\\n` (docs/vsock.md)."""

from __future__ import annotations

import socket
from pathlib import Path


def host_connect(uds: Path | str, port: int, timeout: float) -> socket.socket:
    """A stream to guest port `port`, the OK line read (RuntimeError if the device closed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(uds))
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            s.close()
            raise RuntimeError(f"the device closed after {line!r}")
        line += b
    if not line.startswith(b"OK ") or int(line[3:]) < 1 << 30:
        s.close()
        raise RuntimeError(f"CONNECT answered {line!r}")
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(min(1 << 20, n - len(buf)))
        if not b:
            raise RuntimeError(f"EOF after {len(buf)} of {n} bytes")
        buf += b
    return bytes(buf)
