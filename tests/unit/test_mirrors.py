"""One shape per saved or reported struct: the C struct (native/vmmcore.h, as
cffi sees it), the Python record and the protobuf message carry the same
fields, up to the explicit renames and omissions below.  A field added to
one shape and not the others fails here, in the unit tier, instead of on
the first snapshot of a KVM test.

Each row: C struct, record, message, renames (C/record name -> message
name), and the fields one side has on purpose and the others do not (with
the reason)."""

from __future__ import annotations

from typing import Any

import pytest

from vmmd import info, spec
from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd.native import (
    CpuidEntry,
    Event,
    LegacyState,
    MachineState,
    QueueState,
    VcpuState,
    VirtioState,
    VirtioStats,
    VmStats,
)
from vmmd.native._lib import ffi

# Fields a C struct has for its own layout: counts of arrays Python holds as
# tuples or bytes, and padding.
C_ONLY = {
    "struct vmm_vcpu_state": {"nmsrs", "ncpuid"},
    "struct vmm_virtio_state": {"nqueues"},
    "struct vmm_legacy_state": {"rx_len", "kbd_len"},
    "struct vmm_virtq_state": {"pad"},
    "struct vmm_event": {"insn_len"},
}

# (C struct, record, message, {record name: message name}, record-only, message-only)
SAVED: list[tuple[str, type, Any, dict[str, str], set[str], set[str]]] = [
    ("struct vmm_vcpu_state", VcpuState, spb.VcpuState, {}, set(), set()),
    ("struct vmm_cpuid_entry", CpuidEntry, spb.CpuidEntry, {}, set(), set()),
    ("struct vmm_machine_state", MachineState, spb.MachineState, {}, set(), set()),
    ("struct vmm_virtq_state", QueueState, spb.VirtqueueState, {}, set(), set()),
    # C calls the queue array q; the record and the message say queues.
    ("struct vmm_virtio_state", VirtioState, spb.VirtioDevice, {}, set(), set()),
    ("struct vmm_legacy_state", LegacyState, spb.LegacyDevices,
     {"rx": "rx_fifo", "kbd": "kbd_buffer"}, set(), set()),
]
C_RENAMES = {"struct vmm_virtio_state": {"q": "queues"}}


def c_fields(ctype: str) -> set[str]:
    return {name for name, _ in ffi.typeof(ctype).fields} - C_ONLY.get(ctype, set())


def dc_fields(cls: type) -> set[str]:
    return set(cls._fields)


def pb_fields(msg: Any) -> set[str]:
    return {f.name for f in msg.DESCRIPTOR.fields}


@pytest.mark.parametrize(("ctype", "cls", "msg", "renames", "dc_only", "pb_only"), SAVED,
                         ids=[row[0].split()[-1] for row in SAVED])
def test_a_saved_struct_has_one_shape(ctype: str, cls: type, msg: Any, renames: dict[str, str],
                                      dc_only: set[str], pb_only: set[str]) -> None:
    c = {C_RENAMES.get(ctype, {}).get(n, n) for n in c_fields(ctype)}
    dc = dc_fields(cls)
    assert c == dc - dc_only, f"C {ctype} vs {cls.__name__}: {c ^ (dc - dc_only)}"
    proto = {renames.get(n, n) for n in dc - dc_only}
    assert proto == pb_fields(msg) - pb_only, \
        f"{cls.__name__} vs {msg.DESCRIPTOR.full_name}: {proto ^ (pb_fields(msg) - pb_only)}"


def test_the_msr_pair_matches_its_message() -> None:
    """VcpuState.msrs holds (index, data) pairs of struct vmm_msr (less its padding)."""
    assert [n for n, _ in ffi.typeof("struct vmm_msr").fields if n != "pad"] == \
        [f.name for f in spb.Msr.DESCRIPTOR.fields]


def test_counters_have_one_shape() -> None:
    """The C core's counters, the values the manager hands the API, and the API's messages.
    The API leaves out exits_hlt (no HLT exits with an in-kernel LAPIC) and events_dropped
    (an internal health figure, logged); it adds the per-device lists, the entropy
    device's counters (a DeviceCounters, filled as a drive's) and vsock's; and it turns the
    core's three start timestamps into two spans (vm/vm.py)."""
    assert c_fields("struct vmm_vm_stats") == dc_fields(VmStats)
    api = dc_fields(info.VmCounters)
    stamps, spans = {"start_ns", "first_run_ns", "first_output_ns"}, {"vcpu_start_us",
                                                                      "guest_startup_us"}
    assert (dc_fields(VmStats) - {"exits_hlt", "events_dropped"} - stamps
            == api - {"devices", "interfaces", "entropy", "vsock"} - spans)
    assert api == pb_fields(pb.VmCounters)
    assert c_fields("struct vmm_virtio_stats") == dc_fields(VirtioStats)
    assert dc_fields(info.DeviceCounters) == pb_fields(pb.DeviceCounters)
    assert dc_fields(info.InterfaceCounters) == pb_fields(pb.InterfaceCounters)
    assert dc_fields(info.VsockCounters) == pb_fields(pb.VsockCounters)
    # What the device counts, as each API message names it (vm/vm.py and devices/net.py).
    drive_from = {"requests": "requests", "bytes_read": "bytes_read",
                  "bytes_written": "bytes_written", "io_errors": "io_errors",
                  "bad_requests": "bad_chains", "interrupts": "interrupts"}
    assert set(drive_from) == dc_fields(info.DeviceCounters) - {"device_id"}
    assert set(drive_from.values()) <= dc_fields(VirtioStats)


def test_the_event_struct_matches_its_record() -> None:
    assert c_fields("struct vmm_event") == dc_fields(Event)


# Spec fields a snapshot does not keep: they say where a VM runs, not what it is, and
# RestoreVm/CloneVm say them anew (RestoreSpec has them; builder._overridden sets them).
NOT_SAVED = {"cell", "limits"}


def test_specs_mirror_the_api_and_the_snapshot_schema() -> None:
    """Internal names are the API's (errors name request fields without renaming)."""
    assert dc_fields(spec.BootSpec) == pb_fields(pb.BootSource)
    assert dc_fields(spec.DriveSpec) == pb_fields(pb.Drive)
    assert dc_fields(spec.NetSpec) == pb_fields(pb.NetworkInterface)
    assert dc_fields(spec.VmSpec) - {"vm_id"} == pb_fields(pb.VmConfig)
    assert dc_fields(spec.CellLimits) == pb_fields(pb.CellLimits)
    assert dc_fields(spec.DriveOverride) == pb_fields(pb.DriveOverride)
    assert dc_fields(spec.NetOverride) == pb_fields(pb.InterfaceOverride)
    assert dc_fields(spec.DeviceOverrides) == pb_fields(pb.DeviceOverrides)
    # RestoreVm's request less resume (a verb's choice, not the VM's); CloneVm's names the
    # same fields but for the clones' ids and overrides (one RestoreSpec per clone).
    assert dc_fields(spec.RestoreSpec) == pb_fields(pb.RestoreVmRequest) - {"resume"}
    assert dc_fields(spec.RestoreSpec) - {"vm_id", "overrides"} == \
        pb_fields(pb.CloneVmRequest) - {"resume", "count", "id_prefix", "overrides"}
    # The snapshot's VmSpec: the API's names, flattened (boot's fields at the top, no
    # cmdline_append: the saved command line is the guest's), plus the drives' sizes;
    # without the cell and its limits.
    saved = pb_fields(spb.VmSpec)
    assert NOT_SAVED <= dc_fields(spec.VmSpec) and not NOT_SAVED & saved
    assert saved == (dc_fields(spec.VmSpec) - {"boot"} - NOT_SAVED) | \
        (dc_fields(spec.BootSpec) - {"cmdline_append"})
    assert pb_fields(spb.Drive) == dc_fields(spec.DriveSpec) | {"size_bytes"}
    assert pb_fields(spb.NetworkInterface) == dc_fields(spec.NetSpec) - {"create_tap"}


def test_the_vm_info_mirrors_the_api_vm() -> None:
    """What the manager hands the API (info.VmInfo) and the Vm message GetVm returns: the
    same fields, but for the names the reply gives them (spec is the reply's config, phase
    its state, seconds its milliseconds)."""
    renames = {"phase": "state", "spec": "config", "uptime_s": "uptime_ms"}
    assert {renames.get(n, n) for n in dc_fields(info.VmInfo)} == pb_fields(pb.Vm)
    assert dc_fields(info.CellInfo) == pb_fields(pb.CellInfo)
    assert pb.CellInfo.DESCRIPTOR.fields_by_name["limits"].message_type is \
        pb.CellLimits.DESCRIPTOR
