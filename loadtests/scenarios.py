"""The locustfile: streaming chat completions, timed per chunk (loadtests/metrics.py says how).

    locust -f loadtests/scenarios.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:8000 \
        --scenario standard --models smollm2-135m-instruct --rate 2

with `--workload FILE` (a loadtests.workload.Workload as JSON, which the options override) and
`--samples FILE` (one JSON line per request). `python -m loadtests run` runs the same user class
with locust as a library in a child process (loadtests/generate.py): locust patches the standard
library for gevent when imported, so it never runs inside the gateway or pytest. An API key,
when the gateway wants one, comes from $AIMASS_API_KEY.

Each request reports to locust's own statistics as custom request types, named by the request
kind: "TTFT" (once), "ITL" (once per gap between content chunks), "TPS" (its decode tokens/s,
a rate in the response-time column) and "E2E" (once, with the output tokens as its response
length, and the failure when it failed: locust's failure ratio is the error rate), so locust's
tables, CSV files and web UI show their percentiles too.
"""

from __future__ import annotations

import os
import time

import gevent
import msgspec
import requests
from locust import User, events, task

from loadtests.metrics import Sample, StreamTimer
from loadtests.workload import Pacer, Workload, build_body, per_user_rng, pick_kind, pick_model

IDLE_S = 3600.0  # how long a user with no requests left waits: until the run ends


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--workload", default="", help="a Workload as JSON (loadtests.workload)")
    parser.add_argument("--samples", default="", help="write one JSON line per request here")
    parser.add_argument("--scenario", default="", help="overrides the workload's scenario")
    parser.add_argument("--models", default="", help="comma-separated model names (overrides)")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s offered (overrides)")
    parser.add_argument("--max-requests", type=int, default=0, help="requests at most (overrides)")


class Run:
    """The state the users of this process share: the workload, the request budget, the
    samples file."""

    def __init__(self, environment, workload: Workload, samples: str = ""):
        workload.validate()
        self.workload, self.environment = workload, environment
        self.start = time.monotonic()
        self.sent = 0
        self.in_flight = 0
        self.samples = open(samples, "ab") if samples else None  # noqa: SIM115
        self.encoder = msgspec.json.Encoder()
        self.headers = {"Accept": "text/event-stream"}
        if key := os.environ.get("AIMASS_API_KEY"):
            self.headers["Authorization"] = f"Bearer {key}"

    @classmethod
    def from_options(cls, environment) -> Run:
        """`locust -f`: the --workload file (or the defaults), then the options over it."""
        opts = environment.parsed_options
        w = Workload()
        if opts.workload:
            with open(opts.workload, "rb") as f:
                w = msgspec.json.decode(f.read(), type=Workload)
        overrides = {
            "scenario": opts.scenario or w.scenario,
            "models": [m for m in opts.models.split(",") if m] or w.models,
            "rate": opts.rate or w.rate,
            "max_requests": opts.max_requests or w.max_requests,
            "users": opts.num_users or w.users,
            "duration_s": float(opts.run_time or w.duration_s),
        }
        return cls(environment, msgspec.structs.replace(w, **overrides), opts.samples)

    def take(self) -> bool:
        """One more request, if the budget allows it."""
        if self.sent >= self.workload.max_requests:
            return False
        self.sent += 1
        self.in_flight += 1
        return True

    def ended(self, sample: Sample) -> None:
        self.in_flight -= 1
        if self.samples is not None:
            self.samples.write(self.encoder.encode(sample) + b"\n")
            self.samples.flush()
        if self.sent >= self.workload.max_requests and self.in_flight == 0:
            # every request of the budget has ended: stop now instead of idling to --run-time
            gevent.spawn(self.environment.runner.quit)


RUN: Run | None = None


@events.init.add_listener
def _init(environment, **_kw) -> None:
    global RUN
    if environment.parsed_options is not None:  # `locust -f`; loadtests.generate sets its own
        RUN = Run.from_options(environment)


@events.test_start.add_listener
def _started(**_kw) -> None:
    # the schedule starts with the run (and its --run-time), not when locust loaded
    if RUN is not None:
        RUN.start = time.monotonic()


class StreamingChatUser(User):
    """Sends streaming chat completions on its own schedule (workload.Pacer) and times them."""

    user_number = 0

    def __init__(self, environment):
        super().__init__(environment)
        assert RUN is not None, "run this file with locust (it parses the options)"
        self.shared = RUN
        StreamingChatUser.user_number += 1
        self.rng = per_user_rng(self.shared.workload.seed, StreamingChatUser.user_number)
        self.pacer = Pacer(self.shared.workload, self.rng, self.shared.start)
        self.session = requests.Session()
        self.url = f"{(self.host or '').rstrip('/')}/v1/chat/completions"
        self.done = False

    def wait_time(self) -> float:
        # waiting (not inside a task) so that the end of the run stops a waiting user at once
        return IDLE_S if self.done else self.pacer.delay(time.monotonic())

    def on_stop(self) -> None:
        self.session.close()

    @task
    def send_when_due(self) -> None:
        if self.done or self.pacer.delay(time.monotonic()) > 0:
            return
        if not self.shared.take():
            self.done = True
            return
        self.pacer.sent(time.monotonic())
        self._request()

    def _request(self) -> None:
        w = self.shared.workload
        kind, model = pick_kind(w, self.rng), pick_model(w, self.rng)
        body = build_body(w, kind, model, self.rng)
        sample = Sample(kind=kind, model=model, sent=time.time())
        started = time.monotonic()
        timer = StreamTimer(sample, started)
        try:
            with self.session.post(
                self.url, json=body, headers=self.shared.headers, stream=True,
                timeout=(10, w.request_timeout_s),
            ) as r:  # fmt: skip
                sample.status = r.status_code
                if r.status_code != 200:
                    sample.error = f"HTTP {r.status_code}: {_message(r)}"
                else:
                    for data in r.iter_content(chunk_size=None):
                        timer.feed(data, time.monotonic())
                        if time.monotonic() - started > w.request_timeout_s:
                            sample.error = f"timeout: no [DONE] after {w.request_timeout_s:g} s"
                            break
        except requests.RequestException as e:
            sample.error = f"{type(e).__name__}: {str(e)[:200]}"
        timer.finish(time.monotonic())
        self._report(sample)
        self.shared.ended(sample)

    def _report(self, s: Sample) -> None:
        fire = self.environment.events.request.fire
        if s.ttft_ms is not None:
            fire(request_type="TTFT", name=s.kind, response_time=s.ttft_ms, response_length=0,
                 exception=None, context={})  # fmt: skip
        for gap in s.itl_ms:
            fire(request_type="ITL", name=s.kind, response_time=gap, response_length=0,
                 exception=None, context={})  # fmt: skip
        if (tps := s.decode_tokens_per_s) is not None:
            # tokens/s in locust's response-time column: its percentiles hold the decode speed
            fire(request_type="TPS", name=s.kind, response_time=tps, response_length=0,
                 exception=None, context={})  # fmt: skip
        fire(request_type="E2E", name=s.kind, response_time=s.e2e_ms or 0.0,
             response_length=s.completion_tokens,
             exception=None if s.ok else RuntimeError(s.error), context={})  # fmt: skip


def _message(r: requests.Response) -> str:
    """The OpenAI error body's message, or the start of the body."""
    try:
        return str(r.json()["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
