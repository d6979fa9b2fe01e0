"""The lifecycle table (vmmd/vm/lifecycle.py): every verb in every phase, then the
same through Vm on a fake C core, where a refused verb must not reach the core."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.framework.fake_native import FakeFactory
from vmmd.errors import StateError
from vmmd.info import Phase
from vmmd.native import StopReason
from vmmd.spec import BootSpec, VmSpec
from vmmd.vm import lifecycle
from vmmd.vm.builder import build_vm
from vmmd.vm.vm import Vm

P = Phase
# Written out here, not read from the table: which verb each phase allows.
ALLOWED = {
    "start": {P.CREATED},
    "pause": {P.RUNNING, P.PAUSED},  # idempotent
    "resume": {P.RUNNING, P.PAUSED},  # idempotent
    "stop": {P.RUNNING, P.PAUSED},
    "shut down": {P.RUNNING},  # Ctrl-Alt-Del: a paused guest cannot answer
    "snapshot": {P.PAUSED},
    "write to the console of": {P.CREATED, P.RUNNING, P.PAUSED},
}


def test_the_table_has_exactly_these_verbs() -> None:
    assert set(lifecycle._ALLOWED) == set(ALLOWED)


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
@pytest.mark.parametrize("verb", list(ALLOWED))
def test_each_verb_in_each_phase(verb: str, phase: Phase) -> None:
    allowed = phase in ALLOWED[verb]
    assert lifecycle.allows(verb, phase) is allowed
    if allowed:
        lifecycle.check_verb(verb, phase)
    else:
        with pytest.raises(StateError) as e:
            lifecycle.check_verb(verb, phase)
        assert str(e.value) == f"cannot {verb} a VM that is {phase.value}"


# ---- the table as Vm applies it ----
@pytest.fixture
def vm_in(kernel: str, natives: FakeFactory) -> Iterator[Callable[[Phase], Vm]]:
    made: list[Vm] = []

    def make(phase: Phase) -> Vm:
        vm = build_vm(VmSpec("v", BootSpec(kernel)), native_factory=natives)
        made.append(vm)
        if phase != P.CREATED:
            vm.start()
        if phase == P.PAUSED:
            vm.pause()
        elif phase == P.STOPPED:
            vm.stop()
        elif phase == P.CRASHED:
            natives.last.guest_stops(StopReason.TRIPLE_FAULT)
            assert vm.wait(10.0) is not None
        assert vm.state == phase
        return vm

    yield make
    for vm in made:
        vm.close()
    assert all(n.closed for n in natives.vms)


VM_VERBS: dict[str, tuple[Callable[[Vm, Path], object], str]] = {
    # verb of the table: (the Vm call, the C core call it leads to)
    "start": (lambda vm, d: vm.start(), "start"),
    "pause": (lambda vm, d: vm.pause(), "pause"),
    "resume": (lambda vm, d: vm.resume(), "resume"),
    "stop": (lambda vm, d: vm.stop(), "stop"),
    "shut down": (lambda vm, d: vm.request_shutdown(), "send_ctrl_alt_del"),
    "snapshot": (lambda vm, d: vm.snapshot(str(d / "snap")), "save_vcpu"),
    "write to the console of": (lambda vm, d: vm.console_input(b"x"), "console_input"),
}


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
@pytest.mark.parametrize("verb", list(VM_VERBS))
def test_vm_applies_the_table_before_the_core(vm_in: Callable[[Phase], Vm], natives: FakeFactory,
                                              tmp_path: Path, verb: str, phase: Phase) -> None:
    vm = vm_in(phase)
    call, native_name = VM_VERBS[verb]
    before = len(natives.last.calls)
    if phase in ALLOWED[verb] or (verb == "stop" and phase in (P.STOPPED, P.CRASHED)):
        call(vm, tmp_path)  # stop() of a stopped VM: idempotent, nothing to do
    else:
        with pytest.raises(StateError, match=f"cannot {verb} a VM that is {phase.value}"):
            call(vm, tmp_path)
        assert native_name not in natives.last.names[before:]
        assert vm.state == phase
