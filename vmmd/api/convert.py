"""Protobuf <-> domain conversion for the API.  Parsing only: no policy.

Spec-level errors name spec fields ("vcpus", "kernel"); here they are
renamed to the request fields a client sent ("config.vcpus",
"config.boot.kernel_path"), so INVALID_ARGUMENT messages point at the
client's own message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from google.protobuf.timestamp_pb2 import Timestamp

from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd.budget import BudgetInfo
from vmmd.errors import InvalidSpecError
from vmmd.events import ApiStopReason, EventKind, LifecycleEvent
from vmmd.manager import VmEntry, api_stop_reason
from vmmd.spec import (
    DEFAULT_MEM_MIB,
    DEFAULT_VCPUS,
    DriveOverride,
    DriveSpec,
    NetOverride,
    NetSpec,
    RestoreSpec,
    VmSpec,
)
from vmmd.vm.boot.cmdline import build_cmdline
from vmmd.vm.lifecycle import State
from vmmd.vm.snapshot import SnapshotInfo

MAX_CLONES = 1024

API_FIELDS = {
    "vm_id": "vm_id",
    "kernel": "config.boot.kernel_path",
    "initrd": "config.boot.initrd_path",
    "cmdline": "config.boot.cmdline",
    "vcpus": "config.vcpus",
    "memory": "config.memory_mib",
}

STATES = {
    State.CREATED: pb.VM_STATE_CREATED,
    State.RUNNING: pb.VM_STATE_RUNNING,
    State.PAUSED: pb.VM_STATE_PAUSED,
    State.STOPPED: pb.VM_STATE_STOPPED,
    State.CRASHED: pb.VM_STATE_CRASHED,
}

STOP_REASONS = {
    ApiStopReason.POWEROFF: pb.STOP_REASON_POWEROFF,
    ApiStopReason.REBOOT: pb.STOP_REASON_REBOOT,
    ApiStopReason.CRASH: pb.STOP_REASON_CRASH,
    ApiStopReason.STOPPED_BY_API: pb.STOP_REASON_STOPPED_BY_API,
}

EVENT_KINDS = {
    EventKind.CREATED: pb.EVENT_TYPE_CREATED,
    EventKind.STARTED: pb.EVENT_TYPE_STARTED,
    EventKind.PAUSED: pb.EVENT_TYPE_PAUSED,
    EventKind.RESUMED: pb.EVENT_TYPE_RESUMED,
    EventKind.STOPPED: pb.EVENT_TYPE_STOPPED,
    EventKind.DELETED: pb.EVENT_TYPE_DELETED,
    EventKind.SNAPSHOT_TAKEN: pb.EVENT_TYPE_SNAPSHOT_TAKEN,
    EventKind.RESTORED: pb.EVENT_TYPE_RESTORED,
}


# Spec field names inside drives[i] / nets[i] -> the request's names.
_ITEM_FIELDS = {
    "drives": ("drives", {"path": "path_on_host", "is_root": "is_root_device"}),
    "nets": ("network_interfaces", {"tap": "host_dev_name", "mac": "guest_mac"}),
}


def api_error(e: InvalidSpecError) -> InvalidSpecError:
    """The same error, naming the request field instead of the spec field:
    drives[1].path -> config.drives[1].path_on_host."""
    field = e.field
    head, _, rest = field.partition("[")
    if head in _ITEM_FIELDS:
        name, renames = _ITEM_FIELDS[head]
        index, _, attr = rest.partition("].")
        field = f"config.{name}" + (f"[{index}].{renames.get(attr, attr)}" if rest else "")
    return InvalidSpecError(API_FIELDS.get(field, field), e.problem)


@contextmanager
def restore_errors() -> Iterator[None]:
    """RestoreVm/CloneVm: an error about drives[j] / nets[j] is about overrides[j]."""
    try:
        yield
    except InvalidSpecError as e:
        field, overrides = e.field, "overrides"
        if field.startswith("clones["):  # clones[k].drives[j].path: the k-th clone's overrides
            clone, _, field = field.partition("].")
            overrides = f"overrides[{clone.removeprefix('clones[')}]"
        for spec_name, (api_name, renames) in _ITEM_FIELDS.items():
            if field.startswith(spec_name + "["):
                index, _, attr = field[len(spec_name) + 1:].partition("].")
                field = f"{overrides}.{api_name}[{index}].{renames.get(attr, attr)}"
        raise InvalidSpecError(field, e.problem) from None


def _overrides(o: pb.DeviceOverrides) -> dict[str, tuple]:  # type: ignore[type-arg]
    return {
        "drives": tuple(DriveOverride(d.drive_id, d.path_on_host) for d in o.drives),
        "nets": tuple(NetOverride(n.iface_id, n.host_dev_name, n.create_tap)
                      for n in o.network_interfaces),
    }


def restore_spec(req: pb.RestoreVmRequest, vm_id: str) -> RestoreSpec:
    return RestoreSpec(req.snapshot_dir, vm_id, track_dirty=req.track_dirty_pages,
                       **_overrides(req.overrides))


def clone_specs(req: pb.CloneVmRequest, prefix: str) -> list[RestoreSpec]:
    if not 1 <= req.count <= MAX_CLONES:
        raise InvalidSpecError("count", f"{req.count} is outside 1..{MAX_CLONES}")
    if req.overrides and len(req.overrides) != req.count:
        raise InvalidSpecError("overrides", f"{len(req.overrides)} entries for {req.count} "
                               "clones: give none or one per clone")
    return [RestoreSpec(req.snapshot_dir, f"{prefix}-{i}", track_dirty=req.track_dirty_pages,
                        **(_overrides(req.overrides[i]) if req.overrides else {}))
            for i in range(req.count)]


SNAPSHOT_TYPES = {"full": pb.SNAPSHOT_TYPE_FULL, "diff": pb.SNAPSHOT_TYPE_DIFF}


def snapshot_to_proto(info: SnapshotInfo) -> pb.Snapshot:
    return pb.Snapshot(
        snapshot_dir=info.directory, snapshot_id=info.snapshot_id, parent_id=info.parent_id,
        type=SNAPSHOT_TYPES[info.kind], vm_id=info.vm_id, memory_bytes=info.ram_bytes,
        pages_written=info.pages_written, memory_file_bytes=info.memory_file_bytes,
        state_file_bytes=info.state_file_bytes, duration_us=int(info.duration_s * 1e6))


def require_id(vm_id: str) -> str:
    if not vm_id:
        raise InvalidSpecError("vm_id", "is required")
    return vm_id


def spec_from_create(req: pb.CreateVmRequest, vm_id: str) -> VmSpec:
    cfg = req.config
    boot = cfg.boot
    if not boot.kernel_path:
        raise InvalidSpecError("config.boot.kernel_path", "is required")
    try:
        cmdline = build_cmdline(boot.cmdline or None, boot.cmdline_append or None)
    except InvalidSpecError as e:
        raise api_error(e) from None
    return VmSpec(
        vm_id=vm_id,
        kernel=boot.kernel_path,
        initrd=boot.initrd_path or None,
        cmdline=cmdline,
        vcpus=cfg.vcpus or DEFAULT_VCPUS,
        mem_mib=cfg.memory_mib or DEFAULT_MEM_MIB,
        drives=tuple(DriveSpec(drive_id=d.drive_id, path=d.path_on_host, read_only=d.read_only,
                               is_root=d.is_root_device) for d in cfg.drives),
        nets=tuple(NetSpec(iface_id=n.iface_id, tap=n.host_dev_name, mac=n.guest_mac or None,
                           create_tap=n.create_tap) for n in cfg.network_interfaces),
        track_dirty=cfg.track_dirty_pages,
    )


def _ts(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def config_to_proto(spec: VmSpec) -> pb.VmConfig:
    return pb.VmConfig(
        vcpus=spec.vcpus, memory_mib=spec.mem_mib,
        boot=pb.BootSource(kernel_path=spec.kernel, initrd_path=spec.initrd or "",
                           cmdline=spec.cmdline),
        drives=[pb.Drive(drive_id=d.drive_id, path_on_host=d.path, read_only=d.read_only,
                         is_root_device=d.is_root) for d in spec.drives],
        network_interfaces=[pb.NetworkInterface(iface_id=n.iface_id, host_dev_name=n.tap,
                                                guest_mac=n.mac or "", create_tap=n.create_tap)
                            for n in spec.nets],
        track_dirty_pages=spec.track_dirty,
    )


def vm_to_proto(entry: VmEntry) -> pb.Vm:
    vm = entry.vm
    s = vm.stats()
    msg = pb.Vm(
        vm_id=entry.vm_id,
        state=STATES[vm.state],
        config=config_to_proto(vm.spec),
        created_at=_ts(entry.created_at),
        started_at=_ts(entry.started_at),
        uptime_ms=int(entry.uptime_s() * 1000),
        counters=pb.VmCounters(
            exits=s.exits, exits_io=s.exits_io, exits_mmio=s.exits_mmio,
            exits_intr=s.exits_intr, exits_other=s.exits_other,
            unhandled_io=s.unhandled_io, unhandled_mmio=s.unhandled_mmio,
            console_bytes=s.console_bytes, console_dropped=s.console_dropped,
            devices=[pb.DeviceCounters(
                device_id=d.drive_id, requests=ds.requests, bytes_read=ds.bytes_read,
                bytes_written=ds.bytes_written, io_errors=ds.io_errors,
                bad_requests=ds.bad_chains, interrupts=ds.interrupts)
                for d, ds in zip(vm.spec.drives, vm.drive_stats())],
            interfaces=[pb.InterfaceCounters(**dataclasses.asdict(i))
                        for i in vm.interface_stats()],
        ),
        cmdline=vm.cmdline,
    )
    info = vm.stop_info
    if info is not None:
        msg.stop.CopyFrom(pb.StopInfo(
            reason=STOP_REASONS[api_stop_reason(info, entry.stop_requested)],
            message=info.message))
    return msg


def budget_to_proto(b: BudgetInfo) -> pb.MemoryBudget:
    return pb.MemoryBudget(budget_bytes=b.budget_bytes, committed_bytes=b.committed_bytes,
                           overhead_per_vm_bytes=b.overhead_per_vm_bytes)


def event_to_proto(ev: LifecycleEvent) -> pb.VmEvent:
    msg = pb.VmEvent(vm_id=ev.vm_id, type=EVENT_KINDS[ev.kind], time=_ts(ev.time))
    if ev.reason is not None:
        msg.stop.CopyFrom(pb.StopInfo(reason=STOP_REASONS[ev.reason], message=ev.message))
    return msg
