"""Decode-step latency and prefill time of our ONNX Runtime engine graph against
onnxruntime-genai's model builder output from the same weights, with eager PyTorch as a third
column. fp32 and int4 (MatMulNBits, block 32, symmetric, accuracy level 4) on the CPU.

Each engine lives in its own worker process (its own ORT thread pool, so no pool spins against
another's), all loaded once. The parent then runs rounds; in a round every engine in turn runs one
block: prefill a prompt of --prompt-len random tokens for B rows, then --steps greedy decode steps.
Only one worker runs at a time, and the blocks alternate (ABCABC...), so load from other
processes on the machine hits every engine alike. Figures are medians of the per-round medians;
a ratio is the median of the per-round ratios, so a burst of load spoils one round, not the
ratio. On a shared 2-core machine the absolute figures still swing by 2-3x with other load and
the ratios by about 5%: run it on an idle machine.

What a step includes: ours `OrtDecoder.decode` + argmax; genai `Generator.generate_next_token`
(greedy); eager `Transformer.forward` with its KVCache + argmax. Prefill: ours computes the last
position's logits only (logits_idx); genai's graph computes logits for every prompt position.

    python benchmarks/export_step.py                       # SmolLM2-135M-Instruct, batches 1,8,32
    python benchmarks/export_step.py --checkpoint CKPT --work /tmp/bench --batches 1 --rounds 5

The genai baseline needs the `onnx_ir` package (the model builder imports it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/engine.py must not shadow the engine package, which the exporters import
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

ENGINES = ("ours", "genai", "torch")


def build_ours(checkpoint: Path, work: Path, max_len: int) -> dict[str, Path]:
    from exporters.onnx_ort import build_ort_graph, quantize, save
    from trainer.checkpoint import load_model

    paths = {p: work / "ours" / f"{p}.onnx" for p in ("fp32", "int4")}
    if all(p.exists() for p in paths.values()):
        return paths
    paths["fp32"].parent.mkdir(parents=True, exist_ok=True)
    model, _, _ = load_model(checkpoint)
    proto = build_ort_graph(model, max_len)
    save(proto, paths["fp32"])
    save(quantize(proto, bits=4), paths["int4"])
    return paths


def build_genai(checkpoint: Path, work: Path) -> dict[str, Path]:
    """HF folder (LlamaForCausalLM.save_pretrained) → onnxruntime_genai.models.builder, per
    precision; kept in WORK and reused."""
    out = {p: work / f"genai_{p}" for p in ("fp32", "int4")}
    hf = work / "hf"
    if not (hf / "config.json").exists():
        export_hf(checkpoint, hf)
    for precision, folder in out.items():
        if not (folder / "genai_config.json").exists():
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf)]
            cmd += ["-o", str(folder), "-p", precision, "-e", "cpu", "-c", str(work / "cache")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"onnxruntime-genai's builder failed:\n{done.stderr[-3000:]}")
    return out


def export_hf(checkpoint: Path, out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.checkpoint import load_model

    model, _, _ = load_model(checkpoint)
    c = model.cfg
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.dim,
            intermediate_size=c.ffn_dim,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads,
            max_position_embeddings=c.max_seq_len,
            rope_theta=c.rope_theta,
            rms_norm_eps=c.norm_eps,
            tie_word_embeddings=c.tie_embeddings,
        )
    )
    # our names are HF's without the "model." prefix (lm_head excepted)
    state = {
        (k if k.startswith("lm_head") else f"model.{k}"): v for k, v in model.state_dict().items()
    }
    hf.load_state_dict(state)
    hf.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, out / name)


# ── workers: one engine each, driven over a pipe ──


class OursEngine:
    def __init__(self, path, max_batch, max_len, threads):
        from exporters.runner import OrtDecoder

        self.d = OrtDecoder(path, max_batch=max_batch, max_len=max_len, threads=threads)

    def block(self, prompts, steps):
        t = time.perf_counter()
        tokens = self.d.prefill(prompts).argmax(-1).tolist()
        prefill = time.perf_counter() - t
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            tokens = self.d.decode(tokens).argmax(-1).tolist()
            times.append(time.perf_counter() - t)
        return prefill, times


class GenaiEngine:
    def __init__(self, folder, max_batch, max_len, threads):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.clear_providers()
        options = {"intra_op_num_threads": threads}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def block(self, prompts, steps):
        import numpy as np

        params = self.og.GeneratorParams(self.model)
        n = len(prompts[0]) + steps + 1
        params.set_search_options(max_length=n, batch_size=len(prompts), do_sample=False)
        gen = self.og.Generator(self.model, params)
        t = time.perf_counter()
        gen.append_tokens(np.array(prompts, dtype=np.int32))
        prefill = time.perf_counter() - t
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - t)
        return prefill, times


class TorchEngine:
    def __init__(self, checkpoint, max_batch, max_len, threads):
        import torch

        from trainer.checkpoint import load_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_model(checkpoint)[0].eval()

    def block(self, prompts, steps):
        from trainer.model import KVCache

        torch = self.torch
        with torch.inference_mode():
            cache = KVCache(
                self.model.cfg, len(prompts), len(prompts[0]) + steps, "cpu", torch.float32
            )
            t = time.perf_counter()
            logits = self.model(torch.tensor(prompts), cache=cache, last_only=True)
            tokens = logits[:, -1].argmax(-1, keepdim=True)
            prefill = time.perf_counter() - t
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                tokens = self.model(tokens, cache=cache, last_only=True)[:, -1].argmax(
                    -1, keepdim=True
                )
                times.append(time.perf_counter() - t)
        return prefill, times


def worker(conn, kind, source, max_batch, max_len, threads):
    engine = {"ours": OursEngine, "genai": GenaiEngine, "torch": TorchEngine}[kind](
        source, max_batch, max_len, threads
    )
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        conn.send(engine.block(*msg))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--checkpoint",
        default="smollm2-135m-instruct",
        help="aimass checkpoint folder, or a bundled model name (default: SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/aimass-export-step"), help="built graphs (reused)"
    )
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per block")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    ap.add_argument("--max-len", type=int, default=1024, help="KV capacity of our graph")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    engines = args.engines.split(",")

    from trainer.cli import resolve_model

    args.checkpoint = resolve_model(args.checkpoint)  # a bundled name is imported once
    ours = build_ours(args.checkpoint, args.work, args.max_len)
    genai = build_genai(args.checkpoint, args.work) if "genai" in engines else {}
    sources = {("ours", p): ours[p] for p in ours} | {("genai", p): genai[p] for p in genai}
    if "torch" in engines:
        sources[("torch", "fp32")] = args.checkpoint
    sources = {k: v for k, v in sources.items() if k[0] in engines}

    ctx = mp.get_context("spawn")
    workers = {}
    for key, source in sources.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=worker, args=(child, key[0], source, max(batches), args.max_len, args.threads)
        )
        proc.start()
        child.close()  # the worker holds the only other end: its death ends our recv() with EOF
        workers[key] = (proc, parent)
    for key, (proc, conn) in workers.items():
        try:
            assert conn.recv() == "ready"
        except EOFError:
            proc.join()
            sys.exit(f"the {'-'.join(key)} worker died while loading (exit code {proc.exitcode})")

    import random

    rng = random.Random(0)
    prompt = [rng.randrange(100, 40000) for _ in range(args.prompt_len)]
    results: dict = {}
    for b in batches:
        for key in workers:
            workers[key][1].send(([prompt] * b, 2))  # warm-up block, not counted
            workers[key][1].recv()
        for _ in range(args.rounds):
            for key, (_, conn) in workers.items():
                conn.send(([prompt] * b, args.steps))
                prefill, times = conn.recv()
                r = results.setdefault((key, b), {"prefill": [], "step": [], "round": []})
                r["prefill"].append(prefill)
                r["step"].extend(times)
                r["round"].append(statistics.median(times))
    for proc, conn in workers.values():
        conn.send(None)
        proc.join()

    table = summarize(results, batches, args.prompt_len)
    print(format_table(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


def summarize(results, batches, prompt_len) -> list[dict]:
    """Per metric: each engine's median, and ours' ratio to genai and torch as the median of the
    per-round ratios (a burst of load on the machine then spoils one round, not the ratio)."""
    rows = []
    for precision in ("fp32", "int4"):
        for b in batches:
            rows.append(_row(results, f"{precision} decode b{b} (ms/step)", precision, b, "round"))
        rows.append(
            _row(results, f"{precision} prefill {prompt_len} b1 (ms)", precision, 1, "prefill")
        )
    return rows


def _row(results, metric, precision, b, series) -> dict:
    row: dict = {"metric": metric}
    per_round = {}
    for engine in ENGINES:
        r = results.get(((engine, precision), b))
        per_round[engine] = [x * 1e3 for x in r[series]] if r else None
        row[engine] = statistics.median(per_round[engine]) if r else None
    for other in ("genai", "torch"):
        if per_round["ours"] and per_round[other]:
            ratios = [a / o for a, o in zip(per_round["ours"], per_round[other], strict=True)]
            row[f"ours/{other}"] = statistics.median(ratios)
        else:
            row[f"ours/{other}"] = None
    return row


def format_table(rows) -> str:
    def cell(x, suffix=""):
        return f"{x:9.2f}{suffix}" if x is not None else f"{'-':>9}{suffix and ' '}"

    head = f"{'':30} {'ours':>9} {'genai':>9} {'torch':>9} {'ours/genai':>11} {'ours/torch':>11}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['metric']:30} {cell(r['ours'])} {cell(r['genai'])} {cell(r['torch'])}  "
            f"{cell(r['ours/genai'], 'x')}  {cell(r['ours/torch'], 'x')}"
        )
    lines.append("ratio < 1: ours is faster. tokens/s = B * 1000 / (ms per step).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
