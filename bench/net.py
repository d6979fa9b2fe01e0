"""(net) virtio-net throughput and frame round trip with the guest side held constant: the
micro-guest's `mg=net` polling driver (1 vCPU) on a tap in a network namespace of the bench's
own, vmmd `--net` against QEMU `-device virtio-net-device` on the same tap.

- TX (guest -> tap): `op=txflood`, frames of 60 and 1514 bytes as fast as the guest can post
  them; time is the guest's own (TSC ticks from the first post to the last completion).
- RX (tap -> guest): `op=rxflood`; the host sends frames paced at ~64 k/s from an AF_PACKET
  socket (more than either VMM delivers here, so the guest is never starved; the tap's queue
  absorbs bursts and drops the excess); time is the guest's, from its first frame to its last.
- Round trip: `op=echo`; the host sends one 60-byte frame and waits for it to come back, over
  and over; time is the host's (perf_counter around send -> receive).
- Host CPU per frame (TX): the VMM process's utime+stime minus that of an n=0 run.
"""

from __future__ import annotations

import re
import resource
import select
import shlex
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from bench import proc
from bench.measures import measure
from bench.targets import MICRO_KERNEL, Guest
from tests.framework.netns import NetNs

MAC = "02:00:00:00:00:01"
HOST_MAC = bytes.fromhex("020000000099")
TAP = "tap0"
TIMEOUT = 120.0
TX = re.compile(rb"MG-NET-TX dev=0 n=(\d+) bytes=(\d+) tsc=(\d+) khz=(\d+)")
RX = re.compile(rb"MG-NET-RX dev=0 n=(\d+) bytes=(\d+) timeout=(\d) tsc=(\d+) khz=(\d+)")
SIZES = (60, 1514)
PACE_BURST, PACE_S = 64, 0.001  # host sender: 64 frames a millisecond at most


@dataclass(frozen=True)
class Counts:
    tx_n: int = 20000
    rx_n: int = 20000
    rtt_n: int = 300


QUICK = Counts(5000, 5000, 100)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@contextmanager
def _namespace() -> Iterator[NetNs]:
    with NetNs() as ns:
        ns.add_tap(TAP)
        ns.ip("link", "set", TAP, "txqueuelen", "10000")
        yield ns


def _argv(ns: NetNs, vmm: str, guest: Guest, cpu: str) -> list[str]:
    g = replace(guest, net=(TAP, MAC))
    return ns.exec_argv(*(g.vmmd() if vmm == "vmmd" else g.qemu(cpu)))


def _guest(words: str) -> Guest:
    return Guest(MICRO_KERNEL, f"mg=net {words}")


def _frame(size: int, dst: bytes) -> bytes:
    return dst + HOST_MAC + b"\x88\xb5" + bytes(size - 14)


def _tx(ns: NetNs, vmm: str, cpu: str, n: int, size: int, idle_cpu: float
        ) -> tuple[float, float, float]:
    """(frames/s, MB/s, host CPU µs a frame) of one txflood run."""
    c0 = _children_cpu()
    r = proc.run_ok(_argv(ns, vmm, _guest(f"op=txflood n={n} size={size}"), cpu), TIMEOUT,
                    b"MG-DONE")
    used = _children_cpu() - c0
    m = TX.search(r.output)
    if m is None or int(m.group(1)) != n:
        raise r.fail(f"no MG-NET-TX line for {n} frames")
    secs = int(m.group(3)) / (int(m.group(4)) * 1e3)
    return n / secs, int(m.group(2)) / secs / 1e6, max(0.0, used - idle_cpu) / n * 1e6


def _paced_sender(sock: socket.socket, frame: bytes, stop: threading.Event) -> None:
    while not stop.is_set():
        for _ in range(PACE_BURST):
            try:
                sock.send(frame)
            except OSError:
                pass
        time.sleep(PACE_S)


def _rx(ns: NetNs, vmm: str, cpu: str, n: int, size: int) -> tuple[float, float]:
    """(frames/s, MB/s) the guest received in one rxflood run."""
    sock = ns.packet_socket(TAP)
    stop = threading.Event()
    sender = threading.Thread(target=_paced_sender,
                              args=(sock, _frame(size, bytes.fromhex(MAC.replace(":", ""))), stop))
    try:
        argv = _argv(ns, vmm, _guest(f"op=rxflood n={n} timeout_ms=5000"), cpu)
        sender.start()
        r = proc.run_ok(argv, TIMEOUT, b"MG-DONE")
    finally:
        stop.set()
        if sender.is_alive():
            sender.join()
        sock.close()
    m = RX.search(r.output)
    if m is None or int(m.group(1)) != n:
        raise r.fail(f"no MG-NET-RX line for {n} frames")
    secs = int(m.group(4)) / (int(m.group(5)) * 1e3)
    return n / secs, int(m.group(2)) / secs / 1e6


def _rtt(ns: NetNs, vmm: str, cpu: str, n: int) -> list[float]:
    """Round trips (µs) of n 60-byte frames echoed by the guest, one at a time."""
    sock = ns.packet_socket(TAP)
    mac = bytes.fromhex(MAC.replace(":", ""))
    frame = _frame(60, mac)
    argv = _argv(ns, vmm, _guest(f"op=echo n={n} timeout_ms=10000"), cpu)
    live = proc.start(argv)
    rtts: list[float] = []
    try:
        proc.wait_for(live, b"MG-NET-READY", TIMEOUT)
        for _ in range(n):
            t0 = time.perf_counter()
            sock.send(frame)
            while True:
                if not select.select([sock], [], [], 5)[0]:
                    raise proc.RunError(f"no echo after {len(rtts)} frames: {shlex.join(argv)}")
                f = sock.recv(65536)
                if f[6:12] == mac and f[12:14] == b"\x88\xb5":
                    break
            rtts.append((time.perf_counter() - t0) * 1e6)
        proc.finish(live, TIMEOUT, b"MG-DONE")
    finally:
        proc.stop(live)
        sock.close()
    return rtts


def throughput(reps: int, cpu: str, quick: bool) -> list[dict[str, Any]]:
    c = QUICK if quick else Counts()
    keys = [f"tx{s}" for s in SIZES] + [f"rx{s}" for s in SIZES]
    fps = {k: {"vmmd": [], "qemu": []} for k in keys}
    mbs = {k: {"vmmd": [], "qemu": []} for k in keys}
    cpu_us = {s: {"vmmd": [], "qemu": []} for s in SIZES}
    rtt: dict[str, list[float]] = {"vmmd": [], "qemu": []}
    rtt_p90: dict[str, list[float]] = {"vmmd": [], "qemu": []}
    with _namespace() as ns:
        for _ in range(reps):
            for vmm in ("vmmd", "qemu"):
                c0 = _children_cpu()
                proc.run_ok(_argv(ns, vmm, _guest("op=txflood n=0"), cpu), TIMEOUT, b"MG-DONE")
                idle = _children_cpu() - c0
                for s in SIZES:
                    f, m, u = _tx(ns, vmm, cpu, c.tx_n, s, idle)
                    fps[f"tx{s}"][vmm].append(f)
                    mbs[f"tx{s}"][vmm].append(m)
                    cpu_us[s][vmm].append(u)
                    f, m = _rx(ns, vmm, cpu, c.rx_n, s)
                    fps[f"rx{s}"][vmm].append(f)
                    mbs[f"rx{s}"][vmm].append(m)
                samples = _rtt(ns, vmm, cpu, c.rtt_n)
                rtt[vmm].append(statistics.median(samples))
                rtt_p90[vmm].append(statistics.quantiles(samples, n=10)[-1])
    out = []
    for s in SIZES:
        out += [
            measure(f"net.tx{s}.fps", f"net TX guest→tap, {s}-byte frames (higher better)",
                    "frames/s", fps[f"tx{s}"]),
            measure(f"net.tx{s}.mbs", f"net TX guest→tap, {s}-byte frames (higher better)",
                    "MB/s", mbs[f"tx{s}"]),
            measure(f"net.tx{s}.cpu", f"net TX {s}-byte frames: VMM host CPU per frame "
                    "(utime+stime − n=0 run)", "µs", cpu_us[s]),
        ]
    for s in SIZES:
        out += [
            measure(f"net.rx{s}.fps", f"net RX tap→guest, {s}-byte frames (higher better)",
                    "frames/s", fps[f"rx{s}"]),
            measure(f"net.rx{s}.mbs", f"net RX tap→guest, {s}-byte frames (higher better)",
                    "MB/s", mbs[f"rx{s}"]),
        ]
    out += [measure("net.rtt.median", "net frame round trip host→guest→host, 60 bytes, median "
                    f"of {c.rtt_n} (lower better)", "µs", rtt),
            measure("net.rtt.p90", f"net frame round trip, p90 of {c.rtt_n} (lower better)",
                    "µs", rtt_p90)]
    return out


def commands(cpu: str) -> dict[str, str]:
    ns = NetNs()
    g = _guest("op=txflood n=20000 size=1514")
    return {"vmmd, net (TX 1514)": shlex.join(_argv(ns, "vmmd", g, cpu)),
            "QEMU, net (TX 1514)": shlex.join(_argv(ns, "qemu", g, cpu)),
            "net host side": f"tap {TAP} in a fresh netns (txqueuelen 10000); RX sender paced "
                             f"{PACE_BURST} frames / {PACE_S * 1e3:.0f} ms on AF_PACKET"}

