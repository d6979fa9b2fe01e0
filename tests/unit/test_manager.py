"""The Manager on fake VMs (tests/framework/fake_native.py), no KVM: lifecycle
gating, the events WatchEvents streams (manager.subscribe) and their order, how
a stop is told (STOPPED_BY_API / REBOOT / POWEROFF / CRASH), limits (max_vms,
the memory budget) and what a failed build leaves behind: nothing.

Events a verb publishes are queued before the verb returns; those of a guest
stopping itself come from the VM's watcher thread, waited for with a hang
guard (HANG_S), never a sleep."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.framework.fake_native import PAGE, FakeFactory, RunState
from vmmd.errors import (
    AlreadyExistsError,
    InvalidSpecError,
    NativeError,
    NotFoundError,
    ResourceExhaustedError,
    StateError,
)
from vmmd.events import EventKind, LifecycleEvent, Subscription
from vmmd.info import Phase, StopKind
from vmmd.manager import Manager
from vmmd.native import StopReason
from vmmd.spec import BootSpec, CellLimits, DriveSpec, MiB, RestoreSpec, VmSpec

HANG_S = 10.0
OVERHEAD = 4 * MiB  # budget.OVERHEAD_PER_VM

E = EventKind
K = StopKind


def spec(kernel: str, vm_id: str = "a", **kwargs: object) -> VmSpec:
    return VmSpec(vm_id, BootSpec(kernel), **kwargs)  # type: ignore[arg-type]


def drained(sub: Subscription) -> list[tuple[EventKind, StopKind | None]]:
    """The events queued now, as (kind, stop kind)."""
    out = []
    while (ev := sub.get(0)) is not None:
        out.append((ev.kind, ev.reason))
    return out


def next_event(sub: Subscription) -> LifecycleEvent:
    ev = sub.get(timeout=HANG_S)
    assert ev is not None, "no event within the hang guard"
    return ev


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def running(manager: Manager, kernel: str, vm_id: str = "a", **kwargs: object) -> None:
    manager.create(spec(kernel, vm_id, **kwargs))
    manager.start(vm_id)


# ---- events and their order ----
def test_lifecycle_events_in_order_and_idempotent_pause_resume(manager: Manager, kernel: str,
                                                               natives: FakeFactory) -> None:
    sub = manager.subscribe(None)
    assert manager.create(spec(kernel)).phase == Phase.CREATED
    assert manager.start("a").phase == Phase.RUNNING
    assert manager.pause("a").phase == Phase.PAUSED
    assert manager.pause("a").phase == Phase.PAUSED  # idempotent: no second PAUSED
    assert manager.resume("a").phase == Phase.RUNNING
    assert manager.resume("a").phase == Phase.RUNNING  # idempotent: no second RESUMED
    info = manager.stop("a", force=True)
    assert info.phase == Phase.STOPPED and info.stop is not None
    assert info.stop.kind == K.STOPPED_BY_API
    manager.delete("a")
    assert drained(sub) == [(E.CREATED, None), (E.STARTED, None), (E.PAUSED, None),
                            (E.RESUMED, None), (E.STOPPED, K.STOPPED_BY_API), (E.DELETED, None)]
    assert natives.last.closed


def test_a_subscription_to_one_vm_sees_only_its_events(manager: Manager, kernel: str) -> None:
    manager.create(spec(kernel, "a"))
    sub = manager.subscribe("a")
    manager.create(spec(kernel, "b"))
    manager.start("b")
    manager.start("a")
    assert drained(sub) == [(E.STARTED, None)]


@pytest.mark.parametrize(("reason", "detail", "kind", "phase", "says"), [
    (StopReason.RESET, {}, K.REBOOT, Phase.STOPPED, "guest reset (i8042 reset line)"),
    (StopReason.POWEROFF, {}, K.POWEROFF, Phase.STOPPED, "guest powered off"),
    (StopReason.HALT, {"vcpu": 0}, K.POWEROFF, Phase.STOPPED,
     "guest halted every vCPU with interrupts off on vCPU 0"),
    (StopReason.TRIPLE_FAULT, {"vcpu": 0, "rip": 0x1000}, K.CRASH, Phase.CRASHED,
     "triple fault on vCPU 0 at rip 0x1000"),
    (StopReason.EMULATION, {"vcpu": 1, "rip": 0x201258, "insn": b"\x0f\x0b"}, K.CRASH,
     Phase.CRASHED, "emulation failure on vCPU 1 at rip 0x201258, instruction bytes 0f 0b"),
    (StopReason.FAIL_ENTRY, {"vcpu": 0, "code": 0x21}, K.CRASH, Phase.CRASHED,
     "KVM entry failure on vCPU 0, hardware reason 0x21"),
    (StopReason.INTERNAL_ERROR, {"vcpu": 0, "code": 3}, K.CRASH, Phase.CRASHED,
     "KVM internal error on vCPU 0, code 3"),
    (StopReason.KVM_ERROR, {"vcpu": 0, "err": errno.EFAULT}, K.CRASH, Phase.CRASHED,
     "KVM_RUN failed on vCPU 0: Bad address"),
    (StopReason.MEMORY_FAULT, {"code": 0x5000}, K.CRASH, Phase.CRASHED,
     "at guest address 0x5000"),
])
def test_a_guest_stopping_itself_is_told_how(manager: Manager, kernel: str, natives: FakeFactory,
                                             reason: StopReason, detail: dict[str, object],
                                             kind: StopKind, phase: Phase, says: str) -> None:
    running(manager, kernel)
    sub = manager.subscribe("a")
    natives.last.guest_stops(reason, **detail)  # type: ignore[arg-type]
    ev = next_event(sub)
    assert (ev.kind, ev.reason) == (E.STOPPED, kind)
    assert says in ev.message
    info = manager.get("a")
    assert info.phase == phase
    assert info.stop is not None and (info.stop.kind, info.stop.message) == (kind, ev.message)
    assert natives.last.threads == 0  # joined by the watcher: nobody called StopVm
    with pytest.raises(StateError, match=f"cannot stop a VM that is {phase.value}"):
        manager.stop("a")
    manager.delete("a")
    assert drained(sub) == [(E.DELETED, None)]  # no second STOPPED


def test_stop_of_a_guest_that_resets_on_ctrl_alt_del_is_stopped_by_api(
        manager: Manager, kernel: str, natives: FakeFactory) -> None:
    running(manager, kernel)
    sub = manager.subscribe("a")
    t0 = time.monotonic()
    info = manager.stop("a", timeout_s=HANG_S * 6)
    assert time.monotonic() - t0 < HANG_S  # the guest answered: no waiting out the timeout
    assert natives.last.cad_sent.is_set()
    assert natives.last.stop_reason == StopReason.RESET  # the guest's own reset...
    assert info.stop is not None
    assert (info.phase, info.stop.kind) == (Phase.STOPPED, K.STOPPED_BY_API)  # ...in answer
    assert info.stop.message == "guest reset (i8042 reset line)"
    assert drained(sub) == [(E.STOPPED, K.STOPPED_BY_API)]


def test_stop_of_a_guest_that_powers_off_on_ctrl_alt_del(manager: Manager, kernel: str,
                                                         natives: FakeFactory) -> None:
    natives.on_ctrl_alt_del = "poweroff"
    running(manager, kernel)
    info = manager.stop("a", timeout_s=HANG_S * 6)
    assert info.stop is not None and info.stop.kind == K.STOPPED_BY_API
    assert natives.last.stop_reason == StopReason.POWEROFF


def test_stop_of_a_guest_ignoring_ctrl_alt_del_is_forced_after_the_timeout(
        manager: Manager, kernel: str, natives: FakeFactory) -> None:
    natives.on_ctrl_alt_del = "ignore"
    running(manager, kernel)
    sub = manager.subscribe("a")
    info = manager.stop("a", timeout_s=0.05)
    fake = natives.last
    assert fake.cad_sent.is_set()
    assert fake.names.index("send_ctrl_alt_del") < fake.names.index("stop")
    assert fake.stop_reason == StopReason.REQUESTED
    assert info.stop is not None
    assert (info.stop.kind, info.stop.message) == (K.STOPPED_BY_API, "stopped by request")
    assert drained(sub) == [(E.STOPPED, K.STOPPED_BY_API)]


@pytest.mark.parametrize("how", ["force", "paused", "ctrl-alt-del fails"])
def test_stop_without_the_graceful_step(manager: Manager, kernel: str, natives: FakeFactory,
                                        how: str) -> None:
    """Forced at once: asked to, a paused VM (no guest to answer), or when sending
    Ctrl-Alt-Del fails."""
    running(manager, kernel)
    if how == "paused":
        manager.pause("a")
    if how == "ctrl-alt-del fails":
        natives.last.fail("send_ctrl_alt_del", errno.EIO)
    t0 = time.monotonic()
    info = manager.stop("a", force=how == "force", timeout_s=HANG_S * 2)
    assert time.monotonic() - t0 < HANG_S  # nobody to wait for
    assert info.stop is not None
    assert (info.phase, info.stop.kind) == (Phase.STOPPED, K.STOPPED_BY_API)
    assert natives.last.stop_reason == StopReason.REQUESTED
    assert ("send_ctrl_alt_del" in natives.last.names) == (how == "ctrl-alt-del fails")


@pytest.mark.parametrize("phase", ["created", "running", "paused", "crashed"])
def test_delete_publishes_stopped_before_deleted_once(manager: Manager, kernel: str,
                                                      natives: FakeFactory, phase: str) -> None:
    manager.create(spec(kernel))
    sub = manager.subscribe("a")
    if phase != "created":
        manager.start("a")
    if phase == "paused":
        manager.pause("a")
    drained(sub)
    if phase == "crashed":
        natives.last.guest_stops(StopReason.TRIPLE_FAULT)
        assert next_event(sub).reason == K.CRASH
    manager.delete("a")
    want = {"created": [], "crashed": []}.get(phase, [(E.STOPPED, K.STOPPED_BY_API)])
    assert drained(sub) == [*want, (E.DELETED, None)]
    assert natives.last.closed
    with pytest.raises(NotFoundError):
        manager.get("a")


def test_delete_gives_up_the_wait_of_a_stop_on_a_guest_ignoring_ctrl_alt_del(
        manager: Manager, kernel: str, natives: FakeFactory) -> None:
    natives.on_ctrl_alt_del = "ignore"
    running(manager, kernel)
    sub = manager.subscribe("a")
    outcome: list[object] = []

    def stopper() -> None:
        try:
            outcome.append(manager.stop("a", timeout_s=3 * HANG_S))  # the guard of a hang
        except NotFoundError as e:  # DeleteVm won the race to the reply: also fine
            outcome.append(e)

    t = threading.Thread(target=stopper)
    t.start()
    assert natives.last.cad_sent.wait(HANG_S)  # StopVm holds the VM and waits on the guest
    t0 = time.monotonic()
    manager.delete("a")
    t.join(HANG_S)
    assert not t.is_alive() and time.monotonic() - t0 < HANG_S
    assert len(outcome) == 1
    assert drained(sub) == [(E.STOPPED, K.STOPPED_BY_API), (E.DELETED, None)]
    assert manager.ids() == []


def test_shutdown_stops_and_deletes_every_vm(make_manager: Callable[..., Manager], kernel: str,
                                             natives: FakeFactory) -> None:
    manager = make_manager()
    sub = manager.subscribe(None)
    manager.create(spec(kernel, "created"))
    for vm_id in ("running", "paused", "ignoring", "crashed"):
        running(manager, kernel, vm_id)
    manager.pause("paused")
    natives.vms[3].on_ctrl_alt_del = "ignore"
    crashed = manager.subscribe("crashed")
    natives.vms[4].guest_stops(StopReason.TRIPLE_FAULT)
    assert next_event(crashed).kind == E.STOPPED
    manager.shutdown(timeout_s=0.05)
    assert manager.ids() == [] and all(vm.closed for vm in natives.vms)
    assert manager.memory_info().committed_bytes == 0
    by_vm: dict[str, list[tuple[EventKind, StopKind | None]]] = {}
    while (ev := sub.get(0)) is not None:
        by_vm.setdefault(ev.vm_id, []).append((ev.kind, ev.reason))
    assert sub.closed  # shutdown ends every stream
    start = [(E.CREATED, None), (E.STARTED, None)]
    by_api = [(E.STOPPED, K.STOPPED_BY_API), (E.DELETED, None)]
    assert by_vm == {
        "created": [(E.CREATED, None), (E.DELETED, None)],
        "running": start + by_api,
        "paused": [*start, (E.PAUSED, None), *by_api],
        "ignoring": start + by_api,
        "crashed": [*start, (E.STOPPED, K.CRASH), (E.DELETED, None)],
    }
    assert natives.vms[1].stop_reason == StopReason.RESET  # asked first, and it answered
    assert natives.vms[3].stop_reason == StopReason.REQUESTED  # forced after the timeout


# ---- gating ----
def _setup(manager: Manager, kernel: str, natives: FakeFactory, phase: str) -> None:
    manager.create(spec(kernel))
    if phase == "created":
        return
    manager.start("a")
    if phase == "paused":
        manager.pause("a")
    elif phase == "stopped":
        manager.stop("a", force=True)
    elif phase == "crashed":
        sub = manager.subscribe("a")
        natives.last.guest_stops(StopReason.TRIPLE_FAULT)
        assert next_event(sub).kind == E.STOPPED


VERBS: dict[str, Callable[[Manager, Path], object]] = {
    "start": lambda m, d: m.start("a"),
    "pause": lambda m, d: m.pause("a"),
    "resume": lambda m, d: m.resume("a"),
    "stop": lambda m, d: m.stop("a", timeout_s=0),
    "snapshot": lambda m, d: m.snapshot("a", str(d / "snap"), diff=False),
    "write to the console of": lambda m, d: m.console_input("a", b"x"),
}
NATIVE_CALL = {"start": "start", "pause": "pause", "resume": "resume", "stop": "stop",
               "snapshot": "save_vcpu", "write to the console of": "console_input"}
REFUSED = [("created", v) for v in ("pause", "resume", "stop", "snapshot")] + \
    [("running", v) for v in ("start", "snapshot")] + [("paused", "start")] + \
    [(p, v) for p in ("stopped", "crashed") for v in VERBS]


@pytest.mark.parametrize(("phase", "verb"), REFUSED)
def test_a_verb_in_the_wrong_phase_is_refused_before_the_core(
        manager: Manager, kernel: str, natives: FakeFactory, tmp_path: Path, phase: str,
        verb: str) -> None:
    _setup(manager, kernel, natives, phase)
    sub = manager.subscribe("a")
    calls = len(natives.last.calls)
    with pytest.raises(StateError) as e:
        VERBS[verb](manager, tmp_path)
    assert str(e.value) == f"cannot {verb} a VM that is {phase}"
    assert NATIVE_CALL[verb] not in natives.last.names[calls:]
    assert drained(sub) == []
    assert manager.get("a").phase.value == phase


def test_a_verb_failing_in_the_core_changes_nothing(manager: Manager, kernel: str,
                                                    natives: FakeFactory) -> None:
    manager.create(spec(kernel))
    sub = manager.subscribe("a")
    natives.last.fail("start", errno.EINVAL)
    with pytest.raises(NativeError):
        manager.start("a")
    assert manager.get("a").phase == Phase.CREATED
    natives.last.heal("start")
    manager.start("a")
    natives.last.fail("pause", errno.ETIMEDOUT)
    with pytest.raises(NativeError):
        manager.pause("a")
    assert manager.get("a").phase == Phase.RUNNING
    assert drained(sub) == [(E.STARTED, None)]


UNKNOWN: dict[str, Callable[[Manager], object]] = {
    "get": lambda m: m.get("nope"),
    "start": lambda m: m.start("nope"),
    "pause": lambda m: m.pause("nope"),
    "resume": lambda m: m.resume("nope"),
    "stop": lambda m: m.stop("nope"),
    "delete": lambda m: m.delete("nope"),
    "snapshot": lambda m: m.snapshot("nope", "/tmp/x", diff=False),
    "console_input": lambda m: m.console_input("nope", b"x"),
    "console_cursor": lambda m: m.console_cursor("nope", from_start=True),
    "subscribe": lambda m: m.subscribe("nope"),
}


@pytest.mark.parametrize("verb", list(UNKNOWN))
@pytest.mark.parametrize("deleted", [False, True], ids=["never", "deleted"])
def test_an_unknown_or_deleted_id_is_not_found(manager: Manager, kernel: str, verb: str,
                                               deleted: bool) -> None:
    if deleted:
        manager.create(spec(kernel, "nope"))
        manager.delete("nope")
    with pytest.raises(NotFoundError, match="vm_id: no VM named 'nope'"):
        UNKNOWN[verb](manager)


def test_a_duplicate_id_is_refused_before_anything_is_built(manager: Manager, kernel: str,
                                                            natives: FakeFactory) -> None:
    manager.create(spec(kernel))
    sub = manager.subscribe(None)
    with pytest.raises(AlreadyExistsError, match="vm_id: a VM named 'a' exists already"):
        manager.create(spec(kernel, memory_mib=64))
    assert natives.made == 1
    assert manager.get("a").spec.memory_mib == 128  # the first one, untouched
    assert drained(sub) == []


def test_an_id_being_built_is_taken_already(make_manager: Callable[..., Manager], kernel: str,
                                            natives: FakeFactory) -> None:
    entered, go = threading.Event(), threading.Event()

    def slow(kvm_path: str):  # type: ignore[no-untyped-def]
        entered.set()
        assert go.wait(HANG_S)
        return natives(kvm_path)

    manager = make_manager(native_factory=slow)
    t = threading.Thread(target=manager.create, args=(spec(kernel),))
    t.start()
    try:
        assert entered.wait(HANG_S)
        with pytest.raises(AlreadyExistsError):
            manager.create(spec(kernel))
        assert manager.ids() == [] and manager.list_vms() == []  # not registered yet
    finally:
        go.set()
        t.join(HANG_S)
    assert manager.ids() == ["a"]


@pytest.mark.parametrize("vm_id", ["", "-a", "a b", "a\n", "a" * 65])
def test_a_bad_id_is_refused(manager: Manager, kernel: str, natives: FakeFactory,
                             vm_id: str) -> None:
    with pytest.raises(InvalidSpecError) as e:
        manager.create(spec(kernel, vm_id))
    assert e.value.field == "vm_id"
    assert natives.made == 0


# ---- limits ----
def test_max_vms(make_manager: Callable[..., Manager], kernel: str) -> None:
    manager = make_manager(max_vms=2)
    manager.create(spec(kernel, "a"))
    manager.create(spec(kernel, "b"))
    with pytest.raises(ResourceExhaustedError, match="at most 2 VMs"):
        manager.create(spec(kernel, "c"))
    manager.delete("a")
    manager.create(spec(kernel, "c"))
    assert sorted(manager.ids()) == ["b", "c"]


def test_memory_budget_is_taken_and_given_back(make_manager: Callable[..., Manager],
                                               kernel: str, natives: FakeFactory) -> None:
    each = 32 * MiB + OVERHEAD
    manager = make_manager(memory_budget=2 * each)
    manager.create(spec(kernel, "a", memory_mib=32))
    running(manager, kernel, "b", memory_mib=32)
    assert manager.memory_info().committed_bytes == 2 * each
    with pytest.raises(ResourceExhaustedError, match="memory budget"):
        manager.create(spec(kernel, "c", memory_mib=32))
    assert natives.made == 2  # refused before building
    manager.delete("b")
    assert manager.memory_info().committed_bytes == each
    manager.create(spec(kernel, "c", memory_mib=32))
    assert manager.memory_info().committed_bytes == 2 * each
    # A bad size says so, not "over budget".
    with pytest.raises(InvalidSpecError) as e:
        manager.create(spec(kernel, "d", memory_mib=8))
    assert e.value.field == "memory_mib"


BUILD_CALLS = ["create", "track_dirty", "add_ram", "create_vcpus", "add_virtio_blk",
               "load_file", "write", "set_boot_regs"]


@pytest.mark.parametrize("method", BUILD_CALLS)
def test_a_failed_build_leaves_nothing(make_manager: Callable[..., Manager], kernel: str,
                                       natives: FakeFactory, tmp_path: Path,
                                       method: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    manager = make_manager(memory_budget=1 << 40)
    sub = manager.subscribe(None)
    the_spec = spec(kernel, drives=(DriveSpec("d", str(image)),), track_dirty_pages=True)
    before = open_fds()
    natives.fail(method, errno.ENOMEM)
    with pytest.raises(NativeError) as e:
        manager.create(the_spec)
    assert e.value.errno == errno.ENOMEM
    assert open_fds() == before  # the fake's eventfds, the image's fds, the Vm's: all closed
    assert manager.ids() == [] and manager.memory_info().committed_bytes == 0
    assert all(vm.closed for vm in natives.vms)
    assert drained(sub) == []
    with image.open("rb+") as f:  # the drive's lock went with it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
    natives.clear_failures()
    assert manager.create(the_spec).phase == Phase.CREATED  # the id is free again


def test_a_refused_spec_leaves_nothing(manager: Manager, kernel: str, natives: FakeFactory,
                                       tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(InvalidSpecError) as e:
        manager.create(spec(str(tmp_path / "missing")))
    assert e.value.field == "boot.kernel_path"
    assert open_fds() == before and natives.made == 0
    assert manager.ids() == [] and manager.memory_info().committed_bytes == 0


# ---- what a VM is made of, and what it reports ----
def test_construction_order_and_guest_ram(manager: Manager, kernel: str, natives: FakeFactory,
                                          tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    info = manager.create(spec(kernel, vcpus=2, drives=(DriveSpec("d", str(image)),),
                               track_dirty_pages=True))
    fake = natives.last
    names = [n for n in fake.names if n not in ("stats", "virtio_stats")]
    assert names[:4] == ["track_dirty", "add_ram", "create_vcpus", "add_virtio_blk"]
    assert names[-1] == "set_boot_regs" and names.index("load_file") > 3
    assert [(r.gpa, r.size) for r in fake.ram] == [(0, 128 * MiB)]
    assert fake.nvcpus == 2 and fake.devices[0].options == {"read_only": False, "serial": "d"}
    assert fake.read(0x1000000, 256) == b"\xf4" * 256  # the kernel's segment, as the loader put it
    cmdline = info.cmdline.encode()
    assert fake.read(0x20000, len(cmdline) + 1) == cmdline + b"\0"
    assert f"virtio_mmio.device=4K@{fake.devices[0].mmio_base:#x}:5" in info.cmdline
    assert fake.boot_regs[0].rip != 0


def test_counters_and_console(manager: Manager, kernel: str, natives: FakeFactory,
                              tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    running(manager, kernel, drives=(DriveSpec("d", str(image)),))
    fake = natives.last
    fake.vm_stats.update(exits=10, exits_io=4, unhandled_mmio=1)
    fake.set_virtio_stats(0, requests=5, bytes_read=2048, interrupts=3)
    fake.guest_prints(b"hello\n")
    c = manager.get("a").counters
    assert (c.exits, c.exits_io, c.unhandled_mmio, c.console_bytes) == (10, 4, 1, 6)
    assert (c.devices[0].device_id, c.devices[0].requests, c.devices[0].bytes_read,
            c.devices[0].interrupts) == ("d", 5, 2048, 3)
    cursor = manager.console_cursor("a", from_start=True)
    assert cursor.read() == (b"hello\n", 0, 0)
    assert manager.console_input("a", b"ls\n") == 3
    assert bytes(fake.console_in) == b"ls\n"
    assert [v.vm_id for v in manager.list_vms()] == ["a"]


# ---- snapshots through the manager ----
def test_snapshot_restore_and_clone(manager: Manager, kernel: str, natives: FakeFactory,
                                    tmp_path: Path) -> None:
    running(manager, kernel, memory_mib=32)
    natives.last.guest_writes(0x300000, b"guest data")
    manager.pause("a")
    sub = manager.subscribe(None)
    snap = str(tmp_path / "snap")
    info = manager.snapshot("a", snap, diff=False)
    assert (info.kind, info.vm_id, info.ram_bytes) == ("full", "a", 32 * MiB)
    with pytest.raises(StateError, match="dirty-page tracking"):
        manager.snapshot("a", snap, diff=True)
    r = manager.restore(RestoreSpec(snap, "r"), resume=False)
    assert r.phase == Phase.PAUSED and r.cmdline == manager.get("a").cmdline
    restored = natives.last
    assert restored.read(0x300000, 10) == b"guest data"
    names = restored.names
    assert names.index("add_ram_file") < names.index("create_vcpus") < \
        names.index("restore_machine") < names.index("restore_vcpu") < \
        names.index("restore_legacy") < names.index("start_paused")
    assert restored.bare and restored.run_state == RunState.PAUSED
    clones = manager.clone([RestoreSpec(snap, f"c-{i}") for i in range(3)], resume=True)
    assert [c.phase for c in clones] == [Phase.RUNNING] * 3
    assert drained(sub) == [(E.SNAPSHOT_TAKEN, None), (E.RESTORED, None)] + \
        [(E.RESTORED, None)] * 3 + [(E.RESUMED, None)] * 3
    assert manager.memory_info().committed_bytes == 5 * (32 * MiB + OVERHEAD)


def test_a_restored_vm_runs_where_the_restore_says(manager: Manager, kernel: str,
                                                   tmp_path: Path) -> None:
    """The cell and its limits are the RestoreSpec's, never the snapshot's (it has none)."""
    limits = CellLimits(cpu=0.5, memory_mib=256, pids=64)
    running(manager, kernel, memory_mib=32, cell="old", limits=limits)
    manager.pause("a")
    snap = str(tmp_path / "snap")
    manager.snapshot("a", snap, diff=False)
    assert (manager.get("a").spec.cell, manager.get("a").spec.limits) == ("old", limits)
    r = manager.restore(RestoreSpec(snap, "r"), resume=False)
    assert (r.spec.cell, r.spec.limits) == ("", CellLimits())
    new = CellLimits(cpu=2.0, memory_mib=1024, pids=128)
    clones = manager.clone([RestoreSpec(snap, f"c-{i}", cell="pool", limits=new)
                            for i in range(2)], resume=False)
    assert [(c.spec.cell, c.spec.limits) for c in clones] == [("pool", new)] * 2


@pytest.mark.parametrize("failure", ["over budget", "second clone fails", "id taken"])
def test_a_failed_clone_leaves_nothing(make_manager: Callable[..., Manager], kernel: str,
                                       natives: FakeFactory, tmp_path: Path,
                                       failure: str) -> None:
    each = 32 * MiB + OVERHEAD
    manager = make_manager(memory_budget=3 * each)
    running(manager, kernel, memory_mib=32)
    manager.pause("a")
    snap = str(tmp_path / "snap")
    manager.snapshot("a", snap, diff=False)
    if failure == "id taken":
        manager.create(spec(kernel, "c-1", memory_mib=32))
    sub = manager.subscribe(None)
    ids_before, made, before = sorted(manager.ids()), natives.made, open_fds()
    committed = manager.memory_info().committed_bytes
    count = 3 if failure == "over budget" else 2
    if failure == "second clone fails":
        natives.fail("create_vcpus", errno.ENOMEM, nth=made + 1)
    expected = {"over budget": ResourceExhaustedError, "second clone fails": NativeError,
                "id taken": AlreadyExistsError}[failure]
    with pytest.raises(expected):
        manager.clone([RestoreSpec(snap, f"c-{i}") for i in range(count)], resume=True)
    assert sorted(manager.ids()) == ids_before
    assert manager.memory_info().committed_bytes == committed
    assert open_fds() == before and all(vm.closed for vm in natives.vms[made:])
    assert drained(sub) == []
    assert natives.made == made + (1 + 1 if failure == "second clone fails" else 0)


def test_a_restored_vm_keeps_the_ram_it_was_given(manager: Manager, kernel: str,
                                                  natives: FakeFactory, tmp_path: Path) -> None:
    """Writes after the restore stay in that VM (copy-on-write): the snapshot and its
    other clones still read the snapshot's bytes."""
    running(manager, kernel, memory_mib=32)
    natives.last.guest_writes(5 * PAGE, b"base")
    manager.pause("a")
    snap = str(tmp_path / "snap")
    manager.snapshot("a", snap, diff=False)
    manager.clone([RestoreSpec(snap, "c-0"), RestoreSpec(snap, "c-1")], resume=True)
    first, second = natives.vms[-2:]
    first.guest_writes(5 * PAGE, b"mine")
    assert (first.read(5 * PAGE, 4), second.read(5 * PAGE, 4)) == (b"mine", b"base")
