"""What a load test measures, timed from the client's side of one streaming chat completion.

Definitions (the common ones, as LLMPerf, genai-perf and vLLM's benchmarks use them):

    TTFT        time to first token: from just before the request is sent to the arrival of the
                first chunk whose `delta.content` is not empty (the opening chunk that carries
                only the role does not count)
    ITL         inter-token latency: the time between the arrivals of two consecutive content
                chunks of one response. A chunk may carry more than one token (text is sent as
                it detokenizes), so this is the gap a reader sees; chunks read in one network
                read arrive together (gap 0)
    E2E         end-to-end latency: from the send to `data: [DONE]`
    output tokens   `usage.completion_tokens` of the last chunk (stream_options.include_usage);
                without it, the number of content chunks
    output tokens/s (run)   the output tokens of the successful requests over the measured
                window (the first send to the last response's end)
    decode tokens/s (request)   (output tokens - 1) / (E2E - TTFT), for responses of 2+ tokens
    rps         successful requests over the measured window
    error rate  failed requests over requests ended: a status other than 200, an error event in
                the stream, a stream that ends without [DONE], a connection failure or a timeout

A request still in flight when the run is stopped is not counted at all.
"""

from __future__ import annotations

import json

import msgspec
import numpy as np

PERCENTILES = (50, 90, 95, 99)
# the docstring's definitions, by the report field they describe (report.json carries them)
DEFINITIONS_BY_FIELD = {
    "ttft_ms": "request sent to the first chunk with non-empty delta.content",
    "itl_ms": "between the arrivals of consecutive content chunks of one response",
    "e2e_ms": "request sent to data: [DONE]",
    "output_tokens_per_s": "usage.completion_tokens of successful requests / measured window",
    "decode_tokens_per_s": "per request: (completion_tokens - 1) / (E2E - TTFT)",
    "rps": "successful requests / measured window (first send to last end)",
    "error_rate": "failed / ended: non-200, error event, no [DONE], connection error, timeout",
    "p95_ms": "p95 of ttft_ms",
}


class Sample(msgspec.Struct, kw_only=True):
    """One request as the client saw it; a line of samples.jsonl."""

    kind: str  # the request kind (workload.KINDS)
    model: str
    sent: float  # wall-clock time it was sent, Unix seconds
    ok: bool = False
    error: str = ""  # why it failed: "HTTP 429: ...", "no [DONE]", "timeout", ...
    status: int = 0  # HTTP status; 0 when none arrived
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = msgspec.field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def end(self) -> float:
        return self.sent + (self.e2e_ms or 0.0) / 1000

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.completion_tokens < 2 or self.ttft_ms is None or self.e2e_ms is None:
            return None
        decode_s = (self.e2e_ms - self.ttft_ms) / 1000
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else None


class StreamTimer:
    """Times one server-sent event stream from the bytes as they arrive: feed each read with
    the monotonic time it came back, then `finish`."""

    def __init__(self, sample: Sample, started: float):
        self.sample, self.started = sample, started  # `started`: monotonic time of the send
        self.buffer = b""
        self.last_content: float | None = None
        self.content_chunks = 0
        self.done = False
        self.usage_seen = False

    def feed(self, data: bytes, now: float) -> None:
        self.buffer += data.replace(b"\r\n", b"\n")
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            payload = b"\n".join(
                line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
            )
            if payload:
                self._event(payload, now)

    def _event(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            self._fail(f"not JSON in the stream: {payload[:80]!r}")
            return
        if "error" in chunk:
            err = (
                chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
            )
            self._fail(f"error event: {err.get('message', err)}")
            return
        if chunk.get("usage"):
            self.usage_seen = True
            self.sample.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
            self.sample.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        for choice in chunk.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                self._content(now)

    def _content(self, now: float) -> None:
        if self.last_content is None:
            self.sample.ttft_ms = (now - self.started) * 1000
        else:
            self.sample.itl_ms.append((now - self.last_content) * 1000)
        self.last_content = now
        self.content_chunks += 1

    def _fail(self, why: str) -> None:
        if not self.sample.error:
            self.sample.error = why

    def finish(self, now: float) -> Sample:
        s = self.sample
        s.e2e_ms = (now - self.started) * 1000
        if not self.done:
            self._fail("the stream ended without [DONE]")
        if not self.usage_seen:
            s.completion_tokens = self.content_chunks
        s.ok = not s.error
        return s


# ── aggregates ──


def distribution(values: list[float]) -> dict[str, float | int | None]:
    """Count, mean, max and the PERCENTILES (linear interpolation), in the values' unit."""
    if not values:
        return {"count": 0, "mean": None, "max": None} | {f"p{p}": None for p in PERCENTILES}
    a = np.asarray(values, dtype=float)
    out: dict[str, float | int | None] = {
        "count": int(a.size),
        "mean": _r(a.mean()),
        "max": _r(a.max()),
    }
    return out | {f"p{p}": _r(np.percentile(a, p)) for p in PERCENTILES}


def _r(x) -> float:
    return round(float(x), 3)


def window(samples: list[Sample]) -> tuple[float, float]:
    """The measured window: the first send to the last end (Unix seconds)."""
    if not samples:
        return 0.0, 0.0
    return min(s.sent for s in samples), max(s.end for s in samples)


def summarize(samples: list[Sample]) -> dict:
    """The run's figures, by the definitions above."""
    start, end = window(samples)
    span = max(end - start, 1e-9)
    ok = [s for s in samples if s.ok]
    failed = [s for s in samples if not s.ok]
    errors: dict[str, int] = {}
    for s in failed:
        errors[s.error[:120]] = errors.get(s.error[:120], 0) + 1
    output_tokens = sum(s.completion_tokens for s in ok)
    return {
        "requests": len(samples),
        "succeeded": len(ok),
        "failed": len(failed),
        "error_rate": round(len(failed) / len(samples), 6) if samples else 0.0,
        "duration_s": round(span, 3) if samples else 0.0,
        "send_rate": round(len(samples) / span, 4) if samples else 0.0,
        "rps": round(len(ok) / span, 4) if samples else 0.0,
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / span, 3) if samples else 0.0,
        "ttft_ms": distribution([s.ttft_ms for s in ok if s.ttft_ms is not None]),
        "itl_ms": distribution([x for s in ok for x in s.itl_ms]),
        "e2e_ms": distribution([s.e2e_ms for s in ok if s.e2e_ms is not None]),
        "decode_tokens_per_s": distribution(
            [v for s in ok if (v := s.decode_tokens_per_s) is not None]
        ),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
    }


def timeseries(samples: list[Sample], bucket_s: float | None = None) -> list[dict]:
    """The run in time buckets (about 60 of them, 1 s at least): latencies of the requests
    sent in each, and the requests, errors and output tokens of those that ended in each."""
    start, end = window(samples)
    if not samples:
        return []
    bucket_s = bucket_s or max(1.0, (end - start) / 60)
    n = int((end - start) // bucket_s) + 1
    sent: list[list[Sample]] = [[] for _ in range(n)]
    ended: list[list[Sample]] = [[] for _ in range(n)]
    for s in samples:
        sent[int((s.sent - start) // bucket_s)].append(s)
        ended[min(int((s.end - start) // bucket_s), n - 1)].append(s)

    def pct(values: list[float], p: int) -> float | None:
        return _r(np.percentile(values, p)) if values else None

    rows = []
    for i in range(n):
        ok_sent = [s for s in sent[i] if s.ok]
        ttft = [s.ttft_ms for s in ok_sent if s.ttft_ms is not None]
        itl = [x for s in ok_sent for x in s.itl_ms]
        e2e = [s.e2e_ms for s in ok_sent if s.e2e_ms is not None]
        done_ok = [s for s in ended[i] if s.ok]
        rows.append({
            "t_s": round(i * bucket_s, 3),
            "sent": len(sent[i]),
            "succeeded": len(done_ok),
            "failed": len(ended[i]) - len(done_ok),
            "rps": round(len(done_ok) / bucket_s, 4),
            "output_tokens_per_s": round(sum(s.completion_tokens for s in done_ok) / bucket_s, 3),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95),
            "itl_p50_ms": pct(itl, 50), "itl_p95_ms": pct(itl, 95),
            "e2e_p50_ms": pct(e2e, 50), "e2e_p95_ms": pct(e2e, 95),
        })  # fmt: skip
    return rows


def read_samples(path) -> list[Sample]:
    decoder = msgspec.json.Decoder(Sample)
    with open(path, "rb") as f:
        return [decoder.decode(line) for line in f if line.strip()]
