"""NativeVm: one KVM VM in the C core, owned through close()."""

from __future__ import annotations

import errno
import functools
from typing import Any, Self

from vmmd.errors import FieldPath, InvalidSpecError
from vmmd.native._lib import check, ffi, lib
from vmmd.native.state import (
    LEGACY_KBD_MAX,
    LEGACY_RX_MAX,
    MACHINE_BLOB_SIZES,
    VCPU_BLOBS,
    CpuidEntry,
    LegacyState,
    MachineState,
    PackedVcpu,
    QueueState,
    VcpuState,
    VirtioState,
    pack_vcpu,
    scalars,
    set_blob,
    set_scalars,
    unpack_vcpu_bytes,
)
from vmmd.native.types import Event, EventType, StopReason, VirtioStats, VmStats, virtio_stats_of
from vmmd.record import Record


def _fill(cstruct: Any, value: Any) -> None:
    """Copy a (nested) record into a cffi struct of the same field names."""
    for name in value._fields:
        v = getattr(value, name)
        if isinstance(v, Record):
            _fill(getattr(cstruct, name), v)
        else:
            setattr(cstruct, name, int(v))


# Boot registers come in a few shapes (one per boot protocol and entry point, records
# equal by value): each is copied into the C struct field by field once, ~100 cffi
# setattrs, and its bytes kept.
@functools.lru_cache(maxsize=64)
def _packed_boot_regs(regs: Any) -> bytes:
    c = ffi.new("struct vmm_boot_regs *")
    _fill(c, regs)
    return bytes(ffi.buffer(c))


def kvm_api_version(kvm_path: str = "/dev/kvm") -> int:
    return check(lib.vmm_kvm_api_version(kvm_path.encode()), f"open {kvm_path}")


def kvm_clock_flags(kvm_path: str = "/dev/kvm") -> int:
    """The KVM_CLOCK_* flags KVM_SET_CLOCK takes on this host (KVM_CAP_ADJUST_CLOCK)."""
    return check(lib.vmm_kvm_clock_flags(kvm_path.encode()), "check KVM_CAP_ADJUST_CLOCK")


# KVM_GET_SUPPORTED_CPUID's answer (a C blob), read once per process: the host's
# CPUID does not change under a running daemon, and reading it costs ~0.4 ms a VM.
_supported_cpuid: Any = None

# What a VM made ahead of its request is given (vmmd/vm/shelf.py), as a boot gave
# it to the VM last built: the anonymous RAM regions (gpa, size) in order, whether
# dirty pages are tracked, and how many vCPUs (made for a boot: CPUID set).
MachineShape = tuple[tuple[tuple[int, int], ...], bool, int]


class NativeVm:
    """One KVM VM in the C core.  Not thread-safe for control verbs: the
    caller (vm layer) serializes them; reads (stats, console) are safe."""

    # Made ahead with this shape (vmmd/vm/shelf.py); None: fresh.
    prepared: MachineShape | None = None
    # What was asked of it, kept here (readable after close): shape.
    _anon_ram: tuple[tuple[int, int], ...] = ()
    _file_ram = False
    _dirty = False
    _boot_vcpus = 0

    def __init__(self, kvm_path: str = "/dev/kvm") -> None:
        out = ffi.new("struct vmm_vm **")
        check(lib.vmm_vm_create(kvm_path.encode(), out), "create VM")
        self._vm = out[0]

    @classmethod
    def from_kvm_fd(cls, kvm_fd: int) -> Self:
        """The VM on an open /dev/kvm fd (a jailed worker's, passed by the broker);
        the VM keeps a duplicate, so the caller still owns and closes kvm_fd."""
        self = cls.__new__(cls)
        out = ffi.new("struct vmm_vm **")
        check(lib.vmm_vm_create_fd(kvm_fd, out), "create VM")
        self._vm = out[0]
        return self

    # -- construction --
    def add_ram(self, gpa: int, size: int) -> None:
        check(lib.vmm_vm_add_ram(self._vm, gpa, size), f"add RAM at 0x{gpa:x}")
        self._anon_ram = (*self._anon_ram, (gpa, size))

    @property
    def shape(self) -> MachineShape | None:
        """What a VM made ahead for the same kind of VM gets; None unless this one
        was made for a boot (a restore's RAM is from a file, its vCPUs bare)."""
        if self._file_ram or not self._anon_ram or not self._boot_vcpus:
            return None
        return self._anon_ram, self._dirty, self._boot_vcpus

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
        if bare:
            check(lib.vmm_vm_create_vcpus_bare(self._vm, n), f"create {n} vCPUs")
            return
        blob = self._supported_cpuid()
        check(lib.vmm_vm_create_vcpus_cpuid(self._vm, n, blob, len(blob)), f"create {n} vCPUs")
        self._boot_vcpus = n

    def _supported_cpuid(self) -> Any:
        """KVM's supported CPUID, read by this process's first VM and kept (vmmcore.h)."""
        global _supported_cpuid
        if _supported_cpuid is None:
            blob = ffi.new("uint8_t[]", lib.vmm_cpuid_blob_size())
            check(lib.vmm_vm_supported_cpuid(self._vm, blob, len(blob)), "read KVM's CPUID")
            _supported_cpuid = blob
        return _supported_cpuid

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

    def add_virtio_rng(self, *, max_request: int, mmio_base: int, gsi: int) -> int:
        """Attach the entropy device (max_request bytes per request, 0: the
        C core's bound, 64 KiB); its device index."""
        return check(lib.vmm_vm_add_virtio_rng(self._vm, max_request, mmio_base, gsi),
                     "attach entropy device")

    def add_virtio_vsock(self, listen_fd: int, dir_fd: int, *, guest_cid: int, name: str,
                         mmio_base: int, gsi: int) -> int:
        """Attach a virtio-vsock device: host clients come through the listening
        Unix socket listen_fd, guest connects to host port P go to "<name>_<P>"
        in the directory open as dir_fd (the device keeps duplicates of both);
        its device index."""
        return check(lib.vmm_vm_add_virtio_vsock(self._vm, guest_cid, listen_fd, dir_fd,
                                                 name.encode(), mmio_base, gsi),
                     "attach vsock device")

    def virtio_stats(self, idx: int) -> VirtioStats:
        s = ffi.new("struct vmm_virtio_stats *")
        check(lib.vmm_vm_virtio_stats(self._vm, idx, s), f"read device {idx} stats")
        return virtio_stats_of(s)

    def set_boot_regs(self, idx: int, regs: Any) -> None:
        c = ffi.new("struct vmm_boot_regs *")
        packed = _packed_boot_regs(regs)
        ffi.memmove(c, packed, len(packed))
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
            cpuid=tuple(CpuidEntry(**{f: getattr(c.cpuid[i], f)
                                      for f in CpuidEntry._fields})
                        for i in range(c.ncpuid)))

    def restore_vcpu(self, idx: int, s: VcpuState | PackedVcpu) -> None:
        """ValueError for a state of the wrong shape; NativeError when KVM refuses it.
        A PackedVcpu (pack_vcpu) is used as it is: clones restore from one."""
        packed = s if isinstance(s, PackedVcpu) else pack_vcpu(s)
        check(lib.vmm_vcpu_restore(self._vm, idx, packed.cdata), f"restore vCPU {idx}")

    def restore_vcpu_bytes(self, idx: int, data: bytes) -> None:
        """restore_vcpu() of a state as packed_bytes() gives it (a cell's worker)."""
        check(lib.vmm_vcpu_restore(self._vm, idx, unpack_vcpu_bytes(data)),
              f"restore vCPU {idx}")

    def save_machine(self) -> MachineState:
        c = ffi.new("struct vmm_machine_state *")
        check(lib.vmm_vm_save_machine(self._vm, c), "save irqchip, PIT and clock")
        return MachineState(**{b: bytes(ffi.buffer(getattr(c, b))) for b in MACHINE_BLOB_SIZES},
                            clock=c.clock, realtime=c.realtime)

    def restore_machine(self, s: MachineState, *, clock_realtime: bool = False) -> None:
        """clock_realtime: move kvmclock on by the host time since s.realtime
        (the C core reads the host clock right at KVM_SET_CLOCK, or KVM does)."""
        c = ffi.new("struct vmm_machine_state *")
        for b in MACHINE_BLOB_SIZES:
            set_blob(c, b, getattr(s, b))
        c.clock, c.realtime = s.clock, s.realtime
        flags = lib.VMM_RESTORE_CLOCK_REALTIME if clock_realtime else 0
        check(lib.vmm_vm_restore_machine(self._vm, c, flags), "restore irqchip, PIT and clock")

    def save_virtio(self, idx: int) -> VirtioState:
        c = ffi.new("struct vmm_virtio_state *")
        check(lib.vmm_vm_virtio_save(self._vm, idx, c), f"save device {idx}")
        queues = tuple(QueueState(**scalars(c.q[i], QueueState)) for i in range(c.nqueues))
        return VirtioState(**scalars(c, VirtioState), queues=queues)

    def restore_virtio(self, idx: int, s: VirtioState) -> None:
        if len(s.queues) > 3:
            raise ValueError(f"{len(s.queues)} queues, at most 3")
        c = ffi.new("struct vmm_virtio_state *")
        set_scalars(c, s)
        c.nqueues = len(s.queues)
        for i, q in enumerate(s.queues):
            set_scalars(c.q[i], q)
        check(lib.vmm_vm_virtio_restore(self._vm, idx, c), f"restore device {idx}")

    def save_legacy(self) -> LegacyState:
        c = ffi.new("struct vmm_legacy_state *")
        check(lib.vmm_vm_legacy_save(self._vm, c), "save UART and i8042")
        return LegacyState(**scalars(c, LegacyState), rx=bytes(c.rx[0:c.rx_len]),
                           kbd=bytes(c.kbd[0:c.kbd_len]))

    def restore_legacy(self, s: LegacyState) -> None:
        c = ffi.new("struct vmm_legacy_state *")
        set_scalars(c, s)
        set_blob(c, "rx", s.rx, LEGACY_RX_MAX)
        set_blob(c, "kbd", s.kbd, LEGACY_KBD_MAX)
        c.rx_len, c.kbd_len = len(s.rx), len(s.kbd)
        check(lib.vmm_vm_legacy_restore(self._vm, c), "restore UART and i8042")

    def add_ram_file(self, gpa: int, size: int, fd: int, offset: int) -> None:
        check(lib.vmm_vm_add_ram_file(self._vm, gpa, size, fd, offset),
              f"map RAM at 0x{gpa:x} from the memory file")
        self._file_ram = True

    def track_dirty(self) -> None:
        check(lib.vmm_vm_track_dirty(self._vm), "turn on dirty-page tracking")
        self._dirty = True

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
        return VmStats(**{f: getattr(s, f) for f in VmStats._fields})

    def thread_count(self) -> int:
        return lib.vmm_vm_thread_count(self._vm)

    def stop_detail(self) -> str | None:
        """Why the VM stopped beyond its reason, when the core cannot say it
        (a cell's VM whose worker died: RemoteNativeVm); None here."""
        return None

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

    def pulse_irq(self, gsi: int) -> None:
        """One edge on IOAPIC pin `gsi` (a line no C device owns: the ACPI GED's)."""
        check(lib.vmm_vm_pulse_irq(self._vm, gsi), f"pulse IRQ {gsi}")

    # -- teardown --
    def close(self, *, deferred: bool = False) -> None:
        """deferred: KVM's teardown and the RAM's release finish on a C thread
        after this returns (every fd and device of ours is closed before)."""
        if self._vm != ffi.NULL:
            (lib.vmm_vm_destroy_deferred if deferred else lib.vmm_vm_destroy)(self._vm)
            self._vm = ffi.NULL

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
