"""Network interfaces: validation, MAC addresses, opening host taps.

Every interface is checked and its tap opened before the VM exists.  The
daemon attaches to an existing tap by name (it must exist and be free: a
tap takes one VM, and the kernel refuses a second opener), or, with
`create_tap`, makes the tap itself; a tap vmmd made is not persistent, so
it disappears when the VM (or the daemon) closes it.  The tap fd carries
the virtio-net header (IFF_VNET_HDR, 12 bytes) and is non-blocking: the C
device reads and writes it on the VM's I/O thread.  Interfaces take the
virtio-mmio slots after the drives; the first is eth0 in the guest.

A tap may live in a named network namespace (`netns`: /run/netns/NAME, as
`ip netns add NAME` makes it).  The namespace file is opened without
following a symlink and must be a network namespace (an nsfs file of type
CLONE_NEWNET); then a short-lived thread of its own enters it (setns moves
only the calling thread's network namespace), opens /dev/net/tun and
attaches or creates the tap there, and ends.  The tap fd stays bound to
that namespace, so the VM uses it from any thread, and a tap vmmd created
there disappears with the fd as in the daemon's namespace.  No thread that
serves anything else ever changes namespace.  In cells mode the daemon
opens the taps this way and passes the fds to the worker, as always.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from vmmd.errors import FieldPath, InvalidSpecError, NativeError, quoted, shown
from vmmd.info import InterfaceCounters
from vmmd.native import VirtioStats
from vmmd.record import Record
from vmmd.spec import NetSpec, check_id
from vmmd.vm.boot.cmdline import virtio_mmio_word
from vmmd.vm.hostfiles import fs_type
from vmmd.vm.layout import virtio_mmio_slot

T = TypeVar("T")

IFNAMSIZ = 16
_TAP_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")

# linux/if_tun.h, linux/sockios.h
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_TUN_EXCL, IFF_PERSIST = 0x2, 0x1000, 0x4000, 0x8000, 0x800
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCGIFMTU, SIOCGIFINDEX = 0x8913, 0x8914, 0x8921, 0x8933
IFF_UP = 0x1
# linux/sched.h, linux/nsfs.h, linux/magic.h; NAME_MAX: a file name under /run/netns
CLONE_NEWNET, NS_GET_NSTYPE, NSFS_MAGIC, NAME_MAX = 0x40000000, 0xB703, 0x6E736673, 255
NETNS_DIR = "/run/netns"
# linux/netlink.h, linux/rtnetlink.h, linux/if_link.h (tx_dropped: the 8th u64 of
# rtnl_link_stats64)
NETLINK_ROUTE, NLM_F_REQUEST, RTM_NEWLINK, RTM_GETLINK = 0, 1, 16, 18
IFLA_STATS64, STATS64_TX_DROPPED = 23, 7
NETLINK_BUF, NETLINK_TIMEOUT_S = 65536, 1.0
DEVICE_ID, QUEUES = 1, 2  # virtio-net (RX, TX), as native/virtio_net.c's ops table says
VNET_HDR_LEN = 12   # struct virtio_net_hdr_v1: VERSION_1 always has num_buffers
ETH_OVERHEAD = 18   # Ethernet header + one VLAN tag


class NetPlan(Record):
    spec: NetSpec  # mac filled in
    index: int
    mac: bytes
    mmio_base: int
    irq: int


def _field(i: int, name: str) -> FieldPath:
    return ("network_interfaces", i, name)


def parse_mac(text: str, field: FieldPath | str) -> bytes:
    if not _MAC_RE.fullmatch(text):
        raise InvalidSpecError(field, f"{quoted(text)} is not a MAC address like 02:00:00:00:00:01")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise InvalidSpecError(field, f"{text} is a multicast address; a guest needs a unicast one")
    if mac == bytes(6):
        raise InvalidSpecError(field, "00:00:00:00:00:00 is not a usable address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def generated_mac(vm_id: str, iface_id: str) -> bytes:
    """Locally administered unicast (06:...), the same for the same VM and interface."""
    import hashlib  # OpenSSL's, ~3 ms to load: only a VM given a NIC without a MAC needs it

    return b"\x06" + hashlib.sha256(f"{vm_id}/{iface_id}".encode()).digest()[:5]


def check_nets(nets: tuple[NetSpec, ...], vm_id: str, first_slot: int) -> tuple[NetPlan, ...]:
    """Validate ids, tap names and MACs, generate missing MACs, take slots.
    No host access here."""
    ids: set[str] = set()
    taps: dict[tuple[str, str], int] = {}  # (netns, tap): one name per namespace
    macs: dict[bytes, int] = {}
    plans = []
    for i, n in enumerate(nets):
        check_id(_field(i, "iface_id"), n.iface_id)
        if n.iface_id in ids:
            raise InvalidSpecError(_field(i, "iface_id"), f"{quoted(n.iface_id)} is used twice")
        ids.add(n.iface_id)
        if not n.host_dev_name:
            raise InvalidSpecError(_field(i, "host_dev_name"), "is required")
        if not _TAP_RE.fullmatch(n.host_dev_name):
            raise InvalidSpecError(_field(i, "host_dev_name"),
                                   f"{quoted(n.host_dev_name)} is not a network device name "
                                   f"(1-{IFNAMSIZ - 1} characters of A-Z a-z 0-9 _ . -)")
        if (n.netns, n.host_dev_name) in taps:
            raise InvalidSpecError(_field(i, "host_dev_name"), f"{n.host_dev_name} is used by "
                                   f"network_interfaces[{taps[n.netns, n.host_dev_name]}] "
                                   "already; a tap takes one interface")
        taps[n.netns, n.host_dev_name] = i
        if n.netns:
            check_netns_name(n.netns, _field(i, "netns"))
        mac = (parse_mac(n.guest_mac, _field(i, "guest_mac")) if n.guest_mac
               else generated_mac(vm_id, n.iface_id))
        if mac in macs:
            raise InvalidSpecError(_field(i, "guest_mac"), f"{format_mac(mac)} is the address of "
                                   f"network_interfaces[{macs[mac]}] too")
        macs[mac] = i
        try:
            region, irq = virtio_mmio_slot(first_slot + i)
        except ValueError:
            raise InvalidSpecError("network_interfaces", f"at most {first_slot + i} devices fit this VM") from None
        spec = NetSpec(n.iface_id, n.host_dev_name, format_mac(mac), n.create_tap, n.netns)
        plans.append(NetPlan(spec, i, mac, region.gpa, irq))
    return tuple(plans)


class LinkStats:
    """A tap's own counters in another network namespace, where the daemon's
    sysfs does not reach: a route netlink socket made inside that namespace
    (a socket stays in the namespace it was made in) asks for the link's
    rtnl_link_stats64 by ifindex."""

    def __init__(self, name: str) -> None:
        """Called inside the tap's namespace."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            self._index = struct.unpack_from("i", fcntl.ioctl(s, SIOCGIFINDEX, _ifreq(name)),
                                              IFNAMSIZ)[0]
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.settimeout(NETLINK_TIMEOUT_S)
        self._lock = threading.Lock()  # one request and its answer at a time

    def tx_dropped(self) -> int:
        """The tap's tx_dropped (frames toward the guest its queue dropped); 0 if
        the link is gone or the answer is not one."""
        # nlmsghdr (len, RTM_GETLINK, NLM_F_REQUEST, seq, pid) + ifinfomsg (index)
        req = struct.pack("=IHHII", 32, RTM_GETLINK, NLM_F_REQUEST, 1, 0) + \
            struct.pack("=BxHiII", socket.AF_UNSPEC, 0, self._index, 0, 0)
        with self._lock:
            try:
                self._sock.send(req)
                reply = self._sock.recv(NETLINK_BUF)
            except OSError:
                return 0
        return _stats64_tx_dropped(reply)

    def close(self) -> None:
        self._sock.close()


def _stats64_tx_dropped(reply: bytes) -> int:
    """tx_dropped of IFLA_STATS64 in an RTM_NEWLINK answer (0 if none)."""
    if len(reply) < 32 or struct.unpack_from("=H", reply, 4)[0] != RTM_NEWLINK:
        return 0
    end, at = min(struct.unpack_from("=I", reply)[0], len(reply)), 32  # after nlmsghdr + ifinfomsg
    while at + 4 <= end:
        length, kind = struct.unpack_from("=HH", reply, at)
        if length < 4:
            return 0
        if kind == IFLA_STATS64 and length >= 4 + 8 * (STATS64_TX_DROPPED + 1):
            return int(struct.unpack_from("=Q", reply, at + 4 + 8 * STATS64_TX_DROPPED)[0])
        at += (length + 3) & ~3
    return 0


class Tap(Record):
    fd: int
    max_frame: int  # MTU + Ethernet and VLAN headers
    stats: LinkStats | None = None  # a tap in a named namespace: its counters


class Taps:
    """Open every interface's tap; close() releases them (a tap vmmd
    created disappears with its fd)."""

    def __init__(self) -> None:
        self._taps: list[tuple[str, Tap]] = []  # (name, tap) in interface order

    def open(self, plans: tuple[NetPlan, ...]) -> list[Tap]:
        taps = []
        try:
            for p in plans:
                tap = _open_tap_in(p) if p.spec.netns else _open_tap(p)
                self._taps.append((p.spec.host_dev_name, tap))
                taps.append(tap)
        except BaseException:
            self.close()
            raise
        return taps

    def rx_dropped(self, i: int) -> int:
        """Interface i's tap's tx_dropped: what the host sent toward the guest
        that the tap's queue dropped while the guest took none."""
        if i >= len(self._taps):
            return 0  # closed
        name, tap = self._taps[i]
        return tap.stats.tx_dropped() if tap.stats else _tap_counter(name, "tx_dropped")

    def close(self) -> None:
        for _, tap in self._taps:
            os.close(tap.fd)
            if tap.stats:
                tap.stats.close()
        self._taps = []


def check_netns_name(name: str, field: FieldPath) -> None:
    """A namespace name as `ip netns` makes them: one file name under /run/netns."""
    if "/" in name or "\0" in name or name in (".", ".."):
        raise InvalidSpecError(field, f"{quoted(name)} is not a network namespace name "
                                      f"(a file name under {NETNS_DIR}: no '/', not . or ..)")
    if len(os.fsencode(name)) > NAME_MAX:
        raise InvalidSpecError(field, f"{quoted(name)} is longer than {NAME_MAX} bytes")


def open_netns(name: str, field: FieldPath) -> int:
    """/run/netns/<name> open, checked to be a network namespace.  Messages
    show the name shortened (it may be 255 bytes)."""
    path, where = f"{NETNS_DIR}/{name}", f"{NETNS_DIR}/{shown(name)}"
    try:
        # O_NONBLOCK: a FIFO planted there must not hang the daemon.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidSpecError(field, f"there is no network namespace {quoted(name)} in "
                                      f"{NETNS_DIR} (`ip netns add NAME` makes one)") from None
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened: {e.strerror}"
        raise InvalidSpecError(field, f"{where} {why}, not a network namespace") from None
    try:
        # An nsfs file first (only then is NS_GET_NSTYPE nsfs's ioctl), then its kind.
        if fs_type(fd) != NSFS_MAGIC or fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET:
            raise InvalidSpecError(field, f"{where} is not a network namespace")
    except OSError as e:
        os.close(fd)
        raise InvalidSpecError(field, f"{where} is not a network namespace ({e.strerror})") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns_fd: int, fn: Callable[[], T]) -> T:
    """fn() in a new thread that entered the network namespace ns_fd and ends
    with fn: the namespace changes nowhere else.  fn's result or exception."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
                raise NativeError("setns(CLONE_NEWNET)", ctypes.get_errno())
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name="vmmd-netns", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    result: T = out["value"]
    return result


def _open_tap_in(p: NetPlan) -> Tap:
    """_open_tap inside the interface's namespace."""
    field = _field(p.index, "netns")
    ns_fd = open_netns(p.spec.netns, field)
    try:
        return in_netns(ns_fd, lambda: _open_tap(p, stats=True))
    except NativeError as e:
        if e.errno != errno.EPERM:
            raise
        # As a tap the daemon may not open: the request asks what this daemon cannot do.
        raise InvalidSpecError(field, f"no permission to enter network namespace "
                                      f"{quoted(p.spec.netns)} (the daemon needs "
                                      "CAP_SYS_ADMIN)") from None
    finally:
        os.close(ns_fd)


def _ifreq(name: str, value: int = 0) -> bytes:
    """struct ifreq: the name, then a short (flags) or int (mtu) field."""
    return struct.pack(f"{IFNAMSIZ}sH", name.encode(), value).ljust(40, b"\0")


def _open_tap(p: NetPlan, *, stats: bool = False) -> Tap:
    name, field = p.spec.host_dev_name, _field(p.index, "host_dev_name")
    create = p.spec.create_tap
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise NativeError("open /dev/net/tun", e.errno or errno.EIO) from None
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_TUN_EXCL if create else 0)
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
        except OSError as e:
            raise _tap_error(e, name, field, create) from None
        got = struct.unpack_from("H", fcntl.ioctl(fd, TUNGETIFF, _ifreq(name)), IFNAMSIZ)[0]
        if not create and not got & IFF_PERSIST:
            # A tap nobody holds open exists only if it is persistent: this
            # one TUNSETIFF just made, and closing the fd removes it again.
            raise InvalidSpecError(field, f"there is no tap device {name} (create it with "
                                          f"`ip tuntap add {name} mode tap`, or ask vmmd to "
                                          "create it)")
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if create:  # the user brings up a tap they made; we bring up ours
                fl = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name)), IFNAMSIZ)[0]
                fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, fl | IFF_UP))
            mtu = struct.unpack_from("i", fcntl.ioctl(s, SIOCGIFMTU, _ifreq(name)), IFNAMSIZ)[0]
        link = LinkStats(name) if stats else None  # stats: in the tap's namespace
    except BaseException:
        os.close(fd)
        raise
    return Tap(fd, mtu + ETH_OVERHEAD, link)


def _tap_error(e: OSError, name: str, field: FieldPath, create: bool) -> InvalidSpecError:
    if e.errno == errno.EBUSY and create:
        return InvalidSpecError(field, f"{name} exists already; attach to it without "
                                       "creating, or choose another name")
    if e.errno == errno.EBUSY:
        return InvalidSpecError(field, f"tap {name} is attached to another VM or process")
    if e.errno == errno.EINVAL:
        return InvalidSpecError(field, f"{name} is not a tap device (or one made with "
                                       "incompatible flags, e.g. multi_queue)")
    if e.errno == errno.EPERM:
        return InvalidSpecError(field, f"no permission to attach to tap {name}")
    return InvalidSpecError(field, f"cannot open tap {name}: {e.strerror}")


def cmdline_words(plans: tuple[NetPlan, ...], *, devices: bool = True) -> list[str]:
    """Device words, none unless `devices` (with ACPI the tables announce them)."""
    return [virtio_mmio_word(p.mmio_base, p.irq) for p in plans] if devices else []


def interface_counters(n: NetSpec, s: VirtioStats, tap_dropped: int) -> InterfaceCounters:
    """The device's counters, plus the frames the tap's own queue dropped
    while the guest took none (what the host sent toward the guest: Taps.rx_dropped)."""
    return InterfaceCounters(n.iface_id, s.rx_frames, s.bytes_read, s.tx_frames,
                             s.bytes_written, s.io_errors, tap_dropped, s.bad_chains,
                             s.interrupts)


def _tap_counter(tap: str, name: str) -> int:
    try:
        with open(f"/sys/class/net/{tap}/statistics/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0  # the tap is gone
