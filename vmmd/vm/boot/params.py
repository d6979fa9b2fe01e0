"""Boot information the guest kernel reads: the Linux zero page and the PVH start_info.

This module owns the layout of `struct boot_params` and its `struct setup_header` (as named
offsets: arch/x86/include/uapi/asm/bootparam.h, Documentation/arch/x86/boot.rst), the setup
header synthesized for an ELF vmlinux, the guest memory map (e820 / PVH memmap), and the PVH
`hvm_start_info` with its module list and memory map (xen/include/public/arch-x86/hvm/start_info.h).
Setup-header offsets are the same in a bzImage file and in the zero page, so bzimage.py reads
the file with these fields too.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from enum import IntEnum

from vmmd.record import Record
from vmmd.vm.layout import (
    ACPI_START,
    BIOS_AREA_END,
    CMDLINE_START,
    COMMAND_LINE_SIZE,
    EBDA_START,
    HIMEM_START,
    PVH_INFO_START,
    PVH_MEMMAP_START,
    PVH_MODLIST_START,
    ZERO_PAGE_START,
    Region,
    ram_regions,
)


class Field(Record):
    """A little-endian integer at a fixed offset of the zero page (or a bzImage file)."""

    offset: int
    fmt: str

    def get(self, buf: bytes | bytearray) -> int:
        return struct.unpack_from(self.fmt, buf, self.offset)[0]

    def put(self, buf: bytearray, value: int) -> None:
        struct.pack_into(self.fmt, buf, self.offset, value)


ZERO_PAGE_SIZE = 4096

# struct boot_params
ACPI_RSDP_ADDR = Field(0x070, "<Q")  # read by Linux 5.0+ before it scans for the RSDP
EXT_RAMDISK_IMAGE = Field(0x0C0, "<I")
EXT_RAMDISK_SIZE = Field(0x0C4, "<I")
EXT_CMD_LINE_PTR = Field(0x0C8, "<I")
E820_ENTRIES = Field(0x1E8, "<B")
SETUP_HEADER_START = 0x1F1
SETUP_HEADER_LIMIT = 0x290  # edd_mbr_sig_buffer: boot_params.hdr (+ padding) ends here
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")  # addr, size, type (packed, 20 bytes)

# struct setup_header, at its zero-page offsets
SETUP_SECTS = Field(0x1F1, "<B")
BOOT_FLAG = Field(0x1FE, "<H")
HEADER_LENGTH = Field(0x201, "<B")  # the setup header ends at 0x202 + this byte
HEADER = Field(0x202, "<I")
VERSION = Field(0x206, "<H")
TYPE_OF_LOADER = Field(0x210, "<B")
LOADFLAGS = Field(0x211, "<B")
RAMDISK_IMAGE = Field(0x218, "<I")
RAMDISK_SIZE = Field(0x21C, "<I")
CMD_LINE_PTR = Field(0x228, "<I")
INITRD_ADDR_MAX = Field(0x22C, "<I")
KERNEL_ALIGNMENT = Field(0x230, "<I")
RELOCATABLE_KERNEL = Field(0x234, "<B")
XLOADFLAGS = Field(0x236, "<H")
CMDLINE_SIZE = Field(0x238, "<I")
PREF_ADDRESS = Field(0x258, "<Q")
INIT_SIZE = Field(0x260, "<I")
HEADER_LENGTH_BASE = 0x202
SETUP_HEADER_MIN_END = 0x268  # end of the protocol 2.12 fields (handover_offset)

BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
BOOT_PROTOCOL_MIN = 0x020C
LOADER_TYPE_UNDEFINED = 0xFF
LOADED_HIGH = 0x01  # loadflags: protected-mode kernel at 0x100000
XLF_KERNEL_64 = 0x01  # xloadflags: has the 64-bit entry at load address + 0x200
ELF_KERNEL_ALIGNMENT = 0x0100_0000

# PVH (xen/include/public/arch-x86/hvm/start_info.h)
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1  # has memmap_paddr / memmap_entries
# magic version flags nr_modules modlist_paddr cmdline_paddr rsdp_paddr memmap_paddr
# memmap_entries reserved
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr size cmdline_paddr reserved
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")  # addr size type reserved


class MemoryType(IntEnum):
    """e820 / PVH memmap entry types."""

    RAM = 1
    RESERVED = 2


class MemoryMapEntry(Record):
    addr: int
    size: int
    type: MemoryType


def memory_map(mem_bytes: int, *, acpi: bool = False) -> tuple[MemoryMapEntry, ...]:
    """The guest's RAM as e820 entries: [0, EBDA), [HIMEM, low end), [4 GiB, ...) if any;
    with ACPI, [ACPI_START, 1 MiB) reserved between them (the tables and the VMGenID page)."""
    entries = [MemoryMapEntry(0, EBDA_START, MemoryType.RAM)]
    if acpi:
        entries.append(MemoryMapEntry(ACPI_START, BIOS_AREA_END - ACPI_START,
                                      MemoryType.RESERVED))
    for region in ram_regions(mem_bytes):
        start = max(region.gpa, HIMEM_START)
        entries.append(MemoryMapEntry(start, region.end - start, MemoryType.RAM))
    return tuple(entries)


def synthesized_setup_header() -> bytes:
    """boot_params.hdr for an ELF vmlinux, which has none (as Firecracker's loader writes it)."""
    page = bytearray(ZERO_PAGE_SIZE)
    BOOT_FLAG.put(page, BOOT_FLAG_MAGIC)
    HEADER.put(page, HDRS_MAGIC)
    VERSION.put(page, BOOT_PROTOCOL_MIN)
    LOADFLAGS.put(page, LOADED_HIGH)
    KERNEL_ALIGNMENT.put(page, ELF_KERNEL_ALIGNMENT)
    CMDLINE_SIZE.put(page, COMMAND_LINE_SIZE - 1)
    return bytes(page[SETUP_HEADER_START:SETUP_HEADER_MIN_END])


def _put_split(page: bytearray, low: Field, high: Field, value: int) -> None:
    """Store a 64-bit value as a 32-bit header field plus its ext_ high half."""
    low.put(page, value & 0xFFFF_FFFF)
    high.put(page, value >> 32)


def _pack_rows(buf: bytearray, offset: int, layout: struct.Struct, rows: Iterable[tuple]) -> None:
    for i, row in enumerate(rows):
        layout.pack_into(buf, offset + i * layout.size, *row)


def build_zero_page(
    setup_header: bytes, initrd: Region | None, memmap: Sequence[MemoryMapEntry],
    rsdp: int = 0,
) -> bytes:
    """The zero page for the 64-bit boot protocol (written at ZERO_PAGE_START); `rsdp`: the
    ACPI RSDP's address, 0 for none."""
    if len(setup_header) > SETUP_HEADER_LIMIT - SETUP_HEADER_START:
        raise ValueError(f"setup header of {len(setup_header)} bytes is too long")
    if len(memmap) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(memmap)} e820 entries exceed {E820_MAX_ENTRIES}")
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER_START : SETUP_HEADER_START + len(setup_header)] = setup_header
    TYPE_OF_LOADER.put(page, LOADER_TYPE_UNDEFINED)
    _put_split(page, CMD_LINE_PTR, EXT_CMD_LINE_PTR, CMDLINE_START)
    initrd = initrd or Region(0, 0)
    _put_split(page, RAMDISK_IMAGE, EXT_RAMDISK_IMAGE, initrd.gpa)
    _put_split(page, RAMDISK_SIZE, EXT_RAMDISK_SIZE, initrd.size)
    ACPI_RSDP_ADDR.put(page, rsdp)
    E820_ENTRIES.put(page, len(memmap))
    _pack_rows(page, E820_TABLE, E820_ENTRY, ((e.addr, e.size, e.type) for e in memmap))
    return bytes(page)


def build_start_info(initrd: Region | None, memmap: Sequence[MemoryMapEntry],
                     rsdp: int = 0) -> bytes:
    """hvm_start_info + module list + memory map, as one blob written at PVH_INFO_START;
    `rsdp`: the ACPI RSDP's address (rsdp_paddr), 0 for none."""
    memmap_offset = PVH_MEMMAP_START - PVH_INFO_START
    blob = bytearray(memmap_offset + len(memmap) * HVM_MEMMAP_ENTRY.size)
    if PVH_INFO_START + len(blob) > ZERO_PAGE_START:
        raise ValueError(f"{len(memmap)} PVH memmap entries do not fit")
    HVM_START_INFO.pack_into(
        blob, 0,
        HVM_START_MAGIC, HVM_START_VERSION, 0,
        0 if initrd is None else 1,
        0 if initrd is None else PVH_MODLIST_START,
        CMDLINE_START, rsdp, PVH_MEMMAP_START, len(memmap), 0,
    )  # fmt: skip
    if initrd is not None:
        HVM_MODLIST_ENTRY.pack_into(
            blob, PVH_MODLIST_START - PVH_INFO_START, initrd.gpa, initrd.size, 0, 0
        )
    _pack_rows(blob, memmap_offset, HVM_MEMMAP_ENTRY, ((e.addr, e.size, e.type, 0) for e in memmap))
    return bytes(blob)
