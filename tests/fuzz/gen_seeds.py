#!/usr/bin/env python3
"""Write the seed corpora tests/fuzz/corpus/<harness>/ (committed, small).

Each seed is a well-formed input of its harness (the layouts are in each
harness's header comment and in fuzz.h): a driver set-up a Linux guest
would make, valid chains and requests in guest RAM, a few ops.  The fuzzer
starts from these rather than from nothing, so it reaches the request
paths at once and mutates outward.  Run again after changing an input
layout:  python3 tests/fuzz/gen_seeds.py
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

# Descriptor flags and feature bits.
NEXT, WRITE, INDIRECT = 1, 2, 4
VERSION_1, EVENT_IDX, INDIRECT_DESC = 1 << 32, 1 << 29, 1 << 28
BLK_FEATURES = VERSION_1 | (1 << 2) | (1 << 6) | (1 << 9)   # SEG_MAX BLK_SIZE FLUSH
NET_MAC, NET_STATUS, MRG_RXBUF = 1 << 5, 1 << 16, 1 << 15
NET_FEATURES = VERSION_1 | NET_MAC | NET_STATUS

# Ops (fuzz.h enum op_kind).
OP_WRITE, OP_READ, OP_NOTIFY, OP_POKE, OP_PUBLISH, OP_BACKEND, OP_FRAME, OP_REINIT = range(8)
SETUP_INIT = 1

# Where a seed puts queue q's structures (size <= 16) and its buffers.
QSIZE = 8
RINGS = [(0x000, 0x080, 0x0A0), (0x100, 0x180, 0x1A0)]
MAX_QUEUES = 3  # VMM_VIRTIO_MAX_QUEUES: fuzz.h's setup and struct vmm_virtio_state have this many
HEAP = 0x200


class Ram:
    """The RAM image (gpa 0 up: regions A and B, then C) as a seed holds it."""

    def __init__(self) -> None:
        self.b = bytearray()
        self.top = HEAP

    def put(self, gpa: int, data: bytes) -> None:
        off = gpa if gpa < 0x3000 else 0x3000 + gpa - 0x10000
        if len(self.b) < off + len(data):
            self.b.extend(bytes(off + len(data) - len(self.b)))
        self.b[off:off + len(data)] = data

    def alloc(self, n: int, data: bytes = b"") -> int:
        at = self.top
        self.top = (at + n + 15) & ~15
        if data:
            self.put(at, data)
        return at

    def desc(self, table: int, i: int, addr: int, n: int, flags: int, nxt: int) -> None:
        self.put(table + 16 * i, struct.pack("<QIHH", addr, n, flags, nxt))

    def chain(self, q: int, first: int, bufs: list[tuple[int, int, bool]]) -> int:
        """Direct chain in queue q's table from slot `first`; its head."""
        table = RINGS[q][0]
        for k, (addr, n, w) in enumerate(bufs):
            last = k + 1 == len(bufs)
            self.desc(table, (first + k) % QSIZE, addr, n, (WRITE if w else 0) | (0 if last else NEXT),
                      (first + k + 1) % QSIZE)
        return first

    def indirect(self, q: int, slot: int, bufs: list[tuple[int, int, bool]]) -> int:
        t = self.alloc(16 * len(bufs))
        for k, (addr, n, w) in enumerate(bufs):
            self.desc(t, k, addr, n, (WRITE if w else 0) | (NEXT if k + 1 < len(bufs) else 0), k + 1)
        self.desc(RINGS[q][0], slot, t, 16 * len(bufs), INDIRECT, 0)
        return slot

    def publish(self, q: int, heads: list[int], start: int = 0) -> None:
        avail = RINGS[q][1]
        for k, h in enumerate(heads):
            self.put(avail + 4 + 2 * ((start + k) % QSIZE), struct.pack("<H", h))
        self.put(avail + 2, struct.pack("<H", (start + len(heads)) & 0xFFFF))


def setup(features: int, nq: int, flags: int = SETUP_INIT, size: int = QSIZE) -> bytes:
    out = struct.pack("<BII", flags, features & 0xFFFFFFFF, features >> 32)
    for q in range(MAX_QUEUES):
        desc, avail, used = RINGS[q] if q < len(RINGS) else (0, 0, 0)
        out += struct.pack("<HIII", size if q < nq else 0, desc, avail, used)
    return out


def ops(*items: tuple[int, int, int, int]) -> bytes:
    return struct.pack("<B", len(items)) + b"".join(struct.pack("<BBHI", *o) for o in items)


def write(harness: str, name: str, data: bytes) -> None:
    d = CORPUS / harness
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# ---- virtq ----
def virtq_input(ram: Ram, flags: int = 0, size: int = QSIZE, last_avail: int = 0,
                used_idx: int = 0, vops: list[tuple[int, int, int]] = (),
                rings: tuple[int, int, int] = RINGS[0]) -> bytes:
    desc, avail, used = rings
    head = struct.pack("<HBIIIHHHB", size, flags, desc, avail, used, last_avail, used_idx,
                       used_idx, len(vops))
    return head + b"".join(struct.pack("<BBH", *o) for o in vops) + bytes(ram.b)


V_POP, V_PUBLISH, V_POKE, V_INTERRUPT = range(4)


def gen_virtq() -> None:
    pops = [(V_POP, 4, 0x0108), (V_INTERRUPT, 0, 0), (V_POP, 16, 0), (V_INTERRUPT, 0, 0)]
    r = Ram()
    r.chain(0, 0, [(r.alloc(16), 16, False), (r.alloc(512), 512, True), (r.alloc(1), 1, True)])
    r.publish(0, [0])
    write("virtq", "direct", virtq_input(r, vops=pops))

    r = Ram()
    r.indirect(0, 0, [(r.alloc(16), 16, False), (r.alloc(64), 64, False), (r.alloc(200), 200, True)])
    r.publish(0, [0])
    write("virtq", "indirect-event-idx", virtq_input(r, flags=3, vops=pops))

    # Buffers across the A/B boundary (0x1000) and in region C after the hole.
    r = Ram()
    r.chain(0, 0, [(0xF80, 0x100, False), (0x10000, 0x800, True), (0x2FF0, 0x10, True)])
    r.chain(0, 3, [(0x0F00, 0x200, True)])
    r.publish(0, [0, 3])
    write("virtq", "cross-regions", virtq_input(r, vops=pops + [(V_POP, 255, 0x10)]))

    # Indexes about to wrap; entries published between pops.
    r = Ram()
    for k in range(4):
        r.chain(0, 2 * k, [(r.alloc(32), 32, False), (r.alloc(32), 32, True)])
    r.publish(0, [0, 2], start=0xFFFE)
    write("virtq", "wrap-publish", virtq_input(
        r, last_avail=0xFFFE, used_idx=0xFFFE,
        vops=pops + [(V_POKE, 4, 0x80 + 4 + 2 * 0), (V_PUBLISH, 2, 0), (V_POP, 1, 1),
                     (V_POP, 1, 1), (V_INTERRUPT, 0, 0)]))

    # 130 descriptors each across the A/B boundary: 260 segments, more than
    # a chain may have (-E2BIG).  Queue of 256: avail in the table's unused tail, used in B.
    r = Ram()
    for k in range(130):
        r.desc(0, k, 0xFF0, 0x20, NEXT, k + 1)
    r.desc(0, 129, 0xFF0, 0x20, 0, 0)
    r.put(0x900 + 2, struct.pack("<HH", 1, 0))
    write("virtq", "too-many-segments", virtq_input(r, size=256, vops=pops,
                                                    rings=(0x000, 0x900, 0x1000)))


# ---- virtio-blk ----
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


def blk_req(r: Ram, slot: int, rtype: int, sector: int, data: list[tuple[int, bool]],
            indirect: bool = False) -> int:
    bufs = [(r.alloc(16, struct.pack("<IIQ", rtype, 0, sector)), 16, False)]
    bufs += [(r.alloc(n, bytes([0x11 * (k + 1)]) * n if not w else b""), n, w)
             for k, (n, w) in enumerate(data)]
    bufs.append((r.alloc(1, b"\xff"), 1, True))
    return r.indirect(0, slot, bufs) if indirect else r.chain(0, slot, bufs)


def blk_input(r: Ram, features: int = BLK_FEATURES, ro: int = 0, blk_ops: bytes = ops()) -> bytes:
    return setup(features, 1) + bytes([ro]) + b"serial-0123456789abc"[:20] + blk_ops + bytes(r.b)


def gen_blk() -> None:
    notify = (OP_NOTIFY, 0, 0, 0)
    r = Ram()
    heads = [blk_req(r, 0, T_IN, 0, [(512, True)]),
             blk_req(r, 3, T_OUT, 2, [(256, False), (768, False)])]
    r.publish(0, heads)
    write("virtio_blk", "in-out", blk_input(r, blk_ops=ops(notify)))

    r = Ram()
    heads = [blk_req(r, 0, T_FLUSH, 0, []), blk_req(r, 2, T_GET_ID, 0, [(20, True)]),
             blk_req(r, 5, T_IN, 15, [(1024, True)])]   # past the end: IOERR
    r.publish(0, heads)
    write("virtio_blk", "flush-getid-ioerr", blk_input(r, ro=1, blk_ops=ops(notify)))

    r = Ram()
    h = blk_req(r, 0, T_IN, 1, [(512, True), (512, True)], indirect=True)
    r.publish(0, [h])
    feats = BLK_FEATURES | EVENT_IDX | INDIRECT_DESC
    write("virtio_blk", "indirect-event-idx", blk_input(
        r, feats, blk_ops=ops(notify, (OP_PUBLISH, 0, 0, 1), notify, (OP_READ, 2, 0x60, 0),
                              (OP_WRITE, 2, 0x64, 3), (OP_REINIT, 0, 0, 0), notify)))


# ---- virtio-rng ----
def rng_input(r: Ram, bound: int = 0, features: int = VERSION_1, rng_ops: bytes = ops()) -> bytes:
    return setup(features, 1) + struct.pack("<I", bound) + rng_ops + bytes(r.b)


def gen_rng() -> None:
    notify = (OP_NOTIFY, 0, 0, 0)
    r = Ram()
    heads = [r.chain(0, 0, [(r.alloc(64), 64, True)]),
             r.chain(0, 1, [(r.alloc(100), 100, True), (r.alloc(0), 0, True),
                            (r.alloc(300), 300, True)])]
    r.publish(0, heads)
    write("virtio_rng", "two-requests", rng_input(r, rng_ops=ops(notify)))

    r = Ram()
    h = r.indirect(0, 0, [(r.alloc(512), 512, True), (0xFF0, 0x20, True)])  # across A and B
    r.publish(0, [h])
    write("virtio_rng", "indirect-event-idx-bound", rng_input(
        r, 100, VERSION_1 | EVENT_IDX | INDIRECT_DESC,
        ops(notify, (OP_PUBLISH, 0, 0, 1), notify, (OP_READ, 2, 0x60, 0), (OP_WRITE, 2, 0x64, 1),
            (OP_REINIT, 0, 0, 0), notify)))

    r = Ram()
    h = r.chain(0, 0, [(r.alloc(16, b"x" * 16), 16, False), (r.alloc(16), 16, True)])
    r.publish(0, [h])
    write("virtio_rng", "readable-buffer", rng_input(r, rng_ops=ops(notify)))


# ---- virtio-net ----
HDR = 12


def net_setup(features: int) -> bytes:
    return setup(features, 2) + struct.pack("<H", 1514)


def gen_net() -> None:
    # TX: header + frame, readable; one split in two descriptors.
    r = Ram()
    heads = [r.chain(1, 0, [(r.alloc(HDR), HDR, False), (r.alloc(60, bytes(range(60))), 60, False)]),
             r.chain(1, 2, [(r.alloc(HDR + 100, bytes(HDR) + b"\x42" * 100), HDR + 100, False)])]
    r.publish(1, heads)
    tx_ops = ops((OP_NOTIFY, 1, 0, 0), (OP_PUBLISH, 1, 0, 0), (OP_NOTIFY, 1, 0, 0))
    write("virtio_net_tx", "two-frames", net_setup(NET_FEATURES) + tx_ops + bytes(r.b))
    r2 = Ram()
    h = r2.indirect(1, 0, [(r2.alloc(HDR), HDR, False), (r2.alloc(1500), 1500, False)])
    r2.publish(1, [h])
    write("virtio_net_tx", "indirect-event-idx",
          net_setup(NET_FEATURES | EVENT_IDX | INDIRECT_DESC) + tx_ops + bytes(r2.b))
    # A 512 KiB frame (64 descriptors of 8 KiB over the same RAM): more than
    # the tap's socket takes, refused and dropped (io_errors); then a small one.
    r3 = Ram()
    t = r3.alloc(16 * 65)
    r3.desc(t, 0, r3.alloc(HDR), HDR, NEXT, 1)
    for k in range(1, 65):
        r3.desc(t, k, 0x1000, 0x2000, NEXT if k < 64 else 0, k + 1)
    r3.desc(RINGS[1][0], 0, t, 16 * 65, INDIRECT, 0)
    small = r3.chain(1, 1, [(r3.alloc(HDR + 60), HDR + 60, False)])
    r3.publish(1, [0, small])
    write("virtio_net_tx", "frame-refused",
          net_setup(NET_FEATURES | INDIRECT_DESC) + tx_ops + bytes(r3.b))

    # RX: writable buffers, frames queued at the tap.
    frames = [bytes(HDR) + bytes(range(60)), bytes(HDR) + b"\x55" * 1000, b""]
    fbytes = struct.pack("<B", len(frames)) + b"".join(struct.pack("<H", len(f)) + f for f in frames)
    rx_ops = ops((OP_BACKEND, 0, 0, 0), (OP_NOTIFY, 0, 0, 0), (OP_FRAME, 1, 0, 0),
                 (OP_PUBLISH, 0, 0, 2), (OP_NOTIFY, 0, 0, 0), (OP_BACKEND, 0, 0, 0))
    r = Ram()
    heads = [r.chain(0, k, [(r.alloc(HDR + 1514), HDR + 1514, True)]) for k in range(2)]
    r.publish(0, heads)
    write("virtio_net_rx", "plain", net_setup(NET_FEATURES) + rx_ops + fbytes + bytes(r.b))
    r = Ram()
    heads = [r.chain(0, k, [(r.alloc(256), 256, True), (r.alloc(256), 256, True)]) for k in range(6)]
    r.publish(0, heads)
    write("virtio_net_rx", "mergeable",
          net_setup(NET_FEATURES | MRG_RXBUF | EVENT_IDX) + rx_ops + fbytes + bytes(r.b))


# ---- the register file on the bus ----
def gen_mmio() -> None:
    # blk queue 0 at RINGS[0]; net's two queues moved to 0x400.. (fuzz.h setup)
    blk = setup(BLK_FEATURES | EVENT_IDX, 1)
    net = struct.pack("<BII", SETUP_INIT, NET_FEATURES & 0xFFFFFFFF, NET_FEATURES >> 32)
    for q in range(2):
        net += struct.pack("<HIII", QSIZE, 0x400 + 0x100 * q, 0x480 + 0x100 * q, 0x4A0 + 0x100 * q)
    net += struct.pack("<HIII", 0, 0, 0, 0) * (MAX_QUEUES - 2)
    r = Ram()
    r.put(0x800, struct.pack("<IIQ", T_IN, 0, 0))
    r.chain(0, 0, [(0x800, 16, False), (0x900, 512, True), (0xB00, 1, True)])
    r.publish(0, [0])
    reads = [(1, 2, off, 0) for off in range(0, 0x80, 4)] + [(1, 3, 0x100, 0), (1, 0, 0x1101, 0)]
    m_ops = reads + [(0, 2, 0x50, 0), (0, 2, 0x1050, 1), (1, 2, 0x0FFE, 0), (1, 1, 0x0FFF, 0),
                     (0, 2, 0x70, 0), (4, 0, 0, 0)]
    write("virtio_mmio", "both-devices", bytes([3]) + blk + net + ops(*m_ops) + bytes(r.b))
    write("virtio_mmio", "no-init", bytes([0]) + blk + net + ops(*m_ops[::3]) + bytes(r.b))


# ---- vsock: the RX queue at RINGS[0], TX at RINGS[1], events at EV_RINGS ----
EV_RINGS = (0x2C00, 0x2C80, 0x2CA0)
VSOCK_HDR = struct.Struct("<QQIIIHHIII")
VS_RW, VS_REQUEST, VS_CREDIT_UPDATE, VS_SHUTDOWN = 5, 1, 6, 4


def vsock_packet(op: int, src_port: int, dst_port: int, payload: bytes = b"",
                 flags: int = 0) -> bytes:
    return VSOCK_HDR.pack(3, 2, src_port, dst_port, len(payload), 1, op, flags, 65536,
                          0) + payload


def gen_vsock() -> None:
    out = struct.pack("<BII", SETUP_INIT, VERSION_1 & 0xFFFFFFFF, VERSION_1 >> 32)
    for desc, avail, used in (RINGS[0], RINGS[1], EV_RINGS):
        out += struct.pack("<HIII", QSIZE, desc, avail, used)
    r = Ram()
    rxh = [r.chain(0, k, [(r.alloc(44 + 256), 44 + 256, True)]) for k in range(4)]
    r.publish(0, rxh)
    pkts = [vsock_packet(VS_REQUEST, 5000, 1000), vsock_packet(VS_RW, 5000, 1000, b"x" * 32),
            vsock_packet(VS_CREDIT_UPDATE, 5000, 1000),
            vsock_packet(VS_SHUTDOWN, 5000, 1000, flags=3)]
    txh = [r.chain(1, k, [(r.alloc(len(p), p), len(p), False)]) for k, p in enumerate(pkts)]
    r.publish(1, txh)
    notify_tx, backend = (OP_NOTIFY, 1, 0, 0), (OP_BACKEND, 0, 0, 0)
    host = [(OP_FRAME, 0, 0, 1000), backend, (OP_FRAME, 2, 0, 100), backend]
    write("virtio_vsock", "guest-connects", out + ops(notify_tx, backend, *host, notify_tx)
          + bytes(r.b))
    write("virtio_vsock", "host-connects", out + ops(*host, (OP_NOTIFY, 0, 0, 0), backend)
          + bytes(r.b))


# ---- snapshot state ----
def state(device_id: int, nq: int, status: int, features: int,
          queues: list[tuple[int, int, int, int, int, int, int, int]],
          signalled: int | None = None) -> bytes:
    """queues: (desc, avail, used, size, last_avail, used_idx, ready, event_idx);
    signalled_used is used_idx unless given."""
    out = struct.pack("<8IQ", device_id, nq, status, 1, 1, 0, 0, 0, features)
    for q in range(MAX_QUEUES):
        desc, avail, used, size, last, used_idx, ready, evt = queues[q] if q < len(queues) else (0,) * 8
        sig = used_idx if signalled is None else signalled
        out += struct.pack("<3Q4H4B4x", desc, avail, used, size, last, used_idx, sig, ready,
                           evt, 0, 0)
    assert len(out) == 40 + 40 * MAX_QUEUES
    return out


def gen_restore() -> None:
    r = Ram()
    h = blk_req(r, 0, T_IN, 0, [(512, True)])
    r.publish(0, [h])
    st = state(2, 1, 15, BLK_FEATURES, [(*RINGS[0], QSIZE, 0, 0, 1, 0)])
    notify = (OP_NOTIFY, 0, 0, 0)
    write("state_restore", "blk-running", b"\x00" + st + ops(notify, (OP_PUBLISH, 0, 0, 1), notify)
          + bytes(r.b))
    st = state(2, 1, 15, BLK_FEATURES | EVENT_IDX, [(*RINGS[0], QSIZE, 0, 0, 0, 1)])
    write("state_restore", "blk-queue-off", b"\x00" + st + ops(notify) + bytes(r.b))
    r = Ram()
    rxh = [r.chain(0, k, [(r.alloc(HDR + 1514), HDR + 1514, True)]) for k in range(2)]
    r.publish(0, rxh)
    txh = r.chain(1, 0, [(r.alloc(HDR + 60), HDR + 60, False)])
    r.publish(1, [txh])
    st = state(1, 2, 15, NET_FEATURES | MRG_RXBUF,
               [(*RINGS[0], QSIZE, 0, 0, 1, 0), (*RINGS[1], QSIZE, 0, 0, 1, 0)])
    write("state_restore", "net-running", b"\x01" + st +
          ops((OP_BACKEND, 0, 0, 0), (OP_NOTIFY, 1, 0, 0), (OP_FRAME, 30, 0, 0), (OP_BACKEND, 0, 0, 0))
          + bytes(r.b))


# ---- reproducers of fixed bugs (tests/fuzz/crashes/, replayed by run.py) ----
def crash(harness: str, name: str, data: bytes) -> None:
    d = HERE / "crashes" / harness
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def gen_crashes() -> None:
    # A snapshot whose ready queue lies outside RAM: restore said -EFAULT
    # (activate's answer) where it documents -EINVAL for any impossible state.
    st = state(2, 1, 15, VERSION_1, [(0x100000, 0x100100, 0x100200, QSIZE, 0, 0, 1, 0)])
    crash("state_restore", "queue-outside-ram-not-einval", b"\x00" + st + ops())
    # A running drive (DRIVER_OK) whose queue is off, with used_idx ahead of
    # signalled_used: the guest's notify found no chain, then the interrupt
    # check read the avail ring of the queue that has none (NULL): SIGSEGV.
    st = state(2, 1, 15, VERSION_1, [(0, 0, 0, 0, 0, 1, 0, 0)], signalled=0)
    crash("state_restore", "need-interrupt-on-queue-not-ready", b"\x00" + st + ops())
    # A queue whose used ring lies on its avail ring, last_avail 5 behind
    # used_idx: each push writes the used idx, which is the avail idx, 5
    # ahead again - the drive served FLUSH chains forever.  The used entries
    # land on the avail ring's slots too: heads 0 and 1 (id = head, len = 1,
    # 0) are both good chains.
    r = Ram()
    hdr = r.alloc(16, struct.pack("<IIQ", T_FLUSH, 0, 0))
    for head in (0, 1):
        r.desc(0, head, hdr, 16, NEXT, head + 2)
        r.desc(0, head + 2, r.alloc(1), 1, WRITE, 0)
    r.put(RINGS[0][1] + 2, struct.pack("<H", 0xFFFF))     # avail idx: 5 chains waiting
    desc, avail, _ = RINGS[0]
    st = state(2, 1, 15, VERSION_1, [(desc, avail, avail, QSIZE, 0xFFFA, 0xFFFF, 1, 0)])
    crash("state_restore", "used-ring-on-avail-ring-loops", b"\x00" + st + ops() + bytes(r.b))


def main() -> None:
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    gen_virtq()
    gen_blk()
    gen_rng()
    gen_net()
    gen_mmio()
    gen_restore()
    gen_vsock()
    gen_crashes()
    for d in sorted(CORPUS.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
