"""Run one VMM process and time it: process start -> a marker in its output, -> its exit.

Every child runs in its own session with a hard deadline; a child still alive when its run
ends (timeout, or killed at its marker) is SIGKILLed with its whole process group, and
`kill_all` (registered at exit) does the same for anything left behind by an interruption.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_live: set[subprocess.Popen[bytes]] = set()


class RunError(RuntimeError):
    """A benchmark run did not do what it should (crash, timeout, missing output)."""


@dataclass
class Run:
    argv: list[str]
    output: bytes
    stderr: bytes
    returncode: int | None  # None: killed by us (timeout or at the marker)
    marker_s: float | None
    exit_s: float | None
    timed_out: bool

    def fail(self, why: str) -> RunError:
        tail = (self.output[-600:] + b"\n" + self.stderr[-600:]).decode(errors="replace")
        return RunError(f"{why}: {' '.join(self.argv)}\n{tail.strip()}")


def _kill(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()
    _live.discard(p)


def kill_all() -> None:
    for p in list(_live):
        _kill(p)


atexit.register(kill_all)


@contextmanager
def tracked(p: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """A child started elsewhere (in a session of its own), killed with its group at the end
    of the block or, after an interruption, at exit."""
    _live.add(p)
    try:
        yield p
    finally:
        _kill(p)


def run(argv: list[str], timeout: float, marker: bytes | None = None,
        kill_at_marker: bool = False) -> Run:
    """Run argv with stdin /dev/null; times are seconds since just before the spawn.  The
    marker's time is when it was first read; `kill_at_marker` ends the run once its line is
    complete (for a guest that may hang after it)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                             start_new_session=True)
        _live.add(p)
        assert p.stdout is not None
        fd = p.stdout.fileno()
        out = bytearray()
        seen = None
        at = 0
        deadline = t0 + timeout
        try:
            while (left := deadline - time.perf_counter()) > 0:
                if not select.select([fd], [], [], left)[0]:
                    continue
                chunk = os.read(fd, 65536)
                now = time.perf_counter()
                if not chunk:
                    break
                start = max(0, len(out) - len(marker or b""))
                out += chunk
                if marker and seen is None and marker in out[start:]:
                    seen, at = now - t0, out.index(marker)
                if seen is not None and kill_at_marker and b"\n" in out[at:]:
                    break  # the marker's whole line is in
            eof_at = time.perf_counter()
            timed_out = eof_at >= deadline
            rc = None
            if not timed_out and not (kill_at_marker and seen is not None):
                try:
                    rc = p.wait(max(0.0, deadline - eof_at))
                except subprocess.TimeoutExpired:
                    timed_out = True
            ended = time.perf_counter() - t0 if rc is not None else None
        finally:
            _kill(p)
            p.stdout.close()
        err.seek(0)
        return Run(argv, bytes(out), err.read(), rc, seen, ended, timed_out)


def run_ok(argv: list[str], timeout: float, expect: bytes, marker: bytes | None = None,
           kill_at_marker: bool = False) -> Run:
    """run(), raising RunError unless `expect` appeared and the process exited 0 (or was
    killed by us at its marker)."""
    r = run(argv, timeout, marker, kill_at_marker)
    if r.timed_out:
        raise r.fail(f"timed out after {timeout:.0f} s")
    if expect not in r.output:
        raise r.fail(f"no {expect.decode()!r} in the output")
    if r.returncode not in (0, None):
        raise r.fail(f"exit status {r.returncode}")
    return r


# ---- an interactive run: the bench talks to the guest while the VMM runs ----
@dataclass
class Live:
    argv: list[str]
    popen: subprocess.Popen[bytes]
    output: bytearray


def start(argv: list[str]) -> Live:
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    _live.add(p)
    return Live(argv, p, bytearray())


def wait_for(live: Live, marker: bytes, timeout: float) -> None:
    """Read the VMM's output until `marker` appeared; RunError on exit or timeout."""
    assert live.popen.stdout is not None
    fd = live.popen.stdout.fileno()
    deadline = time.perf_counter() + timeout
    while marker not in live.output:
        left = deadline - time.perf_counter()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RunError(f"no {marker.decode()!r} after {timeout:.0f} s: {' '.join(live.argv)}\n"
                           + live.output[-600:].decode(errors="replace"))
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RunError(f"exited before {marker.decode()!r}: {' '.join(live.argv)}\n"
                           + live.output[-600:].decode(errors="replace"))
        live.output += chunk


def finish(live: Live, timeout: float, expect: bytes) -> None:
    """Wait for `expect` and the process's exit 0."""
    wait_for(live, expect, timeout)
    rc = live.popen.wait(timeout)
    if rc != 0:
        raise RunError(f"exit status {rc}: {' '.join(live.argv)}")


def stop(live: Live) -> None:
    _kill(live.popen)
    if live.popen.stdout is not None:
        live.popen.stdout.close()
