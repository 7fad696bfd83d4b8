"""Gateway metrics: observed values come out of /metrics in the Prometheus text format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from engine.outputs import EngineStats, Timings
from gateway.metrics import GatewayMetrics
from gateway.metrics.prometheus import ITL_BUCKETS, TTFT_BUCKETS


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
