"""vmmd/api/servicer.py: a call that builds VMs (CreateVm, RestoreVm, CloneVm) tells
the manager once it has ended, answered or failed (Manager.settled: the shared
placement then makes the next VM ahead, vmmd/vm/shelf.py); no other call does.
Every unary call runs inside Manager.busy (the shelf waits those out).

A real grpc.aio server (vmmd.api.server) on a temporary socket, a real channel, and
a fake manager: what is checked is gRPC's behaviour as much as ours (a sync
handler's add_callback, for one, never runs after an error)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc
from vmmd.api.server import build_server
from vmmd.errors import StateError
from vmmd.info import Phase, VmInfo

HANG_S = 10.0


class FakeManager:
    """CreateVm of "ok" succeeds; every other verb fails (what it would build does
    not matter here).  Records when `settled` is heard."""

    def __init__(self) -> None:
        self.settled_calls = 0
        self.settled_in_verb = False  # settled heard while a verb was still running
        self._in_verb = False
        self.busy_now = self.busy_calls = 0  # Manager.busy: calls inside it, calls made
        self.heard = threading.Event()

    def settled(self) -> None:
        self.settled_in_verb |= self._in_verb or self.busy_now > 0
        self.settled_calls += 1
        self.heard.set()

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.busy_now += 1
        self.busy_calls += 1
        try:
            yield
        finally:
            self.busy_now -= 1

    def new_id(self) -> str:
        return "vm-1"

    def create(self, spec: Any) -> VmInfo:
        self._in_verb = True
        try:
            time.sleep(0.05)  # a settle that came now would be seen
            if spec.vm_id != "ok":
                raise StateError(f"vm {spec.vm_id!r}: refused by the fake")
            return VmInfo(vm_id=spec.vm_id, phase=Phase.CREATED, spec=spec, cmdline="",
                          created_at=1.0, started_at=None, uptime_s=0.0)
        finally:
            self._in_verb = False

    def __getattr__(self, name: str) -> Any:
        def verb(*args: Any, **kwargs: Any) -> Any:
            raise StateError(f"{name}: refused by the fake")
        return verb


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[vmm_pb2_grpc.VmServiceStub, FakeManager]]:
    manager = FakeManager()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock = tmp_path / "s.sock"
    server = asyncio.run_coroutine_threadsafe(
        build_server(manager, str(sock)), loop).result(HANG_S)  # type: ignore[arg-type]
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            yield vmm_pb2_grpc.VmServiceStub(channel), manager
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(HANG_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(HANG_S)
        loop.close()


KERNEL = pb.VmConfig(boot=pb.BootSource(kernel_path="/k"))
FAILING = {"CreateVm": pb.CreateVmRequest(vm_id="refused", config=KERNEL),
           "CreateVm-bad-request": pb.CreateVmRequest(vm_id="bad"),  # no kernel: refused in convert
           "RestoreVm": pb.RestoreVmRequest(vm_id="a", snapshot_dir="/s"),
           "CloneVm": pb.CloneVmRequest(snapshot_dir="/s", count=2)}


def test_a_create_settles_once_it_has_been_answered(served: Any) -> None:
    stub, m = served
    vm = stub.CreateVm(pb.CreateVmRequest(vm_id="ok", config=KERNEL), timeout=HANG_S)
    assert vm.vm_id == "ok"
    assert m.heard.wait(HANG_S)
    assert m.settled_calls == 1 and not m.settled_in_verb
    assert m.busy_calls == 1  # the call was a request being served


@pytest.mark.parametrize("case", sorted(FAILING))
def test_a_failed_building_call_settles_too(served: Any, case: str) -> None:
    """The failure may have left the spare taken: the next one is made all the same."""
    stub, m = served
    method = case.split("-")[0]
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, method)(FAILING[case], timeout=HANG_S)
    assert e.value.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.INVALID_ARGUMENT), e.value
    assert m.heard.wait(HANG_S)
    assert m.settled_calls == 1 and not m.settled_in_verb


def test_other_calls_do_not_settle(served: Any) -> None:
    stub, m = served
    for call in (lambda: stub.GetVm(pb.GetVmRequest(vm_id="a"), timeout=HANG_S),
                 lambda: stub.StartVm(pb.StartVmRequest(vm_id="a"), timeout=HANG_S)):
        with pytest.raises(grpc.RpcError):
            call()
    time.sleep(0.1)  # a callback would have run by now: the calls have ended
    assert m.settled_calls == 0
    assert m.busy_calls == 2  # but each was a request being served
