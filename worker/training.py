"""One fine-tuning job, start to finish, with the trainer's and exporters' own entry points:

    training file ─► prepare_run (tokenizer, tokens) ─► train.run ─► evaluate (validation file)
        ─► export (onnx-fp32, parity-gated) ─► lineage + reports ─► registry push ─► NAME:VERSION

From scratch on a preset as `aimass train --preset` does (a BPE tokenizer trained on the corpus),
or fine-tuning a registry model as `aimass train --base` does (its checkpoint: the one its
package's lineage names, or a bundled model's import). The run folder lives under the worker's
work folder, so a job taken over after its worker died resumes from the run's last checkpoint
(`train.run(resume=True)` continues exactly; see docs/training.md) when the new worker sees
that folder (same machine, or a shared volume); otherwise it starts over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch

from aimass_common.corpus import scan_corpus
from aimass_common.files import atomic_write
from controlplane.jobs import PRESETS, JobView
from exporters.package import export
from registry.manifest import MANIFEST, decode, encode
from registry.names import parse_ref
from registry.registry import Registry
from trainer import checkpoint, config, data, train
from trainer.cli import BUNDLED_MODELS, resolve_model
from trainer.errors import CheckpointError
from trainer.model import token_losses
from trainer.tokenizer import Tokenizer

SERVING_TARGET = "onnx-fp32"  # exact, so it passes its parity gate without --force
EVAL_BLOCKS = 256  # validation blocks scored at most
DEFAULT_EPOCHS = 1


@dataclass
class Trained:
    run_dir: Path
    step: int
    tokens_seen: int
    stopped: bool  # should_stop ended it before its last step
    train_loss: float | None
    best_val_loss: float | None


def base_checkpoint(registry: Registry, model: str) -> tuple[Path, str]:
    """The checkpoint a registry model was exported from, and its NAME:VERSION."""
    name, version = registry.resolve(parse_ref(model))
    lineage = registry.manifest(name, version).lineage
    folder = Path(lineage.checkpoint) if lineage.checkpoint else None
    if folder is not None and (folder / "model.safetensors").is_file():
        return checkpoint.resolve(folder), f"{name}:{version}"
    if name in BUNDLED_MODELS:
        return checkpoint.resolve(resolve_model(name)), f"{name}:{version}"
    raise CheckpointError(
        f"{name}:{version} cannot be fine-tuned here: the checkpoint it was exported from "
        f"({lineage.checkpoint or 'not recorded'}) is not on this worker"
    )


def overrides_for(job: JobView) -> dict[str, Any]:
    """The job's hyperparameters as TrainConfig fields (steps come later: epochs need the
    dataset's size)."""
    hp = job.hyperparameters
    out: dict[str, Any] = {"seed": job.seed, "log_every": 1}
    for ours, field in (("batch_size", "batch_size"), ("block_size", "block_size"),
                        ("warmup_steps", "warmup_steps"), ("eval_interval", "eval_every"),
                        ("max_steps", "max_steps")):  # fmt: skip
        if ours in hp:
            out[field] = hp[ours]
    return out


def _learning_rate(cfg: config.TrainConfig, hp: dict[str, Any]) -> config.TrainConfig:
    scale = min_ratio = cfg.min_lr / cfg.lr
    if "learning_rate" in hp:
        scale = hp["learning_rate"] / cfg.lr
    elif "learning_rate_multiplier" in hp:
        scale = hp["learning_rate_multiplier"]
    else:
        return cfg
    lr = min(1.0, cfg.lr * scale)
    return dataclasses.replace(cfg, lr=lr, min_lr=lr * min_ratio).validate()


def prepare(job: JobView, corpus: Path, run_dir: Path, registry: Registry) -> str | None:
    """Set up the run folder (unless a checkpointed one is there to resume); the base model's
    NAME:VERSION, or None for a preset."""
    overrides = overrides_for(job)
    base_model = None
    if job.model in PRESETS:
        cfg = config.build_train_config(job.model, None, overrides)
    else:
        base, base_model = base_checkpoint(registry, job.model)
        model_cfg = checkpoint.read_model_config(base)
        cfg = config.build_train_config(None, None, overrides, str(base), model_cfg)
    cfg = _learning_rate(cfg, job.hyperparameters)
    if (run_dir / "checkpoint").exists():
        return base_model  # resumed: the run holds its own config
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint
    train.prepare_run(cfg, corpus, run_dir)
    if "max_steps" not in job.hyperparameters:
        _set_steps(run_dir, job.hyperparameters.get("n_epochs", DEFAULT_EPOCHS))
    return base_model


def _set_steps(run_dir: Path, epochs: int) -> None:
    """max_steps (and the cosine horizon) for `epochs` passes over the training blocks."""
    cfg = train.load_run_config(run_dir)
    blocks = data.TokenDataset.open(run_dir / "data").n_train_blocks
    steps = max(1, math.ceil(epochs * blocks / (cfg.batch_size * cfg.grad_accum)))
    path = run_dir / "train_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved |= {"max_steps": steps, "decay_steps": steps}
    atomic_write(path, json.dumps(saved, indent=2))


def run_training(
    run_dir: Path,
    on_step: Callable[[train.Trainer], None],
    should_stop: Callable[[], bool],
) -> Trained:
    cfg = train.load_run_config(run_dir)
    resume = (run_dir / "checkpoint").exists()
    seen: dict[str, int] = {}

    def step(tr: train.Trainer) -> None:
        seen["tokens"] = tr.tokens_seen
        on_step(tr)

    result = train.run(cfg, run_dir, resume=resume, on_step=step, should_stop=should_stop)
    return Trained(
        run_dir=run_dir,
        step=result.step,
        tokens_seen=seen.get("tokens", 0),
        stopped=result.stop_reason == "interrupted",
        train_loss=result.train_loss,
        best_val_loss=result.best_val_loss,
    )


@torch.no_grad()
def evaluate(run_dir: Path, validation: Path, work: Path, dataset: str) -> dict[str, Any]:
    """Mean loss and perplexity of the trained model on the validation file (tokenized with the
    run's tokenizer into blocks of the run's block size). `dataset` names the file by content:
    the promotion gate compares two versions' perplexities only when they name the same one."""
    cfg = train.load_run_config(run_dir)
    model, _, meta = checkpoint.load_model(run_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    ds = data.build_dataset(scan_corpus(validation), tokenizer, work, cfg.block_size, 0.0, cfg.seed)
    ids = ds.train_block_ids(0, min(ds.n_train_blocks, EVAL_BLOCKS))
    total, count = 0.0, 0
    for i in range(0, len(ids), cfg.batch_size):
        x, y = ds.get_batch(ids[i : i + cfg.batch_size])
        total += token_losses(model(x), y).sum().item()
        count += int((y != -100).sum())
    loss = total / max(count, 1)
    perplexity = math.exp(min(loss, 50.0))
    return {"dataset": dataset, "perplexity": perplexity, "validation_loss": loss,
            "validation_perplexity": perplexity, "validation_tokens": count,
            "step": meta.get("step")}  # fmt: skip


def package(
    run_dir: Path,
    out: Path,
    lineage: dict[str, Any],
    eval_report: dict[str, Any] | None,
    on_progress: Callable[[str], None],
) -> Path:
    """Export the serving target (its parity gate must pass) and add the job's lineage and
    its evaluation to the manifest before the package is pushed."""
    if out.exists():
        shutil.rmtree(out)  # an attempt that died while exporting
    path = export(run_dir, [SERVING_TARGET], out, on_progress=on_progress)
    manifest = decode((path / MANIFEST).read_bytes())
    manifest = msgspec.structs.replace(
        manifest,
        lineage=msgspec.structs.replace(manifest.lineage, **lineage),
        reports=msgspec.structs.replace(manifest.reports, eval=eval_report),
    )
    atomic_write(path / MANIFEST, encode(manifest))
    return path
