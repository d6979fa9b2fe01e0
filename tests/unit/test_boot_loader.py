"""inspect_kernel / plan_boot / load against a fake guest memory (no KVM)."""

import os
import struct

import pytest

from vmmd.vm.boot.loader import inspect_initrd, inspect_kernel, load, plan_boot

MiB = 1 << 20
LOAD = 0x1000000
KERNEL_TEXT = bytes(range(256)) * 16


@pytest.fixture
def elf_kernel(make_elf, write_file, opened):
    path = write_file(
        "vmlinux", make_elf(segments=((LOAD, KERNEL_TEXT, 0x10000),), pvh_entry=LOAD + 0x80)
    )
    return opened(path), inspect_kernel(opened(path))


def test_inspect_detects_formats(make_bzimage, write_file, elf_kernel, opened):
    assert elf_kernel[1].kind == "elf"
    assert inspect_kernel(opened(write_file("bz", make_bzimage()))).kind == "bzimage"


def test_inspect_refuses_other_files(write_file, tmp_path, refused, opened):
    refused(
        "boot.kernel_path",
        "neither an ELF vmlinux nor a bzImage",
        inspect_kernel,
        opened(write_file("x", b"MZ" + bytes(4096))),
    )
    refused("boot.kernel_path", "cannot open", opened, str(tmp_path / "missing"))
    refused("boot.kernel_path", "is a directory, not a regular file", opened, str(tmp_path))
    os.mkfifo(tmp_path / "fifo")  # must be refused, not block waiting for a writer
    refused("boot.kernel_path", "is a FIFO, not a regular file", opened, str(tmp_path / "fifo"))
    refused("boot.initrd_path", "cannot open", opened, str(tmp_path / "missing"), "initrd")
    refused("boot.kernel_path", "is on procfs", opened, "/proc/self/status")
    refused("boot.initrd_path", "is on sysfs", opened,
            "/sys/kernel/mm/transparent_hugepage/enabled", "initrd")
    refused("boot.kernel_path", "contains a NUL byte", opened, str(tmp_path / "a\0b"))


@pytest.mark.parametrize("vcpus", [0, 33])
def test_plan_refuses_vcpu_counts(elf_kernel, vcpus, refused):
    refused("vcpus", "outside 1..32", plan_boot, elf_kernel[1], None, 64 * MiB, vcpus, "")


def test_plan_refuses_memory_too_small_for_the_kernel(make_bzimage, write_file, refused, opened):
    kernel = inspect_kernel(opened(write_file("bz", make_bzimage(init_size=0x200_0000))))  # to 48 MiB
    refused("memory_mib", "too small for the kernel", plan_boot, kernel, None, 32 * MiB, 1, "")
    assert plan_boot(kernel, None, 48 * MiB, 1, "").initrd is None


def test_plan_refuses_memory_too_small_for_kernel_and_initrd(elf_kernel, refused):
    refused("memory_mib", "too small for the kernel (up to 0x1010000) and a", plan_boot,
            elf_kernel[1], 20 * MiB, 32 * MiB, 1, "")  # fmt: skip


def test_plan_refuses_initrd_beyond_initrd_addr_max(make_bzimage, write_file, refused, opened):
    kernel = inspect_kernel(opened(write_file("bz", make_bzimage(initrd_addr_max=0x37FF_FFFF))))
    refused(
        "boot.initrd_path",
        "do not fit between the kernel end",
        plan_boot,
        kernel,
        900 * MiB,
        2048 * MiB,
        1,
        "",
    )
    plan = plan_boot(kernel, 8 * MiB, 2048 * MiB, 1, "")
    assert plan.initrd.end <= 0x3800_0000 and plan.initrd.gpa == 0x3800_0000 - 8 * MiB


def test_plan_refuses_empty_initrd_and_long_cmdline(elf_kernel, make_bzimage, write_file, refused,
                                                   opened):
    refused("boot.initrd_path", "is empty", plan_boot, elf_kernel[1], 0, 64 * MiB, 1, "")
    refused("boot.cmdline", "at most 2047", plan_boot, elf_kernel[1], None, 64 * MiB, 1, "x" * 2048)
    bz = inspect_kernel(opened(write_file("bz", make_bzimage(cmdline_size=255))))
    refused("boot.cmdline", "at most 255", plan_boot, bz, None, 64 * MiB, 1, "x" * 256)


def test_initrd_goes_high_and_page_aligned(elf_kernel):
    plan = plan_boot(elf_kernel[1], 5000, 64 * MiB, 2, "console=ttyS0")
    assert plan.initrd.gpa == 64 * MiB - 8192 and plan.initrd.size == 5000
    assert plan.pvh and plan.entry == LOAD + 0x80


def _load_64bit(elf_kernel, fake_memory, write_file, opened):
    path, kernel = elf_kernel
    initrd = opened(write_file("initrd", b"I" * 5000), "initrd")
    plan = plan_boot(
        kernel, inspect_initrd(initrd), 64 * MiB, 2, "console=ttyS0 quiet", force_64bit=True
    )
    mem = fake_memory(64 * MiB)
    return plan, mem, load(mem, plan, path, initrd)


def test_load_64_bit_entry(elf_kernel, fake_memory, write_file, opened):
    plan, mem, regs = _load_64bit(elf_kernel, fake_memory, write_file, opened)
    assert (regs.rip, regs.rsi, regs.cr3) == (LOAD, 0x7000, 0x9000)
    # kernel segment; its bss is left to fresh RAM (zero): nothing written there
    assert mem.read(LOAD, len(KERNEL_TEXT)) == KERNEL_TEXT
    bss = range(LOAD + len(KERNEL_TEXT), LOAD + 0x10000)
    assert not [w for w in mem.writes if w[0] < bss.stop and w[0] + w[1] > bss.start]
    assert mem.read(plan.initrd.gpa, 5000) == b"I" * 5000
    # cmdline, zero page, page tables, GDT, MP table
    assert mem.read(0x20000, 21) == b"console=ttyS0 quiet\0\0"
    zp = 0x7000
    assert mem.read(zp + 0x202, 4) == b"HdrS" and mem.buf[zp + 0x210] == 0xFF
    assert struct.unpack_from("<III", mem.buf, zp + 0x218) == (plan.initrd.gpa, 5000, 0)
    assert struct.unpack_from("<I", mem.buf, zp + 0x228)[0] == 0x20000
    assert mem.buf[zp + 0x1E8] == 2
    assert struct.unpack_from("<QQI", mem.buf, zp + 0x2D0 + 20) == (0x100000, 63 * MiB, 1)
    assert (
        mem.u64(0x9000) == 0xA003 and mem.u64(0xA000) == 0xB003 and mem.u64(0xB000 + 8) == 0x200083
    )
    assert mem.u64(0x508) == 0x00AF9B000000FFFF and mem.u64(0x520) == 0
    assert mem.read(0x9FC00, 4) == b"_MP_"
    assert mem.read(0x6000, 4) == bytes(4)  # no PVH start_info on this path


def test_load_pvh_entry(elf_kernel, fake_memory):
    path, kernel = elf_kernel
    plan = plan_boot(kernel, None, 64 * MiB, 1, "quiet")
    mem = fake_memory(64 * MiB)
    regs = load(mem, plan, path)
    assert (regs.rip, regs.rbx, regs.cr0) == (LOAD + 0x80, 0x6000, 0x11)
    assert struct.unpack_from("<II", mem.buf, 0x6000) == (0x336EC578, 1)
    assert mem.u64(0x6000 + 0x18) == 0x20000
    assert mem.u64(0x508) == 0x00CF9B000000FFFF
    assert mem.read(0x7000, 0x300) == bytes(0x300)  # no zero page
    assert mem.u64(0x9000) == 0  # no page tables


def test_load_bzimage(make_bzimage, write_file, fake_memory, opened):
    payload = b"\x90" * 3000
    path = opened(write_file("bz", make_bzimage(payload=payload, cmdline_size=511)))
    plan = plan_boot(inspect_kernel(path), None, 64 * MiB, 1, "quiet")
    mem = fake_memory(64 * MiB)
    regs = load(mem, plan, path)
    assert regs.rip == 0x100200 and mem.read(0x100000, 3000) == payload
    # the kernel's own header fields are kept (cmdline_size, xloadflags)
    assert struct.unpack_from("<I", mem.buf, 0x7000 + 0x238)[0] == 511
    assert struct.unpack_from("<H", mem.buf, 0x7000 + 0x236)[0] == 1


def test_load_refuses_a_kernel_that_shrank_since_inspection(elf_kernel, fake_memory, refused):
    f, kernel = elf_kernel
    plan = plan_boot(kernel, None, 64 * MiB, 1, "")
    os.truncate(f.path, 200)
    refused("boot.kernel_path", "file shrank while loading", load, fake_memory(64 * MiB), plan, f)


class CountingMemory:
    """Guest RAM that only counts what is stored in it (RAM is zero to start)."""

    def __init__(self) -> None:
        self.stored = 0

    def write(self, gpa: int, data: bytes) -> None:
        self.stored += len(data)

    def load_file(self, gpa: int, fd: int, offset: int, length: int, field: str) -> None:
        self.stored += length


def test_a_segment_claiming_much_memory_costs_only_its_file_bytes(make_elf, write_file, opened):
    """A 4 KiB segment whose p_memsz claims ~1 GiB: the loader writes its 4 KiB (and the
    boot structures), never the zeros (found: it used to write all of them)."""
    big = (1 << 30) - LOAD - MiB
    f = opened(write_file("vmlinux", make_elf(segments=((LOAD, KERNEL_TEXT, big),))))
    plan = plan_boot(inspect_kernel(f), None, 1 << 30, 1, "")
    mem = CountingMemory()
    load(mem, plan, f)
    assert len(KERNEL_TEXT) <= mem.stored < 64 * 1024
