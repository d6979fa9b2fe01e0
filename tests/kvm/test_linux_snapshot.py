"""Linux snapshotted in the middle of its boot and restored in a fresh daemon
(one boot; slow on a PVM host): paused as soon as the kernel has found its
virtio disk - timers, interrupts and a device live, the root not yet
mounted - written, the first daemon gone, restored by a second one, and the
kernel goes on to mount its root from the disk (the superblock's mount
count changes on the host) and reaches READY.

On a PVM host READY comes from the kernel's hook; on hardware KVM from the
image's init.  (The hardware-KVM extras of the issue - a shell answering
after restore, files written before the snapshot read back, ping on an
overridden tap - need user space, which PVM hosts cannot run.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.framework import ON_PVM
from tests.framework.console import ConsoleReader
from tests.framework.daemon import running_daemon
from tests.framework.images import superblock
from vmmd.client import pb
from vmmd.vm.boot.cmdline import build_cmdline

pytestmark = pytest.mark.linux

BOOT_TIMEOUT = 900
MID_BOOT = b"virtio_blk virtio0: [vda]"  # the disk is probed; the root is mounted later
READY = b"VMMD-GUEST-READY"


@pytest.mark.timeout(BOOT_TIMEOUT + 120)
def test_linux_snapshotted_mid_boot_finishes_booting_in_a_fresh_daemon(
        guest_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "rootfs.ext4"
    shutil.copyfile(guest_artifacts["rootfs.ext4"], image)
    _, mounts = superblock(image)
    snap = str(tmp_path / "snap")
    words = "loglevel=6" + (" vmmd_ready=1" if ON_PVM else "")  # loglevel: MID_BOOT shows
    drive = pb.Drive(drive_id="root", path_on_host=str(image), is_root_device=True)
    with running_daemon("--stop-timeout", "1") as d, d.client() as c:
        c.create("linux", str(guest_artifacts["vmlinux"]), cmdline=build_cmdline(None, words),
                 memory_mib=128, drives=[drive])
        c.start("linux")
        with ConsoleReader(c, "linux") as con:
            con.wait_for(MID_BOOT)
            c.pause("linux")
            before = con.data
        c.snapshot("linux", snap)
    assert READY not in before
    assert superblock(image)[1] == mounts  # not mounted yet
    with running_daemon("--stop-timeout", "1") as d, d.client() as c:
        c.restore(snap, "linux", resume=True)
        with ConsoleReader(c, "linux") as con:
            con.wait(lambda b: READY in b or con.ended, "READY")
            after = con.data
        assert READY in after, after.decode(errors="replace")
        assert c.get("linux").counters.devices[0].requests > 0  # the disk served the restored kernel
    assert superblock(image)[1] == mounts + 1, "the restored kernel mounted the root read-write"
