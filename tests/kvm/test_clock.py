"""kvmclock after a restore (RestoreVmRequest/CloneVmRequest.clock_realtime):
with the option the guest's clock moves on by the time the snapshot sat on
disk, without it the clock goes on from the snapshot's value; a snapshot
written before the host wall clock was recorded still restores, either way.

Seen from the host: a snapshot records kvmclock and the host's wall clock
read with it (machine.clock, machine.realtime), so a snapshot of the
restored VM, taken at once, shows how far its clock moved.  The daemon runs
the default isolation (cells: the worker's C core sets the clock)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.framework.console import ConsoleReader
from tests.framework.daemon import running_daemon
from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.native import kvm_clock_flags
from vmmd.vm import snapshot as snapshots

SAT_S = 1.5        # how long the snapshot sits before the restores
SLACK_NS = 100_000_000  # restore, snapshot and the worker's round trips


def machine(directory: Path) -> spb.MachineState:
    return snapshots.read(str(directory)).state.machine


def moved(before: spb.MachineState, after: spb.MachineState) -> tuple[int, int]:
    """(how far kvmclock moved, how far the host's wall clock moved), ns."""
    return after.clock - before.clock, after.realtime - before.realtime


def test_host_clock_flags_are_readable() -> None:
    """What KVM_CAP_ADJUST_CLOCK says here (the report quotes it)."""
    flags = kvm_clock_flags()
    print(f"KVM_CAP_ADJUST_CLOCK = {flags:#x}")
    assert flags >= 0


def test_clock_moves_on_only_when_asked(microguests: dict[str, Path], tmp_path: Path) -> None:
    s0, on, off = tmp_path / "s0", tmp_path / "on", tmp_path / "off"
    with running_daemon() as d, d.client() as c:
        c.create("src", str(microguests["pvh"]), cmdline="mg=tick ms=10", memory_mib=32)
        c.start("src")
        with ConsoleReader(c, "src") as con:
            con.wait_for(b"MG-TICK 2\n")
        c.pause("src")
        c.snapshot("src", str(s0))
        m0 = machine(s0)
        assert m0.realtime > 0  # recorded with the clock
        time.sleep(SAT_S)
        c.restore(str(s0), "on", clock_realtime=True)
        c.snapshot("on", str(on))
        c.restore(str(s0), "off")
        c.snapshot("off", str(off))
        clones = c.clone(str(s0), 2, "k", clock_realtime=True)
        for i, v in enumerate(clones):
            c.snapshot(v.vm_id, str(tmp_path / f"k{i}"))
    clock, wall = moved(m0, machine(on))
    assert wall > SAT_S * 1e9
    assert abs(clock - wall) < SLACK_NS, (clock, wall)  # caught up with the host
    clock, wall = moved(m0, machine(off))
    assert 0 <= clock < SLACK_NS, (clock, wall)  # went on from the snapshot's value
    for i in range(2):
        clock, wall = moved(m0, machine(tmp_path / f"k{i}"))
        assert abs(clock - wall) < SLACK_NS, (i, clock, wall)


def test_a_snapshot_without_realtime_still_restores(microguests: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """A vmstate from before machine.realtime existed: the snapshot's
    created_unix_ns stands in for it (taken a few ms from the clock)."""
    s0, on, off = tmp_path / "s0", tmp_path / "on", tmp_path / "off"
    with running_daemon() as d, d.client() as c:
        c.create("src", str(microguests["pvh"]), cmdline="mg=tick ms=10", memory_mib=32)
        c.start("src")
        c.pause("src")
        c.snapshot("src", str(s0))
        state = snapshots.read(str(s0)).state
        state.machine.ClearField("realtime")
        (s0 / "vmstate").write_bytes(snapshots.frame(state))
        created = state.created_unix_ns
        time.sleep(SAT_S)
        c.restore(str(s0), "on", clock_realtime=True)
        c.snapshot("on", str(on))
        c.restore(str(s0), "off")
        c.snapshot("off", str(off))
    m0 = state.machine
    m_on, m_off = machine(on), machine(off)
    assert abs((m_on.clock - m0.clock) - (m_on.realtime - created)) < SLACK_NS
    assert m_off.clock - m0.clock < SLACK_NS
