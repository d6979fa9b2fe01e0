"""Merging a diff snapshot onto its base: the base directory becomes a full
snapshot of the diff's moment, written as new files (VMs restored from the
old ones keep them) under the base directory's exclusive lock."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator

from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.errors import DataLossError, InvalidSpecError
from vmmd.info import SnapshotInfo
from vmmd.vm.snapshot.files import (
    Snapshot,
    SnapshotDir,
    as_field,
    commit,
    full_disk,
    opened_in,
    read,
    reading,
    temp_file,
    writing,
)
from vmmd.vm.snapshot.format import (
    DIFF,
    FULL,
    MEMORY_FILE,
    MEMORY_OFFSET,
    PAGE,
    STATE_FILE,
    frame,
    memory_header,
)


def _data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[from, to) ranges of fd that may hold data (holes skipped where the
    file system tells them; where it cannot, everything is data)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole left
            yield pos, end
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def _copy(src: int, dst: int, start: int, end: int) -> None:
    for a, b in _data_ranges(src, start, end):
        while a < b:
            n = os.copy_file_range(src, dst, b - a, a, a)
            if n == 0:
                raise DataLossError("the base memory file ended early")
            a += n


def merge(base_path: str, diff_path: str) -> tuple[Snapshot, int]:
    """Apply a diff snapshot onto its base: the base directory becomes a full
    snapshot of the diff's moment (with the diff's id, so the next diff of
    the same VM merges onto it too).  New files replace the base's; VMs
    restored from the old ones keep them.  Returns the merged snapshot and
    the pages applied."""
    with writing(base_path, "base_dir", create=False) as bd, as_field("base_dir"), \
            opened_in(bd) as (base, bf):
        if base.state.kind != FULL:
            raise InvalidSpecError("base_dir", f"{base.directory} is a diff snapshot; merge "
                                   "onto a full one")
        if _same_dir(diff_path, bd.fd):  # before its lock: ours already excludes it
            raise InvalidSpecError("diff_dir", "names the base directory itself")
        with reading(diff_path, "diff_dir") as dd, as_field("diff_dir"), \
                opened_in(dd) as (diff, df):
            applied = _merge_into(bd, base, bf, diff, df)
    return read(base_path, "base_dir"), applied


def _same_dir(path: str, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except (OSError, ValueError):
        return False  # reading() says what is wrong with it


def _merge_into(d: SnapshotDir, base: Snapshot, bf: int, diff: Snapshot, df: int) -> int:
    if diff.state.kind != DIFF:
        raise InvalidSpecError("diff_dir", f"{diff.directory} is a full snapshot, not a diff")
    if diff.state.parent_id != base.state.snapshot_id:
        raise InvalidSpecError("diff_dir", f"{diff.directory} applies to snapshot "
                               f"{diff.state.parent_id}, the base is {base.state.snapshot_id}")
    if list(diff.state.memory) != list(base.state.memory):
        raise DataLossError(f"{diff.directory}: memory layout differs from its base")
    state = spb.SnapshotState()
    state.CopyFrom(diff.state)
    state.kind, state.parent_id = FULL, ""
    state.ClearField("dirty_bitmap")
    applied = 0
    with full_disk(d, "base_dir"), temp_file(d, MEMORY_FILE) as (out, mtmp), \
            temp_file(d, STATE_FILE) as (sfd, stmp):
        end = MEMORY_OFFSET + base.ram_bytes
        os.ftruncate(out, end)
        os.pwrite(out, memory_header(state.snapshot_id, FULL, base.ram_bytes), 0)
        _copy(bf, out, MEMORY_OFFSET, end)
        src = MEMORY_OFFSET
        for i, byte in enumerate(diff.state.dirty_bitmap):
            for bit in range(8):
                if byte >> bit & 1:
                    page = os.pread(df, PAGE, src)
                    os.pwrite(out, page, MEMORY_OFFSET + (i * 8 + bit) * PAGE)
                    src += PAGE
                    applied += 1
        data = frame(state)
        os.pwrite(sfd, data, 0)
        os.fsync(out)
        os.fsync(sfd)
        commit(d, mtmp, stmp)
    os.fsync(d.fd)
    return applied


def merge_snapshots(base_dir: str, diff_dir: str) -> SnapshotInfo:
    t0 = time.monotonic()
    merged, applied = merge(base_dir, diff_dir)
    st = merged.state
    return SnapshotInfo(st.spec.vm_id, str(merged.directory), st.snapshot_id, "", "full",
                        merged.ram_bytes, applied, merged.memory_file_bytes,
                        merged.state_file_bytes, time.monotonic() - t0)
