"""API tier: a real `vmmd serve` subprocess on a temporary Unix socket, a real gRPC channel.

One daemon serves the whole session (`daemon`); every test starts with it empty (`stub` deletes
what a test left behind).  Tests about the daemon process itself start their own with
`start_daemon`.  Every daemon must exit 0 on SIGTERM; the log of each daemon is attached to a
failing test's report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from tests.conftest import REPO
from vmmd._proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

T = TypeVar("T")
S = TypeVar("S", bound=grpc.Call)
HANG_S = 30.0  # only catches hangs: nothing here should take more than a second or two
STOPPED_STATES = (pb.VM_STATE_STOPPED, pb.VM_STATE_CRASHED)


@dataclass
class Daemon:
    """A `vmmd serve` process; its output (the log) goes to `log_path`."""

    socket: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    channels: list[grpc.Channel] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(f"unix:{self.socket}")
        self.channels.append(ch)
        return ch

    def health(self, service: str = "", timeout: float = HANG_S) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel())
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def wait_ready(self) -> None:
        """Until a health Check answers SERVING; fails with the log if the process ends."""
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vmmd serve exited {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    if self.health(timeout=1) == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"vmmd serve not ready after {HANG_S}s:\n{self.log()}")

    def terminate(self) -> int:
        """SIGTERM, then its exit status (a hang fails)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(HANG_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"vmmd serve ignored SIGTERM for {HANG_S}s:\n{self.log()}")
        finally:
            for ch in self.channels:
                ch.close()


DAEMONS: list[Daemon] = []  # every daemon started, for failure reports
FIRST_OF_TEST = pytest.StashKey[int]()  # index in DAEMONS of the first one a test started
LOG_LINES = 300


def spawn(socket: Path, *args: str, wrap: Sequence[str] = ()) -> Daemon:
    """Start `python -m vmmd serve --socket SOCKET ARGS...` (not waiting for it), inside
    `wrap` if given (e.g. `ip netns exec NS`).  A VM gets half a second to stop
    gracefully at shutdown (micro-guests ignore Ctrl-Alt-Del)."""
    log_path = socket.with_name(f"{socket.name}.{len(DAEMONS)}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "vmmd", "serve", "--socket", str(socket),
             "--log-format", "console", "--stop-timeout", "0.5", *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    daemon = Daemon(socket, proc, log_path)
    DAEMONS.append(daemon)
    return daemon


def assert_clean_exit(daemon: Daemon) -> None:
    rc = daemon.terminate()
    assert rc == 0, f"vmmd serve exited {rc} on SIGTERM:\n{daemon.log()}"


@pytest.fixture(autouse=True)
def _mark_daemons(request: pytest.FixtureRequest) -> None:
    request.node.stash[FIRST_OF_TEST] = len(DAEMONS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failing test's report shows the log of every daemon it could have talked to."""
    report = yield
    if report.failed:
        first = item.stash.get(FIRST_OF_TEST, 0)
        for i, d in enumerate(DAEMONS):
            if i >= first or d.proc.poll() is None:
                tail = "\n".join(d.log().splitlines()[-LOG_LINES:])
                report.sections.append((f"vmmd serve log (pid {d.proc.pid})", tail))
    return report


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="vmmd-api-") as tmp:
        d = spawn(Path(tmp) / "vmmd.sock")
        d.wait_ready()
        yield d
        assert_clean_exit(d)


@pytest.fixture()
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start(*args, socket=None, wrap=()) -> a ready daemon of this test; exit 0 checked at
    teardown."""
    started: list[Daemon] = []

    def start(*args: str, socket: Path | None = None, wrap: Sequence[str] = ()) -> Daemon:
        d = spawn(socket or tmp_path / "vmmd.sock", *args, wrap=wrap)
        started.append(d)
        d.wait_ready()
        return d

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


def config(kernel: str, cmdline: str = "mg=spin", **fields: object) -> pb.VmConfig:
    return pb.VmConfig(boot=pb.BootSource(kernel_path=kernel, cmdline=cmdline), **fields)


@pytest.fixture()
def create(stub: vmm_pb2_grpc.VmServiceStub, kernel: str) -> Callable[..., pb.Vm]:
    """create(cmdline="mg=spin", vm_id="", **config fields) -> the created Vm (a micro-guest)."""
    def make(cmdline: str = "mg=spin", vm_id: str = "", **fields: object) -> pb.Vm:
        return stub.CreateVm(pb.CreateVmRequest(vm_id=vm_id, config=config(kernel, cmdline, **fields)),
                             timeout=HANG_S)
    return make


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
