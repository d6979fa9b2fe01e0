"""The daemon <-> worker wire (vmmd/cell/wire.py, remote.Channel): values
round-trip, and whatever a compromised worker sends is refused, never
believed: a refused answer ends the channel and the worker is killed."""

from __future__ import annotations

import array
import os
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmd._proto.vmmd.v1 import cell_pb2 as cpb
from vmmd.cell import wire
from vmmd.cell.remote import Channel, WorkerGone
from vmmd.errors import NativeError
from vmmd.native import Event, EventType, StopReason, VirtioStats

V = wire.CELL_PROTOCOL_VERSION
plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.binary(max_size=64)
    | st.text(max_size=20) | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)


@given(plain)
def test_plain_values_round_trip(v: object) -> None:
    fds: list[int] = []
    assert wire.decode(wire.encode(v, fds), fds) == v
    assert fds == []


def test_records_round_trip_with_their_enums() -> None:
    ev = Event(EventType.STOPPED, StopReason.TRIPLE_FAULT, 1, 0, 7, 0xfff0, 123, b"\x0f\x0b")
    back = wire.decode(wire.encode(ev, []), [])
    assert back == ev and isinstance(back.reason, StopReason)


def _record(type_: str, **fields: cpb.CellValue) -> cpb.CellValue:
    return cpb.CellValue(record=cpb.CellRecord(type=type_, fields=fields))


def _ev_fields() -> dict[str, cpb.CellValue]:
    ev = Event(EventType.STOPPED, StopReason.RESET, -1, 0, 0, 0, 0, b"")
    return dict(wire.encode(ev, []).record.fields)


@pytest.mark.parametrize("value, problem", [
    (_record("Popen"), "unknown record type"),
    (_record("Event"), "Event: fields"),
    (_record("Event", **{**_ev_fields(), "extra": cpb.CellValue(u=1)}), "Event: fields"),
    (_record("Event", **{**_ev_fields(), "reason": cpb.CellValue(u=99)}), "not a StopReason"),
    (_record("Event", **{**_ev_fields(), "rip": cpb.CellValue(s="x")}), "Event.rip: a str"),
    (_record("Event", **{**_ev_fields(), "insn": cpb.CellValue(u=1)}), "Event.insn: a int"),
    (cpb.CellValue(fd=0), "fd #0 named, 0 passed"),
    (cpb.CellValue(f=float("nan")), "not finite"),
    (cpb.CellValue(vcpu=cpb.CellValue().vcpu), "bad vcpu state"),
], ids=["unknown-type", "no-fields", "extra-field", "bad-enum", "wrong-type", "int-for-bytes",
        "fd-not-passed", "nan", "empty-vcpu"])
def test_hostile_values_are_refused(value: cpb.CellValue, problem: str) -> None:
    with pytest.raises(wire.ProtocolError, match=problem):
        wire.decode(value, [])


def test_counters_must_be_whole() -> None:
    stats = VirtioStats(*range(len(VirtioStats._fields)))
    m = wire.encode(stats, [])
    m.record.fields["requests"].CopyFrom(cpb.CellValue(b=True))
    with pytest.raises(wire.ProtocolError, match="requests: a bool"):
        wire.decode(m, [])


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def test_fds_cross_and_belong_to_the_receiver(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    fds: list[int] = []
    frame = cpb.CellFrame(version=V, seq=1, call=cpb.CellCall(method="m", args=[
        wire.encode(wire.Fd(w), fds)]))
    wire.send(a, frame, fds)
    os.close(w)
    got, rfds = wire.recv(b, deadline=None)
    (fd,) = [wire.decode(x, rfds).fd for x in got.call.args]
    os.write(fd, b"hi")
    os.close(fd)
    assert os.read(r, 2) == b"hi"
    os.close(r)


@pytest.mark.parametrize("data, problem", [
    (b"\xff\xff\xff", "undecodable"),
    (cpb.CellFrame(version=V + 1).SerializeToString(), "protocol version"),
    (cpb.CellFrame(seq=5).SerializeToString(), "protocol version 0"),
])
def test_bad_frames_are_refused_and_their_fds_closed(pair: tuple[socket.socket, socket.socket],
                                                     data: bytes, problem: str) -> None:
    a, b = pair
    r, w = os.pipe()

    a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
    os.close(w)
    with pytest.raises(wire.ProtocolError, match=problem):
        wire.recv(b, deadline=None)
    assert os.read(r, 1) == b""  # every copy of the write end is closed: EOF
    os.close(r)


def _worker(sock: socket.socket, answer: cpb.CellFrame | None) -> threading.Thread:
    def run() -> None:
        frame, fds = wire.recv(sock)
        for fd in fds:
            os.close(fd)
        if answer is not None:
            reply = cpb.CellFrame()
            reply.CopyFrom(answer)
            if reply.seq == 0:
                reply.seq = frame.seq
            wire.send(sock, reply, [])
    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_good_answer_and_an_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    broken: list[str] = []
    ch = Channel(a, broken.append)
    t = _worker(b, cpb.CellFrame(version=V, reply=cpb.CellReply(results=[wire.encode(7, [])])))
    assert ch.call(1, "thread_count") == [7]
    t.join()
    t = _worker(b, cpb.CellFrame(version=V, reply=cpb.CellReply(errno=16, error="pause VM")))
    with pytest.raises(NativeError) as e:
        ch.call(1, "pause")
    assert e.value.errno == 16 and not isinstance(e.value, WorkerGone)
    t.join()
    assert broken == [] and ch.dead is None


@pytest.mark.parametrize("answer, problem", [
    (cpb.CellFrame(version=V, seq=999, reply=cpb.CellReply()), "answered seq 999"),
    (cpb.CellFrame(version=V, call=cpb.CellCall(method="x")), "answered seq"),
    (cpb.CellFrame(version=V, reply=cpb.CellReply(results=[_record("Nope")])), "unknown record"),
    (None, "closed the socket"),
], ids=["wrong-seq", "a-call-for-a-reply", "bad-value", "died"])
def test_a_bad_answer_ends_the_channel(pair: tuple[socket.socket, socket.socket],
                                       answer: cpb.CellFrame | None, problem: str) -> None:
    a, b = pair
    broken: list[str] = []
    ch = Channel(a, broken.append)
    if answer is None:
        b.shutdown(socket.SHUT_WR)  # the worker's end: it will never answer
    else:
        t = _worker(b, answer)
    with pytest.raises(WorkerGone):
        ch.call(1, "stats", timeout_s=10)
    if answer is not None:
        t.join()
    assert len(broken) == 1 and problem in broken[0], broken
    with pytest.raises(WorkerGone):  # and stays ended
        ch.call(1, "stats")
    assert len(broken) == 1


def test_a_worker_that_does_not_answer_is_given_up(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    broken: list[str] = []
    ch = Channel(a, broken.append)
    with pytest.raises(WorkerGone):
        ch.call(1, "stats", timeout_s=0.2)
    assert broken and "did not answer in time" in broken[0]


def test_a_packed_vcpu_crosses_as_its_struct_bytes() -> None:
    """restore_vcpu in a cell sends the checked, packed state's bytes; the
    worker copies them back into a struct of the same size, no other."""
    from vmmd.native import BLOB_SIZES, VCPU_BLOBS, CpuidEntry, VcpuState, pack_vcpu
    from vmmd.native.state import packed_bytes, unpack_vcpu_bytes

    s = VcpuState(**{b: bytes([i + 1]) * BLOB_SIZES[b] for i, b in enumerate(VCPU_BLOBS)},
                  mp_state=0, msrs=((0x10, 7),), cpuid=(CpuidEntry(1, 0, 0, 2, 3, 4, 5),))
    data = packed_bytes(pack_vcpu(s))
    c = unpack_vcpu_bytes(data)
    assert (c.nmsrs, c.msrs[0].index, c.msrs[0].data, c.ncpuid, c.cpuid[0].ebx) == \
        (1, 0x10, 7, 1, 3)
    with pytest.raises(ValueError, match="want"):
        unpack_vcpu_bytes(data[:-1])
