"""Cells: a worker jailed (native/jail.c) and filtered (native/seccomp.c) on
the real kernel, as root.  Each case runs tests/framework/jailchild.py in a
fresh process (single-threaded when it unshares, as a zygote's child is),
which jails itself in an empty directory as uid/gid 200123; the escape
attempts are raw system calls from C (the test-only vmmd.native._testhooks).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.framework import REPO
from tests.framework.jailchild import GUEST_TEXT, JAIL_UID, KEXEC_LOAD, guest_code
from vmmd.native import (
    SECCOMP_EXIT,
    parse_seccomp_report,
    seccomp_allowlist,
    syscall_name,
    testhooks,
)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the jail needs root (mount namespace, pivot_root, setresuid)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm"
    if not testhooks.available():
        return "test hooks not built: make testhooks (make test builds them)"
    return None


REASON = _why_not()
if REASON:
    print(f"tests/native/test_jail.py skipped: {REASON}", file=sys.stderr)
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@dataclass
class Cell:
    returncode: int
    lines: list[dict[str, Any]]
    report: bytes
    stderr: str

    @property
    def found(self) -> dict[str, Any]:
        assert len(self.lines) == 2, f"the child said {self.lines}; stderr:\n{self.stderr}"
        return self.lines[1]


@pytest.fixture
def cell(tmp_path: Path) -> Iterator[Any]:
    def run(step: str, arg: str = "") -> Cell:
        root = tmp_path / f"cell-{step}"
        root.mkdir()
        r, w = os.pipe()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tests.framework.jailchild", step, str(root), str(w), arg],
                cwd=REPO, pass_fds=(w,), capture_output=True, text=True, timeout=60)
            os.close(w)
            w = -1
            report = os.read(r, 4096)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        assert list(root.iterdir()) == []  # the cell wrote nothing into its root
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        return Cell(proc.returncode, lines, report, proc.stderr)

    yield run


def status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def test_jailed_worker_has_no_identity_capability_or_filesystem(cell) -> None:  # type: ignore[no-untyped-def]
    c = cell("status")
    assert c.returncode == 0, c.stderr
    st = status_fields(c.found["status"])
    uid = str(JAIL_UID)
    assert st["Uid"].split() == [uid] * 4
    assert st["Gid"].split() == [uid] * 4
    assert st["Groups"] == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap], 16) == 0, cap
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # filter mode
    assert c.found["listdir"] == []
    # The jail alone: nothing there.  Then the filter: openat never runs.
    assert c.found["jail_open_errno"] == errno.ENOENT
    assert c.found["open_errno"] == errno.EACCES
    assert c.found["hook_open"] == -errno.EACCES
    assert c.found["fstat_ok"]


def test_vm_runs_under_jail_and_filter(cell, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    guest = tmp_path / "guest.bin"
    guest.write_bytes(guest_code())
    c = cell("vm", str(guest))
    assert c.returncode == 0, f"{c.stderr}\nreport: {parse_seccomp_report(c.report)}"
    assert c.found["console"] == GUEST_TEXT.decode()
    assert c.found["threads_after_stop"] == 0


def _assert_trapped(c: Cell, name: str) -> None:
    report = parse_seccomp_report(c.report)
    assert c.returncode == SECCOMP_EXIT, f"exit {c.returncode}, said {c.lines}\n{c.stderr}"
    assert report is not None and report.syscall_name == name, report
    assert len(c.lines) == 1  # nothing after the trap


def test_execve_is_trapped_and_reported(cell) -> None:  # type: ignore[no-untyped-def]
    _assert_trapped(cell("execve"), "execve")


def test_call_off_the_list_is_trapped_and_reported(cell) -> None:  # type: ignore[no-untyped-def]
    assert syscall_name(KEXEC_LOAD) == "kexec_load"
    _assert_trapped(cell("syscall"), "kexec_load")


def test_executable_memory_is_trapped(cell) -> None:  # type: ignore[no-untyped-def]
    _assert_trapped(cell("mmap-exec"), "mmap")


def test_fork_is_trapped_threads_are_not(cell) -> None:  # type: ignore[no-untyped-def]
    # clone is allowed with CLONE_THREAD only (the VM test made vCPU threads).
    _assert_trapped(cell("fork"), "clone")


@pytest.fixture
def other_process() -> Iterator[int]:
    p = subprocess.Popen(["sleep", "60"])
    yield p.pid
    p.kill()
    p.wait()


def test_ptrace_is_trapped(cell, other_process: int) -> None:  # type: ignore[no-untyped-def]
    # Not on the list: the filter traps it before the kernel's own check.
    _assert_trapped(cell("ptrace", str(other_process)), "ptrace")


def test_ptrace_refused_by_the_jail_alone(cell, other_process: int) -> None:  # type: ignore[no-untyped-def]
    # Without the filter, the jail's uid and empty capability set still refuse
    # a root process.
    c = cell("jail-only-ptrace", str(other_process))
    assert c.returncode == 0, c.stderr
    assert c.found["ptrace"] == -errno.EPERM


def test_allowlist_is_small_and_names_real_calls() -> None:
    names = seccomp_allowlist()
    assert len(names) == len(set(names)) <= 60
    assert {"ioctl", "mmap", "futex", "recvmsg"} <= set(names)
    assert not {"execve", "openat", "ptrace", "clone3", "mount", "bind", "listen"} & set(names)


def test_only_unix_sockets_are_made(cell) -> None:  # type: ignore[no-untyped-def]
    """socket() is on the list for virtio-vsock's guest connects: AF_UNIX only."""
    c = cell("unix-socket")
    assert c.returncode == 0, c.stderr
    assert c.found["unix"]
    _assert_trapped(cell("inet-socket"), "socket")
