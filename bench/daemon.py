"""The daemon measures (api, rss, rate): one `vmmd serve` per section, driven through
vmmd.client.Client over its Unix socket.  vmmd only (QEMU has no counterpart daemon).

The daemon runs in its own session, registered with proc so that an interruption kills it;
every VM a measure creates is deleted again.
"""

from __future__ import annotations

import os
import shlex
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import proc, stats, targets
from bench.measures import MICRO_TIMEOUT, READY, measure
from bench.targets import MEM_MIB
from tests.framework.daemon import DaemonError, serve_argv, spawn
from vmmd.client import Client, ClientError


@contextmanager
def served(max_vms: int = 100, memory_budget: str = "auto",
           isolation: str = "none") -> Iterator[tuple[Client, int]]:
    """A fresh daemon on a temporary socket (the harness's launcher): (its client, its pid).
    memory_budget: the density bench overcommits on purpose (clones share their snapshot's
    pages until they write them), so it passes "unlimited".  isolation: these sections
    measure the VMM itself, comparable run to run (--isolation none); the cells section
    (bench/cells.py) measures what cells add, against it."""
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-") as tmp:
        d = spawn(Path(tmp) / "s.sock", "--max-vms", str(max_vms), "--memory-budget",
                  memory_budget, "--isolation", isolation, new_session=True)
        with proc.tracked(d.proc):
            try:
                d.wait_ready()
            except DaemonError as e:
                raise proc.RunError(str(e)) from None
            with d.client() as client:
                yield client, d.pid


def _first_output(client: Client, vm_id: str, timeout: float,
                  until: bytes | None = None) -> tuple[float, float, bytes]:
    """StartVm with the console stream already open: (seconds StartVm took to return,
    seconds from StartVm to the first console bytes, or to `until` when given; the output)."""
    stream = client.console(vm_id, from_start=True)
    timer = threading.Timer(timeout, stream.cancel)
    timer.start()
    out = b""
    try:
        t0 = time.perf_counter()
        client.start(vm_id)
        t_rpc = time.perf_counter() - t0
        for chunk in stream:
            out += chunk
            if until is None or until in out and b"\n" in out[out.index(until):]:
                return t_rpc, time.perf_counter() - t0, out
    except ClientError as e:
        raise proc.RunError(f"{vm_id}: {e}") from None
    finally:
        timer.cancel()
        stream.cancel()
    raise proc.RunError(f"{vm_id}: no console output within {timeout:.0f} s: {out[-300:]!r}")


def _create_micro(client: Client, vm_id: str, cmdline: str) -> None:
    client.create(vm_id, str(targets.MICRO_KERNEL), cmdline=cmdline, vcpus=1,
                  memory_mib=MEM_MIB)


def console_until(client: Client, vm_id: str, marker: bytes, timeout: float) -> None:
    """Read the VM's console (from the start) until `marker` shows, or fail after timeout."""
    stream = client.console(vm_id)
    timer = threading.Timer(timeout, stream.cancel)
    timer.start()
    seen = b""
    try:
        for chunk in stream:
            seen += chunk
            if marker in seen:
                return
    finally:
        timer.cancel()
        stream.cancel()
    raise proc.RunError(f"{vm_id}: no {marker!r} on the console within {timeout:.0f} s: "
                        f"{seen[-300:]!r}")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _held(pid: int, ram_bytes: int) -> tuple[int, int]:
    """What a deleted VM must give back, as counts to compare with before it: the
    daemon's open fds, and its read-write mappings of exactly the guest's RAM size
    (the C core maps RAM as one such region; its teardown unmaps it after closing
    KVM's fds)."""
    with open(f"/proc/{pid}/maps") as f:
        ram = sum(1 for line in f if _mapping_size(line) == ram_bytes and " rw" in line)
    return _fd_count(pid), ram


def _mapping_size(line: str) -> int:
    start, end = line.split(" ", 1)[0].split("-")
    return int(end, 16) - int(start, 16)


def _delete(client: Client, vm_id: str) -> None:
    try:
        client.delete(vm_id)
    except ClientError:
        pass


def api(reps: int, pvm: bool | None, linux_timeout: float) -> list[dict[str, Any]]:
    """StartVm -> first console bytes of mg=print (stream opened before StartVm); and with
    `pvm` not None, StartVm -> Linux READY once."""
    series: dict[str, list[float]] = {"noop": [], "create": [], "start": [], "first": [],
                                      "guest": [], "beyond": [], "delete": [], "released": [],
                                      "create_hot": []}
    out = []
    with served() as (client, pid):
        for _ in range(reps):
            vm_id = "api"  # the same id every time: a deleted VM's id is free at once
            held = _held(pid, MEM_MIB << 20)
            t0 = time.perf_counter()
            _create_micro(client, vm_id, "mg=print")
            series["create"].append((time.perf_counter() - t0) * 1e3)
            t_rpc, t_first, _ = _first_output(client, vm_id, MICRO_TIMEOUT)
            series["start"].append(t_rpc * 1e3)
            series["first"].append(t_first * 1e3)
            # The guest's own start-up, by the core's clock, for this very VM: the rest of
            # StartVm -> first output is the VMM's (request, vCPU start, console to client).
            guest = client.get(vm_id).counters.guest_startup_us / 1e3
            series["guest"].append(guest)
            series["beyond"].append(t_first * 1e3 - guest)
            t0 = time.perf_counter()
            client.delete(vm_id)
            series["delete"].append((time.perf_counter() - t0) * 1e3)
            while (any(now > then for now, then in zip(_held(pid, MEM_MIB << 20), held))
                   and time.perf_counter() - t0 < 1.0):
                time.sleep(0.0005)
            series["released"].append((time.perf_counter() - t0) * 1e3)
        # The gRPC floor, its own loop (a call just before CreateVm would warm its path):
        # after a pause as long as the fd poll above takes, ListVms on the empty daemon.
        for _ in range(reps):
            time.sleep(statistics.median(series["released"]) / 1e3)
            t0 = time.perf_counter()
            client.list()
            series["noop"].append((time.perf_counter() - t0) * 1e3)
        # CreateVm again, each right after the last DeleteVm returned: this machine (a
        # nested VM) runs code slower after even a few ms idle; the difference shows it.
        for _ in range(reps):
            t0 = time.perf_counter()
            _create_micro(client, "hot", "mg=print")
            series["create_hot"].append((time.perf_counter() - t0) * 1e3)
            client.delete("hot")
        if pvm is not None and targets.LINUX_KERNEL.exists() and targets.LINUX_INITRD.exists():
            out.append(_api_linux(client, pvm, linux_timeout))
    targets.build_floor()
    pause = statistics.median(series["released"])
    machine = [targets.run_floor_machine(10, pause) for _ in range(5)]
    kvm = sorted(machine)[len(machine) // 2]
    floors = {"create": [n + kvm for n in series["noop"]], "delete": series["noop"]}
    whats = {"noop": "ListVms RPC on an empty daemon, after the same pause as CreateVm: the gRPC "
                     "round trip, the floor of every call",
             "create": "CreateVm RPC (micro-guest, 128 MiB); floor: api.noop + api.kvm_machine",
             "create_hot": "CreateVm RPC, each right after the last DeleteVm returned (no pause: "
                           "the machine not idle in between)",
             "start": "StartVm RPC returns",
             "first": "StartVm → first console bytes via StreamConsole (mg=print)",
             "delete": "DeleteVm RPC returns (the VM stopped; the next CreateVm reuses its id); "
                       "floor: api.noop",
             "released": "DeleteVm call → every fd of the VM closed in the daemon and its "
                         "RAM unmapped (polled every 0.5 ms, 1 s at most)",
             "guest": "the guest's own start-up in those VMs: vCPU 0's first KVM_RUN → first "
                      "console byte (GetVm counters.guest_startup_us, the core's clock)",
             "beyond": "StartVm → first console bytes via StreamConsole, beyond the guest's own "
                       "start-up (api.first − api.guest, per VM): the VMM's share"}
    goals: dict[str, dict[str, Any]] = {"create": {"median": 2.0}, "delete": {"median": 2.0},
                                          "released": {"median": 100.0, "p90": 100.0},
                                          "beyond": {"median": 2.0}}
    return [*(stats.goal(measure(f"api.{k}", f"daemon: {whats[k]}", "ms",
                                 {"vmmd": v, **({"floor": floors[k]} if k in floors else {})}),
                         **goals.get(k, {}))
              for k, v in series.items()),
            measure("api.kvm_machine", "KVM's ioctls for one such VM alone (floor.c machine: "
                    "VM, RAM slot, irqchip, PIT, vCPU with CPUID and registers; mean of 10, "
                    "each after the same pause as CreateVm)", "ms",
                    {"floor": machine}),
            *out]


def _api_linux(client: Client, pvm: bool, timeout: float) -> dict[str, Any]:
    g = targets.linux_guest(pvm)
    client.create("api-linux", str(g.kernel), initrd=str(g.initrd), cmdline=g.cmdline, vcpus=1,
                  memory_mib=MEM_MIB)
    try:
        _, t, out = _first_output(client, "api-linux", timeout, b"VMMD-GUEST-READY")
    finally:
        _delete(client, "api-linux")
    if READY.search(out) is None:
        raise proc.RunError("api: Linux READY line malformed")
    return measure("api.linux_ready", "daemon: StartVm → Linux READY line via StreamConsole",
                   "s", {"vmmd": [t]})


def _smaps_kib(pid: int, guest_kib: int, fields: tuple[str, ...] = ("Rss:",),
               anon_only: bool = True) -> tuple[int, int]:
    """(the fields summed over every mapping except guest RAM, over the guest RAM
    mappings), KiB; fields Rss by default.  Guest RAM: the mappings whose size is
    exactly the guest's memory, anonymous ones only unless anon_only is False (a
    restored VM's RAM is its snapshot file mapped private)."""
    other = guest = 0
    size = 0
    anon = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            anon = len(head) == 5 or head[5].startswith("[anon")
        elif head[0] == "Size:":
            size = int(head[1])
        elif head[0] in fields:
            if (anon or not anon_only) and size == guest_kib:
                guest += int(head[1])
            else:
                other += int(head[1])
    return other, guest


def rss(counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """Daemon RSS per extra idle VM (mg=tick ms=1000, 128 MiB), VMs added to one daemon up to
    each K in `counts`; non-guest RSS and guest-RAM RSS apart."""
    out = []
    with served() as (client, pid):
        time.sleep(0.5)
        base, _ = _smaps_kib(pid, MEM_MIB * 1024)
        made = 0
        try:
            for k in counts:
                while made < k:
                    _create_micro(client, f"rss-{made}", "mg=tick ms=1000")
                    _first_output(client, f"rss-{made}", MICRO_TIMEOUT)
                    made += 1
                time.sleep(0.5)
                other, guest = _smaps_kib(pid, MEM_MIB * 1024)
                out.append(measure(f"rss.k{k}.other", f"daemon RSS outside guest RAM per extra "
                                   f"idle VM, K={k} ((rss(K) − rss(0)) / K; rss(0) = "
                                   f"{base / 1024:.1f} MiB)", "MiB",
                                   {"vmmd": [(other - base) / k / 1024]}))
                out.append(measure(f"rss.k{k}.guest", f"guest-RAM RSS per idle VM, K={k} "
                                   "(mg=tick)", "MiB", {"vmmd": [guest / k / 1024]}))
        finally:
            for i in range(made):
                _delete(client, f"rss-{i}")
    return out


def _one(client: Client, vm_id: str) -> None:
    _create_micro(client, vm_id, "mg=print")
    _first_output(client, vm_id, MICRO_TIMEOUT)


def rate(k: int, threads: int) -> list[dict[str, Any]]:
    """CreateVm → StartVm → first output for K micro-guests, one after another and then from
    `threads` client threads (one shared channel); VMs per second.  Deleted after each pass."""
    out = []
    with served() as (client, _):
        for label, workers in (("sequential", 1), (f"{threads} client threads", threads)):
            ids = [f"rate-{workers}-{i}" for i in range(k)]
            t0 = time.perf_counter()
            try:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(lambda v: _one(client, v), ids))
                secs = time.perf_counter() - t0
            finally:
                for v in ids:
                    _delete(client, v)
            out.append(measure(f"rate.{workers}", f"daemon: CreateVm → StartVm → first output, "
                               f"K={k}, {label} (higher better)", "VMs/s",
                               {"vmmd": [k / secs]}))
    return out


def commands() -> dict[str, str]:
    return {"vmmd daemon (api, rss, rate)": shlex.join(serve_argv("<tmp>/s.sock")),
            "daemon guests": "micro-guest, 1 vCPU, 128 MiB: api/rate mg=print, rss mg=tick "
                             "ms=1000"}
