"""The standard gRPC health and server-reflection services.

Served beside VmService so generic tools (grpcurl, grpc_health_probe) and
clients in any language can probe the daemon and discover the API from the
server itself.  Implemented here from the standard protos in proto/grpc/
(both reflection versions, v1 and v1alpha), on the process's descriptor pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from vmmd._proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from vmmd._proto.grpc.reflection.v1 import reflection_pb2 as refl_v1
from vmmd._proto.grpc.reflection.v1 import reflection_pb2_grpc as refl_v1_grpc
from vmmd._proto.grpc.reflection.v1alpha import reflection_pb2 as refl_v1a
from vmmd._proto.grpc.reflection.v1alpha import reflection_pb2_grpc as refl_v1a_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
NOT_FOUND = 5  # grpc.StatusCode.NOT_FOUND's number, as reflection reports it


class HealthServicer(health_pb2_grpc.HealthServicer):
    """"" (the server) and every registered service name: SERVING until shutdown."""

    def __init__(self, services: list[str]) -> None:
        self._status = {name: SERVING for name in ["", *services]}
        self._lock = threading.Lock()
        self._watchers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def set_all(self, status: Any) -> None:
        """Any thread; Watch streams hear of it at once."""
        with self._lock:
            for name in self._status:
                self._status[name] = status
            watchers = list(self._watchers)
        for loop, changed in watchers:
            loop.call_soon_threadsafe(changed.set)

    def Check(self, request: Any, context: Any) -> Any:
        status = self._status.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"service: unknown {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """A coroutine on the server's loop: an open Watch holds no thread."""
        me = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._watchers.add(me)
        try:
            last = None
            while True:
                me[1].clear()
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status != last:
                    last = status
                    yield health_pb2.HealthCheckResponse(status=status)
                await me[1].wait()
        finally:
            with self._lock:
                self._watchers.discard(me)


def _file_bytes(fd: Any, seen: set[str]) -> list[bytes]:
    """fd and its dependencies, each once, serialized as FileDescriptorProto."""
    if fd.name in seen:
        return []
    seen.add(fd.name)
    proto = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(proto)
    out = [proto.SerializeToString()]
    for dep in fd.dependencies:
        out.extend(_file_bytes(dep, seen))
    return out


class ReflectionServicer:
    """grpc.reflection.{v1,v1alpha}.ServerReflection over the default pool."""

    def __init__(self, pb: ModuleType, services: list[str]) -> None:
        self._pb = pb
        self._services = sorted(services)
        self._pool = descriptor_pool.Default()

    def _files(self, fd: Any) -> Any:
        return self._pb.ServerReflectionResponse(
            file_descriptor_response=self._pb.FileDescriptorResponse(
                file_descriptor_proto=_file_bytes(fd, set())))

    def _answer(self, req: Any) -> Any:
        pb, kind = self._pb, req.WhichOneof("message_request")
        try:
            if kind == "file_by_filename":
                return self._files(self._pool.FindFileByName(req.file_by_filename))
            if kind == "file_containing_symbol":
                return self._files(self._pool.FindFileContainingSymbol(req.file_containing_symbol))
            if kind == "list_services":
                return pb.ServerReflectionResponse(list_services_response=pb.ListServiceResponse(
                    service=[pb.ServiceResponse(name=n) for n in self._services]))
            if kind == "all_extension_numbers_of_type":
                msg = self._pool.FindMessageTypeByName(req.all_extension_numbers_of_type)
                numbers = [e.number for e in self._pool.FindAllExtensions(msg)]
                return pb.ServerReflectionResponse(
                    all_extension_numbers_response=pb.ExtensionNumberResponse(
                        base_type_name=msg.full_name, extension_number=numbers))
            if kind == "file_containing_extension":
                ext = req.file_containing_extension
                msg = self._pool.FindMessageTypeByName(ext.containing_type)
                found = self._pool.FindExtensionByNumber(msg, ext.extension_number)
                return self._files(found.file)  # type: ignore[attr-defined]
        except KeyError:
            pass
        return pb.ServerReflectionResponse(error_response=pb.ErrorResponse(
            error_code=NOT_FOUND, error_message=f"{kind}: not found"))

    def ServerReflectionInfo(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        for req in request_iterator:
            resp = self._answer(req)
            resp.valid_host = req.host
            resp.original_request.CopyFrom(req)
            yield resp


def add_discovery_services(server: Any, services: list[str]) -> HealthServicer:
    """Register health and reflection; `services` are the full names served."""
    names = [*services, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
             "grpc.reflection.v1alpha.ServerReflection"]
    health = HealthServicer(names)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    refl_v1_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(refl_v1, names), server)
    refl_v1a_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(refl_v1a, names), server)
    return health
