"""Sample summaries: median, spread (p10/p90 and min/max) and the vmmd/peer ratio."""

from __future__ import annotations

import statistics
from typing import Any


def summarize(samples: list[float]) -> dict[str, Any]:
    """Samples plus median, p10, p90, min and max (p10/p90 interpolated; one sample is all five)."""
    if not samples:
        return {"samples": [], "n": 0}
    if len(samples) == 1:
        p10 = p90 = samples[0]
    else:
        deciles = statistics.quantiles(samples, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    return {
        "samples": [round(s, 4) for s in samples], "n": len(samples),
        "median": round(statistics.median(samples), 4), "p10": round(p10, 4),
        "p90": round(p90, 4), "min": round(min(samples), 4), "max": round(max(samples), 4),
    }


def goal(m: dict[str, Any], *, median: float | None = None, p90: float | None = None,
         ratio: float | None = None, of: str = "floor") -> dict[str, Any]:
    """m with m["goal"]: issue 14's goal for this line - a median and/or p90 of vmmd's
    samples, or a ratio of its median to a yardstick's (`of`: floor, qemu) - and how the
    figure stands against it (figure / goal: <= 1 is met)."""
    if median is None and p90 is None and ratio is None:
        return m  # no goal for this line
    s, g = m.get("vmmd", {}), {}
    vs: list[float] = []
    if s.get("n"):
        for key, want in (("median", median), ("p90", p90)):
            if want is not None:
                g[key] = want
                g[f"{key}_vs_goal"] = round(s[key] / want, 3)
                vs.append(g[f"{key}_vs_goal"])
    if ratio is not None:
        g[f"ratio_to_{of}"] = ratio
        have = m.get(f"ratio_vmmd_{of}")
        if have is not None:
            g["ratio_vs_goal"] = round(have / ratio, 3)
            vs.append(g["ratio_vs_goal"])
    g["met"] = bool(vs) and all(v <= 1 for v in vs)
    m["goal"] = g
    return m


def goal_text(g: dict[str, Any] | None) -> str:
    """The goal and where the figure stands, for the markdown table."""
    if not g:
        return "–"
    parts = []
    for key in ("median", "p90"):
        if key in g:
            vs = g.get(f"{key}_vs_goal")
            parts.append(f"{key} ≤ {g[key]:g}" + (f" ({vs:.2f}×)" if vs is not None else ""))
    for of in ("floor", "qemu"):
        if f"ratio_to_{of}" in g:
            vs = g.get("ratio_vs_goal")
            name = "QEMU" if of == "qemu" else "floor"
            parts.append(f"≤ {g[f'ratio_to_{of}']:g}× {name}" +
                         (f" ({vs:.2f}×)" if vs is not None else ""))
    return "; ".join(parts) + (": met" if g.get("met") else ": missed")


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """median(a) / median(b), None when either is missing or b is zero."""
    if not a.get("n") or not b.get("n") or not b["median"]:
        return None
    return round(a["median"] / b["median"], 3)
