"""Checkpoints: a folder that export, fine-tuning and generation all accept.

    CHECKPOINT/
      model.safetensors      weights, HF LLaMA names without the "model." prefix; a tied
                             lm_head is stored once (as embed_tokens.weight)
      config.json            {"format": "aimass-checkpoint", "format_version", "model": ModelConfig}
      tokenizer.json         tokenizers' format
      tokenizer_config.json  special-token roles and the chat template
      meta.json              step, tokens seen, losses, lineage (base model, dataset sha256,
                             code revision, run)
      train_state.pt         optimizer, data position and RNG state (training runs only)

A folder is written under a temporary name and renamed into place, so a crash mid-write never
leaves a half checkpoint under a real name. In a run folder, checkpoints are
RUN/checkpoints/step-NNNNNNN and RUN/checkpoint is a symlink to the newest, moved atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aimass_common.files import fsync_dir, staged_dir
from trainer.config import ModelConfig
from trainer.errors import CheckpointError
from trainer.model import Transformer
from trainer.tokenizer import Tokenizer

FORMAT = "aimass-checkpoint"
FORMAT_VERSION = 1
REQUIRED_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (→ its newest checkpoint). Raises CheckpointError."""
    path = Path(path)
    if (path / "checkpoint").exists():
        path = path / "checkpoint"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint or run folder")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    return path.resolve()


def read_model_config(folder: Path) -> ModelConfig:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{folder}/config.json is not valid JSON: {e}") from None
    if data.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder}/config.json is not an {FORMAT} config (format={data.get('format')!r})"
        )
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has format_version {data['format_version']}; this version reads up to {FORMAT_VERSION}"
        )
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(data.get("model", {})) - fields
    if unknown:
        raise CheckpointError(f"{folder}/config.json has unknown model fields {sorted(unknown)}")
    try:
        return ModelConfig(**data["model"]).validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json has an invalid model config: {e}") from None


def read_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "meta.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Transformer, Tokenizer, dict]:
    """Loads a checkpoint (or a run's newest) → (model in eval mode, tokenizer, meta)."""
    folder = resolve(path)
    cfg = read_model_config(folder)
    model = Transformer(cfg)
    load_weights(model, folder / "model.safetensors")
    return model.to(device).eval(), Tokenizer.load(folder), read_meta(folder)


def load_weights(model: Transformer, path: Path) -> None:
    try:
        state = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read as safetensors: {e}") from None
    load_state(model, state, path)


def load_state(model: Transformer, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Loads `state` (our parameter names) into `model` after checking every name and shape
    against its config; a tied model's lm_head.weight may be absent (it is the embedding)."""
    if model.cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model config: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, the config needs {tuple(shape)}"
            )
    model.load_state_dict(state, strict=False)


def weights_state(model: Transformer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    return state


def code_revision() -> str | None:
    """The git commit of this code, when it runs from a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_checkpoint(
    folder: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Writes a complete checkpoint at `folder`, replacing any there, atomically (staged_dir)."""
    folder = Path(folder)
    with staged_dir(folder, replace=True) as tmp:
        save_file(weights_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": dataclasses.asdict(model.cfg),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
    return folder


def point_latest(run_dir: Path, target: Path) -> None:
    """Moves RUN/checkpoint to `target` (a folder inside the run) with one atomic rename."""
    link = run_dir / "checkpoint"
    tmp = run_dir / f".checkpoint.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.relative_to(run_dir))
    os.replace(tmp, link)
    fsync_dir(run_dir)
