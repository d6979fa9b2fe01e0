"""enter_jail: a freshly forked cell worker locks itself in (native/jail.h)."""

from __future__ import annotations

from vmmd.native._lib import check, ffi, lib


def enter_jail(root_fd: int, uid: int, gid: int, *, nofile: int = 0, nproc: int = 0) -> None:
    """Jail this process: a private mount namespace whose root is the empty
    directory open as root_fd (read-only, noexec), no capabilities, uid and gid
    (never 0), no supplementary groups, no_new_privs, not dumpable; RLIMIT_CORE
    0, RLIMIT_NOFILE and RLIMIT_NPROC set when nonzero.

    Call it in a child forked by root while it is still single-threaded;
    root_fd is closed by the call (an open directory from outside would be a
    way back out).  NativeError on the first step that fails: the process is
    then half jailed and must exit."""
    j = ffi.new("struct vmm_jail *", {"root_fd": root_fd, "uid": uid, "gid": gid,
                                      "nofile": nofile, "nproc": nproc})
    check(lib.vmm_jail_enter(j), "enter the jail")
