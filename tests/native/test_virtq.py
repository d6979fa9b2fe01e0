"""The split virtqueue against a hostile guest, and its notifications.

Every malformed chain or ring must stop the device (DEVICE_NEEDS_RESET, a
config interrupt, stats.bad_chains) without touching one byte: guest RAM is
snapshotted before the notify and compared after, the host file too.  A
reset (Status = 0) must bring the device back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.framework.fake_driver import (
    AVAIL_NO_INTERRUPT,
    BOUNDARY,
    F_ALL,
    INDIRECT,
    INT_CONFIG,
    INT_USED,
    NEXT,
    RAM_END,
    S_OK,
    SECTOR,
    T_IN,
    WRITE,
    Buf,
    Desc,
    F,
    FakeDriver,
    Reg,
    Status,
)

# A hostile chain must never hang the device: fail fast instead.
# (thread: a C loop never returns to Python for a signal to land.)
pytestmark = pytest.mark.timeout(30, method="thread")

QSIZE = 8
WRAP = 2**64


def _parts(drv: FakeDriver) -> list[Buf]:
    """A good IN request: header, one-sector data buffer, status byte."""
    return drv.blk_chain(T_IN, 0, [Buf(drv.alloc(SECTOR), SECTOR, True)])[0]


def _with(drv: FakeDriver, hdr: Buf | None = None, data: Buf | None = None,
          status: Buf | None = None) -> None:
    """Publish a good IN request with the given parts swapped in."""
    h, d, s = _parts(drv)
    drv.publish(drv.add_chain([hdr or h, data or d, status or s]))


def _d(b: Buf, flags: int = 0, nxt: int = 0) -> Desc:
    return Desc(b.addr, b.len, flags | (WRITE if b.write else 0), nxt)


def _raw(drv: FakeDriver, descs: list[Desc], head: int = 0) -> None:
    drv.write_table(descs, first=0)
    drv.publish(head)


def _table(drv: FakeDriver, table: list[Desc]) -> Desc:
    """`table` on the heap; the indirect descriptor pointing at it."""
    addr = drv.alloc(16 * len(table))
    drv.mem.write(addr, b"".join(d.pack() for d in table))
    return Desc(addr, 16 * len(table), INDIRECT)


def _indirect(drv: FakeDriver, table: list[Desc], flags: int = INDIRECT,
              length: int | None = None) -> None:
    """Publish a ring descriptor to `table` (its length and flags may lie)."""
    d = _table(drv, table)
    _raw(drv, [Desc(d.addr, d.len if length is None else length, flags)])


def _in_table(drv: FakeDriver) -> list[Desc]:
    """A good indirect table for an IN request."""
    h, d, s = _parts(drv)
    return [_d(h, NEXT, 1), _d(d, NEXT, 2), _d(s)]


def _empty(nxt: int) -> Desc:
    """An empty device-writable descriptor linking to nxt."""
    return Desc(0, 0, WRITE | NEXT, nxt)


def _hdr(drv: FakeDriver) -> Buf:
    return _parts(drv)[0]


def _byte(drv: FakeDriver) -> Buf:
    return Buf(drv.alloc(1), 1, True)


# Each builds one malformed request and publishes it (no notify).
Hostile = Callable[[FakeDriver], object]
HOSTILE: dict[str, Hostile] = {
    # buffers outside RAM
    "data-past-ram": lambda drv: _with(drv, data=Buf(RAM_END + 0x1000, SECTOR, True)),
    "data-straddles-ram-end": lambda drv: _with(drv, data=Buf(RAM_END - 256, SECTOR, True)),
    "data-wraps-2^64-onto-desc-table": lambda drv: _with(
        drv, data=Buf(WRAP - 0x100, 0x1100, True)),
    "data-at-2^64-1-len-max": lambda drv: _with(drv, data=Buf(WRAP - 1, 0xFFFF_FFFF, True)),
    "header-past-ram": lambda drv: _with(drv, hdr=Buf(RAM_END + 16, 16)),
    "status-past-ram": lambda drv: _with(drv, status=Buf(RAM_END, 1, True)),
    # chain structure
    "self-loop": lambda drv: _raw(drv, [_d(_hdr(drv), NEXT, 0)]),
    # Loops of empty buffers: only loop detection can stop those.
    "two-entry-loop": lambda drv: _raw(drv, [_d(_hdr(drv), NEXT, 1), _empty(2), _empty(1)]),
    "longer-than-queue": lambda drv: _raw(drv, [_d(_hdr(drv), NEXT, 1)] + [
        _empty(k + 1 if k < QSIZE - 1 else 4)
        for k in range(1, QSIZE)]),               # 0..7 then back to 4, never to the head
    "next-past-queue-size": lambda drv: (
        drv.write_desc(QSIZE, _d(_byte(drv))),    # a plausible entry beyond the table
        _raw(drv, [_d(_hdr(drv), NEXT, QSIZE)])),
    "head-past-queue-size": lambda drv: (
        drv.write_desc(QSIZE, _d(_hdr(drv))), drv.publish(QSIZE)),
    "head-0xffff": lambda drv: drv.publish(0xFFFF),
    "avail-idx-jumps-past-size": lambda drv: (_with(drv), drv.set_avail_idx(QSIZE + 1)),
    "avail-idx-jumps-far": lambda drv: (_with(drv), drv.set_avail_idx(0x8000)),
    "readable-after-writable": lambda drv: drv.publish(drv.add_chain(
        [_hdr(drv), _byte(drv), Buf(drv.alloc(SECTOR), SECTOR)])),
    "no-status-byte": lambda drv: drv.publish(drv.add_chain(
        [_hdr(drv), Buf(drv.alloc(SECTOR), SECTOR)])),
    "header-too-short": lambda drv: _with(drv, hdr=Buf(_hdr(drv).addr, 15)),
    # indirect tables
    "nested-indirect": lambda drv: _indirect(drv, [_table(drv, _in_table(drv))]),  # good inside
    "indirect-past-ram": lambda drv: _raw(drv, [Desc(RAM_END, 48, INDIRECT)]),
    "indirect-straddles-ram-end": lambda drv: (   # entry 0 in RAM links to entry 1 past it
        drv.mem.write(RAM_END - 16, _d(_hdr(drv), NEXT, 1).pack()),
        _raw(drv, [Desc(RAM_END - 16, 48, INDIRECT)])),
    "indirect-wraps-2^64": lambda drv: _raw(drv, [Desc(WRAP - 16, 48, INDIRECT)]),
    "indirect-len-0": lambda drv: _indirect(drv, _in_table(drv), length=0),
    "indirect-len-not-x16": lambda drv: _indirect(drv, _in_table(drv), length=56),  # 3.5 entries
    "indirect-with-next": lambda drv: _indirect(drv, _in_table(drv), flags=INDIRECT | NEXT),
    "indirect-loop": lambda drv: _indirect(drv, [*_in_table(drv)[:2], _empty(2)]),
    "indirect-next-past-table": lambda drv: _indirect(drv, [*_in_table(drv)[:2], _empty(3)]),
    "indirect-over-256-segments": lambda drv: _indirect(drv, [_d(_hdr(drv), NEXT, 1)] + [
        _d(_byte(drv), NEXT, k + 1) for k in range(1, 300)] + [_d(_byte(drv))]),
}


def _init(drv: FakeDriver, features: int = F_ALL) -> None:
    drv.init(features, queue_size=QSIZE)


def _assert_stopped(drv: FakeDriver, before: bytes) -> None:
    """NEEDS_RESET, one bad chain, one config interrupt, nothing written."""
    assert drv.status & Status.NEEDS_RESET
    st = drv.dev.stats()
    assert (st.bad_chains, st.requests, st.interrupts) == (1, 0, 1)
    assert drv.reg(Reg.INT_STATUS) == INT_CONFIG
    assert drv.collect() == []
    assert drv.ram() == before, "the device wrote guest RAM"


def _assert_recovers(drv: FakeDriver, disk: Path, features: int = F_ALL) -> None:
    """Status = 0 clears NEEDS_RESET; a re-initialised device serves again."""
    drv.reset()
    assert drv.status == 0
    _init(drv, features)
    assert drv.blk_read(5, 2) == (S_OK, disk.read_bytes()[5 * SECTOR:7 * SECTOR])


@pytest.mark.parametrize("build", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_chain_stops_device(drv: FakeDriver, disk: Path, build: Hostile) -> None:
    # EVENT_IDX off: with it the device writes avail_event, which would
    # make the untouched-RAM check inexact.
    features = F_ALL & ~F.EVENT_IDX
    _init(drv, features)
    original = disk.read_bytes()
    build(drv)
    before = drv.ram()
    drv.notify()
    _assert_stopped(drv, before)
    assert disk.read_bytes() == original
    # Stopped means stopped: a good chain now is not served.
    _with(drv)
    drv.notify()
    assert drv.collect() == [] and drv.dev.stats().requests == 0
    _assert_recovers(drv, disk, features)


def test_loop_in_a_huge_indirect_table_found_fast(drv: FakeDriver, disk: Path) -> None:
    """`next` is 16-bit: a walk of more than 65536 links has looped.  A loop
    of two empty entries at the head of a 4 GiB indirect table was walked
    2^28 times (the table's length, seconds of the VM's I/O thread for one
    chain) before the device gave up."""
    huge = 1 << 32
    drv.mem.add_region(huge, 4 << 30)   # mapped NORESERVE: untouched, it costs nothing
    features = F_ALL & ~F.EVENT_IDX
    _init(drv, features)
    drv.mem.write(huge, b"".join(d.pack() for d in [_d(_hdr(drv), NEXT, 1), _empty(2), _empty(1)]))
    _raw(drv, [Desc(huge, 0xFFFF_FFF0, INDIRECT)])
    before = drv.ram()
    t0 = time.monotonic()
    drv.notify()
    took = time.monotonic() - t0
    _assert_stopped(drv, before)
    assert took < 0.5, f"{took:.2f} s to find a two-entry loop"
    _assert_recovers(drv, disk, features)


def test_indirect_needs_the_feature(drv: FakeDriver, disk: Path) -> None:
    features = F_ALL & ~(F.INDIRECT_DESC | F.EVENT_IDX)
    _init(drv, features)
    _indirect(drv, _in_table(drv))
    before = drv.ram()
    drv.notify()
    _assert_stopped(drv, before)
    _assert_recovers(drv, disk, features)


def test_good_chains_before_a_bad_one_complete(drv: FakeDriver, disk: Path) -> None:
    _init(drv)
    good = drv.add_chain(_parts(drv))
    drv.write_desc(QSIZE - 1, Desc(RAM_END, SECTOR, WRITE))      # bad: data outside RAM
    later = drv.add_chain(_parts(drv))
    drv.publish(good, QSIZE - 1, later)
    drv.notify()
    assert [u.id for u in drv.collect()] == [good]
    st = drv.dev.stats()
    assert (st.requests, st.bad_chains, st.interrupts) == (1, 1, 2)   # used + config
    assert drv.reg(Reg.INT_STATUS) == INT_USED | INT_CONFIG
    assert drv.needs_reset
    _assert_recovers(drv, disk)


# Queue set-up a guest can get wrong: QueueReady does not stick and the
# device needs a reset.  (size, desc, avail, used)
D, A, U = 0x1000, 0x2000, 0x3000
BAD_QUEUES = {
    "size-0": (0, D, A, U),
    "size-not-power-of-2": (6, D, A, U),
    "size-over-max": (512, D, A, U),
    "desc-past-ram": (QSIZE, RAM_END, A, U),
    "desc-straddles-ram-end": (QSIZE, RAM_END - 64, A, U),
    "desc-straddles-regions": (QSIZE, BOUNDARY - 64, A, U),  # two host mappings
    "avail-straddles-ram-end": (QSIZE, D, RAM_END - 8, U),
    "used-straddles-ram-end": (QSIZE, D, A, RAM_END - 68),
    "used-wraps-2^64": (QSIZE, D, A, WRAP - 4),
    "desc-misaligned": (QSIZE, D + 8, A, U),
    "avail-misaligned": (QSIZE, D, A + 1, U),
    "used-misaligned": (QSIZE, D, A, U + 2),
    # The device writes the used ring: over the avail ring its used idx can
    # stand for the avail idx and feed it chains forever; over the table
    # its entries rewrite chains.
    "used-on-avail": (QSIZE, D, A, A),
    "used-over-avail-tail": (QSIZE, D, A, A + 20),
    "used-over-desc-table": (QSIZE, D, A, D + 64),
}


@pytest.mark.parametrize(("size", "desc", "avail", "used"), BAD_QUEUES.values(),
                         ids=BAD_QUEUES.keys())
def test_bad_queue_setup_refused(drv: FakeDriver, disk: Path, size: int, desc: int, avail: int,
                                 used: int) -> None:
    assert drv.negotiate(F_ALL)
    before = drv.ram()
    assert not drv.setup_queue(size, desc, avail, used)
    assert drv.needs_reset
    assert drv.dev.stats().bad_chains == 1
    drv.notify()
    assert drv.ram() == before
    assert drv.dev.stats().requests == 0
    _assert_recovers(drv, disk)


@pytest.mark.parametrize("size", [1, 2, 256])
def test_queue_sizes_and_ring_wrap(drv: FakeDriver, disk: Path, size: int) -> None:
    drv.init(F_ALL, queue_size=size)
    image = disk.read_bytes()
    for k in range(3 * size if size < 256 else 3):    # indirect: a request takes one slot
        count = 1 + k % 3                             # used.len tells the entries apart
        got = drv.blk_read(k, count, indirect=True)
        assert got == (S_OK, image[k * SECTOR:(k + count) * SECTOR])


def test_features_freeze_at_features_ok(drv: FakeDriver, disk: Path) -> None:
    """Feature bits written after FEATURES_OK are ignored: INDIRECT_DESC
    slipped in late is not negotiated, so an indirect chain is bad."""
    assert drv.negotiate(F.VERSION_1)
    drv.set_reg(Reg.DRV_FEATURES_SEL, 0)
    drv.set_reg(Reg.DRV_FEATURES, F.INDIRECT_DESC | F.EVENT_IDX)
    drv.mem.write(drv.layout.used, bytes(6 + 8 * QSIZE))
    assert drv.setup_queue(QSIZE)
    drv.driver_ok()
    _indirect(drv, _in_table(drv))
    before = drv.ram()
    drv.notify()
    _assert_stopped(drv, before)
    _assert_recovers(drv, disk)


def test_indexes_wrap_at_2_16(drv: FakeDriver) -> None:
    """avail and used idx are free-running 16-bit counters."""
    drv.init(F_ALL & ~F.EVENT_IDX, queue_size=4)
    head = drv.add_chain(_parts(drv))
    n = 0x10000 + 5
    for _ in range(n):
        drv.publish(head)
        drv.notify()
    assert drv.used_idx() == n & 0xFFFF
    st = drv.dev.stats()
    assert (st.requests, st.bad_chains) == (n, 0)


# ---- notifications ----

@pytest.mark.parametrize(("used_events", "irqs"), [
    ([0, 1, 2, 3], [1, 1, 1, 1]),    # the driver keeps up, as Linux does
    ([0, 0, 0, 0], [1, 0, 0, 0]),    # ... or does not: no more interrupts
    ([2, 2, 2, 2], [0, 0, 1, 0]),    # wake me when used idx passes 2
    ([0xFFFF] * 4, [0, 0, 0, 0]),
])
def test_event_idx_used_event_suppresses(drv: FakeDriver, used_events: list[int],
                                         irqs: list[int]) -> None:
    """One request per notify; used_event set before each."""
    _init(drv)
    got = []
    for used_event in used_events:
        drv.set_used_event(used_event)
        before = drv.dev.stats().interrupts
        _with(drv)
        drv.notify()
        got.append(drv.dev.stats().interrupts - before)
    assert got == irqs


@pytest.mark.parametrize(("used_event", "irqs"), [(0, 1), (2, 1), (3, 0)])
def test_event_idx_batch(drv: FakeDriver, used_event: int, irqs: int) -> None:
    """Three chains in one notify: one interrupt if used_event is among them."""
    _init(drv)
    drv.set_used_event(used_event)
    drv.publish(*(drv.add_chain(_parts(drv), indirect=True) for _ in range(3)))
    drv.notify()
    assert len(drv.collect()) == 3
    assert drv.dev.stats().interrupts == irqs


@pytest.mark.parametrize("features", [F_ALL, F_ALL & ~F.EVENT_IDX], ids=["event-idx", "no-event-idx"])
def test_avail_event_written(drv: FakeDriver, features: int) -> None:
    """With EVENT_IDX the device asks for the next notify past what it took;
    without, that word is the driver's and stays untouched."""
    _init(drv, features)
    drv.publish(*(drv.add_chain(_parts(drv)) for _ in range(2)))
    drv.notify()
    _with(drv)
    drv.notify()
    assert drv.avail_event() == (3 if features & F.EVENT_IDX else 0)


@pytest.mark.parametrize(("flags", "irqs"), [(0, 2), (AVAIL_NO_INTERRUPT, 0)])
def test_no_interrupt_flag_without_event_idx(drv: FakeDriver, flags: int, irqs: int) -> None:
    _init(drv, F_ALL & ~F.EVENT_IDX)
    drv.set_avail_flags(flags)
    for _ in range(2):
        _with(drv)
        drv.notify()
    assert drv.dev.stats().interrupts == irqs
    assert drv.reg(Reg.INT_STATUS) == (INT_USED if irqs else 0)


def test_interrupt_status_and_ack(drv: FakeDriver) -> None:
    _init(drv, F_ALL & ~F.EVENT_IDX)
    drv.notify()                                    # nothing published: no interrupt
    assert (drv.dev.stats().interrupts, drv.reg(Reg.INT_STATUS)) == (0, 0)
    _with(drv)
    drv.notify()
    assert drv.reg(Reg.INT_STATUS) == INT_USED
    drv.set_reg(Reg.INT_ACK, INT_USED)
    assert drv.reg(Reg.INT_STATUS) == 0
    assert drv.dev.stats().notifies == 2


def test_nothing_served_before_driver_ok(drv: FakeDriver, disk: Path) -> None:
    """virtio 1.x 3.1.2: the device consumes no buffer before DRIVER_OK."""
    assert drv.negotiate(F_ALL)
    drv.mem.write(drv.layout.used, bytes(6 + 8 * QSIZE))
    assert drv.setup_queue(QSIZE)
    _with(drv)
    drv.notify()
    assert drv.used_idx() == 0 and drv.dev.stats().requests == 0
    drv.driver_ok()
    drv.notify()
    assert [u.len for u in drv.collect()] == [SECTOR + 1]
