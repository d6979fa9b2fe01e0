"""A fake guest vsock driver over the C virtio-vsock device (native tier, fuzz
seeds): three FakeDrivers (RX, TX, event queue) and the packet format.  The
guest side of each connection keeps its own credit books, as a driver does:
`Conn.buf_alloc` is what it grants the device, `Conn.fwd_cnt` what it has
consumed."""

from __future__ import annotations

import select
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.framework.fake_driver import RAM, Buf, F, FakeDriver, Layout
from vmmd.native import GuestMemory, VirtioVsock

HDR = struct.Struct("<QQIIIHHIII")  # struct virtio_vsock_hdr, 44 bytes
HOST_CID = 2
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUT_RCV, SHUT_SEND = 1, 2
DEVICE_BUF = 256 * 1024  # the device's buf_alloc (VMM_VSOCK_BUF)
MAX_PKT = 64 * 1024
FIRST_HOST_PORT = 1 << 30
EVENT_TRANSPORT_RESET = 0

# Queue rings in region 0, TX buffers after them, RX buffers in region 1.
RX_LAYOUT = Layout(desc=0x1000, avail=0x2000, used=0x3000, heap=0x100000)
TX_LAYOUT = Layout(desc=0x4000, avail=0x5000, used=0x6000, heap=0x10000)
EV_LAYOUT = Layout(desc=0x7000, avail=0x8000, used=0x9000, heap=0xA000)


@dataclass(frozen=True)
class Pkt:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    data: bytes = b""


@dataclass
class Conn:
    """The guest's side of one connection."""

    guest_port: int
    host_port: int
    buf_alloc: int = DEVICE_BUF
    fwd_cnt: int = 0
    received: bytearray = field(default_factory=bytearray)


class FakeVsockGuest:
    def __init__(self, dev: VirtioVsock, mem: GuestMemory, cid: int, *, nrx: int = 16,
                 rx_size: int = 4096 + HDR.size) -> None:
        self.dev, self.mem, self.cid = dev, mem, cid
        self.rx = FakeDriver(dev, mem, RAM, RX_LAYOUT, queue=0)
        self.tx = FakeDriver(dev, mem, RAM, TX_LAYOUT, queue=1)
        self.ev = FakeDriver(dev, mem, RAM, EV_LAYOUT, queue=2)
        self.rx_size = rx_size
        self.rx_bufs: dict[int, int] = {}  # head -> address
        self.free_rx = [self.rx.alloc(rx_size) for _ in range(nrx)]
        self.tx_hdr = self.tx.alloc(HDR.size)
        self.tx_data = self.tx.alloc(MAX_PKT + 64)
        self.ev_bufs: dict[int, int] = {}
        self.pending: list[Pkt] = []  # received, not yet taken by expect()

    def init(self, post_rx: bool = True) -> None:
        assert self.rx.negotiate(F.VERSION_1)
        for d in (self.rx, self.tx, self.ev):
            d.add_queue(64)
        if post_rx:
            self.post_rx()
        self.post_event(2)
        self.rx.driver_ok()

    def post_rx(self, n: int | None = None, addrs: list[int] | None = None) -> None:
        take = addrs if addrs is not None else self.free_rx[:n] if n is not None else list(self.free_rx)
        heads = []
        for addr in take:
            self.free_rx.remove(addr)
            head = self.rx.add_chain([Buf(addr, self.rx_size, write=True)])
            self.rx_bufs[head] = addr
            heads.append(head)
        self.rx.publish(*heads)
        self.rx.notify()

    def post_event(self, n: int) -> None:
        heads = []
        for _ in range(n):
            addr = self.ev.alloc(8)
            head = self.ev.add_chain([Buf(addr, 8, write=True)])
            self.ev_bufs[head] = addr
            heads.append(head)
        self.ev.publish(*heads)
        self.ev.notify()

    def events(self) -> list[int]:
        return [struct.unpack("<I", self.mem.read(self.ev_bufs[u.id], 4))[0]
                for u in self.ev.collect()]

    # ---- TX ----
    def send_raw(self, hdr: bytes, data: bytes = b"") -> None:
        self.mem.write(self.tx_hdr, hdr)
        bufs = [Buf(self.tx_hdr, len(hdr))]
        if data:
            self.mem.write(self.tx_data, data)
            bufs.append(Buf(self.tx_data, len(data)))
        used = self.tx.submit(bufs)
        assert len(used) == 1 and used[0].len == 0

    def send(self, op: int, src_port: int, dst_port: int, data: bytes = b"", *,
             buf_alloc: int = DEVICE_BUF, fwd_cnt: int = 0, flags: int = 0, **raw: int) -> None:
        f = dict(src_cid=self.cid, dst_cid=HOST_CID, src_port=src_port, dst_port=dst_port,
                 len=len(data), type=TYPE_STREAM, op=op, flags=flags, buf_alloc=buf_alloc,
                 fwd_cnt=fwd_cnt)
        f.update(raw)
        self.send_raw(HDR.pack(*f.values()), data)

    def send_conn(self, c: Conn, op: int, data: bytes = b"", flags: int = 0) -> None:
        self.send(op, c.guest_port, c.host_port, data, buf_alloc=c.buf_alloc,
                  fwd_cnt=c.fwd_cnt, flags=flags)

    # ---- RX ----
    def recv(self, repost: bool = True) -> list[Pkt]:
        """Packets the device put in RX buffers since the last call (the
        buffers go back to the device unless repost is False)."""
        out, back = [], []
        for u in self.rx.collect():
            addr = self.rx_bufs.pop(u.id)
            raw = self.mem.read(addr, u.len)
            h = HDR.unpack_from(raw)
            assert u.len == HDR.size + h[4], "used len is header + payload"
            out.append(Pkt(*h, data=raw[HDR.size:]))
            self.free_rx.append(addr)
            back.append(addr)
        if repost and back:
            self.post_rx(addrs=back)
        return out

    def pump(self, until: Callable[[], bool] | None = None, timeout: float = 5.0) -> None:
        """Serve the device's host sockets (what the I/O thread does) and take
        the packets, until `until()` or nothing more is ready."""
        import time
        deadline = time.monotonic() + timeout
        while True:
            self.pending += self.recv()
            if until is not None and until():
                return
            ready, _, _ = select.select([self.dev.backend_fd()], [], [],
                                        0.05 if until is not None else 0.02)
            if ready:
                self.dev.poll()
            elif until is None:
                self.pending += self.recv()
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the device made no progress")

    def take(self, op: int | None = None) -> list[Pkt]:
        got = [p for p in self.pending if op is None or p.op == op]
        self.pending = [p for p in self.pending if p not in got]
        return got
