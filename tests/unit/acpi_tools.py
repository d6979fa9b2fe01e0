"""ACPICA's tools (Debian acpica-tools) as the unit tests' judges of ACPI tables: a table vmmd
writes must disassemble (iasl -d) without an error, a warning or a bad checksum, a DSDT's
disassembly must compile back without an error or a warning, and acpiexec - ACPICA's AML
interpreter, the one Linux runs - must load the tables and run their methods."""

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


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing (Debian package acpica-tools; `make test` installs it)")
    return path


def _run(args: list[str], cwd: str, tool: str = "iasl") -> str:
    r = subprocess.run([_tool(tool), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
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


def execute(tables: dict[str, bytes], *commands: str) -> str:
    """acpiexec's output for `commands` (e.g. "evaluate \\_SB.VGEN.ADDR") run on the tables
    (signature -> bytes; acpiexec supplies its own RSDP and XSDT); the tables must load
    cleanly."""
    with tempfile.TemporaryDirectory() as d:
        names = []
        for sig, data in tables.items():
            Path(d, f"{sig}.dat").write_bytes(data)
            names.append(f"{sig}.dat")
        out = _run(["-b", "; ".join(commands), *names], d, tool="acpiexec")
    assert "AML tables successfully acquired and loaded" in out, out
    return out


def wrap_dsdt(aml: bytes) -> bytes:
    """A DSDT whose definition block is `aml`."""
    return build_table(b"DSDT", DSDT_REVISION, aml)
