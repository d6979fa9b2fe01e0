"""Guest RAM mapped from a file that shrinks under the device (a restored
VM's RAM is its snapshot's memory file, MAP_PRIVATE): touching a page past
the new end raises SIGBUS.  The core catches it where it touches guest RAM:
the device is faulted for good (NEEDS_RESET, no queue served again), memory
reads and writes fail with EFAULT, and the process goes on.  A SIGBUS
elsewhere still kills the process, through the handler that was there first.

Each scenario runs in a child Python (with faulthandler on, as under
pytest): without the fix the child dies of SIGBUS and the test fails,
instead of pytest dying with it."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.framework import REPO
from tests.framework.fake_driver import RAM, S_OK, T_IN, Buf, FakeDriver, Status
from vmmd.errors import NativeError
from vmmd.native import GuestMemory, VirtioBlock

RAM_BYTES = sum(size for _, size in RAM)
DISK = bytes(range(256)) * 256  # 64 KiB


def run_child(scenario: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    code = f"from tests.native.test_sigbus import {scenario}; {scenario}({str(tmp)!r})"
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], check=False,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)


def survived(scenario: str, tmp: Path) -> None:
    p = run_child(scenario, tmp)
    died = f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else ""
    assert p.returncode == 0 and p.stdout.endswith("OK\n"), (
        f"exit {p.returncode} {died}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")


# ---- the scenarios (in the child) ----
def file_ram(tmp: Path) -> tuple[GuestMemory, Path]:
    """GuestMemory laid out as conftest's RAM, both regions from one sparse file."""
    path = Path(tmp) / "memory"
    path.write_bytes(b"")
    os.truncate(path, RAM_BYTES)
    mem = GuestMemory()
    with open(path, "rb") as f:  # as a restore opens the snapshot's memory
        offset = 0
        for gpa, size in RAM:
            mem.add_file_region(gpa, size, f.fileno(), offset)
            offset += size
    return mem, path


def drive(tmp: Path, mem: GuestMemory) -> tuple[VirtioBlock, FakeDriver]:
    disk = Path(tmp) / "disk.img"
    disk.write_bytes(DISK)
    fd = os.open(disk, os.O_RDWR)
    try:
        dev = VirtioBlock(mem, fd)
    finally:
        os.close(fd)  # the device keeps its own
    drv = FakeDriver(dev, mem, RAM)
    drv.init()
    status, data = drv.blk_read(0, 1)
    assert (status, data) == (S_OK, DISK[:512])  # works while the file is whole
    return dev, drv


def efault(fn, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except NativeError as e:
        assert e.errno == errno.EFAULT, e
    else:
        raise AssertionError(f"{fn.__name__}{args[:1]}: no error")


def rings_gone(tmp: str) -> None:
    """The whole file cut: the notify reads the avail ring from a page that is gone."""
    mem, path = file_ram(Path(tmp))
    dev, drv = drive(Path(tmp), mem)
    chain, _ = drv.blk_chain(T_IN, 0, drv.data_bufs(512, True))
    drv.publish(drv.add_chain(chain))
    os.truncate(path, 0)
    drv.notify()
    assert drv.needs_reset, drv.status
    st = dev.stats()
    assert (st.requests, st.bad_chains, st.notifies) == (1, 0, 2), st  # not a guest error
    efault(mem.read, drv.used, 2)
    # Faulted for good: a reset leaves NEEDS_RESET, and no notify is served again.
    drv.reset()
    assert drv.status == Status.NEEDS_RESET, drv.status
    drv.set_reg(0x070, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
    drv.notify()
    assert dev.stats().notifies == 2
    dev.close()
    mem.close()
    print("OK")


def buffer_gone(tmp: str) -> None:
    """Rings, header and status stay; the data buffer's page is gone.  The
    kernel's own write into it (preadv) fails with EFAULT, without a signal:
    the device touches the buffers to find the page, and faults the same."""
    mem, path = file_ram(Path(tmp))
    dev, drv = drive(Path(tmp), mem)
    cut = 0x80000
    hdr = drv.alloc(16)
    mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
    status_at = drv.alloc(1, b"\xff")
    data = drv.data_bufs(4096, True, at=0x100000)
    assert status_at < cut and drv.used < cut
    drv.publish(drv.add_chain([Buf(hdr, 16), *data, Buf(status_at, 1, write=True)]))
    os.truncate(path, cut)
    drv.notify()
    assert drv.needs_reset, drv.status
    assert drv.collect() == []  # the request is not completed (no IOERR for the guest)
    assert mem.read(status_at, 1) == b"\xff"
    assert dev.stats().io_errors == 0
    efault(mem.read, 0x100000, 1)
    dev.close()
    mem.close()
    print("OK")


def memory_access(tmp: str) -> None:
    """vmm_mem_read/write: EFAULT for pages past the cut, again and again
    (SIGBUS is not left blocked after a jump), on any thread; pages before
    the cut keep what was written."""
    mem, path = file_ram(Path(tmp))
    mem.write(0x1000, b"kept")
    os.truncate(path, 0x8000)
    assert mem.read(0x1000, 4) == b"kept"
    for _ in range(3):
        efault(mem.read, 0x9000, 1)
    efault(mem.write, 0x9000, b"x")
    efault(mem.read, 0x7000, 0x2000)  # runs into the cut
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            efault(mem.read, 0x10000, 16)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert not errors, errors
    mem.close()
    print("OK")


def foreign_sigbus(tmp: str) -> None:
    """A SIGBUS outside guest RAM (another truncated mapping) is not ours."""
    mem, _ = file_ram(Path(tmp))  # the handler is in
    other = Path(tmp) / "other"
    other.write_bytes(bytes(8192))
    with open(other, "r+b") as f:
        m = mmap.mmap(f.fileno(), 8192)
    os.truncate(other, 0)
    print("touching", flush=True)
    m[4096]  # the access is the point
    print("survived")
    mem.close()


# ---- the tests ----
def test_notify_with_the_rings_gone_faults_the_device(tmp_path: Path) -> None:
    survived("rings_gone", tmp_path)


def test_io_into_a_vanished_buffer_faults_the_device(tmp_path: Path) -> None:
    survived("buffer_gone", tmp_path)


def test_memory_read_and_write_past_the_cut_fail_with_efault(tmp_path: Path) -> None:
    survived("memory_access", tmp_path)


def test_a_sigbus_elsewhere_still_kills_through_faulthandler(tmp_path: Path) -> None:
    p = run_child("foreign_sigbus", tmp_path)
    assert p.returncode == -signal.SIGBUS, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == "touching\n"
    assert "Fatal Python error: Bus error" in p.stderr, p.stderr  # chained to faulthandler


@pytest.mark.parametrize("cut", [0, 0x1000])
def test_a_file_too_short_is_refused_at_mapping(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "memory"
    path.write_bytes(bytes(cut))
    with GuestMemory() as mem, open(path, "rb") as f:
        with pytest.raises(NativeError) as e:
            mem.add_file_region(0, 0x2000, f.fileno())
        assert e.value.errno == errno.EINVAL
