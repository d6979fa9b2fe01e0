"""Boot GDT, segments, page tables and registers (values from Firecracker / the PVH ABI)."""

import re
import struct
from pathlib import Path

import pytest

from vmmd.vm.boot.cpu import (
    BootRegs,
    Segment,
    boot_cpu_state,
    long_mode_regs,
    pvh_regs,
    segment_from_gdt,
)


def test_64_bit_code_segment_decodes_like_firecracker():
    cs = segment_from_gdt(0x00AF9B000000FFFF, 1)
    assert cs == Segment(base=0, limit=0xFFFFFFFF, selector=8, type=0xB, present=1, dpl=0,
                         db=0, s=1, l=1, g=1, avl=0)  # fmt: skip


def test_tss_segment_decodes_as_a_busy_system_segment():
    tr = segment_from_gdt(0x008F8B000000FFFF, 3)
    assert (tr.selector, tr.type, tr.s, tr.present, tr.limit) == (0x18, 0xB, 0, 1, 0xFFFFFFFF)


def test_segment_base_bits_are_reassembled():
    assert segment_from_gdt(0x1200_9334_5678_0000, 2).base == 0x1234_5678


def test_long_mode_registers():
    regs = long_mode_regs(0x1000000)
    assert (regs.rip, regs.rsi, regs.rsp, regs.rbp, regs.rflags) == (
        0x1000000,
        0x7000,
        0x8FF0,
        0x8FF0,
        2,
    )
    assert regs.cr0 == 0x8000_0011 and regs.cr3 == 0x9000 and regs.cr4 == 0x20
    assert regs.efer == 0x500
    assert (regs.cs.selector, regs.cs.l, regs.cs.db) == (0x08, 1, 0)
    assert all(
        s.selector == 0x10 and s.type == 3 for s in (regs.ds, regs.es, regs.fs, regs.gs, regs.ss)
    )
    assert regs.tr.selector == 0x18
    assert regs.ldt.present == 0 and regs.ldt.type == 2
    assert (regs.gdt_base, regs.gdt_limit, regs.idt_base, regs.idt_limit) == (0x500, 31, 0x520, 7)


def test_pvh_registers_are_flat_32_bit_without_paging():
    regs = pvh_regs(0x1234567)
    assert (regs.rip, regs.rbx, regs.cr0, regs.cr4, regs.efer) == (0x1234567, 0x6000, 0x11, 0, 0)
    assert (regs.cs.l, regs.cs.db, regs.cs.g, regs.cs.limit, regs.cs.type) == (
        0,
        1,
        1,
        0xFFFFFFFF,
        0xB,
    )
    assert (regs.ds.db, regs.ds.limit) == (1, 0xFFFFFFFF)
    assert (regs.tr.type, regs.tr.limit, regs.tr.present) == (0xB, 0x67, 1)


def test_64_bit_boot_writes_gdt_idt_and_identity_map():
    _, writes = boot_cpu_state(0x1000000, pvh=False)
    mem = dict(writes)
    assert struct.unpack("<4Q", mem[0x500]) == (
        0,
        0x00AF9B000000FFFF,
        0x00CF93000000FFFF,
        0x008F8B000000FFFF,
    )
    assert mem[0x520] == bytes(8)
    assert struct.unpack("<Q", mem[0x9000]) == (0xA003,)
    assert struct.unpack("<Q", mem[0xA000]) == (0xB003,)
    pd = struct.unpack("<512Q", mem[0xB000])
    assert pd[0] == 0x83 and pd[1] == 0x200083 and pd[511] == (511 << 21) | 0x83


def test_pvh_boot_writes_a_32_bit_gdt_and_no_page_tables():
    _, writes = boot_cpu_state(0x1000000, pvh=True)
    mem = dict(writes)
    assert struct.unpack("<Q", mem[0x500][8:16]) == (0x00CF9B000000FFFF,)
    assert set(mem) == {0x500, 0x520}


def _c_struct_fields(header: str, name: str) -> list[str]:
    body = re.search(rf"struct {name} \{{(.*?)\}};", header, re.DOTALL).group(1)
    fields = []
    for decl in body.split(";"):
        decl = re.sub(r"/\*.*?\*/", "", decl).strip()
        if decl:
            names = (
                decl.split(None, 1)[1] if not decl.startswith("struct") else decl.split(None, 2)[2]
            )
            fields += [n.strip() for n in names.split(",")]
    return fields


def test_boot_regs_mirror_the_c_struct():
    path = Path(__file__).resolve().parents[2] / "native" / "vmmcore.h"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    header = path.read_text()
    assert list(BootRegs._fields) == _c_struct_fields(
        header, "vmm_boot_regs"
    )
    assert list(Segment._fields) == _c_struct_fields(header, "vmm_segment")
