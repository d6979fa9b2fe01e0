"""Guest memory in the C core on fake guest RAM: every access is bounds-checked."""

from __future__ import annotations

import errno

import pytest

from vmmd.errors import NativeError
from vmmd.native import GuestMemory

MiB = 1 << 20


@pytest.fixture
def mem():  # type: ignore[no-untyped-def]
    with GuestMemory() as m:
        m.add_region(0, 2 * MiB)
        m.add_region(2 * MiB, 2 * MiB)  # adjacent: copies may span both
        m.add_region(16 * MiB, 1 * MiB)  # a gap before it
        yield m


def test_read_back_what_was_written(mem) -> None:  # type: ignore[no-untyped-def]
    mem.write(0x1234, b"hello")
    assert mem.read(0x1234, 5) == b"hello"


def test_copy_spans_adjacent_regions(mem) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 64
    mem.write(2 * MiB - 100, data)
    assert mem.read(2 * MiB - 100, len(data)) == data


@pytest.mark.parametrize(("gpa", "length"), [
    (4 * MiB, 1),                   # just past the end of the low regions
    (4 * MiB - 1, 2),               # straddles the end into the gap
    (17 * MiB, 1),                  # past the last region
    (2**64 - 1, 2),                 # wraps around the address space
    (0xFFFF_FFFF_FFFF_F000, 0x2000),
])
def test_out_of_range_access_is_refused(mem, gpa: int, length: int) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NativeError) as exc:
        mem.read(gpa, length)
    assert exc.value.errno == errno.EFAULT
    with pytest.raises(NativeError):
        mem.write(gpa, b"\0" * length)


@pytest.mark.parametrize(("gpa", "size", "err"), [
    (1 * MiB, 1 * MiB, errno.EEXIST),      # overlaps region 0
    (0x1001, 0x1000, errno.EINVAL),        # unaligned
    (32 * MiB, 0, errno.EINVAL),           # empty
    (2**64 - 0x1000, 0x2000, errno.EOVERFLOW),
])
def test_bad_regions_are_refused(mem, gpa: int, size: int, err: int) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NativeError) as exc:
        mem.add_region(gpa, size)
    assert exc.value.errno == err


def test_region_table_is_bounded() -> None:
    with GuestMemory() as m:
        for i in range(8):
            m.add_region(i * MiB, 4096)
        with pytest.raises(NativeError) as exc:
            m.add_region(64 * MiB, 4096)
        assert exc.value.errno == errno.ENOSPC
