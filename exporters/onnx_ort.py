"""The ONNX Runtime flavour of the engine graph (contract 2), built node by node from the weights.

Like onnxruntime-genai's model builder, the graph is written directly (exporters/graph_builder.py)
rather than traced: ORT's fused contrib ops (domain com.microsoft) replace whole subgraphs that an
exporter would otherwise emit and ORT would have to pattern-match back together.

Graph contract: the inputs, outputs and metadata of engine/graph.py, in float32, flavour "ort";
the cache length is the symbolic `kv_len` (a runner allocates up to max_len positions).

A 16-bit cache (`kv_dtype="float16"`, the onnx-*-kv16 targets): past/present in float16, half
the bytes per cached position. GroupQueryAttention takes q, k, v and the cos/sin tables in the
cache's type, so q|k|v is cast to float16 before each attention and its output back to float32
after; everything else stays float32. The metadata states it (aimass.kv_dtype).

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
symmetric RTN); the embedding Gather stays fp32. A checkpoint that carries a GGUF file's own
blocks is quantized from them instead (exporters/gguf_blocks.py, which replaces the MatMuls
`matmul_weights` names). `save` always writes the weights to a
`<name>.data` file next to the graph so that every size of model has the same two-file layout
(protobuf cannot hold more than 2 GB in one message).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from engine import graph
from exporters.graph_builder import GraphBuilder, graph_metadata
from trainer.config import ModelConfig
from trainer.model import Transformer, rope_cos_sin

OPSET = 21
# GroupQueryAttention and SkipSimplifiedLayerNormalization; SimplifiedLayerNormalization is
# registered by ORT in the default ONNX domain
MS_DOMAIN = "com.microsoft"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


EMBEDDING = "embed_tokens.weight"  # the Gather's table: the same name in graph and checkpoint


def matmul_weights(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each MatMul's constant right-hand side (in, sum of outs) → the checkpoint weights (out, in)
    it stacks, in order. The builder takes its weights from here, and so does any rewrite that
    replaces them (exporters/gguf_blocks.py)."""
    table = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        table[f"{p}.qkv_proj.weight"] = tuple(
            f"{p}.self_attn.{x}_proj.weight" for x in ("q", "k", "v")
        )
        table[f"{p}.o_proj.weight"] = (f"{p}.self_attn.o_proj.weight",)
        table[f"{p}.gate_up_proj.weight"] = (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight")
        table[f"{p}.down_proj.weight"] = (f"{p}.mlp.down_proj.weight",)
    # a tied head is a copy of the embedding in (in, out) order
    table["lm_head.weight"] = (EMBEDDING if cfg.tie_embeddings else "lm_head.weight",)
    return table


def _matmul(g: GraphBuilder, model: Transformer, x: str, weight: str, out: str) -> str:
    """x @ the stacked weights `weight` stands for (matmul_weights), as one MatMul."""
    sources = matmul_weights(model.cfg)[weight]
    w = np.concatenate([_np(model.get_parameter(n)).T for n in sources], axis=1)
    return g.op("MatMul", x, g.const(weight, w), outputs=[out], name=weight.removesuffix(".weight"))


def build_ort_graph(model: Transformer, max_len: int, kv_dtype: str = "float32") -> onnx.ModelProto:
    """The fp32 engine graph of `model`, for positions < `max_len`, its cache in `kv_dtype`
    (graph.KV_DTYPES; see the module docstring)."""
    cfg = model.cfg
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1")
    if kv_dtype not in graph.KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} must be one of {', '.join(graph.KV_DTYPES)}")
    g = GraphBuilder()
    # the KV length is symbolic: a runner may allocate fewer positions than the rotary tables
    # hold (max_len), e.g. to serve short contexts in less memory
    g.declare_io(
        n_layers=cfg.n_layers,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        kv_len=graph.KV_LEN,
        vocab_size=cfg.vocab_size,
    )
    kv_np = np.dtype(kv_dtype)
    _set_cache_type(g, helper.np_dtype_to_tensor_dtype(kv_np))

    # rotary tables computed exactly as trainer.model does (fp32), the half width GQA wants,
    # in the cache's type (GQA takes them in the type of q, k and v)
    cos, sin = rope_cos_sin(torch.arange(max_len), cfg.head_dim, cfg.rope_theta)  # (M, hd)
    g.const("cos_cache", _np(cos[:, : cfg.head_dim // 2]).astype(kv_np))
    g.const("sin_cache", _np(sin[:, : cfg.head_dim // 2]).astype(kv_np))
    g.const(EMBEDDING, _np(model.embed_tokens.weight))
    x = g.op("Gather", EMBEDDING, graph.INPUT_IDS, outputs=["embeds"], name="embed")
    # (B, S, D)

    # residual adds are fused into the next norm: block i's MLP output and the running sum
    # enter block i+1's SkipSimplifiedLayerNormalization, which returns both norm and new sum
    residual, pending = x, None
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        w = g.const(f"{p}.input_layernorm.weight", _np(layer.input_layernorm.weight))
        if pending is None:
            h = g.op(
                "SimplifiedLayerNormalization",
                x,
                w,
                outputs=[f"{p}.ln1"],
                name=f"{p}.ln1",
                epsilon=cfg.norm_eps,
            )
        else:
            h, residual = _skip_norm(g, pending, residual, w, f"{p}.ln1", cfg.norm_eps)
        attn_out = _attention(g, model, h, i, kv_dtype)
        w = g.const(
            f"{p}.post_attention_layernorm.weight", _np(layer.post_attention_layernorm.weight)
        )
        h, residual = _skip_norm(g, attn_out, residual, w, f"{p}.ln2", cfg.norm_eps)
        pending = _mlp(g, model, h, p)

    w = g.const("norm.weight", _np(model.norm.weight))
    h, _ = _skip_norm(g, pending, residual, w, "norm", cfg.norm_eps, want_sum=False)
    # only the asked-for tokens reach the lm_head: a 512-token prefill computes one row of logits
    g.const("hidden_2d_shape", np.array([-1, cfg.dim], dtype=np.int64))
    flat = g.op("Reshape", h, "hidden_2d_shape", outputs=["hidden_flat"], name="flatten")
    # (B*S, D) → (N, D)
    picked = g.op("Gather", flat, graph.LOGITS_IDX, outputs=["hidden_picked"], name="pick", axis=0)
    _matmul(g, model, picked, "lm_head.weight", graph.LOGITS)  # (N, V); (D, V) a copy when tied

    return g.model(
        "aimass-ort",
        [("", OPSET), (MS_DOMAIN, 1)],
        "aimass.exporters.onnx_ort",
        replace(graph_metadata(cfg, graph.ORT, max_len, "float32"), kv_dtype=kv_dtype),
        ir_version=10,  # ORT 1.20+ reads IR 10; onnx's default may be newer than ORT
    )


def _set_cache_type(g: GraphBuilder, elem_type: int) -> None:
    """The past and present tensors declared by declare_io (in the activations' float32),
    retyped to the cache's type."""
    for value in (*g.inputs, *g.outputs):
        if value.name.startswith((graph.PAST + "_", graph.PRESENT + "_")):
            value.type.tensor_type.elem_type = elem_type


def _attention(g: GraphBuilder, model: Transformer, h: str, i: int, kv_dtype: str) -> str:
    """One fused q|k|v MatMul, GroupQueryAttention (rotary inside, KV appended in place), o.
    GQA takes q, k and v in the cache's type: a 16-bit cache puts a Cast on either side."""
    p, cfg = f"layers.{i}", model.cfg
    qkv = _matmul(g, model, h, f"{p}.qkv_proj.weight", f"{p}.qkv")  # (B, S, (H+2K)*hd)
    half = kv_dtype != "float32"
    if half:
        to = helper.np_dtype_to_tensor_dtype(np.dtype(kv_dtype))
        qkv = g.op("Cast", qkv, outputs=[f"{p}.qkv_half"], name=f"{p}.qkv_cast", to=to)
    y, _, _ = g.op(
        "GroupQueryAttention",
        qkv,
        "",
        "",
        graph.past_name(graph.KEY, i),
        graph.past_name(graph.VALUE, i),
        graph.SEQLENS_K,
        graph.TOTAL_SEQUENCE_LENGTH,
        "cos_cache",
        "sin_cache",
        graph.POSITION_IDS,
        outputs=[
            f"{p}.attn_half" if half else f"{p}.attn",
            graph.present_name(graph.KEY, i),
            graph.present_name(graph.VALUE, i),
        ],
        name=f"{p}.attn",
        domain=MS_DOMAIN,
        num_heads=cfg.n_heads,
        kv_num_heads=cfg.n_kv_heads,
        do_rotary=1,
        rotary_interleaved=0,  # "rotate half", as trainer.model and HF LLaMA
    )  # (B, S, H * hd)
    if half:
        y = g.op("Cast", y, outputs=[f"{p}.attn"], name=f"{p}.attn_cast", to=TensorProto.FLOAT)
    return _matmul(g, model, y, f"{p}.o_proj.weight", f"{p}.attn_out")  # (B, S, D)


def _mlp(g: GraphBuilder, model: Transformer, h: str, p: str) -> str:
    """SwiGLU: one fused gate|up MatMul, silu(gate) * up, down. ORT fuses x * Sigmoid(x) into
    its QuickGelu kernel (alpha 1)."""
    gu = _matmul(g, model, h, f"{p}.gate_up_proj.weight", f"{p}.gate_up")  # (B, S, 2F)
    gate, up = g.op(
        "Split", gu, outputs=[f"{p}.gate", f"{p}.up"], name=f"{p}.split", axis=-1, num_outputs=2
    )
    sig = g.op("Sigmoid", gate, outputs=[f"{p}.sig"], name=f"{p}.sigmoid")
    silu = g.op("Mul", gate, sig, outputs=[f"{p}.silu"], name=f"{p}.silu")
    swiglu = g.op("Mul", silu, up, outputs=[f"{p}.swiglu"], name=f"{p}.swiglu")  # (B, S, F)
    return _matmul(g, model, swiglu, f"{p}.down_proj.weight", f"{p}.mlp_out")  # (B, S, D)


def _skip_norm(
    g: GraphBuilder, x: str, residual: str, weight: str, name: str, eps: float, want_sum=True
):
    """RMSNorm(x + residual) and the sum itself (the next residual), in one fused op."""
    outs = [f"{name}", "", "", f"{name}.residual" if want_sum else ""]
    g.op(
        "SkipSimplifiedLayerNormalization",
        x,
        residual,
        weight,
        outputs=outs,
        name=name,
        domain=MS_DOMAIN,
        epsilon=eps,
    )
    return outs[0], outs[3]


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
    # onnxruntime.quantization: heavy (it imports sympy and more), needed by quantized targets only
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
