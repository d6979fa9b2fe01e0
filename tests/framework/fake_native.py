"""A fake of the C core's VM (vmmd.native.NativeVm), shipped beside the real
thing as fake_driver.py is beside the virtio devices: the control plane
(builder, Vm, Manager, snapshots) runs on it without /dev/kvm.

FakeNativeVm offers what the Python layers call on NativeVm, with the C
core's rules where the callers could get them wrong (a verb in the wrong
run state fails with the errno C returns; construction only while
created; the first stop reason wins).  Its event fd and console notify
fd are real eventfds, so the watcher thread (vmmd/vm/watcher.py) wakes on them as
on the real VM.  Guest RAM is sparse (pages written, or read from the
memory file a restore maps), so a 128 MiB guest costs what it holds.

Test controls play the guest and the C core's failures:

- guest_stops(reason, ...): the guest stopped itself (power-off, reset,
  triple fault, emulation failure with rip and instruction bytes...): the
  STOPPED event is queued and the event fd signalled, as C does;
- guest_prints(data): console output, readers woken;
- on_ctrl_alt_del: "reset" (a microVM guest's answer), "poweroff" or
  "ignore"; `cad_sent` is set once Ctrl-Alt-Del was sent;
- fail(method, errno): that call raises NativeError(errno), as check() does.

`calls` records every call (name, args, kwargs), in order, so a test can
assert the construction order.  FakeFactory is a `native_factory` for
Manager / build_vm / restore_vm; it keeps the VMs it made and can fail a
call of the VMs it makes next (or of the n-th one).
"""

from __future__ import annotations

import enum
import errno
import functools
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Self, TypeVar

from vmmd import record
from vmmd.errors import FieldPath, InvalidSpecError, NativeError
from vmmd.native import (
    BLOB_SIZES,
    MACHINE_BLOB_SIZES,
    CpuidEntry,
    Event,
    EventType,
    LegacyState,
    MachineState,
    PackedVcpu,
    QueueState,
    StopReason,
    VcpuState,
    VirtioState,
    VirtioStats,
    VmStats,
    pack_vcpu,
)
from vmmd.native.state import unpack_vcpu_bytes
from vmmd.record import Record, field
from vmmd.vm.layout import IOAPIC_PINS

PAGE = 4096
CONSOLE_RING = 256 * 1024  # the C core keeps this much console history
MAX_VCPUS = 32
MAX_VIRTIO = 19
VIRTIO_ID_NET, VIRTIO_ID_BLOCK, VIRTIO_ID_RNG = 1, 2, 4
VIRTIO_ID_VSOCK = 19
# Each kind's virtio device id and queues, as the C devices have them.
KINDS = {"blk": (VIRTIO_ID_BLOCK, 1), "net": (VIRTIO_ID_NET, 2), "rng": (VIRTIO_ID_RNG, 1),
         "vsock": (VIRTIO_ID_VSOCK, 3)}

F = TypeVar("F", bound=Callable[..., Any])


class RunState(enum.Enum):
    """The C core's run states (vmm_vm_state)."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class Call(Record):
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class RamRegion(Record, frozen=False):
    gpa: int
    size: int
    fd: int = -1  # a dup of the memory file (restore): pages not written read from it
    offset: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size


class FakeDevice(Record, frozen=False):
    kind: str  # "blk" | "net" | "rng" | "vsock"
    fd: int  # blk: our duplicate of the image; net: the caller's tap fd; rng: -1; vsock: our
    # listener dup
    mmio_base: int
    gsi: int
    options: dict[str, Any]
    stats: VirtioStats = field(default_factory=lambda: VirtioStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    state: VirtioState | None = None


def _op(fn: F) -> F:
    """A NativeVm method: recorded in `calls`, failed if a test said so,
    refused once the VM is closed (the real one would use freed memory)."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: FakeNativeVm, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls.append(Call(name, args, kwargs))
            if self.closed:
                raise AssertionError(f"FakeNativeVm.{name} called after close()")
            err = self._failures.get(name)
            if err is not None:
                raise NativeError(f"fake {name}", err)
        return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _raise(err: int, op: str) -> None:
    raise NativeError(op, err)


class FakeNativeVm:
    """One fake VM of the C core.  kvm_path is recorded, never opened."""

    prepared: Any = None  # as NativeVm.prepared: set by the shelf that made it ahead

    def __init__(self, kvm_path: str = "/dev/kvm", *, on_ctrl_alt_del: str = "reset",
                 failures: dict[str, int] | None = None) -> None:
        self.kvm_path = kvm_path
        self.on_ctrl_alt_del = on_ctrl_alt_del
        self.calls: list[Call] = []
        self.closed = False
        self.cad_sent = threading.Event()  # Ctrl-Alt-Del was sent (whatever the answer)
        self.irq_pulses: list[int] = []  # pulse_irq's lines, in order
        self._failures: dict[str, int] = dict(failures or {})
        self._lock = threading.RLock()  # the C core's ctl_lock and event ring lock in one
        self._state = RunState.CREATED
        self._stop_reason = StopReason.NONE
        self._events: deque[Event] = deque()
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._console_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.ram: list[RamRegion] = []
        self._pages: dict[int, bytearray] = {}  # page number -> its bytes (written pages)
        self._dirty: set[int] = set()  # pages written since the last write_memory
        self._track_dirty = False
        self.devices: list[FakeDevice] = []
        self.nvcpus = 0
        self.bare = False
        self.boot_regs: dict[int, Any] = {}
        self.vcpu_states: dict[int, VcpuState] = {}
        self.vcpu_bytes: dict[int, bytes] = {}  # restore_vcpu_bytes (a cell worker's way)
        self.machine: MachineState | None = None
        self.clock_realtime = False  # restore_machine's option, as last given
        self.legacy: LegacyState | None = None
        self.threads = 0
        self.kvm_fd: int | None = None
        self.console = bytearray()  # everything the guest printed (the ring keeps the tail)
        self.console_in = bytearray()  # what was typed into the UART
        self.uart_room = 1 << 20  # bytes console_input accepts per call (the FIFO's room)
        self.console_out_fd: int | None = None
        self.vm_stats: dict[str, int] = {}  # counters a test sets (VmStats field names)

    # ---- test controls ----
    def fail(self, method: str, err: int) -> None:
        """Every later call of `method` raises NativeError(err)."""
        with self._lock:
            self._failures[method] = err

    def heal(self, method: str) -> None:
        with self._lock:
            self._failures.pop(method, None)

    @property
    def names(self) -> list[str]:
        """The methods called, in order."""
        return [c.name for c in self.calls]

    @property
    def run_state(self) -> RunState:
        """As vmm_vm_state: STOPPED as soon as a stop reason is set."""
        with self._lock:
            return RunState.STOPPED if self._stop_reason != StopReason.NONE else self._state

    def guest_stops(self, reason: StopReason, *, vcpu: int = -1, rip: int = 0,
                    insn: bytes = b"", code: int = 0, err: int = 0) -> bool:
        """The guest (or KVM) stopped the VM: what vmm_vm_request_stop does.
        False when another stop came first (no news then)."""
        ev = Event(type=EventType.STOPPED, reason=reason, vcpu=vcpu, err=err, code=code,
                   rip=rip, time_ns=0, insn=insn[:16])
        return self._request_stop(reason, ev)

    def guest_prints(self, data: bytes) -> None:
        """Console output from the guest (flushed: readers see it whole)."""
        with self._lock:
            self.console += data
            out = self.console_out_fd
        if out is not None:
            os.write(out, data)
        os.eventfd_write(self._console_fd, 1)

    def guest_writes(self, gpa: int, data: bytes) -> None:
        """The guest wrote its RAM (dirty pages, as KVM's log would say)."""
        self._store(gpa, data)

    def push_event(self, type_: EventType, **fields: Any) -> None:
        """Any event into the ring (PAUSED, DEVICE_ERROR, LOST...)."""
        base = dict(reason=StopReason.NONE, vcpu=-1, err=0, code=0, rip=0, time_ns=0, insn=b"")
        self._push(Event(type=type_, **{**base, **fields}))

    def open_fds(self) -> list[int]:
        """The fds this fake holds open (eventfds, duplicated image and memory fds)."""
        with self._lock:
            return [] if self.closed else self._fds()

    def _fds(self) -> list[int]:
        fds = [self._efd, self._console_fd]
        fds += [r.fd for r in self.ram if r.fd >= 0]
        fds += [d.fd for d in self.devices if d.kind in ("blk", "vsock")]
        fds += [d.options["dir_fd"] for d in self.devices if d.kind == "vsock"]
        return fds

    # ---- construction ----
    def _created(self, op: str) -> None:
        if self.run_state != RunState.CREATED:
            _raise(errno.EBUSY, op)

    def _add_region(self, gpa: int, size: int, fd: int, offset: int, op: str) -> None:
        with self._lock:
            self._created(op)
            if size <= 0 or gpa % PAGE or size % PAGE or offset % PAGE:
                _raise(errno.EINVAL, op)
            if any(gpa < r.end and r.gpa < gpa + size for r in self.ram):
                _raise(errno.EEXIST, op)
            self.ram.append(RamRegion(gpa, size, os.dup(fd) if fd >= 0 else -1, offset))

    @_op
    def add_ram(self, gpa: int, size: int) -> None:
        self._add_region(gpa, size, -1, 0, f"add RAM at 0x{gpa:x}")

    @property
    def shape(self) -> Any:
        """As NativeVm's: the anonymous regions, dirty tracking and vCPUs of a
        booted VM; None before its vCPUs, or with any region from a file or bare
        vCPUs (a restore's)."""
        if not self.ram or any(r.fd >= 0 for r in self.ram) or not self.nvcpus or self.bare:
            return None
        return tuple((r.gpa, r.size) for r in self.ram), self._track_dirty, self.nvcpus

    @_op
    def add_ram_file(self, gpa: int, size: int, fd: int, offset: int) -> None:
        if os.fstat(fd).st_size < offset + size:
            _raise(errno.EINVAL, f"map RAM at 0x{gpa:x} from the memory file")
        self._add_region(gpa, size, fd, offset, f"map RAM at 0x{gpa:x} from the memory file")

    @_op
    def track_dirty(self) -> None:
        with self._lock:
            self._created("turn on dirty-page tracking")
            self._track_dirty = True

    @property
    def tracks_dirty(self) -> bool:
        return self._track_dirty

    def _check_virtio(self, op: str) -> None:
        self._created(op)
        if len(self.devices) == MAX_VIRTIO:
            _raise(errno.ENOSPC, op)

    @_op
    def add_virtio_blk(self, fd: int, *, read_only: bool, serial: str, mmio_base: int,
                       gsi: int) -> int:
        with self._lock:
            self._check_virtio("attach drive")
            self.devices.append(FakeDevice("blk", os.dup(fd), mmio_base, gsi,
                                           {"read_only": read_only, "serial": serial}))
            return len(self.devices) - 1

    @_op
    def add_virtio_net(self, tap_fd: int, *, mac: bytes, max_frame: int, mmio_base: int,
                       gsi: int) -> int:
        if len(mac) != 6:
            raise ValueError("mac: 6 bytes")
        with self._lock:
            self._check_virtio("attach network interface")
            self.devices.append(FakeDevice("net", tap_fd, mmio_base, gsi,
                                           {"mac": mac, "max_frame": max_frame}))
            return len(self.devices) - 1

    @_op
    def add_virtio_rng(self, *, max_request: int, mmio_base: int, gsi: int) -> int:
        with self._lock:
            self._check_virtio("attach entropy device")
            if not 0 <= max_request <= 65536:
                _raise(errno.EINVAL, "attach entropy device")
            self.devices.append(FakeDevice("rng", -1, mmio_base, gsi,
                                           {"max_request": max_request}))

    def add_virtio_vsock(self, listen_fd: int, dir_fd: int, *, guest_cid: int, name: str,
                         mmio_base: int, gsi: int) -> int:
        if not 3 <= guest_cid <= 0xFFFF_FFFE or not name or "/" in name:
            _raise(errno.EINVAL, "attach vsock device")
        with self._lock:
            self._check_virtio("attach vsock device")
            self.devices.append(FakeDevice("vsock", os.dup(listen_fd), mmio_base, gsi,
                                           {"guest_cid": guest_cid, "name": name,
                                            "dir_fd": os.dup(dir_fd)}))
            return len(self.devices) - 1

    @_op
    def create_vcpus(self, n: int, *, bare: bool = False) -> None:
        with self._lock:
            if not 1 <= n <= MAX_VCPUS:
                _raise(errno.EINVAL, f"create {n} vCPUs")
            if self.nvcpus:
                _raise(errno.EBUSY, f"create {n} vCPUs")
            self._created(f"create {n} vCPUs")
            self.nvcpus, self.bare = n, bare

    def _vcpu(self, idx: int, op: str) -> None:
        if not 0 <= idx < self.nvcpus:
            _raise(errno.EINVAL, op)

    @_op
    def set_boot_regs(self, idx: int, regs: Any) -> None:
        with self._lock:
            self._vcpu(idx, f"set vCPU {idx} registers")
            self._created(f"set vCPU {idx} registers")
            self.boot_regs[idx] = regs

    @_op
    def get_regs(self, idx: int) -> tuple[dict[str, Any], int]:
        with self._lock:
            self._vcpu(idx, f"get vCPU {idx} registers")
            if self.run_state == RunState.RUNNING:
                _raise(errno.EBUSY, f"get vCPU {idx} registers")
            regs = self.boot_regs.get(idx)
        if regs is None:
            return {}, 0
        return {f: getattr(regs, f) for f in regs._fields
                if isinstance(getattr(regs, f), int)}, 0

    # ---- guest RAM ----
    def _region(self, gpa: int, length: int) -> RamRegion | None:
        return next((r for r in self.ram if r.gpa <= gpa and gpa + length <= r.end), None)

    def _page(self, pn: int) -> bytes:
        page = self._pages.get(pn)
        if page is not None:
            return bytes(page)
        gpa = pn * PAGE
        r = self._region(gpa, PAGE)
        if r is not None and r.fd >= 0:
            data = os.pread(r.fd, PAGE, r.offset + gpa - r.gpa)
            return data.ljust(PAGE, b"\0")
        return bytes(PAGE)

    def _store(self, gpa: int, data: bytes) -> None:
        with self._lock:
            if self._region(gpa, len(data)) is None:
                _raise(errno.EFAULT, f"write guest 0x{gpa:x}")
            pos = 0
            while pos < len(data):
                pn, off = divmod(gpa + pos, PAGE)
                n = min(PAGE - off, len(data) - pos)
                if pn not in self._pages:
                    self._pages[pn] = bytearray(self._page(pn))
                self._pages[pn][off:off + n] = data[pos:pos + n]
                self._dirty.add(pn)
                pos += n

    @_op
    def write(self, gpa: int, data: bytes) -> None:
        self._store(gpa, bytes(data))

    @_op
    def load_file(self, gpa: int, fd: int, offset: int, length: int, field: FieldPath) -> None:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise InvalidSpecError(field, "file shrank while loading")
        self._store(gpa, data)

    @_op
    def read(self, gpa: int, length: int) -> bytes:
        with self._lock:
            if self._region(gpa, length) is None:
                _raise(errno.EFAULT, f"read guest 0x{gpa:x}")
            out = bytearray()
            pos = gpa
            while pos < gpa + length:
                pn, off = divmod(pos, PAGE)
                n = min(PAGE - off, gpa + length - pos)
                out += self._page(pn)[off:off + n]
                pos += n
            return bytes(out)

    @_op
    def write_memory(self, fd: int, offset: int, *, diff: bool, pages: int) -> tuple[int, bytes]:
        """As vmm_vm_write_memory: full, non-zero pages at their place; diff,
        the dirty pages packed and their bits."""
        with self._lock:
            if self.run_state != RunState.PAUSED:
                _raise(errno.EBUSY, "write guest memory")
            total = sum(r.size for r in self.ram) // PAGE
            if diff and (not self._track_dirty or pages < total):
                _raise(errno.EINVAL, "write guest memory")
            bitmap = bytearray((pages + 7) // 8 if diff else 0)
            pos, first, written = offset, 0, 0
            for r in self.ram:
                for i in range(r.size // PAGE):
                    pn = r.gpa // PAGE + i
                    if diff:
                        if pn not in self._dirty:
                            continue
                        os.pwrite(fd, self._page(pn), pos)
                        pos += PAGE
                        bitmap[(first + i) // 8] |= 1 << ((first + i) % 8)
                    else:
                        data = self._page(pn)
                        if data.count(0) == PAGE:
                            continue
                        os.pwrite(fd, data, pos + i * PAGE)
                    written += PAGE
                if not diff:
                    pos += r.size
                first += r.size // PAGE
            self._dirty.clear()
            return written, bytes(bitmap)

    # ---- devices ----
    @_op
    def virtio_stats(self, idx: int) -> VirtioStats:
        with self._lock:
            if not 0 <= idx < len(self.devices):
                _raise(errno.EINVAL, f"read device {idx} stats")
            return self.devices[idx].stats

    def set_virtio_stats(self, idx: int, **counters: int) -> None:
        d = self.devices[idx]
        d.stats = record.replace(d.stats, **counters)

    # ---- snapshots ----
    def _paused(self, op: str) -> None:
        if self.run_state != RunState.PAUSED:
            _raise(errno.EBUSY, op)

    @_op
    def save_vcpu(self, idx: int) -> VcpuState:
        with self._lock:
            self._vcpu(idx, f"save vCPU {idx}")
            self._paused(f"save vCPU {idx}")
            saved = self.vcpu_states.get(idx)
        if saved is not None:
            return saved
        return VcpuState(**{b: bytes([idx]) * size for b, size in BLOB_SIZES.items()},
                         mp_state=0, msrs=((0x10, idx),),
                         cpuid=(CpuidEntry(0, 0, 0, 0x16, 0x756E6547, 0x6C65746E, 0x49656E69),))

    @_op
    def restore_vcpu(self, idx: int, s: VcpuState | PackedVcpu) -> None:
        packed = s if isinstance(s, PackedVcpu) else pack_vcpu(s)  # ValueError as the real one
        with self._lock:
            self._vcpu(idx, f"restore vCPU {idx}")
            self._created(f"restore vCPU {idx}")
            self.vcpu_states[idx] = packed.state

    @_op
    def restore_vcpu_bytes(self, idx: int, data: bytes) -> None:
        unpack_vcpu_bytes(data)  # ValueError for a wrong size, as the real one
        with self._lock:
            self._vcpu(idx, f"restore vCPU {idx}")
            self._created(f"restore vCPU {idx}")
            self.vcpu_bytes[idx] = bytes(data)

    @_op
    def save_machine(self) -> MachineState:
        with self._lock:
            self._paused("save irqchip, PIT and clock")
            if self.machine is not None:
                return self.machine
        return MachineState(**{b: bytes(size) for b, size in MACHINE_BLOB_SIZES.items()},
                            clock=123456789)

    @_op
    def restore_machine(self, s: MachineState, *, clock_realtime: bool = False) -> None:
        for b, size in MACHINE_BLOB_SIZES.items():
            if len(getattr(s, b)) != size:
                raise ValueError(f"{b}: {len(getattr(s, b))} bytes, want {size}")
        with self._lock:
            self._created("restore irqchip, PIT and clock")
            self.machine = s
            self.clock_realtime = clock_realtime

    def _device(self, idx: int, op: str) -> FakeDevice:
        if not 0 <= idx < len(self.devices):
            _raise(errno.EINVAL, op)
        return self.devices[idx]

    @_op
    def save_virtio(self, idx: int) -> VirtioState:
        with self._lock:
            d = self._device(idx, f"save device {idx}")
            self._paused(f"save device {idx}")
        if d.state is not None:
            return d.state
        device_id, nq = KINDS[d.kind]
        q = QueueState(desc=0, avail=0, used=0, size=256, last_avail=0, used_idx=0,
                       signalled_used=0, ready=0, event_idx=0, indirect=0)
        return VirtioState(device_id=device_id,
                           status=0, dev_feat_sel=0, drv_feat_sel=0, queue_sel=0, int_status=0,
                           config_gen=0, driver_features=0, queues=(q,) * nq)

    @_op
    def restore_virtio(self, idx: int, s: VirtioState) -> None:
        if len(s.queues) > 3:
            raise ValueError(f"{len(s.queues)} queues, at most 3")
        with self._lock:
            d = self._device(idx, f"restore device {idx}")
            self._created(f"restore device {idx}")
            if s.device_id != KINDS[d.kind][0]:
                _raise(errno.EINVAL, f"restore device {idx}")
            d.state = s

    @_op
    def save_legacy(self) -> LegacyState:
        with self._lock:
            self._paused("save UART and i8042")
            if self.legacy is not None:
                return record.replace(self.legacy, console_head=len(self.console))
        return LegacyState(ier=0, lcr=3, mcr=0, scr=0, dll=1, dlm=0, thr_ipending=0,
                           irq_level=0, rx=b"", ctr=0, cmd=0, status_cmd=0, outp=0, kbd=b"",
                           console_head=len(self.console))

    @_op
    def restore_legacy(self, s: LegacyState) -> None:
        with self._lock:
            self._created("restore UART and i8042")
            self.legacy = s
            # Stream offsets go on from where the snapshot's console was.
            self.console = bytearray(s.console_head)

    # ---- lifecycle ----
    def _push(self, ev: Event) -> None:
        with self._lock:
            self._events.append(ev)
        os.eventfd_write(self._efd, 1)

    def _request_stop(self, reason: StopReason, ev: Event) -> bool:
        with self._lock:
            if self._stop_reason != StopReason.NONE or self._state not in (RunState.RUNNING,
                                                                           RunState.PAUSED):
                return False
            self._stop_reason = reason
            self._events.append(ev)
        os.eventfd_write(self._efd, 1)
        return True

    def _start(self, paused: bool, op: str) -> None:
        with self._lock:
            self._created(op)
            if not self.nvcpus or not self.ram:
                _raise(errno.EINVAL, op)
            self._state = RunState.PAUSED if paused else RunState.RUNNING
            self.threads = self.nvcpus + 1

    @_op
    def start(self) -> None:
        self._start(False, "start VM")

    @_op
    def start_paused(self) -> None:
        self._start(True, "start VM paused")

    @_op
    def pause(self, timeout_ms: int = 5000) -> None:
        with self._lock:
            if self._state == RunState.RUNNING and self._stop_reason == StopReason.NONE:
                self._state = RunState.PAUSED
                self.push_event(EventType.PAUSED)
            elif self._state != RunState.PAUSED:
                _raise(errno.EINVAL, "pause VM")

    @_op
    def resume(self) -> None:
        with self._lock:
            if self._state == RunState.PAUSED:
                self._state = RunState.RUNNING
                self.push_event(EventType.RESUMED)
            elif self._state != RunState.RUNNING:
                _raise(errno.EINVAL, "resume VM")

    @_op
    def stop(self) -> None:
        self._stop()

    def _stop(self) -> None:
        with self._lock:
            if self._state in (RunState.RUNNING, RunState.PAUSED):
                self._request_stop(StopReason.REQUESTED, Event(
                    type=EventType.STOPPED, reason=StopReason.REQUESTED, vcpu=-1, err=0, code=0,
                    rip=0, time_ns=0, insn=b""))
                self.threads = 0  # joined
            self._state = RunState.STOPPED
            if self._stop_reason == StopReason.NONE:
                self._stop_reason = StopReason.REQUESTED

    @property
    def stop_reason(self) -> StopReason:
        return self._stop_reason

    @_op
    def stats(self) -> VmStats:
        with self._lock:
            values = {f: 0 for f in VmStats._fields}
            values.update(self.vm_stats)
            values["console_bytes"] = len(self.console)
            return VmStats(**values)

    @_op
    def thread_count(self) -> int:
        return self.threads

    def stop_detail(self) -> str | None:
        return None

    # ---- events ----
    @property
    def event_fd(self) -> int:
        return self._efd

    @_op
    def next_event(self) -> Event | None:
        with self._lock:
            ev = self._events.popleft() if self._events else None
            if not self._events:
                try:  # drained: poll() sleeps until the next push
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
            return ev

    # ---- console ----
    @_op
    def console_set_fd(self, fd: int) -> None:
        with self._lock:
            self.console_out_fd = fd

    @property
    def console_notify_fd(self) -> int:
        return self._console_fd

    @_op
    def console_read(self, pos: int, max_bytes: int = 65536) -> tuple[bytes, int]:
        with self._lock:
            head = len(self.console)
            pos = min(max(pos, head - CONSOLE_RING, 0), head)
            data = bytes(self.console[pos:pos + max_bytes])
            return data, pos + len(data)

    @_op
    def console_head(self) -> int:
        with self._lock:
            return len(self.console)

    @_op
    def console_input(self, data: bytes) -> int:
        with self._lock:
            n = min(len(data), self.uart_room)
            self.console_in += data[:n]
            return n

    @_op
    def send_ctrl_alt_del(self) -> None:
        with self._lock:
            if self.run_state != RunState.RUNNING:
                _raise(errno.EINVAL, "send Ctrl-Alt-Del")
        self.cad_sent.set()
        answer = {"reset": StopReason.RESET, "poweroff": StopReason.POWEROFF}.get(
            self.on_ctrl_alt_del)
        if answer is not None:
            self.guest_stops(answer)

    @_op
    def pulse_irq(self, gsi: int) -> None:
        with self._lock:
            if not self.nvcpus or not 0 <= gsi < IOAPIC_PINS:  # C: no irqchip yet / no such pin
                _raise(errno.EINVAL, f"pulse IRQ {gsi}")
            self.irq_pulses.append(gsi)

    # ---- teardown ----
    @classmethod
    def from_kvm_fd(cls, kvm_fd: int) -> FakeNativeVm:
        """As NativeVm.from_kvm_fd: the fd is recorded, never used."""
        vm = cls()
        vm.kvm_fd = kvm_fd
        return vm

    def close(self, *, deferred: bool = False) -> None:
        with self._lock:
            self.calls.append(Call("close", (), {}))
            if self.closed:
                return
            self._stop()
            self.closed = True
            for fd in self._fds():
                os.close(fd)
            for r in self.ram:
                r.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeFactory:
    """A native_factory: FakeNativeVm(kvm_path), kept in `vms` (in the order
    made).  fail(method, errno) fails that call in every VM made from now
    on, or only in the nth VM this factory makes (0-based, counting all)."""

    def __init__(self, *, on_ctrl_alt_del: str = "reset") -> None:
        self.on_ctrl_alt_del = on_ctrl_alt_del
        self.vms: list[FakeNativeVm] = []
        self.made = 0  # attempts, failed ones included
        self._failures: list[tuple[str, int, int | None]] = []
        self._lock = threading.Lock()

    def fail(self, method: str, err: int, *, nth: int | None = None) -> None:
        """method "create" fails the construction itself (as an absent /dev/kvm)."""
        self._failures.append((method, err, nth))

    def clear_failures(self) -> None:
        self._failures.clear()

    def __call__(self, kvm_path: str) -> FakeNativeVm:
        with self._lock:
            n, self.made = self.made, self.made + 1
        mine = {m: e for m, e, nth in self._failures if nth is None or nth == n}
        if "create" in mine:
            raise NativeError("create VM", mine.pop("create"))
        vm = FakeNativeVm(kvm_path, on_ctrl_alt_del=self.on_ctrl_alt_del, failures=mine)
        with self._lock:
            self.vms.append(vm)
        return vm

    @property
    def last(self) -> FakeNativeVm:
        return self.vms[-1]
