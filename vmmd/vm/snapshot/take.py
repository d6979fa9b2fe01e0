"""Taking a snapshot of a paused VM: the order of its components (the files
in files.py, the per-component conversions in state.py).

Save: vCPUs, irqchips/PIT/kvmclock, devices, UART/i8042, the VMGenID id
(with ACPI; it is in RAM too, the state names it), then guest RAM
(the C core writes it; a diff takes the dirty log).
"""

from __future__ import annotations

import errno
import time

from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.errors import DataLossError, NativeError
from vmmd.info import SnapshotInfo
from vmmd.native import NativeVm
from vmmd.spec import VmSpec
from vmmd.vm.devices import vmgenid
from vmmd.vm.layout import PAGE_SIZE, ram_regions
from vmmd.vm.snapshot import files, state
from vmmd.vm.snapshot.format import DIFF, FORMAT_VERSION, FULL, MEMORY_OFFSET, new_id


def memory_unreadable(backing: str | None = None) -> DataLossError:
    """Writing guest RAM found a page of it gone (the C core stopped the VM):
    its backing file was truncated under it.  `backing` names that file when
    the caller knows it (a restored VM: its snapshot's memory file)."""
    return DataLossError("guest memory of this VM is no longer readable: its backing file"
                         f"{f' {backing}' if backing else ''} was truncated, and the VM "
                         "stopped")


def take_snapshot(native: NativeVm, spec: VmSpec, cmdline: str, directory: files.SnapshotDir,
                  parent: str | None, drive_sizes: list[int], *,
                  backing: str | None = None) -> SnapshotInfo:
    """`backing`: the file guest RAM is mapped from, if any, for the error
    when it turns out truncated (the Vm does not pass it yet)."""
    t0 = time.monotonic()
    regions = ram_regions(spec.mem_bytes)
    ram_bytes = sum(r.size for r in regions)
    ndev = (len(spec.drives) + len(spec.network_interfaces) + (spec.entropy is not None)
            + (spec.vsock is not None))
    s = spb.SnapshotState(
        format_version=FORMAT_VERSION, snapshot_id=new_id(),
        parent_id=parent or "", kind=DIFF if parent else FULL,
        created_unix_ns=time.time_ns(),
        spec=state.save_spec(spec, cmdline, drive_sizes),
        memory=[spb.MemoryRegion(guest_address=r.gpa, size=r.size) for r in regions],
        vcpus=[state.save_vcpu(native.save_vcpu(i)) for i in range(spec.vcpus)],
        machine=state.save_machine(native.save_machine()),
        devices=[state.save_virtio(native.save_virtio(i)) for i in range(ndev)],
        legacy=state.save_legacy(native.save_legacy()),
        vm_generation_id=vmgenid.current(native) if spec.acpi else b"")
    written = 0

    def write_ram(fd: int) -> tuple[int, bytes]:
        nonlocal written
        try:
            written, bitmap = native.write_memory(fd, MEMORY_OFFSET,
                                                  diff=parent is not None,
                                                  pages=ram_bytes // PAGE_SIZE)
        except NativeError as e:
            if e.errno == errno.EFAULT:  # only a vanished page of guest RAM
                raise memory_unreadable(backing) from None
            raise
        return written, bitmap

    mem_size, state_size = files.write(directory, s, write_ram)
    return SnapshotInfo(spec.vm_id, str(directory.path), s.snapshot_id, s.parent_id,
                        "diff" if parent else "full", ram_bytes, written // PAGE_SIZE, mem_size,
                        state_size, time.monotonic() - t0)
