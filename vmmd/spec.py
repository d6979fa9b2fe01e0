"""What a VM is asked to be: frozen specs, checked before anything exists.

The API and CLI layers convert their input into a VmSpec; the builder
consumes it.  The specs mirror the API's messages field for field, names
included (VmSpec ~ VmConfig plus vm_id, BootSpec ~ BootSource, DriveSpec ~
Drive, NetSpec ~ NetworkInterface, VsockSpec ~ Vsock, CellLimits ~ CellLimits, RestoreSpec ~
RestoreVmRequest): an error's field path (errors.InvalidSpecError.path) is
then the API's path as it is, with only the request's own prefix
("config") added at the edge.
"""

from __future__ import annotations

import math
import re

from vmmd.errors import FieldPath, InvalidSpecError, quoted
from vmmd.record import Record, field

MiB = 1 << 20
DEFAULT_VCPUS = 1
DEFAULT_MEM_MIB = 128
# Ids of VMs, drives and interfaces.  fullmatch: "$" alone would let "a\n" through.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID_RULE = "must be 1-64 characters of A-Z a-z 0-9 _ . - starting alphanumeric"


class BootSpec(Record):
    """How the guest boots.  cmdline None: the default command line (the
    builder resolves it, with this host's workarounds); cmdline_append is
    added to whichever it is."""

    kernel_path: str
    initrd_path: str | None = None
    cmdline: str | None = None
    cmdline_append: str | None = None


class DriveSpec(Record):
    """A raw disk image given to the guest as a virtio-blk device."""

    drive_id: str
    path_on_host: str
    read_only: bool = False
    is_root_device: bool = False


class NetSpec(Record):
    """A network interface: a host tap device given to the guest as virtio-net.
    guest_mac None: generated, stable for the VM id and interface id.  netns:
    the named network namespace the tap lives in ("": the daemon's)."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    create_tap: bool = False
    netns: str = ""


class VsockSpec(Record):
    """A virtio-vsock device: the guest's context id and the Unix socket the
    daemon listens on for host clients (guest connects to host port P go to
    "<uds_path>_<P>")."""

    guest_cid: int
    uds_path: str


# Cell limits (CellLimits), each 0 (no limit) or within these bounds.
# cpu: cgroup v2 takes a quota of at least 1 ms per period, and the default
# period is 100 ms, so 1% of a core is the smallest quota a cell can get
# without a shorter period; 1024 cores is beyond any host vmmd runs on (a
# larger value is a mistake, not a wish).
MIN_CPU, MAX_CPU = 0.01, 1024.0
# memory_mib: 16 MiB is the smallest VM's RAM (vm/layout.py), let alone a
# worker's; 2^30 MiB (1 PiB) is beyond any host, and keeps the byte count
# (memory_mib << 20) far inside the cgroup's 64-bit memory.max.
MIN_CELL_MEM_MIB, MAX_CELL_MEM_MIB = 16, 1 << 30
# pids: one VM alone is a thread per vCPU, its I/O thread and its watcher,
# in a worker that has threads of its own: below 8 tasks a cell could not
# even hold one small VM; 2^22 is the kernel's PID_MAX_LIMIT (no host has
# more pids to give).
MIN_PIDS, MAX_PIDS = 8, 1 << 22


class CellLimits(Record):
    """Caps on a cell (its cgroup); 0: no limit.  cpu is a fraction of one
    core (0.25: a quarter), memory_mib the cell's host memory, guest RAM
    included, pids the most tasks (processes and threads)."""

    cpu: float = 0.0
    memory_mib: int = 0
    pids: int = 0


class EntropySpec(Record):
    """The virtio entropy device: random bytes from the host's getrandom(),
    at most max_request_bytes per request (0: the device's bound, 64 KiB)."""

    max_request_bytes: int = 0


class VmSpec(Record):
    vm_id: str
    boot: BootSpec
    vcpus: int = DEFAULT_VCPUS
    memory_mib: int = DEFAULT_MEM_MIB
    drives: tuple[DriveSpec, ...] = ()
    network_interfaces: tuple[NetSpec, ...] = ()
    track_dirty_pages: bool = False  # dirty-page logging, for diff snapshots
    entropy: EntropySpec | None = None  # a virtio-rng device, after the interfaces
    # ACPI tables (and the VMGenID device); the guest then finds its virtio
    # devices there, not on the command line (docs/machine.md).
    acpi: bool = False
    vsock: VsockSpec | None = None
    # Where the VM runs, not what it is (neither is in a snapshot): the cell
    # ("" = one of its own) and that cell's limits.
    cell: str = ""
    limits: CellLimits = CellLimits()

    @property
    def mem_bytes(self) -> int:
        return self.memory_mib * MiB


def check_id(path: FieldPath | str, value: str) -> str:
    """An id (VM, drive, interface): the same rule for all, checked whole."""
    if not value:
        raise InvalidSpecError(path, "is required")
    if not _ID_RE.fullmatch(value):
        raise InvalidSpecError(path, f"{quoted(value)} {ID_RULE}")
    return value


def check_vm_id(vm_id: str) -> str:
    return check_id("vm_id", vm_id)


def check_cell_name(cell: str, path: FieldPath = ("cell",)) -> str:
    """A cell's name: "" (a cell of the VM's own) or an id, as a VM's."""
    return check_id(path, cell) if cell else cell


def _bounded(path: FieldPath, value: float, low: float, high: float) -> None:
    if value and not low <= value <= high:
        raise InvalidSpecError(path, f"{value!r} is outside {low!r}..{high!r} (0: no limit)")


def check_limits(limits: CellLimits, path: FieldPath = ("limits",)) -> CellLimits:
    """Each limit 0 or within its bounds (see MIN_CPU...): a value a client
    sent that no cgroup could carry out is refused here, naming the field."""
    if not math.isfinite(limits.cpu):
        raise InvalidSpecError((*path, "cpu"), f"{limits.cpu!r} is not a number of cores "
                               f"({MIN_CPU!r}..{MAX_CPU!r}; 0: no limit)")
    _bounded((*path, "cpu"), limits.cpu, MIN_CPU, MAX_CPU)
    _bounded((*path, "memory_mib"), limits.memory_mib, MIN_CELL_MEM_MIB, MAX_CELL_MEM_MIB)
    _bounded((*path, "pids"), limits.pids, MIN_PIDS, MAX_PIDS)
    return limits


class DriveOverride(Record):
    """At restore: the snapshot's drive `drive_id` now lives at `path_on_host`."""

    drive_id: str
    path_on_host: str


AUTO_MAC = "auto"  # an override's guest_mac: a MAC generated from the new VM's id


class NetOverride(Record):
    """At restore: the snapshot's interface `iface_id` goes onto tap
    `host_dev_name` (in `netns`; "" and no netns: the snapshot's tap stays),
    with `guest_mac` ("": the snapshot's; AUTO_MAC: generated for the new VM)."""

    iface_id: str
    host_dev_name: str
    create_tap: bool = False
    guest_mac: str = ""
    netns: str = ""


class VsockOverride(Record):
    """At restore: the snapshot's vsock device listens at `uds_path` ("": the
    snapshot's) and has context id `guest_cid` (0: the snapshot's)."""

    guest_cid: int = 0
    uds_path: str = ""


class DeviceOverrides(Record):
    drives: tuple[DriveOverride, ...] = ()
    network_interfaces: tuple[NetOverride, ...] = ()
    vsock: VsockOverride | None = None


class RestoreSpec(Record):
    """A VM from a snapshot: its new id, where its devices go now, and where
    it runs (its cell and the cell's limits, as VmSpec's: a snapshot has none)."""

    snapshot_dir: str
    vm_id: str
    overrides: DeviceOverrides = field(default_factory=DeviceOverrides)
    track_dirty_pages: bool = False
    cell: str = ""
    limits: CellLimits = CellLimits()
    clock_realtime: bool = False  # kvmclock moved on by the time since the snapshot
