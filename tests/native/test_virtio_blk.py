"""virtio-blk in the C core, driven by the fake guest driver: the transport's
identity and feature negotiation, requests checked against the host file,
and the requests a guest may get wrong answered with a status byte (the
device keeps working; only malformed chains stop it: see test_virtq.py)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from tests.framework.fake_driver import (
    BOUNDARY,
    DISK_SECTORS,
    F_ALL,
    ID_BYTES,
    MAGIC,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    T_FLUSH,
    T_IN,
    T_OUT,
    VIRTIO_ID_BLOCK,
    Buf,
    F,
    FakeDriver,
    MakeDriver,
    Reg,
    Status,
)

CAP = DISK_SECTORS


def test_identity_and_config(drv: FakeDriver) -> None:
    assert drv.reg(Reg.MAGIC) == MAGIC
    assert drv.reg(Reg.VERSION) == 2
    assert drv.reg(Reg.DEVICE_ID) == VIRTIO_ID_BLOCK
    assert drv.reg(Reg.QUEUE_NUM_MAX) == 256
    assert drv.config(0, 8) == CAP                    # capacity, in sectors
    assert drv.config(12, 4) == 254                   # seg_max: 256 minus header and status
    assert drv.config(20, 4) == SECTOR                # blk_size


@pytest.mark.parametrize("read_only", [False, True])
def test_features_offered(make_driver: MakeDriver, read_only: bool) -> None:
    feats = make_driver(read_only=read_only).device_features()
    assert feats & F_ALL == F_ALL
    assert bool(feats & F.BLK_RO) == read_only


@pytest.mark.parametrize(("read_only", "features", "accepted"), [
    (False, F.VERSION_1, True),
    (False, F_ALL, True),
    (True, F_ALL | F.BLK_RO, True),
    (False, 0, False),                                # legacy: no VERSION_1
    (False, F_ALL & ~F.VERSION_1, False),
    (False, F.VERSION_1 | F.BLK_RO, False),           # RO is offered by read-only drives only
    (False, F.VERSION_1 | 1 << 0, False),             # never offered (low half)
    (False, F.VERSION_1 | 1 << 40, False),            # never offered (high half)
])
def test_features_ok(make_driver: MakeDriver, read_only: bool, features: int,
                     accepted: bool) -> None:
    drv = make_driver(read_only=read_only)
    assert drv.negotiate(features) is accepted
    assert drv.status & (Status.ACKNOWLEDGE | Status.DRIVER) == Status.ACKNOWLEDGE | Status.DRIVER


# Where the data goes in guest RAM: one buffer, cut in odd pieces, or
# straddling the boundary between the two RAM regions; direct or indirect.
LAYOUTS = {
    "one-segment": {},
    "odd-segments": {"split": (1, 511, 512, 999, 25)},
    "across-regions": {"at": BOUNDARY - 700, "split": (300, 1000)},
}


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_read_write_round_trip(drv: FakeDriver, disk: Path, layout: dict[str, Any],
                               indirect: bool) -> None:
    drv.init(F_ALL)
    original = disk.read_bytes()
    sector, count = 9, 4
    span = slice(sector * SECTOR, (sector + count) * SECTOR)

    status, got = drv.blk_read(sector, count, indirect=indirect, **layout)
    assert (status, got) == (S_OK, original[span])

    payload = bytes(range(256)) * (count * 2)
    status = drv.blk_write(sector, payload, indirect=indirect, **layout)
    assert status == S_OK
    assert disk.read_bytes() == original[:span.start] + payload + original[span.stop:]

    status, got = drv.blk_read(sector, count, indirect=indirect, **layout)
    assert (status, got) == (S_OK, payload)
    st = drv.dev.stats()
    assert (st.requests, st.io_errors, st.bad_chains) == (3, 0, 0)
    assert (st.bytes_read, st.bytes_written) == (2 * count * SECTOR, count * SECTOR)


def test_last_sector_and_whole_disk(drv: FakeDriver, disk: Path) -> None:
    drv.init(F_ALL)
    image = disk.read_bytes()
    assert drv.blk_read(CAP - 1, 1) == (S_OK, image[-SECTOR:])
    assert drv.blk_read(0, CAP, indirect=True) == (S_OK, image)


# Framings other than one descriptor per part: virtio 1.x lets the driver
# cut a request anywhere (the device must not assume a layout).
def _framings(drv: FakeDriver) -> dict[str, tuple[int, list[Buf], int, bytes]]:
    """name -> (type, chain, status address, expected data); sector 2."""
    hdr_in = struct.pack("<IIQ", T_IN, 0, 2)
    hdr_out = struct.pack("<IIQ", T_OUT, 0, 2)
    payload = b"\xab" * SECTOR

    def put(data: bytes, at: int | None = None) -> int:
        addr = drv.alloc(len(data), at=at)
        drv.mem.write(addr, data)
        return addr

    split_hdr = put(hdr_in)
    data = drv.alloc(SECTOR + 1, b"\xff")              # data and status in one buffer
    across = put(hdr_out + payload, at=BOUNDARY - 8)    # header straddles the regions
    status = drv.alloc(1, b"\xff")
    together = put(hdr_out + payload)                   # header and data in one buffer
    status2 = drv.alloc(1, b"\xff")
    return {
        "header-in-two": (T_IN, [Buf(split_hdr, 8), Buf(split_hdr + 8, 8),
                                 Buf(data, SECTOR + 1, True)], data + SECTOR, b""),
        "header-across-regions": (T_OUT, [Buf(across, 16), Buf(across + 16, SECTOR),
                                          Buf(status, 1, True)], status, payload),
        "header-with-data": (T_OUT, [Buf(together, 16 + SECTOR), Buf(status2, 1, True)],
                             status2, payload),
    }


@pytest.mark.parametrize("name", ["header-in-two", "header-across-regions", "header-with-data"])
def test_any_framing(drv: FakeDriver, disk: Path, name: str) -> None:
    drv.init(F_ALL)
    original = disk.read_bytes()
    rtype, chain, status_at, payload = _framings(drv)[name]
    [used] = drv.submit(chain)
    assert drv.mem.read(status_at, 1) == bytes([S_OK])
    sector2 = slice(2 * SECTOR, 3 * SECTOR)
    if rtype == T_IN:
        assert drv.mem.read(chain[-1].addr, SECTOR) == original[sector2]
        assert used.len == SECTOR + 1
    else:
        assert disk.read_bytes()[sector2] == payload
        assert used.len == 1


@pytest.mark.parametrize("read_only", [False, True])
def test_flush(make_driver: MakeDriver, read_only: bool) -> None:
    drv = make_driver(read_only=read_only)
    drv.init(F_ALL)
    status, used = drv.blk_request(T_FLUSH, 0)
    assert (status, used.len) == (S_OK, 1)


@pytest.mark.parametrize(("serial", "buf_len", "want"), [
    ("", ID_BYTES, bytes(ID_BYTES)),
    ("disk-1", ID_BYTES, b"disk-1" + bytes(14)),                  # NUL padded
    ("abcdefghijklmnopqrst", ID_BYTES, b"abcdefghijklmnopqrst"),  # 20: no NUL
    ("abcdefghijklmnopqrstuvwxyz", ID_BYTES, b"abcdefghijklmnopqrst"),
    ("disk-1", 4, b"disk"),                                       # a short buffer
    ("disk-1", 32, b"disk-1" + bytes(14) + b"\xee" * 12),         # 20 bytes at most
])
def test_get_id(make_driver: MakeDriver, serial: str, buf_len: int, want: bytes) -> None:
    drv = make_driver(serial=serial)
    drv.init(F_ALL)
    status, got, used_len = drv.get_id(buf_len)
    assert (status, got) == (S_OK, want)
    assert used_len == min(buf_len, ID_BYTES) + 1


# Requests a guest can get wrong: answered with a status, never served.
# (type, sector, data bytes, read-only drive, status)
BAD_REQUESTS = {
    "read-past-end": (T_IN, CAP, SECTOR, False, S_IOERR),
    "read-straddles-end": (T_IN, CAP - 1, 2 * SECTOR, False, S_IOERR),
    "read-sector-far": (T_IN, 2**63, SECTOR, False, S_IOERR),
    "read-sector-x512-wraps-to-0": (T_IN, 2**55, SECTOR, False, S_IOERR),
    "read-sector-max": (T_IN, 2**64 - 1, SECTOR, False, S_IOERR),
    "read-partial-sector": (T_IN, 0, 100, False, S_IOERR),
    "write-past-end": (T_OUT, CAP, SECTOR, False, S_IOERR),
    "write-sector-x512-wraps-to-512": (T_OUT, 2**55 + 1, SECTOR, False, S_IOERR),
    "write-partial-sector": (T_OUT, 0, SECTOR + 1, False, S_IOERR),
    "write-read-only": (T_OUT, 0, SECTOR, True, S_IOERR),
    "unknown-type": (3, 0, SECTOR, False, S_UNSUPP),
    "type-all-ones": (0xFFFF_FFFF, 0, SECTOR, False, S_UNSUPP),
}


@pytest.mark.parametrize(("rtype", "sector", "nbytes", "read_only", "want"),
                         BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_gets_status(make_driver: MakeDriver, disk: Path, rtype: int, sector: int,
                                 nbytes: int, read_only: bool, want: int) -> None:
    drv = make_driver(read_only=read_only)
    drv.init(F_ALL | (F.BLK_RO if read_only else 0))
    original = disk.read_bytes()
    data = drv.data_bufs(nbytes, write=rtype != T_OUT, fill=b"\x5a")
    status, used = drv.blk_request(rtype, sector, data)
    assert (status, used.len) == (want, 1)
    assert drv.mem.read(data[0].addr, nbytes) == b"\x5a" * nbytes   # nothing read into it
    assert disk.read_bytes() == original                            # nothing written
    st = drv.dev.stats()
    assert (st.requests, st.io_errors, st.bad_chains) == (1, 1, 0)
    assert (st.bytes_read, st.bytes_written) == (0, 0)
    # A bad request is the guest's problem, not the device's: it goes on.
    assert not drv.needs_reset
    assert drv.blk_read(3, 1) == (S_OK, original[3 * SECTOR:4 * SECTOR])


def test_read_only_drive_reads(make_driver: MakeDriver, disk: Path) -> None:
    drv = make_driver(read_only=True)
    drv.init(F_ALL | F.BLK_RO)
    assert drv.blk_read(0, 8) == (S_OK, disk.read_bytes()[:8 * SECTOR])
