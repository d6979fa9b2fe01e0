"""The cgroups of cells: one group per cell, with CPU, memory and pids limits,
its usage, its OOM kills, and its removal (processes and all).

Layout: `<mount>/<parent>/<cell>` in each hierarchy we use, where `<parent>`
is the daemon's group (`vmmd`, or `vmmd-<pid>`: the caller names it) at the
root of the hierarchy.  The cgroup version is read once, at `CgroupTree.open`,
from /proc/self/mountinfo:

- v1: one hierarchy per mount; `cpu` and `cpuacct` may be one hierarchy
  (`cpu,cpuacct`, with symlinks) or two.  We use cpu (the quota), cpuacct (CPU
  time used), memory and pids; a cell's group is made in each hierarchy that
  holds one of them, once per hierarchy.
- v2: one unified tree.  Controllers reach a group only through its parent's
  `cgroup.subtree_control`, and a group with processes of its own cannot hand
  them on ("no internal processes"), so the daemon must not live in its own
  parent group; the hierarchy's root is exempt.
- hybrid (v1 controllers and a v2 `unified` mount): a controller lives in one
  hierarchy only, so ours are on v1 and this is v1.

Every control file is opened O_WRONLY | O_NOFOLLOW, never created: a cgroup
file that is missing means a controller that is, and a symlink in a group
directory is not the kernel's.  Every wait is bounded; removal logs and
returns False rather than hang the daemon.

A leaf: imports nothing of vmmd but errors and log.  The filesystem's own
behaviour (mkdir fills a group with its files, rmdir takes them away, killing
the members) sits behind `CgroupFs`, so the unit tests run against a fake
tree in a temporary directory (`root`).
"""

from __future__ import annotations

import errno
import math
import os
import posixpath
import re
import signal
import time
from collections.abc import Collection, Mapping

from vmmd.errors import VmmError
from vmmd.log import get_logger
from vmmd.record import Record

log = get_logger(__name__)

CONTROLLERS = ("cpu", "memory", "pids")
# The v1 subsystems behind each controller: v1 counts CPU time in cpuacct.
V1_SUBSYSTEMS: Mapping[str, tuple[str, ...]] = {
    "cpu": ("cpu", "cpuacct"), "memory": ("memory",), "pids": ("pids",),
}
CFS_PERIOD_US = 100_000  # the kernel's default period: the quota is a share of it
MIN_QUOTA_US = 1_000  # the kernel refuses a smaller quota (v1 and v2)
# A cell's name becomes a directory name: VM ids' rule, plus "@" for the
# daemon's own cells; ".." anywhere is refused besides (never a path).
_NAME = re.compile(r"[A-Za-z0-9@][A-Za-z0-9_.@-]{0,64}")
_POLL_S = 0.01


class CgroupError(VmmError):
    """A cgroup operation failed: `path` is the file or directory, `errno`
    the kernel's answer (0 when the problem is ours to say)."""

    def __init__(self, problem: str, path: str = "", err: int | None = 0) -> None:
        self.path = path
        self.errno = err = err or 0
        text = f"{problem}: {path}" if path else problem
        if err:
            text += f": {os.strerror(err)} ({errno.errorcode.get(err, str(err))})"
        super().__init__(text)


class CgroupUsage(Record):
    cpu_ns: int  # CPU time used by the cell's processes since the group was made
    memory_bytes: int  # memory charged to the group now (page cache included)
    pids: int  # tasks (processes and threads) in the group now


class Mount(Record):
    """One line of /proc/self/mountinfo, the fields we use."""

    root: str  # the path inside the filesystem that is mounted (a cgroup's path)
    point: str  # where it is mounted
    fstype: str
    super_options: tuple[str, ...]  # v1 names its subsystems here (rw,cpu,cpuacct)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo text.  Optional fields (shared:N ...) vary
    in number, so the fields after them are found from the "-" separator."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        mounts.append(Mount(root=_unescape(fields[3]), point=_unescape(fields[4]),
                            fstype=fields[sep + 1],
                            super_options=tuple(fields[sep + 3].split(","))))
    return mounts


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class Layout(Record):
    """Where this host keeps our controllers."""

    version: int  # 1 or 2
    # v1: subsystem (cpu, cpuacct, memory, pids) -> its hierarchy's mount
    # point, those mounted; v2: each controller -> the unified mount point.
    mounts: Mapping[str, str]
    mount_root: str  # v2: the cgroup path the unified mount shows ("/" but in a namespace)
    missing: tuple[str, ...]  # controllers of CONTROLLERS this host does not have
    detail: str  # why they are missing, for the message

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(c for c in CONTROLLERS if c not in self.missing)


def detect(root: str = "/") -> Layout:
    """Which cgroup version the host uses for our controllers, and where."""
    info = _under(root, "/proc/self/mountinfo")
    mounts = parse_mountinfo(_read(info))
    wanted_v1 = {s for subs in V1_SUBSYSTEMS.values() for s in subs}
    v1: dict[str, str] = {}
    for m in mounts:
        if m.fstype == "cgroup":
            for opt in m.super_options:
                if opt in wanted_v1:
                    v1.setdefault(opt, _under(root, m.point))
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v2: set[str] = set()
    if unified is not None:
        v2 = set(_read(_under(root, unified.point, "cgroup.controllers")).split())
    if v1:
        missing = tuple(c for c in CONTROLLERS if any(s not in v1 for s in V1_SUBSYSTEMS[c]))
        split = [c for c in missing if c in v2]
        if split:
            raise CgroupError(f"cgroup controllers split between v1 ({', '.join(sorted(v1))}) "
                              f"and v2 ({', '.join(split)}): vmmd needs them on one version")
        absent = [s for c in missing for s in V1_SUBSYSTEMS[c] if s not in v1]
        detail = f"cgroup v1 without {', '.join(absent)} mounted" if absent else ""
        return Layout(1, v1, "/", missing, detail)
    if unified is None:
        raise CgroupError(f"no cgroup filesystem is mounted (no cgroup or cgroup2 line in {info})")
    point = _under(root, unified.point)
    missing = tuple(c for c in CONTROLLERS if c not in v2)
    detail = (f"cgroup v2 without {', '.join(missing)} in "
              f"{posixpath.join(point, 'cgroup.controllers')}") if missing else ""
    # Every group is in the one tree, whichever controllers it has.
    return Layout(2, dict.fromkeys(CONTROLLERS, point), unified.root, missing, detail)


class CgroupFs:
    """What only the cgroup filesystem does: mkdir fills a group with its
    control files, rmdir takes a group with its files away, and a group's
    members can be killed.  The unit tests' fake tree replaces it."""

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def kill(self, group: str) -> None:
        """SIGKILL every process in `group`.  v2 (5.14+) has cgroup.kill, which
        also catches processes forked meanwhile.  Otherwise each member gets
        the signal through a pidfd opened before the member list is read
        again: a pid listed, then reused by a process outside the group, is
        never signalled (the pidfd names the old one, which is dead)."""
        kill_file = posixpath.join(group, "cgroup.kill")
        if os.path.exists(kill_file):
            _write(kill_file, "1")
            return
        procs = posixpath.join(group, "cgroup.procs")
        fds: dict[int, int] = {}
        try:
            for pid in _pids(_read(procs)):
                try:
                    fds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    pass
            members = set(_pids(_read(procs)))
            for pid, fd in fds.items():
                if pid in members:
                    try:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        finally:
            for fd in fds.values():
                os.close(fd)


class CgroupTree:
    """The daemon's parent group in each hierarchy; cells' groups go under it."""

    def __init__(self, layout: Layout, parent_name: str, fs: CgroupFs) -> None:
        self.layout = layout
        self.parent_name = parent_name
        self._fs = fs
        # subsystem (v1) or controller (v2) -> our parent group in its hierarchy
        self._parents = {k: posixpath.join(p, parent_name) for k, p in layout.mounts.items()}

    @property
    def version(self) -> int:
        return self.layout.version

    @property
    def controllers(self) -> frozenset[str]:
        return self.layout.controllers

    @property
    def dirs(self) -> tuple[str, ...]:
        """Our parent group's directory in each hierarchy, once each."""
        return tuple(dict.fromkeys(self._parents.values()))

    @classmethod
    def open(cls, parent_name: str, *, require: Collection[str] = CONTROLLERS,
             root: str = "/", fs: CgroupFs | None = None) -> CgroupTree:
        """Find the hierarchies, check the controllers in `require` are there
        (the others may be missing: then a cell cannot be given that limit)
        and make our parent group.  An existing one is a previous daemon's of
        the same name (`vmmd-<pid>`: a pid reused after a daemon was killed):
        its cells' groups are stale, and go now, their processes killed
        (`_sweep`); left there, they would keep this daemon from removing
        its parent at exit."""
        check_name(parent_name)
        unknown = set(require) - set(CONTROLLERS)
        if unknown:
            raise ValueError(f"unknown cgroup controllers {sorted(unknown)}")
        layout = detect(root)
        missing = [c for c in layout.missing if c in require]
        if missing:
            raise CgroupError(f"no {', '.join(missing)} cgroup controller on this host "
                              f"({layout.detail}); vmmd needs it for the cells' limits")
        tree = cls(layout, parent_name, fs or CgroupFs())
        if layout.version == 2:
            tree._check_not_inside(root)
        existed = False
        for d in tree.dirs:
            try:
                tree._fs.mkdir(d)
            except FileExistsError:
                existed = True
            except OSError as e:
                raise CgroupError("cannot make the daemon's cgroup", d, e.errno) from None
        if existed:
            tree._sweep()
        if layout.version == 2:
            point = next(iter(layout.mounts.values()))
            tree._enable(point)
            tree._enable(tree.dirs[0])
        return tree

    def _sweep(self) -> None:
        """Remove the cell groups a previous daemon left in our parent group.
        Never raises: a group that will not go is logged (CellCgroup.remove)
        and stays, as it would have without the sweep."""
        names: set[str] = set()
        for d in self.dirs:
            try:
                names |= {e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False)}
            except OSError as e:
                log.warning("cgroup.sweep_failed", dir=d, error=e.strerror)
        for name in sorted(names):
            group = CellCgroup(name, self.version, self.controllers,
                               {k: posixpath.join(p, name) for k, p in self._parents.items()},
                               self._fs)
            log.warning("cgroup.stale_group", cell=name, dirs=list(group.dirs))
            group.remove()

    def _check_not_inside(self, root: str) -> None:
        # v2: our parent group hands controllers to the cells, so it must
        # have no process of its own; the daemon in it would make that fail
        # later with a bare EBUSY.
        text = _read(_under(root, "/proc/self/cgroup"))
        own = next((line[3:] for line in text.splitlines() if line.startswith("0::")), None)
        group = posixpath.join(self.layout.mount_root, self.parent_name)
        if own == group:
            raise CgroupError(f"the daemon itself is in its cells' parent cgroup {group} (cgroup "
                              "v2 lets only a group without processes hand controllers to "
                              "its children): start it in another group or name another parent")

    def _enable(self, group: str) -> None:
        path = posixpath.join(group, "cgroup.subtree_control")
        enabled = set(_read(path).split())
        wanted = [c for c in CONTROLLERS if c in self.controllers and c not in enabled]
        if not wanted:
            return  # written only when needed: a delegated root may not let us
        try:
            _write(path, " ".join(f"+{c}" for c in wanted))
        except CgroupError as e:
            if e.errno == errno.EBUSY:
                raise CgroupError(f"cannot enable {', '.join(wanted)} for the cells: the group has "
                                  "processes of its own (cgroup v2 lets only a group without "
                                  "processes hand controllers to its children)",
                                  path, e.errno) from None
            raise

    def create(self, cell: str, *, cpu: float | None, memory_bytes: int | None,
               pids: int | None) -> CellCgroup:
        """A cell's group with its limits; None leaves that kind unlimited.
        cpu: a fraction of one core (0.25 a quarter of one, 2.0 two whole
        ones).  A group of the name left by a daemon that died is removed
        first, its processes killed."""
        check_name(cell)
        _check_limits(cpu, memory_bytes, pids)
        for kind, value in (("cpu", cpu), ("memory", memory_bytes), ("pids", pids)):
            if value is not None and kind not in self.controllers:
                raise CgroupError(f"cell {cell}: a {kind} limit was asked but this host has no "
                                  f"{kind} cgroup controller ({self.layout.detail})")
        group = CellCgroup(cell, self.version, self.controllers,
                           {k: posixpath.join(p, cell) for k, p in self._parents.items()}, self._fs)
        stale = [d for d in group.dirs if os.path.lexists(d)]
        if stale:
            log.warning("cgroup.stale_group", cell=cell, dirs=stale)
            if not group.remove():
                raise CgroupError("a stale cgroup of a previous daemon would not go away",
                                  stale[0])
        try:
            for d in group.dirs:
                try:
                    self._fs.mkdir(d)
                except OSError as e:
                    raise CgroupError("cannot make a cell's cgroup", d, e.errno) from None
            group._limit(cpu, memory_bytes, pids)
        except BaseException:
            group.remove()
            raise
        return group

    def close(self, timeout_s: float = 1.0) -> bool:
        """Remove our parent group where it is empty; False (logged) where
        a cell's group is still in it.  EBUSY is tried again until
        `timeout_s`: cgroup v1 answers it for a moment after the last
        child group went (seen at daemon shutdown, right after a cell's)."""
        deadline = time.monotonic() + timeout_s
        ok = True
        for d in self.dirs:
            while True:
                try:
                    self._fs.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(_POLL_S)
                        continue
                    log.warning("cgroup.parent_left", dir=d, error=e.strerror)
                    ok = False
                break
        return ok


class CellCgroup:
    """One cell's group, in each hierarchy we use."""

    def __init__(self, name: str, version: int, controllers: frozenset[str],
                 groups: Mapping[str, str], fs: CgroupFs) -> None:
        self.name = name
        self.version = version
        self.controllers = controllers
        self._groups = dict(groups)  # subsystem (v1) or controller (v2) -> directory
        self._fs = fs

    @property
    def dirs(self) -> tuple[str, ...]:
        """The group's directory in each hierarchy, once each (v2: one)."""
        return tuple(dict.fromkeys(self._groups.values()))

    def _file(self, kind: str, name: str) -> str:
        return posixpath.join(self._groups[kind], name)

    def set_limits(self, *, cpu: float | None, memory_bytes: int | None,
                   pids: int | None) -> None:
        """Limits for a group made without (a spare cell's, taken by a cell)."""
        _check_limits(cpu, memory_bytes, pids)
        self._limit(cpu, memory_bytes, pids)

    def _limit(self, cpu: float | None, memory_bytes: int | None, pids: int | None) -> None:
        if cpu is not None:
            quota = max(MIN_QUOTA_US, round(cpu * CFS_PERIOD_US))
            if self.version == 1:
                # The period first: the kernel checks the quota against it.
                _write(self._file("cpu", "cpu.cfs_period_us"), str(CFS_PERIOD_US))
                _write(self._file("cpu", "cpu.cfs_quota_us"), str(quota))
            else:
                _write(self._file("cpu", "cpu.max"), f"{quota} {CFS_PERIOD_US}")
        if memory_bytes is not None:
            # No swap besides the limit: a cell over it is OOM-killed, not
            # pushed to swap where it would slow the host.  v1's memory+swap
            # limit may not be under the memory limit, hence after it.
            if self.version == 1:
                _write(self._file("memory", "memory.limit_in_bytes"), str(memory_bytes))
                memsw = self._file("memory", "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw):  # only with swap accounting
                    _write(memsw, str(memory_bytes))
            else:
                _write(self._file("memory", "memory.max"), str(memory_bytes))
                swap = self._file("memory", "memory.swap.max")
                if os.path.exists(swap):
                    _write(swap, "0")
        if pids is not None:
            _write(self._file("pids", "pids.max"), str(pids))

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the group, in every hierarchy."""
        for d in self.dirs:
            _write(posixpath.join(d, "cgroup.procs"), str(pid))

    def usage(self) -> CgroupUsage:
        """What the group uses; 0 for a controller the host does not have."""
        cpu_ns = memory = pids = 0
        if self.version == 1:
            if "cpu" in self.controllers:
                cpu_ns = int(_read(self._file("cpuacct", "cpuacct.usage")))
            if "memory" in self.controllers:
                memory = int(_read(self._file("memory", "memory.usage_in_bytes")))
        else:
            # cpu.stat is in every v2 group, with or without the cpu controller.
            stat = _keyed(_read(posixpath.join(self.dirs[0], "cpu.stat")))
            cpu_ns = stat.get("usage_usec", 0) * 1000
            if "memory" in self.controllers:
                memory = int(_read(self._file("memory", "memory.current")))
        if "pids" in self.controllers:
            pids = int(_read(self._file("pids", "pids.current")))
        return CgroupUsage(cpu_ns=cpu_ns, memory_bytes=memory, pids=pids)

    def oom_kills(self) -> int:
        """Processes the OOM killer killed inside this group's memory limit.
        A v1 kernel older than 4.13 does not count them: then 1 if the limit
        was ever hit (memory.failcnt), a hint only."""
        if "memory" not in self.controllers:
            return 0
        if self.version == 2:
            return _keyed(_read(self._file("memory", "memory.events"))).get("oom_kill", 0)
        control = _keyed(_read(self._file("memory", "memory.oom_control")))
        if "oom_kill" in control:
            return control["oom_kill"]
        return 1 if int(_read(self._file("memory", "memory.failcnt"))) > 0 else 0

    def oom_killed(self) -> bool:
        return self.oom_kills() > 0

    def remove(self, timeout_s: float = 1.0) -> bool:
        """Kill what is left in the group, wait until it is empty and remove
        it.  A group already gone is removed; never raises: what will not go
        within `timeout_s` is logged and False returned (the daemon must not
        hang on a process stuck in the kernel)."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.dirs)
        problem = ""
        while True:
            for d in list(pending):
                try:
                    if _pids(_read(posixpath.join(d, "cgroup.procs"))):
                        self._fs.kill(d)
                        continue
                    self._fs.rmdir(d)
                    pending.remove(d)
                except (CgroupError, OSError) as e:
                    err = e.errno
                    if err == errno.ENOENT:
                        pending.remove(d)  # gone already (or never made)
                    else:
                        problem = str(e)  # EBUSY: the last member still exiting
            if not pending:
                return True
            if time.monotonic() >= deadline:
                log.error("cgroup.remove_timeout", cell=self.name, dirs=pending,
                          timeout_s=timeout_s, problem=problem)
                return False
            time.sleep(_POLL_S)


def check_name(name: str) -> None:
    """A cell's (or the parent group's) name: it becomes a directory name."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{name!r} is not a cgroup name: 1 to 65 characters of letters, "
                         "digits, _ . @ -, starting with a letter, digit or @, no '..'")


def _check_limits(cpu: float | None, memory_bytes: int | None, pids: int | None) -> None:
    if cpu is not None and not (math.isfinite(cpu) and cpu > 0):
        raise ValueError(f"cpu limit {cpu!r}: a positive fraction of cores")
    for kind, value in (("memory", memory_bytes), ("pids", pids)):
        if value is not None and value <= 0:
            raise ValueError(f"{kind} limit {value!r}: a positive number")


def _under(root: str, path: str, *more: str) -> str:
    return posixpath.join(root, path.lstrip("/"), *more)


def _write(path: str, text: str) -> None:
    """One write(2) of the whole value: a cgroup file parses each write.
    O_TRUNC is a no-op on cgroupfs; it keeps the fake tree's files exact."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as e:
        raise CgroupError(f"cannot open a cgroup file to write {text!r}", path, e.errno) from None
    try:
        data = text.encode()
        if os.write(fd, data) != len(data):
            raise CgroupError(f"short write of {text!r}", path)
    except OSError as e:
        raise CgroupError(f"cannot write {text!r}", path, e.errno) from None
    finally:
        os.close(fd)


def _read(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CgroupError("cannot open", path, e.errno) from None
    try:
        chunks: list[bytes] = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    except OSError as e:
        raise CgroupError("cannot read", path, e.errno) from None
    finally:
        os.close(fd)


def _pids(text: str) -> list[int]:
    return [int(p) for p in text.split()]


def _keyed(text: str) -> dict[str, int]:
    """"key value" lines (cpu.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out
