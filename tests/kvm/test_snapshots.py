"""Snapshots with micro-guests (milliseconds each): a guest counting in memory
goes on from where it was, in this process and in a freshly started daemon,
next to the original; block and net devices keep working across a restore
(queue state carried over); a diff merged onto its base equals a full
snapshot of the same moment; 20 clones of one snapshot run and share its
memory."""

from __future__ import annotations

import os
import re
import select
import shutil
import struct
import time
from pathlib import Path

from tests.framework.console import ConsoleReader, ticks
from tests.framework.daemon import running_daemon
from tests.framework.frames import HOST_MAC, MAC0, host_frame, mac_bytes, recv_frames
from tests.framework.netns import NetNs
from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.client import pb
from vmmd.spec import (
    BootSpec,
    DeviceOverrides,
    DriveSpec,
    NetOverride,
    NetSpec,
    RestoreSpec,
    VmSpec,
)
from vmmd.vm import snapshot as snapshots
from vmmd.vm.builder import build_vm, restore_vm
from vmmd.vm.vm import Vm

HANG_S = 60.0
COUNTER = 0x200010   # the micro-guest's mailbox: mg=count's counter
PROGRESS = 0x200020  # requests completed (blk op=multi)


def counter(vm: Vm, at: int = COUNTER) -> int:
    return int(struct.unpack("<Q", vm.read_memory(at, 8))[0])


def run_until(vm: Vm, check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + HANG_S
    while not check():
        assert vm.stop_info is None, f"guest stopped: {vm.stop_info}"
        assert time.monotonic() < deadline, f"{what}: not within {HANG_S}s"
        time.sleep(0.01)


def paused_after(vm: Vm, check, what: str) -> None:  # type: ignore[no-untyped-def]
    """Run until check() holds (reading guest memory needs no pause), then pause."""
    run_until(vm, check, what)
    vm.pause()


def restored(directory: Path, vm_id: str, **kw) -> Vm:  # type: ignore[no-untyped-def]
    vm = restore_vm(RestoreSpec(str(directory), vm_id, **kw))
    vm.start_restored()
    return vm


def test_counting_guest_goes_on_from_where_it_was(microguests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = VmSpec(vm_id="count", boot=BootSpec(str(microguests["pvh"]),
                                                cmdline="mg=count n=0 every=0"), memory_mib=64)
    with build_vm(spec) as vm:
        vm.start()
        paused_after(vm, lambda: counter(vm) > 1000, "counting")
        at_snapshot = counter(vm)
        info = vm.snapshot(str(tmp_path / "s"))
        assert info.kind == "full" and info.pages_written > 0
        with restored(tmp_path / "s", "copy") as copy:
            assert counter(copy) == at_snapshot  # the same memory, not yet running
            assert copy.thread_count() == 0  # a paused restore makes its threads at resume
            copy.resume()
            assert copy.thread_count() == 2  # its vCPU and its I/O thread
            vm.resume()  # side by side
            run_until(copy, lambda: counter(copy) > at_snapshot + 1000, "the copy counts on")
            run_until(vm, lambda: counter(vm) > at_snapshot + 1000, "the original counts on")
            copy.pause()
            vm.pause()
            # Each wrote its own pages: copy-on-write, not shared writes.
            vm.write_memory(COUNTER, struct.pack("<Q", 7))
            assert counter(copy) != 7


def test_ticking_guest_restored_in_a_fresh_daemon(microguests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snap = str(tmp_path / "tick")
    with running_daemon() as d, d.client() as c:
        c.create("tick", str(microguests["pvh"]), cmdline="mg=tick ms=10", memory_mib=32)
        c.start("tick")
        with ConsoleReader(c, "tick") as con:
            con.wait_for(b"MG-TICK 5\n")
            c.pause("tick")
            last = max(ticks(con.data))
            head = c.get("tick").counters.console_bytes
        c.snapshot("tick", snap)
    with running_daemon() as d, d.client() as c:  # nothing of the first daemon is left
        vm = c.restore(snap, "again", resume=True)
        assert vm.state == pb.VM_STATE_RUNNING
        with ConsoleReader(c, "again") as con:
            data = con.wait(lambda b: len(ticks(b)) >= 3, "three ticks")
        got = ticks(data)
        assert got[0] == last + 1 and got == list(range(last + 1, last + 1 + len(got)))
        chunks = list(c.console("again", from_start=True, follow=False))
        assert b"".join(chunks).startswith(b"MG-TICK")  # offsets go on: nothing before `head`
        assert c.get("again").counters.console_bytes > head


def test_block_device_keeps_working_across_restore(microguests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Paused in the middle of 4000 reads (8 in flight): the restored guest
    completes them all - its queue's indices came along."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    spec = VmSpec(vm_id="blk", memory_mib=64, boot=BootSpec(
                  str(microguests["pvh"]),
                  cmdline="mg=blk op=multi n=4000 qd=8 rw=read timeout_ms=20000"),
                  drives=(DriveSpec("d", str(image), read_only=True),))
    with build_vm(spec) as vm:
        vm.start()
        paused_after(vm, lambda: counter(vm, PROGRESS) > 500, "reads under way")
        served = vm.drive_stats()[0].requests  # the guest may not have reaped them all yet
        vm.snapshot(str(tmp_path / "s"))
        with restored(tmp_path / "s", "blk2") as copy:
            copy.resume()
            info = copy.wait(HANG_S)
            out = copy.console_read(0, 1 << 16)[0].decode()
            assert info is not None and info.clean, out
            assert "MG-BLK-MULTI n=4000 ok=4000 errors=0" in out, out
            assert copy.drive_stats()[0].requests == 4000 - served  # only what was left


def test_net_device_keeps_working_on_another_tap(microguests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with NetNs() as ns:
        ns.add_tap("tap0")
        ns.add_tap("tap1")
        socks = [ns.packet_socket("tap0"), ns.packet_socket("tap1")]
        spec = VmSpec(vm_id="echo", memory_mib=64, boot=BootSpec(
                          str(microguests["pvh"]), cmdline="mg=net op=echo n=1000 timeout_ms=60000"),
                      network_interfaces=(NetSpec("eth0", "tap0", MAC0),))
        with ns.call(lambda: build_vm(spec)) as vm:
            vm.start()
            run_until(vm, lambda: b"MG-NET-READY" in vm.console_read(0, 4096)[0], "net ready")
            f = host_frame(100, 1, dst=mac_bytes(MAC0))
            socks[0].send(f)
            assert recv_frames(socks[0], 1, MAC0) == [HOST_MAC + mac_bytes(MAC0) + f[12:]]
            vm.pause()
            vm.snapshot(str(tmp_path / "s"))
            with ns.call(lambda: restored(tmp_path / "s", "echo2",
                                          overrides=DeviceOverrides(network_interfaces=(
                                              NetOverride("eth0", "tap1"),)))) as copy:
                copy.resume()
                g = host_frame(200, 2, dst=mac_bytes(MAC0))
                socks[1].send(g)
                assert recv_frames(socks[1], 1, MAC0) == [HOST_MAC + mac_bytes(MAC0) + g[12:]]
                assert copy.interface_stats()[0].rx_packets == 1
                assert select.select([socks[0]], [], [], 0.2)[0] == []  # nothing on the old tap


MSR_IA32_TSC = 0x10  # runs on while a VM is paused: two saves never agree on it


def _same_moment(a: spb.SnapshotState, b: spb.SnapshotState) -> None:
    for va, vb in zip(a.vcpus, b.vcpus, strict=True):
        for f in ("regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "events", "mp_state",
                  "cpuid"):
            assert getattr(va, f) == getattr(vb, f), f
        assert ([m for m in va.msrs if m.index != MSR_IA32_TSC]
                == [m for m in vb.msrs if m.index != MSR_IA32_TSC])
    for f in ("pic_master", "pic_slave", "ioapic"):
        assert getattr(a.machine, f) == getattr(b.machine, f), f
    for field in ("devices", "legacy", "memory"):
        assert getattr(a, field) == getattr(b, field), field


def test_diff_merged_onto_its_base_equals_a_full_snapshot(microguests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = VmSpec(vm_id="d", boot=BootSpec(str(microguests["pvh"]),
                                            cmdline="mg=count n=0 every=0"),
                  memory_mib=64, track_dirty_pages=True)
    base, diff, full = tmp_path / "base", tmp_path / "diff", tmp_path / "full"
    with build_vm(spec) as vm:
        vm.start()
        paused_after(vm, lambda: counter(vm) > 1000, "counting")
        vm.snapshot(str(base))
        vm.resume()
        c0 = counter(vm)
        paused_after(vm, lambda: counter(vm) > c0 + 1000, "counting on")
        d = vm.snapshot(str(diff), diff=True)
        f = vm.snapshot(str(full))
        at = counter(vm)
    assert d.kind == "diff" and d.parent_id != "" and d.pages_written < f.pages_written
    snapshots.merge(str(base), str(diff))
    merged, whole = snapshots.read(str(base)), snapshots.read(str(full))
    _same_moment(merged.state, whole.state)
    with open(merged.memory_path, "rb") as m, open(whole.memory_path, "rb") as w:
        m.seek(snapshots.MEMORY_OFFSET)
        w.seek(snapshots.MEMORY_OFFSET)
        assert m.read() == w.read()  # every page the guest wrote since the base is in the diff
    with restored(base, "m") as vm:
        assert counter(vm) == at


def test_twenty_clones_run_and_share_the_snapshot_memory(microguests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The snapshot holds 48 MiB the guest does not touch again: each clone
    maps it, none copies it."""
    snap = tmp_path / "s"
    spec = VmSpec(vm_id="src", boot=BootSpec(str(microguests["pvh"]), cmdline="mg=tick ms=20"),
                  memory_mib=128)
    with build_vm(spec) as vm:
        vm.start()
        run_until(vm, lambda: b"MG-TICK 2" in vm.console_read(0, 4096)[0], "ticking")
        vm.pause()
        for mib in range(16, 64):
            vm.write_memory(mib << 20, os.urandom(1 << 20))
        vm.snapshot(str(snap))
    with running_daemon("--max-vms", "32") as d, d.client() as c:
        before = rss_anon_kib(d.pid)
        vms = c.clone(str(snap), 20, "c", resume=True)
        assert [v.vm_id for v in vms] == [f"c-{i}" for i in range(20)]
        for v in vms:
            with ConsoleReader(c, v.vm_id) as con:
                con.wait(lambda b: len(ticks(b)) >= 2, "two ticks")
        grown = rss_anon_kib(d.pid) - before
        assert grown < 20 * 48 * 1024 // 8, f"anonymous RSS grew {grown} KiB for 20 clones"
        shutil.rmtree(snap)  # running clones keep their mapping of the deleted file
        time.sleep(0.1)
        assert all(c.get(v.vm_id).state == pb.VM_STATE_RUNNING for v in vms)


def rss_anon_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

