"""A KVM VM made ahead of the request that needs it.

What a new VM needs before any of its configuration matters costs ~0.7 ms
of every CreateVm on our hosts (measured after a pause, as requests come):
/dev/kvm opened, the KVM VM with its TSS and identity map, the core's
eventfds, console and legacy devices (`vmm_vm_create`, ~0.3 ms), then its
RAM slots, then its vCPUs with their CPUID, which bring the irqchip and PIT
(in that order: native/vm.c, a RAM slot added after the irqchip waits out
an SRCU grace period).  A daemon can pay it between requests: the shelf
keeps one such VM and hands it to the next build.  Its thread makes the
next one in two steps, once the request that took the last one has been
answered (`refill`, from Manager.settled, which the API calls when the
call has ended):

- the KVM VM (`vmm_vm_create`) at once, as a restore needs nothing more;
- the RAM and vCPUs of the VM last taken (`builder.add_machine`), only once no
  request has run for QUIET_S (`Quiet`: the API marks each unary call busy
  through Manager.busy), and off the shelf while that runs.

Not sooner: work beside a request or its reply slows it (both ask for the
process's mmap lock and the GIL, and our hosts have 2 cores).  Measured
with the daemon: a spare with RAM and irqchip made as soon as its VM was
built took as long from the CreateVm handler as it saved; one with RAM and
vCPUs made right after CreateVm's reply slowed the client's StartVm ->
first output by 0.2-0.4 ms; and waiting for quiet before the KVM VM too
left back-to-back restores (a bench's loop) without a spare, 0.5 ms slower
each.  A request that comes before the quiet takes the spare as it is and
its build adds the RAM and vCPUs itself.

The shape is the kind of VM last taken (a function's instances are alike):
its anonymous RAM regions, dirty tracking or not, and its vCPU count.  A
build of another shape, and every restore (its RAM comes from the
snapshot's file, its vCPUs bare), gives a shaped spare back (destroyed off
the request path) and takes a fresh VM: builder._native.  After a restore
the spare stays an empty KVM VM, which the next restore uses as it is.  The
spare never has devices and has never run.

"Between requests" holds for one client's requests in turn: a request that
arrives while the spare is being made runs beside it (and, the spare not being
there yet, makes its own VM inline).

One spare, not a pool: it costs a KVM VM (~10 fds and its vCPUs', the PIT's
kernel thread, its RAM's address space, NORESERVE, but no pages; a host with
vm.overcommit_memory=2 counts that size against its commit limit all the
same) for as long as the daemon lives, and a burst of creates beyond the
first makes its VMs inline as before.  A failure to make the spare is not
an error of any request: the next take makes its VM inline, and reports
that failure to its own caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vmmd.log import get_logger
from vmmd.native import NativeVm
from vmmd.vm.builder import add_machine

log = get_logger(__name__)

# How long no request must have run before the spare gets its shape.  A client's next
# request usually follows its last within a fraction of this (CreateVm, then
# StartVm: measured, a spare made between the two slowed StartVm -> first output
# by 0.2-0.4 ms on our 2-core hosts), and the reply of the last request is sent
# within it.
QUIET_S = 0.002


class Quiet:
    """Whether the daemon is serving requests: the API marks each unary call
    `busy` (through Manager.busy); the shelf waits until none has run for a
    while.  Streams are not requests here: an open console stream is idle."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._last_end = 0.0  # time.monotonic() when the last one ended

    @contextmanager
    def busy(self) -> Iterator[None]:
        with self._cond:
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._last_end = time.monotonic()
                self._cond.notify_all()

    def wait(self, quiet_s: float, stop: Callable[[], bool]) -> None:
        """Until no request has run for quiet_s, or stop() (checked at each wake)."""
        with self._cond:
            while not stop():
                if self._running:
                    self._cond.wait()
                    continue
                left = self._last_end + quiet_s - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def wake(self) -> None:
        """Waiters look at their stop() again."""
        with self._cond:
            self._cond.notify_all()


class Shelf:
    def __init__(self, make: Callable[[str], NativeVm] = NativeVm, *,
                 quiet: Quiet | None = None, quiet_s: float = QUIET_S) -> None:
        self._make = make
        self._quiet = quiet or Quiet()
        self._quiet_s = quiet_s
        self._lock = threading.Lock()  # everything below
        self._spare: tuple[str, NativeVm] | None = None  # (kvm path, VM)
        self._path: str | None = None  # the kvm path last taken: the next spare's
        self._last: NativeVm | None = None  # the VM last taken: the next spare's shape
        self._want = False  # a refill asked for a spare: the thread makes it
        self._making = False  # the thread is making one (refill has nothing to ask)
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def take(self, kvm_path: str) -> NativeVm:
        """A fresh VM on kvm_path: the spare if it is one, else made now."""
        with self._lock:
            spare, self._spare = self._spare, None
            self._path = kvm_path
        if spare is not None and spare[0] == kvm_path:
            vm = spare[1]
        else:
            if spare is not None:
                spare[1].close(deferred=True)  # KVM's teardown off the request path
            vm = self._make(kvm_path)
        with self._lock:
            self._last = vm
        return vm

    def refill(self) -> None:
        """The request that took a VM has been answered: make the next spare, off
        the caller's thread (the first refill starts that thread: once).  Never
        raises: a request's outcome does not depend on the next one's spare."""
        with self._lock:
            if self._closed or self._spare is not None or self._making or self._path is None:
                return
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="vm-shelf", daemon=True)
                try:
                    thread.start()
                except RuntimeError as e:  # no thread to be had (pids limit): no spare
                    log.warning("shelf.no_thread", error=str(e))
                    return
                self._thread = thread
            self._want = True
            self._wake.notify()
        self._quiet.wake()  # the thread may be waiting for quiet to shape a spare

    def close(self) -> None:
        """Destroy the spare; the thread ends (not waited for: a VM it is making
        is destroyed by it)."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
            self._wake.notify()
        self._quiet.wake()  # the thread may be waiting for quiet
        if spare is not None:
            spare[1].close()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._want and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                self._want, self._making = False, True
                path = self._path
            assert path is not None  # refill asks only once a take has set it
            try:  # the KVM VM itself, at once (~0.3 ms)
                vm = self._make(path)
            except Exception as e:  # noqa: BLE001 - the next take makes its own and reports
                log.warning("shelf.make_failed", error=str(e))
                with self._lock:
                    self._making = False
                continue
            if self._shelve(path, vm):
                self._prepare()

    def _prepare(self) -> None:
        """Once no request has run for quiet_s, give the spare on the shelf the
        shape of the VM last taken (~0.4 ms): off the shelf while that runs, so a
        take in between makes its own VM."""
        with self._lock:
            last = self._last
        if last is None or last.shape is None:
            return  # the last VM taken was restored (or is still being built)
        # A take ends the wait (the spare gone: its request's refill makes the
        # next one, at once), as does a refill.
        self._quiet.wait(self._quiet_s,
                         lambda: self._closed or self._spare is None or self._want)
        with self._lock:
            if self._closed or self._spare is None:
                return  # taken meanwhile: its request's refill makes the next
            # The next VM is likely the same kind as the last (a function's
            # instances): made ahead with its RAM and vCPUs, if it was booted.
            last, self._last = self._last, None
            shape = last.shape if last is not None else None
            if shape is None:
                return
            (path, vm), self._spare = self._spare, None
            self._making = True
        try:
            add_machine(vm, shape)
            vm.prepared = shape
        except Exception as e:  # noqa: BLE001 - the next take makes its own
            log.warning("shelf.prepare_failed", error=str(e))
            vm.close()  # with what it got: another shape than any build's
            with self._lock:
                self._making = False
            return
        self._shelve(path, vm)

    def _shelve(self, path: str, vm: NativeVm) -> bool:
        """Put vm on the shelf; False: closed, or a spare is there (vm destroyed)."""
        with self._lock:
            self._making = False
            keep = not self._closed and self._spare is None
            if keep:
                self._spare = (path, vm)
        if not keep:
            vm.close()
        return keep
