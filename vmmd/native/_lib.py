"""The cffi module and its contract: the only importer of `vmmd.native._core`.

The core's interface version is checked first (a stale .so fails the import
with a clear message, never later and obscurely), and every C return goes
through check(): -errno becomes NativeError.
"""

from __future__ import annotations

from typing import Any

from vmmd.errors import NativeError

from ._core import ffi, lib

__all__ = ["CORE_VERSION", "check", "ffi", "lib"]

# The C core's interface version this code is written against: VMM_CORE_VERSION
# in native/vmmcore.h.  Bump both together.
CORE_VERSION = 7


def _check_core_version(core: Any) -> None:
    """ImportError unless `core` (the cffi lib) is the C core this vmmd needs: a
    .so built from older sources would otherwise fail later, and obscurely."""
    version = core.vmm_core_version() if hasattr(core, "vmm_core_version") else None
    if version != CORE_VERSION:
        have = "no version" if version is None else f"version {version}"
        raise ImportError(f"vmmd's C core is stale ({have}, this vmmd needs {CORE_VERSION}): "
                          "rebuild it with `make native`")


_check_core_version(lib)  # before anything else reads lib


def check(rc: int, op: str) -> int:
    """Raise NativeError for a negative errno return; pass counts through."""
    if rc < 0:
        raise NativeError(op, -rc)
    return rc
