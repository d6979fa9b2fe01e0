"""Taking a snapshot of a paused VM and putting a snapshot's state back into
a fresh one: the component order lives here (the files in persist.py, the
per-component conversions in state.py, the construction in builder.py).

Save: vCPUs, irqchips/PIT/kvmclock, devices, UART/i8042, then guest RAM
(the C core writes it; a diff takes the dirty log).  Restore, into a VM with
its RAM mapped and devices attached but nothing started: irqchips, PIT and
clock, each vCPU (CPUID, registers, LAPIC, MSRs, events, in KVM's order),
each device's transport (validated against guest RAM), UART and i8042.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.errors import DataLossError, NativeError
from vmmd.info import SnapshotInfo
from vmmd.native import LegacyState, MachineState, NativeVm, VcpuState, VirtioState
from vmmd.spec import VmSpec
from vmmd.vm import persist, state
from vmmd.vm.layout import PAGE_SIZE, ram_regions

VIRTIO_ID_NET, VIRTIO_ID_BLOCK = 1, 2


def memory_unreadable(backing: str | None = None) -> DataLossError:
    """Writing guest RAM found a page of it gone (the C core stopped the VM):
    its backing file was truncated under it.  `backing` names that file when
    the caller knows it (a restored VM: its snapshot's memory file)."""
    return DataLossError("guest memory of this VM is no longer readable: its backing file"
                         f"{f' {backing}' if backing else ''} was truncated, and the VM "
                         "stopped")


def take_snapshot(native: NativeVm, spec: VmSpec, cmdline: str, directory: persist.SnapshotDir,
                  parent: str | None, *, backing: str | None = None) -> SnapshotInfo:
    """`backing`: the file guest RAM is mapped from, if any, for the error
    when it turns out truncated (the Vm does not pass it yet)."""
    t0 = time.monotonic()
    regions = ram_regions(spec.mem_bytes)
    ram_bytes = sum(r.size for r in regions)
    ndev = len(spec.drives) + len(spec.network_interfaces)
    s = spb.SnapshotState(
        format_version=persist.FORMAT_VERSION, snapshot_id=persist.new_id(),
        parent_id=parent or "", kind=persist.DIFF if parent else persist.FULL,
        created_unix_ns=time.time_ns(),
        spec=state.save_spec(spec, cmdline, [os.stat(d.path_on_host).st_size for d in spec.drives]),
        memory=[spb.MemoryRegion(guest_address=r.gpa, size=r.size) for r in regions],
        vcpus=[state.save_vcpu(native.save_vcpu(i)) for i in range(spec.vcpus)],
        machine=state.save_machine(native.save_machine()),
        devices=[state.save_virtio(native.save_virtio(i)) for i in range(ndev)],
        legacy=state.save_legacy(native.save_legacy()))
    written = 0

    def write_ram(fd: int) -> tuple[int, bytes]:
        nonlocal written
        try:
            written, bitmap = native.write_memory(fd, persist.MEMORY_OFFSET,
                                                  diff=parent is not None,
                                                  pages=ram_bytes // PAGE_SIZE)
        except NativeError as e:
            if e.errno == errno.EFAULT:  # only a vanished page of guest RAM
                raise memory_unreadable(backing) from None
            raise
        return written, bitmap

    mem_size, state_size = persist.write(directory, s, write_ram)
    return SnapshotInfo(spec.vm_id, str(directory.path), s.snapshot_id, s.parent_id,
                        "diff" if parent else "full", ram_bytes, written // PAGE_SIZE, mem_size,
                        state_size, time.monotonic() - t0)


def device_kinds(spec: VmSpec) -> list[tuple[int, int]]:
    """(virtio device id, queues) of each device in attachment order."""
    return [(VIRTIO_ID_BLOCK, 1)] * len(spec.drives) + [(VIRTIO_ID_NET, 2)] * len(spec.network_interfaces)


@dataclass(frozen=True)
class Prepared:
    """A snapshot's state checked and converted for the C core."""

    machine: MachineState
    vcpus: tuple[VcpuState, ...]
    devices: tuple[VirtioState, ...]
    legacy: LegacyState


def prepare(snap: persist.Snapshot, spec: VmSpec) -> Prepared:
    """Check and convert once per snapshot (kept with it: repeated restores
    and clones of one snapshot skip this)."""
    cached = snap.prepared.get("state")
    if isinstance(cached, Prepared):
        return cached
    s = snap.state
    if len(s.vcpus) != spec.vcpus:
        raise DataLossError(f"snapshot state: {len(s.vcpus)} vCPU states for {spec.vcpus} vCPUs")
    kinds = device_kinds(spec)
    if len(s.devices) != len(kinds):
        raise DataLossError(f"snapshot state: {len(s.devices)} device states for "
                            f"{len(kinds)} devices")
    p = Prepared(
        machine=state.restore_machine(s.machine),
        vcpus=tuple(state.restore_vcpu(v, f"vcpus[{i}]") for i, v in enumerate(s.vcpus)),
        devices=tuple(state.restore_virtio(d, f"devices[{i}]", *kinds[i])
                      for i, d in enumerate(s.devices)),
        legacy=state.restore_legacy(s.legacy))
    snap.prepared["state"] = p
    return p


def apply_state(native: NativeVm, snap: persist.Snapshot, spec: VmSpec) -> None:
    """Put a checked snapshot's state into a VM built from its spec.  KVM or
    a device refusing a value means a state no VM could have had here:
    DataLossError, naming what was refused."""
    p = prepare(snap, spec)
    machine, vcpus, devices, legacy = p.machine, p.vcpus, p.devices, p.legacy
    try:
        native.restore_machine(machine)
        for i, v in enumerate(vcpus):
            native.restore_vcpu(i, v)
        for i, d in enumerate(devices):
            native.restore_virtio(i, d)
        native.restore_legacy(legacy)
    except NativeError as e:
        raise DataLossError(f"snapshot state refused: {e}") from None


def merge_snapshots(base_dir: str, diff_dir: str) -> SnapshotInfo:
    t0 = time.monotonic()
    merged, applied = persist.merge(base_dir, diff_dir)
    st = merged.state
    return SnapshotInfo(st.spec.vm_id, str(merged.directory), st.snapshot_id, "", "full",
                        merged.ram_bytes, applied, merged.memory_file_bytes,
                        merged.state_file_bytes, time.monotonic() - t0)
