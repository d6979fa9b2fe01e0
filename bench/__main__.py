"""`python -m bench`: run the benchmarks, write build/bench/results.{json,md}, print the table.

  --reps N         repetitions of every measure (default: a and in-process 20, b 5, c 3,
                   blk 3, net 3, vsock 3, api 50, rss 1, rate 1, snap 30, cells 30)
  --only a,b,c     measures to run (split = the in-process vmmd split; blk = virtio-blk
                   throughput; net = virtio-net throughput and round trip; vsock =
                   virtio-vsock throughput, connection set-up and the invoke round trip
                   (10x the reps); api = daemon StartVm -> console; rss = daemon RSS per idle VM; rate = create+start rate;
                   snap = restore latency, clone density, snapshot cost; cells = what
                   cells cost against --isolation none; idle = what idle clones cost (100
                   micro-guests, 50 Linux); default all)
  --skip-linux     leave out (c), the Linux boots (slow on a PVM host: kernel code is emulated)
  --quick          fewer repetitions (a 5, b 2, c 1) and fewer exits; also BENCH_QUICK=1
  --linux-timeout  hard limit per Linux boot, seconds (default 400)

Run it alone: every other load on the machine shows up in the numbers.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import (
    blk,
    cells,
    daemon,
    idle,
    measures,
    net,
    proc,
    report,
    snapshot,
    targets,
    vsock,
)
from tests.framework import is_pvm_host
from tests.framework.guests import build_microguests

SECTIONS = ("a", "b", "c", "split", "blk", "net", "vsock", "api", "rss", "rate", "snap",
            "cells", "idle")
DEFAULT_REPS = {"a": 20, "b": 5, "c": 3, "split": 20, "blk": 3, "net": 3, "vsock": 3, "api": 50,
                "rss": 1, "rate": 1, "snap": 30, "cells": 30, "idle": 1}
QUICK_REPS = {"a": 5, "b": 2, "c": 1, "split": 5, "blk": 1, "net": 1, "vsock": 1, "api": 10,
              "rss": 1, "rate": 1, "snap": 10, "cells": 10, "idle": 1}
EXITS, QUICK_EXITS = 200_000, 50_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="vmmd vs QEMU microvm")
    p.add_argument("--reps", type=int, help="repetitions of every measure")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma list of " + ",".join(SECTIONS))
    p.add_argument("--skip-linux", action="store_true", help="leave out (c), the Linux boots")
    p.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1")
    p.add_argument("--linux-timeout", type=float, default=400.0)
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = set(args.only) - set(SECTIONS)
    if bad:
        p.error(f"--only: unknown {', '.join(sorted(bad))} (choose from {', '.join(SECTIONS)})")
    if args.skip_linux and "c" in args.only:
        args.only.remove("c")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM ends us through SystemExit, so the atexit hook kills the VMMs we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reps = {s: args.reps or (QUICK_REPS if args.quick else DEFAULT_REPS)[s] for s in SECTIONS}
    exits = QUICK_EXITS if args.quick else EXITS
    pvm = is_pvm_host()
    machine = targets.machine_info()
    if machine["loadavg_at_start"] > 0.7:
        print(f"bench: warning: load average {machine['loadavg_at_start']:.2f}: "
              "the machine is not idle, numbers will suffer", file=sys.stderr)
    build_microguests()
    targets.build_floor()
    cpu = targets.qemu_cpu()  # also the warm-up run of QEMU
    proc.run_ok(targets.micro_guest("mg=print").vmmd(), 60, b"MG-DONE")  # warm-up of vmmd
    missing = [f for f in (targets.LINUX_KERNEL, targets.LINUX_INITRD) if not f.exists()]
    if "c" in args.only and missing:
        print(f"bench: {missing[0]} missing (make guest); skipping (c)", file=sys.stderr)
        args.only.remove("c")

    linux_pvm = None if args.skip_linux else pvm  # None: no Linux guests in (snap)
    plan: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "a": lambda: measures.startup(reps["a"], cpu),
        "b": lambda: measures.exit_cost(reps["b"], cpu, exits),
        "c": lambda: measures.linux(reps["c"], cpu, pvm, args.linux_timeout),
        "split": lambda: measures.in_process(reps["split"]),
        "blk": lambda: blk.throughput(reps["blk"], cpu, args.quick),
        "net": lambda: net.throughput(reps["net"], cpu, args.quick),
        "vsock": lambda: (vsock.throughput(reps["vsock"], args.quick)
                          + vsock.invoke(10 * reps["vsock"])),
        "api": lambda: daemon.api(reps["api"], None if args.skip_linux else pvm,
                                  args.linux_timeout),
        "rss": lambda: daemon.rss((1, 10, 50)),
        "rate": lambda: daemon.rate(20, 4),
        "cells": lambda: cells.measures(reps["cells"]),
        "idle": lambda: idle.micro() + ([] if args.skip_linux else idle.linux(pvm)),
        "snap": lambda: (snapshot.restore_latency(reps["snap"], linux_pvm) + snapshot.density()
                         + snapshot.creation(linux_pvm)),
    }
    results: list[dict[str, Any]] = []
    for section in (s for s in SECTIONS if s in args.only):
        t0 = time.monotonic()
        print(f"bench: ({section}) {reps[section]} repetitions ...", file=sys.stderr, flush=True)
        try:
            results += plan[section]()
        except proc.RunError as e:
            results.append({"id": section, "error": str(e)})
            print(f"bench: ({section}) FAILED: {e}", file=sys.stderr)
        print(f"bench: ({section}) done in {time.monotonic() - t0:.0f} s", file=sys.stderr)

    micro, linux = targets.micro_guest("mg=print"), targets.linux_guest(pvm)
    doc = {
        "machine": machine, "qemu_cpu": cpu, "exits": exits, "reps": reps,
        "commands": {
            "vmmd, micro-guest (a)": shlex.join(micro.vmmd()),
            "QEMU, micro-guest (a)": shlex.join(micro.qemu(cpu)),
            "micro-guest cmdline (b)": f"mg=exits n={{0,{exits}}} port={targets.EXIT_PORT:#x}",
            "vmmd, Linux (c)": shlex.join(linux.vmmd()),
            "QEMU, Linux (c)": shlex.join(linux.qemu(cpu)),
            "C floor (b)": f"{targets.FLOOR_BIN} {exits} {targets.EXIT_PORT:#x} {{pio,mmio}}",
            "C floor with irqchip (b)": (f"{targets.FLOOR_BIN} {exits} {targets.EXIT_PORT:#x} "
                                         "{pio,mmio} irqchip"),
            **blk.commands(cpu), **net.commands(cpu), **vsock.commands(), **daemon.commands(),
            **snapshot.commands(), **cells.commands(), **idle.commands(),
        },
        "results": results,
    }
    print(report.write(doc, targets.OUT))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
