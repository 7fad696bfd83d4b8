"""Prefix caching: time to first token of a request whose 512-token prefix the engine has seen
before, against a cold one, alternating in one engine (prefix caching on), and the same warm
request with caching off as a control.

Each round: a cold request (a prefix never seen), then a warm one (the previous round's cold
prefix, a new question after it). One request at a time, greedy; the ratio is warm / cold TTFT
per round, and the median over rounds is printed. The warm output is checked equal to the same
request's output with caching off.

    python benchmarks/engine_prefix.py                  # SmolLM2-135M int4, 512 tokens, 6 rounds
    python benchmarks/engine_prefix.py --prefix 1024 --rounds 10
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_bench():
    """benchmarks/engine.py as a module (it also puts the project root on sys.path)."""
    spec = importlib.util.spec_from_file_location("engine_bench", HERE / "engine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32"])
    ap.add_argument("--prefix", type=int, default=512, help="tokens of the shared prefix")
    ap.add_argument("--tail", type=int, default=16, help="new tokens after the prefix")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    bench = load_bench()
    from aimass_common.settings import aimass_home
    from engine.loader import EngineConfig, open_core
    from engine.request import EngineRequest, SamplingParams
    from trainer.cli import resolve_model

    max_len = 1024 if args.prefix + args.tail + 8 <= 1024 else 2048
    package = bench.build_package(
        resolve_model(args.model), aimass_home() / "bench", args.precision, max_len
    )
    # the pool holds every slot full: the rounds leave one cached prefix each, and a pool that
    # holds fewer evicts the one the next round reads (LRU)
    config = dict(
        n_slots=8, threads=args.threads, max_len=max_len, token_budget=512, kv_tokens=8 * max_len
    )
    cached = open_core(package, EngineConfig(**config, prefix_caching=True))[0]
    plain = open_core(package, EngineConfig(**config))[0]
    rng = random.Random(0)
    vocab = cached.runner.vocab_size

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(1000, vocab) for _ in range(n))

    def ttft(core, prompt: tuple[int, ...], rid: str) -> tuple[float, list[int]]:
        request = EngineRequest(rid, prompt, 4, sampling=SamplingParams(temperature=0))
        start = time.perf_counter()
        core.add(request)
        first, out = None, []
        while core.has_work():
            for o in core.step():
                out += o.token_ids
                if first is None and o.token_ids:
                    first = time.perf_counter() - start
        return first, out

    ttft(cached, tokens(args.prefix + args.tail), "warmup")
    ttft(plain, tokens(args.prefix + args.tail), "warmup")
    previous = tokens(args.prefix)
    ttft(cached, previous + tokens(args.tail), "seed")
    rows = []
    for r in range(args.rounds):
        fresh = tokens(args.prefix)
        cold, _ = ttft(cached, fresh + tokens(args.tail), f"cold{r}")
        warm_prompt = previous + tokens(args.tail)
        warm, out = ttft(cached, warm_prompt, f"warm{r}")
        off, off_out = ttft(plain, warm_prompt, f"off{r}")
        assert out == off_out, f"round {r}: output differs with prefix caching ({out} vs {off_out})"
        rows.append((cold, warm, off))
        print(
            f"round {r}: cold {cold * 1e3:7.1f} ms   warm {warm * 1e3:7.1f} ms   "
            f"caching off {off * 1e3:7.1f} ms   warm/cold {warm / cold:.3f}",
            flush=True,
        )
        previous = fresh
    ratio = statistics.median(w / c for c, w, _ in rows)
    off_ratio = statistics.median(w / o for _, w, o in rows)
    print(
        f"\n{args.model} {args.precision}, {args.prefix}-token prefix + {args.tail} new tokens, "
        f"{args.threads} threads: warm / cold TTFT median {ratio:.3f} (target <= 0.25); "
        f"warm / caching off {off_ratio:.3f}; hits {cached.scheduler.prefix_hits}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
