"""Where a VM's C core runs: placements.

The manager asks a Placement for a Lease on a cell for each VM it builds;
the lease's `factory` makes the VM's native core (the builder calls it),
its `watcher` watches the VM's events (a cell's own thread; None: the
process's, vmmd/vm/watcher.py), `info()` describes the cell for GetVm,
`release()` gives the VM's place back.  Two placements:

- SharedPlacement (`vmmd serve --isolation none`): every VM's core in the
  daemon itself, as before cells;
- CellPlacement (the default): a jailed worker process per cell, forked by
  the zygote, with its own uid, empty root, seccomp filter and cgroup.  A
  VM that names no cell gets one of its own, named "@" + its id (a name no
  client can give).  A cell lives while it hosts a VM: the last one's
  release tears it down, off the caller's thread.

When a worker dies, the zygote tells us its wait status; the cell's VMs
learn the cause (a signal, the syscall seccomp refused, the OOM killer of
the cell's memory limit) and stop as crashed; the cell is then torn down
like any other.  Other cells never notice.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from vmmd.cell.cgroup import CgroupError
from vmmd.cell.remote import Channel, RemoteNativeVm
from vmmd.cell.zygote import WorkerJail, Zygote, exit_cause
from vmmd.errors import InvalidSpecError, NativeError, ResourceExhaustedError, StateError, quoted
from vmmd.info import CellInfo
from vmmd.log import get_logger
from vmmd.native.seccomp import REPORT_SIZE, SeccompReport, parse_seccomp_report
from vmmd.record import Record, field
from vmmd.spec import CellLimits
from vmmd.vm.shelf import Quiet, Shelf
from vmmd.vm.watcher import Watcher

MiB = 1 << 20
WORKER_OVERHEAD = 32 * MiB  # a worker's own memory beside guest RAM (Python, C core, page tables)
DEFAULT_UIDS = (1_000_000, 65_536)  # first uid and how many: one per cell
DEFAULT_SPARES = 2
SPARE_DELAY_S = 0.02
TEARDOWN_WAIT_S = 5.0  # one cell teardown: 1 s to exit, 2 s after a kill, then its cgroup
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

NativeFactory = Callable[[str], Any]


class Lease(Protocol):
    factory: NativeFactory | None

    @property
    def watcher(self) -> Watcher | None: ...

    def info(self) -> CellInfo | None: ...

    def release(self) -> None: ...


class Placement(Protocol):
    def acquire(self, cell: str, limits: CellLimits, vm_id: str, ram_bytes: int) -> Lease: ...

    def settled(self) -> None:
        """A request that built VMs has been answered (or failed): the placement may
        prepare the next VM now, off any request's path."""

    def close(self) -> None: ...


# ---- --isolation none ----
class _SharedLease(Record, frozen=False):
    factory: NativeFactory | None
    name: str
    watcher: Watcher | None = None

    def info(self) -> CellInfo | None:
        return CellInfo(name=self.name, pid=0, uid=0, cpu_time_s=0.0, rss_bytes=0,
                        memory_bytes=0, limits=CellLimits(), shared=False)

    def release(self) -> None:
        pass


class SharedPlacement:
    """Every VM in the daemon's own process (trusted workloads, benchmarks)."""

    def __init__(self, factory: NativeFactory | None = None, *,
                 quiet: Quiet | None = None) -> None:
        """factory: makes each VM's core (a test's fake); None: the C core's, from a
        shelf that makes the next VM's KVM part between requests (vmmd/vm/shelf.py),
        once `quiet` says none is being served."""
        self._shelf = Shelf(quiet=quiet) if factory is None else None
        self._factory = factory if self._shelf is None else self._shelf.take

    def acquire(self, cell: str, limits: CellLimits, vm_id: str, ram_bytes: int) -> Lease:
        if limits != CellLimits():
            raise InvalidSpecError("limits", "limits need cells: this daemon runs with "
                                   "--isolation none")
        return _SharedLease(self._factory, cell)

    def settled(self) -> None:
        if self._shelf is not None:
            self._shelf.refill()

    def close(self) -> None:
        if self._shelf is not None:
            self._shelf.close()


# ---- cells ----
class Cell(Record, frozen=False, eq=False):
    name: str
    limits: CellLimits
    uid: int
    root: str
    channel: Channel | None = None
    pid: int = 0
    cgroup: Any = None
    report_fd: int = -1
    refs: int = 0
    ram_bytes: int = 0
    natives: set[RemoteNativeVm] = field(default_factory=set)
    dead: str | None = None
    reclaimed: bool = False  # its cgroup, root and uid given back (once)
    exited: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Its VMs' events come through its worker: a slow worker delays only these.
    watcher: Watcher = field(default_factory=Watcher)

    def info(self) -> CellInfo:
        cpu, rss = _proc_usage(self.pid) if self.dead is None else (0.0, 0)
        memory = 0
        if self.cgroup is not None and self.dead is None:
            try:
                memory = self.cgroup.usage().memory_bytes
            except (OSError, CgroupError):  # the cell's group just went (a delete racing)
                pass
        return CellInfo(name=self.name, pid=self.pid, uid=self.uid, cpu_time_s=cpu,
                        rss_bytes=rss, memory_bytes=memory, limits=self.limits,
                        shared=not self.name.startswith("@"))


def _proc_usage(pid: int) -> tuple[float, int]:
    """CPU seconds (all threads) and resident bytes of a process; zeros once gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read().split()
    except OSError:
        return 0.0, 0
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK, int(statm[1]) * _PAGE


class _CellLease(Record, frozen=False):
    pool: CellPlacement
    cell: Cell
    ram_bytes: int
    factory: NativeFactory | None = None
    released: bool = False

    def __post_init__(self) -> None:
        self.factory = self._native

    @property
    def watcher(self) -> Watcher:
        return self.cell.watcher

    def _native(self, kvm_path: str) -> RemoteNativeVm:
        cell = self.cell
        if cell.dead is not None or cell.channel is None:
            raise NativeError(f"create VM: cell {cell.name}'s worker {cell.dead}", errno.ESRCH)
        native = RemoteNativeVm(cell.channel, kvm_path, cell.name,
                                on_close=cell.natives.discard)
        with cell.lock:
            cell.natives.add(native)
            if cell.dead is not None:
                native.lost(cell.dead)
        return native

    def info(self) -> CellInfo | None:
        return self.cell.info()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.cell, self.ram_bytes)


class CellPlacement:
    """Cells: jailed workers forked by a zygote (see the module doc)."""

    def __init__(self, zygote_factory: Callable[[Callable[[int, int], None]], Zygote], *,
                 cgroups: Any = None, uids: tuple[int, int] = DEFAULT_UIDS,
                 run_dir: str = "/run", spares: int = DEFAULT_SPARES) -> None:
        """zygote_factory(on_exit): forks the zygote (before any thread).
        spares: workers kept spawned, jailed and in a cgroup of their own,
        ready to become a new cell: a new cell then costs its limits'
        writes, not a spawn (the spawn, ~10 ms of it attaching a process
        to cgroup v1 hierarchies, happens off the request path)."""
        self.log = get_logger(__name__)
        self._lock = threading.Lock()
        self._cells: dict[str, Cell] = {}
        self._by_pid: dict[int, Cell] = {}
        self._exits: dict[int, int] = {}  # pid -> status, for exits seen before the spawn returned
        self._uid_base, self._uid_count = uids
        self._free_uids = list(range(uids[0] + uids[1] - 1, uids[0] - 1, -1))
        self._cgroups = cgroups
        self._roots = tempfile.mkdtemp(prefix="vmmd-cells-", dir=run_dir)
        os.chmod(self._roots, 0o711)
        self._zygote = zygote_factory(self._on_exit)
        self._spares: list[Cell] = []
        self._spares_wanted = spares
        self._refill = threading.Event()
        self._closing = False
        self._teardowns: set[threading.Thread] = set()  # cells of deleted VMs going away
        if spares:
            self._refill.set()
            threading.Thread(target=self._keep_spares, name="cell-spares", daemon=True).start()

    # -- leases --
    def acquire(self, cell: str, limits: CellLimits, vm_id: str, ram_bytes: int) -> Lease:
        name = cell or f"@{vm_id}"
        need = ram_bytes + WORKER_OVERHEAD
        with self._lock:
            c = self._cells.get(name)
            if c is not None:
                if cell and limits != c.limits:
                    raise StateError(f"cell: cell {quoted(name)} has other limits "
                                     f"({_limits_text(c.limits)}); a VM joining it must ask "
                                     f"for the same ({_limits_text(limits)} asked)")
                if limits.memory_mib and c.ram_bytes + need > limits.memory_mib * MiB:
                    raise ResourceExhaustedError(
                        f"cell: cell {quoted(name)}'s memory limit {limits.memory_mib} MiB "
                        f"cannot hold another {ram_bytes // MiB} MiB of guest RAM "
                        f"({c.ram_bytes // MiB} MiB there)")
                c.refs += 1
                c.ram_bytes += ram_bytes
                return _CellLease(self, c, ram_bytes)
            if limits.memory_mib and need > limits.memory_mib * MiB:
                raise InvalidSpecError(("limits", "memory_mib"),
                                       f"{limits.memory_mib} MiB cannot hold the guest's "
                                       f"{ram_bytes // MiB} MiB of RAM and the worker's "
                                       f"{WORKER_OVERHEAD // MiB} MiB")
            if self._cgroups is None and limits != CellLimits():
                raise StateError("limits: this daemon has no cgroups to enforce them with "
                                 "(none were mounted when it started)")
            if not self._free_uids:
                raise ResourceExhaustedError(f"cells: all {self._uid_count} cell uids are in use")
            spare = next((s for s in self._spares if s.dead is None), None)
            if spare is not None:
                self._spares.remove(spare)
                self._refill.set()
                c, c.name, c.limits = spare, name, limits
            else:
                uid = self._free_uids.pop()
                # Its directory and cgroup are named by uid, unique among live
                # cells: a name's next cell never meets the last one's leftovers.
                c = Cell(name, limits, uid, os.path.join(self._roots, str(uid)))
            c.refs, c.ram_bytes = 1, ram_bytes
            self._cells[name] = c
        try:
            if spare is None:
                self._spawn(c)
            elif c.cgroup is not None and limits != CellLimits():
                c.cgroup.set_limits(cpu=limits.cpu or None,
                                    memory_bytes=limits.memory_mib * MiB or None,
                                    pids=limits.pids or None)
        except BaseException:
            with self._lock:
                del self._cells[name]
            self._teardown(c)
            raise
        return _CellLease(self, c, ram_bytes)

    def _keep_spares(self) -> None:
        """Keep `spares` workers ready (a thread of its own)."""
        while True:
            self._refill.wait()
            self._refill.clear()
            # Not at once: the request that took a spare is still building its
            # VM, and a spawn's fork and filter would take CPU from it.
            time.sleep(SPARE_DELAY_S)
            while True:
                with self._lock:
                    if self._closing or len(self._spares) >= self._spares_wanted or \
                            not self._free_uids:
                        break
                    c = Cell("", CellLimits(), self._free_uids.pop(), "")
                    c.root = os.path.join(self._roots, str(c.uid))
                try:
                    self._spawn(c)
                except Exception as e:  # noqa: BLE001 - spares are an optimisation
                    self.log.warning("cell.spare_failed", error=str(e))
                    self._teardown(c)
                    break
                with self._lock:
                    if self._closing:
                        break
                    self._spares.append(c)
            if self._closing:
                return

    def _release(self, c: Cell, ram_bytes: int) -> None:
        with self._lock:
            c.refs -= 1
            c.ram_bytes -= ram_bytes
            if c.refs > 0:
                return
            if self._cells.get(c.name) is c:
                del self._cells[c.name]
        # Off the caller's thread: DeleteVm does not wait for a process to die.
        t = threading.Thread(target=self._teardown, args=(c,), name="cell-teardown",
                             daemon=True)
        with self._lock:
            self._teardowns = {x for x in self._teardowns if x.is_alive()} | {t}
        t.start()

    # -- one cell's life --
    def _spawn(self, c: Cell) -> None:
        t = [time.perf_counter()]
        os.mkdir(c.root, 0o555)
        root_fd = os.open(c.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c.report_fd = report_r
        try:
            if self._cgroups is not None:
                lim = c.limits
                c.cgroup = self._cgroups.create(
                    str(c.uid), cpu=lim.cpu or None,
                    memory_bytes=lim.memory_mib * MiB if lim.memory_mib else None,
                    pids=lim.pids or None)
            t.append(time.perf_counter())
            c.channel = Channel(ours, lambda why: self._kill(c, why))
            c.pid = self._zygote.spawn(WorkerJail(c.name, c.uid, c.uid), theirs.fileno(),
                                       root_fd, report_w)
            t.append(time.perf_counter())
            with self._lock:
                self._by_pid[c.pid] = c
                status = self._exits.pop(c.pid, None)
            if c.cgroup is not None:
                c.cgroup.add(c.pid)
            t.append(time.perf_counter())
            if status is not None:
                self._on_exit(c.pid, status)
            # Ready: jailed and answering (the first call waits for the jail).
            c.channel.call(0, "ping", timeout_s=10.0)
            t.append(time.perf_counter())
        finally:
            os.close(root_fd)
            os.close(report_w)
            theirs.close()
        # Where a spawn's milliseconds went: cgroup made, forked, in its cgroup, answering.
        self.log.info("cell.spawned", cell=c.name, pid=c.pid, uid=c.uid,
                      ms=[round((b - a) * 1e3, 2) for a, b in zip(t, t[1:])])

    def _kill(self, c: Cell, why: str) -> None:
        self.log.error("cell.protocol_broken", cell=c.name, pid=c.pid, why=why)
        if c.pid:
            try:
                os.kill(c.pid, 9)
            except ProcessLookupError:
                pass

    def _on_exit(self, pid: int, status: int) -> None:
        """The zygote reaped a worker (its reader thread calls)."""
        with self._lock:
            c = self._by_pid.pop(pid, None)
            if c is None:
                self._exits[pid] = status
                return
        sig, text = exit_cause(status)
        report = self._seccomp_report(c)
        if report is not None:
            text = (f"was killed by its seccomp filter: system call {report.syscall_nr} "
                    f"({report.syscall_name}) is not allowed")
        elif self._oom_killed(c):
            text = (f"was killed by the OOM killer: its cell's memory limit is "
                    f"{c.limits.memory_mib} MiB")
        else:
            text = f"was {text}" if sig is not None else text
        why = f"cell {c.name}'s worker (pid {pid}) {text}"
        with c.lock:
            c.dead = why
            natives = list(c.natives)
        with self._lock:
            if self._cells.get(c.name) is c:
                del self._cells[c.name]  # the name's next VM gets a new worker
            if c in self._spares:
                self._spares.remove(c)
                self._refill.set()
        if c.channel is not None:
            c.channel.mark_dead(why)
        c.exited.set()
        if natives:
            self.log.error("cell.died", cell=c.name, pid=pid, cause=text, vms=len(natives))
        for n in natives:
            n.lost(why)
        # Its cgroup, root and uid go now; its VMs (crashed) stay until deleted.
        threading.Thread(target=self._reclaim, args=(c,), name="cell-reclaim",
                         daemon=True).start()

    def _seccomp_report(self, c: Cell) -> SeccompReport | None:
        try:
            return parse_seccomp_report(os.read(c.report_fd, REPORT_SIZE))
        except OSError:
            return None

    def _oom_killed(self, c: Cell) -> bool:
        try:
            return bool(c.cgroup is not None and c.cgroup.oom_killed())
        except OSError:
            return False

    def _teardown(self, c: Cell) -> None:
        """Stop the worker (its socket closes: it exits; killed if it does
        not), then the cgroup, its root and its uid.  Its VMs are gone: their
        watcher too (not at _reclaim: a dead worker's crashed VMs stay)."""
        c.watcher.close()
        if c.channel is not None:
            c.channel.close()
        if c.pid and not c.exited.wait(1.0):
            try:
                os.kill(c.pid, 9)
            except ProcessLookupError:
                pass
            c.exited.wait(2.0)
        self._reclaim(c)

    def _reclaim(self, c: Cell) -> None:
        """The cell's cgroup, root directory, report pipe and uid, once."""
        with self._lock:
            if c.reclaimed:
                return
            c.reclaimed = True
        if c.cgroup is not None:
            c.cgroup.remove()
        try:
            os.rmdir(c.root)
        except OSError:
            pass
        if c.report_fd >= 0:
            os.close(c.report_fd)
            c.report_fd = -1
        with self._lock:
            self._by_pid.pop(c.pid, None)
            self._free_uids.append(c.uid)

    def cells(self) -> list[Cell]:
        with self._lock:
            return list(self._cells.values())

    def settled(self) -> None:
        pass  # a cell's worker makes its VMs on demand; spare workers refill on their own

    def close(self) -> None:
        with self._lock:
            self._closing = True
            spares, self._spares = self._spares, []
        self._refill.set()
        for c in self.cells() + spares:
            self._teardown(c)
        # Cells of VMs deleted just before: their workers exit and their cgroups
        # go before the zygote and the cgroup parents do (else: "busy").
        with self._lock:
            teardowns, self._teardowns = self._teardowns, set()
        for t in teardowns:
            t.join(TEARDOWN_WAIT_S)
        self._zygote.close()
        if self._cgroups is not None:
            self._cgroups.close()
        shutil.rmtree(self._roots, ignore_errors=True)


def _limits_text(lim: CellLimits) -> str:
    parts = [f"cpu {lim.cpu:g}" if lim.cpu else "cpu unlimited",
             f"memory {lim.memory_mib} MiB" if lim.memory_mib else "memory unlimited",
             f"pids {lim.pids}" if lim.pids else "pids unlimited"]
    return ", ".join(parts)

