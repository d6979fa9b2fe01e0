"""virtio-rng (the entropy device) in the C core, driven by the fake guest
driver: its identity, requests filled with random bytes wherever the
buffers lie, the 64 KiB bound per request, and the chains a hostile guest
may post (device-readable buffers, buffers outside RAM, zero-length ones)
contained: nothing written outside what the driver offered, the device
stopped (NEEDS_RESET) where the chain breaks the spec."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from tests.framework.fake_driver import (
    BOUNDARY,
    MAGIC,
    NEXT,
    RAM,
    RAM_END,
    WRITE,
    Buf,
    Desc,
    F,
    FakeDriver,
    Reg,
    fake_ram,
)
from vmmd.errors import NativeError
from vmmd.native import VirtioRng

VIRTIO_ID_RNG = 4
MAX_REQUEST = 64 << 10  # VMM_RNG_MAX_REQUEST
FILL = b"\xee"
TRANSPORT = F.VERSION_1 | F.EVENT_IDX | F.INDIRECT_DESC


@pytest.fixture
def drv() -> Iterator[FakeDriver]:
    """A driver of a fresh device, initialised (VERSION_1 and the transport's
    features); at teardown every canary must be intact."""
    mem = fake_ram()
    dev = VirtioRng(mem)
    d = FakeDriver(dev, mem, RAM)
    d.init(TRANSPORT, queue_size=64)
    yield d
    broken = d.broken_canaries()
    dev.close()
    mem.close()
    assert not broken, f"device wrote over canaries at {[hex(a) for a in broken]}"


def request(drv: FakeDriver, bufs: list[Buf], indirect: bool = False) -> tuple[int, bytes]:
    """One request; (used length, the buffers' bytes after it)."""
    used = drv.submit(bufs, indirect)
    assert len(used) == 1, used
    return used[0].len, b"".join(drv.mem.read(b.addr, b.len) for b in bufs)


def looks_random(data: bytes) -> bool:
    """Not a fill: no byte value over a few times its share (4 KiB: ~16 each)."""
    return len(set(data)) > min(len(data), 256) // 2 and max(data.count(b) for b in set(data)) \
        < max(64, len(data) // 32)


def beside_used_ring(drv: FakeDriver) -> bytes:
    """Guest RAM but the used ring (where the device may note avail_event
    when it takes a chain, good or bad)."""
    ram = drv.ram()
    return ram[:drv.used] + ram[drv.used + 8 + 8 * drv.size:]


def test_identity() -> None:
    with fake_ram() as mem, VirtioRng(mem) as dev:
        drv = FakeDriver(dev, mem, RAM)
        assert drv.reg(Reg.MAGIC) == MAGIC and drv.reg(Reg.VERSION) == 2
        assert drv.reg(Reg.DEVICE_ID) == VIRTIO_ID_RNG
        assert drv.device_features() == TRANSPORT  # nothing of its own
        assert drv.config(0, 4) == 0  # no config space


def test_buffers_are_filled_with_random_bytes(drv: FakeDriver) -> None:
    got = []
    for _ in range(3):
        n, data = request(drv, drv.data_bufs(4096, True, fill=FILL))
        assert n == 4096 and looks_random(data)
        got.append(data)
    assert len(set(got)) == 3
    st = drv.dev.stats()
    assert (st.requests, st.bytes_read, st.io_errors, st.bad_chains) == (3, 3 * 4096, 0, 0)


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize(("at", "split"), [
    (None, (1, 511, 512, 999, 25)),          # odd pieces
    (BOUNDARY - 700, (300, 1000)),           # across the two RAM regions
])
def test_every_segment_is_filled(drv: FakeDriver, at: int | None, split: tuple[int, ...],
                                 indirect: bool) -> None:
    bufs = drv.data_bufs(4096, True, split, at, fill=FILL)
    n, data = request(drv, bufs, indirect)
    assert n == 4096 and looks_random(data)
    assert all(FILL * 8 not in drv.mem.read(b.addr, b.len) for b in bufs if b.len >= 8)


def test_a_request_is_bounded_and_the_rest_left_alone(drv: FakeDriver) -> None:
    total = MAX_REQUEST + 40000
    bufs = drv.data_bufs(total, True, (30000, 30000, 30000), fill=FILL)
    n, data = request(drv, bufs)
    assert n == MAX_REQUEST
    assert looks_random(data[:MAX_REQUEST]) and data[MAX_REQUEST:] == FILL * (total - MAX_REQUEST)
    assert drv.dev.stats().bytes_read == MAX_REQUEST


def test_zero_length_buffers_get_nothing_and_the_device_goes_on(drv: FakeDriver) -> None:
    a = drv.alloc(16, FILL)
    assert request(drv, [Buf(a, 0, write=True)]) == (0, b"")
    n, data = request(drv, [Buf(a, 0, write=True), Buf(a, 16, write=True)])
    assert n == 16 and data[-16:] != FILL * 16
    assert not drv.needs_reset


def test_a_device_readable_buffer_stops_the_device_untouched(drv: FakeDriver) -> None:
    r = drv.alloc(64, FILL)
    w = drv.alloc(64, FILL)
    drv.publish(drv.add_chain([Buf(r, 64), Buf(w, 64, write=True)]))
    before = beside_used_ring(drv)
    drv.notify()
    assert drv.collect() == [] and drv.needs_reset
    assert drv.mem.read(r, 64) == FILL * 64 and drv.mem.read(w, 64) == FILL * 64
    assert beside_used_ring(drv) == before
    assert drv.dev.stats().bad_chains == 1
    # It stays stopped until the driver resets it; then it works again.
    assert drv.submit(drv.data_bufs(32, True)) == []
    drv.init(TRANSPORT, queue_size=64)
    n, _ = request(drv, drv.data_bufs(32, True, fill=FILL))
    assert n == 32


@pytest.mark.parametrize(("addr", "length"), [
    (RAM_END, 16),                  # wholly outside RAM
    (RAM_END - 8, 16),              # running off the end
    (2**64 - 8, 16),                # wrapping
])
def test_a_buffer_outside_ram_stops_the_device_untouched(drv: FakeDriver, addr: int,
                                                         length: int) -> None:
    w = drv.alloc(64, FILL)
    head = drv.write_table([Desc(w, 64, WRITE | NEXT, (drv.next_desc + 1) % drv.size),
                            Desc(addr, length, WRITE)])
    drv.publish(head)
    before = beside_used_ring(drv)
    drv.notify()
    assert drv.collect() == [] and drv.needs_reset
    assert beside_used_ring(drv) == before  # not even the buffer inside RAM was written
    assert drv.dev.stats().bad_chains == 1


def test_a_smaller_bound_is_kept() -> None:
    with fake_ram() as mem, VirtioRng(mem, max_request=1000) as dev:
        drv = FakeDriver(dev, mem, RAM)
        drv.init(TRANSPORT, queue_size=16)
        n, data = request(drv, drv.data_bufs(4096, True, (999, 2), fill=FILL))
        assert n == 1000 and data[1000:] == FILL * 3096
        assert not drv.broken_canaries()


@pytest.mark.parametrize("bound", [MAX_REQUEST + 1, 2**32 - 1])
def test_a_bound_above_the_devices_is_refused(bound: int) -> None:
    with fake_ram() as mem, pytest.raises(NativeError) as e:
        VirtioRng(mem, max_request=bound)
    assert e.value.errno == errno.EINVAL
