"""The things compared: vmmd and QEMU command lines for one guest, the C floor, the guests
themselves, and a description of this machine.

Both VMMs get the same kernel file, the same command line string, 1 vCPU and the same memory.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import proc
from tests.framework import GUEST_DIR, MICROGUEST_DIR, REPO, is_pvm_host
from vmmd.vm.boot.cmdline import build_cmdline

OUT = REPO / "build" / "bench"
VMMD = REPO / ".venv" / "bin" / "vmmd"
LINUX_KERNEL = GUEST_DIR / "vmlinux"
LINUX_INITRD = GUEST_DIR / "initramfs.cpio.gz"
FLOOR_SRC = Path(__file__).resolve().parent / "floor.c"
FLOOR_BIN = OUT / "floor"
MEM_MIB = 128
# The port mg=exits and the floor write to.  Not the micro-guest's default 0x510: that is
# QEMU microvm's fw_cfg selector; 0x520 has no device in either VMM.
EXIT_PORT = 0x520
# mg=mmio's target: unbacked in both VMMs (vmmd's virtio-mmio slots start at 0xd0000000 only
# when a VM has devices; the bench's exit guests have none, nor has QEMU's microvm there).
EXIT_MMIO = 0xD0000000
QEMU_BASE = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on",
             "-enable-kvm", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
             "-no-reboot", "-smp", "1", "-m", str(MEM_MIB)]
# QEMU 7.2 with `-cpu host` aborts on PVM: KVM refuses MSR_IA32_ARCH_CAPABILITIES (0x10a).
QEMU_CPU_FALLBACK = "host,-arch-capabilities"


@dataclass(frozen=True)
class Guest:
    """One guest: a kernel, its command line (identical for both VMMs), maybe an initrd."""

    kernel: Path
    cmdline: str
    initrd: Path | None = None
    drive: Path | None = None  # a raw image, virtio-blk over virtio-mmio
    net: tuple[str, str] | None = None  # (tap, guest MAC), virtio-net over virtio-mmio

    def vmmd(self) -> list[str]:
        argv = [str(VMMD), "run", "--kernel", str(self.kernel), "--cmdline", self.cmdline,
                "--vcpus", "1", "--mem-mib", str(MEM_MIB)]
        argv += ["--initrd", str(self.initrd)] if self.initrd else []
        argv += ["--net", f"{self.net[0]},mac={self.net[1]}"] if self.net else []
        return argv + (["--drive", str(self.drive)] if self.drive else [])

    def qemu(self, cpu: str) -> list[str]:
        argv = [*QEMU_BASE, "-cpu", cpu, "-kernel", str(self.kernel), "-append", self.cmdline]
        argv += ["-initrd", str(self.initrd)] if self.initrd else []
        if self.drive or self.net:
            # acpi=off: the virtio_mmio.device= words on the cmdline; version-2 transport.
            argv[argv.index("-M") + 1] += ",acpi=off"
            argv += ["-global", "virtio-mmio.force-legacy=false"]
        if self.drive:
            # cache=writeback,aio=threads (QEMU's defaults) = vmmd's buffered preadv/pwritev.
            argv += ["-drive", (f"id=d0,file={self.drive},format=raw,if=none,"
                                "cache=writeback,aio=threads"),
                     "-device", "virtio-blk-device,drive=d0"]
        if self.net:
            # vhost=off: the data path in QEMU's own process, as vmmd's is in its own.
            argv += ["-netdev", f"tap,id=n0,ifname={self.net[0]},script=no,downscript=no,vhost=off",
                     "-device", f"virtio-net-device,netdev=n0,mac={self.net[1]}"]
        return argv


MICRO_KERNEL = MICROGUEST_DIR / "microguest-pvh.elf"
BLK_IMAGE = OUT / "blk.img"
BLK_IMAGE_MIB = 256


def micro_guest(cmdline: str, drive: Path | None = None) -> Guest:
    return Guest(MICRO_KERNEL, cmdline, drive=drive)


def blk_image() -> Path:
    """The scratch disk of (blk), created once and filled with non-zero bytes (no holes),
    then read through once so that both VMMs find it in the page cache."""
    size = BLK_IMAGE_MIB << 20
    if not BLK_IMAGE.exists() or BLK_IMAGE.stat().st_size != size:
        OUT.mkdir(parents=True, exist_ok=True)
        chunk = os.urandom(1 << 20)
        with open(BLK_IMAGE, "wb") as f:
            f.writelines(chunk for _ in range(BLK_IMAGE_MIB))
    with open(BLK_IMAGE, "rb") as f:
        while f.read(1 << 22):
            pass
    return BLK_IMAGE


def linux_guest(pvm: bool) -> Guest:
    """The kernel with its initramfs.  On PVM the kernel's own hook prints READY once the root
    is mounted, just before init (user space is unreachable); on hardware KVM init does."""
    return Guest(LINUX_KERNEL, build_cmdline(None, "vmmd_ready=1" if pvm else None, pvm_host=pvm),
                 LINUX_INITRD)


def build_floor() -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    if not FLOOR_BIN.exists() or FLOOR_BIN.stat().st_mtime < FLOOR_SRC.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(FLOOR_BIN),
                        str(FLOOR_SRC)], check=True)
    return FLOOR_BIN


def run_floor_machine(n: int, pause_ms: float = 0.0) -> float:
    """floor.c's KVM floor of one of our VMs (its ioctls alone, no close), ms; each
    after pause_ms asleep (as CreateVm comes in the api section)."""
    r = proc.run_ok([str(FLOOR_BIN), "machine", str(n), str(int(pause_ms * 1000))], 120,
                    b"machine_ns")
    return float(json.loads(r.output)["machine_ns"]) / 1e6


def run_floor(exits: int, mmio: bool = False, irqchip: bool = False) -> dict[str, Any]:
    r = proc.run_ok([str(FLOOR_BIN), str(exits), hex(EXIT_PORT), "mmio" if mmio else "pio",
                     *(["irqchip"] if irqchip else [])], 120, b"exit_ns")
    return json.loads(r.output)


def qemu_cpu() -> str:
    """`host` if QEMU runs a micro-guest with it, else the PVM fallback (checked by a run)."""
    guest = micro_guest("mg=print")
    r = proc.run(guest.qemu("host"), 30)
    if r.returncode == 0 and b"MG-DONE" in r.output:
        return "host"
    if b"failed to set MSR" not in r.stderr:
        raise r.fail("QEMU cannot run the micro-guest")
    proc.run_ok(guest.qemu(QEMU_CPU_FALLBACK), 30, b"MG-DONE")
    return QEMU_CPU_FALLBACK


def _first_line(argv: list[str]) -> str:
    """The first line argv prints, "?" when it prints nothing or fails."""
    try:
        out = subprocess.run(argv, check=False, capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.splitlines()[0].strip() if out else "?"


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), "?")
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    git = ["git", "-C", str(REPO)]
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": "PVM" if is_pvm_host() else "hardware KVM",
        "cpu": model, "cpus": os.cpu_count(), "mem_mib": mem_kib // 1024,
        "kernel": platform.release(), "python": platform.python_version(),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "gcc": _first_line(["gcc", "--version"]),
        "vmmd_commit": _first_line([*git, "rev-parse", "--short", "HEAD"]),
        "vmmd_dirty": _first_line([*git, "status", "--porcelain"]) != "?",
        "loadavg_at_start": os.getloadavg()[0],
    }
