"""What a VM is asked to be: frozen specs, checked before anything exists.

The API and CLI layers convert their input into a VmSpec; the builder
consumes it.  Field names here are the names error messages use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmmd.errors import InvalidSpecError, quoted

MiB = 1 << 20
DEFAULT_VCPUS = 1
DEFAULT_MEM_MIB = 128
# Ids of VMs, drives and interfaces.  fullmatch: "$" alone would let "a\n" through.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID_RULE = "must be 1-64 characters of A-Z a-z 0-9 _ . - starting alphanumeric"


@dataclass(frozen=True)
class DriveSpec:
    """A raw disk image given to the guest as a virtio-blk device."""

    drive_id: str
    path: str
    read_only: bool = False
    is_root: bool = False


@dataclass(frozen=True)
class NetSpec:
    """A network interface: a host tap device given to the guest as virtio-net.
    mac None: generated, stable for the VM id and interface id."""

    iface_id: str
    tap: str
    mac: str | None = None
    create_tap: bool = False


@dataclass(frozen=True)
class VmSpec:
    vm_id: str
    kernel: str
    cmdline: str
    initrd: str | None = None
    vcpus: int = DEFAULT_VCPUS
    mem_mib: int = DEFAULT_MEM_MIB
    drives: tuple[DriveSpec, ...] = ()
    nets: tuple[NetSpec, ...] = ()
    track_dirty: bool = False  # dirty-page logging, for diff snapshots

    @property
    def mem_bytes(self) -> int:
        return self.mem_mib * MiB


def check_id(field: str, value: str) -> str:
    """An id (VM, drive, interface): the same rule for all, checked whole."""
    if not value:
        raise InvalidSpecError(field, "is required")
    if not _ID_RE.fullmatch(value):
        raise InvalidSpecError(field, f"{quoted(value)} {ID_RULE}")
    return value


def check_vm_id(vm_id: str) -> str:
    return check_id("vm_id", vm_id)


@dataclass(frozen=True)
class DriveOverride:
    """At restore: the snapshot's drive `drive_id` now lives at `path`."""

    drive_id: str
    path: str


@dataclass(frozen=True)
class NetOverride:
    """At restore: the snapshot's interface `iface_id` goes onto tap `tap`."""

    iface_id: str
    tap: str
    create_tap: bool = False


@dataclass(frozen=True)
class RestoreSpec:
    """A VM from a snapshot: its new id, and where its devices go now."""

    snapshot_dir: str
    vm_id: str
    drives: tuple[DriveOverride, ...] = ()
    nets: tuple[NetOverride, ...] = ()
    track_dirty: bool = False
