"""An escape drill, run as its own process (`python -m tests.framework.celldrill
KIND ARG MICROGUEST`): the daemon's cell machinery (zygote, jail, seccomp,
cgroups, the manager) in a fresh single-threaded process, two cells each
running a ticking micro-guest; the worker of cell "victim" is made to try
one escape through the test-only hook (vmmd/cell/testhooks.py); then what
happened is printed as one JSON line: the hook's result (or that the worker
died), both VMs' phase and stop message, and the bystander's ticks before
and after (they must go on, in order).

ARG "@bystander" stands for the bystander worker's pid (ptrace drill).
"""

from __future__ import annotations

import json
import os
import sys
import time

from tests.framework.console import ticks
from vmmd.cell.cells import CellPlacement
from vmmd.cell.cgroup import CgroupTree
from vmmd.cell.remote import WorkerGone
from vmmd.cell.zygote import Zygote
from vmmd.cli.serve import parse_uids
from vmmd.errors import NativeError
from vmmd.manager import Manager
from vmmd.spec import BootSpec, VmSpec


def console(m: Manager, vm_id: str) -> bytes:
    out = b""
    cur = m.console_cursor(vm_id, from_start=True)
    while (got := cur.read()) is not None:
        out += got[0]
    return out


def wait(pred: object, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def main(kind: str, arg: str, kernel: str) -> dict[str, object]:
    placement = CellPlacement(lambda on_exit: Zygote.fork(on_exit, test_hooks=True),
                              cgroups=CgroupTree.open(f"vmmd-drill-{os.getpid()}"),
                              uids=parse_uids("auto"))
    m = Manager(placement=placement)
    out: dict[str, object] = {}
    try:
        for vm_id in ("victim", "bystander"):
            m.create(VmSpec(vm_id, BootSpec(kernel, cmdline="mg=tick ms=10"), memory_mib=16,
                            cell=vm_id))
            m.start(vm_id)
        assert wait(lambda: len(ticks(console(m, "bystander"))) >= 3 and
                    len(ticks(console(m, "victim"))) >= 3), "the guests tick"
        cells = {c.name: c for c in placement.cells()}
        victim, bystander = cells["victim"], cells["bystander"]
        out["pids"] = [victim.pid, bystander.pid]
        before = ticks(console(m, "bystander"))
        target: object = bystander.pid if arg == "@bystander" else arg
        if kind == "syscall":
            target = int(arg)
        assert victim.channel is not None
        try:
            (out["result"],) = victim.channel.call(0, "test_escape", kind, target,
                                                   timeout_s=10)
        except WorkerGone as e:
            out["result"] = f"worker gone: {e}"
        except NativeError as e:
            out["result"] = f"error: {e}"
        # A dead worker's VM crashes; a living one's keeps ticking.
        wait(lambda: m.get("victim").phase.value in ("crashed", "stopped"), 3.0)
        last = max(before)
        wait(lambda: max(ticks(console(m, "bystander"))) >= last + 5)
        after = ticks(console(m, "bystander"))
        for vm_id in ("victim", "bystander"):
            info = m.get(vm_id)
            out[vm_id] = {"phase": info.phase.value,
                          "stop": info.stop.message if info.stop else None}
        out["bystander_ticks"] = [before[-1], after[-1]]
        # A dead worker's cell gives back its cgroup, root and uid at once,
        # while its crashed VM stays listed until deleted.
        out["victim_reclaimed"] = wait(lambda: victim.reclaimed and (
            victim.cgroup is None or not any(os.path.exists(d) for d in victim.cgroup.dirs)), 5.0)
        out["bystander_in_order"] = after == list(range(after[0], after[0] + len(after)))
    finally:
        m.shutdown(timeout_s=1)
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
