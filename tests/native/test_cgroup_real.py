"""Cells' cgroups on the real kernel (vmmd/cell/cgroup.py): limits read back,
processes placed, the CPU quota and pids limit enforced, OOM kills counted,
groups removed with what is in them.  Needs root and cgroups with the cpu,
memory and pids controllers; skipped, saying why, elsewhere.

Each test makes its own parent group (vmmd-test-PID) at the root of each
hierarchy and removes it, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmd.cell.cgroup import CellCgroup, CgroupError, CgroupTree

MiB = 1 << 20


@pytest.fixture
def tree() -> Iterator[CgroupTree]:
    if os.geteuid() != 0:
        pytest.skip("cgroups are made by root: run as root")
    try:
        t = CgroupTree.open(f"vmmd-test-{os.getpid()}")
    except CgroupError as e:
        pytest.skip(f"no usable cgroups here: {e}")
    cells: list[CellCgroup] = []
    create = t.create

    def tracked(cell: str, **limits: float | None) -> CellCgroup:
        group = create(cell, **limits)  # type: ignore[arg-type]
        cells.append(group)
        return group

    t.create = tracked  # type: ignore[method-assign]
    try:
        yield t
    finally:
        for c in cells:
            c.remove()
        assert t.close(), "the test's parent cgroup was left behind"
        assert not any(os.path.exists(d) for d in t.dirs)


def child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def cgroup_paths(pid: int) -> dict[str, str]:
    """/proc/PID/cgroup as {controller: path} ("" for v2's line)."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def read(cell: CellCgroup, name: str) -> str:
    for d in cell.dirs:
        if os.path.exists(os.path.join(d, name)):
            return Path(d, name).read_text().strip()
    raise AssertionError(f"no {name} in {cell.dirs}")


@pytest.mark.timeout(60)
def test_limits_placement_cpu_quota_and_removal(tree: CgroupTree) -> None:
    cell = tree.create("cell-a", cpu=0.25, memory_bytes=64 * MiB, pids=50)
    if tree.version == 1:
        assert (read(cell, "cpu.cfs_quota_us"), read(cell, "cpu.cfs_period_us")) == \
            ("25000", "100000")
        assert read(cell, "memory.limit_in_bytes") == str(64 * MiB)
    else:
        assert read(cell, "cpu.max") == "25000 100000"
        assert read(cell, "memory.max") == str(64 * MiB)
    assert read(cell, "pids.max") == "50"

    # Memory is charged where it is first touched (cgroup v1 moves no charges): the
    # child writes its 4 MiB only once it is in the cell, then spins.
    busy = child("import sys\nsys.stdin.readline()\nb = b'x' * (4 << 20)\nwhile True: pass")
    try:
        cell.add(busy.pid)
        assert busy.stdin
        busy.stdin.write("go\n")
        busy.stdin.flush()
        start, used0 = time.monotonic(), cell.usage().cpu_ns
        where = f"/{tree.parent_name}/cell-a"
        placed = cgroup_paths(busy.pid)
        ours = ("cpu", "cpuacct", "memory", "pids") if tree.version == 1 else ("",)
        assert {c: placed.get(c) for c in ours} == dict.fromkeys(ours, where)

        time.sleep(2.0)
        usage = cell.usage()
        share = (usage.cpu_ns - used0) / ((time.monotonic() - start) * 1e9)
        # The quota holds: a busy loop gets about a quarter of a core.  Wide
        # bounds: a tolerance for a shared host, not a measurement.
        assert 0.15 <= share <= 0.40, f"a busy loop under a 0.25 quota got {share:.2f} of a core"
        assert usage.pids == 1 and usage.memory_bytes > 0
        assert not cell.oom_killed()

        assert cell.remove()
        assert busy.wait(timeout=5) == -signal.SIGKILL
        assert not any(os.path.exists(d) for d in cell.dirs)
    finally:
        busy.kill()
        busy.wait()


FORKER = """
import errno, os, sys, time
sys.stdin.readline()
n = 0
try:
    for _ in range(20):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    print(n, "no error", flush=True)
except OSError as e:
    print(n, errno.errorcode[e.errno], flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_pids_limit_refuses_forks_and_remove_kills_them_all(tree: CgroupTree) -> None:
    cell = tree.create("cell-p", cpu=None, memory_bytes=None, pids=5)
    forker = child(FORKER)
    try:
        cell.add(forker.pid)
        assert forker.stdin and forker.stdout
        forker.stdin.write("go\n")
        forker.stdin.flush()
        # itself and 4 children are 5; the 5th fork fails
        assert forker.stdout.readline().split() == ["4", "EAGAIN"]
        assert cell.usage().pids == 5
        assert cell.remove()
        assert forker.wait(timeout=5) == -signal.SIGKILL
    finally:
        forker.kill()
        forker.wait()


@pytest.mark.timeout(60)
def test_oom_kill_is_counted(tree: CgroupTree) -> None:
    cell = tree.create("cell-m", cpu=None, memory_bytes=32 * MiB, pids=None)
    hog = child("import sys; sys.stdin.readline(); b = bytearray(256 << 20); print('alive')")
    try:
        cell.add(hog.pid)
        out, _ = hog.communicate("go\n", timeout=30)
        assert hog.returncode == -signal.SIGKILL and out == ""
        assert cell.oom_killed()
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.timeout(60)
def test_a_stale_group_is_emptied_and_made_anew(tree: CgroupTree) -> None:
    old = tree.create("cell-s", cpu=None, memory_bytes=None, pids=3)
    sleeper = child("import time; time.sleep(60)")
    try:
        old.add(sleeper.pid)
        new = tree.create("cell-s", cpu=None, memory_bytes=None, pids=None)
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert new.usage().pids == 0 and read(new, "pids.max") == "max"
    finally:
        sleeper.kill()
        sleeper.wait()
