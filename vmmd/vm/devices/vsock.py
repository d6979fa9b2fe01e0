"""virtio-vsock: validation, the listening socket, the command-line word.

The host side follows Firecracker's convention (docs/vsock.md): the daemon
listens on a Unix socket at uds_path, where host clients connect and write
"CONNECT <port>\\n"; a guest connect to host port P goes to the Unix socket
"<uds_path>_<P>".  The privileged part opens, the jailed part uses: the
daemon binds the listener and opens uds_path's directory (O_DIRECTORY |
O_NOFOLLOW) and passes both fds to the C device, which accepts on the one
and connects relative to the other (so a cell's jail, with no directory of
its own, reaches exactly that directory).  Everything is checked and the
socket bound before the VM exists; the socket file is removed when the VM
closes (or its construction fails) - only if it is still the one we made.
The device takes the virtio-mmio slot after the drives, the interfaces and
the entropy device (the builder says which: first_slot).
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from vmmd.errors import FieldPath, InvalidSpecError, shown
from vmmd.info import VsockCounters
from vmmd.native import VirtioStats
from vmmd.record import Record
from vmmd.spec import VsockSpec
from vmmd.vm.boot.cmdline import virtio_mmio_word
from vmmd.vm.layout import virtio_mmio_slot

DEVICE_ID, QUEUES = 19, 3  # virtio-vsock (RX, TX, event), as native/virtio_vsock.c's ops table says
HOST_CID = 2
MIN_CID, MAX_CID = 3, 0xFFFF_FFFE  # 0-2 reserved (hypervisor, local, host); 2^32-1 is "any"
MAX_PATH = 107  # sockaddr_un.sun_path holds 108 bytes, the NUL included
MAX_NAME = 96   # VMM_VSOCK_NAME_MAX: "<name>_<4294967295>" still fits in sun_path
BACKLOG = 128


def _field(name: str) -> FieldPath:
    return ("vsock", name)


class VsockPlan(Record):
    spec: VsockSpec
    mmio_base: int
    irq: int

    @property
    def directory(self) -> str:
        return os.path.dirname(self.spec.uds_path) or "/"

    @property
    def name(self) -> str:
        return os.path.basename(self.spec.uds_path)


def check_vsock(v: VsockSpec | None, first_slot: int) -> VsockPlan | None:
    """The context id's range and the path's shape; no host access here."""
    if v is None:
        return None
    if not MIN_CID <= v.guest_cid <= MAX_CID:
        raise InvalidSpecError(_field("guest_cid"), f"{v.guest_cid} is outside "
                               f"{MIN_CID}..{MAX_CID} (0, 1 and 2 are reserved, "
                               f"{MAX_CID + 1} means any)")
    path, where = v.uds_path, _field("uds_path")
    if not path:
        raise InvalidSpecError(where, "is required")
    if "\0" in path:
        raise InvalidSpecError(where, "contains a NUL byte")
    if not path.startswith("/"):
        raise InvalidSpecError(where, f"{shown(path)!r} is not an absolute path")
    if len(os.fsencode(path)) > MAX_PATH:
        raise InvalidSpecError(where, f"is {len(os.fsencode(path))} bytes; a Unix socket path "
                               f"is at most {MAX_PATH}")
    name = os.path.basename(path)
    if name in ("", ".", ".."):
        raise InvalidSpecError(where, f"{shown(path)!r} does not name a file")
    if len(os.fsencode(name)) > MAX_NAME:
        raise InvalidSpecError(where, f"its last component is {len(os.fsencode(name))} bytes; "
                               f"at most {MAX_NAME} (so that \"_<port>\" fits)")
    try:
        region, irq = virtio_mmio_slot(first_slot)
    except ValueError:
        raise InvalidSpecError("vsock", f"at most {first_slot} devices fit this VM") from None
    return VsockPlan(v, region.gpa, irq)


class Listener:
    """The bound, listening socket at uds_path and its directory, open.
    close() removes the socket file if it is still ours, and closes both."""

    def __init__(self, plan: VsockPlan) -> None:
        self.name = plan.name
        self.sock: socket.socket | None = None
        self.dir_fd = _open_dir(plan)
        try:
            self._bind(plan)
        except BaseException:
            self.close()
            raise

    @property
    def fd(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def _bind(self, plan: VsockPlan) -> None:
        where = _field("uds_path")
        try:
            os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:  # someone's file (or another VM's socket): not ours to remove
            raise InvalidSpecError(where, f"{shown(plan.spec.uds_path)} exists already")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(plan.spec.uds_path)
        except OSError as e:
            s.close()
            if e.errno == errno.EADDRINUSE:
                raise InvalidSpecError(where, f"{shown(plan.spec.uds_path)} exists already") \
                    from None
            raise InvalidSpecError(where, f"cannot bind {shown(plan.spec.uds_path)}: "
                                          f"{e.strerror}") from None
        self.sock = s
        st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        self._made = (st.st_dev, st.st_ino)  # the file bind made: only it is removed
        s.listen(BACKLOG)
        s.setblocking(False)

    def close(self) -> None:
        if self.sock is not None:
            try:
                st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == self._made and stat.S_ISSOCK(st.st_mode):
                    os.unlink(self.name, dir_fd=self.dir_fd)
            except OSError:
                pass  # gone already (someone removed it): nothing of ours is left
            self.sock.close()
            self.sock = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _open_dir(plan: VsockPlan) -> int:
    where, d = _field("uds_path"), plan.directory
    try:
        return os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidSpecError(where, f"its directory {shown(d)} does not exist") from None
    except OSError as e:
        # O_NOFOLLOW | O_DIRECTORY on a symbolic link: ENOTDIR (ELOOP without O_DIRECTORY)
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(d):
            raise InvalidSpecError(where, f"its directory {shown(d)} is a symbolic link; "
                                          "name the directory it points to") from None
        if e.errno == errno.ENOTDIR:
            raise InvalidSpecError(where, f"{shown(d)} is not a directory") from None
        raise InvalidSpecError(where, f"cannot open its directory {shown(d)}: "
                                      f"{e.strerror}") from None


def open_listener(plan: VsockPlan | None) -> Listener | None:
    return Listener(plan) if plan is not None else None


def cmdline_words(plan: VsockPlan | None, *, devices: bool = True) -> list[str]:
    """The device's word, none unless `devices` (with ACPI the tables announce it)."""
    return [virtio_mmio_word(plan.mmio_base, plan.irq)] if plan is not None and devices else []


def counters(s: VirtioStats) -> VsockCounters:
    return VsockCounters(s.rx_frames, s.bytes_read, s.tx_frames, s.bytes_written, s.connections,
                         s.resets, s.io_errors, s.bad_packets, s.bad_chains, s.interrupts)
