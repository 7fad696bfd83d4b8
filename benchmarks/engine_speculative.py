"""Speculative decoding (n-gram drafts) on and off, alternating in one process: decode tokens/s
of a repetitive prompt (code to repeat) and a non-repetitive one (a story), at 1 and 8 streams.

Each round runs every case with speculation off, then on, in two engines of the same package
loaded once; greedy, a fixed number of output tokens (EOS ignored), so both produce the same
tokens (checked). Decode tokens/s = output tokens after each stream's first / (end - first
token). Printed: each round's pair, the median of the on/off ratios, and the acceptance rate.

    python benchmarks/engine_speculative.py              # SmolLM2-135M int4, k=4, 3 rounds
    python benchmarks/engine_speculative.py --k 6 --rounds 5 --streams 1 4 8
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CODE = """def merge_sorted(a, b):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
"""
PROMPTS = {
    "repetitive": f"Here is a function:\n\n{CODE}\nThe same function, copied exactly:\n\n",
    "story": "Once upon a time, in a village at the edge of a great forest, there lived a",
}


def load_bench():
    spec = importlib.util.spec_from_file_location("engine_bench", HERE / "engine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # also puts the project root first on sys.path
    return bench


def wave(core, prompt: tuple[int, ...], streams: int, tokens: int, tag: str):
    """→ (decode tokens/s, outputs)"""
    from engine.request import EngineRequest, SamplingParams

    for i in range(streams):
        core.add(EngineRequest(f"{tag}{i}", prompt, tokens, sampling=SamplingParams(0)))
    first: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    while core.has_work():
        for o in core.step():
            if o.token_ids and o.request_id not in first:
                first[o.request_id] = time.perf_counter()
            outputs.setdefault(o.request_id, []).extend(o.token_ids)
    end = time.perf_counter()
    decoded = sum(len(v) - 1 for v in outputs.values())
    return decoded / (end - min(first.values())), [outputs[k] for k in sorted(outputs)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32"])
    ap.add_argument("--k", type=int, default=4, help="draft tokens (speculative_tokens)")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per stream")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--max-batch",
        type=int,
        help="override the decoding requests above which drafts stop (SPEC_MAX_BATCH)",
    )
    args = ap.parse_args(argv)

    bench = load_bench()
    from tokenizers import Tokenizer

    from aimass_common.settings import aimass_home
    from engine.loader import EngineConfig, open_core
    from trainer.cli import resolve_model

    package = bench.build_package(
        resolve_model(args.model), aimass_home() / "bench", args.precision, 1024
    )
    tokenizer = Tokenizer.from_file(str(package / "tokenizer.json"))
    prompts = {name: tuple(tokenizer.encode(text).ids) for name, text in PROMPTS.items()}
    config = dict(n_slots=max(args.streams), threads=args.threads, max_len=1024)
    off = open_core(package, EngineConfig(**config))[0]
    on = open_core(package, EngineConfig(**config, speculative_tokens=args.k))[0]
    spec = on.scheduler.speculator
    if args.max_batch is not None:
        spec.max_batch = args.max_batch
    for core in (off, on):
        wave(core, prompts["story"], 1, 8, "warmup")

    ratios: dict[tuple[str, int], list[float]] = {}
    acceptance: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for name, prompt in prompts.items():
            for streams in args.streams:
                base, base_out = wave(off, prompt, streams, args.tokens, f"off{r}{name}")
                drafted, accepted = spec.drafted_total, spec.accepted_total
                fast, fast_out = wave(on, prompt, streams, args.tokens, f"on{r}{name}")
                if fast_out != base_out:
                    print(f"  note: {name}×{streams} output differs (float ties)", flush=True)
                d, a = spec.drafted_total - drafted, spec.accepted_total - accepted
                key = (name, streams)
                ratios.setdefault(key, []).append(fast / base)
                acceptance.setdefault(key, []).append(a / d if d else 0.0)
                print(
                    f"round {r} {name:>10} × {streams}: off {base:6.1f} tok/s  on {fast:6.1f} "
                    f"tok/s  ratio {fast / base:.2f}  drafted {d} accepted {a}",
                    flush=True,
                )
    print(f"\n{args.model} {args.precision}, k={args.k}, {args.threads} threads, medians:")
    print("| prompt | streams | on / off decode tok/s | acceptance |")
    print("|---|---|---|---|")
    for (name, streams), values in ratios.items():
        acc = statistics.median(acceptance[name, streams])
        print(f"| {name} | {streams} | {statistics.median(values):.2f}× | {acc:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
