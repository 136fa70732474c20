"""Summary statistics for latency samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def summarize(samples: Sequence[float]) -> dict[str, float] | None:
    """p50/p90/p95/p99/max/mean of ``samples`` (linear interpolation), or ``None`` if empty."""
    if not samples:
        return None
    arr = np.asarray(samples, dtype=np.float64)
    out = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["max"] = float(arr.max())
    out["mean"] = float(arr.mean())
    out["n"] = float(arr.size)
    return out
