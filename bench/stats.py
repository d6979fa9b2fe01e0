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


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """median(a) / median(b), None when either is missing or b is zero."""
    if not a.get("n") or not b.get("n") or not b["median"]:
        return None
    return round(a["median"] / b["median"], 3)
