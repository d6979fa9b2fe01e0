"""Building the gRPC server: VmService, health, reflection, on a Unix socket
(and optionally TCP with TLS / mTLS)."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass

import grpc

from vmmd.api._gen.vmmd.v1 import vmm_pb2, vmm_pb2_grpc
from vmmd.api.discovery import NOT_SERVING, HealthServicer, add_discovery_services
from vmmd.api.servicer import VmServicer
from vmmd.manager import Manager

SERVICE_NAME = vmm_pb2.DESCRIPTOR.services_by_name["VmService"].full_name
# Streams (console, events) hold a worker each while open.
MAX_WORKERS = 128


@dataclass(frozen=True)
class TlsConfig:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None  # set: clients must present a cert (mTLS)


@dataclass
class ApiServer:
    server: grpc.Server
    health: HealthServicer
    ports: list[int]

    def stop(self, grace_s: float = 2.0) -> None:
        self.health.set_all(NOT_SERVING)
        self.server.stop(grace_s).wait()


def build_server(manager: Manager, unix_socket: str | None, *, listen: str | None = None,
                 tls: TlsConfig | None = None) -> ApiServer:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS,
                                                    thread_name_prefix="grpc"))
    vmm_pb2_grpc.add_VmServiceServicer_to_server(VmServicer(manager), server)
    health = add_discovery_services(server, [SERVICE_NAME])
    ports = []
    if unix_socket:
        ports.append(server.add_insecure_port(f"unix:{unix_socket}"))
    if listen:
        if tls is None:
            raise ValueError("listen needs TLS")
        creds = grpc.ssl_server_credentials(
            [(tls.private_key, tls.cert_chain)], root_certificates=tls.client_ca,
            require_client_auth=tls.client_ca is not None)
        ports.append(server.add_secure_port(listen, creds))
    server.start()
    return ApiServer(server, health, ports)
