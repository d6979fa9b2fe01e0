"""The measures.  Each returns a list of result dicts: id, what, unit, one summary per
contender (vmmd, qemu, floor) and the ratio vmmd/qemu.  Runs alternate vmmd, QEMU (, floor)
inside every repetition, so a drift of the machine hits both alike.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bench import proc, stats, targets
from bench.targets import EXIT_PORT, Guest, micro_guest

MICRO_TIMEOUT = 60.0
T = TypeVar("T")
FIRST_LINE = b"MG-HELLO\n"
READY = re.compile(rb"VMMD-GUEST-READY cpus=(\d+) mem_kib=(\d+)")


def measure(mid: str, what: str, unit: str, series: dict[str, list[float]]) -> dict[str, Any]:
    m: dict[str, Any] = {"id": mid, "what": what, "unit": unit}
    m.update({name: stats.summarize(samples) for name, samples in series.items()})
    if "vmmd" in m and "qemu" in m:
        m["ratio_vmmd_qemu"] = stats.ratio(m["vmmd"], m["qemu"])
    if "vmmd" in m and "floor" in m:
        m["ratio_vmmd_floor"] = stats.ratio(m["vmmd"], m["floor"])
    return m


def _vmms(guest: Guest, cpu: str) -> list[tuple[str, list[str]]]:
    return [("vmmd", guest.vmmd()), ("qemu", guest.qemu(cpu))]


def startup(reps: int, cpu: str) -> list[dict[str, Any]]:
    """(a) process start -> first console line and -> process exit, micro-guest mg=print.
    The first line, not byte: vmmd's console flushes per line, QEMU's per byte."""
    first: dict[str, list[float]] = {"vmmd": [], "qemu": []}
    ended: dict[str, list[float]] = {"vmmd": [], "qemu": []}
    for _ in range(reps):
        for vmm, argv in _vmms(micro_guest("mg=print"), cpu):
            r = proc.run_ok(argv, MICRO_TIMEOUT, b"MG-DONE", FIRST_LINE)
            if not r.output.startswith(FIRST_LINE) or r.marker_s is None or r.exit_s is None:
                raise r.fail("console did not start with MG-HELLO")
            first[vmm].append(r.marker_s * 1e3)
            ended[vmm].append(r.exit_s * 1e3)
    python = [_printed_ms([sys.executable, "-I", "-c", "print('UP', flush=True)"])
              for _ in range(reps)]
    imports = [_printed_ms([sys.executable, "-c", "import vmmd.cli.main; print('UP', flush=True)"])
               for _ in range(reps)]
    libs = ", ".join(_libraries_of("vmmd.cli.main"))
    libraries = [_printed_ms([sys.executable, "-c", f"import {libs}; print('UP', flush=True)"])
                 for _ in range(reps)]
    return [stats.goal(measure("a.first_output", "process start → first console line (mg=print)",
                               "ms", first), ratio=1.0, of="qemu"),
            measure("a.exit", "process start → process exit (mg=print)", "ms", ended),
            measure("a.python", "floor of `vmmd run`: process start → the venv's Python prints "
                    "a line (python -I)", "ms", {"floor": python}),
            measure("a.imports", "floor of `vmmd run`: process start → Python printing a line "
                    "once it imported vmmd.cli.main (what `vmmd run` loads)", "ms",
                    {"floor": imports}),
            measure("a.libraries", "floor of `vmmd run`: process start → Python printing a "
                    "line once it imported every module vmmd.cli.main loads but vmmd's own "
                    "(the standard library's and cffi's)", "ms", {"floor": libraries})]


def _libraries_of(module: str) -> list[str]:
    """The top-level modules a fresh Python loads for `import module`, vmmd's own
    apart, in the order it loaded them."""
    code = (f"import sys; before = set(sys.modules); import {module}; "
            "print(' '.join(m for m in sys.modules if m not in before and '.' not in m "
            "and m != 'vmmd'))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return out.split()


def _printed_ms(argv: list[str]) -> float:
    """Process start -> its line UP, ms (as vmmd's first console line is timed)."""
    r = proc.run_ok(argv, MICRO_TIMEOUT, b"UP", b"UP")
    assert r.marker_s is not None
    return r.marker_s * 1e3


def exit_cost(reps: int, cpu: str, n: int) -> list[dict[str, Any]]:
    """(b) per-exit cost: (time of mg=exits n=N - time of n=0) / N, against the bare C floor
    running the same three guest instructions an exit (and the same for MMIO, mg=mmio).
    Beside each, the floor again in a VM with vmmd's in-kernel irqchip and PIT (every
    vmmd VM has them, QEMU's microvm too): what KVM_RUN itself costs more with them."""
    out = []
    for kind, mode in (("pio", f"mg=exits port={EXIT_PORT:#x}"),
                       ("mmio", f"mg=mmio addr={targets.EXIT_MMIO:#x}")):
        guests = [micro_guest(f"{mode} n={k}") for k in (0, n)]
        per: dict[str, list[float]] = {"vmmd": [], "qemu": [], "floor": []}
        irqchip: list[float] = []
        for _ in range(reps):
            for vmm, argvs in (("vmmd", [g.vmmd() for g in guests]),
                               ("qemu", [g.qemu(cpu) for g in guests])):
                t0, tn = (_exit_time(argv) for argv in argvs)
                per[vmm].append((tn - t0) / n * 1e6)
            per["floor"].append(targets.run_floor(n, mmio=kind == "mmio")["exit_ns"] / 1e3)
            irqchip.append(targets.run_floor(n, mmio=kind == "mmio",
                                             irqchip=True)["exit_ns"] / 1e3)
        what = (f"PIO exit round trip (out to {EXIT_PORT:#x}" if kind == "pio" else
                f"MMIO exit round trip (32-bit store to {targets.EXIT_MMIO:#x}")
        out.append(stats.goal(measure(
            "b.exit" if kind == "pio" else "b.mmio",
            f"{what}; n={n} minus n=0; floor: bare C KVM_RUN loop, same 3 guest instructions "
            "an exit)", "µs", per), ratio=1.1, of="floor"))
        out.append(measure(f"b.{kind}_irqchip_floor", f"{kind.upper()} exit round trip of the "
                           "bare C loop in a VM with an in-kernel irqchip and PIT (as vmmd's)",
                           "µs", {"floor": irqchip}))
    return out


def _exit_time(argv: list[str]) -> float:
    r = proc.run_ok(argv, MICRO_TIMEOUT, b"MG-DONE")
    assert r.exit_s is not None
    return r.exit_s


def linux(reps: int, cpu: str, pvm: bool, timeout: float) -> list[dict[str, Any]]:
    """(c) process start -> the READY line of the same Linux kernel and command line."""
    guest = targets.linux_guest(pvm)
    ready: dict[str, list[float]] = {"vmmd": [], "qemu": []}
    for _ in range(reps):
        for vmm, argv in _vmms(guest, cpu):
            r = proc.run_ok(argv, timeout, b"VMMD-GUEST-READY", b"VMMD-GUEST-READY",
                            kill_at_marker=True)
            line = READY.search(r.output)
            if line is None or line.group(1) != b"1" or r.marker_s is None:
                raise r.fail("READY line malformed or not for 1 vCPU")
            ready[vmm].append(r.marker_s)
    source = "kernel hook, vmmd_ready=1" if pvm else "initramfs"
    return [measure("c.linux_ready", f"process start → Linux READY line ({source})", "s", ready)]


def in_process(reps: int) -> list[dict[str, Any]]:
    """vmmd without Python start-up: C-core VM create, build_vm, start() -> first console
    line and start() -> stopped, micro-guest mg=print, in this process; and KVM_CREATE_VM
    alone, timed by floor.c."""
    from vmmd import log
    from vmmd.native import NativeVm
    from vmmd.spec import BootSpec, VmSpec
    from vmmd.vm.builder import build_vm

    log.configure("console", "warning")
    guest = micro_guest("mg=print")
    series: dict[str, list[float]] = {k: [] for k in ("native", "close", "build", "first",
                                                       "stop", "vcpu_start", "guest")}
    create_vm: list[float] = []
    for i in range(reps):
        create_vm.append(targets.run_floor(0)["create_vm_ns"] / 1e3)
        native, ms = _timed(NativeVm)
        series["native"].append(ms)
        series["close"].append(_timed(native.close)[1])
        spec = VmSpec(vm_id=f"bench-{i}", boot=BootSpec(str(guest.kernel), cmdline=guest.cmdline),
                      memory_mib=targets.MEM_MIB)
        vm, ms = _timed(lambda spec=spec: build_vm(spec))
        series["build"].append(ms)
        with vm:
            t0 = time.perf_counter()
            vm.start()
            deadline = t0 + MICRO_TIMEOUT
            while not vm.console_read(0, 1)[0]:
                if time.perf_counter() > deadline:
                    raise proc.RunError("in-process vmmd: no console output")
                vm.wait_console(0, 0.01)
            series["first"].append((time.perf_counter() - t0) * 1e3)
            info = vm.wait(MICRO_TIMEOUT)
            if info is None or not info.clean:
                raise proc.RunError(f"in-process vmmd: guest did not stop cleanly: {info}")
            series["stop"].append((time.perf_counter() - t0) * 1e3)
            s = vm.stats()
            series["vcpu_start"].append((s.first_run_ns - s.start_ns) / 1e6)
            series["guest"].append((s.first_output_ns - s.first_run_ns) / 1e6)
    whats = {
        "native": "NativeVm() (KVM VM, TSS and identity map, serial, i8042)",
        "close": "NativeVm.close() of that VM (KVM VM teardown)",
        "build": "build_vm() (checks, KVM VM, 128 MiB RAM, vCPU, load, registers)",
        "first": "start() → first console line (mg=print)",
        "stop": "start() → guest stopped, wait() returns (mg=print)",
        "vcpu_start": "start() → vCPU 0's first KVM_RUN (the core's clock)",
        "guest": "the guest's own start-up: vCPU 0's first KVM_RUN → its first console byte "
                 "(mg=print; the core's clock)",
    }
    return [measure("split.kvm_create_vm", "KVM_CREATE_VM ioctl alone (floor.c)", "µs",
                    {"floor": create_vm}),
            *(measure(f"split.{k}", f"in-process vmmd: {whats[k]}", "ms", {"vmmd": v})
              for k, v in series.items())]


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn() and its duration in ms."""
    t0 = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - t0) * 1e3

