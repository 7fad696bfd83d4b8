"""Import a LLaMA-family GGUF file (llama.cpp's format) as a checkpoint.

Every tensor is dequantized to fp32 (Q4_1, Q8_0, F16, ... through `gguf.quants`), renamed to
our HF-style names, and the query/key rows are put back in Hugging Face order (see
`_unpermute`). A weight in Q4_0, Q4_1 or Q8_0 is also kept as its blocks (the checkpoint's
quantized.safetensors, trainer.checkpoint.BlockWeight), rows in the same order: a block runs
along a row, so moving whole rows keeps every block intact. Exporters build a quantized target
from those blocks rather than quantizing the fp32 weights again. Other types (K-quants, Q5_*,
F16, ...) are kept as fp32 only. The tokenizer is rebuilt from the vocabulary and merges in the metadata, with the
pre-tokenizer that llama.cpp uses for the file's `tokenizer.ggml.pre`.

    blk.N.attn_q.weight       → layers.N.self_attn.q_proj.weight   (rows un-permuted)
    blk.N.attn_k.weight       → layers.N.self_attn.k_proj.weight   (rows un-permuted)
    blk.N.attn_v / attn_output→ layers.N.self_attn.v_proj / o_proj
    blk.N.ffn_gate / up / down→ layers.N.mlp.gate_proj / up_proj / down_proj
    blk.N.attn_norm / ffn_norm→ layers.N.input_layernorm / post_attention_layernorm
    token_embd / output_norm / output → embed_tokens / norm / lm_head (absent: tied)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Tokenizer

from aimass_common.files import sha256_file
from trainer.checkpoint import BLOCK, BlockWeight
from trainer.config import ModelConfig
from trainer.errors import CheckpointError
from trainer.importers.common import END_OF_TURN_TOKENS, check_out_dir, validated, write_imported
from trainer.tokenizer import Tokenizer, bytes_to_unicode

_GLOBAL_TENSORS = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# the GGUF types kept as blocks → our kind, and the byte layout of one block of 32 weights
# (ggml-common.h): fp16 d, then fp16 m for Q4_1, then the codes
_BLOCK_KINDS = {
    GGMLQuantizationType.Q4_0: ("q4_0", 18),
    GGMLQuantizationType.Q4_1: ("q4_1", 20),
    GGMLQuantizationType.Q8_0: ("q8_0", 34),
}

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


def import_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Converts a LLaMA-architecture GGUF file into a checkpoint at `out_dir`; returns it."""
    path = Path(path)
    out_dir = check_out_dir(out_dir)
    reader = _open(path)
    fields = _Fields(reader, path)
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported; only 'llama' GGUF files import"
        )
    tensors = {t.name: t for t in reader.tensors}
    cfg = _model_config(fields, tensors, path)
    # everything that can refuse the file runs before the (slow) dequantization
    names = {name: _our_name(name, path) for name in tensors}
    tokenizer = _tokenizer(fields, path)
    state = {names[name]: _tensor(t, cfg, path) for name, t in tensors.items()}
    blocks = {
        names[name]: _blocks(t, cfg)
        for name, t in tensors.items()
        if t.tensor_type in _BLOCK_KINDS and len(t.shape) == 2
    }
    lineage = {
        "base_model": fields.get("general.name") or path.stem,
        "source": "gguf",
        "source_sha256": sha256_file(path),
    }
    return write_imported(out_dir, cfg, state, tokenizer, lineage, path, blocks)


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(
                f"{path} is not a GGUF file (it does not start with the GGUF magic)"
            )
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on a damaged file
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from None


class _Fields:
    """Typed access to the metadata, with errors that name the key and the file."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def number(self, key: str, kind: type, default=None):
        value = self.get(key, default)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata key {key} is missing")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CheckpointError(
                f"{self.path}: {key}={value!r} is not a single number (per-layer values are unsupported)"
            )
        return kind(value)


def _model_config(fields: _Fields, tensors: dict, path: Path) -> ModelConfig:
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing")
    if fields.get("llama.expert_count", 0):
        raise CheckpointError(f"{path}: mixture-of-experts models are not supported")
    scaling = fields.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: RoPE scaling ({scaling!r} / rope_freqs) is not supported")
    n_heads = fields.number("llama.attention.head_count", int)
    cfg = ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes are (cols, rows)
        dim=fields.number("llama.embedding_length", int),
        n_layers=fields.number("llama.block_count", int),
        n_heads=n_heads,
        n_kv_heads=fields.number("llama.attention.head_count_kv", int, n_heads),
        ffn_dim=fields.number("llama.feed_forward_length", int),
        max_seq_len=fields.number("llama.context_length", int),
        # llama.cpp's default when a file has no freq_base
        rope_theta=_f32(fields.number("llama.rope.freq_base", float, 10000.0)),
        norm_eps=_f32(fields.number("llama.attention.layer_norm_rms_epsilon", float)),
        tie_embeddings="output.weight" not in tensors,
    )
    cfg = validated(cfg, path)
    for key in (
        "llama.rope.dimension_count",
        "llama.attention.key_length",
        "llama.attention.value_length",
    ):
        value = fields.get(key)
        if value is not None and value != cfg.head_dim:
            raise CheckpointError(
                f"{path}: {key}={value} differs from embedding_length / head_count = {cfg.head_dim}; unsupported"
            )
    return cfg


def _f32(value: float) -> float:
    # metadata floats are float32: 1e-5 is stored as 9.99999974e-06; keep the short decimal
    return float(str(np.float32(value)))


def _our_name(name: str, path: Path) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _LAYER_NAME.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_TENSORS:
        raise CheckpointError(
            f"{path}: tensor {name} has no counterpart in a LLaMA model (unsupported variant)"
        )
    return f"layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"


def _tensor(t, cfg: ModelConfig, path: Path) -> torch.Tensor:
    try:
        w = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize"
        ) from None
    # a copy: the reader's arrays are read-only views of the memory-mapped file
    w = np.array(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])  # (rows, cols)
    return torch.from_numpy(np.ascontiguousarray(_our_row_order(w, t.name, cfg)))


def _blocks(t, cfg: ModelConfig) -> BlockWeight:
    """A Q4_0/Q4_1/Q8_0 weight's blocks, split into their fields, rows in our order."""
    kind, size = _BLOCK_KINDS[t.tensor_type]
    rows, cols = int(t.shape[1]), int(t.shape[0])
    raw = np.asarray(t.data).reshape(rows, cols // BLOCK, size)  # (rows, blocks, bytes)

    def half(start: int) -> np.ndarray:
        # (rows, blocks): the fp16 at byte `start` of each block, its bits unchanged
        return np.ascontiguousarray(raw[..., start : start + 2]).view(np.float16)[..., 0]

    if kind == "q4_1":
        d, m, qs = half(0), half(2), raw[..., 4:]
    else:
        d, m, qs = half(0), None, raw[..., 2:]
    if kind == "q8_0":
        qs = qs.view(np.int8)
    fields = [
        _our_row_order(np.array(a), t.name, cfg) if a is not None else None for a in (qs, d, m)
    ]
    return BlockWeight(kind, *fields)


def _our_row_order(w: np.ndarray, gguf_name: str, cfg: ModelConfig) -> np.ndarray:
    if ".attn_q." in gguf_name:
        return _unpermute(w, cfg.n_heads)
    if ".attn_k." in gguf_name:
        return _unpermute(w, cfg.n_kv_heads)
    return w


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes `LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... of each head, Hugging Face rotates
    the two halves (x_i, x_{i+hd/2}). The converter reorders each head's rows so that both give
    the same result: rows [0..hd/2) and [hd/2..hd) are interleaved. We de-interleave them.
    (n_head, 2, hd/2, D) --swap--> (n_head, hd/2, 2, D) is the converter; this is its inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The split applied before byte-level BPE, per `tokenizer.ggml.pre` (llama.cpp llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split():
    # every number code point on its own (llama.cpp's first regex, "\p{N}"), then GPT-2's split;
    # the same as the Digits + ByteLevel sequence in SmolLM2's and StarCoder's tokenizer.json
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def _llama3_split():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_PRE_TOKENIZERS = {
    "default": _gpt2_split,
    "gpt2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "starcoder": _digits_then_gpt2_split,
    "refact": _digits_then_gpt2_split,
    "codeshell": _digits_then_gpt2_split,
    "llama-bpe": _llama3_split,
    "smaug-bpe": _llama3_split,
}


def _tokenizer(fields: _Fields, path: Path) -> Tokenizer:
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE ('gpt2') imports"
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}"
        )
    tokens = fields.get("tokenizer.ggml.tokens") or []
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = fields.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")

    # A byte-level vocabulary is written in GPT-2's byte alphabet; a token spelled otherwise is
    # respelled byte by byte, as transformers' GGUF converter does.
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    tok = _Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|>, ...) must match whole and never be split into bytes. One
    # spelled outside the byte alphabet is a llama.cpp mislabel and would grow the vocabulary.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _CONTROL and set(t) <= alphabet
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _USER_DEFINED and t in vocab
        ]
    )

    def token(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eos = token("eos_token_id")
    if eos is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.eos_token_id is missing or out of range")
    ends = [
        token("eot_token_id"),
        token("eom_token_id"),
        *(t for t in END_OF_TURN_TOKENS if t in vocab),
    ]
    return Tokenizer(
        tok,
        eos_token=eos,
        bos_token=token("bos_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=fields.get("tokenizer.chat_template"),
        stop_tokens=[t for t in ends if t is not None],
    )
