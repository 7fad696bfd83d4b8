"""Fidelity of a target's next-token distributions to a reference's, teacher-forced on the same
tokens: the figures llama.cpp's `llama-perplexity --kl-divergence` prints (perplexity of both,
KL(reference ‖ target) per position — mean, median, 99th percentile, max — and "Same top p"),
defined as it defines them, computed in float64 from both sets of logits over the full
vocabulary. Plain numpy: exporters/parity.py runs the models and feeds FidelityMeter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["FIDELITY_CHUNK", "Fidelity", "FidelityMeter", "perplexity"]

# positions whose float64 log-softmax is held at once: 64 × 49152 × 8 B = 25 MB for SmolLM2,
# where a whole 512-token sequence would be 200 MB per array
FIDELITY_CHUNK = 64


@dataclass(frozen=True)
class Fidelity:
    """A target against the reference, teacher-forced on the same tokens (each figure as
    llama.cpp's `llama-perplexity --kl-divergence` defines it)."""

    positions: int  # tokens predicted and scored
    ppl_ref: float  # exp(mean negative log-likelihood) of the reference
    ppl_target: float
    kl_mean: float  # mean over positions of Σ_v p_ref(v) (ln p_ref(v) − ln p_target(v))
    kl_median: float
    kl_p99: float  # 99th percentile, linear between the two nearest ranks
    kl_max: float
    top1_agreement: float  # fraction of positions whose argmax is the same token


class FidelityMeter:
    """Accumulates per-position figures over any number of (reference, target) logit blocks."""

    def __init__(self) -> None:
        self._kl: list[np.ndarray] = []
        self._nll_ref = 0.0
        self._nll_target = 0.0
        self._same = 0

    def add(self, ref_logits: np.ndarray, target_logits: np.ndarray, next_ids) -> None:
        """(N, V) logits of both models at N positions, and the (N,) tokens that followed."""
        ref, got = np.asarray(ref_logits), np.asarray(target_logits)
        next_ids = np.asarray(next_ids, dtype=np.int64)
        if ref.ndim != 2 or got.shape != ref.shape or next_ids.shape != ref.shape[:1]:
            raise ValueError(
                f"fidelity needs reference and target logits of one shape (N, V) and N next "
                f"tokens; got {ref.shape}, {got.shape} and {next_ids.shape}"
            )
        for c in range(0, len(ref), FIDELITY_CHUNK):
            rows = slice(c, c + FIDELITY_CHUNK)
            lp_ref = _log_softmax64(ref[rows])  # (n, V) float64
            lp_got = _log_softmax64(got[rows])
            kl = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(-1)  # (n,)
            self._kl.append(np.where(np.isnan(kl), np.inf, kl))  # NaN logits: infinitely far
            picked = next_ids[rows, None]
            self._nll_ref -= np.take_along_axis(lp_ref, picked, -1).sum()
            self._nll_target -= np.take_along_axis(lp_got, picked, -1).sum()
            finite = np.isfinite(lp_got).all(-1)
            self._same += int((finite & (lp_ref.argmax(-1) == lp_got.argmax(-1))).sum())

    def result(self) -> Fidelity:
        kl = np.sort(np.concatenate(self._kl)) if self._kl else np.empty(0)
        n = len(kl)
        if n == 0:
            raise ValueError("fidelity needs at least one scored position")
        return Fidelity(
            positions=n,
            ppl_ref=perplexity(self._nll_ref, n),
            ppl_target=perplexity(self._nll_target, n),
            kl_mean=float(kl.mean()),
            kl_median=float(np.median(kl)),
            kl_p99=_percentile(kl, 0.99),
            kl_max=float(kl[-1]),
            top1_agreement=self._same / n,
        )


def _percentile(ascending: np.ndarray, fraction: float) -> float:
    """llama.cpp's: linear between the values at ranks ⌊f·(n−1)⌋ and the next (numpy's default
    too), written out so that an infinite KL reads as infinite rather than NaN (∞ − ∞)."""
    at = fraction * (len(ascending) - 1)
    i = int(at)
    lo, hi = ascending[i], ascending[min(i + 1, len(ascending) - 1)]
    return float(lo if at == i or lo == hi else lo + (at - i) * (hi - lo))


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    x -= np.log(np.exp(x).sum(-1, keepdims=True))
    return x


def perplexity(nll: float, count: int) -> float:
    # NaN (a broken graph) and overflow both read as an infinite perplexity, which fails the check
    return math.exp(min(nll / count, 700.0)) if math.isfinite(nll) else math.inf
