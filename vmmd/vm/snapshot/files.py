"""Snapshot directories and their files: opening, locking, atomic writes,
validated reads (the format itself is in format.py).

A directory is a client's path, so it is handled as hostile:

- it is opened once (O_DIRECTORY | O_NOFOLLOW) and everything in it is
  reached relative to that fd, never following a symlink;
- vmmd writes only into a directory that is new, empty, or already a vmmd
  snapshot (its marker `.vmmd-snapshot`, or a `vmstate` of ours from before
  markers), and never replaces anything but regular files;
- writers hold an exclusive flock on the directory, readers a shared one:
  a second writer is refused (BusyError: ABORTED), a reader waits a
  bounded time for a writer and then sees one whole snapshot;
- files are created O_CREAT | O_EXCL | O_NOFOLLOW under random temporary
  names, fsynced, renamed into place, and the directory fsynced; stale
  temporary files of a killed writer are removed by the next writer;
- files are opened O_NONBLOCK and must be regular (vm/hostfiles.py): a FIFO
  planted as `memory` is refused, never waited on.

The state's rename is the commit point; until it the old memory stays
reachable (commit()), so a crash at any moment leaves one whole snapshot.
Nothing here rewrites a file in place: VMs restored from a memory file map
it, and must keep seeing it unchanged.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from vmmd.record import Record
from vmmd.vm.hostfiles import PSEUDO_FILESYSTEMS, check_path, fs_type, kind_of, open_file
from vmmd.vm.snapshot.cache import SnapshotCache
from vmmd.vm.snapshot.format import (
    DIFF,
    FULL,
    MARKER_FILE,
    MARKER_TEXT,
    MEMORY_FILE,
    MEMORY_OFFSET,
    PREV_MEMORY_FILE,
    STATE_FILE,
    STATE_MAGIC,
    check_memory,
    check_state,
    frame,
    memory_header,
    parse_state,
)

# Bounded waits for a directory's lock: a reader waits out a writer (seconds
# for gigabytes of RAM); a writer waits only for readers and other daemons
# (a writer of this daemon refuses at once).
READ_WAIT_S, WRITE_WAIT_S, LOCK_POLL_S = 60.0, 5.0, 0.005
_TEMP_RE = re.compile(r"\.(vmstate|memory)\.[0-9a-f]{16}\.tmp")


# ---- the directory ----
class SnapshotDir(Record):
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
        with opened_in(d) as (snap, _):
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
@contextmanager
def temp_file(d: SnapshotDir, name: str) -> Iterator[tuple[int, str]]:
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
def full_disk(d: SnapshotDir, field: str = "snapshot_dir") -> Iterator[None]:
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


def commit(d: SnapshotDir, mem_tmp: str, state_tmp: str) -> None:
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
    with full_disk(d), temp_file(d, MEMORY_FILE) as (mfd, mtmp), \
            temp_file(d, STATE_FILE) as (sfd, stmp):
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
        commit(d, mtmp, stmp)
    os.fsync(d.fd)
    return mem_size, len(data)


# ---- reading ----
class Snapshot(Record):
    directory: Path
    state: spb.SnapshotState
    memory_path: Path
    ram_bytes: int
    memory_file_bytes: int
    state_file_bytes: int


def _identity(*sts: os.stat_result) -> tuple[int, ...]:
    return tuple(x for st in sts for x in (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                           st.st_ctime_ns))


def _open_member(d: SnapshotDir, name: str) -> tuple[int, os.stat_result]:
    """A file of the snapshot, opened without following a link or blocking."""
    def fail(problem: str) -> DataLossError:
        return DataLossError(f"{shown(d.path / name)}: {problem}")
    # Its filesystem is the directory's, checked when it was opened (only a
    # mount point could differ, and mounting takes root): not asked again.
    return open_file(name, fail, dir_fd=d.fd, nofollow=True, check_fs=False)


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


def _previous_memory(d: SnapshotDir, state: spb.SnapshotState,
                     ram_bytes: int) -> tuple[int, os.stat_result] | None:
    """The state's memory as PREV_MEMORY_FILE (a writer died between its
    renames: see _commit), open and checked; None if it is not that."""
    try:
        fd, st = _open_member(d, PREV_MEMORY_FILE)
    except DataLossError:
        return None
    try:
        check_memory(d.path / PREV_MEMORY_FILE, fd, st.st_size, state, ram_bytes)
    except DataLossError:
        os.close(fd)
        return None
    return fd, st


@contextmanager
def opened_in(d: SnapshotDir, cache: SnapshotCache | None = None
              ) -> Iterator[tuple[Snapshot, int]]:
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
        hit = cache.get(d.path, key) if cache is not None else None
        if hit is not None:
            snap = hit
        else:
            spath, mpath = d.path / STATE_FILE, d.path / MEMORY_FILE
            state = parse_state(spath, sfd)
            ram_bytes = check_state(spath, state)
            try:
                check_memory(mpath, mfd, mst.st_size, state, ram_bytes)
            except DataLossError:
                prev = _previous_memory(d, state, ram_bytes)
                if prev is None:
                    raise
                os.close(mfd)
                (mfd, mst), mpath = prev, d.path / PREV_MEMORY_FILE
                key = _identity(sst, mst)
            snap = Snapshot(d.path, state, mpath, ram_bytes, mst.st_size, sst.st_size)
            if cache is not None:
                cache.put(d.path, key, snap)
        os.close(sfd)
        sfd = -1
        yield snap, mfd
    finally:
        if sfd >= 0:
            os.close(sfd)
        os.close(mfd)


@contextmanager
def opened(path: str, field: str = "snapshot_dir", *,
           cache: SnapshotCache | None = None) -> Iterator[tuple[Snapshot, int]]:
    """A snapshot directory, checked (the state's frame and checksum, its kind,
    the memory regions, the memory file against the state), with its memory
    file open while the block runs: restore maps that fd, so what was checked
    is what is mapped, whatever a writer renames meanwhile."""
    with reading(path, field) as d, as_field(field), opened_in(d, cache) as got:
        yield got


def read(path: str, field: str = "snapshot_dir") -> Snapshot:
    """A snapshot directory, checked (see opened())."""
    with opened(path, field) as (snap, _):
        return snap


@contextmanager
def as_field(field: str) -> Iterator[None]:
    """InvalidSpecErrors about "the snapshot directory", naming the caller's
    field (base_dir, diff_dir) instead."""
    try:
        yield
    except InvalidSpecError as e:
        if e.field != "snapshot_dir" or field == "snapshot_dir":
            raise
        raise InvalidSpecError(field, e.problem) from None


