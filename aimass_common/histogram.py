"""A quantile of a bucketed histogram, as Prometheus's `histogram_quantile` computes it: linear
within the bucket the rank falls in (the first bucket from 0), and the highest finite bound for
a rank past it. The gateway's time-to-first-token window and the promotion pipeline's canary
watch (which reads the gateway's buckets) both ask it."""

from __future__ import annotations

from collections.abc import Sequence


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """`counts[i]`: observations in (bounds[i-1], bounds[i]]; one more count, if given, those
    above the last bound. None when there are none."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, below = q * total, 0.0
    for i, n in enumerate(counts):
        if n and below + n >= rank:
            if i == len(bounds):  # above every bound: the highest is all that is known
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * max(rank - below, 0.0) / n
        below += n
    return bounds[-1]
