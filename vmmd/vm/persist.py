"""Snapshot files: the directory, the state file's frame, the memory file's
header, atomic writes, validated reads, and merging a diff onto its base.

A snapshot is a directory (proto/vmmd/v1/snapshot.proto tells the layout):
`vmstate` (magic, format version, payload length, sha256, then a
SnapshotState message), `memory` (a 4096-byte header naming the snapshot
id, then guest RAM) and the marker `.vmmd-snapshot`.  The directory is a
client's path, so it is handled as hostile:

- it is opened once (O_DIRECTORY | O_NOFOLLOW) and everything in it is
  reached relative to that fd, never following a symlink;
- vmmd writes only into a directory that is new, empty, or already a vmmd
  snapshot (its marker, or a `vmstate` of ours from before markers);
- writers hold an exclusive flock on the directory, readers a shared one:
  a second writer is refused (BusyError: ABORTED), a reader waits a
  bounded time for a writer and then sees one whole snapshot;
- files are created O_CREAT | O_EXCL | O_NOFOLLOW under random temporary
  names, fsynced, renamed into place, and the directory fsynced; stale
  temporary files of a killed writer are removed by the next writer;
- files are opened O_NONBLOCK and must be regular (vm/hostfiles.py): a FIFO
  planted as `memory` is refused, never waited on.

The memory header's id binds the two files, so a crash between the renames
leaves a snapshot that is refused, never one that half-restores.  Nothing
here rewrites a file in place: VMs restored from a memory file map it, and
must keep seeing it unchanged.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.errors import (
    BusyError,
    DataLossError,
    InvalidSpecError,
    NativeError,
    ResourceExhaustedError,
    shown,
)
from vmmd.vm.hostfiles import PSEUDO_FILESYSTEMS, check_path, fs_type, kind_of, open_file

STATE_FILE, MEMORY_FILE = "vmstate", "memory"
PREV_MEMORY_FILE = ".memory.prev"  # the old memory while a new snapshot is put in place
MARKER_FILE = ".vmmd-snapshot"
MARKER_TEXT = b"vmmd snapshot directory: vmstate and memory are written by vmmd\n"
FORMAT_VERSION = 1
STATE_MAGIC = b"VMMDSNAP"
STATE_HEADER = struct.Struct("<8sIQ32s")   # magic, version, payload length, sha256
MEMORY_MAGIC = b"VMMDMEM1"
MEMORY_HEADER = struct.Struct("<8sI16sIQ")  # magic, version, snapshot id, kind, RAM bytes
MEMORY_OFFSET = 4096                        # RAM starts here (mmap needs page alignment)
PAGE = 4096
MAX_STATE_BYTES = 64 << 20                  # far above any real state; bounds a hostile file
FULL, DIFF = spb.SNAPSHOT_KIND_FULL, spb.SNAPSHOT_KIND_DIFF
# Bounded waits for a directory's lock: a reader waits out a writer (seconds
# for gigabytes of RAM); a writer waits only for readers and other daemons
# (a writer of this daemon refuses at once).
READ_WAIT_S, WRITE_WAIT_S, LOCK_POLL_S = 60.0, 5.0, 0.005
_TEMP_RE = re.compile(r"\.(vmstate|memory)\.[0-9a-f]{16}\.tmp")


def new_id() -> str:
    return uuid.uuid4().hex


# ---- the directory ----
@dataclass(frozen=True)
class SnapshotDir:
    """A snapshot directory open as `fd` (and locked) while in use."""

    path: Path
    fd: int


def _dir_error(problem: str, field: str = "snapshot_dir") -> InvalidSpecError:
    return InvalidSpecError(field, problem)


def _open_dir(path: str, field: str, *, create: bool) -> int:
    if not os.path.isabs(path):
        raise _dir_error(f"{shown(path)!r} is not an absolute path", field)
    check_path(path, lambda problem: _dir_error(problem, field))
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise _dir_error(f"cannot make {shown(path)}: {e.strerror}", field) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and os.path.islink(path)):
            raise _dir_error(f"{shown(path)} is a symbolic link; name the directory itself",
                             field) from None
        raise _dir_error(f"{shown(path)} is not a directory"
                         + ("" if e.errno in (errno.ENOENT, errno.ENOTDIR) else
                            f" vmmd can open: {e.strerror}"), field) from None
    pseudo = PSEUDO_FILESYSTEMS.get(fs_type(fd))
    if pseudo:
        os.close(fd)
        raise _dir_error(f"{shown(path)} is on {pseudo}, a pseudo filesystem, not a place for "
                         "snapshots", field)
    return fd


# Directories this daemon is writing, by (device, inode): a second writer is
# refused at once instead of waiting for the first.
_writing: set[tuple[int, int]] = set()
_writing_lock = threading.Lock()


def _lock(fd: int, mode: int, wait_s: float, path: str, field: str) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise BusyError(f"{field}: {shown(path)} is busy: another snapshot or merge "
                                f"is writing it (waited {wait_s:g} s); try again") from None
            time.sleep(LOCK_POLL_S)


def _check_ours(d: SnapshotDir, field: str) -> list[str]:
    """The directory's entries; refused unless new, empty or a vmmd snapshot."""
    names = os.listdir(d.fd)
    if not names or MARKER_FILE in names:
        return names
    if STATE_FILE in names:  # a snapshot of ours from before the marker
        try:
            fd, _ = open_file(STATE_FILE, _dir_error, dir_fd=d.fd, nofollow=True)
        except InvalidSpecError:
            fd = -1
        if fd >= 0:
            with open(fd, "rb") as f:
                if f.read(len(STATE_MAGIC)) == STATE_MAGIC:
                    return names
    listed = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    raise _dir_error(f"{shown(d.path)} holds files vmmd did not write ({shown(listed)}): a "
                     "snapshot directory must be new, empty or a vmmd snapshot", field)


def _check_replaceable(d: SnapshotDir, name: str, field: str) -> None:
    """A snapshot file vmmd would replace must be one it could have written."""
    try:
        st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise _dir_error(f"{shown(d.path / name)} is {kind_of(st.st_mode)}, not a file vmmd "
                         "wrote: the directory is not a whole vmmd snapshot", field)


def _recover(d: SnapshotDir) -> None:
    """A writer was killed between its two renames: if the state is still the
    old one, its memory is PREV_MEMORY_FILE: put it back; else it is stale."""
    try:
        with _opened_in(d) as (snap, _):
            pass
        back = snap.memory_path.name == PREV_MEMORY_FILE
    except (DataLossError, InvalidSpecError):
        back = False
    if back:
        os.rename(PREV_MEMORY_FILE, MEMORY_FILE, src_dir_fd=d.fd, dst_dir_fd=d.fd)
    else:
        os.unlink(PREV_MEMORY_FILE, dir_fd=d.fd)
    os.fsync(d.fd)


@contextmanager
def writing(path: str, field: str = "snapshot_dir", *,
            create: bool = True) -> Iterator[SnapshotDir]:
    """The directory to write a snapshot into, exclusively locked (made if
    missing and `create`; its parent must exist).  Refused before anything is
    written."""
    fd = _open_dir(path, field, create=create)
    key = None
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with _writing_lock:
            if key in _writing:
                key = None
                raise BusyError(f"{field}: another snapshot or merge is being written into "
                                f"{shown(path)}; try again when it is done")
            _writing.add(key)
        _lock(fd, fcntl.LOCK_EX, WRITE_WAIT_S, path, field)
        d = SnapshotDir(Path(path), fd)
        names = _check_ours(d, field)
        for name in (MEMORY_FILE, STATE_FILE):  # what our renames would replace
            _check_replaceable(d, name, field)
        for name in names:  # what a killed writer left: ours, and nobody writes it now
            if _TEMP_RE.fullmatch(name):
                os.unlink(name, dir_fd=fd)
        if PREV_MEMORY_FILE in names:
            _recover(d)
        if MARKER_FILE not in names:
            mfd = os.open(MARKER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=fd)
            try:
                os.write(mfd, MARKER_TEXT)
            finally:
                os.close(mfd)
        yield d
    finally:
        if key is not None:
            with _writing_lock:
                _writing.discard(key)
        os.close(fd)


@contextmanager
def reading(path: str, field: str = "snapshot_dir") -> Iterator[SnapshotDir]:
    """The directory to read a snapshot from, share-locked: a writer's
    renames are never half seen."""
    fd = _open_dir(path, field, create=False)
    try:
        _lock(fd, fcntl.LOCK_SH, READ_WAIT_S, path, field)
        yield SnapshotDir(Path(path), fd)
    finally:
        os.close(fd)


# ---- writing ----
def frame(state: spb.SnapshotState) -> bytes:
    payload = state.SerializeToString()
    return STATE_HEADER.pack(STATE_MAGIC, FORMAT_VERSION, len(payload),
                             hashlib.sha256(payload).digest()) + payload


def memory_header(snapshot_id: str, kind: int, ram_bytes: int) -> bytes:
    head = MEMORY_HEADER.pack(MEMORY_MAGIC, FORMAT_VERSION, bytes.fromhex(snapshot_id), kind,
                              ram_bytes)
    return head.ljust(MEMORY_OFFSET, b"\0")


@contextmanager
def _temp(d: SnapshotDir, name: str) -> Iterator[tuple[int, str]]:
    """A new file in d under a random temporary name, made exclusively (a
    planted file or symlink of that name fails the create, never gets
    written through); removed again unless the caller renamed it."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=d.fd)
    try:
        yield fd, tmp
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=d.fd)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)


@contextmanager
def _full_disk(d: SnapshotDir, field: str = "snapshot_dir") -> Iterator[None]:
    """A filesystem out of space (or quota) is the host's limit, not our bug:
    RESOURCE_EXHAUSTED naming the directory.  The temp files are gone by then
    (_temp) and the previous snapshot is untouched."""
    try:
        yield
    except (OSError, NativeError) as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ResourceExhaustedError(f"{field}: no space left for the snapshot in "
                                     f"{shown(d.path)} ({os.strerror(e.errno)})") from None


def _commit(d: SnapshotDir, mem_tmp: str, state_tmp: str) -> None:
    """Put a written snapshot in place.  The state's rename is the commit
    point: until it, the old state's memory stays reachable (a hard link,
    PREV_MEMORY_FILE), so a crash between the two renames leaves the old
    snapshot whole - readers use that link, the next writer puts it back.
    Memory goes first, so that the new state never meets old memory."""
    try:
        os.link(MEMORY_FILE, PREV_MEMORY_FILE, src_dir_fd=d.fd, dst_dir_fd=d.fd,
                follow_symlinks=False)
        kept = True
    except FileNotFoundError:
        kept = False  # the first snapshot here
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        kept = False  # no hard links on this filesystem: a crash between is refused
    os.rename(mem_tmp, MEMORY_FILE, src_dir_fd=d.fd, dst_dir_fd=d.fd)
    os.rename(state_tmp, STATE_FILE, src_dir_fd=d.fd, dst_dir_fd=d.fd)
    if kept:
        os.unlink(PREV_MEMORY_FILE, dir_fd=d.fd)


def write(d: SnapshotDir, state: spb.SnapshotState,
          write_ram: Callable[[int], tuple[int, bytes]]) -> tuple[int, int]:
    """Write the snapshot atomically into d (open from writing()).
    write_ram(fd) puts guest RAM into the memory file from MEMORY_OFFSET on
    (the header is written here) and returns (bytes written, dirty bitmap);
    the bitmap goes into the state.  Returns the sizes of the memory and
    state files."""
    ram_bytes = sum(r.size for r in state.memory)
    with _full_disk(d), _temp(d, MEMORY_FILE) as (mfd, mtmp), \
            _temp(d, STATE_FILE) as (sfd, stmp):
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
        _commit(d, mtmp, stmp)
    os.fsync(d.fd)
    return mem_size, len(data)


# ---- reading ----
@dataclass(frozen=True)
class Snapshot:
    directory: Path
    state: spb.SnapshotState
    memory_path: Path
    ram_bytes: int
    memory_file_bytes: int
    state_file_bytes: int
    # What restore derives from the state (checked, converted), kept with it so
    # that the next restore of this snapshot does not derive it again.
    prepared: dict[str, object] = field(default_factory=dict, compare=False)


# Checked snapshots by directory, valid while both files are the very same
# (inode, size, times, as fstat of the files opened now tells): a serverless
# daemon restores one snapshot over and over, and need not read, hash and
# parse it every time.
_CACHE: dict[Path, tuple[tuple[int, ...], Snapshot]] = {}
_CACHE_MAX = 64
_cache_lock = threading.Lock()


def _identity(*sts: os.stat_result) -> tuple[int, ...]:
    return tuple(x for st in sts for x in (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                           st.st_ctime_ns))


def _open_member(d: SnapshotDir, name: str) -> tuple[int, os.stat_result]:
    """A file of the snapshot, opened without following a link or blocking."""
    def fail(problem: str) -> DataLossError:
        return DataLossError(f"{shown(d.path / name)}: {problem}")
    return open_file(name, fail, dir_fd=d.fd, nofollow=True)


def _read_state(d: SnapshotDir) -> tuple[int, os.stat_result]:
    try:
        return _open_member(d, STATE_FILE)
    except DataLossError:
        try:
            os.stat(STATE_FILE, dir_fd=d.fd, follow_symlinks=False)
        except FileNotFoundError:
            raise InvalidSpecError("snapshot_dir", f"no snapshot in {shown(d.path)} "
                                   f"({STATE_FILE} is missing)") from None
        raise


def _parse_state(path: Path, fd: int) -> spb.SnapshotState:
    with open(fd, "rb", closefd=False) as f:
        f.seek(0)
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


def _check_memory(path: Path, fd: int, size: int, state: spb.SnapshotState,
                  ram_bytes: int) -> None:
    head = os.pread(fd, MEMORY_HEADER.size, 0)
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


def _check_state(path: Path, state: spb.SnapshotState) -> int:
    """The state's own consistency; its RAM size."""
    if state.kind not in (FULL, DIFF):
        raise DataLossError(f"{path}: unknown snapshot kind {state.kind}")
    if len(state.snapshot_id) != 32 or not all(c in "0123456789abcdef" for c in state.snapshot_id):
        raise DataLossError(f"{path}: bad snapshot id {shown(state.snapshot_id)!r}")
    ram_bytes = sum(r.size for r in state.memory)
    pages = ram_bytes // PAGE
    if state.kind == DIFF and len(state.dirty_bitmap) != (pages + 7) // 8:
        raise DataLossError(f"{path}: dirty bitmap of {len(state.dirty_bitmap)} bytes "
                            f"for {pages} pages")
    if state.kind == DIFF and pages % 8 and state.dirty_bitmap[-1] >> (pages % 8):
        raise DataLossError(f"{path}: dirty bitmap marks pages beyond the {pages} "
                            "pages of RAM")
    return ram_bytes


def _previous_memory(d: SnapshotDir, state: spb.SnapshotState,
                     ram_bytes: int) -> tuple[int, os.stat_result] | None:
    """The state's memory as PREV_MEMORY_FILE (a writer died between its
    renames: see _commit), open and checked; None if it is not that."""
    try:
        fd, st = _open_member(d, PREV_MEMORY_FILE)
    except DataLossError:
        return None
    try:
        _check_memory(d.path / PREV_MEMORY_FILE, fd, st.st_size, state, ram_bytes)
    except DataLossError:
        os.close(fd)
        return None
    return fd, st


@contextmanager
def _opened_in(d: SnapshotDir) -> Iterator[tuple[Snapshot, int]]:
    """The snapshot in d, checked, and its memory file open (for mapping)."""
    sfd, sst = _read_state(d)
    try:
        try:
            mfd, mst = _open_member(d, MEMORY_FILE)
        except DataLossError:
            try:
                os.stat(MEMORY_FILE, dir_fd=d.fd, follow_symlinks=False)
            except FileNotFoundError:
                raise DataLossError(f"{shown(d.path / MEMORY_FILE)} is missing: the snapshot "
                                    "has no memory file") from None
            raise
    except BaseException:
        os.close(sfd)
        raise
    try:
        key = _identity(sst, mst)
        with _cache_lock:
            hit = _CACHE.get(d.path)
        if hit is not None and hit[0] == key:
            snap = hit[1]
        else:
            spath, mpath = d.path / STATE_FILE, d.path / MEMORY_FILE
            state = _parse_state(spath, sfd)
            ram_bytes = _check_state(spath, state)
            try:
                _check_memory(mpath, mfd, mst.st_size, state, ram_bytes)
            except DataLossError:
                prev = _previous_memory(d, state, ram_bytes)
                if prev is None:
                    raise
                os.close(mfd)
                (mfd, mst), mpath = prev, d.path / PREV_MEMORY_FILE
                key = _identity(sst, mst)
            snap = Snapshot(d.path, state, mpath, ram_bytes, mst.st_size, sst.st_size)
            with _cache_lock:
                if len(_CACHE) >= _CACHE_MAX:
                    _CACHE.pop(next(iter(_CACHE)))
                _CACHE[d.path] = (key, snap)
        os.close(sfd)
        sfd = -1
        yield snap, mfd
    finally:
        if sfd >= 0:
            os.close(sfd)
        os.close(mfd)


@contextmanager
def opened(path: str, field: str = "snapshot_dir") -> Iterator[tuple[Snapshot, int]]:
    """A snapshot directory, checked (the state's frame and checksum, its kind,
    the memory regions, the memory file against the state), with its memory
    file open while the block runs: restore maps that fd, so what was checked
    is what is mapped, whatever a writer renames meanwhile."""
    with reading(path, field) as d, _as_field(field), _opened_in(d) as got:
        yield got


def read(path: str, field: str = "snapshot_dir") -> Snapshot:
    """A snapshot directory, checked (see opened())."""
    with opened(path, field) as (snap, _):
        return snap


@contextmanager
def _as_field(field: str) -> Iterator[None]:
    """InvalidSpecErrors about "the snapshot directory", naming the caller's
    field (base_dir, diff_dir) instead."""
    try:
        yield
    except InvalidSpecError as e:
        if e.field != "snapshot_dir" or field == "snapshot_dir":
            raise
        raise InvalidSpecError(field, e.problem) from None


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


def merge(base_path: str, diff_path: str) -> tuple[Snapshot, int]:
    """Apply a diff snapshot onto its base: the base directory becomes a full
    snapshot of the diff's moment (with the diff's id, so the next diff of
    the same VM merges onto it too).  New files replace the base's; VMs
    restored from the old ones keep them.  Returns the merged snapshot and
    the pages applied."""
    with writing(base_path, "base_dir", create=False) as bd, _as_field("base_dir"), \
            _opened_in(bd) as (base, bf):
        if base.state.kind != FULL:
            raise InvalidSpecError("base_dir", f"{base.directory} is a diff snapshot; merge "
                                   "onto a full one")
        if _same_dir(diff_path, bd.fd):  # before its lock: ours already excludes it
            raise InvalidSpecError("diff_dir", "names the base directory itself")
        with reading(diff_path, "diff_dir") as dd, _as_field("diff_dir"), \
                _opened_in(dd) as (diff, df):
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
    with _full_disk(d, "base_dir"), _temp(d, MEMORY_FILE) as (out, mtmp), \
            _temp(d, STATE_FILE) as (sfd, stmp):
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
        _commit(d, mtmp, stmp)
    os.fsync(d.fd)
    return applied
