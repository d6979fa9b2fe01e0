"""Ethernet frames between the host and the micro-guest's net driver (`mg=net`), on a tap."""

from __future__ import annotations

import select
import socket
import struct
import time

from tests.framework import GUEST_HANG_S

MAC0, MAC1 = "02:00:00:00:00:10", "02:00:00:00:00:11"  # the guest's interfaces
HOST_MAC = bytes.fromhex("020000000099")
BCAST = b"\xff" * 6


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def eth_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + struct.pack(">H", ethertype)


def recv_frames(sock: socket.socket, n: int, src: str) -> list[bytes]:
    """The next n frames on the tap that the guest (MAC src) sent."""
    got: list[bytes] = []
    deadline = time.monotonic() + GUEST_HANG_S
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([sock], [], [], left)[0], f"only {len(got)} of {n}"
        f = sock.recv(65536)
        if f[6:12] == mac_bytes(src) and f[12:14] == b"\x88\xb5":
            got.append(f)
    return got


def host_frame(size: int, seed: int, dst: bytes = BCAST) -> bytes:
    """A frame of `size` bytes from the host, its body derived from `seed`."""
    body = bytes((seed * 7 + i) & 0xFF for i in range(size - 14))
    return eth_header(dst, HOST_MAC, 0x88B5) + body
