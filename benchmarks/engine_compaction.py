"""Slot compaction on and off, alternating in one process, on benchmarks/engine.py's N-stream
wave (same packages, same Poisson arrivals and lengths): aggregate tokens/s of each, and the
median of the paired ratios.

    python benchmarks/engine_compaction.py                    # int4, 32 streams, 4 pairs (~3 min)
    python benchmarks/engine_compaction.py --precision fp32 --pairs 6
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="int4", choices=["int4", "fp32"])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    spec = importlib.util.spec_from_file_location("engine_bench", HERE / "engine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # also puts the project root first on sys.path
    from aimass_common.settings import aimass_home
    from trainer.cli import resolve_model

    wave_args = bench.parse_args(["--precisions", args.precision])
    package = bench.build_package(
        resolve_model(wave_args.checkpoint), aimass_home() / "bench", args.precision, 512
    )
    max_len = wave_args.prompt_lens[1] + wave_args.output_lens[1]
    engines = {
        name: bench.Ours(package, args.precision, args.streams, max_len, args.threads)
        for name in ("on", "off")
    }
    off = engines["off"].core.scheduler
    off.config = dataclasses.replace(off.config, compact_slots=False)
    wave = bench.make_wave(wave_args, args.streams)
    for engine in engines.values():  # warm-up: every prompt, a few tokens
        engine.wave([(0.0, prompt, 4) for _, prompt, _ in wave])
    tok_s: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(args.pairs):
        for name in ("on", "off") if i % 2 else ("off", "on"):
            tok_s[name].append(engines[name].wave(wave)["tok_s"])
    ratios = [a / b for a, b in zip(tok_s["on"], tok_s["off"], strict=True)]
    print(f"{args.precision}, {args.streams} streams, {args.pairs} pairs (tok/s):")
    for name, values in tok_s.items():
        print(f"  compaction {name:3s}  {'  '.join(f'{v:6.1f}' for v in values)}")
    print(
        f"  on / off: median {statistics.median(ratios):.2f}x "
        f"(pairs {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
