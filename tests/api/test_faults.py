"""Faults around snapshots, through a real daemon: the daemon killed (SIGKILL)
or stopped (SIGTERM) while it writes a snapshot, and a full disk.  Whatever
happens, the directory holds one whole snapshot (the old one or the new
one, never a mix), temporary files are refused by readers and cleaned up by
the next writer, and nothing is reported as our own bug (INTERNAL)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest

from tests.framework.daemon import QUICK_STOP, Daemon, spawn
from tests.framework.rpc import config, rpc_error
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc
from vmmd.vm import snapshot as snapshots

pytestmark = pytest.mark.kvm

Stub = vmm_pb2_grpc.VmServiceStub
DEADLINE_S = 30.0
BIG_MIB = 2048  # a full snapshot of it scans 2 GiB: long enough to be interrupted


def stub_of(d: Daemon) -> Stub:
    return vmm_pb2_grpc.VmServiceStub(d.channel())


def paused_vm(stub: Stub, kernel: str, vm_id: str, memory_mib: int = BIG_MIB) -> None:
    stub.CreateVm(pb.CreateVmRequest(vm_id=vm_id, config=config(kernel, "mg=spin",
                                                                memory_mib=memory_mib)),
                  timeout=DEADLINE_S)
    stub.StartVm(pb.StartVmRequest(vm_id=vm_id), timeout=DEADLINE_S)
    stub.PauseVm(pb.PauseVmRequest(vm_id=vm_id), timeout=DEADLINE_S)


def snapshot_async(stub: Stub, vm_id: str, d: Path) -> Future[pb.Snapshot]:
    return stub.SnapshotVm.future(pb.SnapshotVmRequest(vm_id=vm_id, snapshot_dir=str(d)),
                                  timeout=DEADLINE_S)


def snapshot_id(d: Path) -> str:
    return snapshots.read(str(d)).state.snapshot_id


def temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


@pytest.fixture()
def own_daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start(*args) -> a ready daemon this test may kill; any left alive is killed after."""
    made: list[Daemon] = []

    def start(*args: str) -> Daemon:
        d = spawn(tmp_path / f"d{len(made)}.sock", *QUICK_STOP, *args)
        made.append(d)
        d.wait_ready()
        return d

    yield start
    for d in made:
        d.kill()


@pytest.mark.parametrize("delay_ms", [0, 20, 60, 150, 400])
def test_sigkill_while_writing_leaves_one_whole_snapshot(own_daemons: Callable[..., Daemon],
                                                         kernel: str, tmp_path: Path,
                                                         delay_ms: int) -> None:
    target = tmp_path / "snap"
    d = own_daemons()
    stub = stub_of(d)
    paused_vm(stub, kernel, "v")
    old = stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="v", snapshot_dir=str(target)),
                          timeout=DEADLINE_S).snapshot_id
    pending = snapshot_async(stub, "v", target)
    time.sleep(delay_ms / 1000)
    d.proc.kill()
    d.proc.wait()
    new = pending.result().snapshot_id if pending.exception() is None else None
    # Whatever the moment: exactly one whole snapshot, the old one or the finished new one.
    assert snapshot_id(target) in ({old} if new is None else {old, new})
    left = temps(target)
    # A fresh daemon restores it, and its next snapshot there clears what the dead one left.
    d2 = own_daemons()
    stub2 = stub_of(d2)
    vm = stub2.RestoreVm(pb.RestoreVmRequest(snapshot_dir=str(target), vm_id="r"),
                         timeout=DEADLINE_S)
    assert vm.state == pb.VM_STATE_PAUSED
    stub2.SnapshotVm(pb.SnapshotVmRequest(vm_id="r", snapshot_dir=str(target)),
                     timeout=DEADLINE_S)
    assert temps(target) == []
    print(f"killed after {delay_ms} ms: new snapshot {'done' if new else 'not done'}, "
          f"temp files left {left}")


def test_sigterm_while_writing_completes_the_snapshot(own_daemons: Callable[..., Daemon],
                                                      kernel: str, tmp_path: Path) -> None:
    target = tmp_path / "snap"
    d = own_daemons("--stop-timeout", "0.5")
    stub = stub_of(d)
    paused_vm(stub, kernel, "v")
    old = stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="v", snapshot_dir=str(target)),
                          timeout=DEADLINE_S).snapshot_id
    pending = snapshot_async(stub, "v", target)
    time.sleep(0.02)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(DEADLINE_S) == 0
    got = snapshot_id(target)
    if pending.exception() is None:
        assert got == pending.result().snapshot_id  # completed: the new one is there
    else:
        assert got == old  # or cleanly absent: the old one is whole
    assert temps(target) == []


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of this test's own."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path) -> None:
    """Take every free byte of fs."""
    with open(fs / "filler", "wb") as f:
        chunk = bytes(64 * 1024)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_fails_the_snapshot_and_keeps_the_old_one(stub: Stub, kernel: str,
                                                              small_fs: Path) -> None:
    paused_vm(stub, kernel, "v", memory_mib=32)
    target = small_fs / "snap"
    old = stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="v", snapshot_dir=str(target)),
                          timeout=DEADLINE_S).snapshot_id
    fill(small_fs)
    err = rpc_error(stub.SnapshotVm, pb.SnapshotVmRequest(vm_id="v", snapshot_dir=str(target)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert err.details().startswith("snapshot_dir: no space left for the snapshot in "), \
        err.details()
    assert temps(target) == [] and snapshot_id(target) == old  # the old one, whole
    (small_fs / "filler").unlink()
    assert stub.GetVm(pb.GetVmRequest(vm_id="v"), timeout=DEADLINE_S).state == \
        pb.VM_STATE_PAUSED
    vm = stub.RestoreVm(pb.RestoreVmRequest(snapshot_dir=str(target), vm_id="r"),
                        timeout=DEADLINE_S)
    assert vm.state == pb.VM_STATE_PAUSED
