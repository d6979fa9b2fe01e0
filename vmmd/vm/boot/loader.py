"""The boot loader's entry points for the VM layer: inspect, plan, load.

This module owns the order of booting a Linux guest: `inspect_kernel` validates the kernel file
(ELF vmlinux or bzImage), `plan_boot` checks that everything fits (memory, initrd, cmdline,
vCPUs) before any VM exists, and `load` writes the kernel, initrd, cmdline, zero page or PVH
start_info, GDT/IDT, page tables, MP table and (if asked) ACPI tables into guest memory and returns the boot vCPU's
registers.  Every refusal is an InvalidSpecError naming the spec's field (boot.kernel_path,
boot.initrd_path, boot.cmdline, memory_mib, vcpus).  Each file is opened once (`open_boot_file`, through
vm/hostfiles.py: regular files only, never blocking) and loaded from that fd; only its data is
read, straight into guest RAM, and nothing else is written there: fresh RAM is zero already, so
a segment's bss or a sparse initrd costs no memory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from vmmd.errors import FieldPath, InvalidSpecError, shown
from vmmd.record import Record
from vmmd.vm.boot.acpi import build_acpi
from vmmd.vm.boot.bzimage import is_bzimage, parse_bzimage
from vmmd.vm.boot.cmdline import encode_cmdline
from vmmd.vm.boot.cpu import BootRegs, MemoryWrites, boot_cpu_state
from vmmd.vm.boot.elf import is_elf, parse_elf
from vmmd.vm.boot.image import INITRD_PATH, KernelImage, LoadSegment, kernel_error
from vmmd.vm.boot.mptable import build_mptable
from vmmd.vm.boot.params import HEADER, build_start_info, build_zero_page, memory_map
from vmmd.vm.hostfiles import open_file
from vmmd.vm.layout import (
    ACPI_START,
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
    "BootFile", "BootPlan", "BootRegs", "GuestMemory", "KernelImage",
    "inspect_initrd", "inspect_kernel", "load", "open_boot_file", "plan_boot",
]  # fmt: skip


class GuestMemory(Protocol):
    """Guest RAM as the loader sees it: writes at guest physical addresses, and
    file contents read into it (only the file's data; holes stay as they are).
    load_file raises InvalidSpecError(field) if the file is shorter."""

    def write(self, gpa: int, data: bytes) -> None: ...

    def load_file(self, gpa: int, fd: int, offset: int, length: int,
                  field: FieldPath) -> None: ...


class BootFile(Record):
    """A kernel or initrd open for loading: checked once, used through its fd."""

    path: str
    field: FieldPath  # KERNEL_PATH | INITRD_PATH
    fd: int
    size: int


@contextmanager
def open_boot_file(path: str, field: FieldPath) -> Iterator[BootFile]:
    """The file as a BootFile while the block runs (closed after)."""
    fd, st = open_file(path, lambda problem: InvalidSpecError(field, problem))
    try:
        yield BootFile(path, field, fd, st.st_size)
    finally:
        os.close(fd)


class BootPlan(Record):
    """A checked boot: what goes where.  `cmdline` is NUL-terminated; `entry` is the first rip,
    in 32-bit PVH mode when `pvh`, else in 64-bit mode.  `acpi`: None, or the virtio-mmio
    slots (window, IRQ) the ACPI tables describe (the MP table is written either way)."""

    kernel: KernelImage
    mem_bytes: int
    vcpus: int
    cmdline: bytes
    initrd: Region | None
    pvh: bool
    entry: int
    acpi: tuple[tuple[Region, int], ...] | None = None

    @property
    def ram(self) -> tuple[Region, ...]:
        """The guest RAM regions the VM must have before `load`."""
        return ram_regions(self.mem_bytes)


def inspect_kernel(kernel: BootFile) -> KernelImage:
    """Validate a kernel file (ELF vmlinux or bzImage) and describe how to load it."""
    with open(kernel.fd, "rb", closefd=False) as f:
        try:
            head = f.read(HEADER.offset + 4)
        except OSError as e:
            raise kernel_error(f"cannot read {shown(kernel.path)}: {e.strerror}") from None
        if is_elf(head):
            return parse_elf(f, kernel.size)
        if is_bzimage(head):
            return parse_bzimage(f, kernel.size)
        raise kernel_error(f"{shown(kernel.path)} is neither an ELF vmlinux nor a bzImage")


def inspect_initrd(initrd: BootFile) -> int:
    """The size of an initrd file (opened: a readable regular file)."""
    return initrd.size


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _place_initrd(kernel: KernelImage, size: int, mem_bytes: int) -> Region:
    """The initrd as high in low RAM as allowed, page aligned, above the kernel."""
    if size <= 0:
        raise InvalidSpecError(INITRD_PATH, "is empty")
    floor = _align_up(kernel.high, PAGE_SIZE)
    cap = min(MMIO_HOLE_START, kernel.initrd_addr_max + 1)
    if (cap - size) // PAGE_SIZE * PAGE_SIZE < floor:
        raise InvalidSpecError(
            INITRD_PATH, f"{size} bytes do not fit between the kernel end {floor:#x} and {cap:#x}"
        )
    gpa = (min(cap, low_ram_end(mem_bytes)) - size) // PAGE_SIZE * PAGE_SIZE
    if gpa < floor:
        raise InvalidSpecError(
            "memory_mib",
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
    acpi: Sequence[tuple[Region, int]] | None = None,
) -> BootPlan:
    """Check that kernel, initrd and cmdline fit a VM of this size; uses PVH when the kernel has it."""
    check_vcpu_count(vcpus)
    check_memory_size(mem_bytes)
    if kernel.high > low_ram_end(mem_bytes):
        raise InvalidSpecError(
            "memory_mib",
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
        acpi=None if acpi is None else tuple(acpi),
    )


def _load_file(mem: GuestMemory, f: BootFile, segments: tuple[LoadSegment, ...]) -> None:
    """Each segment's file bytes into RAM; the rest of it (mem_size beyond
    file_size) is left as the zero RAM it is."""
    for seg in segments:
        mem.load_file(seg.gpa, f.fd, seg.offset, seg.file_size, f.field)


def load(mem: GuestMemory, plan: BootPlan, kernel: BootFile,
         initrd: BootFile | None = None) -> BootRegs:
    """Write everything the guest needs to boot into `mem` (fresh, zeroed RAM);
    return the boot vCPU's registers."""
    _load_file(mem, kernel, plan.kernel.segments)
    if plan.initrd is not None:
        if initrd is None:
            raise ValueError("the plan has an initrd but no initrd file was given")
        size = plan.initrd.size
        _load_file(mem, initrd, (LoadSegment(0, plan.initrd.gpa, size, size),))
    mem.write(CMDLINE_START, plan.cmdline)
    regs, structures = _boot_structures(
        plan.mem_bytes, plan.vcpus, plan.acpi, plan.initrd, plan.pvh, plan.entry,
        None if plan.pvh else plan.kernel.setup_header)
    for gpa, data in structures:
        mem.write(gpa, data)
    return regs


# Keyed by everything they are made from, and immutable: a daemon creating VMs of
# a few shapes builds each shape's tables once (~0.2 ms of every CreateVm, measured).
@functools.lru_cache(maxsize=64)
def _boot_structures(mem_bytes: int, vcpus: int, acpi: tuple[tuple[Region, int], ...] | None,
                     initrd: Region | None, pvh: bool, entry: int,
                     setup_header: bytes | None) -> tuple[BootRegs, MemoryWrites]:
    """The boot vCPU's registers, and the tables the guest reads at boot (memory map in
    start_info or the zero page, ACPI, MP table, GDT, IDT, page tables) with their gpas."""
    memmap = memory_map(mem_bytes, acpi=acpi is not None)
    writes: list[tuple[int, bytes]] = []
    rsdp = 0
    if acpi is not None:
        tables = build_acpi(vcpus, acpi)
        writes.append((ACPI_START, tables.blob))
        rsdp = tables.rsdp
    if pvh:
        writes.append((PVH_INFO_START, build_start_info(initrd, memmap, rsdp)))
    else:
        assert setup_header is not None
        writes.append((ZERO_PAGE_START, build_zero_page(setup_header, initrd, memmap, rsdp)))
    writes.append((MPTABLE_START, build_mptable(vcpus)))
    regs, structures = boot_cpu_state(entry, pvh=pvh)
    return regs, (*writes, *structures)
