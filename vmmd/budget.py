"""The daemon's memory budget: guest RAM it has promised, against a limit.

Every VM counts its whole RAM (a guest may touch every page; a clone mapped
copy-on-write from a snapshot may copy every page it shares) plus a fixed
overhead (C structures, the console ring, KVM's own per-VM memory).  A
create, restore or clone that would pass the limit is refused before
anything is built, so a host is never promised more than it has.  A leaf:
imports nothing of vmmd but errors.
"""

from __future__ import annotations

import threading

from vmmd.errors import InvalidSpecError, ResourceExhaustedError
from vmmd.record import Record

MiB = 1 << 20
GiB = 1 << 30
OVERHEAD_PER_VM = 4 * MiB
# The default keeps this much of MemTotal for the host, the daemon and the
# page cache that snapshot restores live on.
RESERVE_MIN, RESERVE_FRACTION = 1 * GiB, 0.10
_UNITS = {"": MiB, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}


def mem_total(meminfo: str = "/proc/meminfo") -> int:
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no MemTotal in {meminfo}")


def default_budget(total: int | None = None) -> int:
    total = mem_total() if total is None else total
    return max(0, total - max(RESERVE_MIN, int(total * RESERVE_FRACTION)))


def parse_budget(text: str) -> int | None:
    """`--memory-budget`: "auto", "unlimited", or a size (MiB, or with a
    K/M/G/T suffix).  None means unlimited."""
    t = text.strip().upper()
    if t == "AUTO":
        return default_budget()
    if t == "UNLIMITED":
        return None
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    try:
        value = int(t[: len(t) - len(unit)])
    except ValueError:
        value = -1
    if value <= 0:
        raise InvalidSpecError("--memory-budget", f"{text!r} is not a size (like 20G, 4096 "
                               "for MiB, auto or unlimited)")
    return value * _UNITS[unit]


class BudgetInfo(Record):
    budget_bytes: int  # 0: unlimited
    committed_bytes: int
    overhead_per_vm_bytes: int


class MemoryBudget:
    """Reservations against a limit (None: unlimited, still counted)."""

    def __init__(self, limit: int | None, overhead: int = OVERHEAD_PER_VM) -> None:
        self._limit = limit
        self._overhead = overhead
        self._committed = 0
        self._lock = threading.Lock()

    def cost(self, ram_bytes: int) -> int:
        return ram_bytes + self._overhead

    def reserve(self, ram_bytes: int, count: int = 1) -> int:
        """Take `count` VMs of ram_bytes each, or raise ResourceExhaustedError
        naming the budget; the bytes taken (give them back with release)."""
        want = self.cost(ram_bytes) * count
        with self._lock:
            if self._limit is not None and self._committed + want > self._limit:
                raise ResourceExhaustedError(
                    f"memory: {want // MiB} MiB more ({count} VM{'s' if count > 1 else ''} of "
                    f"{ram_bytes // MiB} MiB + {self._overhead // MiB} MiB overhead each) would "
                    f"pass the daemon's memory budget of {self._limit // MiB} MiB, of which "
                    f"{self._committed // MiB} MiB is committed (vmmd serve --memory-budget)")
            self._committed += want
        return want

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._committed -= nbytes

    def info(self) -> BudgetInfo:
        with self._lock:
            return BudgetInfo(self._limit or 0, self._committed, self._overhead)
