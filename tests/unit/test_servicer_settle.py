"""vmmd/api/servicer.py: a call that builds VMs (CreateVm, RestoreVm, CloneVm) tells
the manager once it has ended, answered or failed (Manager.settled: the shared
placement then makes the next VM ahead, vmmd/vm/shelf.py); no other call does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd.api.servicer import VmServicer
from vmmd.errors import StateError


class Aborted(Exception):
    pass


class FakeContext:
    """The part of a grpc.aio sync-handler context the servicer uses."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.status: tuple[grpc.StatusCode, str] | None = None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted(details)


class FakeManager:
    """Every verb fails (what it would build does not matter here)."""

    def __init__(self) -> None:
        self.settled_calls = 0

    def settled(self) -> None:
        self.settled_calls += 1

    def new_id(self) -> str:
        return "vm-1"

    def __getattr__(self, name: str) -> Any:
        def verb(*args: Any, **kwargs: Any) -> Any:
            raise StateError(f"{name}: refused by the fake")
        return verb


# Refused before or by the manager: either way, a call that built nothing has ended.
BUILDING = {"CreateVm": pb.CreateVmRequest(vm_id="a"),
            "RestoreVm": pb.RestoreVmRequest(vm_id="a", snapshot_dir="/s"),
            "CloneVm": pb.CloneVmRequest(snapshot_dir="/s", count=2)}
OTHERS = {"StartVm": pb.StartVmRequest(vm_id="a"), "ListVms": pb.ListVmsRequest(),
          "DeleteVm": pb.DeleteVmRequest(vm_id="a")}


@pytest.mark.parametrize("method", sorted(BUILDING))
def test_a_building_call_settles_the_manager_once_it_has_ended(method: str) -> None:
    m, ctx = FakeManager(), FakeContext()
    with pytest.raises(Aborted):
        getattr(VmServicer(m), method)(BUILDING[method], ctx)  # type: ignore[arg-type]
    assert ctx.status is not None and ctx.status[0] != grpc.StatusCode.INTERNAL
    assert m.settled_calls == 0  # not while the call is still answering
    assert len(ctx.callbacks) == 1
    ctx.callbacks[0]()  # gRPC: the call has ended
    assert m.settled_calls == 1


@pytest.mark.parametrize("method", sorted(OTHERS))
def test_other_calls_do_not(method: str) -> None:
    m, ctx = FakeManager(), FakeContext()
    try:
        getattr(VmServicer(m), method)(OTHERS[method], ctx)  # type: ignore[arg-type]
    except Aborted:
        pass
    assert ctx.callbacks == [] and m.settled_calls == 0
