"""Cells, for real: each cell's worker is jailed as asked, escapes fail or
kill only that worker, a dying worker takes only its cell, limits hold
(docs/security.md says which claim each test stands for)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework import REPO, wait_until
from tests.framework.console import ConsoleReader, ticks
from tests.framework.daemon import Daemon, running_daemon
from vmmd.client import ClientError, pb
from vmmd.native import seccomp_allowlist
from vmmd.native.testhooks import available as hooks_built
from vmmd.vm import snapshot as snapshots

MIB = 1 << 20


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with running_daemon("--stop-timeout", "1", "--isolation", "cells") as d:
        yield d


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def cgroup_dirs(pid: int) -> dict[str, str]:
    """controller -> the cgroup path of the process (v1: one line each)."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            out[c or "unified"] = path
    return out


def test_two_cells_are_jailed_as_asked(daemon: Daemon, microguests: dict[str, Path]) -> None:
    limits = pb.CellLimits(cpu=0.5, memory_mib=256, pids=64)
    with daemon.client() as c:
        c.create("a", str(microguests["pvh"]), cmdline="mg=tick ms=10", memory_mib=16,
                 cell="tenant-a", limits=limits)
        c.create("b", str(microguests["pvh"]), cmdline="mg=tick ms=10", memory_mib=16)
        c.start("a")
        c.start("b")
        a, b = c.get("a").cell, c.get("b").cell
        assert (a.name, b.name) == ("tenant-a", "@b")
        assert a.limits == limits and a.shared and not b.shared
        assert a.pid != b.pid and a.uid != b.uid and 0 not in (a.pid, b.pid, a.uid, b.uid)
        ours_ns = os.readlink("/proc/self/ns/mnt")
        for cell in (a, b):
            s = status(cell.pid)
            assert s["Uid"].split() == [str(cell.uid)] * 4, s["Uid"]
            assert s["Gid"].split() == [str(cell.uid)] * 4, s["Gid"]
            assert s["Groups"] == ""
            for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(s[cap], 16) == 0, (cap, s[cap])
            assert s["NoNewPrivs"] == "1" and s["Seccomp"] == "2"
            assert os.readlink(f"/proc/{cell.pid}/ns/mnt") != ours_ns
            assert os.listdir(f"/proc/{cell.pid}/root") == []  # nothing of the host
            assert os.getppid() != cell.pid
        # Cgroups: each worker in its own cell's group, with the limits asked.
        dirs = cgroup_dirs(a.pid)
        group = f"/{a.uid}"  # by uid: a name's next cell never meets the last one's leftovers
        assert dirs["cpu"].endswith(group) and dirs["memory"].endswith(group), dirs
        assert dirs["pids"].endswith(group), dirs
        assert cgroup_dirs(b.pid)["cpu"].endswith(f"/{b.uid}")
        cpu = Path("/sys/fs/cgroup/cpu" + dirs["cpu"])
        if cpu.exists():  # cgroup v1 (this machine)
            assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50000
            mem = Path("/sys/fs/cgroup/memory" + dirs["memory"])
            assert int((mem / "memory.limit_in_bytes").read_text()) == 256 * MIB
            pids = Path("/sys/fs/cgroup/pids" + dirs["pids"])
            assert (pids / "pids.max").read_text().strip() == "64"
        else:  # cgroup v2
            base = Path("/sys/fs/cgroup" + dirs["unified"])
            assert (base / "cpu.max").read_text().split() == ["50000", "100000"]
            assert int((base / "memory.max").read_text()) == 256 * MIB
            assert (base / "pids.max").read_text().strip() == "64"
        # The guests run, each in its own worker; GetVm shows the cell's use.
        with ConsoleReader(c, "a") as con:
            con.wait_for(b"MG-TICK 3\n")
        wait_until(lambda: c.get("a").cell.cpu_time_s > 0, "the worker's CPU time shows")
        info = c.get("a").cell
        assert info.rss_bytes > 0 and info.memory_bytes > 0
        # A VM that joins the cell asking for other limits is refused, naming the cell.
        with pytest.raises(ClientError) as err:
            c.create("c", str(microguests["pvh"]), memory_mib=16, cell="tenant-a")
        assert err.value.code == "FAILED_PRECONDITION", err.value
        assert "cell 'tenant-a' has other limits" in err.value.details
        c.create("c", str(microguests["pvh"]), memory_mib=16, cell="tenant-a", limits=limits)
        assert c.get("c").cell.pid == a.pid  # one worker for the cell
        for vm_id in ("a", "b", "c"):
            c.delete(vm_id)
        # The cells go with their last VM: workers, cgroups.
        wait_until(lambda: not Path(f"/proc/{a.pid}").exists() and
                   not Path(f"/proc/{b.pid}").exists(), "the workers exit")
        if cpu.exists():
            wait_until(lambda: not cpu.exists(), "the cell's cgroup is removed")


def test_a_cell_memory_limit_below_the_guests_ram_is_refused(
        daemon: Daemon, microguests: dict[str, Path]) -> None:
    with daemon.client() as c:
        with pytest.raises(ClientError) as err:
            c.create("a", str(microguests["pvh"]), memory_mib=128,
                     limits=pb.CellLimits(memory_mib=64))
        assert err.value.code == "INVALID_ARGUMENT", err.value
        assert err.value.details.startswith("config.limits.memory_mib: 64 MiB cannot hold"), \
            err.value.details
        assert c.list() == []


def drill(kind: str, arg: str, microguests: dict[str, Path]) -> dict[str, object]:
    if not hooks_built():
        pytest.skip("the test hooks are not built (make test builds them)")
    p = subprocess.run([sys.executable, "-m", "tests.framework.celldrill", kind, arg,
                        str(microguests["pvh"])], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print(out)
    by = out["bystander"]
    assert by["phase"] == "running", out  # the other cell's guest ticks on,
    assert out["bystander_in_order"], out  # its console intact,
    assert out["bystander_ticks"][1] >= out["bystander_ticks"][0] + 5, out
    return out


def killed_by_seccomp(out: dict[str, object], syscall: str) -> None:
    victim = out["victim"]
    assert isinstance(victim, dict) and victim["phase"] == "crashed", out
    assert str(out["result"]).startswith("worker gone"), out
    assert "was killed by its seccomp filter: system call " in victim["stop"], out
    assert f"({syscall}) is not allowed" in victim["stop"], out
    assert out["victim_reclaimed"], out  # its cgroup gone, its VM still listed (crashed)


def test_drill_open_etc_shadow_fails(microguests: dict[str, Path]) -> None:
    out = drill("open", "/etc/shadow", microguests)
    assert isinstance(out["result"], int) and out["result"] < 0, out  # -EACCES (the filter)
    assert out["victim"] == {"phase": "running", "stop": None}, out  # and the worker lives
    assert not out["victim_reclaimed"], out


def test_drill_execve_kills_only_that_worker(microguests: dict[str, Path]) -> None:
    killed_by_seccomp(drill("execve", "/bin/sh", microguests), "execve")


def test_drill_ptrace_of_another_worker_kills_only_the_tracer(
        microguests: dict[str, Path]) -> None:
    killed_by_seccomp(drill("ptrace", "@bystander", microguests), "ptrace")


def test_drill_a_syscall_off_the_list_kills_only_that_worker(
        microguests: dict[str, Path]) -> None:
    assert "mount" not in seccomp_allowlist()
    killed_by_seccomp(drill("syscall", "165", microguests), "mount")  # x86-64 mount


def test_sigbus_in_a_cell_kills_only_that_cell(daemon: Daemon, microguests: dict[str, Path],
                                               tmp_path: Path) -> None:
    """A VM restored (into a cell of its own) from a snapshot whose memory
    file is then truncated dies with its cell; a VM in another cell,
    restored from another snapshot, runs on."""
    with daemon.client() as c:
        for name in ("s1", "s2"):
            c.create(name, str(microguests["pvh"]), cmdline="mg=tick ms=10", memory_mib=16)
            c.start(name)
            with ConsoleReader(c, name) as con:
                con.wait_for(b"MG-TICK 2\n")
            c.pause(name)
            c.snapshot(name, str(tmp_path / name))
            c.delete(name)
        c.restore(str(tmp_path / "s1"), "doomed", resume=True)
        c.restore(str(tmp_path / "s2"), "fine", resume=True, cell="other")
        doomed_pid = c.get("doomed").cell.pid
        group = Path("/sys/fs/cgroup/pids" + cgroup_dirs(doomed_pid)["pids"])
        assert group.is_dir(), group
        with ConsoleReader(c, "fine") as con:
            con.wait(lambda d: len(ticks(d)) >= 3, "fine ticks")
            os.truncate(tmp_path / "s1" / snapshots.MEMORY_FILE, snapshots.MEMORY_OFFSET)
            wait_until(lambda: c.get("doomed").state == pb.VM_STATE_CRASHED, "doomed crashed")
            vm = c.get("doomed")
            print(vm.stop.message)
            assert vm.stop.reason == pb.STOP_REASON_CRASH
            assert "truncated" in vm.stop.message or "worker" in vm.stop.message, vm.stop.message
            last = max(ticks(con.data))
            con.wait(lambda d: max(ticks(d)) >= last + 5, "fine ticks on")
        assert c.get("fine").state == pb.VM_STATE_RUNNING
        assert c.get("fine").cell.pid != doomed_pid
        assert daemon.proc.poll() is None
        # Whether the worker died of it or contained it (the C core's SIGBUS
        # guard stops just that VM), the cell's cgroup goes with the cell.
        c.delete("doomed")
        wait_until(lambda: not group.exists(), "the doomed cell's cgroup removed")
        c.delete("fine")


def test_cpu_limit_holds(daemon: Daemon, microguests: dict[str, Path]) -> None:
    """A spinning guest in a cell of 0.25 CPU gets about that, by the cell's own
    accounting (cgroup CPU time over wall time; a bounded tolerance)."""
    with daemon.client() as c:
        c.create("spin", str(microguests["pvh"]), cmdline="mg=spin", memory_mib=16,
                 limits=pb.CellLimits(cpu=0.25))
        c.start("spin")
        time.sleep(0.5)
        t0, cpu0 = time.monotonic(), c.get("spin").cell.cpu_time_s
        time.sleep(3.0)
        t1, cpu1 = time.monotonic(), c.get("spin").cell.cpu_time_s
        share = (cpu1 - cpu0) / (t1 - t0)
        print(f"spinning guest in a 0.25-CPU cell: {share:.3f} of a core")
        assert 0.15 <= share <= 0.35, share
        c.delete("spin")
