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
from vmmd.info import Phase
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


def test_a_watcher_holds_nothing_until_it_watches() -> None:
    """A spare cell's watcher: no thread, no fd, until its first VM."""
    fds = len(os.listdir("/proc/self/fd"))
    w = Watcher()
    assert w.thread is None and len(os.listdir("/proc/self/fd")) == fds
    w.close()


def test_close_ends_the_thread_and_refuses_more() -> None:
    w = Watcher()
    fd = _efd()
    before = set(_watcher_threads())
    w.add(fd, lambda: _drain(fd))
    (thread,) = set(_watcher_threads()) - before  # this watcher's (others may run)
    fds = len(os.listdir("/proc/self/fd"))
    w.remove(fd)
    w.close()
    thread.join(HANG)
    assert not thread.is_alive()
    assert len(os.listdir("/proc/self/fd")) == fds - 2  # its epoll fd and wake-up fd
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


# ---- the VM's side: its teardown when the guest stops, or when stop() does it ----
def test_a_guest_dead_before_start_returns_stays_dead(kernel: str, natives: FakeFactory) -> None:
    """The watcher may finish a VM whose guest died at once before start() set the
    phase: start() must not make it RUNNING again."""
    vm = build_vm(VmSpec("quick", BootSpec(kernel)), native_factory=natives)
    native = natives.vms[0]
    real_start = native.start

    def start_and_die() -> None:
        real_start()
        native.guest_stops(StopReason.TRIPLE_FAULT, vcpu=0, rip=0x1234)
        assert vm._stopped.wait(HANG)  # the reaper finished before start() goes on

    native.start = start_and_die  # type: ignore[method-assign]
    with vm:
        vm.start()
        assert vm.state == Phase.CRASHED
        assert vm.wait(HANG) is not None


def test_a_crash_racing_stop_keeps_its_details(kernel: str, natives: FakeFactory) -> None:
    """The watcher drained the guest's STOPPED event, then found stop() tearing the
    VM down: the event's details (vCPU, rip) still reach the stop info."""
    vm = build_vm(VmSpec("racy", BootSpec(kernel)), native_factory=natives)
    native = natives.vms[0]
    real_stop = native.stop

    def crash_then_stop() -> None:
        native.guest_stops(StopReason.TRIPLE_FAULT, vcpu=0, rip=0x1234)
        deadline = time.monotonic() + HANG
        while native._events and time.monotonic() < deadline:  # the watcher drains it
            time.sleep(0.001)
        real_stop()

    native.stop = crash_then_stop  # type: ignore[method-assign]
    with vm:
        vm.start()
        info = vm.stop()
        assert info.reason == StopReason.TRIPLE_FAULT
        assert "rip 0x1234" in info.message


def test_stop_makes_no_reaper_thread(kernel: str, natives: FakeFactory,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """StopVm and DeleteVm tear the VM down on their own thread: the watcher does
    not start one (a thread start is 0.2-2 ms here) only to be joined."""
    started: list[str] = []
    real = threading.Thread.start

    def recording(self: threading.Thread) -> None:
        started.append(self.name)
        real(self)

    monkeypatch.setattr(threading.Thread, "start", recording)
    with build_vm(VmSpec("stopme", BootSpec(kernel)), native_factory=natives) as vm:
        native = natives.vms[0]
        real_stop = native.stop

        def stop_seen_by_the_watcher() -> None:
            real_stop()  # queues STOPPED (requested), as C does
            deadline = time.monotonic() + HANG
            while native._events and time.monotonic() < deadline:
                time.sleep(0.001)

        native.stop = stop_seen_by_the_watcher  # type: ignore[method-assign]
        vm.start()
        assert vm.stop().reason == StopReason.REQUESTED
    assert "vm-stopme-stop" not in started


def test_no_thread_for_the_reaper_still_stops_the_vm(kernel: str, natives: FakeFactory,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A pids limit refuses the reaper thread: the watcher tears the VM down itself."""
    real = threading.Thread.start

    def refusing(self: threading.Thread) -> None:
        if self.name.endswith("-stop"):
            raise RuntimeError("can't start new thread")
        real(self)

    monkeypatch.setattr(threading.Thread, "start", refusing)
    vm = build_vm(VmSpec("nopids", BootSpec(kernel)), native_factory=natives)
    vm.start()
    natives.vms[0].guest_stops(StopReason.POWEROFF)
    info = vm.wait(HANG)
    assert info is not None and info.reason == StopReason.POWEROFF
    vm.close()  # nothing left to join
