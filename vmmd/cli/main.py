"""The `vmmd` command: `vmmd run` (one VM in this process) and `vmmd serve`.

`vmmd run` boots one VM in this process and streams its console.

The one-shot path.  Bad input is refused with one line before any VM exists
(exit 2).  The guest console goes straight from the C core to stdout.  Exit
status: 0 when the guest stopped itself cleanly (i8042 reset, power-off,
halt), 1 when it crashed (triple fault, emulation failure, KVM error) or
the VMM failed, 130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from vmmd import log
from vmmd.cli import demo, serve
from vmmd.cli.devices import ACPI_HELP, DRIVE_HELP, NET_HELP, parse_drive, parse_net
from vmmd.errors import InvalidSpecError, VmmError
from vmmd.spec import DEFAULT_MEM_MIB, DEFAULT_VCPUS, BootSpec, VmSpec
from vmmd.vm.builder import build_vm

EXIT_OK, EXIT_GUEST_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _int_arg(name: str):
    def parse(text: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not an integer") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmmd", description="vmmd micro-VMM")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot one VM in-process and stream its console")
    run.add_argument("--kernel", required=True, help="ELF vmlinux or bzImage")
    run.add_argument("--initrd", help="initramfs image")
    cl = run.add_mutually_exclusive_group()
    cl.add_argument("--cmdline", help="kernel command line (replaces the default)")
    cl.add_argument("--append", help="words added to the default command line")
    run.add_argument("--vcpus", type=_int_arg("vcpus"), default=DEFAULT_VCPUS)
    run.add_argument("--mem-mib", type=_int_arg("mem-mib"), default=DEFAULT_MEM_MIB)
    run.add_argument("--drive", action="append", default=[], metavar="PATH[,ro][,root]",
                     help=DRIVE_HELP)
    run.add_argument("--net", action="append", default=[], metavar="TAP[,mac=MAC][,create]",
                     help=NET_HELP)
    run.add_argument("--acpi", action="store_true", help=ACPI_HELP)
    run.add_argument("--entry-64bit", action="store_true",
                     help="use the 64-bit entry even when the kernel has a PVH note")
    run.add_argument("--kvm", default="/dev/kvm", help=argparse.SUPPRESS)
    serve.add_parser(sub)
    demo.add_parser(sub)
    for name, fmt, level in (("run", "console", "warning"), ("serve", "json", "info"),
                             ("demo", "console", "warning")):
        cmd = sub.choices[name]
        cmd.add_argument("--log-format", choices=("console", "json"), default=fmt)
        cmd.add_argument("--log-level", default=level, choices=("debug", "info", "warning", "error"))
    return p


def _spec(args: argparse.Namespace) -> VmSpec:
    return VmSpec(
        vm_id=f"run-{os.urandom(4).hex()}",  # not uuid: its import costs ~3 ms
        boot=BootSpec(kernel_path=args.kernel, initrd_path=args.initrd, cmdline=args.cmdline,
                      cmdline_append=args.append),
        vcpus=args.vcpus,
        memory_mib=args.mem_mib,
        drives=tuple(parse_drive(i, d) for i, d in enumerate(args.drive)),
        network_interfaces=tuple(parse_net(i, n) for i, n in enumerate(args.net)),
        acpi=args.acpi,
    )


# The spec's fields as `vmmd run` spells them: its one-line errors name the option.
OPTIONS: dict[tuple[str | int, ...], str] = {
    ("boot", "kernel_path"): "--kernel", ("boot", "initrd_path"): "--initrd",
    ("boot", "cmdline"): "--cmdline", ("vcpus",): "--vcpus", ("memory_mib",): "--mem-mib",
    ("drives",): "--drive", ("network_interfaces",): "--net"}


def _named(e: InvalidSpecError) -> str:
    """"--kernel (boot.kernel_path): ...", "--drive 2 (drives[1].path_on_host): ..."."""
    for n in (len(e.path), 1):
        option = OPTIONS.get(e.path[:n])
        if option is not None:
            index = f" {e.path[1] + 1}" if n == 1 and len(e.path) > 1 and \
                isinstance(e.path[1], int) else ""
            return f"{option}{index} ({e.field}): {e.problem}"
    return str(e)


def _fail(message: str, code: int) -> int:
    print(f"vmmd: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    try:
        spec = _spec(args)
        vm = build_vm(spec, kvm_path=args.kvm, force_64bit=args.entry_64bit)
    except InvalidSpecError as e:
        return _fail(f"invalid {_named(e)}", EXIT_BAD_INPUT)
    except VmmError as e:
        return _fail(str(e), EXIT_GUEST_FAILED)

    interrupted: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        interrupted.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    out_fd = os.dup(sys.stdout.fileno())
    try:
        with vm:
            vm.console_to(out_fd)
            vm.start()
            info = None
            while info is None and not interrupted:
                info = vm.wait(0.2)
            if interrupted:
                vm.stop()
                return _fail("interrupted; VM stopped", 128 + interrupted[0])
    except VmmError as e:
        return _fail(str(e), EXIT_GUEST_FAILED)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        os.close(out_fd)
    assert info is not None  # the loop ends with it, or returned
    if info.clean:
        return EXIT_OK
    return _fail(f"guest stopped: {info.message}", EXIT_GUEST_FAILED)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.configure(args.log_format, args.log_level)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "demo":
        return demo.demo(args)
    try:
        return serve.serve(args)
    except InvalidSpecError as e:
        return _fail(f"invalid {e}", EXIT_BAD_INPUT)
