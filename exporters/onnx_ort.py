"""The ONNX Runtime flavour of the engine graph (contract 2), built node by node from the weights.

Like onnxruntime-genai's model builder, the graph is written directly with `onnx.helper` rather
than traced: ORT's fused contrib ops (domain com.microsoft) replace whole subgraphs that an
exporter would otherwise emit and ORT would have to pattern-match back together.

Graph contract (fp32; B batch, S new tokens, N logits wanted, L layers, K kv heads, hd head dim,
M the KV buffers' length, chosen by the runner (<= max_len), V vocabulary):

    +---------------------------+---------+-----------------+----------------------------------+
    | input                     | dtype   | shape           | meaning                          |
    +---------------------------+---------+-----------------+----------------------------------+
    | input_ids                 | int64   | [B, S]          | right-padded new tokens per row  |
    | position_ids              | int64   | [B, S]          | absolute position of each token  |
    | seqlens_k                 | int32   | [B]             | row's total length - 1, after    |
    |                           |         |                 | this step (past + real new)      |
    | total_sequence_length     | int32   | []              | max over rows of seqlens_k + 1   |
    | logits_idx                | int64   | [N]             | indices into the flat B*S token  |
    |                           |         |                 | axis whose logits are returned   |
    | past_key_{i}, past_value_i| float32 | [B, K, M, hd]   | KV cache, i in 0..L-1            |
    +---------------------------+---------+-----------------+----------------------------------+
    | output                    |         |                 |                                  |
    +---------------------------+---------+-----------------+----------------------------------+
    | logits                    | float32 | [N, V]          | rows in logits_idx order         |
    | present_key_{i}, ..._value| float32 | [B, K, M, hd]   | the SAME buffers as past_*: bind |
    |                           |         |                 | each present to its past OrtValue|
    +---------------------------+---------+-----------------+----------------------------------+

metadata_props: aimass.model_config (ModelConfig JSON), aimass.max_len (positions < max_len:
the rotary tables' length), aimass.graph_flavour ("ort"), aimass.dtype ("float32").

What GroupQueryAttention (ORT 1.32, CPU) accepts under this contract, proven in
tests/exporters/test_onnx_ort.py. The kernel tells the phases apart by S and
total_sequence_length:

    first prompt   S == total_sequence_length: every row starts empty; rows of different
                   lengths are right-padded, row b's length is seqlens_k[b] + 1.     batched OK
    decode         S == 1: row b appends one token at seqlens_k[b]; rows may be at
                   different positions.                                               batched OK
    later chunk    1 < S < total_sequence_length (chunked prefill on a filled cache):
                   row b writes positions seqlens_k[b]+1-S .. seqlens_k[b].           batch 1 only
                   (ORT raises for B > 1; its newer optional `query_seqlens` input
                   lifts that, but is not part of this contract.)

Positions: rotary runs inside GroupQueryAttention (do_rotary, cos/sin caches of max_len rows) and
follows position_ids, which must be consecutive within a row. In a first prompt the kernel reads
position_ids[0, 0] only and numbers every row from it, so batched first prompts all start at the
same position (0 in practice). Padding tokens are computed and ignored: their logits are never
selected, and the cache slots they fill lie past the row's length, rewritten before being read.

Layer layout (per block; the residual add is fused into the next norm):

    x ─ SimplifiedLayerNorm ─ MatMul(qkv) ─ GroupQueryAttention ─ MatMul(o) ─┐
    │                                                                        │
    └──────────────── SkipSimplifiedLayerNorm (residual sum out) ◄──────────┘
          ─ MatMul(gate|up) ─ Split ─ g*Sigmoid(g)*u ─ MatMul(down) ─ Skip... (next block)

Measured choices (SmolLM2-135M, 2 cores, decode at context 256, blocks alternated between
processes): rotary inside GQA is 3% faster per decode step than two RotaryEmbedding ops before
it, and exact to 1e-7 where RotaryEmbedding gives 5e-6; the fused gate|up MatMul + Split and two
separate MatMuls are equal within noise (kept: fewer nodes); feeding position_ids to GQA costs
nothing measurable against letting it infer positions from seqlens_k.

`quantize` turns the projection and lm_head MatMuls into MatMulNBits (int4 or int8, blockwise,
symmetric RTN); the embedding Gather stays fp32. `save` always writes the weights to a
`<name>.data` file next to the graph so that every size of model has the same two-file layout
(protobuf cannot hold more than 2 GB in one message).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from trainer.config import ModelConfig
from trainer.model import Transformer, rope_cos_sin

# metadata_props, the same keys as the portable flavour's
CONFIG_KEY = "aimass.model_config"  # the ModelConfig as JSON
MAX_LEN_KEY = "aimass.max_len"  # positions < max_len (the rotary tables' length)
FLAVOUR = "ort"
OPSET = 21
MS_DOMAIN = "com.microsoft"


class _Graph:
    """Accumulates nodes, initializers and the graph's inputs and outputs."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> str:
        domain = MS_DOMAIN if op_type in _CONTRIB_OPS else ""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name, domain=domain, **attrs))
        return outputs[0]

    def io(self, kind: str, name: str, dtype: int, shape: list) -> None:
        target = self.inputs if kind == "input" else self.outputs
        target.append(helper.make_tensor_value_info(name, dtype, shape))


# SimplifiedLayerNormalization is registered by ORT in the default ONNX domain, not com.microsoft
_CONTRIB_OPS = {"SkipSimplifiedLayerNormalization", "GroupQueryAttention", "MatMulNBits"}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _linear_t(*layers: torch.nn.Linear) -> np.ndarray:
    """nn.Linear weights (out, in) → one MatMul right-hand side (in, sum of outs)."""
    return np.concatenate([_np(layer.weight).T for layer in layers], axis=1)


def build_ort_graph(model: Transformer, max_len: int) -> onnx.ModelProto:
    """The fp32 engine graph of `model`, for positions < `max_len` (see the module docstring)."""
    cfg = model.cfg
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1")
    g = _Graph()
    g.io("input", "input_ids", TensorProto.INT64, ["B", "S"])
    g.io("input", "position_ids", TensorProto.INT64, ["B", "S"])
    g.io("input", "seqlens_k", TensorProto.INT32, ["B"])
    g.io("input", "total_sequence_length", TensorProto.INT32, [])
    g.io("input", "logits_idx", TensorProto.INT64, ["N"])
    g.io("output", "logits", TensorProto.FLOAT, ["N", cfg.vocab_size])

    # rotary tables computed exactly as trainer.model does (fp32), the half width GQA wants
    cos, sin = rope_cos_sin(torch.arange(max_len), cfg.head_dim, cfg.rope_theta)  # (M, hd)
    g.weight("cos_cache", _np(cos[:, : cfg.head_dim // 2]))
    g.weight("sin_cache", _np(sin[:, : cfg.head_dim // 2]))
    g.weight("embed_tokens.weight", _np(model.embed_tokens.weight))
    x = g.op("Gather", ["embed_tokens.weight", "input_ids"], ["embeds"], "embed")  # (B, S, D)

    # residual adds are fused into the next norm: block i's MLP output and the running sum
    # enter block i+1's SkipSimplifiedLayerNormalization, which returns both norm and new sum
    residual, pending = x, None
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        w = g.weight(f"{p}.input_layernorm.weight", _np(layer.input_layernorm.weight))
        if pending is None:
            eps = cfg.norm_eps
            h = g.op("SimplifiedLayerNormalization", [x, w], [f"{p}.ln1"], f"{p}.ln1", epsilon=eps)
        else:
            h, residual = _skip_norm(g, pending, residual, w, f"{p}.ln1", cfg.norm_eps)
        attn_out = _attention(g, layer.self_attn, h, i, cfg)
        w = g.weight(
            f"{p}.post_attention_layernorm.weight", _np(layer.post_attention_layernorm.weight)
        )
        h, residual = _skip_norm(g, attn_out, residual, w, f"{p}.ln2", cfg.norm_eps)
        pending = _mlp(g, layer.mlp, h, p)

    w = g.weight("norm.weight", _np(model.norm.weight))
    h, _ = _skip_norm(g, pending, residual, w, "norm", cfg.norm_eps, want_sum=False)
    # only the asked-for tokens reach the lm_head: a 512-token prefill computes one row of logits
    g.weight("hidden_2d_shape", np.array([-1, cfg.dim], dtype=np.int64))
    flat = g.op("Reshape", [h, "hidden_2d_shape"], ["hidden_flat"], "flatten")  # (B*S, D)
    picked = g.op("Gather", [flat, "logits_idx"], ["hidden_picked"], "pick", axis=0)  # (N, D)
    w = g.weight("lm_head.weight", _linear_t(model.lm_head))  # (D, V): a copy when tied
    g.op("MatMul", [picked, w], ["logits"], "lm_head")  # (N, V)

    graph = helper.make_graph(g.nodes, "aimass-ort", g.inputs, g.outputs, g.inits)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="aimass.exporters.onnx_ort",
    )
    proto.ir_version = 10  # ORT 1.20+ reads IR 10; onnx's default may be newer than ORT
    meta = {
        CONFIG_KEY: json.dumps(dataclasses.asdict(cfg), sort_keys=True),
        MAX_LEN_KEY: str(max_len),
        "aimass.graph_flavour": FLAVOUR,
        "aimass.dtype": "float32",
    }
    helper.set_model_props(proto, meta)
    return proto


def _attention(g: _Graph, attn, h: str, i: int, cfg: ModelConfig) -> str:
    """One fused q|k|v MatMul, GroupQueryAttention (rotary inside, KV appended in place), o."""
    p = f"layers.{i}"
    # the KV length is symbolic: a runner may allocate fewer positions than the rotary tables
    # hold (max_len), e.g. to serve short contexts in less memory
    kv_shape = ["B", cfg.n_kv_heads, "M", cfg.head_dim]
    for kind in ("key", "value"):
        g.io("input", f"past_{kind}_{i}", TensorProto.FLOAT, kv_shape)
        g.io("output", f"present_{kind}_{i}", TensorProto.FLOAT, kv_shape)
    w = g.weight(f"{p}.qkv_proj.weight", _linear_t(attn.q_proj, attn.k_proj, attn.v_proj))
    qkv = g.op("MatMul", [h, w], [f"{p}.qkv"], f"{p}.qkv_proj")  # (B, S, (H + 2K) * hd)
    gqa_inputs = [qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k"]
    gqa_inputs += ["total_sequence_length", "cos_cache", "sin_cache", "position_ids"]
    y = g.op(
        "GroupQueryAttention",
        gqa_inputs,
        [f"{p}.attn", f"present_key_{i}", f"present_value_{i}"],
        f"{p}.attn",
        num_heads=cfg.n_heads,
        kv_num_heads=cfg.n_kv_heads,
        do_rotary=1,
        rotary_interleaved=0,  # "rotate half", as trainer.model and HF LLaMA
    )  # (B, S, H * hd)
    w = g.weight(f"{p}.o_proj.weight", _linear_t(attn.o_proj))
    return g.op("MatMul", [y, w], [f"{p}.attn_out"], f"{p}.o_proj")  # (B, S, D)


def _mlp(g: _Graph, mlp, h: str, p: str) -> str:
    """SwiGLU: one fused gate|up MatMul, silu(gate) * up, down. ORT fuses x * Sigmoid(x) into
    its QuickGelu kernel (alpha 1)."""
    w = g.weight(f"{p}.gate_up_proj.weight", _linear_t(mlp.gate_proj, mlp.up_proj))
    gu = g.op("MatMul", [h, w], [f"{p}.gate_up"], f"{p}.gate_up_proj")  # (B, S, 2F)
    g.op("Split", [gu], [f"{p}.gate", f"{p}.up"], f"{p}.split", axis=-1, num_outputs=2)
    g.op("Sigmoid", [f"{p}.gate"], [f"{p}.sig"], f"{p}.sigmoid")
    g.op("Mul", [f"{p}.gate", f"{p}.sig"], [f"{p}.silu"], f"{p}.silu")
    g.op("Mul", [f"{p}.silu", f"{p}.up"], [f"{p}.swiglu"], f"{p}.swiglu")  # (B, S, F)
    w = g.weight(f"{p}.down_proj.weight", _linear_t(mlp.down_proj))
    return g.op("MatMul", [f"{p}.swiglu", w], [f"{p}.mlp_out"], f"{p}.down_proj")  # (B, S, D)


def _skip_norm(g: _Graph, x: str, residual: str, weight: str, name: str, eps: float, want_sum=True):
    """RMSNorm(x + residual) and the sum itself (the next residual), in one fused op."""
    outs = [f"{name}", "", "", f"{name}.residual" if want_sum else ""]
    g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], outs, name, epsilon=eps)
    return outs[0], outs[3]


def read_config(proto_or_path: onnx.ModelProto | str | Path) -> tuple[ModelConfig, int]:
    """The ModelConfig and max_len stored in a graph built by `build_ort_graph`."""
    proto = proto_or_path
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(proto_or_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    cfg = ModelConfig(**json.loads(props[CONFIG_KEY]))
    return cfg, int(props[MAX_LEN_KEY])


def quantize(
    proto: onnx.ModelProto, bits: int = 4, block_size: int = 32, accuracy_level: int = 4
) -> onnx.ModelProto:
    """Every MatMul with a constant weight (q|k|v, o, gate|up, down, lm_head) → MatMulNBits:
    blockwise symmetric round-to-nearest along K, `bits` 4 or 8. The embedding Gather stays fp32.

    K need not be a multiple of block_size: the quantizer zero-pads the last block (k_blocks =
    ceil(K / block_size)) and the padded weights contribute nothing. accuracy_level 4 lets the
    CPU kernel quantize activations to int8 per block, its fastest path. The input is not
    modified (the quantizer edits a copy).

    Quality on SmolLM2-135M (512 tokens of the demo corpus; perplexity, top-1 agreement with
    fp32): fp32 16.48; int8 16.56, 95%; int4 20.63, 67% (onnxruntime-genai's int4, which also
    quantizes the embedding: 20.88). Block 16 gives int4 19.29, an int8 lm_head 19.87; ORT's HQQ
    gives 17.5 but its float zero points run 25x slower on the CPU kernel.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # the module calls logging.basicConfig(level=INFO) on import and logs every node at INFO
    root.setLevel(level)
    root.handlers[:] = handlers
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} must be 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two >= 16")
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    quantizer = MatMulNBitsQuantizer(
        work,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return quantizer.model.model


def save(proto: onnx.ModelProto, path: str | Path) -> list[Path]:
    """Writes PATH (the graph) and PATH.data (every weight of 1 KiB or more) and returns both
    paths. Always two files, whatever the size: one layout for the package to list, and a graph
    file that stays small enough to read without loading the weights. `proto` is not modified."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # onnx.save moves the weights out of the proto it is given
    onnx.save_model(copy, path, save_as_external_data=True, location=data.name, size_threshold=1024)
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates the data file 0600, unlike the graph
    return [path, data]
