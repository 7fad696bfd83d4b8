"""Serverless models through a running gateway: loaded on the first request, unloaded when idle,
one load shared by concurrent requests, alias moves and canary splits picked up without a
restart, the memory budget; and remote engine servers that die and come back, several replicas
balanced.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

import gateway.models.loader as model_loader
from engine.client import RemoteEngine
from engine.core import EngineCore
from registry.registry import Registry
from tests.gateway.conftest import (
    TIMEOUT,
    assert_openai_error,
    base_config,
    deployment,
    engine_stats,
    free_port,
    http,
    loaded,
    metric,
    openai_client,
    running,
    slow_steps,
    sse_data,
    wait_for,
)
from tests.gateway.fakes import FakeClock

ROOT = Path(__file__).resolve().parents[2]
C = "/v1/completions"
PROMPT = "The function"


def complete(gw, model: str = "tiny", max_tokens: int = 3, **kw) -> httpx.Response:
    with http(gw) as h:
        return h.post(C, json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, **kw})


def metrics(gw) -> str:
    with http(gw) as h:
        return h.get("/metrics").text


def in_threads(fn, n: int) -> list:
    """fn(i) for i in range(n), concurrently; their results in order."""
    results: list = [None] * n

    def run(i: int) -> None:
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
        assert not t.is_alive(), "a request hung"
    return results


@pytest.fixture
def two_versions(tmp_path, tiny_package) -> Path:
    """A registry of its own (tests move its aliases): the tiny package pushed twice, as
    versions 1 and 2 (the second push stores no new blob), production on 1."""
    root = tmp_path / "registry"
    reg = Registry.open(str(root))
    assert reg.push(tiny_package, "tiny").version == 1
    assert reg.push(tiny_package, "tiny").version == 2
    reg.set_alias("tiny", "production", 1)
    return root


def count_loads(monkeypatch, delay_s: float = 0.0) -> list[str]:
    """Every in-process load the gateway starts, by "name:version" (after `delay_s`)."""
    loads: list[str] = []
    load_engine = model_loader.load_engine

    def counted(package, config, *, model, version):
        loads.append(f"{model}:{version}")
        time.sleep(delay_s)
        return load_engine(package, config, model=model, version=version)

    monkeypatch.setattr(model_loader, "load_engine", counted)
    return loads


# ── serverless: load on demand, unload when idle ──


def test_first_request_loads_idle_unloads_next_request_reloads(
    tmp_path, tiny_registry, monkeypatch
):
    loads = count_loads(monkeypatch)
    config = base_config(tmp_path, tiny_registry)
    config = replace(config, models=replace(config.models, idle_unload_s=1.0, reap_every_s=0.1))
    clock = FakeClock()
    with running(config, clock=clock) as gw:
        assert loaded(gw) == {} and loads == []
        assert complete(gw).status_code == 200
        assert complete(gw).status_code == 200
        text = metrics(gw)
        assert metric(text, "aimass_cold_starts_total", model="tiny") == 1
        assert metric(text, "aimass_model_loaded", model="tiny", version="1") == 1
        assert metric(text, "aimass_model_load_seconds_count", model="tiny") == 1
        assert loads == ["tiny:1"]
        # idle for idle_unload_s: scaled to zero by the next reaper pass
        clock.advance(1.0)
        wait_for(lambda: loaded(gw) == {}, timeout=5)
        assert metric(metrics(gw), "aimass_model_loaded", model="tiny", version="1") == 0
        # the next request loads it again
        assert complete(gw).status_code == 200
        assert loaded(gw) == {"tiny:1": "ok"} and loads == ["tiny:1", "tiny:1"]
        assert metric(metrics(gw), "aimass_cold_starts_total", model="tiny") == 2


def test_concurrent_first_requests_share_one_load(tmp_path, tiny_registry, monkeypatch):
    loads = count_loads(monkeypatch, delay_s=0.5)  # every request arrives during the load
    with running(base_config(tmp_path, tiny_registry)) as gw:
        results = in_threads(lambda i: complete(gw, max_tokens=2), 4)
        assert [r.status_code for r in results] == [200] * 4
        assert loads == ["tiny:1"]
        # each request waited for the load: each is a cold start, of one load
        text = metrics(gw)
        assert metric(text, "aimass_cold_starts_total", model="tiny") == 4
        assert metric(text, "aimass_model_load_seconds_count", model="tiny") == 1


def test_a_load_slower_than_load_wait_is_a_503_then_succeeds(tmp_path, tiny_registry, monkeypatch):
    loads = count_loads(monkeypatch, delay_s=1.0)
    config = base_config(tmp_path, tiny_registry)
    config = replace(config, models=replace(config.models, load_wait_s=0.2))
    with running(config) as gw:
        r = complete(gw)
        assert_openai_error(r, 503, "model_loading")
        assert int(r.headers["retry-after"]) >= 1
        with http(gw) as h:
            assert h.get("/readyz").status_code == 503  # a load is in progress
        # the load went on without the request that started it
        wait_for(lambda: loaded(gw) == {"tiny:1": "ok"}, timeout=10)
        assert complete(gw).status_code == 200
        assert loads == ["tiny:1"]


def test_a_version_that_will_not_load_is_a_503_counted_against_it(tmp_path, tiny_package):
    """A blob that fails its sha256 (storage corruption): the request gets a 503 saying so, and
    the version's error counter (what a canary watch reads) counts it."""
    root = tmp_path / "registry"
    reg = Registry.open(str(root))
    reg.push(tiny_package, "tiny")
    reg.set_alias("tiny", "production", 1)
    blob = max((root / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    blob.write_bytes(b"corrupt" + blob.read_bytes()[7:])  # same size, other bytes
    with running(base_config(tmp_path, root)) as gw:
        r = complete(gw)
        assert_openai_error(r, 503, "model_load_failed")
        assert r.json()["error"]["message"].startswith("tiny:1 could not be loaded: ")
        assert "sha256" in r.json()["error"]["message"]
        with http(gw) as h:
            text = h.get("/metrics").text
        errors = metric(text, "aimass_deployment_requests_total", model="tiny", version="1",
                        outcome="error")  # fmt: skip
        assert errors == 1.0


def test_a_dead_engine_is_loaded_again_by_the_next_request(tmp_path, tiny_registry, monkeypatch):
    loads = count_loads(monkeypatch)
    with running(base_config(tmp_path, tiny_registry)) as gw:
        assert complete(gw).status_code == 200
        execute = EngineCore.execute

        def crash(self, plan):
            raise RuntimeError("the runtime crashed")

        monkeypatch.setattr(EngineCore, "execute", crash)
        assert_openai_error(complete(gw), 503, "engine_unavailable")
        assert loaded(gw) == {"tiny:1": "dead"}
        monkeypatch.setattr(EngineCore, "execute", execute)  # a fresh engine would run
        assert complete(gw).status_code == 200  # not 503 until the model idles out
        assert loaded(gw) == {"tiny:1": "ok"} and loads == ["tiny:1", "tiny:1"]


# ── aliases: moves and canaries, without a restart ──


def test_an_alias_move_is_picked_up_and_the_old_version_drains(tmp_path, two_versions, monkeypatch):
    slow_steps(monkeypatch, 0.02)  # the long request below takes 2 s
    config = base_config(tmp_path, two_versions)  # resolve_ttl_s=0.2
    clock = FakeClock()
    with running(config, clock=clock) as gw:
        assert complete(gw).status_code == 200
        assert loaded(gw) == {"tiny:1": "ok"}
        # a long request on version 1 is in flight while the alias moves
        events: list[str] = []

        def stream() -> None:
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 100, "stream": True}
            with http(gw) as h, h.stream("POST", C, json=body) as r:
                events.extend(sse_data(r))

        long = threading.Thread(target=stream)
        long.start()
        wait_for(lambda: engine_stats(gw, "tiny:1").slots_used == 1, timeout=5)
        Registry.open(str(two_versions)).set_alias("tiny", "production", 2)
        clock.advance(0.3)  # > resolve_ttl_s
        assert complete(gw).status_code == 200
        assert engine_stats(gw, "tiny:2").requests_total == 1  # served by version 2
        assert set(loaded(gw)) == {"tiny:1", "tiny:2"}  # 1 drains its request first
        long.join(TIMEOUT)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        # drained: version 1 is unloaded; version 2 serves everything
        wait_for(lambda: loaded(gw) == {"tiny:2": "ok"}, timeout=5)
        assert metric(metrics(gw), "aimass_model_loaded", model="tiny", version="1") == 0
        assert complete(gw).status_code == 200
        assert complete(gw, "tiny:1").status_code == 200  # a version asked by number still loads


def served_by(gw, request) -> str:
    """Which loaded version answered `request()` (which returns its HTTP status): the one
    whose engine counted it."""

    def counts() -> dict[str, int]:
        models = gw.state.generation.models
        return {d.ref: engine_stats(gw, d.ref).requests_total for d in models.deployments}

    before = counts()
    assert request() == 200
    after = counts()
    (ref,) = [ref for ref, n in after.items() if n > before.get(ref, 0)]
    return ref


def test_a_canary_splits_users_and_keeps_each_on_one_side(tmp_path, two_versions):
    Registry.open(str(two_versions)).set_alias("tiny", "canary", 2, weight=0.5)
    clock = FakeClock()
    with running(base_config(tmp_path, two_versions), clock=clock) as gw:

        def as_user(user: str) -> str:
            return served_by(gw, lambda: complete(gw, user=user).status_code)

        users = [f"user-{i}" for i in range(10)]
        first = {u: as_user(u) for u in users}
        assert set(first.values()) == {"tiny:1", "tiny:2"}  # both versions get traffic
        assert {u: as_user(u) for u in users} == first  # sticky: a user stays on its side
        # the official client's `user` argument is the same field
        client = openai_client(gw)

        def through_client(user: str) -> int:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, user=user)
            return 200

        assert {u: served_by(gw, lambda u=u: through_client(u)) for u in users[:4]} == {
            u: first[u] for u in users[:4]
        }
        # the canary's weight to 0: everyone on production once the routes refresh
        Registry.open(str(two_versions)).set_alias("tiny", "canary", 2, weight=0.0)
        clock.advance(0.3)  # > resolve_ttl_s
        assert {as_user(u) for u in users} == {"tiny:1"}


# ── the memory budget ──


def test_the_memory_budget_evicts_the_least_recently_used_idle_model(
    tmp_path, two_versions, monkeypatch
):
    with running(base_config(tmp_path / "measure", two_versions)) as gw:
        assert complete(gw).status_code == 200
        size = deployment(gw).bytes  # weights + KV cache of one loaded version
    config = base_config(tmp_path, two_versions)
    config = replace(config, models=replace(config.models, memory_budget_bytes=int(size * 1.5)))
    slow_steps(monkeypatch, 0.01)
    with running(config) as gw:
        assert complete(gw, "tiny:1").status_code == 200
        assert complete(gw, "tiny:2").status_code == 200
        assert loaded(gw) == {"tiny:2": "ok"}  # 1 was evicted to make room
        text = metrics(gw)
        assert metric(text, "aimass_model_loaded", model="tiny", version="1") == 0
        assert metric(text, "aimass_model_loaded", model="tiny", version="2") == 1
        # a model serving a request is never evicted: no room, 503 until it finishes
        events: list[str] = []

        def stream() -> None:
            body = {"model": "tiny:2", "prompt": PROMPT, "max_tokens": 100, "stream": True}
            with http(gw) as h, h.stream("POST", C, json=body) as r:
                events.extend(sse_data(r))

        busy = threading.Thread(target=stream)
        busy.start()
        wait_for(lambda: engine_stats(gw, "tiny:2").slots_used == 1, timeout=5)
        r = complete(gw, "tiny:1")
        assert_openai_error(r, 503, "engine_unavailable")
        assert int(r.headers["retry-after"]) >= 1
        busy.join(TIMEOUT)
        assert events[-1] == "[DONE]"
        assert complete(gw, "tiny:1").status_code == 200
        assert loaded(gw) == {"tiny:1": "ok"}


# ── remote engine servers ──

# `aimass engine serve` whose engine steps take at least argv[1] seconds, so that streams are
# still running when a test kills the server (the tiny model otherwise finishes in milliseconds)
SLOW_SERVER = """
import sys, time
from engine.core import EngineCore
execute = EngineCore.execute
def slow(self, plan):
    time.sleep(float(sys.argv[1]))
    return execute(self, plan)
EngineCore.execute = slow
import aimass_cli
sys.exit(aimass_cli.main(sys.argv[2:]))
"""


class EngineServerProcess:
    """`aimass engine serve PKG` in a subprocess, on `port`; `step_s` slows its steps."""

    def __init__(self, package: Path, port: int, log: Path, step_s: float = 0.0):
        args = ["engine", "serve", str(package), "--port", str(port), "--threads", "1",
                "--slots", "2"]  # fmt: skip
        head = ["-c", SLOW_SERVER, str(step_s)] if step_s else ["-m", "aimass_cli"]
        self.port, self.address = port, f"127.0.0.1:{port}"
        self._log = log.open("a")
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, *head, *args], stdout=subprocess.PIPE, stderr=self._log, text=True,
            env=env, cwd=ROOT,
        )  # fmt: skip

    def wait_listening(self, timeout: float = 60.0) -> EngineServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if "listening on" in line:
                    return self
            if self.proc.poll() is not None:
                break
        self.kill()
        raise AssertionError(f"the engine server did not start; see {self._log.name}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self._log.close()

    def requests_total(self) -> int:
        async def ask() -> int:
            engine = await RemoteEngine("127.0.0.1", self.port).connect()
            try:
                return (await engine.stats()).requests_total
            finally:
                await engine.close()

        return asyncio.run(asyncio.wait_for(ask(), TIMEOUT))


@pytest.fixture
def engine_servers(tiny_package, tmp_path):
    """start(port=None, step_s=0) → a listening engine server; all are killed at the end."""
    started: list[EngineServerProcess] = []

    def start(port: int | None = None, step_s: float = 0.0) -> EngineServerProcess:
        server = EngineServerProcess(
            tiny_package, port or free_port(), tmp_path / "engine-server.log", step_s
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def remote_config(tmp_path, registry, addresses: list[str]):
    config = base_config(tmp_path, registry)
    return replace(config, models=replace(config.models, remote={"tiny": addresses}))


def stream_events(gw, results: list, i: int, max_tokens: int = 100) -> None:
    """One streamed completion; its SSE payloads (or the exception) go to results[i]."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "stream": True}
    try:
        with http(gw) as h, h.stream("POST", C, json=body) as r:
            results[i] = (r.status_code, sse_data(r))
    except Exception as e:  # a timeout is a hang: the test reports it
        results[i] = e


def test_a_killed_engine_server_ends_streams_then_503_then_recovers(
    tmp_path, tiny_registry, engine_servers
):
    server = engine_servers(step_s=0.02).wait_listening()
    with running(remote_config(tmp_path, tiny_registry, [server.address])) as gw:
        assert complete(gw).status_code == 200
        assert deployment(gw).remote and loaded(gw) == {"tiny:1": "ok"}
        results: list = [None] * 4
        threads = [threading.Thread(target=stream_events, args=(gw, results, i)) for i in range(4)]
        for t in threads:
            t.start()
        # every stream accepted: two decoding, two queued on the server's two slots
        wait_for(lambda: server.requests_total() == 1 + 4, timeout=10)
        server.kill()
        for t in threads:
            t.join(TIMEOUT * 2)
            assert not t.is_alive(), "a stream hung after its engine died"
        for result in results:
            assert not isinstance(result, Exception), result
            status, events = result
            assert status == 200 and events[-1] == "[DONE]"
            error = json.loads(events[-2])
            assert error["error"]["code"] == "engine_unavailable", error
        # while it is down: 503 at once, streamed or not, and not ready
        assert_openai_error(complete(gw), 503, "engine_unavailable")
        assert_openai_error(complete(gw, stream=True), 503, "engine_unavailable")
        with http(gw) as h:
            assert h.get("/readyz").status_code == 503
        assert metric(metrics(gw), "aimass_engine_errors_total", model="tiny", kind="dead") >= 4
        # restarted on its port (the plain command this time): the gateway serves again
        engine_servers(port=server.port).wait_listening()
        r = complete(gw, max_tokens=5)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        with http(gw) as h:
            assert h.get("/readyz").status_code == 200


def test_requests_spread_over_replicas_by_outstanding_requests(
    tmp_path, tiny_registry, engine_servers
):
    a, b = engine_servers(step_s=0.01), engine_servers(step_s=0.01)
    a.wait_listening(), b.wait_listening()
    config = remote_config(tmp_path, tiny_registry, [a.address, b.address])
    with running(config) as gw:
        # a burst on a cold model: the requests that waited for the load are submitted at once,
        # and each must see the ones chosen before it (regression: all went to one replica)
        results: list = [None] * 6
        threads = [
            threading.Thread(target=stream_events, args=(gw, results, i, 80)) for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert all(r[0] == 200 and r[1][-1] == "[DONE]" for r in results), results
        assert [a.requests_total(), b.requests_total()] == [3, 3]
        # one replica down: the other takes every request
        a.kill()
        assert [complete(gw).status_code for _ in range(3)] == [200] * 3
        assert b.requests_total() == 3 + 3


def test_an_unreachable_engine_server_is_a_503_not_a_hang(tmp_path, tiny_registry):
    config = remote_config(tmp_path, tiny_registry, [f"127.0.0.1:{free_port()}"])
    config = replace(config, models=replace(config.models, load_wait_s=5.0))
    with running(config) as gw:
        assert_openai_error(complete(gw), 503, "engine_unavailable")
