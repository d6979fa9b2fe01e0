"""The watcher (vmmd/vm/watcher.py): one thread for every VM's event and console
fds; remove() is a barrier before a VM is freed; a failing handler costs only
its own fd; a VM whose events are slow to read holds up only its own watcher."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from tests.framework.fake_native import FakeFactory
from vmmd.native import StopReason
from vmmd.spec import BootSpec, VmSpec
from vmmd.vm.builder import build_vm
from vmmd.vm.watcher import Watcher

HANG = 10.0  # only to catch a hang


@pytest.fixture
def watcher() -> Iterator[Watcher]:
    w = Watcher()
    yield w
    w.close()


def _efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vm-watcher"]


def test_one_thread_serves_every_fd(watcher: Watcher) -> None:
    before = len(_watcher_threads())
    fds = [_efd() for _ in range(50)]
    seen: dict[int, threading.Event] = {fd: threading.Event() for fd in fds}
    try:
        for fd in fds:
            watcher.add(fd, lambda fd=fd: (_drain(fd), seen[fd].set()))
        for fd in fds:
            os.eventfd_write(fd, 1)
        assert all(seen[fd].wait(HANG) for fd in fds)
        assert len(_watcher_threads()) == before + 1
        assert watcher.watching() == 50
    finally:
        for fd in fds:
            watcher.remove(fd)
            os.close(fd)
    assert watcher.watching() == 0


def test_remove_waits_out_a_running_handler(watcher: Watcher) -> None:
    """The barrier close() relies on: once remove() returned, the handler is done."""
    fd = _efd()
    entered, release, removed = threading.Event(), threading.Event(), threading.Event()

    def handler() -> None:
        _drain(fd)
        entered.set()
        release.wait(HANG)

    watcher.add(fd, handler)
    os.eventfd_write(fd, 1)
    assert entered.wait(HANG)
    remover = threading.Thread(target=lambda: (watcher.remove(fd), removed.set()))
    remover.start()
    assert not removed.wait(0.2), "remove() returned while the handler ran"
    release.set()
    remover.join(HANG)
    assert removed.is_set()
    os.close(fd)


def test_a_failing_handler_loses_its_fd_and_nothing_else(watcher: Watcher) -> None:
    bad, good = _efd(), _efd()
    fired = threading.Event()

    def boom() -> None:
        raise RuntimeError("a VM's handler failed")

    watcher.add(bad, boom)  # never drained: it would spin if it stayed watched
    watcher.add(good, lambda: (_drain(good), fired.set()))
    os.eventfd_write(bad, 1)
    os.eventfd_write(good, 1)
    assert fired.wait(HANG)
    deadline = time.monotonic() + HANG
    while watcher.watching() != 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # the bad fd may come in the round after the good one
    assert watcher.watching() == 1
    watcher.remove(good)
    os.close(bad)
    os.close(good)


def test_close_ends_the_thread_and_refuses_more() -> None:
    w = Watcher()
    fd = _efd()
    before = set(_watcher_threads())
    w.add(fd, lambda: _drain(fd))
    (thread,) = set(_watcher_threads()) - before  # this watcher's (others may run)
    w.remove(fd)
    w.close()
    thread.join(HANG)
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        w.add(fd, lambda: None)
    os.close(fd)


def test_close_while_a_handler_removes_its_own_fd() -> None:
    """A cell torn down while its watcher handles a VM's last event (the handler
    removes the VM's fds itself): neither waits for the other."""
    w = Watcher()
    fd = _efd()
    entered, go = threading.Event(), threading.Event()

    def handler() -> None:
        _drain(fd)
        entered.set()
        go.wait(HANG)
        w.remove(fd)

    w.add(fd, handler)
    os.eventfd_write(fd, 1)
    assert entered.wait(HANG)
    closer = threading.Thread(target=w.close)
    closer.start()
    closer.join(0.1)  # close() now waits for the watcher thread, inside the handler
    go.set()
    closer.join(HANG)
    assert not closer.is_alive(), "close() and the handler's remove() wait for each other"
    os.close(fd)


def test_a_vm_slow_to_read_holds_up_only_its_own_watcher(kernel: str,
                                                         natives: FakeFactory) -> None:
    """Cells: a VM's events come from its cell's worker, which may be throttled or
    hung; each cell has its own watcher, so another cell's VM still stops."""
    slow_w, fast_w = Watcher(), Watcher()
    slow = build_vm(VmSpec("slow", BootSpec(kernel)), native_factory=natives, watcher=slow_w)
    fast = build_vm(VmSpec("fast", BootSpec(kernel)), native_factory=natives, watcher=fast_w)
    stuck, release = threading.Event(), threading.Event()
    slow_native = natives.vms[0]
    real_next = slow_native.next_event

    def hung_next_event():  # type: ignore[no-untyped-def]
        stuck.set()
        release.wait(HANG)
        return real_next()

    slow_native.next_event = hung_next_event  # type: ignore[method-assign]
    try:
        slow.start()
        fast.start()
        slow_native.guest_prints(b"x")  # the slow VM's watcher now waits on its worker
        assert stuck.wait(HANG)
        natives.vms[1].guest_stops(StopReason.POWEROFF)
        info = fast.wait(HANG)
        assert info is not None and info.reason == StopReason.POWEROFF
    finally:
        release.set()
        slow.close()
        fast.close()
        slow_w.close()
        fast_w.close()
