"""virtio-vsock under KVM with the micro-guest's driver (tests/guests/vsock.c):
host -> guest through the listener (Firecracker's CONNECT / OK lines) and
guest -> host to "<uds_path>_<port>", 64 MiB each way byte for byte, 100
connections at once, a snapshot with open connections (the restored guest
hears TRANSPORT_RESET and takes new ones), a refused connect.  In-process VMs
(shared mode), and through a daemon whose VMs run in cells: both ways (the
jailed worker accepts on the listener the daemon bound and connects relative
to the directory fd it was passed), and clones of a serving guest."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework import vsockhost
from tests.framework.console import ConsoleReader
from tests.framework.daemon import running_daemon
from tests.framework.vsockhost import recv_exact
from vmmd.client import pb
from vmmd.spec import BootSpec, DeviceOverrides, RestoreSpec, VmSpec, VsockOverride, VsockSpec
from vmmd.vm.builder import build_vm, restore_vm
from vmmd.vm.vm import Vm

HANG_S = 120.0  # hang guard only
PERIOD = bytes(((j + (j >> 8)) & 0xFF) for j in range(65536))  # the guest's pattern (vsock.c)


def pattern(n: int) -> bytes:
    return (PERIOD * (n // len(PERIOD) + 1))[:n]


def console(vm: Vm) -> str:
    return vm.console_read(0, 1 << 20)[0].decode(errors="replace")


def wait_for(vm: Vm, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + HANG_S
    # One read per round: the checks must see the output the count was taken on
    # (read again, an awaited "MG-ERROR ..." line can arrive in between).
    while (out := console(vm)).count(text) < count:
        assert "MG-ERROR" not in out, out
        assert vm.stop_info is None or text in out, out
        assert time.monotonic() < deadline, f"no {text!r} after {HANG_S}s:\n{out}"
        time.sleep(0.01)


@pytest.fixture()
def vms() -> Iterator[list[Vm]]:
    made: list[Vm] = []
    yield made
    for vm in made:
        vm.close()


def boot(vms: list[Vm], kernel: Path, words: str, uds: Path, cid: int = 3) -> Vm:
    spec = VmSpec(vm_id=f"vs{len(vms)}", boot=BootSpec(str(kernel), cmdline=words),
                  memory_mib=64, vsock=VsockSpec(cid, str(uds)))
    vm = build_vm(spec)
    vms.append(vm)
    vm.start()
    return vm


def host_connect(uds: Path, port: int) -> socket.socket:
    return vsockhost.host_connect(uds, port, HANG_S)


def test_host_to_guest_64mib_echoed_byte_exact(vms: list[Vm], microguests: dict[str, Path],
                                              tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    vm = boot(vms, microguests["64"], "mg=vsock-echo port=1234 conns=1", uds)
    wait_for(vm, "VSOCK-LISTEN")
    s = host_connect(uds, 1234)
    data = os.urandom(1 << 20) * 64
    sender = threading.Thread(target=s.sendall, args=(data,))
    t0 = time.monotonic()
    sender.start()
    got = recv_exact(s, len(data))
    sender.join()
    dt = time.monotonic() - t0
    assert got == data
    print(f"64 MiB echoed in {dt:.2f}s ({2 * 64 / dt:.0f} MiB/s both ways)")
    s.shutdown(socket.SHUT_WR)
    assert s.recv(16) == b""  # the guest's SHUTDOWN, then the device's RST: EOF
    wait_for(vm, "VSOCK-CLOSE")


def test_guest_to_host_64mib_byte_exact(vms: list[Vm], microguests: dict[str, Path],
                                        tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    n = 64 << 20
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lis.bind(f"{uds}_5000")
    lis.listen(1)
    lis.settimeout(HANG_S)
    got = bytearray()

    def serve() -> None:  # take everything, echo it back
        c, _ = lis.accept()
        c.settimeout(HANG_S)
        with c:
            while True:
                b = c.recv(1 << 20)
                if not b:
                    break
                got.extend(b)
                c.sendall(b)

    t = threading.Thread(target=serve)
    t.start()
    vm = boot(vms, microguests["64"], f"mg=vsock-connect port=5000 bytes={n} echo=1", uds)
    wait_for(vm, "VSOCK-DONE")
    t.join(HANG_S)
    assert f"VSOCK-DONE sent={n} got={n}" in console(vm)  # the guest checked every byte back
    assert bytes(got) == pattern(n)
    lis.close()


def test_hundred_connections_at_once(vms: list[Vm], microguests: dict[str, Path],
                                     tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    vm = boot(vms, microguests["64"], "mg=vsock-echo port=77 conns=128", uds)
    wait_for(vm, "VSOCK-LISTEN")
    clients = [host_connect(uds, 77) for _ in range(100)]
    msgs = [os.urandom(3000) for _ in clients]
    for c, m in zip(clients, msgs):
        c.sendall(m)
    for c, m in zip(clients, msgs):
        assert recv_exact(c, len(m)) == m
    for c in clients:
        c.close()
    wait_for(vm, "VSOCK-CLOSE", 100)
    counters = vm.counters().vsock
    assert counters is not None
    assert (counters.connections, counters.bad_packets, counters.bad_requests) == (100, 0, 0)
    assert counters.rx_bytes == counters.tx_bytes == 100 * 3000


def test_guest_connect_to_nobody_is_refused(vms: list[Vm], microguests: dict[str, Path],
                                            tmp_path: Path) -> None:
    vm = boot(vms, microguests["64"], "mg=vsock-connect port=4999 bytes=10", tmp_path / "v.sock")
    wait_for(vm, "MG-ERROR vsock: connect to port 4999 refused")


def test_snapshot_with_open_connections_resets_them(vms: list[Vm], microguests: dict[str, Path],
                                                    tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    vm = boot(vms, microguests["64"], "mg=vsock-echo port=9", uds)
    wait_for(vm, "VSOCK-LISTEN")
    open_ = [host_connect(uds, 9) for _ in range(3)]
    for c in open_:
        c.sendall(b"before")
        assert recv_exact(c, 6) == b"before"
    vm.pause()
    vm.snapshot(str(tmp_path / "snap"))
    vm.close()
    vms.remove(vm)
    for c in open_:  # the original's connections went with it
        assert c.recv(16) == b""
    assert not uds.exists()
    new = tmp_path / "r.sock"
    r = restore_vm(RestoreSpec(str(tmp_path / "snap"), "restored", DeviceOverrides(
        vsock=VsockOverride(guest_cid=42, uds_path=str(new)))))
    vms.append(r)
    r.start_restored(paused=False)
    wait_for(r, "VSOCK-RESET n=1 cid=42")
    c = host_connect(new, 9)
    c.sendall(b"after")
    assert recv_exact(c, 5) == b"after"


def test_both_ways_from_a_cell(microguests: dict[str, Path], tmp_path: Path) -> None:
    """The cell's user may connect to what the host opened to it: the
    directory searchable, the guest's listener writable (as a host gives
    a jailed Firecracker)."""
    d = tmp_path / "socks"
    d.mkdir()
    d.chmod(0o711)
    uds = d / "v.sock"
    n = 8 << 20
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lis.bind(f"{uds}.out_6000")  # "out" listens at v.sock.out: its port 6000 is here
    os.chmod(f"{uds}.out_6000", 0o777)
    lis.listen(1)
    lis.settimeout(HANG_S)
    with running_daemon("--stop-timeout", "1", "--isolation", "cells") as daemon, \
            daemon.client() as c:
        c.create("out", str(microguests["64"]), cmdline=f"mg=vsock-flood port=6000 bytes={n}",
                 memory_mib=64, vsock=pb.Vsock(guest_cid=5, uds_path=f"{uds}.out"))
        c.create("in", str(microguests["64"]), cmdline="mg=vsock-echo port=80",
                 memory_mib=64, vsock=pb.Vsock(guest_cid=6, uds_path=str(uds)))
        assert c.get("out").cell.pid != 0  # a worker of its own: jailed
        with ConsoleReader(c, "out") as out, ConsoleReader(c, "in") as inn:
            c.start("out")
            out.wait(lambda b: b"VSOCK-CONNECTED" in b or b"MG-ERROR" in b, "the guest's connect")
            assert b"VSOCK-CONNECTED" in out.data, out.data.decode()
            peer, _ = lis.accept()
            peer.settimeout(HANG_S)
            got = recv_exact(peer, n)
            assert got == pattern(n)
            out.wait(lambda b: b"VSOCK-DONE" in b, "the guest's DONE")
            c.start("in")
            inn.wait(lambda b: b"VSOCK-LISTEN" in b, "the guest listening")
            s = host_connect(uds, 80)
            data = os.urandom(1 << 20)
            threading.Thread(target=s.sendall, args=(data,)).start()
            assert recv_exact(s, len(data)) == data
        c.delete("out")
        c.delete("in")
    assert not uds.exists()


def test_clones_in_cells_hear_the_reset_and_serve(microguests: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """A snapshot of a serving guest with a connection open, cloned twice into
    cells with a socket and a context id each: every clone hears
    TRANSPORT_RESET (with its new id) and serves new connections."""
    d = tmp_path / "socks"
    d.mkdir()
    with running_daemon("--stop-timeout", "1", "--isolation", "cells") as daemon, \
            daemon.client() as c:
        c.create("orig", str(microguests["64"]), cmdline="mg=vsock-echo port=7", memory_mib=64,
                 vsock=pb.Vsock(guest_cid=10, uds_path=str(d / "orig")))
        with ConsoleReader(c, "orig") as con:
            c.start("orig")
            con.wait(lambda b: b"VSOCK-LISTEN" in b, "the guest listening")
            s = host_connect(d / "orig", 7)
            s.sendall(b"open")
            assert recv_exact(s, 4) == b"open"
        c.pause("orig")
        c.snapshot("orig", str(tmp_path / "snap"))
        c.delete("orig")
        assert s.recv(16) == b""
        each = [pb.DeviceOverrides(vsock=pb.Vsock(guest_cid=20 + k, uds_path=str(d / f"c{k}")))
                for k in range(2)]
        vms = c.clone(str(tmp_path / "snap"), 2, id_prefix="c", resume=True, overrides=each)
        assert [v.cell.pid != 0 for v in vms] == [True, True]
        for k in range(2):
            with ConsoleReader(c, f"c-{k}") as con:
                con.wait(lambda b, k=k: f"VSOCK-RESET n=1 cid={20 + k}".encode() in b,
                         "the transport reset")
            s = host_connect(d / f"c{k}", 7)
            s.sendall(b"clone%d" % k)
            assert recv_exact(s, 6) == b"clone%d" % k
            s.close()
        for k in range(2):
            c.delete(f"c-{k}")
    assert sorted(p.name for p in d.iterdir()) == []
