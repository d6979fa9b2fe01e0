"""The one launcher of `vmmd serve`, for tests and benchmarks.

    with running_daemon("--stop-timeout", "1") as d, d.client() as c:
        c.list()

    d = spawn(tmp_path / "vmmd.sock", "--max-vms", "4").wait_ready()
    stub = VmServiceStub(d.channel())
    assert d.terminate() == 0

`spawn` starts `python -m vmmd serve --socket SOCKET --log-format console ARGS...` (inside
`wrap` if given, e.g. `ip netns exec NS`) with its output in a log file beside the socket;
`wait_ready` waits for a health Check to answer SERVING.  A Unix socket path is limited to
108 bytes: `running_daemon` puts it in a short /tmp directory, removed at its end.

Every daemon started is in DAEMONS, so a failing test's report can show the logs of the
daemons it could have talked to (`report_logs`, used by tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc

from tests.framework import HANG_S, REPO
from vmmd._proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from vmmd.client import Client

READY_TIMEOUT_S = HANG_S  # hang guards only
EXIT_TIMEOUT_S = 60.0     # SIGTERM stops every VM, gracefully first
# Micro-guests ignore Ctrl-Alt-Del: half a second each to stop gracefully at shutdown.
QUICK_STOP = ("--stop-timeout", "0.5")
LOG_LINES = 300
SERVING = health_pb2.HealthCheckResponse.SERVING


class DaemonError(RuntimeError):
    """The daemon did not come up (its log is in the message)."""


class Daemon:
    """A `vmmd serve` process; its output (the log) goes to `log_path`."""

    def __init__(self, socket: Path, proc: subprocess.Popen[bytes], log_path: Path,
                 started_by: str | None) -> None:
        self.socket = socket
        self.proc = proc
        self.log_path = log_path
        self.started_by = started_by  # the pytest node id current at the start, if any
        self.channels: list[grpc.Channel] = []
        self._kept_log: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    # ---- talking to it ----
    def client(self) -> Client:
        return Client(str(self.socket))

    def channel(self) -> grpc.Channel:
        """A new gRPC channel to the daemon, closed when it is terminated or killed."""
        ch = grpc.insecure_channel(f"unix:{self.socket}")
        self.channels.append(ch)
        return ch

    def health(self, service: str = "", timeout: float = HANG_S) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel())
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def _serving(self) -> bool:
        with grpc.insecure_channel(f"unix:{self.socket}") as ch:
            try:
                stub = health_pb2_grpc.HealthStub(ch)
                return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING
            except grpc.RpcError:
                return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> Daemon:
        """Until a health Check answers SERVING; DaemonError (with the log) if the process
        ends or is not ready within `timeout` (then it is killed)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise DaemonError(f"vmmd serve exited {self.proc.returncode}:\n{self.log_text()}")
            if self.socket.exists() and self._serving():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise DaemonError(f"vmmd serve not ready after {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    # ---- ending it ----
    def terminate(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        """SIGTERM, then its exit status.  One still running after `timeout` seconds is
        killed (its status is then -SIGKILL)."""
        try:
            if self.running():
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return self.proc.returncode
        finally:
            self._close_channels()

    def kill(self) -> None:
        """SIGKILL (its whole process group when it leads one) and reap it."""
        if self.running():
            try:
                if os.getpgid(self.pid) == self.pid:
                    os.killpg(self.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._close_channels()

    def _close_channels(self) -> None:
        for ch in self.channels:
            ch.close()
        self.channels.clear()

    # ---- looking at it ----
    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def settled(self, timeout: float = 10.0) -> tuple[int, int]:
        """(fds, threads) once they have not changed for a second: a cell is
        torn down, and a spare worker made, after the DeleteVm or CreateVm
        that caused it returned, off the request path."""
        seen: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen.append((self.fds(), self.threads()))
            if len(seen) >= 20 and len(set(seen[-20:])) == 1:
                break
            time.sleep(0.05)
        return seen[-1]

    def log_text(self) -> str:
        if self._kept_log is not None:
            return self._kept_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def keep_log(self) -> None:
        """Hold the log in memory from now on (its file is about to be removed)."""
        self._kept_log = self.log_text()


DAEMONS: list[Daemon] = []  # every daemon started, for failure reports


def serve_argv(socket: Path | str, *args: str) -> list[str]:
    """The command line of a daemon on `socket`.  VMMD_TEST_ISOLATION (cells,
    the daemon's default, or none) picks the isolation mode of every daemon a
    test starts, unless the test names one itself (its args come last)."""
    mode = os.environ.get("VMMD_TEST_ISOLATION")
    return [sys.executable, "-m", "vmmd", "serve", "--socket", str(socket),
            "--log-format", "console", *(["--isolation", mode] if mode else []), *args]


def spawn(socket: Path, *args: str, wrap: Sequence[str] = (),
          new_session: bool = False) -> Daemon:
    """Start `python -m vmmd serve --socket SOCKET --log-format console ARGS...` (not waiting
    for it), inside `wrap` if given; in a session of its own with `new_session` (then
    kill() ends its whole process group).  The log goes beside the socket."""
    log_path = socket.with_name(f"{socket.name}.{len(DAEMONS)}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*wrap, *serve_argv(socket, *args)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)},
                                start_new_session=new_session)
    daemon = Daemon(socket, proc, log_path, os.environ.get("PYTEST_CURRENT_TEST"))
    DAEMONS.append(daemon)
    return daemon


def assert_clean_exit(daemon: Daemon) -> None:
    """SIGTERM (if still running) must end it with status 0."""
    rc = daemon.terminate()
    assert rc == 0, f"vmmd serve exited {rc} on SIGTERM:\n{daemon.log_text()}"


@contextmanager
def running_daemon(*args: str, wrap: Sequence[str] = (),
                   check_exit: bool = False) -> Iterator[Daemon]:
    """`vmmd serve --socket <tmp> *args`, ready to answer; inside `wrap` if given.  At the
    end a still-running daemon gets SIGTERM (SIGKILL if it hangs), the directory is removed
    (the log stays readable) and, with `check_exit`, its status must be 0."""
    tmp = Path(tempfile.mkdtemp(prefix="vmmd-", dir="/tmp"))
    daemon = spawn(tmp / "vmmd.sock", *args, wrap=wrap)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.terminate()
        daemon.keep_log()
        shutil.rmtree(tmp, ignore_errors=True)
    if check_exit:
        assert_clean_exit(daemon)


def _test_dir(nodeid: str) -> str:
    return os.path.dirname(nodeid.split("::", 1)[0])


def report_logs(first: int, nodeid: str) -> list[tuple[str, str]]:
    """(title, log tail) of each daemon the test `nodeid` could have talked to: those started
    since DAEMONS[first] (its own, its fixtures'), and those still running that were started
    in a test of its directory (fixtures of module or session scope)."""
    out = []
    for i, d in enumerate(DAEMONS):
        shared = (d.running() and d.started_by is not None
                  and _test_dir(d.started_by) == _test_dir(nodeid))
        if i >= first or shared:
            out.append((f"vmmd serve log (pid {d.pid})", d.log_tail()))
    return out
