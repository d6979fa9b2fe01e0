"""Building the gRPC server: VmService, health, reflection, on a Unix socket
(and optionally TCP with TLS / mTLS).

The server runs on an asyncio event loop (grpc.aio).  Streams (console,
events, health Watch) are coroutines on that loop: an open stream holds no
thread, so thousands of followers never starve the unary calls.  Unary
calls are plain functions run on a bounded pool whose idle threads exit
(pool.py).
"""

from __future__ import annotations

import grpc

from vmmd._proto.vmmd.v1 import vmm_pb2
from vmmd.api.discovery import NOT_SERVING, HealthServicer, add_discovery_services
from vmmd.api.pool import ElasticPool
from vmmd.api.servicer import VmServicer, vm_service_handlers
from vmmd.manager import Manager
from vmmd.record import Record

SERVICE_NAME = vmm_pb2.DESCRIPTOR.services_by_name["VmService"].full_name
# Unary calls running at once (more wait in the pool's queue); streams are
# not counted here: they run on the event loop.
MAX_WORKERS = 64
IDLE_THREAD_S = 10.0


class TlsConfig(Record):
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None  # set: clients must present a cert (mTLS)


class ApiServer(Record, frozen=False):
    server: grpc.aio.Server
    health: HealthServicer
    ports: list[int]
    pool: ElasticPool

    async def stop(self, grace_s: float = 2.0) -> None:
        self.health.set_all(NOT_SERVING)
        await self.server.stop(grace_s)
        self.pool.shutdown()


async def build_server(manager: Manager, unix_socket: str | None, *, listen: str | None = None,
                       tls: TlsConfig | None = None) -> ApiServer:
    """Build and start the server; call on the loop that will run it."""
    pool = ElasticPool(MAX_WORKERS, idle_s=IDLE_THREAD_S, name="api")
    server = grpc.aio.server(migration_thread_pool=pool)
    server.add_generic_rpc_handlers((vm_service_handlers(VmServicer(manager, pool)),))
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
    await server.start()
    return ApiServer(server, health, ports, pool)
