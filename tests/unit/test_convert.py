"""The API's conversions (vmmd/api/convert.py), no daemon: requests -> specs and
back, replies from plain values, the refusals made while parsing, and the one
place field paths get the request's prefix (request_error)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.framework.strategies import BAD_CELLS, BAD_LIMIT_IDS, BAD_LIMITS
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd.api import convert
from vmmd.budget import BudgetInfo
from vmmd.errors import FieldPath, InvalidSpecError, render_path
from vmmd.events import EventKind, LifecycleEvent
from vmmd.info import (
    CellInfo,
    DeviceCounters,
    InterfaceCounters,
    Phase,
    SnapshotInfo,
    StopKind,
    StopSummary,
    VmCounters,
    VmInfo,
)
from vmmd.spec import (
    DEFAULT_MEM_MIB,
    DEFAULT_VCPUS,
    ID_RULE,
    MAX_CELL_MEM_MIB,
    MAX_CPU,
    MAX_PIDS,
    MIN_CELL_MEM_MIB,
    MIN_CPU,
    MIN_PIDS,
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
)

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
U32 = st.integers(1, 2**32 - 1)


def texts(min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(min_size=min_size, max_size=20)


def abs_paths() -> st.SearchStrategy[str]:
    return texts().map(lambda t: "/" + t)


def optional(s: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), s)


cell_names = st.one_of(st.just(""), st.from_regex(ID_RE, fullmatch=True))
good_limits = st.builds(
    CellLimits,
    cpu=st.one_of(st.just(0.0), st.floats(MIN_CPU, MAX_CPU)),
    memory_mib=st.one_of(st.just(0), st.integers(MIN_CELL_MEM_MIB, MAX_CELL_MEM_MIB)),
    pids=st.one_of(st.just(0), st.integers(MIN_PIDS, MAX_PIDS)))

specs = st.builds(
    VmSpec,
    vm_id=st.from_regex(ID_RE, fullmatch=True),
    boot=st.builds(BootSpec, kernel_path=abs_paths(), initrd_path=optional(abs_paths()),
                   cmdline=optional(texts(1)), cmdline_append=optional(texts(1))),
    vcpus=U32, memory_mib=U32,
    drives=st.lists(st.builds(DriveSpec, drive_id=texts(), path_on_host=abs_paths(),
                              read_only=st.booleans(), is_root_device=st.booleans()),
                    max_size=3).map(tuple),
    network_interfaces=st.lists(st.builds(NetSpec, iface_id=texts(), host_dev_name=texts(),
                                          guest_mac=optional(texts(1)),
                                          create_tap=st.booleans()), max_size=3).map(tuple),
    track_dirty_pages=st.booleans(), acpi=st.booleans(), cell=cell_names, limits=good_limits,
    entropy=optional(st.builds(EntropySpec, max_request_bytes=st.integers(0, 65536))))


def create(config: pb.VmConfig, vm_id: str = "v") -> VmSpec:
    return convert.spec_from_create(pb.CreateVmRequest(vm_id=vm_id, config=config), vm_id)


def refused(fn, *args) -> InvalidSpecError:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidSpecError) as e:
        fn(*args)
    return e.value


# ---- CreateVm ----
@given(specs)
def test_a_spec_survives_config_to_proto_and_back(spec: VmSpec) -> None:
    assert create(convert.config_to_proto(spec), spec.vm_id) == spec


@given(specs)
def test_a_config_survives_spec_from_create_and_back(spec: VmSpec) -> None:
    config = convert.config_to_proto(spec)
    assert convert.config_to_proto(create(config, spec.vm_id)) == config


def test_an_empty_config_gets_the_defaults() -> None:
    spec = create(pb.VmConfig(boot=pb.BootSource(kernel_path="/k"),
                              network_interfaces=[pb.NetworkInterface(iface_id="e",
                                                                      host_dev_name="t")]))
    assert spec == VmSpec("v", BootSpec("/k"), vcpus=DEFAULT_VCPUS, memory_mib=DEFAULT_MEM_MIB,
                          network_interfaces=(NetSpec("e", "t"),))
    assert (spec.boot.initrd_path, spec.boot.cmdline, spec.boot.cmdline_append) == (None,) * 3
    assert spec.network_interfaces[0].guest_mac is None  # generated later, not ""


@pytest.mark.parametrize(("config", "path", "says"), [
    (pb.VmConfig(), ("boot", "kernel_path"), "is required"),
    (pb.VmConfig(boot=pb.BootSource(kernel_path="vmlinux")), ("boot", "kernel_path"),
     "'vmlinux' is not an absolute path"),
    (pb.VmConfig(boot=pb.BootSource(kernel_path="/k", initrd_path="./initrd")),
     ("boot", "initrd_path"), "is not an absolute path"),
    (pb.VmConfig(boot=pb.BootSource(kernel_path="/k"), drives=[
        pb.Drive(drive_id="a", path_on_host="/a"), pb.Drive(drive_id="b", path_on_host="b")]),
     ("drives", 1, "path_on_host"), "'b' is not an absolute path"),
])
def test_create_refusals_name_the_field_under_config(config: pb.VmConfig, path: FieldPath,
                                                     says: str) -> None:
    e = refused(create, config)
    assert e.path == path and says in e.problem
    assert convert.request_error("CreateVm", e).field == "config." + render_path(path)


@given(st.text(min_size=1, max_size=30))
def test_any_relative_kernel_path_is_refused_and_any_absolute_one_taken(path: str) -> None:
    config = pb.VmConfig(boot=pb.BootSource(kernel_path=path))
    if path.startswith("/"):
        assert create(config).boot.kernel_path == path
    else:
        assert refused(create, config).path == ("boot", "kernel_path")


def test_an_empty_drive_path_is_left_to_the_spec_checks() -> None:
    spec = create(pb.VmConfig(boot=pb.BootSource(kernel_path="/k"),
                              drives=[pb.Drive(drive_id="d")]))
    assert spec.drives == (DriveSpec("d", ""),)


# ---- request_error: the request's own prefix ----
PATH_PARTS = st.one_of(st.sampled_from(["boot", "drives", "path_on_host", "memory_mib", "vcpus",
                                        "overrides", "network_interfaces", "snapshot_dir"]),
                       st.integers(0, 5))
paths = st.lists(PATH_PARTS, min_size=1, max_size=5).filter(lambda p: isinstance(p[0], str))


@given(paths)
def test_create_vm_errors_are_under_config_but_vm_id(path: list[str | int]) -> None:
    e = InvalidSpecError(tuple(path), "bad")
    out = convert.request_error("CreateVm", e)
    assert type(out) is type(e) and out.problem == "bad"
    assert out.field == ("config." + e.field if path[0] != "vm_id" else e.field)
    assert convert.request_error("CreateVm", InvalidSpecError("vm_id", "x")).field == "vm_id"


@given(st.integers(0, 1023), paths)
def test_clone_vm_errors_of_clone_k_are_at_the_k_th_override(k: int,
                                                             rest: list[str | int]) -> None:
    e = InvalidSpecError(("clones", k, "overrides", *rest), "bad")
    out = convert.request_error("CloneVm", e)
    assert out.path == ("overrides", k, *rest) and out.problem == "bad"
    assert out.field.startswith(f"overrides[{k}]")
    other = InvalidSpecError(("clones", k, "vm_id"), "bad")
    assert convert.request_error("CloneVm", other).path == ("vm_id",)


@given(st.sampled_from(["StartVm", "RestoreVm", "SnapshotVm", "MergeSnapshots", "StopVm",
                        "CloneVm"]), paths)
def test_other_errors_keep_their_path(method: str, path: list[str | int]) -> None:
    if method == "CloneVm" and path[0] == "clones":
        return
    e = InvalidSpecError(tuple(path), "bad")
    assert convert.request_error(method, e).path == e.path


# ---- RestoreVm and CloneVm ----
def overrides_pb(path: str = "/img", iface: str = "eth0") -> pb.DeviceOverrides:
    return pb.DeviceOverrides(
        drives=[pb.DriveOverride(drive_id="d", path_on_host=path)],
        network_interfaces=[pb.InterfaceOverride(iface_id=iface, host_dev_name="tap1",
                                                 create_tap=True)])


def test_restore_spec_carries_every_field() -> None:
    req = pb.RestoreVmRequest(snapshot_dir="/s", vm_id="r", resume=True,
                              overrides=overrides_pb(), track_dirty_pages=True, cell="web",
                              limits=pb.CellLimits(cpu=0.5, memory_mib=512, pids=100),
                              clock_realtime=True)
    assert convert.restore_spec(req, "r") == RestoreSpec(
        "/s", "r", DeviceOverrides((DriveOverride("d", "/img"),),
                                   (NetOverride("eth0", "tap1", True),)),
        track_dirty_pages=True, cell="web", limits=CellLimits(0.5, 512, 100),
        clock_realtime=True)


def test_a_relative_override_path_of_restore_is_at_overrides() -> None:
    e = refused(convert.restore_spec, pb.RestoreVmRequest(overrides=overrides_pb("img")), "r")
    assert convert.request_error("RestoreVm", e).field == "overrides.drives[0].path_on_host"


@pytest.mark.parametrize("count", [0, convert.MAX_CLONES + 1, 2**32 - 1])
def test_a_clone_count_out_of_range_is_refused(count: int) -> None:
    e = refused(convert.clone_specs, pb.CloneVmRequest(snapshot_dir="/s", count=count), "c")
    assert e.field == "count" and f"{count} is outside 1..{convert.MAX_CLONES}" in e.problem


@pytest.mark.parametrize("count", [1, 2, convert.MAX_CLONES])
def test_clones_are_named_prefix_dash_index(count: int) -> None:
    specs = convert.clone_specs(pb.CloneVmRequest(snapshot_dir="/s", count=count,
                                                  track_dirty_pages=True,
                                                  clock_realtime=True), "c")
    assert [s.vm_id for s in specs] == [f"c-{i}" for i in range(count)]
    assert all(s == RestoreSpec("/s", s.vm_id, DeviceOverrides(), track_dirty_pages=True,
                                clock_realtime=True)
               for s in specs)


def test_the_clock_stays_as_saved_unless_asked() -> None:
    assert not convert.restore_spec(pb.RestoreVmRequest(snapshot_dir="/s"), "r").clock_realtime
    assert not convert.clone_specs(pb.CloneVmRequest(snapshot_dir="/s", count=1),
                                   "c")[0].clock_realtime


@given(st.one_of(st.from_regex(ID_RE, fullmatch=True), st.text(max_size=70)),
       st.integers(1, convert.MAX_CLONES))
def test_an_id_prefix_is_taken_iff_every_clone_id_is_an_id(prefix: str, count: int) -> None:
    req = pb.CloneVmRequest(snapshot_dir="/s", count=count)
    good = all(ID_RE.fullmatch(f"{prefix}-{i}") for i in (0, count - 1))
    if good:
        ids = [s.vm_id for s in convert.clone_specs(req, prefix)]
        assert len(set(ids)) == count and all(ID_RE.fullmatch(i) for i in ids)
    else:
        e = refused(convert.clone_specs, req, prefix)
        assert e.field == "id_prefix" and "makes ids like" in e.problem


@pytest.mark.parametrize("n", [1, 3])
def test_overrides_are_none_or_one_per_clone(n: int) -> None:
    req = pb.CloneVmRequest(snapshot_dir="/s", count=2, overrides=[overrides_pb()] * n)
    e = refused(convert.clone_specs, req, "c")
    assert e.field == "overrides" and f"{n} entries for 2 clones" in e.problem


def test_each_clone_gets_its_own_overrides() -> None:
    req = pb.CloneVmRequest(snapshot_dir="/s", count=2,
                            overrides=[overrides_pb("/a"), overrides_pb("/b", "eth1")])
    a, b = convert.clone_specs(req, "c")
    assert a.overrides.drives == (DriveOverride("d", "/a"),)
    assert b.overrides.drives == (DriveOverride("d", "/b"),)
    assert b.overrides.network_interfaces == (NetOverride("eth1", "tap1", True),)


@pytest.mark.parametrize("k", [0, 2])
def test_a_relative_override_path_of_clone_k_is_at_overrides_k(k: int) -> None:
    overrides = [overrides_pb(f"/img{i}") for i in range(3)]
    overrides[k] = overrides_pb("img")
    e = refused(convert.clone_specs, pb.CloneVmRequest(snapshot_dir="/s", count=3,
                                                       overrides=overrides), "c")
    assert convert.request_error("CloneVm", e).field == f"overrides[{k}].drives[0].path_on_host"


# ---- small request fields ----
def test_stop_timeout_bounds() -> None:
    assert convert.stop_timeout_s(0) is None  # the daemon's default
    assert convert.stop_timeout_s(1) == 0.001
    assert convert.stop_timeout_s(convert.MAX_STOP_TIMEOUT_MS) == 600.0
    e = refused(convert.stop_timeout_s, convert.MAX_STOP_TIMEOUT_MS + 1)
    assert e.field == "timeout_ms" and "use force" in e.problem


@given(st.integers(-(2**31), 2**31 - 1))
def test_snapshot_type(value: int) -> None:
    if value in (pb.SNAPSHOT_TYPE_UNSPECIFIED, pb.SNAPSHOT_TYPE_FULL):
        assert convert.is_diff(value) is False
    elif value == pb.SNAPSHOT_TYPE_DIFF:
        assert convert.is_diff(value) is True
    else:
        e = refused(convert.is_diff, value)
        assert e.field == "type" and f"{value} is not a SnapshotType" in e.problem


def test_require_id() -> None:
    assert convert.require_id("a") == "a"
    assert str(refused(convert.require_id, "")) == "vm_id: is required"


# ---- replies ----
def test_every_phase_stop_kind_and_event_kind_has_its_proto_value() -> None:
    assert {p: pb.VmState.Name(v) for p, v in convert.PHASES.items()} == \
        {p: f"VM_STATE_{p.name}" for p in Phase}
    assert {k: pb.StopReason.Name(v) for k, v in convert.STOP_KINDS.items()} == \
        {k: f"STOP_REASON_{k.name}" for k in StopKind}
    assert {k: pb.EventType.Name(v) for k, v in convert.EVENT_KINDS.items()} == \
        {k: f"EVENT_TYPE_{k.name}" for k in EventKind}


COUNTERS = VmCounters(
    exits=1, exits_io=2, exits_mmio=3, exits_intr=4, exits_other=5, unhandled_io=6,
    unhandled_mmio=7, console_bytes=8, console_dropped=9,
    devices=(DeviceCounters("d", 10, 11, 12, 13, 14, 15),),
    interfaces=(InterfaceCounters("eth0", 20, 21, 22, 23, 24, 25, 26, 27),))


@pytest.mark.parametrize("phase", list(Phase))
def test_vm_to_proto(phase: Phase) -> None:
    spec = VmSpec("v", BootSpec("/k", cmdline="console=ttyS0"), vcpus=2, memory_mib=64)
    stopped = phase in (Phase.STOPPED, Phase.CRASHED)
    info = VmInfo(vm_id="v", phase=phase, spec=spec, cmdline="console=ttyS0 x", created_at=100.5,
                  started_at=None if phase == Phase.CREATED else 101.25, uptime_s=2.5,
                  counters=COUNTERS,
                  stop=StopSummary(StopKind.CRASH, "triple fault") if stopped else None)
    msg = convert.vm_to_proto(info)
    assert (msg.vm_id, msg.state, msg.cmdline, msg.uptime_ms) == (
        "v", convert.PHASES[phase], "console=ttyS0 x", 2500)
    assert msg.config == convert.config_to_proto(spec)
    assert msg.created_at.ToNanoseconds() == 100_500_000_000
    assert msg.HasField("started_at") == (phase != Phase.CREATED)
    assert msg.HasField("stop") == stopped
    if stopped:
        assert (msg.stop.reason, msg.stop.message) == (pb.STOP_REASON_CRASH, "triple fault")
    c = msg.counters
    assert [c.exits, c.exits_io, c.exits_mmio, c.exits_intr, c.exits_other, c.unhandled_io,
            c.unhandled_mmio, c.console_bytes, c.console_dropped] == list(range(1, 10))
    assert c.devices[0] == pb.DeviceCounters(device_id="d", requests=10, bytes_read=11,
                                             bytes_written=12, io_errors=13, bad_requests=14,
                                             interrupts=15)
    assert c.interfaces[0] == pb.InterfaceCounters(
        iface_id="eth0", rx_packets=20, rx_bytes=21, tx_packets=22, tx_bytes=23, tx_dropped=24,
        rx_dropped=25, bad_requests=26, interrupts=27)


@pytest.mark.parametrize("kind", list(EventKind))
def test_event_to_proto(kind: EventKind) -> None:
    stop = kind == EventKind.STOPPED
    ev = LifecycleEvent("v", kind, time=7.0, reason=StopKind.REBOOT if stop else None,
                        message="guest reset" if stop else "")
    msg = convert.event_to_proto(ev)
    assert (msg.vm_id, msg.type, msg.time.ToSeconds()) == ("v", convert.EVENT_KINDS[kind], 7)
    assert msg.HasField("stop") == stop
    if stop:
        assert (msg.stop.reason, msg.stop.message) == (pb.STOP_REASON_REBOOT, "guest reset")


@pytest.mark.parametrize(("kind", "type_"), [("full", pb.SNAPSHOT_TYPE_FULL),
                                             ("diff", pb.SNAPSHOT_TYPE_DIFF)])
def test_snapshot_to_proto(kind: str, type_: int) -> None:
    info = SnapshotInfo(vm_id="v", directory="/s", snapshot_id="a" * 32,
                        parent_id="b" * 32 if kind == "diff" else "", kind=kind,
                        ram_bytes=1 << 27, pages_written=5, memory_file_bytes=1 << 20,
                        state_file_bytes=4096, duration_s=0.0125)
    assert convert.snapshot_to_proto(info) == pb.Snapshot(
        snapshot_dir="/s", snapshot_id="a" * 32, parent_id=info.parent_id, type=type_, vm_id="v",
        memory_bytes=1 << 27, pages_written=5, memory_file_bytes=1 << 20, state_file_bytes=4096,
        duration_us=12500)


def test_budget_to_proto() -> None:
    assert convert.budget_to_proto(BudgetInfo(0, 5, 4)) == pb.MemoryBudget(
        budget_bytes=0, committed_bytes=5, overhead_per_vm_bytes=4)


# ---- cells: the cell's name and its limits ----
# Each request that names a cell, made with the given cell fields; (method, call, the prefix
# its errors get at the edge).
def _create_with(cell: str = "", limits: pb.CellLimits | None = None) -> None:
    create(pb.VmConfig(boot=pb.BootSource(kernel_path="/k"), cell=cell, limits=limits))


def _restore_with(cell: str = "", limits: pb.CellLimits | None = None) -> None:
    convert.restore_spec(pb.RestoreVmRequest(snapshot_dir="/s", cell=cell, limits=limits), "r")


def _clone_with(cell: str = "", limits: pb.CellLimits | None = None) -> None:
    convert.clone_specs(pb.CloneVmRequest(snapshot_dir="/s", count=3, cell=cell, limits=limits),
                        "c")


CELL_REQUESTS = [("CreateVm", _create_with, "config."), ("RestoreVm", _restore_with, ""),
                 ("CloneVm", _clone_with, "")]


def cell_refused(call, method: str, prefix: str, **fields: object) -> InvalidSpecError:  # type: ignore[no-untyped-def]
    """The refusal of a request with these cell fields, checked to be at the request's path."""
    e = refused(call, *(fields.get(k) for k in ("cell", "limits")))
    assert convert.request_error(method, e).field == prefix + e.field
    return e


@pytest.mark.parametrize(("method", "call", "prefix"), CELL_REQUESTS,
                         ids=[m for m, *_ in CELL_REQUESTS])
@pytest.mark.parametrize("cell", BAD_CELLS, ids=range(len(BAD_CELLS)))
def test_a_bad_cell_name_is_refused_at_cell(method: str, call, prefix: str,  # type: ignore[no-untyped-def]
                                            cell: str) -> None:
    e = cell_refused(call, method, prefix, cell=cell)
    assert e.path == ("cell",) and e.problem.endswith(ID_RULE)


@pytest.mark.parametrize(("method", "call", "prefix"), CELL_REQUESTS,
                         ids=[m for m, *_ in CELL_REQUESTS])
@pytest.mark.parametrize(("name", "limits", "says"), BAD_LIMITS,
                         ids=BAD_LIMIT_IDS)
def test_a_bad_limit_is_refused_at_its_field(method: str, call, prefix: str, name: str,  # type: ignore[no-untyped-def]
                                            limits: pb.CellLimits, says: str) -> None:
    e = cell_refused(call, method, prefix, limits=limits)
    assert e.path == ("limits", name) and says in e.problem


def test_cell_errors_render_at_each_request_s_path() -> None:
    """What the client reads: `config.cell` / `config.limits.cpu` on CreateVm, `cell` /
    `limits.memory_mib` on RestoreVm and CloneVm."""
    for method, call, field in [("CreateVm", _create_with, "config.cell"),
                                ("RestoreVm", _restore_with, "cell"),
                                ("CloneVm", _clone_with, "cell")]:
        assert str(convert.request_error(method, refused(call, "a b"))).startswith(f"{field}: ")
    for method, call, field in [("CreateVm", _create_with, "config.limits.cpu"),
                                ("RestoreVm", _restore_with, "limits.cpu"),
                                ("CloneVm", _clone_with, "limits.cpu")]:
        e = refused(call, "", pb.CellLimits(cpu=math.nan))
        assert str(convert.request_error(method, e)).startswith(f"{field}: nan ")
    e = refused(_restore_with, "", pb.CellLimits(memory_mib=1))
    assert str(convert.request_error("RestoreVm", e)).startswith("limits.memory_mib: 1 is ")


@given(st.one_of(st.floats(), st.sampled_from([0.0, -0.0, MIN_CPU, MAX_CPU, 5e-324,
                                               math.nextafter(MIN_CPU, 0),
                                               math.nextafter(MAX_CPU, math.inf)])))
def test_cpu_is_taken_iff_zero_or_finite_within_bounds(cpu: float) -> None:
    config = pb.VmConfig(boot=pb.BootSource(kernel_path="/k"), limits=pb.CellLimits(cpu=cpu))
    if cpu == 0 or MIN_CPU <= cpu <= MAX_CPU:  # nan compares False: refused
        assert create(config).limits == CellLimits(cpu=cpu)
    else:
        e = refused(create, config)
        assert e.path == ("limits", "cpu") and e.problem.startswith(repr(cpu))


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_memory_and_pids_are_taken_iff_zero_or_within_bounds(memory_mib: int, pids: int) -> None:
    req = pb.RestoreVmRequest(snapshot_dir="/s", limits=pb.CellLimits(memory_mib=memory_mib,
                                                                      pids=pids))
    mem_ok = memory_mib == 0 or MIN_CELL_MEM_MIB <= memory_mib <= MAX_CELL_MEM_MIB
    pids_ok = pids == 0 or MIN_PIDS <= pids <= MAX_PIDS
    if mem_ok and pids_ok:
        assert convert.restore_spec(req, "r").limits == CellLimits(0.0, memory_mib, pids)
    else:
        e = refused(convert.restore_spec, req, "r")
        assert e.path == ("limits", "memory_mib" if not mem_ok else "pids")


@given(st.one_of(st.from_regex(ID_RE, fullmatch=True), st.text(max_size=70)))
def test_a_cell_name_is_taken_iff_empty_or_an_id(cell: str) -> None:
    req = pb.CloneVmRequest(snapshot_dir="/s", count=2, cell=cell)
    if cell == "" or ID_RE.fullmatch(cell):
        assert [s.cell for s in convert.clone_specs(req, "c")] == [cell, cell]
    else:
        e = refused(convert.clone_specs, req, "c")
        assert e.path == ("cell",) and "must be 1-64 characters" in e.problem


def test_no_cell_is_a_cell_of_its_own_without_limits() -> None:
    spec = create(pb.VmConfig(boot=pb.BootSource(kernel_path="/k")))
    assert (spec.cell, spec.limits) == ("", CellLimits())
    assert convert.restore_spec(pb.RestoreVmRequest(snapshot_dir="/s"), "r").limits == \
        CellLimits()


def test_every_clone_of_a_call_goes_into_its_one_cell() -> None:
    limits = pb.CellLimits(cpu=2.5, memory_mib=4096, pids=1000)
    specs = convert.clone_specs(pb.CloneVmRequest(snapshot_dir="/s", count=3, cell="pool",
                                                  limits=limits), "c")
    assert {(s.cell, s.limits) for s in specs} == {("pool", CellLimits(2.5, 4096, 1000))}
    alone = convert.clone_specs(pb.CloneVmRequest(snapshot_dir="/s", count=3, limits=limits), "c")
    assert {(s.cell, s.limits) for s in alone} == {("", CellLimits(2.5, 4096, 1000))}


CELL = CellInfo(name="web", pid=4242, cpu_time_s=1.5, rss_bytes=3 << 20, memory_bytes=5 << 20,
                limits=CellLimits(0.25, 64, 16), uid=1001, shared=True)


@pytest.mark.parametrize("cell", [None, CELL])
def test_vm_to_proto_tells_the_cell_if_known(cell: CellInfo | None) -> None:
    info = VmInfo(vm_id="v", phase=Phase.RUNNING, spec=VmSpec("v", BootSpec("/k"), cell="web"),
                  cmdline="", created_at=1.0, started_at=2.0, uptime_s=0.0, cell=cell)
    msg = convert.vm_to_proto(info)
    assert msg.config.cell == "web"
    assert msg.HasField("cell") == (cell is not None)
    if cell is not None:
        assert msg.cell == pb.CellInfo(name="web", pid=4242, cpu_time_s=1.5, rss_bytes=3 << 20,
                                       memory_bytes=5 << 20, uid=1001, shared=True,
                                       limits=pb.CellLimits(cpu=0.25, memory_mib=64, pids=16))
