"""Snapshot files: the state file's frame, the memory file's header, atomic
writes, validated reads, and merging a diff onto its base.

A snapshot is a directory (proto/vmmd/v1/snapshot.proto tells the layout):
`vmstate` (magic, format version, payload length, sha256, then a
SnapshotState message) and `memory` (a 4096-byte header naming the
snapshot id, then guest RAM).  Files are written under temporary names,
fsynced, renamed into place, and the directory fsynced; the memory header's
id binds the two, so a crash between the renames leaves a snapshot that is
refused, never one that half-restores.  Nothing here rewrites a file in
place: VMs restored from a memory file map it, and must keep seeing it
unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmmd.api._gen.vmmd.v1 import snapshot_pb2 as spb
from vmmd.errors import DataLossError, InvalidSpecError

STATE_FILE, MEMORY_FILE = "vmstate", "memory"
FORMAT_VERSION = 1
STATE_MAGIC = b"VMMDSNAP"
STATE_HEADER = struct.Struct("<8sIQ32s")   # magic, version, payload length, sha256
MEMORY_MAGIC = b"VMMDMEM1"
MEMORY_HEADER = struct.Struct("<8sI16sIQ")  # magic, version, snapshot id, kind, RAM bytes
MEMORY_OFFSET = 4096                        # RAM starts here (mmap needs page alignment)
PAGE = 4096
MAX_STATE_BYTES = 64 << 20                  # far above any real state; bounds a hostile file
FULL, DIFF = spb.SNAPSHOT_KIND_FULL, spb.SNAPSHOT_KIND_DIFF


def new_id() -> str:
    return uuid.uuid4().hex


# ---- writing ----
def frame(state: spb.SnapshotState) -> bytes:
    payload = state.SerializeToString()
    return STATE_HEADER.pack(STATE_MAGIC, FORMAT_VERSION, len(payload),
                             hashlib.sha256(payload).digest()) + payload


def memory_header(snapshot_id: str, kind: int, ram_bytes: int) -> bytes:
    head = MEMORY_HEADER.pack(MEMORY_MAGIC, FORMAT_VERSION, bytes.fromhex(snapshot_id), kind,
                              ram_bytes)
    return head.ljust(MEMORY_OFFSET, b"\0")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _temp(directory: Path, name: str) -> Iterator[int]:
    """An fd on directory/.name.tmp; removed again unless renamed by the caller."""
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        yield fd
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)


def snapshot_dir(path: str) -> Path:
    """The directory to write a snapshot into (made if missing, its parent must exist)."""
    if not path or not os.path.isabs(path):
        raise InvalidSpecError("snapshot_dir", f"{path!r} is not an absolute path")
    d = Path(path)
    try:
        d.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise InvalidSpecError("snapshot_dir", f"cannot make {d}: {e.strerror}") from None
    if not d.is_dir():
        raise InvalidSpecError("snapshot_dir", f"{d} is not a directory")
    return d


def write(directory: Path, state: spb.SnapshotState,
          write_ram: Callable[[int], tuple[int, bytes]]) -> tuple[int, int]:
    """Write the snapshot atomically.  write_ram(fd) puts guest RAM into the
    memory file from MEMORY_OFFSET on (the header is written here) and
    returns (bytes written, dirty bitmap); the bitmap goes into the state.
    Returns the sizes of the memory and state files."""
    ram_bytes = sum(r.size for r in state.memory)
    with _temp(directory, MEMORY_FILE) as mfd, _temp(directory, STATE_FILE) as sfd:
        os.pwrite(mfd, memory_header(state.snapshot_id, state.kind, ram_bytes), 0)
        if state.kind == FULL:
            os.ftruncate(mfd, MEMORY_OFFSET + ram_bytes)  # holes for zero pages
        _, bitmap = write_ram(mfd)
        if state.kind == DIFF:
            state.dirty_bitmap = bitmap
        data = frame(state)
        os.pwrite(sfd, data, 0)
        os.fsync(mfd)
        os.fsync(sfd)
        mem_size = os.fstat(mfd).st_size
        # memory first: a crash before the state rename leaves the old state,
        # whose id the new memory header does not carry - refused, not mixed.
        os.rename(directory / f".{MEMORY_FILE}.tmp", directory / MEMORY_FILE)
        os.rename(directory / f".{STATE_FILE}.tmp", directory / STATE_FILE)
    _fsync_dir(directory)
    return mem_size, len(data)


# ---- reading ----
@dataclass(frozen=True)
class Snapshot:
    directory: Path
    state: spb.SnapshotState
    memory_path: Path
    ram_bytes: int
    # What restore derives from the state (checked, converted), kept with it so
    # that the next restore of this snapshot does not derive it again.
    prepared: dict[str, object] = field(default_factory=dict, compare=False)


# Checked snapshots by directory, valid while both files are the very same
# (inode, size, times): a serverless daemon restores one snapshot over and
# over, and need not read, hash and parse it every time.
_CACHE: dict[Path, tuple[tuple[int, ...], Snapshot]] = {}
_CACHE_MAX = 64


def _identity(d: Path) -> tuple[int, ...] | None:
    try:
        a, b = os.stat(d / STATE_FILE), os.stat(d / MEMORY_FILE)
    except OSError:
        return None
    return tuple(x for st in (a, b) for x in (st.st_dev, st.st_ino, st.st_size,
                                              st.st_mtime_ns, st.st_ctime_ns))


def _read_state(path: Path) -> spb.SnapshotState:
    try:
        with open(path, "rb") as f:
            head = f.read(STATE_HEADER.size)
            if len(head) < STATE_HEADER.size:
                raise DataLossError(f"{path}: truncated ({len(head)} bytes, no complete header)")
            magic, version, length, digest = STATE_HEADER.unpack(head)
            if magic != STATE_MAGIC:
                raise DataLossError(f"{path}: not a vmmd snapshot state file (bad magic)")
            if version != FORMAT_VERSION:
                raise InvalidSpecError("snapshot_dir", f"{path} has snapshot format version "
                                       f"{version}; this vmmd reads version {FORMAT_VERSION}")
            if length > MAX_STATE_BYTES:
                raise DataLossError(f"{path}: header claims {length} bytes of state")
            payload = f.read(length + 1)
    except FileNotFoundError:
        raise InvalidSpecError("snapshot_dir", f"no snapshot in {path.parent} "
                               f"({path.name} is missing)") from None
    if len(payload) != length:
        raise DataLossError(f"{path}: {'truncated' if len(payload) < length else 'trailing data'}"
                            f" ({len(payload)} bytes of state, the header says {length})")
    if hashlib.sha256(payload).digest() != digest:
        raise DataLossError(f"{path}: checksum mismatch (the state was altered or damaged)")
    state = spb.SnapshotState()
    try:
        state.ParseFromString(payload)
    except Exception as e:  # noqa: BLE001 - a checksummed payload that does not parse
        raise DataLossError(f"{path}: state does not parse: {e}") from None
    if state.format_version != FORMAT_VERSION:
        raise DataLossError(f"{path}: state says format {state.format_version}, frame "
                            f"{FORMAT_VERSION}")
    return state


def _check_memory(path: Path, state: spb.SnapshotState, ram_bytes: int) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(MEMORY_HEADER.size)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataLossError(f"{path} is missing: the snapshot has no memory file") from None
    if len(head) < MEMORY_HEADER.size:
        raise DataLossError(f"{path}: truncated (no complete header)")
    magic, version, sid, kind, ram = MEMORY_HEADER.unpack(head)
    if magic != MEMORY_MAGIC or version != FORMAT_VERSION:
        raise DataLossError(f"{path}: not a vmmd memory file of format {FORMAT_VERSION}")
    if sid.hex() != state.snapshot_id or kind != state.kind:
        raise DataLossError(f"{path} belongs to another snapshot ({sid.hex()}, the state is "
                            f"{state.snapshot_id}): the snapshot was not written completely")
    if ram != ram_bytes:
        raise DataLossError(f"{path}: holds {ram} bytes of RAM, the state names {ram_bytes}")
    want = MEMORY_OFFSET + (ram_bytes if kind == FULL else
                            PAGE * sum(b.bit_count() for b in state.dirty_bitmap))
    if size != want:
        raise DataLossError(f"{path} is {size} bytes, the state needs {want} "
                            f"({'truncated' if size < want else 'too long'})")


def read(path: str) -> Snapshot:
    """A snapshot directory, checked: the state's frame and checksum, its
    kind, the memory regions, and the memory file against the state."""
    if not path or not os.path.isabs(path):
        raise InvalidSpecError("snapshot_dir", f"{path!r} is not an absolute path")
    d = Path(path)
    if not d.is_dir():
        raise InvalidSpecError("snapshot_dir", f"{d} is not a directory")
    key = _identity(d)
    hit = _CACHE.get(d)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    snap = _read_checked(d)
    if key is not None and key == _identity(d):  # unchanged while we read it
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[d] = (key, snap)
    return snap


def _read_checked(d: Path) -> Snapshot:
    state = _read_state(d / STATE_FILE)
    if state.kind not in (FULL, DIFF):
        raise DataLossError(f"{d / STATE_FILE}: unknown snapshot kind {state.kind}")
    if len(state.snapshot_id) != 32 or not all(c in "0123456789abcdef" for c in state.snapshot_id):
        raise DataLossError(f"{d / STATE_FILE}: bad snapshot id {state.snapshot_id!r}")
    ram_bytes = sum(r.size for r in state.memory)
    pages = ram_bytes // PAGE
    if state.kind == DIFF and len(state.dirty_bitmap) != (pages + 7) // 8:
        raise DataLossError(f"{d / STATE_FILE}: dirty bitmap of {len(state.dirty_bitmap)} bytes "
                            f"for {pages} pages")
    if state.kind == DIFF and pages % 8 and state.dirty_bitmap[-1] >> (pages % 8):
        raise DataLossError(f"{d / STATE_FILE}: dirty bitmap marks pages beyond the {pages} "
                            "pages of RAM")
    _check_memory(d / MEMORY_FILE, state, ram_bytes)
    return Snapshot(d, state, d / MEMORY_FILE, ram_bytes)


# ---- merging a diff onto its base ----
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


def _read_as(path: str, field: str) -> Snapshot:
    """read(), an InvalidSpecError naming the merge request's field."""
    try:
        return read(path)
    except InvalidSpecError as e:
        raise InvalidSpecError(field, e.problem) from None


def merge(base_path: str, diff_path: str) -> tuple[Snapshot, int]:
    """Apply a diff snapshot onto its base: the base directory becomes a full
    snapshot of the diff's moment (with the diff's id, so the next diff of
    the same VM merges onto it too).  New files replace the base's; VMs
    restored from the old ones keep them.  Returns the merged snapshot and
    the pages applied."""
    base, diff = _read_as(base_path, "base_dir"), _read_as(diff_path, "diff_dir")
    if base.state.kind != FULL:
        raise InvalidSpecError("base_dir", f"{base.directory} is a diff snapshot; merge onto "
                               "a full one")
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
    d = base.directory
    with _temp(d, MEMORY_FILE) as out, _temp(d, STATE_FILE) as sfd, \
            open(base.memory_path, "rb") as bf, open(diff.memory_path, "rb") as df:
        end = MEMORY_OFFSET + base.ram_bytes
        os.ftruncate(out, end)
        os.pwrite(out, memory_header(state.snapshot_id, FULL, base.ram_bytes), 0)
        _copy(bf.fileno(), out, MEMORY_OFFSET, end)
        src = MEMORY_OFFSET
        for i, byte in enumerate(diff.state.dirty_bitmap):
            for bit in range(8):
                if byte >> bit & 1:
                    page = os.pread(df.fileno(), PAGE, src)
                    os.pwrite(out, page, MEMORY_OFFSET + (i * 8 + bit) * PAGE)
                    src += PAGE
                    applied += 1
        data = frame(state)
        os.pwrite(sfd, data, 0)
        os.fsync(out)
        os.fsync(sfd)
        os.rename(d / f".{MEMORY_FILE}.tmp", d / MEMORY_FILE)
        os.rename(d / f".{STATE_FILE}.tmp", d / STATE_FILE)
    _fsync_dir(d)
    return read(str(d)), applied
