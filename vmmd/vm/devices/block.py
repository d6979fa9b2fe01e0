"""Drives: validation of host files, exclusive use, cmdline words, attachment.

Every drive is checked before the VM exists: the file must be a readable
regular file on an ordinary filesystem (vm/hostfiles.py: no FIFO, device,
directory, procfs or sysfs file), writable unless the drive is read-only,
and not in use by another VM for writing.  That last rule is an flock on the
image (exclusive for a writable drive, shared for a read-only one) held for
the VM's life, so it also holds between daemons.  The fd that was checked
and locked is the one the C device serves (it keeps a duplicate): the image
is opened once.  Device order is the spec's order: the first drive is
/dev/vda in the guest.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

from vmmd.errors import FieldPath, InvalidSpecError, quoted, shown
from vmmd.record import Record
from vmmd.spec import DriveSpec, check_id
from vmmd.vm.boot.cmdline import virtio_mmio_word
from vmmd.vm.hostfiles import check_path, open_file
from vmmd.vm.layout import virtio_mmio_slot

SERIAL_BYTES = 20  # VIRTIO_BLK_ID_BYTES
DEVICE_ID, QUEUES = 2, 1  # virtio-blk, as native/virtio_blk.c's ops table says


class DrivePlan(Record):
    spec: DriveSpec
    index: int
    mmio_base: int
    irq: int


def _field(i: int, name: str) -> FieldPath:
    return ("drives", i, name)


def _path_error(i: int) -> Callable[[str], InvalidSpecError]:
    return lambda problem: InvalidSpecError(_field(i, "path_on_host"), problem)


def guest_name(index: int) -> str:
    """The guest's name of the index-th virtio disk: vda, vdb, ..."""
    return "vd" + chr(ord("a") + index)


def check_drives(drives: tuple[DriveSpec, ...], first_slot: int = 0) -> tuple[DrivePlan, ...]:
    """Validate ids, root flags and slots; no file access here."""
    seen: set[str] = set()
    roots = [i for i, d in enumerate(drives) if d.is_root_device]
    if len(roots) > 1:
        raise InvalidSpecError(_field(roots[1], "is_root_device"), "only one drive can be the root device")
    plans = []
    for i, d in enumerate(drives):
        check_id(_field(i, "drive_id"), d.drive_id)
        if d.drive_id in seen:
            raise InvalidSpecError(_field(i, "drive_id"), f"{quoted(d.drive_id)} is used twice")
        seen.add(d.drive_id)
        check_path(d.path_on_host, _path_error(i))
        try:
            region, irq = virtio_mmio_slot(first_slot + i)
        except ValueError:
            raise InvalidSpecError("drives", f"at most {i} devices fit this VM") from None
        plans.append(DrivePlan(d, i, region.gpa, irq))
    return tuple(plans)


def cmdline_words(plans: tuple[DrivePlan, ...], cmdline: str, *,
                  devices: bool = True) -> list[str]:
    """Device words (unless not `devices`: ACPI announces them), plus root= for the root
    drive unless the cmdline has one."""
    words = [virtio_mmio_word(p.mmio_base, p.irq) for p in plans] if devices else []
    root = next((p for p in plans if p.spec.is_root_device), None)
    if root is not None and not any(w.startswith("root=") for w in cmdline.split()):
        words += [f"root=/dev/{guest_name(root.index)}", "ro" if root.spec.read_only else "rw"]
    return words


class DriveLocks:
    """Open, check and lock every drive's image; close() releases them.
    fds[i] is drive i's image, as the C device is to serve it."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def acquire(self, plans: tuple[DrivePlan, ...]) -> None:
        try:
            for p in plans:
                self.fds.append(_open_locked(p))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _open_locked(p: DrivePlan) -> int:
    path, field = p.spec.path_on_host, _field(p.index, "path_on_host")
    shown_path = shown(path)

    def fail(problem: str) -> InvalidSpecError:
        return InvalidSpecError(field, problem)

    denied = f"{shown_path} is not writable; make the drive read-only or fix its permissions"
    fd, st = open_file(path, fail, write=not p.spec.read_only,
                       errno_problems=None if p.spec.read_only else
                       {errno.EACCES: denied, errno.EROFS: denied})
    try:
        if not p.spec.read_only and not st.st_mode & 0o222:
            # Root may open it anyway; a file marked read-only still is not ours to write.
            raise InvalidSpecError(field, f"{shown_path} is a read-only file (mode "
                                          f"{stat.S_IMODE(st.st_mode):04o}); make the drive read-only")
        if st.st_size < 512:
            raise InvalidSpecError(field, f"{shown_path} is smaller than one 512-byte sector")
        mode = fcntl.LOCK_SH if p.spec.read_only else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidSpecError(field, f"{shown_path} is in use by another VM"
                                          + ("" if p.spec.read_only else " (writable drives are exclusive)")) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def serial(drive_id: str) -> str:
    return drive_id[:SERIAL_BYTES]
