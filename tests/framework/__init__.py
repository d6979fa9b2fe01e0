"""The test and bench harness: what functional tests (tests/) and benchmarks (bench/) share.

    from tests.framework import REPO, GUEST_DIR, ON_PVM
    from tests.framework.daemon import running_daemon    # one `vmmd serve` launcher

Modules: daemon (the launcher), rpc (raw gRPC helpers), console (a VM's console through
the daemon), netns (network namespaces), frames (Ethernet frames of the micro-guest's net
driver), guests (micro-guest builds), guestrun (one guest in-process), images (ext4
images), fake_driver (the native tier's fake guest driver and RAM), fake_native (a fake
of the C core's VM: the control plane's unit tests, no KVM).  Fixtures stay in
conftest.py files; plain helpers live here, so no test module imports another.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "build" / "guest"          # the guest kernel and images (`make guest`)
MICROGUEST_DIR = REPO / "build" / "guests"    # the micro-guests (tests/guests/build.py)
PVM_MODULE = Path("/sys/module/kvm_pvm")

HANG_S = 30.0        # RPCs and daemon start-up: nothing should take more than a second or two
GUEST_HANG_S = 60.0  # waits on what guests do (console output, frames, state changes)


def is_pvm_host() -> bool:
    """Whether this host's /dev/kvm is PVM (guest kernel code emulated, no Linux user space)."""
    return PVM_MODULE.exists()


ON_PVM = is_pvm_host()


def wait_until(check: Callable[[], bool], what: str, timeout: float = GUEST_HANG_S) -> None:
    """Poll check() until it holds; a hang fails the test."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {timeout}s")
        time.sleep(0.05)
