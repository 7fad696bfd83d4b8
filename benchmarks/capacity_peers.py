"""Capacity against llama.cpp's own `llama-server`: the highest arrival rate at which the
standard load-test profile (loadtests/, 60% short chats, 20% long prompts, 20% long outputs,
Poisson arrivals) keeps p95 time to first token under 1 s and the error rate under 0.1%.

    ours            `aimass serve` on the package `make run` serves (SmolLM2-135M-Instruct,
                    ONNX int4 from the GGUF file's own Q4_1/Q8_0 blocks, float16 KV cache),
                    2 threads, 16 slots
    llama.cpp       `llama-server` built from source (benchmarks/_llamacpp.py) on the same GGUF
                    file, 2 threads, 16 slots (-np), continuous batching, 2048 cells a slot

Both get the same requests (loadtests' seeded workload), through the same HTTP client, on
loopback. The capacity search steps the offered rate up geometrically (loadtests.capacity)
until a step breaks the SLO. Servers alternate, ours first, in `--rounds` rounds (the machine is
shared and noisy); each round prints both and the ratio, and the last line the medians.

    python benchmarks/capacity_peers.py [--rounds 2] [--start 0.1] [--factor 1.5] [--duration 90]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, not benchmarks/, first

from aimass_common.settings import aimass_home  # noqa: E402
from benchmarks import _llamacpp as lc  # noqa: E402
from benchmarks._common import Gateway, machine, serve_home  # noqa: E402
from benchmarks.peers import shipped_gguf  # noqa: E402
from loadtests import capacity, thresholds  # noqa: E402
from loadtests.workload import Workload  # noqa: E402

MODEL = "smollm2-135m-instruct"
# the bar: p95 time to first token under 1 s, errors under 0.1%
SLO = thresholds.SLO(max_p95_ttft_ms=1000, max_error_rate=0.001, min_sent_fraction=0.9,
                     min_requests=20)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="ours then llama-server, this often")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=16, help="as `make run` (SERVE_FLAGS)")
    ap.add_argument("--start", type=float, default=0.1, help="first rate, requests/s")
    ap.add_argument("--factor", type=float, default=1.5, help="each step's rate over the last")
    ap.add_argument("--max-rate", type=float, default=16.0)
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of each step")
    ap.add_argument("--scenario", default="standard", help="a loadtests scenario (standard)")
    ap.add_argument("--package", type=Path,
                    default=aimass_home() / "packages" / f"{MODEL}-onnx-int4-kv16",
                    help="our package (default: the one `make run` exports; an install made "
                         "before it served the float16 cache has ...-int4 instead)")  # fmt: skip
    ap.add_argument("--work", type=Path, help="default $AIMASS_HOME/bench/capacity")
    ap.add_argument(
        "--peers", type=Path, help="llama.cpp build folder (default $AIMASS_HOME/peers)"
    )
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        ap.error("--rounds must be >= 1 and --duration > 0")
    if not (args.package / "manifest.json").is_file():
        ap.error(f"--package {args.package} has no manifest.json: run `make run` once first")
    return args


def search(url: str, headers: dict, args, out: Path) -> dict:
    workload = Workload(scenario=args.scenario, models=[MODEL], duration_s=args.duration,
                        seed=0)  # fmt: skip
    if key := headers.get("Authorization", "").removeprefix("Bearer "):
        os.environ["AIMASS_API_KEY"] = key
    else:
        os.environ.pop("AIMASS_API_KEY", None)
    steps = capacity.rates(args.start, args.factor, args.max_rate, 20)
    return capacity.search(workload, url, SLO, out, steps, warmup=2, wait_s=60)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work or aimass_home() / "bench" / "capacity"
    work.mkdir(parents=True, exist_ok=True)
    llama = lc.ensure_built(args.peers or aimass_home() / "peers")
    gguf = shipped_gguf()
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    headers = serve_home(args.package, home, MODEL)
    serve = SimpleNamespace(threads=args.threads, slots=args.slots, spin_wait=True)
    print(f"machine: {json.dumps(machine())}", flush=True)
    print(f"llama.cpp: {llama.reports}", flush=True)
    rounds = []
    for r in range(args.rounds):
        result = {}
        for name in ("ours", "llama-server"):
            started = time.monotonic()
            if name == "ours":
                server = Gateway(home, serve)
                url, hdrs = server.url, headers
            else:
                server = lc.LlamaServer(llama, gguf, args.threads, args.slots, args.slots * 2048,
                                        work / "llama-server.log")  # fmt: skip
                url, hdrs = server.url, {}
            try:
                found = search(url, hdrs, args, work / args.scenario / f"round-{r}" / name)
            finally:
                server.close()
            result[name] = found
            held = found["highest_rate_held"]
            print(f"round {r + 1} {name}: held {held} req/s, broke at {found['broke_at']} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
        ours, theirs = (
            result["ours"]["highest_rate_held"],
            result["llama-server"]["highest_rate_held"],
        )
        ratio = (ours or 0) / theirs if theirs else None
        print(f"round {r + 1}: ours / llama-server = {ratio if ratio is None else round(ratio, 2)}",
              flush=True)  # fmt: skip
        rounds.append({"ours": result["ours"], "llama-server": result["llama-server"],
                       "ratio": ratio})  # fmt: skip
    ratios = [r["ratio"] for r in rounds if r["ratio"] is not None]
    if ratios:
        print(f"median ours / llama-server capacity: {statistics.median(ratios):.2f}x "
              f"over {len(ratios)} rounds", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "llama": llama.reports,
                                         "scenario": args.scenario,
                                         "slo": "p95 TTFT <= 1000 ms, errors <= 0.1%",
                                         "rounds": rounds}, indent=2, default=str) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
