"""Training throughput and peak memory of our Transformer against transformers' LlamaForCausalLM.

Both models get the same architecture (ModelConfig mapped onto LlamaConfig, SDPA attention), the
same weights for the loss check, the same batch of random token ids, the same loss
(`trainer.model.token_losses`) and the same AdamW settings. A step is forward + loss + backward +
optimizer step, fp32 on CPU and bf16 autocast on CUDA. The two models' timed steps alternate
(ABAB...) so machine noise hits both; tokens/s = B*T / median step time.

Peak memory is measured per model in a child process that builds and trains that model only:
`torch.cuda.max_memory_allocated` on CUDA, peak RSS (`ru_maxrss`) on CPU.

    python benchmarks/train_throughput.py                      # small and smollm2-135m, ~5 min
    python benchmarks/train_throughput.py --presets small --steps 20 --json out/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# preset -> (batch size, sequence length, timed steps): on an idle 2-core CPU a step takes ~1 s
# (small, 8x256) and ~5 s (smollm2-135m, 4x256), so the default run takes ~5 minutes
DEFAULTS = {"small": (8, 256, 20), "smollm2-135m": (4, 256, 10)}
PROBE_STEPS = 2  # the peak comes in step 2, when AdamW's moments coexist with activations and grads
PROBE_REPEATS = 2  # CPU peak RSS varies ~3% run to run (allocator timing): keep each model's least
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 0.1
MODELS = ("ours", "hf")


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def hf_config(cfg):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )


def build(which: str, cfg, device):
    from transformers import LlamaForCausalLM

    from trainer.model import Transformer

    model = Transformer(cfg) if which == "ours" else LlamaForCausalLM(hf_config(cfg))
    return model.to(device).train()


def loss_fn(which: str, model, device):
    """(inputs, targets) -> mean token loss: the same loss code and autocast for both models."""
    import torch

    from trainer.model import token_losses

    def forward(idx):  # (B, T) -> (B, T, V)
        return model(idx) if which == "ours" else model(input_ids=idx, use_cache=False).logits

    def loss(inputs, targets):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return token_losses(forward(inputs), targets).mean()

    return loss


def train_step(model, loss):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)

    def step(inputs, targets):
        loss(inputs, targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_batch(vocab_size: int, batch: int, seq_len: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=g).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) inputs and targets


def probe_memory(which: str, preset: str, batch: int, seq_len: int, device_name: str) -> dict:
    """Builds and trains one model for PROBE_STEPS steps in this process: its peak memory."""
    import resource

    import torch
    import transformers  # noqa: F401  imported by both probes so the RSS baseline is the same

    from trainer.config import PRESETS

    device = resolve_device(device_name)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    cfg = PRESETS[preset]
    model = build(which, cfg, device)
    step = train_step(model, loss_fn(which, model, device))
    inputs, targets = make_batch(cfg.vocab_size, batch, seq_len, device)
    for _ in range(PROBE_STEPS):
        step(inputs, targets)
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "baseline_bytes": 0}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak, "baseline_bytes": baseline}


def run_probe(which: str, preset: str, batch: int, seq_len: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--probe-memory",
        which,
        "--preset",
        preset,
        "--batch-size",
        str(batch),
        "--seq-len",
        str(seq_len),
        "--device",
        args.device,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"memory probe {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(preset: str, batch: int, seq_len: int, args) -> dict:
    runs = {m: [] for m in MODELS}
    for _ in range(PROBE_REPEATS):
        for m in MODELS:  # ABAB, as for the timed steps
            runs[m].append(run_probe(m, preset, batch, seq_len, args))
    return {m: min(rs, key=lambda r: r["peak_bytes"]) for m, rs in runs.items()}


def measure_throughput(
    preset: str, batch: int, seq_len: int, steps: int, warmup: int, device
) -> dict:
    import torch

    from trainer.config import PRESETS

    cfg = PRESETS[preset]
    torch.manual_seed(0)
    models = {"ours": build("ours", cfg, device), "hf": build("hf", cfg, device)}
    # HF names are ours under "model.", except the head (tied: the embedding tensor in both)
    state = models["ours"].state_dict()
    models["hf"].load_state_dict(
        {("" if k == "lm_head.weight" else "model.") + k: v for k, v in state.items()}, strict=True
    )
    losses = {name: loss_fn(name, m, device) for name, m in models.items()}
    inputs, targets = make_batch(cfg.vocab_size, batch, seq_len, device)
    with torch.no_grad():
        first = {name: loss(inputs, targets).item() for name, loss in losses.items()}
    steps_by_model = {name: train_step(models[name], losses[name]) for name in MODELS}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for step in steps_by_model.values():
            step(inputs, targets)
    times = {name: [] for name in MODELS}
    for _ in range(steps):
        for name, step in steps_by_model.items():  # ABAB: noise lands on both models alike
            sync()
            t0 = time.perf_counter()
            step(inputs, targets)
            sync()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "params": models["ours"].num_params(),
        "first_loss": first,
        "loss_abs_diff": abs(first["ours"] - first["hf"]),
        "step_times_s": times,
        "median_step_s": medians,
        "tokens_per_s": {name: batch * seq_len / s for name, s in medians.items()},
    }


def print_table(results: list[dict], device) -> None:
    mib = 1 << 20
    mem = "peak CUDA alloc MiB" if device.type == "cuda" else "peak RSS MiB (above imports)"
    print(f"\ndevice={device}  tokens/s = B*T / median step; memory: {mem}")
    print(
        f"{'preset':<14}{'params':>8}{'BxT':>8} | {'tok/s ours':>10}{'tok/s HF':>10}{'ratio':>7}"
        f"{'best':>6} | {'mem ours':>16}{'mem HF':>16}{'ratio':>7} | loss diff"
    )
    for r in results:
        tps, m = r["tokens_per_s"], r["memory"]
        peak = {k: m[k]["peak_bytes"] / mib for k in MODELS}
        above = {k: (m[k]["peak_bytes"] - m[k]["baseline_bytes"]) / mib for k in MODELS}
        cell = {k: f"{peak[k]:.0f} ({above[k]:.0f})" for k in MODELS}
        print(
            f"{r['preset']:<14}{r['params'] / 1e6:>7.1f}M{r['batch']:>4}x{r['seq_len']:<3} | "
            f"{tps['ours']:>10.0f}{tps['hf']:>10.0f}{r['tokens_per_s_ratio']:>7.2f}"
            f"{r['best_step_ratio']:>6.2f} | {cell['ours']:>16}{cell['hf']:>16}"
            f"{r['peak_memory_ratio']:>7.2f} | {r['loss_abs_diff']:.1e}"
        )
    print(
        "ratio = ours / transformers, tok/s from the median step (best: from the fastest step); "
        "memory ratio on the figures above the RSS after imports on CPU"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(DEFAULTS), help="comma-separated presets")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: per preset)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: per preset)")
    p.add_argument("--steps", type=int, help="timed steps per model (default: per preset)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--probe-memory", choices=MODELS, help=argparse.SUPPRESS)  # internal: a child
    p.add_argument("--preset", help=argparse.SUPPRESS)  # internal: the probe's preset
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.probe_memory:
        probe = probe_memory(
            args.probe_memory, args.preset, args.batch_size, args.seq_len, args.device
        )
        print(json.dumps(probe))
        return
    load_start = os.getloadavg()[0]  # work already on the machine, which the timings will share
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in DEFAULTS]
    if unknown:
        sys.exit(f"--presets: unknown {unknown}; choose from {list(DEFAULTS)}")
    plans = {
        p: (
            args.batch_size or DEFAULTS[p][0],
            args.seq_len or DEFAULTS[p][1],
            args.steps or DEFAULTS[p][2],
        )
        for p in presets
    }
    # Probes run first, while this process is still small: on Linux a child's ru_maxrss starts
    # at the parent's peak RSS (it is carried over fork and exec), which would swamp the figure.
    memory = {}
    for preset, (batch, seq_len, _) in plans.items():
        print(f"{preset}: memory probes, {PROBE_REPEATS} per model ...", flush=True)
        memory[preset] = measure_memory(preset, batch, seq_len, args)
    device = resolve_device(args.device)
    results = []
    for preset, (batch, seq_len, steps) in plans.items():
        print(f"{preset}: B={batch} T={seq_len} warmup={args.warmup} steps={steps} ...", flush=True)
        r = measure_throughput(preset, batch, seq_len, steps, args.warmup, device)
        m = memory[preset]
        used = {k: m[k]["peak_bytes"] - m[k]["baseline_bytes"] for k in MODELS}
        best = {k: min(r["step_times_s"][k]) for k in MODELS}
        r.update(
            preset=preset,
            batch=batch,
            seq_len=seq_len,
            steps=steps,
            memory=m,
            tokens_per_s_ratio=r["tokens_per_s"]["ours"] / r["tokens_per_s"]["hf"],
            best_step_ratio=best["hf"] / best["ours"],
            peak_memory_ratio=used["ours"] / used["hf"],
        )
        print(
            f"  first-batch loss ours={r['first_loss']['ours']:.6f} "
            f"hf={r['first_loss']['hf']:.6f} |diff|={r['loss_abs_diff']:.2e}",
            flush=True,
        )
        results.append(r)
    print_table(results, device)
    load = (load_start, os.getloadavg()[0])
    print(
        f"1-min load average at start {load[0]:.1f}, at end {load[1]:.1f} (with this run's own "
        f"threads) on {os.cpu_count()} CPUs; a higher load means the timings shared the cores"
    )
    if args.json:
        import torch
        import transformers

        meta = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "warmup": args.warmup,
            "load_avg_1min_start_end": load,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
