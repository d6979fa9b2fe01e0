"""A cell's worker: hosts the C core's VMs of one cell, jailed.

It runs in a process the zygote forked (vmmd and the C core already
imported, nothing opened yet), enters the jail (vmmd/cell/jail.py), then
serves the daemon's calls on its socket, one at a time, until the daemon
closes it.  It never opens a host path: /dev/kvm, images, taps, snapshot
files all arrive as fds.  Every method is a NativeVm method of the same
name (METHODS: the whole table; anything else is refused), so the worker's
VMs behave exactly as the daemon's own do with --isolation none.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from collections import OrderedDict
from typing import Any

from vmmd._proto.vmmd.v1 import cell_pb2 as cpb
from vmmd.cell import wire
from vmmd.errors import InvalidSpecError, NativeError
from vmmd.native import NativeVm

# The methods a VM has on the wire: NativeVm's, called with the same args.
METHODS: frozenset[str] = frozenset({
    "add_ram", "write", "load_file", "read", "create_vcpus", "add_virtio_blk", "add_virtio_net",
    "add_virtio_rng", "add_virtio_vsock",
    "virtio_stats", "set_boot_regs", "get_regs", "save_vcpu", "restore_vcpu_bytes",
    "save_machine",
    "restore_machine", "save_virtio", "restore_virtio", "save_legacy", "restore_legacy",
    "add_ram_file", "track_dirty", "tracks_dirty", "write_memory", "start", "start_paused",
    "pause", "resume", "stop", "stop_reason", "stats", "thread_count", "next_event",
    "console_set_fd", "console_read", "console_head", "console_input", "send_ctrl_alt_del",
    "pulse_irq",
})
PROPERTIES = frozenset({"tracks_dirty", "stop_reason"})
# Methods whose fd the C core keeps using without a dup of its own (the
# caller keeps it open until the VM closes): the worker keeps a copy.
KEEPS_FD = frozenset({"add_virtio_net", "console_set_fd"})
MAX_VMS_PER_CELL = 4096


def _plain(v: Any) -> Any:
    return v.fd if isinstance(v, wire.Fd) else v


class _StateCache:
    """Saved states, checked, by their bytes: clones of one snapshot send the
    same machine and device states again and again.  (A vCPU's state comes
    packed already: restore_vcpu_bytes.)"""

    KINDS = frozenset({"machine", "virtio", "legacy"})
    MAX = 256

    def __init__(self) -> None:
        self._cache: OrderedDict[bytes, Any] = OrderedDict()

    def decode(self, m: cpb.CellValue, fds: list[int]) -> Any:
        kind = m.WhichOneof("v")
        if kind not in self.KINDS:
            return wire.decode(m, fds)
        key = kind.encode() + hashlib.blake2b(m.SerializeToString(deterministic=True),
                                              digest_size=16).digest()
        hit = self._cache.get(key)
        if hit is None:
            hit = wire.decode(m, fds)
            self._cache[key] = hit
            while len(self._cache) > self.MAX:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return hit


class Worker:
    def __init__(self, sock: socket.socket, test_hooks: bool = False) -> None:
        self._sock = sock
        self._vms: dict[int, NativeVm] = {}
        self._kept: dict[int, list[int]] = {}  # handle -> fds held for the VM (KEEPS_FD)
        self._next = 1
        self._test_hooks = test_hooks
        self._states = _StateCache()

    def serve(self) -> None:
        """Answer calls until the daemon closes the socket."""
        while True:
            try:
                # No polling here: a worker waits for calls, and polling after each
                # one took CPU from the VMs building beside it (create: 9.6 -> 8.3 ms).
                frame, fds = wire.recv(self._sock, spin_s=0)
            except wire.ProtocolError:
                return
            reply_fds: list[int] = []
            try:
                reply = self._dispatch(frame.call, fds, reply_fds)
            except NativeError as e:
                reply = cpb.CellReply(errno=e.errno or errno.EIO, error=e.op)
            except InvalidSpecError:  # load_file: the file shrank while loading
                reply = cpb.CellReply(errno=errno.ENODATA, error="file shrank while loading")
            except (ValueError, TypeError, KeyError, wire.ProtocolError) as e:
                reply = cpb.CellReply(errno=errno.EINVAL, error=str(e)[:200])
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                wire.send(self._sock, cpb.CellFrame(version=wire.CELL_PROTOCOL_VERSION,
                                                    seq=frame.seq, reply=reply), reply_fds)
            except OSError:
                return

    def _dispatch(self, call: cpb.CellCall, fds: list[int], reply_fds: list[int]) -> cpb.CellReply:
        # An fd arg is passed as the number: the frame's fds are closed after
        # the call (the C core dup()s what it keeps).
        args = [_plain(self._states.decode(a, fds)) for a in call.args]
        kwargs = {k: _plain(wire.decode(v, fds)) for k, v in call.kwargs.items()}
        if call.vm == 0:
            results = self._cell_call(call.method, args)
        else:
            results = self._vm_call(call.vm, call.method, args, kwargs)
        return cpb.CellReply(results=[wire.encode(r, reply_fds) for r in results])

    def _cell_call(self, method: str, args: list[Any]) -> list[Any]:
        if method == "create":
            (kvm_fd,) = args
            if len(self._vms) >= MAX_VMS_PER_CELL:
                raise NativeError("create VM", errno.EMFILE)
            vm = NativeVm.from_kvm_fd(kvm_fd)
            handle, self._next = self._next, self._next + 1
            self._vms[handle] = vm
            # The daemon waits on the VM's event and console eventfds itself.
            return [handle, wire.Fd(vm.event_fd), wire.Fd(vm.console_notify_fd)]
        if method == "close":
            (handle,) = args
            closing = self._vms.pop(handle, None)
            if closing is not None:
                closing.close(deferred=True)  # the daemon waits on this answer
            for fd in self._kept.pop(handle, []):
                os.close(fd)
            return []
        if method == "ping":
            return [os.getpid()]
        if method == "test_escape" and self._test_hooks:
            from vmmd.cell import testhooks  # noqa: PLC0415 - only in test builds
            return [testhooks.escape(*args)]
        raise ValueError(f"no cell method {method[:40]!r}")

    def _vm_call(self, handle: int, method: str, args: list[Any],
                 kwargs: dict[str, Any]) -> list[Any]:
        vm = self._vms.get(handle)
        if vm is None:
            raise NativeError(f"VM handle {handle}", errno.EBADF)
        if method not in METHODS:
            raise ValueError(f"no VM method {method[:40]!r}")
        if method in PROPERTIES:
            value = getattr(vm, method)
            return [int(value)]
        if method in KEEPS_FD and args:
            args = [os.dup(args[0]), *args[1:]]
            self._kept.setdefault(handle, []).append(args[0])
        result = getattr(vm, method)(*args, **kwargs)
        if isinstance(result, tuple) and method in ("console_read", "write_memory", "get_regs"):
            return list(result)
        return [result]
