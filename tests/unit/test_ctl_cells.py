"""vmmctl's human output of a VM's cell (no daemon): the CELL and PID columns and `get`'s
cell line, whether the daemon tells the cell or not."""

from __future__ import annotations

from vmmd.cli import ctl
from vmmd.client import pb


def row(vm: pb.Vm) -> list[str]:
    header, line = ctl.vm_table([vm]).splitlines()
    assert header.split() == ["ID", "STATE", "VCPUS", "MEM", "UPTIME", "CELL", "PID", "STOP"]
    return line.split()


def test_the_columns_are_the_told_cell_else_the_configs() -> None:
    assert row(pb.Vm(vm_id="a"))[5:7] == ["-", "-"]
    assert row(pb.Vm(vm_id="a", config=pb.VmConfig(cell="web")))[5:7] == ["web", "-"]
    told = pb.Vm(vm_id="a", config=pb.VmConfig(), cell=pb.CellInfo(name="cell-a", pid=77))
    assert row(told)[5:7] == ["cell-a", "77"]
    assert row(pb.Vm(vm_id="a", cell=pb.CellInfo(name="main")))[5:7] == ["main", "-"]


def test_the_cell_line_names_only_the_limits_set() -> None:
    c = pb.CellInfo(name="web", pid=12, uid=1000, cpu_time_s=1.234, rss_bytes=50 << 20,
                    memory_bytes=60 << 20, limits=pb.CellLimits(cpu=0.5, pids=64), shared=True)
    assert ctl.cell_line(c) == ("cell: web (shared), pid 12, uid 1000, cpu 1.23s, rss 50MiB, "
                                "cgroup memory 60MiB, limits: cpu 0.5, pids 64")
    assert ctl.cell_line(pb.CellInfo(name="x")).endswith("(not shared), pid -, uid 0, cpu "
                                                          "0.00s, rss 0MiB, cgroup memory 0MiB, "
                                                          "limits: none")


def test_the_cell_options_become_the_request_s_limits() -> None:
    args = ctl.build_parser().parse_args(["clone", "/s", "--count", "2", "--cell", "pool",
                                          "--cpu-limit", "0.25", "--memory-limit-mib", "512",
                                          "--pids-limit", "100"])
    assert args.cell == "pool"
    assert ctl._limits(args) == pb.CellLimits(cpu=0.25, memory_mib=512, pids=100)
    plain = ctl.build_parser().parse_args(["restore", "/s"])
    assert (plain.cell, ctl._limits(plain)) == ("", pb.CellLimits())
