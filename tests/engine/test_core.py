"""The engine on a real tiny package: ONNX Runtime, scheduler, sampler and detokenizer together."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer

from engine.core import EngineCore
from engine.errors import ContextOverflow, Overloaded
from engine.loader import EngineConfig, LoadError, open_core
from engine.request import EngineRequest, SamplingParams
from trainer.checkpoint import load_model
from trainer.generate import generate

PROMPTS = ["Return the", "The value of", "If the argument is", "A list of", "class"]


@pytest.fixture(scope="module")
def tokenizer(tiny_package) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_package / "tokenizer.json"))


def make_core(pkg, **kw) -> EngineCore:
    config = {"n_slots": 4, "threads": 1, "token_budget": 16, "max_waiting": 64} | kw
    return open_core(pkg, EngineConfig(**config))[0]


def req(tokenizer, rid, prompt, max_tokens, **kw) -> EngineRequest:
    stop = kw.pop("stop", ())
    stop_ids = kw.pop("stop_token_ids", ())
    return EngineRequest(
        rid,
        tuple(tokenizer.encode(prompt).ids),
        max_tokens,
        stop_token_ids=stop_ids,
        sampling=SamplingParams(**kw),
        stop=stop,
    )


def drain(core: EngineCore, max_steps: int = 10_000, on_step=None) -> dict:
    """Steps until idle → {(request id, choice): {"tokens", "text", "finish", "logprobs"}}."""
    results: dict = {}
    for step in range(max_steps):
        if on_step is not None:
            on_step(step)
        if not core.has_work():
            if on_step is None:
                break
            continue
        for out in core.step():
            r = results.setdefault(
                (out.request_id, out.index), {"tokens": [], "text": "", "logprobs": []}
            )
            r["tokens"] += out.token_ids
            r["text"] += out.text
            r["logprobs"] += out.logprobs or ()
            if out.finished:
                r["finish"], r["usage"] = out.finish_reason, out.completion_tokens
                r["timings"] = out.timings
    return results


def count_moves(core: EngineCore) -> list[tuple[int, int, int]]:
    """Records every cache-row move the runner makes (compaction), moving as before."""
    moves, move = [], core.runner.move

    def recorded(src, dst, n_tokens):
        moves.append((src, dst, n_tokens))
        move(src, dst, n_tokens)

    core.runner.move = recorded
    return moves


def alone(pkg, request: EngineRequest) -> dict:
    core = make_core(pkg, n_slots=1)
    core.add(request)
    return drain(core)


def test_greedy_equals_eager_pytorch_greedy(tiny_package, tiny_run, tokenizer):
    model, _, _ = load_model(tiny_run)
    core = make_core(tiny_package, target="onnx-fp32")
    for i, prompt in enumerate(PROMPTS):
        core.add(req(tokenizer, f"r{i}", prompt, 24, temperature=0))
    results = drain(core)
    for i, prompt in enumerate(PROMPTS):
        expected = generate(model, tokenizer.encode(prompt).ids, 24)
        assert results[(f"r{i}", 0)]["tokens"] == expected, prompt
        assert results[(f"r{i}", 0)]["text"] == tokenizer.decode(expected)


def test_join_and_leave_at_every_step_changes_nobodys_output(tiny_package, tokenizer):
    """A new request arrives at every step while others finish; each output equals the same
    request run alone (seeded sampling, so every row draws from its own generator)."""
    requests = [
        req(tokenizer, f"r{i}", PROMPTS[i % 5], 6 + 3 * (i % 4), temperature=0.9, seed=i)
        for i in range(10)
    ]
    core = make_core(tiny_package, n_slots=3, token_budget=8)  # chunked prompts, full slots
    moves = count_moves(core)
    together = drain(core, on_step=lambda s: s < len(requests) and core.add(requests[s]))
    assert core.has_work() is False
    assert moves, "the tail should compact the running requests"
    for r in requests:
        assert (
            together[(r.request_id, 0)]["tokens"]
            == alone(tiny_package, r)[(r.request_id, 0)]["tokens"]
        )


def test_a_one_token_prompt_chunk_beside_full_decodes_does_not_sample(tiny_package, tokenizer):
    """token_budget == n_slots: with the other slots decoding, the prompt in progress gets one
    token per step, a chunk that must not sample (it is not the prompt's last token)."""
    requests = [
        req(tokenizer, "a", PROMPTS[0], 30, temperature=0),
        req(tokenizer, "b", PROMPTS[1], 30, temperature=0),
        req(tokenizer, "long", " ".join(PROMPTS), 4, temperature=0),
    ]
    core = make_core(tiny_package, n_slots=3, token_budget=3)
    chunked = []
    plan = core.plan

    def recorded():
        p = plan()
        chunked.extend(c for c in p.step.chunks if c.request_id == "long" and c.start > 0)
        return p

    core.plan = recorded
    together = drain(core, on_step=lambda s: s < 3 and core.add(requests[s]))
    assert any(c.n_tokens == 1 and not c.sample for c in chunked), "no one-token chunk ran"
    for r in requests:
        got, want = together[(r.request_id, 0)], alone(tiny_package, r)[(r.request_id, 0)]
        assert (got["tokens"], got["text"]) == (want["tokens"], want["text"]), r.request_id


def test_random_arrivals_lengths_and_aborts_match_each_request_alone(tiny_package, tokenizer):
    """100 requests with random prompts, lengths, sampling settings, arrival steps and aborts;
    every request that was not aborted must produce exactly its output when run alone."""
    rng = random.Random(1234)
    vocab = tokenizer.get_vocab_size()
    requests, arrivals, aborts = [], {}, {}
    for i in range(100):
        prompt = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, 40)))
        params = rng.choice(
            [
                SamplingParams(temperature=0),
                SamplingParams(temperature=1.0, seed=rng.randrange(1 << 30)),
                SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=i),
                SamplingParams(temperature=0.8, min_p=0.05, repetition_penalty=1.3, seed=i),
                SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.5),
            ]
        )
        r = EngineRequest(f"r{i}", prompt, rng.randint(1, 30), sampling=params)
        requests.append(r)
        arrivals.setdefault(rng.randint(0, 120), []).append(r)
        if rng.random() < 0.15:
            aborts.setdefault(rng.randint(0, 150), []).append(r.request_id)
    # every slot full (6 × the tiny package's 128): the slots, not the KV pool, bound the load
    core = make_core(tiny_package, n_slots=6, token_budget=24, max_waiting=200, kv_tokens=768)
    moves = count_moves(core)

    def on_step(step):
        for r in arrivals.get(step, []):
            core.add(r)
        for rid in aborts.get(step, []):
            core.abort(rid)

    results = drain(core, max_steps=2000, on_step=on_step)
    assert not core.has_work()
    checked = 0
    for r in requests:
        got = results.get((r.request_id, 0))
        if got is None or got.get("finish") == "abort":
            continue
        assert got["tokens"] == alone(tiny_package, r)[(r.request_id, 0)]["tokens"], r
        checked += 1
    assert checked >= 70
    assert len(moves) >= 3, "compaction (cache rows moved between slots) was not exercised"
    assert core.scheduler.usage().slots_used == 0


def test_stop_strings_end_the_text_before_them_and_free_the_slot(tiny_package, tokenizer):
    settings = {"temperature": 0.8, "seed": 3}
    free = alone(tiny_package, req(tokenizer, "a", "Return the", 30, **settings))[("a", 0)]
    text = free["text"]
    middle = len(text) // 2
    stop = text[middle : middle + 2]  # two characters, likely across a token boundary
    assert stop.strip(), text
    cut = text.index(stop)
    core = make_core(tiny_package)
    core.add(req(tokenizer, "a", "Return the", 30, stop=(stop, "never seen"), **settings))
    got = drain(core)[("a", 0)]
    assert got["text"] == text[:cut]
    assert got["finish"] == "stop"
    assert stop not in got["text"]
    assert core.scheduler.usage().slots_used == 0


def test_a_stop_token_ends_the_choice_without_text(tiny_package, tokenizer):
    free = alone(tiny_package, req(tokenizer, "a", "The value of", 20, temperature=0))[("a", 0)]
    third = free["tokens"][2]
    core = make_core(tiny_package)
    core.add(req(tokenizer, "a", "The value of", 20, temperature=0, stop_token_ids=(third,)))
    got = drain(core)[("a", 0)]
    assert got["tokens"] == free["tokens"][:3]
    assert got["finish"] == "stop" and got["usage"] == 3
    assert got["text"] == tokenizer.decode(free["tokens"][:2])


def test_an_aborted_request_frees_its_slot_at_the_next_step(tiny_package, tokenizer):
    core = make_core(tiny_package, n_slots=1)
    core.add(req(tokenizer, "a", "Return the", 50, temperature=0))
    core.add(req(tokenizer, "b", "class", 5, temperature=0))
    core.step()
    core.step()
    assert core.scheduler.num_waiting == 1  # b waits for a's slot
    assert core.abort("a") is True
    outs = core.step()  # the boundary: a leaves, b starts in its slot
    assert [(o.request_id, o.finish_reason) for o in outs if o.finished] == [("a", "abort")]
    assert core.scheduler.num_waiting == 0
    first = [t for o in outs if o.request_id == "b" for t in o.token_ids]
    assert (
        first + drain(core)[("b", 0)]["tokens"]
        == alone(tiny_package, req(tokenizer, "b", "class", 5, temperature=0))[("b", 0)]["tokens"]
    )
    assert core.abort("a") is False


def test_a_full_queue_is_overloaded_with_a_retry_hint_and_nothing_changes(tiny_package, tokenizer):
    core = make_core(tiny_package, n_slots=1, max_waiting=2, retry_after_s=2.5)
    for i in range(2):
        core.add(req(tokenizer, f"r{i}", "class", 4, temperature=0))
    with pytest.raises(Overloaded) as e:
        core.add(req(tokenizer, "late", "class", 4, temperature=0))
    assert e.value.retry_after_s == 2.5
    assert "2 requests waiting, the limit is 2" in str(e.value)
    with pytest.raises(Overloaded):  # n=2 needs two places in the queue
        core.add(req(tokenizer, "two", "class", 4, temperature=0, n=2))
    assert set(drain(core)) == {("r0", 0), ("r1", 0)}


def test_admission_refuses_what_cannot_fit_with_the_numbers(tiny_package, tokenizer):
    core = make_core(tiny_package, max_len=40)
    with pytest.raises(ContextOverflow, match=r"prompt \(3 tokens\) \+ max_tokens \(38\) = 41"):
        core.add(EngineRequest("x", (5, 6, 7), 38))
    core.add(EngineRequest("y", (5, 6, 7), 37))


def test_n_choices_are_distinct_and_reproducible(tiny_package, tokenizer):
    r = req(tokenizer, "a", "Return the", 12, temperature=1.0, seed=7, n=3)
    core = make_core(tiny_package)
    core.add(r)
    first = drain(core)
    core.add(r)
    again = drain(core)
    for key, got in first.items():
        assert (again[key]["tokens"], again[key]["text"]) == (got["tokens"], got["text"])
    outs = [first[("a", i)]["tokens"] for i in range(3)]
    assert len({tuple(o) for o in outs}) > 1
    assert all(first[("a", i)]["finish"] == "length" for i in range(3))


def test_logprobs_are_the_models_and_name_the_alternatives(tiny_package, tokenizer):
    core = make_core(tiny_package, target="onnx-fp32")
    core.add(req(tokenizer, "a", "Return the", 5, temperature=0, logprobs=3))
    got = drain(core)[("a", 0)]
    assert len(got["logprobs"]) == 5
    for lp, token in zip(got["logprobs"], got["tokens"], strict=True):
        assert lp.token_id == token
        assert len(lp.top) == 3
        assert lp.top[0][0] == token  # greedy: the chosen token is the likeliest
        assert np.isclose(lp.top[0][1], lp.logprob) and lp.logprob <= 0


def test_timings_are_ordered_and_cover_every_gap(tiny_package, tokenizer):
    core = make_core(tiny_package)
    core.add(req(tokenizer, "a", "Return the", 8, temperature=0))
    t = drain(core)[("a", 0)]["timings"]
    assert 0 <= t.queue_s <= t.ttft_s <= t.e2e_s
    assert len(t.itl_s) == 7 and all(g >= 0 for g in t.itl_s)


def test_a_damaged_package_or_missing_target_is_refused(tiny_package, tmp_path):
    import shutil

    with pytest.raises(LoadError, match="no target 'onnx-int4'"):
        open_core(tiny_package, EngineConfig(target="onnx-int4"))
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package, copy)
    graph = next(copy.glob("onnx-fp32/*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(LoadError, match="damaged"):
        open_core(copy, EngineConfig(target="onnx-fp32"))
    with pytest.raises(LoadError, match="provider 'cuda' needs CUDAExecutionProvider"):
        open_core(tiny_package, EngineConfig(provider="cuda"))
