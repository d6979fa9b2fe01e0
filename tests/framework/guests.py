"""The micro-guests (tests/guests/): their builder, loaded from its path, and their build."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

from tests.framework import MICROGUEST_DIR, REPO


@functools.cache
def microguest_builder() -> ModuleType:
    """tests/guests/build.py: build(), and what the guests print (fnv1a32, net_frame, ...)."""
    spec = importlib.util.spec_from_file_location("mg_build", REPO / "tests" / "guests" / "build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_microguests(out_dir: Path = MICROGUEST_DIR) -> dict[str, Path]:
    """Build (if needed) the micro-guest ELF files: {"pvh": ..., "64": ...}."""
    return {k: Path(v) for k, v in microguest_builder().build(out_dir).items()}
