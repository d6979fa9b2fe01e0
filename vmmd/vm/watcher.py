"""One thread that watches every VM of this process.

The C core signals a VM's lifecycle events (the guest stopped itself, a vCPU
failed...) and its console output on two eventfds.  A single thread waits on
all of them (epoll) and calls each VM's handler, instead of a Python thread per
VM: a VM costs no thread while it lives (1000 paused clones, 1000 threads
before), and StartVm/RestoreVm no longer wait for one to start
(`threading.Thread.start()` returns once the new thread runs: 0.2-2 ms on our
hosts, on the request path).

Handlers run on the watcher thread one at a time and must not block: a VM whose
guest stopped hands its teardown to a thread of its own (vmmd/vm/vm.py).  A
cell's VMs read their events from the cell's worker, a call that can wait on a
throttled or hung process: each cell has a watcher of its own (vmmd/cell), so
that a slow cell delays no other tenant's VMs.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable

from vmmd.log import get_logger

log = get_logger(__name__)


class Watcher:
    def __init__(self) -> None:
        self._epoll = select.epoll()  # not select(): a daemon's fds pass 1024
        self._handlers: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()  # _handlers, the epoll set, _thread
        # Held while handlers run: remove() waits out a round that may be
        # running the handler it removes (its VM is about to be freed).
        self._dispatch = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # close() ends _run
        self._epoll.register(self._stop_fd, select.EPOLLIN)

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        """Call handler() on the watcher thread whenever fd is readable (the
        handler drains it), until remove(fd)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("watcher closed")
            self._epoll.register(fd, select.EPOLLIN)
            self._handlers[fd] = handler
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vm-watcher",
                                                daemon=True)
                self._thread.start()

    def remove(self, fd: int) -> None:
        """Stop watching fd.  Once this returns (called from another thread),
        its handler is not running and will not run again."""
        with self._lock:
            if self._handlers.pop(fd, None) is None:
                return
            if not self._closed:
                self._epoll.unregister(fd)
        # (_thread is never cleared: a handler removing its own fd must know it
        # runs on the watcher, or it would wait for itself.)
        if threading.current_thread() is not self._thread:
            with self._dispatch:
                pass

    def watching(self) -> int:
        """How many fds are watched (tests: nothing is left behind)."""
        with self._lock:
            return len(self._handlers)

    def close(self) -> None:
        """End the thread (a cell's, once its VMs are gone) and free the epoll fd."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        os.eventfd_write(self._stop_fd, 1)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._epoll.close()
        os.close(self._stop_fd)

    def _run(self) -> None:
        while True:
            try:
                ready = self._epoll.poll()
            except InterruptedError:
                continue
            with self._dispatch:
                for fd, _ in ready:
                    if fd == self._stop_fd:
                        return
                    with self._lock:
                        handler = self._handlers.get(fd)
                    if handler is None:
                        continue  # removed since the poll
                    try:
                        handler()
                    except Exception:
                        # One VM's failure must not stop the others' watching, nor
                        # spin on an fd nobody drains: that fd is no longer watched.
                        log.exception("vm.watch_failed", fd=fd)
                        with self._lock:
                            if self._handlers.pop(fd, None) is not None:
                                self._epoll.unregister(fd)


_shared: Watcher | None = None
_shared_lock = threading.Lock()


def shared() -> Watcher:
    """The process's watcher, made by its first VM."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Watcher()
        return _shared
