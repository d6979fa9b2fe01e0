"""iasl (Debian acpica-tools) as the unit tests' judge of ACPI tables: a table vmmd writes must
disassemble without an error, a warning or a bad checksum, and a DSDT's disassembly must
compile back without an error or a warning."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vmmd.vm.boot.acpi import DSDT_REVISION, build_table

# What iasl says of a table it had to excuse (it still exits 0 for most of these).
COMPLAINTS = re.compile(r"error|warning|incorrect|invalid|unknown|could not", re.IGNORECASE)


def _iasl() -> str:
    iasl = shutil.which("iasl")
    if iasl is None:
        pytest.fail("iasl is missing (Debian package acpica-tools; `make test` installs it)")
    return iasl


def _run(args: list[str], cwd: str) -> str:
    r = subprocess.run([_iasl(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # iasl's banner and its summary ("0 Errors, 0 Warnings") are not complaints.
    body = "\n".join(line for line in out.splitlines()
                     if not re.search(r"Compilation successful|\d+ Errors?, \d+ Warnings?|"
                                      r"Copyright|Compiler/Disassembler", line))
    assert not COMPLAINTS.search(body), out
    return out


def disassemble(table: bytes, *, recompile: bool = True) -> str:
    """The table's iasl disassembly (ASL for a DSDT, the field listing for a data table).
    A DSDT is compiled back too: the ASL iasl made of it must be valid ASL."""
    with tempfile.TemporaryDirectory() as d:
        Path(d, "t.dat").write_bytes(table)
        _run(["-d", "t.dat"], d)
        dsl = Path(d, "t.dsl").read_text()
        if recompile and table[:4] == b"DSDT":
            _run(["-p", "back", "t.dsl"], d)
        return dsl


def wrap_dsdt(aml: bytes) -> bytes:
    """A DSDT whose definition block is `aml`."""
    return build_table(b"DSDT", DSDT_REVISION, aml)
