"""Test-only escape attempts (native/testhooks/): what a compromised cell
worker would try, as raw system calls, for the jail and seccomp tests.

The cffi module `vmmd.native._testhooks` exists in test builds only (`make
test` builds it); available() says whether this is one.  Every function
returns the call's result or -errno, unchecked: the tests assert on it.
"""

from __future__ import annotations

import importlib
from typing import Any

_hooks: Any
try:
    _hooks = importlib.import_module("vmmd.native._testhooks")
except ImportError:  # not a test build
    _hooks = None


def available() -> bool:
    return _hooks is not None


def open_path(path: str, flags: int) -> int:
    return int(_hooks.lib.vmm_test_open(path.encode(), flags))


def execve(path: str) -> int:
    """Returns only when execve failed (-errno)."""
    return int(_hooks.lib.vmm_test_execve(path.encode()))


def ptrace_attach(pid: int) -> int:
    return int(_hooks.lib.vmm_test_ptrace_attach(pid))


def raw_syscall(nr: int) -> int:
    """System call nr with every argument 0."""
    return int(_hooks.lib.vmm_test_syscall(nr))
