"""Snapshots through the API, with micro-guests: SnapshotVm, RestoreVm, CloneVm
and MergeSnapshots.  Every refusal has its status code and a message naming
the field or the problem, and leaves nothing behind (no VM, no reserved id,
no file); a restored guest goes on from where it was snapshotted."""

from __future__ import annotations

import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.framework import HANG_S
from tests.framework.rpc import attached, config, list_ids, rpc_error
from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc
from vmmd.vm import snapshot as snapshots

pytestmark = pytest.mark.kvm

Stub = vmm_pb2_grpc.VmServiceStub
Code = grpc.StatusCode
MEM_MIB = 32
TICKER = "mg=tick ms=20"
TICK = re.compile(rb"MG-TICK (\d+)\n")
E = pb.EventType


# ---- helpers ----
def ticks(text: bytes) -> list[int]:
    return [int(n) for n in TICK.findall(text)]


def console(stub: Stub, vm_id: str) -> bytes:
    """Everything the VM printed (not following), checked contiguous from offset 0."""
    chunks = list(stub.StreamConsole(pb.StreamConsoleRequest(vm_id=vm_id, from_start=True),
                                     timeout=HANG_S))
    offset = 0
    for c in chunks:
        assert (c.offset, c.lost_bytes) == (offset, 0)
        offset += len(c.data)
    return b"".join(c.data for c in chunks)


def follow_until(stub: Stub, vm_id: str,
                 done: Callable[[bytes], bool]) -> list[pb.ConsoleChunk]:
    """Console chunks from the start, followed until done(bytes so far)."""
    stream = stub.StreamConsole(pb.StreamConsoleRequest(vm_id=vm_id, from_start=True, follow=True),
                                timeout=HANG_S)
    chunks: list[pb.ConsoleChunk] = []
    for c in stream:
        chunks.append(c)
        if done(b"".join(x.data for x in chunks)):
            stream.cancel()
            return chunks
    pytest.fail(f"console of {vm_id} ended early: {b''.join(x.data for x in chunks)!r}")


def pause(stub: Stub, vm_id: str) -> None:
    assert stub.PauseVm(pb.PauseVmRequest(vm_id=vm_id), timeout=HANG_S).state == pb.VM_STATE_PAUSED


def resume(stub: Stub, vm_id: str) -> None:
    assert stub.ResumeVm(pb.ResumeVmRequest(vm_id=vm_id), timeout=HANG_S).state == \
        pb.VM_STATE_RUNNING


def tick_on(stub: Stub, vm_id: str, more: int = 3) -> bytes:
    """Let a running ticker print `more` further ticks, pause it, and return its whole console."""
    last = max(ticks(console(stub, vm_id)), default=0)
    follow_until(stub, vm_id, lambda text: max(ticks(text), default=0) >= last + more)
    pause(stub, vm_id)
    return console(stub, vm_id)


def snapshot(stub: Stub, vm_id: str, d: Path, diff: bool = False) -> pb.Snapshot:
    kind = pb.SNAPSHOT_TYPE_DIFF if diff else pb.SNAPSHOT_TYPE_FULL
    return stub.SnapshotVm(pb.SnapshotVmRequest(vm_id=vm_id, snapshot_dir=str(d), type=kind),
                           timeout=HANG_S)


def restore(stub: Stub, d: Path, vm_id: str, resume: bool = False, **fields: object) -> pb.Vm:
    return stub.RestoreVm(pb.RestoreVmRequest(snapshot_dir=str(d), vm_id=vm_id, resume=resume,
                                              **fields), timeout=HANG_S)


def assert_continues(stub: Stub, vm_id: str, before: bytes, more: int = 3) -> None:
    """The restored VM's console goes on exactly where `before` (the original's
    console at the snapshot) ended: offsets continue, and the ticks go on from
    the last one, none repeated or missing."""
    last = max(ticks(before))
    chunks = follow_until(stub, vm_id,
                          lambda text: max(ticks(before + text), default=0) >= last + more)
    assert chunks[0].offset == len(before)
    offset = len(before)
    for c in chunks:
        assert c.offset == offset
        offset += len(c.data)
    whole = before + b"".join(c.data for c in chunks)
    assert whole.startswith(b"MG-TSC ")
    assert ticks(whole) == list(range(1, len(ticks(whole)) + 1))
    assert ticks(whole)[-1] >= last + more


def refusal(err: grpc.RpcError, code: grpc.StatusCode, field: str, *says: str) -> None:
    """The status code, the field the message starts with ("" when it names none), and
    what it says."""
    assert err.code() == code, err.details()
    assert err.details().startswith(f"{field}: ") if field else True, err.details()
    for words in says:
        assert words in err.details(), err.details()


def files(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def reframe(d: Path, change: Callable[[spb.SnapshotState], None]) -> None:
    """Rewrite the state with a valid frame (checksum included) around a changed state."""
    s = snapshots.read(str(d)).state
    change(s)
    (d / "vmstate").write_bytes(snapshots.frame(s))


@pytest.fixture()
def ticker(stub: Stub, kernel: str) -> Callable[..., bytes]:
    """ticker(vm_id, track=False) -> VM vm_id, a micro-guest ticking every 20 ms, paused
    after 3 ticks; returns its console."""
    def make(vm_id: str = "t", track: bool = False) -> bytes:
        stub.CreateVm(pb.CreateVmRequest(vm_id=vm_id, config=config(
            kernel, TICKER, memory_mib=MEM_MIB, track_dirty_pages=track)), timeout=HANG_S)
        stub.StartVm(pb.StartVmRequest(vm_id=vm_id), timeout=HANG_S)
        return tick_on(stub, vm_id)
    return make


@dataclass(frozen=True)
class Golden:
    """Snapshots of one paused, dirty-tracked `mg=spin` VM (since deleted)."""

    full: Path      # a full snapshot
    second: Path    # a full snapshot taken after it (another id)
    diff: Path      # a diff taken after `second`
    image_size: int  # its drive "d"


@pytest.fixture(scope="module")
def golden(session_stub: Stub, microguests: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Golden]:
    stub, root = session_stub, tmp_path_factory.mktemp("golden")
    image = root / "d.img"
    with image.open("wb") as f:
        f.truncate(1 << 20)
    stub.CreateVm(pb.CreateVmRequest(vm_id="golden", config=config(
        str(microguests["64"]), "mg=spin", memory_mib=MEM_MIB, track_dirty_pages=True,
        drives=[pb.Drive(drive_id="d", path_on_host=str(image))])), timeout=HANG_S)
    try:
        stub.StartVm(pb.StartVmRequest(vm_id="golden"), timeout=HANG_S)
        follow_until(stub, "golden", lambda text: b"MG-START\n" in text)
        pause(stub, "golden")
        g = Golden(root / "full", root / "second", root / "diff", 1 << 20)
        snapshot(stub, "golden", g.full)
        snapshot(stub, "golden", g.second)
        resume(stub, "golden")
        pause(stub, "golden")
        snapshot(stub, "golden", g.diff, diff=True)
    finally:
        stub.DeleteVm(pb.DeleteVmRequest(vm_id="golden"), timeout=HANG_S)
    yield g


@pytest.fixture()
def copy(golden: Golden, tmp_path: Path) -> Callable[[Path], Path]:
    """copy(golden.x) -> a copy of that snapshot of this test's own, to damage."""
    def make(src: Path) -> Path:
        return Path(shutil.copytree(src, tmp_path / f"copy-{src.name}"))
    return make


# ---- SnapshotVm: refusals ----
@pytest.mark.parametrize(("state", "word"), [("created", "created"), ("running", "running"),
                                             ("stopped", "stopped")])
def test_snapshot_needs_a_paused_vm(stub: Stub, kernel: str, tmp_path: Path, state: str,
                                    word: str) -> None:
    stub.CreateVm(pb.CreateVmRequest(vm_id="v", config=config(kernel, memory_mib=MEM_MIB)),
                  timeout=HANG_S)
    if state != "created":
        stub.StartVm(pb.StartVmRequest(vm_id="v"), timeout=HANG_S)
    if state == "stopped":
        stub.StopVm(pb.StopVmRequest(vm_id="v", force=True), timeout=HANG_S)
    err = rpc_error(stub.SnapshotVm, pb.SnapshotVmRequest(vm_id="v", snapshot_dir=str(tmp_path / "s")))
    assert err.code() == Code.FAILED_PRECONDITION
    assert err.details() == f"cannot snapshot a VM that is {word}"
    assert not (tmp_path / "s").exists()
    assert pb.VmState.Name(stub.GetVm(pb.GetVmRequest(vm_id="v"), timeout=HANG_S).state) == \
        f"VM_STATE_{word.upper()}"


def test_snapshot_of_an_unknown_vm(stub: Stub, tmp_path: Path) -> None:
    err = rpc_error(stub.SnapshotVm, pb.SnapshotVmRequest(vm_id="ghost",
                                                          snapshot_dir=str(tmp_path / "s")))
    refusal(err, Code.NOT_FOUND, "vm_id", "no VM named 'ghost'")
    err = rpc_error(stub.SnapshotVm, pb.SnapshotVmRequest(snapshot_dir=str(tmp_path / "s")))
    refusal(err, Code.INVALID_ARGUMENT, "vm_id", "is required")
    assert not (tmp_path / "s").exists()


@pytest.fixture()
def paused(stub: Stub, kernel: str) -> Callable[[bool], str]:
    """paused(track) -> id of a paused `mg=spin` VM."""
    def make(track: bool) -> str:
        stub.CreateVm(pb.CreateVmRequest(vm_id="p", config=config(
            kernel, memory_mib=MEM_MIB, track_dirty_pages=track)), timeout=HANG_S)
        stub.StartVm(pb.StartVmRequest(vm_id="p"), timeout=HANG_S)
        pause(stub, "p")
        return "p"
    return make


def test_diff_needs_dirty_tracking(stub: Stub, paused: Callable[[bool], str],
                                   tmp_path: Path) -> None:
    vm_id = paused(False)
    snapshot(stub, vm_id, tmp_path / "full")
    err = rpc_error(stub.SnapshotVm, pb.SnapshotVmRequest(
        vm_id=vm_id, snapshot_dir=str(tmp_path / "diff"), type=pb.SNAPSHOT_TYPE_DIFF))
    refusal(err, Code.FAILED_PRECONDITION, "", "needs dirty-page tracking")
    assert not (tmp_path / "diff").exists()


def test_diff_needs_an_earlier_snapshot(stub: Stub, paused: Callable[[bool], str],
                                        tmp_path: Path) -> None:
    vm_id = paused(True)
    err = rpc_error(stub.SnapshotVm, pb.SnapshotVmRequest(
        vm_id=vm_id, snapshot_dir=str(tmp_path / "diff"), type=pb.SNAPSHOT_TYPE_DIFF))
    refusal(err, Code.FAILED_PRECONDITION, "", "needs an earlier snapshot")
    assert not (tmp_path / "diff").exists()
    full = snapshot(stub, vm_id, tmp_path / "full")
    diff = snapshot(stub, vm_id, tmp_path / "diff", diff=True)
    assert (diff.type, diff.parent_id) == (pb.SNAPSHOT_TYPE_DIFF, full.snapshot_id)


BAD_DIRS: list[tuple[str, Callable[[Path], str], str]] = [
    ("empty", lambda t: "", "'' is not an absolute path"),
    ("relative", lambda t: "snaps/one", "'snaps/one' is not an absolute path"),
    ("parent-missing", lambda t: str(t / "no" / "such"), "No such file or directory"),
    ("a-file", lambda t: str(t / "file"), "file is not a directory"),
]


@pytest.mark.parametrize(("name", "path", "says"), BAD_DIRS, ids=[b[0] for b in BAD_DIRS])
def test_bad_snapshot_dir(stub: Stub, paused: Callable[[bool], str], tmp_path: Path,
                          name: str, path: Callable[[Path], str], says: str) -> None:
    vm_id = paused(True)
    (tmp_path / "file").write_bytes(b"x")
    before = files(tmp_path)
    err = rpc_error(stub.SnapshotVm, pb.SnapshotVmRequest(vm_id=vm_id, snapshot_dir=path(tmp_path)))
    refusal(err, Code.INVALID_ARGUMENT, "snapshot_dir", says)
    assert files(tmp_path) == before
    assert (tmp_path / "file").read_bytes() == b"x"
    assert stub.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=HANG_S).state == pb.VM_STATE_PAUSED


def test_refused_snapshot_dir_keeps_the_diff_chain(stub: Stub, paused: Callable[[bool], str],
                                                   tmp_path: Path) -> None:
    """A diff refused for its directory (nothing was written) does not cost the VM its
    last snapshot: the next diff still applies to it."""
    vm_id = paused(True)
    full = snapshot(stub, vm_id, tmp_path / "full")
    err = rpc_error(stub.SnapshotVm, pb.SnapshotVmRequest(
        vm_id=vm_id, snapshot_dir="relative", type=pb.SNAPSHOT_TYPE_DIFF))
    assert err.code() == Code.INVALID_ARGUMENT
    diff = snapshot(stub, vm_id, tmp_path / "diff", diff=True)
    assert diff.parent_id == full.snapshot_id


# ---- SnapshotVm / RestoreVm: what works ----
def test_snapshot_and_restore_paused(stub: Stub, ticker: Callable[..., bytes],
                                     tmp_path: Path) -> None:
    events = attached(stub.WatchEvents(pb.WatchEventsRequest(), timeout=HANG_S))
    before = ticker("t")
    snap = snapshot(stub, "t", tmp_path / "s")
    assert (snap.vm_id, snap.type, snap.parent_id) == ("t", pb.SNAPSHOT_TYPE_FULL, "")
    assert snap.snapshot_dir == str(tmp_path / "s") and len(snap.snapshot_id) == 32
    assert snap.memory_bytes == MEM_MIB << 20
    assert snap.memory_file_bytes == snapshots.MEMORY_OFFSET + (MEM_MIB << 20)
    assert 0 < snap.pages_written < (MEM_MIB << 20) // 4096  # zero pages are not written
    assert snap.state_file_bytes == (tmp_path / "s" / "vmstate").stat().st_size
    assert files(tmp_path / "s") == [".vmmd-snapshot", "memory", "vmstate"]
    assert stub.GetVm(pb.GetVmRequest(vm_id="t"), timeout=HANG_S).state == pb.VM_STATE_PAUSED

    vm = restore(stub, tmp_path / "s", "r")
    assert (vm.vm_id, vm.state) == ("r", pb.VM_STATE_PAUSED)
    assert vm.config.memory_mib == MEM_MIB and vm.cmdline == TICKER
    assert console(stub, "r") == b""  # nothing new yet: the history stayed with "t"
    resume(stub, "r")
    assert_continues(stub, "r", before)
    assert list_ids(stub) == ["r", "t"]
    assert console(stub, "t") == before  # the original is untouched, still paused

    seen = []
    for ev in events:
        seen.append((ev.vm_id, ev.type))
        if ev.type == E.EVENT_TYPE_RESUMED and ev.vm_id == "r":
            events.cancel()
            break
    assert seen == [("t", E.EVENT_TYPE_CREATED), ("t", E.EVENT_TYPE_STARTED),
                    ("t", E.EVENT_TYPE_PAUSED), ("t", E.EVENT_TYPE_SNAPSHOT_TAKEN),
                    ("r", E.EVENT_TYPE_RESTORED), ("r", E.EVENT_TYPE_RESUMED)]


def test_restore_with_resume_runs_at_once(stub: Stub, ticker: Callable[..., bytes],
                                          tmp_path: Path) -> None:
    before = ticker("t")
    snapshot(stub, "t", tmp_path / "s")
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="t"), timeout=HANG_S)
    events = attached(stub.WatchEvents(pb.WatchEventsRequest(), timeout=HANG_S))
    vm = restore(stub, tmp_path / "s", "r", resume=True)
    assert vm.state == pb.VM_STATE_RUNNING and vm.HasField("started_at")
    assert_continues(stub, "r", before)
    seen = [next(events) for _ in range(2)]
    events.cancel()
    assert [(e.vm_id, e.type) for e in seen] == [("r", E.EVENT_TYPE_RESTORED),
                                                 ("r", E.EVENT_TYPE_RESUMED)]


def test_snapshot_into_the_same_dir_replaces_it(stub: Stub, ticker: Callable[..., bytes],
                                                tmp_path: Path) -> None:
    ticker("t")
    first = snapshot(stub, "t", tmp_path / "s")
    resume(stub, "t")
    later = tick_on(stub, "t")
    second = snapshot(stub, "t", tmp_path / "s")
    assert second.snapshot_id != first.snapshot_id
    assert files(tmp_path / "s") == [".vmmd-snapshot", "memory", "vmstate"]
    restore(stub, tmp_path / "s", "r", resume=True)
    assert_continues(stub, "r", later)


def test_diff_merged_onto_its_base_restores_the_diffs_moment(stub: Stub,
                                                             ticker: Callable[..., bytes],
                                                             tmp_path: Path) -> None:
    ticker("t", track=True)
    base = snapshot(stub, "t", tmp_path / "base")
    resume(stub, "t")
    later = tick_on(stub, "t")
    diff = snapshot(stub, "t", tmp_path / "diff", diff=True)
    assert (diff.type, diff.parent_id) == (pb.SNAPSHOT_TYPE_DIFF, base.snapshot_id)
    assert 0 < diff.pages_written < base.pages_written
    assert diff.memory_file_bytes == snapshots.MEMORY_OFFSET + 4096 * diff.pages_written
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(tmp_path / "diff"),
                                                        vm_id="r"))
    refusal(err, Code.INVALID_ARGUMENT, "snapshot_dir", "is a diff snapshot: merge it")
    merged = stub.MergeSnapshots(pb.MergeSnapshotsRequest(
        base_dir=str(tmp_path / "base"), diff_dir=str(tmp_path / "diff")), timeout=HANG_S)
    assert (merged.snapshot_id, merged.type, merged.parent_id) == \
        (diff.snapshot_id, pb.SNAPSHOT_TYPE_FULL, "")
    assert merged.snapshot_dir == str(tmp_path / "base") and merged.vm_id == "t"
    assert merged.pages_written == diff.pages_written
    restore(stub, tmp_path / "base", "r", resume=True)
    assert_continues(stub, "r", later)


# ---- RestoreVm: refusals ----
def _set_version(d: Path) -> None:
    with open(d / "vmstate", "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 9))


def _ram_size(d: Path) -> None:
    sid = snapshots.read(str(d)).state.snapshot_id
    with open(d / "memory", "r+b") as f:
        f.write(snapshots.memory_header(sid, snapshots.FULL, (MEM_MIB + 1) << 20))
    os.truncate(d / "memory", snapshots.MEMORY_OFFSET + ((MEM_MIB + 1) << 20))


def _lapic(s: spb.SnapshotState) -> None:
    s.vcpus[0].lapic = s.vcpus[0].lapic[:-1]


def _mem_mib(s: spb.SnapshotState) -> None:
    s.spec.memory_mib = MEM_MIB * 2


# name, damage done to a copy of golden.full, code, field, what the message says
BAD_SNAPSHOTS: list[tuple[str, Callable[[Path], object], Code, str, str]] = [
    ("vmstate-truncated", lambda d: os.truncate(d / "vmstate", 100), Code.DATA_LOSS, "",
     "truncated"),
    ("vmstate-header-only", lambda d: os.truncate(d / "vmstate", snapshots.STATE_HEADER.size),
     Code.DATA_LOSS, "", "truncated"),
    ("vmstate-flipped", lambda d: flip(d / "vmstate", (d / "vmstate").stat().st_size // 2),
     Code.DATA_LOSS, "", "checksum mismatch"),
    ("vmstate-magic", lambda d: flip(d / "vmstate", 0), Code.DATA_LOSS, "", "bad magic"),
    ("format-version", _set_version, Code.INVALID_ARGUMENT, "snapshot_dir",
     "snapshot format version 9; this vmmd reads version 1"),
    ("vmstate-missing", lambda d: (d / "vmstate").unlink(), Code.INVALID_ARGUMENT,
     "snapshot_dir", "vmstate is missing"),
    ("memory-truncated", lambda d: os.truncate(d / "memory", (d / "memory").stat().st_size - 4096),
     Code.DATA_LOSS, "", "(truncated)"),
    ("memory-too-long", lambda d: os.truncate(d / "memory", (d / "memory").stat().st_size + 4096),
     Code.DATA_LOSS, "", "(too long)"),
    ("memory-other-ram-size", _ram_size, Code.DATA_LOSS, "",
     f"holds {(MEM_MIB + 1) << 20} bytes of RAM, the state names {MEM_MIB << 20}"),
    ("memory-missing", lambda d: (d / "memory").unlink(), Code.DATA_LOSS, "",
     "the snapshot has no memory file"),
    ("vcpu-blob-size", lambda d: reframe(d, _lapic), Code.DATA_LOSS, "",
     "snapshot state vcpus[0].lapic: 1023 bytes, want 1024"),
    ("memory-regions", lambda d: reframe(d, _mem_mib), Code.DATA_LOSS, "",
     f"memory regions do not fit a VM of {MEM_MIB * 2} MiB"),
]


@pytest.mark.parametrize(("name", "damage", "code", "field", "says"), BAD_SNAPSHOTS,
                         ids=[b[0] for b in BAD_SNAPSHOTS])
def test_damaged_snapshot_is_refused(stub: Stub, golden: Golden, copy: Callable[[Path], Path],
                                     name: str, damage: Callable[[Path], object], code: Code,
                                     field: str, says: str) -> None:
    d = copy(golden.full)
    damage(d)
    before = sorted(os.listdir(d))
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(d), vm_id="r"))
    refusal(err, code, field, says)
    assert list_ids(stub) == []
    assert sorted(os.listdir(d)) == before


def test_memory_of_another_snapshot_is_refused(stub: Stub, golden: Golden,
                                               copy: Callable[[Path], Path]) -> None:
    d = copy(golden.full)
    shutil.copyfile(golden.second / "memory", d / "memory")
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(d), vm_id="r"))
    refusal(err, Code.DATA_LOSS, "", "belongs to another snapshot")
    assert list_ids(stub) == []


@pytest.mark.parametrize(("path", "says"), [("", "'' is not an absolute path"),
                                            ("rel/snap", "'rel/snap' is not an absolute path"),
                                            ("/nonexistent/snap", "is not a directory")])
def test_restore_from_no_snapshot_dir(stub: Stub, path: str, says: str) -> None:
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=path, vm_id="r"))
    refusal(err, Code.INVALID_ARGUMENT, "snapshot_dir", says)
    assert list_ids(stub) == []


def test_restore_of_an_unmerged_diff(stub: Stub, golden: Golden) -> None:
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(golden.diff), vm_id="r"))
    refusal(err, Code.INVALID_ARGUMENT, "snapshot_dir", "is a diff snapshot: merge it onto its base")
    assert list_ids(stub) == []


@pytest.fixture()
def image(golden: Golden, tmp_path: Path) -> Callable[[int], str]:
    """image(size) -> path of a fresh drive image of that size."""
    def make(size: int = golden.image_size) -> str:
        path = tmp_path / f"img-{size}-{len(os.listdir(tmp_path))}.img"
        with path.open("wb") as f:
            f.truncate(size)
        return str(path)
    return make


def drives(*pairs: tuple[str, str]) -> pb.DeviceOverrides:
    return pb.DeviceOverrides(drives=[pb.DriveOverride(drive_id=i, path_on_host=p) for i, p in pairs])


def test_restore_with_an_existing_id(stub: Stub, kernel: str, golden: Golden,
                                     image: Callable[[int], str]) -> None:
    stub.CreateVm(pb.CreateVmRequest(vm_id="taken", config=config(kernel)), timeout=HANG_S)
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(
        snapshot_dir=str(golden.full), vm_id="taken", overrides=drives(("d", image()))))
    refusal(err, Code.ALREADY_EXISTS, "vm_id", "a VM named 'taken' exists already")
    vm = stub.GetVm(pb.GetVmRequest(vm_id="taken"), timeout=HANG_S)
    assert vm.state == pb.VM_STATE_CREATED and vm.config.memory_mib == 128
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(golden.full),
                                                        vm_id="-bad"))
    refusal(err, Code.INVALID_ARGUMENT, "vm_id", "'-bad' must be")
    assert list_ids(stub) == ["taken"]


BAD_OVERRIDES: list[tuple[str, Callable[[Callable[[int], str]], pb.DeviceOverrides], str, str]] = [
    ("unknown-drive", lambda img: drives(("nope", img(1 << 20))), "overrides.drives[0].drive_id",
     "the snapshot has no drive 'nope' (it has ['d'])"),
    ("second-unknown-drive", lambda img: drives(("d", img(1 << 20)), ("e", img(1 << 20))),
     "overrides.drives[1].drive_id", "the snapshot has no drive 'e'"),
    ("unknown-interface", lambda img: pb.DeviceOverrides(
        drives=[pb.DriveOverride(drive_id="d", path_on_host=img(1 << 20))],
        network_interfaces=[pb.InterfaceOverride(iface_id="eth0", host_dev_name="tap9")]),
     "overrides.network_interfaces[0].iface_id", "the snapshot has no interface 'eth0' (it has none)"),
    ("other-size", lambda img: drives(("d", img(2 << 20))), "overrides.drives[0].path_on_host",
     "is 2097152 bytes; the snapshot's drive had 1048576"),
    ("missing-image", lambda img: drives(("d", "/nonexistent.img")),
     "overrides.drives[0].path_on_host", "No such file"),
    ("no-override-drive-in-use", lambda img: pb.DeviceOverrides(), "snapshot_dir",
     "the snapshot's drive 'd': /"),
]


@pytest.mark.parametrize(("name", "overrides", "field", "says"), BAD_OVERRIDES,
                         ids=[b[0] for b in BAD_OVERRIDES])
def test_bad_overrides_are_refused(stub: Stub, kernel: str, golden: Golden,
                                   image: Callable[[int], str], name: str,
                                   overrides: Callable[[Callable[[int], str]], pb.DeviceOverrides],
                                   field: str, says: str) -> None:
    # The snapshot's own image is held by another VM: restoring onto it must be refused.
    held = Path(golden.full.parent / "d.img")
    stub.CreateVm(pb.CreateVmRequest(vm_id="holder", config=config(
        kernel, drives=[pb.Drive(drive_id="d", path_on_host=str(held))])), timeout=HANG_S)
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(
        snapshot_dir=str(golden.full), vm_id="r", overrides=overrides(image)))
    refusal(err, Code.INVALID_ARGUMENT, field, says)
    if name == "no-override-drive-in-use":
        refusal(err, Code.INVALID_ARGUMENT, field, f"{held} is in use by another VM")
    assert list_ids(stub) == ["holder"]
    # nothing held: the same id restores with a good override
    path = image(golden.image_size)
    vm = restore(stub, golden.full, "r", overrides=drives(("d", path)))
    assert vm.state == pb.VM_STATE_PAUSED
    assert [(d.drive_id, d.path_on_host) for d in vm.config.drives] == [("d", path)]


# ---- CloneVm ----
@pytest.mark.parametrize(("count", "says"), [(0, "count: 0 is outside 1..1024"),
                                             (2000, "count: 2000 is outside 1..1024")])
def test_clone_count_out_of_range(stub: Stub, golden: Golden, count: int, says: str) -> None:
    err = rpc_error(stub.CloneVm, pb.CloneVmRequest(snapshot_dir=str(golden.full), count=count,
                                                    id_prefix="c"))
    refusal(err, Code.INVALID_ARGUMENT, "count", says)
    assert list_ids(stub) == []


def test_clone_with_a_wrong_number_of_overrides(stub: Stub, golden: Golden,
                                                image: Callable[[int], str]) -> None:
    err = rpc_error(stub.CloneVm, pb.CloneVmRequest(
        snapshot_dir=str(golden.full), count=3, id_prefix="c",
        overrides=[drives(("d", image())), drives(("d", image()))]))
    refusal(err, Code.INVALID_ARGUMENT, "overrides", "2 entries for 3 clones")
    assert list_ids(stub) == []


def test_clone_onto_an_existing_id_makes_none(stub: Stub, kernel: str, golden: Golden,
                                              image: Callable[[int], str]) -> None:
    stub.CreateVm(pb.CreateVmRequest(vm_id="c-2", config=config(kernel)), timeout=HANG_S)
    err = rpc_error(stub.CloneVm, pb.CloneVmRequest(
        snapshot_dir=str(golden.full), count=3, id_prefix="c",
        overrides=[drives(("d", image())) for _ in range(3)]))
    refusal(err, Code.ALREADY_EXISTS, "vm_id", "a VM named 'c-2' exists already")
    assert list_ids(stub) == ["c-2"]


def test_clone_with_one_bad_override_makes_none(stub: Stub, golden: Golden,
                                                image: Callable[[int], str]) -> None:
    err = rpc_error(stub.CloneVm, pb.CloneVmRequest(
        snapshot_dir=str(golden.full), count=3, id_prefix="c",
        overrides=[drives(("d", image())), drives(("d", image())), drives(("d", image(4096)))]))
    refusal(err, Code.INVALID_ARGUMENT, "overrides[2].drives[0].path_on_host",
            "is 4096 bytes; the snapshot's drive had 1048576")
    assert list_ids(stub) == []
    # the first two clones' drives were released with them: a clone can take them now
    ok = stub.CloneVm(pb.CloneVmRequest(snapshot_dir=str(golden.full), count=1, id_prefix="c",
                                        overrides=[drives(("d", image()))]), timeout=HANG_S)
    assert [v.vm_id for v in ok.vms] == ["c-0"]


def test_clones_of_one_snapshot(stub: Stub, golden: Golden, image: Callable[[int], str]) -> None:
    paths = [image() for _ in range(3)]
    resp = stub.CloneVm(pb.CloneVmRequest(
        snapshot_dir=str(golden.full), count=3, id_prefix="k", resume=True,
        overrides=[drives(("d", p)) for p in paths]), timeout=HANG_S)
    assert [(v.vm_id, v.state) for v in resp.vms] == [(f"k-{i}", pb.VM_STATE_RUNNING)
                                                      for i in range(3)]
    assert [v.config.drives[0].path_on_host for v in resp.vms] == paths
    assert list_ids(stub) == ["k-0", "k-1", "k-2"]


# ---- MergeSnapshots ----
def test_merge_refuses_mismatched_snapshots(stub: Stub, golden: Golden,
                                            copy: Callable[[Path], Path]) -> None:
    base = copy(golden.full)
    before = (base / "vmstate").read_bytes()
    merge = stub.MergeSnapshots
    err = rpc_error(merge, pb.MergeSnapshotsRequest(base_dir=str(base), diff_dir=str(golden.diff)))
    second_id = snapshots.read(str(golden.second)).state.snapshot_id
    refusal(err, Code.INVALID_ARGUMENT, "diff_dir", f"applies to snapshot {second_id}, the base is "
            f"{snapshots.read(str(base)).state.snapshot_id}")
    err = rpc_error(merge, pb.MergeSnapshotsRequest(base_dir=str(base), diff_dir=str(golden.second)))
    refusal(err, Code.INVALID_ARGUMENT, "diff_dir", "is a full snapshot, not a diff")
    err = rpc_error(merge, pb.MergeSnapshotsRequest(base_dir=str(golden.diff),
                                                    diff_dir=str(golden.diff)))
    refusal(err, Code.INVALID_ARGUMENT, "base_dir", "is a diff snapshot")
    err = rpc_error(merge, pb.MergeSnapshotsRequest(base_dir="rel", diff_dir=str(golden.diff)))
    refusal(err, Code.INVALID_ARGUMENT, "base_dir", "'rel' is not an absolute path")
    err = rpc_error(merge, pb.MergeSnapshotsRequest(base_dir=str(base), diff_dir="/nonexistent"))
    refusal(err, Code.INVALID_ARGUMENT, "diff_dir", "/nonexistent is not a directory")
    assert (base / "vmstate").read_bytes() == before
    assert files(base) == [".vmmd-snapshot", "memory", "vmstate"]
