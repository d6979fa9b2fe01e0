"""virtio-vsock through the API (a micro-guest that does not drive it): the
device announced and reported, the socket made and removed with the VM, and
every bad vsock refused naming the client's field, with nothing left behind
(no VM, no socket file); restore and clone overrides."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc
import pytest

from tests.framework import HANG_S
from tests.framework.rpc import config, list_ids, rpc_error
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

Stub = vmm_pb2_grpc.VmServiceStub


def create(stub: Stub, kernel: str, vm_id: str, cid: int, path: str) -> pb.Vm:
    return stub.CreateVm(pb.CreateVmRequest(vm_id=vm_id, config=config(
        kernel, vsock=pb.Vsock(guest_cid=cid, uds_path=path))), timeout=HANG_S)


def test_vsock_is_announced_and_its_socket_lives_with_the_vm(stub: Stub, kernel: str,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "v.sock"
    vm = create(stub, kernel, "v", 3, str(path))
    assert vm.cmdline.split()[-1] == "virtio_mmio.device=4K@0xd0000000:5"
    assert (vm.config.vsock.guest_cid, vm.config.vsock.uds_path) == (3, str(path))
    assert path.is_socket()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(str(path))  # someone listens
    assert vm.counters.HasField("vsock") and vm.counters.vsock.connections == 0
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="v"), timeout=HANG_S)
    assert not path.exists()


def test_a_context_id_takes_one_vm_until_that_vm_is_deleted(stub: Stub, kernel: str,
                                                            tmp_path: Path) -> None:
    create(stub, kernel, "one", 7, str(tmp_path / "a.sock"))
    err = rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id="two", config=config(
        kernel, vsock=pb.Vsock(guest_cid=7, uds_path=str(tmp_path / "b.sock")))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "config.vsock.guest_cid: context id 7 is VM 'one''s already"
    assert not (tmp_path / "b.sock").exists()
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="one"), timeout=HANG_S)
    create(stub, kernel, "two", 7, str(tmp_path / "b.sock"))
    assert list_ids(stub) == ["two"]


def test_a_socket_path_takes_one_vm(stub: Stub, kernel: str, tmp_path: Path) -> None:
    create(stub, kernel, "one", 8, str(tmp_path / "a.sock"))
    err = rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id="two", config=config(
        kernel, vsock=pb.Vsock(guest_cid=9, uds_path=str(tmp_path / "a.sock")))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("config.vsock.uds_path: ")
    assert "exists already" in err.details()
    assert (tmp_path / "a.sock").is_socket()  # the first VM's socket stays
    assert list_ids(stub) == ["one"]


G = "config.vsock.guest_cid"
U = "config.vsock.uds_path"


def _bad_cases(d: Path) -> list[tuple[str, int, str, str, str]]:
    return [
        ("cid-0", 0, str(d / "s"), G, "is outside 3..4294967294"),
        ("cid-1", 1, str(d / "s"), G, "is outside"),
        ("cid-2", 2, str(d / "s"), G, "is outside"),
        ("cid-any", 0xFFFF_FFFF, str(d / "s"), G, "is outside"),
        ("cid-64bit", 1 << 40, str(d / "s"), G, "is outside"),
        ("empty-path", 3, "", U, "is required"),
        ("relative-path", 3, "v.sock", U, "is not an absolute path"),
        ("nul", 3, str(d / "a\0b"), U, "NUL"),
        ("too-long", 3, "/" + "x" * 107, U, "at most 107"),
        ("name-too-long", 3, "/" + "n" * 97, U, "at most 96"),
        ("no-directory", 3, str(d / "nosuch" / "v.sock"), U, "does not exist"),
        ("file-as-directory", 3, str(d / "file" / "v.sock"), U, "is not a directory"),
        ("symlinked-directory", 3, str(d / "link" / "v.sock"), U, "symbolic link"),
        ("existing-file", 3, str(d / "file"), U, "exists already"),
        ("directory-itself", 3, str(d) + "/", U, "does not name a file"),
    ]


CASE_IDS = [c[0] for c in _bad_cases(Path("/x"))]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_vsock_is_refused(stub: Stub, kernel: str, tmp_path: Path, case: str) -> None:
    (tmp_path / "file").write_text("someone's")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _, cid, path, field, says = next(c for c in _bad_cases(tmp_path) if c[0] == case)
    before = sorted(os.listdir(tmp_path))
    err = rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id="bad", config=config(
        kernel, vsock=pb.Vsock(guest_cid=cid, uds_path=path))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: "), err.details()
    assert says in err.details(), err.details()
    assert list_ids(stub) == []
    assert sorted(os.listdir(tmp_path)) == before  # nothing made, nothing removed
    assert os.listdir(tmp_path / "real") == []
    assert (tmp_path / "file").read_text() == "someone's"


def test_refusal_after_the_socket_was_made_removes_it(stub: Stub, kernel: str,
                                                      tmp_path: Path) -> None:
    """The context id clash is found once the VM is built (ids are claimed
    then): the socket bound for it goes again."""
    create(stub, kernel, "one", 11, str(tmp_path / "a.sock"))
    rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id="two", config=config(
        kernel, vsock=pb.Vsock(guest_cid=11, uds_path=str(tmp_path / "b.sock")))))
    assert sorted(os.listdir(tmp_path)) == ["a.sock"]


# ---- snapshots: the overrides ----
def _snapshot(stub: Stub, kernel: str, tmp_path: Path, cid: int = 20) -> Path:
    create(stub, kernel, "orig", cid, str(tmp_path / "o.sock"))
    stub.StartVm(pb.StartVmRequest(vm_id="orig"), timeout=HANG_S)
    stub.PauseVm(pb.PauseVmRequest(vm_id="orig"), timeout=HANG_S)
    d = tmp_path / "snap"
    stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="orig", snapshot_dir=str(d)), timeout=HANG_S)
    return d


def test_restore_with_a_new_socket_and_id(stub: Stub, kernel: str, tmp_path: Path) -> None:
    d = _snapshot(stub, kernel, tmp_path)
    vm = stub.RestoreVm(pb.RestoreVmRequest(
        snapshot_dir=str(d), vm_id="r", overrides=pb.DeviceOverrides(
            vsock=pb.Vsock(guest_cid=21, uds_path=str(tmp_path / "r.sock")))), timeout=HANG_S)
    assert (vm.config.vsock.guest_cid, vm.config.vsock.uds_path) == (21, str(tmp_path / "r.sock"))
    assert (tmp_path / "r.sock").is_socket() and (tmp_path / "o.sock").is_socket()
    # the snapshot's own socket and id are the original's: refused while it lives
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(d), vm_id="r2"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("snapshot_dir: the snapshot's vsock device: ")
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(
        snapshot_dir=str(d), vm_id="r2", overrides=pb.DeviceOverrides(
            vsock=pb.Vsock(uds_path=str(tmp_path / "r2.sock")))))
    assert err.details() == "snapshot_dir: context id 20 is VM 'orig''s already"
    assert not (tmp_path / "r2.sock").exists()
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(
        snapshot_dir=str(d), vm_id="r2", overrides=pb.DeviceOverrides(
            vsock=pb.Vsock(guest_cid=2, uds_path=str(tmp_path / "r2.sock")))))
    assert err.details().startswith("overrides.vsock.guest_cid: 2 is outside")
    assert list_ids(stub) == ["orig", "r"]


def test_override_of_a_snapshot_without_vsock(stub: Stub, kernel: str, tmp_path: Path) -> None:
    stub.CreateVm(pb.CreateVmRequest(vm_id="plain", config=config(kernel)), timeout=HANG_S)
    stub.StartVm(pb.StartVmRequest(vm_id="plain"), timeout=HANG_S)
    stub.PauseVm(pb.PauseVmRequest(vm_id="plain"), timeout=HANG_S)
    d = tmp_path / "snap"
    stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="plain", snapshot_dir=str(d)), timeout=HANG_S)
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(
        snapshot_dir=str(d), vm_id="r", overrides=pb.DeviceOverrides(
            vsock=pb.Vsock(guest_cid=5, uds_path=str(tmp_path / "r.sock")))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "overrides.vsock: the snapshot has no vsock device"


def test_clones_need_a_socket_and_id_each(stub: Stub, kernel: str, tmp_path: Path) -> None:
    d = _snapshot(stub, kernel, tmp_path)
    stub.DeleteVm(pb.DeleteVmRequest(vm_id="orig"), timeout=HANG_S)
    assert not (tmp_path / "o.sock").exists()
    # without overrides the second clone clashes with the first: none is made
    err = rpc_error(stub.CloneVm, pb.CloneVmRequest(snapshot_dir=str(d), count=2, id_prefix="c"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list_ids(stub) == []
    assert not (tmp_path / "o.sock").exists()
    # the same id twice: refused at the clone's override
    same = [pb.DeviceOverrides(vsock=pb.Vsock(guest_cid=30, uds_path=str(tmp_path / f"c{k}.sock")))
            for k in range(2)]
    err = rpc_error(stub.CloneVm, pb.CloneVmRequest(snapshot_dir=str(d), count=2, id_prefix="c",
                                                    overrides=same))
    assert err.details() == "overrides[1].vsock.guest_cid: context id 30 is VM 'c-0''s already"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]
    each = [pb.DeviceOverrides(vsock=pb.Vsock(guest_cid=30 + k,
                                              uds_path=str(tmp_path / f"c{k}.sock")))
            for k in range(2)]
    vms = stub.CloneVm(pb.CloneVmRequest(snapshot_dir=str(d), count=2, id_prefix="c",
                                         overrides=each), timeout=HANG_S).vms
    assert [v.config.vsock.guest_cid for v in vms] == [30, 31]
    assert (tmp_path / "c0.sock").is_socket() and (tmp_path / "c1.sock").is_socket()
