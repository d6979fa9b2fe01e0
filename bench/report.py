"""Results: the JSON document and the markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.stats import goal_text

COLUMNS = ("vmmd", "qemu", "floor")
PVM_NOTE = " (PVM: nested KVM, ~7 µs exits, guest kernel code emulated)"


def _cell(s: dict[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return "–"
    fmt = "{:.3g}" if abs(s["median"]) < 100 else "{:.0f}"
    med, lo, hi = (fmt.format(s[k]) for k in ("median", "p10", "p90"))
    return f"{med} ({lo}–{hi})" if s["n"] > 1 else med


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| ({r['id']}) FAILED: {r['error'].splitlines()[0]} | | | | | | | |"
    ratio = r.get("ratio_vmmd_qemu", r.get("ratio"))
    n = max(r.get(c, {}).get("n", 0) for c in COLUMNS)
    cells = [r["what"], r["unit"], *(_cell(r.get(c)) for c in COLUMNS),
             "–" if ratio is None else f"{ratio:.2f}", goal_text(r.get("goal")), str(n)]
    return "| " + " | ".join(cells) + " |"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    note = PVM_NOTE if m["platform"] == "PVM" else ""
    dirty = " (dirty tree)" if m["vmmd_dirty"] else ""
    when = m["date_utc"]
    return "\n".join([
        f"## vmmd vs QEMU microvm — {m['platform']} host, {m['cpu']}, {m['cpus']} CPUs, {when}",
        "",
        (f"Absolute numbers from this machine are NOT comparable with bare-metal figures{note}; "
         "compare the columns of one run. Cells: median (p10–p90); vmmd/QEMU = ratio of the "
         "medians (< 1: vmmd faster), except rows marked \"higher better\" (IOPS, MB/s, "
         "VMs/s), where > 1 means vmmd faster. Rows with only a vmmd column have no QEMU "
         "counterpart (the daemon sections). The cells rows compare vmmd with cells against "
         "its yardstick in the C floor column (--isolation none, or the goal), ratio = "
         "cells / yardstick.  The goal column holds the fast-path goals (docs/testing.md): "
         "the goal and the figure over it, ≤ 1.00× is met."),
        "",
        "| measure | unit | vmmd | QEMU | C floor | vmmd/QEMU | goal (figure / goal) | n |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in doc["results"]),
        "",
        "Command lines (both VMMs get the same kernel file and command line string):",
        "",
        *(f"- {k}: `{v}`" for k, v in doc["commands"].items()),
        "",
        (f"{m['qemu']}; vmmd {m['vmmd_commit']}{dirty}; "
         f"load average at start {m['loadavg_at_start']:.2f}."),
        "",
    ])


def write(doc: dict[str, Any], out: Path) -> str:
    """Write results.json and results.md into `out`; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    table = markdown(doc)
    (out / "results.md").write_text(table)
    return table
