"""The guest kernel command line.

This module owns the default command line, the platform workarounds added on a PVM host, how a
user's `--cmdline` (replaces the default) and `--append` (adds words) combine, the
`virtio_mmio.device=` words that announce devices, and validation: printable ASCII only, at
most COMMAND_LINE_SIZE bytes including the terminating NUL.
"""

from __future__ import annotations

import os

from vmmd.errors import InvalidSpecError
from vmmd.vm.boot.image import CMDLINE
from vmmd.vm.layout import COMMAND_LINE_SIZE, KiB

DEFAULT_CMDLINE = (
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd quiet"
)
# On a PVM host the guest's ring-0 code is emulated and the emulator lacks some instructions
# (shared/PLATFORM.md).  Linux 6.1 reads at most 127 characters of the clearcpuid= value, and only
# the last clearcpuid= word.  noxsave also clears what depends on XSAVE (AVX, AVX2, PKU), so those
# need no room in the list; erms/fsrm go because with them every `rep movsb` moves one byte per
# emulated step.  no-kvm-hypercalls (patches/0004 of our kernel): KVM hypercalls (PV IPIs, sched
# yield, PV spinlock kicks) never complete there - an SMP guest's first PV IPI spins forever.
PVM_WORKAROUNDS = (
    "noxsave no-kvm-hypercalls clearcpuid=cx16,popcnt,rdrand,rdseed,fsgsbase,pcid,invpcid,smap,"
    "rdpid,aes,pclmulqdq,sha_ni,clflushopt,clwb,movbe,sse4_2,erms,fsrm"
)
PVM_MODULE_PATH = "/sys/module/kvm_pvm"


def is_pvm_host(module_path: str | os.PathLike[str] = PVM_MODULE_PATH) -> bool:
    """Whether the host's KVM is PVM (its module directory exists).  (os.path, not
    pathlib: `vmmd run` does not import pathlib, urllib and ipaddress, ~3 ms.)"""
    return os.path.exists(module_path)


def default_cmdline(pvm_host: bool | None = None) -> str:
    """The default command line; `pvm_host` None means probe this host."""
    if pvm_host is None:
        pvm_host = is_pvm_host()
    return f"{DEFAULT_CMDLINE} {PVM_WORKAROUNDS}" if pvm_host else DEFAULT_CMDLINE


def append_words(cmdline: str, *words: str) -> str:
    """`cmdline` with `words` added at the end, single-space separated."""
    return " ".join(part for part in (cmdline.strip(), *(w.strip() for w in words)) if part)


def build_cmdline(
    cmdline: str | None = None, append: str | None = None, pvm_host: bool | None = None
) -> str:
    """The user's cmdline if given (replacing the default entirely), else the default; plus `append`."""
    base = default_cmdline(pvm_host) if cmdline is None else cmdline
    return append_words(base, append or "")


def virtio_mmio_word(base: int, irq: int, size: int = 4 * KiB) -> str:
    """The `virtio_mmio.device=` word announcing a device (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES)."""
    return f"virtio_mmio.device={size // KiB}K@{base:#x}:{irq}"


def encode_cmdline(cmdline: str, limit: int = COMMAND_LINE_SIZE) -> bytes:
    """The NUL-terminated bytes to write; refuses non-printable-ASCII or more than `limit` bytes."""
    bad = next((c for c in cmdline if not " " <= c <= "~"), None)
    if bad is not None:
        raise InvalidSpecError(CMDLINE, f"character {bad!r} is not printable ASCII")
    if len(cmdline) + 1 > limit:
        raise InvalidSpecError(
            CMDLINE, f"{len(cmdline)} bytes; the kernel takes at most {limit - 1}"
        )
    return cmdline.encode("ascii") + b"\0"
