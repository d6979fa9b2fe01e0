"""Construction order of a VM, in one place (as Firecracker's builder).

Boot: check everything (kernel, initrd, memory, vCPUs, devices, cmdline) ->
drive locks and taps -> the KVM VM -> RAM -> vCPUs -> devices -> load the
guest (and, with ACPI, a random VMGenID id) -> boot registers (the KVM VM
with its RAM and vCPUs may come made ahead: vmmd/vm/shelf.py).  Restore:
read and check the snapshot -> the saved spec with the overrides -> drive
locks and taps -> the KVM VM -> RAM mapped from the memory file -> devices
-> vCPUs -> the saved state -> with ACPI, a new VMGenID id and its
notification (the GED's interrupt, pending until the vCPUs run).
Everything that can be refused is refused before the KVM VM exists; a
failure after that closes what was made, so nothing half-created is left
behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from vmmd import record
from vmmd.errors import DataLossError, InvalidSpecError, quoted, shown
from vmmd.native import MachineShape, NativeVm
from vmmd.record import Record
from vmmd.spec import AUTO_MAC, NetOverride, RestoreSpec, VmSpec, VsockOverride, VsockSpec
from vmmd.vm.boot.cmdline import append_words, build_cmdline
from vmmd.vm.boot.image import INITRD_PATH, KERNEL_PATH
from vmmd.vm.boot.loader import (
    BootFile,
    BootPlan,
    inspect_initrd,
    inspect_kernel,
    load,
    open_boot_file,
    plan_boot,
)
from vmmd.vm.devices import block, net, rng, vmgenid, vsock
from vmmd.vm.layout import VIRTIO_MMIO_SLOT_SIZE, Region, ram_regions
from vmmd.vm.vm import MemoryFile, Vm
from vmmd.vm.watcher import Watcher

# The snapshot package (protobuf) loads with the first restore, not here: a
# one-shot `vmmd run` never restores and starts ~20 ms sooner without it.
if TYPE_CHECKING:
    from vmmd.vm import snapshot


class Plan(Record):
    spec: VmSpec  # as the VM gets it: generated values (MACs) filled in
    boot: BootPlan
    drives: tuple[block.DrivePlan, ...]
    nets: tuple[net.NetPlan, ...]
    rng: rng.RngPlan | None
    vsock: vsock.VsockPlan | None
    kernel: BootFile  # open while the caller's `files` stack is
    initrd: BootFile | None


def plan(spec: VmSpec, files: ExitStack, *, force_64bit: bool = False) -> Plan:
    """Validate a spec against its files; raises InvalidSpecError naming the field.
    The command line is resolved here (the default, with this host's
    workarounds, unless the spec gives one; plus cmdline_append), and gains
    the words that announce the devices: `virtio_mmio.device=` words without
    ACPI; with ACPI the tables announce them (a guest given both would bind
    whichever it registers first and fail the other's probe: busy window),
    and only root= is added.  The kernel and initrd are opened once, into
    `files`, and loaded from those fds later."""
    b = spec.boot
    base = build_cmdline(b.cmdline, b.cmdline_append)
    drives = block.check_drives(spec.drives)
    nets = net.check_nets(spec.network_interfaces, spec.vm_id, first_slot=len(drives))
    entropy = rng.check_entropy(spec.entropy, first_slot=len(drives) + len(nets))
    vs = vsock.check_vsock(spec.vsock, first_slot=len(drives) + len(nets) + (entropy is not None))
    on_cmdline = not spec.acpi
    cmdline = append_words(base, *block.cmdline_words(drives, base, devices=on_cmdline),
                           *net.cmdline_words(nets, devices=on_cmdline),
                           *rng.cmdline_words(entropy, devices=on_cmdline),
                           *vsock.cmdline_words(vs, devices=on_cmdline))
    slots = [(Region(base, VIRTIO_MMIO_SLOT_SIZE), irq)
             for base, irq in [*((d.mmio_base, d.irq) for d in drives),
                               *((n.mmio_base, n.irq) for n in nets),
                               *((e.mmio_base, e.irq) for e in ([entropy] if entropy else [])),
                               *((v.mmio_base, v.irq) for v in ([vs] if vs else []))]]
    kernel = files.enter_context(open_boot_file(b.kernel_path, KERNEL_PATH))
    initrd = (files.enter_context(open_boot_file(b.initrd_path, INITRD_PATH)) if b.initrd_path
              else None)
    boot = plan_boot(inspect_kernel(kernel), inspect_initrd(initrd) if initrd else None,
                     spec.mem_bytes, spec.vcpus, cmdline, force_64bit=force_64bit,
                     acpi=slots if spec.acpi else None)
    # As the VM gets it: the command line resolved (GetVm shows it), MACs filled in.
    boot_spec = record.replace(b, cmdline=base, cmdline_append=None)
    spec = record.replace(spec, boot=boot_spec,
                          network_interfaces=tuple(n.spec for n in nets))
    return Plan(spec, boot, drives, nets, entropy, vs, kernel, initrd)


class _Held(Record, frozen=False):
    """What a VM under construction holds on the host: its drive images
    (open, checked, locked: fds in drive order), its taps and its vsock
    listener."""

    resources: list[Any]  # closed with the VM
    images: list[int]
    taps: list[net.Tap]
    tap_set: net.Taps  # (one of the resources) the taps' own counters
    listener: vsock.Listener | None


def _attach_devices(native: NativeVm, drives: tuple[block.DrivePlan, ...],
                    nets: tuple[net.NetPlan, ...], entropy: rng.RngPlan | None,
                    vs: vsock.VsockPlan | None, held: _Held) -> None:
    """In slot order, as the spec lists them: drives, interfaces, the entropy
    device, the vsock device."""
    for d, fd in zip(drives, held.images, strict=True):
        native.add_virtio_blk(fd, read_only=d.spec.read_only,
                              serial=block.serial(d.spec.drive_id), mmio_base=d.mmio_base,
                              gsi=d.irq)
    for n, tap in zip(nets, held.taps):
        native.add_virtio_net(tap.fd, mac=n.mac, max_frame=tap.max_frame, mmio_base=n.mmio_base,
                              gsi=n.irq)
    if entropy is not None:
        native.add_virtio_rng(max_request=entropy.spec.max_request_bytes,
                              mmio_base=entropy.mmio_base, gsi=entropy.irq)
    if vs is not None and held.listener is not None:
        native.add_virtio_vsock(held.listener.fd, held.listener.dir_fd,
                                guest_cid=vs.spec.guest_cid, name=vs.name,
                                mmio_base=vs.mmio_base, gsi=vs.irq)


@contextmanager
def _resources(drives: tuple[block.DrivePlan, ...], nets: tuple[net.NetPlan, ...],
               vs: vsock.VsockPlan | None) -> Iterator[_Held]:
    """Drive images, taps and the vsock listener for a VM under construction;
    released again if the construction fails (the VM's own close() releases
    them later; the listener's socket file goes with it)."""
    locks, taps = block.DriveLocks(), net.Taps()
    listener: vsock.Listener | None = None
    try:
        locks.acquire(drives)
        opened = taps.open(nets)
        listener = vsock.open_listener(vs)
        yield _Held([locks, taps] + ([listener] if listener else []), locks.fds, opened, taps,
                    listener)
    except BaseException:
        if listener is not None:
            listener.close()
        taps.close()
        locks.close()
        raise


# Makes the C core's VM for a /dev/kvm path: NativeVm, or a test's fake of it.
NativeFactory = Callable[[str], NativeVm]


@contextmanager
def _native(kvm_path: str, factory: NativeFactory | None,
            shape: MachineShape | None = None) -> Iterator[NativeVm]:
    """A KVM VM, closed again if what follows fails (before the resources:
    devices use the taps' fds until then).  shape: the RAM and vCPUs the VM
    will have (None: a restore's); a VM made ahead with another shape
    (vmmd/vm/shelf.py) is given back, destroyed, for a fresh one."""
    make = factory or NativeVm
    for _ in range(3):  # a take empties the shelf: the next is fresh unless a
        native = make(kvm_path)  # concurrent request's spare landed in between
        if native.prepared is None or native.prepared == shape:
            break
        native.close(deferred=True)
    else:  # only the shelf makes VMs ahead, and the VMs it makes inline are these
        native = NativeVm(kvm_path)
    try:
        yield native
    except BaseException:
        native.close()
        raise


def add_machine(native: NativeVm, shape: MachineShape) -> None:
    """A booted VM's RAM, then its vCPUs (made for a boot: CPUID set).  In that
    order: the vCPUs bring the irqchip and PIT, and a RAM slot added after those
    waits out an SRCU grace period (native/vm.c).  For a build, or ahead of one
    by the shelf (vmmd/vm/shelf.py)."""
    ram, dirty, vcpus = shape
    if dirty:
        native.track_dirty()  # before the RAM: its slots are made logging
    for gpa, size in ram:
        native.add_ram(gpa, size)
    native.create_vcpus(vcpus)


def build_vm(spec: VmSpec, *, kvm_path: str = "/dev/kvm", force_64bit: bool = False,
             native_factory: NativeFactory | None = None, watcher: Watcher | None = None) -> Vm:
    """watcher: the thread that watches the VM's events (a cell's own; None: the
    process's)."""
    with ExitStack() as files:
        p = plan(spec, files, force_64bit=force_64bit)
        return _build(p, kvm_path, native_factory, watcher)


def _build(p: Plan, kvm_path: str, factory: NativeFactory | None,
           watcher: Watcher | None) -> Vm:
    spec = p.spec
    shape = (tuple((r.gpa, r.size) for r in p.boot.ram), spec.track_dirty_pages, spec.vcpus)
    with _resources(p.drives, p.nets, p.vsock) as held, \
            _native(kvm_path, factory, shape) as native:
        if native.prepared is None:  # else made ahead so (vmmd/vm/shelf.py)
            add_machine(native, shape)
        _attach_devices(native, p.drives, p.nets, p.rng, p.vsock, held)
        regs = load(native, p.boot, p.kernel, p.initrd)
        if spec.acpi:
            vmgenid.install(native, vmgenid.new_id())
        native.set_boot_regs(0, regs)
    return Vm(p.spec, native, cmdline=p.boot.cmdline.rstrip(b"\0").decode(),
              resources=held.resources, images=held.images, taps=held.tap_set,
              watcher=watcher)


# ---- restore ----
def _overridden(saved: VmSpec, rs: RestoreSpec) -> VmSpec:
    """The saved spec with the new id, the devices moved where the overrides
    say, and dirty tracking and the cell (with its limits) as asked for now."""
    o = rs.overrides
    drives = {d.drive_id: i for i, d in enumerate(saved.drives)}
    nets = {n.iface_id: i for i, n in enumerate(saved.network_interfaces)}
    new_drives, new_nets = list(saved.drives), list(saved.network_interfaces)
    for j, d in enumerate(o.drives):
        if d.drive_id not in drives:
            raise InvalidSpecError(("overrides", "drives", j, "drive_id"), "the snapshot has no "
                                   f"drive {quoted(d.drive_id)} (it has {sorted(drives) or 'none'})")
        i = drives[d.drive_id]
        new_drives[i] = record.replace(new_drives[i], path_on_host=d.path_on_host)
    for j, n in enumerate(o.network_interfaces):
        if n.iface_id not in nets:
            raise InvalidSpecError(("overrides", "network_interfaces", j, "iface_id"),
                                   f"the snapshot has no interface {quoted(n.iface_id)} "
                                   f"(it has {sorted(nets) or 'none'})")
        i = nets[n.iface_id]
        if _moves_tap(n):
            new_nets[i] = record.replace(new_nets[i], host_dev_name=n.host_dev_name,
                                     create_tap=n.create_tap, netns=n.netns)
        if n.guest_mac:  # AUTO_MAC: None, generated from the new vm_id as for a new VM
            new_nets[i] = record.replace(
                new_nets[i], guest_mac=None if n.guest_mac == AUTO_MAC else n.guest_mac)
    return record.replace(saved, vm_id=rs.vm_id, drives=tuple(new_drives),
                      network_interfaces=tuple(new_nets),
                      vsock=_overridden_vsock(saved, o.vsock),
                      track_dirty_pages=rs.track_dirty_pages,
                      cell=rs.cell, limits=rs.limits)


def _moves_tap(n: NetOverride) -> bool:
    """The override names a tap (else the snapshot's stays): any of its tap
    fields set.  A netns or create_tap without a name is an error at
    host_dev_name (check_nets: "is required")."""
    return bool(n.host_dev_name or n.netns or n.create_tap)


def _overridden_vsock(saved: VmSpec, o: VsockOverride | None) -> VsockSpec | None:
    """The snapshot's vsock device, with the override's non-empty fields."""
    if o is None:
        return saved.vsock
    if saved.vsock is None:
        raise InvalidSpecError(("overrides", "vsock"), "the snapshot has no vsock device")
    return VsockSpec(o.guest_cid or saved.vsock.guest_cid, o.uds_path or saved.vsock.uds_path)


def _vsock_term(e: InvalidSpecError, rs: RestoreSpec) -> InvalidSpecError:
    """A vsock error at the override that set the field, else at snapshot_dir."""
    o, attr = rs.overrides.vsock, e.path[1] if len(e.path) > 1 else None
    if o is not None and attr in ("guest_cid", "uds_path") and getattr(o, str(attr)):
        return e.at(("overrides", "vsock", str(attr)))
    return InvalidSpecError("snapshot_dir", f"the snapshot's vsock device: {e.problem}")


@contextmanager
def _override_terms(saved: VmSpec, rs: RestoreSpec) -> Iterator[None]:
    """A device error at the spec's (drives, i, attr) is reported at the
    override that put that device there, (overrides, drives, j, attr), or at
    snapshot_dir for a device as the snapshot itself names it (vsock: at
    (overrides, vsock, attr) when the override set attr)."""
    try:
        yield
    except InvalidSpecError as e:
        if e.path and e.path[0] == "vsock":
            raise _vsock_term(e, rs) from None
        if len(e.path) < 3 or e.path[0] not in ("drives", "network_interfaces"):
            raise
        kind, i, rest = e.path[0], e.path[1], e.path[2:]
        assert isinstance(i, int)
        ids: list[str | None]
        if kind == "drives":
            ids, key = [d.drive_id for d in rs.overrides.drives], saved.drives[i].drive_id
        else:
            # Only an override that set what the error is about: one that sets
            # just the MAC keeps the snapshot's tap, whose errors are the snapshot's.
            mac = rest[:1] == ("guest_mac",)
            ids = [n.iface_id if (n.guest_mac if mac else _moves_tap(n)) else None
                   for n in rs.overrides.network_interfaces]
            key = saved.network_interfaces[i].iface_id
        if key in ids:
            raise e.at(("overrides", kind, ids.index(key), *rest)) from None
        what = "drive" if kind == "drives" else "interface"
        raise InvalidSpecError("snapshot_dir", f"the snapshot's {what} {quoted(key)}: "
                               f"{e.problem}") from None


def _check_drive_sizes(spec: VmSpec, images: list[int], sizes: tuple[int, ...]) -> None:
    """The images (open, locked) are the size the snapshot's drives had."""
    for i, (d, fd, size) in enumerate(zip(spec.drives, images, sizes, strict=True)):
        now = os.fstat(fd).st_size
        if now != size:
            raise InvalidSpecError(("drives", i, "path_on_host"),
                                   f"{shown(d.path_on_host)} is {now} bytes; the snapshot's "
                                   f"drive had {size}")


def restore_vm(rs: RestoreSpec, *, kvm_path: str = "/dev/kvm",
               native_factory: NativeFactory | None = None,
               cache: snapshot.SnapshotCache | None = None) -> Vm:
    """A VM from a full snapshot, built but not started (start_restored() next).
    Guest RAM is the memory file mapped copy-on-write: nothing is read now."""
    from vmmd.vm import snapshot

    with snapshot.opened(rs.snapshot_dir, cache=cache) as (snap, memory_fd):
        return restore_from(rs, snap, memory_fd, kvm_path=kvm_path,
                            native_factory=native_factory, cache=cache)


def restore_from(rs: RestoreSpec, snap: snapshot.Snapshot, memory_fd: int, *,
                 kvm_path: str = "/dev/kvm", native_factory: NativeFactory | None = None,
                 cache: snapshot.SnapshotCache | None = None,
                 watcher: Watcher | None = None) -> Vm:
    """restore_vm() of a snapshot already open (clones open it once): its
    memory file mapped from memory_fd, the very file that was checked."""
    from vmmd.vm import snapshot
    from vmmd.vm.snapshot import state

    if snap.state.kind != snapshot.FULL:
        raise InvalidSpecError("snapshot_dir", f"{snap.directory} is a diff snapshot: merge it "
                               "onto its base first (MergeSnapshots, `vmmctl merge`)")
    # Checked once per cached snapshot: clones and repeated restores skip it.
    saved, cmdline, sizes = (cache.derived(snap, "spec", lambda: state.restore_spec(snap.state.spec))
                             if cache is not None else state.restore_spec(snap.state.spec))
    spec = _overridden(saved, rs)
    try:
        regions = ram_regions(spec.mem_bytes)
    except InvalidSpecError as e:
        raise DataLossError(f"snapshot state spec: {e}") from None
    # The state records both memory_mib and the regions: a guard, each checked against the other.
    if [(r.gpa, r.size) for r in regions] != [(m.guest_address, m.size) for m in snap.state.memory]:
        raise DataLossError("snapshot state: memory regions do not fit a VM of "
                            f"{spec.memory_mib} MiB")
    with _override_terms(saved, rs):
        drives = block.check_drives(spec.drives)
        nets = net.check_nets(spec.network_interfaces, spec.vm_id, first_slot=len(drives))
        vs = vsock.check_vsock(spec.vsock, first_slot=len(drives) + len(nets)
                               + (spec.entropy is not None))
    try:
        entropy = rng.check_entropy(spec.entropy, first_slot=len(drives) + len(nets))
    except InvalidSpecError as e:  # the snapshot's own device: the file is at fault
        raise DataLossError(f"snapshot state spec: {e}") from None
    # As the VM gets it (as plan() does): an "auto" MAC generated, every MAC written one way.
    spec = record.replace(spec, network_interfaces=tuple(n.spec for n in nets))
    with _override_terms(saved, rs), _resources(drives, nets, vs) as held, \
            _native(kvm_path, native_factory) as native:
        _check_drive_sizes(spec, held.images, sizes)
        if spec.track_dirty_pages:
            native.track_dirty()
        offset = snapshot.MEMORY_OFFSET
        for r in regions:
            native.add_ram_file(r.gpa, r.size, memory_fd, offset)
            offset += r.size
        _attach_devices(native, drives, nets, entropy, vs, held)
        native.create_vcpus(spec.vcpus, bare=True)
        snapshot.apply_state(native, snap, spec, cache, clock_realtime=rs.clock_realtime)
        if spec.acpi:  # each restore and clone a generation of its own
            vmgenid.install(native, vmgenid.new_id(snap.state.vm_generation_id))
            # Now, with every vCPU's and the IOAPIC's state in place: KVM keeps the edge
            # pending in the target LAPIC until that vCPU first runs.
            vmgenid.notify(native)
    return Vm(spec, native, cmdline=cmdline, resources=held.resources, images=held.images,
              taps=held.tap_set,
              snapshot_id=snap.state.snapshot_id, watcher=watcher,
              memory_file=MemoryFile(str(snap.memory_path), memory_fd, snap.memory_file_bytes))
