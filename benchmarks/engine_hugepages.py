"""Huge pages on and off (EngineConfig.huge_pages), each engine the only one in its own process
as a server runs it, on benchmarks/engine.py's workloads: single-stream decode tokens/s and the
N-stream wave's aggregate tokens/s, the two processes called in alternation; the median of the
paired ratios.

Separate processes, not two engines in one: the first engine loaded in a process decodes a few
percent slower than later ones without huge pages, and later ones partly reuse the first one's
memory, so an in-process A/B measures placement rather than the setting.

    python benchmarks/engine_hugepages.py                       # int4: 12 single pairs, 4 waves
    python benchmarks/engine_hugepages.py --precision fp32 --single-pairs 8 --wave-pairs 0
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench():
    spec = importlib.util.spec_from_file_location("engine_bench", HERE / "engine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # also puts the project root first on sys.path
    return bench


def worker(conn, package: str, precision: str, streams: int, threads: int, huge: bool) -> None:
    bench = _bench()
    wave_args = bench.parse_args(["--precisions", precision])
    max_len = wave_args.prompt_lens[1] + wave_args.output_lens[1]
    ours = bench.Ours(Path(package), precision, streams, max_len, threads, huge_pages=huge)
    status = Path("/proc/self/status").read_text().splitlines()
    rss_mib = int(next(x for x in status if x.startswith("VmRSS")).split()[1]) >> 10
    conn.send(f"{ours.core.runner.huge_pages.describe()}; process resident {rss_mib} MiB")
    prompt = bench.random_prompt(random.Random("single"), bench.TTFT_SHORT)
    wave = bench.make_wave(wave_args, streams)
    runs = {
        "single": lambda n: ours.single(prompt, n)["decode_tok_s"],
        "wave": lambda _: ours.wave(wave)["tok_s"],
    }
    while (msg := conn.recv()) is not None:
        kind, n = msg
        conn.send(runs[kind](n))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--precision", default="int4", choices=["int4", "fp32"])
    ap.add_argument("--streams", type=int, default=32, help="wave size; also the engine's slots")
    ap.add_argument("--tokens", type=int, default=128, help="single-stream output tokens")
    ap.add_argument("--single-pairs", type=int, default=12)
    ap.add_argument("--wave-pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    bench = _bench()
    from aimass_common.settings import aimass_home
    from trainer.cli import resolve_model

    checkpoint = resolve_model(bench.parse_args([]).checkpoint)
    package = bench.build_package(checkpoint, aimass_home() / "bench", args.precision, 512)
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for name in ("off", "on"):
        conns[name], child = ctx.Pipe()
        a = (child, str(package), args.precision, args.streams, args.threads, name == "on")
        procs.append(ctx.Process(target=worker, args=a))
        procs[-1].start()
    for name, conn in conns.items():
        print(f"{name:3s}: {conn.recv()}")

    def call(name, kind, n):
        conns[name].send((kind, n))
        return conns[name].recv()

    for name in conns:  # warm-up
        call(name, "single", 8)
    for kind, pairs, n in (
        ("single", args.single_pairs, args.tokens),
        ("wave", args.wave_pairs, 0),
    ):
        if not pairs:
            continue
        figures: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(pairs):
            for name in ("on", "off") if i % 2 else ("off", "on"):
                figures[name].append(call(name, kind, n))
        ratios = [a / b for a, b in zip(figures["on"], figures["off"], strict=True)]
        unit = "decode tok/s" if kind == "single" else f"{args.streams} streams, tok/s"
        print(f"{args.precision} {kind} ({unit}), {pairs} pairs:")
        for name, values in figures.items():
            print(f"  {name:3s}  {'  '.join(f'{v:6.1f}' for v in values)}")
        print(
            f"  on / off: median {statistics.median(ratios):.3f}x "
            f"(pairs {', '.join(f'{r:.2f}' for r in ratios)})"
        )
    for conn in conns.values():
        conn.send(None)
    for proc in procs:
        proc.join(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
