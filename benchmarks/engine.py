"""The serving engine end to end (scheduler + ONNX Runtime runner + sampler + detokenizer) on
SmolLM2-135M-Instruct, int4 and fp32, in-process, against onnxruntime-genai on the same weights
and `transformers` generate, all in one run; with the machine's roofline measured alongside.

What is measured, per precision (greedy, stop tokens ignored so every length is fixed):

    single stream   --tokens output tokens after a 32-token prompt: decode tokens/s (the tokens
                    after the first, over the time after the first) and time to first token
                    (TTFT: submit → first token out, i.e. prefill + first sample); TTFT again
                    with a 256-token prompt. Ours: `EngineCore.add` then `core.step()` in a
                    loop (the engine's full path). genai: `append_tokens` + `generate_next_token`
                    (the Generator is built before the clock starts). transformers: `generate`
                    with a streamer stamping each token.
    N streams       N requests (N in --concurrency) arriving as a Poisson process (fixed seed,
                    mean gap --arrival-gap-ms, small enough to saturate the engine) with random
                    prompt lengths (--prompt-lens) and output lengths (--output-lens), through
                    `AsyncEngine` (the step thread + asyncio streams, as served). Aggregate
                    tokens/s = output tokens / makespan (first arrival → last token received).
                    Baselines run a static batch of N: every prompt of the mean prompt length,
                    every output the mean output length of ours, all arriving at once.
    roofline        memory bandwidth (best of a numpy streaming sum, a numpy copy and a
                    multi-threaded torch sum over --bw-gib GiB) → batch-1 decode limit =
                    bandwidth / bytes read per token (the weights in our ONNX graph, an
                    embedding table read by Gather counted as one row, plus the KV cache at the
                    mean context); fp32 peak (best of numpy, torch and ONNX Runtime matmuls,
                    --threads threads) → batch-N compute limit = peak / FLOPs per token (2 × the
                    matmul weights + attention at the mean context). int4 runs MatMulNBits with
                    int8 compute (accuracy level 4), so an int8 peak (ONNX Runtime's
                    MatMulInteger) is shown too.

Every engine is loaded once. Our engine runs in this process; onnxruntime-genai (one process per
precision) and transformers (fp32, one process) run in worker processes, so no idle thread pool
spins against the engine being timed. Each round runs every block of every engine in turn
(ours, genai, transformers) after one warm-up round of short blocks; a figure is the median over
rounds, and a ratio the median of the per-round ratios, so a burst of load spoils one round,
not the ratio. The single-stream decode (about a second per engine) runs --single-reps times
per round, the engines alternating, and its ratios pair each run with the other engine's next
to it. On a shared 2-core machine run it idle: the load average is printed.

    python benchmarks/engine.py                              # ~15 minutes on 2 cores
    python benchmarks/engine.py --quick --skip-transformers  # a smoke run, ~2 minutes
    python benchmarks/engine.py --precisions int4 --concurrency 32 --json out/engine.json

Packages (`exporters.package.export(..., force=True)`: SmolLM2's int4 perplexity rise exceeds
the export gate) and onnxruntime-genai's model-builder output are built once under --work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

# this file is named engine.py: its folder must not shadow the engine package
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

TTFT_SHORT, TTFT_LONG = 32, 256  # the prompts of the single-stream figures


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--checkpoint", default="smollm2-135m-instruct", help="checkpoint or bundled name"
    )
    ap.add_argument("--work", type=Path, help="built packages, reused (default $AIMASS_HOME/bench)")
    ap.add_argument("--precisions", default="int4,fp32")
    ap.add_argument("--concurrency", help="streams per wave, comma-separated (default 1,8,32)")
    ap.add_argument("--tokens", type=int, help="single-stream output tokens (default 128)")
    ap.add_argument("--prompt-lens", help="random prompt lengths LO,HI (default 16,128)")
    ap.add_argument("--output-lens", help="random output lengths LO,HI (default 64,192)")
    ap.add_argument("--arrival-gap-ms", type=float, default=10.0, help="mean Poisson gap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, help="measured rounds after the warm-up (default 3)")
    ap.add_argument(
        "--single-reps",
        type=int,
        default=3,
        help="single-stream decode runs per engine and round, alternating engines (short: noisy)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, all")
    ap.add_argument("--package-max-len", type=int, default=512, help="context of built graphs")
    ap.add_argument("--bw-gib", type=float, help="array size of the bandwidth test (default 1)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    ap.add_argument("--skip-genai", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-roofline", action="store_true")
    ap.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="cProfile 200 batch-1 core.step() calls (auto: when ours is < 0.9x genai)",
    )
    args = ap.parse_args(argv)
    q = args.quick
    args.concurrency = [int(x) for x in (args.concurrency or ("1,4" if q else "1,8,32")).split(",")]
    args.tokens = args.tokens or (16 if q else 128)
    args.prompt_lens = _pair(args.prompt_lens or ("8,32" if q else "16,128"))
    args.output_lens = _pair(args.output_lens or ("8,24" if q else "64,192"))
    args.rounds = args.rounds or (1 if q else 3)
    args.bw_gib = args.bw_gib or (0.25 if q else 1.0)
    args.precisions = args.precisions.split(",")
    return args


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


# ── building: our packages, genai's model builder, the HF folder ──


def load_export_step():
    """benchmarks/export_step.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("export_step", HERE / "export_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_package(checkpoint: Path, work: Path, precision: str, max_len: int) -> Path:
    from exporters.package import export

    out = work / f"{checkpoint.name}-{precision}-{max_len}"
    if not (out / "manifest.json").exists():
        print(f"exporting onnx-{precision} → {out} (once)", file=sys.stderr, flush=True)
        export(checkpoint, [f"onnx-{precision}"], out, force=True, max_len=max_len)
    return out


def build_baselines(checkpoint: Path, work: Path, want_genai: bool, want_hf: bool):
    """(genai folders by precision or None, HF folder or None, notes on what is missing)."""
    export_step = load_export_step()
    notes, genai, hf = [], None, None
    folder = work / f"{checkpoint.name}-genai"
    if want_genai:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            notes.append("onnxruntime-genai is not installed: no genai baseline")
        else:
            try:
                genai = export_step.build_genai(checkpoint, folder)
            except (SystemExit, Exception) as e:  # noqa: BLE001 - "where it installs"
                notes.append(f"onnxruntime-genai's model builder failed: {str(e)[-500:]}")
    if want_hf:
        if importlib.util.find_spec("transformers") is None:
            notes.append("transformers is not installed: no transformers baseline")
        else:
            hf = folder / "hf"
            if not (hf / "config.json").exists():
                export_step.export_hf(checkpoint, hf)
    return genai, hf, notes


# ── the workload ──


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def make_wave(args, n: int) -> list[tuple[float, list[int], int]]:
    """n requests (arrival offset s, prompt, output tokens): Poisson arrivals, fixed seed."""
    rng = random.Random(f"{args.seed}-{n}")
    at, wave = 0.0, []
    for i in range(n):
        if i:
            at += rng.expovariate(1e3 / args.arrival_gap_ms)
        prompt = random_prompt(rng, rng.randint(*args.prompt_lens))
        wave.append((at, prompt, rng.randint(*args.output_lens)))
    return wave


def static_batch(args, wave) -> tuple[list[list[int]], int]:
    """The baselines' batch for a wave: prompts of the mean length, the mean output length."""
    rng = random.Random(f"{args.seed}-static-{len(wave)}")
    plen = round(statistics.mean(len(p) for _, p, _ in wave))
    out = round(statistics.mean(n for _, _, n in wave))
    return [random_prompt(rng, plen) for _ in wave], out


# ── ours, in this process ──


class Ours:
    def __init__(
        self, package: Path, precision: str, n_slots: int, max_len: int, threads: int, **settings
    ):
        """settings: more EngineConfig fields (benchmarks/engine_hugepages.py turns one off)."""
        from engine.loader import EngineConfig, open_core

        config = EngineConfig(
            target=f"onnx-{precision}",
            n_slots=n_slots,
            threads=threads,
            max_len=max_len,
            **settings,
        )
        self.core, self.info = open_core(package, config)
        self._ids = itertools.count()

    def request(self, prompt, n):
        from engine.request import EngineRequest, SamplingParams

        return EngineRequest(
            request_id=f"r{next(self._ids)}",
            prompt_token_ids=tuple(prompt),
            max_tokens=n,
            stop_token_ids=(),  # EOS ignored: fixed lengths
            sampling=SamplingParams(temperature=0.0),
        )

    def single(self, prompt, n) -> dict:
        """One request through core.step(): TTFT and the decode rate after the first token."""
        core, clock = self.core, time.perf_counter
        request = self.request(prompt, n)
        times, reason = [], None
        t0 = clock()
        core.add(request)
        while core.has_work():
            outs = core.step()
            now = clock()
            for out in outs:
                times += [now] * len(out.token_ids)
                reason = out.finish_reason or reason
        _check(len(times), n, reason, "ours")
        return _single_result(t0, times)

    def wave(self, wave) -> dict:
        return asyncio.run(self._wave(wave))

    async def _wave(self, wave) -> dict:
        from engine.async_engine import AsyncEngine

        engine = AsyncEngine(self.core, self.info)
        engine.start()
        clock = time.perf_counter
        t0 = clock()

        async def one(at, prompt, n):
            await asyncio.sleep(max(0.0, t0 + at - clock()))
            submitted = clock()
            stream = await engine.submit(self.request(prompt, n))
            first, count, reason = None, 0, None
            async for out in stream:
                if out.token_ids and first is None:
                    first = clock()
                count += len(out.token_ids)
                reason = out.finish_reason or reason
            _check(count, n, reason, "ours (AsyncEngine)")
            return submitted, first, clock(), count

        try:
            done = await asyncio.gather(*(one(*w) for w in wave))
        finally:
            await engine.close()
        tokens = sum(d[3] for d in done)
        makespan = max(d[2] for d in done) - t0
        ttfts = sorted(d[1] - d[0] for d in done)
        return {
            "tok_s": tokens / makespan,
            "tokens": tokens,
            "makespan_s": makespan,
            "ttft_median_ms": 1e3 * statistics.median(ttfts),
            "ttft_max_ms": 1e3 * ttfts[-1],
        }

    def step_overhead(self, n_streams: int, prompt_len: int, n: int) -> dict:
        """Python time per core.step() outside ONNX Runtime: wall time of the steps minus the
        time spent in session.run_with_iobinding, while n_streams decode together."""
        runner = self.core.runner
        session = runner.session
        spent = [0.0]
        original = session.run_with_iobinding

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        rng = random.Random(1)
        for _ in range(n_streams):
            self.core.add(self.request(random_prompt(rng, prompt_len), n))
        running = self.core.scheduler._running  # noqa: SLF001 - read only
        while self.core.scheduler.num_waiting or any(
            s.num_tokens - s.num_computed_tokens > 1 for s in running
        ):
            self.core.step()  # the prefills, untimed
        session.run_with_iobinding = timed
        try:
            steps, t = 0, time.perf_counter()
            while self.core.has_work():
                self.core.step()
                steps += 1
            wall = time.perf_counter() - t
        finally:
            del session.run_with_iobinding
        return {
            "streams": n_streams,
            "steps": steps,
            "step_ms": 1e3 * wall / steps,
            "python_us_per_step": 1e6 * (wall - spent[0]) / steps,
            "python_fraction": (wall - spent[0]) / wall,
        }

    def profile(self, prompt_len: int = 32, steps: int = 200, top: int = 20) -> str:
        import cProfile
        import io
        import pstats

        self.core.add(self.request(random_prompt(random.Random(2), prompt_len), steps + 1))
        self.core.step()
        prof = cProfile.Profile()
        prof.enable()
        while self.core.has_work():
            self.core.step()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
        return out.getvalue()


def _check(count, n, reason, who):
    if count != n or reason != "length":
        raise RuntimeError(f"{who}: {count} tokens (finish {reason!r}) where {n} were asked for")


def _single_result(t0: float, times: list[float]) -> dict:
    n = len(times)
    decode = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None
    return {"ttft_ms": 1e3 * (times[0] - t0), "decode_tok_s": decode, "tokens": n}


# ── baselines, in worker processes ──


class Genai:
    def __init__(self, folder, threads):
        import numpy as np
        import onnxruntime_genai as og

        self.og, self.np = og, np
        config = og.Config(str(folder))
        config.clear_providers()
        options = {"intra_op_num_threads": threads}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def _generator(self, batch, length):
        params = self.og.GeneratorParams(self.model)
        # min_length = max_length: EOS is never picked, every row runs to the full length
        params.set_search_options(
            max_length=length, min_length=length, batch_size=batch, do_sample=False
        )
        return self.og.Generator(self.model, params)

    def single(self, prompt, n) -> dict:
        gen = self._generator(1, len(prompt) + n)
        times, clock = [], time.perf_counter
        t0 = clock()
        gen.append_tokens(self.np.array([prompt], dtype=self.np.int32))
        for _ in range(n):
            gen.generate_next_token()
            times.append(clock())
        _check(gen.token_count() - len(prompt), n, "length", "genai")
        return _single_result(t0, times)

    def batch(self, prompts, n) -> dict:
        gen = self._generator(len(prompts), len(prompts[0]) + n)
        t0 = time.perf_counter()
        gen.append_tokens(self.np.array(prompts, dtype=self.np.int32))
        for _ in range(n):
            gen.generate_next_token()
        elapsed = time.perf_counter() - t0
        seq = gen.get_sequence(len(prompts) - 1)
        _check(len(seq) - len(prompts[0]), n, "length", "genai")
        return {"tok_s": len(prompts) * n / elapsed, "elapsed_s": elapsed}


class Transformers:
    def __init__(self, folder, threads):
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def _generate(self, prompts, n, streamer=None):
        torch = self.torch
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,  # EOS suppressed: fixed lengths
                do_sample=False,
                pad_token_id=0,
                streamer=streamer,
            )
        _check(out.shape[1] - ids.shape[1], n, "length", "transformers")

    def single(self, prompt, n) -> dict:
        clock = time.perf_counter

        class Stamps:  # generate() calls put() with the prompt, then with each new token
            def __init__(self):
                self.times, self.prompt_seen = [], False

            def put(self, value):
                if self.prompt_seen:
                    self.times.append(clock())
                self.prompt_seen = True

            def end(self):
                pass

        stamps = Stamps()
        t0 = clock()
        self._generate([prompt], n, stamps)
        return _single_result(t0, stamps.times)

    def batch(self, prompts, n) -> dict:
        t0 = time.perf_counter()
        self._generate(prompts, n)
        elapsed = time.perf_counter() - t0
        return {"tok_s": len(prompts) * n / elapsed, "elapsed_s": elapsed}


def worker(conn, kind, source, threads):
    try:
        engine = {"genai": Genai, "transformers": Transformers}[kind](source, threads)
    except Exception as e:  # noqa: BLE001 - reported, the baseline is skipped
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while (msg := conn.recv()) is not None:
        method, a = msg
        try:
            conn.send(("ok", getattr(engine, method)(*a)))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))


class Remote:
    def __init__(self, ctx, kind, source, threads):
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, kind, str(source), threads))
        self.proc.start()

    def ready(self) -> str | None:
        status, detail = self.conn.recv()
        return None if status == "ready" else detail

    def call(self, method, *a):
        self.conn.send((method, a))
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.kind} {method}: {value}")
        return value

    def close(self):
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.proc.join(timeout=30)


# ── the roofline, in a child process of its own ──


def roofline(conn, threads: int, bw_gib: float):
    """Memory bandwidth (GB/s) and matmul peaks (GFLOP/s), each the best of several runs."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    best = lambda f, k=5: min(_timed(f) for _ in range(k))  # noqa: E731
    res: dict = {}

    def bandwidth():  # its arrays are freed on return
        a = np.ones(int(bw_gib * 2**30) // 4, np.float32)
        b, ta = np.empty_like(a), torch.from_numpy(a)
        res["bw_numpy_sum_gbs"] = a.nbytes / best(a.sum) / 1e9
        res["bw_numpy_copy_gbs"] = 2 * a.nbytes / best(lambda: np.copyto(b, a)) / 1e9  # r + w
        res["bw_torch_sum_gbs"] = a.nbytes / best(ta.sum) / 1e9

    bandwidth()
    res["bandwidth_gbs"] = max(
        res[k] for k in ("bw_numpy_sum_gbs", "bw_numpy_copy_gbs", "bw_torch_sum_gbs")
    )

    m = 2048
    x = np.random.default_rng(0).standard_normal((m, m), dtype=np.float32)
    res["fp32_numpy_gflops"] = 2 * m**3 / best(lambda: x @ x) / 1e9
    tx = torch.from_numpy(x)
    res["fp32_torch_gflops"] = 2 * m**3 / best(lambda: tx @ tx) / 1e9

    def ort_matmul(op, a_type, b_type):
        nodes = [helper.make_node(op, ["A", "B"], ["Y"])]
        y_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
        graph = helper.make_graph(
            nodes,
            "g",
            [
                helper.make_tensor_value_info("A", a_type, [m, m]),
                helper.make_tensor_value_info("B", b_type, [m, m]),
            ],
            [helper.make_tensor_value_info("Y", y_type, [m, m])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )

    s = ort_matmul("MatMul", TensorProto.FLOAT, TensorProto.FLOAT)
    feeds = {"A": x, "B": x}
    s.run(None, feeds)
    res["fp32_ort_gflops"] = 2 * m**3 / best(lambda: s.run(None, feeds)) / 1e9
    res["fp32_peak_gflops"] = max(
        res[k] for k in ("fp32_numpy_gflops", "fp32_torch_gflops", "fp32_ort_gflops")
    )
    s = ort_matmul("MatMulInteger", TensorProto.UINT8, TensorProto.INT8)
    rng = np.random.default_rng(1)
    feeds = {
        "A": rng.integers(0, 255, (m, m), dtype=np.uint8),
        "B": rng.integers(-127, 127, (m, m), dtype=np.int8),
    }
    s.run(None, feeds)
    res["int8_ort_gops"] = 2 * m**3 / best(lambda: s.run(None, feeds)) / 1e9
    conn.send(res)


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def graph_costs(onnx_path: Path) -> dict:
    """Bytes of weights read per decoded token and matmul weights (multiply-adds per token):
    every initializer counted whole, except one read only by Gather (an embedding table), which
    costs one row per token."""
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    consumers: dict[str, set[str]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    inits = {t.name: t for t in g.initializer}
    read = total = 0
    for name, t in inits.items():
        size = math.prod(t.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += size
        read += size // t.dims[0] if consumers.get(name) == {"Gather"} and t.dims else size
    macs = 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            macs += attrs["K"] * attrs["N"]
        elif node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            macs += math.prod(inits[node.input[1]].dims)
    return {"weight_bytes_read": read, "weight_bytes_total": total, "matmul_weights": macs}


# ── the run ──


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    load_start = os.getloadavg()
    ctx = mp.get_context("spawn")

    from aimass_common.settings import aimass_home
    from trainer.cli import resolve_model

    work = args.work or aimass_home() / "bench"
    checkpoint = resolve_model(args.checkpoint)
    packages = {
        p: build_package(checkpoint, work, p, args.package_max_len) for p in args.precisions
    }
    genai_dirs, hf_dir, notes = build_baselines(
        checkpoint,
        work,
        not args.skip_genai,
        not args.skip_transformers and "fp32" in args.precisions,
    )

    roof: dict = {}
    if not args.skip_roofline:
        print("measuring the roofline", file=sys.stderr, flush=True)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=roofline, args=(child, args.threads, args.bw_gib))
        proc.start()
        roof = parent.recv()
        proc.join()

    # engines: baselines first (each in its own process), then ours here
    remotes: dict[tuple[str, str], Remote] = {}
    for p in args.precisions:
        if genai_dirs:
            remotes[("genai", p)] = Remote(ctx, "genai", genai_dirs[p], args.threads)
    if hf_dir is not None:
        remotes[("transformers", "fp32")] = Remote(ctx, "transformers", hf_dir, args.threads)
    for key in list(remotes):
        problem = remotes[key].ready()
        if problem:
            notes.append(f"{key[0]} {key[1]} did not load: {problem}")
            remotes.pop(key).close()

    waves = {n: make_wave(args, n) for n in args.concurrency}
    statics = {n: static_batch(args, waves[n]) for n in args.concurrency}
    need = max(args.prompt_lens[1] + args.output_lens[1], TTFT_LONG + 1, TTFT_SHORT + args.tokens)
    engine_max_len = min(need, args.package_max_len)
    ours = {
        p: Ours(packages[p], p, max(args.concurrency), engine_max_len, args.threads)
        for p in args.precisions
    }
    rng = random.Random(f"{args.seed}-single")
    short, long_ = random_prompt(rng, TTFT_SHORT), random_prompt(rng, TTFT_LONG)

    raw: dict = {}  # (precision, metric, engine) → list per round

    def record(p, metric, engine, value):
        raw.setdefault((p, metric, engine), []).append(value)

    def blocks(p, warm):
        """Every block of precision p, each engine in turn; warm: short, not recorded."""
        engines = [("ours", None)] + [(k[0], r) for k, r in remotes.items() if k[1] == p]
        n_single = 4 if warm else args.tokens
        for _ in range(1 if warm else args.single_reps):  # engines alternate within a round
            for name, remote in engines:
                run = (lambda m, *a: getattr(ours[p], m)(*a)) if remote is None else remote.call
                r = run("single", short, n_single)
                if not warm:
                    record(p, "decode_tok_s", name, r["decode_tok_s"])
                    record(p, f"ttft{TTFT_SHORT}_ms", name, r["ttft_ms"])
        for name, remote in engines:
            run = (lambda m, *a: getattr(ours[p], m)(*a)) if remote is None else remote.call
            r = run("single", long_, 1)
            if not warm:
                record(p, f"ttft{TTFT_LONG}_ms", name, r["ttft_ms"])
        for n in args.concurrency:
            wave = waves[n]
            prompts, out_len = statics[n]
            if warm:  # every prompt at once, a few tokens each
                wave = [(0.0, pr, 4) for _, pr, _ in wave]
                out_len = 4
            for name, remote in engines:
                r = remote.call("batch", prompts, out_len) if remote else ours[p].wave(wave)
                if not warm:
                    record(p, f"streams{n}_tok_s", name, r["tok_s"])
                    if name == "ours":
                        for k in ("ttft_median_ms", "ttft_max_ms", "makespan_s"):
                            record(p, f"streams{n}_{k}", name, r[k])

    loads = []
    for rnd in range(args.rounds + 1):
        warm = rnd == 0
        print("warm-up" if warm else f"round {rnd}/{args.rounds}", file=sys.stderr, flush=True)
        t = time.time()
        for p in args.precisions:
            blocks(p, warm)
        loads.append(os.getloadavg()[0])
        print(f"  {time.time() - t:.0f} s, load {loads[-1]:.2f}", file=sys.stderr, flush=True)

    for remote in remotes.values():
        remote.close()

    overhead = {}
    for p in args.precisions:
        overhead[p] = [
            ours[p].step_overhead(1, TTFT_SHORT, args.tokens),
            ours[p].step_overhead(max(args.concurrency), TTFT_SHORT, args.tokens),
        ]

    table = summarize(args, raw, statics)
    costs = {p: graph_costs(packages[p] / f"onnx-{p}" / "model.onnx") for p in args.precisions}
    if genai_dirs:
        for p in args.precisions:
            costs[f"genai-{p}"] = graph_costs(genai_dirs[p] / "model.onnx")
    limits = roofline_limits(args, roof, costs, ours, raw, packages) if roof else {}

    profile = None
    b1 = next(
        (r for r in table if r["metric"] == "decode_tok_s" and r["precision"] == "int4"), None
    )
    slow = b1 is not None and b1["ratio"] is not None and b1["ratio"] < 0.9
    if args.profile == "always" or (args.profile == "auto" and slow):
        profile = ours[args.precisions[0] if "int4" not in ours else "int4"].profile()

    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_name(),
            "python": platform.python_version(),
            "versions": _versions(),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "engine": {
            "n_slots": max(args.concurrency),
            "max_len": engine_max_len,
            "packages": {p: str(v) for p, v in packages.items()},
            "huge_pages": {p: e.core.runner.huge_pages.describe() for p, e in ours.items()},
        },
        "load_avg": {"start": load_start, "per_round": loads, "end": os.getloadavg()},
        "wall_s": time.time() - started,
        "rows": table,
        "static_batches": {
            n: {"prompt_len": len(s[0][0]), "output_len": s[1]} for n, s in statics.items()
        },
        "waves": {
            n: {
                "prompt_tokens": sum(len(w[1]) for w in wv),
                "output_tokens": sum(w[2] for w in wv),
                "last_arrival_s": wv[-1][0],
            }
            for n, wv in waves.items()
        },
        "roofline": roof,
        "graph_costs": costs,
        "limits": limits,
        "python_overhead": overhead,
        "notes": notes,
        "raw": {"|".join(k): v for k, v in raw.items()},
        "profile": profile,
    }
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def summarize(args, raw, statics) -> list[dict]:
    """One row per precision and metric: each engine's median over rounds, and ours / genai as
    the median of per-round ratios, with the issue's target where there is one."""
    metrics = [
        ("decode_tok_s", f"decode tok/s, 1 stream, {TTFT_SHORT}-tok prompt", True),
        (f"ttft{TTFT_SHORT}_ms", f"TTFT ms, {TTFT_SHORT}-tok prompt", False),
        (f"ttft{TTFT_LONG}_ms", f"TTFT ms, {TTFT_LONG}-tok prompt", False),
    ] + [(f"streams{n}_tok_s", f"tok/s, {n} stream{'s' * (n > 1)}", True) for n in args.concurrency]
    targets = {("int4", "decode_tok_s"): (">=", 1.0), (None, f"ttft{TTFT_LONG}_ms"): ("<=", 1.0)}
    if 32 in args.concurrency:
        targets[(None, "streams32_tok_s")] = (">=", 0.9)
    rows = []
    for p in args.precisions:
        for key, label, higher in metrics:
            row = {
                "precision": p,
                "metric": key,
                "label": f"{p} {label}",
                "higher_is_better": higher,
            }
            for engine in ("ours", "genai", "transformers"):
                v = raw.get((p, key, engine))
                row[engine] = statistics.median(v) if v else None
            for other in ("genai", "transformers"):
                a, b = raw.get((p, key, "ours")), raw.get((p, key, other))
                row["ratio" if other == "genai" else "ratio_transformers"] = (
                    statistics.median(x / y for x, y in zip(a, b, strict=True)) if a and b else None
                )
            target = targets.get((p, key)) or targets.get((None, key))
            row["target"] = target
            if target and row["ratio"] is not None:
                op, bound = target
                row["met"] = row["ratio"] >= bound if op == ">=" else row["ratio"] <= bound
            rows.append(row)
    return rows


def roofline_limits(args, roof, costs, ours, raw, packages) -> dict:
    out = {}
    for p, engine in ours.items():
        cfg = _model_dims(packages[p])
        c = costs[p]
        # batch-1 decode: the mean context over the single-stream decode
        ctx1 = TTFT_SHORT + args.tokens / 2
        kv_per_ctx = 2 * cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * 4
        bytes1 = c["weight_bytes_read"] + kv_per_ctx * ctx1
        bw_limit = roof["bandwidth_gbs"] * 1e9 / bytes1
        # batch N: mean context of the biggest wave (mean prompt + half the mean output)
        n = max(args.concurrency)
        ctxn = statistics.mean(args.prompt_lens) + statistics.mean(args.output_lens) / 2
        attn = 4 * cfg["n_layers"] * cfg["n_heads"] * cfg["head_dim"] * ctxn
        flops = 2 * c["matmul_weights"] + attn
        fp32_limit = roof["fp32_peak_gflops"] * 1e9 / flops
        int8_limit = roof["int8_ort_gops"] * 1e9 / flops
        measured1 = raw.get((p, "decode_tok_s", "ours"))
        measuredn = raw.get((p, f"streams{n}_tok_s", "ours"))
        m1 = statistics.median(measured1) if measured1 else None
        mn = statistics.median(measuredn) if measuredn else None
        out[p] = {
            "bytes_per_token_b1": bytes1,
            "context_b1": ctx1,
            "decode_b1_limit_tok_s": bw_limit,
            "decode_b1_fraction": m1 / bw_limit if m1 else None,
            "flops_per_token": flops,
            "context_bn": ctxn,
            "streams": n,
            "compute_limit_fp32_tok_s": fp32_limit,
            "compute_limit_int8_tok_s": int8_limit,
            "streams_fraction_fp32": mn / fp32_limit if mn else None,
            "streams_fraction_int8": mn / int8_limit if mn else None,
            "kv_cache_bytes": engine.core.runner.kv_bytes,
        }
    return out


def _model_dims(package: Path) -> dict:
    from registry.manifest import load

    m = load(package).model
    return {
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "n_kv_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
    }


def format_report(r: dict) -> str:
    def cell(x, w=9, fmt="{:.1f}"):
        return f"{fmt.format(x):>{w}}" if x is not None else f"{'-':>{w}}"

    def ratio(x, w):
        return f"{x:.2f}x".rjust(w) if x is not None else "-".rjust(w)

    m, a = r["machine"], r["args"]
    lines = [
        f"engine benchmark: {a['checkpoint']}, {a['threads']} threads, {a['rounds']} rounds "
        f"(+1 warm-up), {m['cpus']} CPUs ({m['cpu']}), wall {r['wall_s'] / 60:.1f} min",
        f"load average: start {r['load_avg']['start'][0]:.2f}, per round "
        f"{', '.join(f'{x:.2f}' for x in r['load_avg']['per_round'])}, end "
        f"{r['load_avg']['end'][0]:.2f}",
        f"engine: n_slots {r['engine']['n_slots']}, max_len {r['engine']['max_len']}; streams: "
        f"Poisson arrivals (mean gap {a['arrival_gap_ms']} ms), prompts {a['prompt_lens']}, "
        f"outputs {a['output_lens']} tokens; baselines: static batches "
        + ", ".join(
            f"{n}×({s['prompt_len']} in, {s['output_len']} out)"
            for n, s in r["static_batches"].items()
        ),
        "ours: " + "; ".join(f"{p} {d}" for p, d in r["engine"].get("huge_pages", {}).items()),
        "",
        f"{'':44} {'ours':>9} {'genai':>9} {'HF':>9} {'ours/genai':>11} {'target':>10}"
        f" {'ours/HF':>9}",
    ]
    for row in r["rows"]:
        target = ""
        if row["target"]:
            op, bound = row["target"]
            met = row.get("met")
            target = f"{op}{bound:g} " + ("ok" if met else "MISS" if met is not None else "")
        lines.append(
            f"{row['label']:44} {cell(row['ours'])} {cell(row['genai'])} "
            f"{cell(row['transformers'])} {ratio(row['ratio'], 11)} {target:>10}"
            f" {ratio(row['ratio_transformers'], 9)}"
        )
    lines.append("ratios: tok/s ours/other (>1: ours faster); TTFT ours/other (<1: ours faster)")
    if r["roofline"]:
        ro = r["roofline"]
        lines += [
            "",
            f"roofline: memory bandwidth {ro['bandwidth_gbs']:.1f} GB/s (numpy sum "
            f"{ro['bw_numpy_sum_gbs']:.1f}, numpy copy {ro['bw_numpy_copy_gbs']:.1f}, torch sum "
            f"{ro['bw_torch_sum_gbs']:.1f}); fp32 matmul peak {ro['fp32_peak_gflops']:.0f} "
            f"GFLOP/s (numpy {ro['fp32_numpy_gflops']:.0f}, torch {ro['fp32_torch_gflops']:.0f}, "
            f"ORT {ro['fp32_ort_gflops']:.0f}); int8 ORT MatMulInteger {ro['int8_ort_gops']:.0f} "
            "GOP/s",
        ]
        for p, lim in r["limits"].items():
            c = r["graph_costs"][p]
            lines += [
                f"  {p}: {c['weight_bytes_read'] / 1e6:.1f} MB weights read per token "
                f"(+ KV at context {lim['context_b1']:.0f}: "
                f"{(lim['bytes_per_token_b1'] - c['weight_bytes_read']) / 1e6:.1f} MB) → batch-1 "
                f"decode limit {lim['decode_b1_limit_tok_s']:.0f} tok/s; ours "
                f"{_pct(lim['decode_b1_fraction'])} of it",
                f"  {p}: {lim['flops_per_token'] / 1e6:.0f} MFLOP per token (context "
                f"{lim['context_bn']:.0f}) → batch-{lim['streams']} compute limit "
                f"{lim['compute_limit_fp32_tok_s']:.0f} tok/s at the fp32 peak, "
                f"{lim['compute_limit_int8_tok_s']:.0f} at the int8 peak; ours "
                f"{_pct(lim['streams_fraction_fp32'])} / {_pct(lim['streams_fraction_int8'])}",
            ]
    if r["python_overhead"]:
        lines.append("")
        lines.append("engine Python per core.step() (wall − ONNX Runtime run), decoding:")
        for p, rows in r["python_overhead"].items():
            lines.append(
                "  "
                + p
                + ": "
                + "; ".join(
                    f"{o['streams']} stream{'s' * (o['streams'] > 1)}: {o['python_us_per_step']:.0f}"
                    f" µs of {o['step_ms']:.2f} ms ({100 * o['python_fraction']:.1f}%)"
                    for o in rows
                )
            )
    for n in r["args"]["concurrency"]:
        parts = []
        for p in r["args"]["precisions"]:
            v = r["raw"].get(f"{p}|streams{n}_ttft_median_ms|ours")
            mx = r["raw"].get(f"{p}|streams{n}_ttft_max_ms|ours")
            if v:
                parts.append(
                    f"{p} TTFT median {statistics.median(v):.0f} ms, max "
                    f"{statistics.median(mx):.0f} ms"
                )
        if parts:
            lines.append(f"ours, {n} stream{'s' * (n > 1)} (AsyncEngine): " + "; ".join(parts))
    for note in r["notes"]:
        lines.append(f"note: {note}")
    if r["profile"]:
        lines += ["", "cProfile, 200 batch-1 core.step() calls (by tottime):", r["profile"]]
    return "\n".join(lines)


def _pct(x):
    return f"{100 * x:.0f}%" if x is not None else "-"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("onnxruntime", "onnxruntime-genai", "transformers", "torch", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
