"""VMM mechanics with micro-guests: console, exits, stop reasons, SMP, teardown.

Both boot protocols are covered: the PVH flavour enters in 32-bit mode with
hvm_start_info, the 64-bit flavour through the Linux 64-bit boot protocol.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.framework.guestrun import run_guest
from vmmd.info import Phase
from vmmd.manager import Manager
from vmmd.native import NativeVm, StopReason
from vmmd.spec import BootSpec, VmSpec
from vmmd.vm.builder import build_vm
from vmmd.vm.watcher import shared

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


@pytest.fixture(params=["pvh", "64"])
def guest(request, microguests):  # type: ignore[no-untyped-def]
    return microguests[request.param]


def test_console_output_arrives_intact(guest) -> None:  # type: ignore[no-untyped-def]
    run = run_guest(guest, "mg=print")
    assert run.stop.reason == StopReason.RESET and run.stop.clean
    assert run.console == f"MG-HELLO\n{PRINTABLE}\nMG-DONE\n"
    assert run.stats.console_bytes == len(run.console)


@pytest.mark.parametrize("n", [1, 1000, 20000])
def test_port_exits_counted_exactly(microguests, n: int) -> None:  # type: ignore[no-untyped-def]
    run = run_guest(microguests["pvh"], f"mg=exits n={n}")
    assert "MG-DONE" in run.console
    assert run.stats.unhandled_io == n  # port 0x510: nobody owns it
    assert run.stats.unhandled_mmio == 0


@pytest.mark.parametrize("n", [1, 5000])
def test_mmio_exits_counted_exactly(microguests, n: int) -> None:  # type: ignore[no-untyped-def]
    run = run_guest(microguests["pvh"], f"mg=mmio n={n} addr=0xd0000000")
    assert "MG-DONE" in run.console
    assert run.stats.unhandled_mmio == n
    assert run.stats.exits_mmio == n
    assert run.stats.unhandled_io == 0


@pytest.mark.parametrize(("mode", "reason", "clean"), [
    ("reset", StopReason.RESET, True),
    ("halt", StopReason.HALT, True),
    ("triple", StopReason.TRIPLE_FAULT, False),
])
def test_stop_reasons_are_distinct(guest, mode: str, reason: StopReason,  # type: ignore[no-untyped-def]
                                   clean: bool) -> None:
    run = run_guest(guest, f"mg={mode}")
    assert "MG-START" in run.console
    assert run.stop.reason == reason
    assert run.stop.clean is clean


def test_triple_fault_message_names_the_vcpu_and_rip(microguests) -> None:  # type: ignore[no-untyped-def]
    run = run_guest(microguests["64"], "mg=triple")
    assert run.stop.message.startswith("triple fault on vCPU 0 at rip 0x")


@pytest.mark.parametrize("vcpus", [1, 4])
def test_all_vcpus_start(guest, vcpus: int) -> None:  # type: ignore[no-untyped-def]
    run = run_guest(guest, f"mg=smp ncpus={vcpus}", vcpus=vcpus)
    assert f"MG-CPUS {vcpus}" in run.console
    ids = run.console.split("apic=")[1].split()[0]
    assert sorted(int(i) for i in ids.split(",")) == list(range(vcpus))


def test_guest_counts_in_memory(microguests) -> None:  # type: ignore[no-untyped-def]
    run = run_guest(microguests["pvh"], "mg=count n=3000 every=1000")
    assert [ln for ln in run.console.splitlines() if ln.startswith("MG-COUNT")] == [
        "MG-COUNT 1000", "MG-COUNT 2000", "MG-COUNT 3000"]


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _spin_vm(kernel, vcpus: int):  # type: ignore[no-untyped-def]
    spec = VmSpec(vm_id="spin", boot=BootSpec(str(kernel), cmdline="mg=spin"), vcpus=vcpus,
                  memory_mib=64)
    return build_vm(spec)


def _shared_watcher() -> None:
    """The process's VM watcher (vmmd/vm/watcher.py), started now if no VM did yet: its
    thread and fds stay for the process, they are not the next VM's."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    shared().add(fd, lambda: None)
    shared().remove(fd)
    os.close(fd)


def _python_threads() -> set[threading.Thread]:
    """This process's Python threads but the process's VM watcher."""
    return set(threading.enumerate()) - {shared().thread}


def test_the_shared_placement_builds_on_a_kvm_vm_made_ahead(microguests) -> None:  # type: ignore[no-untyped-def]
    """--isolation none (vmmd/vm/shelf.py): the second VM's KVM VM was made by the
    shelf's thread, between the requests, with the first one's RAM and vCPU,
    and that VM boots and runs the guest; the
    placement's close destroys the spare, so the process holds no fd more than before."""
    _shared_watcher()
    fds_before = _fd_count()
    m = Manager()
    shelf = m.placement._shelf  # type: ignore[attr-defined]
    try:
        spec = [VmSpec(vm_id=f"shelf{i}", boot=BootSpec(str(microguests["pvh"]),
                                                         cmdline="mg=print"), memory_mib=16)
                for i in range(2)]
        m.create(spec[0])
        m.settled()  # as the API does once the CreateVm is answered
        deadline = time.monotonic() + 30
        shape = (((0, 16 << 20),), False, 1)  # the first VM's RAM and vCPU
        while shelf._spare is None or shelf._spare[1].prepared != shape:
            assert time.monotonic() < deadline, "no spare made with that shape"
            time.sleep(0.001)
        spare = shelf._spare[1]
        m.create(spec[1])
        vm = m._vms["shelf1"].vm  # type: ignore[union-attr]
        assert vm._native is spare
        m.start("shelf1")
        while b"MG-DONE" not in vm.console_read(0)[0]:
            assert time.monotonic() < deadline, "the guest never finished"
            time.sleep(0.01)
        assert vm.console_read(0)[0].startswith(b"MG-HELLO\n")
    finally:
        m.shutdown()
    assert shelf._spare is None
    deadline = time.monotonic() + 30
    while _fd_count() != fds_before:  # the VMs' KVM teardown finishes on a C thread
        assert time.monotonic() < deadline, (_fd_count(), fds_before)
        time.sleep(0.01)


@pytest.mark.parametrize("vcpus", [1, 4])
def test_stop_from_outside_frees_threads_and_fds(microguests, vcpus: int) -> None:  # type: ignore[no-untyped-def]
    _shared_watcher()
    fds_before, threads_before = _fd_count(), _python_threads()
    vm = _spin_vm(microguests["pvh"], vcpus)
    vm.start()
    deadline = time.monotonic() + 30
    while b"MG-START" not in vm.console_read(0)[0]:
        assert time.monotonic() < deadline, "guest never started"
        time.sleep(0.01)
    assert vm.thread_count() == vcpus + 1  # vCPUs + the I/O thread
    assert _python_threads() == threads_before  # a running VM has no Python thread
    info = vm.stop()
    assert info.reason == StopReason.REQUESTED
    assert vm.state == Phase.STOPPED
    assert vm.thread_count() == 0
    vm.close()
    assert _fd_count() == fds_before
    assert _python_threads() == threads_before


def test_pause_and_resume_stop_and_continue_the_guest(microguests) -> None:  # type: ignore[no-untyped-def]
    with _spin_vm(microguests["pvh"], 2) as vm:
        vm.start()
        vm.pause()
        vm.pause()  # idempotent
        assert vm.state == Phase.PAUSED
        exits = vm.stats().exits
        time.sleep(0.2)
        assert vm.stats().exits == exits  # nothing runs while paused
        vm.resume()
        assert vm.state == Phase.RUNNING
        assert vm.stop().reason == StopReason.REQUESTED


def test_emulation_failure_reports_rip_and_instruction_bytes(guest) -> None:  # type: ignore[no-untyped-def]
    run = run_guest(guest, "mg=emufail")
    assert run.stop.reason == StopReason.EMULATION
    assert not run.stop.clean
    # popcnt rax, [rbx]-style encoding: f3 48 0f b8 ...
    assert "instruction bytes f3 48 0f b8" in run.stop.message
    assert " at rip 0x" in run.stop.message


def test_vmmd_run_exit_status_and_reason(microguests, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The one-shot runner end to end: console on stdout, clean stop = 0,
    crash = 1 with the reason on stderr."""
    import subprocess
    import sys

    def vmmd_run(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vmmd", "run", "--kernel", str(microguests["pvh"]),
             "--cmdline", f"mg={mode}"], capture_output=True, text=True, timeout=60)

    ok = vmmd_run("print")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"MG-HELLO\n{PRINTABLE}\nMG-DONE\n"
    bad = vmmd_run("triple")
    assert bad.returncode == 1
    assert bad.stdout == "MG-START\n"
    assert "vmmd: guest stopped: triple fault on vCPU 0" in bad.stderr


def test_registers_readable_only_while_paused(microguests) -> None:  # type: ignore[no-untyped-def]
    import errno

    from vmmd.errors import NativeError

    with _spin_vm(microguests["64"], 1) as vm:
        vm.start()
        with pytest.raises(NativeError) as exc:
            vm.registers(0)
        assert exc.value.errno == errno.EBUSY
        vm.pause()
        regs, mp_state = vm.registers(0)
        assert 0x200000 <= regs["rip"] < 0x210000  # inside the micro-guest image
        assert regs["cr0"] & 0x80000001 == 0x80000001  # paging, protected mode
        assert regs["efer"] & 0x500 == 0x500  # long mode enabled and active
        assert mp_state == 0  # KVM_MP_STATE_RUNNABLE


@pytest.mark.parametrize("vcpus", [1, 2])
def test_an_idle_guest_is_left_alone(microguests, vcpus: int) -> None:  # type: ignore[no-untyped-def]
    """mg=idle (`sti; hlt`, nothing armed): the halt watchdog asks each quiet
    vCPU once, and its answer (halted, interrupts on: alive) stands while the
    vCPU stays quiet - five more rounds cost no exit at all.  (Asking every
    round, as it used to, cost one exit per vCPU per second.)"""
    spec = VmSpec(vm_id="idle", boot=BootSpec(str(microguests["pvh"]), cmdline="mg=idle"),
                  vcpus=vcpus, memory_mib=32)
    vm = build_vm(spec)
    try:
        vm.start()
        deadline = time.monotonic() + 30
        while b"MG-IDLE" not in vm.console_read(0)[0]:
            assert time.monotonic() < deadline, "guest never went idle"
            time.sleep(0.01)
        time.sleep(3.5)  # the watchdog's first rounds: each quiet vCPU asked once
        before = vm.stats().exits
        time.sleep(5.5)  # five more rounds (one a second)
        assert vm.stats().exits == before
        assert vm.state == Phase.RUNNING  # alive: interrupts on, not HALT
    finally:
        vm.stop()
        vm.close()


def test_a_guest_that_wakes_every_two_seconds_stops_being_asked(microguests) -> None:  # type: ignore[no-untyped-def]
    """mg=tick ms=2000: a tick (a console exit: activity) every 2 s, quiet in between,
    as a tickless idle kernel.  The watchdog asks after 1 quiet round, then 2, then 4
    (ASK_AFTER_MAX 16): spells of 2 s are never asked again - no kick in the window.
    (Asking once per quiet spell, as before, cost a kick every 2 s here.)"""
    spec = VmSpec(vm_id="ticks", boot=BootSpec(str(microguests["pvh"]),
                                               cmdline="mg=tick ms=2000"), memory_mib=32)
    vm = build_vm(spec)
    try:
        vm.start()
        time.sleep(7.0)  # the asks at 1 and 2 quiet rounds
        before = vm.stats()
        time.sleep(6.5)  # three more spells of 2 s
        after = vm.stats()
        assert after.console_bytes > before.console_bytes  # it kept ticking
        assert after.exits_intr == before.exits_intr
        assert vm.state == Phase.RUNNING
    finally:
        vm.stop()
        vm.close()


def test_a_deferred_close_still_releases_everything(microguests) -> None:  # type: ignore[no-untyped-def]
    """DeleteVm's close: KVM's teardown of the VM and the RAM's release finish
    on a C thread after close() returns - and then every fd is back and the
    reaper thread gone (waited for, bounded: only hangs are caught here)."""
    _shared_watcher()
    fds_before, threads_before = _fd_count(), _native_threads()
    vm = _spin_vm(microguests["pvh"], 2)
    vm.start()
    vm.stop()
    vm.close(deferred=True)
    deadline = time.monotonic() + 10
    while (_fd_count(), _native_threads()) != (fds_before, threads_before):
        assert time.monotonic() < deadline, (_fd_count(), fds_before)
        time.sleep(0.01)


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_a_bad_cpuid_blob_is_refused() -> None:
    """vmm_vm_create_vcpus_cpuid checks the blob's length and its entry count (they index
    a buffer): a wrong one is -EINVAL and no vCPU is made; the real one works."""
    import errno

    from vmmd.native._lib import ffi, lib

    with NativeVm() as native:
        native.add_ram(0, 16 << 20)
        vm = native._vm  # noqa: SLF001 - the C call itself is under test
        size = lib.vmm_cpuid_blob_size()
        blob = ffi.new("uint8_t[]", size)
        assert lib.vmm_vm_supported_cpuid(vm, blob, size) == 0
        assert lib.vmm_vm_supported_cpuid(vm, blob, size - 1) == -errno.EINVAL
        nent = ffi.cast("uint32_t *", blob)
        good = nent[0]
        assert 0 < good <= (size - 8) // 40  # struct kvm_cpuid2: nent, padding; 40-byte entries
        for bad_len in (0, size - 1, size + 1):
            assert lib.vmm_vm_create_vcpus_cpuid(vm, 1, blob, bad_len) == -errno.EINVAL
        assert lib.vmm_vm_create_vcpus_cpuid(vm, 1, ffi.NULL, size) == -errno.EINVAL
        nent[0] = (size - 8) // 40 + 1
        assert lib.vmm_vm_create_vcpus_cpuid(vm, 1, blob, size) == -errno.EINVAL
        assert lib.vmm_vm_vcpu_count(vm) == 0
        nent[0] = good
        assert lib.vmm_vm_create_vcpus_cpuid(vm, 1, blob, size) == 0
        assert lib.vmm_vm_vcpu_count(vm) == 1
