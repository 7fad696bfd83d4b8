"""A failure stays as small as its cause: one request's failed output handling ends that request
alone; only a failing forward ends the engine. In-process and over the engine server alike."""

from __future__ import annotations

import asyncio
import threading

import pytest
from tokenizers import Tokenizer

from engine.async_engine import AsyncEngine
from engine.errors import EngineDead
from engine.loader import EngineConfig, open_core
from engine.request import EngineRequest, SamplingParams
from tests.engine.test_async_engine import engine_under_test, reference

CONFIG = EngineConfig(n_slots=8, threads=1, token_budget=32, max_waiting=8)
PROMPTS = ["Return the", "class", "The value of", "If", "A list", "def", "The", "Raises"]
FAILING = "r3"  # the request whose output handling raises
FAIL_AT = 3  # ... at its third token


@pytest.fixture(scope="module")
def tok(tiny_package) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_package / "tokenizer.json"))


class FailingDecoder:
    """A detokeniser that raises at its `fail_at`-th token, as a bug or bad table would."""

    def __init__(self, fail_at: int):
        self.fail_at, self.pushed = fail_at, 0

    def push(self, token_id: int) -> str:
        self.pushed += 1
        if self.pushed == self.fail_at:
            raise RuntimeError(f"injected: cannot detokenise token {token_id}")
        return "?"

    def flush(self) -> str:
        return ""


def fail_output_of(request_id: str):
    """A `prepare` hook: the output processor gives `request_id` (every choice of it) a
    detokeniser that raises; every other request keeps the real one."""

    def prepare(engine: AsyncEngine) -> None:
        processor = engine.core.output
        real = processor.new_decoder

        def new_decoder(request: EngineRequest):
            if request.request_id.split("/")[0] == request_id:
                return FailingDecoder(FAIL_AT)
            return real(request)

        processor.new_decoder = new_decoder

    return prepare


def req(tok: Tokenizer, rid: str, prompt: str, max_tokens: int, **kw) -> EngineRequest:
    sampling = SamplingParams(**({"temperature": 0.8, "seed": 7} | kw))
    return EngineRequest(rid, tuple(tok.encode(prompt).ids), max_tokens, sampling=sampling)


async def events(stream) -> list:
    return [out async for out in stream]


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_one_requests_failed_output_ends_it_alone(tiny_package, tok, kind):
    requests = [req(tok, f"r{i}", p, 10 + i) for i, p in enumerate(PROMPTS)]
    after = req(tok, "next", "The value of", 6)

    async def main():
        prepare = fail_output_of(FAILING)
        async with engine_under_test(tiny_package, kind, CONFIG, prepare=prepare) as engine:
            streams = [await engine.submit(r) for r in requests]
            results = await asyncio.gather(*(events(s) for s in streams))
            stats = await engine.stats()
            health = await engine.health()
            served_after = await events(await engine.submit(after))
            return results, stats, health, served_after

    results, stats, health, served_after = asyncio.run(main())
    for r, outs in zip(requests, results, strict=True):
        if r.request_id == FAILING:
            continue
        tokens = [t for o in outs for t in o.token_ids]
        assert tokens == reference(tiny_package, r), r.request_id
        assert "".join(o.text for o in outs) == tok.decode(tokens), r.request_id
        assert outs[-1].finish_reason == "length", r.request_id
    failed = dict(zip([r.request_id for r in requests], results, strict=True))[FAILING]
    last = failed[-1]
    assert [o.finish_reason for o in failed[:-1]] == [None] * (FAIL_AT - 1)
    assert last.finish_reason == "error" and last.request_id == FAILING
    assert "RuntimeError: injected: cannot detokenise" in last.error
    assert last.completion_tokens == FAIL_AT
    # its slot was freed (at the next step) and the engine is healthy and serving
    assert health.ok and stats.slots_used == 0 and stats.kv_tokens_used == 0
    tokens = [t for o in served_after for t in o.token_ids]
    assert tokens == reference(tiny_package, after) and served_after[-1].finish_reason == "length"


def test_a_failing_choice_ends_every_choice_of_its_request(tiny_package, tok):
    """n > 1: choice 1 fails; choice 0 of the same request ends with the error too, while the
    other request runs to its end; every slot is free afterwards."""
    core, _ = open_core(tiny_package, CONFIG)
    real = core.output.new_decoder
    core.output.new_decoder = lambda r: FailingDecoder(2) if r.request_id == "n/1" else real(r)
    core.add(req(tok, "n", "Return the", 12, n=2))
    other = req(tok, "other", "class", 12)
    core.add(other)
    outs = []
    while core.has_work():
        outs += core.step()
    finals = {(o.request_id, o.index): o for o in outs if o.finished}
    assert finals[("n", 0)].finish_reason == finals[("n", 1)].finish_reason == "error"
    assert "injected" in finals[("n", 0)].error
    assert [t for o in outs if o.request_id == "other" for t in o.token_ids] == reference(
        tiny_package, other
    )
    assert core.scheduler.usage().slots_used == 0 and core.output.children("n") is None


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_a_failing_forward_ends_every_stream_with_engine_dead(tiny_package, tok, kind):
    calls = {"n": 0}
    # the forward fails only once every stream is in: a submit that lost the race to the failure
    # would be refused with EngineDead instead of streaming (seen over the socket under load)
    all_in = threading.Event()

    def flaky_forward(engine: AsyncEngine) -> None:
        execute = engine.core.execute

        def flaky(plan):
            calls["n"] += 1
            if calls["n"] == 4:
                all_in.wait(30)
                raise RuntimeError("device lost")
            return execute(plan)

        engine.core.execute = flaky

    async def main():
        async with engine_under_test(tiny_package, kind, CONFIG, prepare=flaky_forward) as engine:
            streams = [
                await engine.submit(req(tok, f"r{i}", "class", 20, temperature=0)) for i in range(3)
            ]
            all_in.set()
            for s in streams:
                with pytest.raises(EngineDead, match="device lost"):
                    await events(s)
            health = await engine.health()
            with pytest.raises(EngineDead, match="device lost"):
                await engine.submit(req(tok, "late", "class", 2, temperature=0))
            return health

    health = asyncio.run(main())
    assert not health.ok and health.status == "dead" and "device lost" in health.detail
