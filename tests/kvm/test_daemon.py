"""The daemon with micro-guests: a real `vmmd serve` subprocess on a
temporary socket, driven through vmmd.client over a real gRPC channel.

Pause/resume, many VMs at once, no fd or thread leak over many VM
lifetimes, and SIGTERM with running VMs.  Timeouts here only catch hangs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.framework import wait_until
from tests.framework.console import ConsoleReader, ticks
from tests.framework.daemon import EXIT_TIMEOUT_S, Daemon, running_daemon
from vmmd.client import Client, pb

HANG_S = 60.0
PAUSE_WINDOW_S = 0.4     # how long a paused guest is watched for signs of life
GRPC_THREAD_SLACK = 4    # gRPC starts some of its own threads lazily


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with running_daemon("--stop-timeout", "1") as d:
        yield d
        assert d.proc.poll() is None, f"the daemon died (status {d.proc.returncode})"


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


def test_pause_freezes_a_ticking_guest_and_resume_continues_it(
        client: Client, microguests: dict[str, Path]) -> None:
    client.create("tick", str(microguests["pvh"]), cmdline="mg=tick ms=10", memory_mib=16)
    client.start("tick")
    with ConsoleReader(client, "tick") as con:
        con.wait_for(b"MG-TICK 3\n")
        assert client.pause("tick").state == pb.VM_STATE_PAUSED
        # Everything the guest printed before the pause reaches the stream...
        printed = client.get("tick").counters.console_bytes
        frozen = con.wait(lambda data: len(data) >= printed, f"{printed} console bytes")
        before = client.get("tick")
        time.sleep(PAUSE_WINDOW_S)
        after = client.get("tick")
        # ...and then nothing: no output, no exits.
        assert con.data == frozen
        assert after.counters.console_bytes == before.counters.console_bytes == len(frozen)
        assert after.counters.exits == before.counters.exits
        assert after.state == pb.VM_STATE_PAUSED
        last = ticks(frozen)[-1]

        assert client.resume("tick").state == pb.VM_STATE_RUNNING
        resumed = con.wait_for(f"MG-TICK {last + 3}\n".encode())
        # The counter is continuous: the next tick after the resume is last + 1.
        assert ticks(resumed) == list(range(1, len(ticks(resumed)) + 1))
    client.delete("tick")


def test_fifty_vms_run_at_once(client: Client, microguests: dict[str, Path]) -> None:
    ids = [f"many-{i:02d}" for i in range(50)]
    for i, vm_id in enumerate(ids):
        kernel = microguests["pvh" if i % 2 else "64"]
        client.create(vm_id, str(kernel), cmdline="mg=spin", memory_mib=16)
        client.start(vm_id)
    for vm_id in ids:
        with ConsoleReader(client, vm_id) as con:
            con.wait_for(b"MG-START\n")
    assert {(vm.vm_id, vm.state) for vm in client.list()} == {
        (vm_id, pb.VM_STATE_RUNNING) for vm_id in ids}
    with ThreadPoolExecutor(10) as pool:  # verbs on different VMs run in parallel
        list(pool.map(client.delete, ids))
    assert client.list() == []


def test_a_vm_is_watched_when_the_daemon_holds_over_1024_fds(
        daemon: Daemon, client: Client, microguests: dict[str, Path]) -> None:
    kernel = str(microguests["pvh"])
    n = 0
    while daemon.fds() <= 1024:  # idle VMs hold fds (KVM, vCPUs, eventfds)
        client.create(f"idle-{n}", kernel, memory_mib=16)
        n += 1
    client.create("reset", kernel, cmdline="mg=reset", memory_mib=16)
    client.start("reset")
    wait_until(lambda: client.get("reset").state == pb.VM_STATE_STOPPED, "the guest's reset seen")
    assert client.get("reset").stop.reason == pb.STOP_REASON_REBOOT


def test_delete_ends_the_console_streams_of_the_vm(
        client: Client, microguests: dict[str, Path]) -> None:
    for vm_id, start in (("idle", False), ("spinning", True)):
        client.create(vm_id, str(microguests["pvh"]), cmdline="mg=spin", memory_mib=16)
        if start:
            client.start(vm_id)
        with ConsoleReader(client, vm_id) as con:
            if start:
                con.wait_for(b"MG-START\n")
            client.delete(vm_id)
            con.wait(lambda _: con.ended, "end of the stream")
            assert con.error is None


def test_vm_lifetimes_leak_no_fds_or_threads(daemon: Daemon, client: Client,
                                             microguests: dict[str, Path]) -> None:
    kernel = str(microguests["pvh"])

    def lifetime(i: int) -> None:
        client.create(f"cycle-{i}", kernel, cmdline="mg=spin", memory_mib=16)
        client.start(f"cycle-{i}")
        client.delete(f"cycle-{i}")

    for i in range(10):  # warm-up: gRPC's pools and the import of lazily used modules
        lifetime(i)
    fds, threads = daemon.settled()
    for i in range(10, 210):
        lifetime(i)
    assert client.list() == []
    # Stop events are published from short-lived threads: let them finish.
    wait_until(lambda: daemon.fds() <= fds and daemon.threads() <= threads + GRPC_THREAD_SLACK,
               f"back to {fds} fds / {threads} threads (now {daemon.fds()} / {daemon.threads()})")
    assert daemon.settled()[0] == fds


def test_sigterm_stops_running_vms_and_exits_cleanly(microguests: dict[str, Path]) -> None:
    with running_daemon("--stop-timeout", "1") as d, d.client() as c:
        ids = [f"term-{i}" for i in range(4)]
        for vm_id in ids:
            c.create(vm_id, str(microguests["pvh"]), cmdline="mg=spin", memory_mib=16)
        for vm_id in ids[:3]:  # term-3 stays CREATED
            c.start(vm_id)
            with ConsoleReader(c, vm_id) as con:
                con.wait_for(b"MG-START\n")
        events: list[pb.VmEvent] = []  # extend() appends them as they come
        watcher = threading.Thread(target=lambda: events.extend(c.events()), daemon=True)
        watcher.start()

        def watching() -> bool:  # once the watch is in place, these are events
            c.resume(ids[0])
            c.pause(ids[0])
            return bool(events)

        wait_until(watching, "a live event watch")  # and term-0 is paused

        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(EXIT_TIMEOUT_S) == 0, d.log_text()
        # The process is gone: no thread and no fd of it is left anywhere.
        assert not Path(f"/proc/{d.pid}").exists()
        assert not Path(d.socket).exists()
        assert "daemon.stopped" in d.log_text()
        # Watchers saw every VM stop and go, then their stream ended.
        watcher.join(HANG_S)
        assert not watcher.is_alive()
        kinds = {(ev.vm_id, ev.type) for ev in events}
        for vm_id in ids[:3]:
            assert (vm_id, pb.EVENT_TYPE_STOPPED) in kinds
        assert {vm_id for vm_id, kind in kinds if kind == pb.EVENT_TYPE_DELETED} == set(ids)


def test_vm_threads_are_named(daemon: Daemon, client: Client,
                              microguests: dict[str, Path]) -> None:
    """vCPU threads are vcpu<N>, a VM's I/O thread vmio, as top -H and ps -L
    show them, in whichever process hosts the VM (its cell's worker, or the
    daemon with --isolation none)."""
    client.create("named", str(microguests["pvh"]), cmdline="mg=spin", memory_mib=16, vcpus=2)
    client.start("named")
    host = client.get("named").cell.pid or daemon.pid
    comms = sorted(Path(f"/proc/{host}/task/{t}/comm").read_text().strip()
                   for t in os.listdir(f"/proc/{host}/task"))
    assert [n for n in comms if n.startswith(("vcpu", "vmio"))] == ["vcpu0", "vcpu1", "vmio"], comms
    client.delete("named")


def test_start_timings_split_the_wait_between_vmm_and_guest(
        client: Client, microguests: dict[str, Path]) -> None:
    """GetVm's vcpu_start_us / guest_startup_us: 0 before the start, then both set, and
    together no longer than the client waited from StartVm to the first output."""
    client.create("timed", str(microguests["pvh"]), cmdline="mg=print", memory_mib=16)
    before = client.get("timed").counters
    assert (before.vcpu_start_us, before.guest_startup_us) == (0, 0)
    with ConsoleReader(client, "timed") as con:
        t0 = time.monotonic()
        client.start("timed")
        con.wait_for(b"MG-HELLO")
        waited_us = (time.monotonic() - t0) * 1e6
    after = client.get("timed").counters
    assert after.vcpu_start_us > 0 and after.guest_startup_us > 0
    assert after.vcpu_start_us + after.guest_startup_us < waited_us
    client.delete("timed")


def _ram_maps(pid: int, size: int) -> dict[str, int]:
    """The process's read-write mappings of exactly `size` bytes (the C core maps a
    guest's RAM as one), by address range, with the KiB of each that are resident."""
    maps: dict[str, int] = {}
    current: str | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            start, end = (int(x, 16) for x in head[0].split("-"))
            current = head[0] if end - start == size and head[1].startswith("rw") else None
            if current:
                maps[current] = 0
        elif current and head[0] == "Rss:":
            maps[current] = int(head[1])
    return maps


def _vcpu_fds(pid: int) -> int:
    """The process's KVM vCPU fds (not their stats fds, kvm-vcpu-stats:N)."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += os.readlink(fd).startswith("anon_inode:kvm-vcpu:")
        except FileNotFoundError:  # closed since the listing
            pass
    return n


def test_a_shared_daemon_makes_the_next_vm_with_its_ram_once_a_create_is_answered(
        microguests: dict[str, Path]) -> None:
    """--isolation none (vmmd/vm/shelf.py): after a CreateVm, the daemon makes the next
    VM ahead with the same RAM and vCPU; the next CreateVm of that shape is built on
    it (its guest then runs in that very mapping) and another spare is made."""
    size = 24 << 20  # no other mapping in the daemon has this size
    kernel = str(microguests["pvh"])

    def made(n: int) -> bool:  # n VMs with their RAM and vCPU, the spare among them
        return len(_ram_maps(d.pid, size)) == n and _vcpu_fds(d.pid) == n

    with running_daemon("--isolation", "none", check_exit=True) as d, d.client() as c:
        assert _ram_maps(d.pid, size) == {}
        c.create("first", kernel, cmdline="mg=print", memory_mib=24)
        wait_until(lambda: made(2), "a spare with the VM's RAM and vCPU")
        before = _ram_maps(d.pid, size)
        # The first VM's RAM has its kernel in it; the spare's is untouched.
        spare = next(m for m, kib in before.items() if kib == 0)
        c.create("second", kernel, cmdline="mg=print", memory_mib=24)
        wait_until(lambda: made(3), "the next spare")
        with ConsoleReader(c, "second") as con:
            c.start("second")
            con.wait_for(b"MG-DONE")
        now = _ram_maps(d.pid, size)
        new = [m for m in now if m not in before]
        assert now.get(spare, 0) > 0, ("the guest did not run in the spare's RAM", before, now)
        assert len(new) == 1 and now[new[0]] == 0, (before, now)  # the new spare: untouched
        for vm_id in ("first", "second"):
            c.delete(vm_id)
        wait_until(lambda: made(1), "only the spare left")
