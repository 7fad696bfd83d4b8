"""What the control plane costs a generation request: the gateway with API-key auth, quota
checks and usage metering on PostgreSQL, against the same gateway with auth off (open access:
no keys, loopback only, nothing metered), at 32 concurrent streams.

    auth+metering   `aimass serve --database postgresql://…` (a fresh schema of the local test
                    server); a project with a token quota (high enough never to refuse) and an
                    inference key; every request authenticates the key (cached), checks the
                    quota (cached sums) and is metered (batched upserts every 2 s).
    open access     `aimass serve` on an empty SQLite database: no credentials, no metering.

Both gateways run at once as `aimass serve` subprocesses over one registry, with the same rate
limits (high enough never to refuse); rounds alternate open, auth, auth, open, … so drift in the
machine's load falls on both. Each round: --clients streams, each sending --requests completion
requests in turn (short, so per-request overhead is not hidden behind decoding), every request
`ignore_eos` with exactly --tokens output tokens. Printed: requests/s, tokens/s and median TTFT
of each, the gateway process's CPU time per request, and auth/open ratios of the medians over
rounds. After the run the usage table must hold exactly the tokens streamed with the key (the
gateway flushes at a clean stop), or the script exits 1.

    python benchmarks/control_overhead.py                     # SmolLM2-135M int4, ~5 minutes
    python benchmarks/control_overhead.py --package PATH      # any model package (e.g. tiny)
    python benchmarks/control_overhead.py --rounds 2 --requests 2   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import secrets
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from sqlalchemy import create_engine, func, select, text  # noqa: E402

from benchmarks._common import Gateway, run_clients  # noqa: E402
from controlplane.access import CLI  # noqa: E402
from controlplane.db import Database, normalize_url  # noqa: E402
from controlplane.identity import create_project  # noqa: E402
from controlplane.keys import create_key  # noqa: E402
from controlplane.models import Usage  # noqa: E402
from controlplane.quotas import set_quotas  # noqa: E402
from registry.registry import Registry  # noqa: E402

MODEL = "bench"
PROMPT = "The history of computing is a story of abstraction: each generation hides the last."


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=32, help="concurrent streams")
    ap.add_argument("--requests", type=int, default=4, help="requests per stream per round")
    ap.add_argument("--tokens", type=int, default=16, help="output tokens per request")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each, alternating")
    ap.add_argument("--package", type=Path, help="model package (default: SmolLM2-135M int4)")
    ap.add_argument("--postgres", default=os.environ.get(
        "AIMASS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL server; a schema of its own is made and dropped")  # fmt: skip
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--slots", type=int, default=32, help="engine slots")
    ap.add_argument(
        "--work", type=Path, help="homes and built packages (default $AIMASS_HOME/bench)"
    )
    ap.add_argument("--spin-wait", action=argparse.BooleanOptionalAction, default=False)
    return ap.parse_args(argv)


def smollm2_package(work: Path) -> Path:
    from trainer.cli import resolve_model  # deferred: torch, only to build the package once

    spec = importlib.util.spec_from_file_location("bench_engine", HERE / "engine.py")
    bench_engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_engine)
    return bench_engine.build_package(resolve_model("smollm2-135m-instruct"), work, "int4", 512)


def postgres_schema(server: str) -> tuple[str, str]:
    """(URL of a fresh schema, its name)."""
    schema = "bench_" + secrets.token_hex(4)
    admin = create_engine(normalize_url(server), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    return f"{server}?options=-csearch_path%3D{schema}", schema


def drop_schema(server: str, schema: str) -> None:
    admin = create_engine(normalize_url(server), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def key_for(url: str) -> tuple[dict[str, str], str]:
    """An inference key of a new project with a quota it will not reach; (headers, project)."""
    db = Database.open(url)
    db.upgrade()
    with db.session() as s:
        project = create_project(s, CLI, "bench").id
        set_quotas(s, CLI, project, {"tokens_per_day": 10**12})
        _, key = create_key(s, CLI, project, ["inference"])
    db.close()
    return {"Authorization": f"Bearer {key}"}, project


def metered_tokens(url: str, project: str) -> int:
    db = Database.open(url)
    with db.session() as s:
        total = s.scalar(
            select(func.sum(Usage.completion_tokens)).where(Usage.project_id == project)
        )
    db.close()
    return int(total or 0)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, all its threads: the engine's and the
    control plane's work alike, so the difference between the two gateways is what auth and
    metering cost, less exposed to other load on the machine than wall-clock rates."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bodies(args, tag: str) -> list[dict]:
    return [
        {"model": MODEL, "prompt": f"{tag}{i}. {PROMPT}", "max_tokens": args.tokens,
         "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        for i in range(args.clients * args.requests)
    ]  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    from aimass_common.settings import aimass_home

    work = args.work or aimass_home() / "bench"
    package = args.package or smollm2_package(work)
    root = work / "control-overhead"
    shutil.rmtree(root, ignore_errors=True)
    registry = Registry.open(str(root / "registry"))
    registry.set_alias(MODEL, "production", registry.push(package, MODEL).version)
    url, schema = postgres_schema(args.postgres)
    headers, project = key_for(url)
    reg = ["--registry", str(root / "registry")]
    for home in ("open", "auth"):
        (root / home).mkdir()
    print(f"model {package.name}, {args.clients} streams x {args.requests} requests x "
          f"{args.tokens} tokens, {args.rounds} rounds each; load {os.getloadavg()}", flush=True)  # fmt: skip
    gateways = {
        "open": (Gateway(root / "open", args, extra=reg), {}),
        "auth": (Gateway(root / "auth", args, extra=[*reg, "--database", url]), headers),
    }
    results: dict[str, list[dict]] = {"open": [], "auth": []}
    streamed = 0
    try:
        for gw, h in gateways.values():  # warm-up: load the model, fill caches
            asyncio.run(run_clients(gw.url + "/v1/completions", h, 2, bodies(args, "w")[:4]))
        for r in range(args.rounds):
            order = list(gateways.items())
            for name, (gw, h) in order if r % 2 == 0 else order[::-1]:  # ABBA: no order bias
                cpu = cpu_s(gw.proc.pid)
                row = asyncio.run(
                    run_clients(gw.url + "/v1/completions", h, args.clients, bodies(args, f"{r}"))
                )
                row["cpu_ms_per_request"] = 1e3 * (cpu_s(gw.proc.pid) - cpu) / row["requests"]
                row["requests_per_s"] = row["requests"] / row["makespan_s"]
                results[name].append(row)
                print(f"round {r} {name:<5} {row['requests_per_s']:7.2f} req/s "
                      f"{row['tokens_per_s']:8.1f} tok/s  TTFT p50 {row['ttft_ms']:7.1f} ms  "
                      f"gateway CPU {row['cpu_ms_per_request']:6.1f} ms/request",
                      flush=True)  # fmt: skip
        streamed = sum(r["tokens"] for r in results["auth"]) + 4 * args.tokens
    finally:
        for gw, _ in gateways.values():
            gw.close()
    try:
        metered = metered_tokens(url, project)
    finally:
        drop_schema(args.postgres, schema)
    print()
    for metric, better in (("requests_per_s", "higher"), ("tokens_per_s", "higher"),
                           ("ttft_ms", "lower"), ("cpu_ms_per_request", "lower")):  # fmt: skip
        o = statistics.median(r[metric] for r in results["open"])
        a = statistics.median(r[metric] for r in results["auth"])
        print(f"{metric:<15} open {o:9.2f}  auth+metering {a:9.2f}  ratio auth/open "
              f"{a / o:.3f} ({better} is better)")  # fmt: skip
    print(f"metering: {streamed} completion tokens streamed with the key, {metered} in the "
          "usage table")  # fmt: skip
    return 0 if metered == streamed else 1


if __name__ == "__main__":
    sys.exit(main())
