"""bzImage setup-header parsing (Documentation/arch/x86/boot.rst)."""

import io

import pytest

from vmmd.vm.boot.bzimage import parse_bzimage


def parse(data: bytes):
    return parse_bzimage(io.BytesIO(data), len(data))


def test_good_header(make_bzimage):
    kernel = parse(make_bzimage(setup_sects=1, payload=b"\xcc" * 5000))
    assert kernel.kind == "bzimage"
    assert kernel.entry64 == 0x100200 and kernel.pvh_entry is None
    (payload,) = kernel.segments
    assert (payload.offset, payload.gpa, payload.file_size) == (1024, 0x100000, 5000)
    # relocatable, 2 MiB aligned: the decompressor works at pref_address (16 MiB) for init_size
    assert (kernel.low, kernel.high) == (0x100000, 0x100_0000 + 0x100_0000)
    assert len(kernel.setup_header) == 0x26C - 0x1F1
    assert kernel.initrd_addr_max == 0x7FFF_FFFF and kernel.cmdline_limit == 2048


def test_setup_sects_zero_means_four(make_bzimage):
    assert parse(make_bzimage(setup_sects=0)).segments[0].offset == 5 * 512


def test_non_relocatable_kernel_decompresses_at_pref_address(make_bzimage):
    kernel = parse(make_bzimage(relocatable=0, pref_address=0x200_0000, init_size=0x80_0000))
    assert kernel.high == 0x280_0000


def test_short_cmdline_size_limits_the_cmdline(make_bzimage):
    assert parse(make_bzimage(cmdline_size=255)).cmdline_limit == 256


def test_header_copy_is_capped_at_the_zero_page_field(make_bzimage):
    assert len(parse(make_bzimage(header_end=0x2F0)).setup_header) == 0x290 - 0x1F1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"version": 0x020B}, "boot protocol 2.11 is older than 2.12"),
        ({"xloadflags": 0x2}, "XLF_KERNEL_64 not set"),
        ({"loadflags": 0}, "zImage"),
        ({"header_end": 0x250}, "setup header ends at 0x250"),
        ({"kernel_alignment": 0x30_0000}, "not a power of two"),
        # implausible headers (found accepted before): each is refused, not booted
        ({"kernel_alignment": 0}, "kernel_alignment 0x0 is not a power of two"),
        ({"kernel_alignment": 0, "relocatable": 0}, "kernel_alignment 0x0 is not a power"),
        ({"kernel_alignment": 0x30_0000, "relocatable": 0}, "not a power of two"),
        ({"setup_sects": 255}, "setup_sects 255 exceeds 63"),
        ({"cmdline_size": 0xFFFF_FFFF}, "cmdline_size 0xffffffff is outside 255..1048576"),
        ({"cmdline_size": 0}, "cmdline_size 0x0 is outside"),
        ({"relocatable": 0, "pref_address": 0}, "pref_address 0x0 is below 0x100000"),
        ({"relocatable": 0, "pref_address": 0x100_1000}, "not aligned to kernel_alignment"),
        ({"init_size": 0}, "init_size is 0"),
        ({"init_size": 0x4000_0000}, "past the boot identity map"),
        ({"payload": b""}, "no protected-mode kernel"),
    ],
)
def test_bad_headers_are_refused(make_bzimage, kwargs, message, refused):
    refused("boot.kernel_path", message, parse, make_bzimage(**kwargs))


def test_bad_magic_is_refused(make_bzimage, refused):
    data = bytearray(make_bzimage())
    data[0x202:0x206] = b"HdrX"
    refused("boot.kernel_path", '"HdrS"', parse, bytes(data))
    data[0x1FE] = 0
    refused("boot.kernel_path", "boot_flag", parse, bytes(data))


def test_truncated_header_is_refused(make_bzimage, refused):
    refused("boot.kernel_path", "truncated: setup header", parse, make_bzimage()[:0x240])
