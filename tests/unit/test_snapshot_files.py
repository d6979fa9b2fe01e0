"""The snapshot files on their own (vmmd/vm/snapshot/: format.py, files.py, merge.py), no KVM: the state
file's frame, the memory file's header, validated reads, atomic writes, and
merging a diff onto its base.  Snapshots are written by snapshots.write() from a
hand-made SnapshotState and a write_ram callback that writes known pages."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.errors import DataLossError, InvalidSpecError, ResourceExhaustedError
from vmmd.vm import snapshot as snapshots
from vmmd.vm.snapshot import files as snapshot_files

PAGE = snapshots.PAGE
PAGES = 16  # guest RAM of the test snapshots: two regions of 8 pages
REGIONS = ((0, 8 * PAGE), (0x100000, 8 * PAGE))
BASE_PAGES = {0: 0x11, 1: 0x22, 2: 0x33, 7: 0x77, 8: 0x88, 15: 0xFF}  # page -> fill; others zero
DIFF_PAGES = {1: 0xD1, 4: 0xD4, 9: 0xD9, 15: 0xDF}                      # dirty pages of the diff


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE


def make_state(kind: int = snapshots.FULL, parent: str = "") -> spb.SnapshotState:
    return spb.SnapshotState(
        format_version=snapshots.FORMAT_VERSION, snapshot_id=snapshots.new_id(), parent_id=parent,
        kind=kind, created_unix_ns=123,
        spec=spb.VmSpec(vm_id="v", kernel_path="/k", cmdline="mg=tick", vcpus=1, memory_mib=1),
        memory=[spb.MemoryRegion(guest_address=a, size=s) for a, s in REGIONS],
        vcpus=[spb.VcpuState(regs=b"r" * 144, mp_state=0)],
        legacy=spb.LegacyDevices(console_head=42))


def full_writer(pages: dict[int, int]) -> Callable[[int], tuple[int, bytes]]:
    """write_ram of a full snapshot: the given pages at their place, zero pages left as holes."""
    def write_ram(fd: int) -> tuple[int, bytes]:
        for n, fill in pages.items():
            os.pwrite(fd, page(fill), snapshots.MEMORY_OFFSET + n * PAGE)
        return len(pages) * PAGE, b""
    return write_ram


def diff_writer(pages: dict[int, int], bitmap_len: int = PAGES // 8) -> Callable[[int], tuple[int, bytes]]:
    """write_ram of a diff: the dirty pages packed in page order, and their bitmap."""
    def write_ram(fd: int) -> tuple[int, bytes]:
        bitmap = bytearray(bitmap_len)
        for i, n in enumerate(sorted(pages)):
            os.pwrite(fd, page(pages[n]), snapshots.MEMORY_OFFSET + i * PAGE)
            bitmap[n // 8] |= 1 << (n % 8)
        return len(pages) * PAGE, bytes(bitmap)
    return write_ram


def write(d: Path, state: spb.SnapshotState,
          write_ram: Callable[[int], tuple[int, bytes]]) -> tuple[int, int]:
    """snapshots.write() into d as the daemon does it: the directory opened and locked."""
    with snapshots.writing(str(d)) as target:
        return snapshots.write(target, state, write_ram)


def write_full(d: Path, pages: dict[int, int] = BASE_PAGES) -> spb.SnapshotState:
    state = make_state()
    write(d, state, full_writer(pages))
    return state


def write_diff(d: Path, parent: str, pages: dict[int, int] = DIFF_PAGES,
               bitmap_len: int = PAGES // 8) -> spb.SnapshotState:
    state = make_state(snapshots.DIFF, parent)
    write(d, state, diff_writer(pages, bitmap_len))
    return state


def ram(d: Path) -> bytes:
    """The guest RAM a full snapshot's memory file holds."""
    return (d / snapshots.MEMORY_FILE).read_bytes()[snapshots.MEMORY_OFFSET:]


def expected_ram(*layers: dict[int, int]) -> bytes:
    pages = [0] * PAGES
    for layer in layers:
        for n, fill in layer.items():
            pages[n] = fill
    return b"".join(page(f) for f in pages)


def truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def refused(exc: type[Exception], says: str, d: Path) -> Exception:
    with pytest.raises(exc) as info:
        snapshots.read(str(d))
    assert says in str(info.value)
    return info.value


def files(d: Path) -> list[str]:
    """What d holds besides the marker every snapshot directory has."""
    names = os.listdir(d)
    assert snapshots.MARKER_FILE in names
    return sorted(n for n in names if n != snapshots.MARKER_FILE)


@pytest.fixture()
def snap(tmp_path: Path) -> tuple[Path, spb.SnapshotState]:
    d = tmp_path / "snap"
    return d, write_full(d)


# ---- round trip ----
def test_full_round_trip(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, state = snap
    s = snapshots.read(str(d))
    assert s.state == state
    assert (s.directory, s.memory_path, s.ram_bytes) == (d, d / "memory", PAGES * PAGE)
    assert ram(d) == expected_ram(BASE_PAGES)
    assert files(d) == ["memory", "vmstate"]
    head = (d / "vmstate").read_bytes()[:snapshots.STATE_HEADER.size]
    magic, version, length, _ = snapshots.STATE_HEADER.unpack(head)
    assert (magic, version) == (b"VMMDSNAP", 1)
    assert length == (d / "vmstate").stat().st_size - snapshots.STATE_HEADER.size


def test_diff_round_trip(snap: tuple[Path, spb.SnapshotState], tmp_path: Path) -> None:
    base = snap[1]
    diff = write_diff(tmp_path / "diff", base.snapshot_id)
    s = snapshots.read(str(tmp_path / "diff"))
    assert s.state == diff
    assert s.state.dirty_bitmap == bytes([0b0001_0010, 0b1000_0010])  # pages 1, 4 / 9, 15
    assert ram(tmp_path / "diff") == b"".join(page(DIFF_PAGES[n]) for n in sorted(DIFF_PAGES))


# ---- the state file ----
@pytest.mark.parametrize("cut", [0, 7, snapshots.STATE_HEADER.size - 1, snapshots.STATE_HEADER.size,
                                 snapshots.STATE_HEADER.size + 10, -1])
def test_truncated_state_is_data_loss(snap: tuple[Path, spb.SnapshotState], cut: int) -> None:
    d, _ = snap
    path = d / "vmstate"
    truncate(path, cut if cut >= 0 else path.stat().st_size + cut)
    refused(DataLossError, "truncated", d)


def test_trailing_data_in_state_is_data_loss(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    with open(d / "vmstate", "ab") as f:
        f.write(b"\0")
    refused(DataLossError, "trailing data", d)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_payload_byte_is_checksum_mismatch(snap: tuple[Path, spb.SnapshotState],
                                                   where: str) -> None:
    d, _ = snap
    path = d / "vmstate"
    first, last = snapshots.STATE_HEADER.size, path.stat().st_size - 1
    flip(path, {"first": first, "middle": (first + last) // 2, "last": last}[where])
    refused(DataLossError, "checksum mismatch", d)


def test_flipped_checksum_byte_is_checksum_mismatch(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    flip(d / "vmstate", snapshots.STATE_HEADER.size - 1)  # last byte of the sha256
    refused(DataLossError, "checksum mismatch", d)


def test_flipped_magic_is_data_loss(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    flip(d / "vmstate", 3)
    refused(DataLossError, "bad magic", d)


def test_huge_length_is_data_loss(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    with open(d / "vmstate", "r+b") as f:
        f.seek(12)
        f.write(struct.pack("<Q", 1 << 40))
    refused(DataLossError, "header claims", d)


def test_other_format_version_is_invalid_argument(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    with open(d / "vmstate", "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 7))
    e = refused(InvalidSpecError, "format version 7", d)
    assert e.field == "snapshot_dir"  # type: ignore[attr-defined]
    assert "reads version 1" in str(e)


def test_payload_version_must_match_the_frame(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    state = make_state()
    state.format_version = 2
    write(d, state, full_writer({}))
    refused(DataLossError, "state says format 2", d)


@pytest.mark.parametrize(("change", "says"), [
    (lambda s: setattr(s, "kind", spb.SNAPSHOT_KIND_UNSPECIFIED), "unknown snapshot kind"),
    (lambda s: setattr(s, "snapshot_id", "ABC"), "bad snapshot id"),
])
def test_checksummed_but_bad_state_is_data_loss(snap: tuple[Path, spb.SnapshotState],
                                                change: Callable[[spb.SnapshotState], None],
                                                says: str) -> None:
    d, state = snap
    change(state)
    (d / "vmstate").write_bytes(snapshots.frame(state))  # a valid frame around a bad state
    refused(DataLossError, says, d)


def test_diff_bitmap_of_wrong_length_is_data_loss(snap: tuple[Path, spb.SnapshotState],
                                                  tmp_path: Path) -> None:
    write_diff(tmp_path / "diff", snap[1].snapshot_id, {1: 0xD1}, bitmap_len=1)
    refused(DataLossError, "dirty bitmap of 1 bytes for 16 pages", tmp_path / "diff")


# ---- the memory file ----
def test_truncated_memory_is_data_loss(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    size = (d / "memory").stat().st_size
    truncate(d / "memory", size - PAGE)
    refused(DataLossError, "truncated", d)
    truncate(d / "memory", snapshots.MEMORY_HEADER.size - 1)  # not even a header
    refused(DataLossError, "truncated (no complete header)", d)


def test_too_long_memory_is_data_loss(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    truncate(d / "memory", (d / "memory").stat().st_size + PAGE)
    refused(DataLossError, "too long", d)


def test_diff_memory_must_hold_exactly_the_dirty_pages(snap: tuple[Path, spb.SnapshotState],
                                                       tmp_path: Path) -> None:
    d = tmp_path / "diff"
    write_diff(d, snap[1].snapshot_id)
    truncate(d / "memory", snapshots.MEMORY_OFFSET + (len(DIFF_PAGES) - 1) * PAGE)
    refused(DataLossError, "truncated", d)


def test_memory_of_another_snapshot_is_data_loss(snap: tuple[Path, spb.SnapshotState],
                                                 tmp_path: Path) -> None:
    """What a crash between the two renames would leave: the new memory, the old state."""
    d, state = snap
    other = write_full(tmp_path / "other")
    (d / "memory").write_bytes((tmp_path / "other" / "memory").read_bytes())
    e = refused(DataLossError, "belongs to another snapshot", d)
    assert other.snapshot_id in str(e) and state.snapshot_id in str(e)


def test_memory_naming_another_ram_size_is_data_loss(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, state = snap
    with open(d / "memory", "r+b") as f:
        f.write(snapshots.memory_header(state.snapshot_id, snapshots.FULL, 2 * PAGES * PAGE))
    refused(DataLossError, f"holds {2 * PAGES * PAGE} bytes of RAM, the state names "
            f"{PAGES * PAGE}", d)


def test_memory_with_bad_magic_is_data_loss(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    flip(d / "memory", 0)
    refused(DataLossError, "not a vmmd memory file", d)


def test_missing_memory_is_data_loss(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    (d / "memory").unlink()
    refused(DataLossError, "has no memory file", d)


# ---- the directory ----
def test_missing_state_is_invalid_argument(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    (d / "vmstate").unlink()
    e = refused(InvalidSpecError, "vmstate is missing", d)
    assert e.field == "snapshot_dir"  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["", "snap", "./snap", "../x"])
def test_relative_path_is_invalid_argument(path: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        snapshots.read(path)
    assert info.value.field == "snapshot_dir"
    assert "is not an absolute path" in info.value.problem
    with pytest.raises(InvalidSpecError) as info, snapshots.writing(path):
        pass
    assert info.value.field == "snapshot_dir"


def test_not_a_directory_is_invalid_argument(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    for path in (tmp_path / "f", tmp_path / "missing"):
        with pytest.raises(InvalidSpecError) as info:
            snapshots.read(str(path))
        assert (info.value.field, info.value.problem) == ("snapshot_dir",
                                                          f"{path} is not a directory")


def test_snapshot_dir_is_made_only_under_an_existing_parent(tmp_path: Path) -> None:
    with snapshots.writing(str(tmp_path / "new")) as d:
        assert d.path == tmp_path / "new"
    assert (tmp_path / "new").is_dir()
    with pytest.raises(InvalidSpecError) as info, snapshots.writing(str(tmp_path / "no" / "such")):
        pass
    assert info.value.field == "snapshot_dir" and "No such file" in info.value.problem
    assert not (tmp_path / "no").exists()


# ---- atomic writes ----
@pytest.mark.parametrize("after_pages", [0, 3])
def test_failed_write_leaves_the_previous_snapshot(snap: tuple[Path, spb.SnapshotState],
                                                   after_pages: int) -> None:
    d, old = snap

    def failing(fd: int) -> tuple[int, bytes]:
        full_writer({n: 0xEE for n in range(after_pages)})(fd)
        raise OSError(28, "No space left on device")

    new = make_state()
    with pytest.raises(ResourceExhaustedError, match="no space left for the snapshot"):
        write(d, new, failing)
    assert files(d) == ["memory", "vmstate"]  # no temp files left
    s = snapshots.read(str(d))
    assert s.state == old
    assert ram(d) == expected_ram(BASE_PAGES)


def test_write_replaces_a_snapshot_with_new_files(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    with open(d / "memory", "rb") as held:
        new = make_state()
        write(d, new, full_writer({3: 0x44}))
        assert snapshots.read(str(d)).state == new
        assert ram(d) == expected_ram({3: 0x44})
        assert os.fstat(held.fileno()).st_ino != (d / "memory").stat().st_ino
        held.seek(snapshots.MEMORY_OFFSET)
        assert held.read() == expected_ram(BASE_PAGES)  # a VM mapping the old file keeps it
    assert files(d) == ["memory", "vmstate"]


def test_full_memory_file_is_sparse(tmp_path: Path) -> None:
    d = tmp_path / "big"
    d.mkdir()
    state = make_state()
    state.ClearField("memory")
    state.memory.append(spb.MemoryRegion(guest_address=0, size=64 << 20))
    write(d, state, full_writer({0: 1}))
    st = (d / "memory").stat()
    assert st.st_size == snapshots.MEMORY_OFFSET + (64 << 20)
    assert st.st_blocks * 512 < 1 << 20  # holes, not 64 MiB of zeros
    assert snapshots.read(str(d)).ram_bytes == 64 << 20


# ---- merge ----
@pytest.fixture()
def chain(snap: tuple[Path, spb.SnapshotState],
          tmp_path: Path) -> tuple[Path, spb.SnapshotState, Path, spb.SnapshotState]:
    base_dir, base = snap
    diff_dir = tmp_path / "diff"
    return base_dir, base, diff_dir, write_diff(diff_dir, base.snapshot_id)


def test_merge_overwrites_the_base_pages_with_the_diffs(chain) -> None:  # type: ignore[no-untyped-def]
    base_dir, _, diff_dir, diff = chain
    merged, applied = snapshots.merge(str(base_dir), str(diff_dir))
    assert applied == len(DIFF_PAGES)
    assert ram(base_dir) == expected_ram(BASE_PAGES, DIFF_PAGES)
    st = merged.state
    assert (st.snapshot_id, st.kind, st.parent_id, st.dirty_bitmap) == \
        (diff.snapshot_id, snapshots.FULL, "", b"")
    assert snapshots.read(str(base_dir)).state == st
    expect = spb.SnapshotState()
    expect.CopyFrom(diff)
    expect.kind, expect.parent_id = snapshots.FULL, ""
    expect.ClearField("dirty_bitmap")
    assert st == expect  # everything else is the diff's state
    assert files(base_dir) == ["memory", "vmstate"]
    assert snapshots.read(str(diff_dir)).state == diff  # the diff is left as it was


def test_merge_writes_new_files(chain) -> None:  # type: ignore[no-untyped-def]
    base_dir, _, diff_dir, _ = chain
    with open(base_dir / "memory", "rb") as mem, open(base_dir / "vmstate", "rb") as st:
        before = st.read()
        snapshots.merge(str(base_dir), str(diff_dir))
        mem.seek(snapshots.MEMORY_OFFSET)
        assert mem.read() == expected_ram(BASE_PAGES)
        st.seek(0)
        assert st.read() == before
        assert os.fstat(mem.fileno()).st_ino != (base_dir / "memory").stat().st_ino


def test_merged_snapshot_takes_the_next_diff(chain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base_dir, _, diff_dir, diff = chain
    snapshots.merge(str(base_dir), str(diff_dir))
    second = {0: 0xE0, 9: 0xE9}
    write_diff(tmp_path / "diff2", diff.snapshot_id, second)
    _, applied = snapshots.merge(str(base_dir), str(tmp_path / "diff2"))
    assert applied == 2
    assert ram(base_dir) == expected_ram(BASE_PAGES, DIFF_PAGES, second)


def test_merge_refuses_a_diff_of_another_snapshot(chain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base_dir, base, _, _ = chain
    other = write_full(tmp_path / "other")
    stranger = write_diff(tmp_path / "stranger", other.snapshot_id)
    with pytest.raises(InvalidSpecError) as info:
        snapshots.merge(str(base_dir), str(tmp_path / "stranger"))
    assert info.value.field == "diff_dir"
    assert f"applies to snapshot {stranger.parent_id}, the base is {base.snapshot_id}" in \
        info.value.problem
    assert snapshots.read(str(base_dir)).state == base and ram(base_dir) == expected_ram(BASE_PAGES)
    assert files(base_dir) == ["memory", "vmstate"]


def test_merge_refuses_a_full_as_diff_and_a_diff_as_base(chain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base_dir, base, diff_dir, diff = chain
    write_full(tmp_path / "full2")
    with pytest.raises(InvalidSpecError) as info:
        snapshots.merge(str(base_dir), str(tmp_path / "full2"))
    assert info.value.field == "diff_dir" and "is a full snapshot, not a diff" in info.value.problem
    with pytest.raises(InvalidSpecError) as info:
        snapshots.merge(str(diff_dir), str(diff_dir))
    assert info.value.field == "base_dir" and "is a diff snapshot" in info.value.problem
    assert snapshots.read(str(base_dir)).state == base
    assert snapshots.read(str(diff_dir)).state == diff


def test_merge_refuses_a_damaged_diff(chain) -> None:  # type: ignore[no-untyped-def]
    base_dir, base, diff_dir, _ = chain
    truncate(diff_dir / "memory", snapshots.MEMORY_OFFSET + PAGE)
    with pytest.raises(DataLossError, match="truncated"):
        snapshots.merge(str(base_dir), str(diff_dir))
    assert snapshots.read(str(base_dir)).state == base and ram(base_dir) == expected_ram(BASE_PAGES)


def test_merge_refuses_another_memory_layout(snap: tuple[Path, spb.SnapshotState],
                                             tmp_path: Path) -> None:
    base_dir, base = snap
    d = tmp_path / "diff"
    d.mkdir()
    state = make_state(snapshots.DIFF, base.snapshot_id)
    state.memory[1].guest_address = 0x200000
    write(d, state, diff_writer({1: 1}))
    with pytest.raises(DataLossError, match="memory layout differs"):
        snapshots.merge(str(base_dir), str(d))


def test_merge_refuses_a_bitmap_marking_pages_beyond_ram(tmp_path: Path) -> None:
    """RAM of 12 pages: the bitmap's 2 bytes have 4 bits that name no page."""
    def twelve(state: spb.SnapshotState) -> spb.SnapshotState:
        state.ClearField("memory")
        state.memory.append(spb.MemoryRegion(guest_address=0, size=12 * PAGE))
        return state

    base_dir, diff_dir = tmp_path / "base", tmp_path / "diff"
    base_dir.mkdir()
    diff_dir.mkdir()
    base = twelve(make_state())
    write(base_dir, base, full_writer({0: 1}))
    write(diff_dir, twelve(make_state(snapshots.DIFF, base.snapshot_id)),
                  diff_writer({13: 0xEE}))
    refused(DataLossError, "dirty bitmap marks pages beyond the 12 pages of RAM", diff_dir)
    with pytest.raises(DataLossError):
        snapshots.merge(str(base_dir), str(diff_dir))
    assert snapshots.read(str(base_dir)).state == base  # the base is left whole


@pytest.mark.parametrize("which", ["base_dir", "diff_dir"])
def test_merge_names_the_unreadable_directory(chain, which: str) -> None:  # type: ignore[no-untyped-def]
    base_dir, _, diff_dir, _ = chain
    ((base_dir if which == "base_dir" else diff_dir) / "vmstate").unlink()
    with pytest.raises(InvalidSpecError) as info:
        snapshots.merge(str(base_dir), str(diff_dir))
    assert info.value.field == which and "vmstate is missing" in info.value.problem
    with pytest.raises(InvalidSpecError) as info:
        snapshots.merge(*(("rel", str(diff_dir)) if which == "base_dir" else (str(base_dir), "rel")))
    assert info.value.field == which and "is not an absolute path" in info.value.problem


# ---- hostile directories and files (found: each hung, crashed or wrote elsewhere) ----
def _bounded(fn: Callable[[], object], seconds: float = 10.0) -> object:
    """fn() in a thread; a call that blocks (a FIFO read) fails the test instead of hanging it."""
    import threading
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(_outcome(fn)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for {seconds} s"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _outcome(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - handed back to the test thread
        return e


@pytest.mark.parametrize("name", ["memory", "vmstate"])
def test_a_fifo_in_a_snapshot_is_refused_at_once(snap: tuple[Path, spb.SnapshotState],
                                                 name: str) -> None:
    d, _ = snap
    (d / name).unlink()
    os.mkfifo(d / name)
    with pytest.raises(DataLossError, match=f"{name}: .*is a FIFO, not a regular file"):
        _bounded(lambda: snapshots.read(str(d)))


@pytest.mark.parametrize("name", ["memory", "vmstate"])
def test_a_directory_or_symlink_in_a_snapshot_is_refused(snap: tuple[Path, spb.SnapshotState],
                                                         tmp_path: Path, name: str) -> None:
    d, _ = snap
    target = tmp_path / "elsewhere"
    os.rename(d / name, target)
    (d / name).mkdir()
    with pytest.raises(DataLossError, match="is a directory, not a regular file"):
        snapshots.read(str(d))
    (d / name).rmdir()
    (d / name).symlink_to(target)  # the very file, behind a link: still refused
    with pytest.raises(DataLossError, match="is a symbolic link"):
        snapshots.read(str(d))


def test_planted_temp_links_are_never_written_through(snap: tuple[Path, spb.SnapshotState],
                                                      tmp_path: Path) -> None:
    """Found: a `.memory.tmp` symlink made SnapshotVm overwrite its target.  Temp files are made
    O_EXCL | O_NOFOLLOW under random names; links left with our temp names are removed."""
    d, _ = snap
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for name in (".memory.tmp", ".vmstate.tmp", ".memory.0123456789abcdef.tmp",
                 ".vmstate.fedcba9876543210.tmp"):
        (d / name).symlink_to(victim)
    state = make_state()
    write(d, state, full_writer({2: 0x42}))
    assert victim.read_bytes() == b"precious"
    assert snapshots.read(str(d)).state == state
    assert files(d) == [".memory.tmp", ".vmstate.tmp", "memory", "vmstate"]  # not ours: kept


def test_stale_temp_files_of_a_killed_writer_are_removed(snap: tuple[Path, spb.SnapshotState]
                                                         ) -> None:
    d, state = snap
    (d / ".memory.00112233445566aa.tmp").write_bytes(b"half")
    (d / ".vmstate.00112233445566aa.tmp").write_bytes(b"")
    assert snapshots.read(str(d)).state == state  # a reader ignores them
    write(d, make_state(), full_writer({}))
    assert files(d) == ["memory", "vmstate"]


@pytest.mark.parametrize("contents", [{"memory": b"mine", "vmstate": b"also mine"},
                                      {"notes.txt": b"x"}, {"vmstate": b"NOTVMMD!" + bytes(60)}])
def test_a_directory_of_other_files_is_refused(tmp_path: Path, contents: dict[str, bytes]) -> None:
    """Found: SnapshotVm overwrote unrelated files named memory/vmstate."""
    d = tmp_path / "theirs"
    d.mkdir()
    for name, data in contents.items():
        (d / name).write_bytes(data)
    with pytest.raises(InvalidSpecError) as info, snapshots.writing(str(d)):
        pass
    assert info.value.field == "snapshot_dir"
    assert "holds files vmmd did not write" in info.value.problem
    assert sorted(os.listdir(d)) == sorted(contents)  # untouched, no marker added
    assert all((d / n).read_bytes() == data for n, data in contents.items())


def test_a_snapshot_from_before_markers_is_still_ours(snap: tuple[Path, spb.SnapshotState]) -> None:
    d, _ = snap
    (d / snapshots.MARKER_FILE).unlink()
    state = make_state()
    write(d, state, full_writer({}))
    assert snapshots.read(str(d)).state == state and files(d) == ["memory", "vmstate"]


@pytest.mark.parametrize(("path", "says"), [
    ("/", "holds files vmmd did not write"),
    ("/proc", "is on procfs"),
    ("/sys/kernel", "is on sysfs"),
    ("/tmp/a\0b", "contains a NUL byte"),
])
def test_system_directories_are_refused(path: str, says: str) -> None:
    with pytest.raises(InvalidSpecError) as info, snapshots.writing(path):
        pass
    assert info.value.field == "snapshot_dir" and says in info.value.problem


def test_a_symlinked_snapshot_directory_is_refused(snap: tuple[Path, spb.SnapshotState],
                                                   tmp_path: Path) -> None:
    d, _ = snap
    (tmp_path / "link").symlink_to(d)
    for use in (lambda: snapshots.read(str(tmp_path / "link")),
                lambda: snapshots.writing(str(tmp_path / "link")).__enter__()):
        with pytest.raises(InvalidSpecError, match="is a symbolic link"):
            use()


def test_a_second_writer_is_refused_and_a_reader_waits(snap: tuple[Path, spb.SnapshotState]
                                                       ) -> None:
    """Found: two SnapshotVm into one directory tore it; a restore racing a snapshot saw a
    momentary mix (DATA_LOSS).  Now: one writer at a time, readers see a whole snapshot."""
    import threading
    import time

    from vmmd.errors import BusyError
    d, old = snap
    new = make_state()
    entered, go = threading.Event(), threading.Event()

    def slow_ram(fd: int) -> tuple[int, bytes]:
        entered.set()
        go.wait(10)
        return full_writer({5: 0x55})(fd)

    writer = threading.Thread(target=write, args=(d, new, slow_ram))
    writer.start()
    assert entered.wait(10)
    with pytest.raises(BusyError, match="being written into"):
        write(d, make_state(), full_writer({}))
    got: list[spb.SnapshotState] = []
    reader = threading.Thread(target=lambda: got.append(snapshots.read(str(d)).state))
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()  # waiting for the writer, not reading half of it
    go.set()
    writer.join(10)
    reader.join(10)
    assert got == [new] and old != new


def test_a_writer_killed_between_its_renames_leaves_the_old_snapshot(
        snap: tuple[Path, spb.SnapshotState]) -> None:
    """Found: SIGKILL between the memory and the state rename left new memory beside the old
    state (refused: the old snapshot was lost).  The old memory stays reachable until the
    state's rename (the commit point); readers use it, the next writer puts it back."""
    d, old = snap
    new = make_state()

    def killed_between_renames(target: snapshots.SnapshotDir, mem_tmp: str, state_tmp: str) -> None:
        os.link(snapshots.MEMORY_FILE, snapshots.PREV_MEMORY_FILE, src_dir_fd=target.fd,
                dst_dir_fd=target.fd)
        os.rename(mem_tmp, snapshots.MEMORY_FILE, src_dir_fd=target.fd, dst_dir_fd=target.fd)
        raise SystemExit("killed")  # the process dies here: no state rename, no cleanup

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snapshot_files, "commit", killed_between_renames)
        with pytest.raises(SystemExit):
            write(d, new, full_writer({4: 0x44}))
    s = snapshots.read(str(d))
    assert s.state == old and s.memory_path.name == snapshots.PREV_MEMORY_FILE
    with snapshots.opened(str(d)) as (_, fd):
        assert os.pread(fd, PAGE, snapshots.MEMORY_OFFSET + 0 * PAGE) == page(0x11)
    third = make_state()
    write(d, third, full_writer({5: 0x55}))  # the next writer repairs, then writes
    assert snapshots.read(str(d)).state == third and files(d) == ["memory", "vmstate"]


def test_a_stale_previous_memory_is_removed_by_the_next_writer(
        snap: tuple[Path, spb.SnapshotState]) -> None:
    d, state = snap
    os.link(d / "memory", d / snapshots.PREV_MEMORY_FILE)  # a crash after the state's rename
    assert snapshots.read(str(d)).state == state  # the current memory is used
    write(d, make_state(), full_writer({}))
    assert files(d) == ["memory", "vmstate"]
