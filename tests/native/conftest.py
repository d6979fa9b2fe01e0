"""Fixtures of the native tier's virtio tests: a disk image on the host, two
adjacent regions of fake guest RAM, a virtio-blk device and its fake driver.

The RAM regions are the core's own mappings, fenced by PROT_NONE pages on both sides,
so a device that reads or writes one byte past a region, or runs across
the boundary between the two, dies of SIGSEGV at that access (pytest's
faulthandler prints where) instead of quietly touching host memory."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework.fake_driver import DISK_SECTORS, RAM, FakeDriver, MakeDriver, fake_ram
from vmmd.native import GuestMemory, VirtioBlock


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A 64 KiB image of seeded random bytes (no two sectors alike)."""
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(7).randbytes(DISK_SECTORS * 512))
    return path


@pytest.fixture
def make_driver(disk: Path) -> Iterator[MakeDriver]:
    """make_driver(read_only=False, serial=""): a device on `disk` over fresh
    RAM and its (not yet initialised) driver.  At teardown every canary the
    driver placed must still be intact."""
    made: list[tuple[GuestMemory, VirtioBlock, FakeDriver]] = []

    def make(read_only: bool = False, serial: str = "") -> FakeDriver:
        mem = fake_ram()
        fd = os.open(disk, os.O_RDONLY if read_only else os.O_RDWR)
        try:
            dev = VirtioBlock(mem, fd, read_only=read_only, serial=serial)
        finally:
            os.close(fd)  # the device has its own
        drv = FakeDriver(dev, mem, RAM)
        made.append((mem, dev, drv))
        return drv

    yield make
    broken = []
    for mem, dev, drv in made:
        broken += drv.broken_canaries()
        dev.close()
        mem.close()
    assert not broken, f"device wrote over canaries at {[hex(a) for a in broken]}"


@pytest.fixture
def drv(make_driver: MakeDriver) -> FakeDriver:
    """A read-write drive's driver, not yet initialised."""
    return make_driver()
