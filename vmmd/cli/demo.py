"""`vmmd demo`: what `make run` shows - the whole daemon path in one command.

Starts `vmmd serve` on a temporary socket, creates and starts the demo VM
through the gRPC API, streams its console to stdout until the guest stops,
deletes the VM and shuts the daemon down (SIGTERM, exit 0 expected).  Exit
status: 0 when the guest stopped cleanly and the daemon exited 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

    from vmmd.client import Client


READY_TIMEOUT_S = 30.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="boot a VM through a temporary daemon and its API")
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd")
    p.add_argument("--append", help="words added to the default command line")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--mem-mib", type=int, default=128)
    p.add_argument("--acpi", action="store_true",
                   help="describe the machine with ACPI tables (the kernel needs CONFIG_ACPI)")


def _wait_ready(client: Client, daemon: subprocess.Popen[bytes]) -> None:
    from vmmd.client import ClientError
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            client.list()
            return
        except ClientError:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def demo(args: argparse.Namespace) -> int:
    # Here, not at the top: `vmmd run` shares the parser and pays for every import.
    import shutil
    import subprocess
    import tempfile

    from vmmd._proto.vmmd.v1 import vmm_pb2 as pb  # grpc loads only for `demo`
    from vmmd.client import Client, ClientError

    tmp = tempfile.mkdtemp(prefix="vmmd-demo-")
    sock = os.path.join(tmp, "vmmd.sock")
    say = lambda text: print(f"vmmd demo: {text}", file=sys.stderr, flush=True)
    daemon = subprocess.Popen([sys.executable, "-m", "vmmd", "serve", "--socket", sock,
                               "--log-format", "console", "--log-level", "warning"])
    clean = False
    try:
        with Client(sock) as c:
            _wait_ready(c, daemon)
            say(f"daemon pid {daemon.pid} on {sock}")
            vm = c.create("demo", os.path.abspath(args.kernel),
                          initrd=os.path.abspath(args.initrd) if args.initrd else None,
                          cmdline_append=args.append, vcpus=args.vcpus,
                          memory_mib=args.mem_mib, acpi=args.acpi)
            say(f"created VM demo: {vm.config.vcpus} vCPU, {vm.config.memory_mib} MiB"
                + (", ACPI tables" if vm.config.acpi else ""))
            c.start("demo")
            say("started; guest console follows")
            with c.console("demo", from_start=True, follow=True) as stream:
                for data in stream:
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()
            vm = c.get("demo")
            say(f"guest stopped: {vm.stop.message}")
            clean = vm.state == pb.VM_STATE_STOPPED
            c.delete("demo")
    except ClientError as e:
        say(f"API error: {e}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            rc = daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            rc = daemon.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"daemon exited with status {rc}")
    return 0 if clean and rc == 0 else 1
