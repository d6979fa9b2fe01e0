"""vmmd/vm/shelf.py: the spare KVM VM made between requests (a fake VM here; the
daemon tests run the real one with --isolation none)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.framework.fake_native import FakeFactory
from vmmd.errors import NativeError
from vmmd.spec import BootSpec, VmSpec
from vmmd.vm.builder import build_vm
from vmmd.vm.shelf import Quiet, Shelf

TIMEOUT_S = 10.0


class FakeVm:
    shape: Any = None  # what a build gave it (NativeVm.shape)
    refuse_ram = False  # add_ram fails as a RAM slot KVM refuses would

    def __init__(self, path: str, thread: str) -> None:
        self.path, self.thread, self.closed = path, thread, False
        self._prepared: Any = None
        self.prepared_at = 0.0

    @property
    def prepared(self) -> Any:
        return self._prepared

    @prepared.setter
    def prepared(self, shape: Any) -> None:  # the shelf, once it gave the VM its shape
        self._prepared, self.prepared_at = shape, time.monotonic()

    # What builder.add_machine calls.
    def track_dirty(self) -> None:
        pass

    def add_ram(self, gpa: int, size: int) -> None:
        if self.refuse_ram:
            raise NativeError(f"add RAM at 0x{gpa:x}", 12)

    def create_vcpus(self, n: int) -> None:
        pass

    def close(self, *, deferred: bool = False) -> None:
        assert not self.closed, "closed twice"
        self.closed = True


class Maker:
    """Makes FakeVms, records them; `fail` makes the next ones raise, `gate` holds them."""

    def __init__(self) -> None:
        self.made: list[FakeVm] = []
        self.attempts = 0
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def __call__(self, path: str) -> Any:
        with self.lock:
            self.attempts += 1
        self.gate.wait(TIMEOUT_S)
        if self.fail:
            raise NativeError("create VM", 24)
        vm = FakeVm(path, threading.current_thread().name)
        with self.lock:
            self.made.append(vm)
        return vm


def _until(cond: Any) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _spare(shelf: Shelf) -> Any:
    return shelf._spare[1] if shelf._spare else None


def test_the_first_take_makes_inline_and_the_next_gets_the_spare() -> None:
    make = Maker()
    shelf = Shelf(make)
    first = shelf.take("/dev/kvm")
    assert first.thread == threading.current_thread().name  # nothing on the shelf yet
    time.sleep(0.05)
    assert _spare(shelf) is None and shelf._thread is None  # nothing beside the request
    shelf.refill()  # the request is done
    _until(lambda: _spare(shelf) is not None)
    spare = _spare(shelf)
    assert spare.thread == "vm-shelf"
    shelf.refill()  # a spare is there: nothing more made
    time.sleep(0.05)
    assert len(make.made) == 2
    assert shelf.take("/dev/kvm") is spare
    shelf.refill()
    _until(lambda: _spare(shelf) not in (None, spare))
    shelf.close()
    assert [vm.closed for vm in make.made] == [False, False, True]  # only the spare closed


def _stocked(make: Maker) -> tuple[Shelf, Any]:
    """A shelf after one request on /dev/kvm: (it, the spare it then made)."""
    shelf = Shelf(make)
    shelf.take("/dev/kvm")
    shelf.refill()
    _until(lambda: _spare(shelf) is not None)
    return shelf, _spare(shelf)


def test_a_spare_for_another_kvm_path_is_not_handed_out() -> None:
    shelf, old = _stocked(Maker())
    vm = shelf.take("/other/kvm")
    assert vm.path == "/other/kvm" and vm is not old and old.closed
    shelf.refill()
    _until(lambda: _spare(shelf) is not None and _spare(shelf).path == "/other/kvm")
    shelf.close()


def test_a_failed_spare_leaves_the_next_take_to_make_and_report_its_own() -> None:
    make = Maker()
    shelf = Shelf(make)
    make.fail = True
    with pytest.raises(NativeError):
        shelf.take("/dev/kvm")  # the caller's own failure, reported to it
    shelf.refill()
    _until(lambda: make.attempts == 2 and not shelf._making)  # the thread tried, failed
    assert _spare(shelf) is None
    make.fail = False
    vm = shelf.take("/dev/kvm")
    assert vm.thread == threading.current_thread().name
    shelf.refill()
    _until(lambda: _spare(shelf) is not None)
    shelf.close()


def test_close_destroys_the_spare_and_a_vm_being_made() -> None:
    make = Maker()
    shelf, spare = _stocked(make)
    make.gate.clear()
    shelf.take("/dev/kvm")
    shelf.refill()  # the thread now makes the next spare, held at the gate
    _until(lambda: make.attempts == 3)
    shelf.close()
    assert spare.closed is False  # handed out by the take above: the caller's
    make.gate.set()
    _until(lambda: len(make.made) == 3 and make.made[-1].closed)
    assert shelf._thread is not None
    shelf._thread.join(TIMEOUT_S)
    assert not shelf._thread.is_alive()
    vm = shelf.take("/dev/kvm")  # after close: made inline, nothing made ahead
    shelf.refill()
    assert not vm.closed and _spare(shelf) is None and len(make.made) == 4


def test_refills_while_a_spare_is_being_made_make_no_second_one() -> None:
    """Requests answered while the spare is made (or a second Manager.settled of one)
    make one spare, not one made and thrown away."""
    make = Maker()
    shelf = Shelf(make)
    shelf.take("/dev/kvm")
    make.gate.clear()
    shelf.refill()
    _until(lambda: shelf._making)
    shelf.refill()
    shelf.refill()
    make.gate.set()
    _until(lambda: _spare(shelf) is not None)
    time.sleep(0.05)
    assert len(make.made) == 2 and not any(vm.closed for vm in make.made)
    shelf.close()


def test_a_refill_without_a_thread_to_be_had_fails_no_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    make = Maker()
    shelf = Shelf(make)
    shelf.take("/dev/kvm")

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", refused)
    shelf.refill()  # does not raise
    assert shelf._thread is None and _spare(shelf) is None
    monkeypatch.undo()
    shelf.refill()  # a later request's refill gets one
    _until(lambda: _spare(shelf) is not None)
    shelf.close()


def test_the_spare_is_made_with_the_ram_of_the_vm_last_taken() -> None:
    make = Maker()
    shelf = Shelf(make)
    shape = (((0, 128 << 20),), False, 2)
    shelf.take("/dev/kvm").shape = shape  # the build added this RAM and vCPUs
    shelf.refill()
    _until(lambda: _shaped(shelf, shape))
    assert shelf.take("/dev/kvm").prepared == shape  # a restore: no shape, left None
    shelf.refill()
    _until(lambda: _spare(shelf) is not None and not shelf._making)
    time.sleep(0.05)  # the thread looked at the shape and left it
    assert _spare(shelf).prepared is None
    shelf.close()


def _shaped(shelf: Shelf, shape: Any) -> bool:
    """The spare is on the shelf with that shape (it first goes there without)."""
    spare = _spare(shelf)
    return spare is not None and spare.prepared == shape


def test_builds_take_a_spare_with_their_ram_and_put_back_one_without(kernel: str) -> None:
    """The builder and the shelf (fake cores): a VM of the last one's size is built on
    the spare made with its RAM, adding none (the fake refuses overlapping RAM); a VM
    of another size gives that spare back, destroyed, and is built on a fresh one."""
    natives = FakeFactory()
    shelf = Shelf(natives)  # type: ignore[arg-type]
    vms = [build_vm(VmSpec("a", BootSpec(kernel), memory_mib=64), native_factory=shelf.take)]
    shelf.refill()
    _until(lambda: _shaped(shelf, (((0, 64 << 20),), False, 1)))
    spare = _spare(shelf)
    assert len(spare.ram) == 1
    vms.append(build_vm(VmSpec("b", BootSpec(kernel), memory_mib=64), native_factory=shelf.take))
    assert vms[1]._native is spare and len(spare.ram) == 1 and spare.nvcpus == 1
    shelf.refill()
    _until(lambda: _shaped(shelf, (((0, 64 << 20),), False, 1)))
    other = _spare(shelf)
    vms.append(build_vm(VmSpec("c", BootSpec(kernel), memory_mib=32), native_factory=shelf.take))
    assert other.closed and vms[2]._native is not other
    assert vms[2]._native.prepared is None
    assert vms[2]._native.shape == (((0, 32 << 20),), False, 1)
    for vm in vms:
        vm.close()
    shelf.close()


def test_a_spare_whose_ram_fails_is_destroyed_and_fails_no_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    make = Maker()
    shelf = Shelf(make)
    shelf.take("/dev/kvm").shape = (((0, 64 << 20),), True, 1)
    monkeypatch.setattr(FakeVm, "refuse_ram", True)
    shelf.refill()
    _until(lambda: len(make.made) == 2 and make.made[1].closed)  # made, refused its RAM
    assert _spare(shelf) is None
    vm = shelf.take("/dev/kvm")  # made inline, as with no spare
    assert vm.thread == threading.current_thread().name and not vm.closed
    shelf.close()


def test_the_spare_is_made_at_once_and_shaped_once_no_request_has_run_for_a_while() -> None:
    """The KVM VM comes right after a refill, even while a request runs (a client's
    next one, say); its RAM and vCPUs only once every request has ended and
    quiet_s has passed with none running."""
    make, quiet, quiet_s = Maker(), Quiet(), 0.05
    shelf = Shelf(make, quiet=quiet, quiet_s=quiet_s)
    shape = (((0, 64 << 20),), False, 1)
    shelf.take("/dev/kvm").shape = shape
    with quiet.busy():
        shelf.refill()
        _until(lambda: _spare(shelf) is not None)
        time.sleep(2 * quiet_s)
        with quiet.busy():  # two at once: both must end
            pass
        time.sleep(2 * quiet_s)
        assert _spare(shelf).prepared is None
        ended = time.monotonic()
    _until(lambda: _spare(shelf) is not None and _spare(shelf).prepared == shape)
    assert _spare(shelf).prepared_at - ended >= quiet_s
    assert len(make.made) == 2  # the take's and the spare: shaped, not made again
    shelf.close()


def test_a_spare_taken_before_the_quiet_goes_as_it_is() -> None:
    make, quiet = Maker(), Quiet()
    shelf = Shelf(make, quiet=quiet, quiet_s=0.05)
    shelf.take("/dev/kvm").shape = (((0, 64 << 20),), False, 1)
    with quiet.busy():
        shelf.refill()
        _until(lambda: _spare(shelf) is not None)
        spare = shelf.take("/dev/kvm")  # the next request, before any quiet
    assert spare.prepared is None  # its build adds the RAM and vCPUs itself
    time.sleep(0.2)
    assert spare.prepared is None and _spare(shelf) is None  # nothing shaped it after
    shelf.close()


def test_close_ends_a_wait_for_quiet() -> None:
    make, quiet = Maker(), Quiet()
    shelf = Shelf(make, quiet=quiet)
    shelf.take("/dev/kvm").shape = (((0, 64 << 20),), False, 1)
    with quiet.busy():
        shelf.refill()
        _until(lambda: _spare(shelf) is not None)  # then the thread waits for quiet
        spare = _spare(shelf)
        shelf.close()
        assert shelf._thread is not None
        shelf._thread.join(TIMEOUT_S)
        assert not shelf._thread.is_alive()  # ended while the request still runs
    assert spare.closed and spare.prepared is None and _spare(shelf) is None


def test_a_refill_during_the_wait_for_quiet_makes_the_next_vm_at_once() -> None:
    """A request takes the unshaped spare while its thread waits for quiet, and is
    answered: the next KVM VM is made then, not once the daemon is quiet."""
    make, quiet = Maker(), Quiet()
    shelf = Shelf(make, quiet=quiet, quiet_s=TIMEOUT_S)
    shelf.take("/dev/kvm").shape = (((0, 64 << 20),), False, 1)
    with quiet.busy():
        shelf.refill()
        _until(lambda: _spare(shelf) is not None)
        first = shelf.take("/dev/kvm")  # the next request
        shelf.refill()  # ... answered, while another still runs
        _until(lambda: _spare(shelf) is not None)
        assert _spare(shelf) is not first and len(make.made) == 3
    shelf.close()
