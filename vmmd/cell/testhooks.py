"""Escape drills for tests: a jailed worker tries what an attacker would.

Only a daemon started with VMMD_TEST_HOOKS=1 loads this, and the C hooks
it calls exist only in test builds (`vmmd.native._testhooks`, built by
`make test`, never by `make run` or an install).
"""

from __future__ import annotations

from vmmd.native import testhooks as hooks

if not hooks.available():
    raise ImportError("the test hooks are not built (make test builds them)")


def escape(kind: str, arg: object) -> int:
    """Try one escape; the syscall's result (-errno when refused).  A syscall
    off the seccomp list never returns: the worker dies."""
    if kind == "open":
        return hooks.open_path(str(arg), 0)
    if kind == "execve":
        return hooks.execve(str(arg))
    if kind == "ptrace":
        return hooks.ptrace_attach(int(arg))  # type: ignore[call-overload]
    if kind == "syscall":
        return hooks.raw_syscall(int(arg))  # type: ignore[call-overload]
    raise ValueError(f"no escape {kind!r}")
