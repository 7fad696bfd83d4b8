"""The batched numpy sampler: filters, penalties, logprobs, seeds and batch invariance."""

from __future__ import annotations

import numpy as np
import pytest

from engine.request import SamplingParams
from engine.sampler import Sampler, apply_penalties, make_generator

V = 50


def random_logits(rows: int, seed: int = 0, vocab: int = V) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (rows, vocab)).astype(np.float32)


def sample(logits, params, histories=None, prompt_lens=None, seed=0):
    B = len(logits)
    histories = histories if histories is not None else [()] * B
    prompt_lens = prompt_lens if prompt_lens is not None else [0] * B
    gens = [make_generator(seed, i) for i in range(B)]
    return Sampler().sample(logits, params, histories, prompt_lens, gens)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1e-4),  # the temperature → 0 limit
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
    ],
    ids=["greedy", "temp-to-0", "top_k=1", "tiny-top_p", "min_p=1"],
)
def test_degenerate_settings_equal_argmax(params):
    logits = random_logits(8)
    for seed in range(5):
        out = sample(logits, [params] * 8, seed=seed)
        np.testing.assert_array_equal(out.tokens, logits.argmax(axis=1))


def test_filters_never_pick_a_dropped_token():
    logits = random_logits(1, vocab=8)
    ranked = np.argsort(-logits[0])
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    cases = {
        SamplingParams(top_k=3): set(ranked[:3]),
        # the smallest prefix of the ranking whose mass reaches top_p
        SamplingParams(top_p=0.9): set(
            ranked[: np.searchsorted(np.cumsum(probs[ranked]), 0.9) + 1]
        ),
        SamplingParams(min_p=0.2): set(np.flatnonzero(probs >= 0.2 * probs.max())),
    }
    for params, allowed in cases.items():
        picked = {int(sample(logits, [params], seed=s).tokens[0]) for s in range(300)}
        assert picked <= allowed and len(picked) > 1, params


def test_penalties_by_hand():
    logits = np.array([[2.0, -1.0, 0.5, 1.0, -2.0]], np.float32)
    history = [(0, 1, 2, 2, 3)]  # prompt (0, 1), output (2, 2, 3)
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)]
    out = apply_penalties(logits, params, history, [2])
    # repetition over prompt + output {0,1,2,3}: positive / 2, negative × 2 → [1, -2, .25, .5, -2]
    # presence/frequency over output only: token 2 (twice) -.5 -.5, token 3 (once) -.5 -.25
    np.testing.assert_allclose(out, [[1.0, -2.0, -0.75, -0.25, -2.0]])
    assert out is not logits and logits[0, 0] == 2.0  # the input is left alone
    # the penalised logits drive greedy: the prompt-only token 1 escapes presence/frequency
    greedy = SamplingParams(temperature=0, presence_penalty=5.0)
    hist = [(1, 0)]
    assert sample(logits, [greedy], hist, [1]).tokens[0] == 3  # 0 was output, 1 only prompted
    assert sample(logits, [SamplingParams(temperature=0)], hist, [1]).tokens[0] == 0


def test_no_penalty_costs_no_copy():
    logits = random_logits(3)
    assert apply_penalties(logits, [SamplingParams()] * 3, [(1, 2)] * 3, [1] * 3) is logits


def test_seeded_request_is_the_same_alone_or_batched():
    mine = SamplingParams(
        temperature=0.9,
        top_k=20,
        top_p=0.95,
        min_p=0.01,
        repetition_penalty=1.2,
        frequency_penalty=0.3,
        logprobs=2,
    )
    others = [
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.1, presence_penalty=1.0),
    ]
    alone_gen, batch_gen = make_generator(7), make_generator(7)
    other_gens = [make_generator(None) for _ in others]
    rng = np.random.default_rng(1)
    alone_hist, batch_hist = [3, 4, 5], [3, 4, 5]
    for _ in range(50):
        mine_logits = rng.normal(0, 3, (1, V)).astype(np.float32)
        a = Sampler().sample(mine_logits, [mine], [alone_hist], [3], [alone_gen])
        batch = np.concatenate([rng.normal(0, 3, (2, V)), mine_logits, rng.normal(0, 3, (2, V))])
        b = Sampler().sample(
            batch.astype(np.float32),
            [others[0], others[1], mine, others[2], others[3]],
            [[1], [2, 2], batch_hist, [], [9]],
            [1, 1, 3, 0, 0],
            [other_gens[0], other_gens[1], batch_gen, other_gens[2], other_gens[3]],
        )
        assert a.tokens[0] == b.tokens[2] and a.logprobs[0] == b.logprobs[2]
        alone_hist.append(int(a.tokens[0]))
        batch_hist.append(int(b.tokens[2]))


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = random_logits(1)
    params = [SamplingParams(temperature=1.5)]

    def run(seed):
        gen = make_generator(seed)
        return [
            int(Sampler().sample(logits, params, [()], [0], [gen]).tokens[0]) for _ in range(30)
        ]

    assert run(3) == run(3) != run(4)


def test_logprobs_are_raw_log_softmax_with_sorted_alternatives():
    logits = random_logits(4)
    params = [
        SamplingParams(logprobs=5, repetition_penalty=3.0, temperature=0.5),
        SamplingParams(),
        SamplingParams(logprobs=V + 10),
        SamplingParams(logprobs=1),
    ]
    out = sample(logits, params, [[0, 1, 2]] * 4, [1] * 4)
    raw = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert out.tokens.shape == out.logprobs.shape == (4,)
    # before penalties and temperature: the model's own score of the chosen token
    asked = [0, 2, 3]  # row 1 asked for none: its logprob is not computed
    np.testing.assert_allclose(out.logprobs[asked], raw[asked, out.tokens[asked]], rtol=1e-5)
    assert out.logprobs[1] == 0 and out.top_logprobs[1] is None
    for row, n in ((0, 5), (2, V), (3, 1)):
        ids, lps = out.top_logprobs[row]
        assert ids.shape == lps.shape == (n,)
        np.testing.assert_array_equal(ids, np.argsort(-raw[row], kind="stable")[:n])
        np.testing.assert_allclose(lps, raw[row, ids], rtol=1e-5)
        assert np.all(np.diff(lps) <= 0)
    np.testing.assert_allclose(np.exp(out.top_logprobs[2][1]).sum(), 1.0, rtol=1e-5)


def test_temperature_one_matches_softmax_frequencies():
    logits = np.array([[1.0, 0.0, -0.5, 2.0]], np.float32)
    expected = np.exp(logits[0]) / np.exp(logits[0]).sum()
    rows, steps = 2000, 10  # 20k draws, batched as they run in the engine
    gens = [make_generator(11, i) for i in range(rows)]
    batch = np.repeat(logits, rows, axis=0)
    params = [SamplingParams()] * rows
    draws = np.concatenate(
        [
            Sampler().sample(batch, params, [()] * rows, [0] * rows, gens).tokens
            for _ in range(steps)
        ]
    )
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, expected, atol=0.02)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 rows of logits but 1 params"):
        sample(random_logits(2), [SamplingParams()], [()] * 2, [0] * 2)


def test_candidate_shortcut_equals_full_sort(monkeypatch):
    # with 16 candidates of 50, top_k=5 and the narrow nucleus fit, top_k=30 and the wide nucleus
    # over a flat row take the full sort; both must pick what a full sort of every row picks
    logits = random_logits(6)
    logits[5] /= 30  # nearly flat: a 0.99 nucleus holds most of the vocabulary
    params = [
        SamplingParams(top_k=5),
        SamplingParams(top_k=30),
        SamplingParams(top_p=0.3),
        SamplingParams(top_p=0.9, top_k=40, min_p=0.05),
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.99),
    ]
    full = [sample(logits, params, seed=s).tokens for s in range(100)]
    monkeypatch.setattr("engine.sampler._CANDIDATES", 16)
    short = [sample(logits, params, seed=s).tokens for s in range(100)]
    np.testing.assert_array_equal(full, short)
