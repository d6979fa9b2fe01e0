"""Hostile clients and hostile files, through a real daemon: each test pins one
finding of an attack on the daemon (issue 10), and failed on the code before
its fix.  Every call carries a deadline, so a daemon that hangs fails the
test instead of hanging it; calls that used to hang run against a daemon of
their own (`start_daemon`).  The findings on guest memory backed by a
shrinking file are in tests/kvm/test_sigbus.py."""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.framework.daemon import Daemon
from tests.framework.rpc import config, rpc_error
from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd._proto.vmmd.v1 import vmm_pb2 as pb
from vmmd._proto.vmmd.v1 import vmm_pb2_grpc

pytestmark = pytest.mark.kvm

Stub = vmm_pb2_grpc.VmServiceStub
Code = grpc.StatusCode
DEADLINE_S = 10.0  # a call that takes longer is hanging
MEM_MIB = 32


def call(method: Callable[..., object], request: object) -> object:
    return method(request, timeout=DEADLINE_S)


def refused(method: Callable[..., object], request: object, code: Code, field: str,
            *says: str) -> str:
    err = rpc_error(method, request)
    assert err.code() == code, f"{err.code()}: {err.details()}"
    assert err.details().startswith(f"{field}: "), err.details()
    for words in says:
        assert words in err.details(), err.details()
    return err.details()


def stub_of(d: Daemon) -> Stub:
    return vmm_pb2_grpc.VmServiceStub(d.channel())


def paused_vm(stub: Stub, kernel: str, vm_id: str, **fields: object) -> None:
    fields.setdefault("memory_mib", MEM_MIB)
    call(stub.CreateVm, pb.CreateVmRequest(vm_id=vm_id, config=config(kernel, "mg=spin",
                                                                      **fields)))
    call(stub.StartVm, pb.StartVmRequest(vm_id=vm_id))
    call(stub.PauseVm, pb.PauseVmRequest(vm_id=vm_id))


def snapshot(stub: Stub, vm_id: str, d: Path) -> pb.Snapshot:
    return call(stub.SnapshotVm, pb.SnapshotVmRequest(vm_id=vm_id, snapshot_dir=str(d)))


def ids(stub: Stub) -> list[str]:
    return sorted(v.vm_id for v in call(stub.ListVms, pb.ListVmsRequest()).vms)


@pytest.fixture()
def snap(stub: Stub, kernel: str, tmp_path: Path) -> Path:
    """A full snapshot of a paused micro-guest (the VM deleted again)."""
    paused_vm(stub, kernel, "src")
    snapshot(stub, "src", tmp_path / "snap")
    call(stub.DeleteVm, pb.DeleteVmRequest(vm_id="src"))
    return tmp_path / "snap"


# ---- 2: a FIFO where a snapshot file should be ----
@pytest.mark.parametrize("name", ["memory", "vmstate"])
def test_fifo_in_a_snapshot_is_refused_not_waited_on(start_daemon: Callable[..., Daemon],
                                                     kernel: str, tmp_path: Path,
                                                     name: str) -> None:
    """Found: RestoreVm/MergeSnapshots on a FIFO never returned, kept the id reserved and
    stopped SIGTERM from working."""
    d = start_daemon()
    stub = stub_of(d)
    paused_vm(stub, kernel, "src", track_dirty_pages=True)
    snapshot(stub, "src", tmp_path / "base")
    call(stub.ResumeVm, pb.ResumeVmRequest(vm_id="src"))
    call(stub.PauseVm, pb.PauseVmRequest(vm_id="src"))
    call(stub.SnapshotVm, pb.SnapshotVmRequest(vm_id="src", snapshot_dir=str(tmp_path / "diff"),
                                               type=pb.SNAPSHOT_TYPE_DIFF))
    for snapdir in ("base", "diff"):
        (tmp_path / snapdir / name).unlink()
        os.mkfifo(tmp_path / snapdir / name)
    got = refused(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(tmp_path / "base"),
                                                      vm_id="r"),
                  Code.DATA_LOSS, str(tmp_path / "base" / name), "is a FIFO")
    assert "not a regular file" in got
    # Merging writes into the base: a FIFO there makes it no whole vmmd snapshot to replace.
    refused(stub.MergeSnapshots, pb.MergeSnapshotsRequest(base_dir=str(tmp_path / "base"),
                                                          diff_dir=str(tmp_path / "diff")),
            Code.INVALID_ARGUMENT, "base_dir", f"{tmp_path / 'base' / name} is a FIFO")
    assert ids(stub) == ["src"]  # "r" is not left reserved: it can be made now
    call(stub.CreateVm, pb.CreateVmRequest(vm_id="r", config=config(kernel)))


# ---- 3: temp files that follow symlinks ----
def test_planted_temp_symlinks_are_not_written_through(stub: Stub, kernel: str,
                                                       tmp_path: Path) -> None:
    """Found: a `.memory.tmp` symlink in the snapshot directory made SnapshotVm overwrite its
    target with guest memory."""
    paused_vm(stub, kernel, "v")
    snapshot(stub, "v", tmp_path / "s")
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not overwrite")
    for name in (".memory.tmp", ".vmstate.tmp"):
        (tmp_path / "s" / name).symlink_to(victim)
    snapshot(stub, "v", tmp_path / "s")
    assert victim.read_bytes() == b"do not overwrite"


# ---- 4, 15: many open streams ----
def test_a_thousand_streams_do_not_starve_unary_calls(start_daemon: Callable[..., Daemon],
                                                      kernel: str) -> None:
    """Found: 140 following streams held the 128 API workers: every other call froze.  Now
    streams hold no thread: 1000 of them, and unary calls still answer (and the API's
    threads stay bounded, then go away when idle)."""
    d = start_daemon()
    stub = stub_of(d)
    call(stub.CreateVm, pb.CreateVmRequest(vm_id="v", config=config(kernel, "mg=spin")))
    threads_before = d_threads(d)
    streams = []
    for i in range(1000):
        if i % 2:
            s = stub.StreamConsole(pb.StreamConsoleRequest(vm_id="v", follow=True), timeout=120)
        else:
            s = stub.WatchEvents(pb.WatchEventsRequest(), timeout=120)
        streams.append(s)
    for s in streams:
        s.initial_metadata()  # every stream attached on the server
    t0 = time.monotonic()
    assert ids(stub) == ["v"]
    call(stub.CreateVm, pb.CreateVmRequest(vm_id="w", config=config(kernel)))
    call(stub.DeleteVm, pb.DeleteVmRequest(vm_id="w"))
    assert time.monotonic() - t0 < DEADLINE_S
    assert d_threads(d) < threads_before + 70  # the unary pool's bound (64), not 1000
    for s in streams:
        s.cancel()
    deadline = time.monotonic() + 60
    while d_threads(d) > threads_before + 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # the pool's idle threads exit after 10 s
    assert d_threads(d) <= threads_before + 2


def d_threads(d: Daemon) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/task"))


# ---- 5, 14: concurrent snapshots and restores of one directory ----
def test_two_snapshots_into_one_directory_at_once(stub: Stub, kernel: str,
                                                  tmp_path: Path) -> None:
    """Found: one said OK, the other INTERNAL, and the directory often held a torn mix.  Now the
    loser gets ABORTED and the directory holds the winner's whole snapshot."""
    paused_vm(stub, kernel, "a", memory_mib=64)
    paused_vm(stub, kernel, "b", memory_mib=64)
    for round_ in range(5):
        target = tmp_path / f"s{round_}"
        results: dict[str, object] = {}

        def take(vm_id: str, target: Path = target, results: dict[str, object] = results
                 ) -> None:
            try:
                results[vm_id] = snapshot(stub, vm_id, target)
            except grpc.RpcError as e:
                results[vm_id] = e

        threads = [threading.Thread(target=take, args=(v,)) for v in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [v for v, r in results.items() if isinstance(r, pb.Snapshot)]
        for r in results.values():
            if not isinstance(r, pb.Snapshot):
                assert isinstance(r, grpc.RpcError) and r.code() == Code.ABORTED, r
                assert "snapshot_dir: another snapshot or merge" in r.details()
        assert ok, results
        winner = results[ok[-1]]
        assert isinstance(winner, pb.Snapshot)
        vm = call(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(target),
                                                      vm_id=f"r{round_}"))
        assert vm.state == pb.VM_STATE_PAUSED
        state = (target / "vmstate").read_bytes()
        assert winner.snapshot_id.encode() in state
        call(stub.DeleteVm, pb.DeleteVmRequest(vm_id=f"r{round_}"))


def test_restore_racing_snapshots_sees_whole_snapshots(stub: Stub, kernel: str,
                                                       tmp_path: Path) -> None:
    """Found: RestoreVm during a SnapshotVm into the same directory reported DATA_LOSS for a
    moment's mix of old and new files."""
    paused_vm(stub, kernel, "a", memory_mib=64)
    target = tmp_path / "s"
    snapshot(stub, "a", target)
    stop = threading.Event()
    errors: list[grpc.RpcError] = []

    def keep_snapshotting() -> None:
        while not stop.is_set():
            try:
                snapshot(stub, "a", target)
            except grpc.RpcError as e:
                if e.code() != Code.ABORTED:  # a restore holding the directory: fine
                    errors.append(e)

    t = threading.Thread(target=keep_snapshotting)
    t.start()
    try:
        for i in range(30):
            call(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(target), vm_id=f"r{i}"))
            call(stub.DeleteVm, pb.DeleteVmRequest(vm_id=f"r{i}"))
    finally:
        stop.set()
        t.join()
    assert not errors, [e.details() for e in errors]


# ---- 6: directories that are not vmmd's ----
@pytest.mark.parametrize("contents", [{"memory": b"my data", "vmstate": b"my state"},
                                      {"notes.txt": b"x"}])
def test_snapshot_into_a_directory_of_other_files_is_refused(
        stub: Stub, kernel: str, tmp_path: Path, contents: dict[str, bytes]) -> None:
    """Found: SnapshotVm overwrote unrelated files named memory/vmstate."""
    paused_vm(stub, kernel, "v")
    d = tmp_path / "theirs"
    d.mkdir()
    for name, data in contents.items():
        (d / name).write_bytes(data)
    refused(stub.SnapshotVm, pb.SnapshotVmRequest(vm_id="v", snapshot_dir=str(d)),
            Code.INVALID_ARGUMENT, "snapshot_dir", "holds files vmmd did not write")
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == contents


@pytest.mark.parametrize(("path", "says"), [("/", "holds files vmmd did not write"),
                                            ("/proc", "is on procfs"),
                                            ("/sys/kernel", "is on sysfs")])
def test_snapshot_into_system_directories_is_refused(stub: Stub, kernel: str, path: str,
                                                     says: str) -> None:
    """Found: snapshot_dir "/" was accepted; "/proc" ended as INTERNAL."""
    paused_vm(stub, kernel, "v")
    refused(stub.SnapshotVm, pb.SnapshotVmRequest(vm_id="v", snapshot_dir=path),
            Code.INVALID_ARGUMENT, "snapshot_dir", says)
    assert not os.path.exists("/vmstate") and not os.path.exists("/memory")


# ---- 7: memory ----
def test_a_vm_beyond_the_memory_budget_is_refused(start_daemon: Callable[..., Daemon],
                                                  kernel: str) -> None:
    """Found: a 195 GiB VM on a 24 GiB host was accepted and booted."""
    stub = stub_of(start_daemon("--memory-budget", "1G"))
    refused(stub.CreateVm, pb.CreateVmRequest(vm_id="huge", config=config(
        kernel, memory_mib=195 * 1024)), Code.RESOURCE_EXHAUSTED, "memory",
        "memory budget of 1024 MiB")
    call(stub.CreateVm, pb.CreateVmRequest(vm_id="a", config=config(kernel, memory_mib=512)))
    refused(stub.CreateVm, pb.CreateVmRequest(vm_id="b", config=config(kernel, memory_mib=512)),
            Code.RESOURCE_EXHAUSTED, "memory", "516 MiB is committed")
    listed = call(stub.ListVms, pb.ListVmsRequest())
    assert (listed.memory.budget_bytes, listed.memory.committed_bytes) == (1 << 30, 516 << 20)
    assert ids(stub) == ["a"]
    call(stub.DeleteVm, pb.DeleteVmRequest(vm_id="a"))  # gives it back
    call(stub.CreateVm, pb.CreateVmRequest(vm_id="b", config=config(kernel, memory_mib=512)))


def rss_kib(d: Daemon) -> int:
    with open(f"/proc/{d.proc.pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read())[1])  # type: ignore[index]


def test_loading_costs_the_files_bytes_not_their_claims(start_daemon: Callable[..., Daemon],
                                                        kernel: str, tmp_path: Path) -> None:
    """Found: an ELF segment claiming ~1 GiB (43 KB file) and a 1 GiB sparse initrd each cost
    ~1 GiB of daemon memory at CreateVm (zeros written, the initrd read whole)."""
    d = start_daemon()
    stub = stub_of(d)
    elf = bytearray(Path(kernel).read_bytes())
    phoff, phnum = struct.unpack_from("<QxxxxxxxxxxxxH", elf, 32)[0], elf[56]
    for i in range(phnum):  # grow the first PT_LOAD's memsz to ~900 MiB
        at = phoff + i * 56
        if struct.unpack_from("<I", elf, at)[0] == 1:
            paddr = struct.unpack_from("<Q", elf, at + 24)[0]
            struct.pack_into("<Q", elf, at + 40, (1 << 30) - paddr - (4 << 20))
            break
    big = tmp_path / "bss-kernel"
    big.write_bytes(bytes(elf))
    initrd = tmp_path / "sparse-initrd"
    with initrd.open("wb") as f:
        f.truncate(1 << 30)
        f.write(b"initrd data")
    before = rss_kib(d)
    call(stub.CreateVm, pb.CreateVmRequest(vm_id="bss", config=config(
        str(big), memory_mib=2048)))
    call(stub.CreateVm, pb.CreateVmRequest(vm_id="sparse", config=pb.VmConfig(
        memory_mib=2048, boot=pb.BootSource(kernel_path=kernel, cmdline="mg=spin",
                                            initrd_path=str(initrd)))))
    grown = rss_kib(d) - before
    assert grown < 64 * 1024, f"the daemon grew by {grown} KiB"


# ---- 8, 9, 10, 11, 12: inputs that reached INTERNAL or passed unchecked ----
def test_a_sysfs_file_is_not_a_drive(stub: Stub, kernel: str) -> None:
    """Found: /sys/kernel/mm/transparent_hugepage/enabled was accepted as a writable drive."""
    refused(stub.CreateVm, pb.CreateVmRequest(vm_id="v", config=config(kernel, drives=[
        pb.Drive(drive_id="d", path_on_host="/sys/kernel/mm/transparent_hugepage/enabled")])),
        Code.INVALID_ARGUMENT, "config.drives[0].path_on_host", "is on sysfs")
    refused(stub.CreateVm, pb.CreateVmRequest(vm_id="v", config=config(kernel, drives=[
        pb.Drive(drive_id="d", path_on_host="/proc/self/environ", read_only=True)])),
        Code.INVALID_ARGUMENT, "config.drives[0].path_on_host", "is on procfs")


def test_nul_in_any_path_is_invalid_argument(stub: Stub, kernel: str, tmp_path: Path) -> None:
    """Found: a NUL byte in a path ended as INTERNAL ("embedded null byte")."""
    bad = str(tmp_path / "a\0b")
    for cfg, field in [
        (config(bad), "config.boot.kernel_path"),
        (pb.VmConfig(boot=pb.BootSource(kernel_path=kernel, initrd_path=bad)),
         "config.boot.initrd_path"),
        (config(kernel, drives=[pb.Drive(drive_id="d", path_on_host=bad)]),
         "config.drives[0].path_on_host"),
    ]:
        refused(stub.CreateVm, pb.CreateVmRequest(vm_id="v", config=cfg), Code.INVALID_ARGUMENT,
                field, "NUL")
    refused(stub.RestoreVm, pb.RestoreVmRequest(vm_id="v", snapshot_dir=bad),
            Code.INVALID_ARGUMENT, "snapshot_dir", "NUL")
    refused(stub.MergeSnapshots, pb.MergeSnapshotsRequest(base_dir=bad, diff_dir=bad),
            Code.INVALID_ARGUMENT, "base_dir", "NUL")
    assert ids(stub) == []


def test_elf_note_offset_past_any_file_is_invalid_argument(
        stub: Stub, microguests: dict[str, Path], tmp_path: Path) -> None:
    """Found: a PT_NOTE offset of 2^64-1 ended as INTERNAL."""
    elf = bytearray(microguests["pvh"].read_bytes())
    phoff, phnum = struct.unpack_from("<Q", elf, 32)[0], elf[56]
    notes = [phoff + i * 56 for i in range(phnum)
             if struct.unpack_from("<I", elf, phoff + i * 56)[0] == 4]
    assert notes, "the PVH micro-guest has a PT_NOTE (its PVH entry)"
    struct.pack_into("<Q", elf, notes[0] + 8, 2**64 - 1)
    path = tmp_path / "bad-note"
    path.write_bytes(bytes(elf))
    refused(stub.CreateVm, pb.CreateVmRequest(vm_id="v", config=config(str(path))),
            Code.INVALID_ARGUMENT, "config.boot.kernel_path", "truncated: PT_NOTE")


def test_memory_file_that_is_a_directory_is_data_loss(stub: Stub, snap: Path) -> None:
    """Found: ended as INTERNAL (IsADirectoryError)."""
    (snap / "memory").unlink()
    (snap / "memory").mkdir()
    refused(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(snap), vm_id="r"),
            Code.DATA_LOSS, str(snap / "memory"), "is a directory")


@pytest.mark.parametrize("vm_id", ["a\n", "a\nb", "\na", "a\0"])
def test_ids_are_matched_whole(stub: Stub, kernel: str, vm_id: str) -> None:
    """Found: vm_id "a\\n" was accepted (the pattern's $ matched before the newline)."""
    refused(stub.CreateVm, pb.CreateVmRequest(vm_id=vm_id, config=config(kernel)),
            Code.INVALID_ARGUMENT, "vm_id", "must be 1-64 characters")
    assert ids(stub) == []


@pytest.mark.parametrize("drive_id", ["a\0b", "x" * 100_000, "a b", "-a", "a\n"])
def test_drive_ids_follow_the_id_rules(stub: Stub, kernel: str, tmp_path: Path,
                                       drive_id: str) -> None:
    """Found: drive_id was not validated (NUL, 100 000 characters)."""
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    msg = refused(stub.CreateVm, pb.CreateVmRequest(vm_id="v", config=config(kernel, drives=[
        pb.Drive(drive_id=drive_id, path_on_host=str(image))])),
        Code.INVALID_ARGUMENT, "config.drives[0].drive_id", "must be 1-64 characters")
    assert len(msg) < 400


def test_long_inputs_are_quoted_short(stub: Stub, kernel: str) -> None:
    """Found: a 100 000-character vm_id came back whole in the message: the client saw
    RESOURCE_EXHAUSTED (metadata too large) instead of NOT_FOUND."""
    long_id = "v" * 100_000
    msg = refused(stub.GetVm, pb.GetVmRequest(vm_id=long_id), Code.NOT_FOUND, "vm_id")
    assert len(msg) < 400 and "100000 characters" in msg
    msg = refused(stub.CreateVm, pb.CreateVmRequest(vm_id="v", config=config("/" + "k" * 100_000)),
                  Code.INVALID_ARGUMENT, "config.boot.kernel_path")
    assert len(msg) < 400


# ---- 13: a checksummed vmstate is still checked ----
@pytest.mark.parametrize(("change", "says"), [
    (lambda s: setattr(s.spec, "cmdline", "x" * 1_000_000), "spec.cmdline"),
    (lambda s: setattr(s.spec, "kernel_path", "/dev/zero"),
     "spec.kernel_path: /dev/zero is a character"),
    (lambda s: setattr(s.spec, "vm_id", "../../etc"), "spec.vm_id"),
    (lambda s: setattr(s.spec, "kernel_path", "relative/k"), "is not an absolute path"),
    (lambda s: s.spec.drives.append(spb.Drive(drive_id="a\0", path_on_host="/x",
                                              size_bytes=512)),
     "must be 1-64 characters"),
])
def test_restored_spec_gets_createvms_checks(stub: Stub, snap: Path,
                                             change: Callable[[spb.SnapshotState], None],
                                             says: str) -> None:
    """Found: a vmstate with a valid checksum restored a 1 MB cmdline, a kernel of /dev/zero and
    a vm_id of ../../etc."""
    from vmmd.vm import snapshot as snapshots
    state = spb.SnapshotState()
    state.ParseFromString((snap / "vmstate").read_bytes()[snapshots.STATE_HEADER.size:])
    change(state)
    (snap / "vmstate").write_bytes(snapshots.frame(state))
    err = rpc_error(stub.RestoreVm, pb.RestoreVmRequest(snapshot_dir=str(snap), vm_id="r"))
    assert err.code() in (Code.DATA_LOSS, Code.INVALID_ARGUMENT), err.details()
    assert says in err.details(), err.details()
    assert ids(stub) == []


# ---- 16: implausible bzImage headers ----
def _bzimage(**fields: int) -> bytes:
    setup = bytearray(2 * 512)
    setup[0x1F1] = fields.get("setup_sects", 1)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, 0x26C - 0x202])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    setup[0x211] = 1
    struct.pack_into("<I", setup, 0x22C, 0x7FFF_FFFF)
    struct.pack_into("<I", setup, 0x230, fields.get("kernel_alignment", 0x20_0000))
    setup[0x234] = fields.get("relocatable", 1)
    struct.pack_into("<H", setup, 0x236, 1)
    struct.pack_into("<I", setup, 0x238, fields.get("cmdline_size", 2047))
    struct.pack_into("<Q", setup, 0x258, fields.get("pref_address", 0x100_0000))
    struct.pack_into("<I", setup, 0x260, 0x100_0000)
    return bytes(setup) + b"\xcc" * 4096 * (fields.get("setup_sects", 1) + 1)


@pytest.mark.parametrize("fields", [{"kernel_alignment": 0}, {"kernel_alignment": 0x30_0000,
                                                              "relocatable": 0},
                                    {"setup_sects": 255}, {"cmdline_size": 0xFFFF_FFFF},
                                    {"relocatable": 0, "pref_address": 0}])
def test_implausible_bzimage_headers_are_refused(stub: Stub, tmp_path: Path,
                                                 fields: dict[str, int]) -> None:
    path = tmp_path / "bz"
    path.write_bytes(_bzimage(**fields))
    refused(stub.CreateVm, pb.CreateVmRequest(vm_id="v", config=config(str(path))),
            Code.INVALID_ARGUMENT, "config.boot.kernel_path", "corrupt bzImage")
    assert ids(stub) == []
