"""The C virtio-net device on a real tap (in a network namespace of the
test's own), without KVM: the offloads the guest accepts are mirrored to
the tap when the driver sets DRIVER_OK, and none that it refused."""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from tests.framework.fake_driver import (
    MAC,
    MRG_RXBUF,
    NET_MAC,
    RAM,
    RX_LAYOUT,
    TX_LAYOUT,
    F,
    FakeDriver,
    fake_ram,
)
from tests.framework.netns import NetNs
from vmmd.native import VirtioNet
from vmmd.spec import NetSpec
from vmmd.vm.devices.net import Taps, check_nets

GUEST_CSUM, GUEST_TSO4, GUEST_TSO6 = 1 << 1, 1 << 7, 1 << 8
SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM, ETHTOOL_GTSO = 0x16, 0x1E


@pytest.fixture()
def ns() -> Iterator[NetNs]:
    with NetNs() as ns:
        ns.add_tap("tap0")
        yield ns


def ethtool(ns: NetNs, cmd: int) -> int:
    """An ETHTOOL_G* value of tap0 (its host side: what the tap may send us)."""
    def ask() -> int:
        val = ctypes.create_string_buffer(struct.pack("II", cmd, 0))
        ifr = struct.pack("16sQ", b"tap0", ctypes.addressof(val)).ljust(40, b"\0")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCETHTOOL, ifr)
        return int(struct.unpack_from("II", val.raw)[1])
    return ns.call(ask)


@pytest.mark.parametrize(("accepted", "csum", "tso"), [
    (0, 0, 0),
    (GUEST_CSUM, 1, 0),
    (GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6, 1, 1),
    (GUEST_TSO4, 0, 0),  # TSO without checksum offload means nothing: off
], ids=["none", "csum", "csum-tso", "tso-without-csum"])
def test_offloads_follow_what_the_guest_accepted(ns: NetNs, accepted: int, csum: int,
                                                 tso: int) -> None:
    taps = Taps()
    (tap,) = ns.call(lambda: taps.open(check_nets((NetSpec("e", "tap0"),), "vm", 0)))
    mem = fake_ram()
    dev = VirtioNet(mem, tap.fd, MAC, tap.max_frame)
    try:
        rx = FakeDriver(dev, mem, RAM, RX_LAYOUT, queue=0)
        tx = FakeDriver(dev, mem, RAM, TX_LAYOUT, queue=1)
        assert rx.negotiate(F.VERSION_1 | NET_MAC | MRG_RXBUF | accepted)
        rx.add_queue(16)
        tx.add_queue(16)
        assert ethtool(ns, ETHTOOL_GTSO) == 0  # nothing before DRIVER_OK
        rx.driver_ok()
        assert (ethtool(ns, ETHTOOL_GTXCSUM), ethtool(ns, ETHTOOL_GTSO)) == (csum, tso)
    finally:
        dev.close()
        mem.close()
        taps.close()
    assert tap.max_frame == 1500 + 18


def test_tap_fd_is_configured_for_the_device(ns: NetNs) -> None:
    """Non-blocking, virtio-net header of 12 bytes (VERSION_1 always has
    num_buffers), and the tap stays (it is the user's) once closed."""
    taps = Taps()
    (tap,) = ns.call(lambda: taps.open(check_nets((NetSpec("e", "tap0"),), "vm", 0)))
    try:
        assert os.get_blocking(tap.fd) is False
        hdr = ctypes.c_int(0)
        fcntl.ioctl(tap.fd, 0x800454D7, hdr)  # TUNGETVNETHDRSZ
        assert hdr.value == 12
    finally:
        taps.close()
    assert "tap0" in ns.links()

