"""The canary watch on its own: the gateway's own exposition parsed, quantiles from buckets, the
verdict against both kinds of limit, and a watch driven by a scripted /metrics and a fake clock."""

from __future__ import annotations

import math

import pytest

from gateway.metrics import GatewayMetrics
from pipeline.canary import Limits, Side, judge, parse, quantile, watch


def exposition(m: GatewayMetrics) -> str:
    return m.render()[0].decode()


def traffic(m: GatewayMetrics, version: int, ok: int, errors: int = 0, ttft_s: float = 0.02):
    for _ in range(ok):
        m.observe_deployment("tiny", version, failed=False)
        m.observe_deployment_ttft("tiny", version, ttft_s)
    for _ in range(errors):
        m.observe_deployment("tiny", version, failed=True)


def test_the_gateways_own_metrics_parse_per_version():
    """The names pipeline/canary.py reads are the ones the gateway exports."""
    m = GatewayMetrics()
    traffic(m, 1, ok=8, errors=1, ttft_s=0.03)
    traffic(m, 2, ok=2, errors=3, ttft_s=0.3)
    m.observe_deployment("other", 2, failed=True)  # another model's version 2: not counted
    sides = parse(exposition(m), "tiny")
    assert set(sides) == {1, 2}
    assert (sides[1].ok, sides[1].errors) == (8, 1)
    assert (sides[2].ok, sides[2].errors) == (2, 3)
    assert sides[2].error_rate == pytest.approx(0.6)
    assert 250 <= sides[2].p95_ttft_ms() <= 500  # within the bucket holding 0.3 s
    assert sides[1].p95_ttft_ms() < sides[2].p95_ttft_ms()


def test_quantile_interpolates_within_its_bucket_as_prometheus_does():
    buckets = {0.01: 0.0, 0.1: 50.0, 1.0: 100.0, math.inf: 100.0}
    assert quantile(buckets, 0.95) == pytest.approx(0.1 + 0.9 * 45 / 50)
    assert quantile(buckets, 0.5) == pytest.approx(0.01 + 0.09 * 50 / 50)
    assert quantile({0.1: 0.0, math.inf: 4.0}, 0.95) == 0.1  # in +Inf: the highest finite bound
    assert quantile({0.1: 0.0, math.inf: 0.0}, 0.95) is None


def test_judge_holds_the_canary_to_the_slo_and_to_production():
    limits = Limits(max_error_rate=0.05, max_p95_ttft_ms=500, max_error_rate_increase=0.01,
                    max_ttft_ratio=1.5, min_requests=5)  # fmt: skip
    fast = {0.05: 10.0, 0.1: 10.0, math.inf: 10.0}
    slow = {0.05: 0.0, 0.1: 0.0, 0.4: 10.0, math.inf: 10.0}
    production = Side(ok=10, buckets=fast)
    passed, lines = judge(Side(ok=10, buckets=fast), production, limits)
    assert passed and not any(line.startswith("FAILED") for line in lines)
    passed, lines = judge(Side(ok=10, buckets=slow), production, limits)  # under the SLO's 500 ms
    assert not passed
    assert [line for line in lines if line.startswith("FAILED")] == [
        "FAILED canary p95 TTFT 385 ms vs production 47.5 ms (must be <= x1.5)"
    ]
    passed, lines = judge(Side(ok=9, errors=1, buckets=fast), production, limits)
    assert not passed and "FAILED canary error rate 0.1000 (must be <= 0.05, the SLO)" in lines
    passed, lines = judge(Side(ok=3, buckets=fast), production, limits)
    assert not passed and "FAILED canary requests 3 (must be >= 5)" in lines


class Script:
    """/metrics as the gateway would answer it at each read, and a clock the sleeps advance."""

    def __init__(self, steps):
        self.m, self.steps, self.now, self.reads = GatewayMetrics(), list(steps), 0.0, 0

    def read(self) -> str:
        if self.reads < len(self.steps):
            self.steps[self.reads](self.m)
        self.reads += 1
        return exposition(self.m)

    def sleep(self, s: float) -> None:
        self.now += s


def test_a_watch_counts_only_the_window_and_stops_early_on_a_failing_canary():
    script = Script(
        [
            lambda m: traffic(m, 2, ok=0, errors=50),  # before the window: not the canary's
            lambda m: (traffic(m, 1, ok=10), traffic(m, 2, ok=2)),
            lambda m: (traffic(m, 1, ok=10), traffic(m, 2, ok=0, errors=6)),
        ]
        + [lambda m: None] * 100
    )
    report = watch(script.read, "tiny", 2, 1, 60.0, Limits(min_requests=5), poll_s=1.0,
                   clock=lambda: script.now, sleep=script.sleep)  # fmt: skip
    assert report["passed"] is False
    assert report["watched_s"] == 2.0  # stopped at the second poll, not after 60 s
    assert report["canary"] == {"requests": 8, "errors": 6, "error_rate": 0.75,
                                "p95_ttft_ms": report["canary"]["p95_ttft_ms"]}  # fmt: skip
    assert report["production"]["requests"] == 20 and report["production"]["errors"] == 0
    assert report["detail"].startswith("canary error rate 0.7500 vs production 0.0000")


def test_a_healthy_canary_is_watched_for_the_whole_window():
    script = Script([lambda m: None] + [lambda m: (traffic(m, 1, ok=3), traffic(m, 2, ok=1))] * 100)
    report = watch(script.read, "tiny", 2, 1, 10.0, Limits(min_requests=5), poll_s=1.0,
                   clock=lambda: script.now, sleep=script.sleep)  # fmt: skip
    assert report["passed"] is True, report["checks"]
    assert report["watched_s"] == 10.0 and report["canary"]["requests"] == 10
