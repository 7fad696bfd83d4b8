"""The TTFT window of the console's overview: one-minute histograms over the last hour, per
model; quantiles interpolated within a bucket as Prometheus's histogram_quantile does, minutes
older than the window forgotten, memory fixed however long it runs."""

from __future__ import annotations

import pytest

from engine.outputs import Timings
from gateway.metrics import GatewayMetrics, LatencyWindow


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_quantiles_interpolate_within_a_bucket():
    w = LatencyWindow((0.1, 0.2, 0.4), now=Clock())
    for seconds in (0.05, 0.15, 0.15, 0.3):
        w.observe("tiny", seconds)
    summary = w.summary(["tiny"], (0.25, 0.5, 0.75, 1.0))
    assert summary.count == 4
    # ranks 1, 2, 3, 4 of: one in (0, 0.1], two in (0.1, 0.2], one in (0.2, 0.4]
    assert summary.quantiles == pytest.approx((0.1, 0.15, 0.2, 0.4))


def test_above_every_bound_is_the_highest_bound_and_empty_is_none():
    w = LatencyWindow((0.1, 0.2), now=Clock())
    assert w.summary(["tiny"], (0.5,)).quantiles == (None,)
    w.observe("tiny", 9.0)
    assert w.summary(["tiny"], (0.5,)).quantiles == (0.2,)


def test_the_window_forgets_minutes_older_than_an_hour():
    clock = Clock()
    w = LatencyWindow((1.0, 2.0), now=clock)
    w.observe("tiny", 0.5)
    clock.t += 59 * 60
    w.observe("tiny", 1.5)
    assert w.summary(["tiny"], (0.5,)).count == 2
    clock.t += 60  # the first minute is 60 minutes old now
    assert w.summary(["tiny"], (0.5,)).count == 1
    assert w.models() == ["tiny"]
    clock.t += 3600 * 5
    w.observe("tiny", 1.5)  # a reused slot starts from zero
    assert w.summary(["tiny"], (0.5,)).count == 1
    assert len(w._rings["tiny"].counts) == 60


def test_models_are_kept_apart_and_merged_on_request():
    w = LatencyWindow((1.0, 2.0), now=Clock())
    w.observe("a", 0.5)
    w.observe("b", 1.5)
    assert w.summary(["a"], (1.0,)).quantiles == (1.0,)
    assert w.summary(["a", "b"], (1.0,)).count == 2
    assert w.summary(["nope"], (0.5,)).count == 0
    assert sorted(w.models()) == ["a", "b"]


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="strictly increasing"):
        LatencyWindow((0.2, 0.1))
    with pytest.raises(ValueError, match="minutes"):
        LatencyWindow((0.1,), minutes=0)


def test_gateway_metrics_feed_the_window_by_model_name_and_keep_load_times():
    clock = Clock()
    m = GatewayMetrics(now=clock)
    for model in ("tiny", "tiny@production", "tiny:1"):
        m.observe_generation(model, Timings(queue_s=0.0, ttft_s=0.05, e2e_s=0.1, itl_s=()), 3, 2)
    assert m.ttft_window.models() == ["tiny"]
    assert m.ttft_window.summary(["tiny"], (0.5,)).count == 3
    m.model_up("tiny", "1", load_s=0.5)
    assert m.loaded_since("tiny", "1") == clock.t
    m.model_down("tiny", "1")
    assert m.loaded_since("tiny", "1") is None
