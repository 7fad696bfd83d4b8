"""TTFT, ITL, E2E and token counts from a stream's bytes as they arrive; the run's figures."""

from __future__ import annotations

import json

import pytest

from loadtests.metrics import Sample, StreamTimer, distribution, summarize, timeseries


def chunk(content: str | None = None, role: str | None = None, usage=None, finish=None) -> bytes:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    body: dict = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        body = {"choices": [], "usage": usage}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def timed(reads: list[tuple[float, bytes]], end: float) -> Sample:
    timer = StreamTimer(Sample(kind="short_chat", model="m", sent=1000.0), started=10.0)
    for at, data in reads:
        timer.feed(data, at)
    return timer.finish(end)


def test_ttft_counts_from_the_send_to_the_first_content_not_the_role_chunk():
    s = timed(
        [
            (10.05, chunk(role="assistant", content="")),
            (10.20, chunk("Hel")),
            (10.25, chunk("lo")),
            (10.40, chunk(", world")),
            (10.41, chunk(finish="stop")),
            (10.42, chunk(usage={"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})),
            (10.43, b"data: [DONE]\n\n"),
        ],
        end=10.45,
    )
    assert s.ok and s.error == ""
    assert s.ttft_ms == pytest.approx(200)
    assert s.itl_ms == pytest.approx([50, 150])
    assert s.e2e_ms == pytest.approx(450)
    assert (s.prompt_tokens, s.completion_tokens) == (5, 4)
    assert s.decode_tokens_per_s == pytest.approx(3 / 0.25)


def test_events_split_across_reads_and_joined_in_one_are_both_parsed():
    a, b = chunk("a"), chunk("b")
    s = timed(
        [(10.1, a[:10]), (10.2, a[10:] + b[:5]), (10.3, b[5:] + b"data: [DONE]\n\n")], end=10.3
    )
    assert s.ok and s.ttft_ms == pytest.approx(200) and s.itl_ms == pytest.approx([100])
    assert s.completion_tokens == 2  # no usage chunk: the content chunks are counted


def test_an_error_event_or_a_missing_done_fails_the_request():
    error = b'data: {"error": {"message": "engine died", "type": "server_error"}}\n\n'
    s = timed([(10.1, chunk("a")), (10.2, error), (10.3, b"data: [DONE]\n\n")], end=10.3)
    assert not s.ok and s.error == "error event: engine died"
    s = timed([(10.1, chunk("a"))], end=10.2)
    assert not s.ok and s.error == "the stream ended without [DONE]"


def sample(sent, ok=True, ttft=100.0, e2e=500.0, itl=(20.0, 30.0), tokens=3, error=""):
    return Sample(kind="short_chat", model="m", sent=sent, ok=ok, ttft_ms=ttft, e2e_ms=e2e,
                  itl_ms=list(itl), completion_tokens=tokens, error=error)  # fmt: skip


def test_the_summary_follows_the_definitions():
    samples = [sample(0.0), sample(1.0, ttft=300.0), sample(1.5), sample(3.5, e2e=500.0)]
    samples.append(sample(2.0, ok=False, ttft=None, e2e=10.0, itl=(), tokens=0, error="HTTP 429: slow down"))  # fmt: skip
    s = summarize(samples)
    # the window: the first send (0.0) to the last end (3.5 + 0.5)
    assert s["duration_s"] == 4.0
    assert (s["requests"], s["succeeded"], s["failed"]) == (5, 4, 1)
    assert s["error_rate"] == 0.2 and s["rps"] == 1.0
    assert s["output_tokens"] == 12 and s["output_tokens_per_s"] == 3.0
    assert s["ttft_ms"]["count"] == 4 and s["ttft_ms"]["max"] == 300.0  # failures left out
    assert s["itl_ms"]["count"] == 8 and s["itl_ms"]["p50"] == 25.0
    assert s["errors"] == {"HTTP 429: slow down": 1}


def test_distribution_percentiles_interpolate():
    d = distribution([float(x) for x in range(1, 101)])
    assert (d["count"], d["p50"], d["p95"], d["max"]) == (100, 50.5, 95.05, 100.0)
    assert distribution([])["p95"] is None


def test_timeseries_buckets_latency_by_send_and_completions_by_end():
    samples = [sample(0.0, e2e=2500.0), sample(0.5), sample(1.2, ok=False, error="x", tokens=0)]
    rows = timeseries(samples, bucket_s=1.0)
    assert [r["sent"] for r in rows] == [2, 1, 0]
    assert [r["succeeded"] for r in rows] == [0, 1, 1]  # they end at 2.5 s and 1.0 s
    assert [r["failed"] for r in rows] == [0, 1, 0]  # it ends at 1.21 s
    assert rows[0]["ttft_p50_ms"] == 100.0 and rows[1]["ttft_p50_ms"] is None
