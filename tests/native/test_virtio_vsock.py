"""virtio-vsock in the C core without KVM: a fake guest driver on the queues,
real Unix sockets on the host side (Firecracker's convention: a listener at
uds_path taking "CONNECT <port>\\n", guest connects to "<uds_path>_<port>")."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.framework.fake_driver import Buf, Desc
from tests.framework.fake_vsock import (
    DEVICE_BUF,
    FIRST_HOST_PORT,
    HDR,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUT_RCV,
    SHUT_SEND,
    TYPE_STREAM,
    Conn,
    FakeVsockGuest,
)
from vmmd.native import VirtioVsock

CID = 3
NAME = "v.sock"


@dataclass
class Vsock:
    dev: VirtioVsock
    g: FakeVsockGuest
    dir: Path
    listener: socket.socket

    @property
    def path(self) -> str:
        return str(self.dir / NAME)

    def client(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        s.sendall(f"CONNECT {port}\n".encode())
        return s

    def host_listener(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(f"{self.path}_{port}")
        s.listen(256)  # a full backlog refuses the device's connect (EAGAIN: RST)
        return s


def closed(s: socket.socket) -> bool:
    """The device closed its end (EOF, or a reset when it left bytes unread)."""
    s.settimeout(5)
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


def pattern(n: int, seed: int = 1) -> bytes:
    base = bytes((seed * 131 + i * 7) & 0xFF for i in range(4096))
    return (base * (n // 4096 + 1))[:n]


@pytest.fixture
def vs(tmp_path: Path) -> Iterator[Vsock]:
    cwd = os.getcwd()  # a guest connect moves the calling thread's cwd (by design)
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lis.bind(str(tmp_path / NAME))
    lis.listen(64)
    dir_fd = os.open(tmp_path, os.O_DIRECTORY | os.O_RDONLY)
    from tests.framework.fake_driver import fake_ram
    mem = fake_ram()
    dev = VirtioVsock(mem, lis.fileno(), dir_fd, CID, NAME)
    os.close(dir_fd)  # the device keeps its own
    g = FakeVsockGuest(dev, mem, CID)
    g.init()
    v = Vsock(dev, g, tmp_path, lis)
    yield v
    broken = g.rx.broken_canaries() + g.tx.broken_canaries() + g.ev.broken_canaries()
    dev.close()
    mem.close()
    lis.close()
    os.chdir(cwd)
    assert not broken


def host_connect(v: Vsock, port: int = 1234) -> tuple[socket.socket, Conn]:
    """A host client through the listener, accepted by the guest."""
    cl = v.client(port)
    v.g.pump(lambda: bool(v.g.pending))
    [req] = v.g.take()
    assert (req.op, req.src_cid, req.dst_cid, req.dst_port, req.type) == \
        (OP_REQUEST, HOST_CID, CID, port, TYPE_STREAM)
    assert req.src_port >= FIRST_HOST_PORT and req.buf_alloc == DEVICE_BUF
    c = Conn(guest_port=port, host_port=req.src_port)
    v.g.send_conn(c, OP_RESPONSE)
    assert cl.recv(64) == f"OK {req.src_port}\n".encode()
    return cl, c


def guest_connect(v: Vsock, port: int, guest_port: int = 40000) -> tuple[socket.socket, Conn]:
    """A guest connect to host port `port`; the host side accepted."""
    with v.host_listener(port) as lis:
        c = Conn(guest_port=guest_port, host_port=port)
        v.g.send_conn(c, OP_REQUEST)
        v.g.pump(lambda: bool(v.g.pending))
        [resp] = v.g.take()
        assert (resp.op, resp.src_port, resp.dst_port) == (OP_RESPONSE, port, guest_port)
        peer, _ = lis.accept()
    return peer, c


def guest_read(v: Vsock, c: Conn, n: int, credit_every: int = DEVICE_BUF // 2) -> bytes:
    """Take n bytes of RW packets for c, sending CREDIT_UPDATE as a driver does."""
    told = c.fwd_cnt
    while len(c.received) < n:
        v.g.pump(lambda: any(p.op == OP_RW for p in v.g.pending))
        for p in v.g.take(OP_RW):
            assert (p.dst_port, p.src_port) == (c.guest_port, c.host_port)
            c.received += p.data
            c.fwd_cnt += len(p.data)
        v.g.take(OP_CREDIT_REQUEST)
        if c.fwd_cnt - told >= credit_every or len(c.received) >= n:
            v.g.send_conn(c, OP_CREDIT_UPDATE)
            told = c.fwd_cnt
    out = bytes(c.received[:n])
    del c.received[:n]
    return out


def test_config_is_the_guest_cid(vs: Vsock) -> None:
    assert vs.g.rx.config(0, 8) == CID
    assert vs.g.rx.reg(0x008) == 19  # device id


def test_host_connect_and_bytes_both_ways(vs: Vsock) -> None:
    cl, c = host_connect(vs)
    cl.sendall(b"hello guest")
    assert guest_read(vs, c, 11) == b"hello guest"
    vs.g.send_conn(c, OP_RW, b"hello host")
    assert cl.recv(64) == b"hello host"
    st = vs.dev.stats()
    assert st.connections == 1 and st.bad_packets == 0
    assert (st.bytes_read, st.bytes_written) == (11, 10)


def test_bytes_after_the_connect_line_belong_to_the_stream(vs: Vsock) -> None:
    cl = vs.client(77)
    cl.sendall(b"early")  # before OK: waits in the socket, not eaten with the line
    vs.g.pump(lambda: bool(vs.g.pending))
    [req] = vs.g.take()
    c = Conn(guest_port=77, host_port=req.src_port)
    vs.g.send_conn(c, OP_RESPONSE)
    assert cl.recv(64) == f"OK {req.src_port}\n".encode()
    assert guest_read(vs, c, 5) == b"early"


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT x1\n", b"connect 5\n",
                                  b"CONNECT 4294967296\n", b"CONNECT 12345678901234567890\n",
                                  b"X" * 100])
def test_bad_connect_line_closes_the_client(vs: Vsock, line: bytes) -> None:
    cl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cl.connect(vs.path)
    cl.sendall(line)
    vs.g.pump()
    vs.g.pump()
    assert closed(cl)
    assert vs.g.take() == []


def test_client_without_a_line_is_dropped_after_2s(vs: Vsock) -> None:
    cl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cl.connect(vs.path)
    cl.sendall(b"CONN")  # and no more
    t0 = time.monotonic()
    vs.g.pump(lambda: vs.dev.stats().io_errors == 1, timeout=10)
    assert 1.5 < time.monotonic() - t0 < 5
    assert closed(cl)
    assert vs.g.take() == []


def test_request_the_guest_never_answers_is_cancelled_after_2s(vs: Vsock) -> None:
    cl = vs.client(31)
    vs.g.pump(lambda: bool(vs.g.pending))
    [req] = vs.g.take()
    t0 = time.monotonic()
    vs.g.pump(lambda: any(p.op == OP_RST for p in vs.g.pending), timeout=10)
    assert 1.5 < time.monotonic() - t0 < 5
    [rst] = vs.g.take(OP_RST)
    assert (rst.src_port, rst.dst_port) == (req.src_port, 31)  # the guest forgets it too
    assert closed(cl)
    vs.g.send(OP_RESPONSE, 31, req.src_port)  # too late: answered with RST
    vs.g.pump(lambda: bool(vs.g.take(OP_RST)))


def test_guest_refuses_host_connect(vs: Vsock) -> None:
    cl = vs.client(9)
    vs.g.pump(lambda: bool(vs.g.pending))
    [req] = vs.g.take()
    vs.g.send(OP_RST, 9, req.src_port)
    assert closed(cl)


def test_guest_connect_and_close(vs: Vsock) -> None:
    peer, c = guest_connect(vs, 5000)
    vs.g.send_conn(c, OP_RW, b"ping")
    assert peer.recv(64) == b"ping"
    peer.sendall(b"pong")
    assert guest_read(vs, c, 4) == b"pong"
    vs.g.send_conn(c, OP_SHUTDOWN, flags=SHUT_RCV | SHUT_SEND)
    vs.g.pump(lambda: bool(vs.g.take(OP_RST)))
    assert closed(peer)


def test_host_half_close_reaches_the_guest_as_shutdown(vs: Vsock) -> None:
    peer, c = guest_connect(vs, 5001)
    peer.sendall(b"last words")
    peer.shutdown(socket.SHUT_WR)
    assert guest_read(vs, c, 10) == b"last words"
    vs.g.pump(lambda: any(p.op == OP_SHUTDOWN for p in vs.g.pending))
    [sh] = vs.g.take(OP_SHUTDOWN)
    assert sh.flags & SHUT_SEND
    vs.g.send_conn(c, OP_RW, b"reply")  # the other way is still open
    assert peer.recv(64) == b"reply"


def test_request_with_a_nonzero_fwd_cnt_still_gets_data(vs: Vsock) -> None:
    """Found by fuzz_virtio_vsock: a REQUEST's fwd_cnt ahead of the device's
    (zero) send count made every byte look in flight - no credit, ever."""
    with vs.host_listener(5009) as lis:
        c = Conn(guest_port=40009, host_port=5009, fwd_cnt=128)
        vs.g.send_conn(c, OP_REQUEST)
        vs.g.pump(lambda: bool(vs.g.take(OP_RESPONSE)))
        peer, _ = lis.accept()
    peer.sendall(b"data")
    v = vs.g
    v.pump(lambda: any(p.op == OP_RW for p in v.pending))
    [rw] = v.take(OP_RW)
    assert rw.data == b"data"
    c.fwd_cnt += 4
    v.send_conn(c, OP_CREDIT_UPDATE)  # counted from 128 on: accepted
    assert vs.dev.stats().bad_packets == 0


def test_guest_connect_to_nobody_is_reset(vs: Vsock) -> None:
    vs.g.send(OP_REQUEST, 40001, 6000)
    vs.g.pump(lambda: bool(vs.g.pending))
    [rst] = vs.g.take()
    assert (rst.op, rst.src_port, rst.dst_port) == (OP_RST, 6000, 40001)
    assert vs.dev.stats().io_errors == 1


def test_large_transfer_both_ways_is_byte_exact(vs: Vsock) -> None:
    n = 4 << 20
    data = pattern(n, seed=3)
    peer, c = guest_connect(vs, 5002)
    peer.setblocking(False)
    # host -> guest
    sent, got = 0, bytearray()
    while len(got) < n:
        if sent < n:
            try:
                sent += peer.send(data[sent:sent + 65536])
            except BlockingIOError:
                pass
        vs.g.pump()
        for p in vs.g.take(OP_RW):
            got += p.data
            c.fwd_cnt += len(p.data)
        vs.g.take(OP_CREDIT_REQUEST)
        vs.g.send_conn(c, OP_CREDIT_UPDATE)
    assert bytes(got) == data
    # guest -> host, 64 KiB packets within the device's credit
    received = bytearray()
    off = 0
    in_flight_ok = DEVICE_BUF
    while off < n:
        chunk = data[off:off + 65536]
        assert len(chunk) <= in_flight_ok
        vs.g.send_conn(c, OP_RW, chunk)
        off += len(chunk)
        try:
            while True:
                b = peer.recv(1 << 20)
                if not b:
                    break
                received += b
        except BlockingIOError:
            pass
        vs.g.pump()
        ups = [p for p in vs.g.take() if p.op in (OP_CREDIT_UPDATE, OP_RW)]
        fwd = ups[-1].fwd_cnt if ups else None
        in_flight_ok = DEVICE_BUF - (off - fwd) if fwd is not None else in_flight_ok - len(chunk)
        if in_flight_ok < 65536:  # wait for the host side to drain
            while in_flight_ok < 65536:
                try:
                    received += peer.recv(1 << 20)
                except BlockingIOError:
                    pass
                vs.g.pump()
                for p in vs.g.take():
                    if p.op == OP_CREDIT_UPDATE:
                        in_flight_ok = DEVICE_BUF - (off - p.fwd_cnt)
    peer.setblocking(True)
    peer.settimeout(5)
    while len(received) < n:
        vs.g.pump()
        received += peer.recv(1 << 20)
    assert bytes(received) == data
    assert vs.dev.stats().bad_packets == 0


def test_slow_host_reader_bounds_the_device_buffer(vs: Vsock) -> None:
    """The host reads nothing: the device takes the guest's bytes up to the
    socket's own buffer plus exactly its buf_alloc, then refuses more
    (credit violation: RST, counted); nothing it accepted is lost."""
    peer, c = guest_connect(vs, 5003)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = bytearray()
    # fill until the device has buffered its whole credit: its last packet's fwd_cnt
    # tells how much the host took; in flight = sent - fwd_cnt
    fwd = 0
    for i in range(200):
        chunk = pattern(65536, seed=i)
        room = DEVICE_BUF - (len(sent) - fwd)
        if room < len(chunk):
            vs.g.send_conn(c, OP_CREDIT_REQUEST)
            vs.g.pump(lambda: bool(vs.g.pending))
            fwd = vs.g.take()[-1].fwd_cnt
            room = DEVICE_BUF - (len(sent) - fwd)
            if room < len(chunk):
                break
        vs.g.send_conn(c, OP_RW, chunk)
        sent += chunk
    else:
        pytest.fail("the device took everything: unbounded")
    in_device = len(sent) - fwd
    assert in_device <= DEVICE_BUF
    # one byte more than granted: the connection is reset, the daemon is fine
    vs.g.send_conn(c, OP_RW, b"x" * (DEVICE_BUF - in_device + 1))
    vs.g.pump(lambda: bool(vs.g.take(OP_RST)))
    assert vs.dev.stats().bad_packets == 1
    peer.settimeout(5)
    got = bytearray()
    while chunk := peer.recv(1 << 20):
        got += chunk
    assert bytes(got) == bytes(sent[:len(got)])  # what the host got is a prefix, intact
    assert len(got) >= fwd


def test_slow_guest_reader_stops_host_reads(vs: Vsock) -> None:
    """The guest grants 64 KiB and reads nothing: the device sends exactly
    that, asks for credit, and leaves the rest in the host socket."""
    peer, c = guest_connect(vs, 5004)
    c.buf_alloc = 65536
    vs.g.send_conn(c, OP_CREDIT_UPDATE)
    peer.setblocking(False)
    data = pattern(1 << 20, seed=9)
    sent = 0
    try:
        while sent < len(data):
            sent += peer.send(data[sent:])
    except BlockingIOError:
        pass
    vs.g.pump(lambda: any(p.op == OP_CREDIT_REQUEST for p in vs.g.pending))
    vs.g.pump()
    got = b"".join(p.data for p in vs.g.take(OP_RW))
    assert len(got) == 65536 and got == data[:65536]
    assert vs.g.take(OP_CREDIT_REQUEST)
    # stalled: the device's fd is quiet (no busy loop) while the socket holds data
    import select
    assert select.select([vs.dev.backend_fd()], [], [], 0.1)[0] == []
    c.fwd_cnt = 65536
    vs.g.send_conn(c, OP_CREDIT_UPDATE)
    vs.g.pump(lambda: sum(len(p.data) for p in vs.g.pending if p.op == OP_RW) >= 65536)
    more = b"".join(p.data for p in vs.g.take(OP_RW))
    assert more == data[65536:65536 + len(more)] and len(more) == 65536


def test_no_rx_buffers_data_waits(tmp_path: Path) -> None:
    cwd = os.getcwd()
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lis.bind(str(tmp_path / NAME))
    lis.listen(4)
    dir_fd = os.open(tmp_path, os.O_DIRECTORY)
    from tests.framework.fake_driver import fake_ram
    mem = fake_ram()
    dev = VirtioVsock(mem, lis.fileno(), dir_fd, CID, NAME)
    os.close(dir_fd)
    try:
        g = FakeVsockGuest(dev, mem, CID)
        g.init(post_rx=False)
        cl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cl.connect(str(tmp_path / NAME))
        cl.sendall(b"CONNECT 5\n")
        g.pump()
        g.pump()
        assert g.take() == []
        g.post_rx(1)
        g.pump(lambda: bool(g.pending))
        assert [p.op for p in g.take()] == [OP_REQUEST]
    finally:
        dev.close()
        mem.close()
        lis.close()
        os.chdir(cwd)


# ---- hostile packets: contained, counted, the device goes on ----
@pytest.mark.parametrize("field,value", [
    ("src_cid", 7), ("dst_cid", 3), ("dst_cid", 1 << 40), ("type", 2), ("op", 99), ("op", 0),
    ("len", 10),
])
def test_hostile_header_resets_the_connection(vs: Vsock, field: str, value: int) -> None:
    peer, c = guest_connect(vs, 5005)
    f = dict(src_cid=CID, dst_cid=HOST_CID, src_port=c.guest_port, dst_port=c.host_port, len=0,
             type=TYPE_STREAM, op=OP_CREDIT_UPDATE, flags=0, buf_alloc=DEVICE_BUF, fwd_cnt=0)
    f[field] = value
    vs.g.send_raw(HDR.pack(*f.values()))  # len 10 with no payload: more than the chain has
    vs.g.pump(lambda: bool(vs.g.take(OP_RST)))
    assert vs.dev.stats().bad_packets == 1
    assert closed(peer)
    # the device still serves new connections
    peer2, c2 = guest_connect(vs, 5006, guest_port=40100)
    vs.g.send_conn(c2, OP_RW, b"ok")
    assert peer2.recv(64) == b"ok"
    assert not vs.g.rx.needs_reset


@pytest.mark.parametrize("case", ["fwd_cnt ahead", "data on a control op", "shutdown flags",
                                  "request twice", "rw after shutdown"])
def test_hostile_sequence_resets_the_connection(vs: Vsock, case: str) -> None:
    peer, c = guest_connect(vs, 5007)
    if case == "fwd_cnt ahead":
        c.fwd_cnt = 100  # the device never sent 100 bytes
        vs.g.send_conn(c, OP_CREDIT_UPDATE)
    elif case == "data on a control op":
        vs.g.send_conn(c, OP_CREDIT_UPDATE, b"zz")
    elif case == "shutdown flags":
        vs.g.send_conn(c, OP_SHUTDOWN, flags=4)
    elif case == "request twice":
        vs.g.send_conn(c, OP_REQUEST)
    else:
        vs.g.send_conn(c, OP_SHUTDOWN, flags=SHUT_SEND)
        vs.g.send_conn(c, OP_RW, b"more")
    vs.g.pump(lambda: bool(vs.g.take(OP_RST)))
    assert vs.dev.stats().bad_packets == 1
    assert not vs.g.rx.needs_reset


def test_packet_for_no_connection_gets_rst(vs: Vsock) -> None:
    vs.g.send(OP_RW, 1, 2, b"stray")
    vs.g.pump(lambda: bool(vs.g.pending))
    [p] = vs.g.take()
    assert (p.op, p.src_port, p.dst_port) == (OP_RST, 2, 1)
    vs.g.send(OP_RST, 1, 2)  # an RST is never answered
    vs.g.pump()
    assert vs.g.take() == []


def test_rst_flood_is_bounded(vs: Vsock) -> None:
    """Strays while the guest posts no RX buffers: the owed RSTs are capped."""
    vs.g.rx.collect()
    for i in range(300):
        vs.g.send(OP_RW, 1000 + i, 2, b"x")
    vs.g.pump()
    assert len(vs.g.take(OP_RST)) <= 64 + 16


def test_tx_chain_with_writable_buffer_fails_the_device(vs: Vsock) -> None:
    g = vs.g
    g.mem.write(g.tx_hdr, HDR.pack(CID, HOST_CID, 1, 2, 0, TYPE_STREAM, OP_RW, 0, 0, 0))
    g.tx.submit([Buf(g.tx_hdr, HDR.size), Buf(g.tx_data, 16, write=True)])
    assert g.rx.needs_reset
    assert vs.dev.stats().bad_chains == 1


def test_tx_descriptor_outside_ram_fails_the_device(vs: Vsock) -> None:
    g = vs.g
    head = g.tx.write_table([Desc(0x7FFF_0000, HDR.size)])
    g.tx.publish(head)
    g.tx.notify()
    assert g.rx.needs_reset


def test_short_tx_header_fails_the_device(vs: Vsock) -> None:
    g = vs.g
    g.tx.submit([Buf(g.tx_hdr, 20)])
    assert g.rx.needs_reset


def test_rx_buffer_smaller_than_a_header_fails_the_device(vs: Vsock) -> None:
    g = vs.g
    for i in range(17):  # RSTs owed: 16 fill the posted buffers, one waits
        g.send(OP_RW, 100 + i, 2, b"stray")
    assert len(g.rx.collect()) == 16  # taken, not given back
    assert not g.rx.needs_reset
    small = g.rx.alloc(16)
    g.rx.publish(g.rx.add_chain([Buf(small, 16, write=True)]))
    g.rx.notify()  # the waiting RST goes to this one: too small for a header
    assert g.rx.needs_reset
    assert vs.dev.stats().bad_chains == 1


def test_device_reset_drops_connections(vs: Vsock) -> None:
    peer, c = guest_connect(vs, 5008)
    vs.g.rx.reset()
    assert closed(peer)


def test_many_connections(vs: Vsock) -> None:
    peers = []
    with vs.host_listener(7000) as lis:
        for i in range(100):
            vs.g.send(OP_REQUEST, 50000 + i, 7000)
        vs.g.pump(lambda: len(vs.g.pending) >= 100)
        assert {p.op for p in vs.g.take()} == {OP_RESPONSE}
        for _ in range(100):
            peers.append(lis.accept()[0])
    for i in range(100):
        vs.g.send(OP_RW, 50000 + i, 7000, struct.pack("<I", i))
    got = sorted(struct.unpack("<I", p.recv(4))[0] for p in peers)
    assert got == list(range(100))
    assert vs.dev.stats().connections == 100
