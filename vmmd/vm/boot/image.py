"""The validated description of a guest kernel file, shared by the kernel parsers and the loader.

elf.py and bzimage.py produce a `KernelImage`; loader.py plans and loads from it.  Nothing here
reads files.
"""

from __future__ import annotations

from typing import BinaryIO, Literal

from vmmd.errors import InvalidSpecError
from vmmd.record import Record

# The spec's (and API's) fields the boot loader's errors name.
KERNEL_PATH = ("boot", "kernel_path")
INITRD_PATH = ("boot", "initrd_path")
CMDLINE = ("boot", "cmdline")

KernelKind = Literal["elf", "bzimage"]


class LoadSegment(Record):
    """Copy `file_size` bytes from file `offset` to guest `gpa`; zero the rest up to `mem_size`."""

    offset: int
    gpa: int
    file_size: int
    mem_size: int

    @property
    def end(self) -> int:
        return self.gpa + self.mem_size


class KernelImage(Record):
    """A kernel file checked for loading.

    `low`..`high` is all guest memory the kernel needs at boot (for a bzImage that includes the
    decompression buffer of init_size bytes), so an initrd must start at or above `high`.
    `setup_header` is the boot_params.hdr bytes (zero-page offset 0x1f1 on), copied from a
    bzImage or synthesized for an ELF vmlinux.  `cmdline_limit` counts the terminating NUL.
    """

    kind: KernelKind
    file_size: int
    segments: tuple[LoadSegment, ...]
    entry64: int
    pvh_entry: int | None
    low: int
    high: int
    setup_header: bytes
    initrd_addr_max: int
    cmdline_limit: int


def kernel_error(problem: str) -> InvalidSpecError:
    """The error for a kernel file that cannot be booted."""
    return InvalidSpecError(KERNEL_PATH, problem)


def read_exact(f: BinaryIO, offset: int, size: int, what: str) -> bytes:
    """Read `size` bytes at `offset` or raise a 'truncated' kernel error naming `what`.
    Offsets come from the file itself: one past what a file can have (2^64 - 1) is
    the same 'truncated', not a crash."""
    try:
        f.seek(offset)
        data = f.read(size)
    except (OSError, OverflowError, ValueError):
        data = b""
    if len(data) != size:
        raise kernel_error(f"truncated: {what} at offset {offset:#x} needs {size} bytes")
    return data
