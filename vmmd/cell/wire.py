"""The daemon <-> worker wire: framed protobuf (proto/vmmd/v1/cell.proto)
over a SOCK_SEQPACKET socketpair, fds in SCM_RIGHTS.

SEQPACKET keeps message boundaries (one datagram = one CellFrame, no length
prefix to trust) and reports the peer's death as EOF.  Both directions use
this module; the decoder is strict because the other end may be a
compromised worker: a value of an unknown record type, a record with other
fields than its type has, an fd index with no fd behind it, or a frame of
another protocol version is a ProtocolError, and the broker then treats the
worker as dead.
"""

from __future__ import annotations

import array
import math
import os
import select
import socket
import time
from typing import Any

from google.protobuf.message import DecodeError

from vmmd._proto.vmmd.v1 import cell_pb2 as cpb
from vmmd.native import (
    Event,
    EventType,
    LegacyState,
    MachineState,
    StopReason,
    VcpuState,
    VirtioState,
    VirtioStats,
    VmStats,
)
from vmmd.record import Record
from vmmd.vm.boot.cpu import BootRegs, Segment
from vmmd.vm.snapshot import state

CELL_PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # a vCPU state is ~10 KiB; console reads are capped at 64 KiB
MAX_FDS = 16  # no call passes more


class ProtocolError(Exception):
    """The other end broke the protocol (or died): its frames cannot be trusted."""


# Records: the plain values that cross, by name, with their fields' types.
_RECORDS: dict[str, type[Record]] = {
    c.__name__: c for c in (Event, VmStats, VirtioStats, BootRegs, Segment)}
_ENUMS = {("Event", "type"): EventType, ("Event", "reason"): StopReason}


def encode(v: Any, fds: list[int]) -> cpb.CellValue:
    """A Python value as a CellValue; an Fd's number is appended to fds."""
    if v is None:
        return cpb.CellValue(none=True)
    if isinstance(v, cpb.CellValue):  # encoded already (a cached state)
        return v
    if isinstance(v, Fd):
        fds.append(v.fd)
        return cpb.CellValue(fd=len(fds) - 1)
    if isinstance(v, bool):
        return cpb.CellValue(b=v)
    if isinstance(v, int):
        return cpb.CellValue(u=v) if v >= 0 else cpb.CellValue(i=v)
    if isinstance(v, float):
        return cpb.CellValue(f=v)
    if isinstance(v, bytes):
        return cpb.CellValue(data=v)
    if isinstance(v, str):
        return cpb.CellValue(s=v)
    if isinstance(v, (list, tuple)):
        return cpb.CellValue(list=cpb.CellList(items=[encode(x, fds) for x in v]))
    if isinstance(v, VcpuState):
        return cpb.CellValue(vcpu=state.save_vcpu(v))
    if isinstance(v, MachineState):
        return cpb.CellValue(machine=state.save_machine(v))
    if isinstance(v, VirtioState):
        return cpb.CellValue(virtio=state.save_virtio(v))
    if isinstance(v, LegacyState):
        return cpb.CellValue(legacy=state.save_legacy(v))
    if isinstance(v, dict):
        return cpb.CellValue(record=cpb.CellRecord(fields={
            str(k): encode(x, fds) for k, x in v.items()}))
    name = type(v).__name__
    if _RECORDS.get(name) is type(v) and isinstance(v, Record):
        return cpb.CellValue(record=cpb.CellRecord(type=name, fields={
            f: encode(getattr(v, f), fds) for f in v._fields}))
    raise TypeError(f"no wire form for {name}")


def decode(m: cpb.CellValue, fds: list[int]) -> Any:
    """A CellValue back into a Python value, checked (ProtocolError)."""
    kind = m.WhichOneof("v")
    if kind is None or kind == "none":
        return None
    if kind == "fd":
        if m.fd >= len(fds):
            raise ProtocolError(f"fd #{m.fd} named, {len(fds)} passed")
        return Fd(fds[m.fd])
    if kind == "f":
        if not math.isfinite(m.f):
            raise ProtocolError("a float that is not finite")
        return m.f
    if kind in ("i", "u", "b", "s"):
        return getattr(m, kind)
    if kind == "data":
        return bytes(m.data)
    if kind == "list":
        return [decode(x, fds) for x in m.list.items]
    try:
        if kind == "vcpu":
            return state.restore_vcpu(m.vcpu, "vcpu")
        if kind == "machine":
            return state.restore_machine(m.machine)
        if kind == "virtio":
            return state.restore_virtio(m.virtio, "device", m.virtio.device_id,
                                        len(m.virtio.queues))
        if kind == "legacy":
            return state.restore_legacy(m.legacy)
    except Exception as e:  # the snapshot checks' DataLossError, said as the wire's
        raise ProtocolError(f"bad {kind} state: {e}") from None
    return _record(m.record, fds)


def _record(r: cpb.CellRecord, fds: list[int]) -> Any:
    if not r.type:
        return {k: decode(x, fds) for k, x in r.fields.items()}
    cls = _RECORDS.get(r.type)
    if cls is None:
        raise ProtocolError(f"unknown record type {r.type[:40]!r}")
    # (name, annotation as written): these modules' annotations stay strings.
    fields = [(f, cls.__annotations__[f]) for f in cls._fields]
    if set(r.fields) != {name for name, _ in fields}:
        raise ProtocolError(f"{r.type}: fields {sorted(r.fields)[:20]}")
    values = {}
    for name, ann in fields:
        v = decode(r.fields[name], fds)
        enum = _ENUMS.get((r.type, name))
        want: type = _RECORDS.get(str(ann)) or (bytes if ann in ("bytes", bytes) else int)
        if not isinstance(v, want) or isinstance(v, bool):
            raise ProtocolError(f"{r.type}.{name}: a {type(v).__name__}")
        if enum is not None:
            try:
                v = enum(v)  # type: ignore[arg-type]  # an int, checked above
            except ValueError:
                raise ProtocolError(f"{r.type}.{name}: {v} is not a {enum.__name__}") from None
        values[name] = v
    return cls(**values)


class Fd(Record):
    """A file descriptor to pass (encode), or one received (decode: the
    receiver owns it and must close it)."""

    fd: int


# ---- frames on the socket ----
def send(sock: socket.socket, frame: cpb.CellFrame, fds: list[int]) -> None:
    data = frame.SerializeToString()
    if len(data) > MAX_FRAME or len(fds) > MAX_FDS:
        raise ProtocolError(f"frame of {len(data)} bytes and {len(fds)} fds is too big")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
SPIN_S = 200e-6  # how long a receiver polls before it sleeps (see recv)


def _receive(sock: socket.socket, flags: int) -> tuple[bytes, Any, int, Any]:
    return sock.recvmsg(MAX_FRAME + 1, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC | flags)


def recv(sock: socket.socket, deadline: float | None = None,
         spin_s: float = SPIN_S) -> tuple[cpb.CellFrame, list[int]]:
    """The next frame and its fds (owned by the caller from here on, even
    when the frame then turns out bad).  EOF, a bad frame or the deadline
    passing is a ProtocolError (TimeoutError for the deadline).

    The receiver first polls without sleeping for up to spin_s: calls come
    in bursts (a restore is a dozen), and on a VM host a sleeping process's
    wake-up costs more than the call itself (a blocking ping-pong between
    two processes: 87 us on our PVM machines, 29 us with the caller
    polling)."""
    got = None
    end = time.monotonic() + spin_s
    while True:
        try:
            got = _receive(sock, socket.MSG_DONTWAIT)
            break
        except BlockingIOError:
            if time.monotonic() >= end:
                break
    if got is None:
        if deadline is not None:
            left = deadline - time.monotonic()
            poller = select.poll()  # not select(): a daemon's fds pass 1024
            poller.register(sock, select.POLLIN)
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError("the worker did not answer in time")
        got = _receive(sock, 0)
    data, anc, flags, _ = got
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[:len(payload) - len(payload) % _FD_SIZE])
            fds.extend(a)
    try:
        if not data:
            raise ProtocolError("the other end closed the socket")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError("an oversized frame")
        frame = cpb.CellFrame()
        try:
            frame.ParseFromString(data)
        except DecodeError:
            raise ProtocolError("an undecodable frame") from None
        if frame.version != CELL_PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {frame.version}, want {CELL_PROTOCOL_VERSION}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return frame, fds
