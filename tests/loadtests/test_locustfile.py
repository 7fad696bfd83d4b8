"""loadtests/scenarios.py run by locust itself (`locust -f`), as a person would run it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from tests.loadtests.conftest import tiny_workload

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtests" / "scenarios.py"


def test_locust_f_runs_the_scenarios_and_stops_at_the_request_budget(gateway_url, tmp_path):
    workload = tmp_path / "workload.json"
    workload.write_bytes(msgspec.json.encode(tiny_workload()))
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "3",
         "-r", "3", "-t", "60s", "--host", gateway_url, "--only-summary",
         "--json-file", str(tmp_path / "stats"), "--workload", str(workload),
         "--scenario", "mixed_models", "--models", "tiny,missing", "--rate", "6",
         "--max-requests", "8", "--samples", str(tmp_path / "samples.jsonl")],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    took = time.monotonic() - began
    assert took < 30, f"did not stop at its request budget ({took:.0f} s): {done.stderr[-2000:]}"
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    by_model = {m: [s for s in samples if s["model"] == m] for m in ("tiny", "missing")}
    assert by_model["tiny"] and by_model["missing"]
    assert all(s["ok"] and s["ttft_ms"] > 0 for s in by_model["tiny"])
    for s in by_model["missing"]:
        assert not s["ok"] and s["status"] == 404 and s["error"].startswith("HTTP 404: ")
        assert "missing" in s["error"]  # the gateway's message names the model
    # locust's own statistics (written as it exits): the custom request types, the failures
    stats = {(e["method"], e["name"]): e for e in json.loads((tmp_path / "stats.json").read_text())}
    e2e = stats["E2E", "short_chat"]
    assert (e2e["num_requests"], e2e["num_failures"]) == (8, len(by_model["missing"]))
    assert stats["TTFT", "short_chat"]["num_requests"] == len(by_model["tiny"])
    itl_gaps = sum(len(s["itl_ms"]) for s in by_model["tiny"])
    assert stats["ITL", "short_chat"]["num_requests"] == itl_gaps > 0
    assert stats["TPS", "short_chat"]["num_requests"] == len(by_model["tiny"])
