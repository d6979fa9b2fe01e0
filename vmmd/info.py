"""What the manager tells the API: plain, frozen values (a leaf module).

The API layer never holds a live VM: each verb returns a VmInfo built from
the VM at that moment (its phase and stop read together, under the VM's
status lock), with counters copied out of the C core.  Because these are
plain data, the VM behind them could live in another process (a worker
over a socket) without the API changing.  Imports nothing of vmmd but
leaves.
"""

from __future__ import annotations

import enum

from vmmd.record import Record, field
from vmmd.spec import CellLimits, VmSpec


class Phase(enum.Enum):
    """Where a VM is in its life (the lifecycle table: vm/lifecycle.py)."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"


class StopKind(enum.Enum):
    """How a VM ended, as a user is told: by the API, by the guest (reboot or
    power-off), or a crash."""

    POWEROFF = "poweroff"
    REBOOT = "reboot"
    CRASH = "crash"
    STOPPED_BY_API = "stopped_by_api"


class StopSummary(Record):
    kind: StopKind
    message: str


class DeviceCounters(Record):
    device_id: str
    requests: int
    bytes_read: int
    bytes_written: int
    io_errors: int
    bad_requests: int
    interrupts: int


class InterfaceCounters(Record):
    iface_id: str
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    tx_dropped: int
    rx_dropped: int
    bad_requests: int
    interrupts: int


class VsockCounters(Record):
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    connections: int
    resets: int
    io_errors: int
    bad_packets: int
    bad_requests: int
    interrupts: int


class VmCounters(Record):
    exits: int = 0
    exits_io: int = 0
    exits_mmio: int = 0
    exits_intr: int = 0
    exits_other: int = 0
    unhandled_io: int = 0
    unhandled_mmio: int = 0
    console_bytes: int = 0
    console_dropped: int = 0
    devices: tuple[DeviceCounters, ...] = ()
    interfaces: tuple[InterfaceCounters, ...] = ()
    entropy: DeviceCounters | None = None
    vsock: VsockCounters | None = None
    vcpu_start_us: int = 0     # start call -> vCPU 0's first KVM_RUN (the API's VmCounters)
    guest_startup_us: int = 0  # that -> the guest's first console byte


class CellInfo(Record):
    """The cell a VM runs in, read at that moment (the API's CellInfo)."""

    name: str           # as the VM's spec named it, or the daemon's name for a cell of its own
    pid: int            # the worker's pid; 0 when VMs run in the daemon's process
    cpu_time_s: float   # the worker's CPU time, user + system
    rss_bytes: int      # the worker's resident memory
    memory_bytes: int   # the cell cgroup's memory.current; 0 if unknown
    limits: CellLimits
    uid: int            # the worker's user
    shared: bool        # a named cell other VMs may join (False: its own, or no cells)


class VmInfo(Record):
    vm_id: str
    phase: Phase
    spec: VmSpec        # as the VM got it (defaults resolved, MACs filled in)
    cmdline: str        # the command line the guest got, device words included
    created_at: float
    started_at: float | None
    uptime_s: float
    counters: VmCounters = field(default_factory=VmCounters)
    stop: StopSummary | None = None
    cell: CellInfo | None = None  # None: not known (the reply's Vm.cell is unset)


class SnapshotInfo(Record):
    vm_id: str          # the VM it was taken of
    directory: str
    snapshot_id: str
    parent_id: str      # "" for a full snapshot
    kind: str           # "full" | "diff"
    ram_bytes: int
    pages_written: int  # full: non-zero pages; diff: dirty pages
    memory_file_bytes: int
    state_file_bytes: int
    duration_s: float
