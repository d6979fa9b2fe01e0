"""Network interfaces: validation, MAC addresses, opening host taps.

Every interface is checked and its tap opened before the VM exists.  The
daemon attaches to an existing tap by name (it must exist and be free: a
tap takes one VM, and the kernel refuses a second opener), or, with
`create_tap`, makes the tap itself; a tap vmmd made is not persistent, so
it disappears when the VM (or the daemon) closes it.  The tap fd carries
the virtio-net header (IFF_VNET_HDR, 12 bytes) and is non-blocking: the C
device reads and writes it on the VM's I/O thread.  Interfaces take the
virtio-mmio slots after the drives; the first is eth0 in the guest.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import struct
from dataclasses import dataclass

from vmmd.errors import FieldPath, InvalidSpecError, NativeError, quoted
from vmmd.info import InterfaceCounters
from vmmd.native import VirtioStats
from vmmd.spec import NetSpec, check_id
from vmmd.vm.boot.cmdline import virtio_mmio_word
from vmmd.vm.layout import virtio_mmio_slot

IFNAMSIZ = 16
_TAP_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")

# linux/if_tun.h, linux/sockios.h
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_TUN_EXCL, IFF_PERSIST = 0x2, 0x1000, 0x4000, 0x8000, 0x800
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCGIFMTU = 0x8913, 0x8914, 0x8921
IFF_UP = 0x1
DEVICE_ID, QUEUES = 1, 2  # virtio-net (RX, TX), as native/virtio_net.c's ops table says
VNET_HDR_LEN = 12   # struct virtio_net_hdr_v1: VERSION_1 always has num_buffers
ETH_OVERHEAD = 18   # Ethernet header + one VLAN tag


@dataclass(frozen=True)
class NetPlan:
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
    return b"\x06" + hashlib.sha256(f"{vm_id}/{iface_id}".encode()).digest()[:5]


def check_nets(nets: tuple[NetSpec, ...], vm_id: str, first_slot: int) -> tuple[NetPlan, ...]:
    """Validate ids, tap names and MACs, generate missing MACs, take slots.
    No host access here."""
    ids: set[str] = set()
    taps: dict[str, int] = {}
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
        if n.host_dev_name in taps:
            raise InvalidSpecError(_field(i, "host_dev_name"), f"{n.host_dev_name} is used by "
                                   f"network_interfaces[{taps[n.host_dev_name]}] "
                                   "already; a tap takes one interface")
        taps[n.host_dev_name] = i
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
        spec = NetSpec(n.iface_id, n.host_dev_name, format_mac(mac), n.create_tap)
        plans.append(NetPlan(spec, i, mac, region.gpa, irq))
    return tuple(plans)


@dataclass(frozen=True)
class Tap:
    fd: int
    max_frame: int  # MTU + Ethernet and VLAN headers


class Taps:
    """Open every interface's tap; close() releases them (a tap vmmd
    created disappears with its fd)."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def open(self, plans: tuple[NetPlan, ...]) -> list[Tap]:
        taps = []
        try:
            for p in plans:
                tap = _open_tap(p)
                self._fds.append(tap.fd)
                taps.append(tap)
        except BaseException:
            self.close()
            raise
        return taps

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _ifreq(name: str, value: int = 0) -> bytes:
    """struct ifreq: the name, then a short (flags) or int (mtu) field."""
    return struct.pack(f"{IFNAMSIZ}sH", name.encode(), value).ljust(40, b"\0")


def _open_tap(p: NetPlan) -> Tap:
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
    except BaseException:
        os.close(fd)
        raise
    return Tap(fd, mtu + ETH_OVERHEAD)


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


def interface_counters(n: NetSpec, s: VirtioStats) -> InterfaceCounters:
    """The device's counters, plus the frames the tap's own queue dropped
    while the guest took none (what the host sent toward the guest)."""
    return InterfaceCounters(n.iface_id, s.rx_frames, s.bytes_read, s.tx_frames,
                             s.bytes_written, s.io_errors,
                             _tap_counter(n.host_dev_name, "tx_dropped"), s.bad_chains,
                             s.interrupts)


def _tap_counter(tap: str, name: str) -> int:
    try:
        with open(f"/sys/class/net/{tap}/statistics/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0  # the tap is gone, or lives in another namespace than our sysfs
