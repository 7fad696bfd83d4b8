"""A quantized ONNX Runtime graph from a checkpoint's own blocks (a GGUF file's Q4_0, Q4_1 and
Q8_0, trainer.checkpoint.BlockWeight), reproduced exactly instead of quantized a second time.

Every block format is MatMulNBits (B packed (N, K/32, 32·bits/8), per-block float scales, no
zero_points input, so its default zero point 2^(bits-1) applies) plus, for Q4_1, its per-block
minimum as a product 1/32 the size:

    Q4_0   w = d·(q − 8)             MatMulNBits bits=4, scale d
    Q8_0   w = d·q, q int8           MatMulNBits bits=8, codes q + 128, scale d
    Q4_1   w = d·q + m, q in 0..15   = d·(q − 8) + (m + 8d): MatMulNBits bits=4, scale d,
                                       + (x @ S) @ M'   S (K, K/32): 1 where input k is in block b
                                                        M' (K/32, N): m + 8d of block b, row n
    embedding (Q8_0)                 GatherBlockQuantized bits=8, codes q + 128, scale d

Writing Q4_1 about zero point 8 rather than 0 keeps the codes centred, as in Q4_0: MatMulNBits
takes its symmetric path (no zero_points input, the same kernel as round-to-nearest int4), and
with accuracy_level 4 (int8 activations) its error is that of Q4_0 instead of twice it. x @ S
sums each block of x in one MatMul whatever the rank of x (a ReduceSum needs x reshaped to
(…, K/32, 32) first: one more node per projection). Float zero points (−m/d) are one node but
ORT 1.32's CPU kernel computes them in fp32 at 30-60x the time (docs/exporters.md).

Nibble order differs: GGUF's 16 bytes of a 4-bit block hold elements 0..15 in their low nibbles
and 16..31 in their high ones; MatMulNBits packs element 2i low and 2i+1 high. `packed` repacks.

With accuracy_level 0 every op computes in fp32 from the exact dequantized weights, so logits
equal eager PyTorch on the checkpoint's fp32 weights within fp32 rounding (tests/exporters/
test_gguf_exact.py). Level 4 (int8 activations, per block of 32, as llama.cpp's own Q8_1 dot
products) is faster but costs SmolLM2 3.7 points of top-1 agreement with the exact weights, so
the served levels (exporters/targets.py GGUF_*_ACCURACY_LEVEL) are 0 for the 4-bit projections
and 4 for the 8-bit head, the one 8-bit path ORT's CPU kernel runs fast, whose top RESCORED
logits per row are then recomputed in fp32 from the same blocks (`_rescored`): greedy decoding
and the likeliest tokens' probabilities are the exact weights'.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.errors import ExportError
from exporters.onnx_ort import EMBEDDING, MS_DOMAIN, matmul_weights
from registry.manifest import Quantization
from trainer.checkpoint import BLOCK, BlockWeight, load_blocks
from trainer.config import ModelConfig
from trainer.errors import TrainerError
from trainer.model import Transformer

RESCORED = 8  # logits per row an approximate head recomputes exactly (its top ones)


def scheme(blocks: dict[str, BlockWeight], cfg: ModelConfig, bits: int) -> str | None:
    """ "gguf-<kinds>" when `blocks` cover every MatMul of the graph and every projection's are
    `bits` wide (the head may differ: a 4-bit file's Q8_0 output stays 8-bit); else None."""
    table = matmul_weights(cfg)
    if any(n not in blocks for sources in table.values() for n in sources):
        return None
    projections = [blocks[n] for w, s in table.items() if w != "lm_head.weight" for n in s]
    if any(b.bits != bits for b in projections):
        return None
    return "gguf-" + "+".join(sorted({b.kind for b in projections}))


def load_checked(checkpoint: Path, model: Transformer) -> dict[str, BlockWeight]:
    """The blocks a checkpoint carries (often none), once checked against `model`'s weights."""
    try:
        blocks = load_blocks(checkpoint)
    except TrainerError as e:
        raise ExportError(f"cannot export {checkpoint}: {e}") from None
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    check_blocks(blocks, weights)
    return blocks


def check_blocks(blocks: dict[str, BlockWeight], weights: dict[str, np.ndarray]) -> None:
    """Refuses blocks that do not dequantize to exactly the checkpoint's weights (the weights
    were changed after the import): the target would not serve the checkpoint exported."""
    for name, b in blocks.items():
        w = weights.get(name)
        if w is None or w.shape != b.shape or not np.array_equal(b.dequantize(), w):
            raise ExportError(
                f"the checkpoint's quantized blocks of {name} do not dequantize to its weights "
                "(were the weights changed after the import?); re-import the source file or "
                "delete quantized.safetensors to quantize the weights instead"
            )


def apply_blocks(
    proto: onnx.ModelProto,
    blocks: dict[str, BlockWeight],
    cfg: ModelConfig,
    bits: int,
    accuracy_level: int,
    head_accuracy_level: int,
) -> tuple[onnx.ModelProto, Quantization]:
    """A copy of the fp32 ORT graph `proto` whose MatMuls (and a Q8_0 embedding's Gather) run
    from `blocks`, and what it holds. The projections compute at `accuracy_level`, the head at
    `head_accuracy_level`; a Q8_0 head computed approximately (not 0) has its top RESCORED
    logits recomputed exactly (`_rescored`). Raises ExportError unless `scheme` accepts the
    blocks."""
    table = matmul_weights(cfg)
    kind = scheme(blocks, cfg, bits)
    if kind is None:
        raise ExportError(
            f"the checkpoint's blocks do not cover every MatMul of the graph at {bits} bits"
        )
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    g = work.graph
    replaced, nodes, inits = set(), [], {}
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in table:
            parts = [blocks[n] for n in table[node.input[1]]]
            head = node.input[1] == "lm_head.weight"
            level = head_accuracy_level if head else accuracy_level
            if head and level != 0 and parts[0].kind == "q8_0":
                source = table[node.input[1]][0]  # a tied head: the embedding's own table
                new_nodes, new_inits = _rescored(node, parts[0], source, level)
            else:
                new_nodes, new_inits = matmul_nbits(node, parts, level)
            replaced.add(node.input[1])
        elif node.op_type == "Gather" and node.input[0] == EMBEDDING and _gatherable(blocks):
            new_nodes, new_inits = _gather(node, blocks[EMBEDDING])
            replaced.add(EMBEDDING)
        else:
            nodes.append(node)
            continue
        nodes += new_nodes
        inits.update((t.name, t) for t in new_inits)  # a shared constant once
    kept = [t for t in g.initializer if t.name not in replaced]
    g.ClearField("node")
    g.node.extend(nodes)
    g.ClearField("initializer")
    g.initializer.extend(kept + list(inits.values()))
    used = {n: blocks[n] for s in table.values() for n in s}
    if _gatherable(blocks):
        used[EMBEDDING] = blocks[EMBEDDING]
    quantization = Quantization(
        method="MatMulNBits",
        bits=bits,
        block_size=BLOCK,
        symmetric=all(b.m is None for b in used.values()),
        accuracy_level=accuracy_level,
        scheme=kind,
        formats=dict(sorted(Counter(b.kind for b in used.values()).items())),
    )
    return work, quantization


def packed(b: BlockWeight) -> np.ndarray:
    """MatMulNBits' B for one weight: uint8 (N, K/32, 32·bits/8), codes low-first along K."""
    codes = b.codes()  # (N, K/32, 32)
    if b.bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def matmul_nbits(node, parts: list[BlockWeight], accuracy_level: int):
    """MatMul(x, W) → MatMulNBits from the stacked `parts` (rows = outputs), + the Q4_1 term."""
    bits = {b.bits for b in parts}
    if len(bits) != 1:
        raise ExportError(f"{node.name}: its weights mix block widths {sorted(bits)}")
    (nbits,) = bits
    x, (y,) = node.input[0], node.output
    name = node.input[1].removesuffix(".weight")
    b = np.concatenate([packed(p) for p in parts])  # (N, K/32, 32·bits/8)
    scales = np.concatenate([p.d.astype(np.float32) for p in parts])  # (N, K/32)
    n, k_blocks = scales.shape
    k = k_blocks * BLOCK
    minima = [_offset(p) for p in parts]
    has_min = any(m is not None for m in minima)
    inits = [
        numpy_helper.from_array(b, f"{name}.qweight"),
        numpy_helper.from_array(scales, f"{name}.scales"),
    ]
    main = helper.make_node(
        "MatMulNBits",
        [x, f"{name}.qweight", f"{name}.scales"],
        [f"{y}.blocks" if has_min else y],
        name=node.name,
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=nbits,
        block_size=BLOCK,
        accuracy_level=accuracy_level,
    )
    if not has_min:
        return [main], inits
    m = np.concatenate(
        [
            mm if mm is not None else np.zeros_like(p.d, np.float32)
            for mm, p in zip(minima, parts, strict=True)
        ]
    )  # (N, K/32)
    summer = np.kron(np.eye(k_blocks, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
    inits += [
        numpy_helper.from_array(summer, f"i{k}.block_sums"),  # (K, K/32), shared by equal K
        numpy_helper.from_array(np.ascontiguousarray(m.T), f"{name}.minima"),  # (K/32, N)
    ]
    nodes = [
        main,
        helper.make_node(
            "MatMul", [x, f"i{k}.block_sums"], [f"{y}.block_sums"], name=f"{name}.sums"
        ),
        helper.make_node(
            "MatMul", [f"{y}.block_sums", f"{name}.minima"], [f"{y}.minima"], name=f"{name}.min"
        ),
        helper.make_node("Add", [f"{y}.blocks", f"{y}.minima"], [y], name=f"{name}.add_min"),
    ]
    return nodes, inits


def _rescored(node, b: BlockWeight, source: str, accuracy_level: int):
    """The Q8_0 head at `accuracy_level`, then its RESCORED largest logits of each row
    recomputed in fp32 from the exact rows (GatherBlockQuantized of the same blocks) and put
    back: the argmax and the likeliest tokens' logits are the exact weights', at the cost of a
    TopK and RESCORED dot products per row instead of a fp32 pass over the whole head."""
    x, (y,) = node.input[0], node.output
    approx = helper.make_node("MatMul", [x, node.input[1]], [f"{y}.approx"], name=node.name)
    nodes, inits = matmul_nbits(approx, [b], accuracy_level)
    inits += [*_rows_table(b, source)]
    inits += [
        numpy_helper.from_array(np.array([RESCORED], np.int64), "lm_head.k"),
        numpy_helper.from_array(np.array([1], np.int64), "lm_head.axis1"),
        numpy_helper.from_array(np.array([-1], np.int64), "lm_head.axis_last"),
    ]
    p = "lm_head.rescore"
    nodes += [
        helper.make_node(
            "TopK", [f"{y}.approx", "lm_head.k"], [f"{p}.values", f"{p}.ids"], name=f"{p}.topk"
        ),  # (N, k)
        helper.make_node(
            "GatherBlockQuantized",
            [f"{source}.qweight", f"{p}.ids", f"{source}.scales"],
            [f"{p}.rows"],  # (N, k, D)
            name=f"{p}.rows",
            domain=MS_DOMAIN,
            bits=8,
            block_size=BLOCK,
            gather_axis=0,
            quantize_axis=1,
        ),
        helper.make_node("Unsqueeze", [x, "lm_head.axis1"], [f"{p}.x"], name=f"{p}.x"),  # (N, 1, D)
        helper.make_node("Mul", [f"{p}.x", f"{p}.rows"], [f"{p}.prod"], name=f"{p}.mul"),
        helper.make_node(
            "ReduceSum",
            [f"{p}.prod", "lm_head.axis_last"],
            [f"{p}.exact"],
            name=f"{p}.sum",
            keepdims=0,
        ),  # (N, k)
        helper.make_node(
            "ScatterElements",
            [f"{y}.approx", f"{p}.ids", f"{p}.exact"],
            [y],
            name=f"{p}.put",
            axis=1,
        ),  # (N, V)
    ]
    return nodes, inits


def _offset(b: BlockWeight) -> np.ndarray | None:
    """The per-block constant beside d·(q − 8): m + 8d for Q4_1 (float32 (N, K/32)), else None."""
    if b.kind != "q4_1":
        return None
    return b.m.astype(np.float32) + np.float32(8) * b.d.astype(np.float32)


def _gatherable(blocks: dict[str, BlockWeight]) -> bool:
    # GatherBlockQuantized's 8-bit codes with their default zero point 128 are Q8_0 exactly;
    # other embeddings keep the fp32 table (exact too, 4x the memory)
    return EMBEDDING in blocks and blocks[EMBEDDING].kind == "q8_0"


def _rows_table(b: BlockWeight, source: str) -> list:
    """GatherBlockQuantized's data and scales of Q8_0 blocks, named after the weight they hold
    (so that a tied model's embedding and head share one table)."""
    rows, cols = b.shape
    return [
        numpy_helper.from_array(b.codes().reshape(rows, cols), f"{source}.qweight"),
        numpy_helper.from_array(b.d.astype(np.float32), f"{source}.scales"),
    ]


def _gather(node, b: BlockWeight):
    """Gather(table, ids) → GatherBlockQuantized from Q8_0 blocks."""
    inits = _rows_table(b, EMBEDDING)
    new = helper.make_node(
        "GatherBlockQuantized",
        [f"{EMBEDDING}.qweight", node.input[1], f"{EMBEDDING}.scales"],
        list(node.output),
        name=node.name,
        domain=MS_DOMAIN,
        bits=8,
        block_size=BLOCK,
        gather_axis=0,
        quantize_axis=1,
    )
    return [new], inits
