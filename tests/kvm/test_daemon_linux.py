"""Linux through the daemon: created and started over gRPC, its READY line
read from StreamConsole, then stopped gracefully - Ctrl-Alt-Del through the
i8042, the guest's own restart answers it - so it ends "stopped by API"
without the forced path.

The guest holds after READY: on PVM the kernel hook (`vmmd_ready=hold`),
elsewhere the initramfs's init (`vmmd_init=hold`)."""

from __future__ import annotations

import pytest

from tests.framework import ON_PVM
from tests.framework.daemon import running_daemon
from vmmd.client import pb

pytestmark = pytest.mark.linux

BOOT_TIMEOUT_S = 900


@pytest.mark.timeout(BOOT_TIMEOUT_S + 120)
def test_linux_boots_through_the_api_and_stops_gracefully(guest_artifacts) -> None:  # type: ignore[no-untyped-def]
    hold = "vmmd_ready=hold" if ON_PVM else "vmmd_init=hold"
    with running_daemon() as d, d.client() as c:
        c.create("linux", str(guest_artifacts["vmlinux"]),
                 initrd=str(guest_artifacts["initramfs.cpio.gz"]), cmdline_append=hold,
                 vcpus=1, memory_mib=128)
        with c.console("linux", from_start=True, follow=True) as stream:
            c.start("linux")
            seen = b""
            for data in stream:
                seen += data
                if b"VMMD-GUEST-READY cpus=1 mem_kib=" in seen and seen.endswith(b"\n"):
                    break
        assert b"VMMD-GUEST-READY cpus=1" in seen
        assert c.get("linux").state == pb.VM_STATE_RUNNING  # held, not restarted
        vm = c.stop("linux", timeout_ms=120_000)
        assert vm.state == pb.VM_STATE_STOPPED
        assert vm.stop.reason == pb.STOP_REASON_STOPPED_BY_API
        assert vm.stop.message == "guest reset (i8042 reset line)"  # the guest's own answer
        c.delete("linux")
        assert "vm.stop_forced" not in d.log_text()
