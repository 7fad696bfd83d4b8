"""A running gateway: a real uvicorn server on a free port, over a registry holding the tiny
package as `tiny` (production alias on version 1)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import uvicorn

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
        registry=str(registry), keys_db=tmp_path / "gateway.db", models=models, limits=Limits()
    )
    return replace(config, **kw)


class RunningGateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.app = create_app(config)
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
def running(config: GatewayConfig):
    with RunningGateway(config) as gw:
        yield gw


@pytest.fixture
def gateway(tmp_path, tiny_registry):
    """Open access (no keys, loopback)."""
    with running(base_config(tmp_path, tiny_registry)) as gw:
        yield gw
