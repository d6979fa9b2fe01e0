"""The daemon process: its socket, refusing a second daemon, shutdown on SIGTERM."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.framework import HANG_S, REPO
from tests.framework.daemon import Daemon
from tests.framework.rpc import attached, collect, list_ids
from vmmd._proto.grpc.health.v1 import health_pb2
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def serve_refused(sock: Path) -> subprocess.CompletedProcess[str]:
    """`vmmd serve` on `sock`, expected to give up at once."""
    return subprocess.run([sys.executable, "-m", "vmmd", "serve", "--socket", str(sock)],
                          cwd=REPO, capture_output=True, text=True, timeout=HANG_S, check=False)


def test_socket_is_private(daemon: Daemon) -> None:
    mode = daemon.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_second_daemon_is_refused(daemon: Daemon) -> None:
    run = serve_refused(daemon.socket)
    assert run.returncode == 2
    assert f"a daemon is already listening on {daemon.socket}" in run.stderr
    assert daemon.health() == SERVING  # the first one is untouched


def test_stale_socket_is_replaced(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))  # bound, never listening, closed: what a killed daemon leaves
    d = start_daemon(socket=sock)
    assert d.health() == SERVING
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_file_that_is_not_a_socket_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    run = serve_refused(path)
    assert run.returncode == 2
    assert "is not a socket" in run.stderr
    assert path.read_text() == "data"


@pytest.mark.kvm
def test_sigterm_stops_vms_and_ends_streams(start_daemon: Callable[..., Daemon], kernel: str) -> None:
    d = start_daemon()
    stub = vmm_pb2_grpc.VmServiceStub(d.channel())
    boot = pb.BootSource(kernel_path=kernel, cmdline="mg=spin")
    for vm_id in ("a", "b"):
        stub.CreateVm(pb.CreateVmRequest(vm_id=vm_id, config=pb.VmConfig(boot=boot)), timeout=HANG_S)
    stub.StartVm(pb.StartVmRequest(vm_id="a"), timeout=HANG_S)
    assert list_ids(stub) == ["a", "b"]
    events = collect(attached(stub.WatchEvents(pb.WatchEventsRequest(), timeout=HANG_S)))
    console = collect(attached(stub.StreamConsole(
        pb.StreamConsoleRequest(vm_id="a", from_start=True, follow=True), timeout=HANG_S)))
    assert d.terminate() == 0
    assert not d.socket.exists()
    # Both streams ended by themselves: the VMs were stopped and deleted, watchers released.
    seen = [(e.vm_id, e.type) for e in events.result(HANG_S)]
    assert seen.index(("a", pb.EVENT_TYPE_STOPPED)) < seen.index(("a", pb.EVENT_TYPE_DELETED))
    assert ("b", pb.EVENT_TYPE_DELETED) in seen
    assert b"MG-START" in b"".join(c.data for c in console.result(HANG_S))
