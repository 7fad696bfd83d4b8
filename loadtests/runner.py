"""One headless load test: locust in a child process, then the report and the SLO verdict.

Locust patches the standard library for gevent when it is imported, so it never runs in this
process: `run` starts `python -m loadtests.generate` (locust as a library over the locustfile's
user class), which writes one JSON line per request, and computes everything from those lines. Every run is bounded: in
time (the workload's duration, then at most request_timeout_s for the requests in flight) and in
count (max_requests), and it loads only a loopback address unless the host is named as allowed.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from loadtests import metrics, report, thresholds
from loadtests.metrics import DEFINITIONS_BY_FIELD
from loadtests.workload import Workload, expected_requests

ROOT = Path(__file__).resolve().parent.parent  # the folder holding loadtests/
START_S = 60.0  # locust's own start, on a busy machine


class RunFailed(Exception):
    """The load generator itself failed (not the system under test)."""


def check_host(url: str, allowed: tuple[str, ...] = ()) -> str:
    """`url` as locust's --host, if it is loopback or its host is in `allowed`; else ValueError.
    Names are not resolved: a name other than localhost must be allowed explicitly."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--host {url!r} must be an http:// or https:// URL with a host")
    host = parts.hostname
    if host == "localhost" or _is_loopback(host) or host in allowed:
        return url.rstrip("/")
    raise ValueError(
        f"--host {url!r}: {host} is not a loopback address; load only the deployment under "
        f"test, and name it with --allow-host {host}"
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warm_up(w: Workload, host: str, requests: int = 1, wait_s: float = 0.0) -> None:
    """`requests` small completions to each model before the run, uncounted: a serverless
    gateway loads a model at its first request, which is not the latency under load. Waits up
    to `wait_s` for the server to answer (a gateway just started); RunFailed naming the model
    when it answers with an error."""
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get("AIMASS_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    deadline = time.monotonic() + wait_s
    for model in dict.fromkeys(w.models):
        body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
        for _ in range(requests):
            req = urllib.request.Request(f"{host}/v1/chat/completions", json.dumps(body).encode(),
                                         headers)  # fmt: skip
            while True:
                try:
                    with urllib.request.urlopen(req, timeout=w.request_timeout_s) as r:
                        r.read()
                    break
                except urllib.error.HTTPError as e:
                    if e.code == 503 and time.monotonic() < deadline:  # still loading
                        time.sleep(0.5)
                        continue
                    detail = e.read()[:300].decode(errors="replace")
                    raise RunFailed(
                        f"warm-up request to {model} failed: HTTP {e.code}: {detail}"
                    ) from None
                except (urllib.error.URLError, OSError) as e:
                    if time.monotonic() < deadline:  # not listening yet
                        time.sleep(0.5)
                        continue
                    raise RunFailed(f"warm-up request to {model} at {host} failed: {e}") from None


def generator_command(host: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "loadtests.generate", "--workload", str(out / "workload.json"),
            "--host", host, "--out", str(out)]  # fmt: skip


def generate(w: Workload, host: str, out: Path) -> list[metrics.Sample]:
    """Runs locust over the workload and returns its samples; RunFailed if it did not run."""
    w.validate()
    if importlib.util.find_spec("locust") is None:
        raise RunFailed("locust is not installed: pip install -e '.[dev]' (or pip install locust)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "workload.json").write_bytes(msgspec.json.format(msgspec.json.encode(w)))
    samples = out / "samples.jsonl"
    samples.unlink(missing_ok=True)
    root = str(ROOT)  # `import loadtests` in the child, installed or not
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    }
    limit = START_S + w.duration_s + w.request_timeout_s + 10
    with open(out / "locust.log", "wb") as log:
        try:
            done = subprocess.run(generator_command(host, out), stdout=log, stderr=subprocess.STDOUT,
                                  env=env, timeout=limit, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RunFailed(
                f"locust did not end within {limit:g} s; see {out / 'locust.log'}"
            ) from None
    if done.returncode != 0 or not samples.exists():
        tail = (out / "locust.log").read_text(errors="replace")[-1500:]
        raise RunFailed(f"locust exited with code {done.returncode} and no samples:\n{tail}")
    found = metrics.read_samples(samples)
    if not found:
        tail = (out / "locust.log").read_text(errors="replace")[-1500:]
        raise RunFailed(f"locust sent no request in {w.duration_s:g} s:\n{tail}")
    return found


def build_report(w: Workload, host: str, samples: list[metrics.Sample], slo: thresholds.SLO,
                 started: datetime) -> dict:  # fmt: skip
    """The report of a run: the registry gate's fields first (passed, p95_ms = p95 TTFT in ms,
    error_rate, rps = successful requests/s), then the figures, checks and time series."""
    summary = metrics.summarize(samples)
    offered = min(expected_requests(w), w.max_requests)
    sent_fraction = summary["requests"] / offered if offered else 0.0
    checks = thresholds.check(slo, summary, sent_fraction)
    return {
        "passed": all(c.passed for c in checks),
        "p95_ms": summary["ttft_ms"]["p95"],
        "error_rate": summary["error_rate"],
        "rps": summary["rps"],
        "p95_of": "ttft_ms",
        "violations": [c.describe() for c in checks if not c.passed],
        "host": host,
        "scenario": w.scenario,
        "models": w.models,
        "offered_rate": w.rate,
        "users": w.users,
        "offered_requests": offered,
        "started_at": started.isoformat(timespec="seconds"),
        "workload": msgspec.to_builtins(w),
        "slo": msgspec.to_builtins(slo),
        "checks": msgspec.to_builtins(checks),
        "summary": summary,
        "timeseries": metrics.timeseries(samples),
        "definitions": DEFINITIONS_BY_FIELD,
    }


def run(w: Workload, host: str, slo: thresholds.SLO, out: Path, allowed: tuple[str, ...] = (),
        warmup: int = 1, wait_s: float = 0.0) -> dict:  # fmt: skip
    """A load test from start to report (written under `out`); returns the report. `warmup`
    and `wait_s`: see warm_up."""
    host = check_host(host, allowed)
    if warmup:
        warm_up(w, host, warmup, wait_s)
    started = datetime.now(UTC)
    samples = generate(w, host, out)
    result = build_report(w, host, samples, slo, started)
    report.write(result, out)
    return result
