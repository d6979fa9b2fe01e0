"""Snapshot state of each component, in the snapshot file's terms.

save_X() turns what the C core saved (vmmd.native records) into the
messages of proto/vmmd/v1/snapshot.proto; restore_X() takes a message read
from a file - untrusted - checks every size, count and range, and turns it
back.  A problem raises DataLossError naming the field ("vcpus[1].lapic:
1000 bytes, want 1024").  What KVM itself must judge (register values) is
left to KVM, which the builder asks next.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.errors import DataLossError, InvalidSpecError, shown
from vmmd.native import (
    BLOB_SIZES,
    LEGACY_KBD_MAX,
    LEGACY_RX_MAX,
    MACHINE_BLOB_SIZES,
    MAX_CPUID,
    MAX_MSRS,
    VCPU_BLOBS,
    CpuidEntry,
    LegacyState,
    MachineState,
    QueueState,
    VcpuState,
    VirtioState,
)
from vmmd.spec import BootSpec, DriveSpec, EntropySpec, NetSpec, VmSpec, VsockSpec, check_vm_id
from vmmd.vm.boot.cmdline import encode_cmdline
from vmmd.vm.devices.rng import check_max_request
from vmmd.vm.hostfiles import check_path, kind_of
from vmmd.vm.layout import MAX_VCPUS

U8, U16 = 0xFF, 0xFFFF


def _bad(where: str, problem: str) -> DataLossError:
    return DataLossError(f"snapshot state {where}: {problem}")


def _blob(m: Any, name: str, size: int, where: str) -> bytes:
    data = getattr(m, name)
    if len(data) != size:
        raise _bad(f"{where}.{name}", f"{len(data)} bytes, want {size}")
    return bytes(data)


def _num(m: Any, name: str, limit: int, where: str) -> int:
    v = int(getattr(m, name))
    if not 0 <= v <= limit:
        raise _bad(f"{where}.{name}", f"{v} is outside 0..{limit}")
    return v


# ---- vCPU ----
def save_vcpu(s: VcpuState) -> spb.VcpuState:
    return spb.VcpuState(
        **{b: getattr(s, b) for b in VCPU_BLOBS}, mp_state=s.mp_state,
        msrs=[spb.Msr(index=i, data=d) for i, d in s.msrs],
        cpuid=[spb.CpuidEntry(function=e.function, index=e.index, flags=e.flags, eax=e.eax,
                              ebx=e.ebx, ecx=e.ecx, edx=e.edx) for e in s.cpuid])


def restore_vcpu(m: spb.VcpuState, where: str) -> VcpuState:
    if len(m.msrs) > MAX_MSRS:
        raise _bad(f"{where}.msrs", f"{len(m.msrs)} entries, at most {MAX_MSRS}")
    if not 0 < len(m.cpuid) <= MAX_CPUID:
        raise _bad(f"{where}.cpuid", f"{len(m.cpuid)} entries, want 1..{MAX_CPUID}")
    return VcpuState(
        **{b: _blob(m, b, BLOB_SIZES[b], where) for b in VCPU_BLOBS}, mp_state=m.mp_state,
        msrs=tuple((x.index, x.data) for x in m.msrs),
        cpuid=tuple(CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in m.cpuid))


# ---- irqchips, PIT, kvmclock ----
def save_machine(s: MachineState) -> spb.MachineState:
    return spb.MachineState(**{b: getattr(s, b) for b in MACHINE_BLOB_SIZES}, clock=s.clock,
                            realtime=s.realtime)


def restore_machine(m: spb.MachineState, created_unix_ns: int = 0) -> MachineState:
    """created_unix_ns: the snapshot's, standing in for a realtime the file
    lacks (written before it was recorded; taken a few ms from the clock)."""
    return MachineState(**{b: _blob(m, b, size, "machine") for b, size in
                           MACHINE_BLOB_SIZES.items()}, clock=m.clock,
                        realtime=m.realtime or max(created_unix_ns, 0))


# ---- virtio transports ----
_QUEUE_U16 = ("size", "last_avail", "used_idx", "signalled_used")


def save_virtio(s: VirtioState) -> spb.VirtioDevice:
    return spb.VirtioDevice(
        device_id=s.device_id, status=s.status, dev_feat_sel=s.dev_feat_sel,
        drv_feat_sel=s.drv_feat_sel, queue_sel=s.queue_sel, int_status=s.int_status,
        config_gen=s.config_gen, driver_features=s.driver_features,
        queues=[spb.VirtqueueState(desc=q.desc, avail=q.avail, used=q.used, size=q.size,
                                   last_avail=q.last_avail, used_idx=q.used_idx,
                                   signalled_used=q.signalled_used, ready=bool(q.ready),
                                   event_idx=bool(q.event_idx), indirect=bool(q.indirect))
                for q in s.queues])


def restore_virtio(m: spb.VirtioDevice, where: str, device_id: int, nqueues: int) -> VirtioState:
    """The device the spec names (block 2 / net 1) with its number of queues;
    the C transport checks the rest against the device and guest RAM."""
    if m.device_id != device_id:
        raise _bad(f"{where}.device_id", f"{m.device_id}, but the spec has a device {device_id} here")
    if len(m.queues) != nqueues:
        raise _bad(f"{where}.queues", f"{len(m.queues)} queues, the device has {nqueues}")
    queues = []
    for i, q in enumerate(m.queues):
        qw = f"{where}.queues[{i}]"
        queues.append(QueueState(
            desc=q.desc, avail=q.avail, used=q.used,
            **{f: _num(q, f, U16, qw) for f in _QUEUE_U16},
            ready=int(q.ready), event_idx=int(q.event_idx), indirect=int(q.indirect)))
    return VirtioState(
        device_id=m.device_id, status=_num(m, "status", U8, where),
        dev_feat_sel=m.dev_feat_sel, drv_feat_sel=m.drv_feat_sel, queue_sel=m.queue_sel,
        int_status=m.int_status, config_gen=m.config_gen, driver_features=m.driver_features,
        queues=tuple(queues))


# ---- UART, i8042, console position ----
_LEGACY_U8 = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "ctr", "cmd", "status_cmd", "outp")


def save_legacy(s: LegacyState) -> spb.LegacyDevices:
    return spb.LegacyDevices(
        **{f: getattr(s, f) for f in _LEGACY_U8}, thr_ipending=bool(s.thr_ipending),
        irq_level=bool(s.irq_level), rx_fifo=s.rx, kbd_buffer=s.kbd, console_head=s.console_head)


def restore_legacy(m: spb.LegacyDevices) -> LegacyState:
    if len(m.rx_fifo) > LEGACY_RX_MAX or len(m.kbd_buffer) > LEGACY_KBD_MAX:
        raise _bad("legacy", f"{len(m.rx_fifo)} UART / {len(m.kbd_buffer)} i8042 bytes queued, "
                   f"at most {LEGACY_RX_MAX} / {LEGACY_KBD_MAX}")
    return LegacyState(**{f: _num(m, f, U8, "legacy") for f in _LEGACY_U8},
                       thr_ipending=int(m.thr_ipending), irq_level=int(m.irq_level),
                       rx=bytes(m.rx_fifo), kbd=bytes(m.kbd_buffer), console_head=m.console_head)


# ---- the VM spec (what the devices were attached to) ----
def save_spec(spec: VmSpec, cmdline: str, drive_sizes: list[int]) -> spb.VmSpec:
    return spb.VmSpec(
        vm_id=spec.vm_id, kernel_path=spec.boot.kernel_path, cmdline=cmdline,
        initrd_path=spec.boot.initrd_path or "", vcpus=spec.vcpus, memory_mib=spec.memory_mib,
        track_dirty_pages=spec.track_dirty_pages, acpi=spec.acpi,
        drives=[spb.Drive(drive_id=d.drive_id, path_on_host=d.path_on_host,
                          read_only=d.read_only, is_root_device=d.is_root_device,
                          size_bytes=size)
                for d, size in zip(spec.drives, drive_sizes)],
        network_interfaces=[spb.NetworkInterface(iface_id=n.iface_id,
                                                 host_dev_name=n.host_dev_name,
                                                 guest_mac=n.guest_mac or "", netns=n.netns)
                            for n in spec.network_interfaces],
        entropy=(spb.Entropy(max_request_bytes=spec.entropy.max_request_bytes)
                 if spec.entropy is not None else None),
        vsock=(spb.Vsock(guest_cid=spec.vsock.guest_cid, uds_path=spec.vsock.uds_path)
               if spec.vsock else None))


def _saved_path(path: str, where: str, *, required: bool) -> None:
    """A path the snapshot names (kernel, initrd): the shape CreateVm takes.
    Its file is not needed to restore (a snapshot may move between hosts),
    but if it is there it must be a regular file, as CreateVm would insist."""
    if not path and not required:
        return
    check_path(path, lambda problem: _bad(where, problem))
    if not os.path.isabs(path):
        raise _bad(where, f"{shown(path)!r} is not an absolute path")
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise _bad(where, f"{shown(path)} is {kind_of(st.st_mode)}, not a kernel file")


def restore_spec(m: spb.VmSpec) -> tuple[VmSpec, str, tuple[int, ...]]:
    """The saved spec, the guest's command line and the drives' sizes.  The
    file is untrusted (only checksummed), so the spec gets the checks
    CreateVm gives one (ids, paths, command line, sizes) here, and the
    device checks in the builder, like any spec."""
    if not 1 <= m.vcpus <= MAX_VCPUS:
        raise _bad("spec.vcpus", f"{m.vcpus} is outside 1..{MAX_VCPUS}")
    try:
        check_vm_id(m.vm_id)
        encode_cmdline(m.cmdline)
    except InvalidSpecError as e:
        raise _bad(f"spec.{e.path[-1]}", e.problem) from None
    _saved_path(m.kernel_path, "spec.kernel_path", required=True)
    _saved_path(m.initrd_path, "spec.initrd_path", required=False)
    entropy = None
    if m.HasField("entropy"):
        try:
            entropy = EntropySpec(check_max_request(m.entropy.max_request_bytes))
        except ValueError as e:
            raise _bad("spec.entropy.max_request_bytes", str(e)) from None
    spec = VmSpec(
        vm_id=m.vm_id,
        boot=BootSpec(kernel_path=m.kernel_path, initrd_path=m.initrd_path or None,
                      cmdline=m.cmdline),
        vcpus=m.vcpus, memory_mib=m.memory_mib, track_dirty_pages=m.track_dirty_pages,
        acpi=m.acpi,
        drives=tuple(DriveSpec(d.drive_id, d.path_on_host, d.read_only, d.is_root_device)
                     for d in m.drives),
        network_interfaces=tuple(NetSpec(n.iface_id, n.host_dev_name, n.guest_mac or None,
                                         netns=n.netns)
                                 for n in m.network_interfaces),
        entropy=entropy,
        vsock=VsockSpec(m.vsock.guest_cid, m.vsock.uds_path) if m.HasField("vsock") else None)
    return spec, m.cmdline, tuple(d.size_bytes for d in m.drives)
