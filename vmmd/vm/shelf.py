"""A KVM VM made ahead of the request that needs it.

What a new VM needs before any of its configuration matters (/dev/kvm
opened, the KVM VM with its TSS and identity map, the core's eventfds,
console and legacy devices: `vmm_vm_create`) costs ~0.3-0.4 ms of every
CreateVm, RestoreVm and CloneVm on our hosts.  (The irqchip and PIT are not
in it: they come after the RAM, native/vm.c says why.)  A daemon can pay it between requests:
the shelf keeps one such VM, hands it to the next build, and makes the next
one on a thread of its own once the request that took the last one is done
(`refill`: while that request runs, making a VM beside it would slow it down,
both ask for the process's mmap lock).  The VM on the shelf has no RAM, vCPUs or
devices yet and has never run: it is what `NativeVm(kvm_path)` returns.

"Between requests" holds for one client's requests in turn: a request that
arrives while the spare is being made runs beside it (and, the spare not being
there yet, makes its own VM inline).

One spare, not a pool: it costs an empty KVM VM (5 fds) for as long as the
daemon lives, and a burst of creates beyond the
first makes its VMs inline as before.  A failure to make the spare is not
an error of any request: the next take makes its VM inline, and reports
that failure to its own caller.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vmmd.log import get_logger
from vmmd.native import NativeVm

log = get_logger(__name__)


class Shelf:
    def __init__(self, make: Callable[[str], NativeVm] = NativeVm) -> None:
        self._make = make
        self._lock = threading.Lock()  # everything below
        self._spare: tuple[str, NativeVm] | None = None  # (kvm path, VM)
        self._path: str | None = None  # the kvm path last taken: the next spare's
        self._want: str | None = None  # the kvm path of the spare to make now
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
            return spare[1]
        if spare is not None:
            spare[1].close(deferred=True)  # KVM's teardown off the request path
        return self._make(kvm_path)

    def refill(self) -> None:
        """The request that took a VM is done: make the next spare, off the
        caller's thread (the first refill starts that thread: once).  Never
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
            self._want = self._path
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
                path, self._want = self._want, None
                if self._closed or path is None:
                    return
                self._making = True
            try:
                vm = self._make(path)
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
