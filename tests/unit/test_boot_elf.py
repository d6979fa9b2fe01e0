"""ELF vmlinux parsing: synthetic files, truncated and corrupt ones, and the real build if any."""

import io
import struct

import pytest

from vmmd.vm.boot.elf import parse_elf
from vmmd.vm.boot.image import LoadSegment
from vmmd.vm.boot.loader import inspect_kernel, load, plan_boot

LOAD = 0x1000000


def parse(data: bytes):
    return parse_elf(io.BytesIO(data), len(data))


def test_segments_entry_and_extent(make_elf):
    data = make_elf(segments=((LOAD, b"A" * 100, 0x2000), (LOAD + 0x200000, b"B" * 10, 10)))
    kernel = parse(data)
    assert kernel.kind == "elf"
    assert kernel.entry64 == LOAD and kernel.pvh_entry is None
    assert kernel.segments[0] == LoadSegment(64 + 2 * 56, LOAD, 100, 0x2000)
    assert kernel.segments[1].gpa == LOAD + 0x200000
    assert (kernel.low, kernel.high) == (LOAD, LOAD + 0x200000 + 10)
    assert kernel.setup_header[0x202 - 0x1F1 : 0x206 - 0x1F1] == b"HdrS"


@pytest.mark.parametrize("size", [4, 8])
def test_pvh_note_of_either_width(make_elf, size):
    kernel = parse(make_elf(pvh_entry=LOAD + 0x40, pvh_size=size))
    assert kernel.pvh_entry == LOAD + 0x40


@pytest.mark.parametrize(
    "cut, message",
    [
        (10, "truncated: ELF header"),
        (64 + 20, "truncated: program headers"),
        (64 + 56 + 50, "truncated: segment at"),
    ],
)
def test_truncated_files_are_refused(make_elf, cut, message, refused):
    refused("boot.kernel_path", message, parse, make_elf()[:cut])


def test_truncated_note_is_refused(make_elf, refused):
    refused("boot.kernel_path", "truncated: PT_NOTE", parse, make_elf(pvh_entry=LOAD)[:-4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ident": b"\x7fELF\x01\x01\x01"}, "not a 64-bit ELF"),
        ({"ident": b"\x7fELF\x02\x02\x01"}, "not a little-endian ELF"),
        ({"machine": 3}, "not an x86-64 ELF (e_machine 3)"),
        ({"e_type": 3}, "not an executable ELF"),
        ({"segments": ((0x80000, b"x", 1),), "entry": 0x80000}, "overlaps the boot area"),
        ({"segments": ((LOAD, b"x" * 8, 4),)}, "p_filesz 8 > p_memsz 4"),
        ({"segments": ((LOAD, b"x", 0x2000), (LOAD + 0x1000, b"y", 1))}, "overlap"),
        ({"segments": ((0x3FFF_F000, b"x", 0x2000),), "entry": 0x3FFF_F000}, "past 0x40000000"),
        ({"entry": LOAD + 0x10000}, "entry point 0x1010000 is not inside"),
        ({"pvh_entry": 0x200000}, "PVH entry point 0x200000 is not inside"),
        ({"segments": ()}, "program headers (want 1..64)"),
    ],
)
def test_corrupt_files_are_refused(make_elf, kwargs, message, refused):
    refused("boot.kernel_path", message, parse, make_elf(**kwargs))


def test_no_load_segment_is_refused(make_elf, refused):
    refused("boot.kernel_path", "no loadable (PT_LOAD) segment", parse, make_elf(segments=((LOAD, b"", 0),)))


def test_bad_note_size_is_refused(make_elf, refused):
    data = bytearray(make_elf(pvh_entry=LOAD))
    # descsz of the Xen note: after the GNU note (12 + 4 + 20 bytes) in the PT_NOTE segment
    note_at = len(data) - (12 + 4 + 8)
    struct.pack_into("<I", data, note_at + 4, 2)
    refused("boot.kernel_path", "PVH entry note of 2 bytes", parse, bytes(data))


def test_note_running_past_its_segment_is_refused(make_elf, refused):
    data = bytearray(make_elf(pvh_entry=LOAD))
    struct.pack_into("<I", data, len(data) - 24 + 4, 0x1000)
    refused("boot.kernel_path", "runs past its PT_NOTE segment", parse, bytes(data))


def test_bad_phentsize_is_refused(make_elf, refused):
    data = bytearray(make_elf())
    struct.pack_into("<H", data, 54, 32)
    refused("boot.kernel_path", "e_phentsize 32", parse, bytes(data))


def test_built_vmlinux(guest_file, fake_memory, opened):
    path = guest_file("vmlinux")
    kernel = inspect_kernel(opened(path))
    assert kernel.kind == "elf"
    assert kernel.low >= 0x100000 and kernel.low <= kernel.entry64 < kernel.high
    assert kernel.pvh_entry is not None, "our guest config enables PVH"
    mem = fake_memory(64 << 20)
    regs = load(mem, plan_boot(kernel, None, 64 << 20, 1, "console=ttyS0"), opened(path))
    assert regs.rip == kernel.pvh_entry
    first = kernel.segments[0]
    with open(path, "rb") as f:
        f.seek(first.offset)
        assert mem.read(first.gpa, 4096) == f.read(4096)


def test_built_bzimage(guest_file, opened):
    kernel = inspect_kernel(opened(guest_file("bzImage")))
    assert kernel.kind == "bzimage" and kernel.entry64 == 0x100200


@pytest.mark.parametrize("offset", [2**64 - 1, 2**63, 2**63 - 1])
def test_note_offset_past_any_file_is_refused(make_elf, write_file, opened, refused, offset):
    """Found: a PT_NOTE p_offset of 2^64-1 made the file seek fail as an internal error."""
    data = bytearray(make_elf(pvh_entry=LOAD))
    struct.pack_into("<Q", data, 64 + 56 + 8, offset)  # the PT_NOTE header, after the PT_LOAD
    refused("boot.kernel_path", "truncated: PT_NOTE segment", inspect_kernel,
            opened(write_file("vmlinux", bytes(data))))
