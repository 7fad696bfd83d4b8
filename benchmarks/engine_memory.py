"""The engine's memory and cold start, each measurement in a fresh process (VmRSS, VmHWM):

    cold    package on disk, nothing loaded → first token of a 4-token request, by phase
            (imports, file check, session creation, huge pages, cache mapping, token table,
            first step); phases that overlap are timed where they run
    memory  idle RSS after load; peak RSS while `--slots` requests hold `--hold` cached
            tokens together (prompt + output = hold / slots each); RSS once they finished

    python benchmarks/engine_memory.py PACKAGE                     # both, 3 cold runs
    python benchmarks/engine_memory.py PACKAGE --only memory --slots 32 --hold 16384
    python benchmarks/engine_memory.py PACKAGE --baseline HEAD~3   # that commit against this tree
    python benchmarks/engine_memory.py PACKAGE --against OTHER     # another package, same tree

A cold start as a server has it takes a package pulled into the local cache (`aimass registry
pull` prints its folder): the pull's record of verified files spares the load from hashing them.
`--baseline REV` extracts the engine, registry and aimass_common of a commit (`git archive`) and
alternates its runs with this tree's, each in a fresh process; `--against OTHER` alternates a
second package (another target of the same model: a float16 cache, say) on this tree. The summary
gives both medians and their ratio (the second over the first). Numbers are printed as one JSON line per run, then a summary (medians).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "registry", "aimass_common")  # what an engine load imports of the project


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


def _import_from(root: str) -> None:
    """Puts `root` first on sys.path, so that the project's packages import from it (this tree
    or a baseline's extract)."""
    sys.path.insert(0, root)
    import engine  # noqa: PLC0415  (after the path is set: which tree is measured)

    if not Path(engine.__file__).is_relative_to(root):
        raise RuntimeError(f"engine imported from {engine.__file__}, not from {root}")


def cold(conn, root: str, package: str, slots: int, threads: int) -> None:
    start = time.perf_counter()
    _import_from(root)
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
    phases |= {
        "load": t1 - t0,
        "first token": t2 - t1,
        "load → first token": t2 - t0,
        "imports → first token": t2 - start,
    }
    conn.send({"phases": phases, "peak_rss": _status("VmHWM"), "rss": _status("VmRSS")})


def speed(conn, root: str, package: str, streams: list[int], tokens: int, threads: int) -> None:
    """Decode tokens per second with `n` streams decoding together, for each n in `streams`
    (64-token prompts; the steps that prefill are left out)."""
    _import_from(root)
    from engine.loader import EngineConfig, open_core
    from engine.request import EngineRequest, SamplingParams

    core, _ = open_core(package, EngineConfig(n_slots=max(streams), threads=threads))
    result = {}
    for n in streams:
        for i in range(n):
            prompt = tuple(100 + (i * 7 + j) % 40000 for j in range(64))
            core.add(
                EngineRequest(f"{n}-{i}", prompt, tokens, sampling=SamplingParams(temperature=0))
            )
        seconds = emitted = 0.0
        while core.has_work():
            start = time.perf_counter()
            outputs = core.step()
            if core.scheduler.usage().slots_used == n and all(
                len(o.token_ids) == 1 for o in outputs
            ):  # a step of n decodes
                seconds += time.perf_counter() - start
                emitted += len(outputs)
        result[f"decode tok/s, {n} streams"] = emitted / seconds
    conn.send(result)


def memory(conn, root: str, package: str, slots: int, hold: int, threads: int) -> None:
    _import_from(root)
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
    child.close()  # the child's end lives in the child only: its exit ends recv()
    try:
        result = parent.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"the {target.__name__} run failed (exit code {p.exitcode})") from None
    p.join()
    print(json.dumps(result), flush=True)
    return result


def extract(rev: str) -> str:
    """The project's packages as of commit `rev`, in a folder of their own."""
    folder = tempfile.mkdtemp(prefix=f"aimass-{rev.replace('/', '-')}-")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, *PACKAGES], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def alternate(
    candidates: dict[str, tuple[str, str]], rounds: int, target, *args
) -> dict[str, list[dict]]:
    """`rounds` runs of target per candidate (a tree and a package), their order swapped every
    round."""
    runs: dict[str, list[dict]] = {name: [] for name in candidates}
    for i in range(rounds):
        for name in list(candidates)[:: 1 if i % 2 == 0 else -1]:
            runs[name].append(run(target, *candidates[name], *args))
    return runs


def _summary(label: str, runs: dict[str, list[dict]], figure, unit: str) -> None:
    """One line: each tree's median of figure(run), and the ratio of the last to the first."""
    medians = [statistics.median(figure(r) for r in rs) for rs in runs.values()]
    line = "  ".join(f"{m:10.3f}" for m in medians)
    ratio = f"  {medians[-1] / medians[0]:5.2f}×" if len(medians) > 1 and medians[0] else ""
    print(f"  {label:34s} {line} {unit}{ratio}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("package")
    p.add_argument("--only", choices=["cold", "memory", "speed"])
    p.add_argument("--runs", type=int, default=3, help="cold starts (per tree)")
    p.add_argument("--memory-runs", type=int, default=1, help="memory runs (per tree)")
    p.add_argument("--baseline", metavar="REV", help="a commit to alternate with this tree")
    p.add_argument("--against", metavar="PACKAGE", help="a second package to alternate with")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--cold-slots", type=int, default=8)
    p.add_argument("--hold", type=int, default=16384, help="cached tokens held together")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,8", help="speed: streams decoding together")
    p.add_argument("--speed-runs", type=int, default=3, help="speed runs (per tree)")
    args = p.parse_args(argv)
    trees = {"this tree": (str(ROOT), args.package)}
    if args.baseline:
        trees = {args.baseline: (extract(args.baseline), args.package), **trees}
    if args.against:
        trees["against"] = (str(ROOT), args.against)
    mib = 1 << 20
    print(f"{'':36s} " + "  ".join(f"{name[:10]:>10s}" for name in trees))
    if args.only in (None, "cold"):
        runs = alternate(trees, args.runs, cold, args.cold_slots, args.threads)
        print(f"cold start, {args.cold_slots} slots, medians of {args.runs}:")
        phases = dict.fromkeys(k for rs in runs.values() for k in rs[0]["phases"])
        for phase in phases:
            _summary(phase, runs, lambda r, k=phase: r["phases"].get(k, 0.0), "s")
        _summary("peak RSS", runs, lambda r: r["peak_rss"] / mib, "MiB")
    if args.only in (None, "memory"):
        config = (args.slots, args.hold, args.threads)
        runs = alternate(trees, args.memory_runs, memory, *config)
        weights = next(iter(runs.values()))[0]["weights_bytes"] / mib
        print(f"memory, {args.slots} slots, {args.hold} tokens held; weights {weights:.0f} MiB:")
        _summary("idle RSS", runs, lambda r: r["idle_rss"] / mib, "MiB")
        _summary("peak RSS", runs, lambda r: r["peak_rss"] / mib, "MiB")
        _summary("cache resident at peak", runs, lambda r: r["kv_resident_at_peak"] / mib, "MiB")
        _summary("RSS after (idle again)", runs, lambda r: r["rss_after"] / mib, "MiB")
        _summary(
            "  of which above the weights", runs, lambda r: r["rss_after"] / mib - weights, "MiB"
        )
        _summary("cache resident after", runs, lambda r: r["kv_resident_after"] / mib, "MiB")
    if args.only in (None, "speed"):
        streams = [int(n) for n in args.streams.split(",")]
        config = (streams, 128, args.threads)
        runs = alternate(trees, args.speed_runs, speed, *config)
        print(f"decode speed, 128 tokens a stream, medians of {args.speed_runs}:")
        for key in next(iter(runs.values()))[0]:
            _summary(key, runs, lambda r, k=key: r[k], "tok/s")


if __name__ == "__main__":
    main()
