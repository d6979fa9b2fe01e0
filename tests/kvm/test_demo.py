"""`vmmd demo` (what `make run` runs): daemon, API, console, shutdown."""

from __future__ import annotations

import subprocess
import sys


def test_demo_boots_through_the_daemon_and_shuts_it_down(microguests) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        [sys.executable, "-m", "vmmd", "demo", "--kernel", str(microguests["pvh"]),
         "--append", "mg=print"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MG-HELLO\n") and done.stdout.endswith("MG-DONE\n")
    assert "guest stopped: guest reset (i8042 reset line)" in done.stderr
    assert "daemon exited with status 0" in done.stderr


def test_demo_fails_when_the_guest_crashes(microguests) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        [sys.executable, "-m", "vmmd", "demo", "--kernel", str(microguests["pvh"]),
         "--append", "mg=triple"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "guest stopped: triple fault on vCPU 0" in done.stderr
    assert "daemon exited with status 0" in done.stderr
