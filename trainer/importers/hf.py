"""Import a local Hugging Face LLaMA folder (config.json, *.safetensors, tokenizer files).

Our parameter names are HF's without the "model." prefix and the rotary convention is the same,
so the weights load unchanged. What our model cannot represent (attention or MLP biases, RoPE
scaling, a head_dim other than hidden_size / heads, quantized weights) is refused by name rather
than silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as _Tokenizer

from aimass_common.files import sha256_file
from trainer.config import ModelConfig
from trainer.errors import CheckpointError
from trainer.importers.common import END_OF_TURN_TOKENS, check_out_dir, validated, write_imported
from trainer.tokenizer import Tokenizer

# Buffers that some transformers versions saved with the weights; recomputed from the config.
_IGNORED_TENSORS = ("rotary_emb.inv_freq",)


def import_hf(folder: str | Path, out_dir: str | Path) -> Path:
    """Converts a local HF LLaMA checkpoint folder into a checkpoint at `out_dir`; returns it."""
    folder = Path(folder)
    out_dir = check_out_dir(out_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    config = _read_json(folder / "config.json", required=True)
    cfg = _model_config(config, folder)
    files = _weight_files(folder)
    tokenizer = _tokenizer(folder, config)
    state = _weights(files, cfg)
    lineage = {
        "base_model": config.get("_name_or_path") or folder.resolve().name,
        "source": "hf",
        "source_files_sha256": {f.name: sha256_file(f) for f in files},
    }
    return write_imported(out_dir, cfg, state, tokenizer, lineage, folder)


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointError(
                f"{path.parent} is not a Hugging Face model folder: {path.name} is missing"
            )
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _model_config(config: dict[str, Any], folder: Path) -> ModelConfig:
    where = f"{folder}/config.json"
    model_type, archs = (
        config.get("model_type"),
        config.get("architectures") or ["LlamaForCausalLM"],
    )
    if model_type != "llama" or "LlamaForCausalLM" not in archs:
        raise CheckpointError(
            f"{where}: model_type={model_type!r}, architectures={archs} is not supported; "
            "only LLaMA (model_type 'llama', LlamaForCausalLM) imports"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported (our LLaMA has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{where}: hidden_act={config['hidden_act']!r} is not supported; only 'silu'"
        )
    if config.get("quantization_config"):
        raise CheckpointError(
            f"{where}: quantized weights are not supported; import the unquantized model"
        )
    # transformers ≥ 5 writes rope_parameters {"rope_type", "rope_theta"}; older ones rope_theta
    # plus an optional rope_scaling dict
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"{where}: RoPE scaling {rope_type!r} is not supported; only the default RoPE"
        )
    missing = [
        k
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if k not in config
    ]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}")
    n_heads = config["num_attention_heads"]
    cfg = validated(
        ModelConfig(
            # defaults below are LlamaConfig's, for keys an older config.json leaves out
            vocab_size=config.get("vocab_size", 32000),
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            ffn_dim=config["intermediate_size"],
            max_seq_len=config.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        ),
        folder,
    )
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise CheckpointError(
            f"{where}: head_dim={head_dim} differs from hidden_size / num_attention_heads = {cfg.head_dim}; unsupported"
        )
    return cfg


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif any(folder.glob("*.bin")):
        # pickle files can run code when loaded; we only read safetensors
        raise CheckpointError(
            f"{folder} has only PyTorch .bin weights; convert them to safetensors first"
        )
    else:
        raise CheckpointError(
            f"{folder} has no model.safetensors (or model.safetensors.index.json)"
        )
    absent = [f.name for f in files if not f.is_file()]
    if absent or not files:
        raise CheckpointError(f"{folder}: weight shards listed in the index are missing: {absent}")
    return files


def _weights(files: list[Path], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            shard = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read as safetensors: {e}") from None
        for name, tensor in shard.items():
            if name.endswith(_IGNORED_TENSORS):
                continue
            state[name.removeprefix("model.")] = tensor
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # a tied head, when saved at all, is the embedding
    return state


def _tokenizer(folder: Path, config: dict[str, Any]) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no tokenizer.json (slow-only tokenizers are not supported)"
        )
    try:
        tok = _Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid tokenizer: {e}") from None
    tok_cfg = {
        **_read_json(folder / "special_tokens_map.json"),
        **_read_json(folder / "tokenizer_config.json"),
    }

    def role(name: str) -> str | None:
        value = tok_cfg.get(f"{name}_token")
        if isinstance(value, dict):  # transformers may store {"content": "...", "lstrip": ...}
            value = value.get("content")
        if value is None and isinstance(config.get(f"{name}_token_id"), int):
            value = tok.id_to_token(config[f"{name}_token_id"])
        return value

    eos = role("eos")
    if eos is None:
        raise CheckpointError(f"{folder}: no EOS token in tokenizer_config.json or config.json")
    generation = _read_json(folder / "generation_config.json").get("eos_token_id")
    stop_ids = generation if isinstance(generation, list) else [generation]
    stops = [tok.id_to_token(i) for i in stop_ids if isinstance(i, int)]
    stops += [t for t in END_OF_TURN_TOKENS if tok.token_to_id(t) is not None]
    return Tokenizer(
        tok,
        eos_token=eos,
        bos_token=role("bos"),
        pad_token=role("pad"),
        chat_template=_chat_template(folder, tok_cfg),
        stop_tokens=[t for t in stops if t is not None],
    )


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    # transformers ≥ 4.49 writes the template to its own file; older ones inline it, possibly as
    # a list of named templates
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template") or _read_json(folder / "chat_template.json").get(
        "chat_template"
    )
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template
