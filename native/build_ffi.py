"""cffi build script for the vmmd C core (API mode, out-of-line).

setup.py names this file in `cffi_modules`; pip compiles the C core into
`vmmd.native._core` at install.  The cdef is vmmcore.h itself, minus its
preprocessor lines, so the C and Python views of the interface cannot drift.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))
# Every header: a change to one rebuilds the core (setuptools only tracks the
# sources otherwise, and a stale .so would fail the core-version check, or worse).
HEADERS = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.h"))
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
          "-fno-strict-aliasing"]


def cdef_text() -> str:
    lines = (HERE / "vmmcore.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "vmmd.native._core",
    '#include "vmmcore.h"',
    sources=SOURCES,
    depends=HEADERS,
    # -iquote, not include_dirs (-I): native/ is searched for "..." includes
    # only, so native/seccomp.h does not hide libseccomp's <seccomp.h>.
    extra_compile_args=CFLAGS + ["-iquote", str(HERE.relative_to(HERE.parent))],
    extra_link_args=["-pthread"],
    # The cell workers' seccomp filter (seccomp.c): libseccomp resolves call
    # names per architecture and builds the BPF, which we would hand-write.
    libraries=["seccomp"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
