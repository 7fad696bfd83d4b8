"""The model lifecycle part by part, on the fakes of tests/gateway/fakes.py: routing (aliases,
canary weights, stickiness, the resolve cache), deployments (shared loads, idle unload, the
memory budget, drain after an alias move, a dead engine replaced), remote replicas (fewest
outstanding, health), and the whole app over HTTP on a fake engine. Time is a FakeClock:
nothing here sleeps."""

from __future__ import annotations

import asyncio
import json

import pytest
from litestar.testing import AsyncTestClient

from engine.api import EngineClient
from engine.errors import EngineDead
from engine.request import EngineRequest
from gateway.app import GatewayConfig, create_app
from gateway.models.deployments import Deployments
from gateway.models.errors import ModelLoading, ModelNotFound, ModelUnavailable
from gateway.models.replicas import ReplicaSet
from gateway.models.routing import Router
from gateway.models.service import ModelManager, ModelsConfig
from tests.gateway.fakes import FakeCatalog, FakeClock, FakeEngine, FakeLoader


def run(coro):
    return asyncio.run(coro)


async def settle() -> None:
    """Let every ready task run until it waits on something."""
    for _ in range(10):
        await asyncio.sleep(0)


def refs(pool) -> set[str]:
    return {d.ref for d in pool.loaded}


# ── routing ──


def new_router(catalog, clock=None, *, draw=lambda: 0.5, moves=None, ttl_s=2.0) -> Router:
    def on_move(name: str, versions: set[int]) -> None:
        if moves is not None:
            moves.append((name, versions))

    return Router(catalog, ttl_s=ttl_s, clock=clock or FakeClock(), on_move=on_move, draw=draw)


def test_a_canary_takes_the_draws_below_its_weight():
    catalog = FakeCatalog({"tiny": 2}, production=1)
    catalog.set_alias("tiny", "canary", 2, weight=0.25)
    draws = iter([0.1, 0.249, 0.25, 0.9])
    router = new_router(catalog, draw=lambda: next(draws))

    async def main():
        return [await router.route("tiny") for _ in range(4)]

    assert run(main()) == [("tiny", 2), ("tiny", 2), ("tiny", 1), ("tiny", 1)]


def test_a_canary_split_keeps_each_caller_on_one_side():
    catalog = FakeCatalog({"tiny": 2}, production=1)
    catalog.set_alias("tiny", "canary", 2, weight=0.3)
    router = new_router(catalog, draw=lambda: pytest.fail("a caller with a key never draws"))
    callers = [f"key-{i}" for i in range(400)]

    async def main():
        first = {c: (await router.route("tiny", sticky=c))[1] for c in callers}
        again = {c: (await router.route("tiny", sticky=c))[1] for c in callers}
        return first, again

    first, again = run(main())
    assert again == first
    share = sum(v == 2 for v in first.values()) / len(callers)
    assert 0.22 < share < 0.38  # the weight, give or take the hash's spread over 400 callers


def test_a_canary_on_the_production_version_or_without_weight_is_no_split():
    catalog = FakeCatalog({"tiny": 2}, production=1)
    router = new_router(catalog, draw=lambda: 0.0)  # would pick any canary there is
    catalog.set_alias("tiny", "canary", 1, weight=0.5)
    assert run(router.route("tiny")) == ("tiny", 1)
    catalog.set_alias("tiny", "canary", 2, weight=None)
    assert run(new_router(catalog, draw=lambda: 0.0).route("tiny")) == ("tiny", 1)


def test_versions_and_aliases_route_as_named_and_unknown_names_are_not_found():
    catalog = FakeCatalog({"tiny": 3}, production=1, staging=3)
    router = new_router(catalog)
    assert run(router.route("tiny:2")) == ("tiny", 2)
    assert run(router.route("tiny@staging")) == ("tiny", 3)
    for model, message in [
        ("tiny:9", "tiny:9 does not exist"),
        ("tiny@gone", "no alias 'gone'"),
        ("other", "no model named 'other'"),
        ("Bad Name!", "Bad Name!"),
    ]:
        with pytest.raises(ModelNotFound, match=message):
            run(router.route(model))
    no_production = FakeCatalog({"raw": 1}, staging=1)
    with pytest.raises(ModelNotFound, match=r"no production alias.*raw@staging"):
        run(new_router(no_production).route("raw"))


def test_a_resolution_is_reused_for_its_ttl_then_read_again():
    catalog = FakeCatalog({"tiny": 2}, production=1)
    clock, moves = FakeClock(), []
    router = new_router(catalog, clock, moves=moves, ttl_s=2.0)

    async def route() -> int:
        return (await router.route("tiny"))[1]

    async def main():
        assert [await route() for _ in range(10)] == [1] * 10
        assert catalog.reads == 1  # a burst costs one registry read
        catalog.set_alias("tiny", "production", 2)
        clock.advance(1.9)
        assert await route() == 1 and catalog.reads == 1  # still cached
        clock.advance(0.1)
        assert await route() == 2 and catalog.reads == 2
        assert moves == [("tiny", {2})]  # what still routes; version 1 may drain
        clock.advance(2.0)
        assert await route() == 2 and moves == [("tiny", {2})]  # unchanged: no move

    run(main())
    assert router.routed("tiny") and not router.routed("other")


# ── deployments ──


def test_concurrent_requests_share_one_load():
    loader = FakeLoader()
    pool = Deployments(loader, clock=FakeClock())

    async def main():
        loader.hold()
        waiting = [asyncio.create_task(pool.acquire("tiny", 1)) for _ in range(3)]
        await settle()
        assert pool.loading and loader.loads == ["tiny:1"]
        loader.release()
        leases = await asyncio.gather(*waiting)
        assert all(lease.cold_start for lease in leases)  # each waited for the load
        assert len({id(lease.deployment) for lease in leases}) == 1
        assert leases[0].deployment.in_flight == 3 and not pool.loading
        later = await pool.acquire("tiny", 1)
        assert not later.cold_start and loader.loads == ["tiny:1"]

    run(main())


def test_a_load_longer_than_load_wait_is_model_loading_and_goes_on():
    loader = FakeLoader()
    pool = Deployments(loader, clock=FakeClock(), load_wait_s=0.01)

    async def main():
        loader.hold()
        with pytest.raises(ModelLoading, match=r"tiny:1 is still loading after 0.01 s"):
            await pool.acquire("tiny", 1)
        loader.release()
        while pool.loading:
            await asyncio.sleep(0)
        lease = await pool.acquire("tiny", 1)
        assert not lease.cold_start and loader.loads == ["tiny:1"]

    run(main())


def test_an_idle_deployment_unloads_after_idle_unload_s_of_the_clock():
    clock, loader = FakeClock(), FakeLoader()
    pool = Deployments(loader, clock=clock, idle_unload_s=60.0)

    async def main():
        async with await pool.acquire("tiny", 1) as lease:
            engine = lease.deployment.engine
        clock.advance(59.9)
        await pool.unload_idle()
        assert refs(pool) == {"tiny:1"}
        # a request in flight keeps it, however long it runs; idle counts from its end
        lease = await pool.acquire("tiny", 1)
        clock.advance(600)
        await pool.unload_idle()
        assert refs(pool) == {"tiny:1"}
        lease.release()
        clock.advance(59.9)
        await pool.unload_idle()
        assert refs(pool) == {"tiny:1"}
        clock.advance(0.1)
        await pool.unload_idle()
        assert refs(pool) == set() and engine.closed
        # the next request loads it again
        assert (await pool.acquire("tiny", 1)).cold_start
        assert loader.loads == ["tiny:1", "tiny:1"]

    run(main())


def test_the_memory_budget_evicts_the_least_recently_used_idle_deployment():
    clock, loader = FakeClock(), FakeLoader(weights_bytes=10_000)  # + 1000 of KV each
    pool = Deployments(loader, clock=clock, memory_budget_bytes=25_000)  # two fit, not three

    async def use(version: int) -> None:
        (await pool.acquire("tiny", version)).release()
        clock.advance(1)

    async def main():
        await use(1)
        await use(2)
        await use(1)  # version 2 is now the least recently used
        await use(3)
        assert refs(pool) == {"tiny:1", "tiny:3"}
        assert loader.engines["tiny:2"].closed and not loader.engines["tiny:1"].closed
        # deployments serving requests are never evicted: no room is a 503 to retry
        held = [await pool.acquire("tiny", 1), await pool.acquire("tiny", 3)]
        with pytest.raises(ModelUnavailable, match=r"memory budget of 0 MiB is full") as e:
            await pool.acquire("tiny", 4)
        assert e.value.retry_after_s == 5.0
        assert refs(pool) == {"tiny:1", "tiny:3"}
        for lease in held:
            lease.release()
        # a model larger than the whole budget is refused outright
        loader.weights_bytes = 30_000
        with pytest.raises(ModelUnavailable, match="more than the whole memory budget"):
            await pool.acquire("tiny", 5)

    run(main())


def test_a_dead_engine_is_replaced_by_the_next_request():
    loader = FakeLoader()
    pool = Deployments(loader, clock=FakeClock())

    async def main():
        (await pool.acquire("tiny", 1)).release()
        dead = loader.engines["tiny:1"]
        dead.kill()
        lease = await pool.acquire("tiny", 1)
        assert lease.cold_start and lease.deployment.engine is not dead and dead.closed
        assert loader.loads == ["tiny:1", "tiny:1"]

    run(main())


def test_an_alias_move_drains_the_old_version_then_unloads_it():
    catalog, clock, loader = FakeCatalog({"tiny": 2}, production=1), FakeClock(), FakeLoader()
    config = ModelsConfig(resolve_ttl_s=2.0, idle_unload_s=0)  # 0: never idle out
    models = ModelManager(catalog, config, loader=loader, clock=clock)

    async def main():
        old = await models.acquire("tiny")
        catalog.set_alias("tiny", "production", 2)
        clock.advance(2.0)
        new = await models.acquire("tiny")
        assert (old.deployment.version, new.deployment.version) == (1, 2)
        await models.reap()
        assert {d.ref for d in models.deployments} == {"tiny:1", "tiny:2"}  # 1 drains first
        old.release()
        await models.reap()
        assert {d.ref for d in models.deployments} == {"tiny:2"}
        new.release()
        await models.close()
        assert loader.engines["tiny:2"].closed

    run(main())


# ── remote replicas ──


def request(i: int) -> EngineRequest:
    return EngineRequest(request_id=f"r{i}", prompt_token_ids=(1, 2, 3), max_tokens=3)


async def drain(stream) -> None:
    async for _ in stream:
        pass


def test_replicas_take_requests_by_fewest_outstanding_and_a_dead_one_is_skipped():
    a, b = FakeEngine(address="a:1"), FakeEngine(address="b:1")

    async def main():
        replicas = await ReplicaSet([a, b]).connect()
        a.pause(), b.pause()
        streams = [await replicas.submit(request(i)) for i in range(4)]
        assert replicas.outstanding() == {"a:1": 2, "b:1": 2}
        a.resume()
        await drain(streams[0])  # a stream counts until it ends
        assert replicas.outstanding() == {"a:1": 1, "b:1": 2}
        a.pause()
        waiting = await replicas.submit(request(4))
        assert replicas.outstanding() == {"a:1": 2, "b:1": 2}
        # a dies: its streams end with EngineDead, and a request tried there moves on
        a.kill()
        with pytest.raises(EngineDead):
            await drain(waiting)
        assert replicas.outstanding() == {"a:1": 1, "b:1": 2}
        await replicas.submit(request(5))
        assert replicas.outstanding() == {"a:1": 1, "b:1": 3}
        assert [r.request_id for r in b.submitted] == ["r1", "r3", "r5"]
        assert not (await replicas.health()).detail.startswith("a:1: ok")
        # back on its address: the next health check lets it take requests again
        a.revive()
        health = await replicas.health()
        assert health.ok and health.detail == "a:1: ok; b:1: ok"
        await replicas.submit(request(6))
        assert a.submitted[-1].request_id == "r6"
        # every replica down: the request fails as a dead engine
        a.kill(), b.kill()
        with pytest.raises(EngineDead):
            await replicas.submit(request(7))
        assert not (await replicas.health()).ok

    run(main())


def test_the_fake_engine_and_a_replica_set_are_engine_clients():
    # what the gateway may call on an engine is engine.api's Protocol, nothing more
    engine = FakeEngine()
    assert isinstance(engine, EngineClient)
    assert isinstance(run(ReplicaSet([engine]).connect()), EngineClient)


def test_no_replica_answering_is_model_unavailable():
    a = FakeEngine(address="a:1")
    a.kill("connection refused")

    async def main():
        with pytest.raises(ModelUnavailable, match="no engine server answered: connection"):
            await ReplicaSet([a]).connect()

    run(main())


# ── the app over HTTP, on a fake engine ──

CHAT_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # fakes.CHATML rendered


def fake_app(tmp_path, clock, loader):
    config = GatewayConfig(
        registry=str(tmp_path / "no-registry"),  # the catalog stands in for it
        database=f"sqlite:///{tmp_path / 'aimass.db'}",
        models=ModelsConfig(idle_unload_s=60.0),
    )
    catalog = FakeCatalog({"tiny": 1}, production=1)
    return create_app(config, catalog=catalog, loader=loader, clock=clock)


def sse_payloads(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_chat_and_completions_over_http_on_a_fake_engine(tmp_path):
    clock, loader = FakeClock(), FakeLoader()
    app = fake_app(tmp_path, clock, loader)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    async def main():
        async with AsyncTestClient(app, base_url="http://127.0.0.1") as client:
            r = await client.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200, r.text
            body = r.json()
            message = body["choices"][0]["message"]
            assert (message["role"], message["content"]) == ("assistant", CHAT_PROMPT[:5])
            assert body["choices"][0]["finish_reason"] == "length"
            prompt_tokens = len(CHAT_PROMPT.encode())  # one token per byte
            assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                                     "total_tokens": prompt_tokens + 5}  # fmt: skip

            r = await client.post("/v1/chat/completions", json=chat | {"stream": True})
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream"
            )
            events = sse_payloads(r.text)
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert text == CHAT_PROMPT[:5]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"

            completion = {"model": "tiny", "prompt": "hello", "max_tokens": 7, "n": 2}
            r = await client.post("/v1/completions", json=completion)
            assert [c["text"] for c in r.json()["choices"]] == ["hellohe", "hellohe"]

            engine = loader.engines["tiny:1"]
            assert len(engine.submitted) == 3 and loader.loads == ["tiny:1"]
            assert (await client.get("/readyz")).json()["models"] == {"tiny:1": "ok"}
            # idle for idle_unload_s of the app's clock: the next reaper pass unloads it
            clock.advance(60.0)
            await app.state.generation.models.reap()
            assert (await client.get("/readyz")).json()["models"] == {}
            assert engine.closed

    run(main())


def test_an_unknown_model_over_http_is_a_404_in_openai_shape(tmp_path):
    app = fake_app(tmp_path, FakeClock(), FakeLoader())

    async def main():
        async with AsyncTestClient(app, base_url="http://127.0.0.1") as client:
            r = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "model_not_found"
            assert r.json()["error"]["param"] == "model"

    run(main())


def test_a_request_the_engine_fails_alone_is_a_500_and_the_next_one_is_served(tmp_path):
    loader = FakeLoader()
    app = fake_app(tmp_path, FakeClock(), loader)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3}

    async def main():
        async with AsyncTestClient(app, base_url="http://127.0.0.1") as client:
            assert (await client.post("/v1/completions", json=body)).status_code == 200
            engine = loader.engines["tiny:1"]
            engine.fail_next("the detokenizer raised")
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 500 and r.json()["error"]["code"] == "output_failed"
            engine.fail_next("the detokenizer raised")
            r = await client.post("/v1/completions", json=body | {"stream": True})
            events = sse_payloads(r.text)
            assert r.status_code == 200 and events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "output_failed"
            # the engine serves on: same engine, no reload
            r = await client.post("/v1/completions", json=body)
            assert r.json()["choices"][0]["text"] == "hel"
            assert loader.loads == ["tiny:1"] and not engine.closed
            metrics = (await client.get("/metrics")).text
            assert 'aimass_engine_errors_total{kind="output",model="tiny"} 2.0' in metrics

    run(main())
