"""A client written from proto/ alone, in another language, drives the full lifecycle.

tests/clients/node/lifecycle.js (Node.js, @grpc/grpc-js, loading proto/vmmd/v1/vmm.proto at run
time) runs against the session daemon and prints one JSON line per step.  Its dependencies come
from its package-lock.json through `npm ci`, once per session, into tests/clients/node/node_modules.
Node.js >= 18 and npm are required (Debian: nodejs npm); without them these tests fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.framework import REPO
from tests.framework.daemon import Daemon

NODE_DIR = REPO / "tests" / "clients" / "node"
NODE_MIN_MAJOR = 18
NPM_TIMEOUT_S = 300.0  # a cold npm cache downloads ~33 packages
CLIENT_TIMEOUT_S = 120.0  # hang guard; a run takes well under a second of API time
STEPS = ["connect", "CreateVm", "GetVm", "StartVm", "StreamConsole", "PauseVm", "GetVm(paused)",
         "ResumeVm", "WatchEvents", "StopVm", "DeleteVm", "WatchEvents(events)", "GetVm(deleted)",
         "CreateVm(vcpus=99)", "done"]


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    """The command running lifecycle.js, its dependencies installed by `npm ci` (once)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if not p)
        pytest.fail(f"{missing} not found on PATH: the foreign-client test needs Node.js >= "
                    f"{NODE_MIN_MAJOR} and npm (Debian packages `nodejs npm`; `make test` installs "
                    f"them)", pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False,
                             timeout=60).stdout.strip()
    match = re.fullmatch(r"v(\d+)\..*", version)
    if not match or int(match.group(1)) < NODE_MIN_MAJOR:
        pytest.fail(f"{node} is {version or 'unusable'}; the foreign-client test needs Node.js >= "
                    f"{NODE_MIN_MAJOR}", pytrace=False)
    # --ignore-scripts: nothing in the tree needs an install script (protobufjs's only warns)
    npm_ci = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline"]
    p = subprocess.run(npm_ci, cwd=NODE_DIR, capture_output=True, text=True, check=False,
                       timeout=NPM_TIMEOUT_S)
    if p.returncode != 0:
        pytest.fail(f"`npm ci` in {NODE_DIR} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}",
                    pytrace=False)
    return [node, str(NODE_DIR / "lifecycle.js")]


def run_client(node_client: list[str], socket: Path,
               kernel: str) -> tuple[int, list[dict[str, Any]], str]:
    """(exit status, the JSON step lines, a transcript for assertion messages)."""
    p = subprocess.run([*node_client, str(socket), kernel], capture_output=True, text=True,
                       check=False, timeout=CLIENT_TIMEOUT_S)
    transcript = f"exit {p.returncode}\n--- stdout ---\n{p.stdout}--- stderr ---\n{p.stderr}"
    try:
        lines = [json.loads(line) for line in p.stdout.splitlines()]
    except json.JSONDecodeError:
        pytest.fail(f"lifecycle.js printed a line that is not JSON:\n{transcript}")
    return p.returncode, lines, transcript


@pytest.mark.kvm
@pytest.mark.usefixtures("stub")  # the session daemon is left empty
def test_node_client_drives_the_full_lifecycle(node_client: list[str], daemon: Daemon,
                                               kernel: str) -> None:
    rc, lines, transcript = run_client(node_client, daemon.socket, kernel)
    assert rc == 0, transcript
    assert [line["step"] for line in lines] == STEPS, transcript
    assert all(line["ok"] is True for line in lines), transcript
    step = {line["step"]: line for line in lines}
    assert step["CreateVm"]["state"] == "VM_STATE_CREATED"
    assert step["StartVm"]["state"] == "VM_STATE_RUNNING"
    assert "MG-START\n" in step["StreamConsole"]["console"]
    assert step["GetVm(paused)"]["state"] == "VM_STATE_PAUSED"
    assert step["ResumeVm"]["state"] == "VM_STATE_RUNNING"
    assert step["StopVm"]["reason"] == "STOP_REASON_STOPPED_BY_API"
    assert step["WatchEvents(events)"]["events"] == ["EVENT_TYPE_STOPPED", "EVENT_TYPE_DELETED"]
    assert step["GetVm(deleted)"]["code"] == "NOT_FOUND"
    assert step["CreateVm(vcpus=99)"]["code"] == "INVALID_ARGUMENT"
    assert "config.vcpus" in step["CreateVm(vcpus=99)"]["details"]


@pytest.mark.usefixtures("stub")
def test_node_client_stops_at_the_failing_step(node_client: list[str], daemon: Daemon,
                                               tmp_path: Path) -> None:
    """A check that does not hold ends the run non-zero, naming the step (no KVM needed)."""
    rc, lines, transcript = run_client(node_client, daemon.socket, str(tmp_path / "no-such-kernel"))
    assert rc == 1, transcript
    assert [line["step"] for line in lines] == ["connect", "CreateVm"], transcript
    assert lines[-1]["ok"] is False, transcript
    assert lines[-1]["error"].startswith("INVALID_ARGUMENT: config.boot.kernel_path"), transcript
