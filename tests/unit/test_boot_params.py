"""Zero page, e820 and PVH start_info against the documented layouts (literal offsets).

Offsets come from Documentation/arch/x86/boot.rst, zero-page.rst and Xen's start_info.h, written
out here as numbers on purpose: they must not be derived from the code under test.
"""

import struct

from vmmd.vm.boot.params import (
    build_start_info,
    build_zero_page,
    memory_map,
    synthesized_setup_header,
)
from vmmd.vm.layout import Region

MiB, GiB = 1 << 20, 1 << 30


def u(fmt, buf, offset):
    return struct.unpack_from("<" + fmt, buf, offset)[0]


def e820(page):
    return [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(page[0x1E8])]


def test_zero_page_fields_for_an_elf_kernel():
    initrd = Region(0x7_000_000, 0x12_3456)
    page = build_zero_page(synthesized_setup_header(), initrd, memory_map(128 * MiB))
    assert len(page) == 4096
    assert u("H", page, 0x1FE) == 0xAA55  # boot_flag
    assert page[0x202:0x206] == b"HdrS"  # header
    assert u("H", page, 0x206) == 0x020C  # version
    assert page[0x210] == 0xFF  # type_of_loader
    assert page[0x211] & 0x01  # loadflags: LOADED_HIGH
    assert u("I", page, 0x228) == 0x20000  # cmd_line_ptr
    assert u("I", page, 0x0C8) == 0  # ext_cmd_line_ptr
    assert u("I", page, 0x230) == 0x100_0000  # kernel_alignment
    assert u("I", page, 0x218) == 0x7_000_000  # ramdisk_image
    assert u("I", page, 0x21C) == 0x12_3456  # ramdisk_size
    assert u("I", page, 0x0C0) == 0 and u("I", page, 0x0C4) == 0  # ext_ramdisk_*
    assert page[0x1EF] == 0  # sentinel: the kernel must not scrub our fields
    assert page[0x1E8] == 2  # e820_entries


def test_zero_page_splits_64_bit_initrd_fields():
    page = build_zero_page(synthesized_setup_header(), Region(0x1_2345_6000, 0x1_0000_1000), ())
    assert (u("I", page, 0x218), u("I", page, 0x0C0)) == (0x2345_6000, 0x1)
    assert (u("I", page, 0x21C), u("I", page, 0x0C4)) == (0x1000, 0x1)


def test_zero_page_keeps_a_copied_bzimage_header():
    header = bytes(i & 0xFF for i in range(0x1F1, 0x26C))  # stands for a kernel's header
    page = build_zero_page(header, None, ())
    assert page[0x1F1:0x210] == header[: 0x210 - 0x1F1]
    assert page[0x210] == 0xFF
    assert u("I", page, 0x218) == 0 and u("I", page, 0x21C) == 0


def test_e820_for_128_mib():
    page = build_zero_page(synthesized_setup_header(), None, memory_map(128 * MiB))
    assert e820(page) == [(0, 0x9FC00, 1), (0x100000, 128 * MiB - 0x100000, 1)]


def test_e820_for_5_gib_splits_around_the_mmio_hole():
    page = build_zero_page(synthesized_setup_header(), None, memory_map(5 * GiB))
    assert e820(page) == [
        (0, 0x9FC00, 1),
        (0x100000, 0xC000_0000 - 0x100000, 1),
        (0x1_0000_0000, 2 * GiB, 1),
    ]


def test_pvh_start_info_layout():
    initrd = Region(0x7_000_000, 0x5000)
    blob = build_start_info(initrd, memory_map(5 * GiB))
    assert u("I", blob, 0x00) == 0x336EC578  # magic
    assert u("I", blob, 0x04) == 1  # version
    assert u("I", blob, 0x0C) == 1  # nr_modules
    assert u("Q", blob, 0x10) == 0x6040  # modlist_paddr
    assert u("Q", blob, 0x18) == 0x20000  # cmdline_paddr
    assert u("Q", blob, 0x20) == 0  # rsdp_paddr
    assert u("Q", blob, 0x28) == 0x6080  # memmap_paddr
    assert u("I", blob, 0x30) == 3  # memmap_entries
    assert struct.unpack_from("<QQQQ", blob, 0x40) == (0x7_000_000, 0x5000, 0, 0)
    entries = [struct.unpack_from("<QQII", blob, 0x80 + 24 * i) for i in range(3)]
    assert entries[2] == (0x1_0000_0000, 2 * GiB, 1, 0)
    assert entries[0] == (0, 0x9FC00, 1, 0)


def test_pvh_start_info_without_initrd_has_no_modules():
    blob = build_start_info(None, memory_map(64 * MiB))
    assert u("I", blob, 0x0C) == 0 and u("Q", blob, 0x10) == 0
