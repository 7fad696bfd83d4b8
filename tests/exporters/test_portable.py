"""The portable engine graph on ONNX Runtime (CPU) against eager PyTorch, on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from engine.graph import cache_names
from exporters.portable import build_portable_graph
from trainer.config import PRESETS
from trainer.generate import generate
from trainer.model import Transformer

MAX_LEN = 48


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny"]).eval()


@pytest.fixture(scope="module")
def graph(model):
    return build_portable_graph(model, MAX_LEN)


@pytest.fixture(scope="module")
def session(graph):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class Rows:
    """Drives the graph as an engine does: one fixed cache buffer per tensor, right-padded rows,
    padding positions continuing past each row's end (they may run past the buffer)."""

    def __init__(self, run, cfg, batch: int, dtype=np.float32):
        self.run, self.batch = run, batch
        shape = (batch, cfg.n_kv_heads, MAX_LEN, cfg.head_dim)
        self.cache = {p: np.zeros(shape, dtype) for p, _ in cache_names(cfg.n_layers)}
        self.lengths = [0] * batch

    def step(self, rows: list[list[int]], logits_idx=None, pad_id: int = 0) -> np.ndarray:
        """rows[b]: the new tokens of row b ([] = idle) -> logits of each non-idle row's last
        token (or of `logits_idx`)."""
        S = max(len(r) for r in rows)
        ids = np.full((self.batch, S), pad_id, dtype=np.int64)
        pos = np.zeros((self.batch, S), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
            pos[b] = self.lengths[b] + np.arange(S)
        seqlens = np.array(
            [n + len(r) - 1 for n, r in zip(self.lengths, rows, strict=True)], np.int32
        )
        if logits_idx is None:
            logits_idx = [b * S + len(r) - 1 for b, r in enumerate(rows) if r]
        feeds = {
            "input_ids": ids,
            "position_ids": pos,
            "seqlens_k": seqlens,
            "total_sequence_length": np.array(seqlens.max() + 1, np.int32),
            "logits_idx": np.asarray(logits_idx, np.int64),
            **self.cache,
        }
        logits, *presents = self.run(feeds)
        self.cache = dict(zip(self.cache, presents, strict=True))
        self.lengths = [n + len(r) for n, r in zip(self.lengths, rows, strict=True)]
        return logits


def ort_rows(session, cfg, batch: int) -> Rows:
    return Rows(lambda feeds: session.run(None, feeds), cfg, batch)


def greedy(rows: Rows, prompts: list[list[int]], n: int) -> list[list[int]]:
    logits, out = rows.step(prompts), [[] for _ in prompts]
    for i in range(n):
        tokens = logits.argmax(-1).tolist()
        for o, t in zip(out, tokens, strict=True):
            o.append(t)
        if i < n - 1:
            logits = rows.step([[t] for t in tokens])
    return out


def eager_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()  # (T, V)


def test_graph_is_standard_onnx_with_the_contract(graph, model):
    onnx.checker.check_model(graph, full_check=True)
    assert [(o.domain, o.version) for o in graph.opset_import] == [("", 17)]
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    cfg = model.cfg
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["aimass.model_config"])["n_kv_heads"] == cfg.n_kv_heads
    assert props["aimass.graph_flavour"] == "portable"
    assert props["aimass.max_len"] == str(MAX_LEN)

    def sig(values):
        return {
            v.name: (
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        }

    cache = (onnx.TensorProto.FLOAT, ["batch", cfg.n_kv_heads, MAX_LEN, cfg.head_dim])
    assert sig(graph.graph.input) == {
        "input_ids": (onnx.TensorProto.INT64, ["batch", "seq"]),
        "position_ids": (onnx.TensorProto.INT64, ["batch", "seq"]),
        "seqlens_k": (onnx.TensorProto.INT32, ["batch"]),
        "total_sequence_length": (onnx.TensorProto.INT32, []),
        "logits_idx": (onnx.TensorProto.INT64, ["n_logits"]),
    } | {past: cache for past, _ in cache_names(cfg.n_layers)}
    assert sig(graph.graph.output) == {
        "logits": (onnx.TensorProto.FLOAT, ["n_logits", cfg.vocab_size])
    } | {present: cache for _, present in cache_names(cfg.n_layers)}
    # the cache is written by scatter into the fixed buffer, never grown by concatenation
    writers = {n.output[0]: n.op_type for n in graph.graph.node}
    assert {writers[present] for _, present in cache_names(cfg.n_layers)} == {"ScatterElements"}


def test_prefill_logits_match_eager(session, model):
    prompt = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8]
    logits = ort_rows(session, model.cfg, 1).step([prompt], logits_idx=range(len(prompt)))
    assert np.abs(logits - eager_logits(model, prompt)).max() <= 1e-4


def test_logits_idx_selects_the_rows_returned(session, model):
    prompt = [9, 8, 7, 6, 5, 4]
    logits = ort_rows(session, model.cfg, 1).step([prompt], logits_idx=[2, 0, 5])
    assert logits.shape == (3, model.cfg.vocab_size)
    assert np.abs(logits - eager_logits(model, prompt)[[2, 0, 5]]).max() <= 1e-4


def test_step_by_step_decoding_matches_eager(session, model):
    ids = [1, 2, 3, 4]
    rows = ort_rows(session, model.cfg, 1)
    logits = rows.step([ids])
    for token in [40, 41, 300, 7, 2, 99]:
        assert np.abs(logits[0] - eager_logits(model, ids)[-1]).max() <= 1e-4
        ids.append(token)
        logits = rows.step([[token]])
    assert np.abs(logits[0] - eager_logits(model, ids)[-1]).max() <= 1e-4


def test_greedy_matches_generate(session, model):
    prompt = [5, 17, 42, 7]
    assert greedy(ort_rows(session, model.cfg, 1), [prompt], 20)[0] == generate(model, prompt, 20)


def test_rows_of_different_lengths_decode_as_each_alone(session, model):
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [10], [2, 7, 1, 8, 2]]
    together = greedy(ort_rows(session, model.cfg, len(prompts)), prompts, 12)
    assert together == [generate(model, p, 12) for p in prompts]


def test_chunked_prefill_on_a_filled_cache(session, model):
    prompt = [4, 8, 15, 16, 23, 42, 7, 7, 1, 300, 12, 5]
    rows = ort_rows(session, model.cfg, 1)
    rows.step([prompt[:5]])
    second = rows.step([prompt[5:]], logits_idx=range(len(prompt) - 5))
    assert np.abs(second - eager_logits(model, prompt)[5:]).max() <= 1e-4
    whole = ort_rows(session, model.cfg, 1)
    whole.step([prompt])
    for name, value in rows.cache.items():
        np.testing.assert_allclose(value, whole.cache[name], atol=1e-6)


def test_one_step_mixes_a_prefill_chunk_a_decode_and_an_idle_row(session, model):
    a, b = [6, 2, 8, 3, 1], [9, 9, 4, 4, 0, 1, 2]
    rows = ort_rows(session, model.cfg, 3)
    rows.step([a, b[:3], []])
    before = {k: v.copy() for k, v in rows.cache.items()}
    logits = rows.step([[11], b[3:], []], logits_idx=[0, 7, 8])  # idle row's logits too
    assert np.abs(logits[0] - eager_logits(model, [*a, 11])[-1]).max() <= 1e-4
    assert np.abs(logits[1] - eager_logits(model, b)[-1]).max() <= 1e-4
    assert np.isfinite(logits).all()  # an idle row attends to nothing: uniform, not NaN
    for name, value in rows.cache.items():
        # rows change exactly at the positions of their real tokens; padding writes nothing
        np.testing.assert_array_equal(value[0, :, 6:], before[name][0, :, 6:])
        np.testing.assert_array_equal(value[1, :, 7:], before[name][1, :, 7:])
        np.testing.assert_array_equal(value[2], before[name][2])


def test_padding_tokens_and_positions_do_not_matter(session, model):
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3]]
    plain = ort_rows(session, model.cfg, 2)
    odd = ort_rows(session, model.cfg, 2)
    want = plain.step(prompts)
    np.testing.assert_array_equal(odd.step(prompts, pad_id=321), want)
    for name in plain.cache:
        np.testing.assert_array_equal(odd.cache[name], plain.cache[name])
    # positions beyond the buffer: clamped for rotary, and padding writes nowhere anyway
    far = Rows(lambda f: session.run(None, f | {"position_ids": _far_padding(f)}), model.cfg, 2)
    np.testing.assert_array_equal(far.step(prompts), want)
    for name in plain.cache:
        np.testing.assert_array_equal(far.cache[name], plain.cache[name])


def _far_padding(feeds: dict) -> np.ndarray:
    pos = feeds["position_ids"].copy()
    pad = pos > feeds["seqlens_k"][:, None]
    pos[pad] = 10**6
    return pos


def test_io_binding_updates_the_cache_in_place(session, model):
    """past and present bound to one OrtValue each: the buffers the engine allocated are the
    ones updated, and decoding still equals eager."""
    cfg, prompt = model.cfg, [5, 17, 42, 7]
    shape = (1, cfg.n_kv_heads, MAX_LEN, cfg.head_dim)
    buffers = {p: np.zeros(shape, np.float32) for p, _ in cache_names(cfg.n_layers)}
    values = {p: ort.OrtValue.ortvalue_from_numpy(a) for p, a in buffers.items()}
    binding = session.io_binding()

    def run(feeds):
        for name in ("input_ids", "position_ids", "seqlens_k", "total_sequence_length"):
            binding.bind_cpu_input(name, feeds[name])
        binding.bind_cpu_input("logits_idx", feeds["logits_idx"])
        binding.bind_output("logits")
        for past, present in cache_names(cfg.n_layers):
            binding.bind_ortvalue_input(past, values[past])
            binding.bind_ortvalue_output(present, values[past])
        session.run_with_iobinding(binding)
        return [binding.get_outputs()[0].numpy(), *(buffers[p] for p in buffers)]

    rows = Rows(run, cfg, 1)
    assert greedy(rows, [prompt], 10)[0] == generate(model, prompt, 10)
    filled = len(prompt) + 9
    assert all(np.abs(a[0, :, :filled]).min() > 0 for a in buffers.values())
    assert all((a[0, :, filled:] == 0).all() for a in buffers.values())


def test_any_onnx_runtime_float16_graph(model):
    """The fp16 graph (what a TensorRT fp16 engine is built from), and the fp32 one, run on the
    ONNX reference evaluator: standard semantics, not one runtime's leniency."""
    prompt = [5, 17, 42, 7, 99, 3]
    want = eager_logits(model, prompt)
    for dtype, tol in (("float32", 1e-4), ("float16", 5e-3)):
        proto = build_portable_graph(model, MAX_LEN, dtype=dtype)
        onnx.checker.check_model(proto, full_check=True)
        evaluator = ReferenceEvaluator(proto)
        rows = Rows(lambda f, e=evaluator: e.run(None, f), model.cfg, 1, np.dtype(dtype))
        logits = rows.step([prompt], logits_idx=range(len(prompt)))
        assert logits.dtype == np.float32
        assert np.abs(logits - want).max() <= tol, dtype


def test_float16_graph_greedy_on_onnx_runtime(model):
    proto = build_portable_graph(model, MAX_LEN, dtype="float16")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = Rows(lambda f: session.run(None, f), model.cfg, 1, np.float16)
    prompt = [5, 17, 42, 7]
    assert greedy(rows, [prompt], 12)[0] == generate(model, prompt, 12)


def test_arguments_are_checked(model):
    with pytest.raises(ValueError, match="max_len=300 must be between 1 and .* max_seq_len=256"):
        build_portable_graph(model, 300)
    with pytest.raises(ValueError, match="dtype='bfloat16' must be one of"):
        build_portable_graph(model, 16, dtype="bfloat16")
