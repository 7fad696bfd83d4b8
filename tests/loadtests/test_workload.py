"""The traffic a scenario offers: rates over time, per-user pacing, request bodies, validation."""

from __future__ import annotations

import random

import msgspec
import pytest

from loadtests.workload import (
    SCENARIOS,
    Pacer,
    Workload,
    build_body,
    expected_requests,
    per_user_rng,
    pick_kind,
    pick_model,
    rate_at,
)


def sends(w: Workload, user: int, until: float) -> list[float]:
    """The times one user would send at, if each request returned at once."""
    pacer, now, out = Pacer(w, per_user_rng(w.seed, user), 0.0), 0.0, []
    while True:
        now += pacer.delay(now)
        if now >= until:
            return out
        out.append(now)
        pacer.sent(now)


@pytest.mark.parametrize("scenario", ["short_chat", "standard", "bursty"])
def test_users_together_offer_the_rate(scenario):
    w = Workload(scenario=scenario, rate=5.0, users=10, duration_s=200.0)
    total = sum(len(sends(w, u, 200.0)) for u in range(10))
    assert total == pytest.approx(5.0 * 200, rel=0.08)
    assert expected_requests(w) == pytest.approx(1000, abs=2)


def test_constant_pacing_is_even_and_poisson_is_not():
    even = sends(Workload(scenario="short_chat", rate=2.0, users=1), 0, 50.0)
    gaps = {round(b - a, 9) for a, b in zip(even, even[1:], strict=False)}
    assert gaps == {0.5}
    poisson = sends(Workload(scenario="standard", rate=2.0, users=1), 0, 500.0)
    gaps = [b - a for a, b in zip(poisson, poisson[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(0.5, rel=0.15)
    # exponential gaps: the standard deviation is about the mean
    sd = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert sd == pytest.approx(mean, rel=0.2)


def test_bursts_offer_burst_factor_times_the_rate_between_them_with_the_mean_kept():
    w = Workload(scenario="bursty", rate=3.0, burst_factor=4.0, burst_s=2.0, period_s=10.0)
    low, high = rate_at(w, 5.0), rate_at(w, 1.0)
    assert high == pytest.approx(4 * low)
    assert (high * 2 + low * 8) / 10 == pytest.approx(3.0)
    assert rate_at(w, 11.0) == high and rate_at(w, 12.5) == low
    times = [t for u in range(5) for t in sends(msgspec.structs.replace(w, users=5), u, 500.0)]
    in_bursts = sum(t % 10.0 < 2.0 for t in times)
    # a fifth of the time carries half the requests: 2 * 4 / (2 * 4 + 8)
    assert in_bursts / len(times) == pytest.approx(0.5, abs=0.06)


def test_a_ramp_rises_linearly_to_the_rate():
    w = Workload(scenario="ramp", rate=10.0, ramp_from=0.1, duration_s=100.0)
    assert [rate_at(w, t) for t in (0, 50, 100, 150)] == pytest.approx([1.0, 5.5, 10.0, 10.0])
    times = sends(Workload(scenario="ramp", rate=10.0, users=1, duration_s=100.0), 0, 100.0)
    first_half = sum(t < 50 for t in times)
    assert first_half < len(times) - first_half  # more sent as the rate rises
    assert expected_requests(w) == pytest.approx(550, abs=2)


@pytest.mark.parametrize("scenario", ["ramp", "bursty", "short_chat"])
def test_many_users_over_a_short_run_offer_what_the_profile_does(scenario):
    """60 users at 1 req/s for 60 s: each sends about once, yet together they follow the
    profile from the first second (a user's first send is not put off by a slow start)."""
    w = Workload(scenario=scenario, rate=1.0, users=60, duration_s=60.0)
    times = sorted(t for u in range(60) for t in sends(w, u, 60.0))
    assert len(times) == pytest.approx(expected_requests(w), abs=8)
    if (
        scenario == "ramp"
    ):  # 0.1 to 1 req/s: the second half offers (0.55+1)/(0.1+0.55) of the first
        first = sum(t < 30 for t in times)
        assert 1.6 < (len(times) - first) / first < 4


def test_a_user_slightly_late_keeps_its_schedule():
    w = Workload(scenario="short_chat", rate=1.0, users=1)
    pacer = Pacer(w, random.Random(0), 0.0)
    due = pacer.next
    pacer.sent(due + 0.2)
    assert pacer.next == pytest.approx(due + 1.0)


def test_a_late_user_sends_at_once_and_does_not_catch_up():
    w = Workload(scenario="short_chat", rate=1.0, users=1)
    pacer = Pacer(w, random.Random(0), 0.0)
    due = pacer.next
    pacer.sent(due + 5.0)  # the last request took 5 s longer than its gap
    assert pacer.next == pytest.approx(due + 6.0)
    assert pacer.delay(due + 5.5) == pytest.approx(0.5)


def test_request_bodies_stream_with_usage_and_size_by_kind():
    w = Workload(short_max_tokens=7, long_prompt_words=300, long_output_tokens=99)
    rng = random.Random(1)
    short = build_body(w, "short_chat", "m", rng)
    assert short["stream"] is True and short["stream_options"] == {"include_usage": True}
    assert short["max_tokens"] == 7 and "ignore_eos" not in short
    long_prompt = build_body(w, "long_prompt", "m", rng)
    assert len(long_prompt["messages"][0]["content"].split()) > 300
    long_output = build_body(w, "long_output", "m", rng)
    assert long_output["max_tokens"] == 99 and long_output["ignore_eos"] is True


def test_the_mix_and_the_models_follow_the_scenario():
    rng = random.Random(0)
    standard = Workload(scenario="standard")
    kinds = [pick_kind(standard, rng) for _ in range(2000)]
    assert kinds.count("short_chat") / 2000 == pytest.approx(0.6, abs=0.05)
    assert kinds.count("long_output") / 2000 == pytest.approx(0.2, abs=0.04)
    assert {pick_kind(Workload(scenario="long_prompt"), rng) for _ in range(50)} == {"long_prompt"}
    mixed = Workload(scenario="mixed_models", models=["a", "b", "c"])
    assert {pick_model(mixed, rng) for _ in range(200)} == {"a", "b", "c"}
    assert {pick_model(Workload(models=["a", "b"]), rng) for _ in range(50)} == {"a"}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"scenario": "soak"}, "scenario='soak' must be one of " + ", ".join(SCENARIOS)),
        ({"rate": 0.0}, "rate=0.0 must be in (0, 1000] req/s"),
        ({"users": 0}, "users=0 must be in 1..1000"),
        ({"duration_s": 7200.0}, "duration_s=7200.0 must be in (0, 3600] s"),
        ({"max_requests": 0}, "max_requests=0 must be in 1..1000000"),
        ({"burst_s": 12.0}, "burst_s=12.0 must be in (0, period_s=10)"),
        ({"scenario": "mixed_models", "models": ["a", "a"]}, "must name at least 2 models"),
    ],
)
def test_a_bad_workload_names_the_field_the_value_and_the_limit(fields, message):
    with pytest.raises(ValueError) as e:
        Workload(**fields).validate()
    assert message in str(e.value)
