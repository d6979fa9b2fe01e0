"""Clones' network identity under KVM, through the daemon: a micro-guest
echoing frames (re-reading its MAC before each, `remac=1`) is snapshotted;
two clones of it, each with a tap the daemon creates under the same name
in a network namespace of its own and each with its own MAC, answer frames
sent inside their namespace from their own MAC and print it.  Their taps
exist only in their namespaces and are gone after DeleteVm."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.framework.daemon import running_daemon
from tests.framework.frames import HOST_MAC, MAC0, host_frame, mac_bytes, recv_frames
from tests.framework.netns import NetNs
from vmmd.client import Client, pb

HANG_S = 60.0
CLONE_MACS = ("02:00:00:00:c1:01", "06:aa:bb:cc:dd:02")
GUEST = "mg=net op=echo n=1000 remac=1 timeout_ms=60000"


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True,
                         text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def console_until(c: Client, vm_id: str, text: str) -> str:
    deadline = time.monotonic() + HANG_S
    while True:
        out = b"".join(c.console(vm_id, follow=False)).decode(errors="replace")
        if text in out:
            return out
        assert "MG-ERROR" not in out, out
        assert time.monotonic() < deadline, f"no {text!r} from {vm_id} after {HANG_S}s:\n{out}"
        time.sleep(0.05)


def echo(ns: NetNs, tap: str, mac: str, seed: int) -> None:
    """A frame sent inside ns comes back from the guest's MAC `mac`, the bytes unchanged."""
    sock = ns.packet_socket(tap)
    try:
        f = host_frame(100, seed, dst=mac_bytes(mac))
        sock.send(f)
        assert recv_frames(sock, 1, mac) == [HOST_MAC + mac_bytes(mac) + f[12:]]
    finally:
        sock.close()


def test_clones_answer_with_their_own_mac_each_in_its_namespace(microguests,  # type: ignore[no-untyped-def]
                                                                tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    with NetNs() as src, NetNs() as a, NetNs() as b, \
            running_daemon("--stop-timeout", "0.5", check_exit=True) as d, d.client() as c:
        c.create("src", str(microguests["pvh"]), cmdline=GUEST, nets=[pb.NetworkInterface(
            iface_id="eth0", host_dev_name="src0", guest_mac=MAC0, create_tap=True,
            netns=src.name)])
        c.start("src")
        console_until(c, "src", "MG-NET-READY dev=0 mac=" + MAC0)
        echo(src, "src0", MAC0, 1)
        c.pause("src")
        c.snapshot("src", str(snap))
        c.delete("src")
        assert "src0" not in src.links()

        spaces = (a, b)
        vms = c.clone(str(snap), 2, "cl", resume=True, overrides=[
            pb.DeviceOverrides(network_interfaces=[pb.InterfaceOverride(
                iface_id="eth0", host_dev_name="tap0", create_tap=True, netns=ns.name,
                guest_mac=mac)]) for ns, mac in zip(spaces, CLONE_MACS, strict=True)])
        assert [v.config.network_interfaces[0].guest_mac for v in vms] == list(CLONE_MACS)
        assert "tap0" not in root_links()
        for k, (vm, ns, mac) in enumerate(zip(vms, spaces, CLONE_MACS, strict=True)):
            assert "tap0" in ns.links() and "UP" in ns.ip("link", "show", "tap0")
            echo(ns, "tap0", mac, 10 + k)
            out = console_until(c, vm.vm_id, f"MG-NET-MAC dev=0 mac={mac}\n")
            assert out.count("MG-NET-MAC") == 1, out
        for vm, ns in zip(vms, spaces, strict=True):
            c.delete(vm.vm_id)
            assert "tap0" not in ns.links()
        assert "tap0" not in root_links()
