"""(vsock) virtio-vsock throughput and connection set-up, against a Unix socket pair floor.

The guest side is the micro-guest's zero-copy driver (tests/guests/vsock.c, 1 vCPU), the VM
built in this process (shared mode) as the KVM tests do; there is no QEMU column (QEMU's
vsock is vhost-vsock, a different host side).  Time is the host's (perf_counter).

- host -> guest -> host: `mg=vsock-echo`; the host writes N bytes through the listener and
  reads them back (each byte crosses the device twice): MB/s of payload one way.
- guest -> host: `mg=vsock-flood bytes=N` to a host listener at `<uds>_<port>`; from the
  host's accept to the last byte read.
- connection set-up: connect to the listener, `CONNECT <port>\\n`, until `OK` is read.
- floor: the same bytes through a socketpair in this process (a thread echoing), and a
  plain Unix connect + accept + one-byte reply for set-up.
- the invoke round trip, what a function runner feels, through a daemon: from a snapshot of
  `mg=vsock-echo` waiting on its port, RestoreVm(resume) -> CONNECT -> a 64-byte request ->
  its echo -> DeleteVm; one client, then 4 concurrent clients; invocations per second per
  host core; in the daemon's shared mode and in cells.  Goal (issue 13): median <= 15 ms,
  p90 <= 25 ms.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import targets
from bench.daemon import console_until, served
from bench.measures import measure
from bench.proc import RunError
from tests.framework.guests import build_microguests
from tests.framework.vsockhost import host_connect, recv_exact
from vmmd.client import Client, pb
from vmmd.spec import BootSpec, VmSpec, VsockSpec
from vmmd.vm.builder import build_vm
from vmmd.vm.vm import Vm

TIMEOUT = 120.0
PORT = 1234


def _wait(vm: Vm, text: bytes) -> None:
    deadline = time.monotonic() + TIMEOUT
    while text not in vm.console_read(0, 1 << 20)[0]:
        if time.monotonic() > deadline or vm.stop_info is not None:
            raise RunError(f"no {text!r}: {vm.console_read(0, 1 << 20)[0][-500:]!r}")
        time.sleep(0.005)


def _boot(d: Path, words: str, name: str) -> Vm:
    kernel = build_microguests()["64"]
    vm = build_vm(VmSpec(vm_id=name, boot=BootSpec(str(kernel), cmdline=words), memory_mib=64,
                         vsock=VsockSpec(3, str(d / name))))
    vm.start()
    return vm


def _recv_n(s: socket.socket, n: int) -> None:
    try:
        recv_exact(s, n)
    except RuntimeError as e:
        raise RunError(str(e)) from None


def _connect(uds: Path) -> socket.socket:
    try:
        return host_connect(uds, PORT, TIMEOUT)
    except RuntimeError as e:
        raise RunError(str(e)) from None


def _echo_mbs(s: socket.socket, n: int) -> float:
    data = os.urandom(1 << 20) * (n >> 20)
    t0 = time.perf_counter()
    sender = threading.Thread(target=s.sendall, args=(data,))
    sender.start()
    _recv_n(s, len(data))
    sender.join()
    return len(data) / (time.perf_counter() - t0) / 1e6


def _floor_echo_mbs(n: int) -> float:
    a, b = socket.socketpair()

    def echo() -> None:
        while chunk := b.recv(1 << 16):
            b.sendall(chunk)

    t = threading.Thread(target=echo)
    t.start()
    mbs = _echo_mbs(a, n)
    a.close()
    t.join()
    b.close()
    return mbs


def _floor_setup_us(d: Path) -> float:
    path = d / "floor.sock"
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lis.bind(str(path))
    lis.listen(1)
    t0 = time.perf_counter()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(path))
    p, _ = lis.accept()
    p.sendall(b"k")
    c.recv(1)
    us = (time.perf_counter() - t0) * 1e6
    for s in (c, p, lis):
        s.close()
    path.unlink()
    return us


def _flood_mbs(d: Path, n: int, k: int) -> float:
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lis.bind(str(d / f"f{k}_{PORT}"))
    lis.listen(1)
    lis.settimeout(TIMEOUT)
    vm = _boot(d, f"mg=vsock-flood port={PORT} bytes={n}", f"f{k}")
    try:
        peer, _ = lis.accept()
        peer.settimeout(TIMEOUT)
        t0 = time.perf_counter()
        _recv_n(peer, n)
        mbs = n / (time.perf_counter() - t0) / 1e6
        peer.close()
        return mbs
    finally:
        vm.close()
        lis.close()


def throughput(reps: int, quick: bool) -> list[dict[str, Any]]:
    n = (16 if quick else 64) << 20
    echo: dict[str, list[float]] = {"vmmd": [], "floor": []}
    flood: dict[str, list[float]] = {"vmmd": [], "floor": []}
    setup: dict[str, list[float]] = {"vmmd": [], "floor": []}
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-vsock-") as tmp:
        d = Path(tmp)
        vm = _boot(d, f"mg=vsock-echo port={PORT} conns=1", "echo")
        try:
            _wait(vm, b"VSOCK-LISTEN")
            for k in range(reps):
                s = _connect(d / "echo")
                echo["vmmd"].append(_echo_mbs(s, n))
                s.close()
                _wait_closes(vm, k + 1)
                echo["floor"].append(_floor_echo_mbs(n))
                flood["vmmd"].append(_flood_mbs(d, n, k))
                flood["floor"].append(echo["floor"][-1])
            for k in range(reps * 20):
                t0 = time.perf_counter()
                s = _connect(d / "echo")
                setup["vmmd"].append((time.perf_counter() - t0) * 1e6)
                s.close()
                _wait_closes(vm, reps + k + 1)
                setup["floor"].append(_floor_setup_us(d))
        finally:
            vm.close()
    mib = n >> 20
    return [measure("vsock.echo", f"host → guest → host, {mib} MiB echoed (payload one way; "
                    "floor: socketpair echo thread), higher better", "MB/s", echo),
            measure("vsock.flood", f"guest → host, {mib} MiB (floor: socketpair echo), "
                    "higher better", "MB/s", flood),
            measure("vsock.connect", "host connect + CONNECT → OK (floor: Unix connect + "
                    "accept + 1 byte)", "µs", setup)]


def _wait_closes(vm: Vm, count: int) -> None:
    """The guest saw the connection end (its slot is free for the next)."""
    deadline = time.monotonic() + TIMEOUT
    while vm.console_read(0, 1 << 22)[0].count(b"VSOCK-CLOSE") < count:
        if time.monotonic() > deadline:
            raise RunError("the guest never saw the connection close")
        time.sleep(0.002)


REQUEST = bytes(range(64))
INVOKE_GOAL_MS = (15.0, 25.0)  # median, p90


class _Invoker:
    """Restore -> CONNECT -> request -> answer -> delete, against one snapshot; ms."""

    def __init__(self, c: Client, snap: str, socks: Path) -> None:
        self.c, self.snap, self.socks = c, snap, socks
        self._n = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self._n += 1
            n = self._n
        vm_id, uds = f"inv{n}", self.socks / f"inv{n}.sock"
        t0 = time.perf_counter()
        self.c.restore(self.snap, vm_id, resume=True, overrides=pb.DeviceOverrides(
            vsock=pb.Vsock(guest_cid=1000 + n, uds_path=str(uds))))
        with host_connect(uds, PORT, TIMEOUT) as s:
            s.sendall(REQUEST)
            answer = recv_exact(s, len(REQUEST))
        self.c.delete(vm_id)
        ms = (time.perf_counter() - t0) * 1e3
        if answer != REQUEST:
            raise RunError(f"invoke: the guest answered {answer!r}")
        return ms


def _invoke_series(reps: int, isolation: str) -> tuple[list[float], list[float], float]:
    """(one client, ms; 4 concurrent clients, ms; invocations/s with 4 clients)."""
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-invoke-") as t, \
            served(isolation=isolation) as (c, _):
        socks = Path(t)
        socks.chmod(0o711)  # a cell's user reaches its sockets (docs/vsock.md)
        c.create("src", str(targets.MICRO_KERNEL), cmdline=f"mg=vsock-echo port={PORT}",
                 memory_mib=64, vsock=pb.Vsock(guest_cid=3, uds_path=str(socks / "src.sock")))
        c.start("src")
        console_until(c, "src", b"VSOCK-LISTEN", TIMEOUT)
        c.pause("src")
        snap = str(socks / "snap")
        c.snapshot("src", snap)
        c.delete("src")
        invoke = _Invoker(c, snap, socks)
        invoke()  # warm-up: the snapshot's pages in the page cache
        one = [invoke() for _ in range(reps)]
        with ThreadPoolExecutor(4) as pool:
            t0 = time.perf_counter()
            four = list(pool.map(lambda _: invoke(), range(reps * 4)))
            rate = len(four) / (time.perf_counter() - t0)
    return one, four, rate


def _against_goal(m: dict[str, Any]) -> dict[str, Any]:
    v, (median, p90) = m.get("vmmd", {}), INVOKE_GOAL_MS
    if v.get("n"):
        m.update(goal_median_ms=median, goal_p90_ms=p90, ratio=round(v["median"] / median, 3),
                 p90_ratio=round(v["p90"] / p90, 3))
    return m


def invoke(reps: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cores = os.cpu_count() or 1
    for isolation in ("none", "cells"):
        one, four, rate = _invoke_series(reps, isolation)
        what = (f"invoke round trip, daemon --isolation {isolation}: RestoreVm(resume) → CONNECT "
                "→ 64-byte request → echo → DeleteVm")
        out += [
            _against_goal(measure(f"vsock.invoke.{isolation}", f"{what}, one client (goal: "
                                  "median ≤ 15, p90 ≤ 25; ratio = median / 15)", "ms",
                                  {"vmmd": one})),
            _against_goal(measure(f"vsock.invoke.{isolation}.x4", f"{what}, 4 concurrent "
                                  "clients (ratio = median / 15)", "ms", {"vmmd": four})),
            measure(f"vsock.invoke.{isolation}.rate", f"invocations per second per host core, "
                    f"--isolation {isolation}, 4 concurrent clients ({cores} cores), higher "
                    "better", "1/s/core", {"vmmd": [rate / cores]}),
        ]
    return out


def commands() -> dict[str, str]:
    return {"vsock (in-process, micro-guest)": f"mg=vsock-echo port={PORT} conns=1 / "
                                               f"mg=vsock-flood port={PORT} bytes=N; "
                                               "host side: the listener's CONNECT/OK convention"}
