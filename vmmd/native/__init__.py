"""Typed Python face of the C core (pynacl style: a module per concern,
re-exported here).

- _lib.py: the only importer of the cffi module `vmmd.native._core`; the
  core-version check; check() turns -errno into NativeError;
- types.py: enums, events, counters;
- state.py: what a snapshot holds of the C core, as plain values, and its
  packing into C structs;
- vm.py: NativeVm, one KVM VM, owned through close();
- jail.py, seccomp.py: a cell worker's jail and system call filter;
- testing.py: guest memory and virtio devices without a VM (native tier);
- testhooks.py: test-only escape attempts, in test builds only.

cffi releases the GIL around each C call, so a blocking call here never
stalls other Python threads.
"""

from typing import TYPE_CHECKING, Any

from vmmd.native._lib import CORE_VERSION, check
from vmmd.native.jail import enter_jail
from vmmd.native.seccomp import (
    SECCOMP_EXIT,
    SeccompReport,
    install_seccomp,
    parse_seccomp_report,
    seccomp_allowlist,
    syscall_name,
)
from vmmd.native.state import (
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
    PackedVcpu,
    QueueState,
    VcpuState,
    VirtioState,
    pack_vcpu,
)
from vmmd.native.types import Event, EventType, StopReason, VirtioStats, VmStats
from vmmd.native.vm import MachineShape, NativeVm, kvm_api_version, kvm_clock_flags

if TYPE_CHECKING:
    from vmmd.native.testing import (
        GuestMemory,
        VirtioBlock,
        VirtioDevice,
        VirtioNet,
        VirtioRng,
        VirtioVsock,
    )

# The native tier's classes load on first use: a VMM process never needs them.
_TESTING = frozenset({"GuestMemory", "VirtioBlock", "VirtioDevice", "VirtioNet", "VirtioRng",
                      "VirtioVsock"})


def __getattr__(name: str) -> Any:
    if name in _TESTING:
        from vmmd.native import testing

        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BLOB_SIZES", "CORE_VERSION", "LEGACY_KBD_MAX", "LEGACY_RX_MAX", "MACHINE_BLOB_SIZES",
    "MAX_CPUID", "MAX_MSRS", "SECCOMP_EXIT", "VCPU_BLOBS", "CpuidEntry", "Event", "EventType",
    "GuestMemory", "LegacyState", "MachineShape", "MachineState", "NativeVm", "PackedVcpu",
    "QueueState", "SeccompReport", "StopReason", "VcpuState", "VirtioBlock", "VirtioDevice",
    "VirtioNet", "VirtioRng", "VirtioState", "VirtioStats", "VirtioVsock", "VmStats", "check",
    "enter_jail", "install_seccomp", "kvm_api_version", "kvm_clock_flags", "pack_vcpu",
    "parse_seccomp_report", "seccomp_allowlist", "syscall_name",
]  # fmt: skip
