"""Fidelity figures (llama.cpp's --kl-divergence statistics) and the parity gate: KL and top-1
agreement computed by hand on a tiny vocabulary, the gate's limits at their edges, the report
in the manifest (and manifests written before it had these fields), on the eager model and on
the real ONNX Runtime artifacts of the tiny package."""

from __future__ import annotations

import json
import math
import time

import msgspec
import numpy as np
import pytest
import torch

from exporters import fidelity
from exporters.fidelity import FidelityMeter
from exporters.parity import (
    MAX_PPL_INCREASE,
    MIN_TOP1_AGREEMENT,
    check_parity,
    gate_failure,
    held_out_text,
    summary,
)
from registry.manifest import ParityReport, PromptParity, Reports, decode, encode, load
from tests.registry.helpers import write_package
from trainer.checkpoint import load_model, resolve
from trainer.generate import generate

LN2, LN3 = math.log(2), math.log(3)


class EagerDecoder:
    """Parity's Decoder on the eager model; `flip_every` swaps the two largest logits of every
    n-th row of a call, so the target ranks another token first there."""

    def __init__(self, model, flip_every: int = 0):
        self.model, self.flip_every = model, flip_every

    @torch.no_grad()
    def greedy(self, prompt_ids, max_tokens, stop_ids=()):
        return generate(self.model, prompt_ids, max_tokens, stop_ids=stop_ids)

    @torch.no_grad()
    def logits(self, prompt_ids, decode_ids=()):
        out = self.model(torch.tensor([list(prompt_ids) + list(decode_ids)]))[0].numpy()
        if self.flip_every:
            for row in out[:: self.flip_every]:
                first, second = np.argsort(row)[-2:][::-1]
                row[first], row[second] = row[second], row[first]
        return out


@pytest.fixture(scope="module")
def tiny(tiny_run):
    model, tokenizer, _ = load_model(tiny_run)
    return model, tokenizer, held_out_text(resolve(tiny_run), tokenizer, 128)


# --- the figures, by hand ---------------------------------------------------------------------


def test_identical_logits_have_zero_kl_and_full_top1_agreement():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 50)).astype(np.float32) * 3
    meter = FidelityMeter()
    meter.add(logits, logits.copy(), rng.integers(0, 50, 10))
    f = meter.result()
    assert f.positions == 10 and f.top1_agreement == 1.0
    assert f.kl_mean == f.kl_median == f.kl_p99 == f.kl_max == 0.0
    assert f.ppl_target == f.ppl_ref


def test_kl_top1_and_perplexity_of_a_perturbed_target_match_a_hand_computation():
    # three positions over a vocabulary of 3:
    # 0: p = (1/4, 1/2, 1/4), q uniform      KL = ½ ln(3/4) + ½ ln(3/2) = ½ ln(9/8); top-1 1 vs 0
    # 1: p = (3/4, 1/4, 0⁺) … exact below     KL by the sum;                    top-1 0 vs 0
    # 2: identical                            KL = 0;                           top-1 agrees
    ref = np.array([[0.0, LN2, 0.0], [LN3, 0.0, -50.0], [1.0, 2.0, 3.0]])
    got = np.array([[0.0, 0.0, 0.0], [LN2, 0.0, -50.0], [1.0, 2.0, 3.0]])
    next_ids = np.array([1, 0, 2])
    meter = FidelityMeter()
    meter.add(ref.astype(np.float32), got.astype(np.float32), next_ids)
    f = meter.result()

    p1 = np.array([3, 1, math.exp(-50)]) / (4 + math.exp(-50))
    q1 = np.array([2, 1, math.exp(-50)]) / (3 + math.exp(-50))
    kl = [0.5 * math.log(9 / 8), float((p1 * np.log(p1 / q1)).sum()), 0.0]
    assert f.positions == 3
    assert f.kl_mean == pytest.approx(sum(kl) / 3, rel=1e-6)
    assert f.kl_max == pytest.approx(max(kl), rel=1e-6)
    assert f.kl_median == pytest.approx(sorted(kl)[1], rel=1e-6)
    # llama.cpp's percentile: linear between the ranks around 0.99 × (n - 1) = 1.98
    lo, hi = sorted(kl)[1:]
    assert f.kl_p99 == pytest.approx(lo + 0.98 * (hi - lo), rel=1e-6)
    assert f.top1_agreement == pytest.approx(2 / 3)
    p_next_ref = [1 / 2, p1[0], math.exp(3) / (math.e + math.exp(2) + math.exp(3))]
    p_next_got = [1 / 3, q1[0], p_next_ref[2]]
    assert f.ppl_ref == pytest.approx(math.exp(-np.log(p_next_ref).mean()), rel=1e-6)
    assert f.ppl_target == pytest.approx(math.exp(-np.log(p_next_got).mean()), rel=1e-6)


def test_chunked_figures_equal_one_block(monkeypatch):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(37, 20)).astype(np.float32)
    got = ref + rng.normal(scale=0.5, size=ref.shape).astype(np.float32)
    ids = rng.integers(0, 20, 37)
    whole = FidelityMeter()
    whole.add(ref, got, ids)
    monkeypatch.setattr(fidelity, "FIDELITY_CHUNK", 4)
    chunked = FidelityMeter()
    chunked.add(ref[:10], got[:10], ids[:10])  # and over several calls
    chunked.add(ref[10:], got[10:], ids[10:])
    a, b = whole.result(), chunked.result()
    for name in ("kl_mean", "kl_median", "kl_p99", "kl_max", "ppl_ref", "ppl_target"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-12)
    assert a.top1_agreement == b.top1_agreement and a.positions == b.positions == 37


def test_non_finite_target_logits_are_infinitely_far():
    ref = np.zeros((2, 4), dtype=np.float32)
    got = ref.copy()
    got[1, 2] = np.nan
    meter = FidelityMeter()
    meter.add(ref, got, [0, 1])
    f = meter.result()
    assert f.kl_max == f.kl_p99 == math.inf and f.kl_median == math.inf
    assert f.top1_agreement == 0.5 and f.ppl_target == math.inf


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"one shape \(N, V\) .* got \(2, 4\), \(2, 5\)"):
        FidelityMeter().add(np.zeros((2, 4)), np.zeros((2, 5)), [0, 1])


# --- the gate ---------------------------------------------------------------------------------


def report(**kw) -> ParityReport:
    fields = {
        "target": "onnx-int4",
        "exact": False,
        "prompts": [],
        "tokens_matched": 3,
        "tokens_total": 10,
        "max_abs_logit_diff": 0.5,
        "held_out": "built-in",
        "held_out_tokens": 1000,
        "ppl_eager": 10.0,
        "ppl_target": 10.05,
        "ppl_increase": 0.005,
        "max_ppl_increase": MAX_PPL_INCREASE,
        "passed": True,
        "reason": "",
        "kl_mean": 0.01,
        "kl_median": 0.005,
        "kl_p99": 0.1,
        "kl_max": 0.3,
        "top1_agreement": 0.99,
        "positions": 1000,
        "min_top1_agreement": MIN_TOP1_AGREEMENT,
    }
    return ParityReport(**(fields | kw))


def test_the_gates_defaults():
    assert (MAX_PPL_INCREASE, MIN_TOP1_AGREEMENT) == (0.01, 0.98)


@pytest.mark.parametrize(
    ("top1", "reason"),
    [
        (0.98, ""),
        (0.979, "top-1 agreement 97.9% < 98%"),
        (0.9795, "top-1 agreement 97.95% < 98%"),  # never "98.0% < 98%"
        (0.912, "top-1 agreement 91.2% < 98%"),
    ],
)
def test_top1_agreement_gate_at_its_edge(top1, reason):
    assert gate_failure(report(top1_agreement=top1)) == reason


@pytest.mark.parametrize(
    ("ppl", "reason"),
    [
        (10.1, ""),  # exactly 1% higher
        (10.11, "perplexity +1.10% > +1% (reference 10.000 → 10.110)"),
    ],
)
def test_perplexity_gate_at_its_edge(ppl, reason):
    assert gate_failure(report(ppl_target=ppl, ppl_increase=ppl / 10 - 1)) == reason


def test_greedy_agreement_decides_only_for_exact_targets():
    diverged = [PromptParity(prompt="The", tokens_matched=2, tokens_total=8, first_divergence=2)]
    assert gate_failure(report(prompts=diverged)) == ""
    assert gate_failure(report(prompts=diverged, exact=True)).startswith(
        "greedy decoding diverged from eager PyTorch on 1 of 1 prompts (first: 'The' at token 2)"
    )


def test_every_failed_figure_is_named():
    r = report(ppl_target=11.8, ppl_increase=0.18, top1_agreement=0.75, max_abs_logit_diff=1.0)
    assert gate_failure(r) == (
        "perplexity +18.00% > +1% (reference 10.000 → 11.800); top-1 agreement 75% < 98%"
    )
    assert "the artifact produced non-finite logits" in gate_failure(report(kl_mean=math.inf))


# --- check_parity end to end ------------------------------------------------------------------


def test_the_eager_model_against_itself_passes_with_zero_kl(tiny):
    model, tokenizer, held = tiny
    start = time.perf_counter()
    r = check_parity(
        model, tokenizer, EagerDecoder(model), "x", exact=True, max_len=128, held_out=held
    )
    assert time.perf_counter() - start < 30  # a few seconds on a quiet machine
    assert r.passed and r.reason == "" and r.top1_agreement == 1.0
    assert r.kl_max < 1e-9 and r.ppl_increase == pytest.approx(0, abs=1e-9)
    assert r.positions == r.held_out_tokens == held.n_tokens > 100
    assert r.min_top1_agreement == MIN_TOP1_AGREEMENT and r.max_ppl_increase == MAX_PPL_INCREASE


def test_a_target_that_ranks_other_tokens_first_is_refused(tiny):
    model, tokenizer, held = tiny
    every = 20  # position 0, 20, 40… of each held-out sequence: ~5% of them
    flipped = sum(math.ceil((len(s) - 1) / every) for s in held.sequences)
    want = 1 - flipped / held.n_tokens
    r = check_parity(
        model,
        tokenizer,
        EagerDecoder(model, flip_every=every),
        "onnx-int4",
        exact=False,
        max_len=128,
        held_out=held,
    )
    assert r.top1_agreement == pytest.approx(want) and want < MIN_TOP1_AGREEMENT
    assert not r.passed and f"top-1 agreement {round(want * 100, 1):g}% < 98%" in r.reason
    assert r.kl_max > 0 and r.kl_mean > 0 and r.kl_p99 <= r.kl_max
    # the same target passes a gate set below what it measures
    lenient = check_parity(
        model,
        tokenizer,
        EagerDecoder(model, flip_every=every),
        "onnx-int4",
        exact=False,
        max_len=128,
        held_out=held,
        max_ppl_increase=math.inf,
        min_top1_agreement=want,
    )
    assert lenient.passed, lenient.reason


def test_summary_prints_the_fidelity_figures():
    line = summary(report())
    assert line.startswith("onnx-int4: passed: perplexity 10.000 → 10.050 (+0.50%)")
    assert "top-1 agreement 99.00%" in line and "KL mean 1.00e-02 p99 1.00e-01 max 3.00e-01" in line
    assert "over 1000 positions of built-in, greedy 3/10 tokens match" in line
    failed = report(passed=False, forced=True, reason="top-1 agreement 91.2% < 98%")
    assert summary(failed).startswith("onnx-int4: FORCED: ")
    assert summary(failed).endswith("; top-1 agreement 91.2% < 98%")


# --- in the manifest --------------------------------------------------------------------------

NEW_FIELDS = (
    "kl_mean",
    "kl_median",
    "kl_p99",
    "kl_max",
    "top1_agreement",
    "positions",
    "min_top1_agreement",
)


def test_a_manifest_written_before_the_fidelity_fields_decodes(tmp_path):
    data = json.loads((write_package(tmp_path / "pkg") / "manifest.json").read_bytes())
    old = data["reports"]["parity"]["onnx-fp32"]
    for name in NEW_FIELDS:
        old.pop(name, None)
    r = decode(json.dumps(data)).reports.parity["onnx-fp32"]
    assert (r.kl_mean, r.top1_agreement, r.positions, r.min_top1_agreement) == (None, None, 0, None)
    assert r.passed and r.ppl_target == 10.0
    line = summary(r)  # an old report still prints, without figures it never measured
    assert "KL" not in line and "top-1" not in line and "over 512 positions" in line


def test_the_fidelity_fields_round_trip():
    r = report()
    data = msgspec.json.encode(Reports(parity={r.target: r}))
    assert msgspec.json.decode(data, type=Reports).parity["onnx-int4"] == r


def test_the_tiny_package_records_fidelity_of_its_onnx_runtime_artifacts(tiny_package):
    m = load(tiny_package)
    assert decode(encode(m)) == m
    fp32, int8 = m.reports.parity["onnx-fp32"], m.reports.parity["onnx-int8"]
    for r in (fp32, int8):
        assert r.positions == r.held_out_tokens > 100
        assert -1e-9 < r.kl_median <= r.kl_p99 <= r.kl_max and r.kl_mean <= r.kl_max
        assert r.min_top1_agreement == MIN_TOP1_AGREEMENT
    assert fp32.passed and fp32.top1_agreement == 1.0 and fp32.kl_max < 1e-6
    assert int8.kl_mean > fp32.kl_mean  # 8-bit weights move the distribution, a little
