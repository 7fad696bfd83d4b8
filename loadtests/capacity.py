"""Capacity search: step the offered rate up until the SLO breaks; the answer is the highest
rate that held.

Rates go start, start x factor, ... up to `max_rate` (geometric steps find the knee in few
runs; a finer search can start just below it). Each step is a full bounded run (runner.run)
at that rate, with enough users that the users themselves never cap the rate: `users_per_rps`
concurrent requests per request/s offered (Little's law with a worst-case latency in seconds).
The search stops at the first step that breaks the SLO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec

from loadtests import runner, thresholds
from loadtests.workload import Workload


def rates(start: float, factor: float, max_rate: float, max_steps: int) -> list[float]:
    """The offered rates, in order; ValueError naming the bad argument."""
    if start <= 0:
        raise ValueError(f"--start={start} must be > 0 req/s")
    if factor <= 1:
        raise ValueError(f"--factor={factor} must be > 1")
    if max_rate < start:
        raise ValueError(f"--max-rate={max_rate} must be >= --start={start}")
    if not 1 <= max_steps <= 50:
        raise ValueError(f"--max-steps={max_steps} must be in 1..50")
    out, rate = [], start
    while rate <= max_rate * (1 + 1e-9) and len(out) < max_steps:
        out.append(round(rate, 4))
        rate *= factor
    return out


def search(base: Workload, host: str, slo: thresholds.SLO, out: Path, steps: list[float],
           users_per_rps: float = 60.0, allowed: tuple[str, ...] = (), warmup: int = 1,
           wait_s: float = 0.0) -> dict:  # fmt: skip
    """Runs each rate in `steps` until one breaks the SLO; writes capacity.json under `out`
    (each step's report in its own folder) and returns it."""
    runner.check_host(host, allowed)
    results = []
    held = None
    for rate in steps:
        users = min(1000, max(base.users, math.ceil(rate * users_per_rps)))
        w = msgspec.structs.replace(base, rate=rate, users=users)
        # warm only before the first step: later steps find the models loaded
        first = not results
        r = runner.run(w, host, slo, out / f"rate-{rate:g}", allowed, warmup if first else 0,
                       wait_s if first else 0.0)  # fmt: skip
        results.append({
            "rate": rate, "users": users, "passed": r["passed"], "violations": r["violations"],
            "rps": r["rps"], "p95_ms": r["p95_ms"], "error_rate": r["error_rate"],
            "p95_itl_ms": r["summary"]["itl_ms"]["p95"],
            "output_tokens_per_s": r["summary"]["output_tokens_per_s"],
            "report": str(out / f"rate-{rate:g}" / "report.json"),
        })  # fmt: skip
        if not r["passed"]:
            break
        held = rate
    result = {
        "highest_rate_held": held,
        "broke_at": None if results[-1]["passed"] else results[-1]["rate"],
        "scenario": base.scenario,
        "models": base.models,
        "host": host,
        "step_duration_s": base.duration_s,
        "slo": msgspec.to_builtins(slo),
        "steps": results,
    }
    (out / "capacity.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
