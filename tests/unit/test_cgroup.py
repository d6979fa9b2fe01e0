"""Cells' cgroups (vmmd/cell/cgroup.py) against fake trees in a temporary
directory: a mountinfo text as the kernel writes it, and hierarchies whose
groups get the control files the kernel would give them.  What is checked is
what gets written where; the real kernel is tests/native/test_cgroup_real.py."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from vmmd.cell import cgroup
from vmmd.cell.cgroup import (
    CgroupError,
    CgroupFs,
    CgroupTree,
    CgroupUsage,
    detect,
    parse_mountinfo,
)

MiB = 1 << 20
NOLIMIT_V1 = "9223372036854771712"

# This host's layout (Debian 12 on a 6.x kernel): every v1 subsystem on its
# own hierarchy, cpu and cpuacct apart, and a v2 "unified" mount that holds
# only what v1 did not take (hugetlb).
MOUNTINFO_V1 = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime shared:11 - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
# Debian 10 / systemd's v1 layout: cpu and cpuacct one hierarchy.
MOUNTINFO_V1_COMOUNTED = """\
31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:10 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid shared:14 - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,nosuid shared:15 - cgroup cgroup rw,pids
"""
MOUNTINFO_V2 = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""

V1_FILES: Mapping[str, Mapping[str, str]] = {
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n", "cpu.shares": "1024\n"},
    "cpuacct": {"cpuacct.usage": "0\n"},
    "memory": {"memory.limit_in_bytes": NOLIMIT_V1 + "\n",
               "memory.memsw.limit_in_bytes": NOLIMIT_V1 + "\n",
               "memory.usage_in_bytes": "0\n", "memory.failcnt": "0\n",
               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
}
V2_FILES: Mapping[str, str] = {
    "cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n",
    "cgroup.subtree_control": "\n", "cgroup.kill": "",
    "cpu.max": "max 100000\n", "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    "memory.max": "max\n", "memory.swap.max": "max\n", "memory.current": "0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "pids.max": "max\n", "pids.current": "0\n",
}


class FakeCgroupFs(CgroupFs):
    """The kernel's part: mkdir gives a group its hierarchy's files, rmdir of
    a group with members is EBUSY, kill empties cgroup.procs (unless
    `stuck`: a process that will not die)."""

    def __init__(self, hierarchies: Mapping[str, Mapping[str, str]]) -> None:
        self.hierarchies = {p: dict(files) for p, files in hierarchies.items()}
        self.killed: list[str] = []
        self.stuck = False

    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        point = next(p for p in self.hierarchies if path.startswith(p + "/"))
        populate(Path(path), self.hierarchies[point])

    def rmdir(self, path: str) -> None:
        group = Path(path)
        if not group.exists():
            raise FileNotFoundError(errno.ENOENT, "no such group", path)
        if (group / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, "group has members", path)
        for f in group.iterdir():
            f.unlink()  # a subgroup (a directory) makes this fail, as ENOTEMPTY would
        group.rmdir()

    def kill(self, group: str) -> None:
        self.killed.append(group)
        if not self.stuck:
            (Path(group) / "cgroup.procs").write_text("")


def populate(group: Path, files: Mapping[str, str]) -> None:
    for name, text in {"cgroup.procs": "", **files}.items():
        (group / name).write_text(text)


class Fake:
    """A root directory with /proc/self/{mountinfo,cgroup} and the hierarchies'
    root groups; `fs` creates groups under them as the kernel would."""

    def __init__(self, root: Path, mountinfo: str, hierarchies: Mapping[str, Mapping[str, str]],
                 own: str = "0::/\n") -> None:
        self.root = root
        (root / "proc/self").mkdir(parents=True)
        (root / "proc/self/mountinfo").write_text(mountinfo)
        (root / "proc/self/cgroup").write_text(own)
        tree = {}
        for point, files in hierarchies.items():
            (root / point).mkdir(parents=True)
            populate(root / point, files)
            tree[str(root / point)] = files
        self.fs = FakeCgroupFs(tree)

    def open(self, parent: str = "vmmd", **kw: object) -> CgroupTree:
        return CgroupTree.open(parent, root=str(self.root), fs=self.fs, **kw)  # type: ignore[arg-type]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()


def v1_split(tmp_path: Path) -> Fake:
    return Fake(tmp_path, MOUNTINFO_V1, {
        "sys/fs/cgroup/cpu": V1_FILES["cpu"], "sys/fs/cgroup/cpuacct": V1_FILES["cpuacct"],
        "sys/fs/cgroup/cpuset": {}, "sys/fs/cgroup/memory": V1_FILES["memory"],
        "sys/fs/cgroup/pids": V1_FILES["pids"], "sys/fs/cgroup/systemd": {},
        "sys/fs/cgroup/unified": {"cgroup.controllers": "hugetlb\n",
                                  "cgroup.subtree_control": ""},
    })


def v1_comounted(tmp_path: Path) -> Fake:
    return Fake(tmp_path, MOUNTINFO_V1_COMOUNTED, {
        "sys/fs/cgroup/cpu,cpuacct": {**V1_FILES["cpu"], **V1_FILES["cpuacct"]},
        "sys/fs/cgroup/memory": V1_FILES["memory"], "sys/fs/cgroup/pids": V1_FILES["pids"],
    })


def v2(tmp_path: Path, own: str = "0::/system.slice/vmmd.service\n") -> Fake:
    return Fake(tmp_path, MOUNTINFO_V2, {"sys/fs/cgroup": V2_FILES}, own=own)


# -- detection ---------------------------------------------------------------------------------


def test_mountinfo_fields_after_optional_ones_and_escapes() -> None:
    text = ("50 31 0:40 /sub /mnt/with\\040space rw shared:3 master:1 - cgroup cgroup rw,pids\n"
            "garbage line\n")
    [m] = parse_mountinfo(text)
    assert (m.root, m.point, m.fstype, m.super_options) == (
        "/sub", "/mnt/with space", "cgroup", ("rw", "pids"))


def test_this_hosts_v1_layout_with_cpu_and_cpuacct_apart(tmp_path: Path) -> None:
    fake = v1_split(tmp_path)
    layout = detect(str(tmp_path))
    assert layout.version == 1 and layout.missing == ()
    assert dict(layout.mounts) == {s: str(fake.path(f"sys/fs/cgroup/{s}"))
                                   for s in ("cpu", "cpuacct", "memory", "pids")}


def test_comounted_cpu_cpuacct_is_one_hierarchy(tmp_path: Path) -> None:
    fake = v1_comounted(tmp_path)
    tree = fake.open()
    assert tree.version == 1
    assert tree.dirs == tuple(str(fake.path(f"sys/fs/cgroup/{h}/vmmd"))
                              for h in ("cpu,cpuacct", "memory", "pids"))


def test_v2(tmp_path: Path) -> None:
    v2(tmp_path)
    layout = detect(str(tmp_path))
    assert layout.version == 2 and layout.controllers == {"cpu", "memory", "pids"}


def test_a_missing_controller_is_named(tmp_path: Path) -> None:
    Fake(tmp_path, MOUNTINFO_V1.replace("rw,cpuacct", "rw,blkio"),
         {"sys/fs/cgroup/cpu": {}, "sys/fs/cgroup/cpuacct": {}, "sys/fs/cgroup/memory": {},
          "sys/fs/cgroup/pids": {}, "sys/fs/cgroup/unified": {"cgroup.controllers": ""}})
    with pytest.raises(CgroupError, match=r"no cpu cgroup controller on this host \(cgroup v1 "
                                          r"without cpuacct mounted\)"):
        CgroupTree.open("vmmd", root=str(tmp_path), fs=FakeCgroupFs({}))


def test_v2_missing_controller_is_named(tmp_path: Path) -> None:
    fake = Fake(tmp_path, MOUNTINFO_V2, {"sys/fs/cgroup": {**V2_FILES,
                                                           "cgroup.controllers": "cpu memory\n"}})
    with pytest.raises(CgroupError, match=r"no pids cgroup controller .*cgroup v2 without pids "
                                          r"in .*/sys/fs/cgroup/cgroup.controllers"):
        fake.open()


def test_a_subset_when_asked_then_that_limit_is_refused(tmp_path: Path) -> None:
    fake = Fake(tmp_path, MOUNTINFO_V1.replace("rw,pids", "rw,blkio"),
                {"sys/fs/cgroup/cpu": V1_FILES["cpu"], "sys/fs/cgroup/cpuacct": V1_FILES["cpuacct"],
                 "sys/fs/cgroup/memory": V1_FILES["memory"], "sys/fs/cgroup/pids": {},
                 "sys/fs/cgroup/unified": {"cgroup.controllers": ""}})
    tree = fake.open(require=("cpu", "memory"))
    assert tree.controllers == {"cpu", "memory"}
    cell = tree.create("c", cpu=1.0, memory_bytes=MiB, pids=None)
    assert cell.usage() == CgroupUsage(cpu_ns=0, memory_bytes=0, pids=0)
    with pytest.raises(CgroupError, match="a pids limit was asked but this host has no pids"):
        tree.create("d", cpu=None, memory_bytes=None, pids=10)


def test_controllers_split_between_v1_and_v2_are_refused(tmp_path: Path) -> None:
    Fake(tmp_path, MOUNTINFO_V1.replace("rw,pids", "rw,blkio"),
         {"sys/fs/cgroup/unified": {"cgroup.controllers": "pids\n"}})
    with pytest.raises(CgroupError, match=r"split between v1 .* and v2 \(pids\)"):
        detect(str(tmp_path))


def test_no_cgroup_mounted(tmp_path: Path) -> None:
    Fake(tmp_path, "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n", {})
    with pytest.raises(CgroupError, match="no cgroup filesystem is mounted"):
        detect(str(tmp_path))


# -- limits ------------------------------------------------------------------------------------


def test_v1_limits_written(tmp_path: Path) -> None:
    fake = v1_split(tmp_path)
    tree = fake.open("vmmd-123")
    cell = tree.create("vm-1", cpu=0.25, memory_bytes=64 * MiB, pids=50)
    g = "sys/fs/cgroup/{}/vmmd-123/vm-1/"
    assert fake.read(g.format("cpu") + "cpu.cfs_period_us") == "100000"
    assert fake.read(g.format("cpu") + "cpu.cfs_quota_us") == "25000"
    assert fake.read(g.format("memory") + "memory.limit_in_bytes") == str(64 * MiB)
    assert fake.read(g.format("memory") + "memory.memsw.limit_in_bytes") == str(64 * MiB)
    assert fake.read(g.format("pids") + "pids.max") == "50"
    assert cell.dirs == tuple(str(fake.path(g.format(h)).parent / "vm-1")
                              for h in ("cpu", "cpuacct", "memory", "pids"))
    assert not fake.path("sys/fs/cgroup/cpuset/vmmd-123").exists()  # not ours to touch


@pytest.mark.parametrize(("cpu", "quota"), [(2.0, "200000"), (0.001, "1000"), (1.5, "150000")])
def test_cpu_fractions(tmp_path: Path, cpu: float, quota: str) -> None:
    fake = v1_split(tmp_path)
    fake.open().create("c", cpu=cpu, memory_bytes=None, pids=None)
    assert fake.read("sys/fs/cgroup/cpu/vmmd/c/cpu.cfs_quota_us") == quota


def test_none_leaves_the_kernels_defaults(tmp_path: Path) -> None:
    fake = v1_split(tmp_path)
    fake.open().create("c", cpu=None, memory_bytes=None, pids=None)
    assert fake.read("sys/fs/cgroup/cpu/vmmd/c/cpu.cfs_quota_us") == "-1\n"
    assert fake.read("sys/fs/cgroup/memory/vmmd/c/memory.limit_in_bytes") == NOLIMIT_V1 + "\n"
    assert fake.read("sys/fs/cgroup/pids/vmmd/c/pids.max") == "max\n"


def test_v1_without_swap_accounting(tmp_path: Path) -> None:
    memory = {k: v for k, v in V1_FILES["memory"].items() if "memsw" not in k}
    fake = Fake(tmp_path, MOUNTINFO_V1_COMOUNTED, {
        "sys/fs/cgroup/cpu,cpuacct": {**V1_FILES["cpu"], **V1_FILES["cpuacct"]},
        "sys/fs/cgroup/memory": memory, "sys/fs/cgroup/pids": V1_FILES["pids"]})
    fake.open().create("c", cpu=None, memory_bytes=MiB, pids=None)
    assert fake.read("sys/fs/cgroup/memory/vmmd/c/memory.limit_in_bytes") == str(MiB)
    assert not fake.path("sys/fs/cgroup/memory/vmmd/c/memory.memsw.limit_in_bytes").exists()


def test_v2_subtree_control_and_limits(tmp_path: Path) -> None:
    fake = v2(tmp_path)
    tree = fake.open()
    assert fake.read("sys/fs/cgroup/cgroup.subtree_control") == "+cpu +memory +pids"
    assert fake.read("sys/fs/cgroup/vmmd/cgroup.subtree_control") == "+cpu +memory +pids"
    cell = tree.create("@snap.1", cpu=0.25, memory_bytes=64 * MiB, pids=50)
    assert cell.dirs == (str(fake.path("sys/fs/cgroup/vmmd/@snap.1")),)
    g = "sys/fs/cgroup/vmmd/@snap.1/"
    assert fake.read(g + "cpu.max") == "25000 100000"
    assert fake.read(g + "memory.max") == str(64 * MiB)
    assert fake.read(g + "memory.swap.max") == "0"
    assert fake.read(g + "pids.max") == "50"


def test_v2_enabled_controllers_are_not_written_again(tmp_path: Path) -> None:
    fake = v2(tmp_path)
    fake.path("sys/fs/cgroup/cgroup.subtree_control").write_text("cpu io memory pids\n")
    fake.open()
    assert fake.read("sys/fs/cgroup/cgroup.subtree_control") == "cpu io memory pids\n"


def test_v2_daemon_inside_its_parent_group_is_refused(tmp_path: Path) -> None:
    fake = v2(tmp_path, own="0::/vmmd\n")
    with pytest.raises(CgroupError, match="the daemon itself is in its cells' parent cgroup /vmmd"):
        fake.open()


def test_v2_ebusy_on_subtree_control_is_explained(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake = v2(tmp_path)

    def busy(path: str, text: str) -> None:
        raise CgroupError("cannot write", path, errno.EBUSY)

    monkeypatch.setattr(cgroup, "_write", busy)
    with pytest.raises(CgroupError, match=r"the group has processes of its own .*"
                                          r"/sys/fs/cgroup/cgroup.subtree_control: .*\(EBUSY\)"):
        fake.open()


def test_a_write_error_names_the_file_and_errno(tmp_path: Path) -> None:
    fake = v2(tmp_path)
    fake.path("sys/fs/cgroup/cgroup.subtree_control").unlink()
    fake.path("sys/fs/cgroup/cgroup.subtree_control").mkdir()  # opening it to read: EISDIR
    with pytest.raises(CgroupError, match=r"/sys/fs/cgroup/cgroup.subtree_control: .*\(EISDIR\)"):
        fake.open()


# -- processes, usage, OOM ---------------------------------------------------------------------


def test_add_writes_the_pid_once_per_hierarchy(tmp_path: Path) -> None:
    for make, n in ((v1_split, 4), (v1_comounted, 3), (v2, 1)):
        fake = make(tmp_path / make.__name__)
        cell = fake.open().create("c", cpu=None, memory_bytes=None, pids=None)
        cell.add(4242)
        assert [Path(d, "cgroup.procs").read_text() for d in cell.dirs] == ["4242"] * n


def test_v1_usage_and_oom(tmp_path: Path) -> None:
    fake = v1_split(tmp_path)
    cell = fake.open().create("c", cpu=None, memory_bytes=None, pids=None)
    g = "sys/fs/cgroup/{}/vmmd/c/"
    fake.path(g.format("cpuacct") + "cpuacct.usage").write_text("1234567\n")
    fake.path(g.format("memory") + "memory.usage_in_bytes").write_text("4096\n")
    fake.path(g.format("pids") + "pids.current").write_text("3\n")
    assert cell.usage() == CgroupUsage(cpu_ns=1234567, memory_bytes=4096, pids=3)
    assert not cell.oom_killed()
    fake.path(g.format("memory") + "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cell.oom_kills() == 2 and cell.oom_killed()
    # A kernel before 4.13 has no count: the limit having been hit is the hint.
    fake.path(g.format("memory") + "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\n")
    assert not cell.oom_killed()
    fake.path(g.format("memory") + "memory.failcnt").write_text("17\n")
    assert cell.oom_kills() == 1


def test_v2_usage_and_oom(tmp_path: Path) -> None:
    fake = v2(tmp_path)
    cell = fake.open().create("c", cpu=None, memory_bytes=None, pids=None)
    g = "sys/fs/cgroup/vmmd/c/"
    fake.path(g + "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    fake.path(g + "memory.current").write_text("8192\n")
    fake.path(g + "pids.current").write_text("2\n")
    assert cell.usage() == CgroupUsage(cpu_ns=1_500_000, memory_bytes=8192, pids=2)
    fake.path(g + "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    assert cell.oom_kills() == 1


# -- removal -----------------------------------------------------------------------------------


def test_stale_group_is_killed_and_made_anew(tmp_path: Path) -> None:
    fake = v1_split(tmp_path)
    tree = fake.open()
    old = tree.create("c", cpu=None, memory_bytes=None, pids=7)
    for d in old.dirs:
        Path(d, "cgroup.procs").write_text("111\n222\n")
    # A new daemon: the parent group is there already, and the cell in it.
    cell = fake.open().create("c", cpu=None, memory_bytes=None, pids=None)
    assert fake.fs.killed == list(old.dirs)
    assert cell.dirs == old.dirs
    assert all(Path(d, "cgroup.procs").read_text() == "" for d in cell.dirs)
    assert fake.read("sys/fs/cgroup/pids/vmmd/c/pids.max") == "max\n"  # the old limit went


@pytest.mark.parametrize("layout", [v1_split, v2])
def test_a_previous_daemons_cells_go_when_its_parent_is_opened_again(
        tmp_path: Path, layout: Callable[[Path], Fake]) -> None:
    """A daemon killed leaves its parent group and its cells' groups; a new daemon
    of the same name (its pid reused) removes those cells at once, their processes
    killed, so that its own close can remove the parent."""
    fake = layout(tmp_path)
    old = fake.open("vmmd-7")
    cells = [old.create(name, cpu=None, memory_bytes=None, pids=None) for name in ("@a", "web")]
    for d in cells[0].dirs:
        Path(d, "cgroup.procs").write_text("111\n")
    tree = fake.open("vmmd-7")
    assert not any(os.path.exists(d) for c in cells for d in c.dirs)
    assert fake.fs.killed == list(cells[0].dirs)
    assert tree.close()
    assert not any(os.path.exists(d) for d in tree.dirs)


def test_a_stale_cell_that_will_not_go_does_not_stop_the_daemon(tmp_path: Path) -> None:
    fake = v2(tmp_path)
    stale = fake.open().create("c", cpu=None, memory_bytes=None, pids=None)
    Path(stale.dirs[0], "cgroup.procs").write_text("111\n")
    fake.fs.stuck = True
    tree = fake.open()  # tried (its process killed), logged, and left
    assert fake.fs.killed and os.path.isdir(stale.dirs[0])
    assert tree.close() is False


def test_a_stale_group_that_will_not_go_is_an_error(tmp_path: Path) -> None:
    fake = v2(tmp_path)
    tree = fake.open()
    old = tree.create("c", cpu=None, memory_bytes=None, pids=None)
    Path(old.dirs[0], "cgroup.procs").write_text("111\n")
    fake.fs.stuck = True
    with pytest.raises(CgroupError, match="a stale cgroup of a previous daemon would not go away"):
        tree.create("c", cpu=None, memory_bytes=None, pids=None)


def test_remove_kills_waits_and_removes(tmp_path: Path) -> None:
    fake = v1_comounted(tmp_path)
    tree = fake.open()
    cell = tree.create("c", cpu=0.5, memory_bytes=None, pids=None)
    cell.add(4242)
    assert cell.remove()
    assert not any(os.path.exists(d) for d in cell.dirs)
    assert cell.remove()  # gone already: not an error
    assert tree.close()
    assert not any(os.path.exists(d) for d in tree.dirs)


def test_remove_gives_up_in_time_and_does_not_raise(tmp_path: Path) -> None:
    fake = v2(tmp_path)
    cell = fake.open().create("c", cpu=None, memory_bytes=None, pids=None)
    cell.add(4242)
    fake.fs.stuck = True
    assert cell.remove(timeout_s=0.05) is False
    assert fake.fs.killed and os.path.isdir(cell.dirs[0])


def test_close_leaves_a_parent_with_cells(tmp_path: Path) -> None:
    fake = v2(tmp_path)
    tree = fake.open()
    tree.create("c", cpu=None, memory_bytes=None, pids=None)
    assert tree.close() is False
    assert fake.path("sys/fs/cgroup/vmmd/c").is_dir()


def test_close_waits_out_a_moment_of_ebusy(tmp_path: Path) -> None:
    """cgroup v1 answers EBUSY for a moment after the last child group went:
    close() tries again (it used to leave the parent behind, logged)."""
    fake = v2(tmp_path)
    tree = fake.open()
    rmdir, busy = fake.fs.rmdir, [3]

    def flaky(path: str) -> None:
        if busy[0]:
            busy[0] -= 1
            raise OSError(errno.EBUSY, "a child group still going", path)
        rmdir(path)

    fake.fs.rmdir = flaky  # type: ignore[method-assign]
    assert tree.close() is True
    assert not fake.path("sys/fs/cgroup/vmmd").exists()
    busy[0] = 10**6  # never goes: given up in time, logged, not raised
    tree2 = fake.open()
    assert tree2.close(timeout_s=0.05) is False


def test_real_kill_uses_cgroup_kill_where_there_is_one(tmp_path: Path) -> None:
    group = tmp_path / "g"
    group.mkdir()
    populate(group, {"cgroup.kill": ""})
    (group / "cgroup.procs").write_text("1\n")  # never signalled: cgroup.kill does it
    CgroupFs().kill(str(group))
    assert (group / "cgroup.kill").read_text() == "1"


def test_a_failed_limit_leaves_no_group(tmp_path: Path) -> None:
    fake = v1_split(tmp_path)
    tree = fake.open()
    del fake.fs.hierarchies[str(fake.path("sys/fs/cgroup/pids"))]["pids.max"]
    with pytest.raises(CgroupError, match=r"pids/vmmd/c/pids.max: .*\(ENOENT\)"):
        tree.create("c", cpu=None, memory_bytes=None, pids=5)
    assert not any(fake.path(f"sys/fs/cgroup/{h}/vmmd/c").exists()
                   for h in ("cpu", "cpuacct", "memory", "pids"))


# -- names and files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", ".hidden", "-x", "_x", "a b", "a\n",
                                  "x" * 66, "/abs", "vm\x00"])
def test_names_refused(tmp_path: Path, name: str) -> None:
    tree = v1_split(tmp_path).open()
    with pytest.raises(ValueError, match="is not a cgroup name"):
        tree.create(name, cpu=None, memory_bytes=None, pids=None)


@pytest.mark.parametrize("name", ["vm-1", "@snap", "A.b_c-d@e", "x" * 65, "0"])
def test_names_accepted(tmp_path: Path, name: str) -> None:
    v1_split(tmp_path).open().create(name, cpu=None, memory_bytes=None, pids=None)


@pytest.mark.parametrize(("kw", "problem"), [({"cpu": 0.0}, "cpu limit"),
                                             ({"cpu": float("nan")}, "cpu limit"),
                                             ({"memory_bytes": 0}, "memory limit"),
                                             ({"pids": -1}, "pids limit")])
def test_bad_limits(tmp_path: Path, kw: dict[str, float], problem: str) -> None:
    tree = v1_split(tmp_path).open()
    args: dict[str, float | None] = {"cpu": None, "memory_bytes": None, "pids": None, **kw}
    with pytest.raises(ValueError, match=problem):
        tree.create("c", **args)  # type: ignore[arg-type]


def test_a_symlink_for_a_control_file_is_not_followed(tmp_path: Path) -> None:
    fake = v1_split(tmp_path)
    tree = fake.open()
    cell = tree.create("c", cpu=None, memory_bytes=None, pids=None)
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    procs = Path(cell.dirs[0], "cgroup.procs")
    procs.unlink()
    procs.symlink_to(target)
    with pytest.raises(CgroupError, match=r"cpu/vmmd/c/cgroup.procs: .*\(ELOOP\)") as e:
        cell.add(1)
    assert e.value.errno == errno.ELOOP and e.value.path == str(procs)
    assert target.read_text() == "untouched"
