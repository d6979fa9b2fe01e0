"""Health and server reflection: what generic tools (grpc_health_probe, grpcurl) see."""

from __future__ import annotations

from types import ModuleType

import grpc
import pytest
from google.protobuf import descriptor_pb2

from tests.framework import HANG_S
from tests.framework.daemon import Daemon
from vmmd._proto.grpc.health.v1 import health_pb2
from vmmd._proto.grpc.reflection.v1 import reflection_pb2 as refl_v1
from vmmd._proto.grpc.reflection.v1 import reflection_pb2_grpc as refl_v1_grpc
from vmmd._proto.grpc.reflection.v1alpha import reflection_pb2 as refl_v1a
from vmmd._proto.grpc.reflection.v1alpha import reflection_pb2_grpc as refl_v1a_grpc

SERVICE = "vmmd.v1.VmService"
METHODS = {"CreateVm", "StartVm", "PauseVm", "ResumeVm", "StopVm", "DeleteVm", "GetVm", "ListVms",
           "StreamConsole", "WriteConsole", "WatchEvents", "SnapshotVm", "RestoreVm", "CloneVm",
           "MergeSnapshots"}
REFLECTION = [pytest.param((refl_v1, refl_v1_grpc), id="v1"),
              pytest.param((refl_v1a, refl_v1a_grpc), id="v1alpha")]


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_serving(daemon: Daemon, service: str) -> None:
    assert daemon.health(service) == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service_is_not_found(daemon: Daemon) -> None:
    with pytest.raises(grpc.RpcError) as info:
        daemon.health("no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _reflect(daemon: Daemon, version: tuple[ModuleType, ModuleType], **request: object) -> object:
    pb, pb_grpc = version
    stub = pb_grpc.ServerReflectionStub(daemon.channel())
    responses = list(stub.ServerReflectionInfo(iter([pb.ServerReflectionRequest(**request)]),
                                               timeout=HANG_S))
    assert len(responses) == 1
    return responses[0]


@pytest.mark.parametrize("version", REFLECTION)
def test_reflection_lists_services(daemon: Daemon, version: tuple[ModuleType, ModuleType]) -> None:
    resp = _reflect(daemon, version, list_services="")
    names = {s.name for s in resp.list_services_response.service}  # type: ignore[attr-defined]
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


@pytest.mark.parametrize("version", REFLECTION)
def test_reflection_describes_vm_service(daemon: Daemon, version: tuple[ModuleType, ModuleType]) -> None:
    resp = _reflect(daemon, version, file_containing_symbol=SERVICE)
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in resp.file_descriptor_response.file_descriptor_proto]  # type: ignore[attr-defined]
    by_name = {f.name: f for f in files}
    api = next(f for f in files if f.package == "vmmd.v1")
    assert [s.name for s in api.service] == ["VmService"]
    assert {m.name for m in api.service[0].method} == METHODS
    # Dependencies come along, so a client can rebuild every message type.
    assert set(api.dependency) <= set(by_name)
    streams = {m.name for m in api.service[0].method if m.server_streaming}
    assert streams == {"StreamConsole", "WatchEvents"}


@pytest.mark.parametrize("version", REFLECTION)
def test_reflection_unknown_symbol_is_not_found(daemon: Daemon,
                                                version: tuple[ModuleType, ModuleType]) -> None:
    resp = _reflect(daemon, version, file_containing_symbol="vmmd.v1.NoSuchThing")
    assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]  # type: ignore[attr-defined]
