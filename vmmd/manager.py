"""The daemon's VM registry: ids -> VMs, lifecycle gating, limits, events.

Every verb on one VM runs under that VM's lock (one verb at a time per VM);
different VMs proceed in parallel.  The registry lock only guards the id
table, never a slow operation: building a VM (reading the kernel) happens
outside it, with the id reserved so a duplicate is refused at once.

The manager drives VMs only through Vm's methods and hands its callers
plain values (info.VmInfo, SnapshotInfo, BudgetInfo): the API never holds a
live VM, so the Vm behind an id could be a proxy for one in another
process.  Locks, outermost first: the registry lock (ids only), a VM's
entry lock (one verb), the Vm's own verb lock, its status lock, the C
core's control lock.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from vmmd.budget import BudgetInfo, MemoryBudget
from vmmd.cell.cells import Lease, Placement, SharedPlacement
from vmmd.errors import (
    AlreadyExistsError,
    FieldPath,
    InvalidSpecError,
    NotFoundError,
    ResourceExhaustedError,
    quoted,
)
from vmmd.events import EventHub, EventKind, LifecycleEvent, Subscription
from vmmd.info import Phase, SnapshotInfo, StopSummary, VmInfo
from vmmd.log import get_logger
from vmmd.paths import DEFAULT_MAX_VMS
from vmmd.record import Record, field
from vmmd.spec import RestoreSpec, VmSpec, check_vm_id
from vmmd.vm import snapshot
from vmmd.vm.builder import NativeFactory, build_vm, restore_from
from vmmd.vm.console import ConsoleCursor
from vmmd.vm.layout import check_memory_size
from vmmd.vm.lifecycle import allows, check_verb
from vmmd.vm.shelf import Quiet
from vmmd.vm.vm import Vm

DEFAULT_STOP_TIMEOUT_S = 10.0
STOP_POLL_S = 0.1  # how often a graceful stop's wait looks whether to give up
_RESERVED = object()


class VmEntry(Record, frozen=False):
    vm: Vm
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    stopped_at: float | None = None  # set once, with the STOPPED event (stop_lock)
    deleted: bool = False  # set under `lock`; a deleted entry is never touched again
    memory_bytes: int = 0  # reserved in the memory budget; given back at delete
    lease: Lease | None = None  # the VM's place in a cell; given back at delete
    lock: threading.RLock = field(default_factory=threading.RLock)
    stop_lock: threading.Lock = field(default_factory=threading.Lock)
    deleting: bool = False  # DeleteVm is waiting for this entry's lock

    @property
    def vm_id(self) -> str:
        return self.vm.spec.vm_id

    def uptime_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.stopped_at or time.time()) - self.started_at

    def info(self) -> VmInfo:
        """The VM as plain data, now.  NotFoundError once it was deleted."""
        phase, stop = self.vm.observe()
        counters = self.vm.counters()
        return VmInfo(vm_id=self.vm_id, phase=phase, spec=self.vm.spec, cmdline=self.vm.cmdline,
                      created_at=self.created_at, started_at=self.started_at,
                      uptime_s=self.uptime_s(), counters=counters, stop=stop,
                      cell=self.lease.info() if self.lease is not None else None)


def _cid_field(rs: RestoreSpec, clone: int | None) -> FieldPath:
    """Where a restored VM's context id came from: the override, else the snapshot."""
    o = rs.overrides.vsock
    field: FieldPath = (("overrides", "vsock", "guest_cid") if o is not None and o.guest_cid
                        else ("snapshot_dir",))
    return field if clone is None or field[0] == "snapshot_dir" else ("clones", clone, *field)


class Manager:
    def __init__(self, *, kvm_path: str = "/dev/kvm", max_vms: int = DEFAULT_MAX_VMS,
                 memory_budget: int | None = None,
                 native_factory: NativeFactory | None = None,
                 placement: Placement | None = None) -> None:
        """native_factory: makes the C core's VM (tests pass a fake);
        placement: where VMs' cores run (default: in this process)."""
        self._kvm_path = kvm_path
        self._max_vms = max_vms
        self._quiet = Quiet()  # requests being served: the shelf waits them out
        self.placement = placement or SharedPlacement(native_factory, quiet=self._quiet)
        self.memory = MemoryBudget(memory_budget)
        self.snapshots = snapshot.SnapshotCache()  # checked snapshots, for repeated restores
        self._lock = threading.Lock()
        self._vms: dict[str, VmEntry | object] = {}
        self._cids: dict[int, str] = {}  # vsock context ids in use -> the VM's id
        self.events = EventHub()
        self._closing = threading.Event()  # shutdown(): graceful waits end
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

    def _claim_cids(self, vms: list[Vm], fields: list[FieldPath]) -> None:
        """The VMs' vsock context ids, unique in the daemon: all claimed, or
        none (InvalidSpecError at that VM's field).  Claimed once the VMs
        are built: of two concurrent requests for one id, the later fails."""
        with self._lock:
            taken = dict(self._cids)
            for vm, field in zip(vms, fields, strict=True):
                v = vm.spec.vsock
                if v is None:
                    continue
                if v.guest_cid in taken:
                    raise InvalidSpecError(field, f"context id {v.guest_cid} is VM "
                                                  f"{quoted(taken[v.guest_cid])}'s already")
                taken[v.guest_cid] = vm.spec.vm_id
            self._cids = taken

    def _release_cids(self, *vm_ids: str) -> None:
        with self._lock:
            self._cids = {c: v for c, v in self._cids.items() if v not in vm_ids}

    def _unreserve(self, *vm_ids: str) -> None:
        with self._lock:
            for vm_id in vm_ids:
                del self._vms[vm_id]

    def _register(self, vm: Vm, kind: EventKind, memory_bytes: int, lease: Lease,
                  started: bool = False) -> VmEntry:
        entry = VmEntry(vm, started_at=time.time() if started else None,
                        memory_bytes=memory_bytes, lease=lease)
        vm.on_stopped(lambda info: self._publish_stop(entry, info))
        with self._lock:
            self._vms[vm.spec.vm_id] = entry
        self._publish(entry, kind)
        return entry

    def _entry(self, vm_id: str) -> VmEntry:
        with self._lock:
            entry = self._vms.get(vm_id)
        if not isinstance(entry, VmEntry):
            raise NotFoundError(f"vm_id: no VM named {quoted(vm_id)}")
        return entry

    @contextmanager
    def _locked(self, vm_id: str) -> Iterator[VmEntry]:
        """The VM under its lock, still registered once the lock is ours: a
        verb that waited behind DeleteVm must not touch the deleted VM."""
        entry = self._entry(vm_id)
        with entry.lock:
            if entry.deleted:
                raise NotFoundError(f"vm_id: VM {quoted(vm_id)} was deleted")
            yield entry

    def get(self, vm_id: str) -> VmInfo:
        return self._entry(vm_id).info()

    def list_vms(self) -> list[VmInfo]:
        """Every VM, leaving out any deleted while being listed."""
        with self._lock:
            entries = [e for e in self._vms.values() if isinstance(e, VmEntry)]
        infos = []
        for entry in entries:
            try:
                infos.append(entry.info())
            except NotFoundError:
                continue
        return infos

    def ids(self) -> list[str]:
        with self._lock:
            return [k for k, e in self._vms.items() if isinstance(e, VmEntry)]

    def new_id(self) -> str:
        return f"vm-{uuid.uuid4().hex[:12]}"

    def memory_info(self) -> BudgetInfo:
        return self.memory.info()

    # -- verbs --
    def create(self, spec: VmSpec) -> VmInfo:
        check_vm_id(spec.vm_id)
        self._reserve(spec.vm_id)
        memory = 0
        lease: Lease | None = None
        try:
            check_memory_size(spec.mem_bytes)  # a bad size says so, not "over budget"
            memory = self.memory.reserve(spec.mem_bytes)
            lease = self.placement.acquire(spec.cell, spec.limits, spec.vm_id, spec.mem_bytes)
            vm = build_vm(spec, kvm_path=self._kvm_path, native_factory=lease.factory,
                          watcher=lease.watcher)
            try:
                self._claim_cids([vm], [("vsock", "guest_cid")])
            except BaseException:
                vm.close()
                raise
        except BaseException:
            if lease is not None:
                lease.release()
            self.memory.release(memory)
            self._unreserve(spec.vm_id)
            raise
        return self._register(vm, EventKind.CREATED, memory, lease).info()

    # -- snapshots --
    def snapshot(self, vm_id: str, directory: str, *, diff: bool) -> SnapshotInfo:
        with self._locked(vm_id) as entry:
            info = entry.vm.snapshot(directory, diff=diff)
        self._publish(entry, EventKind.SNAPSHOT_TAKEN)
        return info

    def restore(self, rs: RestoreSpec, *, resume: bool) -> VmInfo:
        return self._restore([rs], resume=resume, clones=False)[0]

    def clone(self, specs: list[RestoreSpec], *, resume: bool) -> list[VmInfo]:
        """VMs from one snapshot (read once): all of them, or none and
        nothing left behind.  An error about one clone's devices is about
        ("clones", k, ...)."""
        return self._restore(specs, resume=resume, clones=True)

    def _restore(self, specs: list[RestoreSpec], *, resume: bool, clones: bool) -> list[VmInfo]:
        ids = [check_vm_id(rs.vm_id) for rs in specs]
        if len(set(ids)) != len(ids):
            raise InvalidSpecError("vm_id", "the new VMs' ids are not unique")
        self._reserve(*ids)
        vms: list[Vm] = []
        leases: list[Lease] = []
        memory = 0
        try:
            with snapshot.opened(specs[0].snapshot_dir, cache=self.snapshots) as (snap,
                                                                                   memory_fd):
                memory = self.memory.reserve(snap.ram_bytes, len(specs))
                for k, rs in enumerate(specs):
                    try:
                        leases.append(self.placement.acquire(rs.cell, rs.limits, rs.vm_id,
                                                             snap.ram_bytes))
                        vms.append(restore_from(rs, snap, memory_fd, kvm_path=self._kvm_path,
                                                native_factory=leases[-1].factory,
                                                cache=self.snapshots,
                                                watcher=leases[-1].watcher))
                    except InvalidSpecError as e:
                        if not clones or e.path[0] == "snapshot_dir":
                            raise
                        raise e.within("clones", k) from None
            self._claim_cids(vms, [_cid_field(rs, k if clones else None)
                                   for k, rs in enumerate(specs)])
            for vm in vms:
                vm.start_restored(paused=not resume)
        except BaseException:
            self._release_cids(*ids)
            for vm in vms:
                vm.close()
            for lease in leases:
                lease.release()
            self.memory.release(memory)
            self._unreserve(*ids)
            raise
        each = memory // len(vms)
        entries = [self._register(vm, EventKind.RESTORED, each, lease, started=True)
                   for vm, lease in zip(vms, leases, strict=True)]
        if resume:
            for entry in entries:
                self._publish(entry, EventKind.RESUMED)
        return [e.info() for e in entries]

    def merge(self, base_dir: str, diff_dir: str) -> SnapshotInfo:
        return snapshot.merge_snapshots(base_dir, diff_dir)

    def start(self, vm_id: str) -> VmInfo:
        with self._locked(vm_id) as entry:
            entry.vm.start()
            entry.started_at = time.time()
        self._publish(entry, EventKind.STARTED)
        return entry.info()

    def pause(self, vm_id: str) -> VmInfo:
        return self._toggle(vm_id, Vm.pause, Phase.RUNNING, EventKind.PAUSED)

    def resume(self, vm_id: str) -> VmInfo:
        return self._toggle(vm_id, Vm.resume, Phase.PAUSED, EventKind.RESUMED)

    def _toggle(self, vm_id: str, verb: Callable[[Vm], None], from_phase: Phase,
                kind: EventKind) -> VmInfo:
        """Pause/resume: idempotent, an event only when the phase changed."""
        with self._locked(vm_id) as entry:
            was = entry.vm.state
            verb(entry.vm)
        if was == from_phase:
            self._publish(entry, kind)
        return entry.info()

    def stop(self, vm_id: str, *, timeout_s: float | None = None,
             force: bool = False, gone: Callable[[], bool] = lambda: False,
             _shutdown: bool = False) -> VmInfo:
        """Graceful (Ctrl-Alt-Del, wait) then forced; the guest's own reset
        or power-off in answer counts as "stopped by API".  The wait ends
        early, forced, when the caller is gone, the daemon shuts down, or
        DeleteVm comes for the VM."""
        with self._locked(vm_id) as entry:
            vm = entry.vm
            check_verb("stop", vm.state)
            if not force and allows("shut down", vm.state):
                if timeout_s is None:
                    timeout_s = DEFAULT_STOP_TIMEOUT_S
                try:
                    vm.request_shutdown()
                except Exception:  # noqa: BLE001 - the forced path follows
                    self.log.warning("vm.cad_failed", vm_id=vm_id)
                    timeout_s = 0.0  # the guest was not asked: nothing to wait for
                deadline = time.monotonic() + timeout_s
                while vm.wait(min(STOP_POLL_S, max(0.0, deadline - time.monotonic()))) is None:
                    if time.monotonic() >= deadline or gone() or entry.deleting or \
                            (self._closing.is_set() and not _shutdown):
                        self.log.info("vm.stop_forced", vm_id=vm_id, timeout_s=timeout_s)
                        break
            vm.stop()  # publishes STOPPED (on_stopped), if the guest did not already
        return entry.info()

    def delete(self, vm_id: str) -> None:
        self._entry(vm_id).deleting = True  # a StopVm waiting on the guest gives up now
        with self._locked(vm_id) as entry:
            entry.deleted = True
            # STOPPED (on_stopped) always comes before DELETED.  KVM's teardown
            # of the VM finishes after the answer (1-15 ms measured).
            entry.vm.close(deferred=True)
            if entry.lease is not None:
                entry.lease.release()
            self.memory.release(entry.memory_bytes)
            with self._lock:
                del self._vms[vm_id]
            self._release_cids(vm_id)
        self._publish(entry, EventKind.DELETED)

    def console_input(self, vm_id: str, data: bytes) -> int:
        return self._entry(vm_id).vm.console_input(data)

    def subscribe(self, vm_id: str | None,
                  notify: Callable[[], None] | None = None) -> Subscription:
        """Lifecycle events (of one VM, or all); notify() is called from the
        publishing thread as each is queued."""
        if vm_id:
            self._entry(vm_id)
        return self.events.subscribe(vm_id or None, notify)

    def console_cursor(self, vm_id: str, *, from_start: bool) -> ConsoleCursor:
        """A reader of the VM's console (history first if from_start).  An
        unknown id fails here, before anything is read."""
        return ConsoleCursor(self._entry(vm_id).vm, from_start=from_start)

    def busy(self) -> AbstractContextManager[None]:
        """Around each request the API serves: while one runs, and for a moment
        after, nothing is prepared ahead (vmmd/vm/shelf.py)."""
        return self._quiet.busy()

    def settled(self) -> None:
        """A request that built VMs has been answered (the API calls this once the
        reply is sent): the placement may prepare the next VM now, off any request's
        path (vmmd/vm/shelf.py)."""
        self.placement.settled()

    def shutdown(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Stop every VM (graceful, in parallel, then forced) and delete them."""
        self._closing.set()
        threads = [threading.Thread(target=self._shutdown_one, args=(vm_id, timeout_s),
                                    daemon=True) for vm_id in self.ids()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.events.close_all()
        self.placement.close()

    # -- internals --
    def _shutdown_one(self, vm_id: str, timeout_s: float) -> None:
        try:
            if allows("stop", self._entry(vm_id).vm.state):
                self.stop(vm_id, timeout_s=timeout_s, _shutdown=True)
            self.delete(vm_id)
        except Exception as e:  # noqa: BLE001 - shutdown goes on for the others
            self.log.error("vm.shutdown_failed", vm_id=vm_id, error=str(e))

    def _publish_stop(self, entry: VmEntry, stop: StopSummary) -> None:
        """STOPPED, once per VM, from the thread that saw the VM stop (its
        watcher, or a stop()/close() caller): never waits for a verb."""
        with entry.stop_lock:
            if entry.stopped_at is not None:
                return
            entry.stopped_at = time.time()
        self.events.publish(LifecycleEvent(entry.vm_id, EventKind.STOPPED, reason=stop.kind,
                                           message=stop.message))

    def _publish(self, entry: VmEntry, kind: EventKind) -> None:
        self.events.publish(LifecycleEvent(entry.vm_id, kind))
