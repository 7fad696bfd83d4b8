"""The engine's memory and cold start, each measurement in a fresh process (VmRSS, VmHWM):

    cold    package on disk, nothing loaded → first token of a 4-token request, by phase
            (imports, file check, session creation, huge pages, cache mapping, token table,
            first step); phases that overlap are timed where they run
    memory  idle RSS after load; peak RSS while `--slots` requests hold `--hold` cached
            tokens together (prompt + output = hold / slots each); RSS once they finished

    python benchmarks/engine_memory.py PACKAGE                     # both, 3 cold runs
    python benchmarks/engine_memory.py PACKAGE --only memory --slots 32 --hold 16384

Numbers are printed as one JSON line per run, then a summary (medians).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _timed(owner, name: str, phases: dict[str, float], label: str) -> None:
    """Wraps owner.name, where it exists, so that each call adds its seconds to phases[label]
    (an older engine lacks some: the script measures a checkout before a change too)."""
    original = getattr(owner, name, None)
    if original is None:
        return

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            phases[label] = phases.get(label, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def cold(conn, package: str, slots: int, threads: int) -> None:
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import onnxruntime as ort  # noqa: F401  (timed: part of a cold start)

    from engine import loader, runner
    from engine.request import EngineRequest, SamplingParams

    phases = {"imports": time.perf_counter() - start}
    _timed(loader, "check_files", phases, "file check (sha256)")
    _timed(loader, "TokenBytes", phases, "token table")
    _timed(runner.ort, "InferenceSession", phases, "session (optimize, prepack)")
    _timed(runner, "advise_huge_pages", phases, "huge pages")
    _timed(runner, "back_with_huge_pages", phases, "huge pages")
    _timed(runner, "HostKV", phases, "cache mapping")
    t0 = time.perf_counter()
    core, info = loader.open_core(package, loader.EngineConfig(n_slots=slots, threads=threads))
    t1 = time.perf_counter()
    core.add(EngineRequest("a", (1, 2, 3, 4), 4, sampling=SamplingParams(temperature=0)))
    while not any(o.token_ids for o in core.step()):
        pass
    t2 = time.perf_counter()
    phases |= {"load": t1 - t0, "first token": t2 - t1, "load → first token": t2 - t0}
    conn.send({"phases": phases, "peak_rss": _status("VmHWM"), "rss": _status("VmRSS")})


def memory(conn, package: str, slots: int, hold: int, threads: int) -> None:
    sys.path.insert(0, str(ROOT))
    from engine.loader import EngineConfig, open_core
    from engine.request import EngineRequest, SamplingParams

    config = EngineConfig(n_slots=slots, threads=threads, kv_tokens=hold, token_budget=512)
    core, info = open_core(package, config)
    idle = _status("VmRSS")
    each = hold // slots
    prompt_len, output = each - each // 4, each // 4
    for i in range(slots):  # no stop token: each request holds all of its positions
        prompt = tuple(100 + (i * 7 + j) % 40000 for j in range(prompt_len))
        core.add(EngineRequest(f"r{i}", prompt, output, sampling=SamplingParams(temperature=0)))
    held = resident = 0
    while core.has_work():
        core.step()
        usage = core.scheduler.usage()
        if usage.tokens_reserved >= held:
            held, resident = usage.tokens_reserved, core.runner.kv_resident_bytes()
    conn.send(
        {
            "weights_bytes": info.weights_bytes,
            "idle_rss": idle,
            "peak_rss": _status("VmHWM"),
            "tokens_held": held,
            "kv_resident_at_peak": resident,
            "kv_reserved": core.runner.kv_bytes,
            "rss_after": _status("VmRSS"),
            "kv_resident_after": core.runner.kv_resident_bytes(),
        }
    )


def run(target, *args) -> dict:
    ctx = mp.get_context("spawn")  # a fresh interpreter: nothing loaded
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(child, *args))
    p.start()
    result = parent.recv()
    p.join()
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("package")
    p.add_argument("--only", choices=["cold", "memory"])
    p.add_argument("--runs", type=int, default=3, help="cold starts")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--cold-slots", type=int, default=8)
    p.add_argument("--hold", type=int, default=16384, help="cached tokens held together")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    mib = 1 << 20
    if args.only in (None, "cold"):
        runs = [run(cold, args.package, args.cold_slots, args.threads) for _ in range(args.runs)]
        print(f"cold start, {args.cold_slots} slots, medians of {args.runs}:")
        for phase in runs[0]["phases"]:
            print(f"  {phase:32s} {statistics.median(r['phases'][phase] for r in runs):.3f} s")
        print(f"  peak RSS {statistics.median(r['peak_rss'] for r in runs) / mib:.0f} MiB")
    if args.only in (None, "memory"):
        r = run(memory, args.package, args.slots, args.hold, args.threads)
        print(
            f"memory, {args.slots} slots: weights {r['weights_bytes'] / mib:.0f} MiB, idle RSS "
            f"{r['idle_rss'] / mib:.0f} MiB; {r['tokens_held']} tokens held: peak RSS "
            f"{r['peak_rss'] / mib:.0f} MiB (cache resident {r['kv_resident_at_peak'] / mib:.0f}"
            f" of {r['kv_reserved'] / mib:.0f} MiB reserved); after: RSS "
            f"{r['rss_after'] / mib:.0f} MiB, cache {r['kv_resident_after'] / mib:.0f} MiB"
        )


if __name__ == "__main__":
    main()
