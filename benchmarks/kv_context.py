"""Decode step time at a long context, one graph against another (a float32 cache against a
float16 one, say): both decoders in one process, B rows prefilled with C random tokens, then
blocks of decode steps alternated between them, so both see the same machine; the medians of the
per-block mean step time, and the ratio of the second's tokens/s to the first's.

    python benchmarks/kv_context.py PKG32/onnx-int4/model.onnx PKG16/onnx-int4-kv16/model.onnx \\
        --rows 8 --context 1900
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# the project root, not this folder, first: benchmarks/engine.py would shadow the engine package
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from exporters.runner import OrtDecoder  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("first", help="a graph (model.onnx): the baseline")
    p.add_argument("second", help="the graph compared with it")
    p.add_argument("--rows", type=int, default=8, help="sequences decoded together")
    p.add_argument("--context", type=int, default=1900, help="cached tokens per row")
    p.add_argument("--blocks", type=int, default=8, help="alternated blocks of steps")
    p.add_argument("--steps", type=int, default=8, help="decode steps per block")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    max_len = args.context + args.blocks * args.steps + 1
    decoders = {
        path: OrtDecoder(path, max_batch=args.rows, max_len=max_len, threads=args.threads)
        for path in (args.first, args.second)
    }
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, args.context).tolist() for _ in range(args.rows)]
    for decoder in decoders.values():
        decoder.prefill(prompts)
    times: dict[str, list[float]] = {path: [] for path in decoders}
    for block in range(args.blocks):
        for path in list(decoders)[:: 1 if block % 2 == 0 else -1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                decoders[path].decode([200 + block] * args.rows)
            times[path].append((time.perf_counter() - start) / args.steps)
    first, second = (statistics.median(times[path]) for path in decoders)
    print(f"{args.rows} rows, {args.context} cached tokens, medians of {args.blocks} blocks:")
    for path, step in ((args.first, first), (args.second, second)):
        print(f"  {path}: {step * 1e3:.1f} ms a step, {args.rows / step:.1f} tok/s")
    print(f"  second / first tok/s: {first / second:.3f}×")


if __name__ == "__main__":
    main()
