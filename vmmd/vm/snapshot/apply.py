"""Putting a snapshot's state back into a fresh VM: its RAM mapped and its
devices attached, nothing started.  Order: irqchips, PIT and clock, each
vCPU (CPUID, registers, LAPIC, MSRs, events, in KVM's order; the C core),
each device's transport (validated against guest RAM), UART and i8042.
"""

from __future__ import annotations

from vmmd.errors import DataLossError, NativeError
from vmmd.native import (
    LegacyState,
    MachineState,
    NativeVm,
    PackedVcpu,
    VcpuState,
    VirtioState,
    pack_vcpu,
)
from vmmd.record import Record
from vmmd.spec import VmSpec
from vmmd.vm.devices import block, net, rng, vsock
from vmmd.vm.snapshot import state
from vmmd.vm.snapshot.cache import SnapshotCache
from vmmd.vm.snapshot.files import Snapshot


def device_kinds(spec: VmSpec) -> list[tuple[int, int]]:
    """(virtio device id, queues) of each device in attachment order."""
    return ([(block.DEVICE_ID, block.QUEUES)] * len(spec.drives)
            + [(net.DEVICE_ID, net.QUEUES)] * len(spec.network_interfaces)
            + [(rng.DEVICE_ID, rng.QUEUES)] * (spec.entropy is not None)
            + [(vsock.DEVICE_ID, vsock.QUEUES)] * (spec.vsock is not None))


class Prepared(Record):
    """A snapshot's state checked and converted for the C core."""

    machine: MachineState
    vcpus: tuple[PackedVcpu, ...]  # packed once: clones restore from the same structs
    devices: tuple[VirtioState, ...]
    legacy: LegacyState


def prepare(snap: Snapshot, spec: VmSpec) -> Prepared:
    """Check the snapshot's state against the VM's spec and convert it."""
    s = snap.state
    if len(s.vcpus) != spec.vcpus:
        raise DataLossError(f"snapshot state: {len(s.vcpus)} vCPU states for {spec.vcpus} vCPUs")
    kinds = device_kinds(spec)
    if len(s.devices) != len(kinds):
        raise DataLossError(f"snapshot state: {len(s.devices)} device states for "
                            f"{len(kinds)} devices")
    p = Prepared(
        machine=state.restore_machine(s.machine, s.created_unix_ns),
        vcpus=tuple(_packed(state.restore_vcpu(v, f"vcpus[{i}]"), f"vcpus[{i}]")
                    for i, v in enumerate(s.vcpus)),
        devices=tuple(state.restore_virtio(d, f"devices[{i}]", *kinds[i])
                      for i, d in enumerate(s.devices)),
        legacy=state.restore_legacy(s.legacy))
    return p


def _packed(v: VcpuState, where: str) -> PackedVcpu:
    try:
        return pack_vcpu(v)
    except ValueError as e:  # state.restore_vcpu bounds the counts: not expected
        raise DataLossError(f"snapshot state {where}: {e}") from None


def apply_state(native: NativeVm, snap: Snapshot, spec: VmSpec,
                cache: SnapshotCache | None = None, *, clock_realtime: bool = False) -> None:
    """Put a checked snapshot's state into a VM built from its spec (checked
    and converted once per cached snapshot: clones and repeated restores of
    one snapshot skip it).  KVM or a device refusing a value means a state
    no VM could have had here: DataLossError, naming what was refused.
    clock_realtime: kvmclock moves on by the host time since the snapshot."""
    p = (cache.derived(snap, "prepared", lambda: prepare(snap, spec)) if cache is not None
         else prepare(snap, spec))
    machine, vcpus, devices, legacy = p.machine, p.vcpus, p.devices, p.legacy
    try:
        native.restore_machine(machine, clock_realtime=clock_realtime)
        for i, v in enumerate(vcpus):
            native.restore_vcpu(i, v)
        for i, d in enumerate(devices):
            native.restore_virtio(i, d)
        native.restore_legacy(legacy)
    except NativeError as e:
        raise DataLossError(f"snapshot state refused: {e}") from None


