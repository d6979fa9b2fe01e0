"""Linux boots through the whole path: loader, vCPUs, irqchip, UART, reset.

Few and purposeful, because a Linux boot costs minutes on a PVM host where
guest kernel code is emulated (docs/platform.md).  There user space
cannot run, so the READY line comes from the kernel's built-in hook
(`vmmd_ready=1`); on hardware KVM it comes from the initramfs's init.  Both
print `VMMD-GUEST-READY cpus=<online> mem_kib=<MemTotal>` and then reset.
"""

from __future__ import annotations

import re

import pytest

from tests.framework import ON_PVM
from tests.framework.guestrun import run_guest
from vmmd.native import StopReason
from vmmd.vm.boot.cmdline import build_cmdline

pytestmark = pytest.mark.linux

READY = re.compile(r"VMMD-GUEST-READY cpus=(\d+) mem_kib=(\d+)")
BOOT_TIMEOUT = 900  # a hang guard only; a bzImage decompresses emulated on PVM


@pytest.mark.timeout(BOOT_TIMEOUT + 60)
@pytest.mark.parametrize(("image", "vcpus", "mem_mib"), [
    ("vmlinux", 1, 128),
    ("vmlinux", 2, 256),
    ("bzImage", 1, 128),
])
def test_linux_reaches_ready(guest_artifacts, image: str, vcpus: int, mem_mib: int) -> None:  # type: ignore[no-untyped-def]
    cmdline = build_cmdline(None, "vmmd_ready=1" if ON_PVM else None)
    run = run_guest(guest_artifacts[image], cmdline, vcpus=vcpus, mem_mib=mem_mib,
                    initrd=guest_artifacts["initramfs.cpio.gz"], timeout=BOOT_TIMEOUT)
    found = READY.findall(run.console)
    assert len(found) == 1, f"expected one READY line; console:\n{run.console}"
    cpus, mem_kib = (int(v) for v in found[0])
    assert cpus == vcpus
    # MemTotal is RAM minus what the kernel keeps for itself: most of it, never more.
    assert 0.75 * mem_mib * 1024 <= mem_kib <= mem_mib * 1024, mem_kib
    assert run.stop.reason == StopReason.RESET, run.stop.message
    assert run.stop.clean
