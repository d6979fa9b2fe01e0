"""Opening the host files a client names, safely.

Every path a client sends (kernel, initrd, drive images, snapshot
directories and the files in them) is opened through here:

- the path is checked as a string first: non-empty, no NUL byte, at most
  PATH_MAX bytes;
- it is opened O_NONBLOCK, so a FIFO or a device never blocks the daemon,
  then fstat'ed: only a regular file passes (a directory, FIFO, socket or
  device is refused, saying which it is);
- a file on a pseudo filesystem (procfs, sysfs, debugfs, cgroup...) is
  refused: such files look like small regular files but are the kernel's
  controls, never a disk image or a kernel;
- files vmmd wrote itself (snapshots) are opened relative to their
  directory's fd without following a symlink.

Callers keep the fd: a path is opened once, and what was checked is what is
used.  Errors are built by the caller's `fail(problem)`, so each names the
caller's field.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Callable

from vmmd.errors import shown

PATH_MAX = 4096
Fail = Callable[[str], Exception]

# linux/magic.h: filesystems whose files are kernel interfaces, not data.
PSEUDO_FILESYSTEMS = {
    0x9FA0: "procfs", 0x62656572: "sysfs", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0x73636673: "securityfs",
    0x62656570: "configfs", 0xCAFE4A11: "bpffs", 0x1CD1: "devpts", 0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs", 0x65735543: "fusectl", 0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs", 0x19800202: "mqueue", 0x42494E4D: "binfmt_misc",
    0x6E736673: "nsfs", 0x50495045: "pipefs", 0x534F434B: "sockfs",
    0x09041934: "anon_inodefs", 0x0187: "autofs",
}

_libc = ctypes.CDLL(None, use_errno=True)
_STATFS_BYTES = 256  # struct statfs is 120 bytes on x86-64; f_type comes first


def fs_type(fd: int) -> int:
    """The filesystem magic (statfs.f_type) of the file open as fd."""
    buf = ctypes.create_string_buffer(_STATFS_BYTES)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[:8], "little")


def kind_of(mode: int) -> str:
    """What a non-regular file is, as a message says it."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def check_path(path: str, fail: Fail) -> None:
    """A path as a string: present, no NUL, not longer than the kernel takes."""
    if not path:
        raise fail("is required")
    if "\0" in path:
        raise fail(f"{shown(path)!r} contains a NUL byte")
    if len(os.fsencode(path)) >= PATH_MAX:
        raise fail(f"{shown(path)} is longer than {PATH_MAX - 1} bytes")


def open_file(path: str, fail: Fail, *, write: bool = False, dir_fd: int | None = None,
              nofollow: bool = False, errno_problems: dict[int, str] | None = None,
              check_fs: bool = True) -> tuple[int, os.stat_result]:
    """Open a regular file on an ordinary filesystem for reading (or reading
    and writing); return the fd (blocking again, close-on-exec) and its stat.
    Never waits: a FIFO, a device or a lock held elsewhere cannot block it.
    errno_problems: the problem to report for an open() errno (else "cannot
    open PATH: strerror")."""
    check_path(path, fail)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if nofollow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP and nofollow:
            raise fail(f"{shown(path)} is a symbolic link") from None
        if errno_problems and e.errno in errno_problems:
            raise fail(errno_problems[e.errno]) from None
        raise fail(f"cannot open {shown(path)}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fail(f"{shown(path)} is {kind_of(st.st_mode)}, not a regular file")
        pseudo = PSEUDO_FILESYSTEMS.get(fs_type(fd)) if check_fs else None
        if pseudo:
            raise fail(f"{shown(path)} is on {pseudo}, a pseudo filesystem of kernel controls, "
                       "not a file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st
