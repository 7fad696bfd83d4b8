"""The portable engine graph: the decoder as standard ONNX ops (opset 17, default domain only),
built straight from the weights so TensorRT and any ONNX runtime accept it.

I/O contract: the inputs, outputs and metadata of engine/graph.py, flavour "portable"; the
cache holds a fixed M = max_len positions per row, in the graph's dtype (float32 or float16).

The cache is never concatenated: each new key/value is scattered into its row at its position,
so `present` differs from `past` only at the positions written, and a runtime may bind both to
one buffer (TensorRT: the same device address; ONNX Runtime: the same OrtValue in IO binding).
`past` is read by exactly two nodes per tensor, a GatherElements feeding the ScatterElements,
so every read of the old buffer happens before the write.

    row b:  [ 0 .. past .. seqlens_k[b] | free .............. M-1 ]
                      ^ this step's tokens land at position_ids[b]

Padding. A token is real iff position_ids[b, s] <= seqlens_k[b]; the others are padding. A
padding token rewrites the value already in slot seqlens_k[b] + 1 (slot 0 when the row is full),
a slot no real token of this step writes, so padding never changes the cache, whatever position
the runtime gave it. Key j is visible to a query at position p of row b iff j <= p and
j <= seqlens_k[b], so padding keys are never read; padding queries get logits nobody asks for.
An idle batch slot is a row of padding with seqlens_k = -1: its cache is untouched and, since
masked scores are a finite constant, its softmax is uniform rather than NaN. S must not exceed M.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto

from engine import graph
from exporters.graph_builder import GraphBuilder, graph_metadata
from trainer.model import Transformer, rope_cos_sin

OPSET = 17
# dtype of the weights, activations and cache -> ONNX element type. Norms, rotary and softmax
# always run in float32, as in the eager model under autocast.
DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
# A masked score: finite, so a row with nothing visible softmaxes to uniform instead of NaN.
MASKED = -1e9


def build_portable_graph(
    model: Transformer, max_len: int, *, dtype: str = "float32"
) -> onnx.ModelProto:
    """The decoder with a `max_len`-slot cache as a standard-op ONNX graph (see the module doc).

    `dtype` sets the weights, activations and cache; float16 is what a TensorRT fp16 engine is
    built from (TensorRT 11 takes precision from the graph: strongly typed networks only).
    """
    cfg = model.cfg
    if not 1 <= max_len <= cfg.max_seq_len:
        raise ValueError(
            f"max_len={max_len} must be between 1 and the model's max_seq_len={cfg.max_seq_len}"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
    g = GraphBuilder(DTYPES[dtype])
    g.declare_io(
        n_layers=cfg.n_layers,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        kv_len=max_len,
        vocab_size=cfg.vocab_size,
    )
    _add_weights(g, model, max_len, np.dtype(dtype))
    ctx = _prologue(g, cfg, max_len)
    flat_ids = g.op("Reshape", graph.INPUT_IDS, g.ints(-1))
    x = g.op("Gather", "embed_tokens.weight", flat_ids)  # (T, D)
    for i in range(cfg.n_layers):
        g.scope = f"layers.{i}"
        x = _block(g, cfg, i, x, ctx, max_len)
    g.scope = "head"
    # pick the rows first: a 512-token prefill asking for one row computes one row of logits
    x = g.op("Gather", x, graph.LOGITS_IDX, axis=0)  # (N, D)
    x = _rms_norm(g, x, "norm.weight", cfg.norm_eps)
    head = "embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    if g.dtype == TensorProto.FLOAT:
        g.op("Gemm", x, head, transB=1, outputs=[graph.LOGITS])  # (N, V)
    else:
        logits = g.op("Gemm", x, head, transB=1)
        g.op("Cast", logits, to=TensorProto.FLOAT, outputs=[graph.LOGITS])

    return g.model(
        "aimass_decoder",
        [("", OPSET)],
        "aimass.exporters",
        graph_metadata(cfg, graph.PORTABLE, max_len, dtype),
    )


def _add_weights(g: GraphBuilder, model: Transformer, max_len: int, dtype: np.dtype) -> None:
    """Initializers in the checkpoint's [out, in] layout (every linear is a Gemm with transB), with
    q/k/v and gate/up fused so a decode step launches one matmul for each pair of them."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu().numpy().astype(dtype) for k, v in model.state_dict().items()}
    g.const("embed_tokens.weight", sd["embed_tokens.weight"])
    if not cfg.tie_embeddings:
        g.const("lm_head.weight", sd["lm_head.weight"])
    g.const("norm.weight", sd["norm.weight"])
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        qkv = [sd[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"]
        g.const(f"{p}self_attn.qkv_proj.weight", np.concatenate(qkv))
        g.const(f"{p}self_attn.o_proj.weight", sd[f"{p}self_attn.o_proj.weight"])
        gate_up = [sd[f"{p}mlp.{n}_proj.weight"] for n in ("gate", "up")]
        g.const(f"{p}mlp.gate_up_proj.weight", np.concatenate(gate_up))
        g.const(f"{p}mlp.down_proj.weight", sd[f"{p}mlp.down_proj.weight"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            g.const(f"{p}{norm}.weight", sd[f"{p}{norm}.weight"])
    # the eager model's own tables, so rotary matches it bit for bit
    cos, sin = rope_cos_sin(torch.arange(max_len), cfg.head_dim, cfg.rope_theta)  # (M, hd)
    g.const("rope.cos", cos.numpy())
    g.const("rope.sin", sin.numpy())
    g.const("key_positions", np.arange(max_len, dtype=np.int64).reshape(1, 1, max_len))


def _prologue(g: GraphBuilder, cfg, max_len: int) -> dict[str, str]:
    """What every layer shares: rotary tables, cache write indices and the attention mask."""
    bs = g.op("Shape", graph.INPUT_IDS)  # [B, S]
    batch, seq = g.op("Gather", bs, g.ints(0)), g.op("Gather", bs, g.ints(1))
    # padding may carry positions past the buffer; its rotary values are never used
    pos = g.op("Min", graph.POSITION_IDS, g.ints(max_len - 1))
    cos = g.op("Unsqueeze", g.op("Gather", "rope.cos", pos), g.ints(1))  # (B, 1, S, hd)
    sin = g.op("Unsqueeze", g.op("Gather", "rope.sin", pos), g.ints(1))
    seqlens = g.op("Cast", graph.SEQLENS_K, to=TensorProto.INT64)
    last = g.op("Unsqueeze", seqlens, g.ints(1))  # (B, 1)
    real = g.op("Not", g.op("Greater", graph.POSITION_IDS, last))  # (B, S)
    # padding rewrites slot last+1 (0 for a full row) with its own value: no real token of this
    # step writes there, so duplicate indices only ever carry identical values
    spare = g.op("Add", last, g.ints(1))
    spare = g.op("Where", g.op("Less", spare, g.ints(max_len)), spare, g.ints(0))  # (B, 1)
    write = g.op("Where", real, graph.POSITION_IDS, spare)  # (B, S)
    kv_shape = g.op("Concat", batch, g.ints(cfg.n_kv_heads), seq, g.ints(cfg.head_dim), axis=0)
    write = g.op("Expand", g.op("Unsqueeze", write, g.ints(1, 3)), kv_shape)  # (B, K, S, hd)
    # key j is visible to the query at position p of row b iff j <= p and j <= seqlens_k[b]
    keys = "key_positions"  # (1, 1, M)
    visible = g.op(
        "And",
        g.op("Not", g.op("Greater", keys, g.op("Unsqueeze", graph.POSITION_IDS, g.ints(2)))),
        g.op("Not", g.op("Greater", keys, g.op("Unsqueeze", last, g.ints(2)))),
    )  # (B, S, M)
    # redundant while seqlens_k is right; it keeps the ORT flavour's input in use, so that every
    # runtime binds the same names
    total = g.op("Cast", graph.TOTAL_SEQUENCE_LENGTH, to=TensorProto.INT64)
    visible = g.op("And", visible, g.op("Less", keys, total))
    return {
        "cos": cos,
        "sin": sin,
        "write": write,
        "real": g.op("Unsqueeze", real, g.ints(1, 3)),  # (B, 1, S, 1)
        "visible": g.op("Unsqueeze", visible, g.ints(1, 2)),  # (B, 1, 1, S, M)
        "bs": bs,
    }


def _block(g: GraphBuilder, cfg, i: int, x: str, ctx: dict[str, str], max_len: int) -> str:
    p = f"layers.{i}."
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = _rms_norm(g, x, f"{p}input_layernorm.weight", cfg.norm_eps)
    qkv = g.op("Gemm", h, f"{p}self_attn.qkv_proj.weight", transB=1)  # (T, (H + 2K) * hd)
    q, k, v = g.op("Split", qkv, g.ints(H * hd, K * hd, K * hd), axis=1, outputs=3)
    q = _rope(g, _heads(g, q, H, hd, ctx["bs"]), ctx)  # (B, H, S, hd)
    k = _rope(g, _heads(g, k, K, hd, ctx["bs"]), ctx)  # (B, K, S, hd)
    v = _heads(g, v, K, hd, ctx["bs"])
    keys = _write_cache(g, graph.KEY, i, k, ctx)  # (B, K, M, hd)
    values = _write_cache(g, graph.VALUE, i, v, ctx)
    y = _attention(g, cfg, q, keys, values, ctx["visible"], max_len)  # (T, H * hd)
    x = g.op("Add", x, g.op("Gemm", y, f"{p}self_attn.o_proj.weight", transB=1))
    h = _rms_norm(g, x, f"{p}post_attention_layernorm.weight", cfg.norm_eps)
    gate, up = g.op(
        "Split",
        g.op("Gemm", h, f"{p}mlp.gate_up_proj.weight", transB=1),
        g.ints(cfg.ffn_dim, cfg.ffn_dim),
        axis=1,
        outputs=2,
    )
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # SwiGLU: silu(gate) * up
    return g.op("Add", x, g.op("Gemm", act, f"{p}mlp.down_proj.weight", transB=1))


def _heads(g: GraphBuilder, x: str, n: int, hd: int, bs: str) -> str:
    """(T, n * hd) -> (B, n, S, hd)."""
    shape = g.op("Concat", bs, g.ints(n, hd), axis=0)
    return g.op("Transpose", g.op("Reshape", x, shape), perm=[0, 2, 1, 3])


def _rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    # float32 inside, like the eager RMSNorm: the mean of squares overflows in fp16
    xf = g.to_float(x)
    ms = g.op("ReduceMean", g.op("Mul", xf, xf), axes=[-1])
    eps_c = g.scalar(eps, TensorProto.FLOAT)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, eps_c)))
    return g.op("Mul", g.from_float(g.op("Mul", xf, inv)), weight)


def _rope(g: GraphBuilder, x: str, ctx: dict[str, str]) -> str:
    """Rotary embedding of (B, heads, S, hd), "rotate half" and in float32 as the eager model."""
    xf = g.to_float(x)
    x1, x2 = g.op("Split", xf, outputs=2, axis=3)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=3)
    out = g.op("Add", g.op("Mul", xf, ctx["cos"]), g.op("Mul", rotated, ctx["sin"]))
    return g.from_float(out)


def _write_cache(g: GraphBuilder, kind: str, i: int, new: str, ctx: dict[str, str]) -> str:
    """Scatters this step's (B, K, S, hd) into layer i's (B, K, M, hd) buffer of `kind`;
    padding writes back what is already there."""
    past, present = graph.past_name(kind, i), graph.present_name(kind, i)
    old = g.op("GatherElements", past, ctx["write"], axis=2)
    update = g.op("Where", ctx["real"], new, old)
    return g.op("ScatterElements", past, ctx["write"], update, axis=2, outputs=[present])


def _attention(g: GraphBuilder, cfg, q: str, keys: str, values: str, visible: str, M: int) -> str:
    """Masked attention of (B, H, S, hd) queries over the whole buffer -> (T, H * hd).

    Grouped-query attention folds the H/K query heads of each kv head into the row axis instead
    of repeating the cache: decode is bound by reading the cache, and Expand would copy it H/K
    times.
    """
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    scale = g.scalar(hd**-0.5)
    q = g.op("Reshape", g.op("Mul", q, scale), g.ints(0, K, -1, hd))  # (B, K, H/K*S, hd)
    scores = g.op("MatMul", q, g.op("Transpose", keys, perm=[0, 1, 3, 2]))  # (B, K, H/K*S, M)
    scores = g.op("Reshape", g.to_float(scores), g.ints(0, K, H // K, -1, M))  # (B, K, H/K, S, M)
    # softmax in float32 even in an fp16 graph, as PyTorch's fused attention does
    masked = g.op("Where", visible, scores, g.scalar(MASKED, TensorProto.FLOAT))
    probs = g.op("Softmax", masked, axis=-1)
    probs = g.op("Reshape", g.from_float(probs), g.ints(0, K, -1, M))  # (B, K, H/K*S, M)
    y = g.op("MatMul", probs, values)  # (B, K, H/K*S, hd)
    y = g.op("Transpose", g.op("Reshape", y, g.ints(0, H, -1, hd)), perm=[0, 2, 1, 3])
    return g.op("Reshape", y, g.ints(-1, H * hd))  # (B, S, H, hd) -> (T, H * hd)
