"""Typed Python face of the C core.

This package is the only importer of the cffi module `vmmd.native._core`.
It turns the core's `-errno` returns into NativeError, C structs into frozen
dataclasses, and owns every C handle through an explicit close() (and the
context-manager protocol).  cffi releases the GIL around each C call, so a
blocking call here never stalls other Python threads.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
from dataclasses import dataclass
from typing import Any

from vmmd.errors import FieldPath, InvalidSpecError, NativeError

from ._core import ffi, lib  # type: ignore[import-not-found]

# The C core's interface version this code is written against: VMM_CORE_VERSION
# in native/vmmcore.h.  Bump both together.
CORE_VERSION = 1


def _check_core_version(core: Any) -> None:
    """ImportError unless `core` (the cffi lib) is the C core this vmmd needs: a
    .so built from older sources would otherwise fail later, and obscurely."""
    version = core.vmm_core_version() if hasattr(core, "vmm_core_version") else None
    if version != CORE_VERSION:
        have = "no version" if version is None else f"version {version}"
        raise ImportError(f"vmmd's C core is stale ({have}, this vmmd needs {CORE_VERSION}): "
                          "rebuild it with `make native`")


_check_core_version(lib)  # before anything else reads lib


class StopReason(enum.IntEnum):
    NONE = lib.VMM_STOP_NONE
    RESET = lib.VMM_STOP_RESET
    HALT = lib.VMM_STOP_HALT
    TRIPLE_FAULT = lib.VMM_STOP_TRIPLE_FAULT
    FAIL_ENTRY = lib.VMM_STOP_FAIL_ENTRY
    EMULATION = lib.VMM_STOP_EMULATION
    INTERNAL_ERROR = lib.VMM_STOP_INTERNAL_ERROR
    KVM_ERROR = lib.VMM_STOP_KVM_ERROR
    REQUESTED = lib.VMM_STOP_REQUESTED
    POWEROFF = lib.VMM_STOP_POWEROFF
    MEMORY_FAULT = lib.VMM_STOP_MEMORY_FAULT  # guest RAM's file shrank; code = the address


class EventType(enum.IntEnum):
    STOPPED = lib.VMM_EVENT_STOPPED
    PAUSED = lib.VMM_EVENT_PAUSED
    RESUMED = lib.VMM_EVENT_RESUMED
    DEVICE_ERROR = lib.VMM_EVENT_DEVICE_ERROR
    LOST = lib.VMM_EVENT_LOST


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: StopReason
    vcpu: int
    err: int
    code: int
    rip: int
    time_ns: int
    insn: bytes


@dataclass(frozen=True)
class VmStats:
    exits: int
    exits_io: int
    exits_mmio: int
    exits_hlt: int
    exits_intr: int
    exits_other: int
    unhandled_io: int
    unhandled_mmio: int
    console_bytes: int
    console_dropped: int
    events_dropped: int


@dataclass(frozen=True)
class VirtioStats:
    notifies: int
    requests: int
    bad_chains: int
    io_errors: int
    bytes_read: int
    bytes_written: int
    interrupts: int
    rx_frames: int
    tx_frames: int


def _virtio_stats(c: Any) -> VirtioStats:
    return VirtioStats(**{f.name: getattr(c, f.name) for f in dataclasses.fields(VirtioStats)})


# ---- snapshot state: what the C core saves, as plain values ----
@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class VcpuState:
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


@dataclass(frozen=True)
class MachineState:
    """The VM-wide KVM state: PIC master and slave, IOAPIC, PIT, kvmclock."""

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: int


@dataclass(frozen=True)
class QueueState:
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


@dataclass(frozen=True)
class VirtioState:
    device_id: int
    status: int
    dev_feat_sel: int
    drv_feat_sel: int
    queue_sel: int
    int_status: int
    config_gen: int
    driver_features: int
    queues: tuple[QueueState, ...]


@dataclass(frozen=True)
class LegacyState:
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


def _blob_sizes(ctype: str) -> dict[str, int]:
    t = ffi.typeof(ctype)
    return {name: f.type.length for name, f in t.fields if f.type.kind == "array"
            and f.type.item.cname == "uint8_t"}


VCPU_BLOBS = ("regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "events")
BLOB_SIZES = _blob_sizes("struct vmm_vcpu_state")
MACHINE_BLOB_SIZES = _blob_sizes("struct vmm_machine_state")
_VCPU_FIELDS = dict(ffi.typeof("struct vmm_vcpu_state").fields)
MAX_MSRS = _VCPU_FIELDS["msrs"].type.length
MAX_CPUID = _VCPU_FIELDS["cpuid"].type.length
LEGACY_RX_MAX, LEGACY_KBD_MAX = 64, 16


def _scalars(c: Any, cls: type) -> dict[str, int]:
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(cls)
            if f.type in ("int", int)}


def _set_scalars(c: Any, value: Any) -> None:
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if isinstance(v, int):
            setattr(c, f.name, v)


def _set_blob(c: Any, name: str, data: bytes, limit: int | None = None) -> None:
    size = limit if limit is not None else len(getattr(c, name))
    if len(data) > size or (limit is None and len(data) != size):
        raise ValueError(f"{name}: {len(data)} bytes, want {size}")
    ffi.memmove(getattr(c, name), data, len(data))


_PACKED: dict[int, tuple[VcpuState, Any]] = {}  # id(state) -> (state, its C struct)
_PACKED_MAX = 256


def _vcpu_cdata(s: VcpuState) -> Any:
    """The C struct of a vCPU state, built once per state object: clones and
    repeated restores of one snapshot pass the same struct again (C only
    reads it)."""
    hit = _PACKED.get(id(s))
    if hit is not None and hit[0] is s:
        return hit[1]
    if len(s.msrs) > MAX_MSRS or len(s.cpuid) > MAX_CPUID:
        raise ValueError(f"{len(s.msrs)} MSRs / {len(s.cpuid)} CPUID entries: at most "
                         f"{MAX_MSRS} / {MAX_CPUID}")
    c = ffi.new("struct vmm_vcpu_state *")
    for b in VCPU_BLOBS:
        _set_blob(c, b, getattr(s, b))
    c.mp_state = s.mp_state
    c.nmsrs, c.ncpuid = len(s.msrs), len(s.cpuid)
    for i, (index, data) in enumerate(s.msrs):
        c.msrs[i].index, c.msrs[i].data = index, data
    for i, e in enumerate(s.cpuid):
        _set_scalars(c.cpuid[i], e)
    if len(_PACKED) >= _PACKED_MAX:
        _PACKED.pop(next(iter(_PACKED)))
    _PACKED[id(s)] = (s, c)
    return c


def check(rc: int, op: str) -> int:
    """Raise NativeError for a negative errno return; pass counts through."""
    if rc < 0:
        raise NativeError(op, -rc)
    return rc


def _fill(cstruct: Any, value: Any) -> None:
    """Copy a (nested) dataclass into a cffi struct of the same field names."""
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if dataclasses.is_dataclass(v):
            _fill(getattr(cstruct, f.name), v)
        else:
            setattr(cstruct, f.name, int(v))


def kvm_api_version(kvm_path: str = "/dev/kvm") -> int:
    return check(lib.vmm_kvm_api_version(kvm_path.encode()), f"open {kvm_path}")


class GuestMemory:
    """Guest physical memory without a VM: the native tier's fake guest RAM."""

    def __init__(self) -> None:
        self._mem = lib.vmm_mem_new()
        if self._mem == ffi.NULL:
            raise MemoryError("vmm_mem_new")

    def add_region(self, gpa: int, size: int) -> None:
        check(lib.vmm_mem_add_region(self._mem, gpa, size, ffi.NULL), "add memory region")

    def add_file_region(self, gpa: int, size: int, fd: int, offset: int = 0) -> None:
        """RAM mapped from fd (MAP_PRIVATE) as a restored VM's is; fd may be closed after."""
        check(lib.vmm_mem_add_file_region(self._mem, gpa, size, fd, offset),
              "add memory region from a file")

    def write(self, gpa: int, data: bytes) -> None:
        check(lib.vmm_mem_write(self._mem, gpa, data, len(data)), f"write guest 0x{gpa:x}")

    def read(self, gpa: int, length: int) -> bytes:
        buf = ffi.new("uint8_t[]", length)
        check(lib.vmm_mem_read(self._mem, gpa, buf, length), f"read guest 0x{gpa:x}")
        return bytes(ffi.buffer(buf, length))

    def load_file(self, gpa: int, fd: int, offset: int, length: int) -> int:
        """Bytes of fd read into RAM (its data extents only)."""
        return check(lib.vmm_mem_load_fd(self._mem, gpa, fd, offset, length), "load file")

    @property
    def handle(self) -> Any:
        return self._mem

    def close(self) -> None:
        if self._mem != ffi.NULL:
            lib.vmm_mem_free(self._mem)
            self._mem = ffi.NULL

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VirtioDevice:
    """A virtio device over a GuestMemory, without KVM: the native tier plays
    the guest driver (registers by offset, then QueueNotify)."""

    def __init__(self, mem: GuestMemory, dev: Any) -> None:
        self._dev = dev
        self._mem = mem  # keep the memory alive as long as the device

    def read_reg(self, off: int, size: int = 4) -> int:
        return lib.vmm_virtio_mmio_read(self._dev, off, size)

    def write_reg(self, off: int, value: int, size: int = 4) -> None:
        lib.vmm_virtio_mmio_write(self._dev, off, value, size)

    def stats(self) -> VirtioStats:
        s = ffi.new("struct vmm_virtio_stats *")
        lib.vmm_virtio_get_stats(self._dev, s)
        return _virtio_stats(s)

    def close(self) -> None:
        if self._dev != ffi.NULL:
            lib.vmm_virtio_free(self._dev)
            self._dev = ffi.NULL

    def __enter__(self) -> VirtioDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _new_device(op: str, fn: Any, *args: Any) -> Any:
    out = ffi.new("struct vmm_virtio **")
    check(fn(*args, out), op)
    return out[0]


class VirtioBlock(VirtioDevice):
    """virtio-blk over an image open as fd (the device keeps its own duplicate)."""

    def __init__(self, mem: GuestMemory, fd: int, *, read_only: bool = False,
                 serial: str = "") -> None:
        super().__init__(mem, _new_device("create virtio-blk", lib.vmm_virtio_blk_new,
                                          mem.handle, fd, int(read_only), serial.encode()))


class VirtioNet(VirtioDevice):
    """virtio-net over a non-blocking frame fd (a tap; a SOCK_SEQPACKET
    socket in tests), which the caller keeps open and closes.  max_frame:
    the largest frame the fd passes without GSO (0: unknown)."""

    def __init__(self, mem: GuestMemory, fd: int, mac: bytes, max_frame: int = 0) -> None:
        if len(mac) != 6:
            raise ValueError("mac: 6 bytes")
        super().__init__(mem, _new_device("create virtio-net", lib.vmm_virtio_net_new,
                                          mem.handle, fd, mac, max_frame))

    def rx(self) -> None:
        """What the I/O thread does when the tap is readable."""
        lib.vmm_virtio_backend_ready(self._dev)


class NativeVm:
    """One KVM VM in the C core.  Not thread-safe for control verbs: the
    caller (vm layer) serializes them; reads (stats, console) are safe."""

    def __init__(self, kvm_path: str = "/dev/kvm") -> None:
        out = ffi.new("struct vmm_vm **")
        check(lib.vmm_vm_create(kvm_path.encode(), out), "create VM")
        self._vm = out[0]

    # -- construction --
    def add_ram(self, gpa: int, size: int) -> None:
        check(lib.vmm_vm_add_ram(self._vm, gpa, size), f"add RAM at 0x{gpa:x}")

    def write(self, gpa: int, data: bytes) -> None:
        mem = lib.vmm_vm_mem(self._vm)
        check(lib.vmm_mem_write(mem, gpa, data, len(data)), f"write guest 0x{gpa:x}")

    def load_file(self, gpa: int, fd: int, offset: int, length: int,
                  field: FieldPath) -> None:
        """[offset, offset + length) of fd into guest RAM at gpa: only the file's
        data is read (holes stay zero RAM); InvalidSpecError(field) if the file
        is shorter."""
        rc = lib.vmm_mem_load_fd(lib.vmm_vm_mem(self._vm), gpa, fd, offset, length)
        if rc == -errno.ENODATA:
            raise InvalidSpecError(field, "file shrank while loading")
        check(rc, f"load {field} into guest 0x{gpa:x}")

    def read(self, gpa: int, length: int) -> bytes:
        buf = ffi.new("uint8_t[]", length)
        mem = lib.vmm_vm_mem(self._vm)
        check(lib.vmm_mem_read(mem, gpa, buf, length), f"read guest 0x{gpa:x}")
        return bytes(ffi.buffer(buf, length))

    def create_vcpus(self, n: int, *, bare: bool = False) -> None:
        """bare: no CPUID/MSR/LAPIC/FPU set-up - a restore sets it all next."""
        fn = lib.vmm_vm_create_vcpus_bare if bare else lib.vmm_vm_create_vcpus
        check(fn(self._vm, n), f"create {n} vCPUs")

    def add_virtio_blk(self, fd: int, *, read_only: bool, serial: str, mmio_base: int,
                       gsi: int) -> int:
        """Attach a virtio-blk drive on the image open as fd (checked and locked by
        the caller; the device keeps a duplicate) in the 4 KiB slot at mmio_base;
        its index."""
        return check(lib.vmm_vm_add_virtio_blk(self._vm, fd, int(read_only),
                                               serial.encode(), mmio_base, gsi),
                     "attach drive")

    def add_virtio_net(self, tap_fd: int, *, mac: bytes, max_frame: int, mmio_base: int,
                       gsi: int) -> int:
        """Attach a virtio-net interface on an open tap fd (kept open by the
        caller until close()); its device index."""
        if len(mac) != 6:
            raise ValueError("mac: 6 bytes")
        return check(lib.vmm_vm_add_virtio_net(self._vm, tap_fd, mac, max_frame, mmio_base, gsi),
                     "attach network interface")

    def virtio_stats(self, idx: int) -> VirtioStats:
        s = ffi.new("struct vmm_virtio_stats *")
        check(lib.vmm_vm_virtio_stats(self._vm, idx, s), f"read device {idx} stats")
        return _virtio_stats(s)

    def set_boot_regs(self, idx: int, regs: Any) -> None:
        c = ffi.new("struct vmm_boot_regs *")
        _fill(c, regs)
        check(lib.vmm_vcpu_set_boot_regs(self._vm, idx, c), f"set vCPU {idx} registers")

    def get_regs(self, idx: int) -> tuple[dict[str, Any], int]:
        """Registers (the boot-regs field set, as a dict) and KVM mp_state of
        vCPU idx; the VM must not be running."""
        c = ffi.new("struct vmm_boot_regs *")
        mp = ffi.new("uint32_t *")
        check(lib.vmm_vcpu_get_regs(self._vm, idx, c, mp), f"get vCPU {idx} registers")
        names = [n for n, _ in ffi.typeof("struct vmm_boot_regs").fields]
        return {n: getattr(c, n) for n in names if isinstance(getattr(c, n), int)}, mp[0]

    # -- snapshots --
    def save_vcpu(self, idx: int) -> VcpuState:
        c = ffi.new("struct vmm_vcpu_state *")
        check(lib.vmm_vcpu_save(self._vm, idx, c), f"save vCPU {idx}")
        return VcpuState(
            **{b: bytes(ffi.buffer(getattr(c, b))) for b in VCPU_BLOBS}, mp_state=c.mp_state,
            msrs=tuple((c.msrs[i].index, c.msrs[i].data) for i in range(c.nmsrs)),
            cpuid=tuple(CpuidEntry(**{f.name: getattr(c.cpuid[i], f.name)
                                      for f in dataclasses.fields(CpuidEntry)})
                        for i in range(c.ncpuid)))

    def restore_vcpu(self, idx: int, s: VcpuState) -> None:
        """ValueError for a state of the wrong shape; NativeError when KVM refuses it."""
        check(lib.vmm_vcpu_restore(self._vm, idx, _vcpu_cdata(s)), f"restore vCPU {idx}")

    def save_machine(self) -> MachineState:
        c = ffi.new("struct vmm_machine_state *")
        check(lib.vmm_vm_save_machine(self._vm, c), "save irqchip, PIT and clock")
        return MachineState(**{b: bytes(ffi.buffer(getattr(c, b))) for b in MACHINE_BLOB_SIZES},
                            clock=c.clock)

    def restore_machine(self, s: MachineState) -> None:
        c = ffi.new("struct vmm_machine_state *")
        for b in MACHINE_BLOB_SIZES:
            _set_blob(c, b, getattr(s, b))
        c.clock = s.clock
        check(lib.vmm_vm_restore_machine(self._vm, c), "restore irqchip, PIT and clock")

    def save_virtio(self, idx: int) -> VirtioState:
        c = ffi.new("struct vmm_virtio_state *")
        check(lib.vmm_vm_virtio_save(self._vm, idx, c), f"save device {idx}")
        queues = tuple(QueueState(**_scalars(c.q[i], QueueState)) for i in range(c.nqueues))
        return VirtioState(**_scalars(c, VirtioState), queues=queues)

    def restore_virtio(self, idx: int, s: VirtioState) -> None:
        if len(s.queues) > 2:
            raise ValueError(f"{len(s.queues)} queues, at most 2")
        c = ffi.new("struct vmm_virtio_state *")
        _set_scalars(c, s)
        c.nqueues = len(s.queues)
        for i, q in enumerate(s.queues):
            _set_scalars(c.q[i], q)
        check(lib.vmm_vm_virtio_restore(self._vm, idx, c), f"restore device {idx}")

    def save_legacy(self) -> LegacyState:
        c = ffi.new("struct vmm_legacy_state *")
        check(lib.vmm_vm_legacy_save(self._vm, c), "save UART and i8042")
        return LegacyState(**_scalars(c, LegacyState), rx=bytes(c.rx[0:c.rx_len]),
                           kbd=bytes(c.kbd[0:c.kbd_len]))

    def restore_legacy(self, s: LegacyState) -> None:
        c = ffi.new("struct vmm_legacy_state *")
        _set_scalars(c, s)
        _set_blob(c, "rx", s.rx, LEGACY_RX_MAX)
        _set_blob(c, "kbd", s.kbd, LEGACY_KBD_MAX)
        c.rx_len, c.kbd_len = len(s.rx), len(s.kbd)
        check(lib.vmm_vm_legacy_restore(self._vm, c), "restore UART and i8042")

    def add_ram_file(self, gpa: int, size: int, fd: int, offset: int) -> None:
        check(lib.vmm_vm_add_ram_file(self._vm, gpa, size, fd, offset),
              f"map RAM at 0x{gpa:x} from the memory file")

    def track_dirty(self) -> None:
        check(lib.vmm_vm_track_dirty(self._vm), "turn on dirty-page tracking")

    @property
    def tracks_dirty(self) -> bool:
        return bool(lib.vmm_vm_tracks_dirty(self._vm))

    def write_memory(self, fd: int, offset: int, *, diff: bool, pages: int) -> tuple[int, bytes]:
        """Guest RAM to fd (full, or the dirty pages packed); bytes written and,
        for a diff, the bitmap of the pages written (else b"")."""
        n = (pages + 7) // 8 if diff else 0
        bitmap = ffi.new("uint8_t[]", max(n, 1))
        written = check(lib.vmm_vm_write_memory(self._vm, fd, offset, int(diff), bitmap, n),
                        "write guest memory")
        return written, bytes(ffi.buffer(bitmap, n))

    # -- lifecycle --
    def start(self) -> None:
        check(lib.vmm_vm_start(self._vm), "start VM")

    def start_paused(self) -> None:
        check(lib.vmm_vm_start_paused(self._vm), "start VM paused")

    def pause(self, timeout_ms: int = 5000) -> None:
        check(lib.vmm_vm_pause(self._vm, timeout_ms), "pause VM")

    def resume(self) -> None:
        check(lib.vmm_vm_resume(self._vm), "resume VM")

    def stop(self) -> None:
        check(lib.vmm_vm_stop(self._vm), "stop VM")

    @property
    def stop_reason(self) -> StopReason:
        return StopReason(lib.vmm_vm_stop_reason(self._vm))

    def stats(self) -> VmStats:
        s = ffi.new("struct vmm_vm_stats *")
        check(lib.vmm_vm_get_stats(self._vm, s), "read VM stats")
        return VmStats(**{f.name: getattr(s, f.name) for f in dataclasses.fields(VmStats)})

    def thread_count(self) -> int:
        return lib.vmm_vm_thread_count(self._vm)

    # -- events --
    @property
    def event_fd(self) -> int:
        return lib.vmm_vm_event_fd(self._vm)

    def next_event(self) -> Event | None:
        e = ffi.new("struct vmm_event *")
        if not check(lib.vmm_vm_next_event(self._vm, e), "read VM event"):
            return None
        return Event(
            type=EventType(e.type), reason=StopReason(e.reason), vcpu=e.vcpu, err=e.err,
            code=e.code, rip=e.rip, time_ns=e.time_ns,
            insn=bytes(ffi.buffer(e.insn, min(e.insn_len, 16))),
        )

    # -- console --
    def console_set_fd(self, fd: int) -> None:
        check(lib.vmm_vm_console_set_fd(self._vm, fd), "set console fd")

    @property
    def console_notify_fd(self) -> int:
        return lib.vmm_vm_console_notify_fd(self._vm)

    def console_read(self, pos: int, max_bytes: int = 65536) -> tuple[bytes, int]:
        """Bytes from absolute position `pos`, and the position after them."""
        p = ffi.new("uint64_t *", pos)
        buf = ffi.new("uint8_t[]", max_bytes)
        n = check(lib.vmm_vm_console_read(self._vm, p, buf, max_bytes), "read console")
        return bytes(ffi.buffer(buf, n)), p[0]

    def console_head(self) -> int:
        return lib.vmm_vm_console_head(self._vm)

    def console_input(self, data: bytes) -> int:
        return check(lib.vmm_vm_console_input(self._vm, data, len(data)), "console input")

    def send_ctrl_alt_del(self) -> None:
        check(lib.vmm_vm_send_ctrl_alt_del(self._vm), "send Ctrl-Alt-Del")

    # -- teardown --
    def close(self) -> None:
        if self._vm != ffi.NULL:
            lib.vmm_vm_destroy(self._vm)
            self._vm = ffi.NULL

    def __enter__(self) -> NativeVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
