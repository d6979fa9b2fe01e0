"""vmmd.log: structlog loads with the first line that passes the level, and `vmmd run`'s
modules load none of the daemon's (what keeps the one-shot path's start short)."""

from __future__ import annotations

import subprocess
import sys

from tests.framework import REPO


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)


def test_lines_below_the_level_do_not_load_structlog_and_the_rest_log_with_context() -> None:
    r = _python(
        "import sys\n"
        "from vmmd import log\n"
        "log.configure('console', 'warning')\n"
        "lg = log.get_logger('t', vm_id='a1')\n"
        "lg.info('quiet.info'); lg.debug('quiet.debug'); lg.bind(x=1).info('quiet.bound')\n"
        "print('loaded' if 'structlog' in sys.modules else 'not loaded')\n"
        "lg.bind(slot=2).warning('loud.warning', extra=3)\n"
        "lg.error('loud.error')\n"
        "print('loaded' if 'structlog' in sys.modules else 'not loaded')\n")
    assert r.stdout.split() == ["not", "loaded", "loaded"]
    assert "quiet" not in r.stderr
    warning = next(line for line in r.stderr.splitlines() if "loud.warning" in line)
    assert "vm_id=a1" in warning and "slot=2" in warning and "extra=3" in warning
    assert "loud.error" in r.stderr


def test_vmmd_run_loads_none_of_the_daemon() -> None:
    heavy = ("structlog", "grpc", "google.protobuf", "asyncio", "vmmd.manager", "vmmd.cell.cells",
             "vmmd.vm.snapshot", "vmmd.native.testing", "hashlib")
    r = _python("import sys\nimport vmmd.cli.main\n"
                f"print(' '.join(m for m in {heavy!r} if m in sys.modules))\n")
    assert r.stdout.split() == []
