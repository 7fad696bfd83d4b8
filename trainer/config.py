"""Typed configuration: the model architecture and the training run.

Both are frozen dataclasses with a comment per field, built once at the edge (preset → config
file → `--set key=value` overrides) and validated there, with messages that name the field, the
value and the limit. A changed config is a new one (`with_overrides`, `dataclasses.replace`):
whoever holds a config can rely on it not changing under them. Nothing here reads the
environment.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512  # tokens in the vocabulary; set from the tokenizer when one is trained
    dim: int = 64  # width of the residual stream
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # query heads; head_dim = dim // n_heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); must divide n_heads
    ffn_dim: int = 176  # hidden width of the SwiGLU feed-forward
    max_seq_len: int = 256  # longest context the model is trained and served with
    rope_theta: float = 10000.0  # base of the rotary embedding frequencies
    norm_eps: float = 1e-5  # epsilon inside RMSNorm
    tie_embeddings: bool = True  # the LM head shares the token embedding matrix
    init_std: float = 0.02  # std of the normal init of linear and embedding weights

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> ModelConfig:
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "ffn_dim",
            "max_seq_len",
        ):
            _check(f"model.{name}", getattr(self, name), ge=1)
        _check("model.rope_theta", self.rope_theta, gt=0)
        _check("model.norm_eps", self.norm_eps, gt=0, le=1)
        _check("model.init_std", self.init_std, gt=0, le=1)
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}"
            )
        return self


PRESETS: dict[str, ModelConfig] = {
    # < 1M parameters: unit tests and the CI demo
    "tiny": ModelConfig(),
    # ~14M parameters: a small model that learns a corpus in minutes on a laptop CPU
    "small": ModelConfig(
        vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=512
    ),
    # the exact architecture of HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        ffn_dim=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        init_std=0.041666,
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    preset: str = "tiny"  # architecture preset (see PRESETS) when training from scratch
    model: ModelConfig = field(default_factory=ModelConfig)  # architecture; `--set model.dim=128`
    vocab_size: int = 512  # BPE vocabulary trained on the corpus (from-scratch runs only)
    base: str | None = None  # checkpoint to fine-tune instead of training from scratch
    # data
    block_size: int = 128  # tokens per training sequence (≤ model.max_seq_len)
    val_fraction: float = 0.1  # share of the corpus' blocks held out for validation
    # optimisation
    batch_size: int = 16  # sequences per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 200  # optimizer steps to train for
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 20  # linear warmup from 0 to lr
    decay_steps: int | None = None  # cosine horizon; fixed to max_steps at the first launch, so a
    # resume with a larger --max-steps continues at min_lr instead of jumping back up
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not norms)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay (0.95, not 0.999: steadier on small batches)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # evaluation, early stopping, checkpoints
    eval_every: int = 50  # steps between validation passes (and checkpoints)
    eval_batches: int = 8  # global batches of validation blocks per evaluation
    patience: int = 0  # stop after this many evals without val-loss improvement; 0 = never
    min_delta: float = 0.0  # improvement in val loss that resets the patience counter
    keep_checkpoints: int = 2  # step checkpoints kept on disk (the newest ones)
    save_best: bool = True  # also keep RUN/best: the weights with the lowest validation loss
    # runtime
    seed: int = 1337  # seeds weight init, the train/validation split and the data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10  # steps between metrics lines and progress updates
    compile: bool = False  # torch.compile the model (faster on GPU; slow to start)

    def validate(self) -> TrainConfig:
        if self.base is None and self.preset not in PRESETS:
            raise ConfigError(f"preset={self.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        self.model.validate()
        _check("vocab_size", self.vocab_size, ge=260, le=1 << 20)
        _check("block_size", self.block_size, ge=2, le=self.model.max_seq_len)
        _check("val_fraction", self.val_fraction, ge=0.0, lt=1.0)
        for name in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "eval_batches",
            "log_every",
            "keep_checkpoints",
        ):
            _check(name, getattr(self, name), ge=1)
        if self.decay_steps is not None:
            _check("decay_steps", self.decay_steps, ge=1)
        for name in ("warmup_steps", "patience", "min_delta", "weight_decay", "grad_clip"):
            _check(name, getattr(self, name), ge=0)
        _check("lr", self.lr, gt=0, le=1)
        _check("min_lr", self.min_lr, ge=0, le=self.lr)
        _check("beta1", self.beta1, ge=0, lt=1)
        _check("beta2", self.beta2, ge=0, lt=1)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r} must be auto, cpu, cuda or cuda:N")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return with_overrides(cls(), _flatten(data))


def _check(name: str, value, *, ge=None, gt=None, le=None, lt=None) -> None:
    if ge is not None and not value >= ge:
        raise ConfigError(f"{name}={value} must be >= {ge}")
    if gt is not None and not value > gt:
        raise ConfigError(f"{name}={value} must be > {gt}")
    if le is not None and not value <= le:
        raise ConfigError(f"{name}={value} must be <= {le}")
    if lt is not None and not value < lt:
        raise ConfigError(f"{name}={value} must be < {lt}")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Converts `value` (a string from the command line, or a JSON/TOML value) to the field's type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        annotation = args[0]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} must be true or false")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a number")
        try:
            number = float(value)
            if annotation is int:
                if number != int(number):
                    raise ValueError
                return int(number)
            return number
        except (TypeError, ValueError):
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"{name}={value!r} must be {kind}") from None
    return str(value)


def with_overrides(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """A copy of the (nested) dataclass `cfg` with dotted `key=value` pairs set (values coerced to
    the fields' types), naming any unknown key. A nested config is set field by field, never
    whole. `prefix` is the dotted path to `cfg`, for messages."""
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        name, sep, rest = dotted.partition(".")
        is_nested = name in hints and dataclasses.is_dataclass(getattr(cfg, name))
        if sep and is_nested:
            nested.setdefault(name, {})[rest] = value
        elif sep or is_nested or name not in hints:
            raise ConfigError(f"unknown setting {prefix + dotted!r}")
        else:
            changes[name] = _coerce(prefix + dotted, value, hints[name])
    for name, sub in nested.items():
        changes[name] = with_overrides(getattr(cfg, name), sub, f"{prefix}{name}.")
    return dataclasses.replace(cfg, **changes)


def parse_set_args(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} must look like key=value")
        out[key.strip()] = value.strip()
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text(encoding="utf-8"))
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"config file {path} is not valid {path.suffix[1:].upper()}: {e}"
        ) from None
    raise ConfigError(f"config file {path} must end in .toml or .json")


# Defaults for fine-tuning a pretrained model: a from-scratch learning rate would wreck its weights.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "min_lr": 1e-5,
    "warmup_steps": 10,
    "weight_decay": 0.0,
}


def build_train_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: str | None = None,
    base_model: ModelConfig | None = None,
) -> TrainConfig:
    """Preset (or fine-tuning defaults), then config file, then overrides: later sources win.

    With `base`, the architecture is the base checkpoint's (`base_model`); the preset is ignored.
    Returns a validated config.
    """
    file_values = _flatten(read_config_file(config_file)) if config_file else {}
    chosen = preset or file_values.get("preset") or TrainConfig.preset
    if chosen not in PRESETS:
        raise ConfigError(f"preset={chosen!r} is unknown; choose one of {sorted(PRESETS)}")
    if base is None:
        model = PRESETS[chosen]
        cfg = TrainConfig(preset=chosen, model=model, vocab_size=model.vocab_size)
    else:
        if base_model is None:
            raise ConfigError("base_model is required with base")
        model = base_model
        cfg = with_overrides(
            TrainConfig(preset=chosen, model=model, vocab_size=model.vocab_size, base=base),
            FINETUNE_DEFAULTS,
        )
    cfg = dataclasses.replace(cfg, block_size=min(cfg.block_size, model.max_seq_len))
    cfg = with_overrides(with_overrides(cfg, file_values), overrides or {})
    return cfg.validate()
