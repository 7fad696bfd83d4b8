"""A GGUF file's own blocks served on ONNX Runtime exactly (exporters/gguf_blocks.py): one
projection per block format against x @ dequantize(W)ᵀ, then a tiny Q4_1/Q8_0 GGUF imported and
exported to onnx-int4 against eager PyTorch on the imported (exactly dequantized) checkpoint."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from exporters import gguf_blocks, targets
from exporters.errors import ExportError
from exporters.onnx_ort import MS_DOMAIN, OPSET
from exporters.package import export
from exporters.runner import OrtDecoder
from registry.manifest import load
from tests.trainer.test_importers import CORPUS, tiny_model, write_gguf
from trainer.checkpoint import BlockWeight, load_blocks, load_model
from trainer.importers import import_gguf
from trainer.tokenizer import train_bpe

gguf = pytest.importorskip("gguf")

TOL = 1e-5  # relative to the largest output: fp32 rounding of sums over K, nothing more
# GGML type → (our kind, bytes per block of 32), written out from ggml-common.h
LAYOUT = {"Q4_0": ("q4_0", 18), "Q4_1": ("q4_1", 20), "Q8_0": ("q8_0", 34)}


def blocks_of(w: np.ndarray, qtype: str) -> BlockWeight:
    """`w` quantized by gguf and split into its fields by hand (not by the importer)."""
    kind, size = LAYOUT[qtype]
    raw = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, qtype))
    raw = raw.reshape(w.shape[0], w.shape[1] // 32, size)

    def half(i):
        return raw[..., i : i + 2].copy().view(np.float16)[..., 0]

    if kind == "q4_1":
        return BlockWeight(kind, raw[..., 4:].copy(), half(0), half(2))
    qs = raw[..., 2:].copy()
    return BlockWeight(kind, qs.view(np.int8) if kind == "q8_0" else qs, half(0))


def run_projection(parts: list[BlockWeight], x: np.ndarray, level: int) -> np.ndarray:
    k = parts[0].shape[1]
    n = sum(p.shape[0] for p in parts)
    matmul = helper.make_node("MatMul", ["x", "w.weight"], ["y"], name="w")
    nodes, inits = gguf_blocks.matmul_nbits(matmul, parts, level)
    g = helper.make_graph(
        nodes,
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])],
        inits,
    )
    proto = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    )
    proto.ir_version = 10
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("qtypes", [["Q4_0"], ["Q4_1"], ["Q8_0"], ["Q4_0", "Q4_1", "Q4_1"]])
def test_one_projection_equals_the_dequantized_weights(qtypes):
    rng = np.random.default_rng(len(qtypes))
    k = 96  # three blocks
    weights = [rng.standard_normal((40 + 8 * i, k)).astype(np.float32) for i in range(len(qtypes))]
    # an offset per row so that Q4_1's minima are far from zero
    weights = [w + rng.standard_normal((w.shape[0], 1)).astype(np.float32) for w in weights]
    parts = [blocks_of(w, q) for w, q in zip(weights, qtypes, strict=True)]
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    want = x @ np.concatenate([p.dequantize() for p in parts]).T

    exact = run_projection(parts, x, level=0)
    assert np.abs(exact - want).max() <= TOL * np.abs(want).max()
    # accuracy level 4 quantizes x to int8 per block: close, not exact
    fast = run_projection(parts, x, level=4)
    assert np.abs(fast - want).max() <= 0.02 * np.abs(want).max()


def test_blocks_must_match_the_weights_and_cover_the_graph():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    b = blocks_of(w, "Q4_1")
    gguf_blocks.check_blocks({"a.weight": b}, {"a.weight": b.dequantize()})
    changed = b.dequantize()
    changed[3, 5] += 1e-3
    with pytest.raises(ExportError, match="blocks of a.weight do not dequantize"):
        gguf_blocks.check_blocks({"a.weight": b}, {"a.weight": changed})


@pytest.fixture(scope="module")
def gguf_checkpoint(tmp_path_factory):
    """SmolLM2's layout in small: every projection Q4_1, the tied embedding/head Q8_0."""
    tokenizer = train_bpe(iter(CORPUS * 4), vocab_size=300)
    source = tiny_model(tokenizer, tied=True)
    q8, q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    folder = tmp_path_factory.mktemp("gguf-exact")
    write_gguf(
        folder / "tiny.gguf",
        source,
        tokenizer,
        types=lambda name: q8 if name == "embed_tokens.weight" else q4_1,
    )
    return import_gguf(folder / "tiny.gguf", folder / "ckpt")


def test_scheme_needs_every_projection_at_the_target_width(gguf_checkpoint):
    blocks = load_blocks(gguf_checkpoint)
    cfg = load_model(gguf_checkpoint)[0].cfg
    assert gguf_blocks.scheme(blocks, cfg, 4) == "gguf-q4_1"
    assert gguf_blocks.scheme(blocks, cfg, 8) is None
    del blocks["layers.1.mlp.up_proj.weight"]
    assert gguf_blocks.scheme(blocks, cfg, 4) is None


def test_int4_export_from_gguf_blocks_equals_eager(gguf_checkpoint, tmp_path, monkeypatch):
    # accuracy level 0: every MatMulNBits computes in fp32, so the graph must equal eager
    monkeypatch.setattr(targets, "GGUF_ACCURACY_LEVEL", 0)
    monkeypatch.setattr(targets, "GGUF_HEAD_ACCURACY_LEVEL", 0)
    # force: the int8 round-to-nearest of this random model may miss the gate; int4 must not
    pkg = export(
        gguf_checkpoint, ["onnx-int4", "onnx-int8"], tmp_path / "pkg", max_len=64, force=True
    )
    manifest = load(pkg)

    q4 = manifest.artifact("onnx-int4").quantization
    assert (q4.scheme, q4.bits, q4.block_size, q4.symmetric) == ("gguf-q4_1", 4, 32, False)
    assert q4.formats == {"q4_1": 2 * 7, "q8_0": 1} and q4.accuracy_level == 0
    # a target of another width than the file's blocks is quantized from the fp32 weights
    assert manifest.artifact("onnx-int8").quantization.scheme == "rtn"
    report = manifest.reports.parity["onnx-int4"]
    assert report.passed and not report.forced

    graph = pkg / "onnx-int4" / "model.onnx"
    proto = onnx.load(str(graph), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 2 * 4 + 1 and ops.count("GatherBlockQuantized") == 1
    # no fp32 copy of a quantized weight is left in the graph
    names = {t.name for t in proto.graph.initializer}
    assert not {n for n in names if n.endswith("_proj.weight")} | (
        {"embed_tokens.weight", "lm_head.weight"} & names
    )

    model, tokenizer, _ = load_model(gguf_checkpoint)
    ids = tokenizer.encode(CORPUS[0])[:40]
    decoder = OrtDecoder(graph, max_batch=1, max_len=64, threads=1)
    got = decoder.logits(ids[:30], ids[30:])
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    diff = np.abs(got - want).max()
    print(f"GGUF Q4_1/Q8_0 int4 graph at accuracy level 0 vs eager: max |logit diff| {diff:.2g}")
    assert diff <= 1e-4 * max(1.0, np.abs(want).max())


def test_served_levels_keep_the_argmax_and_top_logits_exact(gguf_checkpoint, tmp_path):
    """As exported by default: fp32 projections, the Q8_0 head at accuracy level 4 with its top
    logits recomputed from the exact rows, so greedy decoding is the reference's."""
    pkg = export(gguf_checkpoint, ["onnx-int4"], tmp_path / "pkg", max_len=64)
    q4 = load(pkg).artifact("onnx-int4").quantization
    assert q4.accuracy_level == targets.GGUF_ACCURACY_LEVEL
    model, tokenizer, _ = load_model(gguf_checkpoint)
    ids = tokenizer.encode(CORPUS[2])[:48]
    got = OrtDecoder(pkg / "onnx-int4" / "model.onnx", max_batch=1, max_len=64, threads=1).logits(
        ids[:40], ids[40:]
    )
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    rows = np.arange(len(ids))[:, None]
    top = np.argsort(-want, axis=-1)[:, : gguf_blocks.RESCORED // 2]
    assert np.abs(got[rows, top] - want[rows, top]).max() <= 1e-4 * np.abs(want).max()
