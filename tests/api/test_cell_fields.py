"""Cells through a real daemon: VmConfig.cell/limits and RestoreVm's and CloneVm's.

Every bad name or limit is INVALID_ARGUMENT with the message naming the request's own field
(`config.cell`, `config.limits.cpu`; `cell`, `limits.pids` on RestoreVm and CloneVm), refused
before anything is opened or made: the snapshot directory named beside a bad value need not
exist, and no VM is left.  Good values are taken, and GetVm/ListVms give them back in the
config; a snapshot does not carry them (they say where a VM runs, not what it is).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.framework import HANG_S
from tests.framework.rpc import config, list_ids, rpc_error
from tests.framework.strategies import BAD_CELLS, BAD_LIMIT_IDS, BAD_LIMITS
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

Stub = vmm_pb2_grpc.VmServiceStub
MEM_MIB = 32
NO_SNAPSHOT = "/nonexistent/snapshot"  # never opened: the cell fields are refused first

GOOD_LIMITS = pb.CellLimits(cpu=0.5, memory_mib=256, pids=64)

# RPC -> its request (kernel, cell, limits), otherwise good; and the prefix its errors carry
REQUESTS: dict[str, Callable[[str, str, pb.CellLimits | None], object]] = {
    "CreateVm": lambda kernel, cell, limits: pb.CreateVmRequest(
        vm_id="v", config=config(kernel, memory_mib=MEM_MIB, cell=cell, limits=limits)),
    "RestoreVm": lambda _, cell, limits: pb.RestoreVmRequest(
        snapshot_dir=NO_SNAPSHOT, vm_id="r", cell=cell, limits=limits),
    "CloneVm": lambda _, cell, limits: pb.CloneVmRequest(
        snapshot_dir=NO_SNAPSHOT, count=2, id_prefix="c", cell=cell, limits=limits),
}
PREFIX = {"CreateVm": "config.", "RestoreVm": "", "CloneVm": ""}


def refused(stub: Stub, rpc: str, request: object, field: str, says: str) -> None:
    err = rpc_error(getattr(stub, rpc), request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code()}: {err.details()}"
    assert err.details().startswith(f"{field}: "), err.details()
    assert says in err.details(), err.details()
    assert len(err.details()) <= 1024  # a huge name is echoed shortened
    assert list_ids(stub) == []


@pytest.mark.parametrize("rpc", REQUESTS)
@pytest.mark.parametrize("cell", BAD_CELLS, ids=range(len(BAD_CELLS)))
def test_a_bad_cell_name_is_invalid_argument_at_cell(stub: Stub, kernel: str, rpc: str,
                                                     cell: str) -> None:
    refused(stub, rpc, REQUESTS[rpc](kernel, cell, None), PREFIX[rpc] + "cell",
            "must be 1-64 characters of A-Z a-z 0-9 _ . - starting alphanumeric")


@pytest.mark.parametrize("rpc", REQUESTS)
@pytest.mark.parametrize(("name", "limits", "says"), BAD_LIMITS, ids=BAD_LIMIT_IDS)
def test_a_bad_limit_is_invalid_argument_at_its_field(stub: Stub, kernel: str, rpc: str,
                                                      name: str, limits: pb.CellLimits,
                                                      says: str) -> None:
    refused(stub, rpc, REQUESTS[rpc](kernel, "ok", limits), f"{PREFIX[rpc]}limits.{name}",
            says)


# ---- good values: taken (the manager does not place VMs in cells yet; that is fine) ----
def placed(vm: pb.Vm) -> tuple[str, pb.CellLimits]:
    if vm.HasField("cell"):  # once the daemon tells it: a name always, the named one if any
        assert vm.cell.name and (vm.cell.name == vm.config.cell or not vm.config.cell)
    return vm.config.cell, vm.config.limits


@pytest.mark.kvm
def test_good_cells_and_limits_are_taken_and_not_snapshotted(stub: Stub, kernel: str,
                                                             tmp_path: Path) -> None:
    vm = stub.CreateVm(pb.CreateVmRequest(vm_id="src", config=config(
        kernel, memory_mib=MEM_MIB, cell="src-cell", limits=GOOD_LIMITS)), timeout=HANG_S)
    assert placed(vm) == ("src-cell", GOOD_LIMITS)
    assert placed(stub.GetVm(pb.GetVmRequest(vm_id="src"), timeout=HANG_S)) == placed(vm)
    stub.StartVm(pb.StartVmRequest(vm_id="src"), timeout=HANG_S)
    stub.PauseVm(pb.PauseVmRequest(vm_id="src"), timeout=HANG_S)
    snap = str(tmp_path / "snap")
    stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="src", snapshot_dir=snap), timeout=HANG_S)

    # No cell named: a cell of its own, no limits (the snapshot has none of src's).
    r = stub.RestoreVm(pb.RestoreVmRequest(snapshot_dir=snap, vm_id="r"), timeout=HANG_S)
    assert placed(r) == ("", pb.CellLimits())
    named = pb.CellLimits(cpu=1024.0, memory_mib=2**30, pids=2**22)  # the bounds are taken
    r2 = stub.RestoreVm(pb.RestoreVmRequest(snapshot_dir=snap, vm_id="r2", cell="a" * 64,
                                            limits=named), timeout=HANG_S)
    assert placed(r2) == ("a" * 64, named)
    clones = stub.CloneVm(pb.CloneVmRequest(snapshot_dir=snap, count=2, id_prefix="c",
                                            cell="pool", limits=GOOD_LIMITS), timeout=HANG_S).vms
    assert [placed(c) for c in clones] == [("pool", GOOD_LIMITS)] * 2
    listed = {v.vm_id: placed(v) for v in stub.ListVms(pb.ListVmsRequest(), timeout=HANG_S).vms}
    assert listed == {"src": ("src-cell", GOOD_LIMITS), "r": ("", pb.CellLimits()),
                      "r2": ("a" * 64, named), "c-0": ("pool", GOOD_LIMITS),
                      "c-1": ("pool", GOOD_LIMITS)}


@pytest.mark.kvm
def test_the_smallest_limits_are_taken(stub: Stub, kernel: str) -> None:
    """The smallest CPU and pids limits are taken; a memory limit must also
    hold the guest's RAM and its worker (the smallest one cannot)."""
    smallest = pb.CellLimits(cpu=0.01, pids=8)
    vm = stub.CreateVm(pb.CreateVmRequest(vm_id="v", config=config(
        kernel, memory_mib=MEM_MIB, cell="c", limits=smallest)), timeout=HANG_S)
    assert placed(vm) == ("c", smallest)
    too_small = pb.CellLimits(memory_mib=16)
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVm(pb.CreateVmRequest(vm_id="w", config=config(
            kernel, memory_mib=MEM_MIB, limits=too_small)), timeout=HANG_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(
        "config.limits.memory_mib: 16 MiB cannot hold the guest's"), err.value.details()
