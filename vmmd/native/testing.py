"""Devices without a VM, for the native test tier: guest memory the core
maps itself (between guard pages), and virtio devices the tests drive as a
guest driver would (registers, then notify).  Production code uses vm.py.
"""

from __future__ import annotations

from typing import Any, Self

from vmmd.native._lib import check, ffi, lib
from vmmd.native.types import VirtioStats, virtio_stats_of


class GuestMemory:
    """Guest physical memory without a VM: the native tier's fake guest RAM."""

    def __init__(self) -> None:
        self._mem = lib.vmm_mem_new()
        if self._mem == ffi.NULL:
            raise MemoryError("vmm_mem_new")

    def add_region(self, gpa: int, size: int) -> None:
        check(lib.vmm_mem_add_region(self._mem, gpa, size, ffi.NULL), "add memory region")

    def add_file_region(self, gpa: int, size: int, fd: int, offset: int = 0) -> None:
        """RAM mapped from fd (MAP_PRIVATE) as a restored VM's is; fd may be closed after."""
        check(lib.vmm_mem_add_file_region(self._mem, gpa, size, fd, offset),
              "add memory region from a file")

    def write(self, gpa: int, data: bytes) -> None:
        check(lib.vmm_mem_write(self._mem, gpa, data, len(data)), f"write guest 0x{gpa:x}")

    def read(self, gpa: int, length: int) -> bytes:
        buf = ffi.new("uint8_t[]", length)
        check(lib.vmm_mem_read(self._mem, gpa, buf, length), f"read guest 0x{gpa:x}")
        return bytes(ffi.buffer(buf, length))

    def load_file(self, gpa: int, fd: int, offset: int, length: int) -> int:
        """Bytes of fd read into RAM (its data extents only)."""
        return check(lib.vmm_mem_load_fd(self._mem, gpa, fd, offset, length), "load file")

    @property
    def handle(self) -> Any:
        return self._mem

    def close(self) -> None:
        if self._mem != ffi.NULL:
            lib.vmm_mem_free(self._mem)
            self._mem = ffi.NULL

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VirtioDevice:
    """A virtio device over a GuestMemory, without KVM: the native tier plays
    the guest driver (registers by offset, then QueueNotify)."""

    def __init__(self, mem: GuestMemory, dev: Any) -> None:
        self._dev = dev
        self._mem = mem  # keep the memory alive as long as the device

    def read_reg(self, off: int, size: int = 4) -> int:
        return lib.vmm_virtio_mmio_read(self._dev, off, size)

    def write_reg(self, off: int, value: int, size: int = 4) -> None:
        lib.vmm_virtio_mmio_write(self._dev, off, value, size)

    def stats(self) -> VirtioStats:
        s = ffi.new("struct vmm_virtio_stats *")
        lib.vmm_virtio_get_stats(self._dev, s)
        return virtio_stats_of(s)

    def close(self) -> None:
        if self._dev != ffi.NULL:
            lib.vmm_virtio_free(self._dev)
            self._dev = ffi.NULL

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _new_device(op: str, fn: Any, *args: Any) -> Any:
    out = ffi.new("struct vmm_virtio **")
    check(fn(*args, out), op)
    return out[0]


class VirtioBlock(VirtioDevice):
    """virtio-blk over an image open as fd (the device keeps its own duplicate)."""

    def __init__(self, mem: GuestMemory, fd: int, *, read_only: bool = False,
                 serial: str = "") -> None:
        super().__init__(mem, _new_device("create virtio-blk", lib.vmm_virtio_blk_new,
                                          mem.handle, fd, int(read_only), serial.encode()))


class VirtioRng(VirtioDevice):
    """The virtio entropy device: requests filled from the host's getrandom()."""

    def __init__(self, mem: GuestMemory, max_request: int = 0) -> None:
        """max_request: bytes per request, 1..65536 (0: 65536)."""
        super().__init__(mem, _new_device("create virtio-rng", lib.vmm_virtio_rng_new,
                                          mem.handle, max_request))


class VirtioNet(VirtioDevice):
    """virtio-net over a non-blocking frame fd (a tap; a SOCK_SEQPACKET
    socket in tests), which the caller keeps open and closes.  max_frame:
    the largest frame the fd passes without GSO (0: unknown)."""

    def __init__(self, mem: GuestMemory, fd: int, mac: bytes, max_frame: int = 0) -> None:
        if len(mac) != 6:
            raise ValueError("mac: 6 bytes")
        super().__init__(mem, _new_device("create virtio-net", lib.vmm_virtio_net_new,
                                          mem.handle, fd, mac, max_frame))

    def rx(self) -> None:
        """What the I/O thread does when the tap is readable."""
        lib.vmm_virtio_backend_ready(self._dev)


class VirtioVsock(VirtioDevice):
    """virtio-vsock: host clients through the listening Unix socket listen_fd,
    guest connects to "<name>_<port>" in the directory open as dir_fd (the
    device keeps duplicates of both)."""

    def __init__(self, mem: GuestMemory, listen_fd: int, dir_fd: int, guest_cid: int,
                 name: str) -> None:
        super().__init__(mem, _new_device("create virtio-vsock", lib.vmm_virtio_vsock_new,
                                          mem.handle, guest_cid, listen_fd, dir_fd,
                                          name.encode()))

    def backend_fd(self) -> int:
        """The device's epoll fd: readable when a host socket wants serving."""
        return int(lib.vmm_virtio_backend_fd(self._dev))

    def poll(self) -> None:
        """What the I/O thread does when backend_fd() is readable."""
        lib.vmm_virtio_backend_ready(self._dev)
