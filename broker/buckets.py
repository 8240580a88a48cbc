"""A histogram the broker keeps of what only it sees whole (every job of every client), reported
in its status; the gateway's `/metrics` exports it as a Prometheus histogram (broker/metrics.py).
prometheus_client's own histograms live in the gateway process and count the gateway's
requests only."""

from __future__ import annotations

import bisect
import math
from typing import Any

# vLLM's request-latency buckets (its e2e and queue-time histograms), seconds
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class Buckets:
    """Observations counted by upper bound, with their count and sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: past every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # a bound is inclusive (Prometheus' `le`)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def state(self) -> dict[str, Any]:
        """For the status: `le` the bounds, `buckets` the cumulative count at each (as
        Prometheus exposes them), `count` all of them (the +Inf bucket), `sum`."""
        cumulative, n = [], 0
        for c in self.counts[:-1]:
            n += c
            cumulative.append(n)
        return {
            "le": list(self.bounds),
            "buckets": cumulative,
            "count": n + self.counts[-1],
            "sum": self.sum,
        }


def seconds(value: Any) -> float | None:
    """A duration a peer reported, or None if it is not one (not a finite number >= 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None
