"""KVM-tier helpers: boot a guest in-process and collect what it did."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from vmmd.native import VmStats
from vmmd.spec import BootSpec, DriveSpec, EntropySpec, VmSpec
from vmmd.vm.builder import build_vm
from vmmd.vm.vm import StopInfo


@dataclass(frozen=True)
class GuestRun:
    stop: StopInfo
    console: str
    stats: VmStats


def run_guest(kernel: Path, cmdline: str, *, vcpus: int = 1, mem_mib: int = 64,
              initrd: Path | None = None, timeout: float = 60,
              force_64bit: bool = False, drives: tuple[DriveSpec, ...] = (),
              entropy: EntropySpec | None = None) -> GuestRun:
    """Boot, wait until the guest stops itself (a hang fails the test), collect."""
    spec = VmSpec(vm_id="test", boot=BootSpec(str(kernel), str(initrd) if initrd else None,
                                              cmdline), vcpus=vcpus, memory_mib=mem_mib,
                  drives=drives, entropy=entropy)
    with build_vm(spec, force_64bit=force_64bit) as vm:
        vm.start()
        info = vm.wait(timeout)
        if info is None:
            vm.stop()
            text, _ = vm.console_read(0, 1 << 20)
            pytest.fail(f"guest did not stop within {timeout}s; console:\n{text.decode(errors='replace')}")
        text, _ = vm.console_read(0, 1 << 20)
        return GuestRun(info, text.decode(errors="replace"), vm.stats())
