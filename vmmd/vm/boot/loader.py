"""The boot loader's entry points for the VM layer: inspect, plan, load.

This module owns the order of booting a Linux guest: `inspect_kernel` validates the kernel file
(ELF vmlinux or bzImage), `plan_boot` checks that everything fits (memory, initrd, cmdline,
vCPUs) before any VM exists, and `load` writes the kernel, initrd, cmdline, zero page or PVH
start_info, GDT/IDT, page tables and MP table into guest memory and returns the boot vCPU's
registers.  Every refusal is an InvalidSpecError naming the field ("kernel", "initrd",
"memory", "cmdline", "vcpus").  Files are read once, in chunks.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from vmmd.errors import InvalidSpecError
from vmmd.vm.boot.bzimage import is_bzimage, parse_bzimage
from vmmd.vm.boot.cmdline import encode_cmdline
from vmmd.vm.boot.cpu import BootRegs, boot_cpu_state
from vmmd.vm.boot.elf import is_elf, parse_elf
from vmmd.vm.boot.image import KernelImage, LoadSegment, kernel_error
from vmmd.vm.boot.mptable import build_mptable
from vmmd.vm.boot.params import HEADER, build_start_info, build_zero_page, memory_map
from vmmd.vm.layout import (
    CMDLINE_START,
    MMIO_HOLE_START,
    MPTABLE_START,
    PAGE_SIZE,
    PVH_INFO_START,
    ZERO_PAGE_START,
    MiB,
    Region,
    check_memory_size,
    check_vcpu_count,
    low_ram_end,
    ram_regions,
)

__all__ = [
    "BootPlan", "BootRegs", "GuestMemory", "KernelImage",
    "inspect_initrd", "inspect_kernel", "load", "plan_boot",
]  # fmt: skip

COPY_CHUNK = 4 * MiB
_ZEROS = bytes(COPY_CHUNK)


class GuestMemory(Protocol):
    """Guest RAM as the loader sees it: writes at guest physical addresses."""

    def write(self, gpa: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class BootPlan:
    """A checked boot: what goes where.  `cmdline` is NUL-terminated; `entry` is the first rip,
    in 32-bit PVH mode when `pvh`, else in 64-bit mode."""

    kernel: KernelImage
    mem_bytes: int
    vcpus: int
    cmdline: bytes
    initrd: Region | None
    pvh: bool
    entry: int

    @property
    def ram(self) -> tuple[Region, ...]:
        """The guest RAM regions the VM must have before `load`."""
        return ram_regions(self.mem_bytes)


@contextmanager
def _open_regular(path: str, field: str) -> Iterator[tuple[BinaryIO, int]]:
    """Open a regular file (never blocking on a FIFO) as (file, size); errors name `field`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidSpecError(field, f"{path} is not a regular file")
            yield f, st.st_size
    except OSError as e:
        raise InvalidSpecError(field, f"cannot read {path}: {e.strerror}") from e


def inspect_kernel(path: str) -> KernelImage:
    """Validate a kernel file (ELF vmlinux or bzImage) and describe how to load it."""
    with _open_regular(path, "kernel") as (f, size):
        head = f.read(HEADER.offset + 4)
        if is_elf(head):
            return parse_elf(f, size)
        if is_bzimage(head):
            return parse_bzimage(f, size)
        raise kernel_error(f"{path} is neither an ELF vmlinux nor a bzImage")


def inspect_initrd(path: str) -> int:
    """The size of an initrd file, checked to be a readable regular file."""
    with _open_regular(path, "initrd") as (_, size):
        return size


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _place_initrd(kernel: KernelImage, size: int, mem_bytes: int) -> Region:
    """The initrd as high in low RAM as allowed, page aligned, above the kernel."""
    if size <= 0:
        raise InvalidSpecError("initrd", "is empty")
    floor = _align_up(kernel.high, PAGE_SIZE)
    cap = min(MMIO_HOLE_START, kernel.initrd_addr_max + 1)
    if (cap - size) // PAGE_SIZE * PAGE_SIZE < floor:
        raise InvalidSpecError(
            "initrd", f"{size} bytes do not fit between the kernel end {floor:#x} and {cap:#x}"
        )
    gpa = (min(cap, low_ram_end(mem_bytes)) - size) // PAGE_SIZE * PAGE_SIZE
    if gpa < floor:
        raise InvalidSpecError(
            "memory",
            f"{mem_bytes // MiB} MiB is too small for the kernel (up to {floor:#x}) and a {size}-byte initrd",
        )
    return Region(gpa, size)


def plan_boot(
    kernel: KernelImage,
    initrd_size: int | None,
    mem_bytes: int,
    vcpus: int,
    cmdline: str,
    *,
    force_64bit: bool = False,
) -> BootPlan:
    """Check that kernel, initrd and cmdline fit a VM of this size; uses PVH when the kernel has it."""
    check_vcpu_count(vcpus)
    check_memory_size(mem_bytes)
    if kernel.high > low_ram_end(mem_bytes):
        raise InvalidSpecError(
            "memory",
            f"{mem_bytes // MiB} MiB is too small for the kernel, which needs RAM up to {kernel.high:#x}",
        )
    initrd = None if initrd_size is None else _place_initrd(kernel, initrd_size, mem_bytes)
    pvh_entry = None if force_64bit else kernel.pvh_entry
    return BootPlan(
        kernel=kernel,
        mem_bytes=mem_bytes,
        vcpus=vcpus,
        cmdline=encode_cmdline(cmdline, kernel.cmdline_limit),
        initrd=initrd,
        pvh=pvh_entry is not None,
        entry=kernel.entry64 if pvh_entry is None else pvh_entry,
    )


def _copy(mem: GuestMemory, f: BinaryIO, seg: LoadSegment, field: str) -> None:
    f.seek(seg.offset)
    for done in range(0, seg.file_size, COPY_CHUNK):
        want = min(COPY_CHUNK, seg.file_size - done)
        chunk = f.read(want)
        if len(chunk) != want:
            raise InvalidSpecError(field, "file shrank while loading")
        mem.write(seg.gpa + done, chunk)
    for done in range(seg.file_size, seg.mem_size, COPY_CHUNK):
        mem.write(seg.gpa + done, _ZEROS[: min(COPY_CHUNK, seg.mem_size - done)])


def _load_file(
    mem: GuestMemory, path: str, field: str, size: int, segments: tuple[LoadSegment, ...]
) -> None:
    """Copy `segments` of a file that must still be `size` bytes long."""
    with _open_regular(path, field) as (f, actual):
        if actual != size:
            raise InvalidSpecError(
                field, f"{path} changed size since it was checked ({size} -> {actual} bytes)"
            )
        for seg in segments:
            _copy(mem, f, seg, field)


def load(
    mem: GuestMemory, plan: BootPlan, kernel_path: str, initrd_path: str | None = None
) -> BootRegs:
    """Write everything the guest needs to boot into `mem`; return the boot vCPU's registers."""
    kernel = plan.kernel
    _load_file(mem, kernel_path, "kernel", kernel.file_size, kernel.segments)
    if plan.initrd is not None:
        if initrd_path is None:
            raise ValueError("the plan has an initrd but no initrd_path was given")
        size = plan.initrd.size
        _load_file(mem, initrd_path, "initrd", size, (LoadSegment(0, plan.initrd.gpa, size, size),))
    mem.write(CMDLINE_START, plan.cmdline)
    memmap = memory_map(plan.mem_bytes)
    if plan.pvh:
        mem.write(PVH_INFO_START, build_start_info(plan.initrd, memmap))
    else:
        mem.write(ZERO_PAGE_START, build_zero_page(kernel.setup_header, plan.initrd, memmap))
    mem.write(MPTABLE_START, build_mptable(plan.vcpus))
    regs, structures = boot_cpu_state(plan.entry, pvh=plan.pvh)
    for gpa, data in structures:
        mem.write(gpa, data)
    return regs
