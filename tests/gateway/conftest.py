"""A running gateway: a real uvicorn server on a free port, over a registry holding the tiny
package as `tiny` (production alias on version 1); helpers for talking to it over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from controlplane.access import CLI
from controlplane.db import Database
from controlplane.identity import create_project, project_by_name
from controlplane.keys import KeyRecord, create_key
from engine.core import EngineCore
from engine.loader import EngineConfig
from gateway.app import GatewayConfig, create_app
from gateway.models.service import ModelsConfig
from gateway.openai.service import Limits
from registry.registry import Registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory, tiny_package) -> Path:
    root = tmp_path_factory.mktemp("gateway-registry") / "registry"
    reg = Registry.open(str(root))
    reg.push(tiny_package, "tiny")  # version 1
    reg.set_alias("tiny", "production", 1)
    return root


def base_config(tmp_path: Path, registry: Path, **kw) -> GatewayConfig:
    models = ModelsConfig(
        engine=EngineConfig(n_slots=4, threads=1, max_waiting=16, target="onnx-fp32"),
        cache_dir=tmp_path / "cache",
        reap_every_s=0.2,
        resolve_ttl_s=0.2,
    )
    config = GatewayConfig(
        registry=str(registry),
        database=f"sqlite:///{tmp_path / 'aimass.db'}",
        models=models,
        limits=Limits(),
    )
    return replace(config, **kw)


def make_key(database: str, project: str, scopes, **kw) -> tuple[KeyRecord, str]:
    """A key of `project` (created if absent) made by the operator in the database at URL
    `database`, migrated first: (its record, its plaintext). `kw`: create_key's options."""
    db = Database.open(database)
    try:
        db.upgrade()
        with db.session() as s:
            p = project_by_name(s, project) or create_project(s, CLI, project)
            return create_key(s, CLI, p.id, scopes, **kw)
    finally:
        db.close()


class RunningGateway:
    def __init__(self, config: GatewayConfig, **collaborators):
        """`collaborators`: create_app's keyword arguments (a clock, a loader, ...)."""
        self.config = config
        self.app = create_app(config, **collaborators)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state


@contextlib.contextmanager
def running(config: GatewayConfig, **collaborators):
    with RunningGateway(config, **collaborators) as gw:
        yield gw


@pytest.fixture
def gateway(tmp_path, tiny_registry):
    """Open access (no keys, loopback)."""
    with running(base_config(tmp_path, tiny_registry)) as gw:
        yield gw


# ── talking to a gateway ──

TIMEOUT = 15.0  # seconds, for every HTTP call: generous on a busy 2-core machine


def openai_client(gw: RunningGateway, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)


def http(gw: RunningGateway, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=gw.url, timeout=TIMEOUT, headers=headers)


def sse_data(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def metric(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param=...):
    """`r` is OpenAI's error shape with this status (and code / param when given)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    return error


def slow_steps(monkeypatch, seconds: float) -> None:
    """Every engine step in this process takes at least `seconds`: generations outlast the
    HTTP round trips a test races them against, however fast the machine is."""
    execute = EngineCore.execute

    def slow(self, plan):
        time.sleep(seconds)
        return execute(self, plan)

    monkeypatch.setattr(EngineCore, "execute", slow)


def loaded(gw: RunningGateway) -> dict[str, str]:
    """/readyz's view: the loaded deployments ("tiny:1") and their health."""
    with http(gw) as h:
        return h.get("/readyz").json()["models"]


def deployment(gw: RunningGateway, ref: str = "tiny:1"):
    found = [d for d in gw.state.generation.models.deployments if d.ref == ref]
    assert found, f"{ref} is not loaded"
    return found[0]


def engine_stats(gw: RunningGateway, ref: str = "tiny:1"):
    """An in-process engine's stats; they only take a thread lock, so any event loop may ask."""
    return asyncio.run(deployment(gw, ref).engine.stats())


def wait_for(condition, timeout: float = 10.0, every: float = 0.05):
    """Polls `condition()` until it is truthy (returned) or `timeout` s pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"still false after {timeout} s: {condition}"
        time.sleep(every)
    return value
