"""A cell worker's system call filter (native/seccomp.h) and what its trap
reports to the broker."""

from __future__ import annotations

import struct

from vmmd.native._lib import check, ffi, lib
from vmmd.record import Record

# What a worker killed by the filter exits with: 128 + SIGSYS.
SECCOMP_EXIT = lib.VMM_SECCOMP_EXIT
REPORT_SIZE = ffi.sizeof("struct vmm_seccomp_report")
_REPORT = struct.Struct("=IiQ")  # struct vmm_seccomp_report: magic, syscall_nr, ip
assert _REPORT.size == REPORT_SIZE


class SeccompReport(Record):
    """A system call the filter refused: the worker died of it."""

    syscall_nr: int
    ip: int

    @property
    def syscall_name(self) -> str:
        return syscall_name(self.syscall_nr)

    def __str__(self) -> str:
        return f"seccomp refused system call {self.syscall_nr} ({self.syscall_name})"


def install_seccomp(report_fd: int) -> None:
    """The allowlist filter on every thread of this process, for good (and
    no_new_privs).  A call off the list writes a report to report_fd (a pipe
    the broker reads: parse_seccomp_report) and exits the process with
    SECCOMP_EXIT."""
    check(lib.vmm_seccomp_install(report_fd), "install the seccomp filter")


def seccomp_allowlist() -> list[str]:
    """Names of the system calls the filter allows (native/seccomp_allow.h)."""
    n = lib.vmm_seccomp_allowlist(ffi.NULL, 0)
    names = ffi.new("const char *[]", n)
    lib.vmm_seccomp_allowlist(names, n)
    return [ffi.string(names[i]).decode() for i in range(n)]


def syscall_name(nr: int) -> str:
    """An x86-64 system call number's name ("syscall N" if it has none)."""
    buf = ffi.new("char[]", 64)
    if lib.vmm_seccomp_syscall_name(nr, buf, 64) < 0:
        return f"syscall {nr}"
    return ffi.string(buf).decode()


def parse_seccomp_report(data: bytes) -> SeccompReport | None:
    """The report a trapped worker wrote (what the broker read from the pipe);
    None when data is not one (the worker died otherwise, or wrote garbage)."""
    if len(data) < REPORT_SIZE:
        return None
    magic, nr, ip = _REPORT.unpack_from(data)
    if magic != lib.VMM_SECCOMP_MAGIC:
        return None
    return SeccompReport(nr, ip)
