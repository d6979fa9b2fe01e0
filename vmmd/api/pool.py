"""The worker threads of the unary API calls: bounded, and gone when idle.

The gRPC server runs on an asyncio loop; streams (console, events) are
coroutines there and hold no thread.  Unary calls are plain functions (they
call the manager, which blocks: building a VM, stopping one), run on this
pool.  concurrent.futures.ThreadPoolExecutor never lets a thread go, so a
burst of calls would leave its threads for the daemon's life; here a thread
idle for `idle_s` exits, and at most `max_workers` run at once (further
calls queue).
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_STOP = object()
_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def _name_os_thread(name: str) -> None:
    """The thread's name as `top -H`, `ps -L` and /proc/PID/task/TID/comm show
    it (Python 3.11 names only its own Thread objects): 15 bytes at most."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class ElasticPool(Executor):
    def __init__(self, max_workers: int, *, idle_s: float = 10.0, name: str = "api") -> None:
        self._max = max_workers
        self._idle_s = idle_s
        self._name = name
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._queued = 0
        self._shutdown = False
        self._serial = 0

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("the pool is shut down")
            self._q.put((f, fn, args, kwargs))
            self._queued += 1
            if self._queued > self._idle and self._threads < self._max:
                self._threads += 1
                self._serial += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._serial}",
                                 daemon=True).start()
        return f

    def _work(self) -> None:
        _name_os_thread(threading.current_thread().name)
        while True:
            with self._lock:
                self._idle += 1
            try:
                item = self._q.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queued == 0 or self._shutdown:  # (a put under the lock wins)
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
                if item is not _STOP:
                    self._queued -= 1
            if item is _STOP:
                with self._lock:
                    self._threads -= 1
                return
            f, fn, args, kwargs = item
            if not f.set_running_or_notify_cancel():
                continue
            try:
                f.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's future
                f.set_exception(e)
            del f, fn, args, kwargs, item

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            n = self._threads
        for _ in range(n):
            self._q.put(_STOP)
