"""(blk) virtio-blk throughput with the guest side held constant: the micro-guest's
`mg=blk op=multi` (a polling driver, 1 vCPU) against the same raw image in both VMMs.

Time is the guest's own: TSC ticks from the first post to the last completion, turned into
seconds with the TSC rate the micro-guest measures (`mg=tick`'s `MG-TSC khz=`, kvmclock).
Host CPU is the VMM process's utime+stime (getrusage of the reaped child), minus that of an
n=0 run of the same VMM (start-up, set-up, tear-down), divided by the number of requests.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass
from typing import Any

from bench import proc, targets
from bench.measures import MICRO_TIMEOUT, measure
from bench.targets import micro_guest

MULTI = re.compile(rb"MG-BLK-MULTI n=(\d+) ok=(\d+) errors=(\d+) tsc=(\d+)")
TSC = re.compile(rb"MG-TSC khz=(\d+) src=(\w+)")
# Every line: qsize=256 indirect=1 (one descriptor a request in the ring: qd up to 256).
RING = "qsize=256 indirect=1"


@dataclass(frozen=True)
class Line:
    key: str
    what: str
    words: str  # op=multi words besides n=
    n: int
    quick_n: int
    bs: int


LINES = (
    Line("rand_read_4k", "4 KiB random reads, QD32", "qd=32 rw=read", 5000, 2000, 4096),
    Line("rand_write_4k", "4 KiB random writes, QD32", "qd=32 rw=write", 5000, 2000, 4096),
    Line("seq_read_1m", "1 MiB sequential reads, QD8", "qd=8 rw=read seq=1", 600, 200, 1 << 20),
)


def _cmdline(words: str, n: int) -> str:
    return f"mg=blk op=multi n={n} {words} {RING}"


def tsc_khz() -> tuple[int, str]:
    """The TSC rate the micro-guest finds under vmmd (the same host TSC under QEMU)."""
    r = proc.run_ok(micro_guest("mg=tick ms=1 n=1").vmmd(), MICRO_TIMEOUT, b"MG-DONE")
    m = TSC.search(r.output)
    if m is None:
        raise r.fail("no MG-TSC line")
    return int(m.group(1)), m.group(2).decode()


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run(argv: list[str], n: int) -> tuple[int, float]:
    """One run: (TSC ticks of the guest's loop, CPU seconds of the VMM process)."""
    c0 = _children_cpu()
    r = proc.run_ok(argv, MICRO_TIMEOUT, b"MG-DONE")
    cpu = _children_cpu() - c0
    m = MULTI.search(r.output)
    if m is None or int(m.group(2)) != n or int(m.group(3)) != 0:
        raise r.fail(f"MG-BLK-MULTI missing or not {n} ok / 0 errors")
    return int(m.group(4)), cpu


def throughput(reps: int, cpu: str, quick: bool) -> list[dict[str, Any]]:
    """IOPS, MB/s and host CPU µs per request for every LINE, vmmd and QEMU alternating."""
    image = targets.blk_image()
    khz, src = tsc_khz()
    base = micro_guest(_cmdline("qd=1 rw=read", 0), image)
    series: dict[str, dict[str, dict[str, list[float]]]] = {
        ln.key: {k: {"vmmd": [], "qemu": []} for k in ("iops", "mbs", "cpu")} for ln in LINES}
    for _ in range(reps):
        for vmm, argv_of in (("vmmd", lambda g: g.vmmd()), ("qemu", lambda g: g.qemu(cpu))):
            idle_cpu = _run(argv_of(base), 0)[1]
            for ln in LINES:
                n = ln.quick_n if quick else ln.n
                ticks, used = _run(argv_of(micro_guest(_cmdline(ln.words, n), image)), n)
                secs = ticks / (khz * 1e3)
                s = series[ln.key]
                s["iops"][vmm].append(n / secs)
                s["mbs"][vmm].append(n * ln.bs / secs / 1e6)
                s["cpu"][vmm].append(max(0.0, used - idle_cpu) / n * 1e6)
    out = []
    for ln in LINES:
        s = series[ln.key]
        out += [
            measure(f"blk.{ln.key}.iops", f"blk {ln.what}: IOPS (higher better)", "IOPS",
                    s["iops"]),
            measure(f"blk.{ln.key}.mbs", f"blk {ln.what}: throughput (higher better)", "MB/s",
                    s["mbs"]),
            measure(f"blk.{ln.key}.cpu", f"blk {ln.what}: VMM host CPU per request "
                    "(utime+stime − n=0 run)", "µs", s["cpu"]),
        ]
    out[0]["tsc_khz"], out[0]["tsc_source"] = khz, f"guest MG-TSC (mg=tick under vmmd, {src})"
    return out


def commands(cpu: str) -> dict[str, str]:
    import shlex
    g = micro_guest(_cmdline(LINES[0].words, LINES[0].n), targets.BLK_IMAGE)
    return {"vmmd, blk (4 KiB random reads)": shlex.join(g.vmmd()),
            "QEMU, blk (4 KiB random reads)": shlex.join(g.qemu(cpu)),
            "blk lines (cmdline words)": "; ".join(
                f"{ln.what}: {_cmdline(ln.words, ln.n)}" for ln in LINES)}
