"""The fake of the C core's VM (tests/framework/fake_native.py) against the real
NativeVm: the same interface, and the C core's rules the control plane relies on
(no KVM: the real class is only inspected)."""

from __future__ import annotations

import errno
import inspect
import os
import select

import pytest

from tests.framework.fake_native import PAGE, FakeFactory, FakeNativeVm, RunState
from vmmd.errors import NativeError
from vmmd.native import EventType, NativeVm, StopReason

PUBLIC = sorted(n for n in vars(NativeVm) if not n.startswith("_") or n in ("__enter__",
                                                                           "__exit__"))


@pytest.mark.parametrize("name", PUBLIC)
def test_the_fake_offers_each_member_of_native_vm(name: str) -> None:
    real, fake = inspect.getattr_static(NativeVm, name), inspect.getattr_static(FakeNativeVm, name)
    assert isinstance(fake, property) == isinstance(real, property), name
    if callable(real):
        want = [(p.name, p.kind, p.default) for p in inspect.signature(real).parameters.values()]
        have = [(p.name, p.kind, p.default) for p in inspect.signature(fake).parameters.values()]
        assert have[: len(want)] == want, name


def started(n_vcpus: int = 1) -> FakeNativeVm:
    vm = FakeNativeVm()
    vm.add_ram(0, 16 * PAGE)
    vm.create_vcpus(n_vcpus)
    vm.start()
    return vm


def readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def test_a_guest_stop_signals_the_event_fd_and_the_first_reason_wins() -> None:
    with started() as vm:
        assert not readable(vm.event_fd)
        assert vm.guest_stops(StopReason.TRIPLE_FAULT, vcpu=0, rip=0x1234)
        assert not vm.guest_stops(StopReason.RESET)  # no news: the first reason stays
        vm.stop()
        assert vm.stop_reason == StopReason.TRIPLE_FAULT
        assert readable(vm.event_fd)
        ev = vm.next_event()
        assert ev is not None and (ev.type, ev.reason, ev.rip) == (EventType.STOPPED,
                                                                   StopReason.TRIPLE_FAULT, 0x1234)
        assert vm.next_event() is None and not readable(vm.event_fd)  # drained


def test_verbs_in_the_wrong_run_state_fail_as_the_c_core_does() -> None:
    vm = FakeNativeVm()
    with pytest.raises(NativeError) as e:
        vm.start()  # no RAM, no vCPUs
    assert e.value.errno == errno.EINVAL
    vm.close()
    with started() as vm:
        for verb in (lambda: vm.add_ram(0x100000, PAGE), lambda: vm.create_vcpus(1), vm.start):
            with pytest.raises(NativeError) as e:
                verb()
            assert e.value.errno == errno.EBUSY
        vm.guest_stops(StopReason.POWEROFF)
        assert vm.run_state == RunState.STOPPED
        vm.resume()  # as vmm_vm_resume: a VM still RUNNING (not joined yet) is no error
        for verb in (vm.pause, vm.send_ctrl_alt_del):
            with pytest.raises(NativeError) as e:
                verb()
            assert e.value.errno == errno.EINVAL


def test_ram_honours_writes_and_refuses_what_is_outside_it() -> None:
    with FakeNativeVm() as vm:
        vm.add_ram(0, 4 * PAGE)
        vm.write(PAGE - 2, b"abcd")  # across a page boundary
        assert vm.read(PAGE - 4, 8) == b"\0\0abcd\0\0"
        with pytest.raises(NativeError) as e:
            vm.write(4 * PAGE - 1, b"xy")
        assert e.value.errno == errno.EFAULT


def test_full_memory_written_then_mapped_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "memory"
    with started() as vm:
        vm.guest_writes(3 * PAGE, b"\x42" * 10)
        vm.pause()
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, PAGE + 16 * PAGE)
        written, bitmap = vm.write_memory(fd, PAGE, diff=False, pages=16)
        assert (written, bitmap) == (PAGE, b"")
    with FakeNativeVm() as clone:
        clone.add_ram_file(0, 16 * PAGE, fd, PAGE)
        os.close(fd)  # the mapping stays, as the C core's mmap does
        assert clone.read(3 * PAGE, 11) == b"\x42" * 10 + b"\0"


def test_close_releases_every_fd_and_a_later_call_is_a_test_failure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "image"
    image.write_bytes(bytes(4096))
    fd = os.open(image, os.O_RDWR)
    vm = FakeNativeVm()
    vm.add_virtio_blk(fd, read_only=False, serial="d", mmio_base=0xD0000000, gsi=5)
    os.close(fd)
    held = vm.open_fds()
    assert len(held) == 3  # two eventfds and the image's duplicate
    vm.close()
    vm.close()  # idempotent
    for fd in held:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(AssertionError, match="after close"):
        vm.stats()


def test_the_factory_fails_the_call_it_was_told_to_in_the_vm_it_was_told_to() -> None:
    f = FakeFactory()
    f.fail("create_vcpus", errno.ENOMEM, nth=1)
    f.fail("create", errno.ENODEV, nth=2)
    f("/dev/kvm").create_vcpus(1)
    with pytest.raises(NativeError) as e:
        f("/dev/kvm").create_vcpus(1)
    assert e.value.errno == errno.ENOMEM
    with pytest.raises(NativeError) as e:
        f("/dev/kvm")
    assert e.value.errno == errno.ENODEV
    f("/dev/kvm").create_vcpus(1)
    assert len(f.vms) == 3 and f.made == 4
    for vm in f.vms:
        vm.close()
