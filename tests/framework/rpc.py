"""Helpers for tests that call the daemon's gRPC API directly (raw stubs, status codes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TypeVar

import grpc
import pytest

from tests.framework import HANG_S
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

T = TypeVar("T")
S = TypeVar("S", bound=grpc.Call)
STOPPED_STATES = (pb.VM_STATE_STOPPED, pb.VM_STATE_CRASHED)


def config(kernel: str, cmdline: str = "mg=spin", **fields: object) -> pb.VmConfig:
    return pb.VmConfig(boot=pb.BootSource(kernel_path=kernel, cmdline=cmdline), **fields)


def rpc_error(method: Callable[..., object], request: object) -> grpc.RpcError:
    """The error a unary call (or a stream's first message) ends with."""
    with pytest.raises(grpc.RpcError) as info:
        result = method(request, timeout=HANG_S)
        if isinstance(result, grpc.Call):  # a stream: the error comes with the first read
            next(iter(result))  # type: ignore[call-overload]
    return info.value


def attached(stream: S) -> S:
    """The stream once the server attached it (VM found, watcher subscribed): it sent headers."""
    stream.initial_metadata()
    return stream


def collect(stream: Iterable[T]) -> Future[list[T]]:
    """Read a server stream to its end in the background: .result(HANG_S) is every message."""
    done: Future[list[T]] = Future()

    def run() -> None:
        try:
            done.set_result(list(stream))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            done.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return done


def wait_stopped(stub: vmm_pb2_grpc.VmServiceStub, vm_id: str) -> pb.Vm:
    """GetVm until the guest stopped itself (STOPPED or CRASHED); a hang fails."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        vm = stub.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=HANG_S)
        if vm.state in STOPPED_STATES:
            return vm
        time.sleep(0.02)
    pytest.fail(f"VM {vm_id} still {pb.VmState.Name(vm.state)} after {HANG_S}s")


def list_ids(stub: vmm_pb2_grpc.VmServiceStub) -> list[str]:
    return sorted(vm.vm_id for vm in stub.ListVms(pb.ListVmsRequest(), timeout=HANG_S).vms)
