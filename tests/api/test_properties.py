"""Property-based tests of VmService: a hostile client against a real daemon.

Every RPC gets requests that cover every field with extreme and malformed values (empty,
huge, NUL bytes, newlines, non-ASCII, unknown enum values, out-of-range numbers), ids valid
and not, and paths of every file type (tests/api/strategies.py).  After every call:

1. the status is one of OK, INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
   RESOURCE_EXHAUSTED (a daemon limit), DATA_LOSS, ABORTED - never INTERNAL or UNKNOWN;
2. an INVALID_ARGUMENT message starts with the path of a field of the request
   ("config.drives[0].path_on_host: ", "vm_id: ");
3. the message is short (at most MAX_MESSAGE characters; the client never sees a
   RESOURCE_EXHAUSTED of its own for oversized trailers);
4. a refused call leaves nothing behind: ListVms unchanged, the daemon's fds and threads back
   to their baseline within SETTLE_S, no new network device, no new file in the host's
   directories; and after each example, once its VMs are deleted, the same again;
5. the daemon answers: every call gets a deadline (CALL_S), and a call that runs into it hangs.

The daemon is one of this module, in a network namespace of its own (so that taps it makes
never touch the machine's network).  Calls that hang a daemon thread for ever (FIFOs) run
against a daemon of their own test.

Known bugs: each class has one focused test below (`test_bug_*`), marked xfail while the bug
is there; the broad tests tolerate the violations of a request that triggers a known bug
(`KNOWN_BUGS`, matched by `triggers`) and fail on anything else.  When a bug is fixed, remove
the xfail of its test and its entry in KNOWN_BUGS.

Runs: the bounded profile (default) is reproducible (derandomized, no example database) and
takes about a minute.  VMMD_FUZZ=1 selects the long profile: FUZZ_SCALE (default 50, or
VMMD_FUZZ_SCALE) times the examples, random seeds, and the example database in
.hypothesis/ so that a failure found once is tried first next time.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.api import strategies as S
from tests.api.conftest import HANG_S, Daemon, assert_clean_exit, spawn
from tests.conftest import REPO
from tests.netns import NetNs
from vmmd.api._gen.vmmd.v1 import vmm_pb2 as pb
from vmmd.api._gen.vmmd.v1 import vmm_pb2_grpc
from vmmd.api.server import MAX_WORKERS

pytestmark = [pytest.mark.kvm,
              pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")]

Code = grpc.StatusCode
CALL_S = 10.0     # a call that takes longer hangs
SETTLE_S = 2.0    # fds and threads are back to their baseline within this
MAX_MESSAGE = 1000
MEM_MIB = 16
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS,
           Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED, Code.DATA_LOSS, Code.ABORTED}
STREAMS = {"StreamConsole", "WatchEvents"}
THP = "/sys/kernel/mm/transparent_hugepage/enabled"
WATCHED_DIRS = ("/", "/dev", str(REPO))
IGNORED_NAMES = {".pytest_cache", ".hypothesis", "__pycache__", "build", ".ruff_cache"}

# ---- hypothesis profiles ----
FUZZ = os.environ.get("VMMD_FUZZ", "") not in ("", "0")
FUZZ_SCALE = int(os.environ.get("VMMD_FUZZ_SCALE", "50"))
BASE = settings(
    deadline=None, print_blob=True, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
    derandomize=not FUZZ,
    database=DirectoryBasedExampleDatabase(str(REPO / ".hypothesis")) if FUZZ else None,
    phases=tuple(Phase) if FUZZ else (Phase.explicit, Phase.generate, Phase.target, Phase.shrink))


def examples(n: int) -> settings:
    """n examples in the bounded run, FUZZ_SCALE times as many in the long one."""
    return settings(BASE, max_examples=n * FUZZ_SCALE if FUZZ else n)


# ---- known bugs: name -> what it is (the focused test_bug_<name> shows it) ----
KNOWN_BUGS: dict[str, str] = {
    "nul-path": "a NUL in any path: INTERNAL",
    "elf-huge-offset": "an ELF program header offset >= 2**63: INTERNAL",
    "unwritable-snapshot-dir": "SnapshotVm into /proc or /sys: INTERNAL",
    "snapshot-file-is-directory": "a snapshot whose memory or vmstate is a directory: INTERNAL",
    "id-newline": "vm_id 'a\\n' (and iface_id) accepted",
    "drive-id": "drive_id not validated (NUL, 100 000 chars)",
    "long-vm-id": "a 100 000-char vm_id echoed: the client sees RESOURCE_EXHAUSTED",
    # new
    "long-value": "any other 100 000-char value (paths, ids, tap names) echoed in the message",
    "directory-kernel-fd-leak": "kernel_path or initrd_path a directory: one fd leaked per call",
    "snapshot-file-unreadable": "a snapshot whose memory or vmstate is a socket, a symlink loop "
                                "or /proc/self/mem: INTERNAL",
    "name-too-long": "a snapshot dir the kernel finds too long (ENAMETOOLONG): INTERNAL",
    "clone-prefix-field": "CloneVm: a bad id_prefix is refused naming vm_id, not id_prefix",
}


TOLERATED: dict[str, int] = {}  # known bug -> violations seen (printed at the end, with -s)

# ---- outcomes and invariants ----
@dataclass
class Outcome:
    code: Code
    details: str
    response: Any = None
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.code.name} {short(self.details)!s} ({self.seconds:.2f} s)"


def short(value: Any, limit: int = 200) -> str:
    """repr() with long strings cut: a failing request stays readable."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...<{len(text)} chars>"


def show(request: Message) -> str:
    """The request as Python code, long strings abbreviated."""
    def lit(v: Any) -> str:
        if isinstance(v, str | bytes) and len(v) > 64:
            return f"{v[:8]!r} * {len(v) // max(len(v[:8]), 1)}" if len(set(v)) == 1 \
                else short(v, 80)
        if isinstance(v, Message):
            return show(v)
        return repr(v)
    parts = []
    for fd, v in request.ListFields():
        if fd.is_repeated:
            parts.append(f"{fd.name}=[{', '.join(lit(x) for x in v)}]")
        else:
            parts.append(f"{fd.name}={lit(v)}")
    return f"pb.{type(request).__name__}({', '.join(parts)})"


FIELD_RE = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): ")


def names_a_field(request: Message, details: str) -> bool:
    """Whether the message starts with the path of a field of `request` (indexes in range)."""
    m = FIELD_RE.match(details)
    if not m:
        return False
    obj: Any = request
    for part in m.group(1).split("."):
        name, _, index = part.partition("[")
        if not isinstance(obj, Message) or name not in obj.DESCRIPTOR.fields_by_name:
            return False
        obj = getattr(obj, name)
        if index:
            i = int(index[:-1])
            if not hasattr(obj, "__len__") or i >= len(obj):
                return False
            obj = obj[i]
    return True


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return sorted(out, key=lambda x: int(x.split("-")[0]))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def listing() -> dict[str, set[str]]:
    out = {}
    for d in WATCHED_DIRS:
        out[d] = set(os.listdir(d)) - IGNORED_NAMES
    return out


def thp() -> str:
    return Path(THP).read_text() if os.path.exists(THP) else ""


# ---- the path zoo ----
def bind_socket(path: Path) -> None:
    """A Unix socket file at `path` (bound in a short directory: sun_path is 108 bytes)."""
    short_dir = tempfile.mkdtemp(prefix="vs")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(f"{short_dir}/s")
        os.rename(f"{short_dir}/s", path)
    finally:
        s.close()
        os.rmdir(short_dir)


def sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def make_zoo(root: Path, microguests: dict[str, Path]) -> dict[str, str]:
    """Every "@name" of strategies.PATHS -> its path (files made under root)."""
    z: dict[str, str] = {}

    def put(name: str, p: Path | str) -> None:
        z[name] = str(p)

    shutil.copy(microguests["64"], root / "kernel")
    shutil.copy(microguests["pvh"], root / "kernel-pvh")
    put("kernel", root / "kernel")
    put("kernel-pvh", root / "kernel-pvh")
    (root / "garbage").write_bytes(bytes((i * 7919 + 13) % 256 for i in range(4096)))
    put("garbage", root / "garbage")
    (root / "empty").write_bytes(b"")
    put("empty", root / "empty")
    (root / "tiny").write_bytes(b"x")
    put("tiny", root / "tiny")
    (root / "text").write_text("not a kernel\n" * 100)
    put("text", root / "text")
    for name in ("image", "image2"):
        sparse(root / name, 1 << 20)
        put(name, root / name)
    (root / "image-ro").write_bytes(bytes(4096))
    (root / "image-ro").chmod(0o444)
    put("image-ro", root / "image-ro")
    (root / "dir").mkdir()
    put("dir", root / "dir")
    os.symlink(root / "kernel", root / "symlink-kernel")
    put("symlink-kernel", root / "symlink-kernel")
    os.symlink(root / "image", root / "symlink-image")
    put("symlink-image", root / "symlink-image")
    os.symlink(root / "none", root / "dangling")
    put("dangling", root / "dangling")
    os.symlink(root / "loop-b", root / "loop")
    os.symlink(root / "loop", root / "loop-b")
    put("loop", root / "loop")
    os.symlink(root / "self-loop", root / "self-loop")
    put("self-loop", root / "self-loop")
    os.mkfifo(root / "fifo")
    put("fifo", root / "fifo")
    bind_socket(root / "socket")
    put("socket", root / "socket")
    for host in ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom", "/proc/self/mem",
                 "/proc/self/fd/0", "/proc/cpuinfo", "/proc/kcore", THP, "/sys/kernel", "/"):
        put(host, host)
    put("missing", root / "nope")
    put("missing-parent", root / "nope" / "nope")
    put("relative", "pyproject.toml")  # exists in the daemon's working directory
    put("relative-missing", "nope/nope.img")
    put("nul", f"{root}/image\0x")
    put("nul-only", "\0")
    put("empty-path", "")
    sparse(root / "img\n", 1 << 20)
    put("newline", root / "img\n")
    put("long-component", root / ("x" * 300))
    put("long-path", "/" + "a/" * 3000)
    put("huge-path", "/" + "x" * S.HUGE)
    assert set(z) == set(S.PATHS), set(S.PATHS) ^ set(z)
    return z


@dataclass(frozen=True)
class Golden:
    """Snapshots of one paused, dirty-tracked `mg=spin` VM (since deleted) with a drive "d"
    (golden.img) and an interface "eth0" (tap gtap): full, second (full, after it), diff
    (after second)."""

    root: Path

    def dir(self, name: str) -> Path:
        return self.root / name


def link_snapshot(src: Path, dst: Path) -> None:
    """A snapshot directory of hard links (writers rename files into place, never rewrite)."""
    dst.mkdir()
    for name in ("memory", "vmstate"):
        os.link(src / name, dst / name)


def make_snapdir(kind: str, where: Path, golden: Golden, zoo: dict[str, str]) -> str:
    """The path for a "%kind" of strategies.SNAP_DIRS (+ FIFO_SNAPS), made under `where`."""
    host = {"/": "/", "/proc": "/proc", "/sys": "/sys", "/dev": "/dev",
            "/proc/self/fd": "/proc/self/fd", "relative": "build", "empty-path": "",
            "nul-only": "\0", "long-path": "/" + "a/" * 3000, "huge-path": "/" + "x" * S.HUGE}
    if kind in host:
        return host[kind]
    d = where / kind
    if kind in S.VALID_SNAPS:
        link_snapshot(golden.dir(kind), d)
    elif kind == "full-symlink":
        link_snapshot(golden.dir("full"), where / "full-real")
        os.symlink(where / "full-real", d)
    elif kind == "newline":
        d = where / "snap\n"
        link_snapshot(golden.dir("full"), d)
    elif kind == "nul":
        return f"{where}/full\0x"
    elif kind == "missing":
        pass
    elif kind == "missing-parent":
        d = where / "nope" / "missing"
    elif kind == "long-component":
        d = where / ("x" * 300)
    elif kind == "empty-dir":
        d.mkdir()
    elif kind == "file":
        d.write_bytes(b"not a directory\n")
    elif kind == "unrelated":
        d.mkdir()
        (d / "memory").write_bytes(b"my own notes, not a snapshot\n" * 100)
        (d / "vmstate").write_bytes(b"more of my notes\n")
    else:  # "<memory|vmstate>-<what>": a copy of the full snapshot with that file replaced
        which, _, what = kind.partition("-")
        link_snapshot(golden.dir("full"), d)
        f = d / which
        if what != "truncated":
            f.unlink()
        if what == "dir":
            f.mkdir()
        elif what == "dangling":
            os.symlink(d / "none", f)
        elif what == "loop":
            os.symlink(f, f)
        elif what in ("devzero", "devnull"):
            os.symlink(f"/dev/{what[3:]}", f)
        elif what == "socket":
            bind_socket(f)
        elif what == "truncated":
            data = f.read_bytes()[:8192]
            f.unlink()
            f.write_bytes(data)
        elif what == "garbage":
            f.write_bytes(bytes(range(256)))
        elif what == "procmem":
            os.symlink("/proc/self/mem", f)
        elif what == "sysfs":
            os.symlink(THP, f)
        elif what == "fifo":
            os.mkfifo(f)
        elif what == "symlink-full":  # memory-symlink-full: a symlink to the golden memory (valid)
            os.symlink(golden.dir("full") / "memory", f)
        else:
            raise AssertionError(kind)
    return str(d)


# ---- the harness ----
@dataclass(frozen=True)
class Mark:
    """What the daemon holds at one moment (and the host directories it could write)."""

    fds: int
    threads: int
    links: set[str]
    files: dict[str, set[str]]
    thp: str


@dataclass(repr=False)
class Harness:
    daemon: Daemon
    ns: NetNs
    zoo: dict[str, str]
    scratch: Path
    golden: Golden | None = None
    stub: vmm_pb2_grpc.VmServiceStub = field(init=False)
    pid: int = field(init=False)
    base: Mark = field(init=False)
    counter: int = 0

    def __post_init__(self) -> None:
        self.stub = vmm_pb2_grpc.VmServiceStub(self.daemon.channel())
        self.pid = self.daemon.proc.pid

    # -- requests --
    def resolve(self, request: Message) -> Message:
        """A copy of the request with its tokens replaced (snapshot dirs made afresh)."""
        self.counter += 1
        where = self.scratch / f"ex{self.counter}"
        where.mkdir()
        out = type(request)()
        out.CopyFrom(request)
        made: dict[str, str] = {}

        def value(v: str) -> str:
            if v[:1] == "@" and v[1:] in self.zoo:
                return self.zoo[v[1:]]
            if v[:1] == "%" and v[1:] in S.SNAP_DIRS + S.FIFO_SNAPS:
                if v not in made:
                    assert self.golden is not None
                    sub = where / f"{len(made)}"
                    sub.mkdir()
                    made[v] = make_snapdir(v[1:], sub, self.golden, self.zoo)
                return made[v]
            return v

        def walk(m: Message) -> None:
            for fd, v in m.ListFields():
                if fd.type == fd.TYPE_STRING:
                    if fd.is_repeated:
                        m.ClearField(fd.name)
                        getattr(m, fd.name).extend(value(x) for x in v)
                    else:
                        setattr(m, fd.name, value(v))
                elif fd.type == fd.TYPE_MESSAGE:
                    for sub in (v if fd.is_repeated else [v]):
                        walk(sub)
        walk(out)
        return out

    # -- calls --
    def call(self, rpc: str, request: Message, timeout: float = CALL_S) -> Outcome:
        """One call with a deadline; a stream's outcome is its first messages (it is cancelled
        once attached: headers sent)."""
        t0 = time.monotonic()
        method = getattr(self.stub, rpc)
        try:
            if rpc in STREAMS:
                stream = method(request, timeout=timeout)
                stream.initial_metadata()
                if not stream.done():
                    stream.cancel()
                    return Outcome(Code.OK, "attached", None, time.monotonic() - t0)
                return Outcome(Code.OK, "", list(stream), time.monotonic() - t0)
            return Outcome(Code.OK, "", method(request, timeout=timeout), time.monotonic() - t0)
        except grpc.RpcError as e:
            return Outcome(e.code(), e.details() or "", None, time.monotonic() - t0)

    def ids(self) -> list[str]:
        return sorted(vm.vm_id for vm in self.stub.ListVms(pb.ListVmsRequest(), timeout=CALL_S).vms)

    def mark(self) -> Mark:
        """Now, once fds and threads are steady (a VM just made may still start threads)."""
        last, deadline = (-1, -1), time.monotonic() + SETTLE_S
        while (now := (fds(self.pid), threads(self.pid))) != last and \
                time.monotonic() < deadline:
            last = now
            time.sleep(0.03)
        return Mark(*now, self.ns.links(), listing(), thp())

    def leftovers(self, before: Mark) -> list[str]:
        """What the daemon holds beyond `before` once SETTLE_S passed: fds, threads, network
        devices, files in the host's directories, the sysfs file."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            f, t = fds(self.pid), threads(self.pid)
            if (f <= before.fds and t <= before.threads) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        problems = []
        if f > before.fds or t > before.threads:
            problems.append(f"daemon has {f} fds (before: {before.fds}) and {t} threads "
                            f"(before: {before.threads}) after {SETTLE_S} s; fds: "
                            f"{fd_targets(self.pid)}")
        now = self.mark()
        if now.links != before.links:
            problems.append(f"network devices changed: +{sorted(now.links - before.links)} "
                            f"-{sorted(before.links - now.links)}")
        for d, names in now.files.items():
            if names - before.files[d]:
                problems.append(f"new files in {d}: {sorted(names - before.files[d])}")
        if now.thp != before.thp:
            problems.append(f"{THP} changed: {before.thp!r} -> {now.thp!r}")
        return problems

    def violations(self, rpc: str, request: Message, out: Outcome, ids_before: list[str],
                   before: Mark) -> list[str]:
        problems = []
        if out.code == Code.DEADLINE_EXCEEDED:
            problems.append(f"hangs: no answer within {out.seconds:.1f} s")
        elif out.code == Code.RESOURCE_EXHAUSTED and "metadata" in out.details.lower():
            problems.append(f"the client refused the answer: {short(out.details)}")
        elif out.code not in ALLOWED:
            problems.append(f"status {out.code.name}")
        if out.code == Code.INVALID_ARGUMENT and not names_a_field(request, out.details):
            problems.append("INVALID_ARGUMENT message names no field of the request")
        if len(out.details) > MAX_MESSAGE:
            problems.append(f"message of {len(out.details)} characters")
        try:
            now = self.ids()
        except grpc.RpcError as e:
            return [*problems, f"daemon no longer answers ListVms: {e.code().name}"]
        if out.code != Code.OK:
            if now != ids_before:
                problems.append(f"refused, yet ListVms changed: {ids_before} -> {now}")
            problems += self.leftovers(before)
        return problems

    def attempt(self, rpc: str, request: Message, timeout: float = CALL_S,
                known: set[str] | None = None) -> Outcome:
        """Call, check every invariant, fail on a violation not explained by a known bug."""
        ids_before, before = self.ids(), self.mark()
        out = self.call(rpc, request, timeout)
        note(f"{rpc}({show(request)}) -> {out}")
        problems = self.violations(rpc, request, out, ids_before, before)
        if problems:
            bugs = (known if known is not None else triggers(rpc, request)) & KNOWN_BUGS.keys()
            self.reset(check=False)
            if bugs:
                note(f"tolerated (known bugs {sorted(bugs)}): {problems}")
                for b in bugs:
                    TOLERATED[b] = TOLERATED.get(b, 0) + 1
                return out
            pytest.fail(f"{rpc}({show(request)})\n  -> {out}\n  " + "\n  ".join(problems),
                        pytrace=False)
        return out

    def reset(self, check: bool = True) -> None:
        """Delete every VM; then nothing is left beyond the baseline (checked unless `check` is
        False).  What is left becomes the new baseline: the example that leaked fails, not
        every later one."""
        for vm_id in self.ids():
            try:
                self.stub.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=CALL_S)
            except grpc.RpcError as e:
                if e.code() != Code.NOT_FOUND:
                    raise
        problems = self.leftovers(self.base)
        if problems:
            self.base = self.mark()
            if check:
                pytest.fail("after deleting every VM: " + "; ".join(problems), pytrace=False)

    def fresh(self) -> None:
        """The start of an example: VMs an earlier failed one left are deleted (unchecked)."""
        if self.ids():
            self.reset(check=False)

    def baseline(self) -> None:
        self.base = self.mark()

    # -- VMs in a given state --
    def vm(self, state: str, vm_id: str = "t", track: bool = False) -> str:
        """A micro-guest VM `vm_id` in `state`: created, running, paused, snapped (paused, with
        a full snapshot taken, so a diff may follow), stopped."""
        self.stub.CreateVm(pb.CreateVmRequest(vm_id=vm_id, config=pb.VmConfig(
            memory_mib=MEM_MIB, track_dirty_pages=track or state == "snapped",
            boot=pb.BootSource(kernel_path=self.zoo["kernel"], cmdline="mg=spin"))),
            timeout=CALL_S)
        if state == "created":
            return vm_id
        self.stub.StartVm(pb.StartVmRequest(vm_id=vm_id), timeout=CALL_S)
        if state in ("paused", "snapped"):
            self.stub.PauseVm(pb.PauseVmRequest(vm_id=vm_id), timeout=CALL_S)
        if state == "snapped":
            d = self.scratch / f"base-{self.counter}-{vm_id}"
            self.stub.SnapshotVm(pb.SnapshotVmRequest(vm_id=vm_id, snapshot_dir=str(d)),
                                 timeout=CALL_S)
        if state == "stopped":
            self.stub.StopVm(pb.StopVmRequest(vm_id=vm_id, force=True), timeout=CALL_S)
        return vm_id


def make_golden(h: Harness, root: Path) -> Golden:
    image = root / "golden.img"
    sparse(image, 1 << 20)
    stub = h.stub
    stub.CreateVm(pb.CreateVmRequest(vm_id="golden", config=pb.VmConfig(
        memory_mib=MEM_MIB, track_dirty_pages=True,
        boot=pb.BootSource(kernel_path=h.zoo["kernel"], cmdline="mg=spin"),
        drives=[pb.Drive(drive_id="d", path_on_host=str(image))],
        network_interfaces=[pb.NetworkInterface(iface_id="eth0", host_dev_name="gtap")])),
        timeout=CALL_S)
    try:
        stub.StartVm(pb.StartVmRequest(vm_id="golden"), timeout=CALL_S)
        text = b""
        for chunk in stub.StreamConsole(pb.StreamConsoleRequest(
                vm_id="golden", from_start=True, follow=True), timeout=HANG_S):
            text += chunk.data
            if b"MG-START\n" in text:
                break
        stub.PauseVm(pb.PauseVmRequest(vm_id="golden"), timeout=CALL_S)
        for name, kind in (("full", 1), ("second", 1)):
            stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="golden", snapshot_dir=str(root / name),
                                                 type=kind), timeout=CALL_S)
        stub.ResumeVm(pb.ResumeVmRequest(vm_id="golden"), timeout=CALL_S)
        stub.PauseVm(pb.PauseVmRequest(vm_id="golden"), timeout=CALL_S)
        stub.SnapshotVm(pb.SnapshotVmRequest(vm_id="golden", snapshot_dir=str(root / "diff"),
                                             type=pb.SNAPSHOT_TYPE_DIFF), timeout=CALL_S)
    finally:
        stub.DeleteVm(pb.DeleteVmRequest(vm_id="golden"), timeout=CALL_S)
    return Golden(root)


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNs]:
    with NetNs() as ns:
        for t in ("tap0", "tap1", "gtap"):
            ns.add_tap(t)
        ns.ip("link", "add", "br0", "type", "bridge")
        yield ns


@pytest.fixture(scope="module")
def fz(ns: NetNs, microguests: dict[str, Path],
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """The module's daemon (in `ns`), its path zoo and golden snapshots, its baseline."""
    root = tmp_path_factory.mktemp("props")
    for sub in ("zoo", "golden", "scratch"):
        (root / sub).mkdir()
    d = spawn(root / "vmmd.sock", wrap=ns.exec_argv())
    d.wait_ready()
    h = Harness(d, ns, make_zoo(root / "zoo", microguests), root / "scratch")
    h.baseline()
    h.golden = make_golden(h, root / "golden")
    # Warm up: the server's worker threads (a pool that grows up to MAX_WORKERS, never
    # shrinks) all exist before the baseline, so that only a leak adds threads.
    h.vm("running", "warm")
    streams = [h.stub.WatchEvents(pb.WatchEventsRequest(), timeout=HANG_S)
               for _ in range(MAX_WORKERS + 4)]
    deadline = time.monotonic() + HANG_S
    while threads(h.pid) < MAX_WORKERS and time.monotonic() < deadline:
        time.sleep(0.05)
    for stream in streams:
        stream.cancel()
    h.call("StreamConsole", pb.StreamConsoleRequest(vm_id="warm", follow=True))
    h.reset(check=False)
    time.sleep(1)
    h.baseline()
    yield h
    if TOLERATED:
        print(f"\nviolations tolerated as known bugs: {TOLERATED}")
    assert_clean_exit(d)


@pytest.fixture()
def h(fz: Harness) -> Iterator[Harness]:
    """The harness, checked empty and back at its baseline after the test."""
    if fz.daemon.proc.poll() is not None:
        pytest.fail(f"the module's daemon died (exit {fz.daemon.proc.returncode})")
    yield fz
    fz.reset()


# ---- which known bugs a request triggers ----
PATH_FIELDS = {"kernel_path", "initrd_path", "path_on_host", "snapshot_dir", "base_dir", "diff_dir"}


def strings(m: Message, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(field name, value) of every string in a message, nested ones included."""
    for fd, v in m.ListFields():
        if fd.type == fd.TYPE_STRING:
            for x in (v if fd.is_repeated else [v]):
                yield fd.name, x
        elif fd.type == fd.TYPE_MESSAGE:
            for sub in (v if fd.is_repeated else [v]):
                yield from strings(sub)


def is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def too_long(path: str) -> bool:
    """Whether the kernel refuses the path with ENAMETOOLONG."""
    raw = path.encode()
    return len(raw) >= 4096 or any(len(part) > 255 for part in raw.split(b"/"))


def unreadable(path: str) -> bool:
    """A file that is there but that open() or read() refuses other than as a missing file or
    a directory: a Unix socket, a symlink loop, a /proc file that fails reads."""
    try:
        os.lstat(path)
        st = os.stat(path)
    except OSError as e:
        return e.errno != errno.ENOENT
    except ValueError:
        return False
    return stat.S_ISSOCK(st.st_mode) or os.path.realpath(path).startswith("/proc/")


def triggers(rpc: str, request: Message) -> set[str]:
    """The bug classes this (resolved) request triggers, known ones or not."""
    found: set[str] = set()
    for name, value in strings(request):
        if name in PATH_FIELDS and "\0" in value:
            found.add("nul-path")
        if len(value) > MAX_MESSAGE:
            found.add("long-vm-id" if name in ("vm_id", "id_prefix") else "long-value")
        if name in ("vm_id", "id_prefix", "iface_id") and value.endswith("\n") \
                and S.ID_RE.fullmatch(value[:-1]):
            found.add("id-newline")
        if name in ("kernel_path", "initrd_path") and is_dir(value):
            found.add("directory-kernel-fd-leak")
        if name in ("snapshot_dir", "base_dir", "diff_dir") and \
                any(is_dir(os.path.join(value, f)) for f in ("memory", "vmstate")):
            found.add("snapshot-file-is-directory")
        if name in ("snapshot_dir", "base_dir", "diff_dir") and \
                any(unreadable(os.path.join(value, f)) for f in ("memory", "vmstate")):
            found.add("snapshot-file-unreadable")
        if rpc == "SnapshotVm" and name == "snapshot_dir" and \
                value.split("/")[1:2] in (["proc"], ["sys"]):
            found.add("unwritable-snapshot-dir")
        if name in PATH_FIELDS and too_long(value):
            found.add("name-too-long")
    if rpc == "CloneVm" and request.id_prefix and \
            not S.ID_RE.fullmatch(f"{request.id_prefix}-0"):  # type: ignore[attr-defined]
        found.add("clone-prefix-field")
    if rpc == "CreateVm":
        for d in request.config.drives:  # type: ignore[attr-defined]
            if d.drive_id and not S.ID_RE.fullmatch(d.drive_id):
                found.add("drive-id")
    return found


# ======================================================================================
# Broad properties: one test per RPC (or group of RPCs alike)
# ======================================================================================
@examples(60)
@given(request=S.create_requests())
def test_create_vm(h: Harness, request: pb.CreateVmRequest) -> None:
    h.fresh()
    req = h.resolve(request)
    out = h.attempt("CreateVm", req)
    if out.code == Code.OK:
        assert out.response.vm_id in h.ids()
    h.reset()


VERB_TARGETS = ["none", "created", "running", "paused", "stopped"]


@st.composite
def verb_requests(draw: Any) -> tuple[str, str, Message]:
    """(verb, the state of the VM it names or "none", request)."""
    verb = draw(st.sampled_from(["StartVm", "PauseVm", "ResumeVm", "StopVm", "DeleteVm", "GetVm",
                                 "WriteConsole", "StreamConsole", "WatchEvents"]))
    target = draw(st.sampled_from(VERB_TARGETS))
    vm_id = draw(S.ids()) if target == "none" else "t"
    if verb == "StopVm":
        force = draw(st.booleans())
        # a graceful stop of a micro-guest (it ignores Ctrl-Alt-Del) takes the whole timeout:
        # huge ones are test_bug_stop_timeout's
        timeout = draw(S.u32()) if force else draw(st.sampled_from([1, 20, 300]))
        req: Message = pb.StopVmRequest(vm_id=vm_id, timeout_ms=timeout, force=force)
    elif verb == "WriteConsole":
        req = pb.WriteConsoleRequest(vm_id=vm_id, data=draw(S.data()))
    elif verb == "StreamConsole":
        req = pb.StreamConsoleRequest(vm_id=vm_id, from_start=draw(st.booleans()),
                                      follow=draw(st.booleans()))
    else:
        req = getattr(pb, f"{verb}Request")(vm_id=vm_id)
    return verb, target, req


@examples(60)
@given(case=verb_requests())
def test_verbs_on_one_vm(h: Harness, case: tuple[str, str, Message]) -> None:
    h.fresh()
    verb, target, request = case
    if target != "none":
        h.vm(target)
    timeout = CALL_S + (request.timeout_ms / 1000 if verb == "StopVm" and not request.force else 0)
    h.attempt(verb, request, timeout=timeout)
    h.reset()


@examples(3)
@given(st.just(None))
def test_list_vms(h: Harness, _: None) -> None:
    h.fresh()
    h.vm("running", "a")
    out = h.attempt("ListVms", pb.ListVmsRequest())
    assert [vm.vm_id for vm in out.response.vms] == ["a"]
    h.reset()


SNAP_TARGETS = ["none", "created", "running", "paused", "snapped", "stopped"]


@examples(40)
@given(target=st.sampled_from(SNAP_TARGETS), vm_id=S.ids(),
       directory=st.one_of(S.snap_dirs(S.SNAPSHOT_TARGETS), st.just("%missing")),
       kind=st.one_of(st.sampled_from([0, 1, 2]), S.enums()))
def test_snapshot_vm(h: Harness, target: str, vm_id: str, directory: str, kind: int) -> None:
    h.fresh()
    if target != "none":
        vm_id = h.vm(target)
    h.attempt("SnapshotVm", h.resolve(pb.SnapshotVmRequest(vm_id=vm_id, snapshot_dir=directory,
                                                           type=kind)))
    h.reset()


@examples(50)
@given(request=S.restore_requests())
def test_restore_vm(h: Harness, request: pb.RestoreVmRequest) -> None:
    h.fresh()
    h.attempt("RestoreVm", h.resolve(request))
    h.reset()


@examples(40)
@given(request=S.clone_requests())
def test_clone_vm(h: Harness, request: pb.CloneVmRequest) -> None:
    h.fresh()
    out = h.attempt("CloneVm", h.resolve(request))
    if out.code == Code.OK:
        assert len(out.response.vms) == request.count
    h.reset()


@examples(40)
@given(request=S.merge_requests())
def test_merge_snapshots(h: Harness, request: pb.MergeSnapshotsRequest) -> None:
    h.fresh()
    h.attempt("MergeSnapshots", h.resolve(request))
    h.reset()


@examples(40)
@given(mutations=S.elf_mutations())
def test_kernel_elf_headers(h: Harness, mutations: list[tuple[str, int, int]]) -> None:
    """The PVH micro-guest with ELF header, program header and note fields overwritten."""
    h.fresh()
    path = h.scratch / f"elf-{h.counter}"
    h.counter += 1
    path.write_bytes(S.mutate_elf(Path(h.zoo["kernel-pvh"]).read_bytes(), mutations))
    note(f"mutations: {mutations}")
    h.attempt("CreateVm", pb.CreateVmRequest(vm_id="k", config=pb.VmConfig(
        memory_mib=MEM_MIB, boot=pb.BootSource(kernel_path=str(path)))),
        known=triggers_elf(mutations))
    h.reset()


def triggers_elf(mutations: list[tuple[str, int, int]]) -> set[str]:
    return {"elf-huge-offset"} if any(f == "p_offset" and v >= 2**63 for f, _, v in mutations) \
        else set()


@examples(30)
@given(fields=S.bz_mutations())
def test_kernel_bzimage_headers(h: Harness, fields: dict[str, int]) -> None:
    h.fresh()
    path = h.scratch / f"bz-{h.counter}"
    h.counter += 1
    path.write_bytes(S.bzimage(**fields))
    note(f"bzimage({fields})")
    h.attempt("CreateVm", pb.CreateVmRequest(vm_id="k", config=pb.VmConfig(
        memory_mib=MEM_MIB, boot=pb.BootSource(kernel_path=str(path)))))
    h.reset()
