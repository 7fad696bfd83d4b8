"""Streams' inter-token latency while long prompts arrive: the old policy (a prompt takes what
the token budget leaves), a prompt cap while streams decode (--max-prefill-tokens), and the cap
with mixed forwards (--mixed-forwards), alternating in one process on SmolLM2-135M int4.

Each round runs every engine in turn (the order rotates). In one engine: --streams greedy
requests decode steadily; their inter-token gaps over --steady-steps steps give the steady p99;
then the long prompts (--long, one every --arrival-steps steps) arrive while the streams go on,
and the gaps that end before the last long prompt's first token give the window's p99. Printed
per engine and round: steady p99, window p99, their ratio (the issue asks <= 2), the long
prompts' time to first token, and the median over rounds; the streams' tokens are checked equal
across engines. A second table times one mixed forward (decodes + a prompt chunk of n tokens on
a past) against the two forwards it replaces, alternating.

    python benchmarks/engine_mixed.py --package /tmp/mixhome/pkg          # ~10 minutes, 2 cores
    python benchmarks/engine_mixed.py --package PKG --caps 16 64 --rounds 5 --long 1024 1500

Without --package the int4 package is built once under $AIMASS_HOME/bench (as
benchmarks/engine_prefix.py does).
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
MAX_LEN = 2048


def load_bench():
    """benchmarks/engine.py as a module (it also puts the project root first on sys.path)."""
    spec = importlib.util.spec_from_file_location("engine_bench", HERE / "engine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def p99(gaps: list[float]) -> float:
    return statistics.quantiles(gaps, n=100, method="inclusive")[98] if len(gaps) > 1 else gaps[0]


def one_round(core, args, rng: random.Random, tag: str, vocab: int) -> dict:
    """Steady streams, then long prompts arriving among them → gaps, TTFTs and tokens."""
    from engine.request import EngineRequest, SamplingParams

    def prompt(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(1000, vocab) for _ in range(n))

    greedy = SamplingParams(temperature=0)
    streams = [f"{tag}s{i}" for i in range(args.streams)]
    for rid in streams:
        core.add(EngineRequest(rid, prompt(16), MAX_LEN - 16, sampling=greedy))
    longs = [(f"{tag}l{i}", prompt(n)) for i, n in enumerate(args.long)]
    times: dict[str, list[float]] = {rid: [] for rid in streams}
    tokens: dict[str, list[int]] = {rid: [] for rid in streams + [rid for rid, _ in longs]}
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}
    steady_from = window_from = window_to = None
    step = 0
    while window_to is None:
        if steady_from is None and all(len(times[r]) >= 4 for r in streams):
            steady_from, steady_step = time.perf_counter(), step
        if steady_from is not None and step >= steady_step + args.steady_steps:
            due = (step - steady_step - args.steady_steps) // args.arrival_steps
            for rid, ids in longs[len(arrived) : due + 1]:
                core.add(EngineRequest(rid, ids, 2, sampling=greedy))
                arrived[rid] = time.perf_counter()
                window_from = window_from or arrived[rid]
        for out in core.step():
            now = time.perf_counter()
            tokens[out.request_id] += out.token_ids
            if out.request_id in times and out.token_ids:
                times[out.request_id].append(now)
            elif out.token_ids and out.request_id not in first:
                first[out.request_id] = now
        if len(first) == len(longs):
            window_to = time.perf_counter()
        step += 1
    for rid in streams:
        core.abort(rid)
    while core.has_work():
        for out in core.step():
            tokens[out.request_id] += out.token_ids
    steady, window = [], []
    for ts in times.values():
        for a, b in zip(ts, ts[1:], strict=False):
            if steady_from < a and b <= window_from:
                steady.append(b - a)
            elif window_from < b <= window_to:
                window.append(b - a)
    return {
        "steady": p99(steady),
        "window": p99(window),
        # the medians: what the policy does to a typical step, less swayed by other processes
        "median": statistics.median(window) / statistics.median(steady),
        "ttft": [first[rid] - arrived[rid] for rid, _ in longs],
        "tokens": [tokens[rid] for rid in streams],
        "long_tokens": [tokens[rid] for rid, _ in longs],
        "steps": step,
    }


def warm_up(core) -> None:
    """One short request through `core`, then the wait for its weights' huge-page collapse
    (a thread the first forward starts, engine/runner.py): without it, each engine's first
    steady window shares the cores with that copy, and its p99 with it."""
    from engine.request import EngineRequest, SamplingParams

    core.add(
        EngineRequest(
            "warm-up", (1000, 1001, 1002, 1003), 4, sampling=SamplingParams(temperature=0)
        )
    )
    while core.has_work():
        core.step()
    collapser = getattr(core.runner, "_collapser", None)
    if collapser is not None:
        collapser.join()


def equal(a: dict, b: dict) -> str:
    """How many streams (over the tokens both runs produced) and long prompts produced the
    same tokens in two runs."""
    same = sum(x[: len(y)] == y[: len(x)] for x, y in zip(a["tokens"], b["tokens"], strict=True))
    longs = sum(x == y for x, y in zip(a["long_tokens"], b["long_tokens"], strict=True))
    return f"{same}/{len(a['tokens'])} streams, {longs}/{len(a['long_tokens'])} long"


def count_mixed(runner, merged: list[int]) -> None:
    """Appends to `merged` the number of chunks in each mixed forward `runner` runs."""
    run = runner._mixed
    runner._mixed = lambda chunks: merged.append(len(chunks)) or run(chunks)


def merged_check(package: Path, threads: int, vocab: int) -> None:
    """Where the mixed runner does merge (4 streams beside a prompt fed one token a step), its
    greedy tokens against the plain runner's."""
    from engine.loader import EngineConfig, open_core
    from engine.request import EngineRequest, SamplingParams

    rng = random.Random(3)
    prompts = [tuple(rng.randrange(1000, vocab) for _ in range(n)) for n in (16, 16, 16, 16, 48)]
    outputs, merged = [], []
    for mixed in (False, True):
        config = EngineConfig(
            n_slots=5, threads=threads, max_len=512, max_prefill_tokens=1, mixed_forwards=mixed
        )
        core = open_core(package, config)[0]
        if mixed:
            count_mixed(core.runner, merged)
        tokens: dict[str, list[int]] = {}
        for i, ids in enumerate(prompts):  # the streams first, the long prompt a step later
            core.add(EngineRequest(f"m{i}", ids, 80, sampling=SamplingParams(temperature=0)))
            if i == len(prompts) - 2:
                tokens = {out.request_id: list(out.token_ids) for out in core.step()}
        while core.has_work():
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
        outputs.append(tokens)
    same = sum(outputs[0][k] == outputs[1][k] for k in outputs[0])
    print(
        f"\nmixed forwards merging (4 streams + a 48-token prompt one token a step): "
        f"{len(merged)} merged forwards; greedy tokens equal to the plain runner's for "
        f"{same}/{len(outputs[0])} requests"
    )


def forwards_table(path: Path, threads: int, sizes: list[int], reps: int) -> None:
    """Decodes of 8 slots + a chunk of n tokens on slot 8's past: the plain runner's two
    forwards against one mixed forward, alternating."""
    import numpy as np

    from engine.runner import OrtRunner
    from engine.scheduler import ScheduledChunk, SchedulerOutput

    # no spinning: the two sessions alternate forward by forward, and one's idle threads
    # spinning would take the cores from the other's
    plain = OrtRunner(path, 9, MAX_LEN, threads=threads, spin_wait=False)
    mixed = OrtRunner(path, 9, MAX_LEN, threads=threads, spin_wait=False, mixed=True)
    rng = np.random.default_rng(0)
    for runner in (plain, mixed):  # 8 streams at 300 cached tokens, a prompt at 512
        for slot in range(9):
            n = 512 if slot == 8 else 300
            ids = rng.integers(1000, 40000, (1, n))
            runner.forward(
                ids, np.arange(n)[None], np.array([n - 1]), np.array([n - 1]), range(slot, slot + 1)
            )
    print("\none mixed forward vs the forwards it replaces (8 decodes + a chunk of n on a past)")
    for n in sizes:
        decodes = tuple(ScheduledChunk(f"d{i}", i, 300, (1234,), True) for i in range(8))
        chunk = ScheduledChunk("p", 8, 512, tuple(range(1000, 1000 + n)), False)
        step = SchedulerOutput({}, decodes, (), (chunk,), ())
        apart, together = [], []
        order = [(apart, plain.execute, step), (together, mixed._mixed, [*decodes, chunk])]
        for _, run, work in order:  # warm-up: the first forward of a shape allocates
            run(work)
        for _ in range(reps):
            for timed, run, work in order:
                t = time.perf_counter()
                run(work)
                timed.append(time.perf_counter() - t)
            order.reverse()
        a, b = statistics.median(apart), statistics.median(together)
        print(
            f"  n={n:4d}: two forwards {a * 1e3:7.1f} ms   one mixed {b * 1e3:7.1f} ms   ratio {b / a:.2f}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, help="a SmolLM2 package (default: built once)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--long", type=int, nargs="+", default=[1024, 1500], help="long prompts")
    ap.add_argument("--arrival-steps", type=int, default=10, help="steps between long prompts")
    ap.add_argument("--steady-steps", type=int, default=40)
    ap.add_argument("--caps", type=int, nargs="+", default=[16], help="max_prefill_tokens")
    ap.add_argument("--token-budget", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forward-sizes", type=int, nargs="*", default=[1, 2, 4, 16])
    ap.add_argument("--forward-reps", type=int, default=7)
    args = ap.parse_args(argv)

    bench = load_bench()
    from benchmarks._common import machine
    from engine.loader import EngineConfig, open_core

    if args.package is None:
        from aimass_common.settings import aimass_home
        from trainer.cli import resolve_model

        checkpoint = resolve_model(args.model)
        args.package = bench.build_package(checkpoint, aimass_home() / "bench", "int4", MAX_LEN)
    n_slots = args.streams + len(args.long)
    base = dict(
        n_slots=n_slots,
        threads=args.threads,
        max_len=MAX_LEN,
        token_budget=max(args.token_budget, n_slots),
        kv_tokens=n_slots * MAX_LEN,
    )
    variants = {"old policy": EngineConfig(**base)}
    for cap in args.caps:
        variants[f"cap {cap}"] = EngineConfig(**base, max_prefill_tokens=cap)
    for cap in args.caps:
        variants[f"cap {cap} + mixed"] = EngineConfig(
            **base, max_prefill_tokens=cap, mixed_forwards=True
        )
    cores = {name: open_core(args.package, config)[0] for name, config in variants.items()}
    vocab = next(iter(cores.values())).runner.vocab_size
    for core in cores.values():
        warm_up(core)
    merged: list[int] = []  # the chunks of each mixed forward the mixed engine ran
    names = list(cores)
    count_mixed(cores[names[-1]].runner, merged)
    print(f"machine: {machine()}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in cores}
    for r in range(args.rounds):
        seed = random.Random(r).randrange(1 << 30)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            got = one_round(cores[name], args, random.Random(seed), f"r{r}", vocab)
            results[name].append(got)
            print(
                f"round {r} {name:>18}: steady p99 {got['steady'] * 1e3:6.1f} ms   window p99 "
                f"{got['window'] * 1e3:7.1f} ms   ratio {got['window'] / got['steady']:5.2f} "
                f"(medians {got['median']:5.2f})   "
                f"TTFT {' '.join(f'{t:5.2f}' for t in got['ttft'])} s   {got['steps']} steps",
                flush=True,
            )
        this = {n: results[n][-1] for n in names}
        twin = f"cap {args.caps[-1]}"
        print(
            f"round {r}: streams whose tokens equal the old policy's: "
            + ", ".join(f"{n} {equal(this[n], this[names[0]])}" for n in names[1:])
            + f"; {names[-1]} against {twin}: {equal(this[names[-1]], this[twin])}"
        )
    print(
        f"\n{args.streams} streams, long prompts {args.long}, SmolLM2-135M int4, {args.threads} threads"
    )
    old = results[names[0]]
    for name in names:
        rows = results[name]
        ratio = statistics.median(g["window"] / g["steady"] for g in rows)
        medians = statistics.median(g["median"] for g in rows)
        vs_old = statistics.median(
            g["window"] / o["window"] for g, o in zip(rows, old, strict=True)
        )
        ttft = statistics.median(
            max(g["ttft"]) / max(o["ttft"]) for g, o in zip(rows, old, strict=True)
        )
        print(
            f"  {name:>18}: window p99 / steady p99 median {ratio:5.2f} (medians {medians:5.2f})"
            f"   window p99 vs old "
            f"{vs_old:5.2f}   last long prompt's TTFT vs old {ttft:5.2f}"
        )
    print(f"  mixed forwards run by {names[-1]}: {len(merged)} (chunks in each: {merged[:20]})")
    merged_check(args.package, args.threads, vocab)
    forwards_table(
        next(args.package.rglob("*.onnx")), args.threads, args.forward_sizes, args.forward_reps
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
