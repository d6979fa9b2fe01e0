"""Linux on virtio-net (one boot; minutes on a PVM host): inside a network
namespace the test makes, the kernel configures eth0 by DHCP from dnsmasq on
the host side of the tap (`ip=dhcp`) and its lease shows on the console, and
kernel messages sent over netconsole arrive at the host.

On hardware KVM the initramfs's init then runs, so the same boot could ping
and move data; that part needs user space, which cannot run on PVM hosts
(docs/platform.md), and is not written yet.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework import ON_PVM
from tests.framework.netns import NetNs
from vmmd.native import StopReason
from vmmd.spec import BootSpec, NetSpec, VmSpec
from vmmd.vm.builder import build_vm

pytestmark = pytest.mark.linux

BOOT_TIMEOUT = 900  # a hang guard only
HOST_IP, GUEST_IP = "10.0.2.1", "10.0.2.15"
GUEST_MAC = "02:00:00:00:0a:0f"
NETCONSOLE_PORT = 6666


@pytest.fixture()
def net(tmp_path: Path) -> Iterator[tuple[NetNs, socket.socket, Path]]:
    """The namespace with tap0 (10.0.2.1/24), dnsmasq offering the guest its
    one address, and a UDP socket receiving netconsole."""
    dnsmasq = shutil.which("dnsmasq")
    if dnsmasq is None:
        pytest.fail("dnsmasq is missing (Debian package dnsmasq-base; `make test` installs it)")
    with NetNs() as ns:
        ns.add_tap("tap0", f"{HOST_IP}/24")
        log = tmp_path / "dnsmasq.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(ns.exec_argv(
                dnsmasq, "--keep-in-foreground", "--log-facility=-", "--log-dhcp",
                "--conf-file=/dev/null", "--port=0", "--user=root", "--pid-file",
                "--interface=tap0", "--bind-interfaces", f"--dhcp-leasefile={tmp_path}/leases",
                f"--dhcp-range={GUEST_IP},{GUEST_IP},255.255.255.0,1h",
                f"--dhcp-host={GUEST_MAC},{GUEST_IP}"), stdout=out, stderr=subprocess.STDOUT)

        def udp() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((HOST_IP, NETCONSOLE_PORT))
            s.settimeout(1)
            return s
        sock = ns.call(udp)
        try:
            yield ns, sock, log
        finally:
            sock.close()
            proc.terminate()
            proc.wait()


@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_linux_gets_a_dhcp_lease_and_logs_over_netconsole(guest_artifacts, net) -> None:  # type: ignore[no-untyped-def]
    ns, sock, dnsmasq_log = net
    words = [f"ip=dhcp netconsole=6665@{GUEST_IP}/eth0,{NETCONSOLE_PORT}@{HOST_IP}/",
             "loglevel=7"]  # IP-Config reports at KERN_INFO
    if ON_PVM:
        words.append("vmmd_ready=1")
    spec = VmSpec(vm_id="linux-net",
                  boot=BootSpec(str(guest_artifacts["vmlinux"]),
                                str(guest_artifacts["initramfs.cpio.gz"]),
                                cmdline_append=" ".join(words)),
                  memory_mib=128, network_interfaces=(NetSpec("eth0", "tap0", GUEST_MAC),))
    received: list[bytes] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                received.append(sock.recv(4096))
            except TimeoutError:
                pass

    t = threading.Thread(target=listen)
    t.start()
    try:
        with ns.call(lambda: build_vm(spec)) as vm:
            vm.start()
            info = vm.wait(BOOT_TIMEOUT)
            console = vm.console_read(0, 1 << 22)[0].decode(errors="replace")
            stats = vm.interface_stats()[0]
    finally:
        done.set()
        t.join()
    assert info is not None, f"no stop after {BOOT_TIMEOUT}s:\n{console}"
    assert "VMMD-GUEST-READY" in console, console
    assert info.reason == StopReason.RESET, info.message
    # The lease, as the kernel tells it and as dnsmasq gave it.
    assert re.search(rf"IP-Config: Complete:.*\n.*device=eth0, hwaddr={GUEST_MAC}, "
                     rf"ipaddr={re.escape(GUEST_IP)}", console), console
    assert f"DHCPACK(tap0) {GUEST_IP} {GUEST_MAC}" in dnsmasq_log.read_text()
    # netconsole: kernel lines over UDP from the guest's address, READY among them.
    text = b"".join(received).decode(errors="replace")
    assert "VMMD-GUEST-READY" in text, text[-2000:]
    assert "IP-Config: Complete" in text
    assert stats.rx_packets >= 2 and stats.tx_packets >= 2 and stats.bad_requests == 0
