"""Network namespaces for tests: taps and host peers that never touch the
machine's own network.

    with NetNs() as ns:
        ns.ip("tuntap", "add", "tap0", "mode", "tap")
        sock = ns.call(lambda: socket.socket(...))   # a socket inside the namespace

A namespace is per thread in Linux: `call` runs a function in a short-lived
thread that entered the namespace (setns), so sockets and taps it opens
belong there and stay usable from any thread.  The namespace (and every
tap in it) is deleted on exit.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable
from typing import Any, Self, TypeVar

import pytest

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003

_libc = ctypes.CDLL(None, use_errno=True)


def netns_unavailable() -> str | None:
    """Why this machine cannot run namespace tests, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    try:
        subprocess.run(["ip", "-V"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "no iproute2 `ip` command"
    return None


class NetNs:
    def __init__(self) -> None:
        self.name = f"vmmdt-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Self:
        why = netns_unavailable()
        if why:
            pytest.skip(why)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.ip("link", "set", "lo", "up")
        # No IPv6 chatter (router solicitations, DAD) on the test's taps.
        subprocess.run(self.exec_argv("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                                      "net.ipv6.conf.default.disable_ipv6=1"), check=False)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True,
                              text=True).stdout

    def exec_argv(self, *argv: str) -> list[str]:
        """argv run inside the namespace (for subprocesses: a daemon, dnsmasq)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def links(self) -> set[str]:
        return {line.split(":")[1].strip().split("@")[0]
                for line in self.ip("-o", "link", "show").splitlines()}

    def add_tap(self, name: str, addr: str | None = None) -> None:
        """A persistent tap, up (with a host address if given)."""
        self.ip("tuntap", "add", name, "mode", "tap")
        if addr:
            self.ip("addr", "add", addr, "dev", name)
        self.ip("link", "set", name, "up")

    def call(self, fn: Callable[[], T]) -> T:
        """fn() in a thread inside the namespace; its result or exception."""
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                out["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                out["error"] = e

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def packet_socket(self, ifname: str) -> socket.socket:
        """A raw AF_PACKET socket on ifname: sees every frame the guest sends
        and sends frames toward the guest."""
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((ifname, 0))
            return s
        return self.call(make)
