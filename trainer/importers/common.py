"""What every importer shares: the output-folder rule and the final write.

An importer reads its source into plain data (a ModelConfig, a state dict under our names, a
Tokenizer) and checks it completely before `write_imported` writes anything, so a refused or
broken source never leaves a folder behind; the write itself is atomic (`write_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.checkpoint import BlockWeight, load_state, write_checkpoint
from trainer.config import ModelConfig
from trainer.errors import CheckpointError, ConfigError
from trainer.model import Transformer
from trainer.tokenizer import Tokenizer

# Tokens that end a turn in common chat formats. llama.cpp treats these as end-of-generation
# whenever a vocabulary has them (llama-vocab.cpp, "special_eog_ids"), whatever the file says
# its EOS is, so a chat model stops at the end of its turn and not only at end of document.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


def check_out_dir(out_dir: str | Path) -> Path:
    """Refuses an output folder that already holds something: an import never overwrites."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(
            f"output folder {out_dir} already exists and is not empty; choose a new one"
        )
    return out_dir


def validated(cfg: ModelConfig, source: Path) -> ModelConfig:
    try:
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: unsupported model shape: {e}") from None


def write_imported(
    out_dir: Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    lineage: dict,
    source: Path,
    blocks: dict[str, BlockWeight] | None = None,
) -> Path:
    """Loads `state` (our parameter names) into a fresh model, checking every name and shape,
    then writes the checkpoint. A tied model's state carries no lm_head.weight. `blocks`: the
    quantized form of some weights, as the source stores them (each the exact source of its
    fp32 weight in `state`)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{cfg.vocab_size} embeddings"
        )
    model = Transformer(cfg)
    load_state(model, {k: v.float() for k, v in state.items()}, source)
    meta = {"step": 0, "lineage": lineage}
    for name, b in (blocks or {}).items():
        if name not in state or tuple(state[name].shape) != b.shape:
            raise CheckpointError(
                f"{source}: the blocks of {name} hold shape {b.shape}, the weight "
                f"{tuple(state[name].shape) if name in state else 'is missing'}"
            )
    return write_checkpoint(out_dir, model, tokenizer, meta, blocks=blocks)
