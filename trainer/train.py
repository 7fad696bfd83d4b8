"""The training loop: corpus (or a base checkpoint) → run folder with checkpoints and metrics.

    RUN/
      train_config.json     the full TrainConfig (resume reads it back)
      tokenizer/            the run's tokenizer (trained on the corpus, or the base model's)
      data/                 tokens.bin (+ loss_mask.bin) and dataset.json with its sha256
      metrics.jsonl         one JSON object per logged step (see metrics.py)
      loss.png lr.png throughput.png
      checkpoints/step-NNNNNNN/   complete checkpoints (the newest `keep_checkpoints`)
      checkpoint -> checkpoints/step-NNNNNNN   the newest, moved by one atomic rename
      best/                 lowest validation loss so far (weights only, no optimizer)

A fresh run is prepared (tokenizer, tokens) in a staging folder and renamed to RUN only when the
data is good, so bad input leaves nothing behind. The same code runs under torchrun: every rank
computes, rank 0 writes. The data order is a pure function of (seed, position), and the
optimizer state is saved, so a resumed run continues the uninterrupted run's loss curve exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from aimass_common.corpus import iter_texts, scan_corpus
from aimass_common.files import staged_dir
from trainer import checkpoint as ckpt
from trainer import data, distributed
from trainer.config import TrainConfig
from trainer.errors import CheckpointError, TrainingDiverged
from trainer.metrics import MetricsLog, Progress, draw_charts
from trainer.model import Transformer, token_losses
from trainer.tokenizer import Tokenizer, train_bpe


@dataclass
class RunResult:
    run_dir: Path
    step: int
    checkpoint: Path
    stop_reason: str  # "max_steps" | "early_stopping" | "interrupted"
    train_loss: float | None  # of the last step run here; None when a resume had no step left
    best_val_loss: float | None
    signum: int | None = None  # the signal that interrupted the run


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, cosine decay to cfg.min_lr at decay_steps, then min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    horizon = cfg.decay_steps or cfg.max_steps
    if step >= horizon:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def prepare_run(cfg: TrainConfig, corpus_path: str | Path, run_dir: Path) -> TrainConfig:
    """Validates the corpus, trains or copies the tokenizer and tokenizes, in a staging folder
    renamed to `run_dir` at the end. Returns the config the run trains with (saved in it, as
    load_run_config reads it back): `cfg` completed with the trained vocabulary size, the base
    checkpoint's absolute path and the cosine horizon. Raises DataError / CheckpointError;
    leaves nothing on failure."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(
            f"{run_dir} already exists; pass --resume {run_dir} to continue it, or another --out"
        )
    corpus = scan_corpus(corpus_path)
    if cfg.decay_steps is None:  # fixed at the first launch: a resume with more steps keeps it
        cfg = dataclasses.replace(cfg, decay_steps=cfg.max_steps)
    with staged_dir(run_dir) as staging:
        if cfg.base:
            # absolute: a resume may start from another folder
            cfg = dataclasses.replace(cfg, base=str(ckpt.resolve(cfg.base)))
            tokenizer = Tokenizer.load(cfg.base)
        else:
            tokenizer = train_bpe(iter_texts(corpus), cfg.vocab_size)
            model = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
            cfg = dataclasses.replace(cfg, model=model)
        (staging / "tokenizer").mkdir()
        tokenizer.save(staging / "tokenizer")
        data.build_dataset(
            corpus, tokenizer, staging / "data", cfg.block_size, cfg.val_fraction, cfg.seed
        )
        config = cfg.to_dict() | {
            "corpus": str(Path(corpus_path).resolve()),
            "corpus_sha256": corpus.sha256,
        }
        (staging / "train_config.json").write_text(json.dumps(config, indent=2))
    return cfg


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "train_config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a training run (no train_config.json)")
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.pop("corpus", None)
    saved.pop("corpus_sha256", None)
    return TrainConfig.from_dict(saved)


class _StopFlag:
    """SIGTERM (a preempted pod, torchrun tearing down, `kill`) or a first Ctrl-C asks for a
    checkpoint and exit at the next step boundary rather than dying mid-write; a second Ctrl-C
    stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handler, no flag
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class Trainer:
    def __init__(
        self, cfg: TrainConfig, run_dir: Path, dist: distributed.Dist, resume: bool = False
    ):
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist
        self.tokenizer = Tokenizer.load(run_dir / "tokenizer")
        self.data = data.TokenDataset.open(run_dir / "data")
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        torch.manual_seed(cfg.seed)
        self.model = Transformer(cfg.model)
        self.lineage = {
            "dataset_sha256": self.data.tokens_sha256,
            "code_revision": ckpt.code_revision(),
            "run": str(run_dir),
            "base_model": None,
        }
        if cfg.base and not resume:  # a resumed run takes its weights from its own checkpoint
            base = ckpt.resolve(cfg.base)
            ckpt.load_weights(self.model, base / "model.safetensors")
            base_lineage = ckpt.read_meta(base).get("lineage", {})
            self.lineage["base_model"] = base_lineage.get("base_model") or str(base)
        self.model.to(dist.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            fused=dist.device.type == "cuda",
        )
        self.step = 0  # optimizer steps completed
        self.position = 0  # training blocks consumed (the data order's cursor)
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.best_val: float | None = None
        self.bad_evals = 0
        self.net = self.model
        if dist.enabled:
            ids = [dist.local_rank] if dist.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.net = torch.compile(self.net)

    # ---- state -------------------------------------------------------------------------------

    def restore(self) -> None:
        """Continues from RUN/checkpoint: weights, optimizer, data position, RNG."""
        folder = ckpt.resolve(self.run_dir)
        state_path = folder / "train_state.pt"
        if not state_path.is_file():
            raise CheckpointError(f"{folder} has no train_state.pt; it cannot be resumed")
        ckpt.load_weights(self.model, folder / "model.safetensors")
        self.lineage["base_model"] = ckpt.read_meta(folder).get("lineage", {}).get("base_model")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.position = state["step"], state["position"]
        self.tokens_seen, self.elapsed = state["tokens_seen"], state["elapsed_s"]
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if self.dist.is_main:
            self.metrics.truncate_after(self.step)

    def _meta(self, val_loss: float | None, train_loss: float | None) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": self.best_val,
            "lineage": self.lineage,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, val_loss: float | None, train_loss: float | None) -> Path:
        """Rank 0 writes checkpoints/step-N, points RUN/checkpoint at it, prunes old ones."""
        target = self.run_dir / "checkpoints" / f"step-{self.step:07d}"
        if self.dist.is_main:
            state = {
                "step": self.step,
                "position": self.position,
                "tokens_seen": self.tokens_seen,
                "elapsed_s": self.elapsed,
                "best_val": self.best_val,
                "bad_evals": self.bad_evals,
                "optimizer": self.optimizer.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            }
            ckpt.write_checkpoint(
                target, self.model, self.tokenizer, self._meta(val_loss, train_loss), state
            )
            ckpt.point_latest(self.run_dir, target)
            steps = sorted((self.run_dir / "checkpoints").glob("step-*"))
            for old in steps[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return self.run_dir / "checkpoint"

    # ---- computation -------------------------------------------------------------------------

    def _autocast(self):
        if self.dist.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over the global batch → (mean train loss, grad norm).

        The global batch is the next B × accum × world blocks of the data order; rank r takes its
        own slice of each micro-batch. Every rank scales its summed token losses by the global
        target count (known to all ranks without communication), so the update equals a single
        process's over the same global batch whatever the world size.
        """
        cfg, d = self.cfg, self.dist
        B, per_micro = cfg.batch_size, cfg.batch_size * d.world
        global_ids = self.data.train_block_ids(self.position, per_micro * cfg.grad_accum)
        n_targets = max(1, self.data.count_targets(global_ids))
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(cfg.grad_accum):
            ids = global_ids[micro * per_micro + d.rank * B : micro * per_micro + (d.rank + 1) * B]
            x, y = (t.to(d.device, non_blocking=True) for t in self.data.get_batch(ids))
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not d.enabled else self.net.no_sync()
            with sync:
                with self._autocast():
                    logits = self.net(x)
                losses = token_losses(logits, y).sum()
                (losses * (d.world / n_targets)).backward()
            loss_sum += losses.detach()
        loss = d.all_reduce(loss_sum).item() / n_targets
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss} at step {self.step + 1} (lr {lr:.3g}); the last good "
                f"checkpoint is {self.run_dir / 'checkpoint'}; try a lower lr or grad_clip"
            )
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += per_micro * cfg.grad_accum
        self.tokens_seen += len(global_ids) * cfg.block_size
        return loss, norm

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the first eval_batches global batches of validation blocks
        (the same blocks whatever the world size)."""
        n = self.cfg.eval_batches * self.cfg.batch_size * self.dist.world
        val_ids = self.data.val_block_ids()[:n]
        if len(val_ids) == 0:
            return None
        self.model.eval()
        total = torch.zeros(2, device=self.dist.device, dtype=torch.float64)  # loss sum, targets
        mine = val_ids[self.dist.rank :: self.dist.world]
        for i in range(0, len(mine), self.cfg.batch_size):
            x, y = (
                t.to(self.dist.device)
                for t in self.data.get_batch(mine[i : i + self.cfg.batch_size])
            )
            with self._autocast():
                logits = self.model(x)
            total[0] += token_losses(logits, y).sum().double()
            total[1] += (y != -100).sum()
        self.model.train()
        loss_sum, count = self.dist.all_reduce(total).tolist()
        return loss_sum / max(count, 1)

    def log(
        self,
        loss: float,
        grad_norm: float,
        tokens_per_s: float,
        val_loss: float | None,
        progress: Progress | None,
    ) -> None:
        if not self.dist.is_main:
            return
        record = {
            "step": self.step,
            "train_loss": loss,
            "lr": lr_at(self.step - 1, self.cfg),
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": round(self.elapsed, 3),
            "ts": time.time(),
        }
        if val_loss is not None:
            record |= {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        self.metrics.write(record)
        progress.update(
            self.step, loss, tokens_per_s, f" val {val_loss:.4f}" if val_loss is not None else ""
        )

    def after_eval(self, val_loss: float, train_loss: float) -> bool:
        """Tracks the best validation loss (saving RUN/best); True when patience is exhausted."""
        if self.best_val is None or val_loss < self.best_val - self.cfg.min_delta:
            self.best_val, self.bad_evals = val_loss, 0
            if self.cfg.save_best and self.dist.is_main:
                ckpt.write_checkpoint(
                    self.run_dir / "best",
                    self.model,
                    self.tokenizer,
                    self._meta(val_loss, train_loss),
                )
        else:
            self.bad_evals += 1
        return bool(self.cfg.patience) and self.bad_evals >= self.cfg.patience


def run(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_step: Callable[[Trainer], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    dist: distributed.Dist | None = None,
) -> RunResult:
    """Trains in an already-prepared run folder (see prepare_run) up to cfg.max_steps.

    `should_stop()`, asked after every step, stops the run as a signal does: a checkpoint at
    that step, stop_reason "interrupted" (a job worker's cancel)."""
    run_dir = Path(run_dir)
    own_dist = dist is None
    dist = dist or distributed.setup(cfg.device)
    try:
        return _loop(Trainer(cfg, run_dir, dist, resume), resume, on_step, should_stop)
    finally:
        if own_dist:
            distributed.teardown(dist)


def _loop(tr: Trainer, resume: bool, on_step, should_stop) -> RunResult:
    cfg, d = tr.cfg, tr.dist
    if resume:
        tr.restore()
    tr.model.train()
    progress = Progress(cfg.max_steps, start=tr.step) if d.is_main else None
    stop_reason, loss = "max_steps", None
    # throughput counts training steps only: evaluations and checkpoint writes are not in it
    interval_tokens, interval_time = 0, 0.0
    with _StopFlag() as flag:
        while tr.step < cfg.max_steps:
            t0 = time.perf_counter()
            loss, grad_norm = tr.train_step()
            step_time = time.perf_counter() - t0
            tr.elapsed += step_time
            interval_time += step_time
            interval_tokens += cfg.batch_size * cfg.grad_accum * d.world * cfg.block_size
            # every rank must agree to stop at the same step, or the others hang in all-reduce
            requested = flag.requested or (should_stop is not None and should_stop())
            stop = bool(
                d.all_reduce(torch.tensor([float(requested)]), op=torch.distributed.ReduceOp.MAX)
            )
            is_eval = tr.step % cfg.eval_every == 0 or tr.step == cfg.max_steps
            val_loss = tr.evaluate() if is_eval else None
            if tr.step % cfg.log_every == 0 or is_eval or stop:
                tr.log(
                    loss, grad_norm, interval_tokens / max(interval_time, 1e-9), val_loss, progress
                )
                interval_tokens, interval_time = 0, 0.0
            if val_loss is not None and tr.after_eval(val_loss, loss):
                stop_reason = "early_stopping"
            if stop:
                stop_reason = "interrupted"
            if is_eval or stop_reason != "max_steps":
                tr.save(val_loss, loss)
                if d.is_main:
                    draw_charts(tr.metrics.read(), tr.run_dir)
            if on_step is not None:
                on_step(tr)
            if stop_reason != "max_steps":
                break
    if progress is not None:
        progress.close()
    return RunResult(
        tr.run_dir,
        tr.step,
        tr.run_dir / "checkpoint",
        stop_reason,
        loss,
        tr.best_val,
        flag.signum if stop_reason == "interrupted" else None,
    )
