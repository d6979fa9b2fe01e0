"""Opening taps in named network namespaces (vmmd/vm/devices/net.py), without
KVM or a daemon: /run/netns/NAME is opened only if it is a network
namespace, the namespace is entered by a thread of its own (the caller's
never changes), the tap fd lives there, and a setns the kernel refuses is
the client's field."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework.netns import NetNs
from vmmd.errors import InvalidSpecError
from vmmd.spec import NetSpec
from vmmd.vm.devices import net
from vmmd.vm.devices.net import Taps, check_nets, in_netns, open_netns

FIELD = ("network_interfaces", 0, "netns")


def my_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.fixture()
def ns() -> Iterator[NetNs]:
    with NetNs() as ns:
        yield ns


@pytest.fixture()
def planted() -> Iterator[dict[str, str]]:
    names = {k: f"vmmdt-{k}-{uuid.uuid4().hex[:6]}" for k in ("file", "link", "fifo", "dir")}
    os.makedirs(net.NETNS_DIR, exist_ok=True)
    Path(net.NETNS_DIR, names["file"]).write_text("")
    os.symlink("/proc/self/ns/net", f"{net.NETNS_DIR}/{names['link']}")
    os.mkfifo(f"{net.NETNS_DIR}/{names['fifo']}")
    os.mkdir(f"{net.NETNS_DIR}/{names['dir']}")
    yield names
    for k, n in names.items():
        (os.rmdir if k == "dir" else os.unlink)(f"{net.NETNS_DIR}/{n}")


def test_the_namespace_is_entered_by_a_thread_of_its_own(ns: NetNs) -> None:
    before, caller = my_netns(), threading.get_ident()
    fd = open_netns(ns.name, FIELD)
    try:
        inside, thread = in_netns(fd, lambda: (my_netns(), threading.get_ident()))
    finally:
        os.close(fd)
    assert inside == f"net:[{os.stat(f'{net.NETNS_DIR}/{ns.name}').st_ino}]"
    assert inside != before and thread != caller
    assert my_netns() == before


def test_a_tap_opened_there_lives_there_and_goes_with_its_fd(ns: NetNs) -> None:
    taps = Taps()
    plans = check_nets((NetSpec("e", "nstap0", create_tap=True, netns=ns.name),), "v", 0)
    taps.open(plans)
    assert "nstap0" in ns.links()
    assert not os.path.exists("/sys/class/net/nstap0")  # not in this namespace
    taps.close()
    assert "nstap0" not in ns.links()


@pytest.mark.parametrize(("kind", "says"), [
    ("file", "is not a network namespace"), ("fifo", "is not a network namespace"),
    ("dir", "is not a network namespace"), ("link", "is a symbolic link, not a network namespace")])
def test_files_that_are_not_network_namespaces(planted: dict[str, str], kind: str,
                                                says: str) -> None:
    with pytest.raises(InvalidSpecError) as e:
        os.close(open_netns(planted[kind], FIELD))
    assert e.value.path == FIELD and says in e.value.problem


def test_another_kind_of_namespace_is_refused(tmp_path: Path) -> None:
    # A bind mount of this process's UTS namespace file: nsfs, but not CLONE_NEWNET.
    name = f"vmmdt-uts-{uuid.uuid4().hex[:6]}"
    path = f"{net.NETNS_DIR}/{name}"
    Path(path).write_text("")
    try:
        if os.system(f"mount --bind /proc/self/ns/uts {path}") != 0:
            pytest.skip("cannot bind-mount a namespace file here")
        try:
            with pytest.raises(InvalidSpecError, match="is not a network namespace"):
                open_netns(name, FIELD)
        finally:
            os.system(f"umount {path}")
    finally:
        os.unlink(path)


def test_a_refused_setns_names_the_field(ns: NetNs, monkeypatch: pytest.MonkeyPatch) -> None:
    class NoSetns:
        @staticmethod
        def setns(fd: int, kind: int) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1

    monkeypatch.setattr(net, "_libc", NoSetns())
    plans = check_nets((NetSpec("e", "nstap1", create_tap=True, netns=ns.name),), "v", 0)
    with pytest.raises(InvalidSpecError) as e:
        Taps().open(plans)
    assert e.value.path == FIELD and "no permission to enter" in e.value.problem
    assert "nstap1" not in ns.links() and not os.path.exists("/sys/class/net/nstap1")


@pytest.mark.parametrize("name", [".", "..", "a/b", "/", "x" * 256, "a\0b"])
def test_names_that_are_not_one_file_name(name: str) -> None:
    with pytest.raises(InvalidSpecError) as e:
        check_nets((NetSpec("e", "t0", netns=name),), "v", 0)
    assert e.value.path == FIELD


def test_a_namespaced_tap_s_counter_is_read_there(ns: NetNs) -> None:
    taps = Taps()
    plans = check_nets((NetSpec("e", "nstap2", create_tap=True, netns=ns.name),), "v", 0)
    taps.open(plans)
    try:
        assert taps.rx_dropped(0) == 0
        # the tap is up and nobody reads its fd: its queue fills, then drops
        sock = ns.packet_socket("nstap2")
        for _ in range(1500):
            sock.send(bytes(12) + b"\x88\xb5" + bytes(46))
        sock.close()
        assert taps.rx_dropped(0) > 0
    finally:
        taps.close()
    assert taps.rx_dropped(0) == 0  # closed: nothing to read


@pytest.mark.parametrize("reply", [b"", bytes(32), bytes(16) * 4,
                                   (48).to_bytes(4, "little") + (16).to_bytes(2, "little")
                                   + bytes(26) + (0).to_bytes(2, "little") + bytes(14)])
def test_an_answer_without_stats_counts_nothing(reply: bytes) -> None:
    assert net._stats64_tx_dropped(reply) == 0
