"""Watching a canary: the gateway's per-version metrics over a window, canary against production.

The gateway exports, per served version (gateway/metrics/prometheus.py):

    aimass_deployment_requests_total{model, version, outcome="ok"|"error"}   counter
    aimass_deployment_ttft_seconds{model, version}                           histogram

A watch reads /metrics at the start of the window and again every `poll_s` until it ends; the
figures are the differences, so traffic before the canary moved does not count. From them, for
each side: requests, errors, error rate, and the p95 time to first token estimated from the
histogram's bucket counts as Prometheus' histogram_quantile does (linear within the bucket the
quantile falls in). The canary passes when it had at least `min_requests` requests and
    its error rate        <= the SLO's max_error_rate (when set)
                          and <= production's + max_error_rate_increase
    its p95 TTFT          <= the SLO's max_p95_ttft_ms (when set)
                          and <= production's x max_ttft_ratio (when production has one)
A watch stops early once the canary has `min_requests` requests and an error rate past a limit:
more traffic would only hurt more callers.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from aimass_common import histogram

REQUESTS = "aimass_deployment_requests"  # the counter's family (samples end in _total)
TTFT = "aimass_deployment_ttft_seconds"  # the histogram's family
QUANTILE = 0.95


class WatchError(Exception):
    """The gateway's metrics could not be read (not a verdict on the canary)."""


@dataclass
class Side:
    """One version's traffic, as counted by the gateway (cumulative, or over a window)."""

    ok: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # TTFT upper bound (s) → count <=

    @property
    def requests(self) -> float:
        return self.ok + self.errors

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def p95_ttft_ms(self) -> float | None:
        q = quantile(self.buckets, QUANTILE)
        return None if q is None else round(q * 1000, 3)

    def minus(self, before: Side) -> Side:
        return Side(
            ok=self.ok - before.ok,
            errors=self.errors - before.errors,
            buckets={le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
        )

    def figures(self) -> dict:
        rate = self.error_rate
        return {
            "requests": int(self.requests),
            "errors": int(self.errors),
            "error_rate": None if rate is None else round(rate, 4),
            "p95_ttft_ms": self.p95_ttft_ms(),
        }


@dataclass(frozen=True)
class Limits:
    max_error_rate: float | None = None  # the SLO's max_error_rate: absolute, 0..1
    max_p95_ttft_ms: float | None = None  # the SLO's max_p95_ttft_ms
    max_error_rate_increase: float = 0.01  # over production's error rate, absolute
    max_ttft_ratio: float = 1.5  # canary p95 TTFT over production's
    min_requests: int = 5  # fewer canary requests than this prove nothing: a failure


def parse(text: str, model: str) -> dict[int, Side]:
    """Each version of `model` in a Prometheus text exposition → its cumulative Side."""
    sides: dict[int, Side] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (REQUESTS, TTFT):
            continue
        for s in family.samples:
            if s.labels.get("model") != model or not s.labels.get("version", "").isdigit():
                continue
            side = sides.setdefault(int(s.labels["version"]), Side())
            if s.name == f"{REQUESTS}_total":
                if s.labels.get("outcome") == "ok":
                    side.ok += s.value
                elif s.labels.get("outcome") == "error":
                    side.errors += s.value
            elif s.name == f"{TTFT}_bucket":
                le = float(s.labels["le"])
                side.buckets[le] = side.buckets.get(le, 0.0) + s.value
    return sides


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """histogram_quantile over Prometheus's cumulative bucket counts (upper bound → count <=
    it, +Inf included); None when the histogram is empty. A quantile in the +Inf bucket is the
    highest finite bound."""
    bounds = sorted(le for le in buckets if not math.isinf(le))
    if not bounds:
        return None
    cumulative = [buckets[le] for le in bounds] + [buckets.get(math.inf, buckets[bounds[-1]])]
    counts = [c - before for c, before in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]
    return histogram.quantile(bounds, counts, q)


def judge(canary: Side, production: Side, limits: Limits) -> tuple[bool, list[str]]:
    """(passed, one line per check with the figures and the limit)."""
    lines, passed = [], True

    def check(ok: bool, line: str) -> None:
        nonlocal passed
        passed = passed and ok
        lines.append(("" if ok else "FAILED ") + line)

    n = int(canary.requests)
    check(n >= limits.min_requests, f"canary requests {n} (must be >= {limits.min_requests})")
    rate, base = canary.error_rate, production.error_rate or 0.0
    if rate is not None:
        if limits.max_error_rate is not None:
            check(
                rate <= limits.max_error_rate,
                f"canary error rate {rate:.4f} (must be <= {limits.max_error_rate:g}, the SLO)",
            )
        ceiling = base + limits.max_error_rate_increase
        check(
            rate <= ceiling,
            f"canary error rate {rate:.4f} vs production {base:.4f} "
            f"(must be <= {ceiling:.4f}: +{limits.max_error_rate_increase:g})",
        )
    mine, theirs = canary.p95_ttft_ms(), production.p95_ttft_ms()
    if mine is not None:
        if limits.max_p95_ttft_ms is not None:
            check(
                mine <= limits.max_p95_ttft_ms,
                f"canary p95 TTFT {mine:g} ms (must be <= {limits.max_p95_ttft_ms:g}, the SLO)",
            )
        if theirs:
            check(
                mine <= theirs * limits.max_ttft_ratio,
                f"canary p95 TTFT {mine:g} ms vs production {theirs:g} ms "
                f"(must be <= x{limits.max_ttft_ratio:g})",
            )
    return passed, lines


def fetch_metrics(gateway: str, timeout_s: float = 10.0) -> str:
    """The gateway's /metrics text; WatchError naming the URL when it cannot be read."""
    url = f"{gateway.rstrip('/')}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.read().decode()
    except (urllib.error.URLError, OSError) as e:
        raise WatchError(f"cannot read {url}: {e}") from None


def watch(
    read: Callable[[], str],  # the gateway's /metrics text
    model: str,
    canary_version: int,
    production_version: int,
    window_s: float,
    limits: Limits,
    *,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Watches the window and returns the canary report: passed, a one-line detail, both
    sides' figures, each check, and the seconds watched."""
    start = clock()
    before = parse(read(), model)
    canary = production = Side()
    while True:
        elapsed = clock() - start
        sleep(max(0.0, min(poll_s, window_s - elapsed)))
        now = parse(read(), model)
        canary = _delta(now, before, canary_version)
        production = _delta(now, before, production_version)
        elapsed = clock() - start
        if elapsed >= window_s or _clearly_failing(canary, production, limits):
            break
    passed, checks = judge(canary, production, limits)
    failed = [c.removeprefix("FAILED ") for c in checks if c.startswith("FAILED ")]
    figures = canary.figures()
    detail = "; ".join(failed) if failed else (
        f"{figures['requests']} canary requests, error rate {figures['error_rate']}, "
        f"p95 TTFT {figures['p95_ttft_ms']} ms over {elapsed:.0f} s"
    )  # fmt: skip
    return {
        "passed": passed,
        "detail": detail,
        "model": model,
        "canary_version": canary_version,
        "production_version": production_version,
        "window_s": window_s,
        "watched_s": round(elapsed, 3),
        "canary": figures,
        "production": production.figures(),
        "checks": checks,
        "limits": {
            "max_error_rate": limits.max_error_rate,
            "max_p95_ttft_ms": limits.max_p95_ttft_ms,
            "max_error_rate_increase": limits.max_error_rate_increase,
            "max_ttft_ratio": limits.max_ttft_ratio,
            "min_requests": limits.min_requests,
        },
    }


def _delta(now: dict[int, Side], before: dict[int, Side], version: int) -> Side:
    return now.get(version, Side()).minus(before.get(version, Side()))


def _clearly_failing(canary: Side, production: Side, limits: Limits) -> bool:
    """Enough canary requests and an error rate already past a limit."""
    rate = canary.error_rate
    if rate is None or canary.requests < limits.min_requests:
        return False
    ceiling = (production.error_rate or 0.0) + limits.max_error_rate_increase
    if limits.max_error_rate is not None:
        ceiling = min(ceiling, limits.max_error_rate)
    return rate > ceiling
