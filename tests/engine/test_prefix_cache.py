"""Prefix caching: matching, eviction and compaction with fake requests and a fake cache (no
runtime), then identical output with it on and off on a real tiny package."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from engine.loader import EngineConfig, open_core
from engine.prefix_cache import PREFIX_MIN_TOKENS, common_prefix
from engine.request import EngineRequest, FinishReason, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

VOCAB = 50
BASE = dict(n_slots=4, max_len=256, token_budget=64, max_waiting=64, retry_after_s=1.0)


def scheduler(**overrides) -> Scheduler:
    return Scheduler(SchedulerConfig(**(BASE | overrides)), clock=lambda: 0.0)


def req(rid: str, prompt: tuple[int, ...], max_tokens: int = 4) -> EngineRequest:
    return EngineRequest(rid, prompt, max_tokens)


def next_token(tokens) -> int:
    return hash(tuple(tokens)) % VOCAB  # hashes of int tuples do not depend on PYTHONHASHSEED


class CacheModel:
    """What each slot's cache holds, as the runner keeps it: a released slot reads as empty, a
    move empties its source, a copy keeps it. The next token hashes the slot's contents, so a
    prefix copied from the wrong slot, or from one released under it, changes the output."""

    def __init__(self):
        self.contents: dict[int, list[int]] = {}

    def run(self, out: SchedulerOutput) -> dict[str, int | None]:
        for slot in out.released:
            self.contents.pop(slot, None)
        for m in out.moves:
            self.contents[m.dst] = self.contents.pop(m.src, [])[: m.n_tokens]
        for c in out.copies:
            assert c.src != c.dst
            self.contents[c.dst] = list(self.contents.get(c.src, [])[: c.n_tokens])
        sampled: dict[str, int | None] = {}
        for chunk in out.chunks:
            kv = self.contents.get(chunk.slot, [])[: chunk.start]
            assert len(kv) == chunk.start, f"{chunk.request_id}: slot {chunk.slot} lost its past"
            kv += chunk.token_ids
            self.contents[chunk.slot] = kv
            sampled[chunk.request_id] = next_token(kv) if chunk.sample else None
        return sampled


def run(sched: Scheduler, arrivals: dict[int, list[EngineRequest]], model=None) -> dict:
    """Steps until idle, adding `arrivals[step]` before each → {id: (tokens, finish)}."""
    model = model or CacheModel()
    done: dict = {}
    step = 0
    while sched.has_unfinished() or any(s >= step for s in arrivals):
        for r in arrivals.get(step, ()):
            sched.add(r)
        step += 1
        if not sched.has_unfinished():
            continue
        out = sched.schedule()
        for state in sched.update(model.run(out)):
            if state.finish_reason is not None:
                done[state.request_id] = (list(state.output_token_ids), state.finish_reason)
    return done


SYSTEM = tuple(range(100, 100 + 48))  # a shared "system prompt" longer than PREFIX_MIN_TOKENS


def test_common_prefix_matches_a_plain_loop():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 40)
        a = tuple(rng.randint(0, 2) for _ in range(n))
        b = a[: rng.randint(0, n)] + tuple(rng.randint(0, 2) for _ in range(rng.randint(0, 9)))
        limit = rng.randint(0, 45)
        plain = 0
        while plain < min(len(a), len(b), limit) and a[plain] == b[plain]:
            plain += 1
        assert common_prefix(a, b, limit) == plain


def test_a_finished_request_stays_cached_and_a_shared_prefix_is_copied():
    sched, model = scheduler(prefix_caching=True), CacheModel()
    run(sched, {0: [req("a", SYSTEM + (1, 2, 3))]}, model)
    assert sched.usage().slots_used == 0  # cached, not running
    sched.add(req("b", SYSTEM + (7, 8)))
    out = sched.schedule()
    # b takes the entry's slot 0 in place (a request never sits above an entry); the entry's
    # tokens move up to slot 1, the slot b was handed, and stay cached for the next one
    (copy,) = out.copies
    assert (copy.src, copy.dst, copy.n_tokens) == (0, 1, len(SYSTEM) + 3 + 3)
    (chunk,) = out.chunks
    assert chunk.slot == 0 and chunk.start == len(SYSTEM) and chunk.token_ids == (7, 8)
    assert not {0, 1} & set(out.released)  # both slots' tokens are used
    assert sched.prefix_hits == 1 and sched.prefix_hit_tokens == len(SYSTEM)
    sched.update(model.run(out))
    sched.add(req("c", SYSTEM + (9,)))
    out = sched.schedule()
    (chunk,) = (c for c in out.chunks if c.request_id == "c")
    assert chunk.start == len(SYSTEM) and sched.prefix_hits == 2


def test_the_last_prompt_token_is_always_computed():
    sched = scheduler(prefix_caching=True)
    run(sched, {0: [req("a", SYSTEM)]})
    sched.add(req("b", SYSTEM))
    out = sched.schedule()
    (chunk,) = out.chunks
    assert chunk.start == len(SYSTEM) - 1 and chunk.sample  # its logits give the first token


def test_short_prefixes_are_not_cached():
    sched = scheduler(prefix_caching=True)
    short = tuple(range(PREFIX_MIN_TOKENS - 8))  # + 3 output tokens computed: still short
    run(sched, {0: [req("a", short)]})
    sched.add(req("b", short + (5,)))
    out = sched.schedule()
    assert not out.copies and out.chunks[0].start == 0


def test_the_least_recently_used_entry_is_evicted_when_a_slot_is_needed():
    sched, model = scheduler(prefix_caching=True), CacheModel()
    prompts = {f"e{i}": tuple(range(1000 * (i + 1), 1000 * (i + 1) + 40)) for i in range(4)}
    for rid, p in prompts.items():
        run(sched, {0: [req(rid, p)]}, model)
    assert all(rid in sched.prefix for rid in prompts)
    # 4 slots, 4 entries: x needs a slot; e0 is the least recently used but x reads it, so e1
    # goes, and the hit makes e0 the most recently used
    run(sched, {0: [req("x", prompts["e0"] + (9,))]}, model)
    assert "e1" not in sched.prefix and all(k in sched.prefix for k in ("e0", "e2", "e3", "x"))
    run(sched, {0: [req("y", tuple(range(5000, 5040)))]}, model)
    assert "e2" not in sched.prefix and all(k in sched.prefix for k in ("e0", "e3", "x", "y"))


def test_entries_below_a_running_request_are_evicted_and_the_running_compacted():
    sched, model = scheduler(prefix_caching=True), CacheModel()
    long_a, long_b = SYSTEM + (1,), tuple(range(3000, 3040))
    sched.add(req("a", long_a, max_tokens=2))
    sched.add(req("b", long_b, max_tokens=30))
    while "a" in sched._states:
        sched.update(model.run(sched.schedule()))
    assert "a" in sched.prefix  # slot 0, below b's slot 1
    out = sched.schedule()
    assert "a" not in sched.prefix  # it would ride b's decode forward as an idle row
    (move,) = out.moves
    assert (move.src, move.dst) == (1, 0) and 1 not in out.released
    sched.update(model.run(out))


def test_a_running_requests_computed_prompt_is_a_source():
    sched = scheduler(prefix_caching=True)
    sched.add(req("a", SYSTEM + (1,), max_tokens=8))
    model = CacheModel()
    sched.update(model.run(sched.schedule()))  # a's prompt is computed
    sched.add(req("b", SYSTEM + (2,)))
    out = sched.schedule()
    (copy,) = out.copies
    assert copy.src == sched.state("a").slot and copy.n_tokens == len(SYSTEM)


def test_a_new_request_with_a_cached_requests_id_evicts_it():
    sched = scheduler(prefix_caching=True)
    run(sched, {0: [req("a", SYSTEM + (1,))]})
    assert "a" in sched.prefix
    done = run(sched, {0: [req("a", SYSTEM + (1,))]})
    assert done["a"][1] is FinishReason.LENGTH


def test_a_tight_pool_takes_the_entry_over_in_place():
    # the pool holds one request: the entry must go for the next, which then reuses its slot
    sched = scheduler(prefix_caching=True, kv_tokens=256)
    run(sched, {0: [req("a", SYSTEM + (1,), max_tokens=100)]})
    sched.add(req("b", SYSTEM + (2,), max_tokens=200))
    out = sched.schedule()
    assert not out.copies and out.chunks[0].start == len(SYSTEM)
    assert out.chunks[0].slot not in out.released


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_gives_the_same_tokens_with_and_without_caching(seed):
    rng = random.Random(seed)
    systems = [tuple(rng.randrange(VOCAB) for _ in range(rng.randint(30, 70))) for _ in range(3)]
    arrivals: dict[int, list[EngineRequest]] = {}
    for i in range(40):
        prompt = rng.choice(systems)[: rng.randint(20, 70)]
        prompt += tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 20)))
        arrivals.setdefault(rng.randint(0, 60), []).append(
            req(f"r{i}", prompt, max_tokens=rng.randint(1, 12))
        )
    kw = dict(n_slots=rng.choice([2, 4, 6]), token_budget=rng.choice([8, 16, 64]))
    kw["kv_tokens"] = rng.choice([None, 256 * kw["n_slots"] // 2])
    plain = run(scheduler(**kw), arrivals)
    cached_sched = scheduler(prefix_caching=True, **kw)
    assert run(cached_sched, arrivals) == plain
    assert cached_sched.prefix_hits > 0


# ── a real tiny package ──


@pytest.fixture(scope="module")
def tokenizer(tiny_package) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_package / "tokenizer.json"))


def generate(pkg, waves, **config) -> tuple[dict, object]:
    core = open_core(
        pkg, EngineConfig(n_slots=4, threads=1, token_budget=16, max_waiting=64, **config)
    )[0]
    out: dict = {}
    for wave in waves:
        for r in wave:
            core.add(r)
        while core.has_work():
            for o in core.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
    return out, core


def test_identical_output_with_prefix_caching_on_and_off(tiny_package, tokenizer):
    system = (
        "Return the value of the argument if the argument is a list of values, else return "
        "the default value of the class. "
    )
    tails = ["The value", "A list of", "If the", "The value of", "class"]
    waves = []
    for w in range(3):
        wave = []
        for i, tail in enumerate(tails[w : w + 2 + w]):
            rid = f"w{w}r{i}"
            sampling = SamplingParams(temperature=0) if i % 2 else SamplingParams(0.8, seed=i)
            ids = tuple(tokenizer.encode(system + tail).ids)
            wave.append(EngineRequest(rid, ids, 12, sampling=sampling))
        waves.append(wave)
    plain, _ = generate(tiny_package, waves)
    cached, core = generate(tiny_package, waves, prefix_caching=True)
    assert cached == plain
    assert core.scheduler.prefix_hits >= 3
