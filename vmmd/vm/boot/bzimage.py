"""bzImage parsing (Linux x86 boot protocol, Documentation/arch/x86/boot.rst).

This module owns reading a bzImage's setup header and deciding where its protected-mode part
goes: it is loaded at HIMEM (0x100000) and entered at load address + 0x200 in 64-bit mode.
The decompressor then works in [buffer, buffer + init_size), where buffer is pref_address, or
the load address rounded up to kernel_alignment if that is higher and the kernel is
relocatable (arch/x86/boot/compressed/head_64.S); all of that must be RAM.  Requires protocol
2.12+ with XLF_KERNEL_64.  Only the first sectors are read; a bad file raises
InvalidSpecError(boot.kernel_path, ...).
"""

from __future__ import annotations

from typing import BinaryIO

from vmmd.vm.boot.image import KernelImage, LoadSegment, kernel_error, read_exact
from vmmd.vm.boot.params import (
    BOOT_FLAG,
    BOOT_FLAG_MAGIC,
    BOOT_PROTOCOL_MIN,
    CMDLINE_SIZE,
    HDRS_MAGIC,
    HEADER,
    HEADER_LENGTH,
    HEADER_LENGTH_BASE,
    INIT_SIZE,
    INITRD_ADDR_MAX,
    KERNEL_ALIGNMENT,
    LOADED_HIGH,
    LOADFLAGS,
    PREF_ADDRESS,
    RELOCATABLE_KERNEL,
    SETUP_HEADER_LIMIT,
    SETUP_HEADER_MIN_END,
    SETUP_HEADER_START,
    SETUP_SECTS,
    VERSION,
    XLF_KERNEL_64,
    XLOADFLAGS,
)
from vmmd.vm.layout import COMMAND_LINE_SIZE, HIMEM_START, IDENTITY_MAP_END

SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4
ENTRY64_OFFSET = 0x200
# The real-mode part (boot sector + setup) must fit its 32 KiB segment with the stack and heap
# above it (boot.rst, "memory layout"): at most 63 setup sectors.  Real kernels have ~30.
MAX_SETUP_SECTS = 63
# cmdline_size: protocol 2.06+ kernels take at least 255 bytes; x86 Linux's COMMAND_LINE_SIZE is
# 2048 (some configs raise it, never near a megabyte).  Outside this range the header is garbage.
CMDLINE_SIZE_RANGE = (255, 1 << 20)


def is_bzimage(head: bytes) -> bool:
    """Whether the first bytes of a file carry the "HdrS" setup header magic."""
    return len(head) >= HEADER.offset + 4 and HEADER.get(head) == HDRS_MAGIC


def _check_header(hdr: bytes) -> None:
    if BOOT_FLAG.get(hdr) != BOOT_FLAG_MAGIC:
        raise kernel_error(f"not a bzImage: boot_flag {BOOT_FLAG.get(hdr):#06x}, want 0xaa55")
    if HEADER.get(hdr) != HDRS_MAGIC:
        raise kernel_error('not a bzImage: no "HdrS" setup header')
    version = VERSION.get(hdr)
    if version < BOOT_PROTOCOL_MIN:
        raise kernel_error(f"boot protocol {version >> 8}.{version & 0xFF:02d} is older than 2.12")
    if not LOADFLAGS.get(hdr) & LOADED_HIGH:
        raise kernel_error("zImage (not loaded high) is not supported")
    if not XLOADFLAGS.get(hdr) & XLF_KERNEL_64:
        raise kernel_error("bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)")
    _check_plausible(hdr)


def _check_plausible(hdr: bytes) -> None:
    """Fields no real kernel has: a file that claims them is damaged or hostile."""
    align = KERNEL_ALIGNMENT.get(hdr)
    if align == 0 or align & (align - 1):
        raise kernel_error(f"corrupt bzImage: kernel_alignment {align:#x} is not a power of two")
    if SETUP_SECTS.get(hdr) > MAX_SETUP_SECTS:
        raise kernel_error(f"corrupt bzImage: setup_sects {SETUP_SECTS.get(hdr)} exceeds "
                           f"{MAX_SETUP_SECTS} (the real-mode part would pass 32 KiB)")
    size = CMDLINE_SIZE.get(hdr)
    if not CMDLINE_SIZE_RANGE[0] <= size <= CMDLINE_SIZE_RANGE[1]:
        raise kernel_error(f"corrupt bzImage: cmdline_size {size:#x} is outside "
                           f"{CMDLINE_SIZE_RANGE[0]}..{CMDLINE_SIZE_RANGE[1]}")
    pref = PREF_ADDRESS.get(hdr)
    if pref < HIMEM_START or pref % align:
        raise kernel_error(f"corrupt bzImage: pref_address {pref:#x} is below {HIMEM_START:#x} "
                           f"or not aligned to kernel_alignment {align:#x}")


def _setup_header(hdr: bytes) -> bytes:
    """boot_params.hdr bytes: 0x1f1 to 0x202 + byte at 0x201, capped at the zero page's field."""
    end = HEADER_LENGTH_BASE + HEADER_LENGTH.get(hdr)
    if end < SETUP_HEADER_MIN_END:
        raise kernel_error(
            f"corrupt bzImage: setup header ends at {end:#x}, before {SETUP_HEADER_MIN_END:#x}"
        )
    return hdr[SETUP_HEADER_START : min(end, SETUP_HEADER_LIMIT)]


def _decompress_buffer(hdr: bytes) -> int:
    """Where the decompressor places the kernel (head_64.S: relocatable → aligned load address)."""
    pref = PREF_ADDRESS.get(hdr)
    if not RELOCATABLE_KERNEL.get(hdr):
        return pref
    align = KERNEL_ALIGNMENT.get(hdr)
    return max(-(-HIMEM_START // align) * align, pref)


def parse_bzimage(f: BinaryIO, file_size: int) -> KernelImage:
    """Validate a bzImage opened as `f` (of `file_size` bytes) and describe its loading."""
    hdr = read_exact(f, 0, SETUP_HEADER_LIMIT, "setup header")
    _check_header(hdr)
    setup_header = _setup_header(hdr)
    payload_offset = ((SETUP_SECTS.get(hdr) or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE
    if payload_offset >= file_size:
        raise kernel_error(f"truncated: no protected-mode kernel after {payload_offset:#x}")
    payload = LoadSegment(
        payload_offset, HIMEM_START, file_size - payload_offset, file_size - payload_offset
    )
    init_size = INIT_SIZE.get(hdr)
    if init_size == 0:
        raise kernel_error("corrupt bzImage: init_size is 0")
    high = max(payload.end, _decompress_buffer(hdr) + init_size)
    if high > IDENTITY_MAP_END:
        raise kernel_error(f"kernel needs memory up to {high:#x}, past the boot identity map")
    return KernelImage(
        kind="bzimage",
        file_size=file_size,
        segments=(payload,),
        entry64=HIMEM_START + ENTRY64_OFFSET,
        pvh_entry=None,
        low=HIMEM_START,
        high=high,
        setup_header=setup_header,
        initrd_addr_max=INITRD_ADDR_MAX.get(hdr),
        cmdline_limit=min(COMMAND_LINE_SIZE, CMDLINE_SIZE.get(hdr) + 1),
    )
