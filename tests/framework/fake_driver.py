"""A fake guest driver for the C virtio-blk device (the rust-vmm way: a fake
of the other side, shipped beside the real thing).

It plays the guest: places the descriptor table and the avail / used rings
in a GuestMemory, runs the virtio-mmio init sequence through the device's
registers, builds chains (direct, indirect, or any raw descriptors a hostile
guest could write), publishes them, notifies, and reads the used ring back.
QueueNotify is served synchronously, so a request is complete when notify()
returns.  Every buffer the heap hands out sits between canary bytes, and
ram() snapshots all of guest RAM, so a test can prove the device wrote only
where the driver let it.

At the end: the fake guest RAM the native tier runs devices on (`fake_ram()`: two
regions fenced by guard pages) and the settings its virtio tests share.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmmd.native import GuestMemory, VirtioDevice

SECTOR = 512


class Reg(enum.IntEnum):
    """virtio-mmio (version 2) register offsets."""

    MAGIC = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEV_FEATURES = 0x010
    DEV_FEATURES_SEL = 0x014
    DRV_FEATURES = 0x020
    DRV_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INT_STATUS = 0x060
    INT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LO = 0x080
    QUEUE_DESC_HI = 0x084
    QUEUE_AVAIL_LO = 0x090
    QUEUE_AVAIL_HI = 0x094
    QUEUE_USED_LO = 0x0A0
    QUEUE_USED_HI = 0x0A4
    CONFIG_GEN = 0x0FC
    CONFIG = 0x100


class Status(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


class F(enum.IntFlag):
    """Feature bits: transport and virtio-blk."""

    BLK_SEG_MAX = 1 << 2
    BLK_RO = 1 << 5
    BLK_BLK_SIZE = 1 << 6
    BLK_FLUSH = 1 << 9
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32


# Everything a read-write drive offers: what a modern Linux driver takes.
F_ALL = (F.VERSION_1 | F.EVENT_IDX | F.INDIRECT_DESC | F.BLK_FLUSH | F.BLK_SEG_MAX
         | F.BLK_BLK_SIZE)

# Descriptor flags, interrupt status bits, avail flags.
NEXT, WRITE, INDIRECT = 1, 2, 4
INT_USED, INT_CONFIG = 1, 2
AVAIL_NO_INTERRUPT = 1

# virtio-blk request types and status bytes.
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20

MAGIC = 0x74726976  # "virt"
VIRTIO_ID_BLOCK = 2
CANARY = bytes.fromhex("c0ffee11") * 4  # 16 bytes on each side of every buffer


class DriverError(Exception):
    """The device refused a step of the init sequence."""


@dataclass(frozen=True)
class Desc:
    """One raw split-ring descriptor, as the guest writes it (any values)."""

    addr: int
    len: int
    flags: int = 0
    next: int = 0

    def pack(self) -> bytes:
        return struct.pack("<QIHH", self.addr, self.len, self.flags, self.next)


@dataclass(frozen=True)
class Buf:
    """A guest buffer of a chain; `write` means device-writable."""

    addr: int
    len: int
    write: bool = False


@dataclass(frozen=True)
class Used:
    """One used-ring element: the chain's head and the bytes the device wrote."""

    id: int
    len: int


@dataclass(frozen=True)
class Layout:
    """Where the queue's structures live in guest RAM."""

    desc: int = 0x1000     # 16 * 256 bytes at most
    avail: int = 0x2000    # 6 + 2 * 256
    used: int = 0x3000     # 6 + 8 * 256
    heap: int = 0x10000    # buffers and indirect tables from here on


class FakeDriver:
    """One guest driver of one virtio-blk device, queue 0."""

    def __init__(self, dev: VirtioDevice, mem: GuestMemory,
                 ram: Sequence[tuple[int, int]], layout: Layout = Layout(),
                 queue: int = 0) -> None:
        self.dev, self.mem, self.regions, self.layout = dev, mem, tuple(ram), layout
        self.queue = queue  # the virtqueue this driver object programs
        self.size = 0       # queue 0 as last programmed
        self.desc, self.avail, self.used = layout.desc, layout.avail, layout.used
        self._heap_top = layout.heap
        self._heap_end = max(gpa + size for gpa, size in self.regions)
        self._canaries: list[int] = []
        self._reset_queue_state()

    # ---- registers ----
    def reg(self, off: int) -> int:
        return self.dev.read_reg(off)

    def set_reg(self, off: int, value: int) -> None:
        self.dev.write_reg(off, value)

    @property
    def status(self) -> Status:
        return Status(self.reg(Reg.STATUS))

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & Status.NEEDS_RESET)

    def device_features(self) -> int:
        feats = 0
        for half in (0, 1):
            self.set_reg(Reg.DEV_FEATURES_SEL, half)
            feats |= self.reg(Reg.DEV_FEATURES) << (32 * half)
        return feats

    def config(self, off: int, size: int) -> int:
        """A little-endian device config field, read 32 bits at a time."""
        raw = b"".join(struct.pack("<I", self.reg(Reg.CONFIG + off + i))
                       for i in range(0, size, 4))
        return int.from_bytes(raw[:size], "little")

    # ---- init sequence ----
    def reset(self) -> None:
        """Status = 0: the device forgets features, queues and NEEDS_RESET."""
        self.set_reg(Reg.STATUS, 0)
        self._reset_queue_state()

    def negotiate(self, features: int) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write `features`, set FEATURES_OK;
        whether the device kept FEATURES_OK (accepted the set)."""
        self.reset()
        if self.reg(Reg.MAGIC) != MAGIC or self.reg(Reg.VERSION) != 2:
            raise DriverError("not a virtio-mmio v2 device")
        self.set_reg(Reg.STATUS, Status.ACKNOWLEDGE)
        self.set_reg(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
        for half in (0, 1):
            self.set_reg(Reg.DRV_FEATURES_SEL, half)
            self.set_reg(Reg.DRV_FEATURES, (features >> (32 * half)) & 0xFFFF_FFFF)
        self.set_reg(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        return bool(self.status & Status.FEATURES_OK)

    def setup_queue(self, size: int, desc: int | None = None, avail: int | None = None,
                    used: int | None = None) -> bool:
        """Program the queue and set QueueReady; whether it reads back ready."""
        self.set_reg(Reg.QUEUE_SEL, self.queue)
        self.set_reg(Reg.QUEUE_NUM, size)
        self.desc = self.layout.desc if desc is None else desc
        self.avail = self.layout.avail if avail is None else avail
        self.used = self.layout.used if used is None else used
        for lo, addr in ((Reg.QUEUE_DESC_LO, self.desc), (Reg.QUEUE_AVAIL_LO, self.avail),
                         (Reg.QUEUE_USED_LO, self.used)):
            self.set_reg(lo, addr & 0xFFFF_FFFF)
            self.set_reg(lo + 4, addr >> 32)
        self.size = size
        self.set_reg(Reg.QUEUE_READY, 1)
        return self.reg(Reg.QUEUE_READY) == 1

    def driver_ok(self) -> None:
        self.set_reg(Reg.STATUS, self.status | Status.DRIVER_OK)

    def init(self, features: int = F.VERSION_1, queue_size: int = 16) -> None:
        """The whole sequence, as Linux does it; DriverError if refused."""
        if not self.negotiate(features):
            raise DriverError(f"FEATURES_OK refused for {features:#x}")
        self.add_queue(queue_size)
        self.driver_ok()

    def add_queue(self, queue_size: int = 16) -> None:
        """Zero this queue's rings and make it ready (after FEATURES_OK)."""
        if self.reg(Reg.QUEUE_NUM_MAX) < queue_size:
            raise DriverError("queue too large")
        self.mem.write(self.layout.avail, bytes(6 + 2 * queue_size))
        self.mem.write(self.layout.used, bytes(6 + 8 * queue_size))
        self._guard(self.layout.used + 6 + 8 * queue_size)   # the device writes used only
        if not self.setup_queue(queue_size):
            raise DriverError("QueueReady refused")

    def _reset_queue_state(self) -> None:
        self.avail_idx = 0      # next avail slot we publish
        self.seen_used = 0      # used entries already collected
        self.next_desc = 0      # next free descriptor index (round robin)

    # ---- guest memory: heap with canaries, snapshots ----
    def alloc(self, n: int, fill: bytes = b"", at: int | None = None) -> int:
        """A buffer of n bytes (filled with `fill` repeated, else zeros)
        between two canaries.  `at` places it there instead of on the heap:
        the caller keeps it clear of other live buffers (reusing one spot
        for one request after another is fine)."""
        start = self._heap_top + len(CANARY) if at is None else at
        if start < self.layout.heap + len(CANARY) or start + n + len(CANARY) > self._heap_end:
            raise MemoryError(f"no room for {n} bytes at {start:#x}")
        self._guard(start - len(CANARY))
        self._guard(start + n)
        if n:
            self.mem.write(start, (fill * (n // len(fill) + 1))[:n] if fill else bytes(n))
        self._heap_top = max(self._heap_top, (start + n + len(CANARY) + 15) & ~15)
        return start

    def _guard(self, addr: int) -> None:
        self.mem.write(addr, CANARY)
        self._canaries.append(addr)

    def broken_canaries(self) -> list[int]:
        """Addresses of canaries the device overwrote (want: none)."""
        return [a for a in self._canaries if self.mem.read(a, len(CANARY)) != CANARY]

    def ram(self) -> bytes:
        """All of guest RAM, region by region."""
        return b"".join(self.mem.read(gpa, size) for gpa, size in self.regions)

    # ---- descriptors and rings ----
    def write_desc(self, index: int, d: Desc, table: int | None = None) -> None:
        self.mem.write((self.desc if table is None else table) + 16 * index, d.pack())

    def write_table(self, descs: Sequence[Desc], first: int | None = None) -> int:
        """Raw descriptors into consecutive ring slots (wrapping); the first index."""
        first = self.next_desc if first is None else first
        for k, d in enumerate(descs):
            self.write_desc((first + k) % self.size, d)
        self.next_desc = (first + len(descs)) % self.size
        return first

    def add_chain(self, bufs: Sequence[Buf], indirect: bool = False) -> int:
        """A well-formed chain of `bufs`; its head index.  indirect: one ring
        descriptor pointing at a table of them on the heap."""
        if indirect:
            table = self.alloc(16 * len(bufs))
            self.mem.write(table, b"".join(
                Desc(b.addr, b.len, (WRITE if b.write else 0) | (NEXT if k + 1 < len(bufs) else 0),
                     k + 1).pack() for k, b in enumerate(bufs)))
            return self.write_table([Desc(table, 16 * len(bufs), INDIRECT)])
        first = self.next_desc
        return self.write_table([
            Desc(b.addr, b.len, (WRITE if b.write else 0) | (NEXT if k + 1 < len(bufs) else 0),
                 (first + k + 1) % self.size) for k, b in enumerate(bufs)])

    def publish(self, *heads: int) -> None:
        for head in heads:
            self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size),
                           struct.pack("<H", head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        """The avail ring's idx, raw (a hostile guest may write anything)."""
        self.mem.write(self.avail + 2, struct.pack("<H", idx & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, idx: int) -> None:
        """EVENT_IDX: interrupt me when the used idx passes `idx`."""
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", idx & 0xFFFF))

    def avail_event(self) -> int:
        """EVENT_IDX: the avail idx the device asked to be notified at."""
        return int(struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0])

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used + 2, 2))[0])

    def notify(self) -> None:
        self.set_reg(Reg.QUEUE_NOTIFY, self.queue)

    def collect(self) -> list[Used]:
        """Used elements the device added since the last collect."""
        out = []
        while self.seen_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.seen_used % self.size)
            out.append(Used(*struct.unpack("<II", self.mem.read(slot, 8))))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out

    def submit(self, bufs: Sequence[Buf], indirect: bool = False) -> list[Used]:
        """Add, publish and notify one chain; what came back."""
        self.publish(self.add_chain(bufs, indirect))
        self.notify()
        return self.collect()

    # ---- virtio-blk requests ----
    def blk_chain(self, rtype: int, sector: int, data: Sequence[Buf]) -> tuple[list[Buf], int]:
        """Header, `data`, status byte (pre-set to 0xff); the chain and the
        status byte's address."""
        hdr = self.alloc(16)
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        status = self.alloc(1, b"\xff")
        return [Buf(hdr, 16), *data, Buf(status, 1, write=True)], status

    def blk_request(self, rtype: int, sector: int, data: Sequence[Buf] = (),
                    indirect: bool = False) -> tuple[int, Used]:
        """Run one request; (status byte, used element).  AssertionError if
        the device did not complete exactly this chain."""
        chain, status_at = self.blk_chain(rtype, sector, data)
        head = self.add_chain(chain, indirect)
        self.publish(head)
        self.notify()
        done = self.collect()
        assert [u.id for u in done] == [head], f"expected head {head} back, got {done}"
        return self.mem.read(status_at, 1)[0], done[0]

    def data_bufs(self, total: int, write: bool, split: Sequence[int] = (),
                  at: int | None = None, fill: bytes = b"") -> list[Buf]:
        """total bytes of data as one contiguous buffer, cut into segments of
        the sizes in `split` (the rest is the last segment)."""
        base = self.alloc(total, fill, at)
        cuts = [*split, total - sum(split)]
        offs = [sum(cuts[:k]) for k in range(len(cuts))]
        return [Buf(base + o, n, write) for o, n in zip(offs, cuts, strict=True) if n]

    def blk_read(self, sector: int, count: int, split: Sequence[int] = (),
                 at: int | None = None, indirect: bool = False) -> tuple[int, bytes]:
        """IN of count sectors; (status, the data buffer's bytes after it)."""
        data = self.data_bufs(count * SECTOR, True, split, at)
        status, used = self.blk_request(T_IN, sector, data, indirect)
        got = b"".join(self.mem.read(b.addr, b.len) for b in data)
        if status == S_OK:
            assert used.len == len(got) + 1, f"used.len {used.len} for {len(got)} bytes"
        return status, got

    def blk_write(self, sector: int, payload: bytes, split: Sequence[int] = (),
                  at: int | None = None, indirect: bool = False) -> int:
        """OUT of payload; the status byte."""
        data = self.data_bufs(len(payload), False, split, at)
        self.mem.write(data[0].addr, payload)
        return self.blk_request(T_OUT, sector, data, indirect)[0]

    def flush(self) -> int:
        return self.blk_request(T_FLUSH, 0)[0]

    def get_id(self, buf_len: int = ID_BYTES) -> tuple[int, bytes, int]:
        """GET_ID into a buf_len-byte buffer pre-filled with 0xee; (status,
        the buffer's bytes, used.len)."""
        data = self.data_bufs(buf_len, True, fill=b"\xee")
        status, used = self.blk_request(T_GET_ID, 0, data)
        return status, self.mem.read(data[0].addr, buf_len), used.len


# ---- the fake guest RAM the native tier's devices run on, and their settings ----
MiB = 1 << 20
BOUNDARY = 1 * MiB      # region 0 ends and region 1 begins here
RAM_END = 2 * MiB       # nothing is mapped from here on
RAM = ((0, BOUNDARY), (BOUNDARY, RAM_END - BOUNDARY))
DISK_SECTORS = 128      # the virtio-blk tests' disk image

MakeDriver = Callable[..., FakeDriver]

# virtio-net: the device's MAC, feature bits and the two queues' places in RAM
MAC = bytes.fromhex("02aabbccddee")
MRG_RXBUF, NET_MAC, NET_STATUS = 1 << 15, 1 << 5, 1 << 16
RX_LAYOUT = Layout(desc=0x1000, avail=0x2000, used=0x3000, heap=0x10000)
TX_LAYOUT = Layout(desc=0x4000, avail=0x5000, used=0x6000, heap=0x80000)


def fake_ram() -> GuestMemory:
    """GuestMemory over RAM.  The core maps each region between two PROT_NONE
    guard pages, so a device touching one byte outside RAM (or running across
    the region boundary without splitting) crashes the test at that access."""
    mem = GuestMemory()
    for gpa, size in RAM:
        mem.add_region(gpa, size)
    return mem
