"""The ONNX Runtime engine graph against eager PyTorch on a tiny model: prefill, decode, ragged
batches, chunked prefill, greedy generation, logits selection, in-place KV, quantized variants,
a float16 cache."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from engine import graph
from exporters.graph_builder import read_config, read_metadata
from exporters.onnx_ort import build_ort_graph, quantize, save
from exporters.runner import OrtDecoder
from trainer.config import PRESETS
from trainer.generate import generate
from trainer.model import Transformer

MAX_LEN = 64
TOL = 1e-4  # fp32 graph vs eager fp32: measured ~3e-7


@pytest.fixture(scope="module")
def model() -> Transformer:
    # init_std 0.2 instead of 0.02: with near-uniform logits greedy decoding repeats one token,
    # which would make the token-for-token comparisons say little
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(PRESETS["tiny"], init_std=0.2)).eval()


@pytest.fixture(scope="module")
def proto(model) -> onnx.ModelProto:
    return build_ort_graph(model, MAX_LEN)


@pytest.fixture(scope="module")
def graph_path(proto, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    save(proto, path)
    return path


@pytest.fixture
def decoder(graph_path) -> OrtDecoder:
    return OrtDecoder(graph_path, max_batch=4, max_len=MAX_LEN, threads=1)


def eager(model, ids) -> np.ndarray:
    """Logits of every position of one sequence, (T, V)."""
    with torch.no_grad():
        return model(torch.tensor([list(ids)]))[0].numpy()


def tokens(n: int, seed: int, vocab: int = 512) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_metadata_and_files(proto, graph_path, model):
    cfg, max_len = read_config(graph_path)
    assert cfg == model.cfg and max_len == MAX_LEN
    assert graph_path.with_name("model.onnx.data").stat().st_size > 0
    assert len(proto.graph.initializer[0].raw_data) > 0  # save() left the caller's proto whole
    kinds = Counter(n.op_type for n in proto.graph.node)
    assert kinds["GroupQueryAttention"] == model.cfg.n_layers
    assert kinds["SkipSimplifiedLayerNormalization"] == 2 * model.cfg.n_layers


def test_prefill_matches_eager(decoder, model):
    ids = tokens(13, seed=1)
    out = decoder.forward(np.array([ids]), np.arange(13)[None], np.array([12]), np.arange(13))
    assert np.abs(out - eager(model, ids)).max() <= TOL


def test_decode_step_by_step_matches_eager(decoder, model):
    seq = tokens(20, seed=2)
    decoder.prefill([seq[:5]])
    for t in range(5, 20):
        out = decoder.decode([seq[t]])
        assert np.abs(out[0] - eager(model, seq[: t + 1])[-1]).max() <= TOL


def test_ragged_batch_decodes_like_each_prompt_alone(decoder, model):
    """First prompt with rows of different lengths (right-padded, one call), then decode with
    the rows at different positions: each row equals its sequence run alone."""
    seqs = [tokens(18, seed=10 + r) for r in range(4)]
    lens = [7, 3, 1, 12]
    out = decoder.prefill([s[:n] for s, n in zip(seqs, lens, strict=True)])
    for r in range(4):
        assert np.abs(out[r] - eager(model, seqs[r][: lens[r]])[-1]).max() <= TOL
    for step in range(4):
        out = decoder.decode([s[n + step] for s, n in zip(seqs, lens, strict=True)])
        for r in range(4):
            ref = eager(model, seqs[r][: lens[r] + step + 1])[-1]
            assert np.abs(out[r] - ref).max() <= TOL


def test_chunked_prefill_batch_of_one(decoder, model):
    """A later chunk (S > 1 on a filled cache) is supported by the CPU kernel for batch 1."""
    seq = tokens(21, seed=3)
    ref = eager(model, seq)
    done = 0
    for n in (8, 8, 5):
        ids = np.array([seq[done : done + n]])
        out = decoder.forward(
            ids, np.arange(done, done + n)[None], np.array([done + n - 1]), np.arange(n)
        )
        assert np.abs(out - ref[done : done + n]).max() <= TOL
        done += n


def test_chunked_prefill_batched_is_refused(decoder):
    """ORT 1.32 CPU rejects S > 1 with past content for B > 1 (contract: batch-1 chunks)."""
    decoder.prefill([tokens(4, seed=4), tokens(4, seed=5)])
    ids = np.array([tokens(3, seed=6), tokens(3, seed=7)])
    with pytest.raises(Exception, match="batch_size must be 1"):
        decoder.forward(ids, np.tile(np.arange(4, 7), (2, 1)), np.array([6, 6]), np.array([2, 5]))


def test_greedy_matches_eager_generate(decoder, model):
    for seed, n in ((20, 5), (21, 1), (22, 17)):
        prompt = tokens(n, seed=seed)
        assert decoder.greedy(prompt, 24) == generate(model, prompt, 24, temperature=0.0)


def test_greedy_stops_like_eager(decoder, model):
    prompt = tokens(6, seed=23)
    full = generate(model, prompt, 20)
    stop = full[7]
    assert decoder.greedy(prompt, 20, stop_ids=[stop]) == generate(
        model, prompt, 20, stop_ids=[stop]
    )


def test_greedy_batch_rows_equal_prompts_alone(decoder, model):
    prompts = [tokens(n, seed=30 + n) for n in (9, 2, 14)]
    outs = decoder.greedy_batch(prompts, 16)
    assert outs == [generate(model, p, 16) for p in prompts]


def test_logits_idx_returns_exactly_those_rows(decoder, model):
    seqs = [tokens(10, seed=40), tokens(10, seed=41)]
    idx = np.array([0, 13, 13, 19])  # rows of the flat B*S axis, repeats allowed
    out = decoder.forward(np.array(seqs), np.tile(np.arange(10), (2, 1)), np.array([9, 9]), idx)
    assert out.shape == (4, model.cfg.vocab_size)
    flat = np.concatenate([eager(model, s) for s in seqs])
    assert np.abs(out - flat[idx]).max() <= TOL


def test_kv_is_updated_in_place(decoder):
    """present_* come back in the very buffers bound as past_*: no step allocates or copies a
    cache. A forward on slots 2..3 writes only those slots. (The host cache is one mapping the
    runner owns, engine/kv_memory.py; these are numpy views of it.)"""
    cache = decoder._host_kv.arrays
    before = {name: decoder._host_kv.pointer(name) for name in cache}
    snapshot = {name: array.copy() for name, array in cache.items()}
    ids = np.array([tokens(5, seed=50), tokens(5, seed=51)])
    decoder.forward(
        ids, np.tile(np.arange(5), (2, 1)), np.array([4, 4]), np.array([4, 9]), rows=range(2, 4)
    )
    bound = {decoder._host_kv.pointer(name, 2) for name in cache}  # slot 2 of every buffer
    outputs = {v.data_ptr() for v in decoder.binding.get_outputs()}
    assert bound <= outputs and len(outputs) == len(bound) + 1  # + the logits
    for name, now in cache.items():
        assert decoder._host_kv.pointer(name) == before[name]
        assert np.array_equal(now[:2], snapshot[name][:2])  # slots 0, 1 untouched
        assert not np.array_equal(now[2:, :, :5], snapshot[name][2:, :, :5])  # written in place
    decoder.decode([1, 2])  # a step after a rebinding to slots 0..1 stays in the same buffers
    outputs = {v.data_ptr() for v in decoder.binding.get_outputs()}
    assert {decoder._host_kv.pointer(name) for name in cache} <= outputs


def rtn_dequantized(model: Transformer, bits: int, block: int = 32) -> Transformer:
    """A copy of `model` whose projection and lm_head weights went through ORT's symmetric RTN:
    per block of `block` inputs, scale = (the block's largest-magnitude weight) / -2^(bits-1),
    q = clamp(round(w / scale), -2^(bits-1), 2^(bits-1) - 1); K is zero-padded to whole blocks."""
    out = copy.deepcopy(model)
    out.lm_head = torch.nn.Linear(model.cfg.dim, model.cfg.vocab_size, bias=False)  # untie
    out.lm_head.weight.data = model.lm_head.weight.data.clone()
    qmax = 2 ** (bits - 1)
    for layer in out.modules():
        if isinstance(layer, torch.nn.Linear):
            w = layer.weight.data  # (N, K)
            K = w.shape[1]
            blocks = torch.nn.functional.pad(w, (0, -K % block)).view(w.shape[0], -1, block)
            peak = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
            scale = torch.where(peak == 0, 1.0, peak / -qmax)
            q = torch.clamp(torch.round(blocks / scale), -qmax, qmax - 1)
            layer.weight.data = (q * scale).view(w.shape[0], -1)[:, :K]
    return out


@pytest.mark.parametrize(("bits", "bound"), [(4, 0.6), (8, 0.1)])
def test_quantized_graphs(proto, model, tmp_path, bits, bound):
    """MatMulNBits replaces every projection and the lm_head; the embedding Gather stays fp32.
    The tiny model's down_proj has K = ffn_dim = 176, not a multiple of the block size (32): the
    quantizer zero-pads the last block, and the kernel takes K = 176 as is."""
    q = quantize(proto, bits=bits)
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * model.cfg.n_layers + 1
    assert not any(n.op_type == "MatMul" for n in q.graph.node)
    attrs = {
        n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits
    }
    assert {a["bits"] for a in attrs.values()} == {bits}
    down = next(a for name, a in attrs.items() if name.startswith("layers.0.down_proj"))
    assert down["K"] == model.cfg.ffn_dim
    embed = next(t for t in q.graph.initializer if t.name == "embed_tokens.weight")
    assert embed.data_type == onnx.TensorProto.FLOAT

    seq = tokens(30, seed=70)
    ref = eager(model, seq)

    def logits(graph):
        save(graph, tmp_path / "q.onnx")
        decoder = OrtDecoder(tmp_path / "q.onnx", max_batch=1, max_len=MAX_LEN, threads=1)
        return decoder.forward(np.array([seq]), np.arange(30)[None], np.array([29]), np.arange(30))

    # exact: without activation quantization the graph is the RTN-dequantized model
    exact = logits(quantize(proto, bits=bits, accuracy_level=0))
    assert np.abs(exact - eager(rtn_dequantized(model, bits), seq)).max() <= 1e-4
    # close-ish: this random model amplifies weight error (logit std ~1.6); measured rms / std
    # 0.44 (int4) and 0.05 (int8), max |diff| 3.9 and 0.6
    diff = logits(q) - ref
    rel = float(np.sqrt((diff**2).mean()) / ref.std())
    print(f"int{bits}: max |logit diff| vs fp32 {np.abs(diff).max():.3f}, rms/std {rel:.3f}")
    assert rel <= bound


# --- a 16-bit cache -----------------------------------------------------------------------------

KV16_TOL = 0.05  # float16 cache vs eager fp32 on the tiny model: measured max |diff| 0.013


@pytest.fixture(scope="module")
def kv16_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx-kv16") / "model.onnx"
    save(build_ort_graph(model, MAX_LEN, kv_dtype="float16"), path)
    return path


def test_kv16_graph_declares_a_float16_cache_around_float32_activations(kv16_path, model):
    proto = onnx.load(str(kv16_path), load_external_data=False)
    meta = read_metadata(proto)
    assert (meta.dtype, meta.kv_dtype) == ("float32", "float16")
    elem = {v.name: v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)}
    cache = {name for pair in graph.cache_names(model.cfg.n_layers) for name in pair}
    assert {elem[name] for name in cache} == {onnx.TensorProto.FLOAT16}
    assert elem[graph.LOGITS] == onnx.TensorProto.FLOAT
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2 * model.cfg.n_layers  # q|k|v in, attention out
    rotary = {t.name: t.data_type for t in proto.graph.initializer if t.name.endswith("_cache")}
    assert rotary == {"cos_cache": onnx.TensorProto.FLOAT16, "sin_cache": onnx.TensorProto.FLOAT16}
    # a float32 graph states no cache type of its own: its metadata is what it always was
    assert graph.KV_DTYPE_KEY not in read_metadata(build_ort_graph(model, MAX_LEN)).props()


def test_kv16_decodes_close_to_eager_from_a_half_size_cache(kv16_path, graph_path, model):
    half = OrtDecoder(kv16_path, max_batch=2, max_len=MAX_LEN, threads=1)
    full = OrtDecoder(graph_path, max_batch=2, max_len=MAX_LEN, threads=1)
    assert {a.dtype for a in half._host_kv.arrays.values()} == {np.dtype(np.float16)}
    assert half._host_kv.row_bytes * 2 == full._host_kv.row_bytes
    seq = tokens(24, seed=80)
    ref = eager(model, seq)
    # a prefill of 8, then 16 decode steps that read what the prefill and earlier steps cached
    worst = np.abs(half.logits(seq[:8], seq[8:]) - ref).max()
    assert 0 < worst <= KV16_TOL  # rounded (not exact), and close


def test_kv16_refuses_a_cache_type_it_does_not_build(model):
    with pytest.raises(ValueError, match="kv_dtype='bfloat16' must be one of float32, float16"):
        build_ort_graph(model, MAX_LEN, kv_dtype="bfloat16")
