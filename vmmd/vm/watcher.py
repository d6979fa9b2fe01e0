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
    """Its thread, epoll fd and wake-up eventfd come with the first fd it
    watches: a cell that never hosted a VM (a spare) holds none of them."""

    def __init__(self) -> None:
        self._handlers: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()  # _handlers, the epoll set, _thread, _closed
        # Held while handlers run: remove() waits out a round that may be
        # running the handler it removes (its VM is about to be freed).
        self._dispatch = threading.Lock()
        self._epoll: select.epoll | None = None  # not select(): a daemon's fds pass 1024
        self._stop_fd = -1  # close() ends _run through it
        # Never cleared once set: a handler removing its own fd must know it
        # runs on the watcher, or it would wait for itself.
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        """Call handler() on the watcher thread whenever fd is readable (the
        handler drains it), until remove(fd)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("watcher closed")
            if self._epoll is None:
                self._start()
            assert self._epoll is not None
            self._epoll.register(fd, select.EPOLLIN)
            self._handlers[fd] = handler

    def _start(self) -> None:
        epoll = select.epoll()
        stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            epoll.register(stop_fd, select.EPOLLIN)
            thread = threading.Thread(target=self._run, args=(epoll, stop_fd),
                                      name="vm-watcher", daemon=True)
            thread.start()
        except BaseException:
            epoll.close()
            os.close(stop_fd)
            raise
        self._epoll, self._stop_fd, self._thread = epoll, stop_fd, thread

    def remove(self, fd: int) -> None:
        """Stop watching fd.  Once this returns (called from another thread),
        its handler is not running and will not run again."""
        with self._lock:
            if self._handlers.pop(fd, None) is None:
                return
            if not self._closed and self._epoll is not None:
                self._epoll.unregister(fd)
        if threading.current_thread() is not self._thread:
            with self._dispatch:
                pass

    def watching(self) -> int:
        """How many fds are watched (tests: nothing is left behind)."""
        with self._lock:
            return len(self._handlers)

    def close(self) -> None:
        """End the thread (a cell's, once its VMs are gone); it frees its fds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        os.eventfd_write(self._stop_fd, 1)
        if thread is not threading.current_thread():
            thread.join()

    def _run(self, epoll: select.epoll, stop_fd: int) -> None:
        try:
            self._serve(epoll, stop_fd)
        finally:
            epoll.close()
            os.close(stop_fd)

    def _serve(self, epoll: select.epoll, stop_fd: int) -> None:
        while True:
            try:
                ready = epoll.poll()
            except InterruptedError:
                continue
            with self._dispatch:
                for fd, _ in ready:
                    if fd == stop_fd:
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
                                epoll.unregister(fd)


_shared: Watcher | None = None
_shared_lock = threading.Lock()


def shared() -> Watcher:
    """The process's watcher, made by its first VM."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Watcher()
        return _shared
