"""The VM lifecycle over the API, with micro-guests: verbs, refusals, stop reasons."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.framework import HANG_S
from tests.framework.daemon import Daemon
from tests.framework.rpc import list_ids, rpc_error, wait_stopped
from vmmd._proto.grpc.health.v1 import health_pb2
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

pytestmark = pytest.mark.kvm

Stub = vmm_pb2_grpc.VmServiceStub
RACE_ROUNDS = 40
STATE_NAMES = {"created": pb.VM_STATE_CREATED, "running": pb.VM_STATE_RUNNING,
               "paused": pb.VM_STATE_PAUSED, "stopped": pb.VM_STATE_STOPPED,
               "crashed": pb.VM_STATE_CRASHED}
# A verb applied to "v", and the word for the verb in the refusal.
VERBS: dict[str, tuple[Callable[[Stub], object], str]] = {
    "start": (lambda s: s.StartVm(pb.StartVmRequest(vm_id="v"), timeout=HANG_S), "start"),
    "pause": (lambda s: s.PauseVm(pb.PauseVmRequest(vm_id="v"), timeout=HANG_S), "pause"),
    "resume": (lambda s: s.ResumeVm(pb.ResumeVmRequest(vm_id="v"), timeout=HANG_S), "resume"),
    "stop": (lambda s: s.StopVm(pb.StopVmRequest(vm_id="v", timeout_ms=50), timeout=HANG_S), "stop"),
    "write": (lambda s: s.WriteConsole(pb.WriteConsoleRequest(vm_id="v", data=b"x"), timeout=HANG_S),
              "write to the console of"),
}


@pytest.fixture()
def vm_in(stub: Stub, create: Callable[..., pb.Vm]) -> Callable[[str], pb.Vm]:
    """vm_in(state) -> VM "v", a micro-guest brought into that state."""
    def make(state: str) -> pb.Vm:
        vm = create("mg=triple" if state == "crashed" else "mg=spin", vm_id="v")
        if state != "created":
            vm = stub.StartVm(pb.StartVmRequest(vm_id="v"), timeout=HANG_S)
        if state == "paused":
            vm = stub.PauseVm(pb.PauseVmRequest(vm_id="v"), timeout=HANG_S)
        if state == "stopped":
            vm = stub.StopVm(pb.StopVmRequest(vm_id="v", force=True), timeout=HANG_S)
        if state == "crashed":
            vm = wait_stopped(stub, "v")
        assert vm.state == STATE_NAMES[state]
        return vm
    return make


def test_create_reports_the_config(create: Callable[..., pb.Vm], kernel: str) -> None:
    vm = create("mg=spin", vm_id="c1", vcpus=2, memory_mib=64)
    assert (vm.vm_id, vm.state) == ("c1", pb.VM_STATE_CREATED)
    assert (vm.config.vcpus, vm.config.memory_mib) == (2, 64)
    assert vm.config.boot.kernel_path == kernel
    assert vm.cmdline == vm.config.boot.cmdline == "mg=spin"
    assert vm.created_at.seconds > 0 and not vm.HasField("started_at") and not vm.HasField("stop")


def test_config_defaults(create: Callable[..., pb.Vm]) -> None:
    vm = create("")
    assert (vm.config.vcpus, vm.config.memory_mib) == (1, 128)
    assert vm.cmdline.startswith("console=ttyS0 ")  # the default command line


def test_cmdline_append_adds_words(stub: Stub, kernel: str) -> None:
    boot = pb.BootSource(kernel_path=kernel, cmdline="mg=spin", cmdline_append="lsr=0")
    vm = stub.CreateVm(pb.CreateVmRequest(vm_id="a", config=pb.VmConfig(boot=boot)), timeout=HANG_S)
    assert vm.cmdline == "mg=spin lsr=0"


def test_full_lifecycle(stub: Stub, create: Callable[..., pb.Vm]) -> None:
    create(vm_id="life")
    steps = [
        (stub.StartVm, pb.StartVmRequest, pb.VM_STATE_RUNNING),
        (stub.PauseVm, pb.PauseVmRequest, pb.VM_STATE_PAUSED),
        (stub.ResumeVm, pb.ResumeVmRequest, pb.VM_STATE_RUNNING),
        (stub.GetVm, pb.GetVmRequest, pb.VM_STATE_RUNNING),
    ]
    for method, request, state in steps:
        vm = method(request(vm_id="life"), timeout=HANG_S)
        assert (vm.vm_id, vm.state) == ("life", state), method
        assert vm.HasField("started_at")
    assert [v.state for v in stub.ListVms(pb.ListVmsRequest(), timeout=HANG_S).vms] == \
        [pb.VM_STATE_RUNNING]
    vm = stub.StopVm(pb.StopVmRequest(vm_id="life", force=True), timeout=HANG_S)
    assert vm.state == pb.VM_STATE_STOPPED
    assert vm.stop.reason == pb.STOP_REASON_STOPPED_BY_API
    assert stub.DeleteVm(pb.DeleteVmRequest(vm_id="life"), timeout=HANG_S) == pb.DeleteVmResponse()
    assert list_ids(stub) == []
    assert rpc_error(stub.GetVm, pb.GetVmRequest(vm_id="life")).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("state", "verb"), [
    ("created", "pause"), ("created", "resume"), ("created", "stop"),
    ("running", "start"), ("paused", "start"),
    ("stopped", "start"), ("stopped", "pause"), ("stopped", "resume"), ("stopped", "stop"),
    ("stopped", "write"),
    ("crashed", "start"), ("crashed", "pause"), ("crashed", "resume"), ("crashed", "stop"),
    ("crashed", "write"),
])
def test_verb_in_wrong_state_is_refused(stub: Stub, vm_in: Callable[[str], pb.Vm], state: str,
                                        verb: str) -> None:
    vm_in(state)
    call, words = VERBS[verb]
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == f"cannot {words} a VM that is {state}"
    assert stub.GetVm(pb.GetVmRequest(vm_id="v"), timeout=HANG_S).state == STATE_NAMES[state]


@pytest.mark.parametrize(("state", "verb", "expected"), [
    ("running", "resume", pb.VM_STATE_RUNNING),
    ("paused", "pause", pb.VM_STATE_PAUSED),
])
def test_pause_and_resume_are_idempotent(vm_in: Callable[[str], pb.Vm], stub: Stub, state: str,
                                         verb: str, expected: int) -> None:
    vm_in(state)
    call, _ = VERBS[verb]
    assert [call(stub).state for _ in range(2)] == [expected, expected]  # type: ignore[attr-defined]


@pytest.mark.parametrize("flavour", ["pvh", "64"])
@pytest.mark.parametrize(("mode", "state", "reason", "message"), [
    ("reset", pb.VM_STATE_STOPPED, pb.STOP_REASON_REBOOT, "guest reset"),
    ("halt", pb.VM_STATE_STOPPED, pb.STOP_REASON_POWEROFF, "halted"),
    ("triple", pb.VM_STATE_CRASHED, pb.STOP_REASON_CRASH, "triple fault on vCPU 0 at rip 0x"),
])
def test_guest_stop_reports_why(stub: Stub, microguests, flavour: str, mode: str,  # type: ignore[no-untyped-def]
                                state: int, reason: int, message: str) -> None:
    boot = pb.BootSource(kernel_path=str(microguests[flavour]), cmdline=f"mg={mode}")
    stub.CreateVm(pb.CreateVmRequest(vm_id="g", config=pb.VmConfig(boot=boot)), timeout=HANG_S)
    stub.StartVm(pb.StartVmRequest(vm_id="g"), timeout=HANG_S)
    vm = wait_stopped(stub, "g")
    assert (vm.state, vm.stop.reason) == (state, reason)
    assert message in vm.stop.message


@pytest.mark.parametrize("state", ["running", "paused"])
@pytest.mark.parametrize("request_fields", [{"timeout_ms": 100}, {"force": True}],
                         ids=["graceful-then-forced", "force"])
def test_stop_by_api(stub: Stub, daemon: Daemon, vm_in: Callable[[str], pb.Vm], state: str,
                     request_fields: dict[str, object]) -> None:
    # mg=spin ignores Ctrl-Alt-Del: a graceful stop of a running guest times out and is forced.
    graceful = state == "running" and not request_fields.get("force")
    vm_in(state)
    log_before = len(daemon.log_text())
    vm = stub.StopVm(pb.StopVmRequest(vm_id="v", **request_fields), timeout=HANG_S)
    assert (vm.state, vm.stop.reason) == (pb.VM_STATE_STOPPED, pb.STOP_REASON_STOPPED_BY_API)
    assert stub.GetVm(pb.GetVmRequest(vm_id="v"), timeout=HANG_S).stop == vm.stop
    assert ("vm.stop_forced" in daemon.log_text()[log_before:]) == graceful


def test_a_graceful_stop_is_forced_once_its_caller_is_gone(stub: Stub, daemon: Daemon,
                                                             vm_in: Callable[[str], pb.Vm]) -> None:
    """StopVm's wait on the guest ends when the call does (Manager.stop's `gone`): mg=spin
    ignores Ctrl-Alt-Del, and the caller gives up long before the stop's 10 minutes."""
    vm_in("running")
    log_before = len(daemon.log_text())
    with pytest.raises(grpc.RpcError) as e:
        stub.StopVm(pb.StopVmRequest(vm_id="v", timeout_ms=600_000), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    vm = wait_stopped(stub, "v")  # HANG_S at most: far less than the stop's own timeout
    assert (vm.state, vm.stop.reason) == (pb.VM_STATE_STOPPED, pb.STOP_REASON_STOPPED_BY_API)
    assert "vm.stop_forced" in daemon.log_text()[log_before:]


@pytest.mark.parametrize("state", list(STATE_NAMES))
def test_delete_in_any_state(stub: Stub, vm_in: Callable[[str], pb.Vm], state: str) -> None:
    vm_in(state)
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="v"), timeout=HANG_S)
    assert list_ids(stub) == []
    assert rpc_error(stub.StartVm, pb.StartVmRequest(vm_id="v")).code() == grpc.StatusCode.NOT_FOUND


def test_write_console_is_bounded_by_the_fifo(stub: Stub, vm_in: Callable[[str], pb.Vm]) -> None:
    vm_in("running")  # mg=spin never reads its UART: the FIFO fills up

    def write(data: bytes) -> int:
        return stub.WriteConsole(pb.WriteConsoleRequest(vm_id="v", data=data), timeout=HANG_S).accepted

    assert write(b"hello") == 5
    assert 0 < write(b"x" * 4096) < 4096
    assert write(b"more") == 0



def test_verbs_racing_delete(stub: Stub, daemon: Daemon, create: Callable[..., pb.Vm]) -> None:
    """Whoever wins, every answer is a clean status, ListVms never fails, the daemon lives on."""
    calls = [(stub.DeleteVm, pb.DeleteVmRequest), (stub.StartVm, pb.StartVmRequest),
             (stub.DeleteVm, pb.DeleteVmRequest), (stub.StartVm, pb.StartVmRequest),
             (stub.GetVm, pb.GetVmRequest), (stub.WriteConsole, pb.WriteConsoleRequest)]
    clean = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
    with ThreadPoolExecutor(len(calls) + 1) as pool:
        for _ in range(RACE_ROUNDS):
            create(vm_id="r")
            listing = pool.submit(stub.ListVms, pb.ListVmsRequest(), timeout=HANG_S)
            racers = [pool.submit(call, request(vm_id="r"), timeout=HANG_S)
                      for call, request in calls]
            errors = [e for e in (f.exception(HANG_S) for f in racers) if e is not None]
            assert all(e.code() in clean for e in errors), errors  # type: ignore[attr-defined]
            assert [vm.vm_id for vm in listing.result(HANG_S).vms] in ([], ["r"])
            assert list_ids(stub) == []  # one DeleteVm won
    assert daemon.health() == health_pb2.HealthCheckResponse.SERVING
