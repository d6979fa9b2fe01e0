"""virtio-net under KVM with the micro-guest's minimal driver, inside a
network namespace the test makes and removes: frames the guest sends reach
the tap byte for byte, frames written to the tap reach the guest (also
frames that waited while the guest had no buffers), two interfaces on two
taps, echo, hostile drivers, and a VM deleted while traffic flows leaves no
tap and no fd behind."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework.daemon import running_daemon
from tests.framework.frames import BCAST, HOST_MAC, MAC0, MAC1, host_frame, mac_bytes, recv_frames
from tests.framework.guests import microguest_builder
from tests.framework.netns import NetNs
from vmmd.client import pb
from vmmd.native import StopReason
from vmmd.spec import BootSpec, NetSpec, VmSpec
from vmmd.vm.builder import build_vm
from vmmd.vm.vm import Vm

mg = microguest_builder()
HANG_S = 60.0  # hang guard only


@pytest.fixture()
def ns() -> Iterator[NetNs]:
    with NetNs() as ns:
        ns.add_tap("tap0")
        ns.add_tap("tap1")
        yield ns


def boot(ns: NetNs, kernel: Path, words: str, taps: tuple[str, ...] = ("tap0",),
         start: bool = True) -> Vm:
    nets = tuple(NetSpec(f"eth{i}", t, (MAC0, MAC1)[i]) for i, t in enumerate(taps))
    spec = VmSpec(vm_id="net", boot=BootSpec(str(kernel), cmdline=f"mg=net {words}"),
                  memory_mib=64, network_interfaces=nets)
    vm = ns.call(lambda: build_vm(spec))  # the taps are opened inside the namespace
    if start:
        vm.start()
    return vm


def console(vm: Vm) -> str:
    return vm.console_read(0, 1 << 20)[0].decode(errors="replace")


def wait_for(vm: Vm, text: str) -> None:
    deadline = time.monotonic() + HANG_S
    while text not in console(vm):
        assert vm.stop_info is None, console(vm)
        assert time.monotonic() < deadline, f"no {text!r} after {HANG_S}s:\n{console(vm)}"
        vm.wait_console(vm.console_head(), 0.05)


def finish(vm: Vm) -> str:
    info = vm.wait(HANG_S)
    out = console(vm)
    assert info is not None, f"guest still running after {HANG_S}s:\n{out}"
    assert info.reason == StopReason.RESET, out
    assert "MG-ERROR" not in out and out.endswith("MG-DONE\n"), out
    return out


def fields(out: str, prefix: str) -> list[dict[str, str]]:
    return [dict(w.split("=", 1) for w in ln.split()[1:] if "=" in w)
            for ln in out.splitlines() if ln.startswith(prefix + " ")]


@pytest.mark.parametrize("size", [60, 1514])
@pytest.mark.parametrize("flags", ["", "mrg=1 evidx=1"])
def test_guest_frames_reach_the_tap_intact(ns: NetNs, microguests, size: int,  # type: ignore[no-untyped-def]
                                           flags: str) -> None:
    sock = ns.packet_socket("tap0")
    with boot(ns, microguests["pvh"], f"op=send n=8 size={size} seed=5 {flags}") as vm:
        out = finish(vm)
        frames = recv_frames(sock, 8, MAC0)
        s = vm.interface_stats()[0]
    assert frames == [mg.net_frame(seq, 0, size, 5, mac_bytes(MAC0), BCAST) for seq in range(8)]
    assert fields(out, "MG-NET-SEND")[0]["n"] == "8"
    assert (s.tx_packets, s.tx_bytes, s.tx_dropped, s.bad_requests) == (8, 8 * size, 0, 0)


@pytest.mark.parametrize(("flags", "size", "bufs"), [
    ("", 1514, 1), ("mrg=1", 1514, 1), ("mrg=1 bufsize=512", 1514, 3), ("evidx=1", 60, 1)])
def test_tap_frames_reach_the_guest(ns: NetNs, microguests, flags: str, size: int,  # type: ignore[no-untyped-def]
                                    bufs: int) -> None:
    sock = ns.packet_socket("tap0")
    sent = [host_frame(size, seed) for seed in range(4)]
    with boot(ns, microguests["64"], f"op=recv n=4 {flags}") as vm:
        wait_for(vm, "MG-NET-READY")
        for f in sent:
            sock.send(f)
        out = finish(vm)
        s = vm.interface_stats()[0]
    got = fields(out, "MG-NET-FRAME")
    assert [(int(g["len"]), int(g["bufs"]), int(g["sum"], 16)) for g in got] == [
        (size, bufs, mg.fnv1a32(f)) for f in sent]
    assert (s.rx_packets, s.rx_bytes) == (4, 4 * size)


def test_frames_wait_in_the_tap_until_the_guest_takes_them(ns: NetNs, microguests) -> None:  # type: ignore[no-untyped-def]
    """Written after the VM attached the tap but before its driver exists:
    held, not lost."""
    sock = ns.packet_socket("tap0")
    sent = [host_frame(100 + i, i) for i in range(5)]
    with boot(ns, microguests["pvh"], "op=recv n=5", start=False) as vm:
        for f in sent:
            sock.send(f)
        vm.start()
        out = finish(vm)
    assert [int(g["sum"], 16) for g in fields(out, "MG-NET-FRAME")] == [mg.fnv1a32(f) for f in sent]


def test_two_interfaces_on_two_taps(ns: NetNs, microguests) -> None:  # type: ignore[no-untyped-def]
    socks = [ns.packet_socket("tap0"), ns.packet_socket("tap1")]
    with boot(ns, microguests["pvh"], "op=twodev size=80", taps=("tap0", "tap1")) as vm:
        wait_for(vm, "MG-NET-READY dev=1")
        sent = [host_frame(70 + d, d, dst=mac_bytes((MAC0, MAC1)[d])) for d in (0, 1)]
        for d in (0, 1):
            socks[d].send(sent[d])
        out = finish(vm)
        got = [recv_frames(socks[d], 1, (MAC0, MAC1)[d])[0] for d in (0, 1)]
    assert got == [mg.net_frame(0, d, 80, 0, mac_bytes((MAC0, MAC1)[d]), BCAST) for d in (0, 1)]
    by_dev = {g["dev"]: int(g["sum"], 16) for g in fields(out, "MG-NET-FRAME")}
    assert by_dev == {"0": mg.fnv1a32(sent[0]), "1": mg.fnv1a32(sent[1])}


def test_echo_round_trip(ns: NetNs, microguests) -> None:  # type: ignore[no-untyped-def]
    sock = ns.packet_socket("tap0")
    with boot(ns, microguests["pvh"], "op=echo n=3") as vm:
        wait_for(vm, "MG-NET-READY")
        for i in range(3):
            f = host_frame(200, i, dst=mac_bytes(MAC0))
            sock.send(f)
            (back,) = recv_frames(sock, 1, MAC0)
            assert back == HOST_MAC + mac_bytes(MAC0) + f[12:]
        finish(vm)


@pytest.mark.parametrize("case", ["rxbadaddr", "rxreadable", "rxbadhead", "txbadaddr",
                                  "txshort", "txloop"])
def test_hostile_driver_breaks_only_its_device(ns: NetNs, microguests, case: str) -> None:  # type: ignore[no-untyped-def]
    """Each malformed chain: DEVICE_NEEDS_RESET, counted, nothing sent; after
    a reset the device works again and the VMM never noticed."""
    sock = ns.packet_socket("tap0")
    with boot(ns, microguests["pvh"], f"op=hostile case={case}") as vm:
        if case.startswith("rx"):
            sock.send(host_frame(64, 1))  # RX work for the broken queue
        out = finish(vm)
        stats = vm.interface_stats()[0]
        sent = recv_frames(sock, 1, MAC0)
    (h,) = fields(out, "MG-NET-HOSTILE")
    assert int(h["status"], 16) & 0x40, out
    assert stats.bad_requests == 1
    (r,) = fields(out, "MG-NET-RECOVER")
    assert (r["status"], r["sent"]) == ("0xf", "1"), out
    assert sent == [mg.net_frame(0, 0, 60, 0, mac_bytes(MAC0), BCAST)]


def test_deleting_a_vm_while_traffic_flows_leaves_nothing(ns: NetNs, microguests) -> None:  # type: ignore[no-untyped-def]
    """Through the daemon (running in the namespace): a VM echoing a flood
    on a tap the daemon made and on a tap of the user's is deleted
    mid-flow; the made tap is gone, the user's stays, the daemon is back to
    its fds and threads."""
    with running_daemon("--stop-timeout", "0.5", wrap=ns.exec_argv()) as d, d.client() as c:
        # a first VM's lifetime warms the daemon up (gRPC makes threads and fds lazily)
        c.create("warm", str(microguests["pvh"]), cmdline="mg=net op=info",
                 nets=[pb.NetworkInterface(iface_id="a", host_dev_name="tap0", guest_mac=MAC0)])
        c.delete("warm")
        base_fds, base_threads = d.settled()
        nets = [pb.NetworkInterface(iface_id="a", host_dev_name="flow0", create_tap=True),
                pb.NetworkInterface(iface_id="b", host_dev_name="tap0", guest_mac=MAC0)]
        c.create("flow", str(microguests["pvh"]), cmdline="mg=net op=echo n=100000000 dev=1", nets=nets)
        c.start("flow")
        sock = ns.packet_socket("tap0")
        stop = threading.Event()
        echoed = []

        def flood() -> None:
            f = host_frame(1000, 3, dst=mac_bytes(MAC0))
            while not stop.is_set():
                try:
                    sock.send(f)
                except OSError:
                    pass
                ready = select.select([sock], [], [], 0.001)[0]
                if ready:
                    echoed.append(sock.recv(65536))

        t = threading.Thread(target=flood)
        t.start()
        deadline = time.monotonic() + HANG_S
        while not any(e[6:12] == mac_bytes(MAC0) for e in echoed):
            assert time.monotonic() < deadline, "no echo came back"
            time.sleep(0.05)
        assert "flow0" in ns.links()
        c.delete("flow")
        stop.set()
        t.join()
        assert "flow0" not in ns.links()
        assert "tap0" in ns.links()
        deadline = time.monotonic() + 5
        while (d.fds() > base_fds or d.threads() > base_threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.fds() == base_fds, [os.readlink(f"/proc/{d.pid}/fd/{f}")
                                     for f in os.listdir(f"/proc/{d.pid}/fd")]
        assert d.threads() <= base_threads

