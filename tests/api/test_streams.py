"""Server streams: the guest console (history, follow) and lifecycle events (one VM, all VMs)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import grpc
import pytest

from tests.framework import HANG_S
from tests.framework.daemon import Daemon
from tests.framework.rpc import attached, collect, wait_stopped
from vmmd._proto.grpc.health.v1 import health_pb2
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

pytestmark = pytest.mark.kvm

Stub = vmm_pb2_grpc.VmServiceStub
PRINT_OUTPUT = ("MG-HELLO\n" + "".join(chr(c) for c in range(0x20, 0x7F)) + "\nMG-DONE\n").encode()
E = pb.EventType


def console(stub: Stub, vm_id: str, **request: bool) -> list[pb.ConsoleChunk]:
    return list(stub.StreamConsole(pb.StreamConsoleRequest(vm_id=vm_id, **request), timeout=HANG_S))


def joined(chunks: list[pb.ConsoleChunk]) -> bytes:
    """The chunks' bytes, checked to be contiguous from offset 0 with nothing lost."""
    offset = 0
    for c in chunks:
        assert (c.offset, c.lost_bytes) == (offset, 0)
        offset += len(c.data)
    return b"".join(c.data for c in chunks)


def watch(stub: Stub, vm_id: str = "") -> grpc.Call:
    return attached(stub.WatchEvents(pb.WatchEventsRequest(vm_id=vm_id), timeout=HANG_S))


def follow(stub: Stub, vm_id: str) -> Future[list[pb.ConsoleChunk]]:
    """Every chunk of a from_start + follow console stream, read in the background."""
    return collect(attached(stub.StreamConsole(
        pb.StreamConsoleRequest(vm_id=vm_id, from_start=True, follow=True), timeout=HANG_S)))


def events_until_deleted(stream: grpc.Call, count: int = 1) -> list[pb.VmEvent]:
    """Events up to and including the `count`th DELETED."""
    seen = []
    for ev in stream:  # type: ignore[attr-defined]
        seen.append(ev)
        count -= ev.type == E.EVENT_TYPE_DELETED
        if count == 0:
            stream.cancel()
            return seen
    pytest.fail(f"stream ended before DELETED: {seen}")


def test_console_history(stub: Stub, create: Callable[..., pb.Vm]) -> None:
    create("mg=print", vm_id="p")
    stub.StartVm(pb.StartVmRequest(vm_id="p"), timeout=HANG_S)
    vm = wait_stopped(stub, "p")
    assert joined(console(stub, "p", from_start=True)) == PRINT_OUTPUT
    assert vm.counters.console_bytes == len(PRINT_OUTPUT)
    assert console(stub, "p") == []  # without from_start: only what comes next, and nothing will


@pytest.mark.parametrize("started_before", [False, True])
def test_console_follow_ends_when_the_guest_stops(stub: Stub, create: Callable[..., pb.Vm],
                                                  started_before: bool) -> None:
    create("mg=print", vm_id="p")
    start = pb.StartVmRequest(vm_id="p")
    if started_before:
        stub.StartVm(start, timeout=HANG_S)
    chunks = follow(stub, "p")
    if not started_before:
        stub.StartVm(start, timeout=HANG_S)
    assert joined(chunks.result(HANG_S)) == PRINT_OUTPUT


def test_console_follow_ends_when_stopped_by_api(stub: Stub, create: Callable[..., pb.Vm]) -> None:
    create("mg=spin", vm_id="s")
    stub.StartVm(pb.StartVmRequest(vm_id="s"), timeout=HANG_S)
    stream = stub.StreamConsole(pb.StreamConsoleRequest(vm_id="s", from_start=True, follow=True),
                                timeout=HANG_S)
    first = next(stream)
    rest = collect(stream)
    stub.StopVm(pb.StopVmRequest(vm_id="s", force=True), timeout=HANG_S)
    assert joined([first, *rest.result(HANG_S)]) == b"MG-START\n"


@pytest.mark.parametrize("state", ["created", "running"])
def test_console_follow_ends_when_deleted(stub: Stub, daemon: Daemon,
                                          create: Callable[..., pb.Vm], state: str) -> None:
    create("mg=spin", vm_id="d")
    if state == "running":
        stub.StartVm(pb.StartVmRequest(vm_id="d"), timeout=HANG_S)
    followers = [follow(stub, "d") for _ in range(4)]
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="d"), timeout=HANG_S)
    for f in followers:
        # The delete may cut the guest's line short: it prints byte by byte.
        assert b"MG-START\n".startswith(b"".join(c.data for c in f.result(HANG_S)))
    assert daemon.health() == health_pb2.HealthCheckResponse.SERVING


def test_events_of_all_vms(stub: Stub, create: Callable[..., pb.Vm]) -> None:
    stream = watch(stub)
    create(vm_id="a")
    create(vm_id="b")
    for verb, request in [(stub.StartVm, pb.StartVmRequest), (stub.PauseVm, pb.PauseVmRequest),
                          (stub.PauseVm, pb.PauseVmRequest), (stub.ResumeVm, pb.ResumeVmRequest),
                          (stub.ResumeVm, pb.ResumeVmRequest)]:
        verb(request(vm_id="a"), timeout=HANG_S)
    stub.StopVm(pb.StopVmRequest(vm_id="a", timeout_ms=50), timeout=HANG_S)
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="a"), timeout=HANG_S)
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="b"), timeout=HANG_S)
    seen = events_until_deleted(stream, 2)
    assert [(e.vm_id, e.type) for e in seen] == [
        ("a", E.EVENT_TYPE_CREATED), ("b", E.EVENT_TYPE_CREATED), ("a", E.EVENT_TYPE_STARTED),
        ("a", E.EVENT_TYPE_PAUSED), ("a", E.EVENT_TYPE_RESUMED),  # idempotent repeats: no event
        ("a", E.EVENT_TYPE_STOPPED), ("a", E.EVENT_TYPE_DELETED), ("b", E.EVENT_TYPE_DELETED)]
    assert seen[5].stop.reason == pb.STOP_REASON_STOPPED_BY_API
    assert all(e.time.seconds > 0 for e in seen)


@pytest.mark.parametrize(("cmdline", "reason"), [
    ("mg=spin", pb.STOP_REASON_STOPPED_BY_API),  # deleted while running
    ("mg=reset", pb.STOP_REASON_REBOOT),
    ("mg=triple", pb.STOP_REASON_CRASH),
])
def test_events_of_one_vm(stub: Stub, create: Callable[..., pb.Vm], cmdline: str,
                          reason: int) -> None:
    create(cmdline, vm_id="one")
    create(vm_id="other")
    stream = watch(stub, "one")
    for vm_id in ("other", "one"):
        stub.StartVm(pb.StartVmRequest(vm_id=vm_id), timeout=HANG_S)
    if reason != pb.STOP_REASON_STOPPED_BY_API:
        wait_stopped(stub, "one")
    for vm_id in ("other", "one"):
        stub.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=HANG_S)
    seen = events_until_deleted(stream)
    assert {e.vm_id for e in seen} == {"one"}
    assert [e.type for e in seen] == [E.EVENT_TYPE_STARTED, E.EVENT_TYPE_STOPPED,
                                      E.EVENT_TYPE_DELETED]
    assert seen[1].stop.reason == reason
