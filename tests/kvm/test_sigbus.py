"""A snapshot's memory file truncated under the VMs that map it.

Restored guest RAM is the snapshot's `memory` file mapped MAP_PRIVATE: when
someone truncates that file, every page past the new end is gone, and any
access to one - by the VMM or by KVM - faults.  Only the VMs mapped on the
file may die of it: each one CRASHED, while the daemon and every other VM go
on.  Where the VMM touched the page (the snapshot writer, the I/O thread),
the reason names the cause and the guest address; where KVM did, it is
whatever KVM reports (on PVM hosts: a triple fault).  The daemon runs in a
subprocess, so without the fix a test here fails (the daemon is gone)
instead of taking pytest with it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework import wait_until
from tests.framework.console import ConsoleReader, ticks
from tests.framework.daemon import Daemon, running_daemon
from tests.framework.frames import MAC0, host_frame, mac_bytes
from tests.framework.netns import NetNs
from vmmd.client import Client, ClientError, pb
from vmmd.vm import snapshot as snapshots

MIB = 1 << 20
IMAGE, IMAGE_END = 0x200000, 0x400000  # the micro-guest's image: code, rings, buffers
MEMORY_FAULT = re.compile(r"guest memory became unreadable \(its backing file shrank\) "
                          r"at guest address (0x[0-9a-f]+)")


def names_the_file(message: str, snap: Path) -> None:
    """A restored VM's crash says which file was truncated, and to what."""
    assert f"its memory file {snap / snapshots.MEMORY_FILE} was truncated to " \
        f"{snapshots.MEMORY_OFFSET + IMAGE} bytes" in message, message


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with running_daemon("--stop-timeout", "1") as d:
        yield d


def alive(d: Daemon, c: Client) -> None:
    assert d.proc.poll() is None, f"the daemon died (status {d.proc.returncode})"
    c.list()  # and still answers


def crashed(c: Client, vm_id: str) -> pb.Vm:
    wait_until(lambda: c.get(vm_id).state == pb.VM_STATE_CRASHED, f"{vm_id} crashed")
    vm = c.get(vm_id)
    assert vm.stop.reason == pb.STOP_REASON_CRASH
    return vm


def still_ticking(con: ConsoleReader, more: int = 3) -> None:
    last = max(ticks(con.data))
    con.wait(lambda data: max(ticks(data)) >= last + more, f"{more} more ticks")


def halted(c: Client, vm_id: str) -> None:
    """Until the guest has stopped making exits (it reached its hlt: under load the
    console's MG-DONE can come well before): a halted vCPU touches no memory."""
    seen: list[int] = []

    def quiet() -> bool:
        seen.append(c.get(vm_id).counters.exits)
        time.sleep(0.1)
        return len(seen) >= 4 and len(set(seen[-4:])) == 1

    wait_until(quiet, f"{vm_id} halted")


def cut_image(snap: Path) -> None:
    """Keep the first 2 MiB of guest RAM; the guest's whole image goes."""
    os.truncate(snap / snapshots.MEMORY_FILE, snapshots.MEMORY_OFFSET + IMAGE)


def test_truncated_memory_crashes_only_the_clones_mapped_on_it(
        daemon: Daemon, microguests: dict[str, Path], tmp_path: Path) -> None:
    snap = tmp_path / "s"
    with daemon.client() as c:
        c.create("src", str(microguests["pvh"]), cmdline="mg=count n=0 every=0", memory_mib=32)
        c.start("src")
        c.pause("src")
        c.snapshot("src", str(snap))
        c.delete("src")
        clones = [v.vm_id for v in c.clone(str(snap), 2, id_prefix="clone")]
        assert [c.get(v).state for v in clones] == [pb.VM_STATE_PAUSED] * 2
        c.create("bystander", str(microguests["pvh"]), cmdline="mg=tick ms=10", memory_mib=16)
        c.start("bystander")
        with ConsoleReader(c, "bystander") as con:
            con.wait_for(b"MG-TICK 2\n")
            cut_image(snap)

            # (a) the snapshot writer reads a vanished page: the request fails
            # cleanly and that clone alone crashes, naming the cause and where.
            with pytest.raises(ClientError) as err:
                c.snapshot(clones[0], str(tmp_path / "again"))
            assert err.value.code == "DATA_LOSS", err.value
            assert "no longer readable" in err.value.details, err.value
            assert str(snap / snapshots.MEMORY_FILE) in err.value.details, err.value
            vm = crashed(c, clones[0])
            m = MEMORY_FAULT.match(vm.stop.message)
            assert m and int(m[1], 16) == IMAGE, vm.stop.message  # the first page cut off
            names_the_file(vm.stop.message, snap)
            alive(daemon, c)
            assert c.get(clones[1]).state == pb.VM_STATE_PAUSED
            still_ticking(con)

            # (b) the other clone runs into it as soon as it runs (KVM's own
            # access to guest RAM): it crashes alone.
            c.resume(clones[1])
            vm = crashed(c, clones[1])
            print(f"resumed clone: {vm.stop.message}")
            names_the_file(vm.stop.message, snap)  # whatever KVM called it
            alive(daemon, c)
            still_ticking(con)
            assert c.get("bystander").state == pb.VM_STATE_RUNNING
        # Crashed clones go away like any other VM.
        for v in clones:
            c.delete(v)
        alive(daemon, c)
        assert [v.vm_id for v in c.list()] == ["bystander"]


def test_diff_snapshot_of_a_clone_whose_dirty_pages_vanished(
        daemon: Daemon, microguests: dict[str, Path], tmp_path: Path) -> None:
    """A diff snapshot reads no page itself: the kernel's pwrite from the
    vanished dirty pages fails (EFAULT, no signal), and it ends the same way."""
    snap = tmp_path / "s"
    with daemon.client() as c:
        c.create("src", str(microguests["pvh"]), cmdline="mg=tick ms=1", memory_mib=32)
        c.start("src")
        c.pause("src")
        c.snapshot("src", str(snap))
        c.delete("src")
        head = c.restore(str(snap), "ticker", resume=True,
                         track_dirty_pages=True).counters.console_bytes
        wait_until(lambda: c.get("ticker").counters.console_bytes > head + 100, "ticks")
        c.pause("ticker")  # the mailbox page (the last tick's number) is dirty
        cut_image(snap)
        with pytest.raises(ClientError) as err:
            c.snapshot("ticker", str(tmp_path / "diff"), diff=True)
        assert err.value.code == "DATA_LOSS", err.value
        vm = crashed(c, "ticker")
        m = MEMORY_FAULT.match(vm.stop.message)
        assert m and IMAGE <= int(m[1], 16) < IMAGE_END, vm.stop.message
        names_the_file(vm.stop.message, snap)
        assert not (tmp_path / "diff" / snapshots.MEMORY_FILE).exists()
        alive(daemon, c)


PROGRESS = 0x200020  # the mailbox's progress word (blk op=multi completions)


def test_truncated_memory_under_a_clone_doing_block_io(
        daemon: Daemon, microguests: dict[str, Path], tmp_path: Path) -> None:
    """A clone in the middle of 1000000 reads (8 in flight) when its memory
    file loses the guest image: its rings and buffers vanish under the I/O
    thread and the vCPU at once; whichever touches them first (the vCPU,
    polling, nearly always), the VM crashes alone."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 * MIB))
    snap = tmp_path / "s"
    drive = pb.Drive(drive_id="d", path_on_host=str(image), read_only=True)
    with daemon.client() as c:
        c.create("src", str(microguests["pvh"]), memory_mib=32, drives=[drive],
                 cmdline="mg=blk op=multi n=1000000 qd=8 rw=read timeout_ms=20000")
        c.start("src")
        wait_until(lambda: c.get("src").counters.devices[0].requests > 100, "reads under way")
        c.pause("src")
        c.snapshot("src", str(snap))
        c.delete("src")
        c.create("bystander", str(microguests["pvh"]), cmdline="mg=tick ms=10", memory_mib=16)
        c.start("bystander")
        c.restore(str(snap), "reader", resume=True)
        served = c.get("reader").counters.devices[0].requests
        wait_until(lambda: c.get("reader").counters.devices[0].requests > served + 100,
                   "the clone reads on")
        with ConsoleReader(c, "bystander") as con:
            con.wait_for(b"MG-TICK 2\n")
            cut_image(snap)
            vm = crashed(c, "reader")
            m = MEMORY_FAULT.match(vm.stop.message)  # the I/O thread came first
            assert not m or IMAGE <= int(m[1], 16) < IMAGE_END, vm.stop.message
            print(f"reader: {vm.stop.message}")
            alive(daemon, c)
            still_ticking(con)
        c.delete("reader")
        alive(daemon, c)


def test_truncated_memory_under_the_io_thread(microguests: dict[str, Path],
                                              tmp_path: Path) -> None:
    """The I/O thread alone touches the vanished RAM: the clone's guest took
    its one frame and halted (a halted vCPU touches no memory), its other
    RX buffers still posted; a second frame makes the I/O thread read the
    RX ring - from a page that is gone."""
    snap = tmp_path / "s"
    nic = pb.NetworkInterface(iface_id="eth0", host_dev_name="tap0", guest_mac=MAC0)
    with NetNs() as ns:
        ns.add_tap("tap0")
        sock = ns.packet_socket("tap0")
        with running_daemon("--stop-timeout", "1", wrap=ns.exec_argv()) as d, d.client() as c:
            c.create("src", str(microguests["pvh"]), memory_mib=32, nets=[nic],
                     cmdline="mg=net op=recv n=1 end=halt timeout_ms=60000")
            c.start("src")
            with ConsoleReader(c, "src") as con:
                con.wait_for(b"MG-NET-READY")
            c.pause("src")
            c.snapshot("src", str(snap))
            c.delete("src")
            c.create("bystander", str(microguests["pvh"]), cmdline="mg=tick ms=10",
                     memory_mib=16)
            c.start("bystander")
            c.restore(str(snap), "rx", resume=True)
            with ConsoleReader(c, "rx") as rx, ConsoleReader(c, "bystander") as con:
                sock.send(host_frame(60, 1, dst=mac_bytes(MAC0)))
                rx.wait_for(b"MG-DONE\n")  # then cli; hlt
                halted(c, "rx")
                con.wait_for(b"MG-TICK 2\n")
                cut_image(snap)
                sock.send(host_frame(60, 2, dst=mac_bytes(MAC0)))
                vm = crashed(c, "rx")
                m = MEMORY_FAULT.match(vm.stop.message)
                assert m and IMAGE <= int(m[1], 16) < IMAGE_END, vm.stop.message
                print(f"rx: {vm.stop.message}")
                alive(d, c)
                still_ticking(con)
            c.delete("rx")
            alive(d, c)
