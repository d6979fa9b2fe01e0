"""virtio-net in the C core without KVM: a fake guest driver on one side, a
SOCK_SEQPACKET socket pair standing in for the tap on the other (it keeps
frame boundaries as a tap does).  The 12-byte virtio-net header passes
straight through in both directions."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.framework.fake_driver import (
    MAC,
    MRG_RXBUF,
    NET_MAC,
    NET_STATUS,
    RAM,
    RX_LAYOUT,
    TX_LAYOUT,
    Buf,
    F,
    FakeDriver,
    fake_ram,
)
from vmmd.native import VirtioNet

HDR = 12


@dataclass
class Net:
    dev: VirtioNet
    rx: FakeDriver
    tx: FakeDriver
    host: socket.socket  # the "tap" from the host's side
    mergeable: bool
    dev_fd: int  # the device's side of the pair


def frame(n: int, seed: int = 1) -> bytes:
    return bytes((seed * 31 + i) & 0xFF for i in range(n))


@pytest.fixture(params=[0, MRG_RXBUF], ids=["plain", "mergeable"])
def net(request: pytest.FixtureRequest) -> Iterator[Net]:
    host, guest_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    guest_side.setblocking(False)
    mem = fake_ram()
    dev = VirtioNet(mem, guest_side.fileno(), MAC)
    rx = FakeDriver(dev, mem, RAM, RX_LAYOUT, queue=0)
    tx = FakeDriver(dev, mem, RAM, TX_LAYOUT, queue=1)
    assert rx.negotiate(F.VERSION_1 | NET_MAC | NET_STATUS | request.param)
    rx.add_queue(16)
    tx.add_queue(16)
    rx.driver_ok()
    yield Net(dev, rx, tx, host, bool(request.param), guest_side.fileno())
    broken = rx.broken_canaries() + tx.broken_canaries()
    dev.close()
    mem.close()
    host.close()
    guest_side.close()
    assert not broken


def test_config_has_mac_and_link_up(net: Net) -> None:
    assert net.rx.config(0, 6).to_bytes(6, "little") == MAC
    assert net.rx.config(6, 2) == 1  # VIRTIO_NET_S_LINK_UP


@pytest.mark.parametrize("size", [60, 1514, 9000])
def test_tx_frame_reaches_the_tap_intact(net: Net, size: int) -> None:
    hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)
    data = frame(size)
    h = net.tx.alloc(HDR, hdr)
    # the frame split over two descriptors, as a guest with fragments does
    a, b = net.tx.alloc(size // 2, data[:size // 2]), net.tx.alloc(size - size // 2, data[size // 2:])
    used = net.tx.submit([Buf(h, HDR), Buf(a, size // 2), Buf(b, size - size // 2)])
    assert len(used) == 1
    assert net.host.recv(65536) == hdr + data
    assert net.dev.stats().bytes_written == size


def post_rx(net: Net, count: int, size: int) -> list[int]:
    bufs = [net.rx.alloc(size) for _ in range(count)]
    net.rx.publish(*[net.rx.add_chain([Buf(b, size, write=True)]) for b in bufs])
    return bufs


def test_rx_frame_reaches_the_guest(net: Net) -> None:
    bufs = post_rx(net, 4, 65562)
    net.rx.notify()
    data = frame(1514, seed=7)
    net.host.send(bytes(HDR) + data)
    net.dev.rx()
    used = net.rx.collect()
    assert [u.len for u in used] == [HDR + len(data)]
    got = net.rx.mem.read(bufs[0], HDR + len(data))
    assert got[HDR:] == data
    assert struct.unpack_from("<H", got, 10)[0] == 1  # num_buffers


def test_rx_frames_wait_until_buffers_are_posted(net: Net) -> None:
    frames = [frame(100 + i, seed=i) for i in range(3)]
    for f in frames:
        net.host.send(bytes(HDR) + f)
    net.dev.rx()  # no buffers: nothing taken, nothing lost
    assert net.rx.collect() == []
    bufs = post_rx(net, 3, 65562)
    net.rx.notify()  # new buffers: the device drains the tap
    used = net.rx.collect()
    assert len(used) == 3
    assert [net.rx.mem.read(b + HDR, len(f)) for b, f in zip(bufs, frames)] == frames


def test_frame_over_small_buffers(net: Net) -> None:
    """Mergeable: a frame spans buffers (num_buffers says how many).  Without
    MRG_RXBUF a frame gets one buffer - Linux then posts 64 KiB ones."""
    bufs = post_rx(net, 16, 2048)
    net.rx.notify()
    data = frame(5000, seed=3)
    net.host.send(bytes(HDR) + data)
    net.dev.rx()
    used = net.rx.collect()
    if not net.mergeable:
        assert [u.len for u in used] == [2048]
        return
    assert [u.len for u in used] == [2048, 2048, HDR + 5000 - 4096]
    got = b"".join(net.rx.mem.read(b, u.len) for b, u in zip(bufs, used))
    assert got[HDR:] == data
    assert struct.unpack_from("<H", got, 10)[0] == 3  # num_buffers
    # the 13 untouched buffers went back to the ring: the next frame uses the 4th
    net.host.send(bytes(HDR) + frame(10))
    net.dev.rx()
    assert [u.id for u in net.rx.collect()] == [used[-1].id + 1]


def test_hostile_rx_descriptor_needs_reset(net: Net) -> None:
    from tests.framework.fake_driver import Desc
    net.rx.publish(net.rx.write_table([Desc(0x7FFF_0000_0000, 4096, 2)]))
    net.rx.notify()
    net.host.send(bytes(HDR) + frame(64))
    net.dev.rx()
    assert net.rx.needs_reset
    assert net.dev.stats().bad_chains == 1


def test_full_rx_queue_frames_wait_and_none_is_lost(net: Net) -> None:
    """40 frames against a 16-entry queue: the device takes what the guest
    has room for, the rest wait in the tap, and every frame arrives, in
    order, as the guest recycles its buffers."""
    frames = [frame(60 + i, seed=i) for i in range(40)]
    for f in frames:
        net.host.send(bytes(HDR) + f)
    got: list[bytes] = []
    buf_of = dict(enumerate(post_rx(net, 16, 2048)))  # chain head -> its buffer
    net.rx.notify()
    while len(got) < len(frames):
        used = net.rx.collect()
        assert used, f"stalled after {len(got)} frames"
        for u in used:
            got.append(net.rx.mem.read(buf_of[u.id] + HDR, u.len - HDR))
        # recycle: the same buffers in new chains
        for u in used:
            addr = buf_of.pop(u.id)
            buf_of[net.rx.add_chain([Buf(addr, 2048, write=True)])] = addr
            net.rx.publish(next(reversed(buf_of)))
        net.rx.notify()
    assert got == frames
    s = net.dev.stats()
    assert (s.rx_frames, s.bytes_read) == (40, sum(map(len, frames)))


def test_rx_header_from_the_tap_reaches_the_guest(net: Net) -> None:
    """The tap's virtio-net header (checksum offload fields) passes through;
    only num_buffers is the device's own."""
    bufs = post_rx(net, 2, 4096)
    net.rx.notify()
    hdr = struct.pack("<BBHHHHH", 1, 0, 54, 0, 34, 16, 0)  # NEEDS_CSUM, csum at 34+16
    net.host.send(hdr + frame(100))
    net.dev.rx()
    (u,) = net.rx.collect()
    got = net.rx.mem.read(bufs[0], u.len)
    assert got[:10] == hdr[:10]
    assert struct.unpack_from("<H", got, 10)[0] == 1


def tx_submit(net: Net, bufs: list[Buf]) -> None:
    net.tx.publish(net.tx.add_chain(bufs))
    net.tx.notify()


@pytest.mark.parametrize("case", ["short-header", "writable-buffer", "outside-ram"])
def test_hostile_tx_chain_needs_reset_and_sends_nothing(net: Net, case: str) -> None:
    h = net.tx.alloc(HDR)
    if case == "short-header":
        bufs = [Buf(h, 4)]
    elif case == "writable-buffer":
        bufs = [Buf(h, HDR), Buf(net.tx.alloc(64), 64, write=True)]
    else:
        bufs = [Buf(h, HDR), Buf(0x7FFF_0000_0000, 64)]
    tx_submit(net, bufs)
    assert net.tx.needs_reset
    assert net.dev.stats().bad_chains == 1
    net.host.setblocking(False)
    with pytest.raises(BlockingIOError):
        net.host.recv(65536)


def test_rx_chain_with_a_readable_buffer_needs_reset(net: Net) -> None:
    net.rx.publish(net.rx.add_chain([Buf(net.rx.alloc(2048), 2048)]))  # not device-writable
    net.rx.notify()
    net.host.send(bytes(HDR) + frame(64))
    net.dev.rx()
    assert net.rx.needs_reset
    assert net.rx.collect() == []


def test_frames_the_tap_refuses_are_dropped_and_counted(net: Net) -> None:
    """A full tap (nobody reading on the host) costs frames, not the device:
    the chains complete, the drops are counted, later frames go through."""
    guest_side_fd = net.dev_fd
    socket.socket(fileno=os.dup(guest_side_fd)).setsockopt(socket.SOL_SOCKET,
                                                           socket.SO_SNDBUF, 4096)
    data = frame(1000)
    for _ in range(64):
        used = net.tx.submit([Buf(net.tx.alloc(HDR), HDR), Buf(net.tx.alloc(1000, data), 1000)])
        assert len(used) == 1
    s = net.dev.stats()
    assert s.io_errors > 0 and s.tx_frames + s.io_errors == 64
    while True:  # drain the "tap"
        try:
            net.host.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    assert len(net.tx.submit([Buf(net.tx.alloc(HDR), HDR), Buf(net.tx.alloc(60), 60)])) == 1
    assert net.host.recv(65536) == bytes(HDR) + bytes(60)
    assert not net.tx.needs_reset
