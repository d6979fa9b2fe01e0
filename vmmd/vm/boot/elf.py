"""ELF64 x86-64 vmlinux parsing (an uncompressed kernel, ET_EXEC).

This module owns reading an ELF kernel's headers: the PT_LOAD segments (loaded at p_paddr),
the 64-bit entry e_entry (physical for an x86 vmlinux) and the PVH entry from the "Xen"
XEN_ELFNOTE_PHYS32_ENTRY note.  It reads only headers and notes, never segment contents, and
checks every offset and size against the file: a bad file raises InvalidSpecError(boot.kernel_path, ...).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from typing import BinaryIO

from vmmd.vm.boot.image import KernelImage, LoadSegment, kernel_error, read_exact
from vmmd.vm.boot.params import synthesized_setup_header
from vmmd.vm.layout import COMMAND_LINE_SIZE, HIMEM_START, IDENTITY_MAP_END

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen\0"

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # ident type machine version entry phoff shoff flags ...
PHDR = struct.Struct("<IIQQQQQQ")  # type flags offset vaddr paddr filesz memsz align
NHDR = struct.Struct("<III")  # namesz descsz type
MAX_PHNUM = 64
MAX_NOTES_SIZE = 64 * 1024
# Initrd placement and cmdline for a vmlinux: no header limits beyond the boot protocol's own.
ELF_INITRD_ADDR_MAX = 0xFFFF_FFFF


def is_elf(head: bytes) -> bool:
    """Whether the first bytes of a file carry the ELF magic."""
    return head.startswith(ELF_MAGIC)


def _check_ident(ehdr: tuple) -> None:
    ident, e_type, machine = ehdr[0], ehdr[1], ehdr[2]
    if ident[:4] != ELF_MAGIC:
        raise kernel_error("not an ELF file (bad magic)")
    if ident[4] != ELFCLASS64:
        raise kernel_error(f"not a 64-bit ELF (class {ident[4]})")
    if ident[5] != ELFDATA2LSB:
        raise kernel_error(f"not a little-endian ELF (data encoding {ident[5]})")
    if machine != EM_X86_64:
        raise kernel_error(f"not an x86-64 ELF (e_machine {machine})")
    if e_type != ET_EXEC:
        raise kernel_error(f"not an executable ELF (e_type {e_type}, want ET_EXEC)")


def _program_headers(f: BinaryIO, file_size: int) -> tuple[int, list[tuple]]:
    """(e_entry, program headers) after checking the ELF header."""
    ehdr = EHDR.unpack(read_exact(f, 0, EHDR.size, "ELF header"))
    _check_ident(ehdr)
    entry, phoff, phentsize, phnum = ehdr[4], ehdr[5], ehdr[9], ehdr[10]
    if phentsize != PHDR.size:
        raise kernel_error(f"corrupt ELF: e_phentsize {phentsize}, want {PHDR.size}")
    if not 1 <= phnum <= MAX_PHNUM:
        raise kernel_error(f"corrupt ELF: {phnum} program headers (want 1..{MAX_PHNUM})")
    if phoff + phnum * PHDR.size > file_size:
        raise kernel_error(
            f"truncated: program headers at {phoff:#x} end past the file ({file_size} bytes)"
        )
    table = read_exact(f, phoff, phnum * PHDR.size, "program headers")
    return entry, [PHDR.unpack_from(table, i * PHDR.size) for i in range(phnum)]


def _load_segment(ph: tuple, file_size: int) -> LoadSegment:
    _, _, offset, _, paddr, filesz, memsz, _ = ph
    seg = LoadSegment(offset=offset, gpa=paddr, file_size=filesz, mem_size=memsz)
    if offset + filesz > file_size:
        raise kernel_error(
            f"truncated: segment at {offset:#x} with {filesz} bytes ends past the file"
        )
    if filesz > memsz:
        raise kernel_error(
            f"corrupt ELF: segment at {paddr:#x} has p_filesz {filesz} > p_memsz {memsz}"
        )
    if paddr < HIMEM_START:
        raise kernel_error(f"segment at {paddr:#x} overlaps the boot area below {HIMEM_START:#x}")
    if seg.end > IDENTITY_MAP_END:
        raise kernel_error(
            f"segment at {paddr:#x} ends past {IDENTITY_MAP_END:#x} (the boot identity map)"
        )
    return seg


def _check_no_overlap(segments: list[LoadSegment]) -> None:
    for prev, cur in itertools.pairwise(segments):
        if cur.gpa < prev.end:
            raise kernel_error(f"corrupt ELF: segments at {prev.gpa:#x} and {cur.gpa:#x} overlap")


def _notes(data: bytes, align: int) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each note in a PT_NOTE segment."""
    pos = 0
    while pos + NHDR.size <= len(data):
        namesz, descsz, ntype = NHDR.unpack_from(data, pos)
        name_at = pos + NHDR.size
        desc_at = name_at + -(-namesz // align) * align
        pos = desc_at + -(-descsz // align) * align
        if desc_at + descsz > len(data):
            raise kernel_error("corrupt ELF: a note runs past its PT_NOTE segment")
        yield data[name_at : name_at + namesz], ntype, data[desc_at : desc_at + descsz]


def _pvh_entry(f: BinaryIO, notes: list[tuple]) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY value, if any PT_NOTE segment has it."""
    for ph in notes:
        offset, filesz, align = ph[2], ph[5], ph[7]
        if filesz > MAX_NOTES_SIZE:
            raise kernel_error(f"corrupt ELF: PT_NOTE segment of {filesz} bytes")
        data = read_exact(f, offset, filesz, "PT_NOTE segment")
        for name, ntype, desc in _notes(data, 8 if align == 8 else 4):
            if name == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) not in (4, 8):
                    raise kernel_error(f"corrupt ELF: PVH entry note of {len(desc)} bytes")
                return int.from_bytes(desc, "little")
    return None


def _check_entry(what: str, entry: int, segments: list[LoadSegment]) -> None:
    if not any(seg.gpa <= entry < seg.gpa + seg.file_size for seg in segments):
        raise kernel_error(f"{what} {entry:#x} is not inside a loaded segment")


def parse_elf(f: BinaryIO, file_size: int) -> KernelImage:
    """Validate an ELF vmlinux opened as `f` (of `file_size` bytes) and describe its loading."""
    entry, phdrs = _program_headers(f, file_size)
    segments = sorted(
        (_load_segment(ph, file_size) for ph in phdrs if ph[0] == PT_LOAD and ph[6] > 0),
        key=lambda seg: seg.gpa,
    )
    if not segments:
        raise kernel_error("ELF has no loadable (PT_LOAD) segment")
    _check_no_overlap(segments)
    _check_entry("entry point", entry, segments)
    pvh_entry = _pvh_entry(f, [ph for ph in phdrs if ph[0] == PT_NOTE])
    if pvh_entry is not None:
        _check_entry("PVH entry point", pvh_entry, segments)
    return KernelImage(
        kind="elf",
        file_size=file_size,
        segments=tuple(segments),
        entry64=entry,
        pvh_entry=pvh_entry,
        low=segments[0].gpa,
        high=max(seg.end for seg in segments),
        setup_header=synthesized_setup_header(),
        initrd_addr_max=ELF_INITRD_ADDR_MAX,
        cmdline_limit=COMMAND_LINE_SIZE,
    )
