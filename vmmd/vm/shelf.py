"""A KVM VM made ahead of the request that needs it.

What a new VM needs before any of its configuration matters costs ~0.7 ms
of every CreateVm on our hosts (measured after a pause, as requests come):
/dev/kvm opened, the KVM VM with its TSS and identity map, the core's
eventfds, console and legacy devices (`vmm_vm_create`), then its RAM slots,
then its vCPUs with their CPUID, which bring the irqchip and PIT (in that
order: native/vm.c, a RAM slot added after the irqchip waits out an SRCU
grace period).  A daemon can pay it between requests: the shelf keeps one
such VM, hands it to the next build, and makes the next one on a thread of
its own once the request that took the last one has been answered
(`refill`, from Manager.settled, which the API calls when the call has
ended).  Not sooner: made while that request runs or its reply is on the
way, the spare slows it (both ask for the process's mmap lock and the GIL,
and our hosts have 2 cores): measured with the daemon, a CreateVm's handler
took as long with a RAM-and-irqchip spare made as soon as its VM was built
as with none.

The spare is made for the kind of VM last taken (a function's instances are
alike): its anonymous RAM regions, dirty tracking or not, and its vCPU count.
A build of another shape, and every restore (its RAM comes from the
snapshot's file, its vCPUs bare), gives such a spare back (destroyed off the
request path) and takes a fresh one: builder._native.  After a restore, the
spare is an empty KVM VM (`vmm_vm_create` only), which a restore uses as it
is.  The spare never has devices and has never run.

"Between requests" holds for one client's requests in turn: a request that
arrives while the spare is being made runs beside it (and, the spare not being
there yet, makes its own VM inline).

One spare, not a pool: it costs a KVM VM (~10 fds and its vCPUs', the PIT's
kernel thread, its RAM's address space, NORESERVE, but no pages; a host with
vm.overcommit_memory=2 counts that size against its commit limit all the
same) for as long as the daemon lives, and a burst of creates beyond the first makes its VMs
inline as before.  A failure to make the spare is not an error of any
request: the next take makes its VM inline, and reports that failure to its
own caller.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vmmd.log import get_logger
from vmmd.native import MachineShape, NativeVm

log = get_logger(__name__)


class Shelf:
    def __init__(self, make: Callable[[str], NativeVm] = NativeVm) -> None:
        self._make = make
        self._lock = threading.Lock()  # everything below
        self._spare: tuple[str, NativeVm] | None = None  # (kvm path, VM)
        self._path: str | None = None  # the kvm path last taken: the next spare's
        self._last: NativeVm | None = None  # the VM last taken: the next spare's shape
        self._want: tuple[str, MachineShape | None] | None = None  # the spare to make now
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
            # The next VM is likely the same kind as the last (a function's
            # instances): made ahead with its RAM and vCPUs, if it was booted.
            last, self._last = self._last, None
            self._want = (self._path, last.shape if last is not None else None)
            self._wake.notify()

    def close(self) -> None:
        """Destroy the spare; the thread ends (not waited for: a VM it is making
        is destroyed by it)."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
            self._wake.notify()
        if spare is not None:
            spare[1].close()

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._want is None and not self._closed:
                    self._wake.wait()
                want, self._want = self._want, None
                if self._closed or want is None:
                    return
                self._making = True
            path, shape = want
            try:
                vm = self._made(path, shape)
            except Exception as e:  # noqa: BLE001 - the next take makes its own and reports
                log.warning("shelf.make_failed", error=str(e))
                with self._lock:
                    self._making = False
                continue
            with self._lock:
                self._making = False
                keep = not self._closed and self._spare is None
                if keep:
                    self._spare = (path, vm)
            if not keep:
                vm.close()

    def _made(self, path: str, shape: MachineShape | None) -> NativeVm:
        vm = self._make(path)
        if shape is not None:
            try:
                vm.prepare(shape)
            except BaseException:
                vm.close()
                raise
        return vm
