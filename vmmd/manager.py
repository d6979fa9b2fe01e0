"""The daemon's VM registry: ids -> VMs, lifecycle gating, limits, events.

Every verb on one VM runs under that VM's lock (one verb at a time per VM);
different VMs proceed in parallel.  The registry lock only guards the id
table, never a slow operation: building a VM (reading the kernel) happens
outside it, with the id reserved so a duplicate is refused at once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vmmd.budget import BudgetInfo, MemoryBudget
from vmmd.errors import (
    AlreadyExistsError,
    InvalidSpecError,
    NotFoundError,
    ResourceExhaustedError,
    StateError,
    quoted,
)
from vmmd.events import ApiStopReason, EventHub, EventKind, LifecycleEvent, Subscription
from vmmd.log import get_logger
from vmmd.native import Event, EventType, StopReason
from vmmd.spec import RestoreSpec, VmSpec, check_vm_id
from vmmd.vm import persist
from vmmd.vm.builder import build_vm, restore_from
from vmmd.vm.console import ConsoleCursor
from vmmd.vm.layout import check_memory_size
from vmmd.vm.lifecycle import State
from vmmd.vm.snapshot import SnapshotInfo, merge_snapshots
from vmmd.vm.vm import StopInfo, Vm

DEFAULT_STOP_TIMEOUT_S = 10.0
DEFAULT_MAX_VMS = 1024
_RESERVED = object()


def api_stop_reason(info: StopInfo, requested: bool) -> ApiStopReason:
    """How a stop is told to API users: by the API, by the guest, or a crash."""
    if not info.clean:
        return ApiStopReason.CRASH
    if requested or info.reason == StopReason.REQUESTED:
        return ApiStopReason.STOPPED_BY_API
    if info.reason == StopReason.RESET:
        return ApiStopReason.REBOOT
    return ApiStopReason.POWEROFF


@dataclass
class VmEntry:
    vm: Vm
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    stopped_at: float | None = None
    stop_requested: bool = False
    deleted: bool = False  # set under `lock`; a deleted entry is never touched again
    memory_bytes: int = 0  # reserved in the memory budget; given back at delete
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def vm_id(self) -> str:
        return self.vm.spec.vm_id

    def uptime_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.stopped_at or time.time()) - self.started_at


class Manager:
    def __init__(self, *, kvm_path: str = "/dev/kvm", max_vms: int = DEFAULT_MAX_VMS,
                 memory_budget: int | None = None) -> None:
        self._kvm_path = kvm_path
        self._max_vms = max_vms
        self.memory = MemoryBudget(memory_budget)
        self._lock = threading.Lock()
        self._vms: dict[str, VmEntry | object] = {}
        self.events = EventHub()
        self.log = get_logger(__name__)

    # -- registry --
    def _reserve(self, *vm_ids: str) -> None:
        """Claim ids for VMs being built: all of them, or none."""
        with self._lock:
            for vm_id in vm_ids:
                if vm_id in self._vms:
                    raise AlreadyExistsError(f"vm_id: a VM named {quoted(vm_id)} exists already")
            if len(self._vms) + len(vm_ids) > self._max_vms:
                raise ResourceExhaustedError(
                    f"the daemon hosts at most {self._max_vms} VMs ({len(self._vms)} now, "
                    f"{len(vm_ids)} more asked for)")
            for vm_id in vm_ids:
                self._vms[vm_id] = _RESERVED

    def _unreserve(self, *vm_ids: str) -> None:
        with self._lock:
            for vm_id in vm_ids:
                del self._vms[vm_id]

    def _register(self, vm: Vm, kind: EventKind, memory_bytes: int,
                  started: bool = False) -> VmEntry:
        entry = VmEntry(vm, started_at=time.time() if started else None,
                        memory_bytes=memory_bytes)
        vm.add_listener(lambda ev: self._on_native_event(entry, ev))
        with self._lock:
            self._vms[vm.spec.vm_id] = entry
        self._publish(entry, kind)
        return entry

    def get(self, vm_id: str) -> VmEntry:
        with self._lock:
            entry = self._vms.get(vm_id)
        if not isinstance(entry, VmEntry):
            raise NotFoundError(f"vm_id: no VM named {quoted(vm_id)}")
        return entry

    @contextmanager
    def _locked(self, vm_id: str) -> Iterator[VmEntry]:
        """The VM under its lock, still registered once the lock is ours: a
        verb that waited behind DeleteVm must not touch the deleted VM."""
        entry = self.get(vm_id)
        with entry.lock:
            if entry.deleted:
                raise NotFoundError(f"vm_id: VM {quoted(vm_id)} was deleted")
            yield entry

    def list(self) -> list[VmEntry]:
        with self._lock:
            return [e for e in self._vms.values() if isinstance(e, VmEntry)]

    def new_id(self) -> str:
        return f"vm-{uuid.uuid4().hex[:12]}"

    # -- verbs --
    def create(self, spec: VmSpec) -> VmEntry:
        check_vm_id(spec.vm_id)
        self._reserve(spec.vm_id)
        memory = 0
        try:
            check_memory_size(spec.mem_bytes)  # a bad size says so, not "over budget"
            memory = self.memory.reserve(spec.mem_bytes)
            vm = build_vm(spec, kvm_path=self._kvm_path)
        except BaseException:
            self.memory.release(memory)
            self._unreserve(spec.vm_id)
            raise
        return self._register(vm, EventKind.CREATED, memory)

    def memory_info(self) -> BudgetInfo:
        return self.memory.info()

    # -- snapshots --
    def snapshot(self, vm_id: str, directory: str, *, diff: bool) -> SnapshotInfo:
        with self._locked(vm_id) as entry:
            info = entry.vm.snapshot(directory, diff=diff)
        self._publish(entry, EventKind.SNAPSHOT_TAKEN)
        return info

    def restore(self, rs: RestoreSpec, *, resume: bool) -> VmEntry:
        return self._restore([rs], resume=resume, clones=False)[0]

    def clone(self, specs: list[RestoreSpec], *, resume: bool) -> list[VmEntry]:
        """VMs from one snapshot (read once): all of them, or none and
        nothing left behind.  An error about one clone's devices names it:
        clones[k].drives[j]..."""
        return self._restore(specs, resume=resume, clones=True)

    def _restore(self, specs: list[RestoreSpec], *, resume: bool, clones: bool) -> list[VmEntry]:
        ids = [check_vm_id(rs.vm_id) for rs in specs]
        if len(set(ids)) != len(ids):
            raise InvalidSpecError("vm_id", "the new VMs' ids are not unique")
        self._reserve(*ids)
        vms: list[Vm] = []
        memory = 0
        try:
            with persist.opened(specs[0].snapshot_dir) as (snap, memory_fd):
                memory = self.memory.reserve(snap.ram_bytes, len(specs))
                for k, rs in enumerate(specs):
                    try:
                        vms.append(restore_from(rs, snap, memory_fd, kvm_path=self._kvm_path))
                    except InvalidSpecError as e:
                        if not clones or e.field == "snapshot_dir":
                            raise
                        raise InvalidSpecError(f"clones[{k}].{e.field}", e.problem) from None
            for vm in vms:
                vm.start_restored(paused=not resume)
        except BaseException:
            for vm in vms:
                vm.close()
            self.memory.release(memory)
            self._unreserve(*ids)
            raise
        each = memory // len(vms)
        entries = [self._register(vm, EventKind.RESTORED, each, started=True) for vm in vms]
        if resume:
            for entry in entries:
                self._publish(entry, EventKind.RESUMED)
        return entries

    def merge(self, base_dir: str, diff_dir: str) -> SnapshotInfo:
        return merge_snapshots(base_dir, diff_dir)

    def start(self, vm_id: str) -> VmEntry:
        with self._locked(vm_id) as entry:
            entry.vm.start()
            entry.started_at = time.time()
        self._publish(entry, EventKind.STARTED)
        return entry

    def pause(self, vm_id: str) -> VmEntry:
        return self._toggle(vm_id, Vm.pause, State.RUNNING, EventKind.PAUSED)

    def resume(self, vm_id: str) -> VmEntry:
        return self._toggle(vm_id, Vm.resume, State.PAUSED, EventKind.RESUMED)

    def _toggle(self, vm_id: str, verb: Callable[[Vm], None], from_state: State,
                kind: EventKind) -> VmEntry:
        """Pause/resume: idempotent, an event only when the state changed."""
        with self._locked(vm_id) as entry:
            was = entry.vm.state
            verb(entry.vm)
        if was == from_state:
            self._publish(entry, kind)
        return entry

    def stop(self, vm_id: str, *, timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
             force: bool = False) -> VmEntry:
        """Graceful (Ctrl-Alt-Del, wait) then forced; the guest's own reset
        or power-off in answer counts as "stopped by API"."""
        with self._locked(vm_id) as entry:
            vm = entry.vm
            if vm.state not in (State.RUNNING, State.PAUSED):
                raise StateError(f"cannot stop a VM that is {vm.state.value}")
            entry.stop_requested = True
            if not force and vm.state == State.RUNNING:
                try:
                    vm.native.send_ctrl_alt_del()
                except Exception:  # noqa: BLE001 - the forced path follows
                    self.log.warning("vm.cad_failed", vm_id=vm_id)
                if vm.wait(timeout_s) is None:
                    self.log.info("vm.stop_forced", vm_id=vm_id, timeout_s=timeout_s)
            vm.stop()
            self._publish_stop(entry)
        return entry

    def delete(self, vm_id: str) -> None:
        with self._locked(vm_id) as entry:
            if entry.vm.state in (State.RUNNING, State.PAUSED):
                entry.stop_requested = True
            entry.deleted = True
            entry.vm.close()
            self.memory.release(entry.memory_bytes)
            self._publish_stop(entry)  # STOPPED always comes before DELETED
            with self._lock:
                del self._vms[vm_id]
        self._publish(entry, EventKind.DELETED)

    def console_input(self, vm_id: str, data: bytes) -> int:
        entry = self.get(vm_id)
        if entry.vm.state not in (State.RUNNING, State.PAUSED, State.CREATED):
            raise StateError(f"cannot write to the console of a VM that is {entry.vm.state.value}")
        return entry.vm.console_input(data)

    def subscribe(self, vm_id: str | None,
                  notify: Callable[[], None] | None = None) -> Subscription:
        """Lifecycle events (of one VM, or all); notify() is called from the
        publishing thread as each is queued."""
        if vm_id:
            self.get(vm_id)
        return self.events.subscribe(vm_id or None, notify)

    def console_cursor(self, vm_id: str, *, from_start: bool) -> ConsoleCursor:
        """A reader of the VM's console (history first if from_start).  An
        unknown id fails here, before anything is read."""
        return ConsoleCursor(self.get(vm_id).vm, from_start=from_start)

    def shutdown(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Stop every VM (graceful, in parallel, then forced) and delete them."""
        entries = self.list()
        threads = [threading.Thread(target=self._shutdown_one, args=(e, timeout_s), daemon=True)
                   for e in entries]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.events.close_all()

    # -- internals --
    def _shutdown_one(self, entry: VmEntry, timeout_s: float) -> None:
        try:
            if entry.vm.state in (State.RUNNING, State.PAUSED):
                self.stop(entry.vm_id, timeout_s=timeout_s)
            self.delete(entry.vm_id)
        except Exception as e:  # noqa: BLE001 - shutdown goes on for the others
            self.log.error("vm.shutdown_failed", vm_id=entry.vm_id, error=str(e))

    def _on_native_event(self, entry: VmEntry, ev: Event) -> None:
        if ev.type == EventType.STOPPED:
            # The watcher thread calls this before it joins the vCPUs; the
            # STOPPED event is published from _publish_stop once joined.
            threading.Thread(target=self._publish_stop, args=(entry, True), daemon=True).start()

    def _publish_stop(self, entry: VmEntry, wait: bool = False) -> None:
        """Publish STOPPED once per VM: from whichever path (the guest's own
        stop, StopVm, DeleteVm) sees the stop first."""
        info = entry.vm.wait() if wait else entry.vm.stop_info
        with entry.lock:
            if info is None or entry.stopped_at is not None:
                return
            entry.stopped_at = time.time()
            reason = api_stop_reason(info, entry.stop_requested)
            self.events.publish(LifecycleEvent(entry.vm_id, EventKind.STOPPED, reason=reason,
                                               message=info.message))

    def _publish(self, entry: VmEntry, kind: EventKind) -> None:
        self.events.publish(LifecycleEvent(entry.vm_id, kind))
