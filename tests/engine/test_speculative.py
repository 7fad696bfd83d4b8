"""Speculative decoding: n-gram drafts, when they are made, verification that keeps greedy and
seeded output identical, and the rejection rule's distribution, tested statistically."""

from __future__ import annotations

import argparse
import asyncio
import random

import numpy as np
import pytest
from prometheus_client import generate_latest
from tokenizers import Tokenizer

from engine.async_engine import AsyncEngine
from engine.cli import add_engine_arguments, engine_config
from engine.loader import EngineConfig, open_core
from engine.request import EngineRequest, RequestState, SamplingParams
from engine.sampler import Sampler, make_generator
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.speculative import (
    MIN_ACCEPTANCE,
    PAUSE_STEPS,
    WINDOW,
    NgramIndex,
    Speculator,
    accepted_prefix,
)
from gateway.metrics import GatewayMetrics

BASE = dict(n_slots=4, max_len=256, token_budget=32, max_waiting=64, retry_after_s=1.0)


def state(prompt, output=(), max_tokens=50, rid="r") -> RequestState:
    s = RequestState(EngineRequest(rid, tuple(prompt), max_tokens), arrival_time=0.0)
    s.output_token_ids = list(output)
    return s


# ── drafting ──


def test_the_latest_occurrence_of_the_longest_suffix_is_proposed():
    index = NgramIndex()
    index.extend([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert index.propose(3) == (7, 8, 5)  # "2 3" last occurred before "7 8 5"
    index.extend([7])
    assert index.propose(2) == (8, 5)  # "2 3 7" (n = 3)


def test_the_suffix_never_matches_itself_and_no_match_is_no_draft():
    index = NgramIndex()
    index.extend([4, 5, 6])
    assert index.propose(4) == ()
    index.extend([4])
    assert index.propose(4) == (5, 6, 4)  # the draft may run up to the end


def test_drafts_stay_within_the_budget_and_max_tokens():
    spec = Speculator(k=4)
    s = state([1, 2, 3, 4, 5, 6, 1, 2], max_tokens=3, output=[3])
    assert spec.drafts([s], budget=10)["r"] == (4,)  # 1 output + 1 draft + 1 next = 3
    assert spec.drafts([state([1, 2, 3, 1, 2], rid="q")], budget=2)["q"] == (3, 1)


def test_no_drafts_when_more_requests_decode_than_it_pays_for():
    spec = Speculator(k=4, max_batch=1)
    states = [state([1, 2, 1], rid=f"r{i}") for i in range(2)]
    assert spec.drafts(states, budget=100) == {}
    assert spec.drafts(states[:1], budget=100) == {"r0": (2, 1)}


def test_a_request_whose_drafts_are_rejected_stops_drafting_for_a_while():
    spec = Speculator(k=4)
    s = state([1, 2, 3, 1, 2, 3, 1, 2])
    for _ in range(WINDOW // 4):
        assert spec.drafts([s], 100)
        spec.verified("r", 4, 0)
    for _ in range(PAUSE_STEPS):
        assert spec.drafts([s], 100) == {}
    assert spec.drafts([s], 100)  # tried again
    assert spec.acceptance == 0.0 and MIN_ACCEPTANCE > 0


def test_accepted_prefix():
    assert accepted_prefix([5, 6, 7], [5, 6]) == 2
    assert accepted_prefix([5, 9, 7], [5, 6]) == 1
    assert accepted_prefix([4], []) == 0


# ── the scheduler with a fake model ──


def next_token(kv) -> int:
    """A function of the last two tokens: sequences fall into cycles, so drafts are often
    right, and sometimes wrong."""
    return (kv[-1] * 7 + kv[-2] * 3 + len(kv) // 40) % 13


class DraftModel:
    """A slot's cache as the runner keeps it: positions past a chunk's start are overwritten
    (rejected drafts included). A decode with a draft is verified as core does."""

    def __init__(self):
        self.contents: dict[int, list[int]] = {}

    def run(self, out: SchedulerOutput) -> dict:
        for m in out.moves:
            self.contents[m.dst] = self.contents.pop(m.src)[: m.n_tokens]
        sampled: dict = {}
        for chunk in out.chunks:
            kv = self.contents.get(chunk.slot, [])[: chunk.start]
            assert len(kv) == chunk.start
            kv += chunk.token_ids
            self.contents[chunk.slot] = kv
            if not chunk.sample:
                sampled[chunk.request_id] = None
            elif chunk.draft:
                end = len(kv) - chunk.draft
                targets = [next_token(kv[: end + j]) for j in range(chunk.draft + 1)]
                draft = chunk.token_ids[-chunk.draft :]
                sampled[chunk.request_id] = targets[: accepted_prefix(targets, draft) + 1]
            else:
                sampled[chunk.request_id] = next_token(kv)
        return sampled


def run(sched: Scheduler, requests) -> dict:
    for r in requests:
        sched.add(r)
    model, done = DraftModel(), {}
    while sched.has_unfinished():
        for s in sched.update(model.run(sched.schedule())):
            if s.finish_reason is not None:
                done[s.request_id] = (list(s.output_token_ids), s.finish_reason)
    return done


@pytest.mark.parametrize("seed", range(5))
def test_the_scheduler_gives_the_same_tokens_with_drafts(seed):
    rng = random.Random(seed)
    requests = [
        EngineRequest(
            f"r{i}",
            tuple(rng.randrange(13) for _ in range(rng.randint(2, 30))),
            rng.randint(1, 60),
            stop_token_ids=(rng.randrange(13),) if i % 3 == 0 else (),
        )
        for i in range(rng.randint(1, 6))
    ]
    plain = run(Scheduler(SchedulerConfig(**BASE)), requests)
    sched = Scheduler(SchedulerConfig(**BASE, speculative_tokens=rng.randint(1, 6)))
    sched.speculator.max_batch = 4  # draft at every batch size the test runs
    assert run(sched, requests) == plain
    assert sched.speculator.drafted_total > 0


# ── the rejection rule's distribution ──


def test_verification_samples_the_target_distribution():
    """Two positions over a 4-token vocabulary, the draft (2, 1): the first emitted token must
    follow p0; the draft's first token is accepted with probability p0(2), and then the next
    token follows p1; on rejection the token follows p0 without token 2, renormalised."""
    p0 = np.array([0.1, 0.2, 0.4, 0.3])
    p1 = np.array([0.5, 0.1, 0.1, 0.3])
    logits = np.log(np.stack([p0, p1, p1])).astype(np.float32)
    draft = (2, 1)
    params = [SamplingParams(temperature=1.0)] * 3
    sampler, n = Sampler(), 20_000
    first, second, rejected = np.zeros(4), np.zeros(4), np.zeros(4)
    for seed in range(n):
        g = make_generator(seed)
        tokens = sampler.sample(logits, params, [[0]] * 3, [1] * 3, [g, g, g]).tokens.tolist()
        emitted = tokens[: accepted_prefix(tokens, draft) + 1]
        first[emitted[0]] += 1
        if emitted[0] == draft[0]:
            second[emitted[1]] += 1
        else:
            rejected[emitted[0]] += 1
    residual = np.where(np.arange(4) == draft[0], 0, p0) / (1 - p0[draft[0]])
    assert chi_square(first, p0) < CRITICAL_3DF
    assert chi_square(second, p1) < CRITICAL_3DF
    assert chi_square(rejected[[0, 1, 3]], residual[[0, 1, 3]]) < CRITICAL_2DF
    assert abs(first[draft[0]] / n - p0[draft[0]]) < 0.015


CRITICAL_3DF, CRITICAL_2DF = 16.27, 13.82  # chi-square at p = 0.001


def chi_square(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


# ── a real tiny package ──


@pytest.fixture(scope="module")
def tokenizer(tiny_package) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_package / "tokenizer.json"))


REPETITIVE = "def foo(x):\n    return x + 1\n\ndef foo(y):\n    return y + 1\n\ndef foo(z):\n"


def generate(pkg, requests, **config):
    core = open_core(
        pkg, EngineConfig(n_slots=4, threads=1, token_budget=32, max_waiting=64, **config)
    )[0]
    if core.scheduler.speculator is not None:
        core.scheduler.speculator.max_batch = 4  # verify batched requests too
    for r in requests:
        core.add(r)
    out: dict = {}
    while core.has_work():
        for o in core.step():
            r = out.setdefault((o.request_id, o.index), {"tokens": [], "text": "", "lp": []})
            r["tokens"] += o.token_ids
            r["text"] += o.text
            # a verify forward's logits may differ from a decode's in the last float digits
            r["lp"] += [
                (lp.token_id, round(lp.logprob, 3), [(t, round(v, 3)) for t, v in lp.top])
                for lp in o.logprobs or ()
            ]
            if o.finished:
                r["finish"] = o.finish_reason
    return out, core


def test_greedy_and_seeded_output_is_identical_with_speculation(tiny_package, tokenizer):
    prompt = tuple(tokenizer.encode(REPETITIVE).ids)
    requests = [
        EngineRequest("greedy", prompt, 30, sampling=SamplingParams(temperature=0)),
        EngineRequest("seeded", prompt, 30, sampling=SamplingParams(0.8, top_p=0.9, seed=4)),
        EngineRequest("logprobs", prompt, 20, sampling=SamplingParams(temperature=0, logprobs=2)),
        EngineRequest(
            "penalties",
            prompt,
            20,
            sampling=SamplingParams(0.7, repetition_penalty=1.2, frequency_penalty=0.3, seed=1),
        ),
        EngineRequest("n", prompt, 12, sampling=SamplingParams(0.9, seed=2, n=2), stop=("\n\n",)),
    ]
    plain, _ = generate(tiny_package, requests)
    speculative, core = generate(tiny_package, requests, speculative_tokens=4)
    assert speculative == plain
    assert core.scheduler.speculator.accepted_total > 0
    assert core.generated_tokens_total == sum(len(r["tokens"]) for r in plain.values())


def test_the_acceptance_rate_reaches_the_engine_stats_and_metrics(tiny_package, tokenizer):
    prompt = tuple(tokenizer.encode(REPETITIVE).ids)
    config = EngineConfig(n_slots=2, threads=1, token_budget=32, speculative_tokens=4)
    core, info = open_core(tiny_package, config)
    core.add(EngineRequest("g", prompt, 30, sampling=SamplingParams(temperature=0)))
    while core.has_work():
        core.step()
    spec = core.scheduler.speculator
    stats = asyncio.run(AsyncEngine(core, info).stats())
    assert stats.spec_draft_tokens_total == spec.drafted_total > 0
    assert stats.spec_accepted_tokens_total == spec.accepted_total
    assert stats.spec_acceptance == pytest.approx(spec.accepted_total / spec.drafted_total)
    metrics = GatewayMetrics()
    metrics.observe_engine("tiny", stats)
    text = generate_latest(metrics.registry).decode()
    assert f'aimass_spec_decode_acceptance_ratio{{model="tiny"}} {stats.spec_acceptance}' in text


def test_the_cli_flags_reach_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    config = engine_config(parser.parse_args(["--speculative-tokens", "4", "--prefix-caching"]))
    assert config.speculative_tokens == 4 and config.prefix_caching
    assert config.scheduler(128).speculative_tokens == 4
    assert config.scheduler(128).prefix_caching
    default = engine_config(parser.parse_args([]))
    assert default.speculative_tokens == 0 and not default.prefix_caching
    with pytest.raises(ValueError, match=r"speculative_tokens = -1 must be >= 0"):
        EngineConfig(speculative_tokens=-1)
