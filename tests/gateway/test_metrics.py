"""Gateway metrics: observed values come out of /metrics in the Prometheus text format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from engine.errors import EngineDead, Overloaded
from engine.outputs import EngineStats, Timings
from gateway.metrics import GatewayMetrics
from gateway.metrics.prometheus import ITL_BUCKETS, TTFT_BUCKETS
from registry.registry import Registry
from tests.gateway.conftest import (
    assert_openai_error,
    base_config,
    deployment,
    http,
    metric,
    running,
)


def samples(metrics: GatewayMetrics) -> dict[tuple[str, frozenset], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(got: dict, name: str, **labels) -> float:
    return got[(name, frozenset(labels.items()))]


def test_observations_render_and_parse():
    m = GatewayMetrics()
    m.observe_request("tiny", "/v1/chat/completions", 200, 0.12)
    m.observe_request("tiny", "/v1/chat/completions", 200, 0.3)
    m.observe_request("tiny", "/v1/chat/completions", 400, 0.001)
    m.observe_generation(
        "tiny", Timings(queue_s=0.0, ttft_s=0.05, e2e_s=0.2, itl_s=(0.004, 0.02)), 7, 3
    )
    m.observe_engine(
        "tiny",
        EngineStats(
            slots_total=4,
            slots_used=2,
            queue_depth=5,
            max_waiting=64,
            kv_tokens_used=64,
            kv_tokens_total=256,
            kv_usage=0.25,
            tokens_per_s=10.0,
            prompt_tokens_total=0,
            generated_tokens_total=0,
            requests_total=0,
            steps_total=0,
            kv_resident_bytes=3 << 20,
            memory_bytes=(100 << 20) + (3 << 20),
        ),
    )
    m.model_up("tiny", "3", load_s=1.5)
    m.cold_starts_total.labels("tiny").inc()
    m.rate_limited_total.labels("tokens_per_minute").inc()
    m.engine_errors_total.labels("tiny", "Overloaded").inc()

    got = samples(m)
    chat = {"model": "tiny", "endpoint": "/v1/chat/completions"}
    assert value(got, "aimass_requests_total", **chat, status="200") == 2
    assert value(got, "aimass_requests_total", **chat, status="400") == 1
    assert value(got, "aimass_request_duration_seconds_count", **chat) == 3
    assert value(got, "aimass_request_duration_seconds_bucket", **chat, le="0.25") == 2
    assert value(got, "aimass_time_to_first_token_seconds_bucket", model="tiny", le="0.06") == 1
    assert value(got, "aimass_time_to_first_token_seconds_bucket", model="tiny", le="0.04") == 0
    assert value(got, "aimass_inter_token_latency_seconds_count", model="tiny") == 2
    assert value(got, "aimass_inter_token_latency_seconds_bucket", model="tiny", le="0.005") == 1
    assert value(got, "aimass_e2e_request_latency_seconds_sum", model="tiny") == 0.2
    assert value(got, "aimass_prompt_tokens_total", model="tiny") == 7
    assert value(got, "aimass_generation_tokens_total", model="tiny") == 3
    assert value(got, "aimass_queue_depth", model="tiny") == 5
    assert value(got, "aimass_running_requests", model="tiny") == 2
    assert value(got, "aimass_kv_cache_resident_bytes", model="tiny") == 3 << 20
    assert value(got, "aimass_engine_memory_bytes", model="tiny") == 103 << 20
    assert value(got, "aimass_kv_cache_usage_ratio", model="tiny") == 0.25
    assert value(got, "aimass_model_loaded", model="tiny", version="3") == 1
    assert value(got, "aimass_model_load_seconds_count", model="tiny") == 1
    assert value(got, "aimass_cold_starts_total", model="tiny") == 1
    assert value(got, "aimass_rate_limited_total", reason="tokens_per_minute") == 1
    assert value(got, "aimass_engine_errors_total", model="tiny", kind="Overloaded") == 1

    m.model_down("tiny", "3")
    got = samples(m)
    assert value(got, "aimass_model_loaded", model="tiny", version="3") == 0
    assert ("aimass_queue_depth", frozenset({("model", "tiny")})) not in got
    assert ("aimass_engine_memory_bytes", frozenset({("model", "tiny")})) not in got
    m.model_down("other", "1")  # never loaded: nothing to drop, no error


def test_instances_have_separate_registries():
    a, b = GatewayMetrics(), GatewayMetrics()
    a.prompt_tokens_total.labels("tiny").inc(5)
    assert value(samples(a), "aimass_prompt_tokens_total", model="tiny") == 5
    assert ("aimass_prompt_tokens_total", frozenset({("model", "tiny")})) not in samples(b)


def test_llm_latency_buckets_span_cpu_and_gpu_ranges():
    got = samples(GatewayMetrics())  # labelled metrics appear once observed, not before
    assert not any(name.startswith("aimass_") for name, _ in got)
    assert TTFT_BUCKETS[0] <= 0.001 and TTFT_BUCKETS[-1] >= 80
    assert ITL_BUCKETS[0] <= 0.001 and ITL_BUCKETS[-1] >= 2.5


def test_deployment_series_count_requests_and_ttft_by_version():
    m = GatewayMetrics()
    m.observe_deployment("notes", 1, failed=False)
    m.observe_deployment("notes", 2, failed=False)
    m.observe_deployment("notes", 2, failed=True)
    m.observe_deployment_ttft("notes", 2, 0.03)
    got = samples(m)
    ok = "aimass_deployment_requests_total"
    assert value(got, ok, model="notes", version="1", outcome="ok") == 1
    assert value(got, ok, model="notes", version="2", outcome="ok") == 1
    assert value(got, ok, model="notes", version="2", outcome="error") == 1
    ttft = "aimass_deployment_ttft_seconds_bucket"
    assert value(got, ttft, model="notes", version="2", le="0.04") == 1
    assert value(got, ttft, model="notes", version="2", le="0.02") == 0
    buckets = {dict(k)["le"] for n, k in got if n == ttft}
    assert len(buckets) == len(TTFT_BUCKETS) + 1  # the TTFT buckets and +Inf


def test_a_canary_split_shows_each_versions_series(tmp_path, tiny_package, monkeypatch):
    root = tmp_path / "registry"
    reg = Registry.open(str(root))
    reg.push(tiny_package, "tiny")
    reg.push(tiny_package, "tiny")
    reg.set_alias("tiny", "production", 1)
    reg.set_alias("tiny", "canary", 2, weight=0.5)
    counted = "aimass_deployment_requests_total"
    with running(base_config(tmp_path, root)) as gw, http(gw) as h:

        def complete(user: str, **kw):
            body = {"model": "tiny", "prompt": "The function", "max_tokens": 2, "user": user}
            return h.post("/v1/completions", json=body | kw)

        def on_canary() -> float:
            return metric(h.get("/metrics").text, counted, model="tiny", version="2")

        canary_users = []
        for i in range(12):  # sticky by user: each user stays on one side
            before = on_canary()
            assert complete(f"user-{i}").status_code == 200
            if on_canary() > before:
                canary_users.append(f"user-{i}")
        text = h.get("/metrics").text
        ok = [metric(text, counted, model="tiny", version=v, outcome="ok") for v in ("1", "2")]
        assert ok == [12 - len(canary_users), len(canary_users)] and min(ok) > 0, ok
        for v, n in zip(("1", "2"), ok, strict=True):
            assert metric(text, "aimass_deployment_ttft_seconds_count", version=v) == n
        assert metric(text, counted, outcome="error") == 0

        # the canary's engine refuses at admission: the canary's error, not production's
        full = Overloaded(queue_depth=16, max_waiting=16, retry_after_s=1.0)

        async def refuse(request):
            raise full

        engine = deployment(gw, "tiny:2").engine
        accept = engine.submit
        monkeypatch.setattr(engine, "submit", refuse)
        assert_openai_error(complete(canary_users[0]), 503, "overloaded")
        # a caller's own mistake (a token id outside the vocabulary) counts for nobody
        assert_openai_error(complete(canary_users[0], prompt=[10**6]), 400)

        # accepted, then the engine dies during the generation
        async def accept_then_die(request):
            return _Dying(await accept(request))

        monkeypatch.setattr(engine, "submit", accept_then_die)
        assert_openai_error(complete(canary_users[0]), 503, "engine_unavailable")
        text = h.get("/metrics").text
        assert metric(text, counted, model="tiny", version="2", outcome="error") == 2
        assert metric(text, counted, model="tiny", version="1", outcome="error") == 0
        assert metric(text, counted, outcome="ok") == 12


class _Dying:
    """An accepted request's stream whose engine dies before its first output."""

    def __init__(self, stream):
        self.stream = stream

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise EngineDead("the runtime crashed")

    async def aclose(self):
        await self.stream.aclose()
