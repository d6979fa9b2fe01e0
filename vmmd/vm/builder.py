"""Construction order of a VM, in one place (as Firecracker's builder).

Boot: check everything (kernel, initrd, memory, vCPUs, devices, cmdline) ->
drive locks and taps -> the KVM VM -> RAM -> devices -> vCPUs -> load the
guest -> boot registers.  Restore: read and check the snapshot -> the
saved spec with the overrides -> drive locks and taps -> the KVM VM -> RAM
mapped from the memory file -> devices -> vCPUs -> the saved state.
Everything that can be refused is refused before the KVM VM exists; a
failure after that closes what was made, so nothing half-created is left
behind.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from vmmd.errors import DataLossError, InvalidSpecError, quoted
from vmmd.native import NativeVm
from vmmd.spec import RestoreSpec, VmSpec
from vmmd.vm import persist, state
from vmmd.vm.boot.cmdline import append_words
from vmmd.vm.boot.loader import (
    BootFile,
    BootPlan,
    inspect_initrd,
    inspect_kernel,
    load,
    open_boot_file,
    plan_boot,
)
from vmmd.vm.devices import block, net
from vmmd.vm.layout import ram_regions
from vmmd.vm.snapshot import apply_state
from vmmd.vm.vm import MemoryFile, Vm


@dataclass(frozen=True)
class Plan:
    spec: VmSpec  # as the VM gets it: generated values (MACs) filled in
    boot: BootPlan
    drives: tuple[block.DrivePlan, ...]
    nets: tuple[net.NetPlan, ...]
    kernel: BootFile  # open while the caller's `files` stack is
    initrd: BootFile | None


def plan(spec: VmSpec, files: ExitStack, *, force_64bit: bool = False) -> Plan:
    """Validate a spec against its files; raises InvalidSpecError naming the field.
    The kernel and initrd are opened once, into `files`, and loaded from those
    fds later.  The command line gains the words that announce the devices."""
    drives = block.check_drives(spec.drives)
    nets = net.check_nets(spec.nets, spec.vm_id, first_slot=len(drives))
    cmdline = append_words(spec.cmdline, *block.cmdline_words(drives, spec.cmdline),
                           *net.cmdline_words(nets))
    kernel = files.enter_context(open_boot_file(spec.kernel, "kernel"))
    initrd = files.enter_context(open_boot_file(spec.initrd, "initrd")) if spec.initrd else None
    boot = plan_boot(inspect_kernel(kernel), inspect_initrd(initrd) if initrd else None,
                     spec.mem_bytes, spec.vcpus, cmdline, force_64bit=force_64bit)
    spec = dataclasses.replace(spec, nets=tuple(n.spec for n in nets))
    return Plan(spec, boot, drives, nets, kernel, initrd)


def _attach_devices(native: NativeVm, drives: tuple[block.DrivePlan, ...], images: list[int],
                    nets: tuple[net.NetPlan, ...], taps: list[net.Tap]) -> None:
    for d, fd in zip(drives, images, strict=True):
        native.add_virtio_blk(fd, read_only=d.spec.read_only,
                              serial=block.serial(d.spec.drive_id), mmio_base=d.mmio_base,
                              gsi=d.irq)
    for n, tap in zip(nets, taps):
        native.add_virtio_net(tap.fd, mac=n.mac, max_frame=tap.max_frame, mmio_base=n.mmio_base,
                              gsi=n.irq)


@dataclass
class _Held:
    """What a VM under construction holds on the host: its drive images
    (open, checked, locked: fds in drive order) and its taps."""

    resources: list[Any]  # closed with the VM
    images: list[int]
    taps: list[net.Tap]


@contextmanager
def _resources(drives: tuple[block.DrivePlan, ...],
               nets: tuple[net.NetPlan, ...]) -> Iterator[_Held]:
    """Drive images and taps for a VM under construction; released again if
    the construction fails (the VM's own close() releases them later)."""
    locks, taps = block.DriveLocks(), net.Taps()
    try:
        locks.acquire(drives)
        yield _Held([locks, taps], locks.fds, taps.open(nets))
    except BaseException:
        taps.close()
        locks.close()
        raise


@contextmanager
def _native(kvm_path: str) -> Iterator[NativeVm]:
    """A KVM VM, closed again if what follows fails (before the resources:
    devices use the taps' fds until then)."""
    native = NativeVm(kvm_path)
    try:
        yield native
    except BaseException:
        native.close()
        raise


def build_vm(spec: VmSpec, *, kvm_path: str = "/dev/kvm", force_64bit: bool = False) -> Vm:
    with ExitStack() as files:
        p = plan(spec, files, force_64bit=force_64bit)
        return _build(p, kvm_path)


def _build(p: Plan, kvm_path: str) -> Vm:
    spec = p.spec
    with _resources(p.drives, p.nets) as held, _native(kvm_path) as native:
        if spec.track_dirty:
            native.track_dirty()  # before the RAM: its slots are made logging
        for region in p.boot.ram:
            native.add_ram(region.gpa, region.size)
        _attach_devices(native, p.drives, held.images, p.nets, held.taps)
        native.create_vcpus(spec.vcpus)
        regs = load(native, p.boot, p.kernel, p.initrd)
        native.set_boot_regs(0, regs)
    return Vm(p.spec, native, cmdline=p.boot.cmdline.rstrip(b"\0").decode(),
              resources=held.resources)


# ---- restore ----
def _overridden(saved: VmSpec, rs: RestoreSpec) -> VmSpec:
    """The saved spec with the new id, the devices moved where the overrides
    say, and dirty tracking as asked for now."""
    drives = {d.drive_id: i for i, d in enumerate(saved.drives)}
    nets = {n.iface_id: i for i, n in enumerate(saved.nets)}
    new_drives, new_nets = list(saved.drives), list(saved.nets)
    for j, o in enumerate(rs.drives):
        if o.drive_id not in drives:
            raise InvalidSpecError(f"drives[{j}].drive_id", f"the snapshot has no drive "
                                   f"{quoted(o.drive_id)} (it has {sorted(drives) or 'none'})")
        i = drives[o.drive_id]
        new_drives[i] = dataclasses.replace(new_drives[i], path=o.path)
    for j, o in enumerate(rs.nets):
        if o.iface_id not in nets:
            raise InvalidSpecError(f"nets[{j}].iface_id", f"the snapshot has no interface "
                                   f"{quoted(o.iface_id)} (it has {sorted(nets) or 'none'})")
        i = nets[o.iface_id]
        new_nets[i] = dataclasses.replace(new_nets[i], tap=o.tap, create_tap=o.create_tap)
    return dataclasses.replace(saved, vm_id=rs.vm_id, drives=tuple(new_drives),
                               nets=tuple(new_nets), track_dirty=rs.track_dirty)


@contextmanager
def _override_terms(saved: VmSpec, rs: RestoreSpec) -> Iterator[None]:
    """A device error named in the spec's terms (drives[i].path) is renamed to
    the override that set it (drives[j].path), or to snapshot_dir for a
    device the snapshot itself names."""
    try:
        yield
    except InvalidSpecError as e:
        head, _, rest = e.field.partition("[")
        if head not in ("drives", "nets") or not rest:
            raise
        i, _, attr = rest.partition("]")
        if head == "drives":
            ids, key = [o.drive_id for o in rs.drives], saved.drives[int(i)].drive_id
        else:
            ids, key = [o.iface_id for o in rs.nets], saved.nets[int(i)].iface_id
        if key in ids:
            raise InvalidSpecError(f"{head}[{ids.index(key)}]{attr}", e.problem) from None
        raise InvalidSpecError("snapshot_dir", f"the snapshot's {head[:-1]} {key!r}: "
                               f"{e.problem}") from None


def _check_drive_sizes(spec: VmSpec, sizes: tuple[int, ...]) -> None:
    for i, (d, size) in enumerate(zip(spec.drives, sizes)):
        try:
            now = os.stat(d.path).st_size
        except OSError:
            continue  # the drive checks say why, in their words
        if now != size:
            raise InvalidSpecError(f"drives[{i}].path", f"{d.path} is {now} bytes; the "
                                   f"snapshot's drive had {size}")


def restore_vm(rs: RestoreSpec, *, kvm_path: str = "/dev/kvm") -> Vm:
    """A VM from a full snapshot, built but not started (start_restored() next).
    Guest RAM is the memory file mapped copy-on-write: nothing is read now."""
    with persist.opened(rs.snapshot_dir) as (snap, memory_fd):
        return restore_from(rs, snap, memory_fd, kvm_path=kvm_path)


def restore_from(rs: RestoreSpec, snap: persist.Snapshot, memory_fd: int, *,
                 kvm_path: str = "/dev/kvm") -> Vm:
    """restore_vm() of a snapshot already open (clones open it once): its
    memory file mapped from memory_fd, the very file that was checked."""
    if snap.state.kind != persist.FULL:
        raise InvalidSpecError("snapshot_dir", f"{snap.directory} is a diff snapshot: merge it "
                               "onto its base first (MergeSnapshots, `vmmctl merge`)")
    saved, cmdline, sizes = state.restore_spec(snap.state.spec)
    spec = _overridden(saved, rs)
    try:
        regions = ram_regions(spec.mem_bytes)
    except InvalidSpecError as e:
        raise DataLossError(f"snapshot state spec: {e}") from None
    if [(r.gpa, r.size) for r in regions] != [(m.guest_address, m.size) for m in snap.state.memory]:
        raise DataLossError("snapshot state: memory regions do not fit a VM of "
                            f"{spec.mem_mib} MiB")
    with _override_terms(saved, rs):
        drives = block.check_drives(spec.drives)
        nets = net.check_nets(spec.nets, spec.vm_id, first_slot=len(drives))
        _check_drive_sizes(spec, sizes)
    with _override_terms(saved, rs), _resources(drives, nets) as held, \
            _native(kvm_path) as native:
        if spec.track_dirty:
            native.track_dirty()
        offset = persist.MEMORY_OFFSET
        for r in regions:
            native.add_ram_file(r.gpa, r.size, memory_fd, offset)
            offset += r.size
        _attach_devices(native, drives, held.images, nets, held.taps)
        native.create_vcpus(spec.vcpus, bare=True)
        apply_state(native, snap, spec)
    return Vm(spec, native, cmdline=cmdline, resources=held.resources,
              snapshot_id=snap.state.snapshot_id,
              memory_file=MemoryFile(str(snap.memory_path), memory_fd, snap.memory_file_bytes))
