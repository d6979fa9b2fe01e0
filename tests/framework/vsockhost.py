"""The host side of a vmmd vsock device, as a Firecracker client does it: connect to the
device's listener, `CONNECT <port>\\n`, read `OK <host port>\\n` (docs/vsock.md)."""

from __future__ import annotations

import socket
from pathlib import Path

from vmmd.client import vsock_connect


def host_connect(uds: Path | str, port: int, timeout: float) -> socket.socket:
    """A stream to guest port `port`, the OK line read and its host port checked (the
    device's are 2^30 and up); the client's own connect (vmmd.client.vsock_connect)."""
    s = vsock_connect(str(uds), port, timeout)
    s.settimeout(timeout)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(min(1 << 20, n - len(buf)))
        if not b:
            raise RuntimeError(f"EOF after {len(buf)} of {n} bytes")
        buf += b
    return bytes(buf)
