"""Scheduler behaviour with fake requests and a fake model: no runtime, milliseconds per test."""

from __future__ import annotations

import random

import msgspec
import pytest

from engine.errors import ContextOverflow, InvalidRequest, Overloaded
from engine.request import EngineRequest, FinishReason, RequestStatus, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

VOCAB = 50


def request(rid: str, prompt: int, max_tokens: int = 4, stop=()) -> EngineRequest:
    return EngineRequest(rid, tuple(range(1, prompt + 1)), max_tokens, tuple(stop))


BASE = dict(n_slots=4, max_len=256, token_budget=16, max_waiting=16, retry_after_s=1.0)


def scheduler(**overrides) -> Scheduler:
    config = BASE | overrides
    return Scheduler(SchedulerConfig(**config), clock=lambda: 0.0)


class FakeModel:
    """Keeps what each slot's KV cache would hold; the next token is a hash of the slot's whole
    contents, so a request whose slot was overwritten or fed the wrong tokens samples a
    different sequence than it does alone."""

    def __init__(self):
        self.contents: dict[int, list[int]] = {}
        self.owner: dict[int, str] = {}

    def run(self, out: SchedulerOutput) -> dict[str, int | None]:
        for move in out.moves:  # as the runner copies cache rows, before any chunk runs
            assert self.owner.get(move.src) == move.request_id, "moved a slot it does not own"
            self.contents[move.dst] = self.contents.pop(move.src)[: move.n_tokens]
            self.owner[move.dst] = self.owner.pop(move.src)
        sampled = {}
        for chunk in out.chunks:
            if chunk.start == 0:
                self.owner[chunk.slot] = chunk.request_id
            assert self.owner[chunk.slot] == chunk.request_id, "slot written by two requests"
            kv = self.contents[chunk.slot] = self.contents.get(chunk.slot, [])[: chunk.start]
            assert len(kv) == chunk.start, "a chunk must continue where the last one stopped"
            kv.extend(chunk.token_ids)
            sampled[chunk.request_id] = next_token(kv) if chunk.sample else None
        return sampled


def next_token(tokens) -> int:
    return hash(tuple(tokens)) % VOCAB  # hashes of int tuples do not depend on PYTHONHASHSEED


def alone(req: EngineRequest) -> tuple[list[int], FinishReason]:
    """The request run by itself: the output every batched run must reproduce."""
    tokens, out = list(req.prompt_token_ids), []
    while True:
        token = next_token(tokens)
        tokens.append(token)
        out.append(token)
        if token in req.stop_token_ids:
            return out, FinishReason.STOP
        if len(out) == req.max_tokens:
            return out, FinishReason.LENGTH


def step(sched: Scheduler, model: FakeModel):
    out = sched.schedule()
    return out, sched.update(model.run(out))


def test_decodes_come_first_and_a_long_prompt_never_stalls_them():
    sched, model = scheduler(token_budget=8), FakeModel()
    sched.add(request("a", prompt=3, max_tokens=20))
    step(sched, model)  # a: prefill, samples its first token
    sched.add(request("b", prompt=100, max_tokens=2))
    for _ in range(10):
        out, updated = step(sched, model)
        assert out.num_scheduled_tokens["a"] == 1
        assert out.decodes[0].request_id == "a"
        assert out.num_scheduled_tokens["b"] == 7  # the rest of the budget
        assert out.total_tokens == 8
        assert [s.request_id for s in updated] == ["a"]


def test_a_long_prompt_is_chunked_within_the_budget():
    sched, model = scheduler(token_budget=8), FakeModel()
    sched.add(request("a", prompt=20, max_tokens=2))
    outs = [step(sched, model)[0] for _ in range(3)]
    assert [(c.start, c.n_tokens, c.sample) for o in outs for c in o.chunks] == [
        (0, 8, False),
        (8, 8, False),
        (16, 4, True),
    ]
    assert [len(o.prefills) for o in outs] == [1, 0, 0]
    assert [len(o.continuations) for o in outs] == [0, 1, 1]
    assert outs[1].continuations[0].token_ids == tuple(range(9, 17))


def test_a_one_token_prompt_chunk_is_a_continuation_not_a_decode():
    """token_budget == n_slots: beside two decodes the prompt in progress gets one token a
    step. Such a chunk samples nothing, so it must not ride in the decode forward (the runner
    returns logits for every decode)."""
    sched, model = scheduler(n_slots=3, token_budget=3), FakeModel()
    sched.add(request("a", prompt=1, max_tokens=20))
    sched.add(request("b", prompt=1, max_tokens=20))
    step(sched, model)
    sched.add(request("long", prompt=10, max_tokens=2))
    seen = []
    for _ in range(6):
        out, _ = step(sched, model)
        assert all(c.sample for c in out.decodes)
        seen += [c for c in out.continuations if c.n_tokens == 1 and not c.sample]
    assert seen and all(c.request_id == "long" for c in seen)


def test_while_streams_decode_a_prompt_takes_at_most_max_prefill_tokens_a_step():
    """The cap bounds the prompt work beside the decodes, and lifts once nothing decodes."""
    sched, model = scheduler(token_budget=16, max_prefill_tokens=3), FakeModel()
    sched.add(request("a", prompt=2, max_tokens=3))
    assert step(sched, model)[0].num_scheduled_tokens == {"a": 2}  # nothing decodes yet
    sched.add(request("b", prompt=30, max_tokens=2))
    sched.add(request("c", prompt=2, max_tokens=2))
    outs = [step(sched, model)[0].num_scheduled_tokens for _ in range(5)]
    assert outs == [
        {"a": 1, "b": 3},  # b's first chunk: the cap, not the 15 tokens the budget leaves
        {"a": 1, "b": 3},
        {"b": 16},  # a finished after 3 tokens: nobody decodes, the whole budget
        {"b": 8, "c": 2},  # b's last chunk samples; c is admitted with what is left
        {"b": 1, "c": 1},
    ]


def test_at_most_one_request_is_part_way_through_its_prompt():
    # a cut-short chunk uses up the budget, so b waits rather than starting a second partial
    sched, model = scheduler(token_budget=20), FakeModel()
    sched.add(request("a", prompt=30))
    sched.add(request("b", prompt=30))
    sched.add(request("c", prompt=5))
    outs = [step(sched, model)[0].num_scheduled_tokens for _ in range(4)]
    assert outs == [
        {"a": 20},
        {"a": 10, "b": 10},  # a's later chunk, then b's first
        {"a": 1, "b": 19},  # a decodes; b's later chunk takes the rest
        {"a": 1, "b": 1, "c": 5},  # b's last prompt token runs as a decode-shaped row
    ]


def test_fifo_admission_and_slot_exhaustion_leaves_requests_waiting():
    sched, model = scheduler(n_slots=2), FakeModel()
    for i in range(5):
        sched.add(request(f"r{i}", prompt=2, max_tokens=i + 1))
    admitted = []
    for _ in range(20):
        out, _ = step(sched, model)
        admitted += [c.request_id for c in out.prefills]
        assert sched.num_running <= 2
        assert sched.usage().slots_used == sched.num_running
    assert admitted == ["r0", "r1", "r2", "r3", "r4"]
    assert not sched.has_unfinished()
    assert sched.usage().slots_used == 0


def test_waiting_requests_start_when_a_slot_frees():
    sched, model = scheduler(n_slots=1), FakeModel()
    sched.add(request("a", prompt=2, max_tokens=2))
    sched.add(request("b", prompt=2, max_tokens=1))
    out, _ = step(sched, model)
    assert list(out.num_scheduled_tokens) == ["a"] and sched.num_waiting == 1
    out, updated = step(sched, model)  # a's last token; its slot frees after this step
    assert updated[0].finish_reason is FinishReason.LENGTH
    out, _ = step(sched, model)
    assert out.prefills[0].request_id == "b" and out.prefills[0].slot == 0


def test_a_full_queue_raises_overloaded_with_retry_after():
    sched = scheduler(n_slots=1, max_waiting=2, retry_after_s=2.5)
    sched.add(request("a", prompt=2))
    sched.add(request("b", prompt=2))
    with pytest.raises(Overloaded) as err:
        sched.add(request("c", prompt=2))
    assert err.value.retry_after_s == 2.5
    assert "2 requests waiting, the limit is 2" in str(err.value)
    sched.schedule()  # a takes the slot, so the queue has room again
    sched.add(request("c", prompt=2))


def test_admission_refuses_what_cannot_fit_with_the_numbers():
    sched = scheduler(max_len=64)
    with pytest.raises(ContextOverflow, match=r"prompt \(60 tokens\) \+ max_tokens \(10\) = 70"):
        sched.add(request("a", prompt=60, max_tokens=10))
    sched.add(request("b", prompt=60, max_tokens=4))  # exactly fits
    with pytest.raises(InvalidRequest, match="already in the engine"):
        sched.add(request("b", prompt=1))
    with pytest.raises(InvalidRequest, match="must be >= 1"):
        sched.add(request("c", prompt=0))


def test_abort_a_waiting_request():
    sched, model = scheduler(n_slots=1), FakeModel()
    sched.add(request("a", prompt=2, max_tokens=3))
    sched.add(request("b", prompt=2))
    sched.add(request("c", prompt=2))
    step(sched, model)
    assert sched.abort("b")
    out, _ = step(sched, model)
    assert out.aborted == ("b",) and "b" not in out.num_scheduled_tokens
    assert sched.num_waiting == 1
    step(sched, model)  # a finishes
    out, _ = step(sched, model)
    assert list(out.num_scheduled_tokens) == ["c"]
    assert not sched.abort("b")


def test_abort_a_running_request_mid_step_frees_its_slot_at_the_next_step():
    sched, model = scheduler(n_slots=1), FakeModel()
    sched.add(request("a", prompt=2, max_tokens=10))
    sched.add(request("b", prompt=2, max_tokens=1))
    step(sched, model)
    out = sched.schedule()  # a decodes
    assert sched.abort("a")  # while the step runs
    assert sched.update(model.run(out)) == []  # its token is dropped
    assert sched.usage().slots_used == 1  # the runner was still writing into it
    out, _ = step(sched, model)
    assert out.aborted == ("a",)
    assert list(out.num_scheduled_tokens) == ["b"] and out.prefills[0].slot == 0


def test_max_tokens_and_stop_ids_finish_requests():
    sched, model = scheduler(), FakeModel()
    expected, _ = alone(request("x", prompt=5, max_tokens=10))
    stop = expected[3]  # the 4th token stops it (unless it occurs earlier)
    sched.add(request("len", prompt=5, max_tokens=3))
    sched.add(request("stop", prompt=5, max_tokens=10, stop=[stop]))
    finished = {}
    for _ in range(12):
        for state in step(sched, model)[1]:
            if state.status is RequestStatus.FINISHED:
                finished[state.request_id] = state
    assert finished["len"].finish_reason is FinishReason.LENGTH
    assert finished["len"].output_token_ids == expected[:3]
    assert finished["stop"].finish_reason is FinishReason.STOP
    assert finished["stop"].output_token_ids == expected[: expected.index(stop) + 1]
    assert sched.usage().slots_used == 0


def test_the_step_protocol_is_enforced():
    sched = scheduler()
    sched.add(request("a", prompt=2))
    with pytest.raises(RuntimeError, match="without a scheduled step"):
        sched.update({})
    sched.schedule()
    with pytest.raises(RuntimeError, match="before update"):
        sched.schedule()
    with pytest.raises(ValueError, match="not scheduled"):
        sched.update({"zz": 1})


def test_config_errors_name_the_field_value_and_limit():
    with pytest.raises(ValueError, match=r"token_budget = 4 must be >= 8 \(n_slots"):
        SchedulerConfig(**BASE | {"n_slots": 8, "token_budget": 4})
    with pytest.raises(ValueError, match=r"max_waiting = 0 must be >= 1"):
        SchedulerConfig(**BASE | {"max_waiting": 0})
    with pytest.raises(ValueError, match=r"max_len = 1 must be >= 2"):
        SchedulerConfig(**BASE | {"max_len": 1})


def test_finished_requests_holes_are_compacted_when_nobody_waits():
    sched, model = scheduler(n_slots=4, token_budget=16), FakeModel()
    for rid, n in (("a", 2), ("b", 9), ("c", 1), ("d", 9)):
        sched.add(request(rid, prompt=3, max_tokens=n))
    out, _ = step(sched, model)  # a, b, c, d prefill in slots 0..3; c finishes (one token)
    assert out.moves == ()
    out, _ = step(sched, model)  # d moves from slot 3 into c's slot 2; a finishes
    assert [(m.request_id, m.src, m.dst, m.n_tokens) for m in out.moves] == [("d", 3, 2, 3)]
    assert {c.request_id: c.slot for c in out.chunks} == {"a": 0, "b": 1, "d": 2}
    out, _ = step(sched, model)  # d moves again, into a's slot 0
    assert [(m.request_id, m.src, m.dst) for m in out.moves] == [("d", 2, 0)]
    assert {c.request_id: c.slot for c in out.chunks} == {"b": 1, "d": 0}
    while sched.has_unfinished():
        _, updated = step(sched, model)
        for state in updated:
            if state.finish_reason is not None:
                assert state.output_token_ids == alone(state.request)[0]

    # with a request waiting, the hole is left for it: it takes the lowest free slot, no copy
    sched, model = scheduler(n_slots=2, token_budget=16), FakeModel()
    for rid, n in (("a", 1), ("b", 5), ("c", 3)):
        sched.add(request(rid, prompt=3, max_tokens=n))
    step(sched, model)  # a and b prefill; a finishes with its first token
    out, _ = step(sched, model)
    assert out.moves == () and out.prefills[0].request_id == "c" and out.prefills[0].slot == 0

    # and compact_slots=False never moves (a device cache)
    sched, model = scheduler(n_slots=2, compact_slots=False), FakeModel()
    sched.add(request("a", prompt=3, max_tokens=1))
    sched.add(request("b", prompt=3, max_tokens=3))
    step(sched, model)
    out, _ = step(sched, model)
    assert out.moves == () and out.decodes[0].slot == 1


def test_requests_round_trip_as_compact_messages():
    req = EngineRequest("a", (1, 2, 3), 8, (0,), SamplingParams(temperature=0.0, seed=7))
    wire = msgspec.msgpack.encode(req)
    assert msgspec.msgpack.decode(wire, type=EngineRequest) == req


@pytest.mark.parametrize("max_prefill_tokens", [0, 5])
def test_random_arrivals_lengths_and_aborts_keep_every_invariant(max_prefill_tokens):
    rng = random.Random(1234)
    limits = dict(n_slots=6, max_len=96, token_budget=16, max_waiting=8)
    config = SchedulerConfig(**BASE | limits, max_prefill_tokens=max_prefill_tokens)
    sched, model = Scheduler(config, clock=lambda: 0.0), FakeModel()
    requests, arrive, abort_after = {}, {}, {}
    for i in range(100):
        prompt = rng.randint(1, 60)
        stop = (rng.randrange(VOCAB),) if rng.random() < 0.3 else ()
        rid = f"r{i}"
        requests[rid] = EngineRequest(
            rid,
            tuple(rng.randrange(VOCAB) for _ in range(prompt)),
            rng.randint(1, config.max_len - prompt),
            stop,
        )
        arrive[rid] = rng.randrange(500)
        if rng.random() < 0.2:  # (steps after it arrives, before schedule() or mid-step)
            abort_after[rid] = (rng.randrange(60), rng.random() < 0.5)

    pending = sorted(requests, key=lambda r: arrive[r])
    added, admitted, finished, aborted_step = [], [], {}, {}
    decoding: set[str] = set()  # sampled a token last step: must get one this step
    overloads = moves = contiguous = 0

    def aborts_due(now: int, mid_step: bool) -> list[str]:
        due = [r for r, (after, mid) in abort_after.items() if arrive[r] + after == now]
        return [r for r in due if abort_after[r][1] == mid_step]

    def abort(rid: str, now: int) -> None:
        if rid in pending:  # the client gave up before the engine took it
            pending.remove(rid)
            aborted_step[rid] = now
        elif sched.abort(rid):
            aborted_step[rid] = now
            decoding.discard(rid)

    for now in range(5000):
        for rid in [r for r in pending if arrive[r] <= now]:
            try:
                sched.add(requests[rid])
            except Overloaded as err:  # retried next step, as the gateway's client would
                assert err.retry_after_s == config.retry_after_s
                overloads += 1
                continue
            pending.remove(rid)
            added.append(rid)
        for rid in aborts_due(now, mid_step=False):
            abort(rid, now)

        out = sched.schedule()
        scheduled = out.num_scheduled_tokens
        assert out.total_tokens <= config.token_budget
        prompt_tokens = sum(c.n_tokens for c in out.chunks if c.n_tokens > 1 or not c.sample)
        if decoding and max_prefill_tokens:
            assert prompt_tokens <= max_prefill_tokens, "a prompt chunk beyond the cap"
        slots = [c.slot for c in out.chunks]
        assert len(set(slots)) == len(slots), "a slot double-booked within a step"
        assert all(sched.kv.slot_of(c.request_id) == c.slot for c in out.chunks)
        assert len(out.continuations) <= 1, "two batch-1 forwards in one step"
        # the runner returns logits for every decode: a decode that does not sample is a bug
        assert all(c.sample and c.n_tokens == 1 and c.start > 0 for c in out.decodes)
        assert all(scheduled.get(r) == 1 for r in decoding), "a running stream stalled"
        assert not scheduled.keys() & aborted_step.keys(), "an aborted request ran"
        if not sched.num_waiting:  # compacted: the running requests hold slots 0 .. n-1
            assert {c.slot for c in out.chunks} == set(range(sched.num_running))
            contiguous += 1
        moves += len(out.moves)
        admitted += [c.request_id for c in out.prefills]

        for rid in aborts_due(now, mid_step=True):
            abort(rid, now)
        updated = sched.update(model.run(out))
        decoding = {s.request_id for s in updated if s.status is RequestStatus.RUNNING}
        assert not decoding & aborted_step.keys()
        for state in updated:
            assert state.request_id not in aborted_step, "an aborted request got a token"
            if state.status is RequestStatus.FINISHED:
                finished[state.request_id] = state
        if not pending and not sched.has_unfinished():
            break
    else:
        pytest.fail("the requests did not finish within 5000 steps")

    assert overloads > 0, "the test should exercise a full queue"
    assert moves > 3 and contiguous > 50, "the test should exercise compaction"
    assert admitted == [r for r in added if r in admitted], "admission was not FIFO"
    assert sched.usage().slots_used == 0
    for rid, req in requests.items():
        if rid in aborted_step:
            assert rid not in finished
            continue
        tokens, reason = alone(req)
        assert finished[rid].output_token_ids == tokens, rid
        assert finished[rid].finish_reason is reason, rid
    assert len(finished) + len(aborted_step) == 100
    assert 5 < len(aborted_step) < 40
