"""The last hour of a latency, per model, as this replica saw it: for the console's overview.

The Prometheus histograms (prometheus.py) count from the process's start, so a quantile of
"the last hour" needs their history, which the gateway does not keep (a Prometheus server
does). This window keeps just enough: per model, a ring of one-minute histograms over fixed
bucket bounds.

    minute slot:   [ t-59 ][ t-58 ] … [ t-1 ][  t  ]      slot = minute % 60
    each slot:     counts per bucket (len(bounds) + 1, the last one above every bound)
                   and the minute it holds; a slot whose minute is older is zeroed on reuse

Memory is fixed per model (60 × 22 counts for the TTFT buckets), whatever the traffic; model
names come from the gateway's closed set, as the Prometheus labels do. Each replica counts its
own requests: behind a load balancer, one replica's window is its share of the traffic.
Quantiles are interpolated within a bucket, as Prometheus's `histogram_quantile` does.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from aimass_common.histogram import quantile


@dataclass(frozen=True)
class WindowSummary:
    count: int  # observations in the window
    quantiles: tuple[float | None, ...]  # seconds, one per quantile asked; None when empty


class _Ring:
    def __init__(self, minutes: int, width: int):
        self.counts = [[0] * width for _ in range(minutes)]
        self.stamp = [-1] * minutes  # the minute (unix seconds // 60) each slot holds


class LatencyWindow:
    """One-minute histograms of the last `minutes` minutes, per model (thread-safe)."""

    def __init__(
        self,
        bounds: Sequence[float],
        *,
        minutes: int = 60,
        now: Callable[[], float] = time.time,  # unix seconds: which minute an observation is in
    ):
        if list(bounds) != sorted(set(bounds)) or not bounds or bounds[0] <= 0:
            raise ValueError(f"bounds {bounds!r} must be positive and strictly increasing")
        if not 1 <= minutes <= 1440:
            raise ValueError(f"minutes = {minutes} must be in [1, 1440]")
        self.bounds, self.minutes, self.now = tuple(bounds), minutes, now
        self._rings: dict[str, _Ring] = {}
        self._lock = threading.Lock()

    def observe(self, model: str, seconds: float) -> None:
        minute = int(self.now() // 60)
        slot = minute % self.minutes
        with self._lock:
            ring = self._rings.get(model)
            if ring is None:
                ring = self._rings[model] = _Ring(self.minutes, len(self.bounds) + 1)
            if ring.stamp[slot] != minute:
                ring.counts[slot] = [0] * (len(self.bounds) + 1)
                ring.stamp[slot] = minute
            ring.counts[slot][bisect_left(self.bounds, seconds)] += 1

    def models(self) -> list[str]:
        """The models observed in the window."""
        oldest = int(self.now() // 60) - self.minutes + 1
        with self._lock:
            return [m for m, ring in self._rings.items() if max(ring.stamp) >= oldest]

    def summary(self, models: Iterable[str], quantiles: Sequence[float]) -> WindowSummary:
        """The window's quantiles over the observations of `models` (merged)."""
        merged = [0] * (len(self.bounds) + 1)
        oldest = int(self.now() // 60) - self.minutes + 1
        with self._lock:
            for model in models:
                ring = self._rings.get(model)
                if ring is None:
                    continue
                for stamp, counts in zip(ring.stamp, ring.counts, strict=True):
                    if stamp >= oldest:
                        merged = [a + b for a, b in zip(merged, counts, strict=True)]
        total = sum(merged)
        return WindowSummary(total, tuple(quantile(self.bounds, merged, q) for q in quantiles))
