"""A running (or runnable) microVM: lifecycle, supervision, console, events.

Vm wraps the C core's VM with the lifecycle table.  The process's watcher
thread (vmmd/vm/watcher.py) wakes on the core's event and console fds: when
the guest stops itself (reset, halt, triple fault, emulation failure...) a
thread of the VM's own joins the C threads, records why, and wakes waiters.
No guest exit passes through here: only lifecycle events and console
notifications do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Self

from vmmd.errors import NotFoundError, StateError, quoted
from vmmd.info import (
    DeviceCounters,
    InterfaceCounters,
    Phase,
    SnapshotInfo,
    StopKind,
    StopSummary,
    VmCounters,
)
from vmmd.log import get_logger
from vmmd.native import Event, EventType, NativeVm, StopReason, VirtioStats, VmStats
from vmmd.record import Record
from vmmd.spec import VmSpec
from vmmd.vm.devices import vsock
from vmmd.vm.devices.net import Taps, interface_counters
from vmmd.vm.lifecycle import check_verb
from vmmd.vm.watcher import Watcher, shared

# Stops the guest chose: the microVM way to shut down.  Anything else crashed it.
CLEAN_STOPS = frozenset({StopReason.RESET, StopReason.POWEROFF, StopReason.HALT,
                         StopReason.REQUESTED})

REASON_TEXT = {
    StopReason.RESET: "guest reset (i8042 reset line)",
    StopReason.POWEROFF: "guest powered off",
    StopReason.HALT: "guest halted every vCPU with interrupts off",
    StopReason.TRIPLE_FAULT: "triple fault",
    StopReason.FAIL_ENTRY: "KVM entry failure",
    StopReason.EMULATION: "emulation failure",
    StopReason.INTERNAL_ERROR: "KVM internal error",
    StopReason.KVM_ERROR: "KVM_RUN failed",
    StopReason.REQUESTED: "stopped by request",
    StopReason.MEMORY_FAULT: "guest memory became unreadable (its backing file shrank)",
    StopReason.WORKER_DIED: "the worker process hosting the VM died",
}


class StopInfo(Record):
    """Why a VM stopped, in words a user can act on."""

    reason: StopReason
    clean: bool
    message: str

    def kind(self, requested: bool) -> StopKind:
        """As a user is told: a crash, stopped through the API (the guest's own
        reset or power-off in answer to a stop request counts), or the
        guest's reboot / power-off."""
        if not self.clean:
            return StopKind.CRASH
        if requested or self.reason == StopReason.REQUESTED:
            return StopKind.STOPPED_BY_API
        if self.reason == StopReason.RESET:
            return StopKind.REBOOT
        return StopKind.POWEROFF


def describe_stop(ev: Event | None, reason: StopReason) -> StopInfo:
    text = REASON_TEXT.get(reason, f"stopped ({reason.name})")
    if ev is not None and reason not in (StopReason.REQUESTED,):
        if ev.vcpu >= 0:
            text += f" on vCPU {ev.vcpu}"
        if ev.rip:
            text += f" at rip {ev.rip:#x}"
        if ev.insn:
            text += f", instruction bytes {ev.insn.hex(' ')}"
        if reason == StopReason.FAIL_ENTRY:
            text += f", hardware reason {ev.code:#x}"
        if reason == StopReason.INTERNAL_ERROR:
            text += f", code {ev.code}"
        if reason == StopReason.MEMORY_FAULT:
            text += f" at guest address {ev.code:#x}"
        if ev.err:
            text += f": {os.strerror(ev.err)}"
    return StopInfo(reason, reason in CLEAN_STOPS, text)


class MemoryFile:
    """The file a restored VM's RAM is mapped from (its snapshot's memory),
    kept open to tell, if the VM dies, whether someone truncated it."""

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self._fd = os.dup(fd)
        self._size = size

    def shrunk(self) -> str | None:
        """What happened to the file, in words, if it is shorter than mapped."""
        if self._fd < 0:
            return None
        now = os.fstat(self._fd).st_size
        if now >= self._size:
            return None
        return f"its memory file {self.path} was truncated to {now} bytes (mapped: {self._size})"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1



def _span_us(since_ns: int, until_ns: int) -> int:
    """Microseconds between two of the core's timestamps; 0 while either is unset."""
    return (until_ns - since_ns) // 1000 if since_ns and until_ns >= since_ns else 0

class Vm:
    def __init__(self, spec: VmSpec, native: NativeVm, *, cmdline: str | None = None,
                 resources: list[Any] | None = None, snapshot_id: str | None = None,
                 memory_file: MemoryFile | None = None, images: list[int] | None = None,
                 taps: Taps | None = None, watcher: Watcher | None = None) -> None:
        """images: the drives' open image fds, in drive order (owned by `resources`):
        their sizes go into a snapshot without opening a path again.  taps: the
        interfaces' taps (owned by `resources`), for their own counters.  watcher:
        the thread that watches the core's fds (the process's one by default)."""
        self.spec = spec
        self.cmdline = cmdline if cmdline is not None else spec.boot.cmdline or ""  # as the guest got it
        self._native = native
        self._resources = resources or []  # closed with the VM (drive locks...)
        self._memory_file = memory_file
        self._images = images or []
        self._taps = taps
        if memory_file is not None:
            self._resources.append(memory_file)
        # _lock: one verb at a time.  _status_lock (short, never held across a
        # C call): the phase and the stop info, read together by observe().
        self._lock = threading.Lock()
        self._status_lock = threading.Lock()
        self._state = Phase.CREATED
        self._stop_requested = False  # a stop came from outside (API, shutdown)
        self._stopped = threading.Event()
        self._watcher = watcher or shared()
        # _watch_lock: whether the watcher still calls _on_fds, and the thread
        # that tears the VM down after the guest stopped it (_reaper).
        self._watch_lock = threading.Lock()
        self._watched = False
        self._stopping = False  # stop() tears down itself: the watcher makes no reaper
        self._reaper: threading.Thread | None = None
        self._last_stop: Event | None = None  # the core's STOPPED event, once drained
        self._stop_info: StopInfo | None = None
        self._stop_listeners: list[Callable[[StopSummary], None]] = []
        # Called (from the watcher thread, or close()) when console output may
        # be readable, the VM stopped or it was deleted: stream readers wake.
        self._console_watchers: set[Callable[[], None]] = set()
        self._watchers_lock = threading.Lock()
        self._closed = False
        self._native_lock = threading.Lock()  # short C calls vs close(): never a destroyed VM
        # The snapshot this VM's memory was last written to (or restored from):
        # what a diff snapshot is relative to.  None: no diff possible.
        self._snapshot_id = snapshot_id
        self.log = get_logger(__name__, vm_id=spec.vm_id)

    # -- lifecycle --
    @property
    def state(self) -> Phase:
        return self._state

    def _set_phase(self, phase: Phase) -> None:
        """The phase a verb leads to - unless the VM stopped meanwhile: the
        watcher may see a guest die before the verb that started it returns."""
        with self._status_lock:
            if not self._stopped.is_set():
                self._state = phase

    def observe(self) -> tuple[Phase, StopSummary | None]:
        """The phase and how the VM stopped (None while it has not), read
        together: what an API reply shows."""
        with self._status_lock:
            phase, info = self._state, self._stop_info
        return phase, (None if info is None else
                       StopSummary(info.kind(self._stop_requested), info.message))

    def start(self) -> None:
        with self._lock:
            check_verb("start", self._state)
            self._watch()  # first: nothing the guest does is missed
            self._native.start()
            self._set_phase(Phase.RUNNING)
        self.log.info("vm.started", vcpus=self.spec.vcpus, memory_mib=self.spec.memory_mib)

    def start_restored(self, *, paused: bool = True) -> None:
        """A restored VM, PAUSED (resume() runs the guest; the C core makes its
        threads then) or running at once.  Watched either way: a paused VM
        can still stop (a snapshot that finds its memory file cut short)."""
        with self._lock:
            check_verb("start", self._state)
            self._watch()
            if paused:
                self._native.start_paused()
            else:
                self._native.start()
            self._set_phase(Phase.PAUSED if paused else Phase.RUNNING)
        self.log.info("vm.restored", vcpus=self.spec.vcpus, memory_mib=self.spec.memory_mib,
                      snapshot_id=self._snapshot_id, paused=paused)

    def snapshot(self, directory: str, *, diff: bool = False) -> SnapshotInfo:
        """Write a snapshot of this paused VM (full, or only the pages dirtied
        since its last snapshot) into directory, atomically."""
        with self._lock:
            check_verb("snapshot", self._state)
            if diff and not self._native.tracks_dirty:
                raise StateError("a diff snapshot needs dirty-page tracking: create or restore "
                                 "the VM with track_dirty_pages")
            if diff and self._snapshot_id is None:
                raise StateError("a diff snapshot needs an earlier snapshot of this VM: take a "
                                 "full one first")
            # A refused directory changes nothing (the diff chain stays).
            from vmmd.vm import snapshot  # protobuf: loaded by the first snapshot (vmmd run)

            with snapshot.writing(directory) as target:
                parent, self._snapshot_id = self._snapshot_id, None  # until this one is complete
                info = snapshot.take_snapshot(self._native, self.spec, self.cmdline, target,
                                              parent if diff else None,
                                              [os.fstat(fd).st_size for fd in self._images],
                                     backing=self._memory_file.path if self._memory_file
                                     else None)
            self._snapshot_id = info.snapshot_id
        self.log.info("vm.snapshot", kind=info.kind, dir=info.directory, ms=info.duration_s * 1e3)
        return info

    def pause(self, timeout_ms: int = 5000) -> None:
        with self._lock:
            check_verb("pause", self._state)
            self._native.pause(timeout_ms)
            with self._status_lock:
                if self._state == Phase.RUNNING and not self._stopped.is_set():
                    self._state = Phase.PAUSED

    def resume(self) -> None:
        with self._lock:
            check_verb("resume", self._state)
            self._native.resume()
            with self._status_lock:
                if self._state == Phase.PAUSED:
                    self._state = Phase.RUNNING

    def request_shutdown(self) -> None:
        """Ask the guest to shut down (Ctrl-Alt-Del through the i8042); it
        stops itself, or not (wait(), then stop())."""
        with self._lock:
            check_verb("shut down", self._state)
            self._stop_requested = True
            with self._alive() as native:
                native.send_ctrl_alt_del()

    def stop(self) -> StopInfo:
        """Force-stop now: every C thread joined.  Idempotent once stopped."""
        with self._lock:
            if self._state not in (Phase.STOPPED, Phase.CRASHED):
                check_verb("stop", self._state)
                self._stop_requested = True
                with self._watch_lock:
                    self._stopping = True
                self._native.stop()
        self._unwatch()
        return self._finish()

    def wait(self, timeout: float | None = None) -> StopInfo | None:
        """Block until the VM stopped; None on timeout."""
        if not self._stopped.wait(timeout):
            return None
        self._unwatch()
        return self._stop_info

    @property
    def stop_info(self) -> StopInfo | None:
        return self._stop_info

    def on_stopped(self, fn: Callable[[StopSummary], None]) -> None:
        """fn(how) once the VM stopped and its threads are joined, from the
        thread that saw it (the watcher, or a stop()/close() caller): it must
        not wait for a verb of this VM."""
        self._stop_listeners.append(fn)

    def watch_console(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call fn (from another thread; it must not block) whenever console
        output may have arrived, the VM stopped or was deleted; returns the
        function that ends the watch."""
        with self._watchers_lock:
            self._console_watchers.add(fn)
        return lambda: self._unwatch_console(fn)

    def _unwatch_console(self, fn: Callable[[], None]) -> None:
        with self._watchers_lock:
            self._console_watchers.discard(fn)

    def _console_changed(self) -> None:
        with self._watchers_lock:
            watchers = list(self._console_watchers)
        for fn in watchers:
            fn()

    def wait_console(self, pos: int, timeout: float) -> None:
        """Sleep until console output beyond `pos` is readable, the VM
        stopped, or `timeout` passed."""
        woken = threading.Event()
        unwatch = self.watch_console(woken.set)
        try:
            if self.console_head() == pos and not self._stopped.is_set():
                woken.wait(timeout)
        finally:
            unwatch()

    # -- observation: safe from any thread, NotFoundError once closed --
    @contextmanager
    def _alive(self) -> Iterator[NativeVm]:
        with self._native_lock:
            if self._closed:
                raise NotFoundError(f"vm_id: VM {quoted(self.spec.vm_id)} was deleted")
            yield self._native

    def stats(self) -> VmStats:
        with self._alive() as native:
            return native.stats()

    def counters(self) -> VmCounters:
        """Every counter of the VM and its devices, copied out of the C core."""
        first, nnets = len(self.spec.drives), len(self.spec.network_interfaces)
        with self._alive() as native:
            s = native.stats()
            devices = [native.virtio_stats(i) for i in range(first)]
            nets = [native.virtio_stats(first + i) for i in range(nnets)]
            rng = native.virtio_stats(first + nnets) if self.spec.entropy is not None else None
            nvirtio = first + nnets + (rng is not None)
            vs = native.virtio_stats(nvirtio) if self.spec.vsock is not None else None
        return VmCounters(
            exits=s.exits, exits_io=s.exits_io, exits_mmio=s.exits_mmio,
            exits_intr=s.exits_intr, exits_other=s.exits_other, unhandled_io=s.unhandled_io,
            unhandled_mmio=s.unhandled_mmio, console_bytes=s.console_bytes,
            console_dropped=s.console_dropped,
            devices=tuple(DeviceCounters(d.drive_id, v.requests, v.bytes_read, v.bytes_written,
                                         v.io_errors, v.bad_chains, v.interrupts)
                          for d, v in zip(self.spec.drives, devices)),
            interfaces=tuple(interface_counters(n, v, self._taps.rx_dropped(i) if self._taps else 0)
                             for i, (n, v) in enumerate(zip(self.spec.network_interfaces, nets))),
            entropy=None if rng is None else DeviceCounters(
                "entropy", rng.requests, rng.bytes_read, rng.bytes_written, rng.io_errors,
                rng.bad_chains, rng.interrupts),
            vsock=vsock.counters(vs) if vs is not None else None,
            vcpu_start_us=_span_us(s.start_ns, s.first_run_ns),
            guest_startup_us=_span_us(s.first_run_ns, s.first_output_ns))

    def drive_stats(self) -> list[VirtioStats]:
        """Counters of each drive, in the spec's order."""
        with self._alive() as native:
            return [native.virtio_stats(i) for i in range(len(self.spec.drives))]


    def interface_stats(self) -> list[InterfaceCounters]:
        """Counters of each network interface, in the spec's order."""
        return list(self.counters().interfaces)

    def thread_count(self) -> int:
        with self._alive() as native:
            return native.thread_count()

    def console_read(self, pos: int, max_bytes: int = 65536) -> tuple[bytes, int]:
        with self._alive() as native:
            return native.console_read(pos, max_bytes)

    def console_head(self) -> int:
        with self._alive() as native:
            return native.console_head()

    def console_input(self, data: bytes) -> int:
        """Bytes for the guest's UART; how many it took (its FIFO is small)."""
        check_verb("write to the console of", self._state)
        with self._alive() as native:
            return native.console_input(data)

    # -- inspection (tests, debugging): guest RAM and registers --
    def read_memory(self, gpa: int, length: int) -> bytes:
        with self._alive() as native:
            return native.read(gpa, length)

    def write_memory(self, gpa: int, data: bytes) -> None:
        with self._alive() as native:
            native.write(gpa, data)

    def registers(self, vcpu: int) -> tuple[dict[str, Any], int]:
        """A vCPU's registers and KVM mp_state; only while it is not running."""
        with self._alive() as native:
            return native.get_regs(vcpu)

    def console_to(self, fd: int) -> None:
        """Also copy the guest's console output to fd as it comes (vmmd run)."""
        with self._alive() as native:
            native.console_set_fd(fd)

    # -- teardown --
    def close(self, *, deferred: bool = False) -> None:
        """deferred: KVM's own teardown of the VM may finish after this returns
        (DeleteVm's answer does not wait for it)."""
        if self._state in (Phase.RUNNING, Phase.PAUSED):
            self.stop()
        self._unwatch()
        with self._native_lock:
            self._closed = True
            self._native.close(deferred=deferred)
        for res in self._resources:
            res.close()
        self._resources = []
        self._console_changed()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --
    def _watch(self) -> None:
        """From now on the watcher thread calls _on_fds when the core has an
        event or console output for us."""
        with self._watch_lock:
            if self._watched:
                return
            self._watcher.add(self._native.event_fd, self._on_fds)
            self._watcher.add(self._native.console_notify_fd, self._on_fds)
            self._watched = True

    def _unwatch(self) -> None:
        """No more calls of _on_fds (none running when this returns), and the
        teardown after a guest's own stop, if it began, finished."""
        with self._watch_lock:
            watched, self._watched = self._watched, False
            reaper = self._reaper
        if watched:
            self._watcher.remove(self._native.event_fd)
            self._watcher.remove(self._native.console_notify_fd)
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join()

    def _on_fds(self) -> None:
        """On the watcher thread: must not block.  Console output wakes the
        readers; the guest's stop hands the teardown to a thread of this VM."""
        try:
            os.eventfd_read(self._native.console_notify_fd)
            self._console_changed()
        except BlockingIOError:
            pass
        last_stop: Event | None = None
        while (ev := self._native.next_event()) is not None:
            self.log.debug("vm.event", type=ev.type.name, reason=ev.reason.name)
            if ev.type == EventType.STOPPED:
                last_stop = ev
        if last_stop is None:
            return
        with self._watch_lock:
            self._last_stop = last_stop  # its details (vCPU, rip...) for whoever finishes
            if not self._watched or self._stopping:
                return  # stop() or close() tears the VM down (and waits for nobody)
            self._watched = False
            self._watcher.remove(self._native.event_fd)  # from the watcher: no wait
            self._watcher.remove(self._native.console_notify_fd)
            thread = threading.Thread(target=self._reap, name=f"vm-{self.spec.vm_id}-stop",
                                      daemon=True)
            try:
                thread.start()  # under the lock: _unwatch() joins only a started thread
            except RuntimeError:  # no thread to be had (a pids limit): here, then
                pass
            else:
                self._reaper = thread
        if self._reaper is not thread:
            self._reap()

    def _reap(self) -> None:
        # The guest (or a failure) ended the VM: join its C threads here, so a
        # stopped VM holds no threads even if nobody calls stop().
        self._native.stop()
        self._finish()

    def _finish(self) -> StopInfo:
        """Record why the VM stopped (once), wake waiters, tell listeners."""
        first = False
        with self._watch_lock:
            ev = self._last_stop
        with self._status_lock:
            if self._stop_info is None:
                first = True
                info = describe_stop(ev, self._native.stop_reason)
                detail = self._native.stop_detail()
                if detail:
                    info = StopInfo(info.reason, info.clean, f"{info.message}: {detail}")
                shrunk = self._memory_file.shrunk() if self._memory_file else None
                if shrunk and not info.clean:
                    # Whatever KVM called it (PVM reports a triple fault), the guest
                    # lost its memory: say so, naming the file.
                    info = StopInfo(info.reason, False, f"{info.message}; {shrunk}")
                self._stop_info = info
                self._state = Phase.STOPPED if info.clean else Phase.CRASHED
            self._stopped.set()
            info = self._stop_info
        if first:
            level = self.log.info if info.clean else self.log.error
            level("vm.stopped", reason=info.reason.name, detail=info.message)
        self._console_changed()
        if first:
            how = StopSummary(info.kind(self._stop_requested), info.message)
            for fn in self._stop_listeners:
                try:
                    fn(how)
                except Exception:
                    self.log.exception("vm.stop_listener_failed")
        return info

