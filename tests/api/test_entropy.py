"""The entropy device through the API: asked for in VmConfig.entropy, it is
announced on the command line after the other devices, shown by GetVm and
ListVms, kept by a snapshot and its restore; a bad field is refused naming
it, with nothing created."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.framework import HANG_S
from tests.framework.rpc import config, list_ids, rpc_error
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc


def test_the_device_is_announced_and_shown(stub: vmm_pb2_grpc.VmServiceStub,
                                           create: Callable[..., pb.Vm], tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    vm = create(vm_id="e", drives=[pb.Drive(drive_id="d", path_on_host=str(img))],
                entropy=pb.EntropyDevice(max_request_bytes=4096))
    assert vm.cmdline.split()[-2:] == ["virtio_mmio.device=4K@0xd0000000:5",
                                       "virtio_mmio.device=4K@0xd0001000:6"]
    assert vm.config.HasField("entropy") and vm.config.entropy.max_request_bytes == 4096
    assert vm.counters.entropy.device_id == "entropy"
    assert [d.device_id for d in vm.counters.devices] == ["d"]  # drives only, as before
    listed = stub.ListVms(pb.ListVmsRequest(), timeout=HANG_S).vms
    assert [v.config.entropy.max_request_bytes for v in listed if v.vm_id == "e"] == [4096]
    plain = create(vm_id="plain")
    assert not plain.config.HasField("entropy") and not plain.counters.HasField("entropy")
    assert "virtio_mmio.device" not in plain.cmdline


def test_a_snapshot_keeps_the_device(stub: vmm_pb2_grpc.VmServiceStub,
                                     create: Callable[..., pb.Vm], tmp_path: Path) -> None:
    create(vm_id="src", entropy=pb.EntropyDevice())
    stub.StartVm(pb.StartVmRequest(vm_id="src"), timeout=HANG_S)
    stub.PauseVm(pb.PauseVmRequest(vm_id="src"), timeout=HANG_S)
    snap = str(tmp_path / "s")
    stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="src", snapshot_dir=snap), timeout=HANG_S)
    vm = stub.RestoreVm(pb.RestoreVmRequest(snapshot_dir=snap, vm_id="copy", resume=True),
                        timeout=HANG_S)
    assert vm.config.HasField("entropy") and vm.config.entropy.max_request_bytes == 0
    assert vm.cmdline.split()[-1] == "virtio_mmio.device=4K@0xd0000000:5"
    assert vm.state == pb.VM_STATE_RUNNING


@pytest.mark.parametrize("value", [65537, 1 << 20, 2**32 - 1])
def test_a_bad_request_bound_is_refused(stub: vmm_pb2_grpc.VmServiceStub, kernel: str,
                                        value: int) -> None:
    err = rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id="bad", config=config(
        kernel, entropy=pb.EntropyDevice(max_request_bytes=value))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (f"config.entropy.max_request_bytes: {value} is outside 1..65536 "
                             "(0: 65536)")
    assert list_ids(stub) == []
