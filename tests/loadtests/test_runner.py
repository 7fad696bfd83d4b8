"""Headless runs against a real gateway on the tiny model: the SLO verdict and its exit code,
the report's files and the registry gate's fields, the loopback guard, the capacity search."""

from __future__ import annotations

import json
import struct
import time

import msgspec
import pytest

from loadtests.__main__ import main
from loadtests.runner import check_host
from registry import gates, manifest
from registry.gates import GatePolicy
from tests.gateway.conftest import free_port, slow_steps

# the tiny model's requests: 8 output tokens, prompts that fit its 128-token context
TINY = ["--model", "tiny", "--short-max-tokens", "8", "--long-prompt-words", "4",
        "--long-output-tokens", "16", "--request-timeout", "20"]  # fmt: skip


def write_slo(path, **limits) -> str:
    path.write_text(json.dumps(limits))
    return str(path)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_a_run_within_a_lenient_slo_passes_and_writes_its_report(
    gateway_url, tiny_package, tmp_path, capsys
):
    out = tmp_path / "report"
    slo = write_slo(tmp_path / "slo.json", max_p95_ttft_ms=20000, max_p95_itl_ms=20000,
                    max_error_rate=0.0, min_output_tokens_per_s=0.5, min_sent_fraction=0.5,
                    min_requests=5)  # fmt: skip
    code = main(["run", "--host", gateway_url, "--scenario", "standard", "--rate", "3",
                 "--users", "6", "--duration", "5", "--slo", slo, "--out", str(out), *TINY])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.startswith("PASSED")
    report = json.loads((out / "report.json").read_text())
    # the registry gate's fields, with their meanings
    assert report["passed"] is True and report["violations"] == []
    s = report["summary"]
    assert report["p95_ms"] == s["ttft_ms"]["p95"] and 0 < report["p95_ms"] < 20000
    assert report["error_rate"] == 0.0 and s["failed"] == 0
    assert report["rps"] == s["rps"] > 0
    assert s["requests"] >= 5 and s["output_tokens"] > 0
    assert s["itl_ms"]["count"] > 0 and s["e2e_ms"]["p50"] >= s["ttft_ms"]["p50"]
    kinds = {json.loads(line)["kind"] for line in (out / "samples.jsonl").read_text().splitlines()}
    assert kinds <= {"short_chat", "long_prompt", "long_output"} and len(kinds) >= 2
    # locust's own statistics (locust as a library in the child) hold the custom request types
    stats = json.loads((out / "locust_stats.json").read_text())
    counted = {
        t: sum(e["num_requests"] for e in stats if e["method"] == t) for t in ("TTFT", "ITL", "E2E")
    }
    assert counted == {
        "TTFT": s["ttft_ms"]["count"],
        "ITL": s["itl_ms"]["count"],
        "E2E": s["requests"],
    }
    assert "TTFT," in (out / "locust_stats.csv").read_text()
    for chart in ("latency", "throughput", "errors"):
        width, height = png_size(out / f"{chart}.png")
        assert width > 300 and height > 100
    page = (out / "report.html").read_text()
    assert "PASSED" in page and page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page.replace(gateway_url, "") and "<script" not in page
    # a registry version carrying this report meets a production-like gate
    gate = GatePolicy(require_loadtest=True, loadtest_max_p95_ms=20000,
                      loadtest_max_error_rate=0.01, loadtest_min_rps=0.1)  # fmt: skip
    assert loadtest_gate(tiny_package, report, gate).passed
    strict = GatePolicy(require_loadtest=True, loadtest_min_rps=report["rps"] * 2)
    assert not loadtest_gate(tiny_package, report, strict).passed


def loadtest_gate(package, report: dict, policy: GatePolicy):
    """The registry's load-test gate on the tiny package's manifest carrying `report`."""
    m = manifest.load(package)
    m = msgspec.structs.replace(m, reports=msgspec.structs.replace(m.reports, load_test=report))
    policy = msgspec.structs.replace(policy, parity=False, max_ppl_increase=None)
    (result,) = gates.check(m, None, policy)
    assert result.gate == "loadtest"
    return result


def test_a_strict_slo_fails_the_run_with_exit_1_naming_the_threshold(
    gateway_url, tiny_package, tmp_path, capsys
):
    out = tmp_path / "report"
    slo = write_slo(tmp_path / "strict.json", max_p95_ttft_ms=0.001, max_error_rate=0.5,
                    min_sent_fraction=None)  # fmt: skip
    code = main(["run", "--host", gateway_url, "--scenario", "short_chat", "--rate", "3",
                 "--users", "4", "--duration", "3", "--slo", slo, "--out", str(out), *TINY])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "SLO violated: max_p95_ttft_ms" in printed and "must be <= 0.001" in printed
    assert "max_error_rate" not in printed  # only the threshold that broke
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["max_p95_ttft_ms"]
    assert "FAILED" in (out / "report.html").read_text()
    assert not loadtest_gate(tiny_package, report, GatePolicy(require_loadtest=True)).passed


def test_a_non_loopback_host_is_refused_unless_allowed(tmp_path, capsys):
    code = main(["run", "--host", "http://10.1.2.3:8000", "--out", str(tmp_path / "r"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "10.1.2.3 is not a loopback address" in err and "--allow-host 10.1.2.3" in err
    assert not (tmp_path / "r").exists()  # nothing was sent
    for refused in ("http://example.com", "http://127.0.0.1.example.com", "ftp://127.0.0.1"):
        with pytest.raises(ValueError):
            check_host(refused)
    assert check_host("http://[::1]:8000/") == "http://[::1]:8000"
    assert check_host("http://localhost:8000") == "http://localhost:8000"
    assert check_host("https://gw.test:443", ("gw.test",)) == "https://gw.test:443"


def test_capacity_search_reports_the_highest_rate_that_held(
    gateway_url, tmp_path, capsys, monkeypatch
):
    # each engine step takes 20 ms or more: a request of 8 tokens takes 0.18 s or more, so two
    # users send well under 100 req/s (the step that breaks) and easily 2 req/s (the one held)
    slow_steps(monkeypatch, 0.02)
    out = tmp_path / "capacity"
    slo = write_slo(tmp_path / "slo.json", max_error_rate=0.0, min_sent_fraction=0.6)
    code = main(["capacity", "--host", gateway_url, "--scenario", "short_chat", "--start", "2",
                 "--factor", "50", "--max-rate", "1000", "--users", "2", "--users-per-rps", "0.01",
                 "--duration", "3", "--slo", slo, "--out", str(out), *TINY])  # fmt: skip
    printed = capsys.readouterr().out
    result = json.loads((out / "capacity.json").read_text())
    assert [(s["rate"], s["users"]) for s in result["steps"]] == [(2, 2), (100, 2)]
    assert result["steps"][0]["passed"] is True, result["steps"][0]
    assert result["steps"][1]["passed"] is False
    assert [v.split(":")[0] for v in result["steps"][1]["violations"]] == ["min_sent_fraction"]
    assert result["highest_rate_held"] == 2 and result["broke_at"] == 100
    assert code == 0 and "highest rate that held: 2 req/s" in printed
    assert "100 req/s (2 users): broke: min_sent_fraction" in printed
    assert (out / "rate-2" / "report.html").exists() and (out / "rate-100" / "report.html").exists()


def test_warm_up_fails_early_naming_the_model_or_the_silent_server(gateway_url, tmp_path, capsys):
    args = ["run", "--scenario", "short_chat", "--duration", "3", "--out", str(tmp_path / "r")]
    code = main([*args, "--host", gateway_url, *TINY[2:], "--model", "missing"])
    err = capsys.readouterr().err
    assert code == 3 and "warm-up request to missing failed: HTTP 404" in err
    assert "missing" in err.split("HTTP 404", 1)[1]  # the gateway's own message
    began = time.monotonic()
    code = main([*args, "--host", f"http://127.0.0.1:{free_port()}", *TINY, "--wait", "1"])
    err = capsys.readouterr().err
    assert code == 3 and "warm-up request to tiny at http://127.0.0.1:" in err
    assert 1 <= time.monotonic() - began < 10  # it waited for the server, then gave up
    assert not (tmp_path / "r").exists()
