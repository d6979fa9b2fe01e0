"""Fixtures shared by every test tier.

Tiers: unit/ (pure Python), native/ (C core through cffi on fake guest
memory), api/ (a real daemon; arrives with the daemon issue), kvm/ (real
guests).  KVM tests skip only when /dev/kvm cannot create a VM, and say why.
What tests and benchmarks share beyond fixtures is tests/framework/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.framework import GUEST_DIR, REPO, is_pvm_host
from tests.framework.daemon import DAEMONS, report_logs
from tests.framework.guests import build_microguests

FIRST_DAEMON = pytest.StashKey[int]()  # index in DAEMONS of the first one a test started


def _kvm_problem() -> str | None:
    """Why real guests cannot run here, or None when they can."""
    try:
        from vmmd.native import NativeVm
    except ImportError as e:  # the C core is not built
        return f"C core not importable: {e}"
    try:
        NativeVm().close()
    except Exception as e:  # noqa: BLE001 - any failure means no KVM
        return f"/dev/kvm cannot create a VM: {e}"
    return None


KVM_PROBLEM = _kvm_problem()


def pytest_report_header(config: pytest.Config) -> str:
    platform = "PVM" if is_pvm_host() else "hardware KVM"
    if KVM_PROBLEM:
        return f"vmmd: KVM tests SKIPPED: {KVM_PROBLEM}"
    return f"vmmd: KVM tests run for real ({platform})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kvm_dir = REPO / "tests" / "kvm"
    skip = pytest.mark.skip(reason=KVM_PROBLEM or "")
    for item in items:
        if kvm_dir in Path(item.fspath).parents:
            item.add_marker(pytest.mark.kvm)
        if KVM_PROBLEM and "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _mark_daemons(request: pytest.FixtureRequest) -> None:
    request.node.stash[FIRST_DAEMON] = len(DAEMONS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failing test's report shows the log of every daemon it could have talked to."""
    report = yield
    if report.failed:
        report.sections += report_logs(item.stash.get(FIRST_DAEMON, len(DAEMONS)), item.nodeid)
    return report


@pytest.fixture(scope="session")
def microguests() -> dict[str, Path]:
    """Paths of the micro-guest ELF files: {"pvh": ..., "64": ...}."""
    return build_microguests()


@pytest.fixture(scope="session")
def guest_artifacts() -> dict[str, Path]:
    """The built guest kernel and images (`make guest`); a test needing them fails if absent."""
    paths = {name: GUEST_DIR / name for name in
             ("vmlinux", "bzImage", "initramfs.cpio.gz", "rootfs.ext4")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        pytest.fail(f"guest artifacts missing (run `make guest`): {', '.join(missing)}")
    return paths
