"""A real `vmmd serve` in a subprocess on a temporary socket, for tests.

    with running_daemon("--stop-timeout", "1") as d, d.client() as c:
        c.list()

The socket lives in a short /tmp directory (a Unix socket path is limited
to 108 bytes; pytest's tmp_path can be longer).  The daemon's log is kept
there, shown when it fails to come up and printed at the end (pytest shows
it for a failed test).  On exit a still-running daemon gets SIGTERM
(SIGKILL if it hangs) and the directory is removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmmd.client import Client, ClientError

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0  # hang guards only
EXIT_TIMEOUT_S = 60.0


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self) -> Client:
        return Client(self.socket)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"vmmd serve exited with {self.proc.returncode}:\n{self.log_text()}")
            if os.path.exists(self.socket):
                try:
                    with self.client() as c:
                        c.list()
                    return
                except ClientError:
                    pass
            if time.monotonic() > deadline:
                pytest.fail(f"vmmd serve not ready after {READY_TIMEOUT_S}s:\n{self.log_text()}")
            time.sleep(0.05)


@contextmanager
def running_daemon(*args: str, wrap: Sequence[str] = ()) -> Iterator[Daemon]:
    """`vmmd serve --socket <tmp> *args`, ready to answer; inside `wrap` if given
    (e.g. `ip netns exec NS`)."""
    tmp = tempfile.mkdtemp(prefix="vmmd-", dir="/tmp")
    log = Path(tmp) / "vmmd.log"
    cmd = [*wrap, sys.executable, "-m", "vmmd", "serve", "--socket", f"{tmp}/vmmd.sock",
           "--log-format", "console", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    daemon = Daemon(proc, f"{tmp}/vmmd.sock", log)
    try:
        daemon._wait_ready()
        yield daemon
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print(f"--- vmmd serve log ---\n{daemon.log_text()}")  # pytest shows it on failure
        shutil.rmtree(tmp, ignore_errors=True)
