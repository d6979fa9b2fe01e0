"""Build vmmd.native._testhooks (testhooks.h): the cell tests' escape attempts.

Test builds only: the Makefile's `test` target runs this (stamp
build/stamps/testhooks); `make run`, `make native` and pip install never do,
so no installed vmmd carries these functions.  The module lands beside the
core in vmmd/native/ (ignored by git, as every .so).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]


def cdef_text() -> str:
    lines = (HERE / "testhooks.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def build() -> Path:
    ffi = FFI()
    ffi.cdef(cdef_text())
    ffi.set_source("vmmd.native._testhooks", '#include "testhooks.h"',
                   sources=[str(HERE / "testhooks.c")], include_dirs=[str(HERE)],
                   extra_compile_args=CFLAGS)
    tmp = REPO / "build" / "testhooks"
    built = Path(ffi.compile(tmpdir=str(tmp)))
    out = REPO / "vmmd" / "native" / built.name
    shutil.copy2(built, out)
    return out


if __name__ == "__main__":
    print(build())
