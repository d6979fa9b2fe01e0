"""A small typed Python client of the vmmd daemon (vmmd.v1.VmService).

A thin layer over the generated stubs: one method per RPC, keyword
arguments instead of request messages, protobuf messages back (`Vm`,
`VmEvent`).  Every failure is a ClientError carrying the gRPC status code's
name and the daemon's details.  No policy lives here.

    with Client("/run/vmmd/vmmd.sock") as c:
        vm = c.create("web-1", "/srv/vmlinux", cmdline_append="quiet")
        c.start(vm.vm_id)
        for data in c.console(vm.vm_id):
            sys.stdout.buffer.write(data)
"""

from __future__ import annotations

import builtins
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Self, TypeVar

import grpc

from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc
from vmmd.paths import DEFAULT_SOCKET

T = TypeVar("T")

__all__ = ["DEFAULT_SOCKET", "Client", "ClientError", "Stream", "pb"]


class ClientError(Exception):
    """A failed call: `code` is the gRPC status code name ("NOT_FOUND")."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> ClientError:
        if isinstance(e, grpc.Call):  # what every error of a call is
            return cls(e.code().name, e.details() or "")
        return cls("UNKNOWN", str(e))


class Stream(Generic[T]):
    """A server stream: iterate it; cancel() (from any thread) or leaving
    the `with` block ends it, and iteration then stops quietly."""

    def __init__(self, call: Any, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._convert = convert
        self._cancelled = False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return self._convert(next(self._call))
        except grpc.RpcError as e:
            if self._cancelled and self._call.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise ClientError.from_rpc(e) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client:
    """A connection to one daemon: its Unix socket, or any gRPC `target`
    ("unix:/path", "host:port"; `credentials` for TLS)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, target: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        target = target or f"unix:{socket_path}"
        self._channel = (grpc.secure_channel(target, credentials) if credentials
                         else grpc.insecure_channel(target))
        self._stub = vmm_pb2_grpc.VmServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request)
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None

    # -- lifecycle --
    def create(self, vm_id: str, kernel: str, initrd: str | None = None,
               cmdline: str | None = None, cmdline_append: str | None = None,
               vcpus: int = 0, memory_mib: int = 0, drives: Sequence[pb.Drive] = (),
               nets: Sequence[pb.NetworkInterface] = (),
               track_dirty_pages: bool = False, cell: str = "",
               limits: pb.CellLimits | None = None,
               entropy: pb.EntropyDevice | None = None, acpi: bool = False,
               vsock: pb.Vsock | None = None) -> pb.Vm:
        """A new VM in CREATED; an empty vm_id lets the daemon choose one.
        0 vcpus / memory_mib mean the daemon's defaults; an empty cell, a
        cell of the VM's own; entropy given: the VM has an entropy device."""
        boot = pb.BootSource(kernel_path=kernel, initrd_path=initrd or "",
                             cmdline=cmdline or "", cmdline_append=cmdline_append or "")
        config = pb.VmConfig(vcpus=vcpus, memory_mib=memory_mib, boot=boot, drives=drives,
                             network_interfaces=nets, track_dirty_pages=track_dirty_pages,
                             cell=cell, limits=limits, entropy=entropy, acpi=acpi,
                             vsock=vsock)
        return self._call("CreateVm", pb.CreateVmRequest(vm_id=vm_id, config=config))

    def start(self, vm_id: str) -> pb.Vm:
        return self._call("StartVm", pb.StartVmRequest(vm_id=vm_id))

    def pause(self, vm_id: str) -> pb.Vm:
        return self._call("PauseVm", pb.PauseVmRequest(vm_id=vm_id))

    def resume(self, vm_id: str) -> pb.Vm:
        return self._call("ResumeVm", pb.ResumeVmRequest(vm_id=vm_id))

    def stop(self, vm_id: str, timeout_ms: int = 0, force: bool = False) -> pb.Vm:
        """Graceful stop, forced after timeout_ms (0: the daemon's default)."""
        return self._call("StopVm", pb.StopVmRequest(vm_id=vm_id, timeout_ms=timeout_ms,
                                                     force=force))

    def delete(self, vm_id: str) -> None:
        self._call("DeleteVm", pb.DeleteVmRequest(vm_id=vm_id))

    # -- snapshots --
    def snapshot(self, vm_id: str, snapshot_dir: str, diff: bool = False) -> pb.Snapshot:
        kind = pb.SNAPSHOT_TYPE_DIFF if diff else pb.SNAPSHOT_TYPE_FULL
        return self._call("SnapshotVm", pb.SnapshotVmRequest(vm_id=vm_id, snapshot_dir=snapshot_dir,
                                                            type=kind))

    def restore(self, snapshot_dir: str, vm_id: str = "", resume: bool = False,
                overrides: pb.DeviceOverrides | None = None,
                track_dirty_pages: bool = False, cell: str = "",
                limits: pb.CellLimits | None = None, clock_realtime: bool = False) -> pb.Vm:
        return self._call("RestoreVm", pb.RestoreVmRequest(
            snapshot_dir=snapshot_dir, vm_id=vm_id, resume=resume, overrides=overrides,
            track_dirty_pages=track_dirty_pages, cell=cell, limits=limits,
            clock_realtime=clock_realtime))

    def clone(self, snapshot_dir: str, count: int, id_prefix: str = "", resume: bool = False,
              overrides: Sequence[pb.DeviceOverrides] = (),
              track_dirty_pages: bool = False, cell: str = "",
              limits: pb.CellLimits | None = None,
              clock_realtime: bool = False) -> list[pb.Vm]:
        """`count` clones; a named cell takes them all, else each gets one of its own."""
        return list(self._call("CloneVm", pb.CloneVmRequest(
            snapshot_dir=snapshot_dir, count=count, id_prefix=id_prefix, resume=resume,
            overrides=overrides, track_dirty_pages=track_dirty_pages, cell=cell,
            limits=limits, clock_realtime=clock_realtime)).vms)

    def merge(self, base_dir: str, diff_dir: str) -> pb.Snapshot:
        return self._call("MergeSnapshots", pb.MergeSnapshotsRequest(base_dir=base_dir,
                                                                    diff_dir=diff_dir))

    # -- observation --
    def get(self, vm_id: str) -> pb.Vm:
        return self._call("GetVm", pb.GetVmRequest(vm_id=vm_id))

    def list(self) -> builtins.list[pb.Vm]:
        return list(self._call("ListVms", pb.ListVmsRequest()).vms)

    def console(self, vm_id: str, from_start: bool = True, follow: bool = True) -> Stream[bytes]:
        """Guest serial output; with `follow` it ends once the VM stopped."""
        req = pb.StreamConsoleRequest(vm_id=vm_id, from_start=from_start, follow=follow)
        return Stream(self._stub.StreamConsole(req), lambda chunk: chunk.data)

    def write_console(self, vm_id: str, data: bytes) -> int:
        """Types `data` into the guest's UART; returns how many bytes it took."""
        return self._call("WriteConsole", pb.WriteConsoleRequest(vm_id=vm_id, data=data)).accepted

    def events(self, vm_id: str | None = None) -> Stream[pb.VmEvent]:
        """Lifecycle events of one VM, or of every VM."""
        return Stream(self._stub.WatchEvents(pb.WatchEventsRequest(vm_id=vm_id or "")),
                      lambda ev: ev)


def vsock_connect(uds_path: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A stream to a guest's vsock port through its VM's socket (VmConfig.vsock.uds_path),
    as a Firecracker client does it: connect, write `CONNECT <port>\\n`, read
    `OK <host port>\\n`.  ConnectionRefusedError when the device closes instead (nobody
    listens on that port in the guest, or no answer within its 2 s)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(uds_path)
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            b = s.recv(1)
            if not b:
                raise ConnectionRefusedError(f"guest port {port}: the device closed the "
                                             f"connection ({line!r})")
            line += b
        if not line.startswith(b"OK "):
            raise ConnectionRefusedError(f"guest port {port}: CONNECT answered {line!r}")
        s.settimeout(None)
        return s
    except BaseException:
        s.close()
        raise
