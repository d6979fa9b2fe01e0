"""The C core's enums and the plain values it reports: events, counters."""

from __future__ import annotations

import enum
from typing import Any

from vmmd.native._lib import lib
from vmmd.record import Record


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
    # Never from C: the daemon's own, for a VM whose cell worker died under it
    # (vmmd/cell/remote.py), outside the C enum's range.
    WORKER_DIED = 100


class EventType(enum.IntEnum):
    STOPPED = lib.VMM_EVENT_STOPPED
    PAUSED = lib.VMM_EVENT_PAUSED
    RESUMED = lib.VMM_EVENT_RESUMED
    DEVICE_ERROR = lib.VMM_EVENT_DEVICE_ERROR
    LOST = lib.VMM_EVENT_LOST


class Event(Record):
    type: EventType
    reason: StopReason
    vcpu: int
    err: int
    code: int
    rip: int
    time_ns: int
    insn: bytes


class VmStats(Record):
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
    # CLOCK_MONOTONIC ns, 0 = not yet: start(), vCPU 0's first KVM_RUN, the first
    # console byte (the guest's own start-up is first_output_ns - first_run_ns).
    start_ns: int = 0
    first_run_ns: int = 0
    first_output_ns: int = 0


class VirtioStats(Record):
    notifies: int
    requests: int
    bad_chains: int
    io_errors: int
    bytes_read: int
    bytes_written: int
    interrupts: int
    rx_frames: int
    tx_frames: int
    bad_packets: int
    connections: int
    resets: int


def virtio_stats_of(c: Any) -> VirtioStats:
    return VirtioStats(**{f: getattr(c, f) for f in VirtioStats._fields})
