"""(idle) What idle VMs cost the host: resumed clones that do nothing, over 30 s.

- 100 idle micro-guests (`mg=idle`: `sti; hlt`, nothing armed), clones of one snapshot,
  resumed: the daemon's CPU time over the window (every thread: vCPUs included) as a share of
  one core, and the vCPU exits per VM per second.  Goals: <= 1 % of one core, <= 0.1 exits.
- 50 idle Linux clones (a snapshot held after READY): the CPU of the daemon's own threads
  (all but the `vcpu<N>` threads, which run guest code) and the exits per VM per second, with
  the vCPU threads' CPU beside it (on a PVM host an idle kernel's timer work runs emulated).

Per-thread CPU comes from /proc/<pid>/task/*/stat, told apart by the names vmmd gives its
threads (`vcpu<N>`, `vmio`).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stats, targets
from bench.daemon import console_until, served
from bench.measures import measure
from vmmd.client import Client
from vmmd.vm.boot.cmdline import build_cmdline

WINDOW_S = 30.0
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(stat: str) -> tuple[str, float]:
    """(name, utime + stime in seconds) of a /proc stat line."""
    fields = stat[stat.rindex(")") + 2:].split()
    return stat[stat.index("(") + 1:stat.rindex(")")], (int(fields[11]) + int(fields[12])) / TICKS


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far: 'vcpu' (the vcpu<N> threads, alive all along) and 'own' (the
    process's total minus those: threads that ended count there too)."""
    vcpu = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, secs = _cpu_s((task / "stat").read_text())
        except OSError:
            continue  # a thread that ended meanwhile
        if name.startswith("vcpu"):
            vcpu += secs
    _, total = _cpu_s(Path(f"/proc/{pid}/stat").read_text())
    return {"vcpu": vcpu, "own": total - vcpu}


KINDS = ("exits", "exits_intr", "exits_io", "exits_mmio", "exits_other")


def _exits(c: Client, ids: list[str]) -> dict[str, int]:
    """The VMs' exits to the VMM, in all and by kind.  exits_intr are the VMM's own doing
    (a kick: the halt watchdog asking, a pause); the rest are the guest's (its PIO, MMIO)."""
    out = dict.fromkeys(KINDS, 0)
    for v in ids:
        counters = c.get(v).counters
        for k in KINDS:
            out[k] += getattr(counters, k)
    return out


def _window(c: Client, pid: int, ids: list[str]) -> dict[str, float]:
    """CPU shares of one core (own threads, vCPU threads) and exits per VM per second, in
    all and of each kind."""
    cpu0, exits0, t0 = _thread_cpu(pid), _exits(c, ids), time.monotonic()
    time.sleep(WINDOW_S)
    cpu1, exits1, secs = _thread_cpu(pid), _exits(c, ids), time.monotonic() - t0
    return {"own_pct": (cpu1["own"] - cpu0["own"]) / secs * 100,
            "vcpu_pct": (cpu1["vcpu"] - cpu0["vcpu"]) / secs * 100,
            **{f"{k}_per_vm_s": (exits1[k] - exits0[k]) / len(ids) / secs for k in KINDS}}


def _clones(c: Client, snap: str, n: int, prefix: str) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        batch = min(50, n - len(ids))
        ids += [v.vm_id for v in c.clone(snap, batch, f"{prefix}{len(ids)}-", resume=True)]
    return ids


def _rows(tag: str, what: str, w: dict[str, float], n: int) -> list[dict[str, Any]]:
    total = w["own_pct"] + w["vcpu_pct"]
    whose = ("every daemon thread" if tag == "micro"
             else "the daemon's own threads (vCPU threads apart)")
    return [
        {**stats.goal(measure(f"idle.{tag}.cpu", f"{what}: CPU of {whose} over "
                              f"{WINDOW_S:.0f} s, % of one core", "%",
                              {"vmmd": [total if tag == "micro" else w["own_pct"]]}),
                      median=1.0),
         "vcpu_threads_pct": round(w["vcpu_pct"], 3), "own_threads_pct": round(w["own_pct"], 3),
         "vms": n},
        # The micro-guest does nothing: every exit counts.  Linux has timers of its own: the
        # goal is on the exits the VMM causes (kicks, exits_intr), the guest's own beside it.
        {**stats.goal(measure(f"idle.{tag}.exits", f"{what}: " + (
            "vCPU exits per VM per second" if tag == "micro" else
            "exits the VMM causes (kicks: exits_intr) per VM per second"), "1/VM/s",
            {"vmmd": [w["exits_per_vm_s" if tag == "micro" else "exits_intr_per_vm_s"]]}),
                      median=0.1),
         **{f"{k}_per_vm_s": round(w[f"{k}_per_vm_s"], 4) for k in KINDS}},
        measure(f"idle.{tag}.guest_exits", f"{what}: the guest's own exits (PIO, MMIO, other) "
                "per VM per second", "1/VM/s",
                {"vmmd": [w["exits_per_vm_s"] - w["exits_intr_per_vm_s"]]}),
    ]


def micro(n: int = 100) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-idle-") as tmp, \
            served(max_vms=n + 10, memory_budget="unlimited") as (c, pid):
        c.create("src", str(targets.MICRO_KERNEL), cmdline="mg=idle", memory_mib=32)
        c.start("src")
        console_until(c, "src", b"MG-IDLE", 60)
        c.pause("src")
        snap = str(Path(tmp) / "snap")
        c.snapshot("src", snap)
        c.delete("src")
        ids = _clones(c, snap, n, "i")
        time.sleep(3)  # the halt watchdog's first rounds: each quiet vCPU asked once
        return _rows("micro", f"{n} idle micro-guests (mg=idle clones, resumed)",
                     _window(c, pid, ids), n)


def linux(pvm: bool, n: int = 50, timeout: float = 900.0) -> list[dict[str, Any]]:
    word = "vmmd_ready=hold" if pvm else "vmmd_init=hold"
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-idle-") as tmp, \
            served(max_vms=n + 10, memory_budget="unlimited") as (c, pid):
        c.create("src", str(targets.LINUX_KERNEL), initrd=str(targets.LINUX_INITRD),
                 cmdline=build_cmdline(None, word, pvm_host=pvm), memory_mib=128)
        c.start("src")
        console_until(c, "src", b"VMMD-GUEST-READY", timeout)
        c.pause("src")
        snap = str(Path(tmp) / "snap")
        c.snapshot("src", snap)
        c.delete("src")
        ids = _clones(c, snap, n, "l")
        time.sleep(5)
        return _rows("linux", f"{n} idle Linux clones (held after READY, resumed)",
                     _window(c, pid, ids), n)


def commands() -> dict[str, str]:
    return {"idle micro-guest": "mg=idle (clones of one snapshot, resumed)"}
