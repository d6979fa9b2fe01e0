"""Per-clone network identity through the API: a restored or cloned VM's
interface gets the MAC its override gives (or one generated for its new id
with "auto"), and taps are created in or taken from named network
namespaces (CreateVm, RestoreVm, CloneVm).  A tap the daemon made in a
namespace is there and nowhere else, and gone after DeleteVm; every bad
MAC or namespace is refused naming the client's field, with no VM and no
tap left in any namespace.  The daemon runs in the machine's namespace;
every tap lives in the tests' own namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.framework import HANG_S
from tests.framework.netns import NetNs
from tests.framework.rpc import config, list_ids, rpc_error
from tests.framework.strategies import NETNS_BAD, NETNS_MISSING, bad_macs, unicast_macs
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc
from vmmd.vm.devices.net import format_mac, generated_mac

Stub = vmm_pb2_grpc.VmServiceStub
SNAP_MAC = "02:00:00:00:0a:01"
EXAMPLES = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNs]:
    with NetNs() as ns:
        ns.add_tap("tap0")
        yield ns


@pytest.fixture(scope="module")
def ns2() -> Iterator[NetNs]:
    with NetNs() as ns:
        yield ns


@pytest.fixture(scope="module")
def snap(session_stub: Stub, microguests: dict[str, Path], ns: NetNs,
         tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of a paused micro-guest whose eth0 (SNAP_MAC) sat on a tap
    the daemon created in `ns` (gone with the VM)."""
    d = tmp_path_factory.mktemp("netid") / "snap"
    stub = session_stub
    stub.CreateVm(pb.CreateVmRequest(vm_id="netid-src", config=config(
        str(microguests["64"]), memory_mib=32, network_interfaces=[pb.NetworkInterface(
            iface_id="eth0", host_dev_name="snap0", guest_mac=SNAP_MAC, create_tap=True,
            netns=ns.name)])), timeout=HANG_S)
    try:
        stub.StartVm(pb.StartVmRequest(vm_id="netid-src"), timeout=HANG_S)
        stub.PauseVm(pb.PauseVmRequest(vm_id="netid-src"), timeout=HANG_S)
        stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="netid-src", snapshot_dir=str(d)),
                        timeout=HANG_S)
    finally:
        stub.DeleteVm(pb.DeleteVmRequest(vm_id="netid-src"), timeout=HANG_S)
    assert "snap0" not in ns.links()
    return d


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True,
                         text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def iface(iface_id: str = "eth0", tap: str = "", mac: str = "", netns: str = "",
          create: bool = False) -> pb.InterfaceOverride:
    return pb.InterfaceOverride(iface_id=iface_id, host_dev_name=tap, guest_mac=mac,
                                netns=netns, create_tap=create)


def nets(*o: pb.InterfaceOverride) -> pb.DeviceOverrides:
    return pb.DeviceOverrides(network_interfaces=list(o))


def clone(stub: Stub, snap: Path, *per_clone: pb.DeviceOverrides, prefix: str = "c",
          cell: str = "") -> list[pb.Vm]:
    return list(stub.CloneVm(pb.CloneVmRequest(snapshot_dir=str(snap), count=len(per_clone),
                                               id_prefix=prefix, overrides=list(per_clone),
                                               cell=cell), timeout=HANG_S).vms)


def macs(vms: list[pb.Vm]) -> list[str]:
    return [vm.config.network_interfaces[0].guest_mac for vm in vms]


# ---- namespaces ----
def test_created_tap_lives_in_its_namespace_until_delete(stub: Stub, kernel: str,
                                                         ns: NetNs) -> None:
    vm = stub.CreateVm(pb.CreateVmRequest(vm_id="n", config=config(
        kernel, network_interfaces=[pb.NetworkInterface(
            iface_id="eth0", host_dev_name="made0", create_tap=True, netns=ns.name)])),
        timeout=HANG_S)
    assert vm.config.network_interfaces[0].netns == ns.name
    assert "made0" in ns.links() and "made0" not in root_links()
    assert "UP" in ns.ip("link", "show", "made0")
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="n"), timeout=HANG_S)
    assert "made0" not in ns.links() and "made0" not in root_links()


def test_an_existing_tap_in_a_namespace_is_attached_and_stays(stub: Stub, kernel: str,
                                                              ns: NetNs) -> None:
    stub.CreateVm(pb.CreateVmRequest(vm_id="a", config=config(
        kernel, network_interfaces=[pb.NetworkInterface(
            iface_id="eth0", host_dev_name="tap0", netns=ns.name)])), timeout=HANG_S)
    err = rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id="b", config=config(
        kernel, network_interfaces=[pb.NetworkInterface(
            iface_id="eth0", host_dev_name="tap0", netns=ns.name)])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("config.network_interfaces[0].host_dev_name: tap tap0 is attached "
                             "to another VM or process")
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="a"), timeout=HANG_S)
    assert "tap0" in ns.links()  # the user's persistent tap stays


def test_one_tap_name_in_two_namespaces(stub: Stub, kernel: str, ns: NetNs, ns2: NetNs) -> None:
    vm = stub.CreateVm(pb.CreateVmRequest(vm_id="two", config=config(
        kernel, network_interfaces=[
            pb.NetworkInterface(iface_id="a", host_dev_name="same0", create_tap=True,
                                netns=ns.name),
            pb.NetworkInterface(iface_id="b", host_dev_name="same0", create_tap=True,
                                netns=ns2.name)])), timeout=HANG_S)
    assert [n.netns for n in vm.config.network_interfaces] == [ns.name, ns2.name]
    assert "same0" in ns.links() and "same0" in ns2.links() and "same0" not in root_links()
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="two"), timeout=HANG_S)
    assert "same0" not in ns.links() | ns2.links()


@pytest.mark.parametrize("cell", ["", "netpool"])
def test_clones_each_in_a_namespace_of_their_own(stub: Stub, snap: Path, ns: NetNs, ns2: NetNs,
                                                 cell: str) -> None:
    """The clone pattern: the same tap name (and the snapshot's MAC and guest
    IP) in one namespace per clone; in cells of their own or one shared cell
    (whose worker lives on after DeleteVm: it must have closed the taps)."""
    vms = clone(stub, snap, *(nets(iface(tap="tap9", netns=n.name, create=True))
                              for n in (ns, ns2)), cell=cell)
    assert macs(vms) == [SNAP_MAC, SNAP_MAC]
    assert [vm.config.network_interfaces[0].netns for vm in vms] == [ns.name, ns2.name]
    assert "tap9" in ns.links() and "tap9" in ns2.links() and "tap9" not in root_links()
    stub.DeleteVm(pb.DeleteVmRequest(vm_id=vms[0].vm_id), timeout=HANG_S)
    assert "tap9" not in ns.links() and "tap9" in ns2.links()
    stub.DeleteVm(pb.DeleteVmRequest(vm_id=vms[1].vm_id), timeout=HANG_S)
    assert "tap9" not in ns.links() | ns2.links()


def test_a_restore_without_overrides_reopens_in_the_saved_namespace(stub: Stub, snap: Path,
                                                                    ns: NetNs) -> None:
    # The snapshot's tap was the daemon's (gone): a persistent one of that name in that
    # namespace takes the restored VM.
    ns.add_tap("snap0")
    try:
        vm = stub.RestoreVm(pb.RestoreVmRequest(snapshot_dir=str(snap), vm_id="r"),
                            timeout=HANG_S)
        n = vm.config.network_interfaces[0]
        assert (n.host_dev_name, n.netns, n.guest_mac) == ("snap0", ns.name, SNAP_MAC)
    finally:
        stub.DeleteVm(pb.DeleteVmRequest(vm_id="r"), timeout=HANG_S)
        ns.ip("link", "delete", "snap0")


def test_a_namespaced_tap_reports_its_own_drops(stub: Stub, snap: Path, ns: NetNs) -> None:
    """rx_dropped is the tap's own tx_dropped, read in its namespace (the daemon's
    sysfs cannot see it, and a tap of the same name there is another one): a
    paused VM takes no frames, so the tap's queue fills and drops."""
    tap = f"dr{uuid.uuid4().hex[:8]}"
    # A decoy of the same name in the daemon's namespace (down, no address), which drops nothing.
    subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap"], check=True)
    try:
        stub.RestoreVm(pb.RestoreVmRequest(snapshot_dir=str(snap), vm_id="d", overrides=nets(
            iface(tap=tap, netns=ns.name, create=True))), timeout=HANG_S)
        sock = ns.packet_socket(tap)
        frame = bytes.fromhex(SNAP_MAC.replace(":", "")) + bytes(6) + b"\x88\xb5" + bytes(46)
        for _ in range(1500):
            sock.send(frame)
        sock.close()
        stats = json.loads(ns.ip("-j", "-s", "link", "show", tap))[0]["stats64"]
        dropped = stats["tx"]["dropped"]
        assert dropped > 0
        vm = stub.GetVm(pb.GetVmRequest(vm_id="d"), timeout=HANG_S)
        assert vm.counters.interfaces[0].rx_dropped == dropped
    finally:
        subprocess.run(["ip", "link", "delete", tap], check=False)


# ---- MACs ----
@EXAMPLES
@given(st.lists(unicast_macs(), min_size=2, max_size=3, unique_by=lambda m: m.lower()))
def test_each_clone_reports_the_mac_its_override_gives(stub: Stub, snap: Path, ns: NetNs,
                                                       given_macs: list[str]) -> None:
    vms = clone(stub, snap, *(nets(iface(tap=f"m{k}", netns=ns.name, create=True, mac=m))
                              for k, m in enumerate(given_macs)))
    try:
        assert macs(vms) == [m.lower() for m in given_macs]
        got = [stub.GetVm(pb.GetVmRequest(vm_id=vm.vm_id), timeout=HANG_S) for vm in vms]
        assert macs(got) == [m.lower() for m in given_macs]
    finally:
        for vm in vms:
            stub.DeleteVm(pb.DeleteVmRequest(vm_id=vm.vm_id), timeout=HANG_S)


def test_auto_gives_every_clone_its_own_stable_mac(stub: Stub, snap: Path, ns: NetNs) -> None:
    def run() -> list[str]:
        vms = clone(stub, snap, *(nets(iface(tap=f"a{k}", netns=ns.name, create=True,
                                             mac="auto")) for k in range(3)), prefix="auto")
        for vm in vms:
            stub.DeleteVm(pb.DeleteVmRequest(vm_id=vm.vm_id), timeout=HANG_S)
        return macs(vms)

    first = run()
    assert first == [format_mac(generated_mac(f"auto-{k}", "eth0")) for k in range(3)]
    assert len(set(first)) == 3 and SNAP_MAC not in first
    assert run() == first  # the same ids: the same MACs


def test_a_mac_override_alone_keeps_the_snapshot_tap(stub: Stub, snap: Path, ns: NetNs) -> None:
    ns.add_tap("snap0")
    try:
        vm = stub.RestoreVm(pb.RestoreVmRequest(snapshot_dir=str(snap), vm_id="r", overrides=nets(
            iface(mac="02:00:00:00:0b:01"))), timeout=HANG_S)
        n = vm.config.network_interfaces[0]
        assert (n.host_dev_name, n.netns, n.guest_mac) == ("snap0", ns.name, "02:00:00:00:0b:01")
    finally:
        stub.DeleteVm(pb.DeleteVmRequest(vm_id="r"), timeout=HANG_S)
        ns.ip("link", "delete", "snap0")


# ---- refusals: status, the field, nothing left behind ----
def assert_refused(err: grpc.RpcError, field: str, says: str) -> None:
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}: "), details
    assert says in details, details
    assert len(details) < 400, details  # a long value is shown shortened


def refuse_restore_and_clone(stub: Stub, snap: Path, spaces: list[NetNs],
                             bad: pb.InterfaceOverride, field: str, says: str) -> None:
    """RestoreVm with the bad override, then CloneVm with a good clone 0 (a tap it
    creates) and the bad override for clone 1: refused, naming the field, with
    no VM and no tap anywhere afterwards."""
    before = [root_links(), *(n.links() for n in spaces)]
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(snap), vm_id="r",
                                                        overrides=nets(bad)))
    assert_refused(err, f"overrides.network_interfaces[0].{field}", says)
    good = nets(iface(tap="good0", netns=spaces[0].name, create=True, mac="auto"))
    err = rpc_error(stub.CloneVm, pb.CloneVmRequest(snapshot_dir=str(snap), count=2,
                                                    id_prefix="c", overrides=[good, nets(bad)]))
    assert_refused(err, f"overrides[1].network_interfaces[0].{field}", says)
    assert list_ids(stub) == []
    assert [root_links(), *(n.links() for n in spaces)] == before
    assert stub.RestoreVm(pb.RestoreVmRequest(snapshot_dir=str(snap), vm_id="r", overrides=good),
                          timeout=HANG_S).vm_id == "r"  # the id was not kept
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="r"), timeout=HANG_S)


@EXAMPLES
@given(bad_macs())
def test_bad_macs_are_refused(stub: Stub, snap: Path, ns: NetNs, mac: str) -> None:
    refuse_restore_and_clone(stub, snap, [ns], iface(tap="bad0", netns=ns.name, create=True,
                                                     mac=mac), "guest_mac", "")


@pytest.fixture()
def planted() -> Iterator[dict[str, str]]:
    """Files under /run/netns that are not network namespaces: a regular file, a
    symlink to a namespace, a FIFO (opened without blocking)."""
    names = {k: f"vmmdt-{k}-{uuid.uuid4().hex[:6]}" for k in ("file", "link", "fifo")}
    os.makedirs("/run/netns", exist_ok=True)
    Path("/run/netns", names["file"]).write_text("not a namespace\n")
    os.symlink("/proc/self/ns/net", f"/run/netns/{names['link']}")
    os.mkfifo(f"/run/netns/{names['fifo']}")
    yield names
    for n in names.values():
        os.unlink(f"/run/netns/{n}")


def test_bad_namespaces_are_refused(stub: Stub, snap: Path, ns: NetNs,
                                    planted: dict[str, str]) -> None:
    cases = [(n, "netns", "there is no network namespace" if n in NETNS_MISSING
              else "is not a network namespace name" if len(n) <= 255 and n != "ns\0"
              else "") for n in NETNS_BAD]
    cases += [(planted["file"], "netns", "is not a network namespace"),
              (planted["fifo"], "netns", "is not a network namespace"),
              (planted["link"], "netns", "is a symbolic link, not a network namespace")]
    for name, field, says in cases:
        refuse_restore_and_clone(stub, snap, [ns], iface(tap="bad0", netns=name, create=True),
                                 field, says)


def test_a_namespace_needs_a_tap_name(stub: Stub, snap: Path, ns: NetNs) -> None:
    refuse_restore_and_clone(stub, snap, [ns], iface(netns=ns.name), "host_dev_name",
                             "is required")


def test_a_tap_missing_in_the_namespace_is_refused(stub: Stub, snap: Path, ns: NetNs) -> None:
    refuse_restore_and_clone(stub, snap, [ns], iface(tap="nosuch0", netns=ns.name),
                             "host_dev_name", "there is no tap device nosuch0")


def test_create_vm_names_the_netns_field(stub: Stub, kernel: str, ns: NetNs) -> None:
    before = ns.links()
    for name, says in (("nosuch-ns", "there is no network namespace 'nosuch-ns'"),
                       ("../x", "is not a network namespace name")):
        err = rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id="x", config=config(
            kernel, network_interfaces=[
                pb.NetworkInterface(iface_id="ok", host_dev_name="ok0", create_tap=True,
                                    netns=ns.name),
                pb.NetworkInterface(iface_id="e", host_dev_name="t0", netns=name)])))
        assert_refused(err, "config.network_interfaces[1].netns", says)
    assert list_ids(stub) == [] and ns.links() == before
