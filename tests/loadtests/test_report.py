"""The report from samples: SLO checks, the gate's fields, the page (escaped, self-contained)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from loadtests import report, thresholds
from loadtests.metrics import Sample
from loadtests.runner import build_report
from loadtests.workload import Workload

HOSTILE = '<img src=x onerror="alert(1)">'


def samples(n: int, failed: int = 0, model: str = "m") -> list[Sample]:
    """`n` successes sent every 0.5 s from t=100 (TTFT 80 ms, 8 tokens in 400 ms), then
    `failed` failures."""
    out = [
        Sample(kind="short_chat", model=model, sent=100.0 + i * 0.5, ok=True, status=200,
               ttft_ms=80.0, e2e_ms=400.0, itl_ms=[40.0] * 7, completion_tokens=8)
        for i in range(n)
    ]  # fmt: skip
    out += [
        Sample(kind="short_chat", model=model, sent=101.0, status=500, e2e_ms=5.0,
               error=f"HTTP 500: {HOSTILE}")
        for _ in range(failed)
    ]  # fmt: skip
    return out


W = Workload(scenario="short_chat", models=["m"], rate=2.0, users=4, duration_s=10.0)


def judged(slo: thresholds.SLO, runs: list[Sample], w: Workload = W) -> dict:
    return build_report(w, "http://127.0.0.1:1", runs, slo, datetime.now(UTC))


def test_a_run_within_every_threshold_passes_with_the_gate_fields():
    slo = thresholds.SLO(max_p95_ttft_ms=100, max_p95_itl_ms=50, max_error_rate=0.05,
                         min_output_tokens_per_s=10, min_requests=20)  # fmt: skip
    r = judged(slo, samples(20, failed=1))
    assert r["passed"] is True and r["violations"] == []
    assert [c["name"] for c in r["checks"]] == [
        "max_p95_ttft_ms", "max_p95_itl_ms", "max_error_rate", "min_output_tokens_per_s",
        "min_sent_fraction", "min_requests",
    ]  # fmt: skip
    # registry/gates.py reads these: p95 TTFT in ms, failed/ended, successful requests/s
    assert r["p95_ms"] == 80.0 and r["p95_of"] == "ttft_ms"
    assert r["error_rate"] == round(1 / 21, 6)
    assert r["rps"] == round(20 / 9.9, 4)  # the window: 100.0 to 109.5 + 0.4
    assert r["summary"]["output_tokens_per_s"] == round(160 / 9.9, 3)


def test_each_violated_threshold_is_named_with_its_value_and_limit():
    slo = thresholds.SLO(max_p95_ttft_ms=50, max_error_rate=0.05, min_sent_fraction=2.0)
    r = judged(slo, samples(20, failed=3))
    assert r["passed"] is False
    assert r["violations"] == [
        "max_p95_ttft_ms: 80.0 (must be <= 50)",
        "max_error_rate: 0.130435 (must be <= 0.05)",
        "min_sent_fraction: 1.15 (must be >= 2)",  # 23 sent of the 20 offered
    ]


def test_a_run_without_a_success_fails_the_latency_thresholds():
    r = judged(thresholds.SLO(max_p95_ttft_ms=1000), samples(0, failed=4))
    assert r["passed"] is False and r["p95_ms"] is None
    assert r["violations"][0] == "max_p95_ttft_ms: None (must be <= 1000)"


def test_the_page_escapes_what_came_from_outside_and_embeds_its_charts(tmp_path):
    w = Workload(scenario="short_chat", models=["<b>m</b>"], rate=2.0, users=4, duration_s=10.0)
    r = judged(thresholds.SLO(max_error_rate=0.0), samples(20, failed=2, model="<b>m</b>"), w)
    files = report.write(r, tmp_path)
    page = files["html"].read_text()
    assert HOSTILE not in page and "<b>m</b>" not in page
    assert (
        "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page and "&lt;b&gt;m&lt;/b&gt;" in page
    )
    assert "FAILED" in page and "max_error_rate" in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "<link" not in page
    for name in ("latency", "throughput", "errors"):
        assert files[name].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(files["json"].read_text())["violations"] == r["violations"]


def test_an_slo_file_with_an_unknown_or_negative_field_is_refused(tmp_path):
    assert thresholds.load().max_p95_ttft_ms is not None  # the default file loads
    bad = tmp_path / "slo.json"
    bad.write_text('{"max_p99_ttft_ms": 5}')
    with pytest.raises(ValueError, match="max_p99_ttft_ms"):
        thresholds.load(bad)
    bad.write_text('{"max_error_rate": -1}')
    with pytest.raises(ValueError, match=r"max_error_rate=-1.0 must be >= 0"):
        thresholds.load(bad)
    with pytest.raises(ValueError, match="No such file"):
        thresholds.load(tmp_path / "missing.json")
