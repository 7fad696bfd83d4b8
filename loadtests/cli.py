"""`aimass loadtest run|capacity` (also `python -m loadtests run|capacity`).

    run        one bounded load test; writes report.json, report.html and PNG charts to --out
               and exits 1 naming each SLO threshold the run violated
    capacity   steps the offered rate up until the SLO breaks; writes capacity.json and prints
               the highest rate that held (exit 1 if even the first rate broke)

Exit codes: 0 passed, 1 SLO violated, 2 bad input (a refused host, a bad SLO file or option),
3 the load generator failed. Loads only a loopback address unless --allow-host names the host.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from loadtests import capacity, runner, thresholds
from loadtests.workload import SCENARIOS, Workload, peak_rate

# users per req/s offered, by default: a request may take this many seconds (a long output on a
# CPU) before its user falls behind its schedule and the rate offered drops
USERS_PER_RPS = 60.0


def register(subparsers) -> None:
    p = subparsers.add_parser("loadtest", help="load tests with SLO thresholds; capacity search")
    add_commands(p)


def add_commands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="loadtest_command", metavar="COMMAND", required=True)
    c = sub.add_parser("run", help="one load test against a gateway, judged by an SLO")
    _common(c)
    c.add_argument("--rate", type=float, default=1.0, help="requests/s offered (default 1)")
    c.set_defaults(func=_run)
    c = sub.add_parser("capacity", help="the highest rate that holds the SLO")
    _common(c)
    c.add_argument("--start", type=float, default=0.5, help="first rate, req/s (default 0.5)")
    c.add_argument("--factor", type=float, default=1.5, help="each step's rate over the last")
    c.add_argument("--max-rate", type=float, default=64.0, help="stop after this rate")
    c.add_argument("--max-steps", type=int, default=10)
    c.add_argument("--users-per-rps", type=float, default=USERS_PER_RPS,
                   help="users per req/s offered: the worst latency, in seconds, the rate allows")  # fmt: skip
    c.set_defaults(func=_capacity)


def _common(c: argparse.ArgumentParser) -> None:
    d = Workload()
    c.add_argument("--host", default="http://127.0.0.1:8000", help="the gateway's base URL")
    c.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a non-loopback host that may be loaded (the deployment under test)")  # fmt: skip
    c.add_argument("--scenario", choices=SCENARIOS, default=d.scenario)
    c.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help=f"model name (repeatable; default {d.models[0]})")  # fmt: skip
    c.add_argument(
        "--users", type=int, help="simulated users (default: 60 per req/s at the peak, at least 4)"
    )
    c.add_argument("--duration", type=float, default=d.duration_s, metavar="S",
                   help="seconds of sending, per run (default 60)")  # fmt: skip
    c.add_argument("--max-requests", type=int, default=d.max_requests, metavar="N")
    c.add_argument("--short-max-tokens", type=int, default=d.short_max_tokens, metavar="N")
    c.add_argument("--long-prompt-words", type=int, default=d.long_prompt_words, metavar="N")
    c.add_argument("--long-output-tokens", type=int, default=d.long_output_tokens, metavar="N")
    c.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="S")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--slo", default=str(thresholds.DEFAULT), metavar="FILE",
                   help="SLO thresholds as JSON (default loadtests/slo/default.json)")  # fmt: skip
    c.add_argument("--out", default="runs/loadtest", metavar="DIR")
    c.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="uncounted requests to each model first (default 1; 0: none)")  # fmt: skip
    c.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the server to answer (one just started)")  # fmt: skip


def workload(args: argparse.Namespace, rate: float) -> Workload:
    w = Workload(
        scenario=args.scenario,
        models=args.models or Workload().models,
        rate=rate,
        duration_s=args.duration,
        max_requests=args.max_requests,
        short_max_tokens=args.short_max_tokens,
        long_prompt_words=args.long_prompt_words,
        long_output_tokens=args.long_output_tokens,
        request_timeout_s=args.request_timeout,
        seed=args.seed,
    )
    w.users = args.users or min(1000, max(4, math.ceil(peak_rate(w) * USERS_PER_RPS)))
    w.validate()
    return w


def fail(message: str, code: int = 2) -> int:
    print(f"aimass loadtest: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        w = workload(args, args.rate)
        slo = thresholds.load(args.slo)
        result = runner.run(w, args.host, slo, Path(args.out), tuple(args.allow_host),
                            args.warmup, args.wait)  # fmt: skip
    except ValueError as e:
        return fail(str(e))
    except runner.RunFailed as e:
        return fail(str(e), 3)
    s = result["summary"]
    print(
        f"{'PASSED' if result['passed'] else 'FAILED'}: {s['requests']} requests, "
        f"p95 TTFT {s['ttft_ms']['p95']} ms, p95 ITL {s['itl_ms']['p95']} ms, "
        f"error rate {s['error_rate']}, {s['rps']} req/s, {s['output_tokens_per_s']} output "
        f"tokens/s; report {Path(args.out) / 'report.html'}"
    )
    for violation in result["violations"]:
        print(f"SLO violated: {violation}")
    return 0 if result["passed"] else 1


def _capacity(args: argparse.Namespace) -> int:
    try:
        steps = capacity.rates(args.start, args.factor, args.max_rate, args.max_steps)
        w = workload(args, steps[0])
        if args.users is None:
            w.users = 4  # each step sizes its users from its own rate
        slo = thresholds.load(args.slo)
        result = capacity.search(w, args.host, slo, Path(args.out), steps, args.users_per_rps,
                                 tuple(args.allow_host), args.warmup, args.wait)  # fmt: skip
    except ValueError as e:
        return fail(str(e))
    except runner.RunFailed as e:
        return fail(str(e), 3)
    for step in result["steps"]:
        verdict = "held" if step["passed"] else "broke: " + "; ".join(step["violations"])
        print(f"{step['rate']:g} req/s ({step['users']} users): {verdict}")
    held = result["highest_rate_held"]
    print(f"highest rate that held: {'none' if held is None else f'{held:g}'} req/s; "
          f"{Path(args.out) / 'capacity.json'}")  # fmt: skip
    return 0 if held is not None else 1
