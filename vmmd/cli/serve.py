"""`vmmd serve`: the long-running daemon.

Owns the socket (mode 0600; a stale file is replaced, a live daemon on it is
refused), the manager and the gRPC server.  SIGTERM/SIGINT stop every VM
(graceful, then forced), close everything and exit 0.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import stat
from typing import TYPE_CHECKING

from vmmd.errors import InvalidSpecError
from vmmd.paths import DEFAULT_MAX_VMS, DEFAULT_SOCKET

# The daemon's own modules load in serve(), not at import: `vmmd run` shares
# this parser and must not pay for the manager, cells, structlog and gRPC.
if TYPE_CHECKING:
    from vmmd.api.server import TlsConfig
    from vmmd.cell.cells import Placement
    from vmmd.manager import Manager


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"Unix socket (default {DEFAULT_SOCKET})")
    p.add_argument("--state-dir", default="/var/lib/vmmd", help="daemon state (snapshots, later)")
    p.add_argument("--listen", help="also serve TCP HOST:PORT (requires --tls-cert and --tls-key)")
    p.add_argument("--tls-cert", help="server certificate chain (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--max-vms", type=int, default=DEFAULT_MAX_VMS)
    p.add_argument("--memory-budget", default="auto", metavar="SIZE",
                   help="guest RAM (plus a per-VM overhead) the daemon may promise: a size "
                        "(20G, 4096 = MiB), auto (MemTotal minus a reserve, the default) or "
                        "unlimited")
    p.add_argument("--stop-timeout", type=float, default=10.0,
                   help="seconds a VM gets to stop gracefully at shutdown")
    p.add_argument("--isolation", choices=("cells", "none"), default="cells",
                   help="cells (the default): each VM's devices and vCPUs run in a jailed, "
                        "unprivileged, seccomp-filtered worker process of its cell; none: "
                        "everything in the daemon (trusted workloads, benchmarks)")
    p.add_argument("--cell-uids", default="auto", metavar="FIRST:COUNT",
                   help="the uids (and gids) cells run as, one per cell; auto: a block of "
                        "65536 chosen from the daemon's pid (give a range no one else uses)")
    p.add_argument("--kvm", default="/dev/kvm", help=argparse.SUPPRESS)


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    from vmmd.api.server import TlsConfig  # grpc loads only for `serve`
    if not args.listen:
        if args.tls_cert or args.tls_key or args.tls_client_ca:
            raise InvalidSpecError("--tls-cert", "TLS options need --listen")
        return None
    if not (args.tls_cert and args.tls_key):
        raise InvalidSpecError("--listen", "needs --tls-cert and --tls-key (no plaintext TCP)")
    try:
        return TlsConfig(_read(args.tls_cert), _read(args.tls_key),
                         _read(args.tls_client_ca) if args.tls_client_ca else None)
    except OSError as e:
        raise InvalidSpecError("--tls-cert", f"cannot read {e.filename}: {e.strerror}") from None


def _read(path: str) -> bytes:
    # Not pathlib: importing it (and urllib, ipaddress) costs `vmmd run` ~3 ms.
    with open(path, "rb") as f:
        return f.read()


def claim_socket(path: str) -> None:
    """Make `path` free for us: refuse a live daemon, remove a stale socket,
    never remove anything that is not a socket."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise InvalidSpecError("--socket", f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: stale
        return
    finally:
        probe.close()
    raise InvalidSpecError("--socket", f"a daemon is already listening on {path}")


def _raise_fd_limit() -> None:
    """A VM holds ~10 fds (KVM, vCPUs, eventfds, taps, drives): a daemon of many
    VMs needs more than the usual soft limit of 1024, up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_uids(text: str) -> tuple[int, int]:
    if text == "auto":
        # 65536 uids from 2^20 up, a block per daemon pid: daemons on one host
        # (tests run several) do not share uids.
        return (1 << 20) + (os.getpid() % 4096) * 65536, 65536
    first, sep, count = text.partition(":")
    try:
        base, n = int(first), int(count)
    except ValueError:
        raise InvalidSpecError("--cell-uids", f"{text!r} is not FIRST:COUNT") from None
    if not sep or base < 1000 or n < 1 or base + n > 1 << 31:
        raise InvalidSpecError("--cell-uids", f"{text!r}: want FIRST >= 1000, COUNT >= 1, "
                               "below 2^31")
    return base, n


def _placement(args: argparse.Namespace) -> Placement | None:
    """Cells (a zygote forked now, cgroups opened) or None: the shared mode."""
    if args.isolation == "none":
        return None
    from vmmd.cell.cells import CellPlacement
    from vmmd.cell.cgroup import CgroupError, CgroupTree
    from vmmd.cell.zygote import Zygote
    from vmmd.log import get_logger

    if os.geteuid() != 0:
        raise InvalidSpecError("--isolation", "cells need root (the daemon makes each "
                               "cell's uid, mount namespace and cgroup): run as root, or "
                               "--isolation none")
    uids = parse_uids(args.cell_uids)
    try:
        cgroups: CgroupTree | None = CgroupTree.open(f"vmmd-{os.getpid()}")
    except CgroupError as e:
        # Jailed all the same, but without limits (e.g. under `ip netns exec`,
        # whose fresh /sys has no cgroup mounts): a VM asking for limits is refused.
        get_logger("vmmd.serve").warning("cells.no_cgroups", error=str(e))
        cgroups = None
    hooks = os.environ.get("VMMD_TEST_HOOKS") == "1"
    return CellPlacement(lambda on_exit: Zygote.fork(on_exit, test_hooks=hooks),
                         cgroups=cgroups, uids=uids)


def serve(args: argparse.Namespace) -> int:
    import asyncio

    from vmmd.budget import parse_budget
    from vmmd.manager import Manager

    _raise_fd_limit()
    tls = _tls(args)
    budget = parse_budget(args.memory_budget)
    claim_socket(args.socket)
    placement = _placement(args)  # forks the zygote: before any thread
    manager = Manager(kvm_path=args.kvm, max_vms=args.max_vms, memory_budget=budget,
                      placement=placement)
    return asyncio.run(_serve(args, manager, tls, budget))


async def _serve(args: argparse.Namespace, manager: Manager, tls: TlsConfig | None,
                 budget: int | None) -> int:
    """The server on this loop until SIGTERM/SIGINT, then every VM stopped."""
    import asyncio

    from vmmd.api.discovery import NOT_SERVING  # grpc loads only for `serve`
    from vmmd.api.server import build_server
    from vmmd.log import get_logger

    log = get_logger("vmmd.serve")
    old_umask = os.umask(0o177)  # the socket is born 0600
    try:
        api = await build_server(manager, args.socket, listen=args.listen, tls=tls)
    finally:
        os.umask(old_umask)
    os.chmod(args.socket, 0o600)
    log.info("daemon.listening", socket=args.socket, listen=args.listen, pid=os.getpid(),
             memory_budget_mib=budget // (1 << 20) if budget is not None else "unlimited")
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_signal(signum: int) -> None:
        log.info("daemon.signal", signal=signal.Signals(signum).name)
        done.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, on_signal, s)
    await done.wait()
    log.info("daemon.stopping", vms=len(manager.ids()))
    # The VMs stop on a thread of their own (their verbs block); API calls
    # still answer meanwhile, with the health service NOT_SERVING.
    api.health.set_all(NOT_SERVING)
    await loop.run_in_executor(None, manager.shutdown, args.stop_timeout)
    await api.stop()
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    log.info("daemon.stopped")
    return 0
