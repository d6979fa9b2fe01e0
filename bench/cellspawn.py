"""Cell spawn times (`python -m bench.cellspawn REPS SPARES`): in a fresh,
single-threaded process, the daemon's cell machinery (zygote, jail,
seccomp, cgroups) makes REPS new cells one after another; each is timed
from the request to the worker's first answer, jailed and in its cgroup.
SPARES 0: every cell is spawned on the spot; else cells come from the
spare workers the daemon keeps (refilled between requests).  Prints a JSON
list of milliseconds."""

from __future__ import annotations

import json
import os
import sys
import time

from vmmd.cell.cells import CellPlacement
from vmmd.cell.cgroup import CgroupTree
from vmmd.cell.zygote import Zygote
from vmmd.cli.serve import parse_uids
from vmmd.spec import CellLimits


def main(reps: int, spares: int) -> list[float]:
    if os.environ.get("VMMD_SPAWN_LOG"):  # each spawn's stages, to stderr
        from vmmd.log import configure
        configure("console")
    placement = CellPlacement(Zygote.fork, cgroups=CgroupTree.open(f"vmmd-bench-{os.getpid()}"),
                              uids=parse_uids("auto"), spares=spares)
    times = []
    try:
        for i in range(reps + 2):
            t0 = time.perf_counter()
            lease = placement.acquire("", CellLimits(), f"s{i}", 16 << 20)
            t = (time.perf_counter() - t0) * 1e3
            lease.release()
            if i >= 2:  # the first two warm the zygote's page cache and allocator
                times.append(t)
            time.sleep(0.1)  # the teardown and the spares' refill, off the timed path
    finally:
        placement.close()
    return times


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
