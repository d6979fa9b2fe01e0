"""Network interfaces through the API, with a daemon inside a network
namespace of its own: interfaces announced and reported, MACs generated and
stable, taps created and removed by the daemon, and every bad interface
refused naming the client's field, with nothing created (no VM, no tap)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.framework import HANG_S
from tests.framework.daemon import QUICK_STOP, Daemon, running_daemon
from tests.framework.netns import NetNs
from tests.framework.rpc import config, list_ids, rpc_error
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

TAPS = ("tap0", "tap1", "busy0")


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNs]:
    with NetNs() as ns:
        for t in TAPS:
            ns.add_tap(t)
        ns.ip("link", "add", "br0", "type", "bridge")  # a device that is not a tap
        yield ns


@pytest.fixture(scope="module")
def ns_daemon(ns: NetNs) -> Iterator[Daemon]:
    with running_daemon(*QUICK_STOP, wrap=ns.exec_argv(), check_exit=True) as d:
        yield d


@pytest.fixture()
def nstub(ns_daemon: Daemon) -> Iterator[vmm_pb2_grpc.VmServiceStub]:
    stub = vmm_pb2_grpc.VmServiceStub(ns_daemon.channel())
    yield stub
    for vm in stub.ListVms(pb.ListVmsRequest(), timeout=HANG_S).vms:
        stub.DeleteVm(pb.DeleteVmRequest(vm_id=vm.vm_id), timeout=HANG_S)


def nic(iface: str, tap: str, mac: str = "", create: bool = False) -> pb.NetworkInterface:
    return pb.NetworkInterface(iface_id=iface, host_dev_name=tap, guest_mac=mac, create_tap=create)


def create(stub: vmm_pb2_grpc.VmServiceStub, kernel: str, vm_id: str,
           *nics: pb.NetworkInterface, drives: tuple[pb.Drive, ...] = ()) -> pb.Vm:
    return stub.CreateVm(pb.CreateVmRequest(vm_id=vm_id, config=config(
        kernel, network_interfaces=list(nics), drives=list(drives))), timeout=HANG_S)


def test_interfaces_follow_the_drives_and_are_reported(nstub: vmm_pb2_grpc.VmServiceStub,
                                                       kernel: str, tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    vm = create(nstub, kernel, "n", nic("eth0", "tap0", "02:00:00:00:00:01"), nic("eth1", "tap1"),
                drives=(pb.Drive(drive_id="d", path_on_host=str(img)),))
    assert vm.cmdline.split()[-3:] == ["virtio_mmio.device=4K@0xd0000000:5",
                                       "virtio_mmio.device=4K@0xd0001000:6",
                                       "virtio_mmio.device=4K@0xd0002000:7"]
    assert [(n.iface_id, n.host_dev_name) for n in vm.config.network_interfaces] == [
        ("eth0", "tap0"), ("eth1", "tap1")]
    assert vm.config.network_interfaces[0].guest_mac == "02:00:00:00:00:01"
    assert [c.iface_id for c in vm.counters.interfaces] == ["eth0", "eth1"]
    assert [d.device_id for d in vm.counters.devices] == ["d"]


def test_generated_mac_is_stable_per_vm_and_interface(nstub: vmm_pb2_grpc.VmServiceStub,
                                                      kernel: str) -> None:
    def mac(vm_id: str) -> str:
        vm = create(nstub, kernel, vm_id, nic("eth0", "tap0"))
        nstub.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=HANG_S)
        return vm.config.network_interfaces[0].guest_mac

    first = mac("stable")
    assert first == mac("stable")
    assert first != mac("other")
    octet = int(first.split(":")[0], 16)
    assert octet & 2 and not octet & 1  # locally administered, unicast


def test_daemon_creates_the_tap_and_removes_it_with_the_vm(nstub: vmm_pb2_grpc.VmServiceStub,
                                                           kernel: str, ns: NetNs) -> None:
    create(nstub, kernel, "c", nic("eth0", "made0", create=True))
    assert "made0" in ns.links()
    assert "UP" in ns.ip("link", "show", "made0")
    nstub.DeleteVm(pb.DeleteVmRequest(vm_id="c"), timeout=HANG_S)
    assert "made0" not in ns.links()


def test_a_tap_takes_one_vm_until_that_vm_is_deleted(nstub: vmm_pb2_grpc.VmServiceStub,
                                                     kernel: str) -> None:
    create(nstub, kernel, "one", nic("eth0", "busy0"))
    err = rpc_error(nstub.CreateVm, pb.CreateVmRequest(vm_id="two", config=config(
        kernel, network_interfaces=[nic("eth0", "busy0")])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("config.network_interfaces[0].host_dev_name: tap busy0 is "
                             "attached to another VM or process")
    nstub.DeleteVm(pb.DeleteVmRequest(vm_id="one"), timeout=HANG_S)
    create(nstub, kernel, "two", nic("eth0", "busy0"))
    assert list_ids(nstub) == ["two"]


F = "config.network_interfaces"
BAD: list[tuple[str, list[pb.NetworkInterface], str, str]] = [
    ("missing-tap", [nic("e", "nosuch0")], f"{F}[0].host_dev_name", "there is no tap device nosuch0"),
    ("not-a-tap", [nic("e", "br0")], f"{F}[0].host_dev_name", "br0 is not a tap device"),
    ("create-existing", [nic("e", "tap0", create=True)], f"{F}[0].host_dev_name",
     "tap0 exists already"),
    ("empty-tap", [nic("e", "")], f"{F}[0].host_dev_name", "is required"),
    ("long-tap-name", [nic("e", "x" * 16)], f"{F}[0].host_dev_name", "is not a network device name"),
    ("slash-in-tap-name", [nic("e", "a/b")], f"{F}[0].host_dev_name",
     "is not a network device name"),
    ("same-tap-twice", [nic("a", "tap0"), nic("b", "tap0")], f"{F}[1].host_dev_name",
     "is used by network_interfaces[0] already"),
    ("malformed-mac", [nic("e", "tap0", "02:00:00:00:00")], f"{F}[0].guest_mac",
     "is not a MAC address"),
    ("non-hex-mac", [nic("e", "tap0", "02:00:00:00:00:zz")], f"{F}[0].guest_mac",
     "is not a MAC address"),
    ("multicast-mac", [nic("e", "tap0", "01:00:5e:00:00:01")], f"{F}[0].guest_mac",
     "multicast"),
    ("zero-mac", [nic("e", "tap0", "00:00:00:00:00:00")], f"{F}[0].guest_mac",
     "not a usable address"),
    ("same-mac-twice", [nic("a", "tap0", "02:00:00:00:00:01"), nic("b", "tap1", "02:00:00:00:00:01")],
     f"{F}[1].guest_mac", "is the address of network_interfaces[0] too"),
    ("duplicate-id", [nic("a", "tap0"), nic("a", "tap1")], f"{F}[1].iface_id", "used twice"),
    ("empty-id", [nic("", "tap0")], f"{F}[0].iface_id", "is required"),
    ("bad-id", [nic("-x", "tap0")], f"{F}[0].iface_id", "must be 1-64 characters"),
]


@pytest.mark.parametrize(("name", "nics", "field", "says"), BAD, ids=[b[0] for b in BAD])
def test_bad_interfaces_are_refused(nstub: vmm_pb2_grpc.VmServiceStub, kernel: str, ns: NetNs,
                                    name: str, nics: list[pb.NetworkInterface], field: str,
                                    says: str) -> None:
    links = ns.links()
    # a valid interface first (a created tap) shows the refusal undoes what was opened
    good = [nic("ok", "made1", create=True)] if name not in ("create-existing",) else []
    err = rpc_error(nstub.CreateVm, pb.CreateVmRequest(vm_id="bad", config=config(
        kernel, network_interfaces=good + nics)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    if good:  # the interface under test moved one down
        field = field.replace("[1]", "[2]").replace("[0]", "[1]")
        says = says.replace("interfaces[0]", "interfaces[1]")
    assert err.details().startswith(f"{field}: "), err.details()
    assert says in err.details(), err.details()
    assert list_ids(nstub) == []
    assert ns.links() == links  # no tap left behind (made1 was closed again)


def test_too_many_devices(nstub: vmm_pb2_grpc.VmServiceStub, kernel: str) -> None:
    nics = [nic(f"e{i}", f"t{i}", create=True) for i in range(20)]
    err = rpc_error(nstub.CreateVm, pb.CreateVmRequest(vm_id="many", config=config(
        kernel, network_interfaces=nics)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "config.network_interfaces: at most 19 devices fit this VM"
    assert list_ids(nstub) == []
