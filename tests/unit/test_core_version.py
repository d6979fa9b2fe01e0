"""vmmd.native refuses a C core built from other sources (a stale `_core` .so):
the import fails with an ImportError that says how to fix it, before any other
use of the core.  The package is loaded here over a fake `_core`, so this
runs without the real one - and also when the real one is the stale one."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "vmmd" / "native" / "_lib.py"  # the module that imports the core and checks it
PROBE = "vmmd_native_core_version_probe"


class CoreWith:
    """A core whose vmm_core_version() answers `version`, and has nothing else."""

    def __init__(self, version: int) -> None:
        self.version = version

    def vmm_core_version(self) -> int:
        return self.version


class CoreBefore:
    """A core built before vmm_core_version() existed."""


def load_over(lib: Any, monkeypatch: pytest.MonkeyPatch
              ) -> tuple[types.ModuleType, Exception | None]:
    """Run vmmd/native/_lib.py as a module of a fresh package whose `_core` holds
    `lib`; the module (as far as it got) and what its import raised."""
    package = types.ModuleType(PROBE)
    package.__path__ = []  # type: ignore[attr-defined]
    spec = importlib.util.spec_from_file_location(f"{PROBE}._lib", LIB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    core = types.ModuleType(f"{PROBE}._core")
    core.ffi = None  # type: ignore[attr-defined]
    core.lib = lib  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, PROBE, package)
    monkeypatch.setitem(sys.modules, f"{PROBE}._lib", module)
    monkeypatch.setitem(sys.modules, f"{PROBE}._core", core)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the tests say which it must be
        return module, e
    return module, None


def expected(monkeypatch: pytest.MonkeyPatch) -> int:
    module, _ = load_over(CoreBefore(), monkeypatch)
    return int(module.CORE_VERSION)


@pytest.mark.parametrize("offset", [1, -1, 1000])
def test_a_core_of_another_version_fails_the_import(monkeypatch: pytest.MonkeyPatch,
                                                    offset: int) -> None:
    want = expected(monkeypatch)
    have = want + offset
    _, err = load_over(CoreWith(have), monkeypatch)
    assert isinstance(err, ImportError), err
    assert str(err) == (f"vmmd's C core is stale (version {have}, this vmmd needs {want}): "
                        "rebuild it with `make native`")


def test_a_core_without_a_version_fails_the_import(monkeypatch: pytest.MonkeyPatch) -> None:
    want = expected(monkeypatch)
    _, err = load_over(CoreBefore(), monkeypatch)
    assert isinstance(err, ImportError), err
    assert str(err) == (f"vmmd's C core is stale (no version, this vmmd needs {want}): "
                        "rebuild it with `make native`")


def test_the_check_passes_the_expected_version(monkeypatch: pytest.MonkeyPatch) -> None:
    module, _ = load_over(CoreBefore(), monkeypatch)
    module._check_core_version(CoreWith(module.CORE_VERSION))  # no exception
    with pytest.raises(ImportError, match="stale"):
        module._check_core_version(CoreWith(module.CORE_VERSION + 1))


def test_python_expects_the_version_the_c_source_defines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both constants are bumped together, or every fresh build fails its import."""
    header = (REPO / "native" / "vmmcore.h").read_text()
    m = re.search(r"^#define VMM_CORE_VERSION (\d+)$", header, re.MULTILINE)
    assert m is not None
    assert int(m[1]) == expected(monkeypatch)
