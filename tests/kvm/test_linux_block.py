"""Linux on a virtio-blk root: the kernel finds the disk and mounts
rootfs.ext4 from it, read-write (the superblock's mount count and mount
time change on the host) or read-only (the image is byte-for-byte unchanged).

On a PVM host the READY line comes from the kernel hook, which runs after
the root filesystem is mounted; on hardware KVM from the image's init.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from tests.framework import ON_PVM
from tests.framework.guestrun import run_guest
from tests.framework.images import superblock
from vmmd.native import StopReason
from vmmd.spec import DriveSpec
from vmmd.vm.boot.cmdline import build_cmdline

pytestmark = pytest.mark.linux

READY = re.compile(r"VMMD-GUEST-READY cpus=1 mem_kib=\d+")
BOOT_TIMEOUT = 900


def boot_from_disk(guest_artifacts, image: Path, read_only: bool):  # type: ignore[no-untyped-def]
    cmdline = build_cmdline(None, "vmmd_ready=1" if ON_PVM else None)
    drive = DriveSpec(drive_id="rootfs", path_on_host=str(image), read_only=read_only,
                      is_root_device=True)
    return run_guest(guest_artifacts["vmlinux"], cmdline, mem_mib=128, timeout=BOOT_TIMEOUT,
                     drives=(drive,))


@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_root_mounted_read_write(guest_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "rootfs.ext4"
    shutil.copyfile(guest_artifacts["rootfs.ext4"], image)
    mtime, count = superblock(image)
    run = boot_from_disk(guest_artifacts, image, read_only=False)
    assert READY.search(run.console), run.console
    assert run.stop.reason == StopReason.RESET, run.stop.message
    new_mtime, new_count = superblock(image)
    assert new_count == count + 1
    assert new_mtime > mtime


@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_root_mounted_read_only_leaves_the_image_unchanged(guest_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "rootfs.ext4"
    shutil.copyfile(guest_artifacts["rootfs.ext4"], image)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    run = boot_from_disk(guest_artifacts, image, read_only=True)
    assert READY.search(run.console), run.console
    assert run.stop.reason == StopReason.RESET, run.stop.message
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
