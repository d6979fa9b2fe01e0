"""VmService: each method parses, calls the manager, converts.  Errors are
mapped to status codes once, by the `edge` decorators (status.py).

Unary methods are plain functions (the server runs them on its thread pool:
the manager blocks); those that must know when the call has ended (the three
that build VMs, StopVm) are wrapped in a coroutine that runs them on that pool
(`edge_ended`).  Streaming methods are coroutines on the server's event
loop: a follower waits on an asyncio event that the VM's watcher thread (or
the event publisher) sets, so an open stream holds no thread.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc
from vmmd.api import convert
from vmmd.api.status import status_for
from vmmd.errors import InvalidSpecError
from vmmd.log import get_logger
from vmmd.manager import Manager
from vmmd.record import Record

F = TypeVar("F", bound=Callable[..., Any])
log = get_logger(__name__)


def _status(method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one translation of an error into a status, for every method."""
    if isinstance(exc, InvalidSpecError):
        exc = convert.request_error(method, exc)
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("api.internal_error", method=method, error=message)
    return code, message


def edge(fn: F) -> F:
    """Translate domain exceptions into a gRPC status (unary methods)."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return _busy(fn, self, request, context)
        except Exception as e:  # noqa: BLE001 - every error leaves as a status
            context.abort(*_status(fn.__name__, e))
    return wrapper  # type: ignore[return-value]


def _busy(fn: Callable[..., Any], self: VmServicer, request: Any, context: Any) -> Any:
    """A unary call's body, the manager told a request is being served."""
    with self.m.busy():
        _decoded(request)
        return fn(self, request, context)


def edge_ended(*, settles: bool = False, gone: bool = False) -> Callable[[F], F]:
    """As `edge`, for the calls that must know when they have ended: a coroutine
    that runs the body on the unary pool (as grpc.aio runs sync handlers) with the
    aio context, whose done callbacks run once the call's task is done, answered,
    failed or cancelled by its client.  A sync handler's context.add_callback will
    not do: with grpcio 1.85 it runs as soon as the body returns, before the reply
    is sent, and never after an error or a cancel.  The callbacks are registered
    here, on the loop, before the body starts: one registered later would miss a
    cancel that came first.

    settles: a call that builds VMs (CreateVm, RestoreVm, CloneVm) tells the
    manager then (Manager.settled), which may prepare the next VM: not sooner, as
    work beside the reply slows it, and also after a failure.
    gone: the body gets a keyword `gone`, a callable saying whether the call has
    ended (its client cancelled or went away): StopVm's wait gives up then."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(self: VmServicer, request: Any, context: grpc.aio.ServicerContext
                          ) -> Any:
            # (grpc-stubs declares DoneCallback a class where a Protocol was meant)
            if settles:
                context.add_done_callback(lambda _: self.m.settled())  # type: ignore[arg-type]
            body: Callable[..., Any] = fn
            if gone:
                ended = threading.Event()
                context.add_done_callback(lambda _: ended.set())  # type: ignore[arg-type]
                body = functools.partial(fn, gone=ended.is_set)
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self.pool, _busy, body, self, request, context)
            except Exception as e:  # noqa: BLE001 - every error leaves as a status
                await context.abort(*_status(fn.__name__, e))
        return wrapper  # type: ignore[return-value]
    return decorate


def edge_stream(fn: F) -> F:
    """The same for server-streaming methods (async generators)."""
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[Any]:
        try:
            _decoded(request)
            async for item in fn(self, request, context):
                yield item
        except Exception as e:  # noqa: BLE001 - every error leaves as a status
            await context.abort(*_status(fn.__name__, e))
    return wrapper  # type: ignore[return-value]


class Undecodable(Record):
    """A request whose bytes are not the message they should be."""

    message: str
    problem: str


def _decoder(cls: Any) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(cls.DESCRIPTOR.full_name, str(e))
    return decode


def _decoded(request: Any) -> None:
    """gRPC would answer INTERNAL for bytes that do not decode (its own
    deserializer fails before any handler runs): they are the client's."""
    if isinstance(request, Undecodable):
        raise InvalidSpecError("request", f"does not decode as {request.message}: "
                               f"{request.problem}")


def vm_service_handlers(servicer: VmServicer) -> grpc.GenericRpcHandler:
    """VmService's handlers, as the generated add_..._to_server would make
    them, but with decoders that hand undecodable bytes to the edge."""
    service = pb.DESCRIPTOR.services_by_name["VmService"]
    handlers = {}
    for m in service.methods:
        fn, decode = getattr(servicer, m.name), _decoder(getattr(pb, m.input_type.name))
        encode = getattr(pb, m.output_type.name).SerializeToString
        make = (grpc.unary_stream_rpc_method_handler if m.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[m.name] = make(fn, request_deserializer=decode, response_serializer=encode)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class _Wake:
    """An asyncio event another thread may set (through the loop)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self._loop.call_soon_threadsafe(self.event.set)


async def _attached(context: grpc.aio.ServicerContext) -> None:
    """Send the response headers as soon as a stream is attached (VM found,
    watcher subscribed): a client that waits for them misses nothing later."""
    await context.send_initial_metadata(())


class VmServicer(vmm_pb2_grpc.VmServiceServicer):
    def __init__(self, manager: Manager, pool: Executor | None = None) -> None:
        """pool: where the calls that build VMs run (the server's unary pool;
        None: the loop's default executor)."""
        self.m = manager
        self.pool = pool

    @edge_ended(settles=True)
    def CreateVm(self, request: pb.CreateVmRequest, context: Any) -> pb.Vm:
        spec = convert.spec_from_create(request, request.vm_id or self.m.new_id())
        return convert.vm_to_proto(self.m.create(spec))

    @edge
    def StartVm(self, request: pb.StartVmRequest, context: Any) -> pb.Vm:
        return convert.vm_to_proto(self.m.start(convert.require_id(request.vm_id)))

    @edge
    def PauseVm(self, request: pb.PauseVmRequest, context: Any) -> pb.Vm:
        return convert.vm_to_proto(self.m.pause(convert.require_id(request.vm_id)))

    @edge
    def ResumeVm(self, request: pb.ResumeVmRequest, context: Any) -> pb.Vm:
        return convert.vm_to_proto(self.m.resume(convert.require_id(request.vm_id)))

    @edge_ended(gone=True)
    def StopVm(self, request: pb.StopVmRequest, context: Any, *,
               gone: Callable[[], bool] = lambda: False) -> pb.Vm:  # (edge_ended gives it)
        timeout_s = convert.stop_timeout_s(request.timeout_ms)
        return convert.vm_to_proto(self.m.stop(convert.require_id(request.vm_id),
                                               timeout_s=timeout_s, force=request.force,
                                               gone=gone))

    @edge
    def DeleteVm(self, request: pb.DeleteVmRequest, context: Any) -> pb.DeleteVmResponse:
        self.m.delete(convert.require_id(request.vm_id))
        return pb.DeleteVmResponse()

    @edge
    def GetVm(self, request: pb.GetVmRequest, context: Any) -> pb.Vm:
        return convert.vm_to_proto(self.m.get(convert.require_id(request.vm_id)))

    @edge
    def ListVms(self, request: pb.ListVmsRequest, context: Any) -> pb.ListVmsResponse:
        return pb.ListVmsResponse(vms=[convert.vm_to_proto(v) for v in self.m.list_vms()],
                                  memory=convert.budget_to_proto(self.m.memory_info()))

    @edge
    def WriteConsole(self, request: pb.WriteConsoleRequest, context: Any) -> pb.WriteConsoleResponse:
        n = self.m.console_input(convert.require_id(request.vm_id), request.data)
        return pb.WriteConsoleResponse(accepted=n)

    @edge
    def SnapshotVm(self, request: pb.SnapshotVmRequest, context: Any) -> pb.Snapshot:
        info = self.m.snapshot(convert.require_id(request.vm_id), request.snapshot_dir,
                               diff=convert.is_diff(request.type))
        return convert.snapshot_to_proto(info)

    @edge_ended(settles=True)
    def RestoreVm(self, request: pb.RestoreVmRequest, context: Any) -> pb.Vm:
        spec = convert.restore_spec(request, request.vm_id or self.m.new_id())
        return convert.vm_to_proto(self.m.restore(spec, resume=request.resume))

    @edge_ended(settles=True)
    def CloneVm(self, request: pb.CloneVmRequest, context: Any) -> pb.CloneVmResponse:
        specs = convert.clone_specs(request, request.id_prefix or self.m.new_id())
        return pb.CloneVmResponse(vms=[convert.vm_to_proto(v)
                                       for v in self.m.clone(specs, resume=request.resume)])

    @edge
    def MergeSnapshots(self, request: pb.MergeSnapshotsRequest, context: Any) -> pb.Snapshot:
        return convert.snapshot_to_proto(self.m.merge(request.base_dir, request.diff_dir))

    @edge_stream
    async def StreamConsole(self, request: pb.StreamConsoleRequest,
                            context: Any) -> AsyncIterator[pb.ConsoleChunk]:
        """History, then (following) live output until the VM stops or is
        deleted; a cancelled call just ends the coroutine."""
        cursor = self.m.console_cursor(convert.require_id(request.vm_id),
                                       from_start=request.from_start)
        wake = _Wake()
        unwatch = cursor.watch(wake)
        try:
            await _attached(context)
            while True:
                wake.event.clear()  # before reading: what comes after wakes us
                chunk = cursor.read()
                if chunk is not None:
                    data, offset, lost = chunk
                    yield pb.ConsoleChunk(data=data, offset=offset, lost_bytes=lost)
                elif not request.follow or cursor.ended:
                    return
                else:
                    await wake.event.wait()
        finally:
            unwatch()

    @edge_stream
    async def WatchEvents(self, request: pb.WatchEventsRequest,
                          context: Any) -> AsyncIterator[pb.VmEvent]:
        wake = _Wake()
        sub = self.m.subscribe(request.vm_id or None, wake)
        try:
            await _attached(context)
            while True:
                wake.event.clear()
                ev = sub.get(timeout=0)
                if ev is not None:
                    yield convert.event_to_proto(ev)
                elif sub.closed:
                    return
                else:
                    await wake.event.wait()
        finally:
            sub.close()
