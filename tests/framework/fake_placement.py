"""A fake of vmmd.cell's placements for the unit tier: cells as bookkeeping
only (no zygote, no worker), the VMs' cores from a fake native factory.

It keeps CellPlacement's rules a manager relies on: a VM naming no cell
gets one of its own ("@" + its id); VMs joining a cell must ask for its
limits (StateError naming the cell); a cell lives while it has a lease.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmmd.errors import StateError
from vmmd.info import CellInfo
from vmmd.spec import CellLimits


@dataclass
class FakeLease:
    placement: FakePlacement
    name: str
    factory: Callable[[str], Any] | None
    released: bool = False
    watcher: None = None  # the process's watcher, as the shared placement's

    def info(self) -> CellInfo:
        limits = self.placement.cells[self.name][1]
        return CellInfo(name=self.name, pid=4242, uid=100000, cpu_time_s=0.0, rss_bytes=0,
                        memory_bytes=0, limits=limits, shared=not self.name.startswith("@"))

    def release(self) -> None:
        assert not self.released, f"lease on {self.name} released twice"
        self.released = True
        refs, limits = self.placement.cells[self.name]
        if refs == 1:
            del self.placement.cells[self.name]
        else:
            self.placement.cells[self.name] = (refs - 1, limits)


class FakePlacement:
    def __init__(self, factory: Callable[[str], Any] | None) -> None:
        self.factory = factory
        self.cells: dict[str, tuple[int, CellLimits]] = {}  # name -> (leases, limits)
        self.closed = False
        self.settled_calls = 0  # Manager.settled() heard

    def acquire(self, cell: str, limits: CellLimits, vm_id: str, ram_bytes: int) -> FakeLease:
        name = cell or f"@{vm_id}"
        if name in self.cells:
            refs, have = self.cells[name]
            if have != limits:
                raise StateError(f"cell: cell {name!r} has other limits")
            self.cells[name] = (refs + 1, have)
        else:
            self.cells[name] = (1, limits)
        return FakeLease(self, name, self.factory)

    def settled(self) -> None:
        self.settled_calls += 1

    def close(self) -> None:
        self.closed = True
