"""What a VM is asked to be: frozen specs, checked before anything exists.

The API and CLI layers convert their input into a VmSpec; the builder
consumes it.  The specs mirror the API's messages field for field, names
included (VmSpec ~ VmConfig plus vm_id, BootSpec ~ BootSource, DriveSpec ~
Drive, NetSpec ~ NetworkInterface, RestoreSpec ~ RestoreVmRequest): an
error's field path (errors.InvalidSpecError.path) is then the API's path
as it is, with only the request's own prefix ("config") added at the edge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vmmd.errors import FieldPath, InvalidSpecError, quoted

MiB = 1 << 20
DEFAULT_VCPUS = 1
DEFAULT_MEM_MIB = 128
# Ids of VMs, drives and interfaces.  fullmatch: "$" alone would let "a\n" through.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID_RULE = "must be 1-64 characters of A-Z a-z 0-9 _ . - starting alphanumeric"


@dataclass(frozen=True)
class BootSpec:
    """How the guest boots.  cmdline None: the default command line (the
    builder resolves it, with this host's workarounds); cmdline_append is
    added to whichever it is."""

    kernel_path: str
    initrd_path: str | None = None
    cmdline: str | None = None
    cmdline_append: str | None = None


@dataclass(frozen=True)
class DriveSpec:
    """A raw disk image given to the guest as a virtio-blk device."""

    drive_id: str
    path_on_host: str
    read_only: bool = False
    is_root_device: bool = False


@dataclass(frozen=True)
class NetSpec:
    """A network interface: a host tap device given to the guest as virtio-net.
    guest_mac None: generated, stable for the VM id and interface id."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    create_tap: bool = False


@dataclass(frozen=True)
class VmSpec:
    vm_id: str
    boot: BootSpec
    vcpus: int = DEFAULT_VCPUS
    memory_mib: int = DEFAULT_MEM_MIB
    drives: tuple[DriveSpec, ...] = ()
    network_interfaces: tuple[NetSpec, ...] = ()
    track_dirty_pages: bool = False  # dirty-page logging, for diff snapshots

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


@dataclass(frozen=True)
class DriveOverride:
    """At restore: the snapshot's drive `drive_id` now lives at `path_on_host`."""

    drive_id: str
    path_on_host: str


@dataclass(frozen=True)
class NetOverride:
    """At restore: the snapshot's interface `iface_id` goes onto tap `host_dev_name`."""

    iface_id: str
    host_dev_name: str
    create_tap: bool = False


@dataclass(frozen=True)
class DeviceOverrides:
    drives: tuple[DriveOverride, ...] = ()
    network_interfaces: tuple[NetOverride, ...] = ()


@dataclass(frozen=True)
class RestoreSpec:
    """A VM from a snapshot: its new id, and where its devices go now."""

    snapshot_dir: str
    vm_id: str
    overrides: DeviceOverrides = field(default_factory=DeviceOverrides)
    track_dirty_pages: bool = False
