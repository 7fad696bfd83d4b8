"""What a load test sends and when: the scenarios, the request bodies, the arrival rate over time.

Pure Python with no locust import, so the locustfile (`scenarios.py`, which runs under gevent
in its own process), the runner and the tests share one definition.

A scenario is a request mix and an arrival profile:

    scenario      requests                                      arrivals (mean = --rate req/s)
    short_chat    a one-line question, up to short_max_tokens    constant pacing
    long_prompt   long_prompt_words words of context + question  constant pacing
    long_output   a one-line question, long_output_tokens out    constant pacing
    mixed_models  short_chat, each to a model drawn from MODELS  constant pacing
    bursty        short_chat                                     Poisson, burst_factor x the rate
                                                                 between bursts for burst_s of
                                                                 every period_s
    ramp          short_chat                                     constant pacing, rising linearly
                                                                 from ramp_from x rate to rate
    standard      60% short_chat, 20% long_prompt, 20% long_output   Poisson

"Rate" is requests per second offered: each of U simulated users sends at rate(t)/U on its own
schedule, so the users together offer rate(t). A user whose request outlasts its gap sends the
next one at once and does not catch up, so a saturated server shows as an achieved send rate
below the one offered (the report states both). Pacer says how a user keeps its schedule.
"""

from __future__ import annotations

import random

import msgspec

SCENARIOS = (
    "short_chat", "long_prompt", "long_output", "mixed_models", "bursty", "ramp", "standard"
)  # fmt: skip
KINDS = ("short_chat", "long_prompt", "long_output")  # request kinds; a sample names its kind
MIX = {  # scenario → (request kind, weight)
    "short_chat": (("short_chat", 1.0),),
    "long_prompt": (("long_prompt", 1.0),),
    "long_output": (("long_output", 1.0),),
    "mixed_models": (("short_chat", 1.0),),
    "bursty": (("short_chat", 1.0),),
    "ramp": (("short_chat", 1.0),),
    "standard": (("short_chat", 0.6), ("long_prompt", 0.2), ("long_output", 0.2)),
}
POISSON = {"bursty", "standard"}  # scenarios with exponential gaps; the others pace evenly
MAX_RATE = 1000.0  # req/s: far above what one locust process can offer over HTTP streaming


class Workload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One load test's traffic. Sizes default to a 2k-context chat model (SmolLM2); a model
    with a shorter context needs smaller ones (a prompt past it is a 400, counted as an error)."""

    scenario: str = "standard"
    models: list[str] = msgspec.field(default_factory=lambda: ["smollm2-135m-instruct"])
    rate: float = 1.0  # mean requests per second offered (the peak, for `ramp`)
    users: int = 16  # simulated users: concurrent requests at most
    duration_s: float = 60.0  # how long requests are sent
    max_requests: int = 10_000  # requests sent at most; the run ends when they have all ended
    short_max_tokens: int = 64  # max_tokens of short_chat and long_prompt requests
    long_prompt_words: int = 1000  # words of context in a long_prompt request (~1.3 tokens each)
    long_output_tokens: int = 512  # max_tokens of a long_output request, with ignore_eos
    burst_factor: float = 4.0  # bursty: the rate during a burst over the rate between bursts
    burst_s: float = 2.0  # bursty: how long a burst lasts
    period_s: float = 10.0  # bursty: one burst starts every period_s
    ramp_from: float = 0.1  # ramp: the starting rate, as a fraction of `rate`
    request_timeout_s: float = 120.0  # one request, headers to [DONE]
    temperature: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError naming the field, its value and the limit."""
        checks = [
            ("scenario", self.scenario, self.scenario in SCENARIOS, f"one of {', '.join(SCENARIOS)}"),
            ("models", self.models, bool(self.models) and all(self.models), "at least one name"),
            ("rate", self.rate, 0 < self.rate <= MAX_RATE, f"in (0, {MAX_RATE:g}] req/s"),
            ("users", self.users, 1 <= self.users <= 1000, "in 1..1000"),
            ("duration_s", self.duration_s, 0 < self.duration_s <= 3600, "in (0, 3600] s"),
            ("max_requests", self.max_requests, 1 <= self.max_requests <= 1_000_000, "in 1..1000000"),
            ("short_max_tokens", self.short_max_tokens, self.short_max_tokens >= 1, ">= 1"),
            ("long_prompt_words", self.long_prompt_words, self.long_prompt_words >= 1, ">= 1"),
            ("long_output_tokens", self.long_output_tokens, self.long_output_tokens >= 1, ">= 1"),
            ("burst_factor", self.burst_factor, self.burst_factor >= 1, ">= 1"),
            ("burst_s", self.burst_s, 0 < self.burst_s < self.period_s, f"in (0, period_s={self.period_s:g})"),
            ("ramp_from", self.ramp_from, 0 < self.ramp_from <= 1, "in (0, 1]"),
            ("request_timeout_s", self.request_timeout_s, self.request_timeout_s > 0, "> 0"),
        ]  # fmt: skip
        for field, value, ok, limit in checks:
            if not ok:
                raise ValueError(f"{field}={value!r} must be {limit}")
        if self.scenario == "mixed_models" and len(set(self.models)) < 2:
            raise ValueError(f"models={self.models!r} must name at least 2 models for mixed_models")


def rate_at(w: Workload, t: float) -> float:
    """The total rate offered `t` seconds into the run, in requests per second."""
    if w.scenario == "ramp":
        progress = min(max(t / w.duration_s, 0.0), 1.0)
        return w.rate * (w.ramp_from + (1.0 - w.ramp_from) * progress)
    if w.scenario == "bursty":
        # rate_high * burst_s + rate_low * (period_s - burst_s) = rate * period_s
        low = w.rate * w.period_s / (w.burst_s * w.burst_factor + w.period_s - w.burst_s)
        return low * w.burst_factor if t % w.period_s < w.burst_s else low
    return w.rate


def peak_rate(w: Workload) -> float:
    """The highest rate the profile offers at any moment."""
    if w.scenario == "bursty":
        return rate_at(w, 0.0)  # a burst opens each period
    return w.rate


def offered(w: Workload, t: float) -> float:
    """Requests offered in the first `t` seconds: the integral of rate_at from 0 to t."""
    if w.scenario == "ramp":
        ramp = min(t, w.duration_s)
        rising = w.rate * (
            w.ramp_from * ramp + (1 - w.ramp_from) * ramp * ramp / (2 * w.duration_s)
        )
        return rising + w.rate * max(0.0, t - w.duration_s)
    if w.scenario == "bursty":
        periods, into = divmod(t, w.period_s)
        high = rate_at(w, 0.0)
        low = rate_at(w, w.burst_s)
        within = high * min(into, w.burst_s) + low * max(0.0, into - w.burst_s)
        return w.rate * w.period_s * periods + within
    return w.rate * t


def when_offered(w: Workload, requests: float) -> float:
    """The time by which `requests` have been offered: the inverse of `offered`."""
    lo, hi = 0.0, max(1.0, requests / w.rate)
    while offered(w, hi) < requests:
        hi *= 2
    for _ in range(60):  # bisection to well under a microsecond over any run's length
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if offered(w, mid) < requests else (lo, mid)
    return hi


class Pacer:
    """One user's send schedule. A user owns 1/users of the requests offered: it sends when the
    count offered so far, divided among the users, passes its next mark. Marks are one apart
    (even pacing, from a random phase) or exponential gaps (Poisson), so a rate that changes over
    time (ramp, bursts) is followed exactly: the time change of a unit-rate process."""

    def __init__(self, w: Workload, rng: random.Random, start: float):
        self.w, self.rng, self.start = w, rng, start
        self.poisson = w.scenario in POISSON
        # a random phase, so that users spawned together do not send together
        self.mark = self.rng.expovariate(1.0) if self.poisson else self.rng.random()
        self.next = self._time_of(self.mark)

    def _time_of(self, mark: float) -> float:
        return self.start + when_offered(self.w, mark * self.w.users)

    def delay(self, now: float) -> float:
        """Seconds to wait from `now` before the next send (0 when it is due or late)."""
        return max(0.0, self.next - now)

    def sent(self, now: float) -> None:
        """A request went out at `now`: schedule the next one. A user that fell behind by more
        than that starts again from `now` (no catch-up burst)."""
        step = self.rng.expovariate(1.0) if self.poisson else 1.0
        mark_now = offered(self.w, now - self.start) / self.w.users
        self.mark = self.mark + step if self.mark + step >= mark_now else mark_now + step
        self.next = self._time_of(self.mark)


# ── request bodies ──

TOPICS = (
    "the tides", "a lighthouse", "compound interest", "photosynthesis", "a sorting algorithm",
    "the moon", "bread dough", "a river delta", "an orchestra", "the printing press",
    "volcanoes", "a chess opening", "honeybees", "glaciers", "a steam engine", "prime numbers",
)  # fmt: skip
WORDS = (
    "the", "model", "reads", "a", "long", "document", "about", "rivers", "and", "cities", "while",
    "engineers", "measure", "latency", "under", "steady", "load", "with", "careful", "notes", "on",
    "every", "request", "that", "arrives", "from", "many", "users", "across", "regions", "of",
    "old", "maps", "show", "roads", "bridges", "markets", "harbours", "where", "ships", "unload",
    "grain", "timber", "wool", "salt", "in", "spring", "summer", "autumn", "winter",
)  # fmt: skip


def pick_kind(w: Workload, rng: random.Random) -> str:
    kinds, weights = zip(*MIX[w.scenario], strict=True)
    return rng.choices(kinds, weights)[0]


def pick_model(w: Workload, rng: random.Random) -> str:
    return rng.choice(w.models) if w.scenario == "mixed_models" else w.models[0]


def build_body(w: Workload, kind: str, model: str, rng: random.Random) -> dict:
    """A streaming chat completion of this kind: the last chunk carries the token counts."""
    topic = rng.choice(TOPICS)
    question = f"Explain {topic} in one short paragraph."
    body: dict = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": w.temperature,
        "max_tokens": w.short_max_tokens,
    }
    if kind == "long_prompt":
        context = " ".join(rng.choice(WORDS) for _ in range(w.long_prompt_words))
        question = f"Here are some notes:\n{context}\n\nSummarise them, then {question[0].lower()}{question[1:]}"
    elif kind == "long_output":
        # a fixed output length: the stream's duration measures decoding, not where EOS falls
        body |= {"max_tokens": w.long_output_tokens, "ignore_eos": True}
    body["messages"] = [{"role": "user", "content": question}]
    return body


def per_user_rng(seed: int, user: int) -> random.Random:
    """Each user's own seeded stream: a run's prompts and gaps repeat with its seed."""
    return random.Random(seed * 1_000_003 + user)


def expected_requests(w: Workload) -> int:
    """Requests the profile offers over its duration (before max_requests caps it)."""
    return round(offered(w, w.duration_s))
