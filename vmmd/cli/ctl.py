"""`vmmctl`: the command-line client of the vmmd daemon.

    vmmctl [--socket PATH] [--json] create|start|pause|resume|stop|delete|get|list|console|events
           |snapshot|restore|clone|merge

Built on vmmd.client.  Human output by default (a compact table for VMs,
one line per event); `--json` prints the API's messages as JSON for scripts
(events: one object per line).  `vmmctl console ID` streams the guest's
serial output and forwards stdin to it until the VM stops or Ctrl-C.
A failed call prints `vmmctl: <CODE>: <details>` and exits 1; a usage error
exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

from google.protobuf import json_format
from google.protobuf.message import Message

from vmmd import record
from vmmd.api import convert
from vmmd.cli.devices import ACPI_HELP, DRIVE_HELP, NET_HELP, parse_drive, parse_net
from vmmd.client import DEFAULT_SOCKET, Client, ClientError, pb, vsock_connect
from vmmd.errors import InvalidSpecError
from vmmd.spec import AUTO_MAC, DriveSpec, NetSpec

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
INPUT_RETRY_S = 0.01  # the UART's input FIFO was full: try again shortly


def _global_options(p: argparse.ArgumentParser, top: bool) -> None:
    """--socket and --json, before the command (top) or after it."""
    keep = argparse.SUPPRESS  # after the command: set only when given
    p.add_argument("--socket", default=os.environ.get("VMMD_SOCKET", DEFAULT_SOCKET) if top
                   else keep, help=f"daemon socket (default $VMMD_SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", default=False if top else keep,
                   help="print API messages as JSON")


def _drive_arg(text: str) -> DriveSpec:
    try:
        d = parse_drive(0, text)
    except InvalidSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return record.replace(d, path_on_host=os.path.abspath(d.path_on_host))


def _net_arg(text: str) -> NetSpec:
    try:
        return parse_net(0, text)
    except InvalidSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _drives(args: argparse.Namespace) -> list[pb.Drive]:
    """--drive as API messages, numbered in order (drive0, drive1, ...)."""
    return [convert.drive_to_proto(record.replace(d, drive_id=f"drive{i}"))
            for i, d in enumerate(args.drive)]


def _nets(args: argparse.Namespace) -> list[pb.NetworkInterface]:
    """--net as API messages, numbered in order (net0, net1, ...)."""
    return [convert.net_to_proto(record.replace(n, iface_id=f"net{i}"))
            for i, n in enumerate(args.net)]


def _pair(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ClientError("INVALID_ARGUMENT", f"--{what} {text!r}: want ID={what.upper()}")
    return key, value


def _overrides(args: argparse.Namespace, i: int) -> pb.DeviceOverrides:
    """--drive ID=PATH / --net ID=TAP[,create] / --mac ID=MAC / --netns [ID=]NAME for
    clone number i ({i} in paths, taps and namespaces); one InterfaceOverride per ID."""
    drives = []
    for text in args.drive:
        key, path = _pair(text, "drive")
        drives.append(pb.DriveOverride(drive_id=key, path_on_host=os.path.abspath(
            path.replace("{i}", str(i)))))
    nets: dict[str, pb.InterfaceOverride] = {}
    for text in args.net:
        key, value = _pair(text, "net")
        tap, _, opt = value.partition(",")
        nets[key] = pb.InterfaceOverride(iface_id=key, host_dev_name=tap.replace("{i}", str(i)),
                                         create_tap=opt == "create")
    for text in args.netns:
        if "=" not in text:  # NAME alone: every interface given a tap by --net
            if not nets:
                raise ClientError("INVALID_ARGUMENT", f"--netns {text!r}: the namespace of the "
                                  "taps --net ID=TAP names; give --net too (or --netns ID=NAME)")
            for o in nets.values():
                o.netns = text.replace("{i}", str(i))
            continue
        key, name = _pair(text, "netns")
        if key not in nets:
            raise ClientError("INVALID_ARGUMENT", f"--netns {text!r}: a namespace goes with "
                              f"its tap: give --net {key}=TAP too")
        nets[key].netns = name.replace("{i}", str(i))
    for text in args.mac:
        key, mac = _pair(text, "mac")
        if args.command == "clone" and args.count > 1 and mac != AUTO_MAC:
            raise ClientError("INVALID_ARGUMENT", f"--mac {text!r}: all {args.count} clones "
                              f"would get {mac}; give {key}={AUTO_MAC} (a MAC of its own for "
                              "each clone), or no --mac (the snapshot's)")
        nets.setdefault(key, pb.InterfaceOverride(iface_id=key)).guest_mac = mac
    return pb.DeviceOverrides(drives=drives, network_interfaces=list(nets.values()))


def _cell_options(p: argparse.ArgumentParser, clone: bool = False) -> None:
    """--cell and the cell's limits (0: none), sent as they are: the daemon checks them."""
    p.add_argument("--cell", default="", metavar="NAME",
                   help="run in this cell (VMs naming one cell share its worker); default: "
                        + ("each clone in a cell of its own" if clone else "a cell of its own"))
    p.add_argument("--cpu-limit", type=float, default=0.0, metavar="CORES",
                   help="the cell's CPU quota in cores (0.25: a quarter of one)")
    p.add_argument("--memory-limit-mib", type=int, default=0, metavar="MIB",
                   help="the cell's host memory cap, guest RAM included")
    p.add_argument("--pids-limit", type=int, default=0, metavar="N",
                   help="the most tasks (processes + threads) in the cell")


def _vsock_arg(text: str) -> pb.Vsock:
    cid, sep, path = text.partition(",")
    if not sep or not cid.isdigit() or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: CID,PATH (e.g. 3,/run/vm1.vsock)")
    return pb.Vsock(guest_cid=int(cid), uds_path=os.path.abspath(path))


def _limits(args: argparse.Namespace) -> pb.CellLimits:
    return pb.CellLimits(cpu=args.cpu_limit, memory_mib=args.memory_limit_mib,
                         pids=args.pids_limit)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmmctl", description="Control the vmmd daemon.")
    _global_options(p, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[common])

    c = add("create", help="create a VM (it does not run yet)")
    c.add_argument("--id", default="", help="VM id (default: generated)")
    c.add_argument("--kernel", type=os.path.abspath, required=True,
                   help="ELF vmlinux or bzImage (relative paths are made absolute)")
    c.add_argument("--initrd", type=os.path.abspath)
    c.add_argument("--cmdline", help="replace the default kernel command line")
    c.add_argument("--append", help="words added to the kernel command line")
    c.add_argument("--vcpus", type=int, default=0, help="default 1")
    c.add_argument("--mem-mib", type=int, default=0, help="guest RAM in MiB (default 128)")
    c.add_argument("--drive", action="append", default=[], type=_drive_arg,
                   metavar="PATH[,ro][,root]", help=DRIVE_HELP)
    c.add_argument("--net", action="append", default=[], type=_net_arg,
                   metavar="TAP[,mac=MAC][,create][,netns=NAME]", help=NET_HELP)
    c.add_argument("--track-dirty", action="store_true",
                   help="log written pages, for diff snapshots")
    c.add_argument("--entropy", action="store_true",
                   help="a virtio entropy device (the guest's /dev/hwrng)")
    c.add_argument("--acpi", action="store_true", help=ACPI_HELP)
    c.add_argument("--vsock", type=_vsock_arg, metavar="CID,PATH",
                   help="a virtio-vsock device: the guest's context id (3..4294967294) and the "
                        "Unix socket the daemon listens on (docs/vsock.md)")
    _cell_options(c)
    sn = add("snapshot", help="write a snapshot of a paused VM into a directory")
    sn.add_argument("vm_id")
    sn.add_argument("dir", type=os.path.abspath)
    sn.add_argument("--diff", action="store_true",
                    help="only the pages written since the VM's last snapshot")
    for name, text in (("restore", "a new VM from a snapshot (paused unless --resume)"),
                       ("clone", "--count VMs from one snapshot")):
        r = add(name, help=text)
        r.add_argument("dir", type=os.path.abspath)
        if name == "restore":
            r.add_argument("--id", default="", help="VM id (default: generated)")
        else:
            r.add_argument("--count", type=int, required=True)
            r.add_argument("--prefix", default="", help="clone ids: PREFIX-0, PREFIX-1, ...")
        r.add_argument("--resume", action="store_true", help="run at once")
        r.add_argument("--track-dirty", action="store_true",
                       help="log written pages, for diff snapshots")
        r.add_argument("--clock-realtime", action="store_true",
                       help="move the guest's clock on by the time since the snapshot")
        r.add_argument("--drive", action="append", default=[], metavar="ID=PATH",
                       help="the snapshot's drive ID uses PATH (clone: {i} is the clone's number)")
        r.add_argument("--net", action="append", default=[], metavar="ID=TAP[,create]",
                       help="the snapshot's interface ID goes onto TAP (clone: {i} as above)")
        r.add_argument("--netns", action="append", default=[], metavar="[ID=]NAME",
                       help="the tap of --net ID is in network namespace NAME (/run/netns/NAME); "
                            "NAME alone: every --net tap's ({i} as above)")
        r.add_argument("--mac", action="append", default=[], metavar=f"ID=MAC|{AUTO_MAC}",
                       help="interface ID gets MAC (default: the snapshot's); "
                            f"{AUTO_MAC}: one generated from the new VM's id"
                            + (" (for more than one clone only auto)" if name == "clone" else ""))
        _cell_options(r, clone=name == "clone")
    m = add("merge", help="apply a diff snapshot onto its base (the base becomes full)")
    m.add_argument("base", type=os.path.abspath)
    m.add_argument("diff", type=os.path.abspath)
    for verb, text in (("start", "boot a created VM"), ("pause", "pause a running VM"),
                       ("resume", "resume a paused VM"), ("delete", "stop and forget a VM"),
                       ("get", "show one VM")):
        add(verb, help=text).add_argument("vm_id")
    s = add("stop", help="stop a VM: Ctrl-Alt-Del, forced after a timeout")
    s.add_argument("vm_id")
    s.add_argument("--timeout-ms", type=int, default=0, help="grace period (default 10000)")
    s.add_argument("--force", action="store_true", help="stop at once")
    add("list", help="show every VM")
    con = add("console", help="attach to a VM's serial console (Ctrl-C detaches)")
    con.add_argument("vm_id")
    con.add_argument("--no-history", action="store_true", help="only output from now on")
    vs = add("vsock", help="connect stdin/stdout to a port of a VM's vsock device (the guest "
             "must listen there; Ctrl-C or end of input ends it)")
    vs.add_argument("vm_id")
    vs.add_argument("port", type=_vsock_port, help="the guest's port, 0..4294967295")
    ev = add("events", help="follow lifecycle events (Ctrl-C ends)")
    ev.add_argument("vm_id", nargs="?", help="one VM (default: every VM)")
    return p


# -- output --
def _name(enum: object, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()  # type: ignore[attr-defined]


def _uptime(ms: int) -> str:
    s = ms // 1000
    if s < 60:
        return f"{ms // 100 / 10:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _cell(vm: pb.Vm) -> tuple[str, str]:
    """The CELL and PID columns: the cell the daemon tells (else the one the config names)
    and its worker's pid ("-": none told, or the daemon's own process)."""
    if vm.HasField("cell"):
        return vm.cell.name or "-", str(vm.cell.pid) if vm.cell.pid else "-"
    return vm.config.cell or "-", "-"


def vm_table(vms: Sequence[pb.Vm]) -> str:
    rows = [("ID", "STATE", "VCPUS", "MEM", "UPTIME", "CELL", "PID", "STOP")]
    for vm in vms:
        stop = _name(pb.StopReason, vm.stop.reason, "STOP_REASON_") if vm.HasField("stop") else "-"
        rows.append((vm.vm_id, _name(pb.VmState, vm.state, "VM_STATE_"), str(vm.config.vcpus),
                     f"{vm.config.memory_mib}MiB", _uptime(vm.uptime_ms), *_cell(vm), stop))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]) for r in rows)


def cell_line(c: pb.CellInfo) -> str:
    """`vmmctl get`'s line about the VM's cell."""
    lim = c.limits
    limits = [f"cpu {lim.cpu:g}"] if lim.cpu else []
    limits += [f"memory {lim.memory_mib}MiB"] if lim.memory_mib else []
    limits += [f"pids {lim.pids}"] if lim.pids else []
    return (f"cell: {c.name} ({'shared' if c.shared else 'not shared'}), pid {c.pid or '-'}, uid "
            f"{c.uid}, cpu {c.cpu_time_s:.2f}s, rss {c.rss_bytes >> 20}MiB, cgroup memory "
            f"{c.memory_bytes >> 20}MiB, limits: {', '.join(limits) or 'none'}")


def show_snapshot(args: argparse.Namespace, snap: pb.Snapshot) -> None:
    if args.json:
        print(to_json(snap))
        return
    kind = _name(pb.SnapshotType, snap.type, "SNAPSHOT_TYPE_")
    print(f"{kind} snapshot {snap.snapshot_id} of {snap.vm_id} in {snap.snapshot_dir}: "
          f"{snap.pages_written} pages, {snap.duration_us / 1000:.1f} ms")


def event_line(ev: pb.VmEvent) -> str:
    text = f"{ev.time.ToJsonString()} {ev.vm_id} {_name(pb.EventType, ev.type, 'EVENT_TYPE_')}"
    if ev.HasField("stop"):
        text += f" {_name(pb.StopReason, ev.stop.reason, 'STOP_REASON_')}: {ev.stop.message}"
    return text


def to_json(msg: Message, indent: int | None = 2) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=indent,
                                     always_print_fields_with_no_presence=True)


def show_vms(args: argparse.Namespace, vms: list[pb.Vm], *, one: bool = True) -> None:
    if args.json:
        print(to_json(vms[0] if one else pb.ListVmsResponse(vms=vms)))
        return
    print(vm_table(vms))
    if one and vms[0].HasField("cell"):
        print(cell_line(vms[0].cell))
    if one and vms[0].stop.message:
        print(f"stop: {vms[0].stop.message}")


# -- console --
def _forward_stdin(client: Client, vm_id: str) -> None:
    """Types stdin into the guest until EOF or the VM refuses input."""
    try:
        while data := os.read(sys.stdin.fileno(), 4096):
            while data:
                n = client.write_console(vm_id, data)
                data = data[n:]
                if not n:
                    time.sleep(INPUT_RETRY_S)
    except (ClientError, OSError):
        pass


def console(client: Client, args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    with client.console(args.vm_id, from_start=not args.no_history, follow=True) as stream:
        threading.Thread(target=_forward_stdin, args=(client, args.vm_id), daemon=True).start()
        for data in stream:
            out.write(data)
            out.flush()
    return 0


def _vsock_port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"{text}: a port is 0..4294967295")
    return port


def vsock(client: Client, args: argparse.Namespace) -> int:
    """Firecracker's host side, from the shell: the VM's socket, CONNECT, then a
    relay - stdin to the guest (its end, a half-close), the guest to stdout."""
    config = client.get(args.vm_id).config
    if not config.HasField("vsock"):
        print(f"vmmctl: {args.vm_id} has no vsock device", file=sys.stderr)
        return EXIT_ERROR
    try:
        s = vsock_connect(config.vsock.uds_path, args.port)
    except OSError as e:
        print(f"vmmctl: vsock {args.vm_id} {args.port}: {e}", file=sys.stderr)
        return EXIT_ERROR

    def upstream() -> None:
        with contextlib.suppress(OSError):
            while data := os.read(sys.stdin.fileno(), 65536):
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
    threading.Thread(target=upstream, daemon=True).start()
    with s:
        while data := s.recv(65536):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
    return 0


def events(client: Client, args: argparse.Namespace) -> int:
    with client.events(args.vm_id) as stream:
        for ev in stream:
            print(to_json(ev, indent=None) if args.json else event_line(ev), flush=True)
    return 0


# -- commands --
def run(client: Client, args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "create":
        show_vms(args, [client.create(args.id, args.kernel, initrd=args.initrd,
                                      cmdline=args.cmdline, cmdline_append=args.append,
                                      vcpus=args.vcpus, memory_mib=args.mem_mib,
                                      track_dirty_pages=args.track_dirty,
                                      drives=_drives(args), nets=_nets(args),
                                      acpi=args.acpi, cell=args.cell, limits=_limits(args),
                                      entropy=pb.EntropyDevice() if args.entropy else None,
                                      vsock=args.vsock)])
    elif cmd == "snapshot":
        show_snapshot(args, client.snapshot(args.vm_id, args.dir, diff=args.diff))
    elif cmd == "restore":
        show_vms(args, [client.restore(args.dir, args.id, resume=args.resume,
                                       overrides=_overrides(args, 0),
                                       track_dirty_pages=args.track_dirty,
                                       cell=args.cell, limits=_limits(args),
                                       clock_realtime=args.clock_realtime)])
    elif cmd == "clone":
        per_clone = [_overrides(args, i) for i in range(args.count)] \
            if args.drive or args.net or args.netns or args.mac else []
        show_vms(args, client.clone(args.dir, args.count, args.prefix, resume=args.resume,
                                    overrides=per_clone, track_dirty_pages=args.track_dirty,
                                    cell=args.cell, limits=_limits(args),
                                    clock_realtime=args.clock_realtime),
                 one=False)
    elif cmd == "merge":
        show_snapshot(args, client.merge(args.base, args.diff))
    elif cmd in ("start", "pause", "resume", "get"):
        show_vms(args, [getattr(client, cmd)(args.vm_id)])
    elif cmd == "stop":
        show_vms(args, [client.stop(args.vm_id, timeout_ms=args.timeout_ms, force=args.force)])
    elif cmd == "delete":
        client.delete(args.vm_id)
        print(to_json(pb.DeleteVmResponse()) if args.json else f"deleted {args.vm_id}")
    elif cmd == "list":
        show_vms(args, client.list(), one=False)
    elif cmd == "console":
        return console(client, args)
    elif cmd == "vsock":
        return vsock(client, args)
    else:
        return events(client, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.socket) as client:
            return run(client, args)
    except ClientError as e:
        print(f"vmmctl: {e.code}: {e.details}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `vmmctl events | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
