"""The cells measures (`--only cells`): what isolation costs, each against
`vmmd serve --isolation none` in the same run (or against the issue's goal
where there is no counterpart).  Rows put the cells figure in the vmmd
column and the yardstick in the floor column; ratio = cells / yardstick.

- spawn: a cell's worker forked by the zygote, jailed, answering (measured
  in a process of its own that drives the cell machinery directly; the
  yardstick is the 5 ms goal);
- CreateVm + StartVm -> first console bytes of mg=print, in a new cell;
- RestoreVm (paused) into a new cell, and into an existing one;
- memory per cell: the daemon's RSS growth plus the worker's private RSS,
  guest RAM excluded; and RSS per clone for 1000 clones in one cell;
- the create rate with every VM in a new cell (VMs per second per core).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench import daemon, proc, stats, targets
from bench.daemon import _first_output
from tests.framework import REPO
from vmmd.client import Client, ClientError

MEM_MIB = 16
SPARE_GAP_S = 0.06  # > a spare's spawn (~20 ms) plus the last VM's teardown
RATE_MAX_VMS = 1000  # the create-rate run stops there (the daemon's --max-vms is 1100)
MODES = ("cells", "none")


def served(mode: str) -> AbstractContextManager[tuple[Client, int]]:
    """A fresh daemon in isolation `mode` (bench/daemon.py's launcher), room for the
    1000-clone and create-rate measures."""
    return daemon.served(max_vms=1100, memory_budget="unlimited", isolation=mode)


def row(mid: str, what: str, unit: str, cells: list[float],
        yardstick: list[float]) -> dict[str, Any]:
    r: dict[str, Any] = {"id": mid, "what": what, "unit": unit,
                         "vmmd": stats.summarize(cells), "floor": stats.summarize(yardstick)}
    r["ratio"] = stats.ratio(r["vmmd"], r["floor"])
    return r


def _spawn_times(reps: int, spares: int) -> list[float]:
    """New cells timed in a fresh process (the zygote must be forked by a
    single-threaded process): python -m bench.cellspawn REPS SPARES."""
    p = subprocess.run([sys.executable, "-m", "bench.cellspawn", str(reps), str(spares)],
                       cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise proc.RunError(f"cell spawn: {p.stderr[-2000:]}")
    return [float(x) for x in json.loads(p.stdout.strip().splitlines()[-1])]


def _micro(c: Client, vm_id: str, cmdline: str = "mg=print", **kw: Any) -> None:
    c.create(vm_id, str(targets.MICRO_KERNEL), cmdline=cmdline, vcpus=1, memory_mib=MEM_MIB,
             **kw)


def _create_start_first(mode: str, reps: int, gap_s: float = 0.0) -> list[float]:
    """CreateVm + StartVm -> first console bytes, ms; gap_s between requests
    (with cells: time for the spare workers to be refilled)."""
    out = []
    with served(mode) as (c, _):
        for i in range(reps):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            _micro(c, f"f{i}")
            t_create = time.perf_counter() - t0
            _, t_first, _ = _first_output(c, f"f{i}", 60)
            out.append((t_create + t_first) * 1e3)
            c.delete(f"f{i}")
    return out


def _snapshot(c: Client, d: Path) -> str:
    _micro(c, "src", "mg=tick ms=1000")
    c.start("src")
    time.sleep(0.2)
    c.pause("src")
    c.snapshot("src", str(d))
    c.delete("src")
    return str(d)


def _restores(mode: str, reps: int, cell: str, gap_s: float = 0.0) -> list[float]:
    out = []
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-snap-") as tmp, \
            served(mode) as (c, _):
        snap = _snapshot(c, Path(tmp) / "s")
        kw = {"cell": cell} if cell else {}
        if cell:
            c.restore(snap, "anchor", **kw)  # the cell exists before the timed restores
        for i in range(reps):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            c.restore(snap, f"r{i}", **kw)
            out.append((time.perf_counter() - t0) * 1e3)
            c.delete(f"r{i}")
    return out


def _private_kib(pid: int, guest_kib: int) -> int:
    """Private RSS of a process, guest RAM mappings (their size) excluded."""
    return daemon._smaps_kib(pid, guest_kib, ("Private_Clean:", "Private_Dirty:"),
                             anon_only=False)[0]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _memory_per_cell(n: int) -> list[float]:
    """Daemon RSS growth + each worker's private RSS (guest RAM excluded), MiB per cell,
    for n cells of one paused 16 MiB micro-guest each."""
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-snap-") as tmp, \
            served("cells") as (c, pid):
        snap = _snapshot(c, Path(tmp) / "s")
        c.restore(snap, "warm")
        c.delete("warm")
        time.sleep(0.5)
        before = _rss_kib(pid)
        for i in range(n):
            c.restore(snap, f"m{i}")
        grown = (_rss_kib(pid) - before) / n
        per = [(grown + _private_kib(c.get(f"m{i}").cell.pid, MEM_MIB * 1024)) / 1024
               for i in range(n)]
        for i in range(n):
            c.delete(f"m{i}")
    return per


def _clone_density(mode: str, n: int) -> list[float]:
    """RSS (daemon + the cell's worker) per paused clone, MiB, n clones in one cell."""
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-snap-") as tmp, \
            served(mode) as (c, pid):
        snap = _snapshot(c, Path(tmp) / "s")
        kw = {"cell": "dense"} if mode == "cells" else {}
        c.restore(snap, "anchor", **kw)
        worker = c.get("anchor").cell.pid
        base = _rss_kib(pid) + (_rss_kib(worker) if worker else 0)
        made = 0
        for k in range(0, n, 100):
            try:
                c.clone(snap, min(100, n - k), id_prefix=f"d{k}", **kw)
            except ClientError as e:
                print(f"bench: cells density stopped at {made}: {e}", file=sys.stderr)
                break
            made += min(100, n - k)
        total = _rss_kib(pid) + (_rss_kib(worker) if worker else 0)
        for v in c.list():
            c.delete(v.vm_id)
    return [(total - base) / max(made, 1) / 1024]


def _rate(mode: str, seconds: float = 5.0) -> list[float]:
    """VMs created (each in a new cell with cells) per second per core, one client
    thread per core, for `seconds`."""
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    with served(mode) as (c, _):
        end = time.monotonic() + seconds
        counts = [0] * cores

        def work(t: int) -> None:
            i = 0
            while time.monotonic() < end and sum(counts) < RATE_MAX_VMS:
                _micro(c, f"t{t}-{i}")
                counts[t] += 1
                i += 1

        t0 = time.monotonic()
        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(work, range(cores)))
        elapsed = time.monotonic() - t0
        for v in c.list():
            c.delete(v.vm_id)
    return [sum(counts) / elapsed / cores]


def measures(reps: int) -> list[dict[str, Any]]:
    out = [row("cells.spawn", "cell spawn: zygote fork → jailed worker in its cgroups, "
               "answering (floor: the 5 ms goal)", "ms", _spawn_times(reps, 0), [5.0]),
           row("cells.spare", "new cell from a spare worker: limits written, answering "
               "(floor: the 5 ms goal)", "ms", _spawn_times(reps, 2), [5.0])]
    gap = SPARE_GAP_S
    out.append(row("cells.create_first", "CreateVm + StartVm → first console bytes (mg=print), "
                   "new cell, back to back (floor: --isolation none; goal ≤ 1.5)", "ms",
                   _create_start_first("cells", reps), _create_start_first("none", reps)))
    out.append(row("cells.create_first_spaced", "the same, one request every "
                   f"{gap * 1e3:.0f} ms (spares refilled)", "ms",
                   _create_start_first("cells", reps, gap),
                   _create_start_first("none", reps, gap)))
    out.append(row("cells.restore_new", "RestoreVm (paused, 1 vCPU / 16 MiB) into a new cell, "
                   "back to back (floor: --isolation none; goal median ≤ 8 ms)", "ms",
                   _restores("cells", reps, ""), _restores("none", reps, "")))
    out.append(row("cells.restore_new_spaced", "the same, one request every "
                   f"{gap * 1e3:.0f} ms (spares refilled)", "ms",
                   _restores("cells", reps, "", gap), _restores("none", reps, "", gap)))
    out.append(row("cells.restore_existing", "RestoreVm (paused) into an existing cell "
                   "(floor: --isolation none; goal ≤ 1.2)", "ms",
                   _restores("cells", reps, "warm"), _restores("none", reps, "")))
    out.append(row("cells.memory", "memory per cell: daemon RSS growth + worker private RSS, "
                   "guest RAM excluded (floor: the 5 MiB goal)", "MiB",
                   _memory_per_cell(20), [5.0]))
    out.append(row("cells.density", "RSS per paused clone, 1000 clones in one cell (daemon + "
                   "worker; floor: --isolation none)", "MiB",
                   _clone_density("cells", 1000), _clone_density("none", 1000)))
    out.append(row("cells.rate", "CreateVm rate, each VM in a new cell, higher better "
                   "(floor: --isolation none; goal ≥ 10)", "VMs/s/core",
                   _rate("cells"), _rate("none")))
    return out


def commands() -> dict[str, str]:
    return {"cells": "vmmd serve --isolation cells|none --memory-budget unlimited; micro-guest "
                     f"{MEM_MIB} MiB, 1 vCPU"}
