"""`vmmctl` as a user runs it: a subprocess against a real daemon (its own,
on a temporary socket), human output and `--json`, errors as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.framework import REPO
from tests.framework.console import ConsoleReader
from tests.framework.daemon import running_daemon
from tests.framework.netns import NetNs
from vmmd.client import Client

VMMCTL = Path(sys.executable).with_name("vmmctl")  # the installed entry point
HANG_S = 60.0


@pytest.fixture(scope="module")
def ctl_socket() -> Iterator[str]:
    # Cells named: vmmctl's cell and limit options need them (under VMMD_TEST_ISOLATION=none
    # the daemon would refuse limits, "limits need cells").
    with running_daemon("--stop-timeout", "1", "--isolation", "cells") as d:
        yield str(d.socket)
        assert d.proc.poll() is None, "the daemon died"


def vmmctl(socket: str, *args: str, rc: int = 0, stdin: bytes = b"") -> str:
    """Runs vmmctl (this tree's vmmd, as the daemon launcher runs it: the editable install
    may point at another checkout); checks its exit status; returns stdout (stderr on
    failure)."""
    p = subprocess.run([str(VMMCTL), "--socket", socket, *args], input=stdin, check=False,
                       capture_output=True, timeout=HANG_S,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == rc, f"vmmctl {' '.join(args)}: {p.returncode}\n{p.stderr.decode()}"
    return (p.stdout if rc == 0 else p.stderr).decode()


def vm_json(socket: str, *args: str) -> Any:
    return json.loads(vmmctl(socket, "--json", *args))


@pytest.mark.kvm
def test_lifecycle_with_json_and_table(ctl_socket: str, microguests: dict[str, Path]) -> None:
    vm = vm_json(ctl_socket, "create", "--id", "ctl-1", "--kernel", str(microguests["pvh"]),
                 "--cmdline", "mg=spin", "--append", "lsr=0", "--vcpus", "2", "--mem-mib", "32")
    assert vm["vm_id"] == "ctl-1"
    assert vm["state"] == "VM_STATE_CREATED"
    assert vm["config"]["vcpus"] == 2 and vm["config"]["memory_mib"] == 32
    assert vm["cmdline"] == "mg=spin lsr=0"
    assert vm_json(ctl_socket, "start", "ctl-1")["state"] == "VM_STATE_RUNNING"

    table = vmmctl(ctl_socket, "get", "ctl-1").splitlines()
    assert table[0].split() == ["ID", "STATE", "VCPUS", "MEM", "UPTIME", "CELL", "PID", "STOP"]
    assert table[1].split()[:4] == ["ctl-1", "running", "2", "32MiB"]
    listed = vm_json(ctl_socket, "list")["vms"]
    assert [(v["vm_id"], v["state"]) for v in listed] == [("ctl-1", "VM_STATE_RUNNING")]

    # The spinning guest ignores Ctrl-Alt-Del: forced after the timeout.
    stopped = vm_json(ctl_socket, "stop", "ctl-1", "--timeout-ms", "100")
    assert stopped["state"] == "VM_STATE_STOPPED"
    assert stopped["stop"]["reason"] == "STOP_REASON_STOPPED_BY_API"
    assert vmmctl(ctl_socket, "get", "ctl-1").splitlines()[1].split()[-1] == "stopped_by_api"
    assert vmmctl(ctl_socket, "delete", "ctl-1") == "deleted ctl-1\n"
    assert vm_json(ctl_socket, "list") == {"vms": []}


@pytest.mark.kvm
def test_console_streams_until_the_vm_stops(ctl_socket: str, microguests: dict[str, Path]) -> None:
    vmmctl(ctl_socket, "create", "--id", "ctl-con", "--kernel", str(microguests["64"]),
           "--cmdline", "mg=print")
    vmmctl(ctl_socket, "start", "ctl-con")
    # stdin goes to the guest's UART (this guest ignores it); the guest's reset ends it.
    out = vmmctl(ctl_socket, "console", "ctl-con", stdin=b"typed\n")
    assert out.startswith("MG-HELLO\n") and out.endswith("MG-DONE\n")
    assert vmmctl(ctl_socket, "get", "ctl-con").splitlines()[1].split()[-1] == "reboot"
    vmmctl(ctl_socket, "delete", "ctl-con")


@pytest.mark.kvm
def test_cell_and_limits_reach_the_config(ctl_socket: str, microguests: dict[str, Path]) -> None:
    vm = vm_json(ctl_socket, "create", "--id", "ctl-cell", "--kernel", str(microguests["64"]),
                 "--mem-mib", "32", "--cell", "web", "--cpu-limit", "0.5",
                 "--memory-limit-mib", "256", "--pids-limit", "64")
    assert vm["config"]["cell"] == "web"
    assert vm["config"]["limits"] == {"cpu": 0.5, "memory_mib": "256", "pids": 64}
    row = vmmctl(ctl_socket, "list").splitlines()[1].split()
    if "cell" not in vm:  # the daemon tells no cell yet: the column is the config's
        assert row[5:7] == ["web", "-"]
    vmmctl(ctl_socket, "delete", "ctl-cell")


@pytest.mark.kvm
def test_acpi_reaches_the_config(ctl_socket: str, microguests: dict[str, Path]) -> None:
    vm = vm_json(ctl_socket, "create", "--id", "ctl-acpi", "--kernel", str(microguests["64"]),
                 "--mem-mib", "32", "--acpi")
    assert vm["config"]["acpi"] is True
    plain = vm_json(ctl_socket, "create", "--id", "ctl-plain", "--kernel",
                    str(microguests["64"]), "--mem-mib", "32")
    assert plain["config"].get("acpi", False) is False
    vmmctl(ctl_socket, "delete", "ctl-acpi")
    vmmctl(ctl_socket, "delete", "ctl-plain")


def test_bad_cell_options_are_the_daemon_s_invalid_argument(ctl_socket: str) -> None:
    create = ("create", "--id", "bad", "--kernel", "/k")
    err = vmmctl(ctl_socket, *create, "--cpu-limit", "nan", rc=1)
    assert err.startswith("vmmctl: INVALID_ARGUMENT: config.limits.cpu: nan ")
    err = vmmctl(ctl_socket, *create, "--cell", "a b", rc=1)
    assert err.startswith("vmmctl: INVALID_ARGUMENT: config.cell: 'a b' ")
    err = vmmctl(ctl_socket, "restore", "/s", "--pids-limit", "3", rc=1)
    assert err.startswith("vmmctl: INVALID_ARGUMENT: limits.pids: 3 is outside ")
    err = vmmctl(ctl_socket, "clone", "/s", "--count", "2", "--memory-limit-mib", "1", rc=1)
    assert err.startswith("vmmctl: INVALID_ARGUMENT: limits.memory_mib: 1 is outside ")
    assert "--cpu-limit" in vmmctl(ctl_socket, "create", "--kernel", "/k", "--cpu-limit", "x",
                                   rc=2)


def test_errors_are_one_line_with_the_status_code(ctl_socket: str) -> None:
    err = vmmctl(ctl_socket, "get", "no-such-vm", rc=1)
    assert err == "vmmctl: NOT_FOUND: vm_id: no VM named 'no-such-vm'\n"
    err = vmmctl(ctl_socket, "create", "--id", "bad", "--kernel", "/nonexistent", rc=1)
    assert err.startswith("vmmctl: INVALID_ARGUMENT: config.boot.kernel_path: ")
    err = vmmctl("/nonexistent/vmmd.sock", "list", rc=1)
    assert err.startswith("vmmctl: UNAVAILABLE: ") and err.count("\n") == 1


def test_usage_errors_exit_2(ctl_socket: str) -> None:
    assert "usage: vmmctl" in vmmctl(ctl_socket, "frobnicate", rc=2)
    assert "--kernel" in vmmctl(ctl_socket, "create", rc=2)


@pytest.mark.kvm
def test_clones_in_a_namespace_with_macs_of_their_own(ctl_socket: str, tmp_path: Path,
                                                      microguests: dict[str, Path]) -> None:
    """create --net TAP,create,netns=NS; clone --net ID=TAP{i},create --netns NS --mac ID=auto:
    each clone's tap in the namespace, each clone a MAC of its own; a fixed MAC for
    several clones and a bad namespace are refused, nothing made."""
    with NetNs() as ns:
        vmmctl(ctl_socket, "create", "--id", "ctl-src", "--kernel", str(microguests["64"]),
               "--cmdline", "mg=spin", "--mem-mib", "32", "--net",
               f"src0,create,netns={ns.name}")
        assert "src0" in ns.links()
        vmmctl(ctl_socket, "start", "ctl-src")
        vmmctl(ctl_socket, "pause", "ctl-src")
        vmmctl(ctl_socket, "snapshot", "ctl-src", str(tmp_path / "s"))
        vmmctl(ctl_socket, "delete", "ctl-src")
        clone = ("clone", str(tmp_path / "s"), "--count", "2", "--prefix", "ctl-c",
                 "--net", "net0=tap{i},create", "--netns", ns.name)
        err = vmmctl(ctl_socket, *clone, "--mac", "net0=02:00:00:00:00:07", rc=1)
        assert err.startswith("vmmctl: INVALID_ARGUMENT: --mac 'net0=02:00:00:00:00:07': all 2 ")
        err = vmmctl(ctl_socket, *clone[:-1], "nosuch-ns", rc=1)
        assert err.startswith("vmmctl: INVALID_ARGUMENT: overrides[0].network_interfaces[0]."
                              "netns: there is no network namespace 'nosuch-ns'")
        assert vm_json(ctl_socket, "list") == {"vms": []} and ns.links() == {"lo"}
        vms = vm_json(ctl_socket, *clone, "--mac", "net0=auto")["vms"]
        nets = [v["config"]["network_interfaces"][0] for v in vms]
        assert [(n["host_dev_name"], n["netns"]) for n in nets] == [("tap0", ns.name),
                                                                    ("tap1", ns.name)]
        assert len({n["guest_mac"] for n in nets}) == 2
        assert ns.links() == {"lo", "tap0", "tap1"}
        for v in vms:
            vmmctl(ctl_socket, "delete", v["vm_id"])
        assert ns.links() == {"lo"}


@pytest.mark.kvm
def test_vsock_relays_stdin_and_stdout(ctl_socket: str, microguests: dict[str, Path],
                                       tmp_path: Path) -> None:
    """`vmmctl vsock VM PORT`: Firecracker's CONNECT through the VM's socket, stdin to the
    guest's echo server (mg=vsock-echo), its answer on stdout, ended by end of input."""
    socks = tmp_path / "socks"
    socks.mkdir()
    socks.chmod(0o711)  # the cell's user reaches its socket's directory
    vmmctl(ctl_socket, "create", "--id", "ctl-vs", "--kernel", str(microguests["64"]),
           "--cmdline", "mg=vsock-echo port=77", "--mem-mib", "64",
           "--vsock", f"9,{socks / 'v.sock'}")
    with Client(ctl_socket) as c, ConsoleReader(c, "ctl-vs") as con:
        vmmctl(ctl_socket, "start", "ctl-vs")
        con.wait_for(b"VSOCK-LISTEN")
    assert vmmctl(ctl_socket, "vsock", "ctl-vs", "77", stdin=b"hello, guest\n") == \
        "hello, guest\n"
    err = vmmctl(ctl_socket, "vsock", "ctl-vs", "78", rc=1)  # nobody listens there
    assert err.startswith("vmmctl: vsock ctl-vs 78: guest port 78: the device closed"), err
    vmmctl(ctl_socket, "delete", "ctl-vs")


def test_vsock_needs_a_vsock_device(ctl_socket: str, microguests: dict[str, Path]) -> None:
    vmmctl(ctl_socket, "create", "--id", "ctl-novs", "--kernel", str(microguests["64"]))
    assert vmmctl(ctl_socket, "vsock", "ctl-novs", "1", rc=1) == \
        "vmmctl: ctl-novs has no vsock device\n"
    assert "a port is 0..4294967295" in vmmctl(ctl_socket, "vsock", "ctl-novs", "-1", rc=2)
    assert "CID,PATH" in vmmctl(ctl_socket, "create", "--kernel", "/k", "--vsock", "x", rc=2)
    vmmctl(ctl_socket, "delete", "ctl-novs")
