"""The gateway's Prometheus metrics, one `GatewayMetrics` per application.

Each instance owns a `CollectorRegistry` instead of using prometheus_client's global one: two
apps in one process (tests, a gateway serving two ports) would otherwise collide on metric
names, and nothing global is mutated at import time.

Names start with `aimass_`. Label values must come from a closed set the gateway controls
(served model names, route paths, status codes, error kinds), never from raw request fields:
a client sending a million made-up model names must not create a million time series.

Latency buckets follow vLLM's (`vllm/v1/metrics/loggers.py`), extended downwards because tiny
models on a CPU decode a token in about a millisecond.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from functools import partial

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

from engine.outputs import EngineStats, Timings
from gateway.metrics.window import LatencyWindow

# seconds; vLLM's TTFT buckets from 1 ms to 80 s, plus long tails for cold queues
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)  # fmt: skip
# seconds between output tokens; vLLM starts at 10 ms, CPU tiny models need the ms range
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0)  # fmt: skip
# seconds for a whole generation (vLLM's e2e buckets)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)  # fmt: skip
# seconds for any HTTP request, from a /health probe to a long stream
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0, 600.0)  # fmt: skip
# seconds to pull and load a model package (serverless cold start)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    """Every metric the gateway exports, registered in this instance's own registry.

    The metric objects are public (`metrics.requests_total.labels(...).inc()`); the methods
    below cover the updates that touch several metrics at once. Besides the Prometheus
    metrics, two things the console's overview reads: `ttft_window`, the last hour of time to
    first token per model name (window.py; this replica's requests only), and `loaded_since`.
    """

    def __init__(
        self,
        namespace: str = "aimass",
        *,
        now: Callable[[], float] = time.time,  # unix seconds: the TTFT window's minutes, load times
    ) -> None:
        self.now = now
        self.ttft_window = LatencyWindow(TTFT_BUCKETS, now=now)
        self._loaded_since: dict[tuple[str, str], float] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # RSS, CPU seconds, open fds of the gateway
        kw = {"namespace": namespace, "registry": self.registry}
        counter, gauge = partial(Counter, **kw), partial(Gauge, **kw)
        histogram = partial(Histogram, **kw)

        # HTTP, per served model and route; status is the HTTP code as text
        self.requests_total = counter(
            "requests", "HTTP requests answered", ["model", "endpoint", "status"]
        )
        self.request_duration_seconds = histogram(
            "request_duration_seconds", "HTTP request handling time, to the last byte",
            ["model", "endpoint"], buckets=REQUEST_BUCKETS,
        )  # fmt: skip
        self.rate_limited_total = counter(
            "rate_limited", "Requests refused by a rate limit or quota", ["reason"]
        )

        # generation, as the engine measured it (engine.outputs.Timings)
        self.time_to_first_token_seconds = histogram(
            "time_to_first_token_seconds", "Request accepted by the engine to first token",
            ["model"], buckets=TTFT_BUCKETS,
        )  # fmt: skip
        self.inter_token_latency_seconds = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens",
            ["model"], buckets=ITL_BUCKETS,
        )  # fmt: skip
        self.e2e_request_latency_seconds = histogram(
            "e2e_request_latency_seconds", "Request accepted by the engine to finished",
            ["model"], buckets=E2E_BUCKETS,
        )  # fmt: skip
        self.prompt_tokens_total = counter("prompt_tokens", "Prompt tokens processed", ["model"])
        self.generation_tokens_total = counter(
            "generation_tokens", "Output tokens generated", ["model"]
        )
        self.engine_errors_total = counter(
            "engine_errors", "Engine failures seen by the gateway, by error type",
            ["model", "kind"],
        )  # fmt: skip

        # per deployment (registry name and version number): a canary and production of one
        # name apart. outcome "error": the deployment failed a request it was given (refused
        # it at admission, or the generation ended in an error); a caller's own 4xx is neither
        self.deployment_requests_total = counter(
            "deployment_requests", "Requests given to a deployment, by how they ended",
            ["model", "version", "outcome"],
        )  # fmt: skip
        self.deployment_ttft_seconds = histogram(
            "deployment_ttft_seconds", "Request accepted by the engine to first token",
            ["model", "version"], buckets=TTFT_BUCKETS,
        )  # fmt: skip

        # engine state, sampled from EngineStats
        self.queue_depth = gauge("queue_depth", "Requests waiting for a KV slot", ["model"])
        self.running_requests = gauge("running_requests", "Requests holding a KV slot", ["model"])
        self.kv_cache_usage_ratio = gauge(
            "kv_cache_usage_ratio", "Reserved KV-cache tokens / capacity (0..1)", ["model"]
        )
        self.engine_memory_bytes = gauge(
            "engine_memory_bytes",
            "What an engine holds: its weights plus the KV cache resident now (grows with use)",
            ["model"],
        )
        self.kv_cache_resident_bytes = gauge(
            "kv_cache_resident_bytes", "KV-cache bytes resident now (written positions)", ["model"]
        )
        self.spec_acceptance_ratio = gauge(
            "spec_decode_acceptance_ratio",
            "Speculative draft tokens accepted / drafted since the engine started (0..1)",
            ["model"],
        )

        # serverless lifecycle
        self.model_loaded = gauge(
            "model_loaded", "1 while this version of the model is loaded", ["model", "version"]
        )
        self.cold_starts_total = counter(
            "cold_starts", "Requests that waited for their model to load", ["model"]
        )
        self.model_load_seconds = histogram(
            "model_load_seconds", "Time to pull and load a model package", ["model"],
            buckets=LOAD_BUCKETS,
        )  # fmt: skip

    def observe_request(self, model: str, endpoint: str, status: int, duration_s: float) -> None:
        """One answered HTTP request (`endpoint` is the route path, e.g. "/v1/completions")."""
        self.requests_total.labels(model, endpoint, str(status)).inc()
        self.request_duration_seconds.labels(model, endpoint).observe(duration_s)

    def observe_generation(
        self, model: str, timings: Timings, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """One finished choice: its engine timings and token counts. For n > 1 choices, pass
        the prompt's tokens with the first choice only (the prompt is processed once)."""
        self.time_to_first_token_seconds.labels(model).observe(timings.ttft_s)
        self.ttft_window.observe(model_name(model), timings.ttft_s)
        self.e2e_request_latency_seconds.labels(model).observe(timings.e2e_s)
        itl = self.inter_token_latency_seconds.labels(model)
        for gap in timings.itl_s:
            itl.observe(gap)
        self.prompt_tokens_total.labels(model).inc(prompt_tokens)
        self.generation_tokens_total.labels(model).inc(completion_tokens)

    def observe_deployment(self, name: str, version: int, *, failed: bool) -> None:
        """One request given to deployment `name:version` ended: once per request, however
        many choices it had."""
        outcome = "error" if failed else "ok"
        self.deployment_requests_total.labels(name, str(version), outcome).inc()

    def observe_deployment_ttft(self, name: str, version: int, ttft_s: float) -> None:
        """One choice's time to first token, as the engine measured it."""
        self.deployment_ttft_seconds.labels(name, str(version)).observe(ttft_s)

    def observe_engine(self, model: str, stats: EngineStats) -> None:
        """The engine's current load (call on each /metrics scrape or periodically)."""
        self.queue_depth.labels(model).set(stats.queue_depth)
        self.running_requests.labels(model).set(stats.slots_used)
        self.kv_cache_usage_ratio.labels(model).set(stats.kv_usage)
        self.engine_memory_bytes.labels(model).set(stats.memory_bytes)
        self.kv_cache_resident_bytes.labels(model).set(stats.kv_resident_bytes)
        self.spec_acceptance_ratio.labels(model).set(stats.spec_acceptance)

    def model_up(self, model: str, version: str, load_s: float) -> None:
        """A model version finished loading in `load_s` seconds."""
        self.model_loaded.labels(model, version).set(1)
        self.model_load_seconds.labels(model).observe(load_s)
        self._loaded_since[(model, version)] = self.now()

    def model_down(self, model: str, version: str) -> None:
        """A model version was unloaded; its engine gauges are dropped, not left stale."""
        self.model_loaded.labels(model, version).set(0)
        self._loaded_since.pop((model, version), None)
        for gauge in (
            self.queue_depth,
            self.running_requests,
            self.kv_cache_usage_ratio,
            self.engine_memory_bytes,
            self.kv_cache_resident_bytes,
            self.spec_acceptance_ratio,
        ):
            with suppress(KeyError):  # never observed
                gauge.remove(model)

    def loaded_since(self, model: str, version: str) -> float | None:
        """When (unix seconds) this version finished loading; None if it is not loaded here."""
        return self._loaded_since.get((model, version))

    def render(self) -> tuple[bytes, str]:
        """The body and content type of a /metrics response (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def model_name(model: str) -> str:
    """The name part of a request's model (NAME, NAME@ALIAS or NAME:VERSION): the TTFT window
    is kept per name, the unit whose visibility a project controls."""
    return model.partition("@")[0].partition(":")[0]
