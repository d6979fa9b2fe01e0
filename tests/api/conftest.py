"""API tier: a real `vmmd serve` subprocess on a temporary Unix socket, a real gRPC channel.

One daemon serves the whole session (`daemon`); every test starts with it empty (`stub` deletes
what a test left behind).  Tests about the daemon process itself start their own with
`start_daemon`.  Every daemon must exit 0 on SIGTERM; the log of each daemon is attached to a
failing test's report (tests/conftest.py).  The launcher and the helpers are tests/framework/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.framework import HANG_S
from tests.framework.daemon import QUICK_STOP, Daemon, assert_clean_exit, running_daemon, spawn
from tests.framework.rpc import config
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    with running_daemon(*QUICK_STOP, check_exit=True) as d:
        yield d


@pytest.fixture()
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start(*args, socket=None, wrap=()) -> a ready daemon of this test; exit 0 checked at
    teardown."""
    started: list[Daemon] = []

    def start(*args: str, socket: Path | None = None, wrap: Sequence[str] = ()) -> Daemon:
        d = spawn(socket or tmp_path / "vmmd.sock", *QUICK_STOP, *args, wrap=wrap)
        started.append(d)
        return d.wait_ready()

    yield start
    for d in started:
        assert_clean_exit(d)


@pytest.fixture(scope="session")
def session_stub(daemon: Daemon) -> vmm_pb2_grpc.VmServiceStub:
    return vmm_pb2_grpc.VmServiceStub(daemon.channel())


@pytest.fixture()
def stub(daemon: Daemon,
         session_stub: vmm_pb2_grpc.VmServiceStub) -> Iterator[vmm_pb2_grpc.VmServiceStub]:
    """The session daemon's VmService, empty at the start of the test and again after it."""
    if daemon.proc.poll() is not None:
        pytest.fail(f"the session daemon died earlier (exit {daemon.proc.returncode})")
    yield session_stub
    for vm in session_stub.ListVms(pb.ListVmsRequest(), timeout=HANG_S).vms:
        session_stub.DeleteVm(pb.DeleteVmRequest(vm_id=vm.vm_id), timeout=HANG_S)


@pytest.fixture()
def kernel(microguests: dict[str, Path]) -> str:
    return str(microguests["64"])


@pytest.fixture()
def create(stub: vmm_pb2_grpc.VmServiceStub, kernel: str) -> Callable[..., pb.Vm]:
    """create(cmdline="mg=spin", vm_id="", **config fields) -> the created Vm (a micro-guest)."""
    def make(cmdline: str = "mg=spin", vm_id: str = "", **fields: object) -> pb.Vm:
        return stub.CreateVm(pb.CreateVmRequest(vm_id=vm_id, config=config(kernel, cmdline, **fields)),
                             timeout=HANG_S)
    return make
