"""Protobuf <-> plain data for the API.  Parsing only: no policy, no VM.

Requests become specs (vmmd/spec.py), whose fields carry the API's own
names; replies are built from the manager's plain values (vmmd/info.py).
An InvalidSpecError's field path is then the request's path once the
request's own prefix is added (`request_error`): nothing is renamed.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from vmmd import record
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd.budget import BudgetInfo
from vmmd.errors import InvalidSpecError, quoted, shown
from vmmd.events import EventKind, LifecycleEvent
from vmmd.info import CellInfo, Phase, SnapshotInfo, StopKind, StopSummary, VmInfo
from vmmd.spec import (
    DEFAULT_MEM_MIB,
    DEFAULT_VCPUS,
    BootSpec,
    CellLimits,
    DeviceOverrides,
    DriveOverride,
    DriveSpec,
    EntropySpec,
    NetOverride,
    NetSpec,
    RestoreSpec,
    VmSpec,
    VsockOverride,
    VsockSpec,
    check_cell_name,
    check_limits,
    check_vm_id,
)

MAX_CLONES = 1024
MAX_STOP_TIMEOUT_MS = 600_000

PHASES = {
    Phase.CREATED: pb.VM_STATE_CREATED,
    Phase.RUNNING: pb.VM_STATE_RUNNING,
    Phase.PAUSED: pb.VM_STATE_PAUSED,
    Phase.STOPPED: pb.VM_STATE_STOPPED,
    Phase.CRASHED: pb.VM_STATE_CRASHED,
}

STOP_KINDS = {
    StopKind.POWEROFF: pb.STOP_REASON_POWEROFF,
    StopKind.REBOOT: pb.STOP_REASON_REBOOT,
    StopKind.CRASH: pb.STOP_REASON_CRASH,
    StopKind.STOPPED_BY_API: pb.STOP_REASON_STOPPED_BY_API,
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

SNAPSHOT_TYPES = {"full": pb.SNAPSHOT_TYPE_FULL, "diff": pb.SNAPSHOT_TYPE_DIFF}

# Where each request's spec sits in it: a CreateVm spec's fields are under
# `config`, but for vm_id (a field of the request itself).
_REQUEST_LEVEL = {"vm_id"}


def request_error(method: str, e: InvalidSpecError) -> InvalidSpecError:
    """The error at the request's own path (the one place field paths get
    the request's prefix)."""
    if method == "CreateVm" and e.path[0] not in _REQUEST_LEVEL:
        return e.within("config")
    if method == "CloneVm" and e.path[0] == "clones":
        # ("clones", k, "overrides", ...) is the k-th entry of the request's overrides.
        k, rest = e.path[1], e.path[2:]
        if rest[:1] == ("overrides",):
            return e.at(("overrides", k, *rest[1:]))
        return e.at(rest)
    return e


# ---- requests -> specs ----
def require_id(vm_id: str) -> str:
    if not vm_id:
        raise InvalidSpecError("vm_id", "is required")
    return vm_id


def stop_timeout_s(timeout_ms: int) -> float | None:
    """StopVm's graceful wait (None: the daemon's default); bounded, as every wait is."""
    if not timeout_ms:
        return None
    if timeout_ms > MAX_STOP_TIMEOUT_MS:
        raise InvalidSpecError("timeout_ms", f"{timeout_ms} is more than {MAX_STOP_TIMEOUT_MS} "
                               "(10 minutes); use force to stop at once")
    return timeout_ms / 1000


def is_diff(snapshot_type: int) -> bool:
    if snapshot_type not in (pb.SNAPSHOT_TYPE_UNSPECIFIED, pb.SNAPSHOT_TYPE_FULL,
                             pb.SNAPSHOT_TYPE_DIFF):
        raise InvalidSpecError("type", f"{snapshot_type} is not a SnapshotType (FULL, DIFF)")
    return snapshot_type == pb.SNAPSHOT_TYPE_DIFF


def _absolute(path: str, field: tuple[str | int, ...]) -> str:
    """A host path from a client: the daemon's working directory means nothing
    to it, so it must be absolute (empty: left to the spec checks)."""
    if path and not path.startswith("/"):
        raise InvalidSpecError(field, f"{shown(path)!r} is not an absolute path")
    return path


def limits_from_proto(m: pb.CellLimits) -> CellLimits:
    """A request's limits, checked (errors at ("limits", field))."""
    return check_limits(CellLimits(cpu=m.cpu, memory_mib=m.memory_mib, pids=m.pids))


def spec_from_create(req: pb.CreateVmRequest, vm_id: str) -> VmSpec:
    cfg = req.config
    boot = cfg.boot
    if not boot.kernel_path:
        raise InvalidSpecError(("boot", "kernel_path"), "is required")
    _absolute(boot.kernel_path, ("boot", "kernel_path"))
    _absolute(boot.initrd_path, ("boot", "initrd_path"))
    for i, d in enumerate(cfg.drives):
        _absolute(d.path_on_host, ("drives", i, "path_on_host"))
    return VmSpec(
        vm_id=vm_id,
        boot=BootSpec(kernel_path=boot.kernel_path, initrd_path=boot.initrd_path or None,
                      cmdline=boot.cmdline or None, cmdline_append=boot.cmdline_append or None),
        vcpus=cfg.vcpus or DEFAULT_VCPUS,
        memory_mib=cfg.memory_mib or DEFAULT_MEM_MIB,
        drives=tuple(DriveSpec(drive_id=d.drive_id, path_on_host=d.path_on_host,
                               read_only=d.read_only, is_root_device=d.is_root_device)
                     for d in cfg.drives),
        network_interfaces=tuple(NetSpec(iface_id=n.iface_id, host_dev_name=n.host_dev_name,
                                         guest_mac=n.guest_mac or None, create_tap=n.create_tap,
                                         netns=n.netns)
                                 for n in cfg.network_interfaces),
        track_dirty_pages=cfg.track_dirty_pages,
        entropy=EntropySpec(cfg.entropy.max_request_bytes) if cfg.HasField("entropy") else None,
        acpi=cfg.acpi,
        cell=check_cell_name(cfg.cell),
        limits=limits_from_proto(cfg.limits),
        vsock=(VsockSpec(cfg.vsock.guest_cid, _absolute(cfg.vsock.uds_path, ("vsock", "uds_path")))
               if cfg.HasField("vsock") else None),
    )


def _overrides(o: pb.DeviceOverrides) -> DeviceOverrides:
    for j, d in enumerate(o.drives):
        _absolute(d.path_on_host, ("overrides", "drives", j, "path_on_host"))
    return DeviceOverrides(
        drives=tuple(DriveOverride(d.drive_id, d.path_on_host) for d in o.drives),
        network_interfaces=tuple(NetOverride(n.iface_id, n.host_dev_name, n.create_tap,
                                             n.guest_mac, n.netns)
                                 for n in o.network_interfaces),
        vsock=(VsockOverride(o.vsock.guest_cid,
                             _absolute(o.vsock.uds_path, ("overrides", "vsock", "uds_path")))
               if o.HasField("vsock") else None))


def restore_spec(req: pb.RestoreVmRequest, vm_id: str) -> RestoreSpec:
    return RestoreSpec(req.snapshot_dir, vm_id, _overrides(req.overrides),
                       track_dirty_pages=req.track_dirty_pages,
                       cell=check_cell_name(req.cell), limits=limits_from_proto(req.limits),
                       clock_realtime=req.clock_realtime)


def clone_specs(req: pb.CloneVmRequest, prefix: str) -> list[RestoreSpec]:
    if not 1 <= req.count <= MAX_CLONES:
        raise InvalidSpecError("count", f"{req.count} is outside 1..{MAX_CLONES}")
    try:  # the ids made from it must be ids: the longest, and the rule's start
        check_vm_id(f"{prefix}-{req.count - 1}")
    except InvalidSpecError as e:
        raise InvalidSpecError("id_prefix", f"{quoted(prefix)} makes ids like "
                               f"{quoted(prefix + '-0')}, which {e.problem.split(' ', 1)[1]}"
                               ) from None
    if req.overrides and len(req.overrides) != req.count:
        raise InvalidSpecError("overrides", f"{len(req.overrides)} entries for {req.count} "
                               "clones: give none or one per clone")
    # One cell for all clones when named (else each its own): checked once, at the request's path.
    cell, limits = check_cell_name(req.cell), limits_from_proto(req.limits)
    return [RestoreSpec(req.snapshot_dir, f"{prefix}-{i}", _clone_overrides(req, i),
                        track_dirty_pages=req.track_dirty_pages, cell=cell, limits=limits,
                        clock_realtime=req.clock_realtime)
            for i in range(req.count)]


def _clone_overrides(req: pb.CloneVmRequest, k: int) -> DeviceOverrides:
    """The k-th clone's overrides; an error in them is about clone k (request_error
    puts it at overrides[k])."""
    if not req.overrides:
        return DeviceOverrides()
    try:
        return _overrides(req.overrides[k])
    except InvalidSpecError as e:
        raise e.within("clones", k) from None


# ---- plain data -> replies ----
def _ts(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def drive_to_proto(d: DriveSpec) -> pb.Drive:
    return pb.Drive(drive_id=d.drive_id, path_on_host=d.path_on_host, read_only=d.read_only,
                    is_root_device=d.is_root_device)


def net_to_proto(n: NetSpec) -> pb.NetworkInterface:
    return pb.NetworkInterface(iface_id=n.iface_id, host_dev_name=n.host_dev_name,
                               guest_mac=n.guest_mac or "", create_tap=n.create_tap,
                               netns=n.netns)


def limits_to_proto(limits: CellLimits) -> pb.CellLimits:
    return pb.CellLimits(cpu=limits.cpu, memory_mib=limits.memory_mib, pids=limits.pids)


def cell_to_proto(c: CellInfo) -> pb.CellInfo:
    return pb.CellInfo(name=c.name, pid=c.pid, cpu_time_s=c.cpu_time_s, rss_bytes=c.rss_bytes,
                       memory_bytes=c.memory_bytes, limits=limits_to_proto(c.limits), uid=c.uid,
                       shared=c.shared)


def config_to_proto(spec: VmSpec) -> pb.VmConfig:
    b = spec.boot
    return pb.VmConfig(
        vcpus=spec.vcpus, memory_mib=spec.memory_mib,
        boot=pb.BootSource(kernel_path=b.kernel_path, initrd_path=b.initrd_path or "",
                           cmdline=b.cmdline or "", cmdline_append=b.cmdline_append or ""),
        drives=[drive_to_proto(d) for d in spec.drives],
        network_interfaces=[net_to_proto(n) for n in spec.network_interfaces],
        track_dirty_pages=spec.track_dirty_pages, acpi=spec.acpi,
        entropy=(pb.EntropyDevice(max_request_bytes=spec.entropy.max_request_bytes)
                 if spec.entropy is not None else None),
        cell=spec.cell, limits=limits_to_proto(spec.limits),
        vsock=(pb.Vsock(guest_cid=spec.vsock.guest_cid, uds_path=spec.vsock.uds_path)
               if spec.vsock else None),
    )


def _stop(s: StopSummary) -> pb.StopInfo:
    return pb.StopInfo(reason=STOP_KINDS[s.kind], message=s.message)


def vm_to_proto(info: VmInfo) -> pb.Vm:
    c = info.counters
    msg = pb.Vm(
        vm_id=info.vm_id,
        state=PHASES[info.phase],
        config=config_to_proto(info.spec),
        created_at=_ts(info.created_at),
        started_at=_ts(info.started_at),
        uptime_ms=int(info.uptime_s * 1000),
        counters=pb.VmCounters(
            exits=c.exits, exits_io=c.exits_io, exits_mmio=c.exits_mmio,
            exits_intr=c.exits_intr, exits_other=c.exits_other,
            unhandled_io=c.unhandled_io, unhandled_mmio=c.unhandled_mmio,
            console_bytes=c.console_bytes, console_dropped=c.console_dropped,
            devices=[pb.DeviceCounters(**record.asdict(d)) for d in c.devices],
            interfaces=[pb.InterfaceCounters(**record.asdict(i)) for i in c.interfaces],
            entropy=(pb.DeviceCounters(**record.asdict(c.entropy))
                     if c.entropy is not None else None),
            vsock=pb.VsockCounters(**record.asdict(c.vsock)) if c.vsock else None,
            vcpu_start_us=c.vcpu_start_us, guest_startup_us=c.guest_startup_us,
        ),
        cmdline=info.cmdline,
    )
    if info.stop is not None:
        msg.stop.CopyFrom(_stop(info.stop))
    if info.cell is not None:
        msg.cell.CopyFrom(cell_to_proto(info.cell))
    return msg


def snapshot_to_proto(info: SnapshotInfo) -> pb.Snapshot:
    return pb.Snapshot(
        snapshot_dir=info.directory, snapshot_id=info.snapshot_id, parent_id=info.parent_id,
        type=SNAPSHOT_TYPES[info.kind], vm_id=info.vm_id, memory_bytes=info.ram_bytes,
        pages_written=info.pages_written, memory_file_bytes=info.memory_file_bytes,
        state_file_bytes=info.state_file_bytes, duration_us=int(info.duration_s * 1e6))


def budget_to_proto(b: BudgetInfo) -> pb.MemoryBudget:
    return pb.MemoryBudget(budget_bytes=b.budget_bytes, committed_bytes=b.committed_bytes,
                           overhead_per_vm_bytes=b.overhead_per_vm_bytes)


def event_to_proto(ev: LifecycleEvent) -> pb.VmEvent:
    msg = pb.VmEvent(vm_id=ev.vm_id, type=EVENT_KINDS[ev.kind], time=_ts(ev.time))
    if ev.reason is not None:
        msg.stop.CopyFrom(pb.StopInfo(reason=STOP_KINDS[ev.reason], message=ev.message))
    return msg
