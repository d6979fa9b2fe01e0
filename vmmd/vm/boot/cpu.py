"""CPU state at the kernel's first instruction: the boot GDT, identity page tables and registers.

This module owns the flat GDTs (as Firecracker's), the segment registers derived from them
(like Firecracker's `kvm_segment_from_gdt`), the [0, 1 GiB) identity map with 2 MiB pages, and
`BootRegs`, whose fields mirror `struct vmm_boot_regs` in native/vmmcore.h one for one so the
VM layer converts it mechanically.  Two entry states:

- 64-bit (Linux boot protocol): long mode, paging on, rip = entry, rsi = zero page.
- PVH (32-bit): protected mode, paging off, rip = entry, rbx = hvm_start_info.
"""

from __future__ import annotations

import struct

from vmmd.record import Record
from vmmd.vm.layout import (
    BOOT_STACK_POINTER,
    GDT_START,
    IDT_START,
    PD_START,
    PDPT_START,
    PML4_START,
    PVH_INFO_START,
    ZERO_PAGE_START,
)

MemoryWrites = tuple[tuple[int, bytes], ...]  # (guest physical address, bytes) pairs

# GDT entries: null, code, data, TSS (selectors 0x08, 0x10, 0x18).
GDT_64 = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)
GDT_PVH = (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00008B0000000067)
CODE_INDEX, DATA_INDEX, TSS_INDEX = 1, 2, 3
IDT_LIMIT = 7  # one null 8-byte entry: any interrupt before the kernel's IDT is a triple fault

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 is always set

PTE_PRESENT_RW = 0x03
PDE_2M_PAGE = 0x83  # present, writable, page size (2 MiB)
ENTRIES_PER_TABLE = 512
LDT_TYPE = 2


class Segment(Record):
    """A segment register as KVM takes it (struct vmm_segment); limit is in bytes."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int
    g: int
    avl: int


class BootRegs(Record):
    """The boot CPU's state; field names and order are those of struct vmm_boot_regs."""

    rip: int
    rsp: int
    rbp: int
    rsi: int
    rbx: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int


# The LDT is unused: a null, not-present LDT descriptor (KVM then marks it unusable).
UNUSABLE_LDT = Segment(
    base=0, limit=0, selector=0, type=LDT_TYPE, present=0, dpl=0, db=0, s=0, l=0, g=0, avl=0
)


def _bit(entry: int, shift: int) -> int:
    return (entry >> shift) & 1


def segment_from_gdt(entry: int, index: int) -> Segment:
    """Decode a GDT descriptor into the segment register loaded from selector index * 8."""
    g = _bit(entry, 55)
    limit = ((entry >> 32) & 0xF0000) | (entry & 0xFFFF)
    return Segment(
        base=((entry >> 32) & 0xFF00_0000) | ((entry >> 16) & 0x00FF_FFFF),
        limit=((limit << 12) | 0xFFF) if g else limit,
        selector=index * 8,
        type=(entry >> 40) & 0xF,
        present=_bit(entry, 47),
        dpl=(entry >> 45) & 0x3,
        db=_bit(entry, 54),
        s=_bit(entry, 44),
        l=_bit(entry, 53),
        g=g,
        avl=_bit(entry, 52),
    )


def gdt_bytes(gdt: tuple[int, ...]) -> bytes:
    """The GDT as written at GDT_START."""
    return struct.pack(f"<{len(gdt)}Q", *gdt)


def idt_bytes() -> bytes:
    """The IDT as written at IDT_START."""
    return bytes(IDT_LIMIT + 1)


def page_tables() -> MemoryWrites:
    """(gpa, bytes) of the PML4, PDPT and PD identity-mapping [0, 1 GiB) with 2 MiB pages."""
    pml4 = struct.pack("<Q", PDPT_START | PTE_PRESENT_RW)
    pdpt = struct.pack("<Q", PD_START | PTE_PRESENT_RW)
    pd = struct.pack(
        f"<{ENTRIES_PER_TABLE}Q", *((i << 21) | PDE_2M_PAGE for i in range(ENTRIES_PER_TABLE))
    )
    return ((PML4_START, pml4), (PDPT_START, pdpt), (PD_START, pd))


def _regs(
    gdt: tuple[int, ...],
    *,
    rip: int,
    cr0: int,
    cr4: int,
    efer: int,
    cr3: int = 0,
    rsi: int = 0,
    rbx: int = 0,
) -> BootRegs:
    """BootRegs with segments loaded from `gdt`, the boot stack and the given control state."""
    data = segment_from_gdt(gdt[DATA_INDEX], DATA_INDEX)
    return BootRegs(
        rip=rip, rsp=BOOT_STACK_POINTER, rbp=BOOT_STACK_POINTER, rsi=rsi, rbx=rbx,
        rflags=RFLAGS_RESERVED, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer,
        cs=segment_from_gdt(gdt[CODE_INDEX], CODE_INDEX),
        ds=data, es=data, fs=data, gs=data, ss=data,
        tr=segment_from_gdt(gdt[TSS_INDEX], TSS_INDEX),
        ldt=UNUSABLE_LDT,
        gdt_base=GDT_START, gdt_limit=len(gdt) * 8 - 1,
        idt_base=IDT_START, idt_limit=IDT_LIMIT,
    )  # fmt: skip


def long_mode_regs(entry: int) -> BootRegs:
    """Linux 64-bit boot protocol: long mode on the identity map, rsi = zero page."""
    return _regs(
        GDT_64,
        rip=entry,
        rsi=ZERO_PAGE_START,
        cr0=X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
        cr3=PML4_START,
        cr4=X86_CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )


def pvh_regs(entry: int) -> BootRegs:
    """PVH boot ABI: flat 32-bit protected mode, paging off, rbx = hvm_start_info."""
    return _regs(GDT_PVH, rip=entry, rbx=PVH_INFO_START, cr0=X86_CR0_PE | X86_CR0_ET, cr4=0, efer=0)


def boot_cpu_state(entry: int, *, pvh: bool) -> tuple[BootRegs, MemoryWrites]:
    """The boot vCPU's registers and the (gpa, bytes) structures they point at."""
    idt = (IDT_START, idt_bytes())
    if pvh:
        return pvh_regs(entry), ((GDT_START, gdt_bytes(GDT_PVH)), idt)
    return long_mode_regs(entry), ((GDT_START, gdt_bytes(GDT_64)), idt, *page_tables())
