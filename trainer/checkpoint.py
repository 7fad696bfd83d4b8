"""Checkpoints: a folder that export, fine-tuning and generation all accept.

    CHECKPOINT/
      model.safetensors      weights, HF LLaMA names without the "model." prefix; a tied
                             lm_head is stored once (as embed_tokens.weight)
      quantized.safetensors  imports of quantized files only: the weights' own quantized blocks
                             (see BlockWeight), of which model.safetensors holds the exact fp32
                             values; an exporter builds a quantized target from them instead of
                             quantizing the fp32 weights a second time
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

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from aimass_common.files import fsync_dir, staged_dir
from trainer.config import ModelConfig
from trainer.errors import CheckpointError
from trainer.model import Transformer
from trainer.tokenizer import Tokenizer

FORMAT = "aimass-checkpoint"
FORMAT_VERSION = 1
REQUIRED_FILES = ("model.safetensors", "config.json", "tokenizer.json")
QUANTIZED = "quantized.safetensors"
BLOCKS_FORMAT = "aimass-blocks"
BLOCK = 32  # weights per block along the input dimension, in every kind below
BLOCK_KINDS = ("q4_0", "q4_1", "q8_0")


@dataclasses.dataclass(frozen=True)
class BlockWeight:
    """One (out, in) weight as blocks of 32 consecutive inputs of a row, each with its scale:
    GGUF's Q4_0, Q4_1 and Q8_0, their bytes kept as the file has them.

        kind   qs                                            value of element j of a block
        q4_0   uint8 (out, in/32, 16): byte i = element i    d * (q_j - 8)
               in the low nibble, element i+16 in the high
        q4_1   the same                                      d * q_j + m
        q8_0   int8 (out, in/32, 32)                         d * q_j

    d and m are float16 (out, in/32), as in the file; `dequantize` computes in float32 exactly
    as llama.cpp and gguf.quants do, so it is bit-identical to the imported fp32 weights.
    """

    kind: str  # one of BLOCK_KINDS
    qs: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None  # q4_1 only

    @property
    def bits(self) -> int:
        return 8 if self.kind == "q8_0" else 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    def codes(self) -> np.ndarray:
        """The codes one per element, uint8 (out, in/32, 32): 0..15 for 4-bit, q + 128 for q8_0."""
        if self.bits == 8:
            return (self.qs.astype(np.int16) + 128).astype(np.uint8)
        return np.concatenate([self.qs & 0x0F, self.qs >> 4], axis=-1)

    def dequantize(self) -> np.ndarray:
        """float32 (out, in)."""
        d = self.d.astype(np.float32)[..., None]
        if self.kind == "q8_0":
            w = self.qs.astype(np.float32) * d
        elif self.kind == "q4_0":
            w = d * (self.codes().astype(np.int8) - np.int8(8)).astype(np.float32)
        else:
            w = d * self.codes().astype(np.float32) + self.m.astype(np.float32)[..., None]
        return w.reshape(self.shape)


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


def load_blocks(path: str | Path) -> dict[str, BlockWeight]:
    """The quantized blocks a checkpoint carries, by weight name (empty: it carries none)."""
    file = resolve(path) / QUANTIZED
    if not file.is_file():
        return {}
    try:
        with safe_open(str(file), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file} cannot be read as safetensors: {e}") from None
    if meta.get("format") != BLOCKS_FORMAT:
        raise CheckpointError(
            f"{file} is not an {BLOCKS_FORMAT} file (format={meta.get('format')!r})"
        )
    blocks = {}
    for name, kind in meta.items():
        if name == "format":
            continue
        if kind not in BLOCK_KINDS:
            raise CheckpointError(f"{file}: {name} has block kind {kind!r}; known: {BLOCK_KINDS}")
        try:
            blocks[name] = BlockWeight(
                kind, tensors[f"{name}.qs"], tensors[f"{name}.d"], tensors.get(f"{name}.m")
            )
        except KeyError as e:
            raise CheckpointError(f"{file}: {name} lacks its tensor {e}") from None
    return blocks


def _save_blocks(blocks: dict[str, BlockWeight], path: Path) -> None:
    tensors = {}
    for name, b in blocks.items():
        tensors[f"{name}.qs"], tensors[f"{name}.d"] = b.qs, b.d
        if b.m is not None:
            tensors[f"{name}.m"] = b.m
    meta = {"format": BLOCKS_FORMAT, **{name: b.kind for name, b in blocks.items()}}
    save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta)


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
    blocks: dict[str, BlockWeight] | None = None,
) -> Path:
    """Writes a complete checkpoint at `folder`, replacing any there, atomically (staged_dir).
    `blocks`: the quantized form the weights were imported from (their exact source)."""
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
        if blocks:
            _save_blocks(blocks, tmp / QUANTIZED)
    return folder


def point_latest(run_dir: Path, target: Path) -> None:
    """Moves RUN/checkpoint to `target` (a folder inside the run) with one atomic rename."""
    link = run_dir / "checkpoint"
    tmp = run_dir / f".checkpoint.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.relative_to(run_dir))
    os.replace(tmp, link)
    fsync_dir(run_dir)
