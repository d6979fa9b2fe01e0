"""(snap) Snapshots through the daemon: restore latency, clone density, snapshot cost.
vmmd only: QEMU's counterpart (migration to a file, `-incoming`) is a process start, not a
call; the host floor (KVM_CREATE_VM alone, floor.c) stands beside the figures instead.

- Restore latency, micro-guest (`mg=tick ms=1`: after a resume its next tick comes at once):
  RestoreVm (paused) call -> return, then ResumeVm -> first console bytes on a stream opened
  before the resume; the sum is "RestoreVm -> guest running and printing".  1 vCPU / 128 MiB
  and 2 vCPUs / 512 MiB, each from its own snapshot, 30 restores each.
- Restore latency, Linux (1 vCPU / 128 MiB and 2 / 512, held idle after READY: `vmmd_ready=hold` on
  PVM, `vmmd_init=hold` elsewhere): RestoreVm(resume) call -> return with the VM RUNNING.
  An idle kernel prints nothing on its own, so there is no console byte to wait for.
- Clone density: clones of the 128 MiB micro-guest snapshot, idle (paused), added in batches
  of 50 until a limit; daemon RSS (anonymous and total) per clone, and what the memory of this
  machine would hold at that cost.  Running clones of that guest spin (it polls the TSC), so
  running density is CPU, not memory, here.
- Snapshot creation: time and files of a full snapshot and of a diff after one more second of
  running, micro-guest (dirty tracking on) and Linux.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import proc, stats, targets
from bench.daemon import served
from bench.measures import measure
from vmmd.client import Client, ClientError
from vmmd.vm.boot.cmdline import build_cmdline

TIMEOUT = 60.0
LINUX_TIMEOUT = 900.0
DENSITY_BATCH, DENSITY_MAX = 50, 1000
# Issue 14's goals, for 1 vCPU / 128 MiB: RestoreVm (paused), and RestoreVm(resume) -> output.
RESTORE_GOAL: dict[str, Any] = {"median": 3.0, "p90": 5.0}
OUTPUT_GOAL: dict[str, Any] = {"median": 6.0, "p90": 10.0}
NO_GOAL: dict[str, Any] = {}


def _rss_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) of a process, KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    get = lambda k: int(re.search(rf"{k}:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    return get("RssAnon"), get("VmRSS")


def _micro_snapshot(c: Client, d: Path, vcpus: int, mem_mib: int, *, track: bool = False) -> Any:
    vm_id = f"src-{vcpus}-{mem_mib}"
    c.create(vm_id, str(targets.MICRO_KERNEL), cmdline="mg=tick ms=1", vcpus=vcpus,
             memory_mib=mem_mib, track_dirty_pages=track)
    stream = c.console(vm_id)
    c.start(vm_id)
    for chunk in stream:
        if b"MG-TICK" in chunk:
            break
    stream.cancel()
    c.pause(vm_id)
    info = c.snapshot(vm_id, str(d))
    return vm_id, info


def _until_output(stream: Any, t0: float, what: str) -> float:
    """Seconds from t0 to the stream's first console bytes; the stream is cancelled."""
    timer = threading.Timer(TIMEOUT, stream.cancel)
    timer.start()
    try:
        for chunk in stream:
            if chunk:
                return time.perf_counter() - t0
    finally:
        timer.cancel()
        stream.cancel()
    raise proc.RunError(f"{what}: no console output")


def _first_bytes(c: Client, vm_id: str) -> float:
    """ResumeVm -> first console bytes (seconds), the stream opened before."""
    stream = c.console(vm_id, from_start=False)
    t0 = time.perf_counter()
    try:
        c.resume(vm_id)
    except BaseException:
        stream.cancel()
        raise
    return _until_output(stream, t0, f"{vm_id} after resume")


def _restored_output(c: Client, snap: str, vm_id: str) -> float:
    """RestoreVm(resume) call -> the restored guest's first console bytes through a
    StreamConsole opened (from the start of its console) once the call returned, seconds."""
    t0 = time.perf_counter()
    c.restore(snap, vm_id, resume=True)
    return _until_output(c.console(vm_id, from_start=True), t0, f"{vm_id} after RestoreVm")


def _restore_micro(c: Client, snap: str, reps: int) -> tuple[list[float], ...]:
    """(RestoreVm paused, ResumeVm -> first bytes, RestoreVm(resume) alone,
    RestoreVm(resume) -> first bytes), ms."""
    rpc, first, running, output = [], [], [], []
    for i in range(reps):
        t0 = time.perf_counter()
        c.restore(snap, f"r{i}")
        rpc.append((time.perf_counter() - t0) * 1e3)
        first.append(_first_bytes(c, f"r{i}") * 1e3)
        c.delete(f"r{i}")
        t0 = time.perf_counter()
        c.restore(snap, f"q{i}", resume=True)
        running.append((time.perf_counter() - t0) * 1e3)
        c.delete(f"q{i}")
        output.append(_restored_output(c, snap, f"o{i}") * 1e3)
        c.delete(f"o{i}")
    return rpc, first, running, output


def restore_latency(reps: int, pvm: bool | None) -> list[dict[str, Any]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-snap-") as tmp, served() as (c, _):
        for vcpus, mem in ((1, 128), (2, 512)):
            snap = Path(tmp) / f"micro-{vcpus}-{mem}"
            src, _ = _micro_snapshot(c, snap, vcpus, mem)
            c.delete(src)
            rpc, first, running, output = _restore_micro(c, str(snap), reps)
            total = [a + b for a, b in zip(rpc, first)]
            tag = f"{vcpus} vCPU / {mem} MiB"
            small = vcpus == 1  # issue 14's goals are for 1 vCPU / 128 MiB
            out += [
                measure(f"snap.restore.micro{vcpus}.running", f"RestoreVm(resume) call → return, "
                        f"VM RUNNING, micro-guest {tag}", "ms", {"vmmd": running}),
                stats.goal(measure(f"snap.restore.micro{vcpus}.rpc", f"RestoreVm (paused) call "
                                   f"→ return, micro-guest {tag}", "ms", {"vmmd": rpc}),
                           **(RESTORE_GOAL if small else NO_GOAL)),
                stats.goal(measure(f"snap.restore.micro{vcpus}.output", f"RestoreVm(resume) call "
                                   f"→ first console bytes via StreamConsole (opened when the call "
                                   f"returns), micro-guest {tag}", "ms", {"vmmd": output}),
                           **(OUTPUT_GOAL if small else NO_GOAL)),
                measure(f"snap.restore.micro{vcpus}.first", f"ResumeVm → first console bytes, "
                        f"micro-guest {tag}", "ms", {"vmmd": first}),
                measure(f"snap.restore.micro{vcpus}.total", f"RestoreVm → guest running and "
                        f"printing (sum), micro-guest {tag}", "ms", {"vmmd": total}),
            ]
        out.append(_create_vm_floor(reps))
        if pvm is not None:
            out += _restore_linux(c, Path(tmp), reps, pvm)
    return out


def _create_vm_floor(reps: int) -> dict[str, Any]:
    targets.build_floor()
    samples = [targets.run_floor(0)["create_vm_ns"] / 1e6 for _ in range(reps)]
    return measure("snap.kvm_create_vm", "KVM_CREATE_VM ioctl alone (floor.c): the host floor",
                   "ms", {"floor": samples})


def _linux_held(c: Client, vm_id: str, pvm: bool, track: bool = False, vcpus: int = 1,
                mem_mib: int = 128) -> None:
    word = "vmmd_ready=hold" if pvm else "vmmd_init=hold"
    c.create(vm_id, str(targets.LINUX_KERNEL), initrd=str(targets.LINUX_INITRD),
             cmdline=build_cmdline(None, word, pvm_host=pvm), vcpus=vcpus, memory_mib=mem_mib,
             track_dirty_pages=track)
    stream = c.console(vm_id)
    timer = threading.Timer(LINUX_TIMEOUT, stream.cancel)
    timer.start()
    c.start(vm_id)
    seen = b""
    try:
        for chunk in stream:
            seen += chunk
            if b"VMMD-GUEST-READY" in seen:
                return
    finally:
        timer.cancel()
        stream.cancel()
    raise proc.RunError(f"Linux did not reach READY within {LINUX_TIMEOUT:.0f} s")


def _restore_linux(c: Client, tmp: Path, reps: int, pvm: bool) -> list[dict[str, Any]]:
    out = []
    for vcpus, mem in ((1, 128), (2, 512)):
        snap = tmp / f"linux-{vcpus}-{mem}"
        _linux_held(c, "linux", pvm, vcpus=vcpus, mem_mib=mem)
        c.pause("linux")
        c.snapshot("linux", str(snap))
        c.delete("linux")
        rpc, paused = [], []
        for i in range(reps):
            t0 = time.perf_counter()
            c.restore(str(snap), f"p{i}")
            paused.append((time.perf_counter() - t0) * 1e3)
            c.delete(f"p{i}")
            t0 = time.perf_counter()
            vm = c.restore(str(snap), f"l{i}", resume=True)
            rpc.append((time.perf_counter() - t0) * 1e3)
            if vm.state != 2:  # VM_STATE_RUNNING
                raise proc.RunError(f"restored Linux is in state {vm.state}")
            c.delete(f"l{i}")
        tag = f"Linux {vcpus} vCPU / {mem} MiB (idle, held after READY)"
        out += [stats.goal(measure(f"snap.restore.linux{vcpus}.paused", f"RestoreVm (paused) call "
                                   f"→ return, {tag}", "ms", {"vmmd": paused}),
                           **(RESTORE_GOAL if vcpus == 1 else NO_GOAL)),
                measure(f"snap.restore.linux{vcpus}.rpc", f"RestoreVm(resume) call → return, VM "
                        f"RUNNING, {tag}", "ms", {"vmmd": rpc})]
    return out


def density() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-snap-") as tmp, \
            served(max_vms=DENSITY_MAX + 10, memory_budget="unlimited") as (c, pid):
        snap = Path(tmp) / "micro"
        src, _ = _micro_snapshot(c, snap, 1, 128)
        c.delete(src)
        anon0, rss0 = _rss_kib(pid)
        n, error = 0, ""
        t0 = time.perf_counter()
        while n < DENSITY_MAX:
            try:
                c.clone(str(snap), DENSITY_BATCH, f"b{n // DENSITY_BATCH}")
            except ClientError as e:
                error = str(e)
                break
            n += DENSITY_BATCH
        secs = time.perf_counter() - t0
        anon, rss = _rss_kib(pid)
        per_anon, per_rss = (anon - anon0) / max(n, 1) / 1024, (rss - rss0) / max(n, 1) / 1024
        avail = int(re.search(r"MemAvailable:\s+(\d+)",  # type: ignore[union-attr]
                              Path("/proc/meminfo").read_text()).group(1)) / 1024
        m = measure("snap.density", f"clones of a 128 MiB micro-guest snapshot alive in one "
                    f"daemon (paused; the bench stops at {DENSITY_MAX})", "VMs",
                    {"vmmd": [float(n)]})
        m.update(per_clone_rss_anon_mib=round(per_anon, 3), per_clone_rss_mib=round(per_rss, 3),
                 clones_per_second=round(n / secs, 1), mem_available_mib_after=round(avail),
                 projected_by_memory=int(avail / max(per_rss, 1e-3)) + n, stopped_by=error or
                 "the bench's limit")
        return [m, measure("snap.density.rss", "daemon RSS per paused clone (all)", "MiB",
                           {"vmmd": [per_rss]})]


def creation(pvm: bool | None) -> list[dict[str, Any]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-snap-") as tmp, served() as (c, _):
        guests = [("micro", None)] + ([("linux", pvm)] if pvm is not None else [])
        for name, linux_pvm in guests:
            if linux_pvm is None:
                src, full = _micro_snapshot(c, Path(tmp) / f"{name}-full", 1, 128, track=True)
            else:
                src = "linux-c"
                _linux_held(c, src, linux_pvm, track=True)
                c.pause(src)
                full = c.snapshot(src, str(Path(tmp) / f"{name}-full"))
            c.resume(src)
            time.sleep(1.0)
            c.pause(src)
            diff = c.snapshot(src, str(Path(tmp) / f"{name}-diff"), diff=True)
            c.delete(src)
            for kind, s in (("full", full), ("diff", diff)):
                path = Path(s.snapshot_dir) / "memory"
                m = measure(f"snap.create.{name}.{kind}", f"SnapshotVm {kind}, {name} 128 MiB: "
                            "time in the daemon", "ms", {"vmmd": [s.duration_us / 1e3]})
                m.update(pages_written=s.pages_written,
                         memory_file_apparent_mib=round(s.memory_file_bytes / 2**20, 2),
                         memory_file_on_disk_mib=round(os.stat(path).st_blocks * 512 / 2**20, 2),
                         state_file_kib=round(s.state_file_bytes / 1024, 1))
                out.append(m)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def commands() -> dict[str, str]:
    return {"snap guests": "micro-guest mg=tick ms=1 (1 vCPU/128 MiB, 2 vCPUs/512 MiB); Linux "
                           "vmlinux + initramfs, 128 MiB, held after READY"}
