"""Drives through the API: attached in order, announced on the command line,
and every bad drive refused naming the client's field, with nothing created."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.framework.rpc import config, list_ids, rpc_error
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("a", "b"):
        out[name] = tmp_path / f"{name}.img"
        with out[name].open("wb") as f:
            f.truncate(1 << 20)
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"\0" * 4096)
    ro.chmod(0o444)
    out["ro"] = ro
    (tmp_path / "tiny.img").write_bytes(b"x")
    out["tiny"] = tmp_path / "tiny.img"
    out["dir"] = tmp_path
    out["missing"] = tmp_path / "nope.img"
    return out


def drive(i: str, path: Path, ro: bool = False, root: bool = False) -> pb.Drive:
    return pb.Drive(drive_id=i, path_on_host=str(path), read_only=ro, is_root_device=root)


def test_drives_are_announced_and_reported(stub: vmm_pb2_grpc.VmServiceStub, kernel: str,
                                           images: dict[str, Path]) -> None:
    vm = stub.CreateVm(pb.CreateVmRequest(vm_id="d", config=config(
        kernel, drives=[drive("root", images["a"], root=True), drive("data", images["b"], ro=True)])))
    assert vm.cmdline.split()[-4:] == ["virtio_mmio.device=4K@0xd0000000:5",
                                       "virtio_mmio.device=4K@0xd0001000:6",
                                       "root=/dev/vda", "rw"]
    assert [d.drive_id for d in vm.config.drives] == ["root", "data"]
    assert [d.device_id for d in vm.counters.devices] == ["root", "data"]
    assert vm.config.drives[1].read_only


def test_root_word_not_added_when_cmdline_has_root(stub: vmm_pb2_grpc.VmServiceStub, kernel: str,
                                                    images: dict[str, Path]) -> None:
    vm = stub.CreateVm(pb.CreateVmRequest(vm_id="d", config=config(
        kernel, "mg=spin root=/dev/vdb", drives=[drive("r", images["a"], root=True)])))
    assert vm.cmdline.split().count("root=/dev/vdb") == 1
    assert "root=/dev/vda" not in vm.cmdline


BAD: list[tuple[str, Callable[[dict[str, Path]], list[pb.Drive]], str, str]] = [
    ("missing", lambda im: [drive("a", im["missing"])], "config.drives[0].path_on_host",
     "No such file"),
    ("directory", lambda im: [drive("a", im["dir"])], "config.drives[0].path_on_host",
     "Is a directory"),
    ("too-small", lambda im: [drive("a", im["tiny"])], "config.drives[0].path_on_host",
     "smaller than one 512-byte sector"),
    ("read-only-file-as-writable", lambda im: [drive("a", im["ro"])],
     "config.drives[0].path_on_host", "is a read-only file"),
    ("duplicate-id", lambda im: [drive("a", im["a"]), drive("a", im["b"])],
     "config.drives[1].drive_id", "used twice"),
    ("empty-id", lambda im: [drive("", im["a"])], "config.drives[0].drive_id", "is required"),
    ("two-roots", lambda im: [drive("a", im["a"], root=True), drive("b", im["b"], root=True)],
     "config.drives[1].is_root_device", "only one drive"),
    ("same-image-twice-writable", lambda im: [drive("a", im["a"]), drive("b", im["a"])],
     "config.drives[1].path_on_host", "in use by another VM"),
]


@pytest.mark.parametrize(("name", "drives", "field", "says"), BAD, ids=[b[0] for b in BAD])
def test_bad_drives_are_refused(stub: vmm_pb2_grpc.VmServiceStub, kernel: str,
                                images: dict[str, Path], name: str,
                                drives: Callable[[dict[str, Path]], list[pb.Drive]],
                                field: str, says: str) -> None:
    err = rpc_error(stub.CreateVm, pb.CreateVmRequest(
        vm_id="bad", config=config(kernel, drives=drives(images))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: "), err.details()
    assert says in err.details()
    assert list_ids(stub) == []


def test_writable_drive_is_exclusive_until_its_vm_is_deleted(
        stub: vmm_pb2_grpc.VmServiceStub, kernel: str, images: dict[str, Path]) -> None:
    stub.CreateVm(pb.CreateVmRequest(vm_id="one", config=config(
        kernel, drives=[drive("a", images["a"])])))
    err = rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id="two", config=config(
        kernel, drives=[drive("a", images["a"], ro=True)])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "in use by another VM" in err.details()
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="one"))
    stub.CreateVm(pb.CreateVmRequest(vm_id="two", config=config(
        kernel, drives=[drive("a", images["a"])])))
    assert list_ids(stub) == ["two"]


def test_read_only_drives_can_be_shared(stub: vmm_pb2_grpc.VmServiceStub, kernel: str,
                                        images: dict[str, Path]) -> None:
    for vm_id in ("one", "two"):
        stub.CreateVm(pb.CreateVmRequest(vm_id=vm_id, config=config(
            kernel, drives=[drive("a", images["b"], ro=True)])))
    assert list_ids(stub) == ["one", "two"]
    assert os.path.getsize(images["b"]) == 1 << 20
