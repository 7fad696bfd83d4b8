"""The engine API in-process and over the engine server's socket: the same behaviour from both."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer

from engine.api import EngineClient
from engine.async_engine import AsyncEngine
from engine.client import RemoteEngine
from engine.errors import ContextOverflow, EngineDead, InvalidRequest, Overloaded
from engine.loader import EngineConfig, load_engine, open_core
from engine.request import EngineRequest, SamplingParams
from engine.server import EngineServer

CONFIG = EngineConfig(n_slots=4, threads=1, token_budget=16, max_waiting=8)


def req(tok: Tokenizer, rid: str, prompt: str, max_tokens: int, **kw) -> EngineRequest:
    return EngineRequest(
        rid, tuple(tok.encode(prompt).ids), max_tokens, sampling=SamplingParams(**kw)
    )


async def collect(stream) -> tuple[list[int], str, str]:
    tokens, text, finish = [], "", None
    async for out in stream:
        tokens += out.token_ids
        text += out.text
        finish = out.finish_reason or finish
    return tokens, text, finish


def reference(pkg, request: EngineRequest) -> list[int]:
    core, _ = open_core(pkg, EngineConfig(n_slots=1, threads=1))
    core.add(request)
    tokens = []
    while core.has_work():
        for out in core.step():
            tokens += out.token_ids
    return tokens


@pytest.fixture(scope="module")
def tok(tiny_package) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_package / "tokenizer.json"))


@contextlib.asynccontextmanager
async def engine_under_test(
    pkg,
    kind: str,
    config: EngineConfig = CONFIG,
    step_s: float = 0,
    prepare: Callable[[AsyncEngine], object] | None = None,
):
    """An in-process engine, or the same behind an engine server and a RemoteEngine. `step_s`
    slows every step down, for tests whose timing must not depend on the machine's speed;
    `prepare` is handed the in-process engine before anything is served (to inject faults)."""
    engine = load_engine(pkg, config)
    if prepare is not None:
        prepare(engine)
    if step_s:
        execute = engine.core.execute

        def slow(plan):
            time.sleep(step_s)
            return execute(plan)

        engine.core.execute = slow
    if kind == "local":
        try:
            yield engine
        finally:
            await engine.close()
        return
    server = EngineServer(engine)
    port = await server.start("127.0.0.1", 0)
    serving = asyncio.create_task(server.serve_forever())
    remote = await RemoteEngine("127.0.0.1", port).connect()
    try:
        yield remote
    finally:
        await remote.close()
        serving.cancel()
        await server.close()


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_concurrent_streams_match_each_request_alone(tiny_package, tok, kind):
    requests = [
        req(tok, f"r{i}", p, 8 + i, temperature=0.8, seed=i)
        for i, p in enumerate(["Return the", "class", "The value of", "If", "A list"])
    ]

    async def main():
        async with engine_under_test(tiny_package, kind) as engine:
            assert isinstance(engine, EngineClient)
            assert engine.info.max_len == 128 and engine.info.tokenizer_json
            streams = [await engine.submit(r) for r in requests]
            results = await asyncio.gather(*(collect(s) for s in streams))
            stats = await engine.stats()
            assert (await engine.health()).ok
            return results, stats

    results, stats = asyncio.run(main())
    for r, (tokens, text, finish) in zip(requests, results, strict=True):
        assert tokens == reference(tiny_package, r)
        assert finish == "length" and len(tokens) == r.max_tokens
        assert text == tok.decode(tokens)
    assert stats.requests_total == 5 and stats.slots_used == 0 and stats.queue_depth == 0
    assert stats.generated_tokens_total == sum(r.max_tokens for r in requests)


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_admission_errors_reach_the_caller_before_any_output(tiny_package, tok, kind):
    config = EngineConfig(n_slots=1, threads=1, max_waiting=1, retry_after_s=3.0, max_len=64)

    async def main():
        async with engine_under_test(tiny_package, kind, config, step_s=0.02) as engine:
            with pytest.raises(ContextOverflow, match="more than the 64"):
                await engine.submit(EngineRequest("big", (5,) * 40, 30))
            long = await engine.submit(req(tok, "a", "Return the", 50, temperature=0))
            # a holds the only slot; the iterator is kept, since an iterator the garbage
            # collector finalizes closes its stream, which aborts the request
            outputs = long.__aiter__()
            first = await anext(outputs)
            waiting = await engine.submit(req(tok, "b", "class", 4, temperature=0))
            with pytest.raises(InvalidRequest, match="request id 'a' is already in the engine"):
                await engine.submit(req(tok, "a", "class", 4, temperature=0))
            with pytest.raises(Overloaded) as e:
                await engine.submit(req(tok, "c", "class", 4, temperature=0))
            assert e.value.retry_after_s == 3.0
            await outputs.aclose()  # abandon a: its slot frees, b runs
            tokens, _, finish = await collect(waiting)
            return first, tokens, finish

    first, tokens, finish = asyncio.run(main())
    assert first.token_ids and finish == "length" and len(tokens) == 4


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_what_a_caller_needs_to_know_comes_through_the_api(tiny_package, kind):
    """The KV cache's bytes and the token table, from a local or a remote engine alike."""

    async def main():
        async with engine_under_test(tiny_package, kind) as engine:
            return engine.info, engine.token_bytes(), engine.token_bytes()

    info, table, again = asyncio.run(main())
    core, _ = open_core(tiny_package, CONFIG)
    # reserved: 2 layers × (K, V) × 4 slots × 2 kv heads × 128 positions × head size 16, fp32
    assert core.runner.kv_bytes == 2 * 2 * 4 * 2 * 128 * 16 * 4
    # held at most: the pool, max(max_len, 4 × 128 / 4) = 128 positions of 2 × 2 × 2 × 16 × 4 B
    assert info.kv_tokens == 128 and info.kv_bytes == 128 * 2 * 2 * 2 * 16 * 4
    assert info.weights_bytes > 0
    assert table is again  # built once
    assert table.table == core.token_bytes.table and table.vocab_size == info.vocab_size


def test_the_event_loop_stays_responsive_while_the_engine_computes(tiny_package, tok):
    async def main():
        engine = load_engine(tiny_package, EngineConfig(n_slots=8, threads=1))
        streams = [
            await engine.submit(req(tok, f"r{i}", "Return the", 100, temperature=0))
            for i in range(8)
        ]
        gaps, last = [], time.perf_counter()
        consumer = asyncio.gather(*(collect(s) for s in streams))
        while not consumer.done():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        await consumer
        await engine.close()
        return gaps

    gaps = asyncio.run(main())
    # the step loop runs in its own thread: the loop wakes up every millisecond or so, never
    # blocked for a whole step's compute (generous bound for a busy CI machine)
    assert len(gaps) > 20
    assert sorted(gaps)[len(gaps) // 2] < 0.05


def test_engine_serve_cli_and_a_killed_server_mid_stream(tiny_package, tok):
    """`aimass engine serve` as a user runs it; killing it mid-stream ends the client's stream
    with EngineDead (never a hang), and the client reconnects to a restarted server."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def serve(port: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aimass_cli", "engine", "serve", str(tiny_package),
             "--port", str(port), "--threads", "1", "--slots", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, proc.stderr.read()
        return proc

    port = _free_port()
    proc = serve(port)

    async def main():
        remote = await RemoteEngine("127.0.0.1", port).connect()
        stream = await remote.submit(req(tok, "a", "Return the", 100, temperature=0))
        got = []
        with pytest.raises(EngineDead):
            async for out in stream:
                got.append(out)
                if len(got) == 3:
                    proc.send_signal(signal.SIGKILL)
        dead = await remote.health()
        restarted = serve(port)
        try:
            ok = await remote.health()
            tokens, _, finish = await collect(
                await remote.submit(req(tok, "b", "class", 5, temperature=0))
            )
        finally:
            restarted.terminate()
            rc = restarted.wait(timeout=30)
        await remote.close()
        return got, dead, ok, tokens, finish, rc

    try:
        got, dead, ok, tokens, finish, rc = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        proc.kill()
    assert len(got) >= 3 and not dead.ok and ok.ok
    assert finish == "length" and len(tokens) == 5
    assert rc == 0  # SIGTERM: a clean shutdown


def test_engine_serve_refuses_bad_input_in_one_line(tiny_package, tmp_path):
    from tests.conftest import run_cli

    r = run_cli("engine", "serve", str(tmp_path), "--port", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "aimass: error:" in r.stderr
    r = run_cli("engine", "serve", str(tiny_package), "--provider", "cuda")
    assert r.returncode == 2 and "CUDAExecutionProvider" in r.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
