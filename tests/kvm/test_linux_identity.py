"""Linux on the function-runner path, at kernel level (one boot; slow on a
PVM host): a guest booted with an entropy device holds after READY, printing
its wall clock every second (`vmmd_clock=1`); it is snapshotted, the
snapshot sits a few seconds, and clones restored from it come back with
their own identity:

- Linux's virtio-rng driver drew bytes from our device (its counters);
- a clone restored with `clock_realtime` keeps the guest's wall clock where
  it was against the host's (within 2 s), and one restored without it falls
  behind by the time the snapshot sat (so the check can fail).

On hardware KVM the guest's clock is the host's (within 2 s) before and
after.  On a PVM host a booted guest's wall clock is a constant few seconds
behind the host's (5.7 s here, steady once booted, whether the guest's
clocksource is the TSC or kvmclock: it is lost while early boot runs
emulated), so there the test compares with the offset before the snapshot.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.framework import ON_PVM
from tests.framework.console import ConsoleReader
from tests.framework.daemon import running_daemon
from vmmd.client import Client, pb

pytestmark = pytest.mark.linux

BOOT_TIMEOUT_S = 900
SAT_S = 4.0  # how long the snapshot sits before the clones are restored
# kvmclock, not the TSC Linux prefers on an invariant-TSC host: on a PVM host
# a restore's write of the guest's TSC does not take (the guest's TSC runs on
# with the host's across a snapshot, so a TSC-clocked guest is never stale
# there and the test could not fail); kvmclock is what KVM_SET_CLOCK moves.
CLOCKSOURCE = "clocksource=kvm-clock"
READY = re.compile(rb"VMMD-GUEST-READY cpus=1 mem_kib=\d+ wall=(\d+)\.(\d+)\r?\n")
CLOCK = re.compile(rb"VMMD-GUEST-CLOCK wall=(\d+)\.(\d+)\r?\n")


def _seconds(m: re.Match[bytes]) -> float:
    return int(m.group(1)) + int(m.group(2)) / 1000


def _clock_offset(con: ConsoleReader, after: int = 0) -> float:
    """The guest's next clock line (past byte `after` of its console) minus
    the host's time when it arrived (positive: the guest is ahead)."""
    con.wait(lambda b: CLOCK.search(b, after) is not None, "a clock line")
    arrived = time.time()
    m = CLOCK.search(con.data, after)
    assert m is not None
    return _seconds(m) - arrived


def _first_clock(c: Client, vm_id: str) -> float:
    with ConsoleReader(c, vm_id) as con:
        return _clock_offset(con)


@pytest.mark.timeout(BOOT_TIMEOUT_S + 300)
def test_restored_linux_clones_get_fresh_entropy_and_the_hosts_clock(
        guest_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snap = str(tmp_path / "snap")
    with running_daemon("--stop-timeout", "1") as d, d.client() as c:
        c.create("linux", str(guest_artifacts["vmlinux"]),
                 initrd=str(guest_artifacts["initramfs.cpio.gz"]),
                 cmdline_append=f"vmmd_ready=hold vmmd_clock=1 {CLOCKSOURCE}", vcpus=1,
                 memory_mib=128,
                 entropy=pb.EntropyDevice())
        with ConsoleReader(c, "linux") as con:
            c.start("linux")
            con.wait(lambda b: READY.search(b) is not None, "READY")
            before = _clock_offset(con, len(con.data))
        if not ON_PVM:
            assert abs(before) < 2.0, f"a booted guest is {before:+.3f} s off the host"
        drawn = c.get("linux").counters.entropy
        assert drawn.device_id == "entropy" and drawn.bytes_read > 0, \
            "Linux's virtio-rng driver drew bytes from the device"
        c.pause("linux")
        c.snapshot("linux", snap)
        c.delete("linux")
        time.sleep(SAT_S)
        c.restore(snap, "synced", resume=True, clock_realtime=True)
        c.restore(snap, "stale", resume=True)
        synced, stale = _first_clock(c, "synced"), _first_clock(c, "stale")
        print(f"guest clock - host clock: booted {before:+.3f} s, restored with clock_realtime "
              f"{synced:+.3f} s, without {stale:+.3f} s (the snapshot sat {SAT_S} s)")
        assert abs(synced - before) < 2.0, \
            f"clock_realtime: {synced:+.3f} s off the host, {before:+.3f} s before the snapshot"
        assert stale - before < -(SAT_S - 1.0), \
            f"without clock_realtime: {stale:+.3f} s off, {before:+.3f} s before the snapshot"
        for vm in ("synced", "stale"):
            c.delete(vm)
