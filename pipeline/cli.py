"""`aimass pipeline promote`: a candidate through every gate to production (pipeline/promote.py).

    aimass pipeline promote --name NAME (--checkpoint CKPT | --corpus PATH --preset P | --job ID)
        [--registry URI] [--slo FILE] [--canary-weight W] [--watch S] [--gateway URL] ...

Progress goes to stdout, one line a step. A refusal is one line on stderr naming the gate and
its figures. Exit codes (the registry CLI's, where they mean the same):

    0 promoted (or the candidate is production already)
    1 a step could not run: the engine did not start, locust failed, a registry or the
      gateway's /metrics could not be read
    2 bad input: an option, a missing file, a job that made no version of NAME
    3 an alias moved under the pipeline (another promotion at the same time)
    4 a gate stopped the candidate: parity, perplexity, load_test, canary, or a registry gate
      at the promotion (fidelity, loadtest); production is untouched

Run it again after a failure: it resumes from the first step that did not pass.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from aimass_common.cli import fail
from aimass_common.settings import aimass_home, default_registry
from loadtests import thresholds
from loadtests.workload import SCENARIOS
from pipeline.canary import Limits
from registry import errors
from trainer.config import parse_set_args

WATCH_HELP = (
    "seconds to watch the canary on the deployment's gateway (--gateway) before production "
    "moves (default 300); without --gateway the watch is skipped, recorded as skipped ('no "
    "gateway to watch'), and production moves once the other gates pass"
)


def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="promotion pipeline: gates, canary, production")
    sub = p.add_subparsers(dest="pipeline_command", metavar="COMMAND", required=True)
    c = sub.add_parser(
        "promote",
        help="export, parity, eval vs production, load test, canary, promote (or stop at a gate)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--name", required=True, help="the model's name in the registry")
    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint or run folder")
    source.add_argument("--corpus", metavar="PATH", help="train a candidate on this corpus first")
    source.add_argument("--job", metavar="JOB_ID", help="a succeeded fine-tuning job's version")
    c.add_argument("--preset", help="with --corpus: the architecture preset (e.g. tiny)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --corpus: a training setting (repeatable)")  # fmt: skip
    c.add_argument("--database", metavar="URL", help="with --job: the control-plane database")
    c.add_argument("--registry", metavar="URI",
                   help="default $AIMASS_REGISTRY, else $AIMASS_HOME/registry")  # fmt: skip
    c.add_argument("--targets", default="onnx-fp32", help="export targets (default onnx-fp32)")
    c.add_argument("--slo", default=str(thresholds.DEFAULT), metavar="FILE",
                   help="SLO thresholds of the load test and the canary's absolute limits "
                   "(default loadtests/slo/default.json)")  # fmt: skip
    c.add_argument("--held-out", metavar="FILE",
                   help="eval text, paragraphs split by blank lines (default: the exporters' "
                   "built-in held-out paragraphs)")  # fmt: skip
    c.add_argument("--max-ppl-increase", type=float, default=0.02, metavar="FRACTION",
                   help="perplexity over production's allowed (default 0.02)")  # fmt: skip
    c.add_argument("--engine-args", default="", metavar="ARGS",
                   help="engine options of the load-tested server, e.g. '--slots 4 --threads 1'")  # fmt: skip
    c.add_argument("--load-scenario", choices=SCENARIOS, default="short_chat")
    c.add_argument("--load-rate", type=float, default=2.0, metavar="RPS")
    c.add_argument("--load-duration", type=float, default=30.0, metavar="S")
    c.add_argument("--load-users", type=int, metavar="N", help="default 4 per req/s, at least 4")
    c.add_argument("--canary-weight", type=float, default=0.1, metavar="W",
                   help="the canary's share of NAME's traffic, 0..1 (default 0.1)")  # fmt: skip
    c.add_argument("--gateway", metavar="URL", help="the deployment's gateway (its /metrics)")
    c.add_argument("--watch", type=float, default=300.0, metavar="S", help=WATCH_HELP)
    c.add_argument("--canary-max-error-increase", type=float, default=0.01, metavar="RATE",
                   help="canary error rate over production's allowed (default 0.01)")  # fmt: skip
    c.add_argument("--canary-max-ttft-ratio", type=float, default=1.5, metavar="X",
                   help="canary p95 TTFT over production's allowed (default 1.5)")  # fmt: skip
    c.add_argument("--canary-min-requests", type=int, default=5, metavar="N",
                   help="canary requests the watch must see (default 5)")  # fmt: skip
    c.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime threads (parity, eval)")
    c.add_argument("--work", metavar="DIR",
                   help="work folders, one per candidate (default $AIMASS_HOME/pipeline)")  # fmt: skip
    c.set_defaults(func=_promote)


def _promote(args: argparse.Namespace) -> int:
    # deferred: the steps import torch (trainer, exporters), which `aimass --help` must not load
    from pipeline.eval import read_held_out
    from pipeline.promote import BadSource, PipelineError, Run, Stopped

    try:
        source, options = _build(args, read_held_out)
    except ValueError as e:
        return fail(str(e))
    try:
        outcome = Run(source, options, say=lambda line: print(line, flush=True)).run()
    except BadSource as e:
        return fail(str(e))
    except Stopped as e:
        return fail(f"stopped at {e}", 4)
    except PipelineError as e:
        return fail(str(e), 1)
    except errors.AliasConflict as e:
        return fail(str(e), 3)
    except errors.GateFailed as e:
        return fail(str(e), 4)
    except errors.StorageError as e:
        return fail(str(e), 1)
    except errors.RegistryError as e:
        return fail(str(e))
    except OSError as e:  # the local disk: the work folder, a full cache
        return fail(str(e), 1)
    print(f"{outcome.name}:{outcome.version} is production")
    return 0


def _build(args: argparse.Namespace, read_held_out):
    """(Source, Options) from the command line; ValueError naming the option, value and limit."""
    from pipeline.promote import Options, Source  # deferred with the steps: torch
    from pipeline.steps import check_engine_args  # torch (the exporters)

    if args.corpus and not args.preset:
        raise ValueError("--corpus needs --preset (e.g. --preset tiny)")
    if not args.corpus and (args.preset or args.set):
        raise ValueError("--preset and --set apply to --corpus only")
    parse_set_args(args.set)  # KEY=VALUE each, checked before anything runs
    if args.database and not args.job:
        raise ValueError("--database applies to --job only")
    for flag, value in (("--checkpoint", args.checkpoint), ("--corpus", args.corpus),
                        ("--slo", args.slo), ("--held-out", args.held_out)):  # fmt: skip
        if value is not None and not Path(value).exists():
            raise ValueError(f"{flag} {value}: no such file or folder")
    _check(args)
    slo = thresholds.load(args.slo)
    source = Source(
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        corpus=Path(args.corpus) if args.corpus else None,
        preset=args.preset,
        train_settings=tuple(args.set),
        job=args.job,
        database=args.database,
    )
    options = Options(
        name=args.name,
        registry=args.registry or default_registry(),
        slo=Path(args.slo),
        work_root=(Path(args.work) if args.work else aimass_home() / "pipeline").resolve(),
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        held_out=read_held_out(args.held_out) if args.held_out else None,
        max_ppl_increase=args.max_ppl_increase,
        engine_args=tuple(check_engine_args(args.engine_args)),
        load_scenario=args.load_scenario,
        load_rate=args.load_rate,
        load_duration_s=args.load_duration,
        load_users=args.load_users,
        canary_weight=args.canary_weight,
        gateway=args.gateway.rstrip("/") if args.gateway else None,
        watch_s=args.watch,
        canary_limits=Limits(
            max_error_rate=slo.max_error_rate,
            max_p95_ttft_ms=slo.max_p95_ttft_ms,
            max_error_rate_increase=args.canary_max_error_increase,
            max_ttft_ratio=args.canary_max_ttft_ratio,
            min_requests=args.canary_min_requests,
        ),
        threads=args.threads,
    )
    return source, options


def _check(args: argparse.Namespace) -> None:
    checks = [
        ("--canary-weight", args.canary_weight, 0 < args.canary_weight < 1, "in (0, 1)"),
        ("--watch", args.watch, 0 < args.watch <= 86400, "in (0, 86400] s"),
        ("--max-ppl-increase", args.max_ppl_increase, 0 <= args.max_ppl_increase <= 10, "in [0, 10]"),
        ("--load-rate", args.load_rate, 0 < args.load_rate <= 1000, "in (0, 1000] req/s"),
        ("--load-duration", args.load_duration, 0 < args.load_duration <= 3600, "in (0, 3600] s"),
        ("--load-users", args.load_users, args.load_users is None or 1 <= args.load_users <= 1000, "in 1..1000"),
        ("--canary-max-error-increase", args.canary_max_error_increase,
         0 <= args.canary_max_error_increase <= 1, "in [0, 1]"),
        ("--canary-max-ttft-ratio", args.canary_max_ttft_ratio, args.canary_max_ttft_ratio >= 1, ">= 1"),
        ("--canary-min-requests", args.canary_min_requests, args.canary_min_requests >= 1, ">= 1"),
        ("--threads", args.threads, args.threads is None or args.threads >= 1, ">= 1"),
        ("--targets", args.targets, bool(args.targets.strip(", ")), "at least one target"),
    ]  # fmt: skip
    for flag, value, ok, limit in checks:
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{flag}={value!r} must be {limit}")
    if args.gateway and not args.gateway.startswith(("http://", "https://")):
        raise ValueError(f"--gateway {args.gateway!r} must be an http:// or https:// URL")
