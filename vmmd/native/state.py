"""What the C core saves of a VM for a snapshot, as plain values (frozen
records mirroring native/vmmcore.h's structs field for field; the unit
test test_mirrors.py pins C struct, record and snapshot.proto together),
and their packing into C structs.

Sizes come from the C structs themselves (cffi), so a blob of the wrong
size is refused here before C sees it.  A packed vCPU state (`pack_vcpu`)
is an opaque value the caller may keep: clones of one snapshot restore from
the same packed structs (the snapshot cache holds them).
"""

from __future__ import annotations

from typing import Any

from vmmd.native._lib import ffi
from vmmd.record import Record


class CpuidEntry(Record):
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class VcpuState(Record):
    """One vCPU: KVM structs as byte blobs of fixed sizes (BLOB_SIZES), plus
    mp_state, the MSRs (index, value) and the CPUID entries."""

    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    events: bytes
    mp_state: int
    msrs: tuple[tuple[int, int], ...]
    cpuid: tuple[CpuidEntry, ...]


class MachineState(Record):
    """The VM-wide KVM state: PIC master and slave, IOAPIC, PIT, kvmclock
    (and the host's wall clock when it was read; 0: not known)."""

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: int
    realtime: int = 0


class QueueState(Record):
    desc: int
    avail: int
    used: int
    size: int
    last_avail: int
    used_idx: int
    signalled_used: int
    ready: int
    event_idx: int
    indirect: int


class VirtioState(Record):
    device_id: int
    status: int
    dev_feat_sel: int
    drv_feat_sel: int
    queue_sel: int
    int_status: int
    config_gen: int
    driver_features: int
    queues: tuple[QueueState, ...]


class LegacyState(Record):
    """The UART, the i8042 and where the console output stands."""

    ier: int
    lcr: int
    mcr: int
    scr: int
    dll: int
    dlm: int
    thr_ipending: int
    irq_level: int
    rx: bytes
    ctr: int
    cmd: int
    status_cmd: int
    outp: int
    kbd: bytes
    console_head: int


def blob_sizes(ctype: str) -> dict[str, int]:
    t = ffi.typeof(ctype)
    return {name: f.type.length for name, f in t.fields if f.type.kind == "array"
            and f.type.item.cname == "uint8_t"}


VCPU_BLOBS = ("regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "events")
BLOB_SIZES = blob_sizes("struct vmm_vcpu_state")
MACHINE_BLOB_SIZES = blob_sizes("struct vmm_machine_state")
_VCPU_FIELDS = dict(ffi.typeof("struct vmm_vcpu_state").fields)
MAX_MSRS = _VCPU_FIELDS["msrs"].type.length
MAX_CPUID = _VCPU_FIELDS["cpuid"].type.length
LEGACY_RX_MAX, LEGACY_KBD_MAX = 64, 16


def scalars(c: Any, cls: type) -> dict[str, int]:
    return {f: getattr(c, f) for f in cls._fields  # type: ignore[attr-defined]
            if cls.__annotations__[f] in ("int", int)}


def set_scalars(c: Any, value: Any) -> None:
    for f in value._fields:
        v = getattr(value, f)
        if isinstance(v, int):
            setattr(c, f, v)


def set_blob(c: Any, name: str, data: bytes, limit: int | None = None) -> None:
    size = limit if limit is not None else len(getattr(c, name))
    if len(data) > size or (limit is None and len(data) != size):
        raise ValueError(f"{name}: {len(data)} bytes, want {size}")
    ffi.memmove(getattr(c, name), data, len(data))


class PackedVcpu(Record):
    """A vCPU state packed into its C struct, ready for restore_vcpu (C only
    reads it, so one may serve many restores)."""

    state: VcpuState
    cdata: Any


def packed_bytes(p: PackedVcpu) -> bytes:
    """The packed state as the C struct's bytes: what a cell's worker is sent
    (the daemon checked the state; the worker copies it back into a struct,
    unpack_vcpu_bytes, instead of checking and packing it again)."""
    return bytes(ffi.buffer(p.cdata))


def unpack_vcpu_bytes(data: bytes) -> Any:
    """A struct vmm_vcpu_state from packed_bytes() (ValueError for a wrong size).
    The counts in it are the C core's own checks' business (vmm_vcpu_restore
    bounds nmsrs and ncpuid)."""
    c = ffi.new("struct vmm_vcpu_state *")
    if len(data) != ffi.sizeof(c[0]):
        raise ValueError(f"a vCPU state of {len(data)} bytes, want {ffi.sizeof(c[0])}")
    ffi.memmove(c, data, len(data))
    return c


def pack_vcpu(s: VcpuState) -> PackedVcpu:
    """ValueError for a state of the wrong shape."""
    if len(s.msrs) > MAX_MSRS or len(s.cpuid) > MAX_CPUID:
        raise ValueError(f"{len(s.msrs)} MSRs / {len(s.cpuid)} CPUID entries: at most "
                         f"{MAX_MSRS} / {MAX_CPUID}")
    c = ffi.new("struct vmm_vcpu_state *")
    for b in VCPU_BLOBS:
        set_blob(c, b, getattr(s, b))
    c.mp_state = s.mp_state
    c.nmsrs, c.ncpuid = len(s.msrs), len(s.cpuid)
    for i, (index, data) in enumerate(s.msrs):
        c.msrs[i].index, c.msrs[i].data = index, data
    for i, e in enumerate(s.cpuid):
        set_scalars(c.cpuid[i], e)
    return PackedVcpu(s, c)
