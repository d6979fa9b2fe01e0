"""Refusals at the edge: bad specs name the client's field, unknown and empty ids, duplicates.

A refused CreateVm leaves nothing behind: ListVms is still empty afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.framework.rpc import config, list_ids, rpc_error
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# name, vm_id, config(kernel, tmp_path) -> the field the message starts with, and what it says.
BAD_SPECS: list[tuple[str, str, Callable[[str, Path], pb.VmConfig], str, str]] = [
    ("no-kernel", "ok", lambda k, t: pb.VmConfig(), "config.boot.kernel_path", "is required"),
    ("kernel-missing", "ok", lambda k, t: config(str(t / "nope")), "config.boot.kernel_path",
     "No such file"),
    ("kernel-not-a-kernel", "ok", lambda k, t: config(str(t / "text")), "config.boot.kernel_path",
     "is neither an ELF vmlinux nor a bzImage"),
    ("kernel-directory", "ok", lambda k, t: config(str(t)), "config.boot.kernel_path",
     "is a directory, not a regular file"),
    ("vcpus-33", "ok", lambda k, t: config(k, vcpus=33), "config.vcpus", "33 is outside 1..32"),
    ("memory-1", "ok", lambda k, t: config(k, memory_mib=1), "config.memory_mib", "is outside"),
    ("memory-huge", "ok", lambda k, t: config(k, memory_mib=2**32 - 1), "config.memory_mib",
     "is outside"),
    ("cmdline-too-long", "ok", lambda k, t: config(k, "x" * 5000), "config.boot.cmdline",
     "5000 bytes"),
    ("cmdline-control-char", "ok", lambda k, t: config(k, "mg=spin\x01"), "config.boot.cmdline",
     "not printable ASCII"),
    ("initrd-missing", "ok", lambda k, t: pb.VmConfig(boot=pb.BootSource(
        kernel_path=k, initrd_path=str(t / "nope"))), "config.boot.initrd_path", "No such file"),
    ("initrd-empty", "ok", lambda k, t: pb.VmConfig(boot=pb.BootSource(
        kernel_path=k, initrd_path=str(t / "empty"))), "config.boot.initrd_path", "is empty"),
    ("id-space", "bad id", lambda k, t: config(k), "vm_id", "'bad id'"),
    ("id-leading-dash", "-x", lambda k, t: config(k), "vm_id", "'-x'"),
    ("id-slash", "a/b", lambda k, t: config(k), "vm_id", "'a/b'"),
    ("id-non-ascii", "vm\u00e9", lambda k, t: config(k), "vm_id", "'vm\u00e9'"),
    ("id-65-chars", "a" * 65, lambda k, t: config(k), "vm_id", "1-64 characters"),
]

# Every verb that names one VM, with a request for `vm_id`.
VERBS: dict[str, Callable[[str], object]] = {
    "StartVm": lambda i: pb.StartVmRequest(vm_id=i),
    "PauseVm": lambda i: pb.PauseVmRequest(vm_id=i),
    "ResumeVm": lambda i: pb.ResumeVmRequest(vm_id=i),
    "StopVm": lambda i: pb.StopVmRequest(vm_id=i, force=True),
    "DeleteVm": lambda i: pb.DeleteVmRequest(vm_id=i),
    "GetVm": lambda i: pb.GetVmRequest(vm_id=i),
    "WriteConsole": lambda i: pb.WriteConsoleRequest(vm_id=i, data=b"x"),
    "StreamConsole": lambda i: pb.StreamConsoleRequest(vm_id=i, from_start=True, follow=True),
}


@pytest.mark.parametrize(("vm_id", "make_config", "field", "problem"),
                         [pytest.param(*case, id=name) for name, *case in BAD_SPECS])
def test_bad_spec_names_the_request_field(stub: vmm_pb2_grpc.VmServiceStub, kernel: str,
                                          tmp_path: Path, vm_id: str,
                                          make_config: Callable[[str, Path], pb.VmConfig],
                                          field: str, problem: str) -> None:
    (tmp_path / "text").write_text("not a kernel\n" * 100)
    (tmp_path / "empty").write_bytes(b"")
    err = rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id=vm_id,
                                                      config=make_config(kernel, tmp_path)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: ")
    assert problem in err.details()
    assert list_ids(stub) == []


@pytest.mark.parametrize("verb", [*VERBS, "WatchEvents"])
def test_unknown_id_is_not_found(stub: vmm_pb2_grpc.VmServiceStub, verb: str) -> None:
    request = VERBS.get(verb, lambda i: pb.WatchEventsRequest(vm_id=i))("ghost")
    err = rpc_error(getattr(stub, verb), request)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "vm_id: no VM named 'ghost'"


@pytest.mark.parametrize("verb", VERBS)
def test_empty_id_is_invalid(stub: vmm_pb2_grpc.VmServiceStub, verb: str) -> None:
    err = rpc_error(getattr(stub, verb), VERBS[verb](""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "vm_id: is required"


@pytest.mark.kvm
def test_duplicate_id_is_refused(stub: vmm_pb2_grpc.VmServiceStub, create, kernel: str) -> None:  # type: ignore[no-untyped-def]
    first = create(vm_id="twin")
    err = rpc_error(stub.CreateVm, pb.CreateVmRequest(vm_id="twin", config=config(kernel, "mg=print")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.details().startswith("vm_id: ")
    assert "twin" in err.details()
    assert list_ids(stub) == ["twin"]
    assert stub.GetVm(pb.GetVmRequest(vm_id="twin")).config.boot.cmdline == first.cmdline == "mg=spin"


@pytest.mark.kvm
def test_empty_id_is_generated(stub: vmm_pb2_grpc.VmServiceStub, create) -> None:  # type: ignore[no-untyped-def]
    ids = {create().vm_id for _ in range(3)}
    assert len(ids) == 3
    assert all(ID_RE.match(i) for i in ids)
    assert list_ids(stub) == sorted(ids)


@pytest.mark.kvm
def test_refused_create_releases_the_id(stub: vmm_pb2_grpc.VmServiceStub, create, kernel: str) -> None:  # type: ignore[no-untyped-def]
    bad = pb.CreateVmRequest(vm_id="again", config=config(kernel, vcpus=33))
    assert rpc_error(stub.CreateVm, bad).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert create(vm_id="again").state == pb.VM_STATE_CREATED
