"""The broker's side of a worker: calls over the wire, and RemoteNativeVm,
the NativeVm whose C core lives in a cell.

RemoteNativeVm has NativeVm's interface, so the builder, the snapshot code
and Vm use it unchanged: each method is one call to the worker.  What the
worker answers is untrusted: the codec checks every value's type and
shape, and each method checks what it expects (a count is an int in range,
an event a well-formed Event); anything else is a ProtocolError, and the
broker kills the worker.  The VM's event and console eventfds are passed to
the broker once, so its watcher sleeps on them as on a local VM's.

When the worker dies, every call fails with ESRCH, next_event() reports
the VM stopped with StopReason.WORKER_DIED, and stop_detail() says why.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Self

from vmmd._proto.vmmd.v1 import cell_pb2 as cpb
from vmmd.cell import wire
from vmmd.errors import InvalidSpecError, NativeError
from vmmd.native import (
    Event,
    EventType,
    LegacyState,
    MachineState,
    PackedVcpu,
    StopReason,
    VcpuState,
    VirtioState,
    VirtioStats,
    VmStats,
    pack_vcpu,
)
from vmmd.native.state import packed_bytes

CALL_TIMEOUT_S = 30.0  # a worker that takes longer is hung: it is killed


class WorkerGone(NativeError):
    pass


class _Encoded:
    """The wire form of saved states that many restores send (clones of one
    snapshot share the checked state objects: vmm/snapshot/apply.py's
    cache): encoded once, by object identity, the objects kept alive with
    their encoding.  A few hundred microseconds per restore."""

    MAX = 512

    def __init__(self, how: Callable[[Any], Any] | None = None) -> None:
        self._how = how or (lambda obj: wire.encode(obj, []))
        self._lock = threading.Lock()
        self._by_id: OrderedDict[int, tuple[object, Any]] = OrderedDict()

    def __call__(self, obj: Any) -> Any:
        with self._lock:
            hit = self._by_id.get(id(obj))
            if hit is not None and hit[0] is obj:
                self._by_id.move_to_end(id(obj))
                return hit[1]
        m = self._how(obj)
        with self._lock:
            self._by_id[id(obj)] = (obj, m)
            while len(self._by_id) > self.MAX:
                self._by_id.popitem(last=False)
        return m


_encoded = _Encoded()
_packed_bytes = _Encoded(packed_bytes)


class Channel:
    """Calls to one worker, one at a time (the worker serves one at a time).
    A broken protocol or a call that outlives its deadline ends the
    channel; `on_broken(why)` is told once, and kills the worker."""

    def __init__(self, sock: socket.socket, on_broken: Callable[[str], None]) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._seq = 0
        self._dead: str | None = None
        self._on_broken = on_broken

    @property
    def dead(self) -> str | None:
        return self._dead

    def mark_dead(self, why: str) -> None:
        self._dead = self._dead or why

    def call(self, vm: int, method: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S,
             **kwargs: Any) -> list[Any]:
        """The method's results (fds among them as wire.Fd: the caller owns them)."""
        fds: list[int] = []
        call = cpb.CellCall(vm=vm, method=method, args=[wire.encode(a, fds) for a in args],
                            kwargs={k: wire.encode(v, fds) for k, v in kwargs.items()})
        with self._lock:
            if self._dead is not None:
                raise WorkerGone(f"{method}: {self._dead}", errno.ESRCH)
            self._seq += 1
            seq = self._seq
            try:
                wire.send(self._sock, cpb.CellFrame(version=wire.CELL_PROTOCOL_VERSION, seq=seq,
                                                    call=call), fds)
                frame, rfds = wire.recv(self._sock, time.monotonic() + timeout_s)
            except (OSError, wire.ProtocolError) as e:
                self._broken(f"{method}: {e}")
                raise WorkerGone(f"{method}: {self._dead}", errno.ESRCH) from None
        try:
            if frame.seq != seq or frame.WhichOneof("body") != "reply":
                raise wire.ProtocolError(f"answered seq {frame.seq} to call {seq}")
            reply = frame.reply
            if reply.errno:
                raise NativeError(reply.error[:200] or method, reply.errno)
            return [wire.decode(r, rfds) for r in reply.results]
        except wire.ProtocolError as e:
            for fd in rfds:
                os.close(fd)
            self._broken(f"{method}: {e}")
            raise WorkerGone(f"{method}: {self._dead}", errno.ESRCH) from None
        except BaseException:
            for fd in rfds:
                os.close(fd)
            raise

    def _broken(self, why: str) -> None:
        first = self._dead is None
        self.mark_dead(f"the worker broke the protocol ({why})")
        if first:
            self._on_broken(why)

    def close(self) -> None:
        self.mark_dead("closed")
        self._sock.close()


def _one(results: list[Any], kind: type | tuple[type, ...], method: str) -> Any:
    if len(results) != 1 or not isinstance(results[0], kind) or (
            kind is int and isinstance(results[0], bool)):
        raise NativeError(f"{method}: the worker answered {type(results[0]).__name__ if results else 'nothing'}",
                          errno.EPROTO)
    return results[0]


class RemoteNativeVm:
    """One KVM VM in a cell's worker (see the module doc)."""

    prepared = None  # a cell's VMs are made on demand, never ahead (NativeVm.prepared)

    def __init__(self, channel: Channel, kvm_path: str, cell_name: str,
                 on_close: Callable[[RemoteNativeVm], None] | None = None) -> None:
        self._ch = channel
        self.cell_name = cell_name
        self._on_close = on_close
        self._closed = False
        self._lost: str | None = None  # why the worker died, once it did
        # lost() (the zygote reader's thread) writes the event fd that close()
        # closes: never after, when the number may be another file's.
        self._fd_lock = threading.Lock()
        self._death_reported = False  # next_event() said STOPPED for it
        self._stats: VmStats | None = None
        self._vstats: dict[int, VirtioStats] = {}
        kvm = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            res = channel.call(0, "create", wire.Fd(kvm))
        finally:
            os.close(kvm)
        fds = [r.fd for r in res if isinstance(r, wire.Fd)]
        if len(res) != 3 or not isinstance(res[0], int) or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise NativeError("create VM: the worker answered badly", errno.EPROTO)
        self._handle = res[0]
        self._event_fd, self._console_fd = fds

    def _call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self._ch.call(self._handle, method, *args, **kwargs)

    def _unit(self, method: str, *args: Any, **kwargs: Any) -> None:
        self._call(method, *args, **kwargs)

    def _int(self, method: str, *args: Any, **kwargs: Any) -> int:
        return int(_one(self._call(method, *args, **kwargs), int, method))

    # -- the worker is gone --
    def lost(self, why: str) -> None:
        """The worker died (why: in words): the VM's watcher wakes and sees
        the VM stopped."""
        with self._fd_lock:
            if self._lost is None and not self._closed:
                self._lost = why
                os.eventfd_write(self._event_fd, 1)

    def stop_detail(self) -> str | None:
        return self._lost

    # -- construction --
    def add_ram(self, gpa: int, size: int) -> None:
        self._unit("add_ram", gpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        self._unit("write", gpa, data)

    def load_file(self, gpa: int, fd: int, offset: int, length: int, field: Any) -> None:
        try:
            self._unit("load_file", gpa, wire.Fd(fd), offset, length, list(field)
                       if isinstance(field, tuple) else field)
        except NativeError as e:
            if e.errno == errno.ENODATA:
                raise InvalidSpecError(field, "file shrank while loading") from None
            raise

    def read(self, gpa: int, length: int) -> bytes:
        data = _one(self._call("read", gpa, length), bytes, "read")
        if len(data) != length:
            raise NativeError("read: a short answer", errno.EPROTO)
        return bytes(data)

    def create_vcpus(self, n: int, *, bare: bool = False) -> None:
        self._unit("create_vcpus", n, bare=bare)

    def add_virtio_blk(self, fd: int, *, read_only: bool, serial: str, mmio_base: int,
                       gsi: int) -> int:
        return self._int("add_virtio_blk", wire.Fd(fd), read_only=read_only, serial=serial,
                         mmio_base=mmio_base, gsi=gsi)

    def add_virtio_net(self, tap_fd: int, *, mac: bytes, max_frame: int, mmio_base: int,
                       gsi: int) -> int:
        return self._int("add_virtio_net", wire.Fd(tap_fd), mac=mac, max_frame=max_frame,
                         mmio_base=mmio_base, gsi=gsi)

    def add_virtio_rng(self, *, max_request: int, mmio_base: int, gsi: int) -> int:
        return self._int("add_virtio_rng", max_request=max_request, mmio_base=mmio_base,
                         gsi=gsi)

    def add_virtio_vsock(self, listen_fd: int, dir_fd: int, *, guest_cid: int, name: str,
                         mmio_base: int, gsi: int) -> int:
        return self._int("add_virtio_vsock", wire.Fd(listen_fd), wire.Fd(dir_fd),
                         guest_cid=guest_cid, name=name, mmio_base=mmio_base, gsi=gsi)

    def set_boot_regs(self, idx: int, regs: Any) -> None:
        self._unit("set_boot_regs", idx, regs)

    def get_regs(self, idx: int) -> tuple[dict[str, Any], int]:
        res = self._call("get_regs", idx)
        if len(res) != 2 or not isinstance(res[0], dict) or not isinstance(res[1], int):
            raise NativeError("get_regs: a bad answer", errno.EPROTO)
        return res[0], res[1]

    # -- snapshots --
    def save_vcpu(self, idx: int) -> VcpuState:
        return _one(self._call("save_vcpu", idx), VcpuState, "save_vcpu")

    def restore_vcpu(self, idx: int, s: VcpuState | PackedVcpu) -> None:
        # As the C struct's bytes (checked here already; C bounds its counts):
        # the worker copies them into a struct, no checking and packing again.
        packed = s if isinstance(s, PackedVcpu) else pack_vcpu(s)
        self._unit("restore_vcpu_bytes", idx, _packed_bytes(packed))

    def save_machine(self) -> MachineState:
        return _one(self._call("save_machine"), MachineState, "save_machine")

    def restore_machine(self, s: MachineState, *, clock_realtime: bool = False) -> None:
        # The worker's C core reads the host clock, right at KVM_SET_CLOCK.
        self._unit("restore_machine", _encoded(s), clock_realtime=clock_realtime)

    def save_virtio(self, idx: int) -> VirtioState:
        return _one(self._call("save_virtio", idx), VirtioState, "save_virtio")

    def restore_virtio(self, idx: int, s: VirtioState) -> None:
        self._unit("restore_virtio", idx, _encoded(s))

    def save_legacy(self) -> LegacyState:
        return _one(self._call("save_legacy"), LegacyState, "save_legacy")

    def restore_legacy(self, s: LegacyState) -> None:
        self._unit("restore_legacy", _encoded(s))

    def add_ram_file(self, gpa: int, size: int, fd: int, offset: int) -> None:
        self._unit("add_ram_file", gpa, size, wire.Fd(fd), offset)

    def track_dirty(self) -> None:
        self._unit("track_dirty")

    @property
    def tracks_dirty(self) -> bool:
        return bool(self._int("tracks_dirty"))

    def write_memory(self, fd: int, offset: int, *, diff: bool, pages: int) -> tuple[int, bytes]:
        res = self._call("write_memory", wire.Fd(fd), offset, diff=diff, pages=pages)
        if len(res) != 2 or not isinstance(res[0], int) or not isinstance(res[1], bytes) or \
                len(res[1]) != ((pages + 7) // 8 if diff else 0):
            raise NativeError("write_memory: a bad answer", errno.EPROTO)
        return res[0], res[1]

    # -- lifecycle --
    def start(self) -> None:
        self._unit("start")

    def start_paused(self) -> None:
        self._unit("start_paused")

    def pause(self, timeout_ms: int = 5000) -> None:
        self._ch.call(self._handle, "pause", timeout_ms,
                      timeout_s=CALL_TIMEOUT_S + timeout_ms / 1000)

    def resume(self) -> None:
        self._unit("resume")

    def stop(self) -> None:
        if self._lost is not None:
            return  # nothing runs any more
        self._unit("stop")

    @property
    def stop_reason(self) -> StopReason:
        if self._lost is not None:
            return StopReason.WORKER_DIED
        try:
            return StopReason(self._int("stop_reason"))
        except ValueError:
            raise NativeError("stop_reason: not a reason", errno.EPROTO) from None

    # Counters outlive the worker: the last ones read are what a crashed VM shows.
    def stats(self) -> VmStats:
        if self._lost is None:
            try:
                self._stats = _one(self._call("stats"), VmStats, "stats")
            except WorkerGone:
                pass
        if self._stats is None:
            return VmStats(**{f: 0 for f in VmStats._fields})
        return self._stats

    def virtio_stats(self, idx: int) -> VirtioStats:
        if self._lost is None:
            try:
                self._vstats[idx] = _one(self._call("virtio_stats", idx), VirtioStats,
                                         "virtio_stats")
            except WorkerGone:
                pass
        if idx not in self._vstats:
            return VirtioStats(**{f: 0 for f in VirtioStats._fields})
        return self._vstats[idx]

    def thread_count(self) -> int:
        return 0 if self._lost is not None else self._int("thread_count")

    # -- events --
    @property
    def event_fd(self) -> int:
        return self._event_fd

    def next_event(self) -> Event | None:
        if self._lost is not None:
            if self._death_reported:
                return None
            self._death_reported = True
            return Event(EventType.STOPPED, StopReason.WORKER_DIED, -1, 0, 0, 0,
                         time.monotonic_ns(), b"")
        try:
            res = self._call("next_event")
        except WorkerGone:
            return None  # lost() comes, and wakes the watcher again
        return None if res == [None] else _one(res, Event, "next_event")

    # -- console --
    def console_set_fd(self, fd: int) -> None:
        self._unit("console_set_fd", wire.Fd(fd))

    @property
    def console_notify_fd(self) -> int:
        return self._console_fd

    def console_read(self, pos: int, max_bytes: int = 65536) -> tuple[bytes, int]:
        if self._lost is not None:
            return b"", pos  # the output died with the worker
        res = self._call("console_read", pos, max_bytes)
        if len(res) != 2 or not isinstance(res[0], bytes) or not isinstance(res[1], int) or \
                len(res[0]) > max_bytes:
            raise NativeError("console_read: a bad answer", errno.EPROTO)
        return res[0], res[1]

    def console_head(self) -> int:
        return 0 if self._lost is not None else self._int("console_head")

    def console_input(self, data: bytes) -> int:
        return self._int("console_input", data)

    def send_ctrl_alt_del(self) -> None:
        self._unit("send_ctrl_alt_del")

    def pulse_irq(self, gsi: int) -> None:
        self._unit("pulse_irq", gsi)

    # -- teardown --
    def close(self, *, deferred: bool = False) -> None:
        """The worker always defers KVM's teardown (it answers first)."""
        if self._closed:
            return
        with self._fd_lock:
            self._closed = True
        try:
            if self._lost is None:
                self._ch.call(0, "close", self._handle)
        except NativeError:
            pass  # the worker is gone: its VMs went with it
        finally:
            with self._fd_lock:
                os.close(self._event_fd)
                os.close(self._console_fd)
            if self._on_close is not None:
                self._on_close(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
