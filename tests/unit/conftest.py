"""Fixtures of the unit tests: synthetic kernel files, a fake guest memory and a
fake of the C core's VM under a Manager (no KVM)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.framework import GUEST_DIR
from tests.framework.fake_native import FakeFactory
from tests.framework.fake_placement import FakePlacement
from vmmd.errors import InvalidSpecError
from vmmd.manager import Manager
from vmmd.native import NativeVm
from vmmd.vm.boot.image import INITRD_PATH, KERNEL_PATH
from vmmd.vm.boot.loader import BootFile, open_boot_file

KERNEL_LOAD = 0x1000000  # where synthetic vmlinux segments go (16 MiB, as a real vmlinux)


class FakeMemory:
    """Guest RAM from 0 as a bytearray; writes outside it fail like the C core's would.
    `loads` records each load_file (gpa, length) and `written` counts the bytes
    stored, so a test can see what the loader did not write."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.writes: list[tuple[int, int]] = []

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > len(self.buf):
            raise ValueError(f"write of {len(data)} bytes at {gpa:#x} outside guest RAM")
        self.buf[gpa : gpa + len(data)] = data
        self.writes.append((gpa, len(data)))

    def load_file(self, gpa: int, fd: int, offset: int, length: int,
                  field: tuple[str, ...]) -> None:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise InvalidSpecError(field, "file shrank while loading")
        self.write(gpa, data)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.buf[gpa : gpa + size])

    def u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.buf, gpa)[0]


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def build_elf(
    segments: tuple[tuple[int, bytes, int], ...] = ((KERNEL_LOAD, b"\xf4" * 256, 0x3000),),
    entry: int = KERNEL_LOAD,
    pvh_entry: int | None = None,
    pvh_size: int = 8,
    ident: bytes = b"\x7fELF\x02\x01\x01",
    e_type: int = 2,
    machine: int = 62,
) -> bytes:
    """An ELF64 file: one PT_LOAD per (paddr, data, memsz) and, with pvh_entry, a PT_NOTE
    holding a GNU build-id note then the Xen PHYS32_ENTRY note."""
    notes = b""
    if pvh_entry is not None:
        notes = _note(b"GNU\0", 3, bytes(20)) + _note(
            b"Xen\0", 18, pvh_entry.to_bytes(pvh_size, "little")
        )
    phnum = len(segments) + (1 if notes else 0)
    offset = 64 + phnum * 56
    phdrs, body = b"", b""
    for paddr, data, memsz in segments:
        vaddr = paddr + 0xFFFFFFFF80000000
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, 5, offset + len(body), vaddr, paddr, len(data), memsz, 0x200000
        )
        body += data
    if notes:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, offset + len(body), 0, 0, len(notes), len(notes), 4)
        body += notes
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH", ident.ljust(16, b"\0"), e_type, machine, 1, entry, 64, 0, 0, 64, 56,
        phnum, 64, 0, 0,
    )  # fmt: skip
    return ehdr + phdrs + body


def build_bzimage(
    version: int = 0x020F,
    xloadflags: int = 0x1,
    loadflags: int = 0x1,
    setup_sects: int = 1,
    payload: bytes = b"\xcc" * 4096,
    init_size: int = 0x100_0000,
    pref_address: int = 0x100_0000,
    kernel_alignment: int = 0x20_0000,
    relocatable: int = 1,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    header_end: int = 0x26C,
) -> bytes:
    """A bzImage: boot sector + setup sectors with a setup header, then `payload`."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, header_end - 0x202])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def expect_refused(field: str, message: str, fn: Callable[..., object], *args, **kwargs) -> None:
    """fn(*args, **kwargs) must raise InvalidSpecError naming `field`, with `message` in it."""
    with pytest.raises(InvalidSpecError) as e:
        fn(*args, **kwargs)
    assert e.value.field == field
    assert message in e.value.problem


@pytest.fixture
def refused() -> Callable[..., None]:
    return expect_refused


@pytest.fixture
def make_elf() -> Callable[..., bytes]:
    return build_elf


@pytest.fixture
def make_bzimage() -> Callable[..., bytes]:
    return build_bzimage


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, bytes], str]:
    def write(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    return write


@pytest.fixture
def opened() -> Iterator[Callable[..., BootFile]]:
    """opened(path, which="kernel"|"initrd") -> the file open as the loader takes it (closed
    after the test)."""
    fields = {"kernel": KERNEL_PATH, "initrd": INITRD_PATH}
    with ExitStack() as stack:
        yield lambda path, which="kernel": stack.enter_context(
            open_boot_file(str(path), fields[which]))


@pytest.fixture
def fake_memory() -> Callable[[int], FakeMemory]:
    return FakeMemory


def built_guest_file(name: str) -> Path:
    """A file the guest-kernel build produces, or skip (with the reason) if not built yet."""
    path = GUEST_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} is not built yet (guest-kernels/ builds it)")
    return path


@pytest.fixture
def guest_file() -> Callable[[str], Path]:
    return built_guest_file


@pytest.fixture(autouse=True)
def _no_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit tier runs on any machine: a test reaching for a real KVM VM
    (a missing native_factory) fails here, on this machine too.  A path that
    does not exist stays allowed: the C core refuses it before any VM."""
    real_init = NativeVm.__init__

    def guarded(self: NativeVm, kvm_path: str = "/dev/kvm") -> None:
        if os.path.exists(kvm_path):
            raise AssertionError(f"a unit test opened {kvm_path}: pass a fake native_factory")
        real_init(self, kvm_path)

    monkeypatch.setattr(NativeVm, "__init__", guarded)


@pytest.fixture
def kernel(tmp_path: Path) -> str:
    """A tiny ELF kernel the loader accepts (no guest runs it: the VMs are fakes)."""
    path = tmp_path / "vmlinux"
    path.write_bytes(build_elf())
    return str(path)


@pytest.fixture
def natives() -> FakeFactory:
    """The native_factory of `manager`: every fake VM it made, and their failures."""
    return FakeFactory()


@pytest.fixture
def make_manager(natives: FakeFactory) -> Iterator[Callable[..., Manager]]:
    """make_manager(**Manager kwargs) -> a Manager on `natives`' fake VMs; each is shut
    down after the test, which must leave every fake VM closed."""
    made: list[Manager] = []

    def make(**kwargs: object) -> Manager:
        factory = kwargs.pop("native_factory", natives)
        m = Manager(**{"placement": FakePlacement(factory), **kwargs})  # type: ignore[arg-type]
        made.append(m)
        return m

    yield make
    for m in made:
        m.shutdown(timeout_s=0)
        assert m.ids() == []
        assert m.placement.cells == {}, f"cells left leased: {m.placement.cells}"  # type: ignore[attr-defined]
        assert m.placement.closed  # type: ignore[attr-defined]
    assert all(vm.closed for vm in natives.vms), "a fake VM was never closed"


@pytest.fixture
def manager(make_manager: Callable[..., Manager]) -> Manager:
    return make_manager()
