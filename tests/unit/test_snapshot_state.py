"""The checks a snapshot's state gets before a VM is built from it
(vmmd/vm/snapshot/state.py restore_*, apply.prepare, builder.restore_from), on
hand-made messages, no KVM: the file is untrusted, so every size, count and range
is refused with DataLossError naming the field ("snapshot state vcpus[1].lapic:
1000 bytes, want 1024").  The blob sizes are the C structs' (cffi)."""

from __future__ import annotations

import errno
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.framework.fake_native import FakeFactory
from vmmd import record
from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.errors import DataLossError, InvalidSpecError
from vmmd.native import (
    BLOB_SIZES,
    LEGACY_KBD_MAX,
    LEGACY_RX_MAX,
    MACHINE_BLOB_SIZES,
    MAX_CPUID,
    MAX_MSRS,
    VCPU_BLOBS,
    CpuidEntry,
    LegacyState,
    MachineState,
    QueueState,
    VcpuState,
    VirtioState,
)
from vmmd.spec import (
    BootSpec,
    CellLimits,
    DriveSpec,
    EntropySpec,
    NetSpec,
    RestoreSpec,
    VmSpec,
)
from vmmd.vm import snapshot
from vmmd.vm.builder import restore_from
from vmmd.vm.layout import MAX_VCPUS, MiB
from vmmd.vm.snapshot import apply, state

U8, U16, U32, U64 = 0xFF, 0xFFFF, 2**32 - 1, 2**64 - 1
QUEUE_U16 = ("size", "last_avail", "used_idx", "signalled_used")
LEGACY_U8 = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "ctr", "cmd", "status_cmd", "outp")


def lost(where: str, says: str = "") -> AbstractContextManager[Any]:
    """A DataLossError naming `where` (and saying `says`)."""
    return pytest.raises(DataLossError,
                         match=f"^snapshot state {re.escape(where)}: .*{re.escape(says)}")


# ---- good messages, each check then broken one at a time ----
def vcpu_msg(nmsrs: int = 2, ncpuid: int = 1) -> spb.VcpuState:
    return spb.VcpuState(**{b: bytes(n) for b, n in BLOB_SIZES.items()}, mp_state=0,
                         msrs=[spb.Msr(index=i, data=i) for i in range(nmsrs)],
                         cpuid=[spb.CpuidEntry(function=i) for i in range(ncpuid)])


def machine_msg() -> spb.MachineState:
    return spb.MachineState(**{b: bytes(n) for b, n in MACHINE_BLOB_SIZES.items()}, clock=1)


def virtio_msg(device_id: int = 2, nqueues: int = 1) -> spb.VirtioDevice:
    return spb.VirtioDevice(device_id=device_id, status=0xF,
                            queues=[spb.VirtqueueState(size=256) for _ in range(nqueues)])


def spec_msg(**fields: object) -> spb.VmSpec:
    values: dict[str, object] = {"vm_id": "v", "kernel_path": "/nonexistent/vmlinux",
                                 "cmdline": "console=ttyS0", "vcpus": 1, "memory_mib": 32}
    return spb.VmSpec(**{**values, **fields})  # type: ignore[arg-type]


# ---- vCPUs ----
@pytest.mark.parametrize("blob", VCPU_BLOBS)
@pytest.mark.parametrize("delta", [-1, 1, None], ids=["short", "long", "empty"])
def test_a_vcpu_blob_of_the_wrong_size(blob: str, delta: int | None) -> None:
    m, want = vcpu_msg(), BLOB_SIZES[blob]
    size = 0 if delta is None else want + delta
    setattr(m, blob, bytes(size))
    with lost(f"vcpus[1].{blob}", f"{size} bytes, want {want}"):
        state.restore_vcpu(m, "vcpus[1]")


@pytest.mark.parametrize(("nmsrs", "ncpuid", "where", "says"), [
    (MAX_MSRS + 1, 1, "vcpus[0].msrs", f"{MAX_MSRS + 1} entries, at most {MAX_MSRS}"),
    (0, 0, "vcpus[0].cpuid", f"0 entries, want 1..{MAX_CPUID}"),
    (0, MAX_CPUID + 1, "vcpus[0].cpuid", f"{MAX_CPUID + 1} entries, want 1..{MAX_CPUID}"),
])
def test_vcpu_entry_counts_out_of_range(nmsrs: int, ncpuid: int, where: str, says: str) -> None:
    with lost(where, says):
        state.restore_vcpu(vcpu_msg(nmsrs, ncpuid), "vcpus[0]")


def test_vcpu_entry_counts_at_their_limits_are_taken() -> None:
    v = state.restore_vcpu(vcpu_msg(MAX_MSRS, MAX_CPUID), "vcpus[0]")
    assert (len(v.msrs), len(v.cpuid)) == (MAX_MSRS, MAX_CPUID)
    assert state.restore_vcpu(vcpu_msg(0, 1), "vcpus[0]").msrs == ()


def blob(size: int) -> st.SearchStrategy[bytes]:
    return st.integers(0, 255).map(lambda b: bytes([b]) * size)


vcpu_states = st.builds(
    VcpuState, **{b: blob(n) for b, n in BLOB_SIZES.items() if b in VCPU_BLOBS},
    mp_state=st.integers(0, U32),
    msrs=st.lists(st.tuples(st.integers(0, U32), st.integers(0, U64)), max_size=4).map(tuple),
    cpuid=st.lists(st.builds(CpuidEntry, *[st.integers(0, U32)] * 7), min_size=1,
                   max_size=4).map(tuple))


@given(vcpu_states)
def test_a_saved_vcpu_is_restored_as_it_was(v: VcpuState) -> None:
    assert state.restore_vcpu(state.save_vcpu(v), "vcpus[0]") == v


# ---- irqchips, PIT, clock ----
@pytest.mark.parametrize("name", list(MACHINE_BLOB_SIZES))
def test_a_machine_blob_of_the_wrong_size(name: str) -> None:
    m = machine_msg()
    setattr(m, name, bytes(MACHINE_BLOB_SIZES[name] - 1))
    with lost(f"machine.{name}", f"want {MACHINE_BLOB_SIZES[name]}"):
        state.restore_machine(m)


@given(st.builds(MachineState, **{b: blob(n) for b, n in MACHINE_BLOB_SIZES.items()},
                 clock=st.integers(0, U64), realtime=st.integers(0, U64)))
def test_a_saved_machine_is_restored_as_it_was(s: MachineState) -> None:
    assert state.restore_machine(state.save_machine(s), created_unix_ns=5) == (
        s if s.realtime else record.replace(s, realtime=5))


def test_a_machine_state_without_realtime_takes_the_snapshots_time() -> None:
    """A file from before machine.realtime: created_unix_ns stands in (a
    restore moving the clock on then still knows from when)."""
    assert state.restore_machine(machine_msg(), created_unix_ns=7).realtime == 7
    assert state.restore_machine(machine_msg()).realtime == 0  # not known: the clock stays
    m = machine_msg()
    m.realtime = 9
    assert state.restore_machine(m, created_unix_ns=7).realtime == 9


# ---- virtio transports ----
def test_a_device_of_another_kind_than_the_spec_says() -> None:
    with lost("devices[2].device_id", "1, but the spec has a device 2 here"):
        state.restore_virtio(virtio_msg(device_id=1), "devices[2]", 2, 1)


@pytest.mark.parametrize(("have", "want"), [(0, 1), (2, 1), (1, 2), (3, 2)])
def test_a_device_with_another_number_of_queues(have: int, want: int) -> None:
    with lost("devices[0].queues", f"{have} queues, the device has {want}"):
        state.restore_virtio(virtio_msg(nqueues=have), "devices[0]", 2, want)


@given(st.sampled_from(QUEUE_U16), st.integers(0, 1), st.integers(0, U32))
def test_queue_fields_are_taken_iff_they_fit_16_bits(name: str, q: int, value: int) -> None:
    m = virtio_msg(device_id=1, nqueues=2)
    setattr(m.queues[q], name, value)
    if value <= U16:
        assert getattr(state.restore_virtio(m, "devices[0]", 1, 2).queues[q], name) == value
    else:
        with lost(f"devices[0].queues[{q}].{name}", f"{value} is outside 0..{U16}"):
            state.restore_virtio(m, "devices[0]", 1, 2)


@given(st.integers(0, U32))
def test_device_status_is_taken_iff_it_fits_8_bits(value: int) -> None:
    m = virtio_msg()
    m.status = value
    if value <= U8:
        assert state.restore_virtio(m, "devices[0]", 2, 1).status == value
    else:
        with lost("devices[0].status", f"{value} is outside 0..{U8}"):
            state.restore_virtio(m, "devices[0]", 2, 1)


queues = st.builds(QueueState, desc=st.integers(0, U64), avail=st.integers(0, U64),
                   used=st.integers(0, U64), size=st.integers(0, U16),
                   last_avail=st.integers(0, U16), used_idx=st.integers(0, U16),
                   signalled_used=st.integers(0, U16), ready=st.integers(0, 1),
                   event_idx=st.integers(0, 1), indirect=st.integers(0, 1))


@given(st.sampled_from([(2, 1), (1, 2)]).flatmap(lambda k: st.builds(
    VirtioState, device_id=st.just(k[0]), status=st.integers(0, U8),
    dev_feat_sel=st.integers(0, U32), drv_feat_sel=st.integers(0, U32),
    queue_sel=st.integers(0, U32), int_status=st.integers(0, U32),
    config_gen=st.integers(0, U32), driver_features=st.integers(0, U64),
    queues=st.lists(queues, min_size=k[1], max_size=k[1]).map(tuple))))
def test_a_saved_device_is_restored_as_it_was(s: VirtioState) -> None:
    assert state.restore_virtio(state.save_virtio(s), "devices[0]", s.device_id,
                                len(s.queues)) == s


# ---- UART, i8042 ----
@given(st.sampled_from(LEGACY_U8), st.integers(0, U32))
def test_legacy_registers_are_taken_iff_they_fit_8_bits(name: str, value: int) -> None:
    m = spb.LegacyDevices(**{name: value})
    if value <= U8:
        assert getattr(state.restore_legacy(m), name) == value
    else:
        with lost(f"legacy.{name}", f"{value} is outside 0..{U8}"):
            state.restore_legacy(m)


@pytest.mark.parametrize(("rx", "kbd"), [(LEGACY_RX_MAX + 1, 0), (0, LEGACY_KBD_MAX + 1)])
def test_legacy_buffers_longer_than_the_devices_hold(rx: int, kbd: int) -> None:
    with lost("legacy", f"{rx} UART / {kbd} i8042 bytes queued, at most {LEGACY_RX_MAX} / "
                        f"{LEGACY_KBD_MAX}"):
        state.restore_legacy(spb.LegacyDevices(rx_fifo=bytes(rx), kbd_buffer=bytes(kbd)))


@given(st.builds(LegacyState, **{f: st.integers(0, U8) for f in LEGACY_U8},
                 thr_ipending=st.integers(0, 1), irq_level=st.integers(0, 1),
                 rx=st.binary(max_size=LEGACY_RX_MAX), kbd=st.binary(max_size=LEGACY_KBD_MAX),
                 console_head=st.integers(0, U64)))
def test_saved_legacy_devices_are_restored_as_they_were(s: LegacyState) -> None:
    assert state.restore_legacy(state.save_legacy(s)) == s


# ---- the saved spec ----
@pytest.mark.parametrize(("fields", "where", "says"), [
    ({"vcpus": 0}, "spec.vcpus", f"0 is outside 1..{MAX_VCPUS}"),
    ({"vcpus": MAX_VCPUS + 1}, "spec.vcpus", f"{MAX_VCPUS + 1} is outside 1..{MAX_VCPUS}"),
    ({"vm_id": ""}, "spec.vm_id", "is required"),
    ({"vm_id": "-v"}, "spec.vm_id", "must be 1-64 characters"),
    ({"cmdline": "a\nb"}, "spec.cmdline", "is not printable ASCII"),
    ({"cmdline": "x" * 2048}, "spec.cmdline", "2048 bytes; the kernel takes at most 2047"),
    ({"kernel_path": ""}, "spec.kernel_path", "is required"),
    ({"kernel_path": "vmlinux"}, "spec.kernel_path", "is not an absolute path"),
    ({"kernel_path": "/a\0b"}, "spec.kernel_path", "contains a NUL byte"),
    ({"kernel_path": "/"}, "spec.kernel_path", "not a kernel file"),
    ({"initrd_path": "initrd"}, "spec.initrd_path", "is not an absolute path"),
    ({"initrd_path": "/proc"}, "spec.initrd_path", "not a kernel file"),
])
def test_a_saved_spec_gets_the_checks_create_gives(fields: dict[str, object], where: str,
                                                  says: str) -> None:
    with lost(where, says):
        state.restore_spec(spec_msg(**fields))


@pytest.mark.parametrize(("vcpus", "acpi"), [(1, False), (MAX_VCPUS, True)])
def test_a_saved_spec_is_restored_as_it_was(vcpus: int, acpi: bool) -> None:
    spec = VmSpec("v", BootSpec("/nonexistent/vmlinux", "/nonexistent/initrd", "console=ttyS0"),
                  vcpus=vcpus, memory_mib=64, track_dirty_pages=True, acpi=acpi,
                  drives=(DriveSpec("d", "/img", read_only=True, is_root_device=True),),
                  network_interfaces=(NetSpec("eth0", "tap0", "02:00:00:00:00:01"),),
                  entropy=EntropySpec(4096) if vcpus == 1 else None)
    m = state.save_spec(spec, "console=ttyS0 x=1", [4096])
    back, cmdline, sizes = state.restore_spec(m)
    # The saved command line is the one the guest got (device words included).
    assert back == record.replace(spec, boot=record.replace(spec.boot,
                                                             cmdline="console=ttyS0 x=1"))
    assert (cmdline, sizes) == ("console=ttyS0 x=1", (4096,))


@pytest.mark.parametrize("value", [65537, 2**32 - 1])
def test_a_saved_entropy_bound_out_of_range_is_lost(value: int) -> None:
    with lost("spec.entropy.max_request_bytes", f"{value} is outside 1..65536"):
        state.restore_spec(spec_msg(entropy=spb.Entropy(max_request_bytes=value)))


def test_a_spec_saved_before_acpi_existed_restores_without_it() -> None:
    """Snapshots older than the field: the guest booted without ACPI tables."""
    back, _, _ = state.restore_spec(spec_msg())  # no acpi field on the wire
    assert back.acpi is False


def test_a_saved_spec_has_no_cell() -> None:
    """Where a VM ran (its cell, the cell's limits) is not what it is: not saved."""
    spec = VmSpec("v", BootSpec("/nonexistent/vmlinux"), memory_mib=64)
    placed = record.replace(spec, cell="web", limits=CellLimits(0.5, 256, 64))
    assert state.save_spec(placed, "x", []) == state.save_spec(spec, "x", [])
    back, _, _ = state.restore_spec(state.save_spec(placed, "x", []))
    assert (back.cell, back.limits) == ("", CellLimits())


# ---- the state against the VM's spec (apply.prepare) ----
def snap_of(s: spb.SnapshotState, directory: Path = Path("/nonexistent")) -> snapshot.Snapshot:
    return snapshot.Snapshot(directory, s, directory / "memory", 32 * MiB, 0, 0)


def state_msg(vcpus: int = 1, devices: tuple[tuple[int, int], ...] = ()) -> spb.SnapshotState:
    return spb.SnapshotState(vcpus=[vcpu_msg() for _ in range(vcpus)], machine=machine_msg(),
                             devices=[virtio_msg(d, q) for d, q in devices],
                             legacy=spb.LegacyDevices())


def vm_spec(vcpus: int = 1, drives: int = 0, nets: int = 0) -> VmSpec:
    return VmSpec("v", BootSpec("/k"), vcpus=vcpus,
                  drives=tuple(DriveSpec(f"d{i}", "/img") for i in range(drives)),
                  network_interfaces=tuple(NetSpec(f"e{i}", f"tap{i}") for i in range(nets)))


BLK, NET = (2, 1), (1, 2)


def test_prepare_converts_a_state_that_fits_the_spec() -> None:
    p = apply.prepare(snap_of(state_msg(2, (BLK, NET))), vm_spec(2, drives=1, nets=1))
    assert len(p.vcpus) == 2 and [d.device_id for d in p.devices] == [2, 1]
    assert p.machine.clock == 1


@pytest.mark.parametrize(("saved", "spec", "says"), [
    (state_msg(1), vm_spec(2), "1 vCPU states for 2 vCPUs"),
    (state_msg(3), vm_spec(2), "3 vCPU states for 2 vCPUs"),
    (state_msg(1, (BLK,)), vm_spec(1), "1 device states for 0 devices"),
    (state_msg(1, (BLK,)), vm_spec(1, drives=1, nets=1), "1 device states for 2 devices"),
])
def test_prepare_refuses_counts_other_than_the_spec(saved: spb.SnapshotState, spec: VmSpec,
                                                    says: str) -> None:
    with pytest.raises(DataLossError, match=f"^snapshot state: {says}$"):
        apply.prepare(snap_of(saved), spec)


def test_prepare_names_the_component_that_is_wrong() -> None:
    saved = state_msg(2, (BLK, NET))
    saved.vcpus[1].lapic = b"x"
    with lost("vcpus[1].lapic"):
        apply.prepare(snap_of(saved), vm_spec(2, drives=1, nets=1))
    saved = state_msg(1, (BLK, BLK))  # a block device where the spec has an interface
    with lost("devices[1].device_id", "2, but the spec has a device 1 here"):
        apply.prepare(snap_of(saved), vm_spec(1, drives=1, nets=1))
    saved = state_msg(1)
    saved.machine.pit = b""
    with lost("machine.pit"):
        apply.prepare(snap_of(saved), vm_spec(1))
    saved = state_msg(1)
    saved.legacy.lcr = 256
    with lost("legacy.lcr"):
        apply.prepare(snap_of(saved), vm_spec(1))


def test_a_state_the_core_refuses_is_data_loss(natives: FakeFactory) -> None:
    native = natives("/dev/kvm")
    native.add_ram(0, 32 * MiB)
    native.create_vcpus(1, bare=True)
    native.fail("restore_legacy", errno.EINVAL)
    with pytest.raises(DataLossError, match="^snapshot state refused: .*Invalid argument"):
        apply.apply_state(native, snap_of(state_msg(1)), vm_spec(1))
    native.close()


# ---- the state against the memory file (builder.restore_from) ----
def full_state(**spec_fields: object) -> spb.SnapshotState:
    s = state_msg(1)
    s.kind = snapshot.FULL
    s.spec.CopyFrom(spec_msg(**spec_fields))
    s.memory.add(guest_address=0, size=32 * MiB)
    return s


@pytest.mark.parametrize(("change", "says"), [
    (lambda s: setattr(s.memory[0], "size", 16 * MiB), "memory regions do not fit a VM of 32 MiB"),
    (lambda s: s.memory.add(guest_address=1 << 32, size=MiB), "memory regions do not fit"),
    (lambda s: setattr(s.spec, "memory_mib", 8), "snapshot state spec: memory_mib: "),
    (lambda s: setattr(s.spec, "memory_mib", 2**32 - 1), "snapshot state spec: memory_mib: "),
])
def test_restore_refuses_memory_that_does_not_fit_the_spec(natives: FakeFactory, change,  # type: ignore[no-untyped-def]
                                                           says: str) -> None:
    s = full_state()
    change(s)
    with pytest.raises(DataLossError, match=re.escape(says)):
        restore_from(RestoreSpec("/s", "r"), snap_of(s), -1, native_factory=natives)
    assert natives.made == 0  # refused before any VM exists


def test_restore_refuses_a_diff_snapshot(natives: FakeFactory) -> None:
    s = full_state()
    s.kind = snapshot.DIFF
    with pytest.raises(InvalidSpecError, match="is a diff snapshot: merge it"):
        restore_from(RestoreSpec("/s", "r"), snap_of(s), -1, native_factory=natives)
    assert natives.made == 0
