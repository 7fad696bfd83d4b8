"""Mixed prefill + decode forwards: what ONNX Runtime's CPU GroupQueryAttention accepts (one
node), the mixed runner against the plain one on the tiny package, and the prompt cap's
settings."""

from __future__ import annotations

import argparse
import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine import runner as runner_module
from engine.cli import add_engine_arguments, engine_config
from engine.loader import EngineConfig, open_core
from engine.request import EngineRequest, SamplingParams
from engine.runner import OrtRunner
from engine.scheduler import ScheduledChunk, SchedulerOutput
from tests.conftest import run_cli

H, K, HD, M = 4, 2, 16, 64  # query heads, kv heads, head dim, cache positions
D = (H + 2 * K) * HD  # packed q|k|v


def attention(query_seqlens: bool) -> ort.InferenceSession:
    """One GroupQueryAttention node as the ORT graph uses it: packed qkv, rotary inside,
    position_ids given; with or without the query_seqlens input."""
    inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["B", "S", D]),
        helper.make_tensor_value_info("past_k", TensorProto.FLOAT, ["B", K, "M", HD]),
        helper.make_tensor_value_info("past_v", TensorProto.FLOAT, ["B", K, "M", HD]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
        helper.make_tensor_value_info("pos", TensorProto.INT64, ["B", "S"]),
    ]
    wired = ["qkv", "", "", "past_k", "past_v", "seqlens_k", "total", "cos", "sin", "pos"]
    if query_seqlens:
        inputs.append(helper.make_tensor_value_info("qs", TensorProto.INT32, ["B"]))
        wired += [""] * 6 + ["qs"]
    angles = np.arange(M)[:, None] / 10000 ** (np.arange(HD // 2) / (HD // 2))
    rotary = [
        onnx.numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
        onnx.numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin"),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        wired,
        ["y", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=H,
        kv_num_heads=K,
        do_rotary=1,
    )
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output]
    model = helper.make_model(
        helper.make_graph([node], "gqa", inputs, outputs, rotary),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10,
    )
    return ort.InferenceSession(model.SerializeToString())


def run(session, cache, rows, query_seqlens: bool) -> list[np.ndarray]:
    """rows = [(slot, past, qkv [n, D])] on consecutive slots, right-padded to the longest;
    the cache is bound in place, as the runner binds it → each row's outputs [n, H * HD]."""
    B, S = len(rows), max(len(t) for _, _, t in rows)
    qkv = np.zeros((B, S, D), np.float32)
    pos = np.zeros((B, S), np.int64)
    seqlens_k, real = np.zeros(B, np.int32), np.zeros(B, np.int32)
    for b, (_, past, tokens) in enumerate(rows):
        qkv[b, : len(tokens)] = tokens
        pos[b] = past + np.arange(S)
        seqlens_k[b], real[b] = past + len(tokens) - 1, len(tokens)
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_cpu_input("pos", pos)
    binding.bind_cpu_input("seqlens_k", seqlens_k)
    binding.bind_cpu_input("total", np.array(max(int(seqlens_k.max()) + 1, S), np.int32))
    if query_seqlens:
        binding.bind_cpu_input("qs", real)
    lo = rows[0][0]
    for past, present, array in (
        ("past_k", "present_k", cache[0]),
        ("past_v", "present_v", cache[1]),
    ):
        rows_of = array[lo : lo + B]
        binding.bind_input(past, "cpu", 0, np.float32, rows_of.shape, rows_of.ctypes.data)
        binding.bind_output(present, "cpu", 0, np.float32, rows_of.shape, rows_of.ctypes.data)
    binding.bind_output("y")
    session.run_with_iobinding(binding)
    y = binding.get_outputs()[0].numpy()
    return [y[b, : len(t)] for b, (_, _, t) in enumerate(rows)]


@pytest.fixture(scope="module")
def pasts():
    """Four slots' prompts (5, 9, 13 and 0 tokens) and this step's new tokens: two decodes, a
    7-token chunk on a past and a 6-token first prompt."""
    rng = np.random.default_rng(0)
    prompts = [rng.standard_normal((n, D)).astype(np.float32) for n in (5, 9, 13, 0)]
    new = [rng.standard_normal((n, D)).astype(np.float32) for n in (1, 1, 7, 6)]
    return prompts, new


def filled(session, prompts) -> tuple[np.ndarray, np.ndarray]:
    cache = (np.zeros((4, K, M, HD), np.float32), np.zeros((4, K, M, HD), np.float32))
    for slot, prompt in enumerate(prompts):
        if len(prompt):
            run(session, cache, [(slot, 0, prompt)], query_seqlens=False)
    return cache


def test_gqa_runs_decodes_chunks_and_first_prompts_in_one_forward_exactly(pasts):
    prompts, new = pasts
    plain, mixed = attention(False), attention(True)
    steps = [(0, 5, new[0]), (1, 9, new[1]), (2, 13, new[2]), (3, 0, new[3])]
    apart = filled(plain, prompts)
    expected = run(plain, apart, steps[:2], False)  # the decodes, batched
    expected += run(plain, apart, steps[2:3], False)  # the later chunk, batch 1
    expected += run(plain, apart, steps[3:], False)  # the first prompt
    together = filled(plain, prompts)
    got = run(mixed, together, steps, True)
    for want, row in zip(expected, got, strict=True):
        np.testing.assert_array_equal(row, want)
    for slot, n in enumerate((6, 10, 20, 6)):  # and the same cache, position for position
        np.testing.assert_array_equal(together[0][slot, :, :n], apart[0][slot, :, :n])
        np.testing.assert_array_equal(together[1][slot, :, :n], apart[1][slot, :, :n])


def test_without_query_seqlens_gqa_refuses_a_chunk_on_a_past_beside_decodes(pasts):
    prompts, new = pasts
    plain = attention(False)
    with pytest.raises(Exception, match="batch_size must be 1 when sequence_length > 1"):
        run(plain, filled(plain, prompts), [(0, 5, new[0]), (1, 9, new[1]), (2, 13, new[2])], False)


def traffic(vocab: int) -> tuple[list[EngineRequest], dict[int, list[EngineRequest]]]:
    rng = random.Random(7)
    arrivals: dict[int, list[EngineRequest]] = {}
    requests = []
    for i in range(24):
        prompt = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, 30)))
        greedy = i % 2 == 0
        sampling = SamplingParams(temperature=0) if greedy else SamplingParams(0.9, seed=i)
        r = EngineRequest(f"r{i}", prompt, rng.randint(2, 20), sampling=sampling)
        requests.append(r)
        arrivals.setdefault(rng.randint(0, 40), []).append(r)
    return requests, arrivals


def serve(package, requests, arrivals, **config) -> tuple[dict[str, list[int]], int]:
    """Every request's tokens, and how many mixed forwards ran."""
    settings = dict(n_slots=4, threads=1, token_budget=8, max_prefill_tokens=2, target="onnx-fp32")
    core = open_core(package, EngineConfig(**settings | config))[0]
    runner, mixed_forwards = core.runner, []
    if runner.mixed:
        mixed = runner._mixed
        runner._mixed = lambda chunks: mixed_forwards.append(chunks) or mixed(chunks)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for step in range(5000):
        for r in arrivals.get(step, []):
            core.add(r)
        if step > max(arrivals) and not core.has_work():
            break
        for out in core.step() if core.has_work() else ():
            tokens[out.request_id] += out.token_ids
    return tokens, len(mixed_forwards)


@pytest.mark.slow
def test_mixed_forwards_give_every_request_the_same_tokens(tiny_package):
    """Decodes beside one- and two-token prompt chunks (max_prefill_tokens=2) merge into one
    forward; greedy and seeded output equal the plain runner's, token for token."""
    vocab = OrtRunner(tiny_package / "onnx-fp32" / "model.onnx", 1, 8).vocab_size
    requests, arrivals = traffic(vocab)
    plain, none = serve(tiny_package, requests, arrivals, mixed_forwards=False)
    mixed, merged = serve(tiny_package, requests, arrivals, mixed_forwards=True)
    assert none == 0 and merged > 20, merged
    assert mixed == plain
    assert all(len(t) >= 2 for t in plain.values())


def test_a_mixed_runner_adds_query_seqlens_and_a_plain_one_does_not(tiny_package):
    path = tiny_package / "onnx-fp32" / "model.onnx"
    mixed, plain = OrtRunner(path, 2, 16, mixed=True), OrtRunner(path, 2, 16)
    assert mixed.mixed and not plain.mixed
    ids = np.array([[5, 6, 7]])
    with pytest.raises(ValueError, match="query_seqlens needs a runner built with mixed=True"):
        plain.forward(ids, np.arange(3)[None], np.array([2]), np.array([2]), None, np.array([3]))


def test_max_prefill_tokens_below_zero_is_refused_with_its_limit():
    with pytest.raises(ValueError, match=r"max_prefill_tokens = -1 must be >= 0 \(0 is no limit"):
        EngineConfig(max_prefill_tokens=-1)


def test_the_cli_flags_reach_the_engine_config():
    add_engine_arguments(parser := argparse.ArgumentParser())
    config = engine_config(parser.parse_args(["--max-prefill-tokens", "32", "--mixed-forwards"]))
    assert config.mixed_forwards and config.scheduler(128).max_prefill_tokens == 32


def test_the_cli_refuses_a_negative_prefill_cap_in_one_line(tiny_package):
    r = run_cli("engine", "serve", str(tiny_package), "--max-prefill-tokens", "-3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "EngineConfig.max_prefill_tokens = -3 must be >= 0 (0 is no limit" in r.stderr


def packed_and_plain(tiny_package, n_slots=4):
    path = tiny_package / "onnx-fp32" / "model.onnx"
    return OrtRunner(path, n_slots, 64, mixed=True), OrtRunner(path, n_slots, 64)


def fill(runner, prompts):
    for slot, ids in enumerate(prompts):
        n = len(ids)
        runner.forward(
            np.array([ids]),
            np.arange(n)[None],
            np.array([n - 1]),
            np.array([n - 1]),
            range(slot, slot + 1),
        )


def cache_rows(runner, n_tokens):
    """Every layer's and kind's cached positions of each slot, up to its length."""
    return [
        [array[slot, :, :n].copy() for slot, n in enumerate(n_tokens)]
        for array in runner._host_kv.arrays.values()
    ]


def test_the_packed_layout_computes_only_real_tokens_and_matches_the_forwards_apart(tiny_package):
    """Two decodes, a 5-token chunk on a past, an idle slot and a 3-token first prompt in one
    packed forward: the logits of the three forwards apart (the projections see 1 + 1 + 5 + 3
    tokens, so batch-dependent rounding may move a last bit) and the same cache; the idle slot
    keeps its length and its positions."""
    rng = np.random.default_rng(1)
    vocab = 40
    prompts = [rng.integers(3, vocab, n).tolist() for n in (6, 9, 4, 1)]
    packed, plain = packed_and_plain(tiny_package, 5)
    fill(packed, prompts)
    fill(plain, prompts)
    new = [[7], [8], rng.integers(3, vocab, 5).tolist(), None, rng.integers(3, vocab, 3).tolist()]
    # apart: the decodes (slots 0, 1), the chunk (slot 2, batch 1), the first prompt (slot 4)
    want = [
        plain.forward(
            np.array([[7], [8]]), np.array([[6], [9]]), np.array([6, 9]), np.arange(2), range(0, 2)
        ).copy()
    ]
    want.append(
        plain.forward(
            np.array([new[2]]), (4 + np.arange(5))[None], np.array([8]), np.arange(5), range(2, 3)
        ).copy()
    )
    want.append(
        plain.forward(
            np.array([new[4]]), np.arange(3)[None], np.array([2]), np.array([2]), range(4, 5)
        ).copy()
    )
    # together, right-padded to 5 as every caller of forward() gives it
    ids = np.zeros((5, 5), np.int64)
    real = np.array([1, 1, 5, 0, 3], np.int32)
    past = np.array([6, 9, 4, 1, 0])
    for r, tokens in enumerate(new):
        if tokens:
            ids[r, : len(tokens)] = tokens
    # flat B*S positions: both decodes, every chunk token, the prompt's last
    wanted = [0, 5, *range(10, 15), 22]
    got = packed.forward(
        ids,
        past[:, None] + np.arange(5),
        np.maximum(past + real - 1, 0),
        np.array(wanted),
        range(0, 5),
        real,
    )
    expected = np.concatenate(want)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()
    lengths = [7, 10, 9, 1, 3]
    assert packed.lengths.tolist() == plain.lengths.tolist() == lengths
    for a, b in zip(cache_rows(packed, lengths), cache_rows(plain, lengths), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_packed_decodes_are_the_plain_runner_s_to_the_bit(tiny_package):
    """Single tokens pack as themselves: the projections see the same batch, so a packed
    decode step gives the plain one's logits exactly (the decode fast path and forward())."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 40, n).tolist() for n in (3, 8, 5, 2)]
    packed, plain = packed_and_plain(tiny_package)
    fill(packed, prompts)
    fill(plain, prompts)
    decodes = [ScheduledChunk(f"d{s}", s, len(p), (9 + s,), True) for s, p in enumerate(prompts)]
    np.testing.assert_array_equal(packed._decode(decodes)[1], plain._decode(decodes)[1])
    gapped = [decodes[0], decodes[2], decodes[3]]  # a dummy row for slot 1: forward()
    np.testing.assert_array_equal(packed._decode(gapped)[1], plain._decode(gapped)[1])
    assert packed.lengths.tolist() == plain.lengths.tolist()


def test_merging_weighs_the_padded_attention_positions(tiny_package, monkeypatch):
    """8 decodes beside a short chunk merge into one packed forward; beside a chunk long
    enough that its padded attention positions cost more than a forward, they do not. (The
    tiny graph holds 128 positions, too few for SmolLM2's threshold: a cheaper key is set.)"""
    monkeypatch.setattr(runner_module, "PAD_KEYS_PER_ROW", 1000)
    runner = OrtRunner(tiny_package / "onnx-fp32" / "model.onnx", 9, 128, mixed=True)
    runner.lengths[:8], runner.lengths[8] = 60, 40
    decodes = tuple(ScheduledChunk(f"d{i}", i, 60, (5,), True) for i in range(8))

    def forwards(n: int) -> int:
        chunk = ScheduledChunk("p", 8, 40, tuple(range(3, 3 + n)), False)
        return len(runner._forwards(SchedulerOutput({}, decodes, (), (chunk,), ())))

    # padded keys: 8 rows x (n - 1) positions x (60 + n) keys, against 2 rows x 1000
    assert forwards(1) == 1 and forwards(4) == 1  # 0 and 1536 keys
    assert forwards(16) == 2  # 9120 keys
